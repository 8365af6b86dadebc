"""Is the general recipe learnable, and does its loss point at the truth? Two measurements
behind training/README.md section 5 (no network involved):

1. ``io`` (instance optimisation, the engine's own optimiser) on the recipe's validation pairs,
   seen and unseen anatomy, on the working grid: if io recovers the synthetic ground truth, the
   pairs and their ground truth are consistent and a network has something to learn.
2. The methods' same-contrast similarity (LNCC, window 5) at the identity and at the true field,
   on the images the network sees (each degraded by its own acquisition effects) and on the same
   pairs before those effects (``clean``): where the true field barely lowers the loss, a network
   trained on it learns to explain the degradations by deformation.

    python -m training.diagnose_recipe [--recipe general] [--cases 4] [--output docs/training]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Dict, List

import torch

from DeepRegistrationLib import losses
from DeepRegistrationLib.methods.instance_optimisation import instance_optimisation
from DeepRegistrationLib.spatial import warp

from .recipes import get_recipe
from .synth import PairGenerator, SynthConfig
from .train import _tuples, pair_metrics


def recipe_config(recipe, spacing_mm: float, crop) -> SynthConfig:
    return SynthConfig(**{"spacing_mm": spacing_mm, "multiple": 16, **_tuples(recipe.synth),
                          "crop_shape": crop})


def io_on_validation(recipe, cases: int) -> List[Dict]:
    rows = []
    config = recipe_config(recipe, recipe.spacing_mm, recipe.crop)
    for anatomy, sources in (("seen", recipe.sources), ("unseen", recipe.unseen)):
        pairs = PairGenerator(list(sources), config, seed=0).validation_pairs(cases)
        for pair in pairs:
            tic = time.perf_counter()
            field = instance_optimisation(pair.fixed, pair.moving,
                                          similarity="mind" if pair.multimodal else "lncc")
            seconds = time.perf_counter() - tic
            row = {"anatomy": anatomy, "source": pair.source, "multimodal": pair.multimodal,
                   "max_true_displacement_mm": pair.info["max_gt_displacement_mm"]}
            for name, displacement in (("identity", torch.zeros_like(pair.displacement)),
                                       ("truth", pair.displacement), ("io", field)):
                metrics = pair_metrics(pair, displacement, recipe.spacing_mm)
                row.update({f"{name}_{k}": metrics[k] for k in ("dice", "gt_error_mm", "ncc")})
            row["io_seconds"] = seconds
            rows.append(row)
            print(f"{anatomy:6s} {pair.source:14s} dice identity {row['identity_dice']:.3f} "
                  f"truth {row['truth_dice']:.3f} io {row['io_dice']:.3f}; error mm identity "
                  f"{row['identity_gt_error_mm']:.2f} io {row['io_gt_error_mm']:.2f}", flush=True)
    return rows


def similarity_at_truth(recipe, cases: int) -> List[Dict]:
    lncc = losses.similarity_loss("lncc")
    rows = []
    for spacing in (8.0, 4.0):
        generator = PairGenerator(list(recipe.sources), recipe_config(recipe, spacing, None),
                                  seed=0)
        for index in range(cases):
            pair = generator.pair(index)
            if pair.multimodal:  # LNCC is a same-contrast similarity
                continue
            row = {"spacing_mm": spacing, "index": index, "source": pair.source,
                   "degraded_identity": lncc(pair.fixed, pair.moving, window=5).item(),
                   "degraded_truth": lncc(pair.fixed, warp(pair.moving, pair.displacement),
                                          window=5).item(),
                   "clean_identity": lncc(pair.fixed_clean, pair.moving_clean, window=5).item(),
                   "clean_truth": lncc(pair.fixed_clean,
                                       warp(pair.moving_clean, pair.displacement),
                                       window=5).item()}
            rows.append(row)
            print(f"{spacing:g} mm {pair.source:14s} LNCC loss degraded {row['degraded_identity']:.3f}"
                  f" -> {row['degraded_truth']:.3f} at the truth; clean {row['clean_identity']:.3f}"
                  f" -> {row['clean_truth']:.3f}", flush=True)
    return rows


def write_report(recipe_name: str, io_rows: List[Dict], lncc_rows: List[Dict], folder: str):
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, f"recipe-{recipe_name}-diagnostics")
    with open(stem + ".json", "w") as handle:
        json.dump({"io_on_validation": io_rows, "lncc_at_truth": lncc_rows}, handle, indent=1)
    lines = [f"<!-- written by: python -m training.diagnose_recipe --recipe {recipe_name} -->", "",
             f"# Recipe `{recipe_name}`: diagnostics without a network", "",
             "## io on the recipe's validation pairs (working grid, windows)", "",
             "| anatomy | source | second contrast | max true displacement mm | Dice identity | "
             "Dice truth | Dice io | error mm identity | error mm io | io s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in io_rows:
        lines.append(f"| {r['anatomy']} | {r['source']} | {'yes' if r['multimodal'] else 'no'} | "
                     f"{r['max_true_displacement_mm']:.1f} | {r['identity_dice']:.3f} | "
                     f"{r['truth_dice']:.3f} | {r['io_dice']:.3f} | "
                     f"{r['identity_gt_error_mm']:.2f} | {r['io_gt_error_mm']:.2f} | "
                     f"{r['io_seconds']:.1f} |")
    for anatomy in ("seen", "unseen"):
        group = [r for r in io_rows if r["anatomy"] == anatomy]
        if group:
            mean = {k: sum(r[k] for r in group) / len(group)
                    for k in ("identity_dice", "io_dice", "identity_gt_error_mm",
                              "io_gt_error_mm")}
            lines.append(f"| **{anatomy}, mean** | | | | {mean['identity_dice']:.3f} | | "
                         f"{mean['io_dice']:.3f} | {mean['identity_gt_error_mm']:.2f} | "
                         f"{mean['io_gt_error_mm']:.2f} | |")
    lines += ["", "## LNCC loss (window 5) at the identity and at the true field", "",
              "Training pairs (same contrast), on the images the network sees (degraded by each "
              "image's own acquisition effects) and on the same pairs before them (clean).", "",
              "| grid mm | pair | source | degraded: identity | degraded: truth | "
              "clean: identity | clean: truth |", "|---|---|---|---|---|---|---|"]
    for r in lncc_rows:
        lines.append(f"| {r['spacing_mm']:g} | {r['index']} | {r['source']} | "
                     f"{r['degraded_identity']:.3f} | {r['degraded_truth']:.3f} | "
                     f"{r['clean_identity']:.3f} | {r['clean_truth']:.3f} |")
    with open(stem + ".md", "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return stem + ".md"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.diagnose_recipe",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="general")
    parser.add_argument("--cases", type=int, default=4, help="validation pairs per anatomy")
    parser.add_argument("--pairs", type=int, default=8, help="training pairs per grid (LNCC)")
    parser.add_argument("--output", default=os.path.join("docs", "training"))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = get_recipe(args.recipe)
    path = write_report(recipe.name, io_on_validation(recipe, args.cases),
                        similarity_at_truth(recipe, args.pairs), args.output)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
