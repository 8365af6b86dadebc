"""What the ablation scripts ``training/mmln_ablation.py`` and ``training/multiprop_ablation.py``
share, so that their arms are trained, tabulated and timed the same way and their outputs stay
comparable: the trainer command line, the per-case CSV and the table of means, the speed of the
deployed network with random weights, and the command-line frame (sub-commands, exit status).
``training/suits_ablation.py`` tabulates with the same per-case CSV and table of means. Also
the trainer's loss options an ablation passes on and records (``--guidance``,
``--clean-similarity``), and the export and evaluation of every run's *final* weights, so that
arms trained for the same number of steps are evaluated at that step rather than at their best
validation step.

(Their per-case metrics and paired statistics, ``finished``, ``paired``, ``seed_means``,
``compare_arms``, ``comparisons_table`` and ``case_metrics``, are in ``mmln_ablation.py``, which
came first.)
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from DeepRegistrationLib.errors import UserInputError

if TYPE_CHECKING:  # torch is imported only when timing: the scripts set OpenMP up before it
    import torch

SUBSETS = ("all", "unseen", "seen")  # the rows of each arm in the table of means


# ---------------------------------------------------------------------------------- training
def trainer_command(method: str, config: Dict, seed: int, output: str, args,
                    options: Sequence[str]) -> List[str]:
    """``python -m training train`` for one arm; each of ``options`` that ``args`` sets (an
    attribute name such as ``val_every``) is passed on as its flag (``--val-every``)."""
    command = [sys.executable, "-m", "training", "train", "--method", method,
               "--iterations", str(args.iterations), "--seed", str(seed),
               "--config", json.dumps(config), "--output", output, "--quiet"]
    for option in options:
        value = getattr(args, option, None)
        if value is not None:
            command += [f"--{option.replace('_', '-')}", str(value)]
    return command


def json_object(text: str) -> str:
    """argparse type of ``--guidance``: a JSON object, checked here so that a typo stops the
    ablation before its first training run rather than inside it; passed on as written."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{}' or "
                                         "'{\"supervised\": 0.5}'")
    return text


def add_loss_options(parser: argparse.ArgumentParser) -> None:
    """``--guidance`` and ``--clean-similarity``, passed on to ``python -m training train`` as
    they are (see ``training/__main__.py``); unset, every arm gets the recipe's."""
    parser.add_argument("--guidance", type=json_object,
                        help="JSON weights of the trainer's guidance terms on the final field; "
                             "default: the recipe's; '{}' trains without them")
    parser.add_argument("--clean-similarity", choices=("yes", "no"), dest="clean_similarity",
                        help="score the similarity before the acquisition effects (default: "
                             "the recipe's)")


def training_losses(card: Dict) -> Dict:
    """The guidance terms and clean similarity a run was trained with (its model card)."""
    training = card.get("training") or {}
    return {"guidance": training.get("guidance"),
            "clean_similarity": training.get("clean_similarity")}


def check_kept_run(card: Dict, args, output: str) -> None:
    """A run kept from an earlier call must have been trained with the ``--guidance`` and
    ``--clean-similarity`` asked for now: otherwise its arm would silently differ from the ones
    trained now (an unset option means the recipe's and is not checked)."""
    trained = training_losses(card)
    asked = {}
    if getattr(args, "guidance", None) is not None:
        asked["guidance"] = {k: float(v) for k, v in json.loads(args.guidance).items()}
        trained["guidance"] = {k: float(v) for k, v in (trained["guidance"] or {}).items()}
    if getattr(args, "clean_similarity", None) is not None:
        asked["clean_similarity"] = args.clean_similarity == "yes"
    differing = {k: (trained[k], v) for k, v in asked.items() if trained[k] != v}
    if differing:
        said = "; ".join(f"{k} {was} (asked {now})" for k, (was, now) in differing.items())
        raise UserInputError(f"{output} was trained with {said}; use --retrain, or another "
                             "--output")


def training_losses_lines(cards: Dict[Tuple[int, str], Dict]) -> List[str]:
    """Report lines: the guidance terms and clean similarity of the runs (their model cards),
    once when every run had the same, else per (seed, arm)."""
    described = {key: json.dumps(training_losses(card), sort_keys=True)
                 for key, card in sorted(cards.items())}
    if len(set(described.values())) == 1:
        return [f"Trained with the trainer's loss options {next(iter(described.values()))} "
                "(every arm and seed; model cards)."]
    return ["Trained with different loss options (model cards):", ""] + [
        f"- seed {seed} {arm}: {text}" for (seed, arm), text in described.items()]


# ----------------------------------------------------------------------------- final weights
def resume_path(checkpoint: str) -> str:
    """The trainer's ``NAME.resume.pt`` beside ``NAME.pt``: the weights at the run's last step
    (with its optimiser and step), while ``NAME.pt`` holds its best validation step's."""
    from .train import side_paths
    return side_paths(checkpoint)["resume"]


def final_folder(checkpoint: str) -> str:
    """Where ``export_final_arms`` writes ``checkpoint``'s final weights, under the same file
    name (the engine finds a checkpoint by its name): ``final/`` beside it."""
    return os.path.join(os.path.dirname(checkpoint), "final")


def final_step_validation(card: Dict, step: int) -> Optional[Dict]:
    """The card's validation block re-pointed at ``step``'s record of its history (the trainer
    validates on the working grid after its last step), or None without such a record."""
    validation = card.get("validation") or {}
    spacing = card.get("working_spacing_mm")
    record = next((h for h in reversed(validation.get("history") or [])
                   if h.get("step") == step and h.get("spacing_mm") == spacing), None)
    if record is None:
        return None
    metrics = {k: v for k, v in record.items() if k not in ("step", "spacing_mm")}
    return dict(validation, step=step, metrics=metrics)


def final_step_training(training: Dict, step: int, elapsed: Optional[float]) -> Dict:
    """The card's training block with the cost of the weights at ``step`` (``elapsed`` seconds
    of training; None: unknown) instead of the best step's: ``iterations``,
    ``wall_time_seconds`` and ``seconds_per_step``, and the lineage totals (the earlier runs'
    plus this one's) moved by the same difference. A warm start from the exported weights takes
    its lineage entry from ``iterations`` and ``wall_time_seconds`` (training/train.py
    ``training_lineage``), so they must count the steps and time that made these weights."""
    seconds = None if elapsed is None else round(float(elapsed), 1)

    def moved(total: Optional[float], kept: Optional[float], final: Optional[float]):
        return None if None in (total, kept, final) else round(total - kept + final, 1)

    return dict(training, iterations=step, wall_time_seconds=seconds,
                seconds_per_step=None if elapsed is None else round(elapsed / max(step, 1), 4),
                total_iterations=moved(training.get("total_iterations"),
                                       training.get("iterations"), step),
                total_wall_time_seconds=moved(training.get("total_wall_time_seconds"),
                                              training.get("wall_time_seconds"), seconds))


def export_final_weights(checkpoint: str, destination: str) -> Dict:
    """Write the weights at the end of ``checkpoint``'s run (its ``NAME.resume.pt``) as a
    checkpoint of their own at ``destination``, with a model card; returns the card.

    Arms trained for the same number of steps are compared at that step: the best-validation
    checkpoints of two arms come from different steps, so a difference between them could be
    the step's, not the arm's. The card is the run's with what describes the weights taken at
    the final step: ``validation`` (the best step's moves to ``best_step_validation``), the
    steps and time of ``training`` (``final_step_training``) and the method's own card entries
    (e.g. MultiProp's loss weights); plus ``weights``: which weights these are, the step, and
    the resume state's sha256."""
    from DeepRegistrationLib.methods import get_method, save_checkpoint
    from DeepRegistrationLib.methods.base import read_checkpoint, read_model_card, sha256_of

    resume = resume_path(checkpoint)
    card = read_model_card(checkpoint)
    if card is None or not os.path.isfile(resume):
        raise UserInputError(f"{checkpoint}: the final weights need its model card and "
                             f"{os.path.basename(resume)} beside it (the trainer writes both)")
    state = read_checkpoint(resume)
    spec = get_method(state["method"])
    network = spec.build_network(state["config"])
    network.load_state_dict(state["state_dict"])
    step = int(state["step"])
    ended = (card.get("training") or {}).get("run_iterations")
    if ended is not None and int(ended) != step:
        # e.g. a continuation stopped part-way: its resume state is ahead of the finished card
        raise UserInputError(f"{os.path.basename(resume)} is at step {step} but the run of "
                             f"{os.path.basename(checkpoint)} ended at step {ended}: finish "
                             "the run (train it again) before evaluating it")
    describe = spec.training.get("card")  # the trainer's hook: what the card says of a network
    exported = dict(card, best_step_validation=card.get("validation"),
                    validation=final_step_validation(card, step),
                    training=final_step_training(card.get("training") or {}, step,
                                                 state.get("elapsed")),
                    **(describe(network) if callable(describe) else {}),
                    weights={"which": "final", "step": step,
                             "resume_state": os.path.basename(resume),
                             "resume_sha256": sha256_of(resume),
                             "best_checkpoint": os.path.basename(checkpoint),
                             "best_step": (card.get("validation") or {}).get("step")})
    for key in ("sha256", "size_bytes", "checkpoint"):  # save_checkpoint writes the new file's
        exported.pop(key, None)
    return save_checkpoint(destination, network, state["method"], state["config"], exported)


def require_same_steps(cards: Dict[Tuple[int, str], Dict]) -> int:
    """The one step every exported (seed, arm) run ended at; a user error naming the runs when
    they differ (an interrupted or shorter run would be compared at another step)."""
    steps = {key: card["weights"]["step"] for key, card in cards.items()}
    if len(set(steps.values())) > 1:
        listed = ", ".join(f"seed {seed} {arm}: {step}" for (seed, arm), step
                           in sorted(steps.items()))
        raise UserInputError(f"the runs ended at different steps ({listed}); finish them "
                             "(train again with the same --iterations) before comparing")
    return next(iter(steps.values()))


def export_final_arms(output: str, arms: Sequence[str],
                      arm_path: Callable[[str, int, str], str], prog: str
                      ) -> Dict[Tuple[int, str], Dict]:
    """Every trained (seed, arm)'s final weights (``arm_path(output, seed, arm)`` is its
    checkpoint, seeds from the ``seed<N>`` folders of ``output``) exported into its
    ``final_folder``; their model cards by (seed, arm). A user error when there is nothing to
    evaluate or the runs ended at different steps (arms must be compared at the same step)."""
    folders = os.listdir(output) if os.path.isdir(output) else []
    seeds = sorted(int(d[4:]) for d in folders if d.startswith("seed") and d[4:].isdigit())
    cards = {}
    for seed in seeds:
        for arm in arms:
            checkpoint = arm_path(output, seed, arm)
            if not os.path.isfile(checkpoint):
                print(f"seed{seed}/{arm}: no checkpoint, skipped", file=sys.stderr)
                continue
            cards[(seed, arm)] = export_final_weights(checkpoint, os.path.join(
                final_folder(checkpoint), os.path.basename(checkpoint)))
    if not cards:
        raise UserInputError(f"no seed<N> folders with checkpoints in {output}; run "
                             f"'{prog} train' first")
    require_same_steps(cards)
    return cards


def final_weights_line(cards: Dict[Tuple[int, str], Dict]) -> str:
    """The report's line saying which weights were evaluated (``export_final_arms``' cards)."""
    steps = sorted({card["weights"]["step"] for card in cards.values()})
    best = sorted({card["weights"]["best_step"] for card in cards.values()
                   if card["weights"]["best_step"] is not None})
    return (f"Weights evaluated: each arm's final weights, step {', '.join(map(str, steps))} "
            "(exported from the trainer's NAME.resume.pt into final/ beside each NAME.pt); "
            "not the best validation checkpoints (their steps: "
            f"{', '.join(map(str, best)) or 'none'}).")


@contextlib.contextmanager
def checkpoints_from(folder: str) -> Iterator[None]:
    """Within the block ``$DEEPREG_CHECKPOINTS`` is ``folder`` alone, so the engine finds a
    checkpoint there before the shipped ones; afterwards the variable is as it was (unset if it
    was), also when the block raises."""
    saved = os.environ.get("DEEPREG_CHECKPOINTS")
    os.environ["DEEPREG_CHECKPOINTS"] = os.path.abspath(folder)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("DEEPREG_CHECKPOINTS", None)
        else:
            os.environ["DEEPREG_CHECKPOINTS"] = saved


# -------------------------------------------------------------------------------- evaluation
def evaluate_final_weights(args, cards: Dict[Tuple[int, str], Dict],
                           arm_path: Callable[[str, int, str], str], method: str,
                           variant: Callable[[str], str], case_metrics: Callable,
                           metrics: Sequence[Tuple[str, bool]]) -> List[Dict]:
    """Register every evaluation case (``args.cases``, built under ``args.output``) with each
    (seed, arm)'s final weights that ``export_final_arms`` exported (its ``cards``), the engine
    running ``method`` with the arm's ``variant(arm)``; one row per (seed, arm, case): the step,
    the case's source, whether the arm was trained on it (``anatomy`` seen / unseen), the
    seconds and ``case_metrics(case, displacement)``, ``metrics`` printed as they come."""
    import torch
    from .data import available_sources
    from .evaluate import build_cases, case_specs, run_one

    cases = build_cases(args.cases, os.path.join(args.output, "cases"))
    sources = {spec.name: spec.source for spec in case_specs(args.cases, available_sources())}
    rows = []
    for (seed, arm), card in sorted(cards.items()):
        seen = [source["name"] for source in card["data"]["sources"]]
        # the engine finds the arm's checkpoint by name: in its final weights' folder first
        with checkpoints_from(final_folder(arm_path(args.output, seed, arm))):
            for case in cases:
                result = run_one({"kind": "method", "name": method,
                                  "fixed": case.paths["fixed"], "moving": case.paths["moving"],
                                  "options": {"variant": variant(arm)}})
                values = case_metrics(case, torch.from_numpy(result["displacement"]))
                rows.append({"seed": seed, "arm": arm, "step": card["weights"]["step"],
                             "case": case.name, "source": sources[case.name],
                             "anatomy": "seen" if sources[case.name] in seen else "unseen",
                             "seconds": result["seconds"], **values})
                print(f"seed{seed} {arm} {case.name}: " + " ".join(
                    f"{m} {rows[-1][m]:.4f}" for m, _ in metrics), file=sys.stderr, flush=True)
    return rows


def write_per_case_csv(path: str, rows: List[Dict], columns: Sequence[str]) -> None:
    """One line per registration; floats with 6 significant digits, keys outside ``columns``
    left out."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v)
                             for k, v in row.items()})


def means_table(title: str, rows: List[Dict], arms: Sequence[str],
                metrics: Sequence[Tuple[str, bool]], heading_level: int = 1) -> List[str]:
    """The opening of a ``results.md``: the title, what was run, then a Markdown row per arm and
    anatomy subset (all cases, unseen, seen) with the mean of each metric over its (case, seed)
    units, NaN skipped. Arms and subsets without rows get no row. ``heading_level`` 2 or more
    makes the title a section of a longer report (one table per subset of the cases)."""
    lines = [f"{'#' * heading_level} {title}", "",
             f"{len(rows)} registrations; seeds {sorted({r['seed'] for r in rows})}; Python "
             f"{platform.python_version()}. Means over (case, seed).", "",
             "| arm | anatomy | units | " + " | ".join(m for m, _ in metrics) + " |",
             "|" + "---|" * (3 + len(metrics))]
    for arm in arms:
        for subset in SUBSETS:
            chosen = [r for r in rows if r["arm"] == arm
                      and (subset == "all" or r["anatomy"] == subset)]
            if chosen:
                lines.append(f"| {arm} | {subset} | {len(chosen)} | " + " | ".join(
                    f"{np.nanmean([r[m] for r in chosen]):.4f}" for m, _ in metrics) + " |")
    return lines


# ------------------------------------------------------------------------------------- speed
def time_deployed_network(method: str, config_overrides: Dict, timed_runs: int,
                          threads: Optional[int],
                          count_parameters: Callable[[torch.nn.Module], Dict[str, int]]
                          ) -> Tuple[Dict, torch.nn.Module]:
    """Register a 2 mm MNI152 pair ``timed_runs`` times (after one warm-up call) with ``method``'s
    network, built from its default config plus ``config_overrides`` and given random weights:
    the cost of a network does not depend on its weights, so nothing has to be trained first.

    Each run times the network call alone (hooks on the loaded module, so it is the canvas the
    engine really feeds it) and the whole ``engine.register``, in wall and CPU seconds, with the
    machine's load average beside them. ``count_parameters(network)`` gives the parameter counts
    the summary records (the methods count different parts of their networks).

    Returns the summary (``config``, the medians, ``runs``: one row per timed call, each also
    printed to stderr as it is measured) and the network, for callers that examine it further.
    """
    import tempfile
    import torch
    from DeepRegistrationLib import engine
    from DeepRegistrationLib.methods import get_method, save_checkpoint
    from DeepRegistrationLib.methods.base import _NETWORK_CACHE
    from .evaluate import CaseSpec, build_case

    if threads:
        torch.set_num_threads(int(threads))
    case = build_case(CaseSpec("mni152-speed", "mni152", 0.6), 2.0, 0)
    spec = get_method(method)
    config = dict(spec.config, **config_overrides)
    network = spec.build_network(config)
    generator = torch.Generator().manual_seed(0)
    # random weights that move: the zero-initialised heads (and MMLN's residual branches) become
    # non-zero, so every part of the network does its real work
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    calls: List[Dict] = []
    rows = []
    with tempfile.TemporaryDirectory() as folder, checkpoints_from(folder):
        save_checkpoint(os.path.join(folder, f"{method}.pt"), network, method, config,
                        {"note": "random weights, for timing only"})
        _NETWORK_CACHE.clear()
        for repeat in range(timed_runs + 1):
            started, cpu = time.perf_counter(), time.process_time()
            engine.register(case.fixed, case.moving, method)
            total, total_cpu = time.perf_counter() - started, time.process_time() - cpu
            loaded = next(v for k, v in _NETWORK_CACHE.items() if k[0].startswith(folder))
            if repeat == 0:
                # the engine's own network object exists only after the first call, so the
                # hooks that time its forward go on now
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
               **count_parameters(network),
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
    return summary, network


def speed_sentence(summary: Dict, canvas: bool) -> str:
    """The one-line result of ``time_deployed_network``: medians of the network call and of the
    whole registration (wall and CPU), the load average, and with ``canvas`` the network's
    input size."""
    rows = summary["runs"]
    where = f" on a {'x'.join(map(str, rows[-1]['canvas']))} canvas" if canvas else ""
    return (f"network {summary['median_network_seconds']:.2f} s "
            f"({summary['median_network_cpu_seconds']:.2f} CPU s){where}, whole register "
            f"{summary['median_register_seconds']:.2f} s "
            f"({summary['median_register_cpu_seconds']:.2f} CPU s); median of {len(rows)}, load "
            f"average {summary['mean_load_average']:.1f} on {os.cpu_count()} cores")


# --------------------------------------------------------------------------------------- main
def ablation_parser(prog: str, description: str
                    ) -> Tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The script's parser and its (required) sub-commands, for the script to add to."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    return parser, commands


def add_evaluate_and_speed(commands: argparse._SubParsersAction, method_title: str,
                           default_repeats: int) -> argparse.ArgumentParser:
    """The ``evaluate`` and ``speed`` sub-commands; returns ``speed``'s parser for the options
    only one script has."""
    evaluate = commands.add_parser("evaluate", help="every arm on the evaluation cases")
    evaluate.add_argument("--output", required=True)
    evaluate.add_argument("--cases", default="full")
    speed = commands.add_parser("speed", help="seconds per 2 mm pair (random weights)")
    speed.add_argument("--output", required=True)
    speed.add_argument("--config", default="{}", help=f"{method_title} config overrides (JSON)")
    speed.add_argument("--repeats", type=int, default=default_repeats)
    speed.add_argument("--threads", type=int)
    return speed


def run_command(prog: str, commands: Dict[str, Callable], args) -> int:
    """Run the chosen sub-command. A user error or a failed training run is one line on stderr
    rather than a traceback, with the exit status 2 or 1."""
    try:
        commands[args.command](args)
    except UserInputError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as error:
        print(f"{prog}: error: training failed ({error})", file=sys.stderr)
        return 1
    return 0
