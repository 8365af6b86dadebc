"""The MultiProp ablation of issue #12: do self-tuned (bilevel) loss weights match hand-set ones,
and do they recover from a mis-set start?

The paper reports bilevel = hand-set on brains (its Table 4, +-0.006 Dice) and a gain when moving
to a new task (liver CT, +0.03 Dice). The protocol here (docs/methods/multiprop.md)::

    # 1. every arm, same steps, one or more seeds (DIR/seed<S>/<arm>/multiprop[-bilevel].pt)
    python -m training.multiprop_ablation train --iterations 6000 --seeds 0 --recipe general \\
        --output DIR
    # 2. every arm on the evaluation cases (training/evaluate.py, stream 2: never trained on,
    #    never used to choose), paired comparisons, the weight trajectories and the recovery test
    python -m training.multiprop_ablation evaluate --cases full --output DIR
    # 3. seconds of the deployed network on a 2 mm pair (random weights: the cost does not
    #    depend on them)
    python -m training.multiprop_ablation speed --output DIR

Arms (``ARMS``): ``default`` (hand-set weights), ``bilevel`` (tuned from them), ``reg0.1`` and
``reg10`` (the regularisation weight mis-set x0.1 / x10, fixed), ``bilevel-reg0.1`` and
``bilevel-reg10`` (tuned from each mis-set start), ``additive`` (the public code's propagation,
hand-set weights). ``reg0.1``, ``default`` and ``reg10`` are the 3-point grid: its best is chosen
on the trainer's *validation* Dice (the model cards), never on the evaluation cases. The claim
tested: bilevel from a mis-set start recovers at least half of the gap between the mis-set arm
and the grid's best (Dice and ground-truth error), printed as holds / fails. The transfer case
(weights hand-set for brains, trained on the CT source) is ``train --arms default,bilevel
--source invesalius-ct --output DIR-ct``.
"""
from __future__ import annotations

from DeepRegistrationLib.runtime import configure_openmp

configure_openmp()  # before torch (see runtime.py)

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Dict, List, Optional, Sequence  # noqa: E402

import numpy as np  # noqa: E402

from DeepRegistrationLib.errors import UserInputError  # noqa: E402

from .mmln_ablation import finished, paired  # noqa: E402  (the same bookkeeping)

# arm -> (variant, config overrides)
ARMS = {
    "default": ("default", {}),
    "bilevel": ("bilevel", {}),
    "reg0.1": ("default", {"weights": {"regularisation": 0.1}}),
    "reg10": ("default", {"weights": {"regularisation": 10.0}}),
    "bilevel-reg0.1": ("bilevel", {"weights": {"regularisation": 0.1}}),
    "bilevel-reg10": ("bilevel", {"weights": {"regularisation": 10.0}}),
    "additive": ("default", {"propagation": "additive"}),
}
GRID = ("reg0.1", "default", "reg10")
RECOVERY = (("bilevel-reg0.1", "reg0.1"), ("bilevel-reg10", "reg10"))
COMPARISONS = (("bilevel", "default"), ("bilevel-reg0.1", "reg0.1"),
               ("bilevel-reg10", "reg10"), ("additive", "default"))
# True where lower is better
METRICS = (("dice", False), ("gt_error_mm", True), ("folding_percent_strict", True),
           ("folding_percent", True), ("sdlogj", True))


def arm_path(folder: str, seed: int, arm: str) -> str:
    from DeepRegistrationLib.methods.multiprop import checkpoint_name
    return os.path.join(folder, f"seed{seed}", arm, checkpoint_name(ARMS[arm][0]))


def train_arm(arm: str, seed: int, output: str, args) -> Dict:
    """Train one arm with ``python -m training train``; returns its model card."""
    variant, overrides = ARMS[arm]
    config = dict(overrides, variant=variant, **json.loads(args.config or "{}"))
    command = [sys.executable, "-m", "training", "train", "--method", "multiprop",
               "--iterations", str(args.iterations), "--seed", str(seed),
               "--config", json.dumps(config), "--output", output, "--quiet"]
    for option in ("recipe", "source", "threads", "val_every", "val_cases", "spacing"):
        value = getattr(args, option, None)
        if value is not None:
            command += [f"--{option.replace('_', '-')}", str(value)]
    card_path = os.path.splitext(output)[0] + ".json"
    if finished(card_path, args.iterations) and not args.retrain:
        print(f"{output}: trained already, kept (--retrain to train again)", file=sys.stderr)
    else:
        resume = os.path.splitext(output)[0] + ".resume.pt"
        if os.path.isfile(resume) and not args.retrain:
            command += ["--resume", resume]
        print(" ".join(command), file=sys.stderr, flush=True)
        subprocess.run(command, check=True)
    with open(card_path) as handle:
        return json.load(handle)


def command_train(args) -> None:
    arms = args.arms.split(",") if args.arms else list(ARMS)
    unknown = set(arms) - set(ARMS)
    if unknown:
        raise UserInputError(f"unknown arm(s) {', '.join(sorted(unknown))}; choose from "
                             f"{', '.join(ARMS)}")
    for seed in (int(s) for s in args.seeds.split(",")):
        for arm in arms:
            train_arm(arm, seed, arm_path(args.output, seed, arm), args)


# -------------------------------------------------------------------------------- evaluation
def read_card(path: str) -> Dict:
    from DeepRegistrationLib.methods.base import model_card_path
    with open(model_card_path(path)) as handle:
        return json.load(handle)


def command_evaluate(args) -> None:
    import torch
    from .data import available_sources
    from .evaluate import build_cases, case_specs, run_one
    from .mmln_ablation import case_metrics

    seeds = sorted(int(d[4:]) for d in os.listdir(args.output) if d.startswith("seed"))
    if not seeds:
        raise UserInputError(f"no seed<N> folders with checkpoints in {args.output}; run "
                             "'python -m training.multiprop_ablation train' first")
    cases = build_cases(args.cases, os.path.join(args.output, "cases"))
    sources = {spec.name: spec.source for spec in case_specs(args.cases, available_sources())}
    rows, cards = [], {}
    for seed in seeds:
        for arm, (variant, _) in ARMS.items():
            path = arm_path(args.output, seed, arm)
            if not os.path.isfile(path):
                print(f"seed{seed}/{arm}: no checkpoint, skipped", file=sys.stderr)
                continue
            card = cards[(seed, arm)] = read_card(path)
            seen = [source["name"] for source in card["data"]["sources"]]
            os.environ["DEEPREG_CHECKPOINTS"] = os.path.abspath(os.path.dirname(path))
            for case in cases:
                job = {"kind": "method", "name": "multiprop", "fixed": case.paths["fixed"],
                       "moving": case.paths["moving"], "options": {"variant": variant}}
                result = run_one(job)
                values = case_metrics(case, torch.from_numpy(result["displacement"]))
                rows.append({"seed": seed, "arm": arm, "case": case.name,
                             "source": sources[case.name],
                             "anatomy": "seen" if sources[case.name] in seen else "unseen",
                             "seconds": result["seconds"], **values})
                print(f"seed{seed} {arm} {case.name}: " + " ".join(
                    f"{m} {rows[-1][m]:.4f}" for m, _ in METRICS), file=sys.stderr, flush=True)
    write_evaluation(args, rows, cards)


def grid_best(cards: Dict, seed: int) -> Optional[str]:
    """The grid arm with the best *validation* Dice of its model card (never evaluation)."""
    scored = [(cards[(seed, arm)]["validation"]["metrics"]["dice"], arm) for arm in GRID
              if (seed, arm) in cards]
    return max(scored)[1] if len(scored) == len(GRID) else None


def recovery(rows: List[Dict], cards: Dict) -> List[Dict]:
    """Per seed and mis-set start: the share of the gap (grid best - mis-set arm) that bilevel
    from that start closes, for Dice and the ground-truth error (means over the cases)."""
    results = []
    for seed in sorted({r["seed"] for r in rows}):
        best = grid_best(cards, seed)
        if best is None:
            continue

        def mean(arm, metric):
            values = [r[metric] for r in rows if r["seed"] == seed and r["arm"] == arm]
            return float(np.mean(values)) if values else float("nan")
        for tuned, misset in RECOVERY:
            for metric, lower_better in (("dice", False), ("gt_error_mm", True)):
                gap = mean(best, metric) - mean(misset, metric)
                gained = mean(tuned, metric) - mean(misset, metric)
                share = gained / gap if gap else float("nan")
                results.append({"seed": seed, "start": misset, "grid_best": best,
                                "metric": metric, "misset": mean(misset, metric),
                                "grid_best_value": mean(best, metric),
                                "bilevel": mean(tuned, metric), "recovered_share": share,
                                "claim": "holds" if share >= 0.5 else "fails"})
    return results


def write_evaluation(args, rows: List[Dict], cards: Dict) -> None:
    folder = args.output
    columns = ["seed", "arm", "case", "source", "anatomy", "seconds"] + [m for m, _ in METRICS]
    with open(os.path.join(folder, "per_case.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v)
                             for k, v in row.items()})
    lines = [f"# MultiProp ablation ({args.cases} cases)", "",
             f"{len(rows)} registrations; seeds {sorted({r['seed'] for r in rows})}; Python "
             f"{platform.python_version()}. Means over (case, seed).", "",
             "| arm | anatomy | units | " + " | ".join(m for m, _ in METRICS) + " |",
             "|" + "---|" * (3 + len(METRICS))]
    for arm in ARMS:
        for subset in ("all", "unseen", "seen"):
            chosen = [r for r in rows if r["arm"] == arm
                      and (subset == "all" or r["anatomy"] == subset)]
            if chosen:
                lines.append(f"| {arm} | {subset} | {len(chosen)} | " + " | ".join(
                    f"{np.nanmean([r[m] for r in chosen]):.4f}" for m, _ in METRICS) + " |")
    lines += ["", "## Recovery from a mis-set regularisation weight", "",
              "| seed | start | grid best (validation) | metric | mis-set | grid best | bilevel |"
              " recovered share | claim (>= 0.5) |", "|" + "---|" * 9]
    for r in recovery(rows, cards):
        lines.append(f"| {r['seed']} | {r['start']} | {r['grid_best']} | {r['metric']} | "
                     f"{r['misset']:.4f} | {r['grid_best_value']:.4f} | {r['bilevel']:.4f} | "
                     f"{r['recovered_share']:.2f} | {r['claim']} |")
    lines += ["", "## Paired comparisons (first - second over the same (case, seed))", "",
              "| first vs second | metric | units | difference | first lower / higher / ties | "
              "Wilcoxon p |", "|" + "---|" * 6]
    for first, second in COMPARISONS:
        for metric, _ in METRICS:
            c = paired(rows, first, second, metric)
            if c:
                lines.append(f"| {first} vs {second} | {metric} | {c['units']} | "
                             f"{c['mean_difference']:+.4f} | {c['first_lower']} / "
                             f"{c['first_higher']} / {c['ties']} | {c['wilcoxon_p']:.3g} |")
    lines += ["", "## Final loss weights (model cards; trajectories in weights.json)", "",
              "| seed | arm | " + " | ".join(("similarity1", "similarity2", "regularisation",
                                               "folding")) + " |", "|" + "---|" * 6]
    trajectories = {}
    for (seed, arm), card in sorted(cards.items()):
        weights = card.get("loss_weights", {})
        values = weights.get("values", {})
        lines.append(f"| {seed} | {arm} | " + " | ".join(
            f"{values.get(n, float('nan')):.4g}" for n in ("similarity1", "similarity2",
                                                          "regularisation", "folding")) + " |")
        trajectories[f"seed{seed}/{arm}"] = weights
    with open(os.path.join(folder, "weights.json"), "w") as handle:
        json.dump(trajectories, handle, indent=2)
    with open(os.path.join(folder, "results.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


# ------------------------------------------------------------------------------------- speed
def command_speed(args) -> None:
    """Seconds of the deployed network (random weights) on a 2 mm MNI152 pair: the network call
    alone (timed by hooks on the module, on the canvas the engine feeds it) and the whole
    ``engine.register``, CPU seconds and the load average beside them."""
    import tempfile
    import torch
    from DeepRegistrationLib import engine
    from DeepRegistrationLib.methods import get_method, multiprop, save_checkpoint
    from DeepRegistrationLib.methods.base import _NETWORK_CACHE
    from .evaluate import CaseSpec, build_case

    if args.threads:
        torch.set_num_threads(int(args.threads))
    case = build_case(CaseSpec("mni152-speed", "mni152", 0.6), 2.0, 0)
    spec = get_method("multiprop")
    config = dict(spec.config, **json.loads(args.config))
    network = multiprop.build_network(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random weights that move: every head non-zero
        for parameter in network.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    calls: List[Dict] = []
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(os.path.join(folder, "multiprop.pt"), network, "multiprop", config,
                        {"note": "random weights, for timing only"})
        os.environ["DEEPREG_CHECKPOINTS"] = folder
        _NETWORK_CACHE.clear()
        for repeat in range(args.repeats + 1):
            started, cpu = time.perf_counter(), time.process_time()
            engine.register(case.fixed, case.moving, "multiprop")
            total, total_cpu = time.perf_counter() - started, time.process_time() - cpu
            loaded = next(v for k, v in _NETWORK_CACHE.items() if k[0].startswith(folder))
            if repeat == 0:
                loaded.register_forward_pre_hook(
                    lambda module, inputs: calls.append(
                        {"start": time.perf_counter(), "cpu": time.process_time(),
                         "shape": list(inputs[0].shape[2:])}))
                loaded.register_forward_hook(
                    lambda module, inputs, output: calls[-1].update(
                        seconds=time.perf_counter() - calls[-1]["start"],
                        cpu_seconds=time.process_time() - calls[-1]["cpu"]))
                continue  # the first call loads the checkpoint and warms up
            rows.append({"repeat": repeat, "register_seconds": total,
                         "register_cpu_seconds": total_cpu,
                         "network_seconds": calls[-1]["seconds"],
                         "network_cpu_seconds": calls[-1]["cpu_seconds"],
                         "canvas": calls[-1]["shape"], "load_average": os.getloadavg()[0],
                         "fixed_size": list(case.fixed.GetSize())})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    summary = {"config": config, "threads": torch.get_num_threads(),
               "cpu_count": os.cpu_count(), "torch": torch.__version__,
               "parameters": sum(p.numel() for p in network.parameters()),
               "median_network_seconds": float(np.median([r["network_seconds"] for r in rows])),
               "median_register_seconds": float(np.median([r["register_seconds"]
                                                           for r in rows])),
               # CPU seconds of this process (all threads): on an idle machine the wall time
               # lies between CPU / threads (perfect parallelism) and CPU (none)
               "median_network_cpu_seconds": float(np.median([r["network_cpu_seconds"]
                                                              for r in rows])),
               "median_register_cpu_seconds": float(np.median([r["register_cpu_seconds"]
                                                               for r in rows])),
               "mean_load_average": float(np.mean([r["load_average"] for r in rows])),
               "runs": rows}
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "speed.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    print(f"network {summary['median_network_seconds']:.2f} s "
          f"({summary['median_network_cpu_seconds']:.2f} CPU s) on a "
          f"{'x'.join(map(str, rows[-1]['canvas']))} canvas, whole register "
          f"{summary['median_register_seconds']:.2f} s "
          f"({summary['median_register_cpu_seconds']:.2f} CPU s); median of {len(rows)}, load "
          f"average {summary['mean_load_average']:.1f} on {os.cpu_count()} cores")


# --------------------------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.multiprop_ablation",
                                     description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    train = commands.add_parser("train", help="train every arm and seed")
    train.add_argument("--iterations", type=int, required=True)
    train.add_argument("--output", required=True)
    train.add_argument("--seeds", default="0")
    train.add_argument("--arms", help=f"comma-separated subset of {', '.join(ARMS)}")
    train.add_argument("--config", default="{}",
                       help="config overrides for every arm (JSON), e.g. upper_every")
    train.add_argument("--recipe", help="passed to 'python -m training train'")
    train.add_argument("--source", help="passed to 'python -m training train'")
    train.add_argument("--spacing", type=float, help="passed to 'python -m training train'")
    train.add_argument("--threads", type=int)
    train.add_argument("--val-every", type=int, dest="val_every")
    train.add_argument("--val-cases", type=int, dest="val_cases")
    train.add_argument("--retrain", action="store_true",
                       help="train again even where a checkpoint exists")
    evaluate = commands.add_parser("evaluate", help="every arm on the evaluation cases")
    evaluate.add_argument("--output", required=True)
    evaluate.add_argument("--cases", default="full")
    speed = commands.add_parser("speed", help="seconds per 2 mm pair (random weights)")
    speed.add_argument("--output", required=True)
    speed.add_argument("--config", default="{}", help="MultiProp config overrides (JSON)")
    speed.add_argument("--repeats", type=int, default=3)
    speed.add_argument("--threads", type=int)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        {"train": command_train, "evaluate": command_evaluate,
         "speed": command_speed}[args.command](args)
    except UserInputError as error:
        print(f"python -m training.multiprop_ablation: error: {error}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as error:
        print(f"python -m training.multiprop_ablation: error: training failed ({error})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
