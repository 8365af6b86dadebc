"""Held-out synthetic pairs and per-field metrics shared by the method studies in this folder
(``vtn_stages.py``, ``r2net_folding.py``, ``vtn_inv_ablation.py``, ``lcresnet_convergence.py``).

The pairs come from ``training.synth.PairGenerator`` with the generator's default deformation and
intensity settings, drawn from random stream ``HELDOUT_STREAM`` = 2: training draws from stream 0
and validation from stream 1 (``training.synth.TRAIN`` / ``VALIDATION``), so no pair here was
ever trained on or used to choose a checkpoint. Each data seed gives a different set of pairs.

Whether a source is *in-distribution* for a network is read from its model card (the sources it
was trained on), never assumed: every table marks each row ``seen`` or ``unseen``.
"""
from __future__ import annotations

import json
import os
import platform
import sys
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from DeepRegistrationLib import __version__, metrics  # noqa: E402
from DeepRegistrationLib.methods import get_method  # noqa: E402
from DeepRegistrationLib.methods.base import read_model_card  # noqa: E402
from training.synth import PairGenerator, SynthConfig  # noqa: E402
from training.train import pair_metrics  # noqa: E402

HELDOUT_STREAM = 2
METRIC_NAMES = ("dice", "gt_error_mm", "folding_percent", "folding_percent_strict", "sdlogj")
_GENERATORS: Dict = {}


def generator(source: str, spacing_mm: float, seed: int, multiple: int = 16,
              canvas: Optional[Sequence[int]] = None, **synth) -> PairGenerator:
    """A pair generator for one source on its own canvas (the smallest multiple of ``multiple``
    holding it) or on ``canvas``; cached per argument set."""
    canvas = tuple(int(n) for n in canvas) if canvas else None
    key = (source, float(spacing_mm), int(seed), int(multiple), canvas,
           tuple(sorted(synth.items())))
    if key not in _GENERATORS:
        config = SynthConfig(spacing_mm=float(spacing_mm), multiple=int(multiple), **synth)
        _GENERATORS[key] = PairGenerator([source], config, seed=int(seed), canvas=canvas)
    return _GENERATORS[key]


def heldout_pairs(source: str, spacing_mm: float, seed: int, count: int,
                  second_contrast: bool, multiple: int = 16,
                  canvas: Optional[Sequence[int]] = None, **synth) -> List:
    """``count`` held-out pairs of ``source`` (stream 2), all in the fixed image's contrast or all
    with the moving image in a label-driven second contrast; deformation strength and affine part
    drawn at random as in training."""
    pairs_from = generator(source, spacing_mm, seed, multiple, canvas, **synth)
    return [pairs_from.pair(index, HELDOUT_STREAM, contrast=bool(second_contrast))
            for index in range(int(count))]


def field_metrics(pair, displacement: torch.Tensor, spacing_mm: float) -> Dict[str, float]:
    """Dice (mean over labels), ground-truth error over the labelled head (mm), folding by the
    central-difference Jacobian (ITK / Learn2Reg-comparable) and by the strict measure (any of the
    8 one-sided Jacobians <= 0), SDlogJ, and the smallest strict determinant."""
    displacement = displacement.detach().float()
    row = pair_metrics(pair, displacement, spacing_mm)
    strict = metrics.strict_jacobian_determinant_map(displacement)
    row["folding_percent_strict"] = metrics.folding_percent(strict)
    row["min_det_strict"] = float(strict.min())
    return row


def inverse_consistency_mm(forward: torch.Tensor, backward: torch.Tensor, spacing_mm: float,
                           mask: Optional[np.ndarray] = None) -> float:
    """Mean length (mm) of ``f12 * f21`` and ``f21 * f12`` (the round trips fixed -> moving ->
    fixed and back), over ``mask`` (default: every voxel): 0 for mutually inverse fields."""
    from DeepRegistrationLib.spatial import compose
    lengths = []
    for first, second in ((forward, backward), (backward, forward)):
        trip = compose(first.float(), second.float()).norm(dim=1)[0].numpy() * spacing_mm
        lengths.append(trip[mask] if mask is not None else trip.ravel())
    return float(np.mean(np.concatenate(lengths)))


def training_canvas(card: Optional[Dict], source: str):
    """``(multiple, canvas)`` of a checkpoint's training pairs: the canvas its card records when
    ``source`` was among its training sources (pairs framed as in training), else None (the
    source's own canvas, sides a multiple of the card's multiple)."""
    data = (card or {}).get("data") or {}
    multiple = int((data.get("synth_config") or {}).get("multiple", 16))
    canvas = data.get("canvas") if source in trained_sources(card) else None
    return multiple, (tuple(canvas) if canvas else None)


def trained_sources(card: Optional[Dict]) -> List[str]:
    """The sources a checkpoint was trained on, from its model card."""
    return [s.get("name") for s in ((card or {}).get("data") or {}).get("sources", [])]


def distribution_label(source: str, cards: Iterable[Optional[Dict]]) -> str:
    """``seen`` when every given model was trained on ``source``, ``unseen`` when none was."""
    seen = [source in trained_sources(card) for card in cards]
    if all(seen):
        return "seen (in-distribution)"
    return "unseen" if not any(seen) else "seen by " + ", ".join(
        (card or {}).get("method", "?") for card, s in zip(cards, seen) if s)


def checkpoint_record(method: str, path: Optional[str] = None) -> Dict:
    """What identifies the weights a number came from: file, sha256, card date and steps."""
    spec = get_method(method)
    path = path or spec.checkpoint_path()
    card = read_model_card(path) or {}
    return {"method": method, "checkpoint": os.path.basename(path), "sha256": card.get("sha256"),
            "created": card.get("created"), "iterations": (card.get("training") or {}).get(
                "iterations"), "sources": trained_sources(card)}


def environment() -> Dict:
    return {"library_version": __version__, "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads()}


def mean_sd(values: Sequence[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "--"
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(float(np.mean(values)))} ± {fmt(float(np.std(values, ddof=1)))}"


def fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) < 0.01:
        return f"{value:.4f}"
    return f"{value:.3f}"


def write_json(path: str, payload: Dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=1, sort_keys=True)
        handle.write("\n")


def synth_from_card(card: Optional[Dict]) -> Dict:
    """The synthetic-data settings a checkpoint was trained with (its card), minus the grid: the
    held-out pairs then differ from training pairs only by their random draws."""
    from dataclasses import fields
    known = {f.name for f in fields(SynthConfig)} - {"spacing_mm", "multiple"}
    stored = ((card or {}).get("data") or {}).get("synth_config") or {}
    return {key: (tuple(tuple(v) if isinstance(v, list) else v for v in value)
                  if isinstance(value, list) else value)
            for key, value in stored.items() if key in known}
