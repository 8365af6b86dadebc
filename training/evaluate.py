"""Compare our methods with established tools on the same fixed cases, measured by the same code.

``python -m training evaluate --methods io,vm-diff --peers ants,demons,elastix --output DIR``

Cases (``--cases``) are synthetic deformations of the installed real volumes with a known
ground truth (``training.synth``, its own seed), written as NIfTI under ``DIR/cases/``:

- ``tiny``: one MNI152 pair at 8 mm (for tests);
- ``small``: four cases at 3 mm -- MNI152 (mild), the ITK T1 head with coronal direction
  cosines (strong), a multi-modal MNI152 pair (label-driven contrast), and the head CT whose
  moving image lives on another grid (rotated direction cosines, anisotropic spacing);
- ``full``: every installed source at 2 mm with deformations of 30%, 60% and 100% strength, plus
  the other-grid and multi-modal variants of each source;
- ``unseen``: the held-out real brain (itk-t1) under independent B-spline warps, and a second
  subject;
- ``tuning``: the same kind of cases as ``unseen`` on another head (pydeface) with their own
  seeds, for choosing settings (e.g. the ``--refine`` schedule); never reported as results.

Every method runs through ``DeepRegistrationLib.engine.register`` (a method without a checkpoint
is skipped with a note) and every peer through ``training.peers`` (ANTs SyN, SimpleITK
diffeomorphic demons, elastix B-spline); each run returns a displacement on the fixed grid in
voxels (peers: their exported ITK displacement field converted by
``outputs.physical_to_displacement``) and *all* metrics are then computed here from that field:
mean Dice and HD95 of the moving labels warped onto the fixed grid (nearest neighbour,
``outputs.warp_image``), % voxels with det J <= 0 and SDlogJ over the fixed grid
(``metrics.jacobian_determinant_map``, central differences: the ITK / Learn2Reg-comparable
figure) and % voxels folded by the strict measure (any of the 8 one-sided determinants <= 0,
``metrics.strict_jacobian_determinant_map``: folds that alternate every voxel cannot hide), the mean distance in mm to the ground-truth field over
the fixed labels, NCC, seconds and peak memory. A row ``identity`` gives the values before
registration and a row ``truth`` those of the ground-truth field: labels resampled with nearest
neighbour (twice for the other-grid case) lose thin structures, so its Dice is the ceiling any
method can reach on a case.

Peak memory: each run is a child process (``multiprocessing`` forkserver, so a child starts
with torch and SimpleITK already imported and costs ~0.1 s), which resets its resident-set
high-water mark just before registering (``/proc/self/clear_refs`` = 5) and reads ``VmHWM`` from
``/proc/self/status`` afterwards; ``peak_mib`` is that high-water mark minus the resident size at
the reset: the memory the registration itself needed, C++ (ITK, ANTs) and torch allocations
included, which ``tracemalloc`` would not see. ``--in-process`` runs everything in one process
instead and reports ``ru_maxrss`` growth (only increases of the process-wide peak, so later runs
can show 0).

Seconds are wall-clock time of the registration call alone (inputs already in memory); every
tool uses all cores.
"""
from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
import platform
import resource
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
import torch

from DeepRegistrationLib import __version__
from DeepRegistrationLib.errors import UserInputError
from DeepRegistrationLib.images import write_image
from DeepRegistrationLib.metrics import (dice, folding_percent, hd95, jacobian_determinant_map,
                                         ncc, sdlogj, strict_jacobian_determinant_map)
from DeepRegistrationLib.outputs import (displacement_field_image, displacement_to_physical,
                                         warp_image)

EVALUATION_SEED = 777
EVALUATION_STREAM = 2          # neither the training (0) nor the validation (1) stream
TUNING_INDEX_OFFSET = 100      # tuning cases draw seeds no reported case uses
METRICS = ("dice", "hd95", "gt_error_mm", "folding_percent", "folding_percent_strict", "sdlogj",
           "ncc", "seconds",
           "peak_mib")
CASE_SETS = ("tiny", "small", "full", "unseen", "tuning")


# ----------------------------------------------------------------------------------- the cases
@dataclass
class Case:
    name: str
    fixed: sitk.Image
    moving: sitk.Image
    fixed_labels: sitk.Image
    moving_labels: sitk.Image          # on the moving image's grid
    truth: Optional[torch.Tensor]      # (1, 3, D, H, W) voxels of the fixed grid; None: unknown
    multimodal: bool = False
    description: str = ""
    sources: Tuple[str, ...] = ()      # the anatomy in the case (seen / unseen per checkpoint)
    paths: Dict[str, str] = field(default_factory=dict)


@dataclass
class CaseSpec:
    name: str
    source: str
    strength: float
    multimodal: bool = False
    other_grid: bool = False
    # "velocity": the training generator's family (training.synth); "bspline": an independent
    # family (a random cubic B-spline, 28 mm control spacing, SimpleITK) whose ground truth is
    # inverted by ITK; "subject": a second real subject (``moving_source``), no ground truth
    deformation: str = "velocity"
    moving_source: Optional[str] = None


# the anatomy every shipped checkpoint is trained without (training.recipes: held out)
UNSEEN_SOURCE = "itk-t1"


def _case_label(source: str) -> str:
    """A case-name prefix for a source: its name, or a user image's file name without suffix."""
    from .data import SOURCES

    if source in SOURCES:
        return source
    name = os.path.basename(source)
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".gz"):
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return os.path.splitext(name)[0]


def case_specs(which: str, installed: Sequence[str],
               unseen_source: Optional[str] = None) -> List[CaseSpec]:
    """The case list for ``tiny`` / ``small`` / ``full`` / ``unseen`` / ``tuning`` given the
    installed sources; ``unseen_source`` (a source name or an image file) replaces the held-out
    ``itk-t1`` as the subject of the ``unseen`` cases (leave-one-source-out for a network trained
    without another source, or a user's own scan)."""
    from .data import SOURCES

    if unseen_source is not None and which != "unseen":
        raise UserInputError("--unseen-source chooses the subject of --cases unseen only")

    def pick(*preferred):
        for name in preferred:
            if name in installed:
                return name
        raise UserInputError("no evaluation data is installed; run training/install_data.sh "
                             "(or at least: python -m pip install nilearn)")
    if which == "tiny":
        return [CaseSpec("mni152-tiny", pick("mni152", "pydeface", "itk-t1"), 0.5)]
    if which == "small":
        return [CaseSpec("mni152-mild", pick("mni152", "pydeface"), 0.4),
                CaseSpec("t1-coronal-strong", pick("itk-t1", "pydeface", "mni152"), 1.0),
                CaseSpec("mni152-multimodal", pick("mni152", "pydeface"), 0.6, multimodal=True),
                CaseSpec("ct-other-grid", pick("invesalius-ct", "pydeface", "mni152"), 0.6,
                         other_grid=True)]
    if which == "unseen":
        # one real brain that no shipped network trains on (training.recipes: itk-t1 is held
        # out), deformed by a family the training generator does not draw from, at 2 mm. No
        # fallback to another source: a case set on seen anatomy would be reported as unseen.
        source = unseen_source or UNSEEN_SOURCE
        if source not in installed and not os.path.isfile(source):
            if source in SOURCES:
                raise UserInputError(f"the unseen cases need the '{source}' source, which is not "
                                     "installed: run training/install_data.sh, or choose "
                                     "another subject with --unseen-source NAME|IMAGE")
            raise UserInputError(f"--unseen-source '{source}' is neither a data source "
                                 f"({', '.join(SOURCES)}) nor an image file")
        label = _case_label(source)
        specs = [CaseSpec(f"{label}-bspline-{int(s * 10)}mm", source, s, deformation="bspline")
                 for s in (3.5, 5.5, 7.5)]
        specs.append(CaseSpec(f"{label}-bspline-other-grid", source, 5.5,
                              deformation="bspline", other_grid=True))
        specs.append(CaseSpec(f"{label}-bspline-multimodal", source, 5.5, multimodal=True,
                              deformation="bspline"))
        if source == "itk-t1" and "mni152" in installed:
            specs.append(CaseSpec("itk-t1-vs-mni152", "itk-t1", 0.0, deformation="subject",
                                  moving_source="mni152"))
        return specs
    if which == "tuning":
        # what `unseen` measures, on another head and other seeds: settings are chosen here
        source = pick("pydeface", "mni152")
        specs = [CaseSpec(f"{source}-bspline-{int(s * 10)}mm", source, s, deformation="bspline")
                 for s in (3.5, 5.5, 7.5)]
        specs.append(CaseSpec(f"{source}-bspline-other-grid", source, 5.5,
                              deformation="bspline", other_grid=True))
        return specs
    if which == "full":
        specs = []
        for source in installed:
            for strength in (0.3, 0.6, 1.0):
                specs.append(CaseSpec(f"{source}-{int(strength * 100)}", source, strength))
            specs.append(CaseSpec(f"{source}-other-grid", source, 0.6, other_grid=True))
            specs.append(CaseSpec(f"{source}-multimodal", source, 0.6, multimodal=True))
        return specs
    raise UserInputError(f"--cases must be one of {', '.join(CASE_SETS)}, not '{which}'")


def case_spacing(which: str) -> float:
    return {"tiny": 8.0, "small": 3.0, "full": 2.0, "unseen": 2.0, "tuning": 2.0}[which]


def other_grid(image: sitk.Image, spacing_factor=(1.1, 0.9, 1.25), angle: float = 0.35,
               axis=(0.2, 0.9, 0.3)) -> sitk.Image:
    """A grid covering the same physical region with rotated direction cosines and a different,
    anisotropic spacing (centred on the same point)."""
    rotation = np.array(sitk.VersorTransform(tuple(axis), angle).GetMatrix()).reshape(3, 3)
    direction = rotation @ np.array(image.GetDirection()).reshape(3, 3)
    spacing = np.array(image.GetSpacing()) * np.array(spacing_factor)
    extent = (np.array(image.GetSize()) - 1) * np.array(image.GetSpacing())
    size = [int(math.ceil(e / s)) + 1 for e, s in zip(extent, spacing)]
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint(
        [(n - 1) / 2.0 for n in image.GetSize()]))
    origin = centre - direction @ ((np.array(size) - 1) * spacing / 2.0)
    reference = sitk.Image([int(n) for n in size], image.GetPixelID())
    reference.SetSpacing(tuple(float(s) for s in spacing))
    reference.SetDirection(tuple(direction.ravel()))
    reference.SetOrigin(tuple(origin))
    return reference


def case_variant(spec: CaseSpec, moving: sitk.Image, moving_labels: sitk.Image,
                 description: str) -> Tuple[sitk.Image, sitk.Image, str]:
    """The moving image (and labels) on another grid when the case asks for it, and the
    description of the case's variants."""
    if spec.other_grid:
        reference = other_grid(moving)
        moving = sitk.Resample(moving, reference, sitk.Transform(), sitk.sitkLinear, 0.0)
        moving_labels = sitk.Resample(moving_labels, reference, sitk.Transform(),
                                      sitk.sitkNearestNeighbor, 0)
        description += "; moving on a rotated, anisotropic grid"
    if spec.multimodal:
        description += "; moving in a label-driven second contrast"
    return moving, moving_labels, description


def bspline_displacement(reference: sitk.Image, spread_mm: float, seed: int,
                         control_mm: float = 28.0) -> sitk.Image:
    """A random cubic B-spline deformation on ``reference``'s grid as an ITK displacement field
    (float64, LPS mm): control points every ``control_mm``, coefficients normal with standard
    deviation ``spread_mm``. SimpleITK builds it, so the case does not depend on our code."""
    extent = [(n - 1) * s for n, s in zip(reference.GetSize(), reference.GetSpacing())]
    mesh = [max(int(round(e / control_mm)), 1) for e in extent]
    transform = sitk.BSplineTransformInitializer(reference, mesh, order=3)
    rng = np.random.default_rng(seed)
    transform.SetParameters(tuple(rng.normal(0.0, spread_mm,
                                             len(transform.GetParameters())).tolist()))
    field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64,
                                              reference.GetSize(), reference.GetOrigin(),
                                              reference.GetSpacing(), reference.GetDirection())
    return field


def build_bspline_case(spec: CaseSpec, spacing_mm: float, index: int) -> Case:
    """A real volume (fixed) and its copy through a random B-spline (moving), with gamma, bias
    and noise drawn separately for each image; truth = ITK's inverse of the B-spline field.

    ``moving(x) = fixed(x + D(x))`` (``sitk.Resample`` through the field ``D``), so the field a
    method should return, ``warped(x) = moving(x + u(x)) = fixed(x)``, is ``u = D^-1``
    (``sitk.InvertDisplacementField``; its residual ``|u + D o (id + u)|`` is reported)."""
    from DeepRegistrationLib.images import image_from_array, normalise_intensity
    from DeepRegistrationLib.outputs import physical_to_displacement

    from .data import load_source
    from .synth import SynthConfig, augment_intensity, generator_for, label_contrast

    volume = load_source(spec.source, spacing_mm)
    fixed_array = normalise_intensity(sitk.GetArrayFromImage(volume.image).astype(np.float32))
    fixed = image_from_array(fixed_array, volume.image)
    field = bspline_displacement(fixed, spec.strength, EVALUATION_SEED + index)
    inverse = sitk.InvertDisplacementField(field, maximumNumberOfIterations=40,
                                           maxErrorToleranceThreshold=0.01,
                                           meanErrorToleranceThreshold=0.001,
                                           enforceBoundaryCondition=False)
    forward = sitk.DisplacementFieldTransform(sitk.Image(field))
    source = fixed
    config = SynthConfig(spacing_mm=spacing_mm, noise_max=0.02)
    if spec.multimodal:
        contrast = label_contrast(torch.from_numpy(fixed_array)[None, None],
                                  torch.from_numpy(sitk.GetArrayFromImage(volume.labels)
                                                   .astype(np.int64))[None, None],
                                  generator_for(EVALUATION_SEED, EVALUATION_STREAM, index, 1),
                                  config)
        source = image_from_array(contrast[0, 0].numpy(), fixed)
    moving = sitk.Resample(source, fixed, forward, sitk.sitkLinear, 0.0)
    moving_labels = sitk.Resample(volume.labels, fixed, forward, sitk.sitkNearestNeighbor, 0)
    images = []
    for part, image in ((2, fixed), (3, moving)):
        tensor = torch.from_numpy(sitk.GetArrayFromImage(image).astype(np.float32))[None, None]
        noisy = augment_intensity(tensor, generator_for(EVALUATION_SEED, EVALUATION_STREAM,
                                                        index, part), config)
        images.append(image_from_array(noisy[0, 0].numpy(), fixed))
    fixed, moving = images
    truth_vectors = sitk.GetArrayFromImage(inverse)
    # how exactly ITK's inverse undoes the forward field: mean |u(x) + D(x + u(x))| in mm
    back = sitk.DisplacementFieldTransform(sitk.Image(inverse))
    points = [fixed.TransformIndexToPhysicalPoint((int(i), int(j), int(k)))
              for i, j, k in zip(*[np.random.default_rng(index).integers(0, n, 200)
                                   for n in fixed.GetSize()])]
    error = np.mean([np.linalg.norm(np.subtract(forward.TransformPoint(back.TransformPoint(p)),
                                                p)) for p in points])
    truth = physical_to_displacement(truth_vectors, fixed)
    largest = float(np.linalg.norm(truth_vectors, axis=-1).max())
    description = (f"{spec.source} at {spacing_mm:g} mm, random cubic B-spline (28 mm control "
                   f"spacing, coefficients sd {spec.strength:g} mm; largest true displacement "
                   f"{largest:.1f} mm; ITK inverse residual {error:.3f} mm)")
    moving, moving_labels, description = case_variant(spec, moving, moving_labels, description)
    return Case(spec.name, fixed, moving, sitk.Cast(volume.labels, sitk.sitkInt32),
                sitk.Cast(moving_labels, sitk.sitkInt32), truth, spec.multimodal, description,
                sources=(spec.source,))


def build_subject_case(spec: CaseSpec, spacing_mm: float) -> Case:
    """Two different real subjects with the same label numbering (GM 1, WM 2, CSF 3), each as it
    is stored (its own grid, orientation and position): no ground-truth field exists."""
    from DeepRegistrationLib.images import image_from_array, normalise_intensity

    from .data import load_source

    def prepared(name):
        volume = load_source(name, spacing_mm)
        array = normalise_intensity(sitk.GetArrayFromImage(volume.image).astype(np.float32))
        return image_from_array(array, volume.image), sitk.Cast(volume.labels, sitk.sitkInt32)

    fixed, fixed_labels = prepared(spec.source)
    moving, moving_labels = prepared(spec.moving_source)
    description = (f"two real subjects at {spacing_mm:g} mm: {spec.source} (fixed) and "
                   f"{spec.moving_source} (moving), each on its own grid and in its own "
                   "position; no ground truth (label metrics only)")
    return Case(spec.name, fixed, moving, fixed_labels, moving_labels, None, False,
                description, sources=(spec.source, spec.moving_source))


def build_case(spec: CaseSpec, spacing_mm: float, index: int) -> Case:
    from .data import load_source
    from .synth import PairGenerator, SynthConfig

    if spec.deformation == "bspline":
        return build_bspline_case(spec, spacing_mm, index)
    if spec.deformation == "subject":
        return build_subject_case(spec, spacing_mm)

    config = SynthConfig(spacing_mm=spacing_mm, noise_max=0.02, contrast_probability=0.0)
    generator = PairGenerator([load_source(spec.source)], config, seed=EVALUATION_SEED,
                              canvas=False)
    pair = generator.pair(index, EVALUATION_STREAM, contrast=spec.multimodal,
                          config=config.scaled(spec.strength))
    prepared = generator.volumes[0]
    fixed = prepared.canvas_image(pair.fixed[0, 0].numpy())
    moving = prepared.canvas_image(pair.moving[0, 0].numpy())
    fixed_labels = prepared.canvas_image(pair.fixed_labels[0, 0].numpy().astype(np.int32))
    moving_labels = prepared.canvas_image(pair.moving_labels[0, 0].numpy().astype(np.int32))
    description = (f"{spec.source} at {spacing_mm:g} mm, deformation strength "
                   f"{spec.strength:.0%} (largest ground-truth component "
                   f"{pair.info['max_gt_displacement_mm']:.1f} mm)")
    moving, moving_labels, description = case_variant(spec, moving, moving_labels, description)
    return Case(spec.name, fixed, moving, fixed_labels, moving_labels, pair.displacement,
                spec.multimodal, description, sources=(spec.source,))


def build_cases(which: str, folder: str, unseen_source: Optional[str] = None) -> List[Case]:
    """Build (and write under ``folder/cases``) the evaluation cases."""
    from .data import available_sources

    spacing = case_spacing(which)
    offset = TUNING_INDEX_OFFSET if which == "tuning" else 0
    cases = []
    for index, spec in enumerate(case_specs(which, available_sources(), unseen_source)):
        case = build_case(spec, spacing, offset + index)
        target = os.path.join(folder, "cases", case.name)
        os.makedirs(target, exist_ok=True)
        images = {"fixed": case.fixed, "moving": case.moving, "fixed_labels": case.fixed_labels,
                  "moving_labels": case.moving_labels}
        if case.truth is not None:
            images["truth"] = displacement_field_image(case.truth, case.fixed)
        for key, image in images.items():
            case.paths[key] = os.path.join(target, f"{key}.nii.gz")
            write_image(image, case.paths[key])
        cases.append(case)
    return cases


# ---------------------------------------------------------------------------------- one run
def _status() -> Dict[str, int]:
    values = {}
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(("VmHWM", "VmRSS")):
                    key, value = line.split(":")
                    values[key] = int(value.split()[0])  # kB
    except OSError:
        pass
    return values


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def run_one(job: Dict) -> Dict:
    """Register one case with one method or peer; returns the field and the costs."""
    import dataclasses

    from DeepRegistrationLib.methods import METHODS
    fixed = sitk.ReadImage(job["fixed"], sitk.sitkFloat32)
    moving = sitk.ReadImage(job["moving"], sitk.sitkFloat32)
    registered = METHODS.get(job["name"])
    if job.get("checkpoint"):  # checked by plan_runs; the registry reads that file meanwhile,
        # swapped in before the clock and the peak memory start, as the shipped one is found
        METHODS[job["name"]] = dataclasses.replace(registered, checkpoint=job["checkpoint"])
    rusage_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reset = _reset_peak()
    before = _status()
    started = time.perf_counter()
    try:
        if job["kind"] == "method":
            from DeepRegistrationLib.engine import register
            result = register(fixed, moving, method=job["name"], refine=job.get("refine", 0),
                              similarity=job.get("similarity"), options=job.get("options"))
            displacement = result.displacement
        else:
            from .peers import run_peer
            displacement, _ = run_peer(job["name"], fixed, moving)
    finally:
        if job.get("checkpoint"):
            METHODS[job["name"]] = registered
    seconds = time.perf_counter() - started
    after = _status()
    if reset and "VmHWM" in after and "VmRSS" in before:
        peak = (after["VmHWM"] - before["VmRSS"]) / 1024.0
        how = "VmHWM after clear_refs"
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rusage_before) / 1024.0
        how = "ru_maxrss growth"
    return {"displacement": displacement.detach().cpu().float().numpy(), "seconds": seconds,
            "peak_mib": max(peak, 0.0), "memory_measure": how}


def _child(job: Dict, connection) -> None:
    try:
        connection.send(("ok", run_one(job)))
    except BaseException as error:  # report anything, the parent decides
        message = f"{type(error).__name__}: {error}".strip().splitlines()[0]
        connection.send(("error", {"message": message, "traceback": traceback.format_exc()}))
    finally:
        connection.close()


_CONTEXT = None


def _context():
    global _CONTEXT
    if _CONTEXT is None:
        if "forkserver" in multiprocessing.get_all_start_methods():
            _CONTEXT = multiprocessing.get_context("forkserver")
            _CONTEXT.set_forkserver_preload(["torch", "SimpleITK", "DeepRegistrationLib.engine",
                                             "training.evaluate", "training.peers"])
        else:
            _CONTEXT = multiprocessing.get_context("spawn")
    return _CONTEXT


def run_in_child(job: Dict, timeout: float = 3600.0) -> Dict:
    context = _context()
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(job, sender), daemon=True)
    process.start()
    sender.close()
    try:
        if not receiver.poll(timeout):
            raise TimeoutError(f"{job['name']} did not finish in {timeout:.0f} s")
        status, payload = receiver.recv()
    except EOFError:
        status, payload = "error", {"message": f"the process died (exit code "
                                               f"{process.exitcode})", "traceback": ""}
    finally:
        process.join(timeout=10)
        if process.is_alive():
            process.terminate()
    if status != "ok":
        raise RuntimeError(payload["message"] + ("\n" + payload["traceback"]
                                                 if payload.get("traceback") else ""))
    return payload


# ------------------------------------------------------------------------------------ metrics
def field_metrics(case: Case, displacement: torch.Tensor) -> Dict[str, float]:
    """Every metric of one field, by the library's code (the same for every tool)."""
    displacement = displacement.float()
    fixed_labels = sitk.GetArrayFromImage(case.fixed_labels)
    warped_labels = sitk.GetArrayFromImage(warp_image(case.moving_labels, displacement,
                                                      case.fixed, nearest=True))
    labels = sorted(int(v) for v in np.unique(fixed_labels) if v != 0)
    overlap = dice(fixed_labels, warped_labels, labels)
    distances = hd95(fixed_labels, warped_labels, case.fixed.GetSpacing()[::-1], labels)
    finite = [d for d in distances.values() if np.isfinite(d)]
    determinant = jacobian_determinant_map(displacement)
    if case.truth is not None:
        ours = displacement_to_physical(displacement, case.fixed)
        truth = displacement_to_physical(case.truth, case.fixed)
        error = np.linalg.norm(ours - truth, axis=-1)[fixed_labels > 0]
    else:
        error = np.array([float("nan")])
    warped = sitk.GetArrayFromImage(warp_image(case.moving, displacement, case.fixed))
    return {"dice": float(np.mean(list(overlap.values()))) if overlap else float("nan"),
            "hd95": float(np.mean(finite)) if finite else float("nan"),
            "gt_error_mm": float(error.mean()),
            "folding_percent": folding_percent(determinant),
            "folding_percent_strict": folding_percent(
                strict_jacobian_determinant_map(displacement)),
            "sdlogj": sdlogj(determinant),
            "ncc": ncc(sitk.GetArrayFromImage(case.fixed), warped),
            "dice_per_label": {str(k): round(v, 4) for k, v in overlap.items()}}


# --------------------------------------------------------------------------------- the driver
@dataclass
class EvaluateOptions:
    methods: Sequence[str]
    peers: Sequence[str]
    output: str
    cases: str = "small"
    options: Dict = field(default_factory=dict)  # {method: engine options}
    # engine.refine_schedule (a total or AxB) after every network, or several comma-separated
    # ("0,10x2,60"): each network then runs once per setting, labelled "vtn +refine 10x2"
    refine: Union[int, str] = 0
    unseen_source: Optional[str] = None  # the subject of the unseen cases (default itk-t1)
    subprocess: bool = True
    verbose: bool = True


def _peer_available(name: str) -> Optional[str]:
    """None when the peer can run, else the note saying why not."""
    import importlib.util
    if name == "ants" and importlib.util.find_spec("ants") is None:
        return "ANTs not installed (python -m pip install antspyx)"
    if name == "elastix":
        if importlib.util.find_spec("itk") is None:
            return "elastix not installed (python -m pip install itk-elastix)"
    return None


def refine_settings(refine: Union[int, str]) -> List[str]:
    """The ``--refine`` settings of one evaluation, each checked by ``engine.refine_schedule``
    (``"0,10x2,60"`` -> ``["0", "10x2", "60"]``), in the order given, without repeats."""
    from DeepRegistrationLib.engine import refine_schedule

    settings = [part.strip() for part in str(refine).split(",") if part.strip()] or ["0"]
    for setting in settings:
        refine_schedule(setting)  # a malformed schedule is the user's mistake: a clear error
    return list(dict.fromkeys(settings))


def _with_checkpoint(spec, checkpoint: str):
    """``spec`` reading its network from ``checkpoint`` (a file the user names, e.g. a run's
    ``vtn.4mm.pt``), refused clearly when the file is missing or holds another method."""
    import dataclasses

    from DeepRegistrationLib.methods.base import read_checkpoint
    path = os.path.abspath(checkpoint)
    if not spec.needs_checkpoint:
        raise UserInputError(f"method '{spec.name}' has no network: it takes no checkpoint")
    if not os.path.isfile(path):
        raise UserInputError(f"checkpoint '{checkpoint}' not found")
    held = read_checkpoint(path).get("method")
    if held != spec.name:
        raise UserInputError(f"checkpoint '{checkpoint}' holds a '{held}' network, not "
                             f"'{spec.name}'")
    # find_checkpoint joins a folder with this name: an absolute path stays itself
    return dataclasses.replace(spec, checkpoint=path)


def plan_runs(options: EvaluateOptions) -> Tuple[List[Dict], List[str]]:
    """The (kind, name) runs and the notes about what is skipped."""
    from DeepRegistrationLib.methods import get_method
    from .peers import PEERS

    runs, notes = [], []
    settings = refine_settings(options.refine)
    for entry in options.methods:
        label, _, checkpoint = entry.partition("=")  # "vtn=runs/x/vtn.pt": another checkpoint
        name, _, variant = label.partition("@")  # "vtn@AD": a method's variant (ablations)
        spec = get_method(name)  # an unknown name is the user's mistake: fail clearly
        if variant and variant not in spec.variants:
            raise UserInputError(f"method '{name}' has no variant '{variant}'")
        if checkpoint:
            spec = _with_checkpoint(spec, checkpoint)
            label = f"{label} [{os.path.basename(checkpoint)}]"
        if not spec.available:
            notes.append(f"{label}: skipped, no checkpoint ({spec.checkpoint}); train it with "
                         f"'python -m training train --method {name}'")
            continue
        for refine in (settings if spec.needs_checkpoint else ["0"]):
            runs.append({"kind": "method", "name": name, "spec": spec,
                         "label": label if refine == "0" else f"{label} +refine {refine}",
                         "variant": variant or None, "refine": refine,
                         "checkpoint": spec.checkpoint if checkpoint else None})
    for name in options.peers:
        if name not in PEERS:
            raise UserInputError(f"unknown peer '{name}'; choose from {', '.join(PEERS)}")
        why = _peer_available(name)
        if why:
            notes.append(f"{name}: skipped, {why}")
            continue
        runs.append({"kind": "peer", "name": name, "label": name})
    return runs, notes


def evaluate(options: EvaluateOptions) -> str:
    """Run every method and peer on every case; write results.md/.csv/.png; return the table.

    The request is checked before anything is written: an unknown method, variant or peer, an
    unknown case set or a refused ``--unseen-source`` leaves no output folder behind."""
    from .data import available_sources

    runs, notes = plan_runs(options)
    case_specs(options.cases, available_sources(), options.unseen_source)
    os.makedirs(options.output, exist_ok=True)
    log_path = os.path.join(options.output, "evaluate.log")

    def log(message: str) -> None:
        with open(log_path, "a") as handle:
            handle.write(message + "\n")
        if options.verbose:
            print(message, file=sys.stderr, flush=True)

    for note in notes:
        log(note)
    cases = build_cases(options.cases, options.output, options.unseen_source)
    rows = []
    for case in cases:
        log(f"case {case.name}: {case.description}")
        zero = torch.zeros((1, 3, *sitk.GetArrayViewFromImage(case.fixed).shape))
        identity = dict(field_metrics(case, zero), seconds=0.0, peak_mib=0.0)
        rows.append(_row(case, "identity", "baseline", identity, "ok", "before registration"))
        if case.truth is not None:
            truth = dict(field_metrics(case, case.truth), seconds=0.0, peak_mib=0.0)
            rows.append(_row(case, "truth", "baseline", truth, "ok",
                             "the ground-truth field: the ceiling of label metrics"))
        for run in runs:
            job = {"kind": run["kind"], "name": run["name"], "fixed": case.paths["fixed"],
                   "moving": case.paths["moving"]}
            if run["kind"] == "method":
                spec = run["spec"]
                job["options"] = dict(options.options.get(run["label"],
                                                          options.options.get(run["name"], {})))
                if run["variant"]:
                    job["options"]["variant"] = run["variant"]
                job["refine"] = run["refine"]
                job["checkpoint"] = run["checkpoint"]
                if case.multimodal and "mind" in spec.similarities:
                    job["similarity"] = "mind"
            try:
                result = run_in_child(job) if options.subprocess else run_one(job)
            except Exception as error:  # one failing tool must not lose the others' results
                message = str(error).strip().splitlines()[0]
                log(f"  {run['label']}: FAILED {message}")
                rows.append(_row(case, run["label"], run["kind"], {}, "failed", message))
                continue
            values = field_metrics(case, torch.from_numpy(result["displacement"]))
            values.update(seconds=result["seconds"], peak_mib=result["peak_mib"])
            note = f"similarity {job.get('similarity', 'default')}" \
                if run["kind"] == "method" else ""
            rows.append(_row(case, run["label"], run["kind"], values, "ok", note,
                             anatomy_seen(run, case)))
            log(f"  {run['label']}: " + " ".join(
                f"{k} {values[k]:.3f}" for k in METRICS if k in values))
    table = write_results(options, cases, rows, notes)
    return table


def trained_sources(spec) -> Optional[List[str]]:
    """The sources a method's checkpoint was trained on (its model card), or None when it has no
    training data (instance optimisation, peers)."""
    if not spec.needs_checkpoint:
        return None
    from DeepRegistrationLib.methods.base import read_model_card
    path = spec.checkpoint_path()
    card = read_model_card(path) if path else None
    if not card:
        return None
    return [s.get("name") for s in card.get("data", {}).get("sources", [])]


def anatomy_seen(run: Dict, case: Case) -> str:
    """``seen`` (every source of the case was in the checkpoint's training data), ``unseen``
    (none was), ``mixed``, or ``-`` for tools that are not trained (io, peers)."""
    trained = trained_sources(run["spec"]) if run["kind"] == "method" else None
    if trained is None or not case.sources:
        return "-"
    seen = [source in trained for source in case.sources]
    return "seen" if all(seen) else "unseen" if not any(seen) else "mixed"


def _row(case: Case, name: str, kind: str, values: Dict, status: str, note: str,
         anatomy: str = "-") -> Dict:
    row = {"case": case.name, "method": name, "kind": kind, "multimodal": case.multimodal,
           "anatomy": anatomy, "status": status, "note": note}
    for key in METRICS:
        row[key] = values.get(key, float("nan"))
    row["dice_per_label"] = json.dumps(values.get("dice_per_label", {}))
    return row


# ------------------------------------------------------------------------------------ reports
def _mean(values) -> float:
    values = [v for v in values if isinstance(v, float) and np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def summary_table(rows: List[Dict]) -> str:
    """Markdown: one line per method, mean over its successful cases."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    header = ("| method | cases | Dice | HD95 mm | GT error mm | folding % | strict folding % | "
              "SDlogJ | NCC | seconds | peak MiB |")
    lines = [header, "|" + "---|" * 11]
    for method in methods:
        ok = [r for r in rows if r["method"] == method and r["status"] == "ok"]
        failed = sum(1 for r in rows if r["method"] == method and r["status"] != "ok")
        count = f"{len(ok)}" + (f" (+{failed} failed)" if failed else "")
        cells = [f"{_mean([r[k] for r in ok]):.3f}" for k in ("dice", "hd95", "gt_error_mm")]
        cells += [f"{_mean([r['folding_percent'] for r in ok]):.4f}",
                  f"{_mean([r['folding_percent_strict'] for r in ok]):.4f}",
                  f"{_mean([r['sdlogj'] for r in ok]):.3f}", f"{_mean([r['ncc'] for r in ok]):.3f}",
                  f"{_mean([r['seconds'] for r in ok]):.1f}",
                  f"{_mean([r['peak_mib'] for r in ok]):.0f}"]
        lines.append(f"| {method} | {count} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def case_table(rows: List[Dict]) -> str:
    lines = ["| case | method | anatomy | Dice | HD95 mm | GT error mm | folding % | "
             "strict folding % | SDlogJ | seconds | peak MiB | note |", "|" + "---|" * 12]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['case']} | {r['method']} | {r.get('anatomy', '-')} | failed "
                         f"| | | | | | | | {r['note']} |")
            continue
        lines.append(f"| {r['case']} | {r['method']} | {r.get('anatomy', '-')} | "
                     f"{r['dice']:.3f} | {r['hd95']:.2f} | "
                     f"{r['gt_error_mm']:.2f} | {r['folding_percent']:.4f} | "
                     f"{r['folding_percent_strict']:.4f} | {r['sdlogj']:.3f} | "
                     f"{r['seconds']:.1f} | {r['peak_mib']:.0f} | {r['note']} |")
    return "\n".join(lines)


def write_results(options: EvaluateOptions, cases: List[Case], rows: List[Dict],
                  notes: List[str]) -> str:
    folder = options.output
    columns = ["case", "method", "kind", "multimodal", "anatomy", "status"] + list(METRICS) + \
        ["dice_per_label", "note"]
    with open(os.path.join(folder, "results.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k])
                             for k in columns})
    summary = summary_table(rows)
    memory = "VmHWM after clear_refs, one child process per run" if options.subprocess \
        else "ru_maxrss growth in one process"
    text = [f"# Evaluation ({options.cases} cases)", "",
            f"DeepRegistration {__version__}, torch {torch.__version__}, "
            f"SimpleITK {sitk.Version.VersionString()}, Python {platform.python_version()}, "
            f"{os.cpu_count()} CPU cores; peak memory: {memory}. Every metric is computed by "
            "the same code from each tool's displacement field on the fixed grid.", ""]
    settings = refine_settings(options.refine)
    if settings != ["0"]:
        from DeepRegistrationLib.engine import refine_schedule
        described = []
        for setting in settings:
            if setting == "0":
                described.append("none")
                continue
            half, full = refine_schedule(setting)
            described.append(f"`--refine {setting}` ({half} instance-optimisation steps on the "
                             f"half grid, {full} on the full grid)")
        text += ["Every trained network runs once per refinement setting: "
                 + ", ".join(described) + "; each row's label names its setting.", ""]
    text += ["## Summary (mean over cases)", "", summary, ""]
    anatomies = {r.get("anatomy") for r in rows} - {"-"}
    if anatomies:
        text += ["Anatomy, per trained network and case: *seen* = every source of the case is "
                 "in the checkpoint's training data (its model card), *unseen* = none is, "
                 "*mixed* = some are. io and the peers are not trained (-).", ""]
        for anatomy in ("unseen", "seen", "mixed"):
            subset = [r for r in rows if r.get("anatomy") in (anatomy, "-")]
            if any(r.get("anatomy") == anatomy for r in subset):
                text += [f"### Cases that are {anatomy} for the networks", "",
                         summary_table([r for r in subset if r["case"] in {
                             x["case"] for x in rows if x.get("anatomy") == anatomy}]), ""]
    text += ["## Cases", ""]
    text += [f"- **{c.name}**: {c.description}" for c in cases]
    text += ["", "## Per case", "", case_table(rows)]
    if notes:
        text += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    with open(os.path.join(folder, "results.md"), "w") as handle:
        handle.write("\n".join(text) + "\n")
    plot_results(rows, os.path.join(folder, "results.png"))
    return summary


def plot_results(rows: List[Dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    panels = [("dice", "mean Dice"), ("hd95", "HD95 (mm)"), ("gt_error_mm",
                                                              "error vs ground truth (mm)"),
              ("folding_percent", "folding (% voxels)"), ("seconds", "seconds"),
              ("peak_mib", "peak memory (MiB)")]
    figure, axes = plt.subplots(2, 3, figsize=(13, 7))
    for axis, (key, title) in zip(axes.ravel(), panels):
        data = [[r[key] for r in rows if r["method"] == m and r["status"] == "ok"
                 and np.isfinite(r[key])] or [float("nan")] for m in methods]
        axis.boxplot(data, showmeans=True)
        axis.set_xticks(range(1, len(methods) + 1))
        axis.set_xticklabels(methods, rotation=30, fontsize=8)
        axis.set_title(title, fontsize=10)
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle(f"DeepRegistration evaluation: {len(set(r['case'] for r in rows))} cases")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
