"""What the Slicer module needs, written so that it can be tested without Slicer.

Nothing here imports slicer or qt; ``vtk`` is imported lazily, only inside the functions that
return vtk objects. The module (``DeepRegistration/DeepRegistration.py``) is kept thin: geometry
conversions, the command line it runs, the parsing of the progress lines it reads, the rows of
its results table, the QA images it computes and the subprocess it supervises all live here.

Coordinate conventions: files (ITK, SimpleITK, NIfTI through ITK) are LPS, Slicer's scene is RAS.
The two differ by the sign of the first two axes. A SimpleITK array is indexed ``(k, j, i)``.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

if TYPE_CHECKING:  # vtk is imported lazily, inside the functions that need it
    import vtk

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
LPS_TO_RAS_4 = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Python packages the subprocess needs (import name -> pip requirement).
#: torch is installed through the PyTorch extension (PyTorchUtils) when it is present.
REQUIRED_MODULES = {
    "numpy": "numpy",
    "SimpleITK": "SimpleITK",
    "nibabel": "nibabel",
    "torch": "torch>=2.0",
}

#: The choices the module offers, as (command-line token, what a clinician reads). Each token is
#: accepted by ``register``; the first entry of a list is the module's default.
SIMILARITY_CHOICES = (
    ("lncc", "Same contrast (local correlation)"),
    ("mind", "Different contrasts (MIND)"),
    ("mi", "Different contrasts (mutual information)"),
    ("ngf", "Different contrasts (edges, NGF)"),
    ("ncc", "Same contrast (global correlation)"),
    ("mse", "Same contrast and intensities (squared difference)"),
)
DEVICE_CHOICES = (
    ("cpu", "CPU"),
    ("cuda", "GPU (NVIDIA CUDA)"),
)
#: ``register --initial``: the global (affine) stage run before the deformable one.
INITIAL_CHOICES = (
    ("auto", "Automatic"),
    ("none", "None (already aligned)"),
    ("moments", "Centre and axes (moments)"),
    ("rigid", "Rigid"),
    ("affine", "Affine"),
)
#: The command line's own default for ``--initial`` (left out of the command when chosen, so a
#: library without the option still runs).
DEFAULT_INITIAL = "auto"

SIMILARITIES = tuple(token for token, _ in SIMILARITY_CHOICES)
DEVICES = tuple(token for token, _ in DEVICE_CHOICES)
INITIALS = tuple(token for token, _ in INITIAL_CHOICES)


def choice_label(choices: Sequence[Tuple[str, str]], token: str) -> str:
    """The readable label of ``token`` in a ``*_CHOICES`` list (the token itself if unknown)."""
    return dict(choices).get(token, str(token))


# ----------------------------------------------------------------------------- geometry
def lps_to_ras(point: Sequence[float]) -> List[float]:
    """An LPS point (or vector) in RAS: negate the first two coordinates."""
    x, y, z = (float(v) for v in point)
    return [-x, -y, z]


def ras_to_lps(point: Sequence[float]) -> List[float]:
    """A RAS point (or vector) in LPS; the flip is its own inverse."""
    return lps_to_ras(point)


def ijk_to_lps_matrix(image) -> np.ndarray:
    """4x4 matrix mapping a continuous index ``(i, j, k, 1)`` of a SimpleITK image to LPS mm.

    ``x = origin + D diag(spacing) (i, j, k)^T``, the ITK definition of physical space.
    """
    dimension = image.GetDimension()
    if dimension != 3:
        raise ValueError(f"a 3-D image is needed, this one has {dimension} dimensions")
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    matrix = np.eye(4)
    matrix[:3, :3] = direction @ np.diag(spacing)
    matrix[:3, 3] = np.asarray(image.GetOrigin(), dtype=float)
    return matrix


def ijk_to_ras_matrix(image) -> np.ndarray:
    """4x4 IJK-to-RAS matrix of a SimpleITK image, what ``vtkMRMLVolumeNode.SetIJKToRASMatrix`` takes."""
    return LPS_TO_RAS_4 @ ijk_to_lps_matrix(image)


def vtk_matrix_from_numpy(matrix) -> vtk.vtkMatrix4x4:
    """A ``vtkMatrix4x4`` holding a 4x4 numpy array."""
    import vtk

    array = np.asarray(matrix, dtype=float)
    if array.shape != (4, 4):
        raise ValueError(f"a 4x4 matrix is needed, got shape {array.shape}")
    result = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            result.SetElement(row, column, float(array[row, column]))
    return result


def numpy_from_vtk_matrix(matrix) -> np.ndarray:
    """The 4x4 numpy array of a ``vtkMatrix4x4``."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def kji_index_to_ras(index_kji: Sequence[float], image) -> List[float]:
    """RAS position of the voxel at numpy index ``(k, j, i)`` of a SimpleITK image."""
    k, j, i = (float(v) for v in index_kji)
    point = ijk_to_ras_matrix(image) @ np.array([i, j, k, 1.0])
    return [float(v) for v in point[:3]]


def same_geometry(dimensions_a: Sequence[int], ijk_to_ras_a, dimensions_b: Sequence[int],
                  ijk_to_ras_b, tolerance: float = 1e-3) -> bool:
    """True when two volumes share a voxel grid: same dimensions and (within ``tolerance`` mm,
    relative to the voxel size) the same IJK-to-RAS matrix."""
    if tuple(int(d) for d in dimensions_a) != tuple(int(d) for d in dimensions_b):
        return False
    a = np.asarray(ijk_to_ras_a, dtype=float)
    b = np.asarray(ijk_to_ras_b, dtype=float)
    scale = max(float(np.max(np.linalg.norm(a[:3, :3], axis=0))), 1e-12)
    return bool(np.allclose(a, b, rtol=0.0, atol=tolerance * scale))


# ----------------------------------------------------------------------------- command line
def python_executable(which=None) -> str:
    """The interpreter that runs the library in a subprocess.

    Inside Slicer this is ``PythonSlicer`` (on ``PATH`` in Slicer's environment, the way
    ``slicer.util.pip_install`` finds it); elsewhere the current interpreter.
    """
    if which is None:
        import shutil
        which = shutil.which
    found = which("PythonSlicer")
    return found if found else sys.executable


def refine_argument(refine: Union[int, Sequence[int]]) -> str:
    """``--refine``'s token for a total (``"60"``) or a (half grid, full grid) pair (``"10x2"``).
    Raises ValueError for a negative count or a pair of another length."""
    steps = [int(refine)] if isinstance(refine, (int, float, str)) else [int(v) for v in refine]
    if len(steps) not in (1, 2) or min(steps) < 0:
        raise ValueError(f"refine must be a number of steps >= 0 or a pair of them, got {refine!r}")
    return "x".join(str(v) for v in steps)


def build_register_command(python_executable: str, fixed_path: str, moving_path: str,
                           output_dir: str, method: str,
                           refine: Union[int, Sequence[int]] = 0,
                           similarity: Optional[str] = None, device: Optional[str] = None,
                           regularization: Optional[float] = None,
                           fixed_labels: Optional[str] = None,
                           moving_labels: Optional[str] = None,
                           figure: bool = True, initial: Optional[str] = None) -> List[str]:
    """The argument list of ``python -m DeepRegistrationLib register ... --progress-json``.

    Paths are made absolute (so none can be mistaken for an option). ``similarity``, ``device``
    and ``regularization`` are left out when None, which keeps the method's defaults; so is
    ``initial`` when None or the command line's default ("auto").
    ``refine`` is a total number of refinement steps (the library splits it between the half and
    the full grid) or a pair (steps on the half grid, steps on the full grid), passed as ``AxB``.
    ``figure=False`` adds ``--no-figure`` (no qa.png, and no matplotlib needed).
    """
    if not method:
        raise ValueError("a method name is needed")
    command = [str(python_executable), "-m", "DeepRegistrationLib", "register",
               os.path.abspath(fixed_path), os.path.abspath(moving_path),
               "--method", str(method), "--output", os.path.abspath(output_dir),
               "--refine", refine_argument(refine)]
    if similarity:
        command += ["--similarity", str(similarity)]
    if device:
        command += ["--device", str(device)]
    if regularization is not None:
        value = float(regularization)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"regularization must be a finite number >= 0, got {regularization}")
        command += ["--regularization", repr(value)]
    if fixed_labels:
        command += ["--fixed-labels", os.path.abspath(fixed_labels)]
    if moving_labels:
        command += ["--moving-labels", os.path.abspath(moving_labels)]
    if initial and initial != DEFAULT_INITIAL:
        if initial not in INITIALS:
            raise ValueError(f"initial must be one of {', '.join(INITIALS)}, got {initial!r}")
        command += ["--initial", str(initial)]
    if not figure:
        command.append("--no-figure")
    command.append("--progress-json")
    return command


def build_methods_command(python_executable: str) -> List[str]:
    """The argument list of ``python -m DeepRegistrationLib methods --json``."""
    return [str(python_executable), "-m", "DeepRegistrationLib", "methods", "--json"]


def library_root() -> str:
    """The folder that holds the ``DeepRegistrationLib`` package (what goes on PYTHONPATH)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_environment(base: Optional[Mapping[str, str]] = None,
                           extra_python_path: Optional[str] = None) -> Dict[str, str]:
    """Environment of the subprocess: ``base`` with ``extra_python_path`` first on PYTHONPATH.

    Unbuffered, UTF-8 output so progress lines arrive as they are printed.
    """
    env = dict(os.environ if base is None else base)
    if extra_python_path:
        parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        parts = [extra_python_path] + [p for p in parts if p != extra_python_path]
        env["PYTHONPATH"] = os.pathsep.join(parts)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def missing_modules(names: Iterable[str] = tuple(REQUIRED_MODULES)) -> List[str]:
    """The import names among ``names`` that cannot be found (nothing is imported)."""
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


# ----------------------------------------------------------------------------- progress lines
def parse_progress_line(line) -> Optional[Dict[str, Any]]:
    """One line of ``--progress-json`` output as a dict, or None when it is not such a line.

    Tolerant: bytes are decoded, blank lines, plain text, JSON that is not an object or has no
    string ``type`` give None. A ``progress`` event gets a float ``fraction`` clipped to [0, 1]
    and string ``stage`` / ``message``.
    """
    if line is None:
        return None
    if isinstance(line, (bytes, bytearray)):
        line = bytes(line).decode("utf-8", errors="replace")
    text = str(line).strip()
    if not text.startswith("{"):
        return None
    try:
        event = json.loads(text)
    except ValueError:
        return None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        return None
    if event["type"] == "progress":
        try:
            fraction = float(event.get("fraction", 0.0))
        except (TypeError, ValueError):
            fraction = 0.0
        if not math.isfinite(fraction):
            fraction = 0.0
        event["fraction"] = min(max(fraction, 0.0), 1.0)
        event["stage"] = str(event.get("stage") or "")
        event["message"] = str(event.get("message") or "")
    elif event["type"] in ("log", "error"):
        event["message"] = str(event.get("message") or "")
    return event


def parse_methods_json(text: str) -> List[Dict[str, Any]]:
    """The list printed by ``methods --json`` (leading non-JSON lines, e.g. warnings, skipped)."""
    start = text.find("[")
    if start < 0:
        raise ValueError("no JSON list in the output of 'methods --json'")
    methods = json.loads(text[start:])
    if not isinstance(methods, list) or not all(isinstance(m, dict) and "name" in m
                                                for m in methods):
        raise ValueError("'methods --json' did not print a list of methods")
    return methods


def _escape(text) -> str:
    return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;"))


def format_seconds(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min"


#: One plain line per known method, for a clinician (the library's own descriptions are written
#: for engineers). Methods not listed fall back to the first sentence of their description.
PLAIN_DESCRIPTIONS = {
    "io": "Fits a smooth, fold-free deformation to this pair; needs no training and works on "
          "any anatomy.",
    "vm-diff": "A trained network predicts a smooth deformation in one pass (fast).",
    "vtn": "A trained network aligns the images globally, then refines the deformation in "
           "three steps (fast).",
    "r2net-svf": "A trained network whose deformations are smooth and invertible by design "
                 "(fast).",
    "r2net-nsvf": "A trained network whose deformations are smooth and invertible by design; "
                  "time-varying variant (fast).",
    "ms-r2net": "The invertible R2Net network run on parts of the image and on the whole, then "
                "combined (slower).",
}

#: What a training source shows, for the "seen anatomy" line of a model card.
SOURCE_ANATOMY = {
    "mni152": "brain MRI (T1, skull stripped)",
    "pydeface": "head MRI with skull and face (T1)",
    "itk-t1": "head MRI (T1)",
    "invesalius-ct": "head CT",
}


def method_short_name(info: Mapping[str, Any]) -> str:
    """A short name for the method selector: the title up to its first parenthesis."""
    title = str(info.get("title") or info.get("name") or "")
    short = title.split(" (", 1)[0].strip()
    return short or str(info.get("name", ""))


def method_plain_description(info: Mapping[str, Any]) -> str:
    """One plain sentence on what the method does."""
    name = str(info.get("name", ""))
    if name in PLAIN_DESCRIPTIONS:
        return PLAIN_DESCRIPTIONS[name]
    text = str(info.get("description") or "").strip()
    if not text:
        return ""
    sentence = text.split(". ", 1)[0].split("; ", 1)[0].rstrip(".")
    return sentence + "."


def _date(value) -> str:
    text = str(value or "")
    return text.split("T", 1)[0]


def model_card_lines(card: Optional[Mapping[str, Any]]) -> List[Tuple[str, str]]:
    """(label, text) lines a clinician can read from a checkpoint's model card: training data,
    seen anatomy, training steps, validation Dice, date. Keys a card lacks are left out; nothing
    of the raw card (configurations, commands, synthetic-data settings) is shown."""
    if not isinstance(card, Mapping) or not card:
        return []
    lines: List[Tuple[str, str]] = []
    data = card.get("data") if isinstance(card.get("data"), Mapping) else {}
    sources = [s for s in (data.get("sources") or []) if isinstance(s, Mapping)]
    if sources:
        names = []
        for source in sources:
            name = str(source.get("name", "?"))
            names.append(name.upper() if name == "mni152" else name)
        synthetic = " (synthetic deformations)" if data.get("synth_config") else ""
        lines.append(("Trained on", ", ".join(names) + synthetic))
        seen = []
        for source in sources:
            name = str(source.get("name", "?"))
            text = SOURCE_ANATOMY.get(name) or " ".join(
                str(v) for v in (name, source.get("modality")) if v)
            if text not in seen:
                seen.append(text)
        lines.append(("Seen anatomy", "; ".join(seen)))
    training = card.get("training") if isinstance(card.get("training"), Mapping) else {}
    steps = training.get("run_iterations", training.get("iterations", card.get("iterations")))
    from .cards import lineage_steps_text
    lineage = lineage_steps_text(training)
    if lineage:  # warm-started runs: the whole lineage's steps
        lines.append(("Training steps", lineage))
    elif isinstance(steps, (int, float)) and not isinstance(steps, bool):
        lines.append(("Training steps", f"{int(steps)}"))
    validation = card.get("validation") if isinstance(card.get("validation"), Mapping) else {}
    before = (validation.get("identity") or {}).get("dice") \
        if isinstance(validation.get("identity"), Mapping) else None
    after = (validation.get("metrics") or {}).get("dice") \
        if isinstance(validation.get("metrics"), Mapping) else None
    if after is not None:
        cases = validation.get("cases")
        count = len(cases) if isinstance(cases, (list, tuple)) else cases
        where = f" ({count} synthetic pairs)" if isinstance(count, int) else ""
        text = f"{_fmt(before, 2)} \u2192 {_fmt(after, 2)}" if before is not None else _fmt(after, 2)
        lines.append(("Validation Dice", text + where))
    unseen = card.get("unseen_validation") if isinstance(card.get("unseen_validation"),
                                                          Mapping) else {}
    after = (unseen.get("metrics") or {}).get("dice")
    if isinstance(after, (int, float)):
        before = (unseen.get("identity") or {}).get("dice")
        text = f"{_fmt(before, 2)} \u2192 {_fmt(after, 2)}" if before is not None else _fmt(after, 2)
        held_out = ", ".join(str(n) for n in unseen.get("sources") or []) or "held-out anatomy"
        lines.append(("Unseen-anatomy Dice", f"{text} ({held_out}, never trained on)"))
    if card.get("created"):
        lines.append(("Date", _date(card["created"])))
    return lines


def method_description_html(info: Mapping[str, Any]) -> str:
    """Rich text under the method selector: a plain description, the estimated time and the
    curated model card (see :func:`model_card_lines`). Short lines, so that the Slicer side
    panel does not have to grow."""
    parts = []
    description = method_plain_description(info)
    if description:
        parts.append(_escape(description))
    estimates = info.get("estimated_seconds") or {}
    if isinstance(estimates, Mapping) and estimates:
        times = [f"{format_seconds(v)} at {_escape(k)}" for k, v in estimates.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if times:
            parts.append("Typical time on a CPU: " + ", ".join(times))
    card = dict(model_card_lines(info.get("model_card")))
    if "Trained on" in card:
        training = [card["Trained on"]]
        if "Training steps" in card:
            training.append(f"{card['Training steps']} steps")
        if "Date" in card:
            training.append(card["Date"])
        parts.append("Trained on " + _escape(", ".join(training)))
    for label in ("Seen anatomy", "Validation Dice"):
        if label in card:
            parts.append(f"{label}: {_escape(card[label])}")
    if info.get("available") is False:
        parts.append("<span style='color:#b00'>Not available: its trained weights are not "
                     "installed.</span>")
    if not parts:
        parts.append(f"<b>{_escape(method_short_name(info))}</b>")
    return "<br>".join(parts)


def method_tooltip(info: Mapping[str, Any]) -> str:
    """The full title and paper, for the selector's tooltip (kept out of the panel)."""
    parts = [str(info.get("title") or info.get("name", ""))]
    if info.get("paper"):
        parts.append(f"Paper: {info['paper']}")
    return "\n".join(parts)


def similarity_problem(info: Mapping[str, Any], similarity: str, refine: int,
                       initial: str = DEFAULT_INITIAL) -> Optional[str]:
    """Why ``register`` would refuse ``similarity`` for the method ``info`` (an entry of
    ``methods --json``) with ``refine`` refinement steps and the global stage ``initial`` (a
    ``register --initial`` token), in words for the module; None when it accepts it, or when
    ``info`` does not list the similarities that apply (the placeholder before the list arrives,
    an older library): the command line decides then.

    The lists are the library's own (``MethodSpec.describe``): a network optimises no similarity
    itself, so most similarities act only in the refinement steps after it, and without them only
    in the global stage (which ``initial`` ``none`` leaves out)."""
    aligned = initial != "none"
    if refine:
        key = "similarities"
    elif aligned:
        key = "similarities_without_refine"
    else:
        key = "similarities_without_refine_or_alignment"
    accepted = info.get(key)
    if not isinstance(accepted, (list, tuple)) or similarity in accepted:
        return None
    name = method_short_name(info)
    label = choice_label(SIMILARITY_CHOICES, similarity)
    choices = " or ".join(f"'{choice_label(SIMILARITY_CHOICES, s)}'" for s in accepted)
    if not refine and similarity in (info.get("similarities") or ()):
        if not aligned and similarity in (info.get("similarities_without_refine") or ()):
            none = choice_label(INITIAL_CHOICES, initial)
            return (f"{name} uses the similarity '{label}' only in the global alignment and the "
                    f"refinement steps after it, and neither runs (Global alignment '{none}', "
                    f"no refinement steps): set Refinement steps above 0 (e.g. 60), choose "
                    f"another Global alignment, or choose {choices}.")
        return (f"{name} uses the similarity '{label}' only in the refinement steps after it: "
                f"set Refinement steps above 0 (e.g. 60), or choose {choices}.")
    return f"{name} does not offer the similarity '{label}'; choose {choices}."


# ----------------------------------------------------------------------------- results table
def _fmt(value, digits: int = 4) -> str:
    """A number in ``digits`` significant digits; None and non-finite values as ``n/a``."""
    if value is None:
        return "n/a"
    if isinstance(value, (bool, int, np.integer)):
        return str(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(number):
        return "n/a"
    return f"{number:.{digits}g}"


def _before_after(before, after) -> str:
    return f"{_fmt(before)} \u2192 {_fmt(after)}"


#: Row labels shared by the panel's table, the table node and the tests.
FOLDING_STRICT_LABEL = "Folding, strict (any one-sided det J \u2264 0)"
FOLDING_CENTRAL_LABEL = "Folding, central differences (ITK/Learn2Reg-comparable)"


def _folding_text(percent, voxels) -> str:
    value = f"{_fmt(percent)} %"
    if voxels is not None:
        value += f" ({_fmt(voxels)} voxels)"
    return value


def initial_stage_text(summary: Mapping[str, Any]) -> Optional[str]:
    """What the global stage did, e.g. "Rigid (asked: Automatic; 1.2 s)", or None when the
    summary has no ``initial`` entry (older outputs)."""
    initial = summary.get("initial")
    if not isinstance(initial, Mapping):
        return None
    used = initial.get("used")
    text = choice_label(INITIAL_CHOICES, str(used)) if used else "n/a"
    details = []
    requested = initial.get("requested")
    if requested and requested != used:
        details.append(f"asked: {choice_label(INITIAL_CHOICES, str(requested))}")
    if initial.get("reason"):
        details.append(str(initial["reason"]))
    if isinstance(initial.get("seconds"), (int, float)):
        details.append(f"{float(initial['seconds']):.1f} s")
    return text + (f" ({'; '.join(details)})" if details else "")


def results_table_rows(summary: Mapping[str, Any],
                       label_names: Optional[Mapping[str, str]] = None) -> List[Tuple[str, str]]:
    """(measure, value) rows of the results table, from ``summary.json``.

    Missing keys are skipped, so older or partial summaries still display. ``label_names`` maps a
    label value (as a string) to a name shown instead of ``label N``. Folding is given twice when
    the summary has both: the strict figure (a voxel folds when any of its one-sided
    finite-difference Jacobians has det <= 0, which odd-even folds cannot hide from) and the
    central-difference figure that ITK and Learn2Reg report.
    """
    rows: List[Tuple[str, str]] = []
    names = {str(k): str(v) for k, v in (label_names or {}).items()}
    if "method" in summary:
        version = f" (DeepRegistrationLib {summary['version']})" if summary.get("version") else ""
        rows.append(("Method", f"{summary['method']}{version}"))
    initial = initial_stage_text(summary)
    if initial:
        rows.append(("Global alignment", initial))
    if "runtime_seconds" in summary:
        device = f" on {summary['device']}" if summary.get("device") else ""
        rows.append(("Runtime", f"{float(summary['runtime_seconds']):.1f} s{device}"))
    if "refine" in summary:
        schedule = summary.get("refine_schedule")
        split = f" ({schedule[0]} on the half grid, {schedule[1]} on the full grid)" \
            if schedule and summary["refine"] else ""
        rows.append(("Refinement steps", f"{_fmt(summary['refine'])}{split}"))
    if "similarity_before" in summary or "similarity_after" in summary:
        metric = summary.get("similarity_metric") or "similarity"
        rows.append((f"Similarity ({metric}) before \u2192 after",
                     _before_after(summary.get("similarity_before"), summary.get("similarity_after"))))
    if "folding_percent_strict" in summary:
        rows.append((FOLDING_STRICT_LABEL, _folding_text(summary["folding_percent_strict"],
                                                         summary.get("folded_voxels_strict"))))
    if "folding_percent" in summary:
        rows.append((FOLDING_CENTRAL_LABEL, _folding_text(summary["folding_percent"],
                                                          summary.get("folded_voxels"))))
    if "jacobian_min_strict" in summary:
        rows.append(("Smallest det J, strict", _fmt(summary["jacobian_min_strict"])))
    if "jacobian_min" in summary or "jacobian_max" in summary:
        rows.append(("det J min / max (central)",
                     f"{_fmt(summary.get('jacobian_min'))} / {_fmt(summary.get('jacobian_max'))}"))
    if "sdlogj" in summary:
        rows.append(("SD of log Jacobian", _fmt(summary["sdlogj"])))
    worst = summary.get("worst_folding")
    if isinstance(worst, Mapping) and worst.get("point_lps") is not None:
        r, a, s = lps_to_ras(worst["point_lps"])
        value = f"det J {_fmt(worst.get('determinant'))}"
        if worst.get("determinant_central") is not None:
            value += f" (central {_fmt(worst.get('determinant_central'))})"
        rows.append(("Worst folding at (RAS mm)", f"({r:.1f}, {a:.1f}, {s:.1f}): {value}"))
    dice = summary.get("dice")
    if isinstance(dice, Mapping):
        def order(key):
            try:
                return (0, float(key), "")
            except ValueError:
                return (1, 0.0, str(key))
        for label in sorted(dice, key=order):
            values = dice[label] if isinstance(dice[label], Mapping) else {}
            name = names.get(str(label), f"label {label}")
            rows.append((f"Dice {name}", _before_after(values.get("before"), values.get("after"))))
    if "mean_dice_before" in summary or "mean_dice_after" in summary:
        rows.append(("Mean Dice", _before_after(summary.get("mean_dice_before"),
                                                summary.get("mean_dice_after"))))
    rows += [("Caution", _caution_text(c)) for c in summary.get("cautions") or []]
    rows += [("Note", str(n)) for n in summary.get("notes") or []]
    return rows


def _caution_text(caution: Any) -> str:
    text = str(caution)
    return text[len("caution: "):] if text.startswith("caution: ") else text


def key_figures(summary: Mapping[str, Any]) -> List[Tuple[str, str]]:
    """The few figures shown at the top of the results: Dice before and after, folding (strict,
    and the central-difference figure others report), run time."""
    figures: List[Tuple[str, str]] = []
    if not summary:
        return figures
    # a doubt about the result comes before its figures (e.g. a one-contrast network on a pair
    # of two contrasts: engine.contrast_caution)
    figures += [("Caution", _caution_text(c)) for c in summary.get("cautions") or []]
    if "mean_dice_before" in summary or "mean_dice_after" in summary:
        figures.append(("Dice", _before_after(summary.get("mean_dice_before"),
                                              summary.get("mean_dice_after"))))
    if "folding_percent_strict" in summary:
        text = f"{_fmt(summary['folding_percent_strict'], 3)} % strict"
        if "folding_percent" in summary:
            text += f", {_fmt(summary['folding_percent'], 3)} % central"
        figures.append(("Folding", text))
    elif "folding_percent" in summary:
        figures.append(("Folding", f"{_fmt(summary['folding_percent'], 3)} % (central)"))
    if "runtime_seconds" in summary:
        device = f" ({summary['device']})" if summary.get("device") else ""
        figures.append(("Run time", f"{format_seconds(summary['runtime_seconds'])}{device}"))
    return figures


def key_figures_html(summary: Mapping[str, Any]) -> str:
    """:func:`key_figures` as compact rich text for a label."""
    return "<br>".join(f"<b>{_escape(label)}:</b> {_escape(value)}"
                       for label, value in key_figures(summary))


def worst_folding_ras(summary: Mapping[str, Any]) -> Optional[List[float]]:
    """RAS position of ``summary["worst_folding"]["point_lps"]``, or None when absent."""
    worst = summary.get("worst_folding") if summary else None
    if not isinstance(worst, Mapping) or worst.get("point_lps") is None:
        return None
    return lps_to_ras(worst["point_lps"])


# ----------------------------------------------------------------------------- labels
def segment_label_values(fixed_names: Sequence[str],
                         moving_names: Sequence[str] = ()) -> Dict[str, int]:
    """One label value per segment name, shared by the fixed and moving segmentations.

    Names of the fixed segmentation come first (1, 2, ...), then names only the moving one has,
    so segments with the same name get the same value and Dice compares like with like.
    """
    values: Dict[str, int] = {}
    for name in list(fixed_names) + list(moving_names):
        if name not in values:
            values[name] = len(values) + 1
    return values


def resample_labels_onto(labels_path: str, reference_path: str, output_path: str) -> None:
    """Resample a label map file onto the voxel grid of ``reference_path`` (nearest neighbour,
    identity in physical space, label values kept, 0 outside) and write it to ``output_path``.

    Both files are in world coordinates (the module exports them with their parent transforms
    hardened). SimpleITK is imported here only: Slicer bundles it, and the module needs it only
    when a label map is not on its volume's grid.
    """
    import SimpleITK as sitk

    labels = sitk.ReadImage(os.fspath(labels_path))
    reference = sitk.ReadImage(os.fspath(reference_path))
    resampled = sitk.Resample(labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                              labels.GetPixelID())
    sitk.WriteImage(resampled, os.fspath(output_path), True)


def folding_mask_from_jacobian(determinant: np.ndarray) -> np.ndarray:
    """UInt8 mask of det J <= 0, for outputs written before the command line wrote its strict
    ``folding.nii.gz`` (central differences only: it can miss odd-even folds)."""
    return (np.asarray(determinant) <= 0).astype(np.uint8)


# ----------------------------------------------------------------------------- demo data
#: The demo pair the module registers with Slicer's Sample Data module: files shipped in
#: ``DeepRegistration/Resources/SampleData`` (made by ``make_sample_data.py`` there), in the
#: order fixed volume, moving volume, fixed segmentation, moving segmentation.
DEMO_SAMPLE_NAME = "DeepRegistrationDemo"
DEMO_FILES = (
    ("DeepRegistrationDemo_fixed.nii.gz", "Demo fixed (MNI152)", "VolumeFile",
     "SHA256:8879dc36d9faee980f10509dc5a7f464306c6c4d713d1f5d5824a90b653801ad"),
    ("DeepRegistrationDemo_moving.nii.gz", "Demo moving (deformed MNI152)", "VolumeFile",
     "SHA256:7eec2cd24ec90dc6f1eb865c1639c3addfaf0ca6de056ce42b2d522be29321c2"),
    ("DeepRegistrationDemo_fixed_tissues.seg.nrrd", "Demo fixed tissues", "SegmentationFile",
     "SHA256:d11eec65b7410505bc2128dbaf1af49459bc485f7df86ef82fbd45ae459657eb"),
    ("DeepRegistrationDemo_moving_tissues.seg.nrrd", "Demo moving tissues", "SegmentationFile",
     "SHA256:79981f5fd49bbee0c3244ac65461883988fba3b84f86ab0c71d14d358bab826d"),
)


def file_sha256(path: str) -> str:
    """SHA-256 of a file, as Slicer's Sample Data module checks it ("SHA256:<hex>")."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "SHA256:" + digest.hexdigest()


def pick_inputs(volume_names: Sequence[str]) -> Tuple[Optional[int], Optional[int]]:
    """Indices of the volumes to preselect as (fixed, moving) among ``volume_names``: the demo
    pair when it is loaded, else the first two volumes."""
    names = list(volume_names)
    demo = [DEMO_FILES[0][1], DEMO_FILES[1][1]]
    if all(name in names for name in demo):
        return names.index(demo[0]), names.index(demo[1])
    fixed = 0 if names else None
    moving = 1 if len(names) > 1 else None
    return fixed, moving


def pick_labels(names: Sequence[str], volume_name: str) -> Optional[int]:
    """Index of the label node to preselect for ``volume_name`` (only for the demo pair, whose
    segmentations are known to belong to its volumes)."""
    pairs = {DEMO_FILES[0][1]: DEMO_FILES[2][1], DEMO_FILES[1][1]: DEMO_FILES[3][1]}
    wanted = pairs.get(volume_name)
    return list(names).index(wanted) if wanted in names else None


# ----------------------------------------------------------------------------- QA images
def robust_normalise(array: np.ndarray, lower: float = 1.0, upper: float = 99.0) -> np.ndarray:
    """Float32 copy of ``array`` with its ``lower``-``upper`` percentile range mapped to [0, 1]."""
    values = np.asarray(array, dtype=np.float32)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros_like(values)
    lo, hi = np.percentile(finite, [lower, upper])
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def checkerboard_tile_voxels(shape_kji: Sequence[int], spacing_kji: Sequence[float],
                             tiles: int = 8) -> Tuple[int, int, int]:
    """Tile size in voxels per axis (k, j, i) giving about ``tiles`` square tiles across the
    longest physical extent."""
    extent = [n * s for n, s in zip(shape_kji, spacing_kji)]
    tile_mm = max(extent) / max(int(tiles), 1)
    return tuple(max(1, int(round(tile_mm / s))) for s in spacing_kji)  # type: ignore[return-value]


def checkerboard(fixed: np.ndarray, warped: np.ndarray,
                 tile_voxels: Sequence[int] = (8, 8, 8)) -> np.ndarray:
    """Alternating tiles of the normalised fixed and warped arrays (same shape, (k, j, i))."""
    a, b = robust_normalise(fixed), robust_normalise(warped)
    if a.shape != b.shape:
        raise ValueError(f"fixed {a.shape} and warped {b.shape} must have the same shape")
    if a.ndim != len(tile_voxels):
        raise ValueError("one tile size per axis is needed")
    parity = np.zeros(a.shape, dtype=np.int64)
    for axis, size in enumerate(tile_voxels):
        index = np.arange(a.shape[axis]) // max(int(size), 1)
        shape = [1] * a.ndim
        shape[axis] = -1
        parity = parity + index.reshape(shape)
    return np.where(parity % 2 == 0, a, b).astype(np.float32)


def difference(fixed: np.ndarray, warped: np.ndarray) -> np.ndarray:
    """Signed difference of the normalised arrays, fixed minus warped, in [-1, 1]."""
    a, b = robust_normalise(fixed), robust_normalise(warped)
    if a.shape != b.shape:
        raise ValueError(f"fixed {a.shape} and warped {b.shape} must have the same shape")
    return (a - b).astype(np.float32)


def diverging_window_level(values: np.ndarray, center: float = 1.0, percentile: float = 99.0,
                           minimum_half_width: float = 0.05,
                           maximum_half_width: Optional[float] = None) -> Tuple[float, float]:
    """(window, level) of a display centred on ``center`` that covers the robust range of
    ``values`` symmetrically; for a Jacobian map ``center`` is 1 (no volume change)."""
    data = np.asarray(values, dtype=np.float64)
    data = data[np.isfinite(data)]
    if data.size == 0:
        half = minimum_half_width
    else:
        lo, hi = np.percentile(data, [100.0 - percentile, percentile])
        half = max(abs(center - lo), abs(hi - center), minimum_half_width)
    if maximum_half_width is not None:
        half = min(half, maximum_half_width)
    return 2.0 * float(half), float(center)


# ----------------------------------------------------------------------------- subprocess
class RegistrationProcess:
    """A command run in the background whose output is read without blocking the caller.

    ``poll()`` returns what arrived since the last call: progress events (dicts from
    :func:`parse_progress_line`) and ``{"type": "output", "stream": ..., "message": ...}`` for
    every other line. The GUI calls it from a timer, so the GUI stays responsive.

    ``cancel()`` stops the whole process tree: Slicer's ``PythonSlicer`` is a launcher that starts
    the real interpreter as a child, so terminating only the launcher would leave the work
    running. On POSIX the command runs in its own session and the group gets SIGTERM (the
    command line turns it into a clean cancel, exit code 130), then SIGKILL after
    ``grace_seconds``. On Windows ``taskkill /T /F`` ends the tree.
    """

    def __init__(self, command: Sequence[str], env: Optional[Mapping[str, str]] = None,
                 cwd: Optional[str] = None, grace_seconds: float = 5.0):
        self.command = [str(c) for c in command]
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.grace_seconds = float(grace_seconds)
        self.process: Optional[subprocess.Popen] = None
        self.cancel_requested = False
        self._cancel_time: Optional[float] = None
        self._killed = False
        self._queue: "queue.Queue[Tuple[str, str]]" = queue.Queue()
        self._threads: List[threading.Thread] = []
        self.lines: List[str] = []  # every line, stderr prefixed, for the log
        self.stdout_lines: List[str] = []  # stdout exactly as printed (``methods --json``)
        self.events: List[Dict[str, Any]] = []

    # -- life cycle
    def start(self) -> "RegistrationProcess":
        if self.process is not None:
            raise RuntimeError("the process was already started")
        kwargs: Dict[str, Any] = dict(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, env=self.env, cwd=self.cwd,
                                      universal_newlines=True, encoding="utf-8",
                                      errors="replace", bufsize=1)
        if os.name == "nt":
            info = subprocess.STARTUPINFO()  # hide the console window, as Slicer does
            info.dwFlags |= subprocess.STARTF_USESHOWWINDOW
            info.wShowWindow = 0
            kwargs["startupinfo"] = info
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            kwargs["start_new_session"] = True
        self.process = subprocess.Popen(self.command, **kwargs)
        for name, stream in (("stdout", self.process.stdout), ("stderr", self.process.stderr)):
            thread = threading.Thread(target=self._read, args=(name, stream), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _read(self, name: str, stream) -> None:
        try:
            for line in iter(stream.readline, ""):
                self._queue.put((name, line.rstrip("\r\n")))
        except (OSError, ValueError):
            pass
        finally:
            try:
                stream.close()
            except OSError:
                pass

    @property
    def returncode(self) -> Optional[int]:
        return None if self.process is None else self.process.poll()

    def is_finished(self) -> bool:
        """The process exited, its output was read to the end and handed out by ``poll``."""
        if self.process is None:
            return False
        if self.process.poll() is None:
            return False
        if any(t.is_alive() for t in self._threads):
            return False
        return self._queue.empty()

    def poll(self) -> List[Dict[str, Any]]:
        """Events that arrived since the last call (never blocks)."""
        self._escalate_if_needed()
        out = []
        while True:
            try:
                stream, line = self._queue.get_nowait()
            except queue.Empty:
                break
            if stream == "stdout":
                self.stdout_lines.append(line)
            event = parse_progress_line(line) if stream == "stdout" else None
            if event is None:
                if not line.strip():
                    continue
                event = {"type": "output", "stream": stream, "message": line}
                self.lines.append(line if stream == "stdout" else f"[stderr] {line}")
            else:
                self.events.append(event)
                if event["type"] in ("log", "error"):
                    self.lines.append(event["message"])
                elif event["type"] == "progress":
                    text = event["stage"] + (f": {event['message']}" if event["message"] else "")
                    if not self.lines or self.lines[-1] != text:
                        self.lines.append(text)
            out.append(event)
        return out

    def wait(self, timeout: Optional[float] = None, interval: float = 0.05,
             callback=None) -> List[Dict[str, Any]]:
        """Poll until finished (or ``timeout`` seconds); ``callback(events)`` after each poll."""
        start = time.monotonic()
        events: List[Dict[str, Any]] = []
        while True:
            new = self.poll()
            events.extend(new)
            if callback is not None:
                callback(new)
            if self.is_finished():
                events.extend(self.poll())
                return events
            if timeout is not None and time.monotonic() - start > timeout:
                raise TimeoutError(f"process still running after {timeout} s")
            time.sleep(interval)

    # -- stopping
    def cancel(self) -> None:
        """Ask the process tree to stop; it is killed if still alive after ``grace_seconds``."""
        if self.process is None or self.process.poll() is not None and not self._alive_threads():
            self.cancel_requested = True
            return
        self.cancel_requested = True
        if self._cancel_time is None:
            self._cancel_time = time.monotonic()
            self._signal_tree(graceful=True)

    def kill(self) -> None:
        """Stop the process tree at once."""
        self.cancel_requested = True
        self._signal_tree(graceful=False)
        self._killed = True

    def stop_now(self, grace_seconds: float = 3.0) -> None:
        """Stop the process tree and wait for it here, without an event loop: for scene close and
        application exit, where spinning the loop would run other handlers mid-teardown.
        SIGTERM first (a clean cancel), SIGKILL after ``grace_seconds``."""
        if self.process is None:
            self.cancel_requested = True
            return
        if self.process.poll() is None:
            self.cancel()
            try:
                self.process.wait(timeout=grace_seconds)
            except subprocess.TimeoutExpired:
                self.kill()
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        if os.name != "nt" and not self._killed:
            # the launcher may have exited before its children: end what is left of the group
            self._signal_tree(graceful=False)
            self._killed = True
        for thread in self._threads:
            thread.join(timeout=1.0)

    def _alive_threads(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def _escalate_if_needed(self) -> None:
        if self._cancel_time is None or self._killed:
            return
        if time.monotonic() - self._cancel_time >= self.grace_seconds and \
                (self.process.poll() is None or self._alive_threads()):
            self.kill()

    def _signal_tree(self, graceful: bool) -> None:
        if self.process is None:
            return
        pid = self.process.pid
        if os.name == "nt":
            # No SIGTERM on Windows: end the launcher and all its children.
            subprocess.call(["taskkill", "/PID", str(pid), "/T", "/F"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            return
        try:
            os.killpg(pid, signal.SIGTERM if graceful else signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    # -- results
    def done_event(self) -> Optional[Dict[str, Any]]:
        for event in reversed(self.events):
            if event.get("type") == "done":
                return event
        return None

    def error_message(self) -> str:
        """The best one-line explanation of a failure: the ``error`` event, else the last
        ``deepreg: error:`` line, else the last line of output."""
        for event in reversed(self.events):
            if event.get("type") == "error" and event.get("message"):
                return event["message"]
        for line in reversed(self.lines):
            if "error:" in line:
                return line.replace("[stderr] ", "")
        for line in reversed(self.lines):
            if line.strip():
                return line.replace("[stderr] ", "")
        return f"the process exited with code {self.returncode}"

    def log_text(self) -> str:
        return "\n".join(self.lines)
