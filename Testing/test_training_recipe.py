"""The generalising training recipe: each widening of the data does what it says and nothing
else, the curriculum runs its stages in order, and unseen anatomy is validated, never trained."""
import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import blob_volume, make_image
from DeepRegistrationLib.errors import UserInputError
from DeepRegistrationLib.images import image_from_array
from DeepRegistrationLib.spatial import warp
from test_training_loop import TINY, vm_diff_copy
from training import __main__ as training_cli
from training.data import Volume
from training.recipes import GENERAL, RECIPES, get_recipe
from training.synth import PairGenerator, SynthConfig, acquisition_effects, random_window
from training.train import TrainOptions, resolve_curriculum, soft_dice_loss, train


def coronal_blobs(name="blobs", shape=(30, 26, 34), seed=3):
    """A labelled blob volume stored with coronal direction cosines (like the ITK T1 head)."""
    array = blob_volume(shape, seed=seed, blobs=16)
    image = make_image(array, spacing=(4.0, 4.0, 4.0), origin=(-60.0, -50.0, -70.0))
    image.SetDirection((1, 0, 0, 0, 0, -1, 0, 1, 0))
    labels = np.digitize(array, [0.25, 0.5, 0.8]).astype(np.int32)
    return Volume(name, image, image_from_array(labels, image), {1: "a", 2: "b", 3: "c"}, "T1",
                  "test blobs")


def test_canonical_sources_are_reoriented_like_dicomorient_without_resampling():
    volume = coronal_blobs()
    oriented = volume.oriented()
    assert np.allclose(oriented.image.GetDirection(), np.eye(3).ravel())
    reference = sitk.DICOMOrient(volume.image, "LPS")
    assert np.array_equal(sitk.GetArrayFromImage(oriented.image),
                          sitk.GetArrayFromImage(reference))
    # the same physical point holds the same value (a permutation/flip, no interpolation)
    point = volume.image.TransformIndexToPhysicalPoint((5, 7, 9))
    index = oriented.image.TransformPhysicalPointToIndex(point)
    assert oriented.image[index] == volume.image[5, 7, 9]
    assert oriented.labels[index] == volume.labels[5, 7, 9]
    generator = PairGenerator([volume], SynthConfig(spacing_mm=4.0, canonical=True), seed=0)
    assert np.allclose(generator.volumes[0].reference.GetDirection(), np.eye(3).ravel())


def test_windows_keep_the_ground_truth_exact_and_sit_on_the_anatomy():
    config = SynthConfig(spacing_mm=4.0, crop_shape=(16, 16, 16), crop_margin=4,
                         augment_probability=0.0, contrast_probability=0.0)
    generator = PairGenerator([coronal_blobs(shape=(40, 44, 40))], config, seed=2)
    for index in range(3):
        pair = generator.pair(index)
        for name in ("fixed", "moving", "fixed_labels", "moving_labels", "displacement"):
            assert tuple(getattr(pair, name).shape[2:]) == (16, 16, 16), name
        assert bool((pair.fixed_labels > 0).any())
        # moving_clean = warp(moving_source, generating) holds on the window itself: the pair
        # was made on the larger window and cut, so nothing near the border is padding
        again = warp(pair.moving_source, pair.generating, padding_mode="zeros")
        inner = (slice(None), slice(None)) + (slice(3, -3),) * 3
        assert torch.allclose(again[inner], pair.moving_clean[inner], atol=1e-4)
    with pytest.raises(ValueError, match="does not fit"):
        random_window(torch.zeros(1, 1, 20, 20, 20), torch.zeros(1, 1, 20, 20, 20, dtype=torch.long),
                      (16, 16, 16), 4, torch.Generator().manual_seed(0))
    # a volume smaller than window + margin (the ITK T1 head at 2 mm for a method whose sides
    # need only be even) gets a canvas that holds the window
    small = PairGenerator([coronal_blobs(shape=(20, 22, 18))], dataclasses.replace(
        config, multiple=2), seed=2)
    assert all(n >= 16 + 2 * 4 for n in small.canvas) and all(n % 2 == 0 for n in small.canvas)
    assert tuple(small.pair(0).fixed.shape[2:]) == (16, 16, 16)
    # validation cases come on windows too, the same ones every time
    first = generator.validation_pairs(2)
    second = generator.validation_pairs(2)
    assert all(tuple(p.fixed.shape[2:]) == (16, 16, 16) for p in first)
    assert torch.equal(first[1].moving, second[1].moving)


def test_synthesis_and_acquisition_effects_change_intensities_only():
    base = SynthConfig(spacing_mm=4.0, augment_probability=0.0, contrast_probability=0.0)
    plain = PairGenerator([coronal_blobs()], base, seed=5)
    painted = PairGenerator([coronal_blobs()], dataclasses.replace(
        base, synthesis_probability=1.0), seed=5)
    a, b = plain.pair(1), painted.pair(1)
    assert torch.equal(a.fixed_labels, b.fixed_labels)
    assert torch.equal(a.displacement, b.displacement)
    assert not torch.allclose(a.fixed, b.fixed, atol=0.05)
    # both images share the new contrast: the moving image is the fixed one, warped
    assert torch.allclose(b.moving_clean, warp(b.moving_source, b.generating,
                                               padding_mode="zeros"), atol=1e-5)
    assert torch.equal(b.moving_source, b.fixed_clean)


def test_thick_slices_blur_one_axis_and_partial_coverage_cuts_a_slab():
    image = torch.rand(1, 1, 24, 24, 24, generator=torch.Generator().manual_seed(0))
    config = SynthConfig(thick_slice_probability=1.0, thick_slice_factor=(4.0, 4.0))
    out = acquisition_effects(image, torch.Generator().manual_seed(1), config)
    roughness = [float(out.diff(dim=d).abs().mean()) for d in (2, 3, 4)]
    original = float(image.diff(dim=2).abs().mean())
    assert min(roughness) < 0.3 * original < max(roughness)   # one axis smooth, others not
    config = SynthConfig(partial_coverage_probability=1.0, partial_coverage_max=0.25)
    cut = acquisition_effects(image + 0.5, torch.Generator().manual_seed(3), config)
    zero_planes = [int((cut[0, 0].abs().amax(dim=tuple(a for a in range(3) if a != d)) == 0)
                       .sum()) for d in range(3)]
    assert 1 <= max(zero_planes) <= 6 and sorted(zero_planes)[:2] == [0, 0]
    # probability 0: nothing drawn, nothing changed
    untouched = acquisition_effects(image, torch.Generator().manual_seed(1), SynthConfig())
    assert torch.equal(untouched, image)


def test_new_subjects_and_independent_scales_widen_the_deformations():
    config = SynthConfig(spacing_mm=4.0, augment_probability=0.0, contrast_probability=0.0,
                         independent_scales=True,
                         subject_scales=((24.0, 6.0), (12.0, 3.0)), framing_shift_mm=12.0)
    generator = PairGenerator([coronal_blobs()], config, seed=4)
    template = generator.volumes[0].labels
    changed = [float((generator.pair(i).fixed_labels != template).float().mean())
               for i in range(3)]
    assert min(changed) > 0.02          # every pair is a new "subject"
    magnitudes = [float(generator.pair(i).displacement.norm(dim=1).mean()) for i in range(6)]
    assert max(magnitudes) > 1.5 * min(magnitudes)   # strengths vary pair to pair


def test_recipe_stages_scale_with_the_method_and_run_in_order():
    assert get_recipe("general") is GENERAL and set(RECIPES) >= {"general"}
    with pytest.raises(UserInputError, match="unknown recipe"):
        get_recipe("nope")
    assert not set(GENERAL.sources) & set(GENERAL.unseen)
    # the fourth head changes the sources and nothing else
    colin = get_recipe("general-colin27")
    assert colin.sources == GENERAL.sources + ("colin27",) and colin.unseen == GENERAL.unseen
    assert dataclasses.replace(colin, name="general", sources=GENERAL.sources) == GENERAL
    vtn_plan = GENERAL.for_method(2)
    assert [s["batch_size"] for s in vtn_plan["stages"]] == [4, 2] and vtn_plan["batch_size"] == 1
    spec = dataclasses.replace(__import__("DeepRegistrationLib.methods", fromlist=["get_method"])
                               .get_method("vm-diff"))
    stages = resolve_curriculum(spec, TrainOptions(method="vm-diff", output="x", iterations=100),
                                2.0, GENERAL.for_method(4)["stages"])
    # each stage ends after its own share of the steps, in order (shares are per stage)
    first, second = (s["fraction"] for s in GENERAL.stages)
    assert [(s["spacing_mm"], s["steps"]) for s in stages] == [
        (8.0, round(100 * first)), (4.0, round(100 * (first + second)))]
    # --no-curriculum: every step on the working grid
    assert resolve_curriculum(spec, TrainOptions(method="vm-diff", output="x", iterations=100,
                                                 curriculum=False),
                              2.0, GENERAL.for_method(4)["stages"]) == []
    # a stage no coarser than the working grid is dropped
    stages = resolve_curriculum(spec, TrainOptions(method="vm-diff", output="x", iterations=100),
                                4.0, GENERAL.for_method(4)["stages"])
    assert [s["spacing_mm"] for s in stages] == [8.0]


def test_unseen_anatomy_is_validated_and_recorded_but_never_trained_on(tmp_path):
    seen_sources = []

    def loss_fn(network, fixed, moving, batch):
        if batch["training"]:
            seen_sources.extend(batch["source"])
        displacement = network(fixed, moving)
        return soft_dice_loss(batch["fixed_labels"], batch["moving_labels"], displacement), {}

    seen = coronal_blobs("seen", seed=3)
    unseen = coronal_blobs("held-out", seed=9)
    curriculum = [{"spacing_mm": 8.0, "fraction": 0.25, "batch_size": 2},
                  {"spacing_mm": 6.0, "fraction": 0.25, "batch_size": 1}]
    with vm_diff_copy("recipe-test", {"loss_fn": loss_fn, "lr": 1e-3,
                                      "curriculum": curriculum}):
        card = train(TrainOptions(method="recipe-test", output=str(tmp_path / "r.pt"),
                                  iterations=4, sources=[seen], unseen_sources=[unseen],
                                  val_every=1, val_cases=1, batch_size=1, spacing_mm=4.0,
                                  config=TINY, progress=False))
    assert set(seen_sources) == {"seen"}
    history = card["validation"]["history"]
    assert [h["spacing_mm"] for h in history] == [8.0, 6.0, 4.0, 4.0, 4.0]
    assert "unseen" in history[-1] and "unseen" not in history[0]
    assert card["unseen_validation"]["sources"] == ["held-out"]
    assert set(card["unseen_validation"]["metrics"]) >= {"dice", "gt_error_mm"}
    assert card["validation"]["sources"] == ["seen"]


def test_training_cli_refuses_a_source_that_is_also_held_out(capsys, tmp_path):
    code = training_cli.main(["train", "--method", "vm-diff", "--source", "mni152",
                              "--unseen", "mni152", "--iterations", "1",
                              "--output", str(tmp_path / "x.pt")])
    assert code == 2
    assert "both trained on and held out" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_a_warm_start_records_the_checkpoint_it_started_from(tmp_path):
    def loss_fn(network, fixed, moving, batch):
        displacement = network(fixed, moving)
        return soft_dice_loss(batch["fixed_labels"], batch["moving_labels"], displacement), {}

    volume = coronal_blobs("seen", seed=3)
    with vm_diff_copy("warm-test", {"loss_fn": loss_fn, "lr": 1e-3, "curriculum": None}):
        first = train(TrainOptions(method="warm-test", output=str(tmp_path / "a.pt"),
                                   iterations=2, sources=[volume], val_every=0, val_cases=1,
                                   spacing_mm=6.0, config=TINY, progress=False))
        second = train(TrainOptions(method="warm-test", output=str(tmp_path / "b.pt"),
                                    iterations=2, sources=[volume], val_every=0, val_cases=1,
                                    spacing_mm=6.0, config=TINY, progress=False,
                                    resume=str(tmp_path / "a.pt")))
        # a resumed run (optimiser state) keeps the record of where its weights began
        third = train(TrainOptions(method="warm-test", output=str(tmp_path / "b.pt"),
                                   iterations=3, sources=[volume], val_every=0, val_cases=1,
                                   spacing_mm=6.0, config=TINY, progress=False,
                                   resume=str(tmp_path / "b.resume.pt")))
    assert first["training"]["warm_start"] is None
    start = second["training"]["warm_start"]
    assert start["checkpoint"] == "a.pt" and start["sha256"] == first["sha256"]
    assert start["trained_on"] == ["seen"] and start["iterations"] == 2
    assert third["training"]["warm_start"] == start


def _tiny_batch():
    generator = PairGenerator([coronal_blobs()], SynthConfig(spacing_mm=4.0, multiple=16), seed=2)
    batch = generator.batch([0, 1])
    batch.update(step=0, iterations=1, training=True)
    return batch


def _tiny_network_and_batch(method, config):
    """``(spec, small untrained network in eval mode, a two-pair training batch)``; ``config``
    overrides the method's own (keys it does not have are ignored)."""
    from DeepRegistrationLib.methods import get_method

    spec = get_method(method)
    config = {k: v for k, v in dict(spec.config, **config).items() if k in spec.config}
    torch.manual_seed(0)
    network = spec.build_network(config).eval()
    batch = _tiny_batch()
    batch.update(spec=spec, config=config)
    return spec, network, batch


@pytest.mark.parametrize("method, config", [
    ("vm-diff", TINY),
    ("vtn", {"variant": "AD", "features": 4}),
    ("vtn", {"variant": "AD", "features": 4, "invertibility": True}),
    ("r2net-svf", {"encoder": [4, 8, 8, 8], "features": 4}),
    ("ms-r2net", {"encoder": [4, 8, 8, 8], "features": 4, "phase": 2}),
    ("multiprop", {}),
])
def test_guidance_terms_act_on_the_final_field_of_every_method(method, config):
    from training.train import GUIDANCE, make_loss_fn, supervised_field_loss

    spec, network, batch = _tiny_network_and_batch(method, config)
    fixed, moving = batch["fixed"], batch["moving"]
    plain, plain_terms = make_loss_fn(spec)(network, fixed, moving, dict(batch))
    guided, terms = make_loss_fn(spec, {"supervised": 0.5, "dice": 2.0})(
        network, fixed, moving, dict(batch))
    with torch.no_grad():
        field = network(fixed, moving)
    # the terms are the ones of the network's own field, and they add to the method's loss
    assert terms["guidance_supervised"] == pytest.approx(float(supervised_field_loss(
        field, batch["displacement"], batch["fixed_labels"] > 0)), rel=1e-4)
    assert terms["guidance_dice"] == pytest.approx(
        float(soft_dice_loss(batch["fixed_labels"], batch["moving_labels"], field)), rel=1e-4)
    assert float(guided.detach()) == pytest.approx(
        float(plain.detach()) + 0.5 * terms["guidance_supervised"] + 2.0 * terms["guidance_dice"],
        rel=1e-4)
    assert set(plain_terms) <= set(terms)
    # and their gradient reaches the network
    network.zero_grad()
    make_loss_fn(spec, {"supervised": 1.0})(network, fixed, moving, dict(batch))[0].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in network.parameters())
    assert set(GUIDANCE) == {"supervised", "dice"}


def test_supervised_field_loss_is_the_end_point_error():
    from training.train import supervised_field_loss

    truth = torch.zeros(1, 3, 4, 5, 6)
    field = truth.clone()
    field[:, 0] = 3.0
    field[:, 1] = 4.0
    assert float(supervised_field_loss(field, truth)) == pytest.approx(5.0, rel=1e-5)
    assert float(supervised_field_loss(truth, truth)) < 1e-2
    # over a mask: the error where the anatomy is, whatever the field does elsewhere
    mask = torch.zeros(1, 1, 4, 5, 6, dtype=torch.bool)
    mask[..., :2, :, :] = True
    field[:, :, 2:] = 100.0
    assert float(supervised_field_loss(field, truth, mask)) == pytest.approx(5.0, rel=1e-5)


def test_unknown_guidance_is_a_user_error():
    from DeepRegistrationLib.methods import get_method
    from training.train import make_loss_fn

    with pytest.raises(UserInputError, match="unknown guidance"):
        make_loss_fn(get_method("vm-diff"), {"labels": 1.0})


@pytest.mark.parametrize("method, config", [
    ("vm-diff", TINY),
    ("vtn", {"variant": "AD", "features": 4}),
    ("vtn", {"variant": "AD", "features": 4, "invertibility": True}),
    ("r2net-svf", {"encoder": [4, 8, 8, 8], "features": 4}),
    ("ms-r2net", {"encoder": [4, 8, 8, 8], "features": 4, "phase": 1}),
    ("ms-r2net", {"encoder": [4, 8, 8, 8], "features": 4, "phase": 2}),
    ("mmln", {"width": 4, "residual_blocks": 1}),
    ("multiprop", {}),
])
def test_clean_similarity_scores_the_clean_pair_but_the_network_sees_the_degraded_one(
        method, config):
    from training.train import make_loss_fn

    spec, network, batch = _tiny_network_and_batch(method, config)
    fixed, moving = batch["fixed"], batch["moving"]
    assert not torch.equal(batch["fixed_clean"], fixed)  # the generator degraded them
    loss_fn = make_loss_fn(spec)

    def run(**changes):
        total, _ = loss_fn(network, fixed, moving, dict(batch, **changes))
        return float(total.detach())

    degraded = run(clean=False)
    # "clean" images equal to the seen ones: exactly the usual loss
    assert run(clean=True, fixed_clean=fixed, moving_clean=moving) == pytest.approx(degraded,
                                                                                   rel=1e-6)
    # the real clean pair: another loss value, from the same field
    clean = run(clean=True)
    assert abs(clean - degraded) > 1e-4 * abs(degraded)
    fields = []  # the supervised term measures the network's field, not the scored images
    for changes in ({"clean": True}, {"clean": True, "fixed_clean": batch["fixed_clean"] * 0.5}):
        _, terms = make_loss_fn(spec, {"supervised": 1.0})(network, fixed, moving,
                                                           dict(batch, **changes))
        fields.append(terms["guidance_supervised"])
    assert fields[0] == pytest.approx(fields[1], rel=1e-6)


def test_methods_whose_loss_takes_no_recipe_terms_are_refused_up_front():
    from DeepRegistrationLib.methods import get_method
    from training.train import check_recipe_losses

    for name in ("suits",):
        spec = get_method(name)
        check_recipe_losses(spec, {}, False)  # the method's own loss alone: fine
        with pytest.raises(UserInputError, match="--guidance"):
            check_recipe_losses(spec, {"supervised": 0.5}, False)
        with pytest.raises(UserInputError, match="--clean-similarity no"):
            check_recipe_losses(spec, {}, True)
    for name in ("vm-diff", "vtn", "r2net-svf", "r2net-nsvf", "ms-r2net", "mmln", "multiprop"):
        check_recipe_losses(get_method(name), {"supervised": 0.5, "dice": 1.0}, True)


def test_mmln_reports_the_trained_level_field_and_at_validation_the_pyramid_field():
    from training.train import make_loss_fn, supervised_field_loss

    spec, network, batch = _tiny_network_and_batch("mmln", {"width": 4, "residual_blocks": 1})
    loss_fn = make_loss_fn(spec, {"supervised": 1.0})
    fixed, moving = batch["fixed"], batch["moving"]
    # validation: the full pyramid, i.e. the field the user gets
    _, terms = loss_fn(network, fixed, moving, dict(batch, training=False))
    with torch.no_grad():
        field = network(fixed, moving)
    assert terms["guidance_supervised"] == pytest.approx(float(supervised_field_loss(
        field, batch["displacement"], batch["fixed_labels"] > 0)), rel=1e-4)
    # training step 0: level 1 alone, its field brought to the pair's grid; the gradient of the
    # guidance term reaches level 1 (and no level above it)
    network.zero_grad()
    total, terms = loss_fn(network, fixed, moving, dict(batch, training=True, step=0,
                                                        iterations=100))
    assert terms["level"] == 1.0 and np.isfinite(terms["guidance_supervised"])
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in network.levels[0].parameters())
    assert all(p.grad is None for p in network.levels[2].parameters())


def test_validation_without_the_affine_keeps_the_deformation_and_drops_the_pose():
    config = SynthConfig(spacing_mm=4.0, augment_probability=0.0, contrast_probability=0.0,
                         independent_scales=True, rotation_degrees=10.0, translation_mm=8.0)
    generator = PairGenerator([coronal_blobs()], config, seed=2)
    with_pose = generator.validation_pairs(2)
    without = generator.validation_pairs(2, affine=False)
    for posed, plain in zip(with_pose, without):
        assert not np.allclose(posed.info["affine"], plain.info["affine"])
        assert np.allclose(plain.info["affine"], np.eye(3, 4))
        # the same deformation, so the same deformable statistics; without the pose the
        # ground truth *is* the deformation
        assert posed.info["deformable_mean_mm"] == pytest.approx(plain.info["deformable_mean_mm"])
        inside = plain.fixed_labels[0, 0] > 0
        length = plain.displacement[0].norm(dim=0)[inside] * 4.0
        assert float(length.mean()) == pytest.approx(plain.info["deformable_mean_mm"], rel=1e-5)
        assert float((posed.displacement - plain.displacement).abs().max()) > 0.5


def _deformable_means(recipe, pairs=4):
    """Per-pair mean deformable displacement (mm) of ``recipe``'s deformation strengths on a
    labelled blob volume at 8 mm (intensities and framing off: only the geometry matters)."""
    synth = dict(recipe.synth, canonical=False, synthesis_probability=0.0,
                 partial_coverage_probability=0.0, thick_slice_probability=0.0,
                 sharpen_probability=0.0, augment_probability=0.0, contrast_probability=0.0)
    synth.update({k: tuple(map(tuple, synth[k])) for k in ("velocity_scales", "subject_scales")})
    generator = PairGenerator([coronal_blobs()], SynthConfig(spacing_mm=8.0, **synth), seed=0)
    return np.array([generator.pair(i).info["deformable_mean_mm"] for i in range(pairs)])


def test_the_general_recipe_deforms_in_the_inter_subject_range():
    # issue #15: deformations from 1-3 mm detail up to the inter-subject range. The first
    # version's strengths (general-v1) gave a deformable part of well under a millimetre; the
    # pairs share their random draws, so each is the same deformation at another strength
    current, first = _deformable_means(RECIPES["general"]), _deformable_means(RECIPES["general-v1"])
    assert np.median(first) < 1.0
    assert np.all(current > 3.0 * first) and current.max() > 3.0


def test_still_pairs_have_no_motion_and_leave_the_other_pairs_unchanged():
    config = SynthConfig(spacing_mm=8.0, contrast_probability=0.0, rotation_degrees=8.0)
    plain = PairGenerator([coronal_blobs()], config, seed=5)
    still = PairGenerator([coronal_blobs()], dataclasses.replace(config, still_probability=0.5),
                          seed=5)
    kinds = []
    for index in range(6):
        a, b = plain.pair(index), still.pair(index)
        if float(b.displacement.abs().max()) == 0.0:
            kinds.append("still")
            assert torch.equal(b.moving_labels, b.fixed_labels)
            assert torch.equal(b.fixed_labels, a.fixed_labels)   # the same subject
            assert not torch.equal(b.moving, b.fixed)             # each image its own noise
        else:
            kinds.append("moved")
            assert torch.equal(a.displacement, b.displacement)
            assert torch.equal(a.moving, b.moving)
    assert "still" in kinds and "moved" in kinds
