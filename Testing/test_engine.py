"""The engine: instance optimisation registers, does not fold, refines, reports, stops; the global
stage is composed with the deformable one, and the output files say so in ITK's terms."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepRegistrationLib import engine
from DeepRegistrationLib.errors import RegistrationCancelled, UserInputError
from DeepRegistrationLib.images import image_to_tensor
from DeepRegistrationLib.metrics import dice, jacobian_determinant_map
from DeepRegistrationLib.methods.instance_optimisation import _Adam, instance_optimisation
from DeepRegistrationLib.spatial import warp
from conftest import deformed_blob_pair, make_image

SHAPE = (32, 36, 34)


@pytest.fixture(scope="module")
def pair():
    """A blob volume and a smoothly deformed copy (labels come from thresholds, labels_of)."""
    return deformed_blob_pair(SHAPE, blob_seed=11, blobs=16, magnitude=5.0, field_seed=3,
                              spacing=(1.5, 1.5, 1.5))


def labels_of(image):
    array = sitk.GetArrayFromImage(image)
    return np.digitize(array, [0.25, 0.6]).astype(np.int32)


def test_instance_optimisation_registers_without_folding(pair):
    fixed, moving = pair
    result = engine.register(fixed, moving, "io")
    assert result.displacement.shape == (1, 3, *SHAPE)
    warped_labels = warp(torch.from_numpy(labels_of(moving)).float()[None, None],
                         result.displacement, mode="nearest")[0, 0].numpy()
    before = np.mean(list(dice(labels_of(fixed), labels_of(moving)).values()))
    after = np.mean(list(dice(labels_of(fixed), warped_labels).values()))
    assert after > before + 0.05, (before, after)
    assert jacobian_determinant_map(result.displacement).min() > 0


def test_mind_registers_an_inverted_contrast_pair(pair):
    fixed, moving = pair
    inverted = sitk.GetImageFromArray(1.5 - sitk.GetArrayFromImage(moving))
    inverted.CopyInformation(moving)
    result = engine.register(fixed, inverted, "io", similarity="mind")
    warped_labels = warp(torch.from_numpy(labels_of(moving)).float()[None, None],
                         result.displacement, mode="nearest")[0, 0].numpy()
    before = np.mean(list(dice(labels_of(fixed), labels_of(moving)).values()))
    after = np.mean(list(dice(labels_of(fixed), warped_labels).values()))
    assert after > before + 0.03, (before, after)


def test_refinement_starts_from_the_initial_field(pair):
    fixed, moving = pair
    f, m = image_to_tensor(fixed), image_to_tensor(moving)
    coarse = instance_optimisation(f, m, iterations=(30,))
    # zero refinement steps keep the start exactly; a few steps move away from it
    same = instance_optimisation(f, m, initial=coarse, iterations=(0,))
    assert torch.allclose(same, coarse, atol=1e-5)
    refined = instance_optimisation(f, m, initial=coarse, iterations=(20, 10))
    assert not torch.allclose(refined, coarse, atol=1e-2)
    result = engine.register(fixed, moving, "io", refine=12)
    assert result.refine == 12 and "refine" in result.timings
    assert result.refine_schedule == engine.refine_schedule(12)
    # an explicit schedule runs as given; none on the full grid upsamples the half grid's field
    explicit = engine.register(fixed, moving, "io", refine="6x0")
    assert explicit.refine == 6 and explicit.refine_schedule == (6, 0)
    assert not torch.allclose(explicit.displacement, result.displacement, atol=1e-3)


def test_refinement_improves_its_start_and_beats_the_same_steps_from_zero(pair):
    """The refinement optimises M o (u0 * exp(v)) (with a gradient that leaves out u0's own
    spatial derivative): from a start it must end better than the start and better than the same
    few steps from the identity (both measured by the library's own warp, not the loop's)."""
    from DeepRegistrationLib.losses import local_ncc_loss
    fixed, moving = pair
    f, m = image_to_tensor(fixed), image_to_tensor(moving)

    def loss(field):
        return local_ncc_loss(f, warp(m, field), 5).item()

    start = instance_optimisation(f, m, iterations=(15,))
    refined = instance_optimisation(f, m, initial=start, iterations=(6, 2))
    from_zero = instance_optimisation(f, m, iterations=(6, 2))
    assert loss(refined) < 0.95 * loss(start) < loss(from_zero), (
        loss(refined), loss(start), loss(from_zero))
    assert jacobian_determinant_map(refined).min() > 0


def test_refine_schedule_splits_a_total_and_reads_an_explicit_schedule():
    share = engine.REFINE_FULL_SHARE
    for total in (2, 7, 60, 301):
        half, full = engine.refine_schedule(total)
        assert half + full == total and half >= 1 and full >= 1
        assert abs(full - total * share) <= 0.5 + 1e-9
    assert engine.refine_schedule(0) == (0, 0) and engine.refine_schedule(1) == (1, 0)
    assert engine.refine_schedule("28x2") == (28, 2) == engine.refine_schedule("28X2")
    assert engine.refine_schedule("60") == engine.refine_schedule(60)
    assert engine.refine_schedule((5, 0)) == (5, 0)
    for bad in (-1, "-3", "3x", "x", "1x2x3", "ten", "3x-1", (1,), None):
        with pytest.raises(UserInputError, match="--refine must be"):
            engine.refine_schedule(bad)


def test_progress_is_monotonic_and_cancel_stops(pair):
    fixed, moving = pair
    seen = []
    engine.register(fixed, moving, "io", progress=lambda f, s, m: seen.append(f))
    assert seen[0] == 0.0 and seen[-1] == 1.0
    assert all(b >= a - 1e-9 for a, b in zip(seen, seen[1:]))
    calls = []
    with pytest.raises(RegistrationCancelled):
        engine.register(fixed, moving, "io", cancel=lambda: len(calls) > 3 or calls.append(1))


def test_clear_errors_for_bad_requests(pair):
    fixed, moving = pair
    with pytest.raises(UserInputError, match="unknown method"):
        engine.register(fixed, moving, "no-such-method")
    with pytest.raises(UserInputError, match="has no variant"):
        engine.register(fixed, moving, "io", options={"variant": "ADDD"})
    with pytest.raises(UserInputError, match="does not support similarity"):
        engine.register(fixed, moving, "io", similarity="cosine")
    if not torch.cuda.is_available():
        with pytest.raises(UserInputError, match="no CUDA"):
            engine.register(fixed, moving, "io", device="cuda")
    with pytest.raises(UserInputError, match="unknown --initial"):
        engine.register(fixed, moving, "io", initial="similarity")
    far = make_image(sitk.GetArrayFromImage(moving), spacing=(1.5, 1.5, 1.5),
                     origin=(500.0, 0.0, 0.0))
    with pytest.raises(UserInputError, match="do not overlap"):
        engine.register(fixed, far, "io", initial="none")


def test_a_copy_500_mm_away_is_found_by_the_global_stage(pair):
    """Without a global stage the pair is refused (no physical overlap); by default the centres
    of mass bring it together and the affine stage recovers the 500 mm shift."""
    fixed, moving = pair
    far = make_image(sitk.GetArrayFromImage(moving), spacing=(1.5, 1.5, 1.5),
                     origin=(500.0, 0.0, 0.0))
    result = engine.register(fixed, far, "io")
    assert result.alignment.requested == "auto" and result.alignment.used == "affine"
    assert "not aligned" in result.alignment.reason
    # the moving copy is the fixed content shifted by 500 mm along x (plus the deformation)
    assert abs(result.alignment.matrix[0, 3] - 500.0) < 5.0, result.alignment.matrix
    # the far copy's labels through the total field score as the unmoved pair registered alone
    from DeepRegistrationLib.outputs import warp_image
    far_labels = make_image(labels_of(moving), spacing=(1.5, 1.5, 1.5), origin=(500.0, 0.0, 0.0))
    warped_labels = sitk.GetArrayFromImage(warp_image(far_labels, result.displacement, fixed,
                                                      nearest=True))
    after = np.mean(list(dice(labels_of(fixed), warped_labels).values()))
    alone = engine.register(fixed, moving, "io", initial="none").displacement
    alone_labels = warp(torch.from_numpy(labels_of(moving)).float()[None, None], alone,
                        mode="nearest")[0, 0].numpy()
    reference = np.mean(list(dice(labels_of(fixed), alone_labels).values()))
    assert after > reference - 0.05, (after, reference)


@pytest.fixture(scope="module")
def posed_brain_result(tmp_path_factory):
    """A 4 mm MNI152 and a deformed copy given a scanner-like pose (12 degree tilt, 20 mm
    shift) on a grid of its own, registered by io after an affine stage; outputs written."""
    from DeepRegistrationLib.alignment import affine_transform_from_matrix, centred_matrix
    from DeepRegistrationLib.outputs import write_outputs
    from DeepRegistrationLib.sample_data import demo_pair
    fixed, moving, fixed_labels, moving_labels = demo_pair(4.0, seed=9)
    centre = np.array(fixed.TransformContinuousIndexToPhysicalPoint(
        [(n - 1) / 2.0 for n in fixed.GetSize()]))
    tilt = np.array(sitk.VersorTransform((1.0, 0.3, 0.0), np.radians(12.0)).GetMatrix())
    pose = centred_matrix(tilt.reshape(3, 3), centre, np.array([0.0, 16.0, -12.0]))
    reference = sitk.Image([n + 12 for n in fixed.GetSize()], sitk.sitkFloat32)
    reference.SetSpacing((4.0, 4.0, 4.0))
    reference.SetOrigin(fixed.TransformContinuousIndexToPhysicalPoint([-6.0] * 3))
    reference.SetDirection(fixed.GetDirection())
    to_pose = affine_transform_from_matrix(np.linalg.inv(pose))
    posed = sitk.Resample(moving, reference, to_pose, sitk.sitkLinear, 0.0)
    posed_labels = sitk.Resample(moving_labels, reference, to_pose, sitk.sitkNearestNeighbor, 0)
    result = engine.register(fixed, posed, "io", initial="affine")
    folder = tmp_path_factory.mktemp("posed") / "out"
    summary = write_outputs(result, str(folder), fixed_labels, posed_labels, figure=False)
    return result, folder, summary, pose


def test_outputs_compose_as_itk_composite_transform(posed_brain_result):
    """affine.tfm and deformable.nii.gz, composed by ITK as CompositeTransform([affine,
    deformable]) -- ITK applies the last added transform first: x -> affine(x + d(x)) --,
    reproduce displacement.nii.gz at random points, and resampling the moving image through
    them reproduces warped.nii.gz: the moving image was resampled once, through the total."""
    result, folder, summary, _ = posed_brain_result
    affine = sitk.ReadTransform(str(folder / "affine.tfm"))
    assert affine.GetName() == "AffineTransform"

    def field_transform(name):  # (the transform takes the image's buffer: read it each time)
        field = sitk.ReadImage(str(folder / name))
        return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    composite = sitk.CompositeTransform([affine, field_transform("deformable.nii.gz")])
    total_transform = field_transform("displacement.nii.gz")
    rng = np.random.default_rng(0)
    size = np.array(result.fixed.GetSize(), dtype=np.float64)
    for index in rng.uniform(1.0, size - 2.0, size=(200, 3)):
        point = result.fixed.TransformContinuousIndexToPhysicalPoint(index.tolist())
        np.testing.assert_allclose(composite.TransformPoint(point),
                                   total_transform.TransformPoint(point), atol=2e-3)
    theirs = sitk.GetArrayFromImage(sitk.Resample(result.moving, result.fixed, composite,
                                                  sitk.sitkLinear, 0.0))
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "warped.nii.gz")))
    close = np.isclose(ours, theirs, atol=1e-3 * float(np.abs(theirs).max()))
    assert close.mean() > 0.999, f"{(~close).sum()} voxels differ"
    # resampling twice (through the affine, then the deformable part) would blur: not what we do
    aligned = sitk.Resample(result.moving, result.fixed, affine, sitk.sitkLinear, 0.0)
    twice = sitk.GetArrayFromImage(sitk.Resample(aligned, result.fixed,
                                                 field_transform("deformable.nii.gz"),
                                                 sitk.sitkLinear, 0.0))
    assert np.abs(twice - ours).mean() > 10 * np.abs(theirs - ours).mean()
    assert summary["outputs"]["affine"] == "affine.tfm"
    assert summary["outputs"]["deformable"] == "deformable.nii.gz"


def test_summary_reports_the_stage_and_both_jacobians(posed_brain_result):
    from DeepRegistrationLib.metrics import folding_percent, sdlogj, strict_jacobian_determinant_map
    result, folder, summary, pose = posed_brain_result
    saved = json.loads((folder / "summary.json").read_text())
    initial = saved["initial"]
    assert initial["requested"] == "affine" and initial["used"] == "affine"
    assert initial["seconds"] > 0 and "centres of mass" in initial["reason"]
    matrix = np.array(initial["matrix_lps"])
    from DeepRegistrationLib.alignment import matrix_from_transform
    np.testing.assert_allclose(matrix_from_transform(sitk.ReadTransform(
        str(folder / "affine.tfm"))), matrix, atol=1e-9)
    # the stage found the pose (the moving image is also deformed: a few mm tolerance)
    brain = np.argwhere(sitk.GetArrayFromImage(result.fixed) > 20)[:, ::-1]
    points = np.array([result.fixed.TransformIndexToPhysicalPoint(tuple(int(v) for v in p))
                       for p in brain[::50]])
    error = np.linalg.norm(points @ (matrix - pose)[:3, :3].T + (matrix - pose)[:3, 3], axis=1)
    assert error.mean() < 3.0, error.mean()
    # jacobian.nii.gz is the total field's; deformable_part holds the deformable field's figures
    jacobian = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "jacobian.nii.gz")))
    np.testing.assert_allclose(jacobian, jacobian_determinant_map(result.displacement),
                               rtol=1e-5, atol=1e-5)
    local = jacobian_determinant_map(result.deformable)
    part = saved["deformable_part"]
    assert part["sdlogj"] == pytest.approx(sdlogj(local), abs=1e-9)
    assert part["jacobian_min"] == pytest.approx(float(local.min()), abs=1e-9)
    assert part["folding_percent"] == pytest.approx(folding_percent(local), abs=1e-9)
    assert part["folding_percent_strict"] == pytest.approx(
        folding_percent(strict_jacobian_determinant_map(result.deformable)), abs=1e-9)
    # the total's Jacobian carries the affine's volume change; the deformable part's does not
    inside = sitk.GetArrayFromImage(result.fixed) > 20
    assert np.median(jacobian[inside]) == pytest.approx(np.linalg.det(matrix[:3, :3]), abs=0.05)
    assert np.median(local[inside]) == pytest.approx(1.0, abs=0.05)
    assert saved["mean_dice_after"] > saved["mean_dice_before"] + 0.2


def test_adam_matches_torch_optim_adam():
    target = torch.randn(50)
    ours = torch.zeros(50, requires_grad=True)
    theirs = torch.zeros(50, requires_grad=True)
    mine = _Adam(ours, lr=0.1)
    reference = torch.optim.Adam([theirs], lr=0.1)
    for _ in range(20):
        ((ours - target) ** 2).sum().backward()
        mine.step()
        reference.zero_grad()
        ((theirs - target) ** 2).sum().backward()
        reference.step()
    assert torch.allclose(ours, theirs, atol=1e-6)
