"""The global stage against independent oracles: SimpleITK's moments initialiser, known affine and
rigid motions applied to a real brain by SimpleITK, ITK's composite transform, and the one-line
refusals (no overlap after moments, a degenerate affine)."""
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepRegistrationLib import cli
from DeepRegistrationLib.alignment import (affine_transform_from_matrix, centred_matrix,
                                           compose_affine, compute_moments, foreground_mask,
                                           global_alignment, masked, matrix_from_transform,
                                           normalised, rotation_degrees)
from DeepRegistrationLib.errors import UserInputError
from DeepRegistrationLib.images import index_to_physical_matrix, physical_grid
from DeepRegistrationLib.outputs import displacement_to_physical
from DeepRegistrationLib.sample_data import mni152
from DeepRegistrationLib.synthetic import random_diffeomorphism
from conftest import blob_volume, make_image


@pytest.fixture(scope="module")
def brain():
    """The MNI152 T1 at 4 mm (nilearn) and its brain mask (GM or WM)."""
    image, labels = mni152(4.0)
    return image, sitk.GetArrayFromImage(labels) > 0


def rotation(axis, degrees):
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    return np.array(sitk.VersorTransform(tuple(axis), np.radians(degrees)).GetMatrix()).reshape(3, 3)


def image_centre(image):
    size = np.array(image.GetSize(), dtype=np.float64)
    return np.array(image.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist()))


def moved_copy(image, matrix, pad_mm=40.0):
    """``image`` seen through the fixed -> moving point map ``matrix``: moving(y) =
    image(matrix^-1 y), resampled by SimpleITK on a grid ``pad_mm`` larger on every side."""
    spacing = np.array(image.GetSpacing())
    pad = np.ceil(pad_mm / spacing).astype(int)
    reference = sitk.Image([int(n + 2 * p) for n, p in zip(image.GetSize(), pad)],
                           sitk.sitkFloat32)
    reference.SetSpacing(image.GetSpacing())
    reference.SetDirection(image.GetDirection())
    reference.SetOrigin(image.TransformContinuousIndexToPhysicalPoint([-float(p) for p in pad]))
    inverse = affine_transform_from_matrix(np.linalg.inv(matrix))
    return sitk.Resample(image, reference, inverse, sitk.sitkLinear, 0.0)


def mean_error_mm(image, mask, estimated, truth):
    """Mean distance between where two fixed -> moving maps send the voxels of ``mask``."""
    index = np.argwhere(mask)[:, ::-1].astype(np.float64)
    to_physical = index_to_physical_matrix(image)
    points = index @ to_physical[:3, :3].T + to_physical[:3, 3]
    a = points @ estimated[:3, :3].T + estimated[:3, 3]
    b = points @ truth[:3, :3].T + truth[:3, 3]
    return float(np.linalg.norm(a - b, axis=1).mean())


def test_moments_match_simpleitk_centered_transform_initializer(brain):
    fixed, _ = brain
    truth = centred_matrix(rotation((0.2, 1.0, 0.3), 12.0), image_centre(fixed),
                           np.array([18.0, -9.0, 14.0]))
    moving = moved_copy(fixed, truth)
    initializer = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(3),
        sitk.CenteredTransformInitializerFilter.MOMENTS)
    moments = compute_moments(fixed, moving)  # voxel values as weights, as ITK
    np.testing.assert_allclose(moments.fixed_centre, initializer.GetCenter(), atol=1e-6)
    np.testing.assert_allclose(moments.moving_centre - moments.fixed_centre,
                               initializer.GetTranslation(), atol=1e-6)
    np.testing.assert_allclose(moments.matrix(with_axes=False), matrix_from_transform(initializer),
                               atol=1e-6)
    # and the centres of mass follow the known motion (the resampled copy keeps the mass)
    np.testing.assert_allclose(moments.moving_centre,
                               truth[:3, :3] @ moments.fixed_centre + truth[:3, 3], atol=0.2)


def test_principal_axes_recover_a_known_rotation():
    """A head with distinct principal axes (pydeface's mean head, skull and face): the axes
    rotation is the applied rotation. An MNI brain has two nearly equal axes: no rotation."""
    from training.data import load_source
    head = load_source("pydeface", 6.0).image
    truth = centred_matrix(rotation((0.3, -0.4, 1.0), 20.0), image_centre(head),
                           np.array([10.0, 25.0, -5.0]))
    # as the global stage computes them: normalised intensities inside the foreground
    moments = compute_moments(*[masked(normalised(image), foreground_mask(normalised(image)))
                                for image in (head, moved_copy(head, truth))])
    assert moments.axes_defined
    error = rotation_degrees(moments.rotation @ truth[:3, :3].T)
    assert error < 2.0, error
    image, _ = mni152(4.0)
    assert not compute_moments(image, image).axes_defined


def test_affine_recovers_a_known_affine_inside_the_brain(brain):
    fixed, mask = brain
    linear = rotation((0.3, 0.5, 0.8), 15.0) @ np.diag([1.05, 0.95, 1.03])
    linear = linear @ np.array([[1.0, 0.03, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    shift = np.array([15.0, -16.0, 12.0])
    truth = centred_matrix(linear, image_centre(fixed), shift / np.linalg.norm(shift) * 25.0)
    moving = moved_copy(fixed, truth)
    before = mean_error_mm(fixed, mask, np.eye(4), truth)
    result = global_alignment(fixed, moving, "affine")
    assert result.used == "affine" and before > 25.0
    error = mean_error_mm(fixed, mask, result.matrix, truth)
    assert error < 0.5, (error, before)


def test_rigid_recovers_a_rigid_motion(brain):
    fixed, mask = brain
    truth = centred_matrix(rotation((1.0, 0.2, -0.3), 18.0), image_centre(fixed) + 10.0,
                           np.array([-20.0, 12.0, 18.0]))
    result = global_alignment(fixed, moved_copy(fixed, truth), "rigid")
    error = mean_error_mm(fixed, mask, result.matrix, truth)
    assert error < 0.5, error
    linear = result.matrix[:3, :3]
    np.testing.assert_allclose(linear @ linear.T, np.eye(3), atol=1e-5)  # a rotation


def test_rigid_with_mind_aligns_a_different_contrast(brain):
    fixed, mask = brain
    truth = centred_matrix(rotation((0.0, 0.3, 1.0), 10.0), image_centre(fixed),
                           np.array([8.0, -12.0, 6.0]))
    moving = moved_copy(fixed, truth)
    array = sitk.GetArrayFromImage(moving)
    inverted = np.where(array > 5.0, array.max() * 1.2 - array, 0.0).astype(np.float32)
    moving = make_image(inverted, moving.GetSpacing(), moving.GetOrigin(), moving.GetDirection())
    result = global_alignment(fixed, moving, "rigid", similarity="mind")
    assert mean_error_mm(fixed, mask, result.matrix, truth) < 1.0


def test_auto_aligns_only_what_is_not_aligned(brain):
    fixed, _ = brain
    same = global_alignment(fixed, fixed, "auto")
    assert same.used == "none" and same.is_identity and "already aligned" in same.reason
    posed = moved_copy(fixed, centred_matrix(rotation((1.0, 0.0, 0.0), 12.0),
                                             image_centre(fixed), np.array([0.0, 20.0, 10.0])))
    result = global_alignment(fixed, posed, "auto")
    assert result.used == "affine" and "not aligned" in result.reason
    summary = result.summary()
    assert set(summary) == {"requested", "used", "reason", "matrix_lps", "seconds"}
    assert summary["requested"] == "auto" and np.array(summary["matrix_lps"]).shape == (4, 4)


def test_composition_is_itk_composite_transform_order():
    """``compose_affine`` = ITK's CompositeTransform([affine, deformable]) (last added first)."""
    fixed = make_image(blob_volume((14, 16, 12)), spacing=(1.5, 1.2, 2.0), origin=(3.0, -4.0, 8.0),
                       direction=rotation((0.2, 0.4, 1.0), 25.0).ravel())
    deformable = random_diffeomorphism((14, 16, 12), magnitude=2.0, control_spacing=5, seed=4)
    matrix = centred_matrix(rotation((1.0, 1.0, 0.0), 10.0) @ np.diag([1.1, 0.9, 1.0]),
                            np.array([5.0, 0.0, 10.0]), np.array([4.0, -3.0, 2.0]))
    total = compose_affine(matrix, deformable, fixed)
    field = sitk.GetImageFromArray(displacement_to_physical(deformable, fixed), isVector=True)
    field.CopyInformation(fixed)
    composite = sitk.CompositeTransform([affine_transform_from_matrix(matrix),
                                         sitk.DisplacementFieldTransform(field)])
    points = physical_grid(fixed).numpy().reshape(-1, 3)
    expected = np.array([composite.TransformPoint(tuple(p)) for p in points]) - points
    ours = displacement_to_physical(total, fixed).reshape(-1, 3)
    np.testing.assert_allclose(ours, expected, atol=1e-4)


def shell_and_ball():
    """A hollow textured shell (its centre of mass in the empty middle) and a small solid ball."""
    k, j, i = np.meshgrid(*[np.arange(48.0)] * 3, indexing="ij")
    radius = np.sqrt((k - 23.5) ** 2 + (j - 23.5) ** 2 + (i - 23.5) ** 2)
    texture = 1.0 + 0.3 * blob_volume((48, 48, 48), seed=3)
    shell = np.where((radius > 16) & (radius < 22), texture, 0.0).astype(np.float32)
    ball = np.where(radius < 6, texture, 0.0).astype(np.float32)
    return make_image(ball, spacing=(2.0, 2.0, 2.0)), make_image(shell, spacing=(2.0, 2.0, 2.0))


def test_no_overlap_after_moments_is_refused():
    ball, shell = shell_and_ball()
    with pytest.raises(UserInputError, match="do not overlap even after matching their centres"):
        global_alignment(ball, shell, "moments")


def test_unknown_mode_is_refused(brain):
    with pytest.raises(UserInputError, match="unknown --initial"):
        global_alignment(brain[0], brain[0], "similarity")


def test_degenerate_affine_is_refused_with_no_outputs(tmp_path, capsys):
    """A small textured ball against a large one: the affine that matches them shrinks space
    ~40-fold (det ~0.03): refused with one line, exit 2, and no output folder."""
    k, j, i = np.meshgrid(*[np.arange(48.0)] * 3, indexing="ij")
    radius = np.sqrt((k - 23.5) ** 2 + (j - 23.5) ** 2 + (i - 23.5) ** 2)
    texture = 1.0 + 0.5 * blob_volume((48, 48, 48), seed=6)
    large = make_image(np.where(radius < 21, texture, 0.0).astype(np.float32), (2.0,) * 3)
    small = make_image(np.where(radius < 6.5, texture, 0.0).astype(np.float32), (2.0,) * 3)
    paths = {name: str(tmp_path / f"{name}.nii.gz") for name in ("large", "small")}
    sitk.WriteImage(large, paths["large"])
    sitk.WriteImage(small, paths["small"])
    output = tmp_path / "out"
    code = cli.main(["register", paths["large"], paths["small"], "--initial", "affine",
                     "--output", str(output), "--quiet", "--no-figure"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_USER, error
    assert len(error) == 1 and "degenerated" in error[0], error
    assert sorted(os.listdir(tmp_path)) == ["large.nii.gz", "small.nii.gz"]  # nothing written
    # and a mode that is not one of the five is a one-line command-line error
    with pytest.raises(SystemExit) as exited:
        cli.main(["register", paths["large"], paths["small"], "--initial", "similarity",
                  "--output", str(output)])
    assert exited.value.code == cli.EXIT_USER and not output.exists()
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
