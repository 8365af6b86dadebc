"""MMLN (methods/mmln.py): the stacked 2-D field, the core branch's warp, the coupling that lets
the branch weights reach the deployed 3-D pyramid (and the uncoupled control where they cannot),
LapIRN's progressive freezing, the identity start, and running through the engine and trainer."""
import numpy as np
import pytest
import torch

from conftest import (assert_engine_refuses_without_checkpoint,
                      assert_engine_registers_with_checkpoint, blob_volume, make_image)
from DeepRegistrationLib import engine, losses
from DeepRegistrationLib.errors import UserInputError
from DeepRegistrationLib.methods import get_method, load_network, mmln, save_checkpoint
from DeepRegistrationLib.spatial import gaussian_smooth, integrate_velocity, warp

SHAPE = (16, 24, 16)


def pair(shape=SHAPE, seed=0):
    fixed = torch.from_numpy(blob_volume(shape, seed))[None, None]
    moving = torch.from_numpy(blob_volume(shape, seed + 1))[None, None]
    return fixed / fixed.max(), moving / moving.max()


def perturbed(network, scale=0.05, seed=0):
    """Every parameter jittered (the zero-initialised heads and residual branches included), so
    every level, branch and block contributes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return network


def smooth_in_plane_field(items, height, width, magnitude=3.0, seed=0):
    """A random smooth 2-channel (H, W) velocity per slice, ``(items, 2, H, W)`` in voxels."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, items * 2, 1, height, width), generator=generator)
    field = gaussian_smooth(noise, [0.0, 3.0, 3.0])[0, :, 0]
    field = field.view(items, 2, height, width)
    return magnitude * field / field.abs().max()


def parameters_of(modules):
    return [p for module in modules for p in module.parameters()]


# ------------------------------------------------------------------------------ the 2-D branch
def test_stacked_in_plane_field_has_no_through_plane_motion():
    depth, height, width = 8, 20, 16
    in_plane = smooth_in_plane_field(depth, height, width, magnitude=4.0)
    stacked = mmln.stack_in_plane(in_plane, depth)
    assert stacked.shape == (1, 3, depth, height, width)
    assert torch.equal(stacked[:, 0], torch.zeros_like(stacked[:, 0]))
    assert torch.equal(stacked[0, 1:, 5], in_plane[5])  # slice k carries slice k's field
    displacement = integrate_velocity(stacked, 7)
    assert torch.equal(displacement[:, 0], torch.zeros_like(displacement[:, 0]))  # exactly
    assert displacement[:, 1:].abs().max() > 1.0                                   # it moves
    # a bright voxel moves within its slice and nowhere else
    image = torch.zeros((1, 1, depth, height, width))
    image[0, 0, 3, 10, 8] = 1.0
    warped = warp(image, -displacement)
    others = torch.cat([warped[:, :, :3], warped[:, :, 4:]], dim=2)
    assert warped[:, :, 3].sum() > 0.5
    assert others.abs().max() < 1e-5


def scaling_and_squaring_2d(velocity, steps=7):
    """Independent 2-D oracle: per-slice scaling and squaring with scipy's linear interpolation
    (``mode="nearest"`` repeats the edge, the border padding of the library's warp), float64."""
    from scipy.ndimage import map_coordinates
    velocity = velocity.astype(np.float64)
    rows, columns = np.meshgrid(*[np.arange(n) for n in velocity.shape[1:]], indexing="ij")
    displacement = velocity / 2 ** steps
    for _ in range(steps):
        points = [rows + displacement[0], columns + displacement[1]]
        displacement = displacement + np.stack([
            map_coordinates(component, points, order=1, mode="nearest")
            for component in displacement])
    return displacement


def test_scaling_and_squaring_of_a_stacked_field_is_per_slice_2d_scaling_and_squaring():
    depth, height, width = 6, 24, 20
    in_plane = smooth_in_plane_field(depth, height, width, magnitude=5.0, seed=3)
    ours = mmln.to_slices(integrate_velocity(mmln.stack_in_plane(in_plane, depth), 7)[:, 1:])
    for index in range(depth):
        oracle = scaling_and_squaring_2d(in_plane[index].numpy())
        assert np.abs(ours[index].numpy() - oracle).max() < 1e-4
        assert np.abs(oracle - in_plane[index].numpy()).max() > 0.05  # composition mattered


def test_slice_refinement_adds_only_in_plane_motion_to_the_3d_velocity():
    network = perturbed(mmln.build_network({"variant": "LCD"}), seed=1)
    fixed, moving = pair()
    with torch.no_grad():
        entries = network.pyramid(fixed, moving, 2)
        for level, entry in enumerate(entries, start=1):
            refined = network.slice_refinement(level, entry)
            assert torch.equal(refined["in_plane"][:, 0], torch.zeros_like(entry["fixed"][:, 0]))
            assert refined["in_plane"][:, 1:].abs().max() > 1e-3
            assert torch.equal(refined["velocity"], entry["velocity"] + refined["in_plane"])


# ----------------------------------------------------------------------------- the core branch
def test_core_region_is_centred_half_with_even_offsets():
    for shape in [(32, 40, 24), (16, 24, 48), (96, 112, 96)]:
        region = mmln.core_region(shape)
        for r, n in zip(region, shape):
            assert r.stop - r.start == n // 2 and r.start % 2 == 0 and r.stop % 2 == 0
            assert r.start == n - r.stop  # centred


def test_structure_moved_into_the_core_appears_in_the_warped_core():
    shape = (32, 32, 32)
    region = mmln.core_region(shape)  # voxels 8..23 on every axis
    moving = torch.zeros((1, 1, *shape))
    moving[:, :, 2:6, 14:18, 13:17] = 1.0  # a cube outside the core along D
    displacement = torch.zeros((1, 3, 16, 16, 16))
    displacement[:, 0] = -10.0            # the core voxel at D = 12..15 looks 10 voxels up
    warped = mmln.warp_core(moving, displacement, region)
    expected = torch.zeros((1, 1, 16, 16, 16))
    expected[:, :, 4:8, 6:10, 5:9] = 1.0  # (12..15, 14..17, 13..16) minus the offset 8
    assert torch.allclose(warped, expected, atol=1e-5)
    # warping a crop of the moving image instead sees only the crop's border values
    naive = warp(mmln.crop(moving, region), displacement)
    assert naive.abs().max() < 1e-6


def test_core_pass_reuses_the_level3_network_and_grows_no_parameters():
    count = lambda net: sum(p.numel() for p in net.parameters())
    plain = mmln.build_network({"variant": "L"})
    core = mmln.build_network({"variant": "LC"})
    control = mmln.build_network({"variant": "LC", "coupling": "uncoupled"})
    assert count(core) == count(plain)
    assert count(control) == count(plain) + count(plain.levels[2])

    network = perturbed(core, seed=2)
    calls = []
    network.levels[2].register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    fixed, moving = pair()
    entries = network.pyramid(fixed, moving)
    result = network.core_registration(moving, entries[-1])
    assert calls == [(1, 5, *SHAPE), (1, 5, 8, 12, 8)]  # the full grid, then the core crop
    assert torch.allclose(result["warped"],
                          mmln.warp_core(moving, result["displacement"], result["region"]))
    core_loss = losses.correlation_coefficient_loss(result["fixed"], result["warped"])
    gradients = torch.autograd.grad(core_loss, list(network.levels[2].parameters()),
                                    allow_unused=True)
    assert all(g is not None for g in gradients) and any(g.abs().sum() > 0 for g in gradients)

    control = perturbed(control, seed=2)
    entries = control.pyramid(fixed, moving)
    result = control.core_registration(moving, entries[-1])
    core_loss = losses.correlation_coefficient_loss(result["fixed"], result["warped"])
    pyramid = parameters_of(control.levels)
    gradients = torch.autograd.grad(core_loss, pyramid + list(control.core_level.parameters()),
                                    allow_unused=True)
    assert all(g is None for g in gradients[:len(pyramid)])
    assert all(g is not None for g in gradients[len(pyramid):])


# ------------------------------------------------------------------------- coupling decides
def level_gradient(network, fixed, moving, level):
    network.zero_grad(set_to_none=True)
    total, _ = mmln.level_loss(network, fixed, moving, level)
    total.backward()
    deployed = parameters_of(network.levels[:level])
    assert all(p.grad is not None for p in deployed)
    return torch.cat([p.grad.flatten() for p in deployed])


@pytest.mark.parametrize("level, weight", [(1, "alpha"), (2, "beta"), (3, "theta")])
def test_branch_weights_change_the_deployed_gradient_only_when_coupled(level, weight):
    fixed, moving = pair(seed=4)
    changes = {}
    for coupling in ("coupled", "uncoupled"):
        network = perturbed(mmln.build_network({"variant": "LCD", "coupling": coupling}),
                            scale=0.02, seed=3)
        default = getattr(network, weight)
        setattr(network, weight, 0.0)
        without = level_gradient(network, fixed, moving, level)
        setattr(network, weight, default)
        with_branch = level_gradient(network, fixed, moving, level)
        changes[coupling] = float((with_branch - without).norm() / without.norm())
    # measured: 0.25 (alpha), 0.05 (beta), 0.004 (theta) coupled; exactly 0 uncoupled
    assert changes["coupled"] > 1e-4, changes
    assert changes["uncoupled"] < 1e-7, changes


def test_forward_ignores_branch_weights_and_the_branches_themselves():
    fixed, moving = pair(seed=6)
    network = perturbed(mmln.build_network({"variant": "LCD"}), seed=5).eval()
    with torch.no_grad():
        reference = network(fixed, moving)
        assert reference.abs().max() > 0.1
        network.alpha, network.beta, network.theta = 0.0, 3.0, 7.0
        assert torch.equal(network(fixed, moving), reference)
        del network.slice_levels  # forward must not touch a branch
        assert torch.equal(network(fixed, moving), reference)
        # the pyramid's weights alone, in a network built without branches, give the same field
        plain = mmln.build_network({"variant": "L", "alpha": 0.0, "theta": 0.0}).eval()
        state = {k: v for k, v in network.state_dict().items() if k.startswith("levels.")}
        plain.load_state_dict(state)
        assert torch.equal(plain(fixed, moving), reference)


# ------------------------------------------------------------------------------------ training
def test_training_phases_follow_lapirn_iteration_counts():
    # LapIRN: 30000 / 30000 / 60000 steps, earlier levels frozen for 2000 steps of each phase
    schedule = lambda step: mmln.training_phase(step, 120000, mmln.PHASES, mmln.FREEZE_FRACTION)
    assert schedule(0) == (1, False) and schedule(29999) == (1, False)
    assert schedule(30000) == (2, True) and schedule(31999) == (2, True)
    assert schedule(32000) == (2, False) and schedule(59999) == (2, False)
    assert schedule(60000) == (3, True) and schedule(61999) == (3, True)
    assert schedule(62000) == (3, False) and schedule(119999) == (3, False)


def test_frozen_levels_get_no_gradient_until_the_unfreeze_step():
    iterations = 600  # phases at 150 and 300; earlier levels frozen for 10 steps of each
    network = perturbed(mmln.build_network({"variant": "L"}), seed=7)
    fixed, moving = pair(seed=8)

    def grads_at(step):
        network.zero_grad(set_to_none=True)
        total, terms = mmln.training_loss(network, fixed, moving,
                                          {"step": step, "iterations": iterations,
                                           "training": True})
        total.backward()
        return int(terms["level"]), [all(p.grad is not None for p in level.parameters())
                                     for level in network.levels]

    assert grads_at(0) == (1, [True, False, False])
    assert grads_at(150) == (2, [False, True, False])
    assert grads_at(159) == (2, [False, True, False])
    assert grads_at(160) == (2, [True, True, False])
    assert grads_at(300) == (3, [False, False, True])
    assert grads_at(309) == (3, [False, False, True])
    assert grads_at(310) == (3, [True, True, True])


def test_a_coarse_curriculum_stage_trains_the_level_of_its_grid():
    """A trainer stage at 8 mm (4 mm) trains level 1 (2) on the batch's grid as it is; the
    working grid (2 mm) follows the phase schedule; the levels below are frozen at first."""
    network = perturbed(mmln.build_network({"variant": "L"}), seed=7)
    spec = get_method("mmln")
    seen = {index: [] for index in range(3)}
    for index, level in enumerate(network.levels):
        level.register_forward_hook(
            lambda module, args, out, index=index: seen[index].append(tuple(args[0].shape)))
    fixed, moving = pair(seed=8)
    iterations = 120  # the freeze lasts round(120 / 60) = 2 steps

    def run(step, spacing):
        for calls in seen.values():
            calls.clear()
        _, terms = mmln.training_loss(network, fixed, moving,
                                      {"step": step, "iterations": iterations, "training": True,
                                       "spec": spec, "spacing_mm": spacing})
        shapes = [calls[0][2:] if calls else None for calls in seen.values()]
        return int(terms["level"]), bool(terms["frozen"]), shapes

    half = tuple(n // 2 for n in SHAPE)
    quarter = tuple(n // 4 for n in SHAPE)
    assert run(0, 8.0) == (1, False, [SHAPE, None, None])
    assert run(40, 4.0) == (2, True, [half, SHAPE, None])
    assert run(42, 4.0) == (2, False, [half, SHAPE, None])
    assert run(59, 4.0) == (2, False, [half, SHAPE, None])
    assert run(60, 2.0) == (3, True, [quarter, half, SHAPE])   # the working grid starts
    assert run(62, 2.0) == (3, False, [quarter, half, SHAPE])
    with pytest.raises(UserInputError, match="8, 4, 2 mm"):
        run(70, 6.0)
    # after a short 8 mm stage the working grid goes on with level 2, not back to level 1
    network.level_started.clear()
    assert run(0, 8.0)[:2] == (1, False) and run(9, 8.0)[:2] == (1, False)
    assert run(10, 2.0) == (2, True, [quarter, half, None])    # the schedule says level 1
    assert run(12, 2.0) == (2, False, [quarter, half, None])
    assert run(60, 2.0)[:2] == (3, True)                       # the schedule's own boundary


def test_fresh_network_is_the_identity():
    fixed, moving = pair(seed=9)
    for variant in ("L", "LCD"):
        network = mmln.build_network({"variant": variant})
        entries = network.pyramid(fixed, moving)
        for entry in entries:
            assert torch.equal(entry["displacement"], torch.zeros_like(entry["displacement"]))
        assert torch.equal(network(fixed, moving), torch.zeros((1, 3, *SHAPE)))
        if variant == "LCD":
            refined = network.slice_refinement(1, entries[0])
            assert torch.equal(refined["displacement"], torch.zeros_like(refined["velocity"]))
            core = network.core_registration(moving, entries[-1])
            assert torch.equal(core["displacement"], torch.zeros_like(core["displacement"]))
            assert torch.allclose(core["warped"], mmln.crop(moving, core["region"]), atol=1e-6)


def test_training_loss_terms_per_level_and_variant():
    fixed, moving = pair(seed=10)
    network = perturbed(mmln.build_network({"variant": "LCD"}), seed=11)
    _, terms = mmln.level_loss(network, fixed, moving, 1)
    assert set(terms) == {"level1_similarity", "level1_smoothness", "level1_slices_similarity"}
    total, terms = mmln.level_loss(network, fixed, moving, 3)
    assert set(terms) == {"level3_similarity", "level3_smoothness", "core_similarity"}
    expected = (terms["level3_similarity"] + network.smoothness * terms["level3_smoothness"]
                + network.theta * terms["core_similarity"])
    assert float(total.detach()) == pytest.approx(expected, rel=1e-5)
    # level 1's smoothness weight is k / 2^(3 - 1)
    plain = perturbed(mmln.build_network({"variant": "L", "smoothness": 2.0}), seed=11)
    total, terms = mmln.level_loss(plain, fixed, moving, 1)
    assert float(total.detach()) == pytest.approx(terms["level1_similarity"]
                                         + 0.5 * terms["level1_smoothness"], rel=1e-5)
    with pytest.raises(UserInputError, match="variant"):
        mmln.build_network({"variant": "LD"})


# ---------------------------------------------------------------------------------- the engine
def test_engine_without_checkpoint_fails_in_one_line(tmp_path, monkeypatch):
    assert_engine_refuses_without_checkpoint("mmln", "LC", tmp_path, monkeypatch)


def test_engine_registers_with_a_checkpoint_and_variants(tmp_path, monkeypatch):
    spec = get_method("mmln")
    network = perturbed(mmln.build_network(spec.config), scale=0.02, seed=13)
    fixed, moving = assert_engine_registers_with_checkpoint("mmln", network, dict(spec.config),
                                                            tmp_path, monkeypatch)
    # an ablation arm loads its own file, and a file holding another variant is refused
    plain = mmln.build_network(dict(spec.config, variant="L"))  # identity network
    save_checkpoint(str(tmp_path / "mmln-L.pt"), plain, "mmln", dict(spec.config, variant="L"),
                    {"test": 1})
    identity = engine.register(fixed, moving, "mmln", options={"variant": "L"})
    assert identity.displacement.abs().max() < 1e-6
    save_checkpoint(str(tmp_path / "mmln-LC.pt"), plain, "mmln", dict(spec.config, variant="L"),
                    {"test": 1})
    with pytest.raises(UserInputError, match="holds MMLN variant 'L'"):
        engine.register(fixed, moving, "mmln", options={"variant": "LC"})


def test_trainer_runs_the_phases_and_keeps_a_checkpoint(tmp_path):
    from training.data import Volume
    from training.train import TrainOptions, train
    from DeepRegistrationLib.images import image_from_array

    array = blob_volume((36, 40, 36), seed=5, blobs=18)
    image = make_image(array, spacing=(4.0,) * 3, origin=(-70.0, -80.0, -70.0))
    labels = np.digitize(array, [0.3, 0.7]).astype(np.int32)
    volume = Volume("blobs", image, image_from_array(labels, image), {1: "low", 2: "high"},
                    "T1", "test blobs")
    output = str(tmp_path / "mmln.pt")
    config = {"width": 4, "residual_blocks": 1, "phases": [1, 1, 1], "freeze_fraction": 0.2}
    # working grid 8 mm; the first 2 steps on a 32 mm coarse stage, which is level 1's grid:
    # level 1 there, then on the working grid the schedule (levels 2 and 3 from steps 2 and 4),
    # the levels below frozen for round(0.2 * 6) = 1 step after each change
    train(TrainOptions(method="mmln", output=output, iterations=6, sources=[volume], seed=0,
                       val_every=3, val_cases=1, spacing_mm=8.0, config=config,
                       coarse_spacing_mm=32.0, coarse_fraction=0.34, coarse_batch_size=1,
                       synth={"contrast_probability": 0.0}, progress=False, log_every=1))
    log = open(tmp_path / "mmln.log").read()
    assert "at 32.0 mm" in log
    for step, level, frozen in [(1, 1, 0), (2, 1, 0), (3, 2, 1), (4, 2, 0), (5, 3, 1),
                                (6, 3, 0)]:
        assert f"step {step}: " in log
        line = next(l for l in log.splitlines() if f"step {step}: " in l and "level" in l)
        assert f"level {level}.0000 frozen {frozen}.0000" in line, line
    network = load_network(get_method("mmln"), path=output)
    assert isinstance(network, mmln.MMLN) and network.levels[0].bound == 4.0


def test_uncoupled_control_trains_the_pyramid_exactly_as_the_pyramid_alone(tmp_path, monkeypatch):
    """The negative control's branches get no gradient into the pyramid, and the trainer clips
    them apart (``clip_groups``): trained with the same seed, ``L`` and ``LCD-uncoupled`` end
    with the same deployed weights. The clip norm is made tiny so that clipping acts at every
    step: clipped as one group, the branches' gradients would shrink the pyramid's steps."""
    import training.train as trainer
    from training.data import Volume
    from DeepRegistrationLib.images import image_from_array

    monkeypatch.setattr(trainer, "GRADIENT_CLIP_NORM", 1e-3)
    array = blob_volume((36, 40, 36), seed=5, blobs=18)
    image = make_image(array, spacing=(4.0,) * 3, origin=(-70.0, -80.0, -70.0))
    labels = np.digitize(array, [0.3, 0.7]).astype(np.int32)
    volume = Volume("blobs", image, image_from_array(labels, image), {1: "low", 2: "high"},
                    "T1", "test blobs")
    deployed = {}
    for variant, coupling in (("L", "coupled"), ("LCD", "uncoupled"), ("LCD", "coupled")):
        output = str(tmp_path / f"{variant}-{coupling}.pt")
        config = {"width": 4, "residual_blocks": 1, "phases": [1, 1, 1], "freeze_fraction": 0.2,
                  "variant": variant, "coupling": coupling}
        trainer.train(trainer.TrainOptions(
            method="mmln", output=output, iterations=6, sources=[volume], seed=0, val_every=0,
            val_cases=1, spacing_mm=8.0, config=config, coarse_spacing_mm=0.0,
            synth={"contrast_probability": 0.0}, progress=False))
        network = load_network(get_method("mmln"), path=output)
        deployed[(variant, coupling)] = torch.cat([p.detach().flatten()
                                                   for p in network.levels.parameters()])
    assert torch.equal(deployed[("L", "coupled")], deployed[("LCD", "uncoupled")])
    # while the coupled branches do change the pyramid (the test can tell the difference)
    assert not torch.equal(deployed[("L", "coupled")], deployed[("LCD", "coupled")])
