"""Everything a registration leaves behind, in the conventions ITK, SimpleITK and Slicer expect.

The boundary between voxels and millimetres is here. Inside the library a displacement is
``(1, 3, D, H, W)`` in fixed-grid voxels, channels (k, j, i). The exported field is an ITK
displacement field: a vector image on the fixed grid holding ``U(x)`` in LPS millimetres with
``warped(x) = moving(x + U(x))``, i.e. ``U = D S u_ijk`` (direction cosines times spacing).
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import time
import uuid
from contextlib import contextmanager
from typing import Dict, Optional

import numpy as np
import SimpleITK as sitk
import torch

from . import __version__
from .engine import RegistrationResult
from .errors import UserInputError
from .images import (image_from_array, index_to_physical_matrix, resample_to_reference,
                     sample_displaced, write_gzipped, write_image)
from .metrics import (dice, folding_percent, jacobian_determinant_map, label_values, ncc, sdlogj,
                      strict_jacobian_determinant_map, volume_ratio)
from .spatial import one_sided_jacobian_determinants

OUTPUT_FILES = {
    "warped": "warped.nii.gz",
    "displacement": "displacement.nii.gz",
    # the composition's parts: displacement = CompositeTransform([affine, deformable]) in ITK's
    # order (the last added is applied first: x -> affine(x + deformable(x)))
    "affine": "affine.tfm",              # ITK AffineTransform, LPS, fixed point -> moving point
    "deformable": "deformable.nii.gz",   # the deformable part alone, as displacement.nii.gz
    "jacobian": "jacobian.nii.gz",
    "folding": "folding.nii.gz",  # UInt8, 1 where strictly folded (a one-sided det J <= 0)
    "grid": "grid.nii.gz",
    "warped_labels": "warped_labels.nii.gz",
    "summary": "summary.json",
    "qa": "qa.png",
}


# ------------------------------------------------------------------------ voxels <-> millimetres
def displacement_to_physical(displacement: torch.Tensor, reference: sitk.Image) -> np.ndarray:
    """``(D, H, W, 3)`` LPS-millimetre vectors of a ``(1, 3, D, H, W)`` voxel field on ``reference``."""
    linear = index_to_physical_matrix(reference)[:3, :3]  # D S, acting on (i, j, k)
    u_ijk = displacement[0].flip(0).permute(1, 2, 3, 0).to(torch.float64).cpu().numpy()
    return u_ijk @ linear.T


def physical_to_displacement(vectors: np.ndarray, reference: sitk.Image) -> torch.Tensor:
    """Inverse of :func:`displacement_to_physical`: LPS mm ``(D, H, W, 3)`` to voxels (k, j, i)."""
    inverse = np.linalg.inv(index_to_physical_matrix(reference)[:3, :3])
    u_ijk = np.asarray(vectors, dtype=np.float64) @ inverse.T
    return torch.from_numpy(u_ijk).permute(3, 0, 1, 2).flip(0)[None].float().contiguous()


def displacement_field_image(displacement: torch.Tensor, reference: sitk.Image,
                             vectors: Optional[np.ndarray] = None) -> sitk.Image:
    """The ITK displacement field (``sitkVectorFloat32``, fixed grid, LPS mm).

    Float32 halves the file; ``sitk.DisplacementFieldTransform`` wants float64, so cast it
    (``sitk.Cast(field, sitk.sitkVectorFloat64)``) before building the transform.
    """
    if vectors is None:
        vectors = displacement_to_physical(displacement, reference)
    return image_from_array(vectors.astype(np.float32, copy=False), reference, is_vector=True)


def write_displacement_field(field: sitk.Image, path: str) -> None:
    """Write a displacement field (LPS mm vectors, :func:`displacement_field_image`) as a NIfTI
    displacement-vector file, the way ITK >= 5.4 and 3D Slicer >= 5.4 write one: intent code 1006
    (NIFTI_INTENT_DISPVECT) with the vectors in NIfTI's RAS frame. ITK (SimpleITK, ANTs) reads it
    back as the same LPS vectors, and Slicer's transform reader takes it without the warning it
    gives for the generic vector intent (1007) that SimpleITK's writer uses for vector images.

    Written with nibabel because SimpleITK's vector images cannot carry the 1006 intent (ITK
    allows it only for itk::Vector pixels). The header holds the same affine as qform and sform.
    """
    vectors = sitk.GetArrayViewFromImage(field)  # (k, j, i, 3), LPS
    if vectors.ndim != 4 or vectors.shape[-1] != 3:
        raise ValueError("a 3-D field of 3-component vectors is needed")
    # On disk NIfTI runs i fastest, then j, k, t, component: the C-order (c, t, k, j, i) array,
    # handed to nibabel as its Fortran-order (i, j, k, t, c) view (no further copy).
    ras = np.empty((3, 1) + vectors.shape[:3], dtype=np.float32)
    for component, sign in enumerate((-1.0, -1.0, 1.0)):
        np.multiply(vectors[..., component], sign, out=ras[component, 0])
    _write_ras_vectors(ras, field, path)


def _write_ras_vectors(ras: np.ndarray, reference: sitk.Image, path: str) -> None:
    """The file of :func:`write_displacement_field` from its data: RAS vectors, C-order
    ``(3, 1, k, j, i)`` float32, on ``reference``'s grid."""
    import nibabel

    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine = lps_to_ras @ index_to_physical_matrix(reference)
    image = nibabel.Nifti1Image(ras.T, affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    image.header.set_intent(1006)
    image.header.set_xyzt_units("mm", "sec")
    path = os.fspath(path)
    if path.lower().endswith(".nii.gz"):  # float vectors: stored, see images.write_image
        write_gzipped(lambda raw: nibabel.save(image, raw), path, 0)
    else:
        nibabel.save(image, path)


def _write_field_from_voxels(displacement: torch.Tensor, reference: sitk.Image,
                             path: str) -> np.ndarray:
    """``write_displacement_field(displacement_field_image(displacement, reference), path)``
    with one copy of the field in memory instead of three (the LPS vectors, the image, the RAS
    array: 0.3 GB at 1 mm): the RAS array is computed straight from the voxel field, in float32
    (three multiply-adds per component over the grid instead of float64 (N, 3) @ (3, 3)
    products). Returns the longest LPS vector (``(1, 3)``)."""
    linear = index_to_physical_matrix(reference)[:3, :3]  # D S, acting on (i, j, k)
    u_ijk = displacement[0].to(torch.float32).flip(0)
    ras = torch.empty((3, 1) + tuple(u_ijk.shape[1:]), dtype=torch.float32)
    with torch.no_grad():
        for row in range(3):  # LPS first: U = D S u
            out = ras[row, 0]
            torch.mul(u_ijk[0], float(linear[row, 0]), out=out)
            out.add_(u_ijk[1], alpha=float(linear[row, 1]))
            out.add_(u_ijk[2], alpha=float(linear[row, 2]))
        squared = (ras[:, 0] * ras[:, 0]).sum(0)
        index = np.unravel_index(int(torch.argmax(squared)), tuple(squared.shape))
        del squared
        longest = ras[(slice(None), 0) + tuple(index)].numpy().copy()
        ras[:2].neg_()  # LPS -> RAS
    _write_ras_vectors(ras.numpy(), reference, path)
    return longest[None]


def read_displacement_field(path: str, reference: Optional[sitk.Image] = None) -> torch.Tensor:
    """Read an ITK displacement field file back to voxels of its own (or ``reference``'s) grid."""
    field = sitk.ReadImage(os.fspath(path))
    if field.GetNumberOfComponentsPerPixel() != 3:
        raise UserInputError(f"'{path}' is not a 3-D displacement field")
    if reference is not None:
        field = resample_to_reference(field, reference)
    return physical_to_displacement(sitk.GetArrayFromImage(field), field)


# ----------------------------------------------------------------------------------- resampling
def warp_image(image: sitk.Image, displacement: torch.Tensor, reference: sitk.Image,
               nearest: bool = False, vectors: Optional[np.ndarray] = None) -> sitk.Image:
    """``image`` (any grid) resampled on ``reference``'s grid at ``x + U(x)``, one interpolation.

    Equivalent to ``sitk.Resample(image, reference, DisplacementFieldTransform(U))``, which the
    tests check; done here in torch so the original image is sampled once, never re-warped.
    Computed in index space (``images.sample_displaced``): ``vectors`` is accepted for callers
    that pass it and not needed.
    """
    values = sample_displaced(image, reference, displacement, nearest=nearest)
    return image_from_array(values.astype(sitk.GetArrayViewFromImage(image).dtype, copy=False),
                            reference)


def grid_lines(shape, every: int = 8, thickness: int = 1) -> np.ndarray:
    """A (k, j, i) volume of 1s on grid planes every ``every`` voxels (for warped-grid pictures)."""
    grid = np.zeros(shape, dtype=np.float32)
    for axis, n in enumerate(shape):
        for start in range(every // 2, n, every):
            index = [slice(None)] * 3
            index[axis] = slice(start, start + thickness)
            grid[tuple(index)] = 1.0
    return grid


def warped_grid(displacement: torch.Tensor, every: int = 8) -> np.ndarray:
    """Grid lines on the fixed grid deformed by the field (what the moving grid looks like)."""
    # ``spatial.warp(lines, displacement)`` (border continued), on every core
    lines = sitk.GetImageFromArray(grid_lines(displacement.shape[2:], every))
    return sample_displaced(lines, lines, displacement, default=None)


def jacobian_maps(displacement: torch.Tensor, slab: int = 8):
    """``(metrics.jacobian_determinant_map, metrics.strict_jacobian_determinant_map)`` of the
    field, from one pass over it.

    The central-difference determinant is exactly the mean of the 8 one-sided determinants (see
    ``spatial.strict_jacobian_determinant``) and the strict one their minimum, so both come from
    the same 8 determinants instead of two computations of the derivatives. In float64, slab by
    slab along D with one neighbouring slice on each side (dropped afterwards), as ``metrics``
    does; 8 slices keep the temporaries of a 1 mm head near 0.1 GB.
    """
    field = torch.as_tensor(displacement)
    field = field[None] if field.dim() == 4 else field
    depth = field.shape[2]
    central = np.empty(tuple(field.shape[2:]), dtype=np.float64)
    strict = np.empty_like(central)
    with torch.no_grad():
        for start in range(0, depth, slab):
            stop = min(start + slab, depth)
            low, high = max(start - 1, 0), min(stop + 1, depth)
            total = minimum = None
            part = field[:, :, low:high].to(torch.float64)  # float64 a slab at a time
            for det in one_sided_jacobian_determinants(part):
                total = det.clone() if total is None else total.add_(det)
                minimum = det if minimum is None else torch.minimum(minimum, det)
            central[start:stop] = total[0, start - low:stop - low].div_(8.0).numpy()
            strict[start:stop] = minimum[0, start - low:stop - low].numpy()
    return central, strict


# ------------------------------------------------------------------------------------ summaries
def worst_folding(strict_determinant: np.ndarray, determinant: np.ndarray,
                  reference: sitk.Image) -> Dict:
    """Where the strict (one-sided) determinant is smallest: index (k, j, i), LPS point, the
    strict value there (``determinant``) and the central-difference one (``determinant_central``).

    The strict minimum, because a fold that alternates every voxel has a positive central
    determinant and the central minimum would point somewhere else."""
    k, j, i = (int(v) for v in np.unravel_index(int(np.argmin(strict_determinant)),
                                                strict_determinant.shape))
    return {"index_kji": [k, j, i],
            "point_lps": list(reference.TransformIndexToPhysicalPoint((i, j, k))),
            "determinant": float(strict_determinant[k, j, i]),
            "determinant_central": float(determinant[k, j, i])}


def summarise(result: RegistrationResult, warped: sitk.Image, determinant: np.ndarray,
              fixed_labels: Optional[sitk.Image] = None, moving_labels: Optional[sitk.Image] = None,
              warped_labels: Optional[sitk.Image] = None,
              vectors: Optional[np.ndarray] = None,
              strict_determinant: Optional[np.ndarray] = None) -> Dict:
    """The numbers of ``summary.json`` (also what the Slicer module's results table shows).

    ``folding_percent`` / ``folded_voxels`` / ``jacobian_min`` use central differences (the
    figure ITK and Learn2Reg report); the ``*_strict`` keys the minimum of the 8 one-sided
    determinants (``metrics.strict_jacobian_determinant_map``), which odd-even folds cannot hide
    from."""
    if strict_determinant is None:
        strict_determinant = strict_jacobian_determinant_map(result.displacement)
    fixed_array = sitk.GetArrayViewFromImage(result.fixed)
    moving_on_fixed = sitk.GetArrayViewFromImage(result.moving_in_fixed_frame())
    summary = {
        "method": result.method, "version": __version__, "device": result.device,
        "refine": result.refine, "refine_schedule": list(result.refine_schedule),
        "runtime_seconds": round(result.runtime_seconds, 3),
        "timings_seconds": {k: round(v, 3) for k, v in result.timings.items()},
        "similarity_metric": "ncc", "optimised_similarity": result.similarity,
        "similarity_before": ncc(fixed_array, moving_on_fixed),
        "similarity_after": ncc(fixed_array, sitk.GetArrayViewFromImage(warped)),
        "folding_percent": folding_percent(determinant),
        "folded_voxels": int(np.count_nonzero(determinant <= 0)),
        "jacobian_min": float(determinant.min()), "jacobian_max": float(determinant.max()),
        "folding_percent_strict": folding_percent(strict_determinant),
        "folded_voxels_strict": int(np.count_nonzero(strict_determinant <= 0)),
        "jacobian_min_strict": float(strict_determinant.min()),
        "sdlogj": sdlogj(determinant),
        "worst_folding": worst_folding(strict_determinant, determinant, result.fixed),
        "max_displacement_mm": float(np.linalg.norm(
            displacement_to_physical(result.displacement, result.fixed) if vectors is None
            else vectors, axis=-1).max()),
        "notes": list(result.notes),
        "cautions": list(result.cautions),
    }
    if moving_labels is not None and warped_labels is not None:
        moving_label_array = sitk.GetArrayViewFromImage(moving_labels)
        warped_label_array = sitk.GetArrayViewFromImage(warped_labels)
        fixed_volume = float(np.prod(result.fixed.GetSpacing()))
        summary["volume_ratio"] = {str(k): v for k, v in volume_ratio(
            moving_label_array, warped_label_array, float(np.prod(moving_labels.GetSpacing())),
            fixed_volume).items()}
        if fixed_labels is not None:
            fixed_label_array = sitk.GetArrayViewFromImage(fixed_labels)
            before_labels = sitk.GetArrayFromImage(
                resample_to_reference(moving_labels, result.fixed, nearest=True))
            labels = label_values(fixed_label_array, moving_label_array)
            before = dice(fixed_label_array, before_labels, labels)
            after = dice(fixed_label_array, warped_label_array, labels)
            summary["dice"] = {str(k): {"before": before.get(k, 0.0), "after": after.get(k, 0.0)}
                               for k in labels}
            summary["mean_dice_before"] = float(np.mean([v["before"] for v in
                                                         summary["dice"].values()]))
            summary["mean_dice_after"] = float(np.mean([v["after"] for v in
                                                        summary["dice"].values()]))
    return summary


def global_transform(result: RegistrationResult) -> sitk.AffineTransform:
    """The global stage as an ITK ``AffineTransform`` (the identity when there was none)."""
    from .alignment import affine_transform_from_matrix
    matrix = result.alignment.matrix if result.alignment is not None else np.eye(4)
    return affine_transform_from_matrix(matrix)


def composition_summary(result: RegistrationResult, determinant: Optional[np.ndarray] = None,
                        strict_determinant: Optional[np.ndarray] = None) -> Dict:
    """``initial`` (what the global stage did) and ``deformable_part`` (the Jacobian figures of
    the deformable field alone: the local deformation, without the global scaling). The
    determinants of the total field are reused when there was no global stage (same field)."""
    from .metrics import strict_jacobian_determinant_map
    same = result.deformable is None or result.alignment is None or result.alignment.is_identity
    field = result.deformable_part()
    if not same or determinant is None:
        determinant = jacobian_determinant_map(field)
    if not same or strict_determinant is None:
        strict_determinant = strict_jacobian_determinant_map(field)
    initial = result.alignment.summary() if result.alignment is not None else {
        "requested": "none", "used": "none", "reason": "no global stage",
        "matrix_lps": np.eye(4).tolist(), "seconds": 0.0}
    return {"initial": initial,
            "deformable_part": {"folding_percent": folding_percent(determinant),
                                "folding_percent_strict": folding_percent(strict_determinant),
                                "jacobian_min": float(determinant.min()),
                                "sdlogj": sdlogj(determinant)}}


# ---------------------------------------------------------------------------------- the folder
# A run writes into a fresh folder beside the target and swaps it in only when every file is
# written: a failed or cancelled run leaves an earlier result as it was, and a successful
# --overwrite leaves only its own files (no stale qa.png or warped_labels.nii.gz from before).
# Nothing is created before that, so a refused request leaves no empty folder behind.

def check_output_folder(folder: str, overwrite: bool = False) -> str:
    """Refuse, before any work, an output the run could not write: a file, a folder that holds
    files (unless ``overwrite``), a folder holding anything an earlier run did not write (even
    with ``overwrite``: those are the user's files), or a place the user cannot write to.
    Creates nothing; returns the absolute path."""
    folder = os.path.abspath(os.fspath(folder))
    if os.path.exists(folder):
        if not os.path.isdir(folder):
            raise UserInputError(f"output '{folder}' exists and is a file; give a folder")
        entries = sorted(os.listdir(folder))
        if entries and not overwrite:
            raise UserInputError(f"output folder '{folder}' already exists and is not empty; "
                                 "choose another folder or pass --overwrite")
        foreign = [name for name in entries if name not in _earlier_result_files(folder)]
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise UserInputError(f"output folder '{folder}' holds {shown}, which no earlier "
                                 "deepreg run wrote; --overwrite replaces only an earlier "
                                 "result, so move those files or choose another folder")
    parent = os.path.dirname(os.path.realpath(folder))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserInputError(f"cannot write the output folder '{folder}': no write permission "
                             f"in '{parent}'")
    return folder


def _earlier_result_files(folder: str) -> set:
    """The names an earlier run wrote into ``folder``: what its summary.json lists (the demo's
    input files too, which older summaries did not list)."""
    try:
        with open(os.path.join(folder, OUTPUT_FILES["summary"])) as handle:
            summary = json.load(handle)
        names = {str(name) for name in summary["outputs"].values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()  # no readable summary: not a result folder
    names.add(OUTPUT_FILES["summary"])
    if "demo" in summary:
        names.update(f"input_{role}.nii.gz" for role in ("fixed", "moving", "fixed_labels",
                                                         "moving_labels"))
    return names


def prepare_output_folder(folder: str, overwrite: bool = False) -> str:
    """Check ``folder`` (see :func:`check_output_folder`) and create the empty staging folder
    beside it that a run writes into; :func:`write_outputs` swaps it in. Returns its path."""
    folder = check_output_folder(folder, overwrite)
    target = os.path.realpath(folder)  # a symlinked output: stage beside the folder it names
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}"
                                                    f".deepreg-partial-{uuid.uuid4().hex[:8]}")
    os.mkdir(staging)
    return staging


def _swap_in(staging: str, folder: str, overwrite: bool) -> None:
    """Put the finished ``staging`` folder where ``folder`` is; an earlier result is removed
    only once the new one is in place."""
    check_output_folder(folder, overwrite)  # again: files may have appeared while the run worked
    target = os.path.realpath(folder)
    if not os.path.isdir(target):
        os.rename(staging, target)
        return
    os.chmod(staging, stat.S_IMODE(os.stat(target).st_mode))
    previous = staging.replace(".deepreg-partial-", ".deepreg-previous-")
    os.rename(target, previous)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(previous, target)
        raise
    shutil.rmtree(previous, ignore_errors=True)


def _list_every_file(summary: Dict, folder: str) -> None:
    """Name every file of ``folder`` under ``summary["outputs"]`` (rewriting summary.json when
    files were added beside the writer's own), so a later --overwrite knows they are ours."""
    outputs = summary.setdefault("outputs", {})
    unlisted = sorted(set(os.listdir(folder)) - set(outputs.values()))
    if not unlisted:
        return
    for name in unlisted:
        key = name.split(".")[0]
        outputs[name if key in outputs else key] = name
    with open(os.path.join(folder, OUTPUT_FILES["summary"]), "w") as handle:
        json.dump(summary, handle, indent=2)


def write_outputs(result: RegistrationResult, folder: str, *args, overwrite: bool = False,
                  inputs: Optional[Dict[str, sitk.Image]] = None, **kwargs) -> Dict:
    """Write every output file into ``folder`` and return the summary (file names under
    ``summary["outputs"]``); ``inputs`` (file name -> image) are saved beside them (the demo's
    pair). Other arguments: see :func:`_write_output_files`.

    Everything is written into a staging folder beside ``folder`` which replaces ``folder`` only
    when all files are written. If anything fails (or the run is interrupted) the staging folder
    is removed and ``folder`` is as it was; ``overwrite`` as in :func:`check_output_folder`.
    """
    folder = check_output_folder(folder, overwrite)
    created = []  # folders above the output that this call creates, removed again on failure
    parent = os.path.dirname(os.path.realpath(folder))
    while not os.path.exists(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    staging = prepare_output_folder(folder, overwrite)
    try:
        for name, image in (inputs or {}).items():
            write_image(image, os.path.join(staging, name))
        summary = _write_output_files(result, staging, *args, **kwargs)
        _list_every_file(summary, staging)
        _swap_in(staging, folder, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for path in created:  # deepest first
            try:
                os.rmdir(path)
            except OSError:
                break
        raise
    return summary


def _write_output_files(result: RegistrationResult, folder: str,
                        fixed_labels: Optional[sitk.Image] = None,
                        moving_labels: Optional[sitk.Image] = None, figure: bool = True,
                        extra: Optional[Dict] = None, progress=None) -> Dict:
    """Write every output file into ``folder`` (the staging folder of :func:`write_outputs`) and
    return the summary. Returns paths under ``summary["outputs"]``."""
    def report(fraction, message):
        if progress is not None:
            progress(fraction, "write outputs", message)

    folder = os.path.abspath(folder)
    paths = {}
    timings = result.timings  # summary.json's timings_seconds: each output computed and written

    @contextmanager
    def timed(stage):
        started = time.perf_counter()
        yield
        timings[stage] = time.perf_counter() - started

    def save(name, image):
        paths[name] = os.path.join(folder, OUTPUT_FILES[name])
        with timed(f"write {OUTPUT_FILES[name]}"):
            if name in ("displacement", "deformable"):
                write_displacement_field(image, paths[name])  # as Slicer reads it, no warning
            else:
                write_image(image, paths[name])

    report(0.0, "warping the moving image")
    with timed("compute warped image"):
        warped = warp_image(result.moving, result.displacement, result.fixed)
    save("warped", warped)
    # the Jacobian maps before the millimetre field exists: the two are the largest temporaries
    with timed("compute Jacobian determinants (central and strict, one pass)"):
        determinant, strict_determinant = jacobian_maps(result.displacement)
        folded = strict_determinant <= 0
    save("jacobian", image_from_array(determinant.astype(np.float32), result.fixed))
    save("folding", image_from_array(folded.astype(np.uint8), result.fixed))
    report(0.3, "writing the displacement field")
    paths["displacement"] = os.path.join(folder, OUTPUT_FILES["displacement"])
    with timed("compute and write displacement.nii.gz"):
        # summarise needs only the longest vector (max_displacement_mm)
        longest = _write_field_from_voxels(result.displacement, result.fixed,
                                           paths["displacement"])
    paths["affine"] = os.path.join(folder, OUTPUT_FILES["affine"])
    sitk.WriteTransform(global_transform(result), paths["affine"])
    if result.deformable is None or result.deformable is result.displacement or (
            result.alignment is None or result.alignment.is_identity):
        # no global stage: the deformable part is the same field, already on disk
        paths["deformable"] = os.path.join(folder, OUTPUT_FILES["deformable"])
        with timed(f"write {OUTPUT_FILES['deformable']}"):
            shutil.copyfile(paths["displacement"], paths["deformable"])
    else:
        paths["deformable"] = os.path.join(folder, OUTPUT_FILES["deformable"])
        with timed("compute and write deformable.nii.gz"):
            _write_field_from_voxels(result.deformable, result.fixed, paths["deformable"])
    with timed("compute warped grid"):
        grid = warped_grid(result.displacement)
    save("grid", image_from_array(grid, result.fixed))
    warped_labels = None
    if moving_labels is not None:
        report(0.5, "propagating labels")
        with timed("compute warped labels"):
            warped_labels = warp_image(moving_labels, result.displacement, result.fixed,
                                       nearest=True)
        save("warped_labels", warped_labels)
    report(0.6, "computing metrics")
    with timed("compute summary metrics"):
        summary = summarise(result, warped, determinant, fixed_labels, moving_labels,
                            warped_labels, longest, strict_determinant)
        summary.update(composition_summary(result, determinant, strict_determinant))
    summary["timings_seconds"]["compute summary metrics"] = round(
        timings["compute summary metrics"], 3)  # summarise copied the timings before this one
    summary.update(extra or {})
    if figure:
        report(0.75, "drawing the QA figure")
        started = time.perf_counter()
        from .qa import qa_figure
        paths["qa"] = os.path.join(folder, OUTPUT_FILES["qa"])
        qa_figure(result, warped, determinant, folded, summary, paths["qa"])
        summary["timings_seconds"]["draw qa.png (with its imports)"] = round(
            time.perf_counter() - started, 3)
    paths["summary"] = os.path.join(folder, OUTPUT_FILES["summary"])
    summary["outputs"] = {name: os.path.basename(path) for name, path in paths.items()}
    with open(paths["summary"], "w") as handle:
        json.dump(summary, handle, indent=2)
    report(1.0, "outputs written")
    return summary
