"""One training loop for every network method, on synthetic pairs of real anatomy.

``python -m training train --method vm-diff --iterations 2000 --source all``
(writes ``Resources/checkpoints/vm-diff.pt`` unless ``--output`` says otherwise)

What the loop does
------------------
- data: :class:`training.synth.PairGenerator` on the method's working grid
  (``spec.working_spacing_mm``, or ``--spacing``), batch ``n`` = items ``n*B .. n*B+B-1``, so a
  resumed run sees exactly the data an uninterrupted one would have seen (``--overfit N`` cycles
  over the first N items instead: a check that a network and its loss can learn at all);
- curriculum: the first ``fraction`` of the steps (default 60%) run on a coarse grid (default
  8 mm) with a larger batch (default 8), the rest on the working grid; a fully convolutional
  network carries over, and the coarse steps cost about what a working-grid step does, so the
  run sees many more pairs (``--coarse-spacing 0`` switches it off); validation runs on the
  stage's grid (the same cases), and only working-grid checkpoints compete for "best";
- optimiser: Adam, learning rate warmed up linearly over the first 5% of the steps, constant to
  half of the run, then decayed on a half cosine to 10% of ``--lr``; gradient norm clipped at 10;
- validation every ``--val-every`` steps (and at step 0 and at the end) on fixed held-out
  synthetic cases (``PairGenerator.validation_pairs``: same cases for every seed): mean Dice of the
  warped moving labels, % folding voxels, SDlogJ, NCC, the loss, and the mean error against the
  ground-truth field in mm; the checkpoint with the best mean Dice is kept (ties: lower loss);
- outputs: ``--output NAME.pt`` (weights, via ``base.save_checkpoint``) with its model card
  ``NAME.json`` (sha256 added by ``save_checkpoint``), ``NAME.log`` (the log), and
  ``NAME.resume.pt`` (weights + optimiser + step, for ``--resume``).

Loss schema: ``MethodSpec.training``
------------------------------------
A mapping read by :func:`loss_terms`:

``"similarity": (name, weight)`` or ``(name, weight, {options})``
    ``losses.SIMILARITIES[name](fixed, warp(moving, u), **options)`` times ``weight``
    (``lncc``, ``mind``, ``ncc``, ``mse``, ``ngf``). Default ``("lncc", 1.0)``.
``"diffusion" | "total_variation" | "negative_jacobian": weight``
    ``losses.diffusion_loss(u)`` etc. of the predicted displacement ``u``, times ``weight``.
``"dice": weight``
    ``1 - soft Dice`` of the one-hot moving labels warped by ``u`` (trilinear) against the fixed
    labels (semi-supervised; synthetic pairs always have labels).
``"lr"``, ``"batch_size"``: defaults for ``--lr`` and ``--batch-size``.
``"curriculum"``: ``{"spacing_mm", "fraction", "batch_size"}`` of the coarse stage (below), or None.
``"synth"``: defaults for ``SynthConfig`` fields (``--synth`` overrides them), e.g. no
    second-contrast pairs for a method trained with a same-contrast similarity.
``"loss_fn"``: a callable that replaces all of the above (see below).
``"clip_groups"``: ``clip_groups(network) -> [parameters, ...]``: groups whose gradient norms
    are clipped (at 10) each on its own; default one group, every parameter. A network with
    training-only parts (MMLN's branches) clips them apart from the deployed network, so their
    gradients never rescale its step.
``"before_step"``: ``before_step(network, optimiser, batch) -> terms or None``, called after the
    gradient is clipped and before ``optimiser.step()`` (e.g. a bilevel upper level that moves
    loss weights kept in the network's buffers); ``batch["generator"]`` is the batch's
    ``PairGenerator``, for pairs of its own from another stream; ``batch["gradient_norms"]`` the
    unclipped norm of each clip group; returned terms are logged.
``"card"``: ``card(network) -> dict`` merged into the model card (e.g. the loss weights).

The special-loss hook: ``spec.training["loss_fn"]``
---------------------------------------------------
``loss_fn(network, fixed, moving, batch) -> (total_loss, terms)``

- ``network``: the method's ``torch.nn.Module`` (``spec.build_network(config)``), in train mode
  during training and eval mode (under ``torch.no_grad()``) during validation;
- ``fixed``, ``moving``: ``(B, 1, D, H, W)`` float32 in [0, 1] on the working grid (sides a
  multiple of ``spec.size_multiple``);
- ``batch``: a dict with ``fixed_labels``, ``moving_labels`` (``(B, 1, D, H, W)`` int64),
  ``displacement`` (ground truth ``(B, 3, D, H, W)`` in voxels: ``warp(moving, u) ~= fixed``),
  ``generating`` (``moving = warp(fixed, generating)`` before intensity augmentation),
  ``source`` and ``multimodal`` (lists of B), ``step`` (0-based index of this optimiser step),
  ``iterations`` (total steps of the run: schedule phases with ``step / iterations``),
  ``training`` (bool), ``spec`` (the MethodSpec), ``config`` (the network config) and, while
  training, ``spacing_mm`` (the grid of this batch's curriculum stage) and ``working_spacing_mm``
  (the run's final grid);
- returns the scalar tensor to minimise (it must have a graph when ``batch["training"]``) and a
  dict ``{name: float or 0-d tensor}`` of the terms to log (the total is logged as ``loss``).

The trainer calls ``total.backward()`` and steps Adam over ``network.parameters()``; a phase that
freezes part of the network can set ``requires_grad_(False)`` on it (Adam skips parameters
without a gradient). Validation metrics always come from ``network(fixed, moving)`` -- the
displacement of the method's contract -- whatever the loss.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from DeepRegistrationLib import __version__, losses
from DeepRegistrationLib.errors import UserInputError
from DeepRegistrationLib.methods import get_method, save_checkpoint
from DeepRegistrationLib.methods.base import (MethodSpec, read_checkpoint, read_model_card,
                                          scored_pair, sha256_of)
from DeepRegistrationLib.metrics import (dice, folding_percent, folding_percent_strict,
                                         jacobian_determinant_map, ncc, sdlogj)
from DeepRegistrationLib.spatial import warp

from .data import parse_sources
from .recipes import get_recipe
from .synth import VALIDATION_SEED, PairGenerator, SynthConfig

LossFunction = Callable[..., Tuple[torch.Tensor, Dict[str, float]]]
REGULARISERS = {
    "diffusion": losses.diffusion_loss,
    "total_variation": losses.total_variation_loss,
    "negative_jacobian": losses.negative_jacobian_loss,
}
RESERVED_KEYS = {"similarity", "dice", "lr", "batch_size", "loss_fn", "curriculum", "synth",
                 "before_step", "card", "clip_groups"}
GRADIENT_CLIP_NORM = 10.0
# the default coarse-to-fine curriculum (``MethodSpec.training["curriculum"]`` overrides it).
# Measured on MNI152 pairs (vm-diff, LNCC): batch 1 at 4 mm stayed at the identity for 400+ steps
# (the field of a random pair is mostly an affine the network must first learn to see, and one
# pair per step is too noisy a signal); batch 8 at 8 mm, at the same cost per step, halved the
# ground-truth error within 250 steps. The fine stage then adapts the network to its working grid.
DEFAULT_CURRICULUM = {"spacing_mm": 8.0, "fraction": 0.6, "batch_size": 8}


# ------------------------------------------------------------------------------------ losses
def soft_dice_loss(fixed_labels: torch.Tensor, moving_labels: torch.Tensor,
                   displacement: torch.Tensor) -> torch.Tensor:
    """``1 - mean soft Dice`` over the foreground labels of one-hot maps, moving warped by u."""
    classes = int(max(fixed_labels.max(), moving_labels.max())) + 1
    if classes < 2:
        return displacement.sum() * 0.0
    dtype = displacement.dtype  # float64 in the upper level's finite-difference test
    one_hot_f = F.one_hot(fixed_labels[:, 0], classes).permute(0, 4, 1, 2, 3).to(dtype)[:, 1:]
    one_hot_m = F.one_hot(moving_labels[:, 0], classes).permute(0, 4, 1, 2, 3).to(dtype)[:, 1:]
    warped = warp(one_hot_m, displacement, padding_mode="zeros")
    overlap = (one_hot_f * warped).sum((2, 3, 4))
    total = one_hot_f.sum((2, 3, 4)) + warped.sum((2, 3, 4))
    present = total > 0
    return 1.0 - (2.0 * overlap / total.clamp_min(1e-6))[present].mean()


def loss_terms(training: Dict) -> List[Tuple[str, float, Callable]]:
    """Resolve a ``MethodSpec.training`` mapping into ``[(name, weight, fn(u, batch))]``."""
    unknown = set(training) - RESERVED_KEYS - set(REGULARISERS)
    if unknown:
        raise ValueError(f"unknown training loss(es) {sorted(unknown)}; known: similarity, dice, "
                         f"{', '.join(REGULARISERS)} (or supply loss_fn)")
    similarity = training.get("similarity", ("lncc", 1.0))
    name, weight = similarity[0], float(similarity[1])
    options = dict(similarity[2]) if len(similarity) > 2 else {}
    function = losses.similarity_loss(name)
    terms = [(name, weight, lambda u, b: function(b["fixed"], warp(b["moving"], u), **options))]
    for key, regulariser in REGULARISERS.items():
        if training.get(key):
            terms.append((key, float(training[key]), lambda u, b, r=regulariser: r(u)))
    if training.get("dice"):
        terms.append(("dice", float(training["dice"]), GUIDANCE["dice"]))
    return terms


def supervised_field_loss(displacement: torch.Tensor, truth: torch.Tensor,
                          mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean end-point error (voxels) of the field against the synthetic pair's ground truth,
    over ``mask`` (``(B, 1, D, H, W)``) when given: outside the anatomy the true field (mostly
    the residual affine, largest at the window's corners) cannot be seen in the images."""
    error = ((displacement - truth).pow(2).sum(1, keepdim=True) + 1e-6).sqrt()
    if mask is None:
        return error.mean()
    weights = mask.to(error.dtype)
    return (error * weights).sum() / weights.sum().clamp_min(1.0)


GUIDANCE = {
    "dice": lambda u, b: soft_dice_loss(b["fixed_labels"], b["moving_labels"], u),
    "supervised": lambda u, b: supervised_field_loss(u, b["displacement"],
                                                     b["fixed_labels"] > 0),
}


def split_guidance(guidance: Optional[Dict[str, float]]) -> Tuple[float, Dict[str, float]]:
    """``(weight of the method's own loss, {GUIDANCE term: weight})`` of a guidance mapping:
    ``"method"`` weighs the method's own (the paper's) loss, 1 unless given; zero-weight terms
    are dropped; an unknown term is a user error."""
    guidance = {k: float(w) for k, w in (guidance or {}).items()}
    own_weight = guidance.pop("method", 1.0)
    guidance = {k: w for k, w in guidance.items() if w}
    unknown = set(guidance) - set(GUIDANCE)
    if unknown:
        raise UserInputError(f"unknown guidance term(s) {sorted(unknown)}; known: "
                             f"method, {', '.join(GUIDANCE)}")
    return own_weight, guidance


def make_loss_fn(spec: MethodSpec, guidance: Optional[Dict[str, float]] = None) -> LossFunction:
    """The method's ``loss_fn`` hook, or the weighted sum of the schema's terms; plus the
    recipe's ``guidance`` terms on the final field (label Dice, ground-truth end-point error)."""
    own_weight, guidance = split_guidance(guidance)
    own = spec.training.get("loss_fn") if callable(spec.training.get("loss_fn")) else None
    if own is not None and not guidance and own_weight == 1.0:
        return own
    terms = [] if own is not None else [(name, weight * own_weight, function) for
                                        name, weight, function in loss_terms(spec.training)]
    terms = terms + [(f"guidance_{name}", weight, GUIDANCE[name])
                     for name, weight in guidance.items()]

    def loss_fn(network, fixed, moving, batch):
        context = dict(batch, fixed=fixed, moving=moving)
        if batch.get("clean") and own is None:  # the schema's terms score the clean pair
            context["fixed"], context["moving"] = scored_pair(fixed, moving, batch)
        total, logged = 0.0, {}
        if own is not None:  # the method reports its final field in ``outputs``
            outputs = {}
            total, logged = own(network, fixed, moving, dict(batch, outputs=outputs))
            total, logged = total * own_weight, dict(logged)
            if "displacement" not in outputs:
                raise ValueError(f"{spec.name}'s loss_fn does not report its final field "
                                 "(batch['outputs']['displacement']): no guidance possible")
            displacement = outputs["displacement"]
        else:
            displacement = network(fixed, moving)
        for name, weight, function in terms:
            value = function(displacement, context)
            logged[name] = float(value.detach())
            total = total + weight * value
        return total, logged
    return loss_fn


def check_recipe_losses(spec: MethodSpec, guidance: Dict, clean_similarity: bool) -> None:
    """A method with its own ``loss_fn`` takes the recipe's guidance terms and clean similarity
    only if it says so (``training["recipe_losses"]``: its loss reports the final field with
    ``base.report_field`` and scores ``base.scored_pair``); the others are refused up front."""
    own_weight, terms = split_guidance(guidance)
    asks = bool(terms) or own_weight != 1.0 or clean_similarity
    if asks and callable(spec.training.get("loss_fn")) and not spec.training.get("recipe_losses"):
        raise UserInputError(
            f"{spec.name}'s training loss does not take the recipe's guidance terms or clean "
            "similarity yet; train it with --guidance '{}' --clean-similarity no")


def describe_losses(spec: MethodSpec) -> Dict:
    if callable(spec.training.get("loss_fn")):
        fn = spec.training["loss_fn"]
        return {"loss_fn": f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"}
    return {key: (list(value) if isinstance(value, tuple) else value)
            for key, value in spec.training.items()
            if key not in ("lr", "batch_size", "recipe_losses")}


# --------------------------------------------------------------------------------- validation
def validate(network: torch.nn.Module, pairs, loss_fn: LossFunction, spec: MethodSpec,
             config: Dict, spacing_mm: float) -> Dict[str, float]:
    """Mean metrics over the validation pairs; ``network(fixed, moving)`` gives the field.
    Estimates kept by power iteration are converged first (R2Net's operator norms), so the
    figures are those of the network that is saved and deployed."""
    from DeepRegistrationLib.methods.r2net import converge_operator_norms

    was_training = network.training
    converge_operator_norms(network)
    network.eval()
    rows = []
    with torch.no_grad():
        for index, pair in enumerate(pairs):
            batch = {"fixed_labels": pair.fixed_labels, "moving_labels": pair.moving_labels,
                     "displacement": pair.displacement, "generating": pair.generating,
                     "source": [pair.source], "multimodal": [pair.multimodal], "step": -1,
                     "iterations": 0, "training": False, "spec": spec, "config": config}
            loss, _ = loss_fn(network, pair.fixed, pair.moving, batch)
            displacement = network(pair.fixed, pair.moving).float()
            rows.append(pair_metrics(pair, displacement, spacing_mm, loss=float(loss)))
    network.train(was_training)
    return {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}


def pair_metrics(pair, displacement: torch.Tensor, spacing_mm: float,
                 loss: Optional[float] = None) -> Dict[str, float]:
    """Dice, folding (central differences and the strict one-sided measure), SDlogJ, NCC and
    ground-truth error of one synthetic pair's field."""
    fixed_labels = pair.fixed_labels[0, 0].numpy()
    warped_labels = warp(pair.moving_labels.float(), displacement, mode="nearest",
                         padding_mode="zeros")[0, 0].long().numpy()
    overlap = dice(fixed_labels, warped_labels)
    determinant = jacobian_determinant_map(displacement)
    foreground = fixed_labels > 0
    error = (displacement - pair.displacement).norm(dim=1)[0].numpy()[foreground] * spacing_mm
    warped = warp(pair.moving, displacement)[0, 0].numpy()
    row = {"dice": float(np.mean(list(overlap.values()))) if overlap else float("nan"),
           "folding_percent": folding_percent(determinant),
           "folding_percent_strict": folding_percent_strict(displacement),
           "sdlogj": sdlogj(determinant),
           "ncc": ncc(pair.fixed[0, 0].numpy(), warped),
           "gt_error_mm": float(error.mean()) if error.size else float("nan")}
    if loss is not None:
        row["loss"] = loss
    return row


def identity_metrics(pairs, spacing_mm: float) -> Dict[str, float]:
    rows = [pair_metrics(p, torch.zeros_like(p.displacement), spacing_mm) for p in pairs]
    return {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}


# ------------------------------------------------------------------------------- the run
@dataclass
class TrainOptions:
    method: str
    output: str
    iterations: int = 1000
    sources: Sequence[str] = ("mni152",)
    seed: int = 0
    resume: Optional[str] = None
    val_every: int = 100
    val_cases: int = 6
    lr: Optional[float] = None
    batch_size: Optional[int] = None
    spacing_mm: Optional[float] = None
    config: Dict = field(default_factory=dict)   # overrides of spec.config
    synth: Dict = field(default_factory=dict)    # overrides of SynthConfig fields
    threads: Optional[int] = None
    overfit: int = 0          # > 0: cycle over the first N training items (a debugging aid)
    coarse_spacing_mm: Optional[float] = None    # None: from the spec (or the default); 0: off
    coarse_fraction: Optional[float] = None
    coarse_batch_size: Optional[int] = None
    curriculum: bool = True   # False: every step on the working grid (e.g. to continue a run)
    progress: bool = True
    log_every: int = 10
    recipe: Optional[str] = None     # training.recipes: sources, synthetic data, stages, grid
    unseen_sources: Sequence[str] = ()  # validated (logged, in the card), never trained on
    guidance: Optional[Dict] = None  # None: the recipe's; else terms on the final field
    clean_similarity: Optional[bool] = None  # None: the recipe's (methods.base.scored_pair)


class ProgressBar:
    """A plain stderr progress bar (one updating line on a terminal, periodic lines otherwise)."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True, stream=None):
        self.total, self.start, self.enabled = total, start, enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.began = time.perf_counter()
        self.every = max(1, total // 20)

    def update(self, step: int, message: str) -> None:
        if not self.enabled:
            return
        done = step - self.start
        elapsed = time.perf_counter() - self.began
        rate = elapsed / max(done, 1)
        eta = rate * (self.total - step)
        width = 24
        filled = int(width * step / max(self.total, 1))
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {step}/{self.total} {message} "
                f"{rate:.2f} s/it ETA {eta:5.0f} s")
        if self.tty:
            self.stream.write("\r" + line[:150].ljust(150))
            self.stream.flush()
        elif step % self.every == 0 or step == self.total:
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


class Logger:
    def __init__(self, path: str, echo: bool = False):
        self.path = path
        self.echo = echo
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def __call__(self, message: str) -> None:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        with open(self.path, "a") as handle:
            handle.write(f"{stamp} {message}\n")
        if self.echo:
            print(message, file=sys.stderr, flush=True)


def side_paths(output: str) -> Dict[str, str]:
    stem = os.path.splitext(os.path.abspath(output))[0]
    return {"log": stem + ".log", "resume": stem + ".resume.pt", "card": stem + ".json"}


def stage_checkpoint_path(output: str, spacing_mm: float) -> str:
    """Where the network is kept as it was at the end of a coarse stage (e.g. ``vtn.4mm.pt``
    beside ``vtn.pt``): a network for that coarser working grid, faster and less detailed, and
    the 4 mm side of the trade-off against the finished 2 mm one."""
    stem = os.path.splitext(os.path.abspath(output))[0]
    return f"{stem}.{spacing_mm:g}mm.pt"


def resolve_curriculum(spec: MethodSpec, options: TrainOptions, spacing: float,
                       stages: Optional[List[Dict]] = None) -> List[Dict]:
    """The coarse stages before the working grid, coarse to fine: each
    ``{"spacing_mm", "fraction", "batch_size", "steps"}`` where ``steps`` is the first step
    *after* the stage (cumulative). ``stages`` (a recipe's) or the spec's ``curriculum`` (one dict
    or a list) or the default; the ``--coarse-*`` options change the first stage (spacing 0
    drops it); ``options.curriculum`` False (``--no-curriculum``) drops them all. Stages not
    coarser than the working grid are dropped."""
    if not options.curriculum:
        return []
    if stages is None:
        base = spec.training.get("curriculum", DEFAULT_CURRICULUM)
        if base is None and options.coarse_spacing_mm is None:
            return []
        base = base if isinstance(base, list) else [base or {}]
        stages = [dict(DEFAULT_CURRICULUM, **b) for b in base]
    stages = [dict(s) for s in stages]
    first = stages[0]
    if options.coarse_spacing_mm is not None:
        first["spacing_mm"] = float(options.coarse_spacing_mm)
    if options.coarse_fraction is not None:
        first["fraction"] = float(options.coarse_fraction)
    if options.coarse_batch_size is not None:
        first["batch_size"] = int(options.coarse_batch_size)
    if not 0.0 <= sum(s["fraction"] for s in stages) < 1.0 or \
            any(s["fraction"] < 0 for s in stages):
        raise UserInputError("--coarse-fraction must be in [0, 1) (with the other stages, the "
                             "coarse share of the steps must stay below 1)")
    if any(s["batch_size"] < 1 for s in stages):
        raise UserInputError("--coarse-batch-size must be at least 1")
    resolved, end = [], 0
    for stage in stages:
        steps = int(round(stage["fraction"] * options.iterations))
        if not stage["spacing_mm"] or stage["spacing_mm"] <= spacing or steps == 0:
            continue
        end += steps
        resolved.append(dict(stage, steps=end))
    return resolved


def learning_rate_factor(step: int, iterations: int) -> float:
    """Linear warm-up over 5% of the steps, constant to half of the run, then half-cosine decay
    from 1 to 0.1. (A cosine over the whole run halves the mean rate; in short CPU runs that
    cost more than the late decay gained: on 8 mm pairs, the ground-truth error after 300 steps
    was 5.1 mm with it against 2.8 mm at a constant rate.)"""
    warmup = max(1, int(0.05 * iterations))
    if step < warmup:
        return (step + 1) / warmup
    plateau = max(warmup, iterations // 2)
    if step < plateau:
        return 1.0
    progress = (step - plateau) / max(iterations - plateau, 1)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def train(options: TrainOptions) -> Dict:
    """Train ``options.method``; returns the model card of the best checkpoint."""
    spec = get_method(options.method)
    if spec.build_network is None:
        raise UserInputError(f"method '{spec.name}' has no network to train")
    if options.iterations < 1:
        raise UserInputError("--iterations must be at least 1")
    if options.threads:
        torch.set_num_threads(int(options.threads))
    paths = side_paths(options.output)
    log = Logger(paths["log"])
    unknown = set(options.config or {}) - set(spec.config)
    if unknown:
        raise UserInputError(f"unknown config key(s) {', '.join(sorted(unknown))} for "
                             f"'{spec.name}'; its config is {json.dumps(spec.config)}")
    config = dict(spec.config, **(options.config or {}))
    recipe = get_recipe(options.recipe) if options.recipe else None
    recipe_plan = recipe.for_method(int(spec.training.get("batch_size", 4))) if recipe else {}
    spacing = float(options.spacing_mm or (recipe.spacing_mm if recipe else None)
                    or spec.working_spacing_mm or 4.0)
    lr = float(options.lr or spec.training.get("lr", 1e-3))
    batch_size = int(options.batch_size or recipe_plan.get("batch_size")
                     or spec.training.get("batch_size", 1))
    sources = list(options.sources)
    unseen = list(options.unseen_sources)
    for name in sources:
        if isinstance(name, str):
            parse_sources(name)  # clear install message for a missing source

    state = _load_state(options.resume, spec) if options.resume else None
    if state is not None and "optimizer" in state:
        config = dict(state["config"])  # a resumed run keeps its network
    torch.manual_seed(options.seed)
    network = spec.build_network(config)
    optimiser = torch.optim.Adam(network.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: learning_rate_factor(step, options.iterations))
    step, best, history, elapsed = 0, None, [], 0.0

    warm_start = None
    if state is not None:
        step, best, history, elapsed = _resume(state, options.resume, network, optimiser,
                                               scheduler, log)
        if "optimizer" not in state:  # weights only: say where they came from
            previous = read_model_card(options.resume) or {}
            warm_start = {"checkpoint": os.path.basename(options.resume),
                          "sha256": sha256_of(options.resume),
                          "trained_on": [s.get("name") for s in
                                         previous.get("data", {}).get("sources", [])],
                          "iterations": previous.get("training", {}).get("iterations"),
                          "lineage": training_lineage(previous, options.resume)}
        elif state.get("warm_start"):
            warm_start = state["warm_start"]

    try:
        # SynthConfig defaults < the method's own < the recipe's < --synth
        synth = SynthConfig(**{"spacing_mm": spacing, "multiple": max(spec.size_multiple, 1),
                               **_tuples(spec.training.get("synth") or {}),
                               **_tuples(recipe.synth if recipe else {}),
                               **({"crop_shape": recipe.crop} if recipe and recipe.crop else {}),
                               **_tuples(options.synth or {})})
    except TypeError as error:
        raise UserInputError(f"bad synthetic-data option: {error}") from None
    generator = PairGenerator(sources, synth, seed=options.seed)
    stages = resolve_curriculum(spec, options, spacing,
                                recipe_plan.get("stages") if recipe else None)
    # a coarse stage trains on whole canvases unless it names its own windows ("crop")
    stage_generators = [PairGenerator(sources, replace(
        synth, spacing_mm=st["spacing_mm"],
        crop_shape=tuple(st["crop"]) if st.get("crop") else None), seed=options.seed)
        for st in stages]
    first_fine_step = stages[-1]["steps"] if stages else 0
    validation = generator.validation_pairs(options.val_cases)
    baseline = identity_metrics(validation, spacing)
    # the same cases without their residual affine: what the deformable part achieves (logged
    # and kept in the card; the choice of the best step stays with the cases above)
    deformable_validation = generator.validation_pairs(options.val_cases, affine=False)
    deformable_baseline = identity_metrics(deformable_validation, spacing)
    # during a coarse stage the network is validated where it trains (the same cases on the
    # stage's grid), so the log shows its progress; only working-grid results compete for "best"
    stage_validation = [g.validation_pairs(options.val_cases) for g in stage_generators]
    # anatomy the network never trains on: logged and kept in the card, never used to choose
    unseen_generator = PairGenerator(unseen, synth, seed=options.seed) if unseen else None
    unseen_validation = unseen_generator.validation_pairs(options.val_cases) if unseen else []
    unseen_baseline = identity_metrics(unseen_validation, spacing) if unseen else None
    guidance = dict(recipe.guidance if recipe else {}) if options.guidance is None \
        else dict(options.guidance)
    # the similarity scores the pair before its acquisition effects (base.scored_pair)
    clean_similarity = bool(recipe.clean_similarity if recipe else False) \
        if options.clean_similarity is None else bool(options.clean_similarity)
    check_recipe_losses(spec, guidance, clean_similarity)
    loss_options = {"guidance": guidance, "clean_similarity": clean_similarity}
    if state is not None and "optimizer" in state and state.get("loss_options") is not None \
            and state["loss_options"] != loss_options:
        # a resumed run continues one run: half of it on other loss terms would be neither
        raise UserInputError(
            f"'{options.resume}' was trained with guidance {state['loss_options']['guidance']} "
            f"and clean similarity {state['loss_options']['clean_similarity']}; this command asks "
            f"for guidance {guidance} and clean similarity {clean_similarity}: resume with the "
            "run's own --recipe/--guidance/--clean-similarity, or start a new run")
    loss_fn = make_loss_fn(spec, guidance)
    parameters = sum(p.numel() for p in network.parameters())
    log(f"train {spec.name}: {parameters} parameters, config {json.dumps(config)}, sources "
        f"{generator.names}, canvas {generator.canvas} at {spacing} mm, batch {batch_size}, "
        f"lr {lr}, iterations {options.iterations}, seed {options.seed}, start step {step}, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads")
    if recipe:
        log(f"recipe {recipe.name}: {json.dumps(recipe.describe())}")
    begin = 0
    for stage, stage_generator in zip(stages, stage_generators):
        log(f"curriculum: steps {begin}-{stage['steps'] - 1} at {stage['spacing_mm']} mm "
            f"(canvas {stage_generator.canvas}, batch {stage['batch_size']})")
        begin = stage["steps"]
    if stages:
        log(f"curriculum: then {spacing} mm"
            + (f" on {tuple(synth.crop_shape)} windows" if synth.crop_shape else ""))
    log(f"validation: {len(validation)} cases (seed {VALIDATION_SEED}); identity {_fmt(baseline)}")
    log(f"deformable validation (the same cases without their affine part): identity "
        f"{_fmt(deformable_baseline)}")
    for stage, pairs in zip(stages, stage_validation):
        log(f"validation at {stage['spacing_mm']} mm (coarse stage): identity "
            f"{_fmt(identity_metrics(pairs, stage['spacing_mm']))}")
    if unseen:
        log(f"unseen-anatomy validation ({', '.join(unseen_generator.names)}): identity "
            f"{_fmt(unseen_baseline)}")

    def card_for(metrics: Dict, at_step: int) -> Dict:
        return {
            "title": spec.title, "paper": spec.paper,
            "working_spacing_mm": spacing, "parameters": parameters,
            "data": generator.describe(),
            "training": {"iterations": at_step, "planned_iterations": options.iterations,
                         "batch_size": batch_size, "lr": lr, "optimiser": "Adam",
                         "schedule": "linear warm-up 5%, constant to 50%, half-cosine decay "
                                     "to 0.1 x lr",
                         "gradient_clip_norm": GRADIENT_CLIP_NORM, "seed": options.seed,
                         "curriculum": stages,
                         "warm_start": warm_start,
                         "recipe": recipe.describe() if recipe else None,
                         "overfit_items": options.overfit or None,
                         "losses": describe_losses(spec), "guidance": guidance,
                         "clean_similarity": clean_similarity,
                         "wall_time_seconds": round(elapsed, 1),
                         "seconds_per_step": round(elapsed / max(at_step, 1), 4),
                         **lineage_totals(_ancestors(warm_start), at_step, elapsed),
                         "device": "cpu", "threads": torch.get_num_threads(),
                         "torch_version": torch.__version__,
                         "python": platform.python_version()},
            "validation": {"cases": len(validation), "seed": VALIDATION_SEED, "step": at_step,
                           "metrics": metrics, "identity": baseline, "history": history,
                           "sources": list(generator.names)},
            "deformable_validation": {"identity": deformable_baseline,
                                      "metrics": deformable_metrics},
            "unseen_validation": {"sources": list(unseen_generator.names),
                                  "identity": unseen_baseline,
                                  "metrics": unseen_metrics} if unseen else None,
            **(spec.training["card"](network) if callable(spec.training.get("card")) else {}),
            "created": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv) if sys.argv and sys.argv[0] else None,
        }

    unseen_metrics = deformable_metrics = None

    def run_validation(at_step: int) -> None:
        nonlocal best, unseen_metrics, deformable_metrics
        for stage, pairs in zip(stages, stage_validation):
            if at_step < stage["steps"]:
                metrics = validate(network, pairs, loss_fn, spec, config, stage["spacing_mm"])
                history.append(dict(metrics, step=at_step, spacing_mm=stage["spacing_mm"]))
                log(f"step {at_step}: validation at {stage['spacing_mm']} mm {_fmt(metrics)}")
                return
        metrics = validate(network, validation, loss_fn, spec, config, spacing)
        history.append(dict(metrics, step=at_step, spacing_mm=spacing))
        log(f"step {at_step}: validation {_fmt(metrics)}")
        deformable_metrics = validate(network, deformable_validation, loss_fn, spec, config,
                                      spacing)
        history[-1]["deformable"] = deformable_metrics
        log(f"step {at_step}: deformable validation {_fmt(deformable_metrics)}")
        if unseen:
            unseen_metrics = validate(network, unseen_validation, loss_fn, spec, config, spacing)
            history[-1]["unseen"] = unseen_metrics
            log(f"step {at_step}: unseen-anatomy validation {_fmt(unseen_metrics)}")
        score = (metrics["dice"], -metrics["loss"])
        if at_step > first_fine_step and (best is None or score > tuple(best["score"])):
            best = {"score": list(score), "step": at_step, "metrics": metrics}
            card = save_checkpoint(options.output, network, spec.name, config,
                                   card_for(metrics, at_step))
            log(f"step {at_step}: best so far, saved {options.output} (sha256 "
                f"{card['sha256'][:12]})")

    def save_stage_checkpoint(stage: Dict) -> None:
        """The network at the end of a coarse stage, validated there, as a checkpoint whose
        working grid is the stage's (it never competes with the working-grid "best")."""
        pairs = stage_validation[stages.index(stage)]
        metrics = validate(network, pairs, loss_fn, spec, config, stage["spacing_mm"])
        card = card_for(metrics, step)
        card["working_spacing_mm"] = stage["spacing_mm"]
        card["training"]["stage_snapshot"] = (
            f"the network at the end of the {stage['spacing_mm']:g} mm curriculum stage (step "
            f"{step} of {options.iterations}); validation on that stage's grid")
        card["validation"]["identity"] = identity_metrics(pairs, stage["spacing_mm"])
        card["deformable_validation"] = card["unseen_validation"] = None
        path = stage_checkpoint_path(options.output, stage["spacing_mm"])
        saved = save_checkpoint(path, network, spec.name, config, card)
        log(f"step {step}: end of the {stage['spacing_mm']:g} mm stage, saved {path} (sha256 "
            f"{saved['sha256'][:12]}; {_fmt(metrics)})")

    if step == 0:
        run_validation(0)
    _interrupt_on_sigterm()  # a background run stopped with kill saves its resume state too
    bar = ProgressBar(options.iterations, step, options.progress)
    network.train()

    def batch_at(index: int) -> Dict:
        """Batch ``index`` of the stage's generator (resumable: ``PairGenerator.batch_number``)."""
        source, size = generator, batch_size
        for stage, stage_generator in zip(stages, stage_generators):
            if index < stage["steps"]:
                source, size = stage_generator, stage["batch_size"]
                break
        return dict(source.batch_number(index, size, options.overfit or None),
                    spacing_mm=source.config.spacing_mm,  # the stage's grid, for the loss_fn
                    generator=source, clean=clean_similarity)
    losses_seen: List[float] = []
    running: Dict[str, float] = {}
    tic = time.perf_counter()
    try:
        while step < options.iterations:
            batch = batch_at(step)
            batch.update(step=step, iterations=options.iterations, training=True, spec=spec,
                         config=config, working_spacing_mm=spacing)
            total, terms = loss_fn(network, batch["fixed"], batch["moving"], batch)
            optimiser.zero_grad(set_to_none=True)
            total.backward()
            batch["gradient_norms"] = clip_gradients(network, spec)
            if callable(spec.training.get("before_step")):
                terms = dict(terms, **(spec.training["before_step"](network, optimiser, batch)
                                       or {}))
            optimiser.step()
            scheduler.step()
            step += 1
            terms = dict({k: float(v.detach() if torch.is_tensor(v) else v)
                          for k, v in terms.items()}, loss=float(total.detach()))
            losses_seen.append(terms["loss"])
            for key, value in terms.items():
                running[key] = 0.9 * running.get(key, value) + 0.1 * value
            bar.update(step, f"loss {running['loss']:.4f}")
            if step % options.log_every == 0 or step == 1:
                log(f"step {step}: {_fmt(terms)} lr {scheduler.get_last_lr()[0]:.2e}")
            for stage in stages:
                if step == stage["steps"]:
                    save_stage_checkpoint(stage)
            if options.val_every and step % options.val_every == 0 and step < options.iterations:
                elapsed += time.perf_counter() - tic
                tic = time.perf_counter()
                run_validation(step)
                _save_resume(paths["resume"], network, optimiser, scheduler, step, best,
                             history, elapsed, spec, config, options, warm_start, loss_options)
        elapsed += time.perf_counter() - tic
        tic = time.perf_counter()
        run_validation(step)
    except KeyboardInterrupt:
        elapsed += time.perf_counter() - tic
        bar.close()
        _save_resume(paths["resume"], network, optimiser, scheduler, step, best, history,
                     elapsed, spec, config, options, warm_start, loss_options)
        log(f"interrupted at step {step}; resume with --resume {paths['resume']}")
        raise
    bar.close()
    _save_resume(paths["resume"], network, optimiser, scheduler, step, best, history, elapsed,
                 spec, config, options, warm_start, loss_options)
    log(f"done: {step} steps in {elapsed:.1f} s ({elapsed / max(step, 1):.3f} s/step); best "
        f"step {best['step'] if best else None}")
    return _complete_card(paths["card"], history, step, elapsed, losses_seen)


def _interrupt_on_sigterm() -> None:
    """SIGTERM raises KeyboardInterrupt, so ``kill`` of a background run (which ignores SIGINT)
    saves the resume state like Ctrl-C does."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    try:
        signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread (tests): nothing to install
        pass


def clip_gradients(network: torch.nn.Module, spec: MethodSpec) -> List[float]:
    """Clip the gradient norm of each of the method's clip groups (``clip_groups``; default all
    parameters as one) at :data:`GRADIENT_CLIP_NORM`; returns the unclipped norms."""
    groups = spec.training.get("clip_groups")
    groups = groups(network) if callable(groups) else [network.parameters()]
    return [float(torch.nn.utils.clip_grad_norm_(list(group), GRADIENT_CLIP_NORM))
            for group in groups]


def _run_record(card: Dict, path: str) -> Dict:
    """One training run as a lineage entry: what it was and what it cost (the kept step's)."""
    training = card.get("training") or {}
    recipe = training.get("recipe")
    missing = {} if card else {"incomplete": "no model card beside the checkpoint"}
    return {**missing, "checkpoint": os.path.basename(path), "sha256": card.get("sha256"),
            "created": card.get("created"), "command": card.get("command"),
            "iterations": training.get("iterations"),
            "wall_time_seconds": training.get("wall_time_seconds"),
            "recipe": recipe.get("name") if isinstance(recipe, dict) else None,
            "sources": [s.get("name") for s in (card.get("data") or {}).get("sources") or []
                        if isinstance(s, dict)]}


def training_lineage(card: Dict, path: str) -> List[Dict]:
    """Every run that produced the checkpoint at ``path`` (its model card ``card``), oldest
    first, so a warm-started run's card can state the whole cost of its weights.

    A card written before lineages were recorded knows only its own warm start's sha256 and
    steps: that ancestor is entered with what is known and marked ``incomplete``."""
    return _ancestors((card.get("training") or {}).get("warm_start")) + [_run_record(card, path)]


def _ancestors(warm_start: Optional[Dict]) -> List[Dict]:
    """The runs before this one: the warm start's lineage, or (a warm start recorded before
    lineages were, e.g. in an older resume state) what is known of it, marked incomplete."""
    warm_start = warm_start or {}
    if isinstance(warm_start.get("lineage"), list):
        return list(warm_start["lineage"])
    if warm_start:
        return [{"checkpoint": warm_start.get("checkpoint"), "sha256": warm_start.get("sha256"),
                 "iterations": warm_start.get("iterations"), "wall_time_seconds": None,
                 "incomplete": "recorded only as a warm start: its own ancestry and wall time "
                               "are unknown"}]
    return []


def lineage_totals(lineage: Sequence[Dict], iterations: int, seconds: float) -> Dict:
    """Steps and wall time of the whole lineage plus this run's ``iterations`` and ``seconds``
    (``None`` where an ancestor's are unknown; ``lineage_complete`` says whether any is)."""
    steps = [run.get("iterations") for run in lineage] + [iterations]
    times = [run.get("wall_time_seconds") for run in lineage] + [seconds]
    known = lambda values: all(isinstance(v, (int, float)) for v in values)  # noqa: E731
    return {"runs": len(lineage) + 1,
            "total_iterations": int(sum(steps)) if known(steps) else None,
            "total_wall_time_seconds": round(float(sum(times)), 1) if known(times) else None,
            "lineage_complete": not any(run.get("incomplete") for run in lineage)}


def _complete_card(path: str, history: List[Dict], step: int, elapsed: float,
                   losses_seen: Sequence[float]) -> Dict:
    """Give the best checkpoint's model card the whole run's validation history and cost (only
    the JSON changes, so its sha256 still matches the weights)."""
    with open(path) as handle:
        card = json.load(handle)
    card["validation"]["history"] = history
    card["training"]["run_iterations"] = step
    card["training"]["run_wall_time_seconds"] = round(elapsed, 1)
    card["training"]["seconds_per_step"] = round(elapsed / max(step, 1), 4)
    if losses_seen:  # training loss of this run: first step, and the mean of the last tenth
        tail = list(losses_seen)[-max(len(losses_seen) // 10, 1):]
        card["training"]["loss_first_step"] = losses_seen[0]
        card["training"]["loss_last_steps"] = float(np.mean(tail))
    with open(path + ".tmp", "w") as handle:
        json.dump(card, handle, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)
    return card


def _tuples(values: Dict) -> Dict:
    """JSON lists back to the tuples SynthConfig holds (nested for velocity_scales)."""
    return {k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list)
            else v for k, v in values.items()}


def _fmt(values: Dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in values.items() if isinstance(v, (int, float)))


def _save_resume(path, network, optimiser, scheduler, step, best, history, elapsed, spec,
                 config, options, warm_start=None, loss_options=None) -> None:
    torch.save({"method": spec.name, "config": config, "state_dict": network.state_dict(),
                "optimizer": optimiser.state_dict(), "scheduler": scheduler.state_dict(),
                "step": step, "best": best, "history": history, "elapsed": elapsed,
                "seed": options.seed, "sources": list(map(str, options.sources)),
                "warm_start": warm_start, "loss_options": loss_options,
                "library_version": __version__}, path + ".tmp")
    os.replace(path + ".tmp", path)


def _load_state(path: str, spec: MethodSpec) -> Dict:
    if not os.path.isfile(path):
        raise UserInputError(f"--resume file '{path}' does not exist")
    state = read_checkpoint(path)  # weights only: --resume may name a file from anywhere
    if state.get("method") != spec.name:
        raise UserInputError(f"'{path}' was trained for method '{state.get('method')}', "
                             f"not '{spec.name}'")
    return state


def _resume(state: Dict, path: str, network, optimiser, scheduler, log):
    """Continue from a ``.resume.pt`` state (weights, optimiser, step) or warm-start from a
    checkpoint ``.pt`` (weights only, step 0)."""
    try:
        network.load_state_dict(state["state_dict"])
    except RuntimeError as error:
        raise UserInputError(f"'{path}' does not fit the network config: "
                             f"{str(error).strip().splitlines()[0]}") from None
    if "optimizer" not in state:
        log(f"warm start from checkpoint {path} (weights only)")
        return 0, None, [], 0.0
    optimiser.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    log(f"resumed from {path} at step {state['step']}")
    return int(state["step"]), state.get("best"), list(state.get("history", [])), \
        float(state.get("elapsed", 0.0))
