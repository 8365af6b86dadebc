"""The ``deepreg`` command line: ``register``, ``methods``, ``demo``.

Exit codes: 0 success, 1 internal error (a bug: the traceback is kept), 2 a user mistake (one
line on stderr), 130 cancelled. With ``--progress-json`` stdout carries one JSON object per line
(``progress``, ``log``, ``done``, ``error``): the Slicer module reads these.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import List, Optional

from . import __version__
from .errors import RegistrationCancelled, UserInputError
from .runtime import configure_openmp

configure_openmp()  # before anything imports torch (the library imports it lazily)

EXIT_OK, EXIT_INTERNAL, EXIT_USER, EXIT_CANCELLED = 0, 1, 2, 130


class Reporter:
    """Progress to a terminal bar (stderr), to JSON lines (stdout), or nowhere."""

    def __init__(self, json_lines: bool = False, quiet: bool = False):
        self.json_lines = json_lines
        self.quiet = quiet
        self.bar = not json_lines and not quiet and sys.stderr.isatty()
        self.cancelled = False
        self._last_stage = None
        self._started = time.perf_counter()

    def emit(self, **payload) -> None:
        print(json.dumps(payload), flush=True)

    def progress(self, fraction: float, stage: str, message: str = "") -> None:
        if self.json_lines:
            self.emit(type="progress", fraction=round(fraction, 4), stage=stage, message=message)
        elif self.bar:
            width = 30
            filled = int(round(width * fraction))
            elapsed = time.perf_counter() - self._started
            line = f"\r[{'#' * filled}{'.' * (width - filled)}] {100 * fraction:5.1f}% " \
                   f"{elapsed:6.1f}s  {stage[:40]:<40}"
            sys.stderr.write(line)
            sys.stderr.flush()
        elif not self.quiet and stage != self._last_stage:
            print(f"[{100 * fraction:5.1f}%] {stage}", file=sys.stderr, flush=True)
        self._last_stage = stage

    def log(self, message: str) -> None:
        self.end_bar()
        if self.json_lines:
            self.emit(type="log", message=message)
        elif not self.quiet:
            print(message, flush=True)

    def end_bar(self) -> None:
        if self.bar and self._last_stage is not None:
            sys.stderr.write("\n")
            self._last_stage = None

    def is_cancelled(self) -> bool:
        return self.cancelled


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake on the command line is one line (exit 2) like every other user
    error, not the usage block; ``--help`` still prints the usage."""

    def error(self, message):
        self.exit(EXIT_USER, f"deepreg: error: {message} (see '{self.prog} --help')\n")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="deepreg", description="Deep-learning and "
                     "instance-optimisation deformable image registration.")
    parser.add_argument("--version", action="version", version=f"deepreg {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    def common(sub):
        sub.add_argument("--refine", default="0", metavar="N|AxB",
                         help="instance-optimisation steps after the method (default 0): a "
                              "total, or A steps on the half grid and B on the full grid")
        sub.add_argument("--similarity", metavar="NAME",
                         help="similarity: lncc (same modality, default), mind (multi-modal), "
                              "ncc, mse, ngf, mi (mutual information, multi-modal); io optimises "
                              "it, --refine optimises it after any method (a network without "
                              "--refine takes only lncc or mind, the global alignment's measure)")
        sub.add_argument("--regularization", type=float, metavar="W",
                         help="weight of the smoothness term of instance optimisation")
        sub.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
        sub.add_argument("--overwrite", action="store_true",
                         help="write into an output folder that already has files")
        sub.add_argument("--quiet", action="store_true", help="print only errors")
        sub.add_argument("--progress-json", action="store_true",
                         help="one JSON object per line on stdout (for the Slicer module)")
        sub.add_argument("--no-figure", action="store_true", help="do not draw qa.png")
        sub.add_argument("--initial", default="auto",
                         choices=["auto", "none", "moments", "rigid", "affine"],
                         help="global alignment before the method: auto (default: affine when the "
                              "images are not aligned already, else none), none, moments, rigid, "
                              "affine")
        sub.add_argument("--variant", help="a method's variant (e.g. VTN's D, AD, ADDD); "
                                           "see 'deepreg methods'")

    register = commands.add_parser("register", help="register MOVING onto FIXED")
    register.add_argument("fixed", metavar="FIXED", help="fixed (reference) image")
    register.add_argument("moving", metavar="MOVING", help="moving image, resampled onto FIXED")
    register.add_argument("--method", default="io", help="method name (see 'deepreg methods')")
    register.add_argument("--output", "-o", required=True, metavar="DIR", help="output folder")
    register.add_argument("--fixed-labels", metavar="F", help="label map on the fixed grid (needs "
                          "--moving-labels: Dice before/after)")
    register.add_argument("--moving-labels", metavar="F", help="label map on the moving grid, "
                          "carried onto the fixed grid (warped_labels.nii.gz)")
    common(register)

    methods = commands.add_parser("methods", help="list the methods and their checkpoints")
    methods.add_argument("--json", action="store_true", help="machine-readable list")

    demo = commands.add_parser("demo", help="register a deformed MNI152 template (offline)")
    demo.add_argument("--output", "-o", default="deepreg-demo", metavar="DIR",
                      help="output folder (default ./deepreg-demo)")
    demo.add_argument("--method", default="io")
    demo.add_argument("--spacing", type=float, default=2.0, help="voxel size in mm (default 2)")
    demo.add_argument("--seed", type=int, default=7, help="seed of the synthetic deformation")
    common(demo)
    return parser


def _run_registration(args, reporter: Reporter, fixed, moving, fixed_labels, moving_labels,
                      extra=None, notes: Optional[List[str]] = None, inputs=None):
    from .engine import register
    from .outputs import write_outputs

    result = register(fixed, moving, method=args.method, refine=args.refine,
                      similarity=args.similarity, regularization=args.regularization,
                      device=args.device, progress=lambda f, s, m="": reporter.progress(
                          0.9 * f, s, m), cancel=reporter.is_cancelled,
                      options={"variant": args.variant} if args.variant else None,
                      initial=args.initial)
    result.notes.extend(notes or [])
    summary = write_outputs(result, args.output, fixed_labels, moving_labels,
                            figure=not args.no_figure, extra=extra, overwrite=args.overwrite,
                            inputs=inputs,
                            progress=lambda f, s, m="": reporter.progress(0.9 + 0.1 * f, s, m))
    reporter.end_bar()
    for caution in result.cautions:
        reporter.log(caution)
    return summary


def _describe(summary) -> str:
    text = (f"{summary['method']}: NCC {summary['similarity_before']:.3f} -> "
            f"{summary['similarity_after']:.3f}, folding {summary['folding_percent']:.4f}% "
            f"central / {summary['folding_percent_strict']:.4f}% strict (min det "
            f"{summary['jacobian_min']:.3f} / {summary['jacobian_min_strict']:.3f}), "
            f"SDlogJ {summary['sdlogj']:.3f}, "
            f"{summary['runtime_seconds']:.1f} s")
    if "mean_dice_after" in summary:
        text += f", mean Dice {summary['mean_dice_before']:.3f} -> {summary['mean_dice_after']:.3f}"
    return text


def _validate_request(args) -> None:
    """Check everything the request itself says before reading or creating anything, so a
    refused request costs no waiting and leaves no folder behind."""
    import math

    from .engine import check_similarity, refine_schedule, resolve_device
    from .losses import SIMILARITIES
    from .methods import get_method
    from .outputs import check_output_folder

    spec = get_method(args.method)
    if args.similarity is not None and args.similarity not in SIMILARITIES:
        raise UserInputError(f"unknown similarity '{args.similarity}'; choose one of "
                             f"{', '.join(SIMILARITIES)}")
    if args.variant is not None and args.variant not in spec.variants:
        choices = ", ".join(spec.variants) if spec.variants else "none (it has no variants)"
        raise UserInputError(f"method '{spec.name}' has no variant '{args.variant}'; choose from "
                             f"{choices}")
    schedule = refine_schedule(args.refine)  # refused here, before anything is read or created
    # the method's own, --refine's or the global stage's similarity, or refused (one rule for
    # every method: the engine's)
    check_similarity(spec, args.similarity, sum(schedule) > 0, args.initial)
    if args.regularization is not None and not (math.isfinite(args.regularization)
                                                and args.regularization >= 0):
        raise UserInputError(f"--regularization must be a number >= 0, not {args.regularization}")
    if getattr(args, "spacing", None) is not None and not (math.isfinite(args.spacing)
                                                           and 0 < args.spacing <= 10):
        raise UserInputError(f"--spacing must be between 0 and 10 mm, not {args.spacing}")
    if getattr(args, "fixed_labels", None) and not getattr(args, "moving_labels", None):
        raise UserInputError("--fixed-labels needs --moving-labels too: Dice compares the fixed "
                             "labels with the moving labels carried through the registration "
                             "(--moving-labels alone is fine: they are carried onto the fixed "
                             "grid)")
    resolve_device(args.device)
    check_output_folder(args.output, args.overwrite)


def _labels_note(fixed_labels, moving_labels) -> List[str]:
    if moving_labels is not None and fixed_labels is None:
        return ["moving labels carried onto the fixed grid (warped_labels.nii.gz); no Dice "
                "without --fixed-labels"]
    return []


def command_register(args, reporter: Reporter) -> dict:
    from .images import check_overlap, load_image, load_labels

    _validate_request(args)
    fixed, fixed_notes = load_image(args.fixed, "fixed image")
    moving, moving_notes = load_image(args.moving, "moving image")
    fixed_labels = load_labels(args.fixed_labels, fixed, "fixed labels") \
        if args.fixed_labels else None
    moving_labels = load_labels(args.moving_labels, moving, "moving labels") \
        if args.moving_labels else None
    if args.initial == "none":  # otherwise the global stage decides what overlaps
        check_overlap(fixed, moving)
    notes = fixed_notes + moving_notes + _labels_note(fixed_labels, moving_labels)
    for note in notes:
        reporter.log(note)
    summary = _run_registration(args, reporter, fixed, moving, fixed_labels, moving_labels,
                                extra={"fixed": os.path.abspath(args.fixed),
                                       "moving": os.path.abspath(args.moving)},
                                notes=notes)
    return summary


def command_demo(args, reporter: Reporter) -> dict:
    from .sample_data import demo_pair

    _validate_request(args)
    reporter.progress(0.0, "demo data", "deforming the MNI152 template (nilearn)")
    fixed, moving, fixed_labels, moving_labels = demo_pair(args.spacing, seed=args.seed)
    folder = os.path.abspath(args.output)
    inputs = {"fixed": fixed, "moving": moving, "fixed_labels": fixed_labels,
              "moving_labels": moving_labels}
    # saved beside the results (so the pair can be opened in Slicer), in the same swap
    summary = _run_registration(args, reporter, fixed, moving, fixed_labels, moving_labels,
                                extra={"fixed": os.path.join(folder, "input_fixed.nii.gz"),
                                       "moving": os.path.join(folder, "input_moving.nii.gz"),
                                       "demo": {"spacing_mm": args.spacing, "seed": args.seed}},
                                inputs={f"input_{name}.nii.gz": image
                                        for name, image in inputs.items()})
    return summary


def _card_lines(item: dict) -> List[str]:
    """The model card essentials of one ``describe()`` entry, as lines of text."""
    from .cards import lineage_steps_text
    from .methods.base import model_card_path, sha256_of

    path = item["checkpoint"]
    if not item.get("needs_checkpoint", True) and not path:
        return ["checkpoint: none needed (optimised for each image pair, no training)"]
    if not path:
        return ["checkpoint: none found (train one with 'python -m training train --method "
                f"{item['name']}', or point DEEPREG_CHECKPOINTS at a folder holding one)"]
    card = item.get("model_card")
    if not card:
        return [f"checkpoint: {path}", f"model card: missing ({model_card_path(path)})"]
    lines = [f"checkpoint: {path}"]
    sha = str(card.get("sha256", ""))
    if sha:
        state = "matches the file" if sha == sha256_of(path) else \
            "DOES NOT match the file: damaged or replaced"
        lines.append(f"sha256: {sha[:12]}... ({state})"
                     + (f", created {card['created']}" if card.get("created") else ""))
    data = card.get("data") or {}
    sources = [f"{s.get('name')} ({s.get('modality', '?')}, {s.get('origin', '?')})"
               for s in data.get("sources") or [] if isinstance(s, dict)]
    if sources:
        spacing = f" at {data['spacing_mm']:g} mm" if isinstance(data.get("spacing_mm"),
                                                                  (int, float)) else ""
        lines.append(f"trained on: {'; '.join(sources)}{spacing}, synthetic deformations")
    training = card.get("training") or {}
    # the whole run's steps with the whole run's time (the best checkpoint may come earlier)
    steps = training.get("run_iterations", training.get("iterations"))
    seconds = training.get("run_wall_time_seconds", training.get("wall_time_seconds"))
    if steps is not None or seconds is not None:
        text = f"training: {steps} steps" if steps is not None else "training:"
        if isinstance(seconds, (int, float)):
            text += f", {seconds / 60:.1f} min wall time"
        if training.get("device"):
            text += f" on {training['device']}"
            if training.get("threads"):
                text += f" ({training['threads']} thread{'s' if training['threads'] != 1 else ''})"
        lines.append(text)
    command = str(card.get("command", "")).split()
    lineage = lineage_steps_text(training)
    if lineage:  # the steps above continue earlier runs, counted in the totals
        lines.append(f"in total: {lineage}")
    elif "--resume" in command[:-1]:  # the steps above continue an earlier run
        lines.append(f"continued from: {command[command.index('--resume') + 1]} (its steps "
                     "are not counted above)")
    recipe = training.get("recipe")
    unseen = card.get("unseen_validation") or {}
    if isinstance(recipe, dict) and recipe.get("name"):
        held_out = ", ".join(unseen.get("sources") or recipe.get("unseen") or []) or "none"
        lines.append(f"recipe: {recipe['name']} (anatomy held out of training: {held_out})")
    validation = card.get("validation") or {}
    figures = _before_after(validation.get("identity") or {}, validation.get("metrics") or {})
    if figures:
        where = f"{validation.get('cases', '?')} synthetic cases"
        if validation.get("step") is not None:
            where += f", step {validation['step']}"
        lines.append(f"validation ({where}; before -> after): {', '.join(figures)}")
    figures = _before_after(unseen.get("identity") or {}, unseen.get("metrics") or {})
    if figures:
        lines.append(f"unseen-anatomy validation ({', '.join(unseen.get('sources') or [])}; "
                     f"before -> after): {', '.join(figures)}")
    return lines


def _before_after(before: dict, after: dict) -> List[str]:
    """Validation figures of a model card as 'Dice 0.690 -> 0.816', ... (what is recorded)."""
    figures = []
    for key, label, unit in (("dice", "Dice", ""), ("gt_error_mm", "GT error", " mm"),
                             ("folding_percent", "folding", " %"), ("sdlogj", "SDlogJ", "")):
        if isinstance(after.get(key), (int, float)):
            shown = f"{label} {after[key]:.3f}{unit}"
            if isinstance(before.get(key), (int, float)):
                shown = f"{label} {before[key]:.3f} -> {after[key]:.3f}{unit}"
            figures.append(shown)
    return figures


def command_methods(args) -> None:
    from .methods import list_methods

    described = [dict(spec.describe(), needs_checkpoint=spec.needs_checkpoint)
                 for spec in list_methods()]
    if args.json:
        print(json.dumps([{k: v for k, v in item.items() if k != "needs_checkpoint"}
                          for item in described], indent=2))
        return
    for item in described:
        state = "ready" if item["available"] else "no checkpoint (train it first)"
        print(f"{item['name']:<12} {item['title']}  [{state}]")
        print(f"{'':<12} {item['description']}")
        print(f"{'':<12} paper: {item['paper']}")
        for line in _card_lines(item):
            print(f"{'':<12} {line}")
        print()


def main(argv: Optional[List[str]] = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "methods":
        try:
            command_methods(args)
        except UserInputError as error:
            print(f"deepreg: error: {error}", file=sys.stderr)
            return EXIT_USER
        return EXIT_OK
    reporter = Reporter(json_lines=args.progress_json, quiet=args.quiet)

    def on_terminate(signum, frame):  # Slicer's Cancel terminates the process
        reporter.cancelled = True
    try:
        signal.signal(signal.SIGTERM, on_terminate)
    except ValueError:  # not the main thread (tests calling main() from a worker)
        pass
    try:
        summary = (command_demo if args.command == "demo" else command_register)(args, reporter)
    except UserInputError as error:
        reporter.end_bar()
        if args.progress_json:
            reporter.emit(type="error", message=str(error))
        print(f"deepreg: error: {error}", file=sys.stderr)
        return EXIT_USER
    except (RegistrationCancelled, KeyboardInterrupt):
        reporter.end_bar()
        if args.progress_json:
            reporter.emit(type="error", message="cancelled")
        print("deepreg: cancelled", file=sys.stderr)
        return EXIT_CANCELLED
    folder = os.path.abspath(args.output)
    if args.progress_json:
        reporter.emit(type="done", output=folder, summary=summary)
    elif not args.quiet:
        print(_describe(summary))
        print(f"outputs in {folder}")
        if "qa" in summary.get("outputs", {}):
            print(f"QA figure: {os.path.join(folder, summary['outputs']['qa'])}")
    return EXIT_OK


def run() -> None:
    """The process entry point (``deepreg``, ``python -m DeepRegistrationLib``): :func:`main`,
    then the exit without the interpreter's teardown.

    Once the outputs are in place nothing is left to do, yet finalising the interpreter with
    torch loaded (module teardown, freeing every cached tensor, joining the thread pools) took
    1.3-1.4 s of a 2 mm registration's 10-17 s process on these CPUs, time the Slicer user
    waits for (issue #18). Every file is closed and the output folder swapped before ``main``
    returns; standard streams are flushed here. An exception still exits the normal way, with
    its traceback. Under a profiler or a tracer (pyinstrument, cProfile, coverage) the normal
    exit is kept: they write their reports after the program returns."""
    code = main()
    if sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
