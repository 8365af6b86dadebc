"""Mutual information (losses.mutual_information, ``--similarity mi``): against MONAI's Mattes-style
global MI and an independent numpy histogram, its bounds and gradient, and instance optimisation
with it on a pair in a non-monotone second contrast."""
import numpy as np
import pytest
import torch

from conftest import blob_volume, make_image
from DeepRegistrationLib import engine, losses, spatial
from DeepRegistrationLib.cli import _build_parser
from DeepRegistrationLib.synthetic import random_diffeomorphism

SHAPE = (24, 26, 28)


def with_extremes(image):
    """``image`` with one voxel at exactly 0 and one at exactly 1 (MONAI bins between an image's
    minimum and maximum; ours between 0 and 1: the same bins then)."""
    image = image.clone()
    image[0, 0, 0, 0, 0], image[0, 0, -1, -1, -1] = 0.0, 1.0
    return image


def scaled_blobs(seed, top=0.95):
    """Blob volume scaled to [0, top], with one voxel at exactly 0 and one at exactly 1."""
    volume = blob_volume(SHAPE, seed=seed)
    volume = top * (volume - volume.min()) / (volume.max() - volume.min())
    return with_extremes(torch.from_numpy(volume)[None, None])


def non_monotone(image):
    """A second contrast: dark where the first is dark or bright, bright in between."""
    return (4.0 * image * (1.0 - image)).clamp(0.0, 1.0)


def numpy_mattes_mi(fixed, warped, bins=32, padding=2):
    """Independent numpy estimate: nearest bin for the fixed image, the cubic B-spline evaluated
    at every bin centre for the warped one, summed into a joint histogram with np.add.at."""
    def beta3(d):
        d = np.abs(d)
        return np.where(d < 1, (4 - 6 * d ** 2 + 3 * d ** 3) / 6,
                        np.where(d < 2, (2 - d) ** 3 / 6, 0.0))
    scale = bins - 2 * padding
    f = np.clip(fixed.ravel().astype(np.float64), 0, 1) * scale + padding
    w = np.clip(warped.ravel().astype(np.float64), 0, 1) * scale + padding
    joint = np.zeros((bins, bins))
    window = beta3(w[:, None] - np.arange(bins)[None, :])   # (N, bins)
    np.add.at(joint, np.rint(f).astype(int), window)
    joint /= f.size
    pf, pw = joint.sum(1), joint.sum(0)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / np.outer(pf, pw)[nz])).sum())


def test_mutual_information_matches_monai_mattes_estimate():
    monai_losses = pytest.importorskip("monai.losses")
    fixed = scaled_blobs(1)
    for moving in (scaled_blobs(2), with_extremes(0.95 * non_monotone(fixed)), fixed):
        ours = float(losses.mutual_information(fixed, moving))
        # MONAI: cubic B-spline window on its first argument, zero-order on the second, returns
        # -MI; it clamps the topmost intensities into the last inner bin, which differs from
        # ITK/ours only for the one voxel at exactly 1 here
        theirs = -float(monai_losses.GlobalMutualInformationLoss(
            kernel_type="b-spline", num_bins=32, smooth_nr=0.0, smooth_dr=1e-12)(moving, fixed))
        assert ours == pytest.approx(theirs, abs=5e-4)


def test_mutual_information_matches_an_independent_numpy_histogram():
    fixed = scaled_blobs(3)
    for moving in (scaled_blobs(4), non_monotone(fixed), 1.0 - fixed):
        ours = float(losses.mutual_information(fixed, moving))
        assert ours == pytest.approx(numpy_mattes_mi(fixed.numpy(), moving.numpy()), abs=1e-5)
    # a mask restricts the histogram to its voxels: same as the histogram of those voxels alone
    mask = torch.zeros_like(fixed, dtype=torch.bool)
    mask[:, :, 4:20, 5:21, 6:22] = True
    moving = scaled_blobs(5)
    masked = float(losses.mutual_information(fixed, moving, mask=mask))
    assert masked == pytest.approx(numpy_mattes_mi(fixed[mask].numpy(), moving[mask].numpy()),
                                   abs=1e-5)


def test_loss_is_bounded_and_ranks_any_intensity_mapping_above_no_relation():
    fixed = scaled_blobs(6)
    shuffled = fixed.flatten()[torch.randperm(fixed.numel(), generator=torch.Generator()
                                              .manual_seed(0))].view_as(fixed)
    related = losses.mutual_information_loss(fixed, non_monotone(fixed))
    inverted = losses.mutual_information_loss(fixed, 1.0 - fixed)
    unrelated = losses.mutual_information_loss(fixed, shuffled)
    for value in (related, inverted, unrelated):
        assert 0.0 <= float(value) <= 1.0
    assert unrelated > 0.9                         # an independent image carries no information
    assert related < 0.6 and inverted < 0.5        # a deterministic mapping carries most of it
    shifted = spatial.warp(non_monotone(fixed), torch.full((1, 3, *SHAPE), 1.5))
    assert losses.mutual_information_loss(fixed, shifted) > related  # misaligned costs more


def test_gradient_with_respect_to_the_warped_image():
    generator = torch.Generator().manual_seed(1)
    fixed = torch.rand((1, 1, 6, 6, 6), generator=generator, dtype=torch.float64)
    # related to the fixed image (non-monotone) plus noise: a histogram with structure
    warped = 0.05 + 0.8 * non_monotone(fixed) + 0.1 * torch.rand(fixed.shape, generator=generator,
                                                                 dtype=torch.float64)
    warped.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda w: losses.mutual_information_loss(fixed, w, bins=8), (warped,), eps=1e-6,
        atol=1e-6)


def test_io_with_mutual_information_registers_a_non_monotone_contrast():
    shape = (32, 32, 32)
    fixed_array = blob_volume(shape, seed=8, blobs=16)
    fixed_array = fixed_array / fixed_array.max()
    generating = random_diffeomorphism(shape, magnitude=2.5, control_spacing=10, seed=3)
    fixed_tensor = torch.from_numpy(fixed_array)[None, None]
    moving_tensor = non_monotone(spatial.warp(fixed_tensor, generating))
    fixed, moving = make_image(fixed_array), make_image(moving_tensor[0, 0].numpy())
    result = engine.register(fixed, moving, "io", similarity="mi",
                             options={"iterations": [40, 20]})
    assert result.similarity == "mi"
    # the result maps fixed points to where they are in the moving image: warping the moving
    # image's source (the fixed one) by compose(generating, u) must give back the fixed image
    residual = spatial.compose(generating, result.displacement)
    inside = (slice(None), slice(None), slice(6, -6), slice(6, -6), slice(6, -6))
    before = generating[inside].norm(dim=1).mean()
    after = residual[inside].norm(dim=1).mean()
    assert after < 0.5 * before


def test_cli_offers_mutual_information():
    args = _build_parser().parse_args(["register", "f.nii", "m.nii", "--output", "out",
                                       "--similarity", "mi"])
    assert args.similarity == "mi"
    assert losses.similarity_loss("mi") is losses.mutual_information_loss
