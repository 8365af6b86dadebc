"""The spatial kit against independent implementations (MONAI's Warp and DVF2DDF, SimpleITK)."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepRegistrationLib import spatial
from DeepRegistrationLib.synthetic import random_diffeomorphism, random_velocity
from conftest import blob_volume

monai_blocks = pytest.importorskip("monai.networks.blocks", reason="MONAI is a test dependency")


def smooth_image(shape=(16, 20, 18), seed=0):
    return torch.from_numpy(blob_volume(shape, seed))[None, None]


def test_warp_matches_monai_warp():
    image = smooth_image()
    field = random_diffeomorphism(image.shape[2:], magnitude=3.0, control_spacing=5, seed=2)
    for mode in ("bilinear", "nearest"):
        ours = spatial.warp(image, field, mode=mode)
        theirs = monai_blocks.Warp(mode=mode, padding_mode="border")(image, field)
        assert torch.allclose(ours, theirs, atol=1e-5), mode


def test_warp_by_whole_voxels_shifts_the_array():
    image = smooth_image()
    field = torch.zeros((1, 3, *image.shape[2:]))
    field[:, 0] = 2.0  # look two voxels further along k
    assert torch.allclose(spatial.warp(image, field)[:, :, :-2], image[:, :, 2:], atol=1e-5)


def test_scaling_and_squaring_matches_monai_dvf2ddf():
    velocity = random_velocity((16, 18, 20), control_spacing=5, magnitude=4.0,
                               generator=torch.Generator().manual_seed(3))
    ours = spatial.integrate_velocity(velocity, steps=7)
    theirs = monai_blocks.DVF2DDF(num_steps=7, mode="bilinear", padding_mode="border")(velocity)
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_exp_v_composed_with_exp_minus_v_is_identity():
    velocity = random_velocity((24, 24, 24), control_spacing=6, magnitude=3.0,
                               generator=torch.Generator().manual_seed(4))
    forward = spatial.integrate_velocity(velocity)
    backward = spatial.integrate_velocity(-velocity)
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    assert forward.abs().max() > 2.0  # a real deformation, not a trivial one
    for residual in (spatial.compose(forward, backward), spatial.compose(backward, forward)):
        # what is left is interpolation error of the squarings: a few hundredths of a voxel
        assert residual[inner].abs().max() < 0.1
        assert residual[inner].abs().mean() < 0.01


def test_adaptive_step_count_agrees_with_many_steps():
    velocity = random_velocity((20, 20, 20), control_spacing=5, magnitude=4.0,
                               generator=torch.Generator().manual_seed(5))
    assert torch.allclose(spatial.integrate_velocity(velocity, None),
                          spatial.integrate_velocity(velocity, 10), atol=0.05)


def test_exponential_of_smooth_field_has_positive_jacobian():
    for seed in range(3):
        field = random_diffeomorphism((24, 24, 24), magnitude=5.0, control_spacing=6, seed=seed)
        assert spatial.jacobian_determinant(field).min() > 0


def test_composition_matches_sequential_warping():
    shape = (28, 24, 24)
    image = spatial.gaussian_smooth(smooth_image(shape, seed=1), 1.5)
    k = torch.arange(shape[0], dtype=torch.float32).view(1, shape[0], 1, 1)
    first = torch.zeros((1, 3, *shape))
    first[:, 0] = 3.0                                              # a shift along k
    second = torch.zeros((1, 3, *shape))
    second[:, 1] = 2.0 * torch.sin(2 * torch.pi * k / shape[0])    # j-motion varying along k
    second[:, 2] = random_diffeomorphism(shape, 1.5, 8, seed=6)[:, 2]
    sequential = spatial.warp(spatial.warp(image, first), second)
    composed = spatial.warp(image, spatial.compose(first, second))
    swapped = spatial.warp(image, spatial.compose(second, first))
    inner = (slice(None), slice(None), slice(5, -5), slice(4, -4), slice(4, -4))
    # the two differ only by one extra linear interpolation of a smooth image
    difference = (sequential - composed)[inner].abs()
    assert difference.mean() < 0.003 * image.max()
    # composing in the other order is a different map: much further from the sequential result
    assert (sequential - swapped)[inner].abs().mean() > 5 * difference.mean()


def test_affine_displacement_matches_simpleitk_affine_resampling():
    shape = (18, 20, 22)  # (k, j, i)
    array = blob_volume(shape, seed=3)
    theta = torch.tensor([[[1.05, 0.08, 0.0, 1.5],
                           [-0.06, 0.97, 0.05, -1.0],
                           [0.02, 0.0, 1.02, 0.5]]])
    ours = spatial.warp(torch.from_numpy(array)[None, None],
                        spatial.affine_displacement(theta, shape))[0, 0].numpy()
    # SimpleITK on a unit-spacing image at the origin: physical (x, y, z) = index (i, j, k).
    # Our matrix acts on (k, j, i); reverse both axes to get the (i, j, k) matrix.
    matrix = theta[0, :, :3].numpy()[::-1, ::-1]
    offset = theta[0, :, 3].numpy()[::-1]
    transform = sitk.AffineTransform(matrix.ravel().tolist(), offset.tolist(),
                                     [(n - 1) / 2.0 for n in shape[::-1]])
    image = sitk.GetImageFromArray(array)
    theirs = sitk.GetArrayFromImage(sitk.Resample(image, image, transform, sitk.sitkLinear, 0.0))
    inner = (slice(3, -3),) * 3
    np.testing.assert_allclose(ours[inner], theirs[inner], atol=1e-4)


def test_resize_displacement_keeps_a_linear_field_in_physical_terms():
    # u(x) = 0.1 * x (voxels) on a 9-voxel axis is 0.8 voxels at the end; on the 17-voxel grid
    # covering the same extent each voxel is half as big, so the same motion is twice the number.
    coarse = 0.1 * spatial.identity_grid((9, 9, 9))
    fine = spatial.resize_displacement(coarse, (17, 17, 17))
    expected = 0.1 * spatial.identity_grid((17, 17, 17))
    assert torch.allclose(fine, expected, atol=1e-5)


def test_pad_and_crop_round_trip():
    image = smooth_image((13, 17, 15))
    padded, region = spatial.pad_to_multiple(image, 8)
    assert tuple(padded.shape[2:]) == (16, 24, 16)
    assert torch.equal(spatial.crop_to_region(padded, region), image)
    # centred, the odd voxel at the end: 16 = 1 + 13 + 2, 24 = 3 + 17 + 4, 16 = 0 + 15 + 1
    assert [(r.start, r.stop) for r in region] == [(1, 14), (3, 20), (0, 15)]
    assert torch.equal(padded[:, :, 1:14, 3:20, 0:15], image)
    same, region = spatial.pad_to_multiple(padded, 8)
    assert same is padded and torch.equal(spatial.crop_to_region(same, region), padded)
