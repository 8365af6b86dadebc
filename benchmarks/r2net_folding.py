"""Folding of the shipped R2Nets beside the VM-diff-like baseline, by the central-difference
Jacobian (the ITK / Learn2Reg-comparable figure) and by the strict measure (a voxel is folded
when any of its 8 one-sided finite-difference Jacobians has det <= 0), on the same cases.

    python benchmarks/r2net_folding.py            # writes docs/evaluation/r2net-folding/

Three groups of cases, every method on the same pairs:

1. the validation cases of the model cards (rebuilt from the card's data description; all four
   cards describe the same MNI152 cases), each network on its own training grid, as the card's
   figures were made;
2. held-out synthetic pairs (stream 2, never trained on) of several data seeds and sources, on
   the 4 mm canvas, for the three 4 mm networks (the network's own output field);
3. the same kind of held-out pairs on their 2 mm canvas for MS-R2Net, whose working grid that
   is. (The 4 mm networks are left out here: resampled from this canvas their input sits in a
   larger, differently framed canvas than in training, and their accuracy then says more about
   framing than about the network -- on one pair the ground-truth error went from 3.7 mm to
   8.7 mm between a 48x64x56 and a 49x65x57 input.)

Each source is marked seen (in-distribution: the networks were trained on it) or unseen.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from heldout import (ROOT, checkpoint_record, distribution_label, environment,  # noqa: E402
                     field_metrics, fmt, heldout_pairs, mean_sd, synth_from_card,
                     training_canvas, write_json)

from DeepRegistrationLib.methods import get_method, load_network  # noqa: E402
from DeepRegistrationLib.methods.base import read_model_card  # noqa: E402
from training.synth import PairGenerator, SynthConfig  # noqa: E402

OUTPUT = os.path.join(ROOT, "docs", "evaluation", "r2net-folding")
METHODS = ("vm-diff", "r2net-svf", "r2net-nsvf", "ms-r2net")
COLUMNS = (("folding_percent", "folding % central"), ("folding_percent_strict", "folding % strict"),
           ("min_det_strict", "min det strict"), ("sdlogj", "SDlogJ"), ("dice", "Dice"),
           ("gt_error_mm", "GT error mm"))


def validation_generator(card) -> PairGenerator:
    data = card["data"]
    synth = synth_from_card(card)
    config = SynthConfig(spacing_mm=float(data["spacing_mm"]), multiple=int(
        data["synth_config"].get("multiple", 16)), **synth)
    return PairGenerator([s["name"] for s in data["sources"]], config, seed=int(data["seed"]),
                         canvas=tuple(data["canvas"]) if data.get("canvas") else None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--pairs", type=int, default=3, help="held-out pairs per seed and source")
    parser.add_argument("--sources", default="mni152,itk-t1")
    parser.add_argument("--pairs-2mm", type=int, default=2,
                        help="2 mm pairs per seed and source (group 3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=OUTPUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    sources = [s for s in args.sources.split(",") if s]
    specs = {name: get_method(name) for name in METHODS}
    cards = {name: read_model_card(spec.checkpoint_path()) for name, spec in specs.items()}
    networks = {name: load_network(spec) for name, spec in specs.items()}
    started = time.perf_counter()
    rows = []

    # 1. the cards' validation cases, each network on its training grid
    for name in METHODS:
        card = cards[name]
        pairs = validation_generator(card).validation_pairs(int(card["validation"]["cases"]))
        spacing = float(card["data"]["spacing_mm"])
        for index, pair in enumerate(pairs):
            with torch.inference_mode():
                field = networks[name](pair.fixed, pair.moving)
            rows.append(dict(field_metrics(pair, field.clone(), spacing), group="validation",
                             method=name, case=index, spacing_mm=spacing,
                             second_contrast=pair.multimodal, source=pair.source))
        print(f"validation {name} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)

    # 2. held-out pairs on the 4 mm canvas, the network's own field
    synth = synth_from_card(cards["r2net-svf"])
    for source in sources:
        for seed in seeds:
            for index, pair in enumerate(heldout_pairs(source, 4.0, seed, args.pairs, False,
                                                       **synth)):
                for name in METHODS:
                    if specs[name].working_spacing_mm != 4.0:
                        continue
                    with torch.inference_mode():
                        field = networks[name](pair.fixed, pair.moving)
                    rows.append(dict(field_metrics(pair, field.clone(), 4.0), group="heldout-4mm",
                                     method=name, seed=seed, case=index, source=source,
                                     spacing_mm=4.0, strength=pair.info["factor"]))
        print(f"held-out 4 mm {source} done ({time.perf_counter() - started:.0f} s)",
              file=sys.stderr)

    # 3. held-out pairs on the 2 mm canvas, the 2 mm network's own field
    for source in sources:
        for seed in seeds:
            # framed as MS-R2Net's training pairs (its card's canvas and multiple)
            multiple, canvas = training_canvas(cards["ms-r2net"], source)
            for index, pair in enumerate(heldout_pairs(source, 2.0, seed, args.pairs_2mm,
                                                       False, multiple, canvas, **synth)):
                for name in METHODS:
                    if specs[name].working_spacing_mm != 2.0:
                        continue
                    tic = time.perf_counter()
                    with torch.inference_mode():
                        field = networks[name](pair.fixed, pair.moving).clone()
                    seconds = time.perf_counter() - tic
                    rows.append(dict(field_metrics(pair, field, 2.0), group="heldout-2mm",
                                     method=name, seed=seed, case=index, source=source,
                                     spacing_mm=2.0, seconds=seconds,
                                     strength=pair.info["factor"]))
        print(f"held-out 2 mm {source} done ({time.perf_counter() - started:.0f} s)",
              file=sys.stderr)

    card_list = list(cards.values())
    lines = [
        "# Folding of the R2Nets beside the VM-diff-like baseline: central and strict measures",
        "",
        f"`python benchmarks/r2net_folding.py --seeds {args.seeds} --pairs {args.pairs} "
        f"--sources {args.sources} --pairs-2mm {args.pairs_2mm}` "
        f"({datetime.date.today().isoformat()}; torch {torch.__version__}, {args.threads} "
        "threads). Checkpoints: " + ", ".join(
            f"`{cards[n]['checkpoint']}` (`{cards[n]['sha256'][:12]}`)" for n in METHODS) + ".",
        "",
        "Folding % central: central-difference det J <= 0 (ITK's filter, Learn2Reg: the figure "
        "papers report). Folding % strict: any of the 8 one-sided finite-difference Jacobians "
        "<= 0 (sees folds that alternate every voxel). Min det strict: the smallest one-sided "
        "determinant over the grid. Means over the cases of a group (for held-out pairs: "
        "mean over data seeds of the per-seed mean ± the standard deviation over seeds).",
        "",
    ]

    def table(group_rows, names, title, per_seed):
        out = [title, "", "| method | cases | " + " | ".join(c[1] for c in COLUMNS) + " |",
               "|---|---|" + "---|" * len(COLUMNS)]
        for name in names:
            mine = [r for r in group_rows if r["method"] == name]
            if not mine:
                continue
            if per_seed:
                cells = [mean_sd([float(np.mean([r[k] for r in mine if r["seed"] == s]))
                                  for s in seeds]) for k, _ in COLUMNS]
            else:
                cells = [fmt(float(np.mean([r[k] for r in mine]))) for k, _ in COLUMNS]
            out.append(f"| {name} | {len(mine)} | " + " | ".join(cells) + " |")
        return out + [""]

    validation = [r for r in rows if r["group"] == "validation"]
    seen = distribution_label(cards["r2net-svf"]["data"]["sources"][0]["name"], card_list)
    lines += table(validation, METHODS,
                   "## 1. The model cards' validation cases (" + ", ".join(
                       f"{n} {cards[n]['validation']['cases']}" for n in METHODS)
                   + f"; {cards['r2net-svf']['data']['sources'][0]['name']}: {seen}; every "
                   "third case in a second contrast; each network on its training grid: 4 mm, "
                   "ms-r2net 2 mm)", per_seed=False)
    for group, label in (("heldout-4mm", "## 2. Held-out pairs, 4 mm canvas (network output)"),
                         ("heldout-2mm",
                          "## 3. Held-out pairs, 2 mm canvas (network output)")):
        for source in sources:
            mine = [r for r in rows if r["group"] == group and r["source"] == source]
            lines += table(mine, METHODS, f"{label}: {source}, "
                           f"{distribution_label(source, card_list)}, same contrast",
                           per_seed=True)
    worst = {name: max(r["folding_percent_strict"] for r in rows if r["method"] == name)
             for name in METHODS}
    lines += ["Worst single case, strict folding %: " + ", ".join(
        f"{name} {fmt(value)}" for name, value in worst.items()) + ".", "",
        f"Run time {time.perf_counter() - started:.0f} s."]
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "results.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    write_json(os.path.join(args.output, "results.json"),
               {"command": "python benchmarks/r2net_folding.py " + " ".join(argv or sys.argv[1:]),
                "checkpoints": [checkpoint_record(n) for n in METHODS],
                "environment": environment(), "rows": rows})
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
