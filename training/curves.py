"""Validation curves of a training run, read from its log (``NAME.log`` beside the checkpoint):
Dice and ground-truth error against the step, one colour per grid of the curriculum, the identity
of each grid dashed, the held-out (unseen) anatomy in grey, the validation cases without their
residual affine (the deformable part alone) in red.

    python -m training.curves RUN.log [RUN.log ...] --output curves.png
"""
from __future__ import annotations

import argparse
import re
from collections import defaultdict
from typing import Dict, List

STEP = re.compile(r"step (\d+): (unseen-anatomy |deformable )?validation(?: at ([\d.]+) mm)? "
                  r"(.*)$")
IDENTITY = re.compile(r"(?:(deformable )?validation(?: at ([\d.]+) mm \(coarse stage\))?"
                      r"(?:: \d+ cases \([^)]*\);)?(?: \([^)]*\))?"
                      r"|(unseen)-anatomy validation \([^)]*\)):? identity (.*)$")
WORKING = re.compile(r"canvas \([\d, ]+\) at ([\d.]+) mm")


def _metrics(text: str) -> Dict[str, float]:
    parts = text.split()
    return {parts[i]: float(parts[i + 1]) for i in range(0, len(parts) - 1, 2)
            if re.fullmatch(r"[-\d.eE+na]+", parts[i + 1])}


def read_log(path: str) -> Dict:
    """``{"curves": {grid: [(step, metrics)]}, "identity": {grid: metrics}}``; the held-out
    anatomy is the grid ``"unseen"``, the cases without their affine part ``"deformable"``, the
    working grid its spacing."""
    curves, identity, working = defaultdict(list), {}, None
    with open(path) as handle:
        for line in handle:
            line = line.rstrip("\n")
            found = WORKING.search(line)
            if found and working is None:
                working = found.group(1)
            found = IDENTITY.search(line)
            if found and "step " not in line:
                grid = "unseen" if found.group(3) else "deformable" if found.group(1) \
                    else (found.group(2) or working)
                identity[grid] = _metrics(found.group(4))
                continue
            found = STEP.search(line)
            if found:
                kind = (found.group(2) or "").strip()
                grid = {"unseen-anatomy": "unseen", "deformable": "deformable"}.get(kind) \
                    or found.group(3) or working
                curves[grid].append((int(found.group(1)), _metrics(found.group(4))))
    return {"curves": dict(curves), "identity": identity, "working": working}


def plot(logs: List[str], output: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(logs), 2, figsize=(10, 3.2 * len(logs)), squeeze=False)
    colours = {"8.0": "tab:orange", "4.0": "tab:blue", "2.0": "tab:green", "unseen": "0.5",
               "deformable": "tab:red"}
    names = {"unseen": "unseen anatomy (2 mm)", "deformable": "without the affine part"}
    for row, path in enumerate(logs):
        run = read_log(path)
        for column, metric in enumerate(("dice", "gt_error_mm")):
            axis = axes[row][column]
            for grid, points in sorted(run["curves"].items()):
                colour = colours.get(grid, "tab:purple")
                label = names.get(grid) or f"{float(grid):g} mm"
                axis.plot([s for s, _ in points], [m.get(metric) for _, m in points], "o-",
                          color=colour, markersize=3, label=label)
                if grid in run["identity"] and metric in run["identity"][grid]:
                    axis.axhline(run["identity"][grid][metric], color=colour, linestyle="--",
                                 linewidth=1)
            axis.set_title(f"{path.split('/')[-1]}: {metric} (dashed: identity)", fontsize=9)
            axis.set_xlabel("step")
            axis.grid(alpha=0.3)
            if column == 0:
                axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(output, dpi=80)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.curves",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    plot(args.logs, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
