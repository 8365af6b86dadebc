"""SUITS (issue #10): lambda chosen on training pairs, the weight of io's mutual information, and
the paper's ablation on evaluation cases.

    python -m training.suits_ablation lambda --output docs/methods/suits/lambda
    python -m training.suits_ablation mi-weight --output docs/methods/suits/mi-weight
    python -m training.suits_ablation speed --output docs/methods/suits/speed
    python -m training.suits_ablation ablation --iterations 600 --seeds 0,1 \\
        --output runs/suits-ablation
    python -m training.suits_ablation ablation --iterations 0 --methods mind,io-mind,io-mi,ants \\
        --output docs/methods/suits/multimodal

``lambda``: hand-crafted MIND-SSC in the SUITS solver (``--variant mind``) on synthetic pairs of
the *training* stream (``training.synth``, seed 0; the evaluation uses its own seed and stream),
half of them in a label-driven second contrast, on the working grid, for a grid of lambdas;
the lambda with the best mean Dice is the one SUITS uses (ties: lower ground-truth error), and
the feature-update modes (recomputed from the warped image, as the paper, or warped) are
compared at it. ``mi-weight``: the same for the regularisation weight of ``io --similarity mi``
on second-contrast training pairs (through ``engine.register``, the whole pipeline).

``ablation``: trains what is missing (``--iterations`` steps each, per seed of ``--seeds``, into
``--checkpoints``/seed<S>): the replica (phase ``mind`` only), SUITS from the replica (phase
``suits``), and SUITS with ``matrix_grad``, with the ``--recipe``'s data but SUITS' own loss (the
recipe's guidance terms and clean similarity off: ``--guidance '{}' --clean-similarity no``);
chooses the lambda of the ``mind-best`` control row on second-contrast *training* pairs (a small
grid, ``--mind-lambdas``); then registers the cases with every row through ``engine.register``
(ANTs SyN through ``training.peers``) and computes every metric with
``training.evaluate.field_metrics``: Dice, HD95, ground-truth error (label-independent: the
second contrast is painted from the labels, so features could learn to segment them), folding
(central and strict) and seconds. Cases are built by ``training.evaluate`` (its seed and stream):
the unseen ITK T1 brain under an independent B-spline deformation family in a second contrast
and in its own, and the CT and MNI152 sources in a second contrast; every row says whether the
case's anatomy was in the training data of the networks. The report (``ablation.md``,
``per_case.csv``, ``comparisons.csv``) has the means per contrast and anatomy (all, unseen,
seen) and paired per-case statistics (``mmln_ablation.paired``: mean difference, cases each way,
Wilcoxon p) of SUITS against its controls.
"""
from __future__ import annotations

import argparse
import contextlib
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

from .ablation_common import (SUBSETS, checkpoints_from, means_table,  # noqa: E402
                              write_per_case_csv)
from .mmln_ablation import (compare_arms, comparisons_table, seed_means,  # noqa: E402
                            write_comparisons_csv)

LAMBDAS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
MI_WEIGHTS = (0.1, 0.3, 1.0, 3.0)
# the grid of the mind-best control row: around the default (1), where the training pairs' Dice
# peaked (lambda.md)
MIND_BEST_LAMBDAS = (0.5, 1.0, 2.0, 4.0)
TRAINING_SOURCES = ("mni152", "pydeface", "invesalius-ct")  # the general recipe's (itk-t1 unseen)
ROWS = ("mind", "mind-best", "replica", "suits", "suits-matrix-grad", "suits-recompute",
        "suits-refine", "mind-refine", "io", "io-mind", "io-mi", "vm-diff", "ants")
# rows whose networks the ablation trains, once per seed; every other row is registered once
TRAINED_ROWS = ("replica", "suits", "suits-matrix-grad", "suits-recompute", "suits-refine")
# what the ablation trains, in order: (row, checkpoint file, config overrides, the row whose
# checkpoint it starts from, the option of its learning rate)
TRAINING_PLAN = (
    ("replica", "suits-replica.pt", {"mind_fraction": 1.0}, None, "lr"),
    ("suits", "suits.pt", {"mind_fraction": 0.0}, "replica", "lr_end_to_end"),
    ("suits-matrix-grad", "suits.pt", {"mind_fraction": 0.0, "matrix_grad": True}, "replica",
     "lr_end_to_end"),
)
CONTRASTS = ("second contrast", "same contrast")
# paired per case: the paper's claim first (better features, not weaker regularisation), then
# its parts (MIND pre-training, end-to-end training, the solver's options) and the peers
COMPARISONS = (("suits", "mind-best"), ("suits", "mind"), ("replica", "mind"),
               ("suits", "replica"), ("mind-best", "mind"), ("suits-matrix-grad", "suits"),
               ("suits-recompute", "suits"), ("suits-refine", "mind-refine"),
               ("suits-refine", "ants"), ("suits", "io"), ("suits", "io-mi"), ("io-mi", "io"))
# (metric, lower is better), as the MMLN ablation's; the means add the seconds
METRICS = (("dice", False), ("hd95", True), ("gt_error_mm", True), ("folding_percent", True),
           ("folding_percent_strict", True))
MEAN_COLUMNS = METRICS + (("seconds", True),)


def _installed(names: Sequence[str]) -> List[str]:
    from .data import available_sources
    installed = available_sources()
    chosen = [n for n in names if n in installed]
    if not chosen:
        raise UserInputError("none of the training sources is installed; run "
                             "training/install_data.sh (or: python -m pip install nilearn)")
    return chosen


def training_pairs(count: int, spacing_mm: float, multimodal_only: bool = False,
                   sources: Sequence[str] = TRAINING_SOURCES):
    """Pairs of the training stream (seed 0), half of them (or all) in a second contrast."""
    from .synth import TRAIN, PairGenerator, SynthConfig
    config = SynthConfig(spacing_mm=spacing_mm, multiple=1, contrast_probability=0.5)
    generator = PairGenerator(_installed(sources), config, seed=0, canvas=False)
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


def best_by_dice(results: Dict[str, Dict]) -> str:
    """The key of the result with the best mean Dice over all its pairs; ties (to the fourth
    decimal) go to the lower ground-truth error."""
    return max(results, key=lambda k: (round(results[k]["summary"]["all"]["dice"], 4),
                                       -results[k]["summary"]["all"]["gt_error_mm"]))


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
    candidates = {f"mind lambda {value:g}": mind_run(network, pairs, value,
                                                     spec.config["recompute_features"], spacing)
                  for value in args.lambdas}
    results.update(candidates)
    chosen = candidates[best_by_dice(candidates)]["lambda"]
    other = not spec.config["recompute_features"]
    results[f"mind lambda {chosen:g}, recompute_features {other}"] = mind_run(
        network, pairs, chosen, other, spacing)
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


def mind_run(network, pairs, regularization: float, recompute: bool, spacing_mm: float) -> Dict:
    """Hand-crafted MIND-SSC in the SUITS solver (the network's ``mind`` path, so no weights
    matter) on ``pairs`` at ``regularization``: each pair's row and their summary."""
    network.recompute_features = recompute
    rows = []
    for pair in pairs:
        started = time.perf_counter()
        with torch.inference_mode():
            displacement = network(pair.fixed, pair.moving, "mind", regularization)
        rows.append(pair_row(pair, displacement, spacing_mm, time.perf_counter() - started))
    result = {"rows": rows, "summary": summarise(rows), "lambda": regularization,
              "recompute_features": recompute}
    print(f"mind lambda {regularization:g} (recompute_features {recompute}): "
          f"{json.dumps(result['summary']['all'])}", flush=True)
    return result


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
    best = best_by_dice(results)
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
        base._NETWORK_CACHE.clear()
        with checkpoints_from(folder):
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


def mind_best_lambda(args, sources: Sequence[str]) -> Dict:
    """The lambda of the ``mind-best`` control row: hand-crafted MIND's best on second-contrast
    pairs of the *training* stream (``--mind-lambda-pairs`` of them, ``--mind-lambdas``, SUITS'
    working grid; best mean Dice, ties by ground-truth error), never on the evaluation cases.
    With it the row separates "better features" from "weaker regularisation": SUITS' lambda was
    chosen on mixed pairs, and the multi-modal pairs may prefer another. Written to
    ``--output``/mind-best-lambda.{json,md}; a choice already there with the same plan (grid,
    pairs, sources, grid spacing) is reused rather than computed again."""
    from DeepRegistrationLib.methods import get_method
    from DeepRegistrationLib.methods.suits import build_network

    spec = get_method("suits")
    spacing = float(spec.working_spacing_mm)
    plan = {"lambdas": [float(v) for v in args.mind_lambdas], "pairs": args.mind_lambda_pairs,
            "sources": sorted(sources), "spacing_mm": spacing}
    path = os.path.join(args.output, "mind-best-lambda.json")
    if os.path.isfile(path):
        with open(path) as handle:
            earlier = json.load(handle)
        if earlier.get("plan") == plan:
            print(f"mind-best lambda {earlier['chosen_lambda']:g}, chosen before ({path})",
                  flush=True)
            return earlier
    pairs = training_pairs(args.mind_lambda_pairs, spacing, multimodal_only=True, sources=sources)
    network = build_network(spec.config).eval()
    results = {f"mind lambda {value:g}": mind_run(network, pairs, value,
                                                  spec.config["recompute_features"], spacing)
               for value in plan["lambdas"]}
    chosen = results[best_by_dice(results)]["lambda"]
    payload = {"chosen_lambda": chosen, "plan": plan, "stream": "training (seed 0)",
               "results": results, "environment": _environment()}
    lines = ["# SUITS ablation: lambda of the mind-best row", "",
             f"Hand-crafted MIND-SSC in the SUITS solver on {len(pairs)} second-contrast pairs of "
             f"the training stream (seed 0; sources {', '.join(plan['sources'])}) on the "
             f"{spacing:g} mm working grid, K = {spec.config['iterations']}; the evaluation cases "
             "are not used.", "", *_table(results, "run"), "",
             f"Chosen lambda (best mean Dice, ties by ground-truth error): **{chosen:g}**."]
    _write(args.output, "mind-best-lambda", payload, lines)
    return payload


def network_folders(root: str, seed: int) -> Dict[str, str]:
    """Where the trained rows' checkpoints of one seed live (under ``--checkpoints``, never
    Resources/)."""
    folder = os.path.join(root, f"seed{seed}")
    return {"replica": os.path.join(folder, "replica"), "suits": os.path.join(folder, "suits"),
            "suits-matrix-grad": os.path.join(folder, "matrix-grad")}


def training_options(args, config: Dict, output: str, resume: Optional[str], lr: float,
                     seed: int, sources: Sequence):
    """The trainer's options for one network of the ablation."""
    from DeepRegistrationLib.methods import get_method

    from .train import TrainOptions
    # SUITS' own loss (MIND regression, then label-driven weak supervision) takes none of a
    # recipe's guidance terms or its clean similarity, and the trainer refuses a run that asks
    # for them (train.check_recipe_losses): off, as `--guidance '{}' --clean-similarity no`
    options = dict(method="suits", output=output, iterations=args.iterations,
                   sources=list(sources), seed=seed, config=config, resume=resume, lr=lr,
                   threads=args.threads, progress=False,
                   val_every=args.val_every or max(args.iterations // 4, 1),
                   val_cases=args.val_cases, guidance={}, clean_similarity=False)
    if args.recipe:
        # the recipe's data on SUITS' own working grid (features are learned at the grid they
        # are used on): its 8 mm stage off (its 4 mm stage stays: --coarse-* options change only
        # the first stage), whole canvases (the windows are sized for 2 mm)
        options.update(recipe=args.recipe, spacing_mm=get_method("suits").working_spacing_mm,
                       coarse_spacing_mm=0.0, synth={"crop_shape": None})
    return TrainOptions(**options)


def train_missing(args, folders: Dict[str, str], seed: int, sources: Sequence) -> List[str]:
    """Train the replica, SUITS and SUITS with matrix_grad of one seed where their checkpoint is
    missing (``--iterations`` steps each, on ``sources``: names or ``training.data.Volume``s);
    returns one note per network trained."""
    from .train import train
    notes = []
    for row, filename, config, start, lr_option in TRAINING_PLAN:
        path = os.path.join(folders[row], filename)
        if os.path.isfile(path) or args.iterations <= 0:
            continue
        os.makedirs(folders[row], exist_ok=True)
        resume = os.path.join(folders[start], "suits-replica.pt") if start else None
        started = time.perf_counter()
        train(training_options(args, config, path, resume, getattr(args, lr_option), seed,
                               sources))
        notes.append(f"trained {row} (seed {seed}): {args.iterations} steps in "
                     f"{time.perf_counter() - started:.0f} s -> {path}")
        print(notes[-1], flush=True)
    return notes


def run_row(row: str, case, folders: Dict[str, str], lambdas: Dict[str, float], refine: int):
    """The displacement of one row on one case and its seconds (registration call only);
    ``folders``: the checkpoints of the trained rows (one seed's)."""
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
    elif row in ("io", "io-mind", "io-mi"):
        method, similarity = "io", row[3:] or None  # plain io: its default similarity (LNCC)
    elif row == "vm-diff":
        method = "vm-diff"
    if row.endswith("-refine"):
        steps, similarity = refine, "mi"
    folder = folders.get(row) or folders.get(row.replace("-recompute", "").replace("-refine", ""))
    own_checkpoints = folder and method == "suits"
    if own_checkpoints:
        base._NETWORK_CACHE.clear()
    try:
        with checkpoints_from(folder) if own_checkpoints else contextlib.nullcontext():
            started = time.perf_counter()
            result = engine.register(case.fixed, case.moving, method, refine=steps,
                                     similarity=similarity, options=options)
            return result.displacement, time.perf_counter() - started
    finally:
        base._NETWORK_CACHE.clear()


def case_labels(case, source: str, trained_on: Sequence[str]) -> Dict:
    """What every row of a case says about it: its name and source, its contrast, and whether
    its anatomy was in the networks' training data."""
    return {"case": case.name, "source": source, "multimodal": bool(case.multimodal),
            "contrast": CONTRASTS[0] if case.multimodal else CONTRASTS[1],
            "anatomy": "seen" if source in trained_on else "unseen"}


def ablation(args) -> Dict:
    from DeepRegistrationLib.methods import get_method

    from .evaluate import build_case, field_metrics
    rows = [r.strip() for r in args.methods.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise UserInputError(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    spec = get_method("suits")
    lambdas = {"mind": spec.config["regularization"], "mind-refine": spec.config["regularization"]}
    mind_best = None
    if "mind-best" in rows:
        mind_best = mind_best_lambda(args, _installed(args.sources.split(",")))
        lambdas["mind-best"] = mind_best["chosen_lambda"]
    folders = {seed: network_folders(args.checkpoints, seed) for seed in seeds}
    notes = []
    if args.iterations > 0 and any(r in TRAINED_ROWS for r in rows):
        sources = _installed(args.sources.split(","))
        for seed in seeds:
            notes += train_missing(args, folders[seed], seed, sources)
    trained_on = args.sources.split(",")
    results = []
    for index, case_spec in enumerate(ablation_cases(args.cases)):
        case = build_case(case_spec, args.spacing, index)
        labels = case_labels(case, case_spec.source, trained_on)
        print(f"case {case.name} ({labels['anatomy']} anatomy): {case.description}", flush=True)
        identity = field_metrics(case, torch.zeros_like(case.truth))
        results.append(dict(identity, arm="identity", seed=seeds[0], seconds=0.0, **labels))
        for row in rows:
            # a row that trains nothing gives the same field for every seed: registered once
            for seed in (seeds if row in TRAINED_ROWS else seeds[:1]):
                try:
                    displacement, seconds = run_row(row, case, folders[seed], lambdas,
                                                    args.refine)
                except UserInputError as error:
                    notes.append(f"{row} (seed {seed}) on {case.name}: skipped, {error}")
                    print(notes[-1], flush=True)
                    continue
                metrics = field_metrics(case, displacement.float())
                results.append(dict(metrics, arm=row, seed=seed, seconds=seconds, **labels))
                print(f"  {row} (seed {seed}): Dice {metrics['dice']:.3f} GT "
                      f"{metrics['gt_error_mm']:.2f} mm HD95 {metrics['hd95']:.2f} folding "
                      f"{metrics['folding_percent']:.3f}% "
                      f"({metrics['folding_percent_strict']:.3f}% strict) {seconds:.1f} s",
                      flush=True)
    comparisons = paired_comparisons(results)
    payload = {"rows": results, "comparisons": comparisons, "notes": notes, "lambdas": lambdas,
               "mind_best": summary_of_choice(mind_best) if mind_best else None,
               "seeds": seeds, "spacing_mm": args.spacing, "refine": args.refine,
               "trained_on": sorted(trained_on), "environment": _environment()}
    _write(args.output, "ablation", payload, ablation_report(payload))
    write_per_case_csv(os.path.join(args.output, "per_case.csv"), results,
                       ["seed", "arm", "case", "source", "contrast", "anatomy", "seconds"]
                       + [m for m, _ in METRICS] + ["sdlogj", "ncc"])
    write_comparisons_csv(os.path.join(args.output, "comparisons.csv"), comparisons)
    return payload


def summary_of_choice(selection: Dict) -> Dict:
    """The mind-best lambda for the ablation's report: the choice, its plan and the mean Dice
    of every lambda tried (every pair's numbers stay in mind-best-lambda.json)."""
    return {"chosen_lambda": selection["chosen_lambda"], "plan": selection["plan"],
            "dice": {str(r["lambda"]): r["summary"]["all"]["dice"]
                     for r in selection["results"].values()}}


def per_case(rows: List[Dict], first: str, second: str) -> List[Dict]:
    """The rows of two arms, one per (arm, case), for ``paired``: a trained arm's seeds averaged
    (``mmln_ablation.seed_means``), a row that trains nothing as it was registered, once. Two
    seeds register the same images, so (case, seed) units would count a case twice and
    overstate significance; the unit is the case."""
    chosen = [r for r in rows if r["arm"] in (first, second)]
    return [dict(r, seed="per case") for r in seed_means(chosen, METRICS)]


def paired_comparisons(rows: List[Dict]) -> List[Dict]:
    """``COMPARISONS`` paired per case, for each contrast and anatomy subset (all, unseen, seen):
    the claim is about unseen multi-modal cases, so they are reported apart."""
    results = []
    for contrast in CONTRASTS:
        for anatomy in SUBSETS:
            chosen = [r for r in rows if r["contrast"] == contrast
                      and anatomy in ("all", r["anatomy"])]
            for first, second in COMPARISONS:
                results += compare_arms(per_case(chosen, first, second),
                                        [(first, second)], METRICS, contrast=contrast,
                                        anatomy=anatomy)
    return results


def ablation_report(payload: Dict) -> List[str]:
    rows = payload["rows"]
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    lines = ["# SUITS ablation", "",
             f"Written by `{payload['environment']['command']}` (load average "
             f"{payload['environment']['load_average'][0]:.1f}, {payload['spacing_mm']:g} mm "
             f"cases; seeds {payload['seeds']}; networks trained on "
             f"{', '.join(payload['trained_on'])}). Rows that train nothing are registered once "
             "(seed-independent) and paired beside every seed of a trained row.", "",
             *lambda_lines(payload), ""]
    for contrast in CONTRASTS:
        subset = [r for r in rows if r["contrast"] == contrast]
        if subset:
            lines += means_table(f"Means over the {contrast} cases", subset, arms,
                                 MEAN_COLUMNS, heading_level=2) + [""]
    lines += ["## Paired comparisons (first - second over the same (case, seed))", "",
              *comparisons_table(payload["comparisons"], ("contrast", "anatomy")), ""]
    lines += ["## Every case", "", "| case | anatomy | row | seed | Dice | HD95 mm | GT error mm | "
              "folding % | strict folding % | seconds |", "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['case']} | {r['anatomy']} | {r['arm']} | {r['seed']} | "
                     f"{r['dice']:.3f} | {r['hd95']:.2f} | {r['gt_error_mm']:.2f} | "
                     f"{r['folding_percent']:.3f} | {r['folding_percent_strict']:.3f} | "
                     f"{r['seconds']:.1f} |")
    if payload["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in payload["notes"]]
    return lines


def lambda_lines(payload: Dict) -> List[str]:
    """Which lambda each MIND row used, and how the mind-best one was chosen."""
    lambdas = payload["lambdas"]
    lines = [f"Lambda: `mind` and `mind-refine` {lambdas['mind']:g} (SUITS' own, chosen on mixed "
             "training pairs: docs/methods/suits/lambda/lambda.md)."]
    choice = payload.get("mind_best")
    if choice:
        plan = choice["plan"]
        tried = ", ".join(f"{float(k):g}: {v:.3f}" for k, v in choice["dice"].items())
        lines[0] += (f" `mind-best` **{choice['chosen_lambda']:g}**: MIND's best mean Dice on "
                     f"{plan['pairs']} second-contrast training pairs (seed 0; "
                     f"{', '.join(plan['sources'])}; never the evaluation cases) over the grid "
                     f"{', '.join(f'{v:g}' for v in plan['lambdas'])} (Dice {tried}; "
                     "mind-best-lambda.md).")
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
                     help="folder of the ablation's own checkpoints, seed<S>/ in it (never "
                          "Resources/)")
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
    abl.add_argument("--val-every", type=int, help="default: a quarter of --iterations")
    abl.add_argument("--val-cases", type=int, default=4)
    abl.add_argument("--seeds", default="0",
                     help="comma-separated training seeds of the networks (one folder each)")
    abl.add_argument("--mind-lambdas", type=lambda s: [float(v) for v in s.split(",")],
                     default=list(MIND_BEST_LAMBDAS),
                     help="grid of the mind-best row's lambda (second-contrast training pairs)")
    abl.add_argument("--mind-lambda-pairs", type=int, default=6,
                     help="second-contrast training pairs that choose the mind-best lambda")
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
