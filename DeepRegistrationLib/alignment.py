"""The global stage: a moments, rigid or affine transform found before any deformable method runs.

Every transform here is a 4x4 matrix ``T`` acting on LPS physical points and sending a point of
the *fixed* image to the point of the *moving* image that should land there -- the direction ITK
and SimpleITK resample in (``sitk.Resample(moving, fixed, T)`` is the aligned moving image) and
the matrix of the ``affine.tfm`` the outputs write.

- ``moments``: the centre of mass of the fixed image is sent to the centre of mass of the moving
  image (exactly what ``sitk.CenteredTransformInitializer`` does in its MOMENTS mode) and, beyond
  ITK's initialiser, the principal axes of the intensity distribution are matched by the rotation
  closest to the identity; that rotation is kept only when the axes are well defined (distinct
  eigenvalues) and it matches the images better than the centring alone.
- ``rigid`` / ``affine``: intensity-based optimisation in torch, started from ``moments``, on a
  coarse pyramid (8 mm, 4 mm, then ``FINEST_MM``) of each image on its own grid, so a moving
  image far outside the fixed field of view is never cut by a resampling onto the fixed grid.
  The similarity is local NCC, or MIND-SSC when the deformable stage uses MIND (different
  contrasts). ``affine`` runs the rigid schedule's first level, then all twelve parameters.
- ``auto`` (the default of ``deepreg register``): ``affine`` when the moments or the overlap of
  the two foregrounds say the images are not aligned already, else ``none``; the reason is kept.

A user mistake gives one :class:`UserInputError` line: foregrounds that do not overlap at all
once their centres of mass are matched, or an affine that degenerates (determinant outside
(``MIN_DETERMINANT``, ``MAX_DETERMINANT``)).
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .errors import UserInputError
from .images import image_from_array, index_to_physical_matrix, normalise_intensity
from .losses import local_ncc_loss, local_statistics, mind_ssc
from .progress import ProgressScope
from .spatial import ALIGN_CORNERS, identity_grid

INITIAL_MODES = ("auto", "none", "moments", "rigid", "affine")
MIN_DETERMINANT, MAX_DETERMINANT = 0.2, 5.0
# ``auto`` calls a pair "not aligned" past any of these (two scans of one head in one session
# are within a few millimetres and degrees; different subjects in one template space overlap
# with a foreground Dice above 0.9)
AUTO_SHIFT_MM = 5.0
AUTO_ROTATION_DEGREES = 5.0
AUTO_MIN_DICE = 0.9
FOREGROUND_LEVEL = 0.1  # of the robust intensity range: above noise, below every tissue
# principal axes whose eigenvalues differ by less than this fraction are not a defined direction
AXES_MIN_GAP = 0.25
# foregrounds overlapping less than this (fraction of the smaller one) after moments: no overlap
MIN_FOREGROUND_OVERLAP = 0.01

LEVELS_MM = (8.0, 4.0)
FINEST_MM = 4.0             # a finer level costs more than it gains before a deformable stage
FOREGROUND_MARGIN_MM = 10.0  # of the fixed foreground's box, where the similarity is measured
MIN_LEVEL_VOXELS = 16
LNCC_WINDOW = 5             # voxels of each level (40, 20 and 15 mm)
# (rigid steps, affine steps) per level; Adam step sizes in mm of a point at the image's radius
RIGID_STEPS = (60, 30, 20)
AFFINE_STEPS = (60, 30, 20)
LEVEL_STEP_MM = (2.0, 0.8, 0.4)
FINAL_STEP_FRACTION = 0.05  # the step size decays (cosine) to this fraction within a level


# ----------------------------------------------------------------------------------- results
@dataclass
class GlobalAlignment:
    """What the global stage did: the matrix (LPS, fixed point -> moving point) and why."""
    requested: str
    used: str
    reason: str
    matrix: np.ndarray
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # processor time of all threads (benchmarks on a shared machine)

    @property
    def is_identity(self) -> bool:
        return bool(np.allclose(self.matrix, np.eye(4), atol=1e-12))

    def sitk_transform(self) -> sitk.AffineTransform:
        return affine_transform_from_matrix(self.matrix)

    def summary(self) -> Dict:
        """The ``initial`` entry of ``summary.json``."""
        return {"requested": self.requested, "used": self.used, "reason": self.reason,
                "matrix_lps": [[float(v) for v in row] for row in self.matrix],
                "seconds": round(float(self.seconds), 3)}


def affine_transform_from_matrix(matrix: np.ndarray) -> sitk.AffineTransform:
    """An ITK ``AffineTransform`` (centre at the origin) applying the 4x4 LPS ``matrix``."""
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple(float(v) for v in np.asarray(matrix)[:3, :3].ravel()))
    transform.SetTranslation(tuple(float(v) for v in np.asarray(matrix)[:3, 3]))
    return transform


def matrix_from_transform(transform: sitk.Transform) -> np.ndarray:
    """The 4x4 LPS matrix of an ITK matrix-offset transform (centre and offset folded in)."""
    transform = sitk.AffineTransform(transform) if not isinstance(
        transform, sitk.AffineTransform) else transform
    matrix = np.eye(4)
    linear = np.array(transform.GetMatrix()).reshape(3, 3)
    centre = np.array(transform.GetCenter())
    matrix[:3, :3] = linear
    matrix[:3, 3] = np.array(transform.GetTranslation()) + centre - linear @ centre
    return matrix


def centred_matrix(linear: np.ndarray, centre: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """4x4 matrix of ``x -> linear (x - centre) + centre + translation``."""
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = centre + translation - linear @ centre
    return matrix


def rotation_degrees(linear: np.ndarray) -> float:
    """Angle of the rotation part (polar decomposition) of a 3x3 matrix, in degrees."""
    u, _, vt = np.linalg.svd(linear)
    rotation = u @ vt
    return float(np.degrees(np.arccos(np.clip((np.trace(rotation) - 1.0) / 2.0, -1.0, 1.0))))


def index_matrix(matrix: np.ndarray, reference: sitk.Image) -> np.ndarray:
    """The 4x4 LPS ``matrix`` acting on ``reference``'s voxel indices in (k, j, i) order."""
    to_physical = index_to_physical_matrix(reference)
    ijk = np.linalg.inv(to_physical) @ np.asarray(matrix, dtype=np.float64) @ to_physical
    order = [2, 1, 0, 3]
    return ijk[np.ix_(order, order)]


def compose_affine(matrix: np.ndarray, deformable: torch.Tensor,
                   reference: sitk.Image) -> torch.Tensor:
    """The total displacement of "deform, then apply the global transform": the fixed point
    ``x`` is sent to ``T(x + d(x))``, so ``u(x) = T(x + d(x)) - x`` (``d`` in voxels of
    ``reference``, the fixed grid; ``T`` = ``matrix``, LPS fixed -> moving). In ITK's terms this
    is ``CompositeTransform([affine, deformable])``, whose last transform is applied first.
    Exact: the affine part is evaluated analytically, nothing is interpolated."""
    voxel = torch.from_numpy(index_matrix(matrix, reference)).to(deformable)
    linear, offset = voxel[:3, :3], voxel[:3, 3]
    shape = tuple(deformable.shape[2:])
    # (L - I) p + L d + k, with p the voxel grid (k, j, i): float32 is exact to ~1e-5 voxel
    grid = identity_grid(shape, deformable.device, deformable.dtype)
    moved = grid + deformable
    total = torch.einsum("ij,bj...->bi...", linear, moved) + offset.view(1, 3, 1, 1, 1) - grid
    return total


# ------------------------------------------------------------------------------- foregrounds
def normalised(image: sitk.Image) -> sitk.Image:
    """Float32 copy scaled to [0, 1] between the 0.5 and 99.5 percentiles (hot voxels clipped)."""
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    return image_from_array(normalise_intensity(array), image)


def foreground_mask(image: sitk.Image) -> sitk.Image:
    """A simple robust foreground (UInt8 0/1): intensities above ``FOREGROUND_LEVEL`` of the
    robust range (0.5 to 99.5 percentile), a one-voxel opening (noise, thin lines such as a
    table edge), the largest connected component. Not Otsu: on an image filled with anatomy
    (a tight crop) Otsu splits tissues and the box would cut anatomy. Falls back to the
    thresholded mask, then to the whole image, when a step leaves nothing."""
    array = normalise_intensity(sitk.GetArrayFromImage(image).astype(np.float32))
    threshold = image_from_array((array > FOREGROUND_LEVEL).astype(np.uint8), image)
    mask = sitk.BinaryMorphologicalOpening(threshold, [1, 1, 1])
    if not sitk.GetArrayViewFromImage(mask).any():
        mask = threshold
    if not sitk.GetArrayViewFromImage(mask).any():
        return image_from_array(np.ones(array.shape, np.uint8), image)
    components = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    return sitk.Cast(components == 1, sitk.sitkUInt8)


def masked(image: sitk.Image, mask: sitk.Image) -> sitk.Image:
    array = sitk.GetArrayFromImage(image) * (sitk.GetArrayViewFromImage(mask) > 0)
    return image_from_array(array.astype(np.float32), image)


# ----------------------------------------------------------------------------------- moments
def image_moments(image: sitk.Image) -> Tuple[np.ndarray, np.ndarray, float]:
    """Centre of mass (LPS mm), second central moments (3x3, mm^2) and total mass, the voxel
    values as weights (as ITK's ``ImageMomentsCalculator``). Computed from the moments of the
    voxel indices (sums over the marginals, no point list), then mapped to LPS."""
    weights = sitk.GetArrayViewFromImage(image).astype(np.float64)  # (k, j, i)
    mass = float(weights.sum())
    if not mass > 0:
        raise UserInputError("an image has no positive intensity to compute its centre of mass")
    k, j, i = (np.arange(n, dtype=np.float64) for n in weights.shape)
    w_ji, w_ki, w_kj = weights.sum(0), weights.sum(1), weights.sum(2)
    w_i, w_j, w_k = w_ji.sum(0), w_ji.sum(1), w_kj.sum(1)
    first = np.array([w_i @ i, w_j @ j, w_k @ k]) / mass            # (i, j, k)
    second = np.empty((3, 3))
    second[0, 0], second[1, 1], second[2, 2] = w_i @ i ** 2, w_j @ j ** 2, w_k @ k ** 2
    second[0, 1] = second[1, 0] = j @ w_ji @ i
    second[0, 2] = second[2, 0] = k @ w_ki @ i
    second[1, 2] = second[2, 1] = k @ w_kj @ j
    index_covariance = second / mass - np.outer(first, first)
    matrix = index_to_physical_matrix(image)
    centre = matrix[:3, :3] @ first + matrix[:3, 3]
    covariance = matrix[:3, :3] @ index_covariance @ matrix[:3, :3].T
    return centre, covariance, mass


def principal_axes(covariance: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and the unit eigenvectors as columns."""
    values, vectors = np.linalg.eigh(covariance)
    return values, vectors


def axes_defined(values: np.ndarray, gap: float = AXES_MIN_GAP) -> bool:
    """True when the three eigenvalues differ pairwise by more than ``gap`` (relative)."""
    values = np.sort(np.abs(values))
    return bool(values[0] > 0 and np.all(values[1:] / values[:-1] > 1.0 + gap))


def axes_rotation(fixed_axes: np.ndarray, moving_axes: np.ndarray) -> np.ndarray:
    """The rotation sending each fixed principal axis onto the moving one (``R E_f = E_m S``),
    with the signs ``S`` (det +1) that give the smallest rotation angle: eigenvectors have no
    sign, and the closest choice is the one that does not turn a head upside down."""
    best, best_trace = np.eye(3), -np.inf
    for signs in itertools.product((1.0, -1.0), repeat=3):
        rotation = moving_axes @ np.diag(signs) @ fixed_axes.T
        if np.linalg.det(rotation) < 0:
            continue
        if np.trace(rotation) > best_trace:
            best, best_trace = rotation, np.trace(rotation)
    return best


@dataclass
class Moments:
    """Moments of both images and the transforms they suggest."""
    fixed_centre: np.ndarray
    moving_centre: np.ndarray
    rotation: np.ndarray        # principal-axes rotation (identity when the axes are undefined)
    axes_defined: bool

    @property
    def shift_mm(self) -> float:
        return float(np.linalg.norm(self.moving_centre - self.fixed_centre))

    @property
    def rotation_degrees(self) -> float:
        return rotation_degrees(self.rotation)

    def matrix(self, with_axes: bool = True) -> np.ndarray:
        """``x -> R (x - c_f) + c_m``: ``c_f`` to ``c_m``, plus the axes rotation if asked."""
        rotation = self.rotation if with_axes else np.eye(3)
        return centred_matrix(rotation, self.fixed_centre, self.moving_centre - self.fixed_centre)


def compute_moments(fixed: sitk.Image, moving: sitk.Image) -> Moments:
    """Centres of mass and principal axes of the two images (voxel values as weights)."""
    fixed_centre, fixed_covariance, _ = image_moments(fixed)
    moving_centre, moving_covariance, _ = image_moments(moving)
    fixed_values, fixed_axes = principal_axes(fixed_covariance)
    moving_values, moving_axes = principal_axes(moving_covariance)
    defined = axes_defined(fixed_values) and axes_defined(moving_values)
    rotation = axes_rotation(fixed_axes, moving_axes) if defined else np.eye(3)
    return Moments(fixed_centre, moving_centre, rotation, defined)


def moments_matrix(fixed: sitk.Image, moving: sitk.Image, with_axes: bool = True) -> np.ndarray:
    """The moments transform of two images (centre of mass, and principal axes when defined)."""
    return compute_moments(fixed, moving).matrix(with_axes)


# --------------------------------------------------------------------------- overlap checks
def _resampled_mask(mask: sitk.Image, reference: sitk.Image, matrix: np.ndarray) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.Resample(mask, reference, affine_transform_from_matrix(
        matrix), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)) > 0


def foreground_dice(fixed_mask: sitk.Image, moving_mask: sitk.Image,
                    matrix: np.ndarray) -> Tuple[float, float]:
    """Dice of the foregrounds with the moving one mapped by ``matrix``, and the fraction of the
    smaller foreground that overlaps (both on the fixed mask's grid)."""
    fixed_array = sitk.GetArrayViewFromImage(fixed_mask) > 0
    moved = _resampled_mask(moving_mask, fixed_mask, matrix)
    both = np.count_nonzero(fixed_array & moved)
    total = np.count_nonzero(fixed_array) + np.count_nonzero(moved)
    smaller = min(np.count_nonzero(fixed_array), max(np.count_nonzero(moved), 1))
    return (2.0 * both / total if total else 0.0), both / max(smaller, 1)


# ---------------------------------------------------------------------------- optimisation
def coarser(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """``image`` shrunk to about ``spacing_mm`` per axis by averaging whole bins of voxels
    (``sitk.BinShrink``: the box average is the anti-aliasing, one cheap pass over the image);
    an axis already that coarse is kept."""
    factors = [max(int(round(spacing_mm / s)), 1) for s in image.GetSpacing()]
    factors = [min(f, max(n // 4, 1)) for f, n in zip(factors, image.GetSize())]
    if all(f == 1 for f in factors):
        return sitk.Cast(image, sitk.sitkFloat32)
    return sitk.BinShrink(sitk.Cast(image, sitk.sitkFloat32), factors)


def cropped_to(image: sitk.Image, box_min: np.ndarray, box_max: np.ndarray) -> sitk.Image:
    """The part of ``image`` whose voxels lie within the LPS box (or the image if none would)."""
    inverse = np.linalg.inv(index_to_physical_matrix(image))
    corners = np.array([[x, y, z] for x in (box_min[0], box_max[0]) for y in (box_min[1],
                        box_max[1]) for z in (box_min[2], box_max[2])])
    index = corners @ inverse[:3, :3].T + inverse[:3, 3]
    size = np.array(image.GetSize())
    lower = np.clip(np.floor(index.min(0)).astype(int), 0, size - 1)
    upper = np.clip(np.ceil(index.max(0)).astype(int) + 1, lower + 1, size)
    if np.any(upper - lower < 4):
        return image
    return image[int(lower[0]):int(upper[0]), int(lower[1]):int(upper[1]),
                 int(lower[2]):int(upper[2])]


def mask_box(mask: sitk.Image, margin_mm: float) -> Tuple[np.ndarray, np.ndarray]:
    """LPS axis-aligned box of a mask's voxels, grown by ``margin_mm``."""
    index = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[:, ::-1].astype(np.float64)
    if not len(index):
        index = np.array([[0.0, 0.0, 0.0], np.array(mask.GetSize(), dtype=np.float64) - 1])
    matrix = index_to_physical_matrix(mask)
    corners = np.array([[a, b, c] for a in (index[:, 0].min(), index[:, 0].max())
                        for b in (index[:, 1].min(), index[:, 1].max())
                        for c in (index[:, 2].min(), index[:, 2].max())])
    points = corners @ matrix[:3, :3].T + matrix[:3, 3]
    return points.min(0) - margin_mm, points.max(0) + margin_mm


@dataclass
class _Level:
    spacing: float
    fixed: torch.Tensor          # (1, C, D, H, W) fixed intensities or MIND descriptors
    points: torch.Tensor         # (D, H, W, 3) fixed LPS points minus the centre
    moving: torch.Tensor         # (1, C, d, h, w)
    to_grid: torch.Tensor        # (3, 4): LPS point -> moving normalised (x, y, z) = (i, j, k)
    grid_limit: torch.Tensor     # (3,) |normalised| beyond this is outside the moving image
    fixed_statistics: Optional[tuple] = None


def _tensor(image: sitk.Image) -> torch.Tensor:
    return torch.from_numpy(sitk.GetArrayFromImage(image).astype(np.float32))[None, None]


def build_levels(fixed: sitk.Image, moving: sitk.Image, centre: np.ndarray, similarity: str,
                 fixed_box: Tuple[np.ndarray, np.ndarray],
                 levels_mm: Sequence[float]) -> List[_Level]:
    """The pyramid (coarse to fine): each image on its own grid at about each level's spacing
    (:func:`coarser`), intensities normalised per level, the fixed one cropped to its
    foreground's box (where the similarity is measured)."""
    levels = []
    for spacing in levels_mm:
        fixed_level = normalised(cropped_to(coarser(fixed, spacing), *fixed_box))
        moving_level = normalised(coarser(moving, spacing))
        matrix = index_to_physical_matrix(fixed_level)
        shape = fixed_level.GetSize()[::-1]
        k, j, i = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape],
                                 indexing="ij")
        points = torch.stack([i, j, k], -1) @ torch.from_numpy(matrix[:3, :3]).T \
            + torch.from_numpy(matrix[:3, 3] - centre)
        inverse = np.linalg.inv(index_to_physical_matrix(moving_level))[:3]
        fixed_tensor, moving_tensor = _tensor(fixed_level), _tensor(moving_level)
        statistics = None
        if similarity == "mind":
            fixed_tensor, moving_tensor = mind_ssc(fixed_tensor), mind_ssc(moving_tensor)
        else:
            statistics = local_statistics(fixed_tensor, LNCC_WINDOW)
        # LPS point -> grid_sample's normalised (x, y, z) of the moving image, in one matrix
        size = np.array(moving_level.GetSize(), dtype=np.float64)
        scale = 2.0 / np.maximum(size - 1.0, 1.0)
        to_grid = np.c_[scale[:, None] * inverse[:, :3], scale * inverse[:, 3] - 1.0]
        levels.append(_Level(spacing, fixed_tensor, points.float(), moving_tensor,
                             torch.from_numpy(to_grid).float(),
                             torch.from_numpy(1.0 + scale / 2.0).float(), statistics))
    return levels


def _warped_moving(level: _Level, linear: torch.Tensor, offset: torch.Tensor):
    """The moving image at ``linear @ p + offset`` for every fixed point ``p`` (centred), and
    the mask of points that fall inside the moving image (half a voxel past the corner
    centres, as ITK's resampler)."""
    to_grid = level.to_grid[:, :3] @ linear
    grid = level.points @ to_grid.T + (level.to_grid[:, :3] @ offset + level.to_grid[:, 3])
    inside = (grid.abs() <= level.grid_limit).all(-1)
    warped = F.grid_sample(level.moving, grid[None], mode="bilinear", padding_mode="zeros",
                           align_corners=ALIGN_CORNERS)
    return warped, inside[None, None]


def _level_loss(level: _Level, linear: torch.Tensor, offset: torch.Tensor,
                similarity: str) -> torch.Tensor:
    warped, inside = _warped_moving(level, linear, offset)
    if similarity == "mind":
        squared = ((level.fixed - warped) ** 2).mean(1, keepdim=True)
        weight = inside.to(squared.dtype)
        return (squared * weight).sum() / weight.sum().clamp_min(1.0)
    textured = level.fixed_statistics[2]
    return local_ncc_loss(level.fixed, warped, LNCC_WINDOW, mask=textured & inside,
                          fixed_statistics=level.fixed_statistics)


class _Parameters:
    """The transform ``x -> A (x - c) + c + t`` as one scaled parameter vector.

    ``rigid``: a rotation vector and ``t``; ``affine``: ``A - I`` (nine) and ``t``. The linear
    entries are scaled by the image radius, so one unit of every parameter moves a point at that
    radius by about one millimetre and one Adam step size suits them all.
    """

    def __init__(self, kind: str, linear: np.ndarray, translation: np.ndarray, radius: float):
        self.kind, self.radius = kind, float(radius)
        if kind == "rigid":
            rotation = _rotation_vector(linear)
            values = np.concatenate([rotation * self.radius, translation])
        else:
            values = np.concatenate([(linear - np.eye(3)).ravel() * self.radius, translation])
        self.values = torch.tensor(values, dtype=torch.float64).float().requires_grad_(True)

    def transform(self, values: Optional[torch.Tensor] = None):
        values = self.values if values is None else values
        if self.kind == "rigid":
            r = values[:3] / self.radius
            zero = torch.zeros((), dtype=values.dtype)
            skew = torch.stack([torch.stack([zero, -r[2], r[1]]), torch.stack([r[2], zero, -r[0]]),
                                torch.stack([-r[1], r[0], zero])])
            linear = torch.linalg.matrix_exp(skew)
        else:
            linear = torch.eye(3, dtype=values.dtype) + values[:9].view(3, 3) / self.radius
        return linear, values[-3:]

    def numpy(self) -> Tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            linear, translation = self.transform()
        return linear.detach().double().numpy(), translation.detach().double().numpy()


def _rotation_vector(linear: np.ndarray) -> np.ndarray:
    """Axis times angle of the rotation closest to ``linear``."""
    u, _, vt = np.linalg.svd(linear)
    rotation = u @ vt
    if np.linalg.det(rotation) < 0:
        rotation = u @ np.diag([1.0, 1.0, -1.0]) @ vt
    angle = math.acos(float(np.clip((np.trace(rotation) - 1.0) / 2.0, -1.0, 1.0)))
    if angle < 1e-9:
        return np.zeros(3)
    axis = np.array([rotation[2, 1] - rotation[1, 2], rotation[0, 2] - rotation[2, 0],
                     rotation[1, 0] - rotation[0, 1]])
    norm = np.linalg.norm(axis)
    if norm < 1e-9:  # 180 degrees: the axis is the eigenvector of eigenvalue 1
        values, vectors = np.linalg.eigh((rotation + rotation.T) / 2.0)
        return vectors[:, np.argmax(values)] * angle
    return axis / norm * angle


def _optimise(levels: Sequence[_Level], parameters: _Parameters, steps: Sequence[int],
              similarity: str, centre: torch.Tensor, scope: ProgressScope, label: str) -> None:
    """Adam on ``parameters`` over the levels (coarse to fine), the step size decaying within
    each level from ``LEVEL_STEP_MM`` to a twentieth of it (cosine)."""
    total = max(sum(steps), 1)
    done = 0
    for index, (level, count) in enumerate(zip(levels, steps)):
        if count <= 0:
            continue
        step_mm = LEVEL_STEP_MM[min(index, len(LEVEL_STEP_MM) - 1)]
        first = torch.zeros_like(parameters.values)
        second = torch.zeros_like(parameters.values)
        for step in range(count):
            linear, translation = parameters.transform()
            # a centred point p maps to A p + c + t; the level's points are centred already
            loss = _level_loss(level, linear, centre + translation, similarity)
            grad, = torch.autograd.grad(loss, parameters.values)
            with torch.no_grad():
                decay = FINAL_STEP_FRACTION + (1 - FINAL_STEP_FRACTION) * 0.5 * (
                    1 + math.cos(math.pi * step / max(count - 1, 1)))
                first.mul_(0.9).add_(grad, alpha=0.1)
                second.mul_(0.999).addcmul_(grad, grad, value=0.001)
                corrected = (second / (1 - 0.999 ** (step + 1))).sqrt() + 1e-12
                parameters.values -= step_mm * decay * (first / (1 - 0.9 ** (step + 1))) \
                    / corrected
            done += 1
            if step % 10 == 0:
                scope.report(done / total, "global alignment",
                             f"{label} at {level.spacing:g} mm: similarity loss {loss.item():.4f}")


def _check_determinant(matrix: np.ndarray, mode: str) -> None:
    determinant = float(np.linalg.det(matrix[:3, :3]))
    if not MIN_DETERMINANT < determinant < MAX_DETERMINANT:
        raise UserInputError(
            f"the {mode} alignment degenerated (determinant {determinant:.3g}, outside "
            f"{MIN_DETERMINANT:g}..{MAX_DETERMINANT:g}: the images would be squashed or inflated "
            "past any anatomy); check that both images show the same body part, or use "
            "--initial rigid or --initial none")


def _loss_of(levels: Sequence[_Level], matrix: np.ndarray, centre: np.ndarray,
             similarity: str) -> float:
    linear = torch.from_numpy(matrix[:3, :3]).float()
    offset = torch.from_numpy(matrix[:3, :3] @ centre + matrix[:3, 3]).float()
    with torch.no_grad():
        return float(_level_loss(levels[0], linear, offset, similarity))


MULTIMODAL_SIMILARITIES = ("mind", "mi")
# the measures the rigid / affine optimisation (and the moments' choice of axes) can run
MEASURES = ("lncc", "mind")


def _similarity_for(similarity: Optional[str]) -> str:
    """MIND for a multi-modal deformable stage (MIND, mutual information), local NCC for every
    other similarity (one of :data:`MEASURES`)."""
    return "mind" if similarity in MULTIMODAL_SIMILARITIES else "lncc"


def global_alignment(fixed: sitk.Image, moving: sitk.Image, initial: str = "auto",
                     similarity: Optional[str] = "lncc",
                     progress: Optional[ProgressScope] = None) -> GlobalAlignment:
    """Find the global transform ``initial`` asks for (see the module docstring).

    ``fixed`` and ``moving`` are the user's images (any grids); the result's matrix maps a fixed
    LPS point to a moving one. Raises :class:`UserInputError` for an unknown mode, foregrounds
    that do not overlap after moments, or a degenerate affine.
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    scope = progress or ProgressScope()
    if initial not in INITIAL_MODES:
        raise UserInputError(f"unknown --initial '{initial}'; choose one of "
                             f"{', '.join(INITIAL_MODES)}")
    if initial == "none":
        return GlobalAlignment("none", "none", "requested", np.eye(4),
                               time.perf_counter() - started,
                               time.process_time() - cpu_started)
    scope.report(0.0, "global alignment", "centres of mass and principal axes")
    coarse = LEVELS_MM[0]
    fixed_coarse = normalised(coarser(fixed, coarse / 2))
    moving_coarse = normalised(coarser(moving, coarse / 2))
    fixed_mask, moving_mask = foreground_mask(fixed_coarse), foreground_mask(moving_coarse)
    moments = compute_moments(masked(fixed_coarse, fixed_mask), masked(moving_coarse, moving_mask))
    identity_dice, _ = foreground_dice(fixed_mask, moving_mask, np.eye(4))
    facts = (f"centres of mass {moments.shift_mm:.1f} mm apart, principal axes "
             + (f"{moments.rotation_degrees:.1f} deg apart" if moments.axes_defined
                else "undefined") + f", foreground Dice {identity_dice:.2f}")
    used = initial
    reason = "requested"
    if initial == "auto":
        aligned = (moments.shift_mm <= AUTO_SHIFT_MM and identity_dice >= AUTO_MIN_DICE
                   and (not moments.axes_defined
                        or moments.rotation_degrees <= AUTO_ROTATION_DEGREES))
        used = "none" if aligned else "affine"
        reason = (f"auto: {facts}: " + ("already aligned" if aligned else "not aligned")
                  + f" (limits {AUTO_SHIFT_MM:g} mm, {AUTO_ROTATION_DEGREES:g} deg, Dice "
                  f"{AUTO_MIN_DICE:g})")
        if aligned:
            return GlobalAlignment(initial, "none", reason, np.eye(4),
                                   time.perf_counter() - started,
                                   time.process_time() - cpu_started)
    else:
        reason = f"requested; {facts}"

    measure = _similarity_for(similarity)
    fixed_box = mask_box(fixed_mask, FOREGROUND_MARGIN_MM)
    # every level keeps at least MIN_LEVEL_VOXELS across the fixed foreground's box (small
    # images get fewer, finer levels), and none is finer than the fixed image
    extent = float(np.min(fixed_box[1] - fixed_box[0]))
    finest = max(min(FINEST_MM, extent / MIN_LEVEL_VOXELS), min(fixed.GetSpacing()))
    levels_mm = [s for s in LEVELS_MM if finest * 1.001 < s <= extent / MIN_LEVEL_VOXELS] \
        + [finest]
    centre = moments.fixed_centre
    levels = build_levels(fixed, moving, centre, measure, fixed_box, levels_mm)
    # the principal-axes rotation only when it matches the images better than centring alone
    candidates = [moments.matrix(False)] + ([moments.matrix(True)] if moments.axes_defined
                                            and moments.rotation_degrees > 0.5 else [])
    losses = [_loss_of(levels, m, centre, measure) for m in candidates]
    start = candidates[int(np.argmin(losses))]
    axes_used = len(candidates) > 1 and int(np.argmin(losses)) == 1
    overlap_dice, overlap = foreground_dice(fixed_mask, moving_mask, start)
    if overlap < MIN_FOREGROUND_OVERLAP:
        raise UserInputError(
            f"the fixed and moving images do not overlap even after matching their centres of "
            f"mass ({100 * overlap:.1f}% of the smaller foreground overlaps): they do not show "
            "the same anatomy, or one of them is mostly empty; check the files")
    reason += f"; moments start {'with' if axes_used else 'without'} the principal axes"
    if used == "moments":
        matrix = start
    else:
        radius = float(np.linalg.norm(fixed_box[1] - fixed_box[0]) / 2.0)
        start_linear = start[:3, :3]
        start_translation = start[:3, :3] @ centre + start[:3, 3] - centre
        parameters = _Parameters("rigid", start_linear, start_translation, radius)
        centre_tensor = torch.from_numpy(centre).float()
        rigid_steps = RIGID_STEPS[:len(levels)] if used == "rigid" else RIGID_STEPS[:1]
        affine_steps = AFFINE_STEPS[:len(levels)] if used == "affine" else ()
        total = sum(rigid_steps) + sum(affine_steps)
        _optimise(levels, parameters, rigid_steps, measure, centre_tensor,
                  scope.sub(0.05, 0.05 + 0.95 * sum(rigid_steps) / total), "rigid")
        linear, translation = parameters.numpy()
        if used == "affine":
            parameters = _Parameters("affine", linear, translation, radius)
            _optimise(levels, parameters, affine_steps, measure, centre_tensor,
                      scope.sub(0.05 + 0.95 * sum(rigid_steps) / total, 1.0), "affine")
            linear, translation = parameters.numpy()
        matrix = centred_matrix(linear, centre, translation)
        _check_determinant(matrix, used)
    scope.report(1.0, "global alignment", f"{used} done")
    return GlobalAlignment(initial, used, reason, matrix, time.perf_counter() - started,
                           time.process_time() - cpu_started)
