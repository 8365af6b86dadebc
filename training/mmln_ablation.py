"""The MMLN ablation of issue #11: does the core branch (LC) or the 2-D branch (LCD) make the
deployed 3-D pyramid more regular without costing Dice, as the paper's own ablation reports
(Dice 0.783 -> 0.782 -> 0.779, folding -33 % with the core branch, -90 % with the 2-D branch)?

Four steps, each writing under ``--output`` (commit ``*.md``, ``*.csv``, ``*.json`` and the
training logs and model cards; not the weights)::

    # 1. k on the L baseline, on the trainer's held-out *validation* cases (never the evaluation
    #    cases): the largest k whose strict folding there, at the run's last step, is non-zero
    python -m training.mmln_ablation choose-k --ks 4,2,1,0.5 --iterations 3000 --output DIR
    # 2. every arm with that k, same steps, two seeds (checkpoints DIR/seed<S>/mmln-<ARM>.pt)
    python -m training.mmln_ablation train --k K --iterations 3000 --seeds 0,1 --output DIR
    # 3. every arm's final weights on the evaluation cases, paired per-case statistics
    python -m training.mmln_ablation evaluate --cases full --output DIR
    # 4. seconds of the deployed network on a 2 mm pair (random weights will do: the cost does
    #    not depend on them)
    python -m training.mmln_ablation speed --output DIR

Arms: ``L`` (the pyramid alone), ``LC`` (+ core branch), ``LCD`` (+ core + 2-D branch = MMLN) and
the negative controls ``LC-uncoupled``, ``LCD-uncoupled`` (the same branches with the gradient
path into the pyramid cut: the branch weights cannot change the deployed network, so these must
match ``L`` up to seed noise). Training goes through ``python -m training train`` (any
``--recipe``, ``--source``, ``--guidance`` or ``--clean-similarity`` is passed on; unset, the
recipe's guidance terms and clean similarity train every arm; ``--guidance '{}'
--clean-similarity no`` trains each with its own loss alone), one arm after another.

Weights evaluated: each arm's *final* weights, the step every arm was trained for (the trainer
keeps its best validation step in ``NAME.pt``, which differs between arms; the final weights are
in its ``NAME.resume.pt``). ``evaluate`` exports them to ``DIR/seed<S>/final/mmln-<ARM>.pt`` with
a model card saying so, refuses runs that ended at different steps, and records the step.

Metrics per case (all from the displacement on the fixed grid): folding by the strict measure
(a voxel folds when any of its 8 one-sided finite-difference Jacobians has det <= 0; primary) and
by central differences, SDlogJ, the smallest det J (both measures), then mean Dice, the mean error
against the ground-truth field in mm and the label volume error (mean over labels of
``|V(warped moving label) / V(fixed label) - 1|``). Each case is marked seen / unseen: whether its
source is among the checkpoint's training sources (its model card); the means and the paired
comparisons are given for all cases, the unseen and the seen ones. Comparisons are paired over
*cases*, each arm's seeds averaged per case first (two seeds of a case register the same images,
so they are not independent samples: counting them as units would overstate significance; the
per-seed rows stay in ``per_case.csv``): mean difference, how many cases go each way, and the
two-sided Wilcoxon signed-rank p-value (``zsplit`` ties, so cases where both arms have no folding
count as ties).
"""
from __future__ import annotations

from DeepRegistrationLib.runtime import configure_openmp

configure_openmp()  # before torch (see runtime.py)

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from typing import Dict, List, Optional, Sequence, Tuple  # noqa: E402

import numpy as np  # noqa: E402

from .ablation_common import (SUBSETS, ablation_parser, add_evaluate_and_speed,  # noqa: E402
                              add_loss_options, check_kept_run, evaluate_final_weights,
                              export_final_arms, final_step_validation, final_weights_line,
                              means_table, resume_path, run_command, speed_sentence,
                              time_deployed_network, trainer_command, training_losses,
                              training_losses_lines, write_per_case_csv)

PROG = "python -m training.mmln_ablation"
ARMS = ("L", "LC", "LCD", "LC-uncoupled", "LCD-uncoupled")
COMPARISONS = (("LC", "L"), ("LCD", "L"), ("LCD", "LC"), ("LC", "LC-uncoupled"),
               ("LCD", "LCD-uncoupled"))
# primary (regularity) first, then accuracy; True where lower is better
METRICS = (("folding_percent_strict", True), ("folding_percent", True), ("sdlogj", True),
           ("min_det_strict", False), ("min_det", False), ("dice", False),
           ("gt_error_mm", True), ("label_volume_error", True))


# ---------------------------------------------------------------------------------- training
def arm_path(folder: str, seed: int, arm: str) -> str:
    """Where ``train`` writes seed ``seed``'s checkpoint of ``arm``."""
    from DeepRegistrationLib.methods.mmln import checkpoint_name
    return os.path.join(folder, f"seed{seed}", checkpoint_name(arm))


def arm_config(arm: str, k: float) -> Dict:
    from DeepRegistrationLib.methods.mmln import parse_variant
    branches, coupling = parse_variant(arm)
    return {"variant": branches, "coupling": coupling, "smoothness": float(k)}


def train_arm(arm: str, k: float, seed: int, output: str, args) -> Dict:
    """Train one arm with ``python -m training train``; returns its model card."""
    command = trainer_command("mmln", arm_config(arm, k), seed, output, args,
                              ("recipe", "source", "threads", "val_every", "val_cases",
                               "guidance", "clean_similarity"))
    card_path = os.path.splitext(output)[0] + ".json"
    if finished(card_path, args.iterations) and not args.retrain:
        with open(card_path) as handle:
            check_kept_run(json.load(handle), args, output)
        print(f"{output}: trained already, kept (--retrain to train again)", file=sys.stderr)
    else:
        print(" ".join(command), file=sys.stderr, flush=True)
        resume = resume_path(output)
        if os.path.isfile(resume) and not args.retrain:
            command += ["--resume", resume]
        subprocess.run(command, check=True)
    with open(card_path) as handle:
        return json.load(handle)


def finished(card_path: str, iterations: int) -> bool:
    """A run is done when its model card says it ran all its steps (the trainer completes the
    card at the end of a run)."""
    if not os.path.isfile(card_path):
        return False
    with open(card_path) as handle:
        card = json.load(handle)
    return int(card["training"].get("run_iterations", 0)) >= iterations


def final_validation(card: Dict) -> Dict:
    """The validation block (``step``, ``metrics``) of the run's last step, the weights the
    evaluation compares; of its best step when the card's history lacks the last one (the
    ``step`` says which)."""
    final = final_step_validation(card, int(card["training"].get("run_iterations", -1)))
    return final or card["validation"]


def validation_folding(metrics: Dict) -> float:
    """The strict folding on the trainer's validation cases when the trainer records it, else
    the central-difference folding."""
    return float(metrics.get("folding_percent_strict", metrics["folding_percent"]))


def command_choose_k(args) -> None:
    ks = sorted((float(k) for k in args.ks.split(",")), reverse=True)
    rows, cards = [], {}
    for k in ks:
        output = os.path.join(args.output, "choose-k", f"k{k:g}", "mmln-L.pt")
        card = cards[(0, f"L k={k:g}")] = train_arm("L", k, 0, output, args)
        validation = final_validation(card)
        metrics = validation["metrics"]
        rows.append({"k": k, "validation_step": validation["step"],
                     "validation_folding": validation_folding(metrics),
                     "validation_dice": metrics["dice"], "validation_sdlogj": metrics["sdlogj"],
                     "validation_gt_error_mm": metrics["gt_error_mm"],
                     "measure": "strict" if "folding_percent_strict" in metrics else "central",
                     **training_losses(card)})
    folding = [r for r in rows if r["validation_folding"] > 0]
    chosen = max(folding, key=lambda r: r["k"]) if folding else min(rows, key=lambda r: r["k"])
    result = {"chosen_k": chosen["k"], "rule": "largest k whose L-arm folding on the trainer's "
              "validation cases at the run's last step is non-zero"
              + ("" if folding else " (none folded: the smallest k tried)"),
              "candidates": rows, "iterations": args.iterations}
    with open(os.path.join(args.output, "choose_k.json"), "w") as handle:
        json.dump(result, handle, indent=2)
    lines = ["| k | step | validation folding % | measure | Dice | SDlogJ | GT error mm |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['k']:g} | {r['validation_step']} | {r['validation_folding']:.4f} | "
              f"{r['measure']} | "
              f"{r['validation_dice']:.3f} | {r['validation_sdlogj']:.3f} | "
              f"{r['validation_gt_error_mm']:.2f} |" for r in rows]
    losses = training_losses_lines(cards)
    with open(os.path.join(args.output, "choose_k.md"), "w") as handle:
        handle.write(f"# MMLN: k on the L baseline ({args.iterations} steps, seed 0)\n\n"
                     + "\n".join(lines) + f"\n\nChosen k = {chosen['k']:g}: {result['rule']}.\n\n"
                     + "\n".join(losses) + "\n")
    print(f"chosen k = {chosen['k']:g}")


def command_train(args) -> None:
    arms = args.arms.split(",") if args.arms else list(ARMS)
    for seed in (int(s) for s in args.seeds.split(",")):
        for arm in arms:
            train_arm(arm, args.k, seed, arm_path(args.output, seed, arm), args)


# -------------------------------------------------------------------------------- evaluation
def case_metrics(case, displacement) -> Dict[str, float]:
    """The evaluation's metrics of one field plus strict folding, the smallest det J and the
    label volume error."""
    import SimpleITK as sitk
    from DeepRegistrationLib.metrics import (folding_percent, jacobian_determinant_map,
                                             strict_jacobian_determinant_map, volume_ratio)
    from DeepRegistrationLib.outputs import warp_image
    from .evaluate import field_metrics

    values = field_metrics(case, displacement)
    values.pop("dice_per_label", None)
    strict = strict_jacobian_determinant_map(displacement)
    central = jacobian_determinant_map(displacement)
    fixed_labels = sitk.GetArrayFromImage(case.fixed_labels)
    warped_labels = sitk.GetArrayFromImage(warp_image(case.moving_labels, displacement,
                                                      case.fixed, nearest=True))
    ratios = volume_ratio(fixed_labels, warped_labels)
    values.update(folding_percent_strict=folding_percent(strict),
                  min_det_strict=float(strict.min()), min_det=float(central.min()),
                  label_volume_error=float(np.mean([abs(r - 1.0) for r in ratios.values()]))
                  if ratios else float("nan"))
    return values


def seed_means(rows: List[Dict], metrics: Sequence[Tuple[str, bool]]) -> List[Dict]:
    """One row per (arm, case): each of ``metrics`` averaged over the arm's seeds of that case
    (NaN skipped), ``seed`` the seeds averaged (``"0,1"``), the other keys the first seed's.

    ``paired`` over these rows counts each case once: two seeds of a case register the same
    images, so treating (case, seed) as independent units would overstate significance. Arms
    pair only where they averaged the same seeds (``seed`` is part of the unit)."""
    groups: Dict[Tuple[str, str], List[Dict]] = {}
    for row in rows:
        groups.setdefault((row["arm"], row["case"]), []).append(row)
    means = []
    for group in groups.values():
        mean = dict(group[0], seed=",".join(str(s) for s in sorted({r["seed"] for r in group})))
        for metric, _ in metrics:
            values = [r[metric] for r in group if np.isfinite(r[metric])]
            mean[metric] = float(np.mean(values)) if values else float("nan")
        means.append(mean)
    return means


def paired(rows: List[Dict], first: str, second: str, metric: str) -> Optional[Dict]:
    """Paired comparison of two arms over the (case, seed) units both have (``seed_means``
    first makes the units cases)."""
    from scipy.stats import wilcoxon
    by_unit = {}
    for row in rows:
        by_unit.setdefault((row["case"], row["seed"]), {})[row["arm"]] = row[metric]
    units = [(u, v[first], v[second]) for u, v in by_unit.items()
             if first in v and second in v and np.isfinite(v[first]) and np.isfinite(v[second])]
    if not units:
        return None
    a = np.array([x for _, x, _ in units])
    b = np.array([y for _, _, y in units])
    difference = a - b
    if np.all(difference == 0):
        p_value = 1.0
    else:
        p_value = float(wilcoxon(a, b, zero_method="zsplit").pvalue)
    return {"first": first, "second": second, "metric": metric, "units": len(units),
            "mean_first": float(a.mean()), "mean_second": float(b.mean()),
            "mean_difference": float(difference.mean()),
            "relative_change": float(difference.mean() / b.mean()) if b.mean() else float("nan"),
            "first_lower": int((difference < 0).sum()), "first_higher": int((difference > 0).sum()),
            "ties": int((difference == 0).sum()), "wilcoxon_p": p_value}



def compare_arms(rows: List[Dict], comparisons: Sequence[Tuple[str, str]],
                 metrics: Sequence[Tuple[str, bool]], **labels) -> List[Dict]:
    """``paired`` for every (first, second) arm and metric over ``rows``; each result carries
    ``labels`` (which subset of the cases ``rows`` are, e.g. ``anatomy="unseen"``)."""
    results = []
    for first, second in comparisons:
        for metric, _ in metrics:
            result = paired(rows, first, second, metric)
            if result:
                results.append(dict(result, **labels))
    return results


def write_comparisons_csv(path: str, comparisons: List[Dict]) -> None:
    """The results of ``compare_arms``, one line each (an empty file when there are none)."""
    with open(path, "w", newline="") as handle:
        if comparisons:
            writer = csv.DictWriter(handle, fieldnames=list(comparisons[0]))
            writer.writeheader()
            writer.writerows(comparisons)


def comparisons_table(comparisons: List[Dict], labels: Sequence[str]) -> List[str]:
    """The Markdown table of ``compare_arms``' results, the ``labels`` columns first."""
    lines = ["| " + " | ".join(labels) + (" | " if labels else "")
             + "first vs second | metric | units | mean first | mean second | difference | "
             "relative | first lower / higher / ties | Wilcoxon p |",
             "|" + "---|" * (len(labels) + 9)]
    for c in comparisons:
        lines.append("| " + "".join(f"{c[label]} | " for label in labels)
                     + f"{c['first']} vs {c['second']} | {c['metric']} | "
                     f"{c['units']} | {c['mean_first']:.4f} | {c['mean_second']:.4f} | "
                     f"{c['mean_difference']:+.4f} | {c['relative_change']:+.1%} | "
                     f"{c['first_lower']} / {c['first_higher']} / {c['ties']} | "
                     f"{c['wilcoxon_p']:.3g} |")
    return lines


def command_evaluate(args) -> None:
    """Every arm's final weights (``export_final_arms``: the same step for every arm) on the
    evaluation cases, then the report."""
    cards = export_final_arms(args.output, ARMS, arm_path, PROG)
    rows = evaluate_final_weights(args, cards, arm_path, "mmln", lambda arm: arm, case_metrics,
                                  METRICS)
    write_evaluation(args, rows, cards)


def paired_comparisons(rows: List[Dict]) -> List[Dict]:
    """``COMPARISONS`` paired per case (seeds averaged first: ``seed_means``) over all cases,
    the unseen and the seen ones: the claim should hold on anatomy the networks never saw."""
    per_case = seed_means(rows, METRICS)
    results = []
    for subset in SUBSETS:
        chosen = [r for r in per_case if subset in ("all", r["anatomy"])]
        results += compare_arms(chosen, COMPARISONS, METRICS, anatomy=subset)
    return results


def setup_lines(rows: List[Dict], cards: Dict[Tuple[int, str], Dict]) -> List[str]:
    """What was compared: the weights (final, at which step), the loss options, the unseen
    anatomy, and how the paired statistics count."""
    unseen = sorted({r["source"] for r in rows if r["anatomy"] == "unseen"})
    return [final_weights_line(cards), "", *training_losses_lines(cards), "",
            "Unseen anatomy (sources no arm was trained on): "
            + (", ".join(unseen) if unseen else "none among these cases: the unseen rows and "
               "comparisons are absent") + "."]


def write_evaluation(args, rows: List[Dict], cards: Dict[Tuple[int, str], Dict]) -> None:
    folder = args.output
    columns = ["seed", "arm", "step", "case", "source", "anatomy", "seconds"] \
        + [m for m, _ in METRICS] + ["ncc", "hd95"]
    write_per_case_csv(os.path.join(folder, "per_case.csv"), rows, columns)
    comparisons = paired_comparisons(rows)
    write_comparisons_csv(os.path.join(folder, "comparisons.csv"), comparisons)
    lines = means_table(f"MMLN ablation ({args.cases} cases)", rows, ARMS, METRICS)
    lines += ["", *setup_lines(rows, cards)]
    print("\n".join(lines))
    lines += ["", "## Paired comparisons (first - second per case; each arm's seeds averaged "
                  "per case first, so units are cases)", ""]
    lines += comparisons_table(comparisons, ("anatomy",))
    with open(os.path.join(folder, "results.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print(f"paired comparisons in {os.path.join(folder, 'results.md')}")


# ------------------------------------------------------------------------------------- speed
def command_speed(args) -> None:
    """Seconds of the deployed pyramid (random weights) on a 2 mm MNI152 pair: the network call
    alone and the whole ``engine.register``, the machine's load average beside them (measured by
    ``ablation_common.time_deployed_network``, as for MultiProp)."""
    import torch

    # --repeats here counts the warm-up call too (MultiProp's does not), hence one timed run fewer;
    # the deployed network is the 3-D pyramid alone: the branches only shape its training
    summary, network = time_deployed_network(
        "mmln", json.loads(args.config), args.repeats - 1, args.threads,
        lambda network: {"parameters_deployed": sum(p.numel()
                                                    for p in network.levels.parameters()),
                         "parameters_total": sum(p.numel() for p in network.parameters())})
    config, rows = summary["config"], summary["runs"]
    os.makedirs(args.output, exist_ok=True)
    if args.profile:  # where the network's time goes: one forward on the same canvas, 1 thread
        from torch.profiler import ProfilerActivity, profile
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        canvas = [torch.rand(1, 1, *rows[-1]["canvas"]) for _ in range(2)]
        with torch.inference_mode():
            network.eval()(*canvas)
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
                network(*canvas)
        torch.set_num_threads(threads)
        table = profiler.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=28,
            max_shapes_column_width=64)
        with open(os.path.join(args.output, f"speed_width{config['width']}_profile.txt"),
                  "w") as handle:
            handle.write(f"torch.profiler, one thread, canvas {rows[-1]['canvas']}, load "
                         f"average {os.getloadavg()[0]:.1f}\n{table}\n")
    name = f"speed_width{config['width']}.json"
    with open(os.path.join(args.output, name), "w") as handle:
        json.dump(summary, handle, indent=2)
    print(f"width {config['width']}: {speed_sentence(summary, canvas=False)}")


# --------------------------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    parser, commands = ablation_parser(PROG, __doc__.split("\n\n")[0])

    def training_options(command):
        command.add_argument("--iterations", type=int, required=True)
        command.add_argument("--output", required=True)
        command.add_argument("--recipe", help="passed to 'python -m training train'")
        command.add_argument("--source", help="passed to 'python -m training train'")
        command.add_argument("--threads", type=int)
        command.add_argument("--val-every", type=int, dest="val_every")
        command.add_argument("--val-cases", type=int, dest="val_cases")
        add_loss_options(command)
        command.add_argument("--retrain", action="store_true",
                             help="train again even where a checkpoint exists")

    choose = commands.add_parser("choose-k", help="k on the L arm (validation cases)")
    choose.add_argument("--ks", default="4,2,1,0.5")
    training_options(choose)
    train = commands.add_parser("train", help="train every arm and seed")
    train.add_argument("--k", type=float, required=True)
    train.add_argument("--seeds", default="0,1")
    train.add_argument("--arms", help=f"comma-separated subset of {', '.join(ARMS)}")
    training_options(train)
    speed = add_evaluate_and_speed(commands, "MMLN", default_repeats=4)
    speed.add_argument("--profile", action="store_true",
                       help="also write torch.profiler's table of one network forward")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    return run_command(PROG, {"choose-k": command_choose_k, "train": command_train,
                              "evaluate": command_evaluate, "speed": command_speed}, args)


if __name__ == "__main__":
    sys.exit(main())
