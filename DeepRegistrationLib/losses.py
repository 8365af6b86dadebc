"""Similarity measures and regularisers, each a plain function of tensors.

Images are ``(B, C, D, H, W)``; displacements ``(B, 3, D, H, W)`` in voxels (see ``spatial``).
Every similarity is written as a loss that is 0 for a perfect match, so a sum of weighted terms is
minimised. Local statistics use separable box filters (shifted sums), which cost O(w) per voxel
instead of a dense w^3 convolution.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .spatial import (compose, forward_differences, one_sided_jacobian_determinants,
                      spatial_gradient)

EPS = 1e-5
# Local variances of [0, 1] images over small windows are often 1e-4..1e-2: the LNCC denominator
# needs a much smaller guard than EPS or it biases low-contrast regions towards 'no match'.
LNCC_EPS = 1e-10


def _masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype).expand_as(values)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def _box_sum_axis(image: torch.Tensor, dim: int, radius: int) -> torch.Tensor:
    """Sum over ``[x - radius, x + radius]`` along ``dim``, zero outside the grid."""
    n = image.shape[dim]
    out = image.clone(memory_format=torch.contiguous_format)
    for offset in range(1, min(radius, n - 1) + 1):
        out.narrow(dim, 0, n - offset).add_(image.narrow(dim, offset, n - offset))
        out.narrow(dim, offset, n - offset).add_(image.narrow(dim, 0, n - offset))
    return out


def _box_sum(image: torch.Tensor, window: int) -> torch.Tensor:
    """Separable ``window``^3 box sum by shifted additions (no autograd graph of its own).

    Shifted whole-volume additions run on every core (they are elementwise), where
    ``avg_pool3d`` on a one-channel volume ran on one; on 2 mm brains they were about seven times
    faster, and each sum adds only ``window`` values, so no precision is lost to long running sums
    (as an integral image would in float32).
    """
    for dim in (2, 3, 4):
        image = _box_sum_axis(image, dim, window // 2)
    return image


class _BoxSum(torch.autograd.Function):
    """Zero-padded box sum; being symmetric it is its own adjoint."""

    @staticmethod
    def forward(ctx, image, window):
        ctx.window = window
        return _box_sum(image, window)

    @staticmethod
    def backward(ctx, grad):
        return _box_sum(grad, ctx.window), None


def box_sum(image: torch.Tensor, window: int) -> torch.Tensor:
    """Sum over a ``window``^3 box around each voxel (``window`` odd), zero outside the grid."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"box window must be a positive odd number of voxels, not {window}")
    if torch.is_grad_enabled() and image.requires_grad:
        return _BoxSum.apply(image, window)
    return _box_sum(image, window)


_INVERSE_COUNTS: dict = {}


def _inverse_counts(shape, window: int, dtype, device) -> torch.Tensor:
    """``1 / (number of grid voxels in the box around x)``, ``(1, 1, D, H, W)``: the box is
    separable, so the count is the product of three per-axis counts. A few are kept, as a level
    of an optimisation asks for the same one at every step."""
    key = (tuple(int(n) for n in shape), int(window), dtype, str(device))
    if key not in _INVERSE_COUNTS:
        radius = window // 2
        counts = []
        for n in key[0]:
            index = torch.arange(n, device=device)
            counts.append((torch.clamp(index + radius, max=n - 1)
                           - torch.clamp(index - radius, min=0) + 1).to(dtype))
        product = counts[0].view(-1, 1, 1) * counts[1].view(1, -1, 1) * counts[2].view(1, 1, -1)
        if len(_INVERSE_COUNTS) >= 8:
            _INVERSE_COUNTS.pop(next(iter(_INVERSE_COUNTS)))
        _INVERSE_COUNTS[key] = product.reciprocal_()[None, None]
    return _INVERSE_COUNTS[key]


def box_mean(image: torch.Tensor, window: int) -> torch.Tensor:
    """Mean over a ``window``^3 box around each voxel (borders: mean of what is inside), the
    same as ``avg_pool3d(..., count_include_pad=False)`` with a cubic kernel.

    Separable: three 1-D sums cost 3w operations per voxel instead of w^3.
    """
    return box_sum(image, window) * _inverse_counts(image.shape[2:], window, image.dtype,
                                                    image.device)


# --------------------------------------------------------------------------------- similarities
def mse_loss(fixed: torch.Tensor, warped: torch.Tensor, mask=None) -> torch.Tensor:
    """Mean squared error ``mean((F - W)^2)``."""
    return _masked_mean((fixed - warped) ** 2, mask)


def correlation_coefficient(fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
    """Pearson correlation per batch item: ``cov(F, W) / (sd(F) sd(W))``, shape ``(B,)``."""
    f = fixed.flatten(1) - fixed.flatten(1).mean(1, keepdim=True)
    w = warped.flatten(1) - warped.flatten(1).mean(1, keepdim=True)
    return (f * w).sum(1) / ((f.pow(2).sum(1) * w.pow(2).sum(1)).sqrt() + EPS)


def correlation_coefficient_loss(fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
    """VTN's similarity ``1 - CorrCoef(F, W)``: 0 for images equal up to a positive linear map."""
    return 1.0 - correlation_coefficient(fixed, warped).mean()


def local_ncc_loss(fixed: torch.Tensor, warped: torch.Tensor, window: int = 9,
                   mask=None, fixed_statistics=None) -> torch.Tensor:
    """``1 - mean(cc)`` with the squared local correlation of ANTs / voxelmorph,

    ``cc(x) = cov_w(F, W)^2 / (var_w(F) var_w(W))`` over a ``window``^3 box around x. Invariant to
    local linear intensity changes; 0 for identical images with texture everywhere.

    Where the fixed image is (nearly) flat its local correlation is noise, and an optimiser would
    happily move edges of the moving image there to "create" correlation. So the mean runs over
    the voxels whose local fixed variance exceeds 1% of its average (unless ``mask`` is given).
    ``fixed_statistics`` (from :func:`local_statistics`) saves recomputing the fixed image's local
    mean, variance and that mask at every optimisation step.

    The gradient with respect to ``warped`` is written out (:class:`_LocalNCC`): three box sums
    forward and three back, instead of autograd's graph of a dozen whole-volume tensors. When
    ``fixed`` needs a gradient too, autograd differentiates the same formula
    (:func:`_local_ncc_by_autograd`).
    """
    mean_f, var_f, textured = fixed_statistics or local_statistics(fixed, window)
    weights = _mean_weights(textured if mask is None else mask, warped, fixed)
    if torch.is_grad_enabled() and fixed.requires_grad:
        return _local_ncc_by_autograd(fixed, warped, window, mean_f, var_f, weights)
    return _LocalNCC.apply(warped, fixed, mean_f, var_f, weights, window)


def _mean_weights(mask, warped: torch.Tensor, fixed: torch.Tensor):
    """Weights whose weighted sum over a cc map is ``_masked_mean(cc, mask)``."""
    # broadcast by hand: torch.broadcast_shapes imports sympy on first use (seconds)
    rank = max(warped.dim(), fixed.dim())
    shape = [max(a, b) for a, b in zip((1,) * (rank - warped.dim()) + tuple(warped.shape),
                                       (1,) * (rank - fixed.dim()) + tuple(fixed.shape))]
    if mask is None:
        return 1.0 / math.prod(shape)
    mask = mask.to(warped.dtype).expand(shape)
    return mask / mask.sum().clamp_min(1.0)


def _local_ncc_by_autograd(fixed, warped, window, mean_f, var_f, weights):
    mean_w, var_w, _ = local_statistics(warped, window)
    cov = box_mean(fixed * warped, window) - mean_f * mean_w
    cc = cov * cov / (var_f * var_w + LNCC_EPS)
    return 1.0 - (cc * weights).sum()


class _LocalNCC(torch.autograd.Function):
    """``1 - sum_x weights(x) cc(x)`` and its gradient with respect to the warped image.

    With ``S`` the zero-padded box sum (self-adjoint) and ``n`` the voxel count of each box:
    ``mean_w = S(W)/n``, ``var_w = S(W^2)/n - mean_w^2``, ``cov = S(F W)/n - mean_f mean_w``, so
    ``dL/dW = -(F S(g_cov/n) + 2 W S(g_var/n) + S(g_mean/n))`` with ``g_cov = w dcc/dcov``,
    ``g_var = w dcc/dvar_w`` and ``g_mean = -(g_cov mean_f + 2 g_var mean_w)``.
    """

    @staticmethod
    def forward(ctx, warped, fixed, mean_f, var_f, weights, window):
        channels = warped.shape[1]
        inverse = _inverse_counts(warped.shape[2:], window, warped.dtype, warped.device)
        fixed_warped = fixed * warped
        sums = _box_sum(torch.cat([warped, warped * warped, fixed_warped.expand_as(warped)], 1),
                        window).mul_(inverse)
        mean_w, mean_ww, mean_fw = sums.split(channels, dim=1)
        raw_var_w = mean_ww - mean_w * mean_w
        var_w = raw_var_w.clamp_min(0.0)
        cov = mean_fw - mean_f * mean_w
        denominator = var_f * var_w + LNCC_EPS
        weighted_cc = cov * cov / denominator * weights
        loss = 1.0 - weighted_cc.sum()
        if ctx.needs_input_grad[0]:
            g_cov = 2.0 * weights * cov / denominator
            # clamp_min passes the gradient where its input is >= 0, as autograd does
            g_var = -(weighted_cc * var_f / denominator) * (raw_var_w >= 0)
            g_mean = -(g_cov * mean_f + 2.0 * g_var * mean_w)
            ctx.window, ctx.channels = window, channels
            ctx.save_for_backward(warped, fixed,
                                  torch.cat([g_cov, g_var, g_mean], 1).mul_(inverse))
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        warped, fixed, scaled = ctx.saved_tensors
        s_cov, s_var, s_mean = _box_sum(scaled, ctx.window).split(ctx.channels, dim=1)
        grad = fixed * s_cov + 2.0 * warped * s_var + s_mean
        return -grad_output * grad, None, None, None, None, None


def local_statistics(image: torch.Tensor, window: int):
    """Local mean, local variance over a ``window``^3 box, and the mask of textured voxels
    (local variance above 1% of its mean over the image)."""
    mean = box_mean(image, window)
    variance = (box_mean(image * image, window) - mean ** 2).clamp_min(0.0)
    textured = variance > 0.01 * variance.mean()
    return mean, variance, textured


def ngf_loss(fixed: torch.Tensor, warped: torch.Tensor, epsilon: float = 0.01,
             mask=None) -> torch.Tensor:
    """Normalised gradient fields (Haber & Modersitzki 2006):

    ``mean(1 - (grad F . grad W)^2 / ((|grad F|^2 + eps^2)(|grad W|^2 + eps^2)))``; edges that are
    parallel or anti-parallel match, so it suits CT-like or multi-modal pairs.
    """
    grad_f = spatial_gradient(fixed).sum(1)  # (B, 3, D, H, W), channels summed
    grad_w = spatial_gradient(warped).sum(1)
    dot = (grad_f * grad_w).sum(1, keepdim=True)
    norm_f = (grad_f ** 2).sum(1, keepdim=True) + epsilon ** 2
    norm_w = (grad_w ** 2).sum(1, keepdim=True) + epsilon ** 2
    return _masked_mean(1.0 - dot * dot / (norm_f * norm_w), mask)


# The twelve self-similarity-context pairs: pairs of six-neighbourhood offsets that are sqrt(2)
# apart (opposite neighbours excluded), Heinrich et al., MICCAI 2013.
_SIX_NEIGHBOURS = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
_SSC_PAIRS = [(a, b) for a in range(6) for b in range(a + 1, 6)
              if sum((p - q) ** 2 for p, q in zip(_SIX_NEIGHBOURS[a], _SIX_NEIGHBOURS[b])) == 2]


def _shift(image: torch.Tensor, offset, dilation: int) -> torch.Tensor:
    """``image(x + dilation * offset)`` with replicate padding."""
    d = dilation
    padded = F.pad(image, [d] * 6, mode="replicate")
    k, j, i = (d + o * d for o in offset)
    D, H, W = image.shape[2:]
    return padded[:, :, k:k + D, j:j + H, i:i + W]


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC descriptors ``(B, 12, D, H, W)`` (Heinrich et al. 2012/2013).

    ``MIND(x, r) = exp(-D_p(x, r) / V(x))``: ``D_p`` is the patch distance (box of radius
    ``radius``) between the two neighbours of self-similarity-context pair ``r``, ``V`` the mean of
    the twelve distances (a local noise estimate), so the descriptor is contrast-invariant.
    """
    window = 2 * radius + 1
    distances = []
    for a, b in _SSC_PAIRS:
        diff = _shift(image, _SIX_NEIGHBOURS[a], dilation) - _shift(image, _SIX_NEIGHBOURS[b],
                                                                    dilation)
        distances.append(box_mean((diff ** 2).sum(1, keepdim=True), window))
    dist = torch.cat(distances, dim=1)
    dist = dist - dist.min(dim=1, keepdim=True).values
    variance = dist.mean(dim=1, keepdim=True)
    mean_variance = variance.mean()
    variance = variance.clamp(mean_variance * 1e-3, mean_variance * 1e3).clamp_min(1e-8)
    descriptor = torch.exp(-dist / variance)
    return descriptor / descriptor.max(dim=1, keepdim=True).values.clamp_min(1e-8)


def mind_loss(fixed: torch.Tensor, warped: torch.Tensor, radius: int = 1, dilation: int = 2,
              mask=None) -> torch.Tensor:
    """Mean squared difference of MIND-SSC descriptors (multi-modal similarity)."""
    return _masked_mean((mind_ssc(fixed, radius, dilation) - mind_ssc(warped, radius, dilation))
                        ** 2, mask)


MI_BINS = 32
MI_PADDING = 2  # empty bins at each end, so the cubic window never leaves the histogram


def parzen_joint_histogram(fixed: torch.Tensor, warped: torch.Tensor, bins: int = MI_BINS,
                           mask=None) -> torch.Tensor:
    """Joint intensity distribution ``(B, bins, bins)`` (fixed bin, warped bin) of two
    single-channel images in [0, 1], as Mattes et al. (IEEE TMI 2003) and ITK's Mattes metric.

    Intensities are clipped to [0, 1] and mapped to bin coordinates ``t = v (bins - 4) + 2``. Each
    fixed voxel falls in its nearest bin (a zero-order window: the fixed image does not move); each
    warped voxel spreads over four bins with the cubic B-spline window ``beta3(t - b)``, so
    ``p(a, b) = mean_x [a = round(t_F(x))] beta3(t_W(x) - b)`` is twice differentiable in the
    warped intensities and sums to 1. Four taps per voxel keep it cheaper than local NCC.
    ``mask`` (``(B, 1, D, H, W)``) restricts the histogram to its voxels.
    """
    scale = bins - 2 * MI_PADDING
    fixed_bin = torch.round(fixed.detach().clamp(0.0, 1.0).flatten(1) * scale + MI_PADDING).long()
    position = warped.clamp(0.0, 1.0).flatten(1) * scale + MI_PADDING
    first = torch.floor(position.detach())
    u = position - first                       # in [0, 1): where the voxel sits in its bin
    u2, u3 = u * u, u * u * u
    weights = torch.stack([(1 - u) ** 3, 3 * u3 - 6 * u2 + 4, -3 * u3 + 3 * u2 + 3 * u + 1, u3],
                          dim=-1) / 6.0        # beta3 at the taps first - 1 .. first + 2
    taps = (first.long() - 1).unsqueeze(-1) + torch.arange(4, device=warped.device)
    index = fixed_bin.unsqueeze(-1) * bins + taps.clamp(0, bins - 1)
    if mask is None:
        count = torch.full((fixed.shape[0], 1), float(position.shape[1]), device=warped.device,
                           dtype=warped.dtype)
    else:
        sample = mask.to(warped.dtype).expand_as(warped).flatten(1)
        weights = weights * sample.unsqueeze(-1)
        count = sample.sum(1, keepdim=True).clamp_min(1.0)
    joint = torch.zeros((fixed.shape[0], bins * bins), device=warped.device, dtype=warped.dtype)
    joint = joint.scatter_add(1, index.flatten(1), weights.flatten(1)) / count
    return joint.view(-1, bins, bins)


def _entropy(probabilities: torch.Tensor, dims) -> torch.Tensor:
    tiny = torch.finfo(probabilities.dtype).tiny
    return -(probabilities * torch.log(probabilities.clamp_min(tiny))).sum(dims)


def mutual_information(fixed: torch.Tensor, warped: torch.Tensor, bins: int = MI_BINS,
                       mask=None) -> torch.Tensor:
    """Mutual information (nats) per batch item ``(B,)``,
    ``MI = H(F) + H(W) - H(F, W)`` of the Parzen joint histogram
    (:func:`parzen_joint_histogram`) and its marginals. Global: one intensity mapping for the
    whole image, however non-monotone, costs nothing."""
    joint = parzen_joint_histogram(fixed, warped, bins, mask)
    return _entropy(joint.sum(2), 1) + _entropy(joint.sum(1), 1) - _entropy(joint, (1, 2))


def mutual_information_loss(fixed: torch.Tensor, warped: torch.Tensor, bins: int = MI_BINS,
                            mask=None) -> torch.Tensor:
    """``1 - MI(F, W) / H(F)`` (multi-modal similarity, any intensity mapping).

    ``H(F)``, the entropy of the fixed marginal, bounds ``MI`` from above, so the loss lies in
    [0, 1]: 1 for unrelated images, lower the more the warped image tells about the fixed one. It
    does not reach 0 even for identical images (the warped image's cubic window spreads each voxel
    over four bins: about 0.35 for smooth test volumes). ``H(F)`` does not depend on the warp, so
    the gradient is that of ``-MI`` scaled per pair, which keeps the regularisation weight
    comparable between pairs.
    """
    joint = parzen_joint_histogram(fixed, warped, bins, mask)
    entropy_f = _entropy(joint.sum(2), 1)
    information = entropy_f + _entropy(joint.sum(1), 1) - _entropy(joint, (1, 2))
    return (1.0 - information / entropy_f.clamp_min(EPS)).mean()


# ---------------------------------------------------------------------------------- regularisers
def diffusion_loss(displacement: torch.Tensor) -> torch.Tensor:
    """Diffusion regulariser ``1/2 sum_d mean_x sum_c (u_c(x + e_d) - u_c(x))^2``.

    Forward differences (each mean over the voxels that have the neighbour), not central ones:
    a central difference skips the voxel itself, so a field alternating every voxel
    (``u = a (-1)^i``, an odd-even fold) has central derivative 0 and would cost nothing; here
    it costs ``2 a^2``. For a smooth field the two agree (a linear field gives the same value).
    """
    return 0.5 * sum((diff ** 2).sum(1).mean() for diff in forward_differences(displacement))


def total_variation_loss(displacement: torch.Tensor) -> torch.Tensor:
    """VTN's smoothness term: sum over the three axes of the mean squared forward difference,
    ``sum_d mean((u(x + e_d) - u(x))^2)``, averaged over the components."""
    return sum((diff ** 2).mean() for diff in forward_differences(displacement))


def negative_jacobian_loss(displacement: torch.Tensor) -> torch.Tensor:
    """Folding penalty of R2Net: ``mean(0.5 (|J| - J))`` = mean of ``max(-det J, 0)``.

    ``J`` ranges over the 8 one-sided finite-difference determinants of ``I + grad u`` at every
    voxel (``spatial.one_sided_jacobian_determinants``, identity added once), averaged: the same
    determinants as the strict folding measure. A central-difference ``J`` (used here before)
    is their mean and is blind to folds that alternate every voxel, which a network can then
    learn without penalty (R2Net's public code takes forward differences, one of the 8, per the
    review in issue #13). Only folded corners (det < 0) contribute; a uniform mirror (det -1
    everywhere) costs 1.
    """
    total = 0.0
    for det in one_sided_jacobian_determinants(displacement):
        total = total + (0.5 * (det.abs() - det)).mean()
    return total / 8.0


def _singular_values_squared(transform: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigvalsh(transform.transpose(-1, -2) @ transform).clamp_min(1e-12)


def affine_orthogonality_loss(transform: torch.Tensor) -> torch.Tensor:
    """VTN's orthogonality loss ``-6 + sum_i (s_i^2 + s_i^-2)`` for the singular values ``s_i``
    of ``I + A`` (``transform``, shape ``(B, 3, 3)``); 0 exactly for a rotation."""
    s2 = _singular_values_squared(transform)
    return (s2 + 1.0 / s2).sum(-1).mean() - 6.0


def affine_determinant_loss(transform: torch.Tensor) -> torch.Tensor:
    """VTN's determinant loss ``(det(I + A) - 1)^2``: 0 for volume-preserving, non-reflecting maps."""
    return ((torch.linalg.det(transform) - 1.0) ** 2).mean()


def central_region_mask(shape, margin_fraction: float = 0.25, device=None) -> torch.Tensor:
    """Mask ``(1, 1, D, H, W)`` excluding ``margin_fraction`` of each side (VTN: a quarter)."""
    mask = torch.zeros((1, 1, *shape), device=device)
    lo = [int(n * margin_fraction) for n in shape]
    hi = [max(n - m, m + 1) for n, m in zip(shape, lo)]
    mask[:, :, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1.0
    return mask


def invertibility_loss(forward: torch.Tensor, backward: torch.Tensor,
                       margin_fraction: float = 0.25) -> torch.Tensor:
    """VTN's invertibility loss (Zhao et al., JBHI 2020), unnormalised as in the paper: the squared
    L2 norm ``||f12 * f21||^2 + ||f21 * f12||^2`` over the central region -- a *sum* over its voxels
    and the three components, in squared voxels -- averaged over the batch.

    ``f1 * f2 = f2 + warp(f1, f2)`` (``spatial.compose``); a pair of mutually inverse fields
    composes to zero displacement both ways. The margin (a quarter of each side) keeps out the
    border, where a field warped past the grid is extrapolated.

    Being a sum, the term depends on the grid: for the same physical inconsistency of ``e`` mm it
    is ``2 * n_centre * (e / s)^2`` for ``n_centre`` central voxels of side ``s`` mm -- about
    ``n^3 / 8`` voxels for an ``n^3`` grid. Halving the voxel size multiplies it by 32 (8 times
    the voxels, 4 times the squared voxel displacement). A caller that wants the per-voxel mean
    divides by ``central_region_mask(shape).sum()``.
    """
    mask = central_region_mask(forward.shape[2:], margin_fraction, forward.device)
    there_and_back = compose(forward, backward)
    back_and_there = compose(backward, forward)
    squared = (there_and_back ** 2).sum(1, keepdim=True) + (back_and_there ** 2).sum(1, keepdim=True)
    return (squared * mask.to(squared.dtype)).sum(dim=(1, 2, 3, 4)).mean()


def gaussian_kl_loss(mean: torch.Tensor, log_sigma: torch.Tensor,
                     prior_lambda: float = 20.0) -> torch.Tensor:
    """Closed-form KL between the Gaussian posterior ``N(mean, diag(sigma^2))`` of a velocity and
    the smoothness prior ``N(0, (lambda L)^-1)`` with graph Laplacian ``L`` (Dalca et al. 2018):

    ``KL = 1/2 [ sum_c (lambda d sigma_c^2 - log sigma_c^2) + lambda sum_{i~j} ||mu_i - mu_j||^2 ]``
    up to constants, ``d = 6`` neighbours in 3-D, each edge ``i~j`` counted once; per voxel.
    """
    sigma_sq = torch.exp(2.0 * log_sigma)
    degree = 2.0 * (mean.dim() - 2)  # 6 neighbours on a 3-D grid
    sigma_term = prior_lambda * degree * sigma_sq - 2.0 * log_sigma
    smooth_term = sum((diff ** 2).sum(1).mean() for diff in forward_differences(mean))
    return 0.5 * (sigma_term.sum(1).mean() + prior_lambda * smooth_term)


SIMILARITIES = {
    "lncc": local_ncc_loss,
    "mind": mind_loss,
    "ncc": correlation_coefficient_loss,
    "mse": mse_loss,
    "ngf": ngf_loss,
    "mi": mutual_information_loss,
}


def similarity_loss(name: str):
    """The similarity function registered under ``name`` (lncc, mind, ncc, mse, ngf, mi)."""
    try:
        return SIMILARITIES[name]
    except KeyError:
        raise ValueError(f"unknown similarity '{name}'; choose one of {', '.join(SIMILARITIES)}")
