"""MultiProp: a multi-scale propagative diffeomorphic network whose loss weights can tune themselves
by bilevel optimisation.

Liu, Li, Fan, Zhao, Huang, Luo, "Learning Deformable Image Registration from Optimization:
Perspective, Modules, Bilevel Training and Beyond", IEEE TPAMI 2022 (arXiv 2004.14557); public code
MultiPropReg. docs/methods/multiprop.md has the equations, every deviation and what is not done.

The method, read as an unrolled optimiser of ``min_phi  Sim(F, M o phi) + Reg(phi)``:

- *Learned Siamese feature pyramid.* One encoder, applied to the fixed and to the moving image with
  the same weights, gives features ``f^l`` at 1/2, 1/4 and 1/8 of the input grid (per level a
  stride-2 and a stride-1 3x3x3 convolution, LeakyReLU 0.2).
- *Stages* ``k = 1..K`` (K = 3), coarse to fine on grids 1/8, 1/4, 1/2, each one step of the
  optimiser. With ``phi_{k-1}`` the previous stage's displacement resized to this grid (zero for
  ``k = 1``):

  - matching error ``e_k = || f_t - f_s o phi_{k-1} ||_1`` over the feature channels (the data
    term's residual: zero where the warped moving features already match);
  - matching network ``u_k = M_k(e_k, f_t, phi_{k-1})`` (the descent direction on the data term);
  - context regularisation ``v_k = u_k + R_k(u_k)``, ``R_k`` three dilated 3x3x3 convolutions
    (dilation 1, 2, 4: a receptive field of 15 voxels) -- the learned proximal step of the
    regulariser;
  - ``psi_k = exp(v_k)`` by scaling and squaring (``spatial.integrate_velocity``), a
    diffeomorphism.

  *Propagation* between stages, two versions (``config["propagation"]``):
  ``composition`` (the paper: ``phi_k = phi_{k-1} o psi_k``, the library's ``compose(phi_{k-1},
  psi_k)``, so ``warp(M, phi_k) = warp(warp(M, phi_{k-1}), psi_k)``; ``v_k`` is the increment's
  velocity) and ``additive`` (the public code: ``u_k = M_k(...) + phi_{k-1}``, the previous
  integrated displacement added to the velocity, ``phi_k = exp(v_k)``). The last stage's field is
  upsampled to the input grid.
- *Loss* (:func:`loss_terms`, the paper's multi-scale objective):
  ``sum_k lambda_sta^k LNCC_k + lambda_reg sum_k ||grad v_k||^2 + lambda_jac sum_k fold(phi_k)``.
  ``LNCC_k`` compares the pair resized to stage k's grid (the last stage: the input grid and the
  upsampled field, the field the user gets) over a window of about ``window_mm`` millimetres;
  ``||grad v||^2`` is the diffusion of the velocity (``losses.diffusion_loss``, voxel units of its
  own grid, so a dimensionless gradient at every stage); ``fold`` is the mean negative part of
  the one-sided Jacobian determinants of ``phi_k`` (``losses.negative_jacobian_loss``; the
  paper's ``|J_v|`` is a typo for ``phi``).
- *Loss weights* ``lambda`` are log-values kept as buffers of :class:`LossWeights` (saved with the
  weights, resumed, never in ``parameters()``, so the network's Adam never moves them); the last
  stage's similarity weight is fixed to 1 (only ratios are identifiable), the others clamped to a
  range. Variant ``default``: the hand-set values. Variant ``bilevel``: an upper level moves
  them between training steps (``training/multiprop_training.py``, called through the trainer's
  ``before_step`` hook) to lower a validation objective that does not contain them.

Inference runs the network on a 2 mm working grid (``base.run_network``). The paper's
probabilistic (KL) features and its architecture search are not built.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..errors import UserInputError
from ..losses import diffusion_loss, local_ncc_loss, negative_jacobian_loss
from ..spatial import (compose, integrate_velocity, resize_displacement, resize_image, warp)
from .base import (MethodSpec, RegistrationInputs, checkpoint_folders, find_checkpoint,
                   load_network, register_method, report_field, run_network, same_contrast,
                   scored_pair)
from .blocks import NEGATIVE_SLOPE, ConvBlock, variance_preserving_

PAPER = ("Liu, Li, Fan, Zhao, Huang, Luo, Learning Deformable Image Registration from "
         "Optimization: Perspective, Modules, Bilevel Training and Beyond, IEEE TPAMI 2022")
VARIANTS = ("default", "bilevel")
PROPAGATIONS = ("composition", "additive")
STAGES = 3


def weight_names(stages: int = STAGES) -> List[str]:
    """The loss weights, in the order of every tensor that holds them: one similarity weight per
    stage (the last one is the fixed scale), then regularisation and folding."""
    return [f"similarity{k}" for k in range(1, stages + 1)] + ["regularisation", "folding"]


# Hand-set weights (variant default). The stage weights halve per coarser stage (the public code
# uses 0.08 / 0.32 / 1 on its 1/4, 1/2 and full grids); the regularisation weight is vm-diff's
# diffusion weight with the same LNCC; folding is a mean over voxels and acts only where a
# determinant is negative.
DEFAULT_WEIGHTS = {"similarity1": 0.25, "similarity2": 0.5, "similarity3": 1.0,
                   "regularisation": 1.0, "folding": 10.0}
# each tuned weight stays within a factor 100 of its hand-set value either way (so a 10x mis-set
# start and its recovery both fit); the fixed weight has no range
WEIGHT_RANGE = 100.0
DEFAULT_CONFIG = {
    "variant": "default", "stages": STAGES, "features": [16, 32, 32], "matching": [32, 16],
    "context": [16, 16, 16], "propagation": "composition", "integration_steps": 7,
    "window_mm": 20.0,
    "weights": {},              # overrides of the hand-set weights (DEFAULT_WEIGHTS), e.g. a mis-set
    "weight_range": WEIGHT_RANGE,
    # the upper level (variant bilevel; training/multiprop_training.py reads these)
    "upper_warmup": 0.2,        # share of the run before the first update
    "upper_every": 10,          # steps between updates
    "upper_lr": 0.05,           # Adam step on the log-weights (nats per update at most, roughly)
    "upper_pairs": 2,           # pairs from the upper-level stream per update
    "upper_objective": "dice",  # dice | field_error | paper (the negative control)
    "folding_barrier": 1.0,     # fixed weight of the folding term in the upper objective
    "hypergradient": "unrolled",  # unrolled | finite_difference (the paper's eq. 21)
}


# ---------------------------------------------------------------------------- the loss weights
class LossWeights(nn.Module):
    """The loss weights ``lambda`` as log-values in *buffers*: saved in the state dict (checkpoint
    and ``--resume``) with the upper level's Adam moments and the trajectory of every update, and
    absent from ``parameters()``, so the network's optimiser never touches them.

    ``fixed`` names the weight that sets the scale (its log-value stays exactly 0); the others are
    clamped to ``[initial / range, initial * range]`` around their hand-set values.
    """

    TRAJECTORY_CAPACITY = 256

    def __init__(self, names: Sequence[str], initial: Dict[str, float], fixed: str,
                 bounds: Dict[str, Sequence[float]]):
        super().__init__()
        self.names = list(names)
        self.fixed = fixed
        values = torch.tensor([float(initial[n]) for n in self.names], dtype=torch.float64)
        lower = torch.tensor([float(bounds[n][0]) for n in self.names], dtype=torch.float64)
        upper = torch.tensor([float(bounds[n][1]) for n in self.names], dtype=torch.float64)
        self.register_buffer("log_values", values.log().float())
        self.register_buffer("log_lower", lower.log().float())
        self.register_buffer("log_upper", upper.log().float())
        self.register_buffer("tunable", torch.tensor([n != fixed for n in self.names]))
        # the upper level's Adam state
        self.register_buffer("first_moment", torch.zeros(len(self.names)))
        self.register_buffer("second_moment", torch.zeros(len(self.names)))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        # rows (step, upper objective, lambda_1..n), thinned by 2 whenever full
        self.register_buffer("trajectory",
                             torch.zeros(self.TRAJECTORY_CAPACITY, 2 + len(self.names)))
        self.register_buffer("trajectory_length", torch.zeros((), dtype=torch.long))
        self.register_buffer("trajectory_stride", torch.ones((), dtype=torch.long))

    def values(self) -> Dict[str, float]:
        return {n: float(v) for n, v in zip(self.names, self.log_values.double().exp())}

    def tensor(self) -> torch.Tensor:
        """The weights ``(n,)``, ``exp(log_values)`` (a gradient reaches ``log_values`` only if
        someone asks for it: the tests do, to show which objectives depend on the weights)."""
        return self.log_values.exp()

    def step(self, gradient: torch.Tensor, lr: float, betas=(0.5, 0.999),
             eps: float = 1e-12) -> None:
        """One Adam step on the tunable log-values with ``gradient`` = dF/dlog(lambda), then the
        clamp. (betas as the public hyper-optimiser; ``eps`` small because hypergradients are
        of the order of the network's learning rate times a gradient product.)"""
        with torch.no_grad():
            gradient = gradient.to(self.log_values).where(self.tunable,
                                                          torch.zeros_like(self.log_values))
            self.updates += 1
            t = int(self.updates)
            self.first_moment.mul_(betas[0]).add_((1 - betas[0]) * gradient)
            self.second_moment.mul_(betas[1]).add_((1 - betas[1]) * gradient * gradient)
            corrected_first = self.first_moment / (1 - betas[0] ** t)
            corrected_second = self.second_moment / (1 - betas[1] ** t)
            change = lr * corrected_first / (corrected_second.sqrt() + eps)
            moved = torch.minimum(torch.maximum(self.log_values - change, self.log_lower),
                                  self.log_upper)
            self.log_values.copy_(moved.where(self.tunable, self.log_values))

    def record(self, step: int, objective: float) -> None:
        """Append ``(step, objective, lambda)`` to the trajectory every ``stride`` updates; when
        full, keep every other row and double the stride (the whole run stays covered)."""
        with torch.no_grad():
            if int(self.updates) % int(self.trajectory_stride):
                return
            if int(self.trajectory_length) == self.TRAJECTORY_CAPACITY:
                kept = self.trajectory[::2].clone()
                self.trajectory.zero_()
                self.trajectory[:kept.shape[0]] = kept
                self.trajectory_length.fill_(kept.shape[0])
                self.trajectory_stride.mul_(2)
            row = torch.cat([torch.tensor([float(step), float(objective)]),
                             self.tensor().float()]).to(self.trajectory)
            self.trajectory[int(self.trajectory_length)] = row
            self.trajectory_length += 1

    def describe(self) -> Dict:
        """The weights, their ranges and the trajectory, for the model card."""
        rows = self.trajectory[:int(self.trajectory_length)].tolist()
        return {"values": self.values(), "fixed": self.fixed, "updates": int(self.updates),
                "bounds": {n: [math.exp(lo), math.exp(hi)] for n, lo, hi in
                           zip(self.names, self.log_lower.tolist(), self.log_upper.tolist())
                           if n != self.fixed},
                "trajectory": [dict({"step": int(r[0]), "upper_objective": r[1]},
                                    **dict(zip(self.names, r[2:]))) for r in rows]}


# ---------------------------------------------------------------------------------- modules
class DilatedBlock(nn.Sequential):
    """3x3x3 convolution with ``dilation`` (same size), LeakyReLU 0.2, He-initialised."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int):
        convolution = nn.Conv3d(in_channels, out_channels, 3, 1, dilation, dilation)
        super().__init__(variance_preserving_(convolution), nn.LeakyReLU(NEGATIVE_SLOPE))


def zero_head(in_channels: int) -> nn.Conv3d:
    """The 3-channel output convolution, zero at the start: a fresh stage predicts no motion."""
    head = nn.Conv3d(in_channels, 3, 3, 1, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


class FeaturePyramid(nn.Module):
    """The Siamese encoder: ``image -> [f^1, f^2, ...]`` at 1/2, 1/4, ... of its grid (one
    module, applied to both images)."""

    def __init__(self, widths: Sequence[int]):
        super().__init__()
        channels = [1] + list(widths)
        self.levels = nn.ModuleList(nn.Sequential(ConvBlock(channels[i], channels[i + 1], 2),
                                                  ConvBlock(channels[i + 1], channels[i + 1]))
                                    for i in range(len(widths)))

    def forward(self, image: torch.Tensor) -> List[torch.Tensor]:
        features = []
        for level in self.levels:
            image = level(image)
            features.append(image)
        return features


class MatchingNetwork(nn.Sequential):
    """``M``: ``[e, f_t, phi_prev] -> u`` (3 channels, zero at the start)."""

    def __init__(self, feature_channels: int, widths: Sequence[int]):
        channels = [1 + feature_channels + 3] + list(widths)
        super().__init__(*[ConvBlock(channels[i], channels[i + 1]) for i in range(len(widths))],
                         zero_head(channels[-1]))


class ContextNetwork(nn.Sequential):
    """``R``: dilated convolutions (dilation 1, 2, 4, ...) on ``u``, a residual correction."""

    def __init__(self, widths: Sequence[int]):
        channels = [3] + list(widths)
        super().__init__(*[DilatedBlock(channels[i], channels[i + 1], 2 ** i)
                           for i in range(len(widths))], zero_head(channels[-1]))


def matching_error(fixed_features: torch.Tensor, warped_moving_features: torch.Tensor
                   ) -> torch.Tensor:
    """``e = ||f_t - f_s o phi||_1`` over the channels, ``(B, 1, D, H, W)``."""
    return (fixed_features - warped_moving_features).abs().sum(1, keepdim=True)


# ---------------------------------------------------------------------------------- the network
class MultiProp(nn.Module):
    """``forward(fixed, moving)`` -> displacement ``(B, 3, D, H, W)`` in voxels of the input grid
    (``warped = warp(moving, u)``); sides must divide by ``2 ** stages``. :meth:`stages` gives
    every stage. ``loss_weights`` holds lambda (buffers)."""

    def __init__(self, variant: str = "default", stages: int = STAGES,
                 features: Sequence[int] = (16, 32, 32), matching: Sequence[int] = (32, 16),
                 context: Sequence[int] = (16, 16, 16), propagation: str = "composition",
                 integration_steps: int = 7, window_mm: float = 20.0,
                 weights: Optional[Dict[str, float]] = None,
                 weight_range: float = WEIGHT_RANGE):
        super().__init__()
        if variant not in VARIANTS:
            raise UserInputError(f"MultiProp variant '{variant}' is not one of "
                                 f"{', '.join(VARIANTS)}")
        if propagation not in PROPAGATIONS:
            raise UserInputError(f"MultiProp propagation '{propagation}' is not one of "
                                 f"{', '.join(PROPAGATIONS)}")
        if len(features) != stages:
            raise UserInputError(f"MultiProp needs one feature width per stage ({stages}), got "
                                 f"{list(features)}")
        self.variant, self.propagation = variant, propagation
        self.stage_count = int(stages)
        self.integration_steps = int(integration_steps)
        self.window_mm = float(window_mm)
        self.features = FeaturePyramid(features)
        # stage k (coarse to fine) works on pyramid level K - k + 1 (the last on the 1/2 grid)
        self.matching = nn.ModuleList(MatchingNetwork(features[self.stage_count - 1 - k],
                                                      matching)
                                      for k in range(self.stage_count))
        self.context = nn.ModuleList(ContextNetwork(context) for _ in range(self.stage_count))
        names = weight_names(self.stage_count)
        unknown = set(weights or {}) - set(names)
        if unknown:
            raise UserInputError(f"unknown MultiProp loss weight(s) {', '.join(sorted(unknown))};"
                                 f" they are {', '.join(names)}")
        # the stage weights halve per coarser stage, whatever the number of stages
        defaults = {f"similarity{k}": 0.5 ** (self.stage_count - k)
                    for k in range(1, self.stage_count + 1)}
        defaults.update(regularisation=DEFAULT_WEIGHTS["regularisation"],
                        folding=DEFAULT_WEIGHTS["folding"])
        initial = dict(defaults, **(weights or {}))
        fixed = names[self.stage_count - 1]
        if initial[fixed] != 1.0:
            raise UserInputError(f"the weight '{fixed}' sets the scale and must be 1")
        if any(initial[n] <= 0 for n in names):
            raise UserInputError(f"MultiProp loss weights must be positive, got {initial}")
        bounds = {n: (defaults[n] / weight_range, defaults[n] * weight_range) for n in names}
        for n in names:
            if n != fixed and not bounds[n][0] <= initial[n] <= bounds[n][1]:
                raise UserInputError(f"loss weight {n} = {initial[n]} is outside its range "
                                     f"{bounds[n][0]:g}..{bounds[n][1]:g}")
        self.loss_weights = LossWeights(names, initial, fixed, bounds)

    @property
    def bilevel(self) -> bool:
        return self.variant == "bilevel"

    def stages(self, fixed: torch.Tensor, moving: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
        """Every stage, coarse to fine: ``error`` (e_k), ``velocity`` (v_k), ``increment``
        (psi_k = exp(v_k)), ``displacement`` (phi_k) on the stage's grid."""
        factor = 2 ** self.stage_count
        if any(int(n) % factor for n in fixed.shape[2:]):
            raise ValueError(f"MultiProp with {self.stage_count} stages needs grid sides that "
                             f"divide by {factor}, got {tuple(fixed.shape[2:])}")
        fixed_pyramid = self.features(fixed)
        moving_pyramid = self.features(moving)
        entries: List[Dict[str, torch.Tensor]] = []
        previous = None
        for k in range(self.stage_count):
            level = self.stage_count - 1 - k
            fixed_features, moving_features = fixed_pyramid[level], moving_pyramid[level]
            grid = tuple(fixed_features.shape[2:])
            if previous is None:
                previous = fixed_features.new_zeros((fixed.shape[0], 3, *grid))
                warped = moving_features
            else:
                previous = resize_displacement(previous, grid)
                warped = warp(moving_features, previous)
            error = matching_error(fixed_features, warped)
            direction = self.matching[k](torch.cat([error, fixed_features, previous], dim=1))
            if self.propagation == "additive":  # the public code: phi_{k-1} added to the velocity
                direction = direction + previous
            velocity = direction + self.context[k](direction)
            increment = integrate_velocity(velocity, self.integration_steps)
            displacement = compose(previous, increment) if self.propagation == "composition" \
                else increment
            entries.append({"error": error, "velocity": velocity, "increment": increment,
                            "displacement": displacement})
            previous = displacement
        return entries

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        return resize_displacement(self.stages(fixed, moving)[-1]["displacement"],
                                   fixed.shape[2:])


def build_network(config: Dict) -> MultiProp:
    config = dict(DEFAULT_CONFIG, **(config or {}))
    return MultiProp(config["variant"], config["stages"], config["features"], config["matching"],
                     config["context"], config["propagation"], config["integration_steps"],
                     config["window_mm"], config["weights"], config["weight_range"])


# ------------------------------------------------------------------------------------ the loss
def window_voxels(window_mm: float, spacing_mm: float) -> int:
    """The odd LNCC window (at least 3 voxels) closest to ``window_mm`` millimetres."""
    return max(int(round(window_mm / spacing_mm)) // 2 * 2 + 1, 3)


def loss_terms(network: MultiProp, fixed: torch.Tensor, moving: torch.Tensor,
               spacing_mm: float, scored: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
               batch: Optional[Dict] = None) -> Dict[str, torch.Tensor]:
    """The unweighted terms of the lower-level loss, one per loss weight (:func:`weight_names`):
    ``similarity<k>`` = LNCC of stage k, ``regularisation`` = sum_k diffusion(v_k), ``folding`` =
    sum_k fold(phi_k). ``spacing_mm``: the input grid's voxel size (for the windows).
    ``scored``: the pair the similarities score (``base.scored_pair``) when it is not the pair the
    network sees; ``batch``: the final field is reported to the trainer (``base.report_field``)."""
    entries = network.stages(fixed, moving)
    scored_fixed, scored_moving = scored or (fixed, moving)
    terms: Dict[str, torch.Tensor] = {}
    regularisation, folding = 0.0, 0.0
    shape = tuple(fixed.shape[2:])
    for k, entry in enumerate(entries, start=1):
        displacement = entry["displacement"]
        if k == len(entries):  # the field the user gets, on the input grid
            fixed_k, moving_k = scored_fixed, scored_moving
            displacement = report_field(batch, resize_displacement(displacement, shape))
        else:
            grid = tuple(displacement.shape[2:])
            fixed_k = resize_image(scored_fixed, grid)
            moving_k = resize_image(scored_moving, grid)
        stage_spacing = spacing_mm * (shape[0] - 1) / max(fixed_k.shape[2] - 1, 1)
        window = window_voxels(network.window_mm, stage_spacing)
        terms[f"similarity{k}"] = local_ncc_loss(fixed_k, warp(moving_k, displacement), window)
        regularisation = regularisation + diffusion_loss(entry["velocity"])
        folding = folding + negative_jacobian_loss(entry["displacement"])
    terms["regularisation"] = regularisation
    terms["folding"] = folding
    return terms


def batch_spacing(batch: Optional[Dict]) -> float:
    """The grid of a trainer batch: its curriculum stage's (``spacing_mm``), else the working
    grid (validation batches carry neither: the spec's working grid)."""
    batch = batch or {}
    spacing = batch.get("spacing_mm") or batch.get("working_spacing_mm")
    if spacing:
        return float(spacing)
    spec = batch.get("spec")
    return float(getattr(spec, "working_spacing_mm", None) or SPEC.working_spacing_mm)


def lower_terms(network: MultiProp, fixed: torch.Tensor, moving: torch.Tensor,
                batch: Optional[Dict] = None) -> Dict[str, torch.Tensor]:
    """:func:`loss_terms` of a trainer batch (LNCC is a same-contrast similarity: second-contrast
    synthetic pairs are trained in the fixed contrast, ``base.same_contrast``)."""
    moving = same_contrast(fixed, moving, batch)
    scored = scored_pair(fixed, moving, batch) if (batch or {}).get("clean") else None
    return loss_terms(network, fixed, moving, batch_spacing(batch),
                      scored, batch)


def training_loss(network: MultiProp, fixed: torch.Tensor, moving: torch.Tensor,
                  batch: Optional[Dict] = None):
    """The trainer's ``loss_fn``: ``sum_i lambda_i term_i`` with the network's current weights."""
    terms = lower_terms(network, fixed, moving, batch)
    weights = network.loss_weights.values()
    total = sum(weights[name] * value for name, value in terms.items())
    logged = {name: float(value.detach()) for name, value in terms.items()}
    if network.bilevel:
        logged.update({f"lambda_{name}": value for name, value in weights.items()
                       if name != network.loss_weights.fixed})
    return total, logged


def bilevel_step(network: MultiProp, optimiser, batch: Dict):
    """The trainer's ``before_step`` hook: the upper level of variant ``bilevel``
    (``training/multiprop_training.py``, imported here only when training runs it)."""
    if not network.bilevel:
        return None
    from training.multiprop_training import upper_level_step
    return upper_level_step(network, optimiser, batch)


def model_card_entry(network: MultiProp) -> Dict:
    """The trainer's ``card`` hook: the loss weights and their trajectory."""
    return {"loss_weights": dict(network.loss_weights.describe(), variant=network.variant,
                                 propagation=network.propagation)}


# ------------------------------------------------------------------------------------ inference
def checkpoint_name(variant: str) -> str:
    return "multiprop.pt" if variant == VARIANTS[0] else f"multiprop-{variant}.pt"


def select_network(spec: MethodSpec, variant: Optional[str], device="cpu") -> MultiProp:
    """The network of ``variant`` (``--variant``): ``multiprop.pt`` or ``multiprop-bilevel.pt``;
    the file's config must hold that variant."""
    variant = variant or VARIANTS[0]
    if variant not in VARIANTS:
        raise UserInputError(f"MultiProp variant '{variant}' is not one of {', '.join(VARIANTS)}")
    if variant == VARIANTS[0]:
        network = load_network(spec, device)  # its one-line "no trained checkpoint" error
        path = spec.checkpoint_path()
    else:
        path = find_checkpoint(checkpoint_name(variant))
        if path is None:
            raise UserInputError(
                f"MultiProp variant '{variant}' needs its own checkpoint "
                f"{checkpoint_name(variant)} (not found in {', '.join(checkpoint_folders())}); "
                f"train one with: python -m training train --method multiprop --config "
                f"'{{\"variant\": \"{variant}\"}}' --output "
                f"Resources/checkpoints/{checkpoint_name(variant)}")
        network = load_network(spec, device, path)
    if network.variant != variant:
        raise UserInputError(f"checkpoint '{path}' holds MultiProp variant '{network.variant}', "
                             f"not '{variant}'")
    return network


def run(inputs: RegistrationInputs, spec: MethodSpec) -> torch.Tensor:
    """The network on the 2 mm working grid (``base.run_network``)."""
    variant = inputs.options.get("variant") or VARIANTS[0]
    network = select_network(spec, variant, inputs.fixed.device)
    return run_network(inputs, spec, network, label=f"{spec.name} {variant}")


SPEC = register_method(MethodSpec(
    name="multiprop",
    title="MultiProp (multi-scale propagative diffeomorphic network, bilevel loss weights)",
    paper=PAPER,
    description="A Siamese feature pyramid and three coarse-to-fine stages (matching error, "
                "matching network, dilated context network, scaling and squaring) on a 2 mm "
                "grid. --variant bilevel: loss weights tuned by a validation objective.",
    run=run,
    build_network=build_network,
    config=dict(DEFAULT_CONFIG),
    checkpoint="multiprop.pt",
    working_spacing_mm=2.0,
    size_multiple=2 ** STAGES,
    # trainer schema (training/train.py): the loss_fn reads the network's current weights; the
    # before_step hook runs the upper level (variant bilevel) between gradient clipping and the
    # optimiser step; the card hook puts the weights and their trajectory in the model card.
    # LNCC is a same-contrast similarity: no second-contrast pairs, little noise (vm-diff's)
    training={"loss_fn": training_loss, "recipe_losses": True, "before_step": bilevel_step,
              "card": model_card_entry,
              "lr": 1e-3, "batch_size": 2,
              "synth": {"contrast_probability": 0.0, "noise_max": 0.01}},
    estimated_seconds={"2mm": 2.0},
    variants=VARIANTS,
))
