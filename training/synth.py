"""Synthetic training pairs with a known ground truth, from a real volume and its labels.

One pair is built on an isotropic working grid (``spacing_mm``, padded to a multiple of 16):

1. ``template``: the volume normalised to [0, 1] (``images.normalise_intensity``, as at
   inference) and centred on a common canvas (zeros outside); ``labels`` likewise.
2. A *subject* deformation ``s`` (a milder random diffeomorphism) makes the fixed image vary
   from pair to pair: ``fixed_clean = warp(template_f, s)``, ``fixed_labels = warp(labels, s)``.
3. The *generating* field ``w`` -- a random diffeomorphism ``exp(v)`` summed over several scales,
   composed with a random affine ``A`` (rotation, scaling, shear, translation) -- makes the moving
   image from the fixed one:

       moving_clean = warp(moving_source, w)          (exactly: this is how it is computed)
       moving_labels = warp(fixed_labels, w, nearest)

   with ``phi_w = phi_v o phi_A`` (``w = compose(exp(v), affine(A))``, ``phi_u(x) = x + u(x)``).
   ``moving_source`` is ``fixed_clean`` itself, or -- for a multi-modal pair -- the same subject
   in a second contrast, ``warp(label_contrast(template, labels), s)``.
4. The ground truth a registration method should return (the library's convention,
   ``warped(x) = moving(x + u(x))``) is the inverse map,

       displacement = compose(affine(A^-1), exp(-v)),   phi = phi_A^-1 o phi_v^-1 = phi_w^-1

   so ``warp(moving_clean, displacement) ~= moving_source`` (= ``fixed_clean`` for a same-contrast
   pair) up to interpolation and scaling-and-squaring error (a few hundredths of a voxel).
5. Intensity augmentation, drawn independently for each image: gamma, a smooth multiplicative
   bias field, Gaussian blur and noise (``fixed = augment(fixed_clean)``,
   ``moving = augment(moving_clean)``).

Everything is deterministic per ``(seed, stream, index)``: item ``index`` of a generator is the
same whatever was drawn before it (resuming a training run replays the exact data), and the
geometry, the contrast and each image's augmentation use separate random streams, so switching
the contrast on or off changes the moving image's intensities only -- never the labels, the fields
or the fixed image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from DeepRegistrationLib.images import normalise_intensity
from DeepRegistrationLib.spatial import (affine_displacement, compose, gaussian_smooth,
                                         integrate_velocity, resize_displacement, warp)
from DeepRegistrationLib.synthetic import random_velocity

from .data import Volume, load_source

TRAIN, VALIDATION = 0, 1           # random streams: training items never equal validation items
VALIDATION_SEED = 20240601         # validation cases do not depend on the training seed


@dataclass
class SynthConfig:
    """How strong the random deformations, affines and intensity changes are (mm, degrees)."""
    spacing_mm: float = 4.0
    multiple: int = 16
    # (control-point spacing mm, largest velocity component mm) per scale, coarse to fine
    velocity_scales: Tuple[Tuple[float, float], ...] = ((64.0, 8.0), (32.0, 4.0), (16.0, 2.0))
    magnitude_range: Tuple[float, float] = (0.2, 1.0)  # per-pair factor on every scale
    subject_fraction: float = 0.5      # fixed-image deformation relative to the generating one
    rotation_degrees: float = 8.0
    scaling: float = 0.06
    shear: float = 0.03
    translation_mm: float = 6.0
    affine_probability: float = 0.8
    gamma_std: float = 0.25            # log-gamma standard deviation
    bias_amplitude: float = 0.25       # largest |log| of the multiplicative bias field
    blur_max_voxels: float = 0.8
    noise_max: float = 0.03
    augment_probability: float = 0.9
    contrast_probability: float = 0.3  # moving image in a label-driven second contrast
    mix_range: Tuple[float, float] = (0.2, 0.6)  # share of a remapped original in that contrast
    # --- what the generalising recipe (``training.recipes``) switches on; off by default, so
    # the evaluation's cases and older runs stay exactly as they were ---
    canonical: bool = False            # sources in DICOMOrient "LPS" order, as the engine feeds
    #                                    networks (``DeepRegistrationLib.canonical``)
    independent_scales: bool = False   # each velocity scale its own random strength
    # a "new subject" per pair: its own multi-scale deformation (instead of subject_fraction x
    # the generating one), strength factor drawn from subject_magnitude_range
    subject_scales: Optional[Tuple[Tuple[float, float], ...]] = None
    subject_magnitude_range: Tuple[float, float] = (0.3, 1.0)
    synthesis_probability: float = 0.0  # both images repainted in one label-driven contrast
    framing_shift_mm: float = 0.0      # anatomy off-centre on the canvas by up to this much
    partial_coverage_probability: float = 0.0  # per image: a slab at one side cut to zero
    partial_coverage_max: float = 0.2  # largest share of an axis cut
    # share of "still" pairs: no deformation and no affine, only each image's own acquisition
    # effects -- so a network learns to return nothing where nothing moved (drawn last, and only
    # when non-zero, so every other pair stays what it was)
    still_probability: float = 0.0
    thick_slice_probability: float = 0.0  # per image: one axis blurred and resampled thick
    thick_slice_factor: Tuple[float, float] = (2.0, 5.0)
    sharpen_probability: float = 0.0   # per image: unsharp masking (single-subject sharpness)
    sharpen_max: float = 1.0
    crop_shape: Optional[Tuple[int, int, int]] = None  # train on random windows of the canvas
    crop_margin: int = 8               # voxels generated around a window, then cut away

    def scaled(self, magnitude: float) -> "SynthConfig":
        """A copy whose deformations use exactly ``magnitude`` x the velocity scales and at most
        ``magnitude`` x the affine ranges (always with an affine part)."""
        return replace(self, magnitude_range=(magnitude, magnitude),
                       rotation_degrees=self.rotation_degrees * magnitude,
                       scaling=self.scaling * magnitude, shear=self.shear * magnitude,
                       translation_mm=self.translation_mm * magnitude, affine_probability=1.0)


@dataclass
class Pair:
    """One synthetic pair; tensors are ``(1, C, D, H, W)`` on the working grid."""
    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_labels: torch.Tensor         # int64
    moving_labels: torch.Tensor        # int64
    displacement: torch.Tensor         # ground truth: warp(moving_clean, u) ~= moving_source
    generating: torch.Tensor           # moving_clean = warp(moving_source, generating), exactly
    fixed_clean: torch.Tensor
    moving_clean: torch.Tensor
    moving_source: torch.Tensor
    source: str
    multimodal: bool
    info: Dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------- randomness
def seed_for(seed: int, stream: int, index: int, part: int) -> int:
    """A 63-bit seed for item ``index`` of ``stream``; ``part`` separates geometry / intensity."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, stream, int(index), part])
    return int(state.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def generator_for(seed: int, stream: int, index: int, part: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed_for(seed, stream, index, part))


def _uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0, size=()):
    return low + (high - low) * torch.rand(size, generator=generator)


# -------------------------------------------------------------------------------- deformations
def random_affine(generator: torch.Generator, config: SynthConfig) -> torch.Tensor:
    """A random ``(1, 3, 4)`` matrix ``[A | b]`` on centred voxel coordinates (k, j, i) of an
    isotropic grid: rotation about three axes, anisotropic scaling, shear, translation."""
    angles = _uniform(generator, -1, 1, (3,)) * math.radians(config.rotation_degrees)
    rotation = torch.eye(3, dtype=torch.float64)
    for axis in range(3):
        c, s = math.cos(float(angles[axis])), math.sin(float(angles[axis]))
        a, b = [n for n in range(3) if n != axis]
        r = torch.eye(3, dtype=torch.float64)
        r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
        rotation = r @ rotation
    scales = torch.diag(1.0 + _uniform(generator, -1, 1, (3,)).double() * config.scaling)
    shear = torch.eye(3, dtype=torch.float64) + torch.triu(
        _uniform(generator, -1, 1, (3, 3)).double() * config.shear, diagonal=1)
    translation = _uniform(generator, -1, 1, (3,)).double() * (
        config.translation_mm / config.spacing_mm)
    matrix = torch.cat([rotation @ shear @ scales, translation[:, None]], dim=1)
    return matrix[None].float()


def invert_affine(matrix: torch.Tensor) -> torch.Tensor:
    """``[A | b]`` -> ``[A^-1 | -A^-1 b]`` (both on centred coordinates)."""
    linear = torch.linalg.inv(matrix[:, :, :3].double())
    return torch.cat([linear, -linear @ matrix[:, :, 3:].double()], dim=2).float()


def multiscale_velocity(shape: Sequence[int], generator: torch.Generator, config: SynthConfig,
                        factor: float) -> torch.Tensor:
    """Sum of smooth random velocities at the configured scales, in working voxels."""
    return scales_velocity(shape, generator, config, config.velocity_scales, factor)


def scales_velocity(shape: Sequence[int], generator: torch.Generator, config: SynthConfig,
                    scales: Sequence[Tuple[float, float]], factor: float) -> torch.Tensor:
    """Sum over ``scales`` ((control spacing mm, largest component mm), ...) of smooth random
    velocities in working voxels, each scaled by ``factor`` -- and, with
    ``config.independent_scales``, by its own uniform [0, 1] draw, so one pair may be all fine
    detail and the next one large and smooth."""
    velocity = torch.zeros((1, 3, *shape))
    for control_mm, magnitude_mm in scales:
        own = float(_uniform(generator)) if config.independent_scales else 1.0
        velocity = velocity + random_velocity(shape, max(control_mm / config.spacing_mm, 1.0),
                                              own * factor * magnitude_mm / config.spacing_mm,
                                              generator)
    return velocity


def deformable_statistics(displacement: torch.Tensor, labels: torch.Tensor,
                          spacing_mm: float) -> Dict[str, float]:
    """Mean and largest length (mm) of a voxel displacement inside the labels (0 without any)."""
    inside = labels[0, 0] > 0
    if not bool(inside.any()):
        return {"deformable_mean_mm": 0.0, "deformable_max_mm": 0.0}
    length = displacement[0].norm(dim=0)[inside] * spacing_mm
    return {"deformable_mean_mm": float(length.mean()), "deformable_max_mm": float(length.max())}


def exponential(velocity: torch.Tensor) -> torch.Tensor:
    """``exp(v)`` by scaling and squaring on a half-resolution grid, upsampled: the velocities
    are smooth over 4+ voxels, so this loses nothing measurable and costs an eighth."""
    shape = tuple(velocity.shape[2:])
    half = tuple(max((n - 1) // 2 + 1, 4) for n in shape)
    return resize_displacement(integrate_velocity(resize_displacement(velocity, half)), shape)


# ---------------------------------------------------------------------------------- intensities
def normalise01(image: torch.Tensor, upper: float = 0.995) -> torch.Tensor:
    """Clamp at 0 and divide by the ``upper`` quantile (of a sample of voxels), clamp to [0, 1]."""
    image = image.clamp_min(0.0)
    flat = image.flatten()
    if flat.numel() > 50_000:
        flat = flat[:: flat.numel() // 50_000 + 1]
    top = torch.quantile(flat, upper).clamp_min(1e-6)
    return (image / top).clamp(0.0, 1.0)


def smooth_random_field(shape: Sequence[int], generator: torch.Generator,
                        points: int = 4) -> torch.Tensor:
    """A smooth ``(1, 1, D, H, W)`` field in [-1, 1] from noise on a ``points``^3 control grid."""
    noise = torch.randn((1, 1, points, points, points), generator=generator)
    field = F.interpolate(noise, size=tuple(shape), mode="trilinear", align_corners=True)
    return field / field.abs().max().clamp_min(1e-6)


def augment_intensity(image: torch.Tensor, generator: torch.Generator,
                      config: SynthConfig) -> torch.Tensor:
    """Gamma, multiplicative bias field, blur and noise on a [0, 1] image; result in [0, 1]."""
    if float(_uniform(generator)) >= config.augment_probability:
        return image.clone()
    shape = image.shape[2:]
    gamma = math.exp(float(torch.randn((), generator=generator)) * config.gamma_std)
    out = image.clamp_min(0.0) ** gamma
    bias = smooth_random_field(shape, generator) * float(_uniform(generator)) \
        * config.bias_amplitude
    out = out * torch.exp(bias)
    sigma = float(_uniform(generator)) * config.blur_max_voxels
    if sigma > 0.2:
        out = gaussian_smooth(out, sigma)
    noise = float(_uniform(generator)) * config.noise_max
    out = out + noise * torch.randn(out.shape, generator=generator)
    out = acquisition_effects(out, generator, config)
    return normalise01(out)


def acquisition_effects(image: torch.Tensor, generator: torch.Generator,
                        config: SynthConfig) -> torch.Tensor:
    """What differs between scanners and protocols beyond gamma, bias and noise, each drawn with
    its probability (none of them draws anything when its probability is 0):

    - sharpness: unsharp masking (a sharp single-subject scan, not the blurry template look);
    - thick slices: one axis averaged over 2-5 voxels and resampled back (1x1x5 mm acquisitions);
    - partial coverage: a slab at one side of one axis set to zero (a field of view that stops
      short of the anatomy the other image shows).
    """
    out = image
    if config.sharpen_probability and float(_uniform(generator)) < config.sharpen_probability:
        amount = float(_uniform(generator)) * config.sharpen_max
        out = out + amount * (out - gaussian_smooth(out, 1.0))
    if config.thick_slice_probability and \
            float(_uniform(generator)) < config.thick_slice_probability:
        axis = int(torch.randint(3, (), generator=generator))
        factor = float(_uniform(generator, *config.thick_slice_factor))
        shape = list(out.shape[2:])
        thick = list(shape)
        thick[axis] = max(int(round(shape[axis] / factor)), 2)
        sigmas = [0.0, 0.0, 0.0]
        sigmas[axis] = 0.5 * factor
        out = gaussian_smooth(out, sigmas)
        out = F.interpolate(F.interpolate(out, size=thick, mode="trilinear", align_corners=True),
                            size=shape, mode="trilinear", align_corners=True)
    if config.partial_coverage_probability and \
            float(_uniform(generator)) < config.partial_coverage_probability:
        axis = int(torch.randint(3, (), generator=generator))
        n = out.shape[2 + axis]
        cut = int(round(float(_uniform(generator)) * config.partial_coverage_max * n))
        if cut:
            out = out.clone()
            start = 0 if float(_uniform(generator)) < 0.5 else n - cut
            out.narrow(2 + axis, start, cut).zero_()
    return out


def random_lookup(image: torch.Tensor, generator: torch.Generator, points: int = 5):
    """A random, generally non-monotone piecewise-linear intensity map of a [0, 1] image."""
    values = torch.rand((points,), generator=generator)
    position = image.clamp(0.0, 1.0) * (points - 1)
    lower = position.floor().long().clamp(max=points - 2)
    weight = position - lower
    return values[lower] * (1 - weight) + values[lower + 1] * weight


def label_contrast(image: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                   config: SynthConfig) -> torch.Tensor:
    """The same anatomy in a random second contrast, driven by the labels (SynthMorph-style).

    Every label -- plus "air", the unlabelled voxels darker than 0.1 -- gets a random mean in
    [0, 1] (air: [0, 0.15]) and a random standard deviation (up to 0.1) of a texture smoothed over
    one voxel; that is mixed with a random non-monotone remapping of the original intensities
    (weight drawn from ``mix_range``) so structure inside a label survives. Labels are unchanged.
    """
    labels = labels.long()
    air = (labels == 0) & (image < 0.1)
    region = torch.where(air, torch.full_like(labels, -1), labels)
    synthetic = torch.zeros_like(image)
    texture = gaussian_smooth(torch.randn(image.shape, generator=generator), 1.0)
    texture = texture / texture.std().clamp_min(1e-6)
    for value in torch.unique(region).tolist():
        mean = float(_uniform(generator, 0.0, 0.15)) if value == -1 else float(_uniform(generator))
        std = float(_uniform(generator, 0.0, 0.1))
        inside = region == value
        synthetic = torch.where(inside, mean + std * texture, synthetic)
    synthetic = gaussian_smooth(synthetic, 0.5)
    mix = float(_uniform(generator, *config.mix_range))
    remapped = random_lookup(image, generator)
    return normalise01(mix * remapped + (1.0 - mix) * synthetic)


# ---------------------------------------------------------------------------------- the canvas
def random_window(image: torch.Tensor, labels: torch.Tensor, crop: Sequence[int], margin: int,
                  generator: torch.Generator):
    """A window of ``crop + 2 * margin`` voxels per axis around a random foreground voxel (the
    labels, or the image above 0.05 where there are none), clamped to the canvas. The pair is made
    on the window and the margin cut away afterwards, so anatomy the deformation pulls in from
    outside the crop is real anatomy, not padding. Returns ``(image, labels, start)``."""
    size = [int(c) + 2 * int(margin) for c in crop]
    shape = image.shape[2:]
    if any(w > n for w, n in zip(size, shape)):
        raise ValueError(f"crop {tuple(crop)} with margin {margin} does not fit the canvas "
                         f"{tuple(shape)}")
    foreground = (labels[0, 0] > 0) if bool((labels > 0).any()) else (image[0, 0] > 0.05)
    points = foreground.nonzero()
    if len(points):
        centre = points[int(torch.randint(len(points), (), generator=generator))].tolist()
    else:
        centre = [n // 2 for n in shape]
    start = [min(max(c - w // 2, 0), n - w) for c, w, n in zip(centre, size, shape)]
    region = (slice(None), slice(None)) + tuple(slice(s, s + w) for s, w in zip(start, size))
    return image[region], labels[region], start


def canvas_shape(shapes: Sequence[Sequence[int]], multiple: int) -> Tuple[int, int, int]:
    """The smallest shape that holds every volume, each side a multiple of ``multiple``."""
    return tuple(int(math.ceil(max(s[axis] for s in shapes) / multiple) * multiple)
                 for axis in range(3))


def centre_on_canvas(array: torch.Tensor, canvas: Sequence[int]) -> Tuple[torch.Tensor, List[int]]:
    """Pad (zeros) or crop ``(1, C, D, H, W)`` symmetrically to ``canvas``; returns the tensor and
    the index of its first voxel in the original grid per axis (negative when padded)."""
    starts = []
    for axis, size in enumerate(canvas):
        n = array.shape[2 + axis]
        start = (n - size) // 2
        starts.append(start)
        if start > 0:  # crop
            array = array.narrow(2 + axis, start, size)
        elif start < 0:
            pad = [0, 0] * 3
            before = -start
            pad[2 * (2 - axis)] = before
            pad[2 * (2 - axis) + 1] = size - n - before
            array = F.pad(array, pad)
    return array, starts


@dataclass
class PreparedVolume:
    volume: Volume
    image: torch.Tensor       # (1, 1, D, H, W) on the canvas, [0, 1]
    labels: torch.Tensor      # (1, 1, D, H, W) int64
    starts: List[int]         # canvas voxel 0 in the volume's working-grid index (k, j, i)
    reference: sitk.Image     # the volume on its working grid (geometry for canvas images)

    def canvas_image(self, array: np.ndarray, is_vector: bool = False) -> sitk.Image:
        """A (k, j, i[, c]) canvas array as a SimpleITK image with the right physical geometry."""
        ref = self.reference
        image = sitk.GetImageFromArray(array, isVector=is_vector)
        image.SetSpacing(ref.GetSpacing())
        image.SetDirection(ref.GetDirection())
        image.SetOrigin(ref.TransformContinuousIndexToPhysicalPoint(
            [float(s) for s in self.starts[::-1]]))
        return image


def prepare_volume(volume: Volume, spacing_mm: Optional[float],
                   canvas: Optional[Sequence[int]] = None) -> PreparedVolume:
    """Resample ``volume`` to ``spacing_mm`` (None keeps its grid), normalise, centre on canvas."""
    working = volume.resampled(spacing_mm) if spacing_mm else volume
    array = normalise_intensity(sitk.GetArrayFromImage(working.image).astype(np.float32))
    image = torch.from_numpy(array)[None, None]
    labels = torch.from_numpy(sitk.GetArrayFromImage(working.labels).astype(np.int64))[None, None]
    canvas = tuple(canvas) if canvas is not None else tuple(image.shape[2:])
    image, starts = centre_on_canvas(image, canvas)
    labels, _ = centre_on_canvas(labels, canvas)
    return PreparedVolume(working, image, labels, starts, working.image)


# -------------------------------------------------------------------------------- the generator
class PairGenerator:
    """Synthetic pairs from one or more sources on a common canvas.

    ``sources`` are names from ``training.data.SOURCES`` (or image paths) or :class:`Volume`
    objects. ``canvas`` defaults to the smallest multiple-of-``config.multiple`` shape holding
    every volume at ``config.spacing_mm``; ``canvas=False`` keeps each volume's own grid (pairs
    of different sources then differ in shape; used by the evaluation).
    """

    def __init__(self, sources: Sequence[Union[str, Volume]], config: Optional[SynthConfig] = None,
                 seed: int = 0, canvas=None):
        self.config = config or SynthConfig()
        self.seed = int(seed)
        volumes = [load_source(s) if isinstance(s, str) else s for s in sources]
        if not volumes:
            raise ValueError("no training sources given")
        if self.config.canonical:
            volumes = [v.oriented() for v in volumes]
        working = [v.resampled(self.config.spacing_mm) for v in volumes]
        if canvas is False:
            self.canvas = None
        elif canvas is None:
            shapes = [sitk.GetArrayViewFromImage(v.image).shape for v in working]
            if self.config.crop_shape:
                # a window with its margin must fit even on a volume smaller than it (a method
                # whose sides need only be even does not round the canvas up to one)
                shapes.append([int(c) + 2 * self.config.crop_margin for c in self.config.crop_shape])
            self.canvas = canvas_shape(shapes, self.config.multiple)
        else:
            self.canvas = tuple(int(n) for n in canvas)
        self.volumes = [prepare_volume(v, None, self.canvas) for v in working]
        self.names = [v.name for v in volumes]

    def describe(self) -> Dict:
        return {"sources": [p.volume.describe() for p in self.volumes],
                "canvas": list(self.canvas) if self.canvas else None,
                "spacing_mm": self.config.spacing_mm, "seed": self.seed,
                "synth_config": {k: (list(v) if isinstance(v, tuple) else v)
                                 for k, v in self.config.__dict__.items()}}

    # one pair -------------------------------------------------------------------------------
    def pair(self, index: int, stream: int = TRAIN, seed: Optional[int] = None,
             contrast: Optional[bool] = None, source: Optional[int] = None,
             config: Optional[SynthConfig] = None) -> Pair:
        """Item ``index`` of ``stream``. ``contrast`` / ``source`` / ``config`` override the
        random choice of a second contrast, of the source volume and of the strength."""
        config = config or self.config
        seed = self.seed if seed is None else int(seed)
        geometry = generator_for(seed, stream, index, 0)
        intensity = generator_for(seed, stream, index, 1)  # contrast choice and contrast
        fixed_noise = generator_for(seed, stream, index, 2)
        moving_noise = generator_for(seed, stream, index, 3)
        choice = int(torch.randint(len(self.volumes), (), generator=geometry))
        prepared = self.volumes[choice if source is None else source]
        template, template_labels, window = prepared.image, prepared.labels, None
        if config.crop_shape:
            template, template_labels, window = random_window(
                template, template_labels, config.crop_shape, config.crop_margin, geometry)
        shape = tuple(template.shape[2:])
        factor = float(_uniform(geometry, *config.magnitude_range))

        # geometry (its own random stream)
        if config.subject_scales:  # a new "subject": its own deformation, independent strength
            subject_factor = float(_uniform(geometry, *config.subject_magnitude_range))
            subject = exponential(scales_velocity(shape, geometry, config, config.subject_scales,
                                                  subject_factor))
        else:
            subject = exponential(multiscale_velocity(shape, geometry, config,
                                                      factor * config.subject_fraction))
        if config.framing_shift_mm:  # the anatomy off-centre on the canvas (both images)
            shift = _uniform(geometry, -1, 1, (3,)) * (config.framing_shift_mm / config.spacing_mm)
            subject = compose(subject, shift.view(1, 3, 1, 1, 1).expand(1, 3, *shape).clone())
        velocity = multiscale_velocity(shape, geometry, config, factor)
        use_affine = float(_uniform(geometry)) < config.affine_probability
        matrix = random_affine(geometry, config) if use_affine else \
            torch.cat([torch.eye(3), torch.zeros(3, 1)], dim=1)[None]
        if config.still_probability and float(_uniform(geometry)) < config.still_probability:
            velocity = torch.zeros_like(velocity)
            matrix = torch.cat([torch.eye(3), torch.zeros(3, 1)], dim=1)[None]
        deformation = exponential(velocity)
        generating = compose(deformation, affine_displacement(matrix, shape))
        deformable = exponential(-velocity)  # the ground truth without its affine part
        displacement = compose(affine_displacement(invert_affine(matrix), shape), deformable)

        # intensities (a second random stream)
        multimodal = float(_uniform(intensity)) < config.contrast_probability \
            if contrast is None else bool(contrast)
        with torch.no_grad():
            fixed_labels = warp(template_labels.float(), subject, mode="nearest",
                                padding_mode="zeros")
            moving_labels = warp(fixed_labels, generating, mode="nearest", padding_mode="zeros")
            second = label_contrast(template, template_labels, intensity, config) \
                if multimodal else None
            # SynthMorph-like: both images repainted in one random label-driven contrast, so
            # a same-contrast similarity still applies but the network cannot learn one look
            if config.synthesis_probability and \
                    float(_uniform(intensity)) < config.synthesis_probability:
                template = label_contrast(template, template_labels, intensity, config)
            fixed_clean = warp(template, subject, padding_mode="zeros")
            if multimodal:
                moving_source = warp(second, subject, padding_mode="zeros")
            else:
                moving_source = fixed_clean
            moving_clean = warp(moving_source, generating, padding_mode="zeros")
            fixed = augment_intensity(fixed_clean, fixed_noise, config)
            moving = augment_intensity(moving_clean, moving_noise, config)
        tensors = [fixed, moving, fixed_labels.long(), moving_labels.long(), displacement,
                   generating, fixed_clean, moving_clean, moving_source, deformable]
        if window is not None:  # cut the margin away: content moved in from outside is real
            inner = (slice(None), slice(None)) + tuple(
                slice(config.crop_margin, config.crop_margin + n) for n in config.crop_shape)
            tensors = [t[inner].contiguous() for t in tensors]
        deformable = tensors.pop()
        info = {"index": int(index), "stream": int(stream), "factor": factor,
                "affine": matrix[0].tolist(), "source": prepared.volume.name,
                "max_gt_displacement_mm": float(tensors[4].abs().max()) * config.spacing_mm,
                # the non-affine part of the truth inside the anatomy: what a deformable
                # network must learn beyond the pose (recipes are calibrated on it)
                **deformable_statistics(deformable, tensors[2], config.spacing_mm)}
        if window is not None:
            info["window_start"] = window
        return Pair(*tensors, prepared.volume.name, multimodal, info)

    def prepared_for(self, pair: Pair) -> PreparedVolume:
        return self.volumes[self.names.index(pair.source)] if pair.source in self.names \
            else self.volumes[0]

    # batches --------------------------------------------------------------------------------
    def batch(self, indices: Sequence[int], stream: int = TRAIN) -> Dict:
        """Stack the pairs ``indices`` into ``(B, C, D, H, W)`` tensors (needs a common canvas)."""
        pairs = [self.pair(i, stream) for i in indices]
        keys = ("fixed", "moving", "fixed_labels", "moving_labels", "displacement", "generating",
                "fixed_clean", "moving_clean")
        out = {key: torch.cat([getattr(p, key) for p in pairs], dim=0) for key in keys}
        out["source"] = [p.source for p in pairs]
        out["multimodal"] = [p.multimodal for p in pairs]
        out["index"] = list(indices)
        return out

    def batch_number(self, number: int, batch_size: int = 1,
                     cycle: Optional[int] = None) -> Dict:
        """Training batch ``number``: items ``n*B .. n*B+B-1``, so a resumed run sees exactly the
        data an uninterrupted one would have. With ``cycle`` the item indices repeat modulo
        ``cycle`` (overfitting a few pairs)."""
        indices = range(number * batch_size, (number + 1) * batch_size)
        return self.batch([i % cycle for i in indices] if cycle else list(indices))

    def batches(self, batch_size: int = 1, start: int = 0,
                cycle: Optional[int] = None) -> Iterator[Dict]:
        """Endless training batches from batch ``start`` on (:meth:`batch_number`)."""
        number = int(start)
        while True:
            yield self.batch_number(number, batch_size, cycle)
            number += 1

    def validation_pairs(self, count: int = 6, affine: bool = True) -> List[Pair]:
        """Fixed held-out cases: the validation stream with its own seed (the same cases for
        every training seed), sources in turn, deformation strength rising from 30% to 100%,
        every third case multi-modal; on windows of ``crop_shape`` when the generator trains on
        windows (a whole 2 mm canvas costs minutes per validation on a CPU). ``affine=False``:
        the same cases without their residual affine, so the ground truth is the deformation
        alone (with it, the pose dominates the error and hides what the deformable part does)."""
        pairs = []
        for n in range(count):
            strength = 0.3 + 0.7 * n / max(count - 1, 1)
            config = self.config.scaled(strength)
            if not affine:
                config = replace(config, affine_probability=0.0)
            pairs.append(self.pair(n, VALIDATION, seed=VALIDATION_SEED,
                                   contrast=(n % 3 == 2), source=n % len(self.volumes),
                                   config=config))
        return pairs
