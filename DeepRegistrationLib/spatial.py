"""The spatial kit: one way to warp, compose, integrate, resize and differentiate a field.

Conventions (used by every method in the library):

- Images are tensors ``(B, C, D, H, W)``; a displacement ``u`` is ``(B, 3, D, H, W)`` in *voxels of
  the grid it lives on*, channel 0 along D (k), 1 along H (j), 2 along W (i) -- the (k, j, i) order
  of a SimpleITK array.
- Warping follows ITK: ``warped(x) = moving(x + u(x))``.
- ``grid_sample`` is always called with ``align_corners=True``: voxel centres of the first and last
  voxel sit at -1 and +1, so a field resized between grids keeps its corners fixed and the vector
  rescaling factor is exactly ``(n_new - 1) / (n_old - 1)``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

ALIGN_CORNERS = True


def identity_grid(shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel coordinates ``(1, 3, D, H, W)`` of a grid, channels in (k, j, i) order."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).unsqueeze(0)


def voxel_to_normalised(coords: torch.Tensor) -> torch.Tensor:
    """Map voxel coordinates ``(B, 3, D, H, W)`` to a ``grid_sample`` grid ``(B, D, H, W, 3)``.

    ``grid_sample`` wants (x, y, z) = (W, H, D) order in [-1, 1] with ``align_corners=True``.
    """
    shape = coords.shape[2:]
    scaled = [coords[:, axis] * (2.0 / max(n - 1, 1)) - 1.0 for axis, n in enumerate(shape)]
    return torch.stack(scaled[::-1], dim=-1)


def warp(image: torch.Tensor, displacement: torch.Tensor, mode: str = "bilinear",
         padding_mode: str = "border") -> torch.Tensor:
    """Resample ``image`` at ``x + u(x)``: ``warped(x) = image(x + u(x))``.

    ``image`` and ``displacement`` share the spatial grid. ``mode`` is ``"bilinear"`` (trilinear in
    3-D) or ``"nearest"`` (labels). Points outside take the border value by default, which is
    the right choice for fields and intensity images alike during optimisation.
    """
    if image.shape[2:] != displacement.shape[2:]:
        raise ValueError(f"image grid {tuple(image.shape[2:])} differs from displacement grid "
                         f"{tuple(displacement.shape[2:])}")
    coords = identity_grid(displacement.shape[2:], displacement.device, displacement.dtype)
    grid = voxel_to_normalised(coords + displacement)
    if image.shape[0] != grid.shape[0]:
        grid = grid.expand(image.shape[0], -1, -1, -1, -1)
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode,
                         align_corners=ALIGN_CORNERS)


def compose(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Displacement of "warp by ``first``, then warp the result by ``second``".

    ``warp(warp(I, first), second) == warp(I, compose(first, second))`` because
    ``warp(I, first)(x + second(x)) = I(x + second(x) + first(x + second(x)))``. This is VTN's
    ``f1 * f2 = f2 + warp(f1, f2)``.
    """
    return second + warp(first, second)


def integrate_velocity(velocity: torch.Tensor, steps: Optional[int] = 7) -> torch.Tensor:
    """Scaling and squaring: ``exp(v)`` of a stationary velocity field, in voxels.

    ``u = v / 2**steps`` is small enough to be its own exponential; squaring ``steps`` times
    (``u <- u o u``) gives the flow at time 1, a diffeomorphism for a smooth ``v``. With
    ``steps=None`` the count is the smallest (3 to 10) that makes the first step move no voxel,
    and change no neighbour difference, by more than 1/8 voxel: ``I + grad(u)`` is then safely
    invertible and the result is within a few hundredths of a voxel of a 10-step integration.
    """
    if steps is None:
        with torch.no_grad():
            change = max(diff.abs().max().item() for diff in forward_differences(velocity))
            change = max(change, velocity.abs().max().item())
        steps = min(max(int(math.ceil(math.log2(max(change, 1e-6) / 0.125))), 3), 10)
    displacement = velocity / (2 ** steps)
    for _ in range(steps):
        displacement = compose(displacement, displacement)
    return displacement


def affine_displacement(matrix: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Displacement ``(B, 3, D, H, W)`` of an affine map on centred voxel coordinates.

    ``matrix`` is ``(B, 3, 4)`` = ``[A | b]`` acting on ``c = x - centre`` in (k, j, i) order:
    the point ``x`` is sent to ``centre + A c + b``, so ``u(x) = (A - I) c + b``.
    """
    coords = identity_grid(shape, matrix.device, matrix.dtype)
    centre = torch.tensor([(n - 1) / 2.0 for n in shape], device=matrix.device,
                          dtype=matrix.dtype).view(1, 3, 1, 1, 1)
    centred = (coords - centre).flatten(2)  # (1, 3, N)
    linear = matrix[:, :, :3] - torch.eye(3, device=matrix.device, dtype=matrix.dtype)
    moved = linear @ centred + matrix[:, :, 3:]
    return moved.view(matrix.shape[0], 3, *shape)


def resize_image(image: torch.Tensor, shape: Sequence[int], mode: str = "trilinear",
                 antialias: bool = True) -> torch.Tensor:
    """Resample an image onto a grid of ``shape`` covering the same extent (corners aligned).

    When shrinking, a Gaussian with sigma of about half the shrink factor removes what the coarse
    grid cannot hold, so a pyramid level is not aliased.
    """
    shape = tuple(int(n) for n in shape)
    if tuple(image.shape[2:]) == shape:
        return image
    if mode == "nearest":
        return F.interpolate(image, size=shape, mode="nearest")
    if antialias:
        factors = [(n_old - 1) / max(n_new - 1, 1) for n_old, n_new in zip(image.shape[2:], shape)]
        sigmas = [0.5 * f if f > 1.0 else 0.0 for f in factors]
        if any(s > 0 for s in sigmas):
            image = gaussian_smooth(image, sigmas)
    return F.interpolate(image, size=shape, mode=mode, align_corners=ALIGN_CORNERS)


def resize_displacement(displacement: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Resize a voxel-unit field to ``shape`` and rescale each component to the new voxel size."""
    shape = tuple(int(n) for n in shape)
    old = displacement.shape[2:]
    if tuple(old) == shape:
        return displacement
    resized = F.interpolate(displacement, size=shape, mode="trilinear", align_corners=ALIGN_CORNERS)
    scale = torch.tensor([(n_new - 1) / max(n_old - 1, 1) for n_old, n_new in zip(old, shape)],
                         device=displacement.device, dtype=displacement.dtype)
    return resized * scale.view(1, 3, 1, 1, 1)


def gaussian_kernel1d(sigma: float, device=None, dtype=torch.float32) -> torch.Tensor:
    radius = max(int(math.ceil(3.0 * sigma)), 1)
    x = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_smooth(image: torch.Tensor, sigma) -> torch.Tensor:
    """Separable Gaussian smoothing (sigma in voxels, scalar or one per axis), replicate padding."""
    sigmas = [float(sigma)] * 3 if not isinstance(sigma, (list, tuple)) else [float(s) for s in sigma]
    channels = image.shape[1]
    out = image
    for axis, s in enumerate(sigmas):
        if s <= 0:
            continue
        kernel = gaussian_kernel1d(s, image.device, image.dtype)
        radius = kernel.numel() // 2
        view = [1, 1, 1]
        view[axis] = kernel.numel()
        weight = kernel.view(1, 1, *view).repeat(channels, 1, 1, 1, 1)
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), weight, groups=channels)
    return out


def spatial_gradient(field: torch.Tensor) -> torch.Tensor:
    """Derivatives ``(B, C, 3, D, H, W)`` along (k, j, i) in voxel units.

    Central differences inside, one-sided at the borders (the same scheme as ``numpy.gradient``
    and ITK's displacement-field Jacobian filter away from the border).
    """
    grads = []
    for axis in range(3):
        dim = axis + 2
        n = field.shape[dim]
        if n < 2:
            grads.append(torch.zeros_like(field))
            continue
        front = field.narrow(dim, 1, 1) - field.narrow(dim, 0, 1)
        back = field.narrow(dim, n - 1, 1) - field.narrow(dim, n - 2, 1)
        if n > 2:
            middle = (field.narrow(dim, 2, n - 2) - field.narrow(dim, 0, n - 2)) / 2.0
            grads.append(torch.cat([front, middle, back], dim=dim))
        else:
            grads.append(torch.cat([front, back], dim=dim))
    return torch.stack(grads, dim=2)


def jacobian_matrix(displacement: torch.Tensor) -> torch.Tensor:
    """Jacobian ``(B, 3, 3, D, H, W)`` of ``x -> x + u(x)``: ``I + du/dx`` (row: component)."""
    grad = spatial_gradient(displacement)
    eye = torch.eye(3, device=displacement.device, dtype=displacement.dtype).view(1, 3, 3, 1, 1, 1)
    return grad + eye


def jacobian_determinant(displacement: torch.Tensor) -> torch.Tensor:
    """Determinant ``(B, D, H, W)`` of the Jacobian of ``x -> x + u(x)``; the library's only one.

    The field is in voxels. The determinant in physical space is the same number: with ``M`` the
    direction matrix times the spacing, the physical Jacobian is ``M (I + du/dx) M^-1``, a
    similarity transform of the voxel one, so spacing and direction cosines cancel. The identity
    is added exactly once.
    """
    j = jacobian_matrix(displacement)
    return (j[:, 0, 0] * (j[:, 1, 1] * j[:, 2, 2] - j[:, 1, 2] * j[:, 2, 1])
            - j[:, 0, 1] * (j[:, 1, 0] * j[:, 2, 2] - j[:, 1, 2] * j[:, 2, 0])
            + j[:, 0, 2] * (j[:, 1, 0] * j[:, 2, 1] - j[:, 1, 1] * j[:, 2, 0]))


def one_sided_differences(field: torch.Tensor, axis: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward ``f(x + e) - f(x)`` and backward ``f(x) - f(x - e)`` differences along spatial
    ``axis`` (0, 1, 2 = D, H, W), each the full shape of ``field``.

    Where the neighbour on one side is outside the grid the other side's difference stands in
    (at the border there is only one difference to take); an axis of one voxel has zero
    derivative.
    """
    dim = axis + 2
    n = field.shape[dim]
    if n < 2:
        zero = torch.zeros_like(field)
        return zero, zero
    step = field.narrow(dim, 1, n - 1) - field.narrow(dim, 0, n - 1)
    forward = torch.cat([step, step.narrow(dim, n - 2, 1)], dim=dim)
    backward = torch.cat([step.narrow(dim, 0, 1), step], dim=dim)
    return forward, backward


def one_sided_jacobian_determinants(displacement: torch.Tensor):
    """The 8 one-sided finite-difference Jacobian determinants of ``x -> x + u(x)``, one
    ``(B, D, H, W)`` tensor at a time (forward or backward difference on each of the 3 axes).

    They are the Jacobians, at the voxel centre ``x``, of the trilinear interpolant of the map on
    the 8 grid cells that have ``x`` as a corner: all 8 are positive exactly when no cell around
    ``x`` is turned inside out there. Central differences average the two sides and miss a fold
    that alternates every voxel (odd-even / checkerboard): ``u = a (-1)^i`` has central
    derivative 0 (det 1) but one-sided derivatives ``+-2a``. As for
    :func:`jacobian_determinant`, the voxel-unit determinant equals the physical one (each
    one-sided Jacobian is similar to its physical counterpart through direction and spacing).
    A generator, so a caller taking the minimum or a sum holds one determinant at a time.
    """
    # columns[d] = (forward, backward) versions of the d-th column of J = e_d + du/dx_d, each a
    # list of its 3 component volumes. The cross and dot products are written out component by
    # component: three times faster than torch.linalg.cross and a sum over the channel axis.
    columns = []
    for axis in range(3):
        pair = []
        for difference in one_sided_differences(displacement, axis):
            components = [difference[:, c] for c in range(3)]
            components[axis] = components[axis] + 1.0
            pair.append(components)
        columns.append(pair)
    for second in columns[1]:
        for third in columns[2]:
            normal = (second[1] * third[2] - second[2] * third[1],   # c1 x c2
                      second[2] * third[0] - second[0] * third[2],
                      second[0] * third[1] - second[1] * third[0])
            for first in columns[0]:
                yield first[0] * normal[0] + first[1] * normal[1] + first[2] * normal[2]


def strict_jacobian_determinant(displacement: torch.Tensor) -> torch.Tensor:
    """Per voxel, the minimum ``(B, D, H, W)`` of the 8 one-sided Jacobian determinants
    (:func:`one_sided_jacobian_determinants`): <= 0 wherever any cell around the voxel folds.

    The determinant is linear in each column and a central difference is the mean of the two
    one-sided ones, so the central-difference :func:`jacobian_determinant` is exactly the *mean*
    of the 8 (borders included): the strict value is never above it, every voxel the central
    scheme calls folded is folded here too, and odd-even folds it averages away are not hidden.
    """
    result = None
    for determinant in one_sided_jacobian_determinants(displacement):
        result = determinant if result is None else torch.minimum(result, determinant)
    return result


def forward_differences(field: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward differences along D, H and W (each one voxel shorter on its axis)."""
    return (field[:, :, 1:] - field[:, :, :-1],
            field[:, :, :, 1:] - field[:, :, :, :-1],
            field[:, :, :, :, 1:] - field[:, :, :, :, :-1])


def pad_to_multiple(image: torch.Tensor, multiple: int, mode: str = "replicate"):
    """Pad each spatial axis on both sides (half each, the extra voxel at the end) so it divides
    by ``multiple``; returns ``(padded, region)``, ``region`` a tuple of slices that
    :func:`crop_to_region` uses to cut the original extent back out.

    Centred, because the networks are trained on anatomy centred on their canvas: padding only
    at the end shifted a tightly framed head by up to 15 voxels and VTN's ground-truth error on
    such MNI152 pairs went from 1.0 mm (centred) to 4.3 mm (end-padded).
    """
    shape = tuple(image.shape[2:])
    extra = [(-n) % multiple for n in shape]
    before = [e // 2 for e in extra]
    region = tuple(slice(b, b + n) for b, n in zip(before, shape))
    if not any(extra):
        return image, region
    pad = []
    for axis in (2, 1, 0):  # F.pad lists the last axis first
        pad += [before[axis], extra[axis] - before[axis]]
    return F.pad(image, pad, mode=mode), region


def crop_to_region(image: torch.Tensor, region: Sequence[slice]) -> torch.Tensor:
    """The part of a :func:`pad_to_multiple` result that covers the original grid."""
    return image[(slice(None), slice(None), *region)]
