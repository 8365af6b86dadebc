"""The fast paths of issue #18 give the numbers of the slow ones they replace.

Each fast routine is checked against an independent computation: SimpleITK's resampler and
writer, ``avg_pool3d``, autograd (and gradcheck) on the plain formula, or the spatial kit the
routine stands in for.
"""
import gzip
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from DeepRegistrationLib import losses
from DeepRegistrationLib.images import (parallel_grid_sample, physical_grid, sample_at_points,
                                        sample_displaced, write_image)
from DeepRegistrationLib.methods import instance_optimisation as io
from DeepRegistrationLib.methods.base import pyramid_shapes
from DeepRegistrationLib.metrics import (jacobian_determinant_map,
                                         strict_jacobian_determinant_map)
from DeepRegistrationLib.outputs import (_write_field_from_voxels, displacement_field_image,
                                         displacement_to_physical, grid_lines, jacobian_maps,
                                         warped_grid, write_displacement_field)
from DeepRegistrationLib.progress import ProgressScope
from DeepRegistrationLib.spatial import integrate_velocity, resize_image, warp
from conftest import blob_volume, make_image, oblique_direction


# --------------------------------------------------------------------- box filters and LNCC
@pytest.mark.parametrize("shape,window", [((1, 1, 9, 7, 8), 5), ((2, 3, 5, 12, 6), 3),
                                          ((1, 2, 11, 10, 9), 9), ((1, 1, 6, 6, 6), 1)])
def test_box_mean_equals_average_pooling_without_padding(shape, window):
    image = torch.rand(shape, dtype=torch.float64)
    expected = image
    for kernel in ((window, 1, 1), (1, window, 1), (1, 1, window)):
        expected = F.avg_pool3d(expected, kernel, stride=1, padding=tuple(k // 2 for k in kernel),
                                count_include_pad=False)
    assert torch.allclose(losses.box_mean(image, window), expected, atol=1e-12)


def test_box_mean_refuses_an_even_window():
    with pytest.raises(ValueError):
        losses.box_mean(torch.rand(1, 1, 6, 6, 6), 4)


def test_box_sum_gradient_is_its_adjoint():
    image = torch.rand(1, 2, 6, 7, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: losses.box_sum(x, 3), (image,))


@pytest.mark.parametrize("masked", [False, True])
def test_local_ncc_gradient_matches_autograd_of_the_formula(masked):
    generator = torch.Generator().manual_seed(1)
    fixed = torch.rand(2, 1, 10, 11, 9, dtype=torch.float64, generator=generator)
    warped = torch.rand(2, 1, 10, 11, 9, dtype=torch.float64, generator=generator,
                        requires_grad=True)
    mask = torch.rand(2, 1, 10, 11, 9, generator=generator) > 0.4 if masked else None
    ours = losses.local_ncc_loss(fixed, warped, 5, mask=mask)
    # the plain formula, differentiated by autograd through avg_pool3d
    mean_f, var_f, textured = losses.local_statistics(fixed, 5)

    def pooled(x):
        for kernel in ((5, 1, 1), (1, 5, 1), (1, 1, 5)):
            x = F.avg_pool3d(x, kernel, stride=1, padding=tuple(k // 2 for k in kernel),
                             count_include_pad=False)
        return x
    mean_w = pooled(warped)
    var_w = (pooled(warped * warped) - mean_w ** 2).clamp_min(0.0)
    cov = pooled(fixed * warped) - mean_f * mean_w
    cc = cov * cov / (var_f * var_w + losses.LNCC_EPS)
    weights = (textured if mask is None else mask).to(cc.dtype).expand_as(cc)
    reference = 1.0 - (cc * weights).sum() / weights.sum()
    assert torch.isclose(ours, reference, atol=1e-12)
    (grad_ours,) = torch.autograd.grad(ours, warped)
    (grad_reference,) = torch.autograd.grad(reference, warped)
    assert torch.allclose(grad_ours, grad_reference, atol=1e-12, rtol=1e-9)
    assert torch.autograd.gradcheck(lambda w: losses.local_ncc_loss(fixed, w, 3, mask=mask),
                                    (warped,))


def test_local_ncc_with_a_fixed_image_that_needs_a_gradient():
    fixed = torch.rand(1, 1, 8, 9, 7, dtype=torch.float64, requires_grad=True)
    warped = torch.rand(1, 1, 8, 9, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, w: losses.local_ncc_loss(f, w, 3), (fixed, warped))


# --------------------------------------------------------------- the optimisation's own kit
def test_parallel_grid_sample_equals_grid_sample():
    generator = torch.Generator().manual_seed(2)
    image = torch.rand(1, 3, 20, 22, 24, generator=generator)
    grid = torch.rand(1, 30, 28, 26, 3, generator=generator) * 2.2 - 1.1
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for mode in ("bilinear", "nearest"):
            ours = parallel_grid_sample(image, grid, mode)
            expected = F.grid_sample(image, grid, mode=mode, padding_mode="border",
                                     align_corners=True)
            assert torch.equal(ours, expected)
    finally:
        torch.set_num_threads(threads)


def test_sampling_and_integration_match_the_spatial_kit():
    generator = torch.Generator().manual_seed(3)
    shape = (13, 16, 15)
    velocity = torch.randn(1, 3, *shape, generator=generator) * 2.0
    identity = io._normalised_identity(shape)
    scale = io._normalising_scale(shape)
    ours = io._to_voxels(io._exponential(velocity, identity, scale), shape)
    assert torch.allclose(ours, integrate_velocity(velocity, None), atol=1e-4)
    image = torch.rand(1, 2, *shape, generator=generator)
    displacement = torch.randn(1, 3, *shape, generator=generator) * 3.0
    grid = identity + (displacement * scale).flip(1).permute(0, 2, 3, 4, 1)
    assert torch.allclose(io._sample(image, grid), warp(image, displacement), atol=1e-5)


def test_pyramid_blurs_like_resize_image():
    """Built fine to coarse with the blur each level still lacks: on anatomy-like volumes the
    levels differ from resizing the full image each time by a small fraction of the contrast."""
    volume = torch.from_numpy(blob_volume((40, 46, 43), seed=4, blobs=30))[None, None]
    shapes = pyramid_shapes(volume.shape[2:], 3, 30_000)
    for ours, shape in zip(io._pyramid(volume, shapes), shapes):
        expected = resize_image(volume, shape)
        assert ours.shape == expected.shape
        assert (ours - expected).abs().max() < 0.02 * float(expected.max() - expected.min())


def test_levels_and_stages_are_timed():
    volume = torch.from_numpy(blob_volume((20, 22, 21), seed=5))[None, None]
    scope = ProgressScope()
    io.instance_optimisation(volume, volume.roll(1, 2), iterations=(3, 2), progress=scope)
    names = list(scope.timings)
    assert any("level 1/2" in n and "3 steps" in n for n in names)
    assert any("level 2/2" in n and "2 steps" in n for n in names)
    assert all(v >= 0 for v in scope.timings.values())


# ---------------------------------------------------------------------------------- outputs
def test_sample_displaced_matches_itk_resampling_through_the_field():
    rng = np.random.default_rng(6)
    moving = make_image(rng.random((20, 22, 24)).astype(np.float32), spacing=(1.1, 0.9, 1.3),
                        origin=(3.0, -2.0, 5.0), direction=oblique_direction(0.3))
    fixed = make_image(np.zeros((19, 21, 26), np.float32), spacing=(1.0, 1.2, 0.8),
                       origin=(2.0, 0.0, 4.0), direction=oblique_direction(0.6, (0.1, 0.9, 0.2)))
    displacement = torch.from_numpy(rng.normal(0.0, 2.0, (1, 3, 19, 21, 26)).astype(np.float32))
    vectors = displacement_to_physical(displacement, fixed)
    field = sitk.GetImageFromArray(vectors, isVector=True)
    field.CopyInformation(fixed)
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    for nearest, interpolator in ((False, sitk.sitkLinear), (True, sitk.sitkNearestNeighbor)):
        itk = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, interpolator, 0.0))
        ours = sample_displaced(moving, fixed, displacement, nearest=nearest)
        assert np.abs(ours - itk).max() < 1e-4
        # and the millimetre-grid route it replaces
        slow = sample_at_points(moving, physical_grid(fixed) + torch.from_numpy(vectors),
                                nearest=nearest).numpy()
        assert np.abs(ours - slow).max() < 1e-4


def test_fast_output_computations_match_the_spatial_kit():
    generator = torch.Generator().manual_seed(7)
    displacement = torch.randn(1, 3, 18, 20, 22, generator=generator) * 3.0
    lines = torch.from_numpy(grid_lines(displacement.shape[2:]))[None, None]
    assert np.abs(warped_grid(displacement) - warp(lines, displacement)[0, 0].numpy()).max() < 1e-5


def test_field_written_from_voxels_equals_the_field_image_route(tmp_path):
    generator = torch.Generator().manual_seed(10)
    displacement = torch.randn(1, 3, 18, 20, 22, generator=generator) * 3.0
    reference = make_image(np.zeros((18, 20, 22), np.float32), spacing=(1.1, 0.7, 2.0),
                           origin=(4.0, -3.0, 2.0), direction=oblique_direction(0.4))
    longest = _write_field_from_voxels(displacement, reference, tmp_path / "fast.nii.gz")
    write_displacement_field(displacement_field_image(displacement, reference),
                             tmp_path / "slow.nii.gz")
    fast, slow = (sitk.ReadImage(str(tmp_path / f"{n}.nii.gz")) for n in ("fast", "slow"))
    assert fast.GetDirection() == pytest.approx(slow.GetDirection())
    assert fast.GetOrigin() == pytest.approx(slow.GetOrigin())
    assert np.abs(sitk.GetArrayFromImage(fast) - sitk.GetArrayFromImage(slow)).max() < 1e-4
    vectors = displacement_to_physical(displacement, reference)  # LPS read back, float64 route
    assert np.abs(sitk.GetArrayFromImage(fast) - vectors).max() < 1e-4
    norms = np.linalg.norm(vectors, axis=-1)
    assert np.linalg.norm(longest) == pytest.approx(norms.max(), rel=1e-5)


def test_both_jacobian_maps_from_one_pass_equal_the_metrics():
    generator = torch.Generator().manual_seed(9)
    displacement = torch.randn(1, 3, 37, 12, 14, generator=generator) * 0.6  # folds somewhere
    central, strict = jacobian_maps(displacement, slab=8)
    assert np.abs(central - jacobian_determinant_map(displacement)).max() < 1e-12
    assert np.array_equal(strict, strict_jacobian_determinant_map(displacement))
    assert (strict <= 0).any() and (strict <= central + 1e-12).all()


def test_write_image_levels(tmp_path):
    rng = np.random.default_rng(8)
    floats = make_image(rng.random((16, 18, 20)).astype(np.float32), spacing=(1.2, 1.0, 0.8),
                        origin=(1.0, 2.0, 3.0), direction=oblique_direction())
    labels = make_image((rng.random((16, 18, 20)) > 0.9).astype(np.int32))
    for name, image in (("floats", floats), ("labels", labels)):
        ours, itk = tmp_path / f"{name}.nii.gz", tmp_path / f"{name}_itk.nii"
        write_image(image, ours)
        sitk.WriteImage(image, str(itk))
        with gzip.open(ours) as handle:  # a valid gzip stream holding ITK's own file
            assert handle.read() == itk.read_bytes()
        back = sitk.ReadImage(str(ours))
        assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
        assert back.GetDirection() == pytest.approx(image.GetDirection())
    # floats are stored (zlib would save little), labels compressed
    assert os.path.getsize(tmp_path / "floats.nii.gz") > os.path.getsize(tmp_path / "floats_itk.nii")
    assert os.path.getsize(tmp_path / "labels.nii.gz") < 0.5 * os.path.getsize(
        tmp_path / "labels_itk.nii")
    assert not [p for p in os.listdir(tmp_path) if "uncompressed" in p]
