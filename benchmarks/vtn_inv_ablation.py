"""The VTN "+inv" ablation: the same variant trained with and without the invertibility loss (same
recipe, seed, data and number of steps), then measured on held-out pairs -- registration
accuracy, folding, and inverse consistency, which is what the loss asks for.

    python benchmarks/vtn_inv_ablation.py --iterations 900            # the ablation proper
    python benchmarks/vtn_inv_ablation.py --iterations 100 --weights 0,1e-3,1e-5   # short

Each run is ``training.train.train`` with ``--config '{"variant": V, "invertibility": ...}'``
(the method's default recipe and curriculum; ``--recipe`` passes a named training recipe when the
trainer has them). The checkpoints go to ``--work`` (weights are not committed); their model
cards and training logs are copied beside the results (``--output``), so every number can be
traced to its run. The loss is the paper's: ``losses.invertibility_loss``, an unnormalised sum
over the central region, weight 1e-3 (``vtn.INVERTIBILITY_WEIGHT``).

Inverse consistency: the network registers each held-out pair both ways, and the mean length (mm)
of the round trips ``f12 * f21`` and ``f21 * f12`` over the labelled head is reported.
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import os
import shutil
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from heldout import (ROOT, distribution_label, environment, field_metrics,  # noqa: E402
                     heldout_pairs, inverse_consistency_mm, mean_sd, synth_from_card,
                     write_json)

from DeepRegistrationLib.methods import get_method, load_network  # noqa: E402
from DeepRegistrationLib.methods.base import read_model_card  # noqa: E402
from training.train import TrainOptions, train  # noqa: E402

OUTPUT = os.path.join(ROOT, "docs", "evaluation", "vtn-inv-ablation")
COLUMNS = (("dice", "Dice"), ("gt_error_mm", "GT error mm"),
           ("inverse_consistency_mm", "inverse consistency mm"),
           ("folding_percent", "folding % central"), ("folding_percent_strict", "folding % strict"),
           ("sdlogj", "SDlogJ"))


def run_label(variant: str, weight: float) -> str:
    return f"{variant} + inv (weight {weight:g})" if weight else variant


def train_one(variant: str, weight: float, args) -> str:
    name = f"vtn-{variant}-inv{weight:g}" if weight else f"vtn-{variant}"
    output = os.path.join(args.work, f"{name}-{args.iterations}.pt")
    options = dict(method="vtn", output=output, iterations=args.iterations, seed=args.seed,
                   val_every=max(args.iterations // 5, 1), val_cases=args.val_cases,
                   threads=args.threads, progress=False,
                   config={"variant": variant, "invertibility": bool(weight),
                           "invertibility_weight": float(weight or 1e-3)})
    if args.recipe:
        if "recipe" not in inspect.signature(TrainOptions).parameters:
            raise SystemExit("this trainer has no --recipe option")
        options["recipe"] = args.recipe
    if os.path.exists(output) and not args.retrain:
        print(f"reusing {output}", file=sys.stderr)
    else:
        train(TrainOptions(**options))
    return output


def evaluate(path: str, args, seeds, sources, spacing: float):
    spec = get_method("vtn")
    network = load_network(spec, path=path)
    synth = synth_from_card(read_model_card(path))
    rows = []
    for source in sources:
        for second in (False, True):
            for seed in seeds:
                for index, pair in enumerate(heldout_pairs(source, spacing, seed, args.pairs,
                                                           second, **synth)):
                    with torch.inference_mode():
                        forward = network(pair.fixed, pair.moving).clone()
                        backward = network(pair.moving, pair.fixed).clone()
                    mask = (pair.fixed_labels[0, 0] > 0).numpy()
                    row = field_metrics(pair, forward, spacing)
                    row["inverse_consistency_mm"] = inverse_consistency_mm(forward, backward,
                                                                           spacing, mask)
                    rows.append(dict(row, source=source, second_contrast=second, seed=seed,
                                     case=index))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="ADDD")
    parser.add_argument("--iterations", type=int, default=900)
    parser.add_argument("--weights", default="0,1e-3",
                        help="invertibility weights to train with (0: without +inv; 1e-3 is the "
                             "paper's, on the unnormalised sum)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (every run)")
    parser.add_argument("--recipe", default=None, help="a named training recipe, if any")
    parser.add_argument("--val-cases", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", default="1,2,3", help="data seeds of the held-out pairs")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--sources", default="mni152,itk-t1")
    parser.add_argument("--work", default=os.path.join(ROOT, "runs", "vtn-inv-ablation"),
                        help="where the checkpoints are written (not committed)")
    parser.add_argument("--retrain", action="store_true", help="train even if a checkpoint exists")
    parser.add_argument("--output", default=OUTPUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    sources = [s for s in args.sources.split(",") if s]
    os.makedirs(args.work, exist_ok=True)
    os.makedirs(args.output, exist_ok=True)
    spacing = float(get_method("vtn").working_spacing_mm)
    started = time.perf_counter()

    runs = {}
    for weight in [float(w) for w in args.weights.split(",")]:
        label = run_label(args.variant, weight)
        path = train_one(args.variant, weight, args)
        card = read_model_card(path)
        for suffix in (".json", ".log"):   # the run's card and log, not its weights
            source = os.path.splitext(path)[0] + suffix
            if os.path.exists(source):
                shutil.copy(source, os.path.join(args.output, os.path.basename(source)))
        runs[label] = {"checkpoint": os.path.basename(path), "card": card,
                       "rows": evaluate(path, args, seeds, sources, spacing)}
        print(f"{label} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)

    cards = [r["card"] for r in runs.values()]
    lines = [
        f"# VTN {args.variant} with and without the invertibility loss",
        "",
        f"`python benchmarks/vtn_inv_ablation.py " + " ".join(argv or sys.argv[1:]) + "` "
        f"({datetime.date.today().isoformat()}; torch {torch.__version__}, {args.threads} "
        "thread). Every run: same recipe, training seed, data and steps; only the "
        "invertibility loss and its weight differ (on the paper's unnormalised sum; 1e-3 is the "
        "paper's). Model cards and training logs beside this file.",
        "",
        "| run | kept step (best validation) | training s to it | validation Dice | validation GT "
        "error mm | validation identity Dice / GT error mm |",
        "|---|---|---|---|---|---|",
    ]
    for label, run in runs.items():
        training = run["card"]["training"]
        validation = run["card"]["validation"]["metrics"]
        identity = run["card"]["validation"]["identity"]
        lines.append(f"| {label} | {training['iterations']} | {training['wall_time_seconds']:.0f} "
                     f"| {validation['dice']:.3f} | {validation['gt_error_mm']:.2f} | "
                     f"{identity['dice']:.3f} / {identity['gt_error_mm']:.2f} |")
    lines.append("")
    for source in sources:
        for second in (False, True):
            contrast = "moving image in a second contrast" if second else "same contrast"
            lines += [f"## Held-out pairs: {source} ({distribution_label(source, cards)}), "
                      f"{contrast}", "",
                      "| run | " + " | ".join(c[1] for c in COLUMNS) + " |",
                      "|---|" + "---|" * len(COLUMNS)]
            for label, run in runs.items():
                mine = [r for r in run["rows"] if r["source"] == source
                        and r["second_contrast"] == second]
                cells = [mean_sd([float(np.mean([r[k] for r in mine if r["seed"] == s]))
                                  for s in seeds]) for k, _ in COLUMNS]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += [f"Held-out pairs: stream 2 of `training.synth`, seeds {args.seeds}, {args.pairs} "
              "per seed and group; mean over seeds of the per-seed mean ± the standard deviation "
              "over seeds.", "", f"Run time {time.perf_counter() - started:.0f} s."]
    with open(os.path.join(args.output, "results.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    write_json(os.path.join(args.output, "results.json"),
               {"command": "python benchmarks/vtn_inv_ablation.py " + " ".join(argv or sys.argv[1:]),
                "environment": environment(),
                "runs": {label: {"checkpoint": run["checkpoint"],
                                 "sha256": run["card"].get("sha256"), "rows": run["rows"]}
                         for label, run in runs.items()}})
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
