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

from ..losses import (diffusion_loss, local_ncc_loss, local_statistics, mind_ssc,
                      similarity_loss)
from ..progress import ProgressScope
from ..spatial import compose, integrate_velocity, resize_displacement, resize_image, warp
from .base import MethodSpec, RegistrationInputs, pyramid_shapes, register_method

# Defaults chosen on synthetically deformed MNI152 brains at 2 mm against ANTs SyN in the same
# run (benchmarks/benchmark.py): most steps at 1/4 and 1/2 resolution, a short full-resolution
# polish.
DEFAULT_ITERATIONS = (80, 30, 6)
DEFAULT_REGULARIZATION = {"lncc": 5.0, "mind": 1.0, "ncc": 1.0, "mse": 0.5, "ngf": 1.0, "mi": 1.0}
DEFAULT_LEARNING_RATE = 0.2
DEFAULT_MAX_VOXELS = 1_500_000
LNCC_WINDOW = 5  # voxels of each level: wider in millimetres on the coarse levels
CONTROL_SPACING = 2  # voxels of the level's grid between velocity control points


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
    shapes = pyramid_shapes(shape, len(iterations), max_voxels)
    # each level's share of the progress bar: steps x (voxels + a fixed per-step overhead)
    costs = [steps * (math.prod(s) + 20_000) for steps, s in zip(iterations, shapes)]
    bounds = torch.tensor([0.0] + costs).cumsum(0) / max(sum(costs), 1e-9)
    velocity = None
    for level, (steps, level_shape) in enumerate(zip(iterations, shapes)):
        scope = progress.sub(float(bounds[level]), float(bounds[level + 1]))
        stage = f"optimise level {level + 1}/{len(shapes)} ({'x'.join(map(str, level_shape))})"
        with progress.timed(f"{stage} prepare"):
            control_shape = tuple(max((n - 1) // CONTROL_SPACING + 1, 4) for n in level_shape)
            fixed_features = _features(resize_image(fixed, level_shape), similarity)
            moving_features = _features(resize_image(moving, level_shape), similarity)
            loss_of = _feature_loss(similarity, fixed_features)
            start = resize_displacement(initial, level_shape) if initial is not None else None
            if velocity is None:
                velocity = torch.zeros((1, 3, *control_shape), device=fixed.device)
            else:
                velocity = resize_displacement(velocity.detach(), control_shape)
            velocity = velocity.clone().requires_grad_(True)
            optimiser = _Adam(velocity, learning_rate)
        with progress.timed(f"{stage} {steps} steps"):
            for step in range(steps):
                update = resize_displacement(integrate_velocity(velocity, None), level_shape)
                total = compose(start, update) if start is not None else update
                loss_similarity = loss_of(fixed_features, warp(moving_features, total))
                loss = loss_similarity + weight * diffusion_loss(velocity)
                loss.backward()
                optimiser.step()
                if step % 5 == 0 or step == steps - 1:
                    scope.report((step + 1) / steps, stage, f"step {step + 1}/{steps} "
                                 f"similarity loss {loss_similarity.item():.4f}")
    with progress.timed("integrate and upsample the final field"), torch.no_grad():
        update = resize_displacement(integrate_velocity(velocity, None), shape)
        return compose(resize_displacement(initial, shape), update) if initial is not None \
            else update


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
    similarities=("lncc", "mind", "ncc", "mse", "ngf", "mi"),
    estimated_seconds={"2mm": 6.0, "1mm": 25.0},  # register + write outputs, 2 cores
))
