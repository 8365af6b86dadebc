"""The MultiProp ablation of issue #12: do self-tuned (bilevel) loss weights match hand-set ones,
and do they recover from a mis-set start?

The paper reports bilevel = hand-set on brains (its Table 4, +-0.006 Dice) and a gain when moving
to a new task (liver CT, +0.03 Dice). The protocol here (docs/methods/multiprop.md)::

    # 1. every arm, same steps, two seeds (DIR/seed<S>/<arm>/multiprop[-bilevel].pt)
    python -m training.multiprop_ablation train --iterations 6000 --seeds 0,1 --recipe general \\
        --output DIR
    # 2. every arm's final weights on the evaluation cases (training/evaluate.py, stream 2:
    #    never trained on, never used to choose), paired comparisons, the weight trajectories
    #    and the recovery test
    python -m training.multiprop_ablation evaluate --cases full --output DIR
    # 3. seconds of the deployed network on a 2 mm pair (random weights: the cost does not
    #    depend on them)
    python -m training.multiprop_ablation speed --output DIR

Arms (``ARMS``): ``default`` (hand-set weights), ``bilevel`` (tuned from them), ``reg0.1`` and
``reg10`` (the regularisation weight mis-set x0.1 / x10, fixed), ``bilevel-reg0.1`` and
``bilevel-reg10`` (tuned from each mis-set start), ``additive`` (the public code's propagation,
hand-set weights). ``reg0.1``, ``default`` and ``reg10`` are the 3-point grid: its best is chosen
per seed on the trainer's *validation* Dice (the model cards), never on the evaluation cases, and
enters the comparisons as the arm ``grid-best``.

Weights evaluated: each arm's *final* weights, the step every arm was trained for, as in the
MMLN ablation (``ablation_common.export_final_arms``): the trainer keeps its best validation
step in ``NAME.pt``, which differs between arms, and a bilevel arm's best step may come before
its self-tuning has acted. ``evaluate`` exports them from ``NAME.resume.pt`` to
``DIR/seed<S>/<arm>/final/`` with a model card saying so (the validation, cost and loss weights
of the final step), refuses runs that ended at different steps, and records the step; the
grid's best is chosen on the validation Dice of these weights.

The claim tested: bilevel from a mis-set start recovers at least half of the gap between the
mis-set arm and the grid's best (Dice and ground-truth error). The recovered share is given per
seed and over the seeds (each case's seeds averaged) with a 95 % bootstrap interval over the
cases: *holds* when the whole interval is >= 0.5, *fails* when it is all below, else
*inconclusive*; for all cases, the unseen and the seen ones. Paired comparisons (Wilcoxon) are
over cases, each arm's seeds averaged per case first (two seeds of a case are not independent
samples), for all cases, the unseen and the seen ones; they include bilevel from each mis-set
start against ``grid-best``.

The transfer case (issue #12: weights set on brains, then trained on the CT source): the
hand-set defaults were never tuned on brains, so the brain-tuned weights are the grid's best on
brains; ``evaluate`` names it and prints the command, e.g. ``train --arms default,bilevel
--source invesalius-ct --output DIR-ct`` when ``default`` is the best.
"""
from __future__ import annotations

from DeepRegistrationLib.runtime import configure_openmp

configure_openmp()  # before torch (see runtime.py)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from typing import Dict, List, Optional, Sequence, Tuple  # noqa: E402

import numpy as np  # noqa: E402

from DeepRegistrationLib.errors import UserInputError  # noqa: E402

from .ablation_common import (SUBSETS, ablation_parser, add_evaluate_and_speed,  # noqa: E402
                              evaluate_final_weights, export_final_arms, final_weights_line,
                              means_table, resume_path, run_command, speed_sentence,
                              time_deployed_network, trainer_command, training_losses_lines,
                              write_per_case_csv)
from .mmln_ablation import (compare_arms, comparisons_table, finished,  # noqa: E402
                            seed_means, write_comparisons_csv)  # (the same bookkeeping)

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
GRID_BEST = "grid-best"  # per seed, the grid arm with the best validation Dice (grid_best)
BILEVEL_FROM = {"default": "bilevel", "reg0.1": "bilevel-reg0.1", "reg10": "bilevel-reg10"}
RECOVERY = (("bilevel-reg0.1", "reg0.1"), ("bilevel-reg10", "reg10"))
COMPARISONS = (("bilevel", "default"), ("bilevel-reg0.1", "reg0.1"),
               ("bilevel-reg10", "reg10"), ("bilevel-reg0.1", GRID_BEST),
               ("bilevel-reg10", GRID_BEST), ("additive", "default"))
RECOVERY_METRICS = (("dice", False), ("gt_error_mm", True))
BOOTSTRAP_RESAMPLES = 2000
# True where lower is better
METRICS = (("dice", False), ("gt_error_mm", True), ("folding_percent_strict", True),
           ("folding_percent", True), ("sdlogj", True))


def _nan_to_none(value):
    """``value`` with every float NaN (nested in dicts and lists) replaced by None."""
    if isinstance(value, dict):
        return {key: _nan_to_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(item) for item in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


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
        resume = resume_path(output)
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
def command_evaluate(args) -> None:
    """Every arm's final weights (``export_final_arms``: the same step for every arm) on the
    evaluation cases, then the report."""
    from .mmln_ablation import case_metrics

    cards = export_final_arms(args.output, ARMS, arm_path, PROG)
    rows = evaluate_final_weights(args, cards, arm_path, "multiprop", lambda arm: ARMS[arm][0],
                                  case_metrics, METRICS)
    write_evaluation(args, rows, cards)


def grid_best(cards: Dict, seed: int) -> Optional[str]:
    """The grid arm with the best *validation* Dice of its model card (never evaluation): of
    the weights evaluated, the final step's (``export_final_weights``); None unless every grid
    arm of the seed has one."""
    scored = [(cards[(seed, arm)]["validation"]["metrics"]["dice"], arm) for arm in GRID
              if (cards.get((seed, arm)) or {}).get("validation")]
    return max(scored)[1] if len(scored) == len(GRID) else None


def with_grid_best(rows: List[Dict], cards: Dict) -> List[Dict]:
    """``rows`` plus, for each seed with a complete grid, a copy of its best grid arm's rows as
    the arm ``GRID_BEST`` (``grid_best_of`` saying which), so that arms can be paired with the
    grid's best even where the seeds chose different grid arms."""
    best = {seed: grid_best(cards, seed) for seed in {r["seed"] for r in rows}}
    return rows + [dict(r, arm=GRID_BEST, grid_best_of=r["arm"]) for r in rows
                   if best[r["seed"]] == r["arm"]]


def paired_comparisons(rows: List[Dict], cards: Dict) -> List[Dict]:
    """``COMPARISONS`` paired per case, each arm's seeds averaged per case first
    (``seed_means``), over all cases, the unseen and the seen ones."""
    per_case = seed_means(with_grid_best(rows, cards), METRICS)
    results = []
    for subset in SUBSETS:
        chosen = [r for r in per_case if subset in ("all", r["anatomy"])]
        results += compare_arms(chosen, COMPARISONS, METRICS, anatomy=subset)
    return results


# ---------------------------------------------------------------------------------- recovery
def case_values(rows: List[Dict], arms: Sequence[str], metric: str) -> List[np.ndarray]:
    """``metric`` of each of ``arms`` over the cases every one of them has (one row per arm and
    case expected: one seed's rows, or ``seed_means``), in the same case order."""
    by_arm = {arm: {r["case"]: r[metric] for r in rows if r["arm"] == arm} for arm in arms}
    cases = sorted(set.intersection(*(set(values) for values in by_arm.values())))
    return [np.array([by_arm[arm][case] for case in cases], float) for arm in arms]


def recovered_share(tuned: np.ndarray, misset: np.ndarray, best: np.ndarray) -> float:
    """The share of the gap between the mis-set arm and the grid's best (means over cases) that
    bilevel from the mis-set start closes: 0 = stayed put, 1 = reached the best; NaN without a
    gap. The sign of the gap makes it right for lower-is-better metrics too."""
    gap = float(np.mean(best) - np.mean(misset))
    return float((np.mean(tuned) - np.mean(misset)) / gap) if gap else float("nan")


def bootstrap_interval(tuned: np.ndarray, misset: np.ndarray, best: np.ndarray,
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> Tuple[float, float]:
    """The 95 % percentile interval of ``recovered_share`` over cases resampled with
    replacement (the same cases for the three arms: they are paired). Resamples without a gap
    are left out; NaN when none has one."""
    generator = np.random.default_rng(seed)
    shares = []
    for _ in range(resamples):
        chosen = generator.integers(0, len(tuned), len(tuned))
        shares.append(recovered_share(tuned[chosen], misset[chosen], best[chosen]))
    shares = np.array(shares)
    if not np.isfinite(shares).any():
        return float("nan"), float("nan")
    low, high = np.nanpercentile(shares, [2.5, 97.5])
    return float(low), float(high)


def verdict(low: float, high: float) -> str:
    """The claim "recovers at least half of the gap" against the share's interval."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return "no gap"
    return "holds" if low >= 0.5 else "fails" if high < 0.5 else "inconclusive"


def recovery(rows: List[Dict], cards: Dict) -> List[Dict]:
    """For each anatomy subset, mis-set start and metric: the recovered share per seed, and over
    the seeds (each case's seeds averaged) with its bootstrap interval over cases and the
    verdict. Seeds without a complete grid or without the arms are left out."""
    rows = with_grid_best(rows, cards)
    results = []
    for subset in SUBSETS:
        chosen = [r for r in rows if subset in ("all", r["anatomy"])]
        for tuned, misset in RECOVERY:
            arms = (tuned, misset, GRID_BEST)
            for metric, _ in RECOVERY_METRICS:
                per_seed = {}
                for seed in sorted({r["seed"] for r in chosen}):
                    values = case_values([r for r in chosen if r["seed"] == seed], arms, metric)
                    if len(values[0]):
                        per_seed[seed] = recovered_share(*values)
                if not per_seed:
                    continue
                pooled = seed_means([r for r in chosen if r["seed"] in per_seed], METRICS)
                values = case_values(pooled, arms, metric)
                low, high = bootstrap_interval(*values)
                results.append({
                    "anatomy": subset, "start": misset, "tuned": tuned, "metric": metric,
                    "grid_best": {seed: grid_best(cards, seed) for seed in per_seed},
                    "cases": len(values[0]), "misset": float(np.mean(values[1])),
                    "grid_best_value": float(np.mean(values[2])),
                    "bilevel": float(np.mean(values[0])), "per_seed_shares": per_seed,
                    "recovered_share": recovered_share(*values), "interval_low": low,
                    "interval_high": high, "claim": verdict(low, high)})
    return results


def recovery_table(results: List[Dict]) -> List[str]:
    lines = ["| anatomy | start | grid best (validation) | metric | cases | mis-set | grid best "
             "| bilevel | share per seed | share (seeds averaged) | 95 % interval (bootstrap "
             "over cases) | claim (>= 0.5) |", "|" + "---|" * 12]
    for r in results:
        bests = ", ".join(f"{arm} (seed {seed})" for seed, arm in r["grid_best"].items())
        shares = ", ".join((f"{share:.2f}" if np.isfinite(share) else "no gap")
                           + f" (seed {seed})" for seed, share in r["per_seed_shares"].items())
        lines.append(f"| {r['anatomy']} | {r['start']} | {bests} | {r['metric']} | "
                     f"{r['cases']} | {r['misset']:.4f} | {r['grid_best_value']:.4f} | "
                     f"{r['bilevel']:.4f} | {shares} | {r['recovered_share']:.2f} | "
                     f"{r['interval_low']:.2f} to {r['interval_high']:.2f} | {r['claim']} |")
    return lines


# ---------------------------------------------------------------------------------- transfer
def transfer_lines(cards: Dict) -> List[str]:
    """The transfer case's arms: the grid's best on these brains and bilevel from it (the
    hand-set defaults were never tuned on brains, so they are not "weights set on brains")."""
    bests = {seed: grid_best(cards, seed) for seed in sorted({seed for seed, _ in cards})}
    bests = {seed: arm for seed, arm in bests.items() if arm}
    if not bests:
        return ["No seed has the whole grid: the brain-tuned weights of the transfer case are "
                "unknown."]
    arms = list(dict.fromkeys(a for best in bests.values() for a in (best, BILEVEL_FROM[best])))
    chosen = ", ".join(f"{arm} (seed {seed})" for seed, arm in bests.items())
    return [f"Weights set on brains = the grid's best on them (validation Dice): {chosen}"
            + (" -- the seeds disagree, so every one is a start" if len(set(bests.values())) > 1
               else "") + ". Transfer run: `python -m training.multiprop_ablation train "
            f"--arms {','.join(arms)} --source invesalius-ct --iterations N --output DIR-ct`, "
            "then `evaluate --output DIR-ct`."]


# ------------------------------------------------------------------------------------ report
def write_evaluation(args, rows: List[Dict], cards: Dict) -> None:
    folder = args.output
    columns = ["seed", "arm", "step", "case", "source", "anatomy", "seconds"] \
        + [m for m, _ in METRICS]
    write_per_case_csv(os.path.join(folder, "per_case.csv"), rows, columns)
    comparisons = paired_comparisons(rows, cards)
    write_comparisons_csv(os.path.join(folder, "comparisons.csv"), comparisons)
    recovered = recovery(rows, cards)
    with open(os.path.join(folder, "recovery.json"), "w") as handle:
        # strict JSON: an undefined share ("no gap") is null, not NaN
        json.dump(_nan_to_none(recovered), handle, indent=2, allow_nan=False)
    lines = means_table(f"MultiProp ablation ({args.cases} cases)", rows, list(ARMS), METRICS)
    lines += ["", final_weights_line(cards), "", *training_losses_lines(cards)]
    lines += ["", "## Recovery from a mis-set regularisation weight", "",
              *recovery_table(recovered)]
    lines += ["", "## Paired comparisons (first - second per case; each arm's seeds averaged "
                  f"per case first, so units are cases; {GRID_BEST}: each seed's best grid arm "
                  "by validation Dice)", "", *comparisons_table(comparisons, ("anatomy",))]
    lines += ["", "## Transfer case", "", *transfer_lines(cards)]
    lines += ["", "## Final loss weights (model cards of the final weights; trajectories in "
                  "weights.json)", "",
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
    train.add_argument("--seeds", default="0,1")
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
