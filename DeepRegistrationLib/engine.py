"""``register(fixed, moving, method)``: the one entry point every caller uses.

Data flow: the global stage (``alignment.global_alignment``: none, moments, rigid or affine; by
default ``auto``) finds ``T`` (LPS, fixed point -> moving point); the moving image is resampled
into the fixed image's frame through ``T``, both are intensity-normalised, the method returns the
deformable displacement ``d`` on the fixed grid (a network sees the pair in the canonical
orientation and framing, ``canonical.py``), optional instance optimisation refines it, and the
result's displacement is the composition ``x -> T(x + d(x))``. The result keeps the original
images so outputs resample the *original* moving image once, through that total field.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import SimpleITK as sitk
import torch

from .alignment import INITIAL_MODES, GlobalAlignment, compose_affine, global_alignment
from .errors import UserInputError
from .images import check_overlap, image_to_tensor, resample_to_reference
from .methods import RegistrationInputs, get_method
from .methods.instance_optimisation import instance_optimisation
from .progress import CancelCallback, ProgressCallback, ProgressScope

# Refinement starts from a good field, so it works on two levels (half and full grid). A step on
# the full grid costs about eight on the half grid, yet the full grid's steps are what reach io's
# accuracy: on the `tuning` cases (never reported) only 40x20 of 40x20, 40x4, 30x3, 30x2, 20x2,
# 20x1, 10x1 matched io's ground-truth error after vtn or vm-diff (1.62 vs 1.67 mm; the cheaper
# ones 1.78-1.94), so --refine N keeps a third of its steps there
# (benchmarks/refine_schedule.py, docs/benchmarks/refine-schedule/schedules.md).
REFINE_FULL_SHARE = 1.0 / 3.0


@dataclass
class RegistrationResult:
    fixed: sitk.Image
    moving: sitk.Image
    displacement: torch.Tensor  # (1, 3, D, H, W), voxels of the fixed grid, (k, j, i) channels
    method: str
    similarity: str
    refine: int                  # instance-optimisation steps after the method, in all
    device: str
    runtime_seconds: float
    notes: List[str] = field(default_factory=list)
    cautions: List[str] = field(default_factory=list)  # doubts about the result, shown first
    timings: Dict[str, float] = field(default_factory=dict)
    moving_on_fixed: Optional[sitk.Image] = None  # moving through the identity, for "before"
    # the global stage (matrix: LPS fixed point -> moving point) and the deformable part alone;
    # ``displacement`` is their composition x -> T(x + deformable(x)), the one total field
    alignment: Optional[GlobalAlignment] = None
    deformable: Optional[torch.Tensor] = None  # (1, 3, D, H, W), voxels of the fixed grid
    refine_schedule: Tuple[int, int] = (0, 0)  # refinement steps on the half and the full grid

    def deformable_part(self) -> torch.Tensor:
        """The deformable field alone (the total field when there was no global stage)."""
        return self.displacement if self.deformable is None else self.deformable

    def moving_in_fixed_frame(self) -> sitk.Image:
        """The moving image on the fixed grid before registration (computed once)."""
        if self.moving_on_fixed is None:
            self.moving_on_fixed = resample_to_reference(self.moving, self.fixed)
        return self.moving_on_fixed


def resolve_device(device: Optional[str]) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``; refuse CUDA clearly when it is not there."""
    name = (device or "cpu").lower()
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserInputError("--device cuda was asked for, but this PyTorch has no CUDA device "
                                 f"(torch {torch.__version__}); use --device cpu")
        return torch.device(name)
    if name != "cpu":
        raise UserInputError(f"unknown device '{device}'; use cpu or cuda")
    return torch.device("cpu")


def refine_schedule(refine: Union[int, str, Sequence[int]]) -> Tuple[int, int]:
    """Refinement steps on the half grid and on the full grid, from ``--refine``: a total ``N``
    (split by ``REFINE_FULL_SHARE``, at least one step on each level) or an explicit ``AxB``
    (``"28x2"``, or a pair), as ANTs writes its iteration schedules. ``(0, 0)`` is no refinement.
    Raises :class:`UserInputError` for anything else."""
    parts = None
    try:
        if isinstance(refine, (list, tuple)):
            parts = [int(v) for v in refine]
        elif "x" in str(refine).lower():
            parts = [int(v) for v in str(refine).lower().split("x")]
        else:
            total = int(str(refine).strip())
            if total >= 0:
                full = max(int(round(total * REFINE_FULL_SHARE)), 1) if total > 1 else 0
                return total - full, full
    except (TypeError, ValueError):
        parts = None
    if not parts or len(parts) != 2 or min(parts) < 0:
        raise UserInputError(f"--refine must be a number of steps (0 or more) or steps on the "
                             f"half and the full grid as AxB (e.g. 28x2), not '{refine}'")
    return parts[0], parts[1]


def check_similarity(spec, similarity: Optional[str], refine: bool,
                     initial: str = "auto") -> str:
    """The similarity a registration by ``spec`` uses (its default when ``similarity`` is None).

    Refused with a one-line :class:`UserInputError` when the method cannot use it, or when it
    would change nothing (``MethodSpec.similarity_choices``): a network optimises no similarity
    itself, so without ``--refine`` its ``--similarity`` only chooses the global stage's measure
    (lncc or mind) and, with ``--initial none`` as well, nothing at all.
    """
    similarity = similarity or spec.default_similarity
    if similarity not in spec.similarities:
        raise UserInputError(f"method '{spec.name}' does not support similarity '{similarity}'; "
                             f"choose one of {', '.join(spec.similarities)}")
    alignment = initial != "none"
    choices = spec.similarity_choices(refine, alignment)
    if similarity not in choices:
        head = (f"method '{spec.name}' does not support similarity '{similarity}' without "
                f"--refine{'' if alignment else ' and with --initial none'}: it does not "
                "optimise --similarity itself (a network's loss is fixed when it is trained), so "
                "--similarity is what the instance optimisation of --refine optimises")
        if alignment:
            raise UserInputError(f"{head}, and without --refine it only chooses the global "
                                 f"alignment's measure ({' or '.join(choices)}); add --refine N "
                                 f"(e.g. --refine 60) to refine with {similarity}, or choose "
                                 f"{' or '.join(choices)}")
        raise UserInputError(f"{head} and the global alignment's measure, and neither runs here; "
                             f"add --refine N (e.g. --refine 60) to refine with {similarity}, or "
                             "leave --similarity out")
    return similarity


# the similarities a user picks for images of different contrasts (slicer_bridge's choices)
CROSS_CONTRAST_SIMILARITIES = ("mind", "mi", "ngf")


def contrast_caution(spec, similarity: str, refine_steps: int) -> Optional[str]:
    """A caution for the summary when a network trained on one contrast per pair registers a
    pair the user declared multi-contrast (``similarity`` MIND, MI or NGF) with no refinement
    to correct it; None otherwise. Measured: on a second-contrast B-spline pair of MNI152 -- the
    networks' own training anatomy -- vtn, r2net-svf and r2net-nsvf left 8.7-11.7 mm of
    ground-truth error where the pair started at 2.7 mm (io with MIND: 2.3 mm;
    docs/evaluation/seen-mni152-bspline)."""
    if not spec.needs_checkpoint or spec.multimodal or refine_steps or \
            similarity not in CROSS_CONTRAST_SIMILARITIES:
        return None
    return (f"caution: {spec.name} was trained on images of one contrast; on images of "
            f"different contrasts its deformation can be far off (worse than none). Check the "
            f"result, add refinement steps (--refine) or register with io")


def register(fixed: sitk.Image, moving: sitk.Image, method: str = "io",
             refine: Union[int, str, Sequence[int]] = 0,
             similarity: Optional[str] = None, regularization: Optional[float] = None,
             device: Optional[str] = "cpu", progress: Optional[ProgressCallback] = None,
             cancel: Optional[CancelCallback] = None,
             options: Optional[Dict] = None, initial: str = "auto") -> RegistrationResult:
    """Register ``moving`` onto ``fixed`` (SimpleITK images, any grids that overlap physically).

    ``initial`` is the global stage (``alignment.INITIAL_MODES``): ``auto`` aligns with an affine
    transform when the images are not aligned already, ``none`` keeps the identity (the images
    must then overlap physically). The method registers the globally aligned moving image and
    the result's ``displacement`` composes both (``alignment.compose_affine``).

    ``refine`` adds instance-optimisation steps on the half and the full grid starting from the
    method's field (:func:`refine_schedule`: a total or ``AxB``). ``similarity`` is the one the
    method optimises (``io``) and the one ``refine`` optimises after any method; it also picks
    the global stage's measure. :func:`check_similarity` refuses one that would change nothing.
    ``progress(fraction, stage, message)`` is called along the way; ``cancel()``
    returning True stops the work with :class:`RegistrationCancelled`.
    """
    started = time.perf_counter()
    spec = get_method(method)
    variant = (options or {}).get("variant")
    if variant is not None and variant not in spec.variants:
        choices = ", ".join(spec.variants) if spec.variants else "none (it has no variants)"
        raise UserInputError(f"method '{method}' has no variant '{variant}'; choose from {choices}")
    schedule = refine_schedule(refine)
    if initial not in INITIAL_MODES:
        raise UserInputError(f"unknown --initial '{initial}'; choose one of "
                             f"{', '.join(INITIAL_MODES)}")
    similarity = check_similarity(spec, similarity, sum(schedule) > 0, initial)
    torch_device = resolve_device(device)
    # per-stage seconds (summary.json's timings_seconds): the engine's stages here, finer ones
    # (each pyramid level, the final integration) recorded by the method through the scope
    timings: Dict[str, float] = {}
    scope = ProgressScope(progress, cancel=cancel, timings=timings)
    if initial == "none":
        check_overlap(fixed, moving)  # otherwise the global stage checks what overlaps

    global_end = 0.0 if initial == "none" else 0.15
    alignment = global_alignment(fixed, moving, initial, similarity, scope.sub(0.0, global_end))
    timings["global"] = alignment.seconds
    if alignment.is_identity:
        check_overlap(fixed, moving)
    scope.report(global_end, "prepare", "resampling the moving image into the fixed frame")
    with scope.timed("resample moving to fixed grid"):
        moving_on_fixed = resample_to_reference(moving, fixed)
        # the method's input: the moving image through the global transform (the outputs
        # resample the original moving image once, through the total field)
        moving_aligned = moving_on_fixed if alignment.is_identity else sitk.Resample(
            moving, fixed, alignment.sitk_transform(), sitk.sitkLinear, 0.0, moving.GetPixelID())
    with scope.timed("normalise to tensors"):
        fixed_tensor = image_to_tensor(fixed, device=torch_device)
        moving_tensor = image_to_tensor(moving_aligned, device=torch_device)
    spacing = tuple(float(s) for s in fixed.GetSpacing()[::-1])
    timings["prepare"] = time.perf_counter() - started

    refining = sum(schedule) > 0
    method_end = 0.7 if refining else 1.0
    inputs = RegistrationInputs(fixed_tensor, moving_tensor, spacing, similarity, regularization,
                                scope.sub(global_end + 0.02, method_end), dict(options or {}),
                                geometry=fixed)
    tic = time.perf_counter()
    displacement = spec.run(inputs, spec)
    timings["method"] = time.perf_counter() - tic
    if refining:
        tic = time.perf_counter()
        displacement = instance_optimisation(
            fixed_tensor, moving_tensor, displacement.detach(), similarity, regularization,
            iterations=schedule, progress=scope.sub(method_end, 1.0))
        timings["refine"] = time.perf_counter() - tic
    deformable = displacement.detach().cpu().float()
    total = deformable if alignment.is_identity else compose_affine(alignment.matrix, deformable,
                                                                    fixed)
    scope.report(1.0, "registered", f"{spec.name} finished")
    caution = contrast_caution(spec, similarity, sum(schedule))
    return RegistrationResult(fixed, moving, total, spec.name,
                              similarity, sum(schedule), str(torch_device),
                              time.perf_counter() - started, timings=timings,
                              moving_on_fixed=moving_on_fixed, alignment=alignment,
                              deformable=deformable, refine_schedule=schedule,
                              cautions=[caution] if caution else [])
