"""Recompute a shipped model card's validation figures from its weights (test helper).

A card records the mean validation metrics of its checkpoint and the data they came from
(``card["data"]``: sources, canvas, synthetic settings, seed; ``card["validation"]["cases"]``).
The trainer's validation cases are deterministic (``PairGenerator.validation_pairs``), so the same
weights on the same cases must give the same means; a card that does not recompute does not
describe its checkpoint (the weights, the data code or the metric code changed since).
"""
from __future__ import annotations

import json
from dataclasses import fields
from typing import Dict, List

import numpy as np
import torch

from training.synth import PairGenerator, SynthConfig
from training.train import pair_metrics

# What the recomputation may differ by: the figures are means of float32 computations whose
# summation order depends on the thread count and the CPU's vector width. Measured differences on
# this machine are below 1e-5 for every figure; the bounds leave a wide margin and are still far
# below any change that matters (a Dice of 0.001, a hundredth of a millimetre, one folded voxel
# in 6 x 200,000 for folding, 0.002 of SDlogJ).
TOLERANCES = {"dice": 1e-3, "gt_error_mm": 0.01, "folding_percent": 1e-3, "sdlogj": 2e-3,
              "ncc": 1e-3}
_PAIRS: Dict[str, List] = {}


def _synth(stored: Dict) -> SynthConfig:
    known = {f.name for f in fields(SynthConfig)}
    values = {key: (tuple(tuple(v) if isinstance(v, list) else v for v in value)
                    if isinstance(value, list) else value)
              for key, value in stored.items() if key in known}
    return SynthConfig(**values)


def validation_pairs(card: Dict) -> List:
    """The card's validation cases, rebuilt from its data description (cached per description)."""
    data, cases = card["data"], int(card["validation"]["cases"])
    key = json.dumps([data, cases], sort_keys=True)
    if key not in _PAIRS:
        generator = PairGenerator([s["name"] for s in data["sources"]],
                                  _synth(data["synth_config"]), seed=int(data["seed"]),
                                  canvas=tuple(data["canvas"]) if data.get("canvas") else None)
        _PAIRS[key] = generator.validation_pairs(cases)
    return _PAIRS[key]


def recompute(network: torch.nn.Module, card: Dict) -> Dict[str, float]:
    """Mean validation metrics of ``network`` on the card's cases, as the trainer computes them."""
    spacing = float(card["data"]["spacing_mm"])
    rows = []
    with torch.inference_mode():
        for pair in validation_pairs(card):
            displacement = network(pair.fixed, pair.moving).float().clone()
            rows.append(pair_metrics(pair, displacement, spacing))
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}


def differences(network: torch.nn.Module, card: Dict) -> Dict[str, tuple]:
    """``{metric: (card value, recomputed)}`` for every metric beyond its tolerance; the
    comparison covers every metric the card and the recomputation share (at least Dice and the
    ground-truth error)."""
    recorded = card["validation"]["metrics"]
    measured = recompute(network, card)
    shared = [key for key in TOLERANCES if key in recorded and key in measured]
    assert {"dice", "gt_error_mm"} <= set(shared), (sorted(recorded), sorted(measured))
    return {key: (recorded[key], measured[key]) for key in shared
            if abs(recorded[key] - measured[key]) > TOLERANCES[key]}
