"""What the LC-ResNet blocks of the shipped R2Nets compute, measured on their own fields.

    python benchmarks/lcresnet_convergence.py     # writes docs/evaluation/lcresnet-convergence/

For each pair the U-Net gives the initial velocity ``v_0`` and the N = 7 blocks give
``v_N = v_0 + F(v_0) + ...`` (forward Euler, step 1, of ``dv/dt = F(v)``). Measured over the
labelled head, in voxels of the 4 mm working grid:

- ``|v_N - SS(v_0)|``: distance to the exponential of ``v_0`` as a stationary velocity field,
  computed by scaling and squaring (``spatial.integrate_velocity``, 7 squarings, as vm-diff's);
  small if the blocks integrate ``v_0`` the way scaling and squaring does;
- ``|v_N - v_0|`` and ``|SS(v_0) - v_0|``: how far each moves from ``v_0`` (the scale of the
  above);
- ``|v_N - v_N^fine|``: distance to the same ODE ``dv/dt = F(v)`` (SVF: the one shared block)
  integrated from ``v_0`` over the same time with 10x finer Euler steps
  (``v <- v + F(v) / 10``, 70 steps); small if 7 steps are a converged discretisation of the
  ODE the blocks define. Only for SVF (NSVF's F changes with the step, whose sub-steps are not
  defined).

Pairs: the r2net-svf model card's validation cases (MNI152, in-distribution) and held-out pairs
of several data seeds (stream 2) from the sources given.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from heldout import (ROOT, checkpoint_record, distribution_label, environment, fmt,  # noqa: E402
                     heldout_pairs, mean_sd, synth_from_card, write_json)
from r2net_folding import validation_generator  # noqa: E402

from DeepRegistrationLib.methods import get_method, load_network  # noqa: E402
from DeepRegistrationLib.methods.base import read_model_card  # noqa: E402
from DeepRegistrationLib.spatial import integrate_velocity  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402

OUTPUT = os.path.join(ROOT, "docs", "evaluation", "lcresnet-convergence")
QUANTITIES = (("v0", "mean ‖v_0‖"), ("vN", "mean ‖v_N‖"), ("vN_minus_ss", "mean ‖v_N - SS(v_0)‖"),
              ("vN_minus_ss_max", "max ‖v_N - SS(v_0)‖"), ("vN_minus_v0", "mean ‖v_N - v_0‖"),
              ("ss_minus_v0", "mean ‖SS(v_0) - v_0‖"),
              ("vN_minus_fine", "mean ‖v_N - v_N^fine‖"))


def fine_euler(integrator, v0: torch.Tensor, substeps: int = 10) -> torch.Tensor:
    """``dv/dt = F(v)`` from ``v_0`` over ``N`` unit steps, each split into ``substeps`` Euler
    steps of ``F / substeps`` (the shared block of an SVF LC-ResNet)."""
    block = integrator.blocks[0]
    v = v0
    with parametrize.cached():
        for _ in range(integrator.steps * substeps):
            v = v + block.residual(v) / substeps
    return v


def measure(network, pair, stationary: bool):
    mask = (pair.fixed_labels[0, 0] > 0).numpy()
    with torch.inference_mode():
        v0 = network.velocity(pair.fixed, pair.moving)
        vN = network.integrate(v0)
        ss = integrate_velocity(v0.clone(), 7)
        fine = fine_euler(network.integrate, v0) if stationary else None

    def length(field):
        return field.norm(dim=1)[0].numpy()[mask]

    row = {"v0": float(length(v0).mean()), "vN": float(length(vN).mean()),
           "vN_minus_ss": float(length(vN - ss).mean()),
           "vN_minus_ss_max": float(length(vN - ss).max()),
           "vN_minus_v0": float(length(vN - v0).mean()),
           "ss_minus_v0": float(length(ss - v0).mean()),
           "vN_minus_fine": float(length(vN - fine).mean()) if fine is not None else float("nan")}
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--sources", default="mni152,itk-t1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=OUTPUT)
    parser.add_argument("--report-only", action="store_true",
                        help="no new measurements: rewrite results.md from results.json")
    args = parser.parse_args(argv)
    if args.report_only:
        with open(os.path.join(args.output, "results.json")) as handle:
            saved = json.load(handle)
        report(saved, args.output)
        return 0
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    sources = [s for s in args.sources.split(",") if s]
    names = ("r2net-svf", "r2net-nsvf")
    specs = {n: get_method(n) for n in names}
    cards = {n: read_model_card(specs[n].checkpoint_path()) for n in names}
    networks = {n: load_network(specs[n]) for n in names}
    started = time.perf_counter()
    rows = []
    for name in names:
        card = cards[name]
        for index, pair in enumerate(validation_generator(card).validation_pairs(
                int(card["validation"]["cases"]))):
            rows.append(dict(measure(networks[name], pair, networks[name].integrate.stationary),
                             method=name, group="validation", case=index, source=pair.source))
        synth = synth_from_card(card)
        for source in sources:
            for seed in seeds:
                for index, pair in enumerate(heldout_pairs(source, 4.0, seed, args.pairs, False,
                                                           **synth)):
                    rows.append(dict(measure(networks[name], pair,
                                             networks[name].integrate.stationary),
                                     method=name, group="heldout", case=index, seed=seed,
                                     source=source))
        print(f"{name} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)

    saved = {"command": "python benchmarks/lcresnet_convergence.py " + " ".join(argv or sys.argv[1:]),
             "checkpoints": [checkpoint_record(n) for n in names],
             "date": datetime.date.today().isoformat(),
             "run_seconds": time.perf_counter() - started,
             "environment": environment(), "rows": rows}
    write_json(os.path.join(args.output, "results.json"), saved)
    report(saved, args.output)
    return 0


def report(saved, output: str) -> None:
    """results.md from the measurements in ``saved`` (the content of results.json)."""
    names = ("r2net-svf", "r2net-nsvf")
    rows = saved["rows"]
    # what the tables need from the model cards, as recorded with the measurements
    cards = {record["method"]: {"method": record["method"], "checkpoint": record["checkpoint"],
                                "sha256": record["sha256"],
                                "data": {"sources": [{"name": n} for n in record["sources"]]}}
             for record in saved["checkpoints"]}
    heldout = [r for r in rows if r["group"] == "heldout"]
    seeds = sorted({r["seed"] for r in heldout})
    sources = list(dict.fromkeys(r["source"] for r in heldout))
    pairs = max(r["case"] for r in heldout) + 1
    card_list = list(cards.values())
    lines = ["# LC-ResNet blocks of the shipped R2Nets: do they integrate v_0?", "",
             f"`{saved['command']}` ({saved.get('date', '2026-12-02')}; torch "
             f"{saved['environment']['torch']}). Checkpoints: " + ", ".join(
                 f"`{cards[n]['checkpoint']}` (`{cards[n]['sha256'][:12]}`)" for n in names)
             + ". Lengths in voxels of the 4 mm working grid (x 4 for mm), over the labelled "
             "head; SS = scaling and squaring (7 squarings); v_N^fine = the SVF block's ODE "
             "from v_0 with 10x finer Euler steps (see the script's docstring).", ""]
    groups = [("validation", "the r2net-svf card's validation cases (mni152: "
               f"{distribution_label('mni152', card_list)}; two of six in a second contrast)",
               None)]
    groups += [("heldout", f"held-out pairs, {source} ({distribution_label(source, card_list)}), "
                f"seeds {','.join(map(str, seeds))}, {pairs} per seed", source)
               for source in sources]
    for group, title, source in groups:
        lines += [f"## {title}", "", "| network | " + " | ".join(q[1] for q in QUANTITIES) + " |",
                  "|---|" + "---|" * len(QUANTITIES)]
        for name in names:
            mine = [r for r in rows if r["method"] == name and r["group"] == group
                    and (source is None or r["source"] == source)]
            if source is None:
                cells = [fmt(float(np.mean([r[k] for r in mine]))) for k, _ in QUANTITIES]
            else:
                cells = [mean_sd([float(np.mean([r[k] for r in mine if r["seed"] == s]))
                                  for s in seeds]) for k, _ in QUANTITIES]
            lines.append(f"| {name} | " + " | ".join(c if c != "nan" else "--" for c in cells)
                         + " |")
        lines.append("")
    if "run_seconds" in saved:
        lines.append(f"Run time {saved['run_seconds']:.0f} s.")
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, "results.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
