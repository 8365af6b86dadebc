"""``python -m training train | evaluate | sources | ms-init``.

Exit codes as ``deepreg``: 0 success, 2 a user mistake (one line on stderr), 130 interrupted.
"""
from __future__ import annotations

import os

from DeepRegistrationLib.runtime import configure_openmp

# Before torch loads OpenMP (see runtime.py): with unbounded spinning, any other busy process on a
# 2-core machine made a 4 mm vm-diff training step 6 s instead of 0.5 s.
configure_openmp()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from typing import List, Optional  # noqa: E402

from DeepRegistrationLib.errors import UserInputError  # noqa: E402

EXIT_OK, EXIT_USER, EXIT_CANCELLED = 0, 2, 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training",
                                     description="Train and evaluate DeepRegistration methods on "
                                                 "synthetic deformations of real anatomy.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    train = commands.add_parser("train", help="train a network method")
    train.add_argument("--method", required=True, help="method name (see 'deepreg methods')")
    train.add_argument("--iterations", type=int, default=1000, help="optimiser steps")
    train.add_argument("--output", help="checkpoint path (default "
                                        "Resources/checkpoints/METHOD.pt)")
    train.add_argument("--source", default=None,
                       help="comma-separated data sources (mni152, pydeface, itk-t1, "
                            "invesalius-ct, 'all' installed ones, or image paths); default: "
                            "the recipe's, or mni152 without a recipe")
    train.add_argument("--recipe", help="a training recipe (training/recipes.py), e.g. general: "
                                        "sources, synthetic data, curriculum and grid")
    train.add_argument("--unseen", default=None,
                       help="comma-separated sources validated but never trained on (default: "
                            "the recipe's held-out sources that are installed)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--resume", metavar="PATH",
                       help="NAME.resume.pt to continue a run, or a checkpoint to warm-start from")
    train.add_argument("--val-every", type=int, default=100, metavar="K",
                       help="validate (and keep the best checkpoint) every K steps")
    train.add_argument("--val-cases", type=int, default=6)
    train.add_argument("--lr", type=float, help="peak learning rate (default from the method)")
    train.add_argument("--batch-size", type=int)
    train.add_argument("--spacing", type=float,
                       help="working grid in mm (default: the method's working spacing)")
    train.add_argument("--config", default="{}",
                       help="JSON overrides of the network config, e.g. '{\"features\": 8}'")
    train.add_argument("--synth", default="{}",
                       help="JSON overrides of training.synth.SynthConfig, e.g. "
                            "'{\"contrast_probability\": 0.5}'")
    train.add_argument("--guidance", default=None,
                       help="JSON weights of terms added to the method's loss on its final field "
                            "(dice: labels, supervised: ground-truth end-point error); default: "
                            "the recipe's, e.g. '{\"supervised\": 0.1}'; '{}' switches them off")
    train.add_argument("--clean-similarity", choices=("yes", "no"), default=None,
                       help="score the similarity on each pair before its acquisition effects "
                            "(default: the recipe's)")
    train.add_argument("--no-curriculum", action="store_true",
                       help="every step on the working grid (no coarse stages), e.g. to continue "
                            "a finished run from its checkpoint")
    train.add_argument("--overfit", type=int, default=0, metavar="N",
                       help="cycle over the first N training pairs (checks that it can learn)")
    train.add_argument("--coarse-spacing", type=float, metavar="MM",
                       help="grid of the coarse first stage (default 8 mm; 0 switches it off)")
    train.add_argument("--coarse-fraction", type=float, metavar="F",
                       help="share of the steps on the coarse grid (default 0.6)")
    train.add_argument("--coarse-batch-size", type=int, metavar="B",
                       help="batch size of the coarse stage (default 8)")
    train.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")

    ms_init = commands.add_parser(
        "ms-init", help="MS-R2Net weights whose two branches start from a trained R2Net "
                        "(use with: train --method ms-r2net --resume OUTPUT)")
    ms_init.add_argument("--from", dest="source", required=True, metavar="R2NET.pt",
                         help="an r2net-nsvf checkpoint (r2net-svf with --config "
                              "'{\"stationary\": true}')")
    ms_init.add_argument("--output", required=True, metavar="PATH")
    ms_init.add_argument("--config", default="{}", help="MS-R2Net config overrides (JSON)")

    evaluate = commands.add_parser("evaluate", help="compare methods and peers on fixed cases")
    evaluate.add_argument("--methods", default="io",
                          help="comma-separated method names; NAME@VARIANT for a variant "
                               "(e.g. vtn@AD for an ablation); NAME=FILE for that method with "
                               "the network in FILE (e.g. a run's vtn.4mm.pt), beside the "
                               "shipped one")
    evaluate.add_argument("--peers", default="", help="comma-separated: ants, demons, elastix")
    evaluate.add_argument("--output", required=True, metavar="DIR")
    evaluate.add_argument("--cases", default="small",
                          help="small | full | tiny | unseen (a real brain no shipped network "
                               "trains on, independent B-spline warps, and a second subject) | "
                               "tuning (the same on another head and seeds, for choosing "
                               "settings; never reported)")
    evaluate.add_argument("--unseen-source", default=None, metavar="NAME|IMAGE",
                          help="the subject of --cases unseen instead of itk-t1: a source a "
                               "checkpoint was trained without (leave-one-source-out), or your "
                               "own image file (labels: 3 Otsu classes in a head mask)")
    evaluate.add_argument("--options", default="{}",
                          help="JSON {method: options} passed to engine.register, e.g. "
                               "'{\"io\": {\"iterations\": [20, 10]}}'")
    evaluate.add_argument("--refine", default="0", metavar="N|AxB[,...]",
                          help="instance-optimisation steps after each network method: a total, "
                               "or A steps on the half grid and B on the full grid; several "
                               "settings comma-separated (0,10x2,60) run each network once per "
                               "setting, for the seconds-against-Dice trade-off")
    evaluate.add_argument("--in-process", action="store_true",
                          help="run everything in this process (peak memory less meaningful)")
    evaluate.add_argument("--quiet", action="store_true")

    sources = commands.add_parser("sources", help="list the data sources and install state")
    sources.add_argument("--json", action="store_true")
    return parser


def _json_option(text: str, name: str):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserInputError(f"{name} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise UserInputError(f"{name} must be a JSON object")
    return value


def command_train(args) -> None:
    from .data import parse_sources
    from .train import TrainOptions, train

    from .data import available_sources
    from .recipes import get_recipe

    recipe = get_recipe(args.recipe) if args.recipe else None
    installed = available_sources()
    if args.source:
        sources = parse_sources(args.source)
    elif recipe:
        sources = [name for name in recipe.sources if name in installed]
        if not sources:
            raise UserInputError(f"none of recipe {recipe.name}'s sources "
                                 f"({', '.join(recipe.sources)}) is installed; run "
                                 "training/install_data.sh")
    else:
        sources = parse_sources("mni152")
    if args.unseen is not None:
        unseen = parse_sources(args.unseen) if args.unseen else []
    else:
        unseen = [n for n in (recipe.unseen if recipe else ()) if n in installed]
    overlap = set(map(str, sources)) & set(map(str, unseen))
    if overlap:
        raise UserInputError(f"{', '.join(sorted(overlap))} cannot be both trained on and held "
                             "out as unseen anatomy")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    output = args.output or os.path.join(root, "Resources", "checkpoints", f"{args.method}.pt")
    card = train(TrainOptions(
        method=args.method, output=output, iterations=args.iterations, sources=sources,
        seed=args.seed, resume=args.resume, val_every=args.val_every, val_cases=args.val_cases,
        lr=args.lr, batch_size=args.batch_size, spacing_mm=args.spacing,
        config=_json_option(args.config, "--config"),
        synth=_json_option(args.synth, "--synth"), threads=args.threads, overfit=args.overfit,
        coarse_spacing_mm=args.coarse_spacing, coarse_fraction=args.coarse_fraction,
        coarse_batch_size=args.coarse_batch_size, curriculum=not args.no_curriculum,
        progress=not args.quiet,
        recipe=args.recipe, unseen_sources=unseen,
        guidance=None if args.guidance is None else _json_option(args.guidance, "--guidance"),
        clean_similarity=None if args.clean_similarity is None
        else args.clean_similarity == "yes"))
    metrics = card["validation"]["metrics"]
    print(f"{args.method}: best step {card['validation']['step']}, validation Dice "
          f"{card['validation']['identity']['dice']:.3f} -> {metrics['dice']:.3f}, folding "
          f"{metrics['folding_percent']:.3f}%, {card['training']['seconds_per_step']:.3f} s/step")
    print(f"checkpoint {output} (model card beside it, sha256 {card['sha256'][:12]})")


def command_evaluate(args) -> None:
    from .evaluate import EvaluateOptions, evaluate

    # evaluate() refuses a malformed --refine (plan_runs) before it writes anything
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    peers = [n.strip() for n in args.peers.split(",") if n.strip()]
    table = evaluate(EvaluateOptions(methods=names, peers=peers, output=args.output,
                                     cases=args.cases, options=_json_option(args.options,
                                                                            "--options"),
                                     refine=args.refine, unseen_source=args.unseen_source,
                                     subprocess=not args.in_process,
                                     verbose=not args.quiet))
    print(table)
    print(f"results in {os.path.abspath(args.output)} (results.md, results.csv, results.png)")


def command_ms_init(args) -> None:
    from DeepRegistrationLib.methods import get_method, save_checkpoint
    from DeepRegistrationLib.methods.base import read_checkpoint
    from DeepRegistrationLib.methods.ms_r2net import branches_from_r2net

    if not os.path.isfile(args.source):
        raise UserInputError(f"--from '{args.source}' does not exist")
    state = read_checkpoint(args.source)  # weights only: --from may name a file from anywhere
    if not isinstance(state, dict) or not str(state.get("method", "")).startswith("r2net"):
        raise UserInputError(f"'{args.source}' is not an r2net-svf / r2net-nsvf checkpoint")
    spec = get_method("ms-r2net")
    config = dict(spec.config, **_json_option(args.config, "--config"))
    network = branches_from_r2net(spec.build_network(config), state["state_dict"])
    card = save_checkpoint(args.output, network, spec.name, config,
                           {"title": spec.title, "initialised_from": {
                               "checkpoint": os.path.abspath(args.source),
                               "method": state.get("method")},
                            "note": "untrained fuse / integration; a warm start for phase 1"})
    print(f"{args.output}: both branches from {args.source} (sha256 {card['sha256'][:12]})")


def command_sources(args) -> None:
    from .data import SOURCES, available_sources

    installed = available_sources()
    rows = [{"name": s.name, "description": s.description, "installed": s.name in installed,
             "install": s.install} for s in SOURCES.values()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        state = "installed" if row["installed"] else f"missing: {row['install']}"
        print(f"{row['name']:<14} {row['description']}  [{state}]")


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        {"train": command_train, "evaluate": command_evaluate, "sources": command_sources,
         "ms-init": command_ms_init}[args.command](args)
    except UserInputError as error:
        print(f"python -m training: error: {error}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        print("python -m training: interrupted", file=sys.stderr)
        return EXIT_CANCELLED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
