"""Canonical network input: every acquisition reaches a network in one orientation and framing.

A network learns what its training volumes look like. They are oriented by
``sitk.DICOMOrient(image, "LPS")`` (the axes permuted and flipped so that the direction matrix is
the one closest to the identity: i towards the patient's left, j posterior, k superior) and
centred on a canvas. A coronal or sagittal acquisition stored as it comes would reach the network
rotated by 90 degrees, and a whole-body or tightly cropped field of view framed unlike anything it
saw. So :func:`canonical_frame` builds, for each pair:

- the *orientation*: the direction ``DICOMOrient`` gives the fixed image (for an oblique image
  the permuted and flipped oblique axes, so the canvas axes stay parallel to the fixed grid's and
  no voxel is rotated);
- the *framing*: on the working grid (isotropic ``working_spacing_mm``), the bounding box of the
  union of the fixed and moving foregrounds (``alignment.foreground_mask``: a threshold at a
  tenth of the robust intensity range, opening, largest component), grown by a margin (default
  10 mm) and rounded up, centred, to a multiple of the method's ``size_multiple``. Background beyond the images is zero, as on the
  training canvas. An image larger than that box is cropped to its foreground and margin;
  nothing of the foreground is ever cut.

:meth:`CanonicalFrame.to_canvas` resamples an image onto the canvas (Gaussian anti-aliasing when
the canvas is coarser) and :meth:`CanonicalFrame.field_to_fixed` maps a displacement predicted on
the canvas back to the fixed grid: exactly, through the physical geometry of both grids, with one
linear interpolation. Beyond the framed box the field is extended by border replication (the
value at the nearest canvas voxel), which is where no foreground is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .alignment import foreground_mask
from .images import index_to_physical_matrix
from .spatial import ALIGN_CORNERS, gaussian_smooth

DEFAULT_MARGIN_MM = 10.0
ORDER_KJI = [2, 1, 0, 3]  # (i, j, k, 1) <-> (k, j, i, 1) in 4x4 matrices


def canonical_direction(reference: sitk.Image) -> np.ndarray:
    """The 3x3 direction ``sitk.DICOMOrient(reference, "LPS")`` gives (computed on a 2x2x2
    stand-in with ``reference``'s direction, so no voxel data is copied)."""
    stand_in = sitk.Image([2, 2, 2], sitk.sitkUInt8)
    stand_in.SetDirection(reference.GetDirection())
    oriented = sitk.DICOMOrient(stand_in, "LPS")
    return np.array(oriented.GetDirection(), dtype=np.float64).reshape(3, 3)


def _kji(matrix: np.ndarray) -> np.ndarray:
    return matrix[np.ix_(ORDER_KJI, ORDER_KJI)]


@dataclass
class CanonicalFrame:
    """The canvas a network sees and the exact map between it and the fixed grid.

    ``origin``/``spacing``/``direction``/``size`` describe the canvas as a SimpleITK grid
    (``size`` in (i, j, k)); ``to_fixed`` is the 4x4 matrix sending a canvas voxel index
    (k, j, i, 1) to the fixed voxel index (k, j, i, 1) at the same physical point.
    """
    origin: np.ndarray
    spacing: np.ndarray
    direction: np.ndarray
    size: Tuple[int, int, int]
    fixed_shape: Tuple[int, int, int]   # (D, H, W) of the fixed grid
    fixed_spacing: np.ndarray           # (k, j, i) mm
    to_fixed: np.ndarray

    @property
    def shape(self) -> Tuple[int, int, int]:
        """(D, H, W) of the canvas."""
        return tuple(int(n) for n in self.size[::-1])

    def reference_image(self) -> sitk.Image:
        """An empty image on the canvas grid (its geometry: for resampling and tests)."""
        image = sitk.Image([int(n) for n in self.size], sitk.sitkFloat32)
        image.SetOrigin(tuple(float(v) for v in self.origin))
        image.SetSpacing(tuple(float(v) for v in self.spacing))
        image.SetDirection(tuple(float(v) for v in self.direction.ravel()))
        return image

    def to_canvas(self, image: torch.Tensor, antialias: bool = True) -> torch.Tensor:
        """``image`` ``(B, C, D, H, W)`` on the fixed grid, resampled onto the canvas (linear,
        zero outside the fixed grid). When the canvas is coarser along a fixed axis the image
        is first smoothed along it (sigma half the shrink factor, as ``spatial.resize_image``)."""
        linear = self.to_fixed[:3, :3]
        if antialias:
            # canvas spacing seen along each fixed axis (axes are parallel: one non-zero per row)
            factors = np.abs(linear).sum(axis=1)
            sigmas = [0.5 * f if f > 1.0 + 1e-6 else 0.0 for f in factors]
            if any(s > 0 for s in sigmas):
                image = gaussian_smooth(image, sigmas)
        grid = self._sample_grid(self.to_fixed, self.shape, self.fixed_shape, image)
        return F.grid_sample(image, grid.expand(image.shape[0], -1, -1, -1, -1), mode="bilinear",
                             padding_mode="zeros", align_corners=ALIGN_CORNERS)

    def field_to_fixed(self, displacement: torch.Tensor) -> torch.Tensor:
        """A displacement ``(B, 3, D', H', W')`` in canvas voxels (channels k, j, i) as a
        displacement on the fixed grid in fixed voxels: the same physical map, sampled at the
        fixed voxels (one linear interpolation; border replication outside the canvas)."""
        to_canvas = np.linalg.inv(self.to_fixed)
        grid = self._sample_grid(to_canvas, self.fixed_shape, self.shape, displacement)
        sampled = F.grid_sample(displacement, grid.expand(displacement.shape[0], -1, -1, -1, -1),
                                mode="bilinear", padding_mode="border",
                                align_corners=ALIGN_CORNERS)
        linear = torch.from_numpy(self.to_fixed[:3, :3]).to(sampled)
        return torch.einsum("ij,bj...->bi...", linear, sampled)

    @staticmethod
    def _sample_grid(matrix: np.ndarray, out_shape: Sequence[int], in_shape: Sequence[int],
                     like: torch.Tensor) -> torch.Tensor:
        """``grid_sample`` grid ``(1, *out_shape, 3)`` reading the input grid at ``matrix`` @
        (output voxel index), both (k, j, i). Built by broadcasting three axis vectors, so only
        the grid itself is allocated (a 1 mm head: no extra copies of a 16M-voxel grid)."""
        scale = np.array([2.0 / max(n - 1, 1) for n in in_shape])
        normalised = np.diag(scale) @ np.asarray(matrix, dtype=np.float64)[:3]  # index -> [-1, 1]
        normalised[:, 3] -= 1.0
        axes = [torch.arange(n, device=like.device, dtype=like.dtype) for n in out_shape]
        grid = torch.empty((1, *out_shape, 3), device=like.device, dtype=like.dtype)
        for channel, row in zip((2, 1, 0), normalised):  # grid_sample's (x, y, z) = (i, j, k)
            grid[0, ..., channel] = (float(row[0]) * axes[0].view(-1, 1, 1)
                                     + float(row[1]) * axes[1].view(1, -1, 1)
                                     + float(row[2]) * axes[2].view(1, 1, -1) + float(row[3]))
        return grid


def _grid_frame(geometry: sitk.Image, direction: np.ndarray, spacing: np.ndarray,
                start: np.ndarray, size: Sequence[int], lower: np.ndarray) -> CanonicalFrame:
    """A frame whose canvas voxel 0 sits at ``lower + direction @ (spacing * start)`` (LPS)."""
    origin = lower + direction @ (spacing * start)
    canvas = np.eye(4)
    canvas[:3, :3] = direction @ np.diag(spacing)
    canvas[:3, 3] = origin
    to_fixed = np.linalg.inv(index_to_physical_matrix(geometry)) @ canvas
    fixed_shape = tuple(int(n) for n in geometry.GetSize()[::-1])
    return CanonicalFrame(origin, spacing.copy(), direction, tuple(int(n) for n in size),
                          fixed_shape, np.array(geometry.GetSpacing()[::-1], dtype=np.float64),
                          _kji(to_fixed))


def whole_image_frame(geometry: sitk.Image, working_spacing_mm: Optional[float]) -> CanonicalFrame:
    """The canonical orientation over the fixed image's whole extent (corner voxel centres
    kept) at ``working_spacing_mm`` -- or at the fixed spacing, permuted, when None."""
    direction = canonical_direction(geometry)
    fixed_linear = index_to_physical_matrix(geometry)[:3, :3]
    # which fixed axis runs along each canonical axis, and its length between corner centres
    alignment = np.abs(direction.T @ np.array(geometry.GetDirection()).reshape(3, 3))
    source_axis = alignment.argmax(axis=1)
    lengths = np.array([(geometry.GetSize()[a] - 1) * geometry.GetSpacing()[a]
                        for a in source_axis])
    if working_spacing_mm:
        # as base.working_shape: about working_spacing_mm, the corner voxel centres kept exactly
        size = [max(int(round(length / working_spacing_mm)) + 1, 2) for length in lengths]
        spacing = np.array([length / (n - 1) if length > 0 else float(working_spacing_mm)
                            for length, n in zip(lengths, size)])
    else:
        spacing = np.array([geometry.GetSpacing()[a] for a in source_axis], dtype=np.float64)
        size = [geometry.GetSize()[a] for a in source_axis]
    corners = np.array([[a, b, c] for a in (0, geometry.GetSize()[0] - 1)
                        for b in (0, geometry.GetSize()[1] - 1)
                        for c in (0, geometry.GetSize()[2] - 1)], dtype=np.float64)
    points = corners @ fixed_linear.T + np.array(geometry.GetOrigin())
    lower = direction @ (points @ direction).min(axis=0)
    return _grid_frame(geometry, direction, spacing, np.zeros(3), size, lower)


def foreground_box(images: Sequence[torch.Tensor], spacing: np.ndarray
                   ) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """Lowest and highest (i, j, k) index of the union of the images' foregrounds, or None."""
    union = None
    for image in images:
        array = image[0, 0].detach().cpu().numpy().astype(np.float32)
        sitk_image = sitk.GetImageFromArray(array)
        sitk_image.SetSpacing(tuple(float(s) for s in spacing))
        mask = sitk.GetArrayFromImage(foreground_mask(sitk_image)) > 0
        union = mask if union is None else union | mask
    index = np.argwhere(union)
    if not len(index):
        return None
    return index.min(0)[::-1].astype(np.float64), index.max(0)[::-1].astype(np.float64)


def canonical_frame(fixed: torch.Tensor, moving: torch.Tensor, geometry: sitk.Image,
                    working_spacing_mm: Optional[float], multiple: int = 1,
                    margin_mm: float = DEFAULT_MARGIN_MM) -> CanonicalFrame:
    """The canonical canvas for the pair ``fixed`` / ``moving`` (tensors ``(1, 1, D, H, W)`` on
    the fixed grid, whose geometry ``geometry`` gives): oriented as ``DICOMOrient(.., "LPS")``,
    at ``working_spacing_mm``, framing the union of both foregrounds plus ``margin_mm``, each
    side a multiple of ``multiple`` (see the module docstring)."""
    whole = whole_image_frame(geometry, working_spacing_mm)
    # for the masks only: no anti-aliasing needed (run_network smooths when it fills the canvas)
    on_grid = [whole.to_canvas(image, antialias=False) for image in (fixed, moving)]
    box = foreground_box(on_grid, whole.spacing)
    if box is None:  # no foreground at all: frame the whole image
        box = (np.zeros(3), np.array(whole.size, dtype=np.float64) - 1)
    low, high = box
    margin = np.ceil(margin_mm / whole.spacing)
    extent = high - low + 1 + 2 * margin
    size = np.array([int(math.ceil(n / multiple) * multiple) for n in extent])
    start = low - margin - np.floor((size - extent) / 2.0)
    lower = whole.origin
    return _grid_frame(geometry, whole.direction, whole.spacing, start, size, lower)
