"""The upper level of MultiProp's bilevel training: loss weights tuned on a validation objective.

The paper (Liu et al., TPAMI 2022, section 5) tunes the weights ``lambda`` of its loss by bilevel
optimisation, ``min_lambda F(w*(lambda))`` subject to ``w*(lambda) = argmin_w L(w; lambda)``, with
a DARTS-like one-step approximation. Its upper objective is the same ``lambda``-weighted loss on
validation pairs: every term is non-negative, so its direct gradient ``dF/dlambda_i = l_i >= 0``
drives every weight to 0, and only ratios of the weights are identifiable anyway. Built soundly
here (docs/methods/multiprop.md):

- ``lambda`` are log-values in buffers of the network (``methods.multiprop.LossWeights``), one of
  them (the last stage's similarity weight) fixed to 1, the others clamped to a range;
- lower level: the trainer's usual step on training pairs (``multiprop.training_loss``);
- upper level: an objective that does not contain ``lambda`` -- ``1 - soft Dice`` of the warped
  moving labels plus a fixed folding barrier (``dice``), or the error against the ground-truth
  field (``field_error``) -- on pairs of random stream :data:`UPPER_LEVEL_STREAM`, which neither
  training (stream 0), checkpoint selection (validation, stream 1) nor evaluation (stream 2) use;
  ``paper`` (the lambda-weighted loss) is kept as the negative control;
- hypergradient by unrolling the step the optimiser is about to take (Adam, after clipping):
  ``w1 = w0 - s P(g)`` with ``g = sum_i lambda_i grad l_i(w0)``, so

      dF(w1)/dlambda_i = <dw1/dg  dg/dlambda_i, grad F(w1)> = -s <P' grad l_i(w0), grad F(w1)>

  exact because the loss is a weighted sum (``dg/dlambda_i = grad l_i``, no Hessian) and
  ``P'`` is the exact diagonal Jacobian of Adam's update (moments, bias corrections and epsilon
  included; :func:`adam_lookahead`), with the clipping's projection when the gradient was clipped.
  ``hypergradient: finite_difference`` replaces the inner products by the paper's central
  differences (its eq. 21) of ``l_i`` along the two directions -- forward passes only;
- every ``upper_every`` steps after ``upper_warmup`` of the run, one Adam step on the log-weights
  (:meth:`LossWeights.step`), through the trainer's ``before_step`` hook (between gradient
  clipping and ``optimiser.step()``); the trajectory goes into the model card.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from DeepRegistrationLib.losses import negative_jacobian_loss
from DeepRegistrationLib.methods import multiprop
from DeepRegistrationLib.methods.multiprop import MultiProp

from .synth import TRAIN, VALIDATION
from .train import soft_dice_loss

# random stream of the upper-level pairs: training draws stream 0, validation (checkpoint
# selection) stream 1, the evaluations (training/evaluate.py, benchmarks/heldout.py) stream 2
UPPER_LEVEL_STREAM = 3
OBJECTIVES = ("dice", "field_error", "paper")
HYPERGRADIENTS = ("unrolled", "finite_difference")
CLIPPED = 1.0 - 1e-5     # a gradient shorter than this fraction of its unclipped norm was clipped
FD_STEP = 1e-2           # the paper's (DARTS') r: a step of r / ||direction|| along it


def _dot(first: Sequence[torch.Tensor], second: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((a * b).sum() for a, b in zip(first, second))


def _norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return _dot(tensors, tensors).sqrt()


@contextlib.contextmanager
def parameters_at(parameters: Sequence[torch.Tensor], values: Sequence[torch.Tensor]):
    """The network evaluated at other parameter values (``w1``, ``w0 +- r d``), then exactly
    back at its own: the values are copied in and the originals copied back."""
    saved = [p.detach().clone() for p in parameters]
    with torch.no_grad():
        for p, v in zip(parameters, values):
            p.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(parameters, saved):
                p.copy_(v)


# ---------------------------------------------------------------------------- Adam's step
def adam_lookahead(optimiser: torch.optim.Optimizer, parameters: Sequence[torch.Tensor],
                   gradients: Sequence[torch.Tensor]
                   ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """``(w1, J)``: the parameters after the Adam step ``optimiser`` would take with
    ``gradients`` (torch's update: ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
    ``w1 = w0 - lr / c1 * m / (sqrt(v / c2) + eps)``, ``c = 1 - b^t``), and the diagonal of its
    exact Jacobian ``J = dw1/dg``,

        J = -lr / c1 * [ (1 - b1) / D  -  m (1 - b2) g / (D^2 sqrt(c2) sqrt(v)) ],
        D = sqrt(v) / sqrt(c2) + eps.

    Nothing in the optimiser changes. Plain Adam only (no weight decay, amsgrad or maximize)."""
    group_of = {id(p): group for group in optimiser.param_groups for p in group["params"]}
    after, jacobian = [], []
    for parameter, gradient in zip(parameters, gradients):
        group = group_of[id(parameter)]
        if not isinstance(optimiser, torch.optim.Adam) or group.get("weight_decay") or \
                group.get("amsgrad") or group.get("maximize"):
            raise ValueError("the upper level unrolls plain Adam steps only (no weight decay, "
                             "amsgrad or maximize)")
        state = optimiser.state.get(parameter, {})
        beta1, beta2 = group["betas"]
        lr, eps = float(group["lr"]), float(group["eps"])
        t = int(state["step"]) + 1 if "step" in state else 1
        first = state["exp_avg"] if "exp_avg" in state else torch.zeros_like(parameter)
        second = state["exp_avg_sq"] if "exp_avg_sq" in state else torch.zeros_like(parameter)
        g = gradient.detach()
        m = beta1 * first + (1 - beta1) * g
        v = beta2 * second + (1 - beta2) * g * g
        c1, c2 = 1 - beta1 ** t, 1 - beta2 ** t
        root_v = v.sqrt()
        denominator = root_v / c2 ** 0.5 + eps
        after.append(parameter.detach() - lr / c1 * m / denominator)
        curvature = torch.where(root_v > 0, m * (1 - beta2) * g
                                / (denominator ** 2 * c2 ** 0.5 * root_v.clamp_min(1e-300)),
                                torch.zeros_like(v))
        jacobian.append(-lr / c1 * ((1 - beta1) / denominator - curvature))
    return after, jacobian


# ------------------------------------------------------------------------- upper objective
def upper_objective(network: MultiProp, upper: Dict, kind: str = "dice",
                    barrier: float = 1.0, spacing_mm: float = 2.0,
                    weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F`` on the upper-level pairs ``upper`` (a ``PairGenerator.batch``), with the network's
    current parameters.

    ``dice``: ``1 - soft Dice`` of the moving labels warped by the field (the trainer's
    ``soft_dice_loss``) ``+ barrier * fold`` (``losses.negative_jacobian_loss``, a fixed weight);
    ``field_error``: the mean distance (mm) to the ground-truth field over the labelled voxels
    ``+ barrier * fold``. Neither contains the loss weights. ``paper``: the lower-level loss
    ``sum_i lambda_i l_i`` on these pairs, with ``weights`` (a tensor, so its direct gradient can
    be taken) -- the paper's upper objective, the negative control.
    """
    fixed, moving = upper["fixed"], upper["moving"]
    if kind == "paper":
        weights = network.loss_weights.tensor() if weights is None else weights
        terms = multiprop.lower_terms(network, fixed, moving, dict(upper, spacing_mm=spacing_mm))
        return sum(weights[i] * terms[name]
                   for i, name in enumerate(network.loss_weights.names))
    displacement = network(fixed, moving)
    folding = negative_jacobian_loss(displacement)
    if kind == "dice":
        return soft_dice_loss(upper["fixed_labels"], upper["moving_labels"], displacement) \
            + barrier * folding
    if kind == "field_error":
        labelled = (upper["fixed_labels"] > 0).to(displacement.dtype)
        distance = ((displacement - upper["displacement"]) ** 2).sum(1, keepdim=True) \
            .add(1e-12).sqrt() * spacing_mm
        return (distance * labelled).sum() / labelled.sum().clamp_min(1.0) + barrier * folding
    raise ValueError(f"unknown upper objective '{kind}'; choose from {', '.join(OBJECTIVES)}")


# ------------------------------------------------------------------------------ hypergradient
def hypergradient(network: MultiProp, optimiser: torch.optim.Optimizer, fixed: torch.Tensor,
                  moving: torch.Tensor, batch: Dict, upper: Dict, kind: str = "dice",
                  barrier: float = 1.0, method: str = "unrolled", fd_step: float = FD_STEP
                  ) -> Tuple[torch.Tensor, float]:
    """``(dF/dlambda (n,), F(w1))`` for the step the trainer is about to take.

    Expects the trainer's state between clipping and the step: ``p.grad`` holds the clipped
    gradient of the trainer's loss on (``fixed``, ``moving``) -- ``sum_i lambda_i l_i`` plus any
    terms without a tuned weight (a recipe's guidance) -- and ``batch["gradient_norms"]`` its
    unclipped norm (the trainer's). The network's parameters and gradients are left exactly as
    they were. ``fd_step``: the step ``r`` of the finite-difference
    method.
    """
    if method not in HYPERGRADIENTS:
        raise ValueError(f"unknown hypergradient '{method}'; choose from "
                         f"{', '.join(HYPERGRADIENTS)}")
    weights = network.loss_weights
    names = weights.names
    parameters = [p for p in network.parameters() if p.grad is not None]
    clipped = [p.grad.detach().clone() for p in parameters]
    spacing = multiprop.batch_spacing(batch)

    # F(w1) and its gradient at w1 (and, for the paper's objective, its direct gradient)
    after, jacobian = adam_lookahead(optimiser, parameters, clipped)
    with parameters_at(parameters, after):
        lam = weights.tensor().detach().to(fixed.dtype).clone().requires_grad_(kind == "paper")
        value = upper_objective(network, upper, kind, barrier, spacing, lam)
        wanted = parameters + ([lam] if kind == "paper" else [])
        found = torch.autograd.grad(value, wanted, allow_unused=True)
    grad_upper = [torch.zeros_like(p) if g is None else g
                  for p, g in zip(parameters, found[:len(parameters)])]
    direct = found[-1] if kind == "paper" else None
    # dF/dg_clipped: the chain through Adam's step
    through_step = [j * g for j, g in zip(jacobian, grad_upper)]

    # the trainer clipped g (the gradient of its whole loss: the weighted terms plus any
    # lambda-free guidance) to g_c = c g, c = min(1, clip / |g|): g_c has g's direction, and c
    # comes from the unclipped norm the trainer hands over
    norms = batch.get("gradient_norms")
    if not norms or len(norms) != 1:
        raise ValueError("the hypergradient needs the trainer's unclipped gradient norm of its "
                         "one clip group, batch['gradient_norms']")
    length = _norm(clipped)
    unit = [g / length.clamp_min(1e-30) for g in clipped]
    scale = float(length) / max(float(norms[0]), 1e-30)
    along_gradient = None
    if method == "unrolled":  # each weighted term's gradient at w0, by autograd
        terms = multiprop.lower_terms(network, fixed, moving, batch)
        term_gradients = []
        for name in names:
            found = torch.autograd.grad(terms[name], parameters, retain_graph=True,
                                        allow_unused=True)
            term_gradients.append([torch.zeros_like(p) if g is None else g
                                   for p, g in zip(parameters, found)])
        del terms
        along_step = torch.stack([_dot(grads, through_step) for grads in term_gradients])
        along_gradient = torch.stack([_dot(grads, unit) for grads in term_gradients])
    else:
        along_step = directional_derivatives(network, parameters, fixed, moving, batch,
                                             through_step, fd_step)
    if scale < CLIPPED:  # g_c = c g: dg_c/dlambda_i = c (grad l_i - u <u, grad l_i>), u = g/|g|
        if along_gradient is None:
            along_gradient = directional_derivatives(network, parameters, fixed, moving, batch,
                                                     unit, fd_step)
        result = scale * (along_step - along_gradient * _dot(unit, through_step))
    else:
        result = along_step
    if direct is not None:
        result = result + direct
    return result.detach(), float(value.detach())


def directional_derivatives(network: MultiProp, parameters: Sequence[torch.Tensor],
                            fixed: torch.Tensor, moving: torch.Tensor, batch: Dict,
                            direction: Sequence[torch.Tensor], fd_step: float = FD_STEP
                            ) -> torch.Tensor:
    """``<grad l_i(w0), d>`` for every term by the paper's central difference (its eq. 21),
    ``(l_i(w0 + r d/|d|) - l_i(w0 - r d/|d|)) / (2 r) * |d|``: two forward passes."""
    length = float(_norm(direction))
    if length == 0.0:
        return torch.zeros(len(network.loss_weights.names))
    step = fd_step / length
    values = []
    for sign in (1.0, -1.0):
        moved = [p.detach() + sign * step * d for p, d in zip(parameters, direction)]
        with parameters_at(parameters, moved), torch.no_grad():
            terms = multiprop.lower_terms(network, fixed, moving, batch)
        values.append(torch.stack([terms[n].detach() for n in network.loss_weights.names]))
    return (values[0] - values[1]) / (2.0 * step)


# --------------------------------------------------------------------------- the trainer hook
def upper_level_schedule(step: int, iterations: int, warmup: float, every: int
                         ) -> Optional[int]:
    """The number of the upper-level update due at ``step`` (0, 1, ...), or None: every
    ``every`` steps from ``round(warmup * iterations)`` on."""
    start = int(round(float(warmup) * iterations))
    every = max(int(every), 1)
    if step < start or (step - start) % every:
        return None
    return (step - start) // every


def upper_pairs(generator, update: int, count: int) -> Dict:
    """The upper-level pairs of update ``update``: items ``update * count ...`` of
    :data:`UPPER_LEVEL_STREAM` (resumable, like the training batches)."""
    assert UPPER_LEVEL_STREAM not in (TRAIN, VALIDATION)
    return generator.batch(range(update * count, (update + 1) * count), UPPER_LEVEL_STREAM)


def upper_level_step(network: MultiProp, optimiser: torch.optim.Optimizer,
                     batch: Dict) -> Optional[Dict[str, float]]:
    """The trainer's ``before_step`` hook for variant ``bilevel``: when an update is due, the
    hypergradient of the configured objective on fresh upper-level pairs (drawn by the batch's
    own generator, on its grid), one Adam step on the log-weights, a trajectory row; returns the
    terms to log."""
    config = dict(multiprop.DEFAULT_CONFIG, **(batch.get("config") or {}))
    update = upper_level_schedule(int(batch["step"]), int(batch["iterations"]),
                                  config["upper_warmup"], config["upper_every"])
    if update is None:
        return None
    generator = batch.get("generator")
    if generator is None:
        raise ValueError("the upper level draws its pairs with batch['generator'] (the trainer "
                         "gives it)")
    kind = config["upper_objective"]
    if kind not in OBJECTIVES:
        raise ValueError(f"unknown upper objective '{kind}'; choose from {', '.join(OBJECTIVES)}")
    upper = upper_pairs(generator, update, int(config["upper_pairs"]))
    gradient, value = hypergradient(network, optimiser, batch["fixed"], batch["moving"], batch,
                                    upper, kind, float(config["folding_barrier"]),
                                    config["hypergradient"])
    weights = network.loss_weights
    # dF/dlog(lambda) = lambda dF/dlambda
    weights.step(gradient.double() * weights.tensor().double(), float(config["upper_lr"]))
    weights.record(int(batch["step"]), value)
    logged = {"upper_objective": value}
    logged.update({f"hypergradient_{name}": float(g) for name, g, tunable in
                   zip(weights.names, gradient, weights.tunable) if tunable})
    return logged
