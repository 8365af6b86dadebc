"""VTN (methods/vtn.py): cascade shapes and composition, the affine subnetwork, Table I losses,
the invertibility loss, and running through the engine with a checkpoint and --variant."""
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import blob_volume, make_image
from DeepRegistrationLib import engine, losses, spatial
from DeepRegistrationLib.errors import UserInputError
from DeepRegistrationLib.methods import get_method, load_network, save_checkpoint, vtn
from DeepRegistrationLib.methods.base import same_contrast
from DeepRegistrationLib.synthetic import random_velocity

SHAPE = (32, 32, 32)


def pair(shape=SHAPE, seed=0):
    fixed = torch.from_numpy(blob_volume(shape, seed))[None, None]
    moving = torch.from_numpy(blob_volume(shape, seed + 1))[None, None]
    return fixed / fixed.max(), moving / moving.max()


def perturbed(network, scale=0.05, seed=0):
    """The network with every parameter jittered, so every stage predicts a non-zero flow."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return network


def affine_matrix(angle_degrees, axis, scale, translation):
    """``[s R | t]`` (3, 4) for a rotation about ``axis`` (Rodrigues), in (k, j, i) coordinates."""
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    angle = math.radians(angle_degrees)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross
    return np.concatenate([scale * rotation, np.reshape(translation, (3, 1))], axis=1)


def inverse_affine(matrix):
    linear = np.linalg.inv(matrix[:, :3])
    return np.concatenate([linear, -linear @ matrix[:, 3:]], axis=1)


@pytest.mark.parametrize("variant", vtn.VARIANTS)
def test_every_variant_gives_a_field_per_stage(variant):
    network = perturbed(vtn.build_network({"variant": variant}), seed=1)
    fixed, moving = pair()
    stages = network.stages(fixed, moving)
    assert [s["kind"] for s in stages] == list(variant)
    for stage in stages:
        assert stage["flow"].shape == (1, 3, *SHAPE)
        assert stage["displacement"].shape == (1, 3, *SHAPE)
        assert stage["warped"].shape == (1, 1, *SHAPE)
        if stage["kind"] == "A":
            assert stage["matrix"].shape == (1, 3, 4)
    assert torch.equal(network(fixed, moving), stages[-1]["displacement"])
    assert network(fixed, moving).abs().max() > 1e-3  # the perturbed stages really move


def test_fresh_network_is_the_identity():
    fixed, moving = pair()
    for variant in ("ADDD", "DD"):
        network = vtn.build_network({"variant": variant})
        for stage in network.stages(fixed, moving):
            assert torch.equal(stage["displacement"], torch.zeros_like(stage["displacement"]))
            assert torch.allclose(stage["warped"], moving, atol=1e-6)
            if stage["kind"] == "A":
                assert torch.equal(stage["matrix"], torch.cat([torch.eye(3), torch.zeros(3, 1)],
                                                              1)[None])


def test_cascade_composes_flows_and_rewarps_the_original():
    network = perturbed(vtn.build_network({"variant": "ADDD"}), scale=0.05, seed=2).eval()
    fixed, moving = pair()
    with torch.no_grad():
        stages = network.stages(fixed, moving)
    inner = (slice(None), slice(None), slice(6, -6), slice(6, -6), slice(6, -6))
    assert all(s["flow"].abs().max() > 0.05 for s in stages)
    for index, stage in enumerate(stages):
        # every stage warps the ORIGINAL moving image once, by the composed field
        assert torch.allclose(stage["warped"], spatial.warp(moving, stage["displacement"]),
                              atol=1e-6)
        if index == 0:
            assert torch.allclose(stage["displacement"], stage["flow"])
            continue
        expected = spatial.compose(stages[index - 1]["displacement"], stage["flow"])
        if index == 1:  # after the affine stage: exact formula f_A + (I + A) f; the library's
            # compose interpolates the (linear) affine field, exact inside the grid only
            assert torch.allclose(stage["displacement"][inner], expected[inner], atol=1e-4)
        else:
            assert torch.allclose(stage["displacement"], expected, atol=1e-6)
    # re-warping from the original is not the same as warping the previous warped image again
    rewarped = spatial.warp(stages[-2]["warped"], stages[-1]["flow"])
    assert not torch.allclose(rewarped, stages[-1]["warped"], atol=1e-4)


def test_affine_subnetwork_recovers_a_known_affine():
    """Train the affine subnetwork alone on ONE pair: a smooth blob volume and its copy rotated
    10 degrees, scaled by 1.1 and translated by 3 voxels (moving = warp(fixed, affine)). The
    network must return the inverse map, [G | t]^-1, in the library's convention."""
    torch.manual_seed(0)
    shape = (32, 32, 32)
    fixed = torch.from_numpy(blob_volume(shape, seed=3, blobs=16))[None, None]
    fixed = fixed / fixed.max()
    generating = affine_matrix(10.0, (1.0, 0.5, 0.3), 1.1, (3.0, -1.0, 1.5))
    generating_t = torch.tensor(generating, dtype=torch.float32)[None]
    moving = spatial.warp(fixed, spatial.affine_displacement(generating_t, shape))
    expected = inverse_affine(generating)

    subnetwork = vtn.AffineSubnetwork()
    optimiser = torch.optim.Adam(subnetwork.parameters(), lr=1e-3)
    for _ in range(150):  # converged after ~120 steps (about 3 s on 2 cores)
        matrix = subnetwork(fixed, moving)
        warped = spatial.warp(moving, spatial.affine_displacement(matrix, shape))
        # similarity only: the det / ortho priors (weights 0.1) would pull the scale 1.1 towards 1
        loss = losses.correlation_coefficient_loss(fixed, warped)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    recovered = subnetwork(fixed, moving).detach()[0].numpy()
    # Tolerances: the optimum of the correlation on smooth blobs resampled trilinearly is within
    # ~0.002 (linear part) and ~0.01 voxel (translation) of the truth (measured: 0.0017 and
    # 0.006 after 125 steps). The bounds leave a 10x margin for other CPUs / BLAS orderings and
    # are still tight for the transform: 0.02 is ~1.1 degrees of rotation or 2% of scale (the
    # transform is 10 degrees and 10%), 0.2 voxel of translation (of 3).
    assert np.abs(recovered[:, :3] - expected[:, :3]).max() < 0.02, (recovered, expected)
    assert np.abs(recovered[:, 3] - expected[:, 3]).max() < 0.2, (recovered, expected)
    assert float(loss.detach()) < 0.002  # 1 - CorrCoef; 0.12 before training


def test_invertibility_loss_vanishes_for_inverse_affines():
    shape = (24, 28, 20)
    forward = affine_matrix(12.0, (0.2, 1.0, 0.4), 1.05, (1.5, -2.0, 1.0))
    backward = inverse_affine(forward)
    as_field = lambda m: spatial.affine_displacement(torch.tensor(m, dtype=torch.float32)[None],
                                                     shape)
    # trilinear interpolation reproduces a linear field exactly inside the grid: ~0
    assert float(losses.invertibility_loss(as_field(forward), as_field(backward))) < 1e-6
    assert float(losses.invertibility_loss(as_field(forward), as_field(forward))) > 1.0


def test_invertibility_loss_is_the_papers_unnormalised_sum():
    """||f12 * f21||^2 + ||f21 * f12||^2 summed over the central region (a quarter of each side
    left out): for a constant shift t one way and none back, both round trips are t at every
    voxel, so the loss is 2 |t|^2 times the number of central voxels -- and the same physical
    shift on a grid twice as fine costs 8 x the voxels x 4 x the squared voxels = 32 x."""
    shift = torch.tensor([0.5, -1.0, 0.25])
    coarse = (24, 28, 20)
    central = (24 - 2 * 6) * (28 - 2 * 7) * (20 - 2 * 5)
    constant = lambda t, shape: t.view(1, 3, 1, 1, 1).expand(1, 3, *shape).clone()
    value = losses.invertibility_loss(constant(shift, coarse), torch.zeros(1, 3, *coarse))
    assert float(value) == pytest.approx(2 * float(shift.pow(2).sum()) * central, rel=1e-5)
    fine = tuple(2 * n for n in coarse)
    finer = losses.invertibility_loss(constant(2 * shift, fine), torch.zeros(1, 3, *fine))
    assert float(finer) == pytest.approx(32 * float(value), rel=1e-5)
    # a batch is the mean of its pairs' sums
    batch = losses.invertibility_loss(torch.cat([constant(shift, coarse),
                                                 torch.zeros(1, 3, *coarse)]),
                                      torch.zeros(2, 3, *coarse))
    assert float(batch) == pytest.approx(float(value) / 2, rel=1e-5)


# ------------------------------------------------------------ tiny trained cascades (property)
TINY_SHAPE = (24, 24, 24)
TINY_STEPS = 150
PAPER_WEIGHT = 1e-3          # Table I's invertibility weight, on the unnormalised sum
TRAINABLE_WEIGHT = 3e-5      # a weight at which the tiny network still learns the deformation


@pytest.fixture(scope="module")
def known_deformation():
    """A smooth blob volume and its copy deformed by a known random diffeomorphism exp(v)
    (largest velocity component 2 voxels, control points every 10 voxels); the field a
    registration must return is exp(-v) (``warp(moving, exp(-v)) ~= fixed``)."""
    fixed = torch.from_numpy(blob_volume(TINY_SHAPE, seed=11, blobs=24))[None, None]
    fixed = fixed / fixed.max()
    velocity = random_velocity(TINY_SHAPE, 10.0, 2.0, torch.Generator().manual_seed(3))
    moving = spatial.warp(fixed, spatial.integrate_velocity(velocity))
    truth = spatial.integrate_velocity(-velocity)
    inside = fixed[0, 0] > 0.2
    return fixed, moving, truth, inside


@pytest.fixture(scope="module")
def tiny_trained(known_deformation):
    """One-stage VTNs ("D", a 3-level dense subnetwork) trained by ``vtn.training_loss`` on the
    known pair for the same steps from the same initialisation: without "+inv" (weight 0: Table I,
    fixed to moving only) and with it at ``TRAINABLE_WEIGHT`` and at the paper's ``PAPER_WEIGHT``
    (the pair registered both ways in one batch, plus the weighted L_inv)."""
    fixed, moving, _, _ = known_deformation
    networks = {}
    for weight in (0.0, TRAINABLE_WEIGHT, PAPER_WEIGHT):
        torch.manual_seed(0)
        network = vtn.build_network({"variant": "D", "dense_encoder": [8, 16, 16],
                                     "invertibility": bool(weight),
                                     "invertibility_weight": weight})
        optimiser = torch.optim.Adam(network.parameters(), lr=2e-3)
        for _ in range(TINY_STEPS):
            loss, _ = vtn.training_loss(network, fixed, moving, {})
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        networks[weight] = network.eval()
    return networks


def endpoint_error(field, truth, inside):
    return float((field - truth).norm(dim=1)[0][inside].mean())


def round_trip(network, fixed, moving, inside):
    """Mean length (voxels) of f12 * f21 and f21 * f12 inside the object: 0 when the network's
    two directions are inverse to each other."""
    with torch.no_grad():
        forward, backward = network(fixed, moving), network(moving, fixed)
    trips = [spatial.compose(forward, backward), spatial.compose(backward, forward)]
    return float(sum(t.norm(dim=1)[0][inside].mean() for t in trips) / 2)


def registered(network, known):
    fixed, moving, truth, inside = known
    with torch.no_grad():
        field = network(fixed, moving)
    return field, endpoint_error(field, truth, inside)


def test_a_trained_dense_stage_recovers_a_known_deformation(known_deformation, tiny_trained):
    _, _, truth, inside = known_deformation
    before = endpoint_error(torch.zeros_like(truth), truth, inside)
    field, after = registered(tiny_trained[0.0], known_deformation)
    # measured: 0.48 -> 0.21 voxel (largest true component 1.9 voxels)
    assert after < 0.6 * before, (before, after)
    # the field points the way the truth does, not just anywhere that matches intensities
    cosine = torch.nn.functional.cosine_similarity(field, truth, dim=1)[0][inside]
    assert float(cosine.mean()) > 0.7


def test_the_invertibility_loss_lowers_the_inverse_consistency_error(known_deformation,
                                                                   tiny_trained):
    """The "+inv" switch of ``vtn.training_loss`` (the paper's ablation): the same budget with
    it gives a network whose two directions are far closer to inverse to each other. Most of this
    comes from registering the pair both ways, which "+inv" needs; the L_inv term's own share on
    top of two-way training was measured small and noisy at this scale (0.037 -> 0.019-0.032
    voxel) and is not asserted."""
    fixed, moving, truth, inside = known_deformation
    identity = endpoint_error(torch.zeros_like(truth), truth, inside)
    plain = round_trip(tiny_trained[0.0], fixed, moving, inside)
    with_inverse = round_trip(tiny_trained[TRAINABLE_WEIGHT], fixed, moving, inside)
    # measured: 0.78 -> 0.02-0.03 voxel
    assert with_inverse < 0.3 * plain, (plain, with_inverse)
    # ... while it still registers the pair (measured 0.23-0.30 voxel against 0.21 without)
    assert registered(tiny_trained[TRAINABLE_WEIGHT], known_deformation)[1] < 0.7 * identity


def test_at_the_papers_weight_a_short_run_stays_at_the_identity(known_deformation,
                                                                tiny_trained):
    """Why "+inv" is off by default: with the paper's unnormalised sum and weight the loss is
    cheapest where both directions predict no flow, and a run of this length stays there --
    inverse-consistent, and not registering (docs/methods/vtn.md)."""
    fixed, moving, truth, inside = known_deformation
    identity = endpoint_error(torch.zeros_like(truth), truth, inside)
    field, error = registered(tiny_trained[PAPER_WEIGHT], known_deformation)
    assert error > 0.9 * identity, (identity, error)          # measured: 0.481 of 0.482
    assert round_trip(tiny_trained[PAPER_WEIGHT], fixed, moving, inside) < 0.01


def test_the_shipped_card_recomputes_from_the_shipped_weights():
    """The model card's validation figures (Dice, ground-truth error, folding, SDlogJ, NCC) come
    back from the shipped weights on the card's own validation cases (tolerances in
    Testing/model_cards.py)."""
    spec = get_method("vtn")
    if spec.checkpoint_path() is None:
        pytest.skip("no shipped vtn checkpoint")
    from DeepRegistrationLib.methods.base import read_model_card
    from model_cards import differences
    card = read_model_card(spec.checkpoint_path())
    assert card is not None, "the shipped checkpoint has no model card"
    assert differences(load_network(spec), card) == {}


# Table I, summed similarity weight of every stage of each variant (affine 1; the dense stages
# take (0, 0.05, 1) from the end): at the identity every stage's warped image is the moving image,
# so the cascade's loss is exactly this many times 1 - CorrCoef(fixed, moving)
TABLE_ONE_SIMILARITY_SUM = {"ADDD": 2.05, "ADD": 2.05, "AD": 2.0, "DDD": 1.05, "DD": 1.05,
                            "D": 1.0}


@pytest.mark.parametrize("variant", sorted(TABLE_ONE_SIMILARITY_SUM))
def test_table_one_weights_act_in_the_cascade_loss(variant):
    fixed, moving = pair()
    network = vtn.build_network({"variant": variant, "invertibility": False})
    total, terms = vtn.training_loss(network, fixed, moving, {})
    mismatch = float(losses.correlation_coefficient_loss(fixed, moving))
    assert mismatch > 0.05
    assert float(total.detach()) == pytest.approx(TABLE_ONE_SIMILARITY_SUM[variant] * mismatch,
                                                  rel=1e-5)
    # every stage logs its similarity, weighted or not, and the affine priors vanish at I
    assert all(terms[f"{i}{kind}_similarity"] == pytest.approx(mismatch, rel=1e-5)
               for i, kind in enumerate(variant, start=1))
    with pytest.raises(UserInputError):
        vtn.check_variant("DA")


def test_training_loss_has_every_term_and_gradient():
    fixed, moving = pair()
    # at the identity: det/ortho gradients finite
    network = vtn.build_network({"variant": "ADDD", "invertibility": True})
    total, terms = vtn.training_loss(network, fixed, moving, {})
    assert set(terms) == {"1A_similarity", "1A_determinant", "1A_orthogonality",
                          "2D_similarity", "2D_total_variation", "3D_similarity",
                          "3D_total_variation", "4D_similarity", "4D_total_variation",
                          "invertibility"}
    total.backward()
    grads = [p.grad for p in network.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # at the identity only the zero-initialised output layers (affine FC, last transposed
    # convolution of each dense subnetwork) receive a gradient, and they all do
    assert network.subnetworks[0].fully_connected.weight.grad.abs().sum() > 0
    assert all(s.flow.weight.grad.abs().sum() > 0 for s in network.subnetworks[1:])
    # identity: total = 1 - cc on the affine stage + 0.05 and 1 times the same dense mismatch
    mismatch = float(losses.correlation_coefficient_loss(torch.cat([fixed, moving]),
                                                         torch.cat([moving, fixed])))
    assert float(total.detach()) == pytest.approx((1.0 + 0.05 + 1.0) * mismatch, rel=1e-4)

    plain = vtn.build_network({"variant": "DD", "invertibility": False})
    _, terms = vtn.training_loss(plain, fixed, moving, {})
    assert "invertibility" not in terms and set(terms) >= {"1D_similarity", "2D_similarity"}
    assert terms["2D_similarity"] == pytest.approx(
        float(losses.correlation_coefficient_loss(fixed, moving)), rel=1e-5)
    local = vtn.build_network({"variant": "D", "invertibility": False, "similarity": "lncc"})
    _, terms = vtn.training_loss(local, fixed, moving, {})
    assert terms["1D_similarity"] == pytest.approx(
        float(losses.local_ncc_loss(fixed, moving, 5)), rel=1e-5)
    with pytest.raises(UserInputError, match="similarity"):
        vtn.build_network({"similarity": "mi"})


def vtn_pad(image, multiple=16):
    return spatial.pad_to_multiple(image, multiple)[0]


def _images(shape=(40, 36, 44), spacing=(2.0, 2.0, 2.0)):
    fixed = blob_volume(shape, seed=5)
    moving = blob_volume(shape, seed=5)
    moving = np.roll(moving, 1, axis=0)
    return make_image(fixed, spacing), make_image(moving, spacing)


def test_engine_runs_vtn_from_a_checkpoint_and_variants_only_from_their_own(tmp_path,
                                                                           monkeypatch, capsys):
    monkeypatch.setenv("DEEPREG_CHECKPOINTS", str(tmp_path))  # searched before Resources/
    spec = get_method("vtn")
    fixed, moving = _images()
    network = perturbed(vtn.build_network(spec.config), scale=0.02, seed=4)
    save_checkpoint(str(tmp_path / "vtn.pt"), network, "vtn", dict(spec.config), {"test": True})
    result = engine.register(fixed, moving, "vtn")
    assert result.displacement.shape == (1, 3, 40, 36, 44)
    assert result.displacement.abs().max() > 0.05   # the perturbed cascade really moves
    # the shipped variant by name is the shipped checkpoint itself
    named = engine.register(fixed, moving, "vtn", options={"variant": "ADDD"})
    assert torch.equal(named.displacement, result.displacement)

    # AD is NOT the first two stages of the shipped ADDD: without vtn-AD.pt it is refused
    with pytest.raises(UserInputError, match="vtn-AD.pt") as refused:
        engine.register(fixed, moving, "vtn", options={"variant": "AD"})
    assert "\n" not in str(refused.value) and "is ADDD" in str(refused.value)
    # ... and through the command line that is a one-line error with exit status 2
    from DeepRegistrationLib.cli import main
    image_paths = []
    for name, image in (("fixed", fixed), ("moving", moving)):
        image_paths.append(str(tmp_path / f"{name}.nii.gz"))
        sitk.WriteImage(image, image_paths[-1])
    capsys.readouterr()
    code = main(["register", *image_paths, "--method", "vtn", "--variant", "AD",
                 "--output", str(tmp_path / "out"), "--quiet"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and error.startswith("deepreg: error:") and "vtn-AD.pt" in error
    assert len(error.splitlines()) == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

    # a separately trained vtn-AD.pt is loaded and run whole: here an untrained one (the
    # identity), while the first two stages of the perturbed ADDD move the image
    own = vtn.build_network(dict(spec.config, variant="AD"))
    save_checkpoint(str(tmp_path / "vtn-AD.pt"), own, "vtn", dict(spec.config, variant="AD"),
                    {"test": True})
    separate = engine.register(fixed, moving, "vtn", options={"variant": "AD"})
    assert separate.displacement.abs().max() < 1e-6
    pair_tensors = [torch.from_numpy(sitk.GetArrayFromImage(i)).float()[None, None]
                    for i in (fixed, moving)]
    with torch.no_grad():
        first_two = network.stages(*[vtn_pad(t) for t in pair_tensors], count=2)[-1]
    assert first_two["displacement"].abs().max() > 0.05
    # a file named for one variant but holding another is refused
    save_checkpoint(str(tmp_path / "vtn-DD.pt"), own, "vtn", dict(spec.config, variant="AD"),
                    {"test": True})
    with pytest.raises(UserInputError, match="holds VTN variant 'AD', not 'DD'"):
        engine.register(fixed, moving, "vtn", options={"variant": "DD"})


def test_second_contrast_pairs_train_on_the_fixed_contrast():
    fixed, moving = pair()
    generating = spatial.affine_displacement(torch.tensor(
        affine_matrix(5.0, (0, 0, 1), 1.0, (1.0, 0.0, 0.0)), dtype=torch.float32)[None], SHAPE)
    both = lambda t: torch.cat([t, t])
    batch = {"multimodal": [False, True], "generating": both(generating)}
    result = same_contrast(both(fixed), both(moving), batch)
    assert torch.equal(result[:1], moving)
    assert torch.allclose(result[1:], spatial.warp(fixed, generating))
    assert same_contrast(fixed, moving, {}) is moving
