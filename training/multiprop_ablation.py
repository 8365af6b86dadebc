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
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from typing import Dict, List, Optional, Sequence  # noqa: E402

import numpy as np  # noqa: E402

from DeepRegistrationLib.errors import UserInputError  # noqa: E402

from .ablation_common import (ablation_parser, add_evaluate_and_speed, means_table,  # noqa: E402
                              run_command, speed_sentence, time_deployed_network,
                              trainer_command, write_per_case_csv)
from .mmln_ablation import finished, paired  # noqa: E402  (the same bookkeeping)

PROG = "python -m training.multiprop_ablation"

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
    command = trainer_command("multiprop", config, seed, output, args,
                              ("recipe", "source", "threads", "val_every", "val_cases", "spacing"))
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
    write_per_case_csv(os.path.join(folder, "per_case.csv"), rows, columns)
    lines = means_table(f"MultiProp ablation ({args.cases} cases)", rows, list(ARMS), METRICS)
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
    alone and the whole ``engine.register``, CPU seconds and the load average beside them
    (measured by ``ablation_common.time_deployed_network``, as for MMLN)."""
    summary, _ = time_deployed_network(
        "multiprop", json.loads(args.config), args.repeats, args.threads,
        lambda network: {"parameters": sum(p.numel() for p in network.parameters())})
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "speed.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    print(speed_sentence(summary, canvas=True))


# --------------------------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    parser, commands = ablation_parser(PROG, __doc__.split("\n\n")[0])
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
    add_evaluate_and_speed(commands, "MultiProp", default_repeats=3)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    return run_command(PROG, {"train": command_train, "evaluate": command_evaluate,
                              "speed": command_speed}, args)


if __name__ == "__main__":
    sys.exit(main())
