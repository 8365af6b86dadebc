"""SUITS (issue #10): lambda chosen on training pairs, the weight of io's mutual information, and
the paper's ablation on evaluation cases.

    python -m training.suits_ablation lambda --output docs/methods/suits/lambda
    python -m training.suits_ablation mi-weight --output docs/methods/suits/mi-weight
    python -m training.suits_ablation speed --output docs/methods/suits/speed
    python -m training.suits_ablation ablation --iterations 600 --output runs/suits-ablation
    python -m training.suits_ablation ablation --iterations 0 --methods mind,io-mind,io-mi,ants \\
        --output docs/methods/suits/multimodal

``lambda``: hand-crafted MIND-SSC in the SUITS solver (``--variant mind``) on synthetic pairs of
the *training* stream (``training.synth``, seed 0; the evaluation uses its own seed and stream),
half of them in a label-driven second contrast, on the working grid, for a grid of lambdas;
the lambda with the best mean Dice is the one SUITS uses (ties: lower ground-truth error), and
the feature-update modes (recomputed from the warped image, as the paper, or warped) are
compared at it. ``mi-weight``: the same for the regularisation weight of ``io --similarity mi``
on second-contrast training pairs (through ``engine.register``, the whole pipeline).

``ablation``: trains what is missing (``--iterations`` steps each, into ``--checkpoints``): the
replica (phase ``mind`` only), SUITS from the replica (phase ``suits``), and SUITS with
``matrix_grad``; then registers the cases with every row through ``engine.register`` (ANTs SyN
through ``training.peers``) and computes every metric with ``training.evaluate.field_metrics``:
Dice, HD95, ground-truth error (label-independent: the second contrast is painted from the labels,
so features could learn to segment them), folding (central and strict) and seconds. Cases are
built by ``training.evaluate`` (its seed and stream): the unseen ITK T1 brain under an
independent B-spline deformation family in a second contrast and in its own, and the CT and
MNI152 sources in a second contrast; every row says whether the case's anatomy was in the
training data of the networks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

from DeepRegistrationLib.runtime import configure_openmp

configure_openmp()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from DeepRegistrationLib.errors import UserInputError  # noqa: E402

LAMBDAS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
MI_WEIGHTS = (0.1, 0.3, 1.0, 3.0)
TRAINING_SOURCES = ("mni152", "pydeface", "invesalius-ct")  # the general recipe's (itk-t1 unseen)
ROWS = ("mind", "mind-best", "replica", "suits", "suits-matrix-grad", "suits-recompute",
        "suits-refine", "mind-refine", "io-mind", "io-mi", "vm-diff", "ants")


def _installed(names: Sequence[str]) -> List[str]:
    from .data import available_sources
    installed = available_sources()
    chosen = [n for n in names if n in installed]
    if not chosen:
        raise UserInputError("none of the training sources is installed; run "
                             "training/install_data.sh (or: python -m pip install nilearn)")
    return chosen


def training_pairs(count: int, spacing_mm: float, multimodal_only: bool = False):
    """Pairs of the training stream (seed 0), half of them (or all) in a second contrast."""
    from .synth import TRAIN, PairGenerator, SynthConfig
    config = SynthConfig(spacing_mm=spacing_mm, multiple=1, contrast_probability=0.5)
    generator = PairGenerator(_installed(TRAINING_SOURCES), config, seed=0, canvas=False)
    return [generator.pair(index, TRAIN, contrast=True if multimodal_only else index % 2 == 0,
                           source=index % len(generator.volumes)) for index in range(count)]


def pair_row(pair, displacement: torch.Tensor, spacing_mm: float, seconds: float) -> Dict:
    from DeepRegistrationLib.metrics import folding_percent, strict_jacobian_determinant_map

    from .train import pair_metrics
    row = pair_metrics(pair, displacement.float(), spacing_mm)
    row["folding_percent_strict"] = folding_percent(strict_jacobian_determinant_map(
        displacement.float()))
    row.update(seconds=seconds, multimodal=bool(pair.multimodal), source=pair.source,
               index=int(pair.info["index"]))
    return row


def summarise(rows: List[Dict], keys=("dice", "gt_error_mm", "folding_percent",
                                      "folding_percent_strict", "seconds")) -> Dict:
    out = {}
    for subset, chosen in (("all", rows), ("multimodal", [r for r in rows if r["multimodal"]]),
                           ("same contrast", [r for r in rows if not r["multimodal"]])):
        if chosen:
            out[subset] = {k: float(np.mean([r[k] for r in chosen])) for k in keys}
    return out


def _table(results: Dict[str, Dict], label: str) -> List[str]:
    lines = [f"| {label} | pairs | Dice | GT error mm | folding % | strict folding % | seconds | "
             "Dice (second contrast) | Dice (same contrast) |", "|" + "---|" * 9]
    for name, result in results.items():
        total = result["summary"]["all"]
        multi = result["summary"].get("multimodal", {}).get("dice", float("nan"))
        same = result["summary"].get("same contrast", {}).get("dice", float("nan"))
        lines.append(f"| {name} | {len(result['rows'])} | {total['dice']:.3f} | "
                     f"{total['gt_error_mm']:.2f} | {total['folding_percent']:.3f} | "
                     f"{total['folding_percent_strict']:.3f} | {total['seconds']:.1f} | "
                     f"{multi:.3f} | {same:.3f} |")
    return lines


def _write(output: str, name: str, payload: Dict, lines: List[str]) -> None:
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, f"{name}.json"), "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
    with open(os.path.join(output, f"{name}.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def _environment() -> Dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_average": list(os.getloadavg()),
            "command": " ".join(["python -m training.suits_ablation"] + sys.argv[1:])}


# ------------------------------------------------------------------------------------- lambda
def choose_lambda(args) -> Dict:
    from DeepRegistrationLib.methods import get_method
    from DeepRegistrationLib.methods.suits import build_network

    spec = get_method("suits")
    spacing = float(args.spacing or spec.working_spacing_mm)
    pairs = training_pairs(args.pairs, spacing)
    network = build_network(spec.config).eval()
    identity = [pair_row(p, torch.zeros_like(p.displacement), spacing, 0.0) for p in pairs]
    results = {"identity": {"rows": identity, "summary": summarise(identity)}}

    def run(label: str, regularization: float, recompute: bool) -> None:
        network.recompute_features = recompute
        rows = []
        for pair in pairs:
            started = time.perf_counter()
            with torch.inference_mode():
                displacement = network(pair.fixed, pair.moving, "mind", regularization)
            rows.append(pair_row(pair, displacement, spacing, time.perf_counter() - started))
        results[label] = {"rows": rows, "summary": summarise(rows), "lambda": regularization,
                          "recompute_features": recompute}
        print(f"{label}: {json.dumps(results[label]['summary']['all'])}", flush=True)

    for value in args.lambdas:
        run(f"mind lambda {value:g}", value, spec.config["recompute_features"])
    candidates = [k for k in results if k.startswith("mind lambda")]
    best = max(candidates, key=lambda k: (round(results[k]["summary"]["all"]["dice"], 4),
                                          -results[k]["summary"]["all"]["gt_error_mm"]))
    chosen = results[best]["lambda"]
    other = not spec.config["recompute_features"]
    run(f"mind lambda {chosen:g}, recompute_features {other}", chosen, other)
    payload = {"chosen_lambda": chosen, "spacing_mm": spacing, "pairs": len(pairs),
               "sources": sorted({p.source for p in pairs}), "stream": "training (seed 0)",
               "config": spec.config, "results": results, "environment": _environment()}
    lines = [f"# SUITS: lambda for hand-crafted MIND-SSC on training pairs", "",
             f"{len(pairs)} pairs of the training stream (seed 0; sources "
             f"{', '.join(payload['sources'])}), every second one in a label-driven second "
             f"contrast, on the {spacing:g} mm working grid; K = {spec.config['iterations']} "
             f"iterations. Written by `{payload['environment']['command']}` (load average "
             f"{payload['environment']['load_average'][0]:.1f}).", "",
             *_table(results, "run"), "",
             f"Chosen lambda (best mean Dice, ties by ground-truth error): **{chosen:g}**."]
    _write(args.output, "lambda", payload, lines)
    return payload


# ------------------------------------------------------------------------------ io MI weight
def choose_mi_weight(args) -> Dict:
    from DeepRegistrationLib import engine

    spacing = float(args.spacing or 2.0)
    pairs = training_pairs(args.pairs, spacing, multimodal_only=True)
    results = {}
    for weight in args.weights:
        rows = []
        for pair in pairs:
            prepared = _prepared(pair, spacing)
            fixed, moving = prepared(pair.fixed), prepared(pair.moving)
            started = time.perf_counter()
            result = engine.register(fixed, moving, "io", similarity="mi", regularization=weight)
            seconds = time.perf_counter() - started
            rows.append(pair_row(pair, result.displacement, spacing, seconds))
        results[f"io mi weight {weight:g}"] = {"rows": rows, "summary": summarise(rows),
                                               "weight": weight}
        print(f"weight {weight:g}: {json.dumps(results[f'io mi weight {weight:g}']['summary'])}",
              flush=True)
    best = max(results, key=lambda k: (round(results[k]["summary"]["all"]["dice"], 4),
                                       -results[k]["summary"]["all"]["gt_error_mm"]))
    payload = {"chosen_weight": results[best]["weight"], "spacing_mm": spacing,
               "pairs": len(pairs), "results": results, "environment": _environment()}
    lines = ["# io --similarity mi: regularisation weight on training pairs", "",
             f"{len(pairs)} second-contrast pairs of the training stream (seed 0) at {spacing:g} "
             f"mm, registered by `engine.register(..., 'io', similarity='mi', "
             f"regularization=w)`. Written by `{payload['environment']['command']}` (load "
             f"average {payload['environment']['load_average'][0]:.1f}).", "",
             *_table(results, "weight"), "",
             f"Chosen weight (best mean Dice, ties by ground-truth error): "
             f"**{payload['chosen_weight']:g}**."]
    _write(args.output, "mi-weight", payload, lines)
    return payload


def _prepared(pair, spacing_mm: float):
    """A pair tensor as a SimpleITK image on the working grid (isotropic, identity direction)."""
    import SimpleITK as sitk

    def to_image(tensor):
        image = sitk.GetImageFromArray(tensor[0, 0].numpy())
        image.SetSpacing((spacing_mm,) * 3)
        return image
    return to_image


# -------------------------------------------------------------------------------------- speed
def speed(args) -> Dict:
    """Seconds of ``engine.register`` on the 2 mm MNI152 demo pair with untrained weights (the
    cost does not depend on the weights), per variant and feature-update mode."""
    import tempfile

    from DeepRegistrationLib import engine
    from DeepRegistrationLib.methods import base, get_method, save_checkpoint
    from DeepRegistrationLib.methods.suits import build_network
    from DeepRegistrationLib.sample_data import demo_pair

    spec = get_method("suits")
    fixed, moving, _, _ = demo_pair(args.spacing)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        save_checkpoint(os.path.join(folder, "suits.pt"), build_network(spec.config), "suits",
                        dict(spec.config), {"note": "untrained weights, for timing only"})
        saved = os.environ.get("DEEPREG_CHECKPOINTS")
        os.environ["DEEPREG_CHECKPOINTS"] = folder
        base._NETWORK_CACHE.clear()
        try:
            engine.register(fixed, moving, "suits", options={"variant": "mind"})  # warm-up
            for variant in ("suits", "mind"):
                for recompute in (False, True):
                    runs, timings = [], {}
                    for _ in range(args.repeats):
                        load = os.getloadavg()[0]
                        started = time.perf_counter()
                        cpu = time.process_time()
                        result = engine.register(fixed, moving, "suits", options={
                            "variant": variant, "recompute_features": recompute})
                        runs.append({"seconds": time.perf_counter() - started,
                                     "cpu_seconds": time.process_time() - cpu, "load": load})
                        timings = {k: round(v, 3) for k, v in result.timings.items()}
                    results.append({"variant": variant, "recompute_features": recompute,
                                    "runs": runs, "timings_last_run": timings})
                    best = min(r["seconds"] for r in runs)
                    print(f"{variant} recompute_features={recompute}: best {best:.2f} s of "
                          f"{[round(r['seconds'], 2) for r in runs]}", flush=True)
        finally:
            if saved is None:
                os.environ.pop("DEEPREG_CHECKPOINTS", None)
            else:
                os.environ["DEEPREG_CHECKPOINTS"] = saved
    size = "x".join(str(n) for n in fixed.GetSize())
    payload = {"pair": f"MNI152 demo pair at {args.spacing:g} mm ({size})",
               "working_spacing_mm": spec.working_spacing_mm, "iterations": spec.config[
                   "iterations"], "results": results, "environment": _environment()}
    lines = ["# SUITS: seconds per registration", "",
             f"`engine.register` on the {payload['pair']}, working grid "
             f"{spec.working_spacing_mm:g} mm, K = {spec.config['iterations']}, untrained "
             f"weights; {args.repeats} runs each, torch threads "
             f"{payload['environment']['threads']}. Written by "
             f"`{payload['environment']['command']}`. Wall seconds on a shared machine depend on "
             "the other jobs: the load average (1 min) before each run is listed, and CPU "
             "seconds beside them.", "",
             "| variant | features | best wall s | median wall s | median CPU s | load averages |",
             "|---|---|---|---|---|---|"]
    for r in results:
        walls = [x["seconds"] for x in r["runs"]]
        loads = ", ".join("%.1f" % x["load"] for x in r["runs"])
        mode = "recomputed" if r["recompute_features"] else "warped"
        lines.append(f"| {r['variant']} | {mode} | {min(walls):.2f} | "
                     f"{float(np.median(walls)):.2f} | "
                     f"{float(np.median([x['cpu_seconds'] for x in r['runs']])):.2f} | {loads} |")
    _write(args.output, "speed", payload, lines)
    return payload


# ----------------------------------------------------------------------------------- ablation
def ablation_cases(names: str):
    from .evaluate import CaseSpec
    specs = {
        "t1-multimodal-35": CaseSpec("itk-t1-bspline-multimodal-35mm", "itk-t1", 3.5,
                                     multimodal=True, deformation="bspline"),
        "t1-multimodal-55": CaseSpec("itk-t1-bspline-multimodal-55mm", "itk-t1", 5.5,
                                     multimodal=True, deformation="bspline"),
        "t1-multimodal-75": CaseSpec("itk-t1-bspline-multimodal-75mm", "itk-t1", 7.5,
                                     multimodal=True, deformation="bspline"),
        "t1-same-55": CaseSpec("itk-t1-bspline-55mm", "itk-t1", 5.5, deformation="bspline"),
        "ct-multimodal": CaseSpec("invesalius-ct-multimodal", "invesalius-ct", 0.6,
                                  multimodal=True),
        "mni152-multimodal": CaseSpec("mni152-multimodal", "mni152", 0.6, multimodal=True),
        "mni152-same": CaseSpec("mni152-60", "mni152", 0.6),
    }
    keys = list(specs) if names == "all" else [n.strip() for n in names.split(",") if n.strip()]
    unknown = [k for k in keys if k not in specs]
    if unknown:
        raise UserInputError(f"unknown case(s) {', '.join(unknown)}; choose from "
                             f"{', '.join(specs)} or 'all'")
    return [specs[k] for k in keys]


def train_missing(args, folders: Dict[str, str]) -> List[str]:
    """Train the replica, SUITS and SUITS with matrix_grad where their checkpoint is missing."""
    from DeepRegistrationLib.methods import get_method

    from .train import TrainOptions, train
    working_spacing = get_method("suits").working_spacing_mm
    notes = []
    plan = [("replica", "suits-replica.pt", {"mind_fraction": 1.0}, None, args.lr),
            ("suits", "suits.pt", {"mind_fraction": 0.0}, "replica", args.lr_end_to_end),
            ("suits-matrix-grad", "suits.pt", {"mind_fraction": 0.0, "matrix_grad": True},
             "replica", args.lr_end_to_end)]
    for row, filename, config, start, lr in plan:
        path = os.path.join(folders[row], filename)
        if os.path.isfile(path) or args.iterations <= 0:
            continue
        resume = os.path.join(folders[start], "suits-replica.pt") if start else None
        options = dict(method="suits", output=path, iterations=args.iterations,
                       sources=list(_installed(args.sources.split(","))), config=config,
                       resume=resume, lr=lr, threads=args.threads, progress=False,
                       val_every=max(args.iterations // 4, 1), val_cases=4)
        if args.recipe and "recipe" in TrainOptions.__dataclass_fields__:
            # the recipe's data on SUITS' own working grid (features are learned at the grid
            # they are used on): its 8 mm stage off (its 4 mm stage stays: --coarse-* options
            # change only the first stage), whole canvases (the windows are sized for 2 mm)
            options.update(recipe=args.recipe, spacing_mm=working_spacing,
                           coarse_spacing_mm=0.0, synth={"crop_shape": None})
        started = time.perf_counter()
        train(TrainOptions(**options))
        notes.append(f"trained {row}: {args.iterations} steps in "
                     f"{time.perf_counter() - started:.0f} s -> {path}")
        print(notes[-1], flush=True)
    return notes


def run_row(row: str, case, folders: Dict[str, str], lambdas: Dict[str, float], refine: int):
    """The displacement of one row on one case and its seconds (registration call only)."""
    from DeepRegistrationLib import engine
    from DeepRegistrationLib.methods import base

    from .peers import run_peer
    if row == "ants":
        started = time.perf_counter()
        displacement, _ = run_peer("ants", case.fixed, case.moving)
        return displacement, time.perf_counter() - started
    options, method, similarity, steps = {}, "suits", None, 0
    if row in ("mind", "mind-best", "mind-refine"):
        options = {"variant": "mind", "regularization": lambdas[row]}
    elif row == "replica":
        options = {"variant": "replica"}
    elif row == "suits-recompute":
        options = {"recompute_features": True}
    elif row in ("io-mind", "io-mi"):
        method, similarity = "io", row[3:]
    elif row == "vm-diff":
        method = "vm-diff"
    if row.endswith("-refine"):
        steps, similarity = refine, "mi"
    folder = folders.get(row) or folders.get(row.replace("-recompute", "").replace("-refine", ""))
    saved = os.environ.get("DEEPREG_CHECKPOINTS")
    if folder and method == "suits":
        os.environ["DEEPREG_CHECKPOINTS"] = folder
        base._NETWORK_CACHE.clear()
    try:
        started = time.perf_counter()
        result = engine.register(case.fixed, case.moving, method, refine=steps,
                                 similarity=similarity, options=options)
        return result.displacement, time.perf_counter() - started
    finally:
        if saved is None:
            os.environ.pop("DEEPREG_CHECKPOINTS", None)
        else:
            os.environ["DEEPREG_CHECKPOINTS"] = saved
        base._NETWORK_CACHE.clear()


def ablation(args) -> Dict:
    from DeepRegistrationLib.methods import get_method

    from .evaluate import build_case, field_metrics
    rows = [r.strip() for r in args.methods.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise UserInputError(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    spec = get_method("suits")
    lambdas = {"mind": spec.config["regularization"], "mind-refine": spec.config["regularization"]}
    if os.path.isfile(args.lambda_file):
        with open(args.lambda_file) as handle:
            lambdas["mind-best"] = float(json.load(handle)["chosen_lambda"])
    elif "mind-best" in rows:
        raise UserInputError(f"--lambda-file {args.lambda_file} does not exist; run the "
                             "'lambda' command first")
    root = args.checkpoints
    folders = {"replica": os.path.join(root, "replica"), "suits": os.path.join(root, "suits"),
               "suits-matrix-grad": os.path.join(root, "matrix-grad")}
    for folder in folders.values():
        os.makedirs(folder, exist_ok=True)
    notes = train_missing(args, folders) if any(r in folders or r.startswith("suits")
                                                for r in rows) else []
    trained_on = set(args.sources.split(","))
    results = []
    for index, case_spec in enumerate(ablation_cases(args.cases)):
        case = build_case(case_spec, args.spacing, index)
        seen = case_spec.source in trained_on
        print(f"case {case.name} ({'seen' if seen else 'unseen'} anatomy): {case.description}",
              flush=True)
        identity = field_metrics(case, torch.zeros_like(case.truth))
        results.append(dict(identity, case=case.name, row="identity", seconds=0.0,
                            multimodal=case.multimodal, seen=seen))
        for row in rows:
            try:
                displacement, seconds = run_row(row, case, folders, lambdas, args.refine)
            except UserInputError as error:
                notes.append(f"{row} on {case.name}: skipped, {error}")
                print(notes[-1], flush=True)
                continue
            metrics = field_metrics(case, displacement.float())
            results.append(dict(metrics, case=case.name, row=row, seconds=seconds,
                                multimodal=case.multimodal, seen=seen))
            print(f"  {row}: Dice {metrics['dice']:.3f} GT {metrics['gt_error_mm']:.2f} mm "
                  f"HD95 {metrics['hd95']:.2f} folding {metrics['folding_percent']:.3f}% "
                  f"({metrics['folding_percent_strict']:.3f}% strict) {seconds:.1f} s",
                  flush=True)
    payload = {"rows": results, "notes": notes, "lambdas": lambdas, "spacing_mm": args.spacing,
               "refine": args.refine, "trained_on": sorted(trained_on),
               "environment": _environment()}
    _write(args.output, "ablation", payload, ablation_report(payload))
    return payload


def ablation_report(payload: Dict) -> List[str]:
    rows = payload["rows"]
    names = list(dict.fromkeys(r["row"] for r in rows))
    lines = ["# SUITS ablation", "",
             f"Written by `{payload['environment']['command']}` (load average "
             f"{payload['environment']['load_average'][0]:.1f}, {payload['spacing_mm']:g} mm "
             f"cases; lambdas {json.dumps(payload['lambdas'])}; networks trained on "
             f"{', '.join(payload['trained_on'])}).", ""]
    for title, subset in (("second contrast", [r for r in rows if r["multimodal"]]),
                          ("same contrast", [r for r in rows if not r["multimodal"]])):
        if not subset:
            continue
        lines += [f"## Mean over the {title} cases", "",
                  "| row | cases | Dice | HD95 mm | GT error mm | folding % | strict folding % "
                  "| seconds |", "|" + "---|" * 8]
        for name in names:
            chosen = [r for r in subset if r["row"] == name]
            if not chosen:
                continue
            mean = {k: float(np.mean([r[k] for r in chosen])) for k in
                    ("dice", "hd95", "gt_error_mm", "folding_percent", "folding_percent_strict",
                     "seconds")}
            lines.append(f"| {name} | {len(chosen)} | {mean['dice']:.3f} | {mean['hd95']:.2f} | "
                         f"{mean['gt_error_mm']:.2f} | {mean['folding_percent']:.3f} | "
                         f"{mean['folding_percent_strict']:.3f} | {mean['seconds']:.1f} |")
        lines.append("")
    lines += ["## Every case", "", "| case | anatomy | row | Dice | HD95 mm | GT error mm | "
              "folding % | strict folding % | seconds |", "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['case']} | {'seen' if r['seen'] else 'unseen'} | {r['row']} | "
                     f"{r['dice']:.3f} | {r['hd95']:.2f} | {r['gt_error_mm']:.2f} | "
                     f"{r['folding_percent']:.3f} | {r['folding_percent_strict']:.3f} | "
                     f"{r['seconds']:.1f} |")
    if payload["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in payload["notes"]]
    return lines


# --------------------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.suits_ablation",
                                     description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    lam = commands.add_parser("lambda", help="lambda for hand-crafted MIND on training pairs")
    lam.add_argument("--output", required=True)
    lam.add_argument("--pairs", type=int, default=8)
    lam.add_argument("--spacing", type=float, help="default: the method's working grid")
    lam.add_argument("--lambdas", type=lambda s: [float(v) for v in s.split(",")],
                     default=list(LAMBDAS))
    weight = commands.add_parser("mi-weight", help="io's MI regularisation weight")
    weight.add_argument("--output", required=True)
    weight.add_argument("--pairs", type=int, default=4)
    weight.add_argument("--spacing", type=float, default=2.0)
    weight.add_argument("--weights", type=lambda s: [float(v) for v in s.split(",")],
                        default=list(MI_WEIGHTS))
    fast = commands.add_parser("speed", help="seconds per 2 mm registration (untrained weights)")
    fast.add_argument("--output", required=True)
    fast.add_argument("--spacing", type=float, default=2.0)
    fast.add_argument("--repeats", type=int, default=3)
    abl = commands.add_parser("ablation", help="train what is missing, evaluate every row")
    abl.add_argument("--output", required=True)
    abl.add_argument("--iterations", type=int, default=600,
                     help="training steps of each missing network (0: train nothing)")
    abl.add_argument("--checkpoints", default="runs/suits-ablation",
                     help="folder of the ablation's own checkpoints (never Resources/)")
    abl.add_argument("--methods", default=",".join(ROWS), help=f"rows: {', '.join(ROWS)}")
    abl.add_argument("--cases", default="all", help="comma-separated case keys or 'all'")
    abl.add_argument("--spacing", type=float, default=2.0)
    abl.add_argument("--refine", type=int, default=60)
    abl.add_argument("--sources", default=",".join(TRAINING_SOURCES))
    abl.add_argument("--recipe", default="general",
                     help="training recipe (training.recipes) when the trainer has recipes")
    abl.add_argument("--lr", type=float, default=1e-3, help="phase mind")
    abl.add_argument("--lr-end-to-end", type=float, default=1e-4,
                     help="phase suits (the paper: 1e-5 over a far longer run)")
    abl.add_argument("--threads", type=int)
    abl.add_argument("--lambda-file", default="docs/methods/suits/lambda/lambda.json")
    args = parser.parse_args(argv)
    try:
        {"lambda": choose_lambda, "mi-weight": choose_mi_weight, "speed": speed,
         "ablation": ablation}[args.command](args)
    except UserInputError as error:
        print(f"python -m training.suits_ablation: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
