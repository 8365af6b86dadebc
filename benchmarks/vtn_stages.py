"""What each stage of the shipped VTN cascade contributes: the shipped ADDD checkpoint truncated
after stage k (A; AD-prefix; ADD-prefix; the full ADDD), on held-out synthetic pairs of several
data seeds, same-contrast and second-contrast pairs reported separately, each source marked as
seen (in-distribution: the checkpoint was trained on it) or unseen.

    python benchmarks/vtn_stages.py                      # writes docs/evaluation/vtn-stages/
    python benchmarks/vtn_stages.py --seeds 1,2,3 --pairs 4 --sources mni152,itk-t1

"ADDD truncated after stage k" is an analysis of one trained cascade, not the paper's variant of
that name (the paper trains every variant on its own; `--variant AD` needs its own vtn-AD.pt).
Each network runs on the pair's 4 mm canvas, as in validation (no resampling in between), and
the metrics come from ``benchmarks/heldout.py`` (the library's metric code). The table gives the
mean over the data seeds of each seed's mean over its pairs, ± the standard deviation over seeds.
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
from heldout import (METRIC_NAMES, ROOT, checkpoint_record, distribution_label,  # noqa: E402
                     environment, field_metrics, heldout_pairs, mean_sd, synth_from_card,
                     write_json)

from DeepRegistrationLib.methods import get_method, load_network  # noqa: E402
from DeepRegistrationLib.methods.base import read_model_card  # noqa: E402

OUTPUT = os.path.join(ROOT, "docs", "evaluation", "vtn-stages")


def stage_label(variant: str, count: int) -> str:
    return variant if count == len(variant) else f"{variant} truncated after stage {count} " \
        f"({variant[:count]})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="1,2,3", help="data seeds of the held-out pairs")
    parser.add_argument("--pairs", type=int, default=4, help="pairs per seed and group")
    parser.add_argument("--sources", default="mni152,itk-t1")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=OUTPUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    sources = [s for s in args.sources.split(",") if s]
    spec = get_method("vtn")
    network = load_network(spec)
    card = read_model_card(spec.checkpoint_path())
    spacing = float(spec.working_spacing_mm)
    variant = network.variant
    synth = synth_from_card(card)   # the checkpoint's own synthetic-data settings
    started = time.perf_counter()

    rows = []   # one per (source, contrast, seed, pair, stage)
    for source in sources:
        for second in (False, True):
            for seed in seeds:
                for index, pair in enumerate(heldout_pairs(source, spacing, seed, args.pairs,
                                                           second, **synth)):
                    base = {"source": source, "second_contrast": second, "seed": seed,
                            "pair": index, "strength": pair.info["factor"]}
                    identity = field_metrics(pair, torch.zeros_like(pair.displacement), spacing)
                    rows.append(dict(base, stage="identity", **identity))
                    with torch.inference_mode():
                        stages = network.stages(pair.fixed, pair.moving)
                    for count, stage in enumerate(stages, start=1):
                        values = field_metrics(pair, stage["displacement"].clone(), spacing)
                        rows.append(dict(base, stage=stage_label(variant, count), **values))
                print(f"{source} {'second' if second else 'same'}-contrast done "
                      f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)

    stage_names = ["identity"] + [stage_label(variant, k) for k in range(1, len(variant) + 1)]
    lines = [
        "# VTN: each stage of the shipped cascade",
        "",
        f"`python benchmarks/vtn_stages.py --seeds {args.seeds} --pairs {args.pairs} --sources "
        f"{args.sources}` ({datetime.date.today().isoformat()}; torch {torch.__version__}, "
        f"{args.threads} thread). Checkpoint `{os.path.basename(spec.checkpoint_path())}` "
        f"(sha256 `{(card or {}).get('sha256', '?')[:12]}`, {variant}, trained on "
        f"{', '.join(s['name'] for s in card['data']['sources'])}).",
        "",
        f"Held-out synthetic pairs (stream 2 of `training.synth`, never trained on or validated "
        f"with), {args.pairs} per data seed and group, seeds {args.seeds}; on each source's "
        f"{spacing:g} mm canvas. Each cell: mean over seeds of the per-seed mean ± the standard "
        "deviation over seeds. \"truncated after stage k\" is the shipped ADDD stopped after k "
        "stages -- an analysis of one cascade, not a separately trained variant. Folding: "
        "central = central-difference det J <= 0 (ITK / Learn2Reg-comparable); strict = any of "
        "the 8 one-sided Jacobians <= 0.",
        "",
    ]
    for source in sources:
        seen = distribution_label(source, [card])
        for second in (False, True):
            group = [r for r in rows if r["source"] == source and r["second_contrast"] == second]
            contrast = "moving image in a second contrast" if second else "same contrast"
            lines += [f"## {source}: {seen}; {contrast}", "",
                      "| stages | Dice | GT error mm | folding % central | folding % strict | "
                      "SDlogJ |", "|---|---|---|---|---|---|"]
            for name in stage_names:
                per_seed = {key: [float(np.mean([r[key] for r in group
                                                 if r["stage"] == name and r["seed"] == seed]))
                                  for seed in seeds] for key in METRIC_NAMES}
                lines.append(f"| {name} | " + " | ".join(mean_sd(per_seed[key])
                                                         for key in METRIC_NAMES) + " |")
            lines.append("")
    lines.append(f"Run time {time.perf_counter() - started:.0f} s.")
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "results.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    write_json(os.path.join(args.output, "results.json"),
               {"command": "python benchmarks/vtn_stages.py " + " ".join(argv or sys.argv[1:]),
                "checkpoint": checkpoint_record("vtn"), "environment": environment(),
                "seeds": seeds, "pairs_per_seed": args.pairs, "rows": rows})
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
