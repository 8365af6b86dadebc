"""Pose benchmark: real heads in scanner-like poses, with and without the global stage, beside
ANTs SyN in the same run.

    python benchmarks/benchmark_pose.py                       # every case, default methods
    python benchmarks/benchmark_pose.py --methods io@none,io@affine --peers ""
    python benchmarks/benchmark_pose.py --methods vm-diff@affine,vm-diff@none --cases t1-to-mni
    python benchmarks/benchmark_pose.py --output docs/benchmarks/pose.md   # the committed table

Cases (2 mm, from ``training.data``'s offline sources; the moving image keeps its own grid):

- different subjects where the labels allow it (GM / WM / CSF): the ITK example T1 (a real head,
  skull-stripped with the example's own strip, stored with coronal direction cosines) against
  the MNI152 template, as stored, with an added header pose, and the other way round with the
  MNI152 stored sagittally;
- the same anatomy deformed by a random smooth diffeomorphism (magnitude 6 mm) and given a
  header pose: the MNI152 (GM / WM / CSF), the InVesalius head CT (soft tissue / bone) and
  pydeface's mean head (head mask).

A *header pose* is what a scanner does: the voxels stay, the direction cosines and origin change
(rotation about the image centre, then a shift), so nothing is interpolated; *storage* permutes
and flips the voxel axes with the physical image unchanged (``sitk.PermuteAxes`` / ``Flip``).

Methods are ``NAME@INITIAL`` (``--initial`` of ``deepreg register``; a bare name means
``@affine``); the default is ``io`` and every network with a checkpoint, each ``@none`` and
``@affine``. Every result is a displacement on the fixed grid, judged by the same library code:
mean Dice and HD95 (mm) of the moving labels carried by the total field (nearest neighbour),
% folded voxels by central differences (ITK / Learn2Reg) and by the strict one-sided measure,
SDlogJ of the total field, seconds of the registration call (``engine.register``, or the peer's
own registration) and, for our methods, of the global stage within it. The machine's load
average is printed beside the timings: these figures come from a shared 2-core machine.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from DeepRegistrationLib.runtime import configure_openmp  # noqa: E402

configure_openmp()  # as the deepreg command does, before torch loads

import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

SPACING_MM = 2.0
DEFORMATION_MM = 6.0


@dataclass
class Case:
    name: str
    fixed: sitk.Image
    moving: sitk.Image
    fixed_labels: sitk.Image
    moving_labels: sitk.Image
    labels: List[int]
    anatomy: List[str]            # the sources the case is made of (seen/unseen by a network)
    description: str


@dataclass
class Row:
    case: str
    tool: str
    dice: float
    hd95: float
    folding: float = float("nan")
    folding_strict: float = float("nan")
    sdlogj: float = float("nan")
    seconds: float = float("nan")
    global_seconds: float = float("nan")
    global_cpu_seconds: float = float("nan")
    used: str = ""
    load: float = float("nan")
    notes: List[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------- cases
def header_pose(image: sitk.Image, degrees: float, axis, shift_mm) -> sitk.Image:
    """The same voxels placed as a scanner would place a tilted, shifted head: direction and
    origin rotated by ``degrees`` about ``axis`` through the image centre, then shifted."""
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    rotation = np.array(sitk.VersorTransform(tuple(axis), np.radians(degrees)).GetMatrix())
    rotation = rotation.reshape(3, 3)
    size = np.array(image.GetSize(), dtype=np.float64)
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist()))
    posed = sitk.Image(image)
    direction = rotation @ np.array(image.GetDirection()).reshape(3, 3)
    posed.SetDirection(tuple(direction.ravel()))
    posed.SetOrigin(tuple(rotation @ (np.array(image.GetOrigin()) - centre) + centre
                          + np.asarray(shift_mm, dtype=np.float64)))
    return posed


def stored(image: sitk.Image, storage: str) -> sitk.Image:
    """The same physical image with its voxel axes stored as an ``axial`` / ``coronal`` /
    ``sagittal`` acquisition would store an axial one (permuted and flipped)."""
    if storage == "coronal":
        return sitk.Flip(sitk.PermuteAxes(image, [0, 2, 1]), [False, True, False])
    if storage == "sagittal":
        return sitk.Flip(sitk.PermuteAxes(image, [1, 2, 0]), [False, True, False])
    return image


def deformed(image: sitk.Image, labels: sitk.Image, seed: int):
    """``image`` and ``labels`` warped on their own grid by a random smooth diffeomorphism."""
    from DeepRegistrationLib.images import image_from_array
    from DeepRegistrationLib.spatial import warp
    from DeepRegistrationLib.synthetic import random_diffeomorphism
    shape = sitk.GetArrayViewFromImage(image).shape
    spacing = min(image.GetSpacing())
    velocity = random_diffeomorphism(shape, magnitude=DEFORMATION_MM / spacing,
                                     control_spacing=40.0 / spacing, seed=seed)
    array = torch.from_numpy(sitk.GetArrayFromImage(image).astype(np.float32))[None, None]
    label_array = torch.from_numpy(sitk.GetArrayFromImage(labels).astype(np.float32))[None, None]
    with torch.no_grad():
        moved = warp(array, velocity)[0, 0].numpy()
        moved_labels = warp(label_array, velocity, mode="nearest")[0, 0].numpy()
    return (image_from_array(moved.astype(np.float32), image),
            image_from_array(moved_labels.astype(np.int32), labels))


def centred_on(image: sitk.Image, labels: sitk.Image, reference_labels: sitk.Image):
    """``image`` and ``labels`` with their origin moved so that the labelled anatomy's centre
    lies on the reference's: the start a scanner gives when the head is at its isocentre (the
    ITK example's own header places the head some 20 cm from the MNI152's)."""
    def centre(label_image):
        index = np.argwhere(sitk.GetArrayViewFromImage(label_image) > 0)[:, ::-1].mean(0)
        return np.array(label_image.TransformContinuousIndexToPhysicalPoint(index.tolist()))
    shift = centre(reference_labels) - centre(labels)
    moved = []
    for item in (image, labels):
        item = sitk.Image(item)
        item.SetOrigin(tuple(np.array(item.GetOrigin()) + shift))
        moved.append(item)
    return moved


def stripped_itk_t1(spacing: float):
    """The ITK example T1 with its own skull strip applied (coronal direction cosines kept)."""
    from DeepRegistrationLib.images import image_from_array
    from training.data import ITK_T1_NAMES, _itk_file, load_source
    volume = load_source("itk-t1")
    strip = sitk.ReadImage(_itk_file(ITK_T1_NAMES[1]))
    brain = sitk.GetArrayFromImage(strip) > 0
    array = sitk.GetArrayFromImage(volume.image) * brain
    image = image_from_array(array.astype(np.float32), volume.image)
    from DeepRegistrationLib.sample_data import resample_isotropic
    return (resample_isotropic(image, spacing),
            resample_isotropic(volume.labels, spacing, nearest=True))


def build_cases(names: Optional[List[str]]) -> List[Case]:
    from training.data import available_sources, load_source
    installed = available_sources()
    cases: List[Case] = []

    def wanted(name):
        return names is None or name in names

    mni = load_source("mni152", SPACING_MM) if "mni152" in installed else None
    t1 = stripped_itk_t1(SPACING_MM) if "itk-t1" in installed else None
    if mni is not None and t1 is not None:
        t1 = centred_on(*t1, mni.labels)
    brain_labels = [1, 2, 3]
    if mni is not None and t1 is not None:
        if wanted("t1-to-mni"):
            cases.append(Case("t1-to-mni", mni.image, t1[0], mni.labels, t1[1], brain_labels,
                              ["mni152", "itk-t1"], "ITK T1 (skull-stripped, coronal storage, "
                              "its brain centred on the MNI152's) onto MNI152: different "
                              "subjects"))
        if wanted("t1-to-mni-posed"):
            cases.append(Case("t1-to-mni-posed", mni.image,
                              header_pose(t1[0], 15.0, (1, 0.2, 0), (0, 20, -15)),
                              mni.labels, header_pose(t1[1], 15.0, (1, 0.2, 0), (0, 20, -15)),
                              brain_labels, ["mni152", "itk-t1"],
                              "ITK T1 tilted 15 deg, shifted 25 mm, onto MNI152"))
        if wanted("mni-to-t1-posed-sagittal"):
            moving = stored(header_pose(mni.image, 20.0, (0.3, 0, 1), (30, 0, 0)), "sagittal")
            labels = stored(header_pose(mni.labels, 20.0, (0.3, 0, 1), (30, 0, 0)), "sagittal")
            cases.append(Case("mni-to-t1-posed-sagittal", t1[0], moving, t1[1], labels,
                              brain_labels, ["itk-t1", "mni152"],
                              "MNI152 tilted 20 deg, shifted 30 mm, stored sagittal, onto ITK T1"))
    if mni is not None and wanted("mni-deformed-posed-coronal"):
        image, labels = deformed(mni.image, mni.labels, seed=21)
        pose = (10.0, (1, 0, 0.2), (0, -15, 13))
        cases.append(Case("mni-deformed-posed-coronal", mni.image,
                          stored(header_pose(image, *pose), "coronal"), mni.labels,
                          stored(header_pose(labels, *pose), "coronal"), brain_labels,
                          ["mni152"], "MNI152 deformed (6 mm), tilted 10 deg, shifted 20 mm, "
                          "stored coronal"))
    if "invesalius-ct" in installed and wanted("ct-deformed-posed"):
        ct = load_source("invesalius-ct", SPACING_MM)
        image, labels = deformed(ct.image, ct.labels, seed=22)
        pose = (15.0, (0.2, 1, 0), (20, 0, 10))
        cases.append(Case("ct-deformed-posed", ct.image, header_pose(image, *pose), ct.labels,
                          header_pose(labels, *pose), [1, 2], ["invesalius-ct"],
                          "head CT deformed (6 mm), tilted 15 deg, shifted 22 mm"))
    if "pydeface" in installed and wanted("head-deformed-posed-sagittal"):
        head = load_source("pydeface", SPACING_MM)
        image, labels = deformed(head.image, head.labels, seed=23)
        pose = (20.0, (0, 0.3, 1), (-25, 15, 0))
        cases.append(Case("head-deformed-posed-sagittal", head.image,
                          stored(header_pose(image, *pose), "sagittal"), head.labels,
                          stored(header_pose(labels, *pose), "sagittal"), [1], ["pydeface"],
                          "mean head with skull deformed (6 mm), tilted 20 deg, shifted 29 mm, "
                          "stored sagittal (label: head mask)"))
    return cases


# ------------------------------------------------------------------------------- evaluation
def evaluate(case: Case, displacement: torch.Tensor, tool: str) -> Row:
    from DeepRegistrationLib.metrics import (dice, folding_percent, hd95,
                                             jacobian_determinant_map,
                                             strict_jacobian_determinant_map, sdlogj)
    from DeepRegistrationLib.outputs import warp_image
    fixed_labels = sitk.GetArrayFromImage(case.fixed_labels)
    warped = sitk.GetArrayFromImage(warp_image(case.moving_labels, displacement, case.fixed,
                                               nearest=True))
    overlap = dice(fixed_labels, warped, case.labels)
    distance = hd95(fixed_labels, warped, case.fixed.GetSpacing()[::-1], case.labels)
    determinant = jacobian_determinant_map(displacement)
    strict = strict_jacobian_determinant_map(displacement)
    return Row(case.name, tool, float(np.mean([overlap.get(k, 0.0) for k in case.labels])),
               float(np.mean([distance.get(k, np.inf) for k in case.labels])),
               folding_percent(determinant), folding_percent(strict), sdlogj(determinant))


def identity_row(case: Case) -> Row:
    shape = sitk.GetArrayViewFromImage(case.fixed).shape
    row = evaluate(case, torch.zeros((1, 3, *shape)), "identity")
    row.folding = row.folding_strict = row.sdlogj = float("nan")
    return row


def label(tool: str) -> str:
    """How a tool is named in the tables: ``ANTs SyN`` or ``NAME @INITIAL``."""
    if tool == "ants":
        return "ANTs SyN"
    name, _, initial = tool.partition("@")
    return f"{name} @{initial or 'affine'}"


def run_tool(case: Case, tool: str) -> Row:
    load = os.getloadavg()[0]
    if tool == "ants":
        from training.peers import run_ants
        displacement, seconds = run_ants(case.fixed, case.moving)
        row = evaluate(case, displacement, label(tool))
        row.seconds, row.load = seconds, load
        return row
    from DeepRegistrationLib.engine import register
    name, _, initial = tool.partition("@")
    started = time.perf_counter()
    result = register(case.fixed, case.moving, name, initial=initial or "affine")
    seconds = time.perf_counter() - started
    row = evaluate(case, result.displacement, label(tool))
    row.seconds, row.load = seconds, load
    row.global_seconds = result.alignment.seconds if result.alignment is not None else 0.0
    row.global_cpu_seconds = result.alignment.cpu_seconds if result.alignment is not None else 0.0
    row.used = result.alignment.used if result.alignment is not None else "none"
    return row


def default_methods() -> List[str]:
    from DeepRegistrationLib.methods import list_methods
    networks = [spec.name for spec in list_methods() if spec.needs_checkpoint and spec.available]
    return ["io@none", "io@affine"] + [f"{name}@{initial}" for name in networks
                                       for initial in ("none", "affine")]


def checkpoint_note(method: str) -> str:
    """Which checkpoint a network row used (sha256 prefix and date from its model card): the
    networks are retrained, and a table must say which weights it measured."""
    from DeepRegistrationLib.methods import get_method
    card = get_method(method).describe().get("model_card") or {}
    return f"{method} {str(card.get('sha256', '?'))[:12]} ({card.get('created', '?')})"


def trained_on(method: str) -> Optional[List[str]]:
    """The source names a method's checkpoint was trained on (its model card), or None."""
    from DeepRegistrationLib.methods import get_method
    spec = get_method(method)
    if not spec.needs_checkpoint:
        return None
    card = spec.describe().get("model_card") or {}
    return [s.get("name") for s in (card.get("data") or {}).get("sources") or []
            if isinstance(s, dict)]


# ---------------------------------------------------------------------------------- reporting
def _fmt(value, digits=3):
    return "-" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def report(cases: List[Case], rows: List[Row], tools: List[str], loads) -> str:
    from DeepRegistrationLib import __version__
    lines = [f"# Pose benchmark ({SPACING_MM:g} mm)", "",
             f"Written by `python benchmarks/benchmark_pose.py {' '.join(sys.argv[1:])}` "
             f"(DeepRegistration {__version__}, torch {torch.__version__}, {os.cpu_count()} "
             f"CPU cores, {platform.machine()}). Load average (1 min) at the start "
             f"{loads[0]:.1f}, at the end {loads[1]:.1f}: the machine was shared with training "
             "runs, so seconds are upper bounds of what an idle machine gives.", "",
             "Cases (fixed <- moving):", ""]
    for case in cases:
        lines.append(f"- `{case.name}`: {case.description}; labels "
                     f"{', '.join(str(k) for k in case.labels)}")
    seen = {}
    for tool in tools:
        name = tool.partition("@")[0]
        if tool != "ants":
            seen[name] = trained_on(name)
    lines += ["", "Networks' training anatomy (model cards): " + "; ".join(
        f"{name}: {', '.join(sources) or '?'}" for name, sources in seen.items()
        if sources is not None) + ". A case is *seen* when all its anatomy was in training.",
        "", "Checkpoints (sha256, created): " + "; ".join(
            checkpoint_note(name) for name, sources in seen.items() if sources is not None)
        + ".", ""]
    header = ("| case | method | global stage | Dice | HD95 (mm) | % folding | % folding strict | "
              "SDlogJ | seconds (global stage: wall / CPU) | load |")
    lines += ["## Per case", "", header, "|" + "---|" * 10]
    for case in cases:
        for row in [r for r in rows if r.case == case.name]:
            name = row.tool.split(" @")[0]
            sources = seen.get(name)
            tag = ""
            if sources is not None:
                tag = " (seen)" if all(a in sources for a in case.anatomy) else " (unseen)"
            timing = "-" if not np.isfinite(row.seconds) else (
                f"{row.seconds:.1f}" + (f" ({row.global_seconds:.1f} / {row.global_cpu_seconds:.1f})"
                                        if row.used in ("affine", "rigid", "moments") else ""))
            lines.append(f"| {case.name} | {row.tool}{tag} | {row.used or '-'} | "
                         f"{_fmt(row.dice)} | {_fmt(row.hd95, 1)} | {_fmt(row.folding, 4)} | "
                         f"{_fmt(row.folding_strict, 4)} | {_fmt(row.sdlogj)} | {timing} | "
                         f"{_fmt(row.load, 1)} |")
    lines += ["", "## Mean over the cases", "",
              "| method | Dice | HD95 (mm) | % folding | % folding strict | SDlogJ | seconds | "
              "global stage seconds |", "|" + "---|" * 8]
    for tool in ["identity"] + [r.tool for r in rows if r.case == cases[0].name
                                and r.tool != "identity"]:
        mine = [r for r in rows if r.tool == tool]
        if not mine:
            continue
        mean = {key: float(np.mean([getattr(r, key) for r in mine])) for key in
                ("dice", "hd95", "folding", "folding_strict", "sdlogj", "seconds",
                 "global_seconds")}
        lines.append(f"| {tool} | {_fmt(mean['dice'])} | {_fmt(mean['hd95'], 1)} | "
                     f"{_fmt(mean['folding'], 4)} | {_fmt(mean['folding_strict'], 4)} | "
                     f"{_fmt(mean['sdlogj'])} | {_fmt(mean['seconds'], 1)} | "
                     f"{_fmt(mean['global_seconds'], 1)} |")
    lines += ["", "## Targets (issue #14)", ""] + targets(cases, rows)
    return "\n".join(lines) + "\n"


def targets(cases: List[Case], rows: List[Row]) -> List[str]:
    """Each target of the issue, stated as met / not met from the rows above."""
    def mean(tool, key):
        values = [getattr(r, key) for r in rows if r.tool == tool]
        return float(np.mean(values)) if values else float("nan")
    out = []
    if any(r.tool == "io @affine" for r in rows) and any(r.tool == "ANTs SyN" for r in rows):
        a, s = mean("io @affine", "dice"), mean("ANTs SyN", "dice")
        out.append(f"- io @affine mean Dice {a:.3f} vs ANTs SyN {s:.3f}: "
                   f"{'met' if a >= s else 'NOT met'}")
    if any(r.tool == "io @affine" for r in rows) and any(r.tool == "io @none" for r in rows):
        a, n = mean("io @affine", "sdlogj"), mean("io @none", "sdlogj")
        out.append(f"- io @affine SDlogJ {a:.3f} below io @none {n:.3f}: "
                   f"{'met' if a < n else 'NOT met'}")
    stage = [r.global_seconds for r in rows if r.used in ("affine", "rigid")]
    cpu = [r.global_cpu_seconds for r in rows if r.used in ("affine", "rigid")]
    if stage:
        out.append(f"- global stage at {SPACING_MM:g} mm: wall median {np.median(stage):.1f} s, max "
                   f"{max(stage):.1f} s; processor time (both threads together) median "
                   f"{np.median(cpu):.1f} s, max {max(cpu):.1f} s. Target < 3 s on 2 cores: "
                   + ("met" if max(stage) < 3.0 else
                      "not met in wall time under the load above; the processor time is what "
                      "2 idle cores would spend (wall time on an idle machine is between half "
                      "of it and all of it)"))
    identity = {r.case: r.dice for r in rows if r.tool == "identity"}
    for tool in sorted({r.tool for r in rows if r.tool.endswith("@affine")
                        and not r.tool.startswith("io ")}):
        worse = [r.case for r in rows if r.tool == tool and r.dice <= identity[r.case]]
        out.append(f"- {tool} gains Dice over identity on every case: "
                   + ("met" if not worse else f"NOT met ({', '.join(worse)})"))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=None,
                        help="comma-separated NAME@INITIAL (default: io@none, io@affine and "
                             "every network with a checkpoint @affine)")
    parser.add_argument("--peers", default="ants", help="comma-separated peers (ants) or ''")
    parser.add_argument("--cases", default=None, help="comma-separated case names (default all)")
    parser.add_argument("--output", default=None, help="also write the markdown report here")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    methods = [m for m in (args.methods.split(",") if args.methods is not None
                           else default_methods()) if m]
    tools = methods + [p for p in args.peers.split(",") if p]
    loads = [os.getloadavg()[0]]
    cases = build_cases(args.cases.split(",") if args.cases else None)
    if not cases:
        raise SystemExit("no case could be built: install the data (training/install_data.sh)")
    rows: List[Row] = []
    for case in cases:
        rows.append(identity_row(case))
        print(f"{case.name}: identity Dice {rows[-1].dice:.3f}", file=sys.stderr, flush=True)
        for tool in tools:
            try:
                row = run_tool(case, tool)
            except Exception as error:  # a failing tool is a finding, not the end of the run
                row = Row(case.name, label(tool), float("nan"), float("nan"),
                          notes=[f"{type(error).__name__}: {error}"])
                print(f"  {tool}: FAILED {error}", file=sys.stderr, flush=True)
            else:
                print(f"  {row.tool}: Dice {row.dice:.3f}, HD95 {row.hd95:.1f}, folding "
                      f"{row.folding:.4f}% / strict {row.folding_strict:.4f}%, SDlogJ "
                      f"{row.sdlogj:.3f}, {row.seconds:.1f} s (global {row.global_seconds:.1f}"
                      f" s, {row.used}), load {row.load:.1f}", file=sys.stderr, flush=True)
            rows.append(row)
    loads.append(os.getloadavg()[0])
    text = report(cases, rows, tools, loads)
    failures = [f"- {r.case} {r.tool}: {'; '.join(r.notes)}" for r in rows if r.notes]
    if failures:
        text += "\n## Failures\n\n" + "\n".join(failures) + "\n"
    print(text)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
