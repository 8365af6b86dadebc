"""Seconds against Dice: what each method and each ``--refine`` setting costs and gives, from the
``results.csv`` of evaluation runs made on the same cases and the same machine state (timings
from different runs are comparable only if the machine was equally loaded: run them back to
back).

    python -m training.tradeoff RUN_DIR[=SUFFIX] ... --output DIR

``SUFFIX`` is appended to the method names of that run (e.g. ``docs/evaluation/x=+refine 60``).
Only cases every plotted method finished are averaged; "identity" and "truth" are drawn as
horizontal lines. Writes ``tradeoff.png`` and ``tradeoff.md``.
"""
from __future__ import annotations

import argparse
import csv
import os
from collections import defaultdict
from typing import Dict, List, Tuple

PEERS = {"ants": "ANTs SyN", "demons": "SimpleITK demons", "elastix": "elastix B-spline"}
BASELINES = ("identity", "truth")
DEFAULT_TITLE = "Dice against seconds (same cases, same machine)"
# columns averaged besides Dice and seconds, where a run has them (nan when it does not)
EXTRA_COLUMNS = ("gt_error_mm", "folding_percent_strict")


def _number(value) -> float:
    return float(value) if value not in (None, "", "nan") else float("nan")


def read_runs(specs: List[str]) -> List[Dict]:
    rows = []
    for spec in specs:
        folder, _, suffix = spec.partition("=")
        with open(os.path.join(folder, "results.csv"), newline="") as handle:
            for row in csv.DictReader(handle):
                if row["status"] != "ok" or row["dice"] in ("", "nan"):
                    continue
                name = row["method"]
                if name not in BASELINES and suffix:
                    name = f"{name} {suffix.strip()}"
                rows.append({"case": row["case"], "method": name, "kind": row["kind"],
                             "dice": float(row["dice"]), "seconds": float(row["seconds"]),
                             "source": folder,
                             **{key: _number(row.get(key)) for key in EXTRA_COLUMNS}})
    return rows


def summarise(rows: List[Dict]) -> Tuple[List[str], Dict[str, Dict[str, float]]]:
    """Per method: mean Dice, seconds (and the :data:`EXTRA_COLUMNS`, nan where a case has none)
    over the cases every method finished."""
    cases_of = defaultdict(set)
    for row in rows:
        cases_of[row["method"]].add(row["case"])
    common = set.intersection(*cases_of.values()) if cases_of else set()
    summary: Dict[str, Dict[str, float]] = {}
    for method in cases_of:
        picked = [r for r in rows if r["method"] == method and r["case"] in common]
        # a method evaluated in two runs (identity in every run): keep one value per case
        per_case = {r["case"]: r for r in picked}
        summary[method] = {key: _mean([r.get(key, float("nan")) for r in per_case.values()])
                           for key in ("dice", "seconds") + EXTRA_COLUMNS}
        summary[method].update(kind=picked[0]["kind"], cases=len(per_case))
    return sorted(common), summary


def _mean(values: List[float]) -> float:
    finite = [v for v in values if v == v]
    return sum(finite) / len(finite) if finite else float("nan")


def plot(summary: Dict[str, Dict[str, float]], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import FuncFormatter

    figure, axes = plt.subplots(figsize=(8.0, 5.2))
    for name in BASELINES:
        if name in summary:
            axes.axhline(summary[name]["dice"], color="0.6" if name == "identity" else "0.3",
                         linestyle="--", linewidth=1)
            axes.text(0.99, summary[name]["dice"], f" {name}", va="bottom", ha="right",
                      transform=axes.get_yaxis_transform(), fontsize=8, color="0.3")
    # each network in its own colour, its refinement settings joined by a line (the network's
    # own trade-off curve); the network's name at its point alone, the setting at the others
    curves = defaultdict(list)
    for method, values in summary.items():
        if method not in BASELINES and values["kind"] != "peer" and not method.startswith("io"):
            network, _, setting = method.partition(" +refine")
            curves[network].append((values["seconds"], values["dice"], setting.strip()))
    palette = [plt.get_cmap("tab10")(i) for i in (0, 1, 4, 5, 6, 8, 9, 7)]  # not io's green or
    for index, (network, points) in enumerate(sorted(curves.items())):       # the peers' red
        colour = palette[index % len(palette)]
        points.sort()
        axes.plot([p[0] for p in points], [p[1] for p in points], color=colour, linewidth=1.0,
                  alpha=0.6, zorder=2)
        for seconds, dice, setting in points:
            axes.scatter(seconds, dice, marker="o", color=colour, zorder=3,
                         label=network if not setting else None)
            if setting:
                axes.annotate(f"+{setting}", (seconds, dice), textcoords="offset points",
                              xytext=(4, -9), fontsize=7, color=colour)
    for method, values in sorted(summary.items()):
        peer = values["kind"] == "peer"
        if method in BASELINES or not (peer or method.startswith("io")):
            continue
        axes.scatter(values["seconds"], values["dice"], marker="s" if peer else "D",
                     color="tab:red" if peer else "tab:green", zorder=4)
        axes.annotate(PEERS.get(method, method), (values["seconds"], values["dice"]),
                      textcoords="offset points", xytext=(5, 3), fontsize=8,
                      color="tab:red" if peer else "tab:green")
    if curves:
        axes.legend(title="network (+ --refine setting)", fontsize=7, title_fontsize=7,
                    loc="upper left", frameon=False)
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    axes.xaxis.set_major_formatter(plain)
    axes.xaxis.set_minor_formatter(plain)
    axes.set_xscale("log")
    axes.set_xlabel("seconds per registration (mean, log scale)")
    axes.set_ylabel("mean Dice")
    axes.set_title(title, fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def report(rows: List[Dict], runs: List[str], output: str,
           title: str = DEFAULT_TITLE) -> Dict[str, Dict]:
    """Write ``tradeoff.png`` and ``tradeoff.md`` for ``rows`` (of ``read_runs(runs)``) into
    ``output``, print the table, and return the summary."""
    cases, summary = summarise(rows)
    os.makedirs(output, exist_ok=True)
    plot(summary, os.path.join(output, "tradeoff.png"), title)
    title_option = "" if title == DEFAULT_TITLE else f" --title '{title}'"
    lines = [f"<!-- written by: python -m training.tradeoff {' '.join(runs)} "
             f"--output {output}{title_option} -->", "",
             f"Mean over the {len(cases)} cases every method finished: {', '.join(cases)}.", "",
             "| method | Dice | seconds |", "|---|---|---|"]
    for method, values in sorted(summary.items(), key=lambda item: item[1]["seconds"]):
        lines.append(f"| {PEERS.get(method, method)} | {values['dice']:.3f} | "
                     f"{values['seconds']:.1f} |")
    with open(os.path.join(output, "tradeoff.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines[2:]))
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.tradeoff",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="evaluation output folders, FOLDER[=SUFFIX]")
    parser.add_argument("--output", required=True)
    parser.add_argument("--title", default=DEFAULT_TITLE)
    args = parser.parse_args(argv)
    rows = read_runs(args.runs)
    if not rows:
        parser.error("no finished rows in those runs")
    report(rows, args.runs, args.output, args.title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
