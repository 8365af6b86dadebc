"""Evaluation metrics: deformation quality (Jacobian, folding, SDlogJ) and overlap (Dice, HD95).

Every metric of a deformation takes the displacement in voxels of the fixed grid and uses the
library's Jacobians in ``spatial`` -- so a network, instance optimisation and an external tool's
exported field are judged by the same code. Folding is reported two ways:

- *central* (``jacobian_determinant_map``, ``folding_percent``): central differences, the figure
  ITK's ``DisplacementFieldJacobianDeterminant`` and Learn2Reg report, comparable with papers;
- *strict* (``strict_jacobian_determinant_map``, ``folding_strict_mask``,
  ``folding_percent_strict``): a voxel is folded when any of its 8 one-sided (forward/backward
  per axis) finite-difference Jacobians has det <= 0. Central differences cannot see a fold that
  alternates every voxel; a QA measure must not miss it.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from .spatial import jacobian_determinant, strict_jacobian_determinant

# Slices along D per piece: a whole 1 mm head in float64 with its 3x3 derivatives needs over a
# gigabyte at once; pieces of 16 slices (plus one neighbour each side) need a few tens of MiB.
SLAB = 16


def _field64(displacement) -> torch.Tensor:
    field = torch.as_tensor(np.asarray(displacement) if not torch.is_tensor(displacement)
                            else displacement).to(torch.float64)
    return field[None] if field.dim() == 4 else field


def _by_slabs(function, field: torch.Tensor, slab: int = SLAB) -> np.ndarray:
    """``function(field)[0]`` computed slab by slab along D. Both Jacobians look at most one voxel
    away, so each slab carries one neighbouring slice on each side (dropped afterwards) and the
    result is identical to the whole-volume computation, borders included."""
    depth = field.shape[2]
    result = np.empty(tuple(field.shape[2:]), dtype=np.float64)
    with torch.no_grad():
        for start in range(0, depth, slab):
            stop = min(start + slab, depth)
            low, high = max(start - 1, 0), min(stop + 1, depth)
            part = function(field[:, :, low:high])[0]
            result[start:stop] = part[start - low:stop - low].cpu().numpy()
    return result


def jacobian_determinant_map(displacement) -> np.ndarray:
    """Central-difference determinant ``(D, H, W)`` of the Jacobian of ``x -> x + u(x)`` for a
    ``(1, 3, D, H, W)`` field (tensor or array) in voxels; equal to the physical-space determinant
    (see ``spatial``). The ITK / Learn2Reg-comparable figure."""
    return _by_slabs(jacobian_determinant, _field64(displacement))


def strict_jacobian_determinant_map(displacement) -> np.ndarray:
    """Per voxel the minimum ``(D, H, W)`` of the 8 one-sided finite-difference Jacobian
    determinants of ``x -> x + u(x)`` (``spatial.strict_jacobian_determinant``); never above
    :func:`jacobian_determinant_map` (which is their mean)."""
    return _by_slabs(strict_jacobian_determinant, _field64(displacement))


def folding_strict_mask(displacement) -> np.ndarray:
    """Boolean ``(D, H, W)``: True where the map folds by the strict measure (any one-sided
    Jacobian determinant <= 0)."""
    return strict_jacobian_determinant_map(displacement) <= 0


def folding_percent_strict(displacement, mask: Optional[np.ndarray] = None) -> float:
    """Percentage of voxels (inside ``mask`` if given) folded by the strict measure. Given the
    strict map already, ``folding_percent(strict_map)`` is the same number."""
    return folding_percent(strict_jacobian_determinant_map(displacement), mask)


def _select(values: np.ndarray, mask: Optional[np.ndarray]) -> np.ndarray:
    return values[np.asarray(mask, dtype=bool)] if mask is not None else values.ravel()


def folding_percent(determinant: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """Percentage of voxels whose Jacobian determinant is <= 0 (the map folds there)."""
    values = _select(determinant, mask)
    return float(100.0 * np.count_nonzero(values <= 0) / max(values.size, 1))


def sdlogj(determinant: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """Standard deviation of log(det J), with det clipped to [1e-9, 1e9] as in Learn2Reg."""
    values = _select(determinant, mask)
    return float(np.std(np.log(np.clip(values, 1e-9, 1e9))))


def ncc(a: np.ndarray, b: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """Global normalised cross-correlation (Pearson) of two arrays on the same grid."""
    x = _select(np.asarray(a, np.float64), mask)
    y = _select(np.asarray(b, np.float64), mask)
    x = x - x.mean()
    y = y - y.mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denominator) if denominator > 0 else 0.0


def label_values(*label_maps: np.ndarray) -> Sequence[int]:
    """Foreground labels (non-zero) present in any of the maps, sorted."""
    values = set()
    for labels in label_maps:
        values.update(int(v) for v in np.unique(labels))
    values.discard(0)
    return sorted(values)


def dice(fixed_labels: np.ndarray, warped_labels: np.ndarray,
         labels: Optional[Iterable[int]] = None) -> Dict[int, float]:
    """Dice ``2|A & B| / (|A| + |B|)`` per label (labels absent from both are left out)."""
    result = {}
    for label in (labels if labels is not None else label_values(fixed_labels, warped_labels)):
        a = fixed_labels == label
        b = warped_labels == label
        total = int(a.sum()) + int(b.sum())
        if total:
            result[int(label)] = 2.0 * float(np.logical_and(a, b).sum()) / total
    return result


def _surface_distances(a: sitk.Image, b: sitk.Image) -> np.ndarray:
    """Distances (mm) from each surface voxel of ``a`` to the surface of ``b``."""
    distance_to_b = sitk.Abs(sitk.SignedMaurerDistanceMap(b, insideIsPositive=False,
                                                          squaredDistance=False,
                                                          useImageSpacing=True))
    surface_a = sitk.GetArrayFromImage(sitk.LabelContour(a, fullyConnected=False)) > 0
    return sitk.GetArrayFromImage(distance_to_b)[surface_a]


def hd95(fixed_labels: np.ndarray, warped_labels: np.ndarray, spacing_kji: Sequence[float],
         labels: Optional[Iterable[int]] = None) -> Dict[int, float]:
    """95th percentile of the symmetric surface distance in mm, per label.

    A label present in only one of the maps has no defined distance and is reported as ``inf``.
    """
    result = {}
    spacing_ijk = tuple(float(s) for s in spacing_kji[::-1])
    for label in (labels if labels is not None else label_values(fixed_labels, warped_labels)):
        a = (fixed_labels == label).astype(np.uint8)
        b = (warped_labels == label).astype(np.uint8)
        if not a.any() and not b.any():
            continue
        if not a.any() or not b.any():
            result[int(label)] = float("inf")
            continue
        image_a = sitk.GetImageFromArray(a)
        image_b = sitk.GetImageFromArray(b)
        image_a.SetSpacing(spacing_ijk)
        image_b.SetSpacing(spacing_ijk)
        distances = np.concatenate([_surface_distances(image_a, image_b),
                                    _surface_distances(image_b, image_a)])
        result[int(label)] = float(np.percentile(distances, 95))
    return result


def volume_ratio(labels_before: np.ndarray, labels_after: np.ndarray,
                 voxel_volume_before: float = 1.0, voxel_volume_after: float = 1.0,
                 labels: Optional[Iterable[int]] = None) -> Dict[int, float]:
    """Physical volume of each label after warping over its volume before (1 = volume kept).

    The maps may live on different grids (moving vs fixed), hence the two voxel volumes in mm^3.
    """
    result = {}
    for label in (labels if labels is not None else label_values(labels_before)):
        before = int((labels_before == label).sum()) * voxel_volume_before
        if before:
            after = int((labels_after == label).sum()) * voxel_volume_after
            result[int(label)] = float(after) / before
    return result
