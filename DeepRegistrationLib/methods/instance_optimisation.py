"""Instance optimisation: a diffeomorphic registration of one pair, no training needed.

A stationary velocity field ``v`` is optimised with Adam over a coarse-to-fine pyramid to minimise

    L(v) = S(F, M o (u0 * exp(v))) + lambda * Diffusion(v)

where ``exp`` is scaling and squaring, ``u0`` an optional initial displacement (a network's output
when refining), ``*`` the composition of ``spatial.compose`` (warp by ``u0``, then by ``exp(v)``)
and ``S`` local NCC (same modality) or the MIND-SSC distance (different modalities). Because the
update is the exponential of a smooth field, it cannot fold.

Speed on a CPU comes from three choices: ``v`` lives on a control grid one half of each level's
resolution and is integrated there (its exponential is smooth, so upsampling the displacement
loses nothing); most iterations run on the coarse levels; and the finest optimisation grid is
capped (``max_voxels``) with the result upsampled to the full grid. MIND descriptors are computed
once per level and warped, instead of recomputed from the warped image at every step.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..images import parallel_grid_sample
from ..losses import (diffusion_loss, local_ncc_loss, local_statistics, mind_ssc,
                      similarity_loss)
from ..progress import ProgressScope
from ..runtime import release_free_memory
from ..spatial import compose, forward_differences, gaussian_kernel1d, resize_displacement
from .base import MethodSpec, RegistrationInputs, pyramid_shapes, register_method

# Defaults chosen on synthetically deformed MNI152 brains at 2 mm against ANTs SyN in the same
# run (benchmarks/benchmark.py): most steps at 1/4 and 1/2 resolution, a short full-resolution
# polish.
DEFAULT_ITERATIONS = (80, 30, 6)
DEFAULT_REGULARIZATION = {"lncc": 5.0, "mind": 1.0, "ncc": 1.0, "mse": 0.5, "ngf": 1.0, "mi": 10.0}
# the similarities instance optimisation optimises (each has its default weight above): those of
# "io", and of --refine after any method (a network's --similarity list is this one, base.py)
SIMILARITIES = tuple(DEFAULT_REGULARIZATION)
DEFAULT_LEARNING_RATE = 0.2
DEFAULT_MAX_VOXELS = 1_500_000
LNCC_WINDOW = 5  # voxels of each level: wider in millimetres on the coarse levels
# voxels of the level's grid between velocity control points; 3 on the finest level lost 0.007
# mean Dice and 4 lost 0.018 on 2 mm MNI152 pairs (seeds 21-23), so the polish needs this detail
CONTROL_SPACING = 2


class _Adam:
    """Adam (Kingma & Ba 2015) on one tensor, as ``torch.optim.Adam`` with default betas.

    Written out because the first ``torch.optim`` optimiser built in a process imports
    ``torch._dynamo`` (about one second on these CPUs), a fifth of a whole 2 mm registration.
    """

    def __init__(self, parameter: torch.Tensor, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.parameter, self.lr, self.betas, self.eps = parameter, lr, betas, eps
        self.first = torch.zeros_like(parameter)
        self.second = torch.zeros_like(parameter)
        self.steps = 0

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        self.steps += 1
        grad = self.parameter.grad
        self.first.mul_(beta1).add_(grad, alpha=1 - beta1)
        self.second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denominator = (self.second / (1 - beta2 ** self.steps)).sqrt_().add_(self.eps)
        self.parameter.addcdiv_(self.first, denominator, value=-self.lr / (1 - beta1 ** self.steps))
        self.parameter.grad = None


def _features(image: torch.Tensor, similarity: str) -> torch.Tensor:
    return mind_ssc(image) if similarity == "mind" else image


def _feature_loss(similarity: str, fixed_features: torch.Tensor):
    """The loss comparing fixed and warped features at one level (fixed parts computed once)."""
    if similarity == "mind":  # descriptors are compared by their squared difference
        return similarity_loss("mse")
    if similarity == "lncc":
        statistics = local_statistics(fixed_features, LNCC_WINDOW)
        return lambda fixed, warped: local_ncc_loss(fixed, warped, LNCC_WINDOW,
                                                    fixed_statistics=statistics)
    return similarity_loss(similarity)


# ------------------------------------------------------------------ the optimisation's own kit
# The loop below runs the spatial kit's warp, compose and scaling and squaring, computed in
# grid_sample's normalised coordinates: a displacement there is the same on every grid of the
# level (no rescaling when it is resized), and the sampling grid is one addition to a cached
# identity. ``spatial.warp`` builds the identity and converts units at every call; at a few
# hundred calls per registration that was a tenth of the time. Tests check both give the same
# numbers.
def _normalised_identity(shape: Sequence[int], device=None) -> torch.Tensor:
    """Voxel centres of a grid as ``grid_sample`` sees them: ``(1, D, H, W, 3)``, (x, y, z) =
    (i, j, k) in [-1, 1] (``align_corners=True``)."""
    k, j, i = torch.meshgrid(*[torch.linspace(-1.0, 1.0, int(n), device=device) for n in shape],
                             indexing="ij")
    return torch.stack([i, j, k], dim=-1)[None]


def _normalising_scale(shape: Sequence[int], device=None) -> torch.Tensor:
    """Per (k, j, i) channel, normalised units per voxel of a grid of ``shape``."""
    return torch.tensor([2.0 / max(int(n) - 1, 1) for n in shape],
                        device=device).view(1, 3, 1, 1, 1)


def _sample(image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``spatial.warp``'s sampling (trilinear, border, ``align_corners=True``) of a ``(1, C, ...)``
    image at a ``(1, D, H, W, 3)`` grid, on every core (``images.parallel_grid_sample``)."""
    return parallel_grid_sample(image, grid, "bilinear", "border")


def _squaring_steps(velocity: torch.Tensor) -> int:
    """The squaring count of ``spatial.integrate_velocity(velocity, None)`` (voxel units): the
    smallest (3 to 10) for which the first step moves no voxel, and changes no neighbour
    difference, by more than 1/8 voxel."""
    with torch.no_grad():
        change = max(diff.abs().max().item() for diff in forward_differences(velocity))
        change = max(change, velocity.abs().max().item())
    return min(max(int(math.ceil(math.log2(max(change, 1e-6) / 0.125))), 3), 10)


def _exponential(velocity: torch.Tensor, identity: torch.Tensor,
                 scale: torch.Tensor) -> torch.Tensor:
    """``exp(v)`` by scaling and squaring, as ``spatial.integrate_velocity(velocity, None)``, for a
    velocity in voxels (k, j, i) of its grid; returned in normalised (x, y, z) units."""
    steps = _squaring_steps(velocity)
    field = (velocity * (scale / 2 ** steps)).flip(1)
    for _ in range(steps):  # u <- u o u = u + u(x + u(x))
        field = field + _sample(field, identity + field.permute(0, 2, 3, 4, 1))
    return field


def _to_voxels(field: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A normalised (x, y, z) field resized to ``shape`` and returned in voxels (k, j, i).

    A channel at a time into the result, so a 1 mm field has one copy plus one channel alive
    (resizing all three and then flipping held two copies, 0.2 GB)."""
    shape = tuple(int(n) for n in shape)
    scale = _normalising_scale(shape).flatten().tolist()
    out = torch.empty((1, 3) + shape, dtype=field.dtype, device=field.device)
    for channel in range(3):  # channel c (k, j, i) is normalised channel 2 - c (x, y, z)
        part = field[:, 2 - channel:3 - channel]
        if tuple(field.shape[2:]) != shape:
            part = F.interpolate(part, size=shape, mode="trilinear", align_corners=True)
        torch.div(part, scale[channel], out=out[:, channel:channel + 1])
    return out


def _smooth(image: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """``spatial.gaussian_smooth`` (same kernel, replicate padding) by shifted multiply-adds,
    which use every core; the grouped ``conv3d`` there took 1.6 CPU-seconds per 1 mm head."""
    for axis, sigma in enumerate(sigmas):
        if sigma <= 0:
            continue
        weights = gaussian_kernel1d(sigma, dtype=torch.float64).tolist()
        radius, dim = len(weights) // 2, axis + 2
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        padded = F.pad(image, pad, mode="replicate")
        n = image.shape[dim]
        out = padded.narrow(dim, 0, n) * weights[0]
        for tap in range(1, len(weights)):
            out.add_(padded.narrow(dim, tap, n), alpha=weights[tap])
        image = out
    return image


def _pyramid(image: torch.Tensor, shapes: Sequence[Sequence[int]]):
    """The image on each grid of ``shapes`` (coarse to fine), with the anti-aliasing blur of
    ``spatial.resize_image`` (sigma half the shrink factor, in voxels of the full grid).

    Built fine to coarse, each level from the next finer one with only the blur it still lacks
    (Gaussians add in variance), so the coarse levels cost a fraction of a full-resolution pass.
    """
    full = tuple(image.shape[2:])
    levels, current, blur = [], image, [0.0, 0.0, 0.0]  # blur so far, full-grid voxels
    for shape in reversed([tuple(int(n) for n in s) for s in shapes]):
        if shape != tuple(current.shape[2:]):
            factors = [(a - 1) / max(b - 1, 1) for a, b in zip(full, shape)]
            target = [0.5 * f if f > 1.0 else 0.0 for f in factors]
            voxel = [(a - 1) / max(b - 1, 1) for a, b in zip(full, current.shape[2:])]
            extra = [math.sqrt(max(t * t - b * b, 0.0)) / v
                     for t, b, v in zip(target, blur, voxel)]
            current = F.interpolate(_smooth(current, extra), size=shape, mode="trilinear",
                                    align_corners=True)
            blur = [max(t, b) for t, b in zip(target, blur)]
        levels.append(current)
    return levels[::-1]


def instance_optimisation(fixed: torch.Tensor, moving: torch.Tensor,
                          initial: Optional[torch.Tensor] = None, similarity: str = "lncc",
                          regularization: Optional[float] = None,
                          iterations: Sequence[int] = DEFAULT_ITERATIONS,
                          learning_rate: float = DEFAULT_LEARNING_RATE,
                          max_voxels: Optional[int] = DEFAULT_MAX_VOXELS,
                          progress: Optional[ProgressScope] = None) -> torch.Tensor:
    """Register ``moving`` to ``fixed`` (same grid, ``(1, 1, D, H, W)``), starting from ``initial``.

    ``iterations`` gives the Adam steps per level, coarse to fine (its length is the number of
    levels). Returns the displacement ``(1, 3, D, H, W)`` in voxels of the fixed grid.
    """
    progress = progress or ProgressScope()
    weight = DEFAULT_REGULARIZATION.get(similarity, 1.0) if regularization is None \
        else float(regularization)
    shape = tuple(fixed.shape[2:])
    device = fixed.device
    shapes = pyramid_shapes(shape, len(iterations), max_voxels)
    # each level's share of the progress bar: steps x (voxels + a fixed per-step overhead)
    costs = [steps * (math.prod(s) + 20_000) for steps, s in zip(iterations, shapes)]
    bounds = torch.tensor([0.0] + costs).cumsum(0) / max(sum(costs), 1e-9)
    with progress.timed("optimise: image pyramids"):
        fixed_levels, moving_levels = _pyramid(fixed, shapes), _pyramid(moving, shapes)
    velocity = None
    for level, (steps, level_shape) in enumerate(zip(iterations, shapes)):
        scope = progress.sub(float(bounds[level]), float(bounds[level + 1]))
        stage = f"optimise level {level + 1}/{len(shapes)} ({'x'.join(map(str, level_shape))})"
        with progress.timed(f"{stage} prepare"):
            control_shape = tuple(max((n - 1) // CONTROL_SPACING + 1, 4) for n in level_shape)
            identity = _normalised_identity(level_shape, device)
            control_identity = _normalised_identity(control_shape, device)
            control_scale = _normalising_scale(control_shape, device)
            fixed_features = _features(fixed_levels[level], similarity)
            moving_features = _features(moving_levels[level], similarity)
            fixed_levels[level] = moving_levels[level] = None  # only the features are needed
            loss_of = _feature_loss(similarity, fixed_features)
            start = None  # the initial field in normalised (x, y, z) units on this level
            if initial is not None:
                start = (resize_displacement(initial, level_shape)
                         * _normalising_scale(level_shape, device)).flip(1)
            if velocity is None:
                velocity = torch.zeros((1, 3, *control_shape), device=device)
            else:
                velocity = resize_displacement(velocity.detach(), control_shape)
            velocity = velocity.clone().requires_grad_(True)
            optimiser = _Adam(velocity, learning_rate)
        with progress.timed(f"{stage} {steps} steps"):
            for step in range(steps):
                update = F.interpolate(_exponential(velocity, control_identity, control_scale),
                                       size=level_shape, mode="trilinear", align_corners=True)
                grid = identity + update.permute(0, 2, 3, 4, 1)
                if start is not None:  # compose(start, update): x + update(x) + start(x + ...)
                    # exact in the forward pass; the gradient leaves out start's own spatial
                    # derivative (the factor I + grad start of a smooth field), which spares
                    # the three-channel sampling's backward pass at every step. Pulling the
                    # moving image back through start once per level was cheaper still but
                    # interpolates the image twice: a larger ground-truth error on the tuning
                    # cases, where this kept the exact gradient's to 0.01 mm
                    with torch.no_grad():
                        shift = _sample(start, grid).permute(0, 2, 3, 4, 1)
                    grid = grid + shift
                loss_similarity = loss_of(fixed_features, _sample(moving_features, grid))
                loss = loss_similarity + weight * diffusion_loss(velocity)
                loss.backward()
                optimiser.step()
                if step % 5 == 0 or step == steps - 1:
                    scope.report((step + 1) / steps, stage, f"step {step + 1}/{steps} "
                                 f"similarity loss {loss_similarity.item():.4f}")
    # the level's images, features and grids are not needed for the final field
    del fixed_features, moving_features, fixed_levels, moving_levels, loss_of, identity, start
    with progress.timed("integrate and upsample the final field"), torch.no_grad():
        update = _to_voxels(_exponential(velocity, control_identity, control_scale), shape)
        if initial is not None:
            update = compose(resize_displacement(initial, shape), update)
    release_free_memory()  # the optimisation's temporaries, before the outputs are made
    return update


def _run(inputs: RegistrationInputs, spec: MethodSpec) -> torch.Tensor:
    iterations = inputs.options.get("iterations") or DEFAULT_ITERATIONS
    return instance_optimisation(inputs.fixed, inputs.moving, None, inputs.similarity,
                                 inputs.regularization, iterations, progress=inputs.progress)


register_method(MethodSpec(
    name="io",
    title="Instance optimisation (diffeomorphic, no training)",
    paper="Multi-level stationary-velocity optimisation with scaling and squaring "
          "(Arsigny et al. 2006; Heinrich & Hansen 2022 for CPU-fast instance optimisation)",
    description="Optimises a smooth velocity field for this pair with Adam, coarse to fine; "
                "diffeomorphic by construction, works for any anatomy, no checkpoint needed.",
    run=_run,
    similarities=SIMILARITIES,
    optimises_similarity=True,
    estimated_seconds={"2mm": 6.0, "1mm": 25.0},  # register + write outputs, 2 cores
))
