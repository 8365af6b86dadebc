"""MMLN: a three-level diffeomorphic pyramid trained with 2-D/3-D mutual learning and a second
registration of the core region.

Zheng, Cao, Duan, Cao, Lian, "Multi-strategy mutual learning network for deformable medical image
registration", Neurocomputing 501, 2022, pp. 102-112. No public code; the pyramid is LapIRN's
(Mok and Chung, "Large deformation diffeomorphic image registration with Laplacian pyramid
networks", MICCAI 2020), whose public code (github.com/cwmok/LapIRN, the stationary-velocity
``_diff`` models) fixes what the MMLN paper leaves to "the original LapIRN".

The method (docs/methods/mmln.md has the equations, the deviations and what is not done):

- *Pyramid.* Three levels on grids of 1/4, 1/2 and 1 of the working grid (``F_i``, ``M_i`` the
  pair resampled there). Level 1 sees ``[M_1, F_1]``; level ``i > 1`` sees
  ``[M_i o up(phi_{i-1}), F_i, up(v_{i-1})]``. Each level predicts a velocity increment
  ``delta_i``; ``v_i = delta_i + up(v_{i-1})`` and ``phi_i = exp(v_i)`` by scaling and squaring
  (``spatial.integrate_velocity``, 7 steps). ``up`` resizes a field to the next grid with its
  vectors rescaled (``spatial.resize_displacement``).
- *Level network* (LapIRN's): an encoder of two 3x3x3 convolutions (LeakyReLU 0.2 between), a
  stride-2 convolution, five pre-activation residual blocks each followed by LeakyReLU, a 2x2x2
  transposed convolution back to the level's grid, and a head of two 3x3x3 convolutions on the
  concatenated [upsampled, encoder] features ending in softsign: the increment is bounded.
  *Feature embedding*: the previous level's last feature map (after its transposed convolution it
  lives on the previous level's grid, which is this level's half-resolution grid) is added to this
  level's features after the stride-2 convolution.
- *Progressive training* (LapIRN): level 1 alone, then levels 1-2 (loss at level 2), then all three
  (loss at level 3); in each later phase the earlier levels are frozen for its first steps.
- *Loss* at level ``p`` of ``L = 3``: ``1 - CorrCoef(F_p, M_p o phi_p)`` (global Pearson, as the
  paper; not LapIRN's local NCC) ``+ k / 2^(L-p) ||grad v_p||^2``, plus ``alpha`` (level 1) or
  ``beta`` (level 2) times the similarity of the 2-D branch's field and ``theta`` (level 3) times
  the similarity of the core branch.
- *2-D branch* (mutual learning, levels 1-2, training only): the same level network with 2-D
  convolutions, run on the volume's slices along D. Its in-plane increments are stacked into a
  3-D field whose through-plane component is exactly zero (:func:`stack_in_plane`).
- *Core branch* (level 3, training only): a second registration of the centred core region (half
  of each side, even offsets: :func:`core_region`), warping the *full* moving image at the core's
  coordinates (:func:`warp_core`) -- a crop warped on its own would take its border values for
  everything outside and reward matching them.

The decision that makes the branches matter (docs/methods/mmln.md): branches that are separate
networks whose outputs enter only their own loss terms make the loss separable, and then alpha,
beta and theta cannot change the deployed 3-D network at all. Here they are coupled
(``coupling="coupled"``): the 2-D branch *refines the same level's 3-D velocity*,
``phi'_i = exp(v_i + [0, delta_2D])``, and the core pass *reuses the level-3 network's weights*
on the core crop, with the pyramid's level-3 inputs. ``coupling="uncoupled"`` is the negative
control: the same computations with the gradient path into the 3-D pyramid cut (its quantities
detached) and, for the core, a separate copy of the level-3 network.

Variants (each its own checkpoint): ``L`` (the pyramid alone), ``LC`` (+ core branch), ``LCD``
(+ core + 2-D branch = MMLN, the default); ``-uncoupled`` adds the negative control. Inference
runs the 3-D pyramid only: ``forward`` never touches a branch.
"""
from __future__ import annotations

import copy
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserInputError
from ..losses import correlation_coefficient_loss, total_variation_loss
from ..spatial import integrate_velocity, resize_displacement, resize_image, warp
from .base import (MethodSpec, RegistrationInputs, checkpoint_folders, find_checkpoint,
                   load_network, register_method, report_field, run_network, same_contrast,
                   scored_pair)
from .blocks import NEGATIVE_SLOPE, variance_preserving_

PAPER = ("Zheng, Cao, Duan, Cao, Lian, Multi-strategy mutual learning network for deformable "
         "medical image registration, Neurocomputing 2022")
LEVELS = 3
BRANCHES = ("L", "LC", "LCD")
COUPLINGS = ("coupled", "uncoupled")
VARIANTS = ("LCD", "LC", "L", "LCD-uncoupled", "LC-uncoupled")
# the paper's weights of the branch similarities (issue #11): 2-D branch at levels 1 and 2, core
ALPHA, BETA, THETA = 0.25, 0.5, 0.25
# LapIRN's schedule: 30k / 30k / 60k iterations for levels 1 / 2 / 3, the earlier levels frozen
# for the first 2000 steps of each later phase (2000 / 120000 of the run)
PHASES = (0.25, 0.25, 0.5)
FREEZE_FRACTION = 2000.0 / 120000.0
DEFAULT_CONFIG = {"variant": "LCD", "coupling": "coupled", "width": 12, "residual_blocks": 5,
                  "velocity_bound": 16.0, "integration_steps": 7, "smoothness": 1.0,
                  "alpha": ALPHA, "beta": BETA, "theta": THETA, "phases": list(PHASES),
                  "freeze_fraction": FREEZE_FRACTION}


def parse_variant(name: str) -> Tuple[str, str]:
    """``"LCD-uncoupled"`` -> ``("LCD", "uncoupled")``; ``"LC"`` -> ``("LC", "coupled")``."""
    if name not in VARIANTS:
        raise UserInputError(f"MMLN variant '{name}' is not one of {', '.join(VARIANTS)}")
    branches, _, coupling = name.partition("-")
    return branches, coupling or "coupled"


def variant_name(branches: str, coupling: str) -> str:
    return branches if coupling == "coupled" else f"{branches}-{coupling}"


# ---------------------------------------------------------------------------------- blocks
def convolution(dims: int, in_channels: int, out_channels: int, stride: int = 1) -> nn.Module:
    """3x3(x3) convolution without bias (LapIRN's ``bias_opt=False``), He-initialised."""
    layer = (nn.Conv3d if dims == 3 else nn.Conv2d)(in_channels, out_channels, 3, stride, 1,
                                                    bias=False)
    return variance_preserving_(layer)


class PreActivationBlock(nn.Module):
    """``x + conv(lrelu(conv(lrelu(x))))`` (LapIRN's ``PreActBlock``, no normalisation).

    The second convolution starts at zero, so each block starts as the identity: without a
    normalisation layer, five He-initialised residual sums would multiply the feature variance by
    about 2^5, and LapIRN's own initialisation (torch's default) shrinks it instead.
    """

    def __init__(self, dims: int, channels: int):
        super().__init__()
        self.first = convolution(dims, channels, channels)
        self.second = convolution(dims, channels, channels)
        nn.init.zeros_(self.second.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.first(F.leaky_relu(x, NEGATIVE_SLOPE))
        return x + self.second(F.leaky_relu(residual, NEGATIVE_SLOPE))


class LevelNetwork(nn.Module):
    """One pyramid level: ``(inputs, embedding) -> (velocity increment in voxels, features)``.

    ``dims`` 3 for the pyramid, 2 for the 2-D branch (``out_channels`` 3 or 2). The increment is
    ``bound * softsign(head)`` voxels of the level's grid per component; the head's last
    convolution starts at zero, so a fresh level predicts no motion. ``features`` (on the input
    grid) is the embedding the next level adds after its stride-2 convolution. Input sides must be
    even.
    """

    def __init__(self, dims: int, in_channels: int, out_channels: int, width: int = 12,
                 residual_blocks: int = 5, bound: float = 16.0):
        super().__init__()
        self.dims = dims
        self.bound = float(bound)
        transposed = nn.ConvTranspose3d if dims == 3 else nn.ConvTranspose2d
        self.encoder = nn.Sequential(convolution(dims, in_channels, width),
                                     nn.LeakyReLU(NEGATIVE_SLOPE),
                                     convolution(dims, width, width))
        self.down = convolution(dims, width, width, stride=2)
        blocks: List[nn.Module] = []
        for _ in range(int(residual_blocks)):
            blocks += [PreActivationBlock(dims, width), nn.LeakyReLU(NEGATIVE_SLOPE)]
        self.residual = nn.Sequential(*blocks)
        self.up = variance_preserving_(transposed(width, width, 2, 2, bias=False))
        last = (nn.Conv3d if dims == 3 else nn.Conv2d)(width, out_channels, 3, 1, 1, bias=False)
        nn.init.zeros_(last.weight)
        self.head = nn.Sequential(convolution(dims, 2 * width, width),
                                  nn.LeakyReLU(NEGATIVE_SLOPE), last, nn.Softsign())

    def forward(self, inputs: torch.Tensor, embedding: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(inputs)
        coarse = self.down(features)
        if embedding is not None:  # LapIRN's feature embedding from the coarser level
            coarse = coarse + embedding
        coarse = self.up(self.residual(coarse))
        increment = self.bound * self.head(torch.cat([coarse, features], dim=1))
        return increment, coarse


# ----------------------------------------------------------------------------- geometry helpers
def level_shapes(shape: Sequence[int], levels: int = LEVELS) -> List[Tuple[int, ...]]:
    """Grids of levels ``1..levels``, coarse to fine, when ``shape`` is the grid of level
    ``levels``: halved per level down (sides must divide by ``2^levels``)."""
    factor = 2 ** levels
    if any(int(n) % factor for n in shape):
        raise ValueError(f"{levels} MMLN levels need grid sides that divide by {factor}, got "
                         f"{tuple(shape)}")
    return [tuple(int(n) // 2 ** (levels - 1 - i) for n in shape) for i in range(levels)]


def halve(image: torch.Tensor, times: int = 1) -> torch.Tensor:
    """The image on the grid of the next coarser level (sides halved), ``times`` times: a
    Gaussian pyramid built level by level (``spatial.resize_image``'s antialiasing), as LapIRN's
    repeated average pooling -- and at a fraction of the cost of smoothing the full-resolution
    image for a four-fold reduction at once."""
    for _ in range(int(times)):
        image = resize_image(image, tuple(int(n) // 2 for n in image.shape[2:]))
    return image


def to_slices(volume: torch.Tensor) -> torch.Tensor:
    """``(B, C, D, H, W)`` -> ``(B*D, C, H, W)``: every slice along D an item of a 2-D batch."""
    batch, channels, depth, height, width = volume.shape
    return volume.permute(0, 2, 1, 3, 4).reshape(batch * depth, channels, height, width)


def stack_in_plane(in_plane: torch.Tensor, depth: int) -> torch.Tensor:
    """``(B*D, 2, H, W)`` in-plane (H, W) fields of the slices -> ``(B, 3, D, H, W)`` with an
    exactly zero through-plane (D) component."""
    items, _, height, width = in_plane.shape
    stacked = in_plane.reshape(items // depth, depth, 2, height, width).permute(0, 2, 1, 3, 4)
    through_plane = stacked.new_zeros((stacked.shape[0], 1, depth, height, width))
    return torch.cat([through_plane, stacked], dim=1)


def core_region(shape: Sequence[int]) -> Tuple[slice, ...]:
    """The centred core: half of each side, at an even offset, with even sides, so that it maps
    exactly onto the half-resolution grid of the level-3 network's embedding."""
    region = []
    for n in shape:
        size = max(2 * (int(n) // 4), 2)
        offset = 2 * ((int(n) - size) // 4)
        region.append(slice(offset, offset + size))
    return tuple(region)


def half_region(region: Sequence[slice]) -> Tuple[slice, ...]:
    """The same region on a grid of half the resolution (offsets and sides are even)."""
    return tuple(slice(r.start // 2, r.stop // 2) for r in region)


def crop(volume: torch.Tensor, region: Sequence[slice]) -> torch.Tensor:
    return volume[(slice(None), slice(None)) + tuple(region)]


def warp_core(moving: torch.Tensor, displacement: torch.Tensor,
              region: Sequence[slice]) -> torch.Tensor:
    """``moving(x + u(x))`` for the core's voxels ``x``: the *full* moving image sampled at the
    core's coordinates (``displacement`` lives on the core grid).

    The field is zero-padded to the full grid, the full image warped by the library's one
    ``warp`` and the core cut out: every output voxel depends only on its own vector, so this is
    exact, and content moved in from outside the core arrives -- which warping a crop of the
    moving image (border padding) would replace by the crop's border values.
    """
    shape = moving.shape[2:]
    pad: List[int] = []
    for axis in (2, 1, 0):  # F.pad lists the last axis first
        pad += [region[axis].start, shape[axis] - region[axis].stop]
    return crop(warp(moving, F.pad(displacement, pad)), region)


# ---------------------------------------------------------------------------------- the network
class MMLN(nn.Module):
    """``forward(fixed, moving)`` -> displacement ``(B, 3, D, H, W)`` in voxels of the input grid,
    ``warped = warp(moving, u)``; sides must divide by 8. :meth:`pyramid` gives every level."""

    def __init__(self, variant: str = "LCD", coupling: str = "coupled", width: int = 12,
                 residual_blocks: int = 5, velocity_bound: float = 16.0,
                 integration_steps: int = 7, smoothness: float = 1.0, alpha: float = ALPHA,
                 beta: float = BETA, theta: float = THETA, phases: Sequence[float] = PHASES,
                 freeze_fraction: float = FREEZE_FRACTION):
        super().__init__()
        if variant not in BRANCHES:
            raise UserInputError(f"MMLN variant '{variant}' is not one of {', '.join(BRANCHES)}")
        if coupling not in COUPLINGS:
            raise UserInputError(f"MMLN coupling '{coupling}' is not one of "
                                 f"{', '.join(COUPLINGS)}")
        if len(phases) != LEVELS or any(p <= 0 for p in phases):
            raise UserInputError(f"MMLN phases must be {LEVELS} positive fractions, got {phases}")
        self.variant, self.coupling = variant, coupling
        self.integration_steps = int(integration_steps)
        # training choices, kept with the weights (and in the checkpoint's config)
        self.smoothness = float(smoothness)
        self.alpha, self.beta, self.theta = float(alpha), float(beta), float(theta)
        total = float(sum(phases))
        self.phases = [float(p) / total for p in phases]
        self.freeze_fraction = float(freeze_fraction)
        # level i's increment bound in its own voxels: the same physical bound at every level
        bounds = [float(velocity_bound) / 2 ** (LEVELS - 1 - i) for i in range(LEVELS)]
        self.levels = nn.ModuleList(
            LevelNetwork(3, 2 if i == 0 else 5, 3, width, residual_blocks, bounds[i])
            for i in range(LEVELS))
        # 2-D branch, levels 1-2: slices of [M_i o phi_i, F_i, in-plane v_i] -> in-plane increment
        self.slice_levels = nn.ModuleList(
            LevelNetwork(2, 4, 2, width, residual_blocks, bounds[i]) for i in range(2)) \
            if "D" in variant else None
        # the uncoupled control's core pass runs on its own copy of the level-3 network
        self.core_level = copy.deepcopy(self.levels[-1]) \
            if "C" in variant and coupling == "uncoupled" else None
        self.size_multiple = 2 ** LEVELS
        # training state (not saved): first step of each coarse curriculum stage's level, and
        # the step after the last coarse one ("working_grid")
        self.level_started: Dict = {}

    # -- the 3-D pyramid (all that inference runs) ---------------------------------------------
    def pyramid(self, fixed: torch.Tensor, moving: torch.Tensor,
                levels: int = LEVELS) -> List[Dict[str, torch.Tensor]]:
        """Levels ``1..levels`` for a pair on the grid of level ``levels`` (the working grid for
        the full pyramid; level 1's grid for level 1 alone). Each entry: ``fixed``, ``moving``
        (the pair on the level's grid), ``inputs`` and ``embedding`` (what the level network
        saw), ``base`` (``up(v_{i-1})``, None at level 1), ``increment`` (``delta_i``),
        ``velocity`` (``v_i``), ``displacement`` (``phi_i = exp(v_i)``) and ``features`` (the
        embedding for the next level)."""
        entries: List[Dict[str, torch.Tensor]] = []
        shapes = level_shapes(fixed.shape[2:], levels)
        images = [(fixed, moving)]  # the image pyramid, finest first
        for _ in shapes[1:]:
            images.append((halve(images[-1][0]), halve(images[-1][1])))
        for index, (grid, (fixed_i, moving_i)) in enumerate(zip(shapes, reversed(images))):
            if not entries:
                inputs, embedding, base = torch.cat([moving_i, fixed_i], dim=1), None, None
            else:
                previous = entries[-1]
                base = resize_displacement(previous["velocity"], grid)
                warped = warp(moving_i, resize_displacement(previous["displacement"], grid))
                inputs = torch.cat([warped, fixed_i, base], dim=1)
                embedding = previous["features"]
            increment, features = self.levels[index](inputs, embedding)
            velocity = increment if base is None else increment + base
            entries.append({"fixed": fixed_i, "moving": moving_i, "inputs": inputs,
                            "embedding": embedding, "base": base, "increment": increment,
                            "velocity": velocity, "features": features,
                            "displacement": integrate_velocity(velocity,
                                                               self.integration_steps)})
        return entries

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        return self.pyramid(fixed, moving)[-1]["displacement"]

    # -- training-only branches ----------------------------------------------------------------
    def slice_refinement(self, level: int, entry: Dict[str, torch.Tensor]
                         ) -> Dict[str, torch.Tensor]:
        """The 2-D branch at ``level`` (1 or 2) refining that level's 3-D velocity:
        ``v' = v_i + [0, delta_2D]``, ``phi' = exp(v')``; returns ``in_plane`` (the stacked
        increment), ``velocity``, ``displacement`` and ``warped`` (``M_i o phi'``)."""
        velocity = entry["velocity"]
        warped = warp(entry["moving"], entry["displacement"])
        if self.coupling == "uncoupled":  # the control: no gradient reaches the 3-D pyramid
            velocity, warped = velocity.detach(), warped.detach()
        inputs = torch.cat([warped, entry["fixed"], velocity[:, 1:]], dim=1)
        increment, _ = self.slice_levels[level - 1](to_slices(inputs))
        in_plane = stack_in_plane(increment, inputs.shape[2])
        refined = velocity + in_plane
        displacement = integrate_velocity(refined, self.integration_steps)
        return {"in_plane": in_plane, "velocity": refined, "displacement": displacement,
                "warped": warp(entry["moving"], displacement)}

    def core_registration(self, moving: torch.Tensor, finest: Dict[str, torch.Tensor]
                          ) -> Dict[str, torch.Tensor]:
        """The core branch: the level-3 network (its weights; a copy in the uncoupled control)
        on the core crop of the pyramid's level-3 inputs and embedding, ``v_core = delta_core +
        up(v_2)_core``, and the full ``moving`` image warped at the core's coordinates. Returns
        ``region``, ``fixed`` (the fixed core), ``velocity``, ``displacement``, ``warped``."""
        region = core_region(moving.shape[2:])
        inputs = crop(finest["inputs"], region)
        embedding = crop(finest["embedding"], half_region(region))
        base = crop(finest["base"], region)
        network = self.levels[-1]
        if self.coupling == "uncoupled":
            network = self.core_level
            inputs, embedding, base = inputs.detach(), embedding.detach(), base.detach()
        increment, _ = network(inputs, embedding)
        velocity = increment + base
        displacement = integrate_velocity(velocity, self.integration_steps)
        return {"region": region, "fixed": crop(finest["fixed"], region), "velocity": velocity,
                "displacement": displacement, "warped": warp_core(moving, displacement, region)}


def clip_groups(network: MMLN) -> List[List[nn.Parameter]]:
    """The trainer clips the deployed pyramid's gradient apart from the training-only branches'
    (2-D branch, the uncoupled control's core copy): clipped together, a branch's gradient would
    shrink the pyramid's step, and the uncoupled control would no longer train the pyramid
    exactly as ``L`` does."""
    branches = [module for module in (network.slice_levels, network.core_level)
                if module is not None]
    groups = [list(network.levels.parameters())]
    if branches:
        groups.append([p for module in branches for p in module.parameters()])
    return groups


def build_network(config: Dict) -> MMLN:
    config = dict(DEFAULT_CONFIG, **(config or {}))
    return MMLN(config["variant"], config["coupling"], config["width"],
                config["residual_blocks"], config["velocity_bound"], config["integration_steps"],
                config["smoothness"], config["alpha"], config["beta"], config["theta"],
                config["phases"], config["freeze_fraction"])


# ------------------------------------------------------------------------------------ training
def training_phase(step: int, iterations: int, phases: Sequence[float],
                   freeze_fraction: float, not_before: int = 0,
                   minimum_level: int = 1) -> Tuple[int, bool]:
    """``(level, frozen)`` at ``step`` of a run of ``iterations``: the level whose loss is
    trained -- phase boundaries at the cumulative ``phases``, but at least ``minimum_level`` (the
    level after those a coarse curriculum stage trained: the schedule never goes back) -- and
    whether the levels below it are still frozen: the first ``freeze_fraction * iterations``
    steps of the level, counted from its phase boundary or from ``not_before`` (the first
    working-grid step after a coarse stage), whichever is later."""
    boundaries = [round(sum(phases[:i + 1]) * iterations) for i in range(len(phases))]
    scheduled = next((i + 1 for i, end in enumerate(boundaries) if step < end), len(phases))
    level = min(max(scheduled, minimum_level), len(phases))
    start = not_before if level > scheduled else \
        max(boundaries[level - 2] if level > 1 else 0, not_before)
    frozen = level > 1 and step < start + max(int(round(freeze_fraction * iterations)), 0)
    return level, frozen


def level_loss(network: MMLN, fixed: torch.Tensor, moving: torch.Tensor,
               level: int = LEVELS, input_level: int = LEVELS,
               scored: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
               batch: Optional[Dict] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
    """The loss of pyramid level ``level`` with the branch terms the variant has, for a pair on
    the grid of level ``input_level`` (the working grid by default; resampled to level
    ``level``'s grid when finer -- LapIRN's level models see the full-resolution pair
    downsampled).

    ``1 - CorrCoef(F_p, M_p o phi_p) + k / 2^(L-p) TV(v_p)`` (``TV``: the mean squared forward
    difference summed over the axes, ``losses.total_variation_loss``), ``+ alpha`` (level 1) or
    ``beta`` (level 2) ``* (1 - CorrCoef(F_p, M_p o phi'_p))`` of the 2-D branch, ``+ theta``
    (level 3) ``* (1 - CorrCoef(F_core, M o phi_core))`` of the core branch.

    ``scored``: the pair every similarity scores (``base.scored_pair``) when it is not the pair
    the network sees, on the same grid. ``batch``: the level's field, on the pair's grid, is
    reported to the trainer (``base.report_field``).
    """
    if not 1 <= level <= input_level <= LEVELS:
        raise ValueError(f"level {level} cannot be trained on the grid of level {input_level}")
    input_shape = tuple(fixed.shape[2:])
    scored_fixed, scored_moving = scored or (fixed, moving)
    if input_level > level:
        fixed, moving = halve(fixed, input_level - level), halve(moving, input_level - level)
        if scored is not None:
            scored_fixed = halve(scored_fixed, input_level - level)
            scored_moving = halve(scored_moving, input_level - level)
        else:
            scored_fixed, scored_moving = fixed, moving
    entry = network.pyramid(fixed, moving, level)[-1]
    report_field(batch, resize_displacement(entry["displacement"], input_shape))
    similarity = correlation_coefficient_loss(scored_fixed,
                                              warp(scored_moving, entry["displacement"]))
    smoothness = total_variation_loss(entry["velocity"])
    weight = network.smoothness / 2 ** (LEVELS - level)
    total = similarity + weight * smoothness
    terms = {f"level{level}_similarity": float(similarity.detach()),
             f"level{level}_smoothness": float(smoothness.detach())}
    branch_weight = {1: network.alpha, 2: network.beta}.get(level, 0.0)
    if network.slice_levels is not None and level < LEVELS and branch_weight:
        refined = network.slice_refinement(level, entry)
        slices = correlation_coefficient_loss(
            scored_fixed, refined["warped"] if scored is None
            else warp(scored_moving, refined["displacement"]))
        total = total + branch_weight * slices
        terms[f"level{level}_slices_similarity"] = float(slices.detach())
    if "C" in network.variant and level == LEVELS and network.theta:
        core = network.core_registration(moving, entry)
        if scored is not None:  # the full scored moving image at the core's coordinates
            core = dict(core, fixed=crop(scored_fixed, core["region"]),
                        warped=warp_core(scored_moving, core["displacement"], core["region"]))
        core_similarity = correlation_coefficient_loss(core["fixed"], core["warped"])
        total = total + network.theta * core_similarity
        terms["core_similarity"] = float(core_similarity.detach())
    return total, terms


def grid_level(spacing_mm: float, working_spacing_mm: float) -> int:
    """The pyramid level whose grid a batch at ``spacing_mm`` is on (level 3 = the working grid,
    level 1 = four times coarser); a user error for any other spacing."""
    ratio = math.log2(float(spacing_mm) / float(working_spacing_mm))
    level = LEVELS - int(round(ratio))
    if abs(ratio - round(ratio)) > 1e-6 or not 1 <= level <= LEVELS:
        grids = ", ".join(f"{working_spacing_mm * 2 ** k:g}" for k in reversed(range(LEVELS)))
        raise UserInputError(f"MMLN trains its levels on {grids} mm grids (working grid "
                             f"{working_spacing_mm:g} mm); a training stage at {spacing_mm:g} mm "
                             "fits none of them")
    return level


def training_loss(network: MMLN, fixed: torch.Tensor, moving: torch.Tensor,
                  batch: Optional[Dict] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
    """The trainer's ``loss_fn`` hook: LapIRN's progressive, level-by-level training.

    Which level: a batch on a grid coarser than the run's working grid (``batch["spacing_mm"]``
    of a trainer's coarse curriculum stage against ``batch["working_spacing_mm"]``) trains the
    level of that grid on it directly -- 8 mm trains level 1, 4 mm level 2 (for the 2 mm working
    grid); on the working grid the phase
    schedule over the run decides (:func:`training_phase`, ``config["phases"]``), the pair
    resampled to the level's grid. The levels below it have ``requires_grad`` off during the
    first ``freeze_fraction`` of the run's steps after the level started (Adam skips parameters
    without a gradient) and on afterwards; the levels above it are not run. Validation
    (``batch["training"]`` false) scores the full pyramid's level-3 loss. Second-contrast
    synthetic pairs are trained in the fixed contrast (``same_contrast``): 1 - CorrCoef is a
    same-contrast similarity.
    """
    batch = batch or {}
    moving = same_contrast(fixed, moving, batch)
    scored = scored_pair(fixed, moving, batch) if batch.get("clean") else None
    if not batch.get("training", False) or batch.get("iterations", 0) < 1:
        return level_loss(network, fixed, moving, LEVELS, scored=scored, batch=batch)
    step, iterations = int(batch["step"]), int(batch["iterations"])
    working = batch.get("working_spacing_mm") or getattr(batch.get("spec"),
                                                         "working_spacing_mm", None)
    input_level = grid_level(batch["spacing_mm"], working) \
        if batch.get("spacing_mm") and working else LEVELS
    if input_level < LEVELS:
        # a coarse stage: its level, frozen below for the first steps since this level started
        level = input_level
        started = network.level_started.setdefault(level, step)
        frozen = level > 1 and step < started + int(round(network.freeze_fraction * iterations))
        network.level_started["working_grid"] = step + 1
    else:
        coarse_levels = [k for k in network.level_started if isinstance(k, int)]
        level, frozen = training_phase(step, iterations, network.phases,
                                       network.freeze_fraction,
                                       network.level_started.get("working_grid", 0),
                                       max(coarse_levels, default=0) + 1)
    for index, module in enumerate(network.levels):
        module.requires_grad_(index + 1 == level or (index + 1 < level and not frozen))
    total, terms = level_loss(network, fixed, moving, level, input_level, scored, batch)
    terms.update(level=float(level), frozen=float(frozen))
    return total, terms


# ------------------------------------------------------------------------------------ inference
def checkpoint_name(variant: str) -> str:
    return "mmln.pt" if variant == VARIANTS[0] else f"mmln-{variant}.pt"


def select_network(spec: MethodSpec, variant: Optional[str], device="cpu") -> MMLN:
    """The network of ``variant`` (``--variant``): ``mmln-<VARIANT>.pt``, or for the default
    variant the shipped ``mmln.pt``; its config must hold that variant."""
    variant = variant or VARIANTS[0]
    branches, coupling = parse_variant(variant)
    path = find_checkpoint(checkpoint_name(variant))
    if path is None and variant == VARIANTS[0]:
        path = find_checkpoint(f"mmln-{variant}.pt")
    if path is None:
        if variant == VARIANTS[0]:
            return load_network(spec, device)  # its one-line "no trained checkpoint" error
        raise UserInputError(
            f"MMLN variant '{variant}' needs its own checkpoint {checkpoint_name(variant)} (not "
            f"found in {', '.join(checkpoint_folders())}); train one with: python -m training "
            f"train --method mmln --config '{{\"variant\": \"{branches}\", \"coupling\": "
            f"\"{coupling}\"}}' --output Resources/checkpoints/{checkpoint_name(variant)}")
    network = load_network(spec, device, path)
    if (network.variant, network.coupling) != (branches, coupling):
        raise UserInputError(f"checkpoint '{path}' holds MMLN variant "
                             f"'{variant_name(network.variant, network.coupling)}', not "
                             f"'{variant}'")
    return network


def run(inputs: RegistrationInputs, spec: MethodSpec) -> torch.Tensor:
    """The 3-D pyramid on the 2 mm working grid (``base.run_network``), branches unused."""
    variant = inputs.options.get("variant")
    network = select_network(spec, variant, inputs.fixed.device)
    return run_network(inputs, spec, network, label=f"{spec.name} {variant or VARIANTS[0]}")


SPEC = register_method(MethodSpec(
    name="mmln",
    title="MMLN (LapIRN-like diffeomorphic pyramid, 2-D/3-D mutual learning, core region)",
    paper=PAPER,
    description="Three-level Laplacian pyramid of velocity fields on a 2 mm grid (8/4/2 mm), "
                "each level exponentiated by scaling and squaring; trained with a 2-D slice "
                "branch and a core-region branch. --variant L/LC/LCD selects the ablation arm.",
    run=run,
    build_network=build_network,
    config=dict(DEFAULT_CONFIG),
    checkpoint="mmln.pt",
    working_spacing_mm=2.0,
    size_multiple=2 ** LEVELS,
    # the pyramid's phases are the curriculum: no coarse first stage on another grid (it would
    # train level 1 on 16 mm voxels and deploy it on 8 mm ones)
    training={"loss_fn": training_loss, "recipe_losses": True, "lr": 1e-3, "batch_size": 1,
              "curriculum": None, "clip_groups": clip_groups},
    # the network's CPU seconds on a 2 mm MNI152 pair (docs/methods/mmln/speed_width12.json):
    # its wall time on an idle 2-core machine is not longer; other grids not measured yet
    estimated_seconds={"2mm": 2.5},
    variants=VARIANTS,
))
