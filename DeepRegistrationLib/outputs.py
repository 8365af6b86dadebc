"""Everything a registration leaves behind, in the conventions ITK, SimpleITK and Slicer expect.

The boundary between voxels and millimetres is here. Inside the library a displacement is
``(1, 3, D, H, W)`` in fixed-grid voxels, channels (k, j, i). The exported field is an ITK
displacement field: a vector image on the fixed grid holding ``U(x)`` in LPS millimetres with
``warped(x) = moving(x + U(x))``, i.e. ``U = D S u_ijk`` (direction cosines times spacing).
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

import numpy as np
import SimpleITK as sitk
import torch

from . import __version__
from .engine import RegistrationResult
from .errors import UserInputError
from .images import (image_from_array, index_to_physical_matrix, physical_grid,
                     resample_to_reference, sample_at_points, write_image)
from .metrics import (dice, folding_percent, jacobian_determinant_map, label_values, ncc, sdlogj,
                      volume_ratio)
from .spatial import warp

OUTPUT_FILES = {
    "warped": "warped.nii.gz",
    "displacement": "displacement.nii.gz",
    # the composition's parts: displacement = CompositeTransform([affine, deformable]) in ITK's
    # order (the last added is applied first: x -> affine(x + deformable(x)))
    "affine": "affine.tfm",              # ITK AffineTransform, LPS, fixed point -> moving point
    "deformable": "deformable.nii.gz",   # the deformable part alone, as displacement.nii.gz
    "jacobian": "jacobian.nii.gz",
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
    return image_from_array(vectors.astype(np.float32), reference, is_vector=True)


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
    ``vectors`` (from :func:`displacement_to_physical`) saves converting the field again.
    """
    if vectors is None:
        vectors = displacement_to_physical(displacement, reference)
    points = physical_grid(reference) + torch.from_numpy(vectors)
    values = sample_at_points(image, points, nearest=nearest).numpy()
    out = image_from_array(values.astype(sitk.GetArrayViewFromImage(image).dtype), reference)
    return out


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
    lines = torch.from_numpy(grid_lines(displacement.shape[2:], every))[None, None]
    with torch.no_grad():
        return warp(lines, displacement.float())[0, 0].numpy()


# ------------------------------------------------------------------------------------ summaries
def worst_folding(determinant: np.ndarray, reference: sitk.Image) -> Dict:
    """Where the determinant is smallest: index (k, j, i), LPS point and the value."""
    k, j, i = (int(v) for v in np.unravel_index(int(np.argmin(determinant)), determinant.shape))
    return {"index_kji": [k, j, i],
            "point_lps": list(reference.TransformIndexToPhysicalPoint((i, j, k))),
            "determinant": float(determinant[k, j, i])}


def summarise(result: RegistrationResult, warped: sitk.Image, determinant: np.ndarray,
              fixed_labels: Optional[sitk.Image] = None, moving_labels: Optional[sitk.Image] = None,
              warped_labels: Optional[sitk.Image] = None,
              vectors: Optional[np.ndarray] = None) -> Dict:
    """The numbers of ``summary.json`` (also what the Slicer module's results table shows)."""
    fixed_array = sitk.GetArrayViewFromImage(result.fixed)
    moving_on_fixed = sitk.GetArrayViewFromImage(result.moving_in_fixed_frame())
    summary = {
        "method": result.method, "version": __version__, "device": result.device,
        "refine": result.refine, "runtime_seconds": round(result.runtime_seconds, 3),
        "timings_seconds": {k: round(v, 3) for k, v in result.timings.items()},
        "similarity_metric": "ncc", "optimised_similarity": result.similarity,
        "similarity_before": ncc(fixed_array, moving_on_fixed),
        "similarity_after": ncc(fixed_array, sitk.GetArrayViewFromImage(warped)),
        "folding_percent": folding_percent(determinant),
        "folded_voxels": int(np.count_nonzero(determinant <= 0)),
        "jacobian_min": float(determinant.min()), "jacobian_max": float(determinant.max()),
        "sdlogj": sdlogj(determinant),
        "worst_folding": worst_folding(determinant, result.fixed),
        "max_displacement_mm": float(np.linalg.norm(
            displacement_to_physical(result.displacement, result.fixed) if vectors is None
            else vectors, axis=-1).max()),
        "notes": list(result.notes),
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
def check_output_folder(folder: str, overwrite: bool = False) -> str:
    """Refuse a file, or a folder that already holds files unless ``overwrite`` is set; called
    before any work so a user does not wait for a run that cannot be written."""
    folder = os.path.abspath(os.fspath(folder))
    if os.path.exists(folder):
        if not os.path.isdir(folder):
            raise UserInputError(f"output '{folder}' exists and is a file; give a folder")
        if os.listdir(folder) and not overwrite:
            raise UserInputError(f"output folder '{folder}' already exists and is not empty; "
                                 "choose another folder or pass --overwrite")
    return folder


def prepare_output_folder(folder: str, overwrite: bool = False) -> str:
    """Check ``folder`` (see :func:`check_output_folder`) and create it."""
    folder = check_output_folder(folder, overwrite)
    os.makedirs(folder, exist_ok=True)
    return folder


def write_outputs(result: RegistrationResult, folder: str,
                  fixed_labels: Optional[sitk.Image] = None,
                  moving_labels: Optional[sitk.Image] = None, figure: bool = True,
                  extra: Optional[Dict] = None, progress=None) -> Dict:
    """Write every output file into ``folder`` (which :func:`prepare_output_folder` checked) and
    return the summary. Returns paths under ``summary["outputs"]``."""
    def report(fraction, message):
        if progress is not None:
            progress(fraction, "write outputs", message)

    folder = os.path.abspath(folder)
    paths = {}

    def save(name, image):
        paths[name] = os.path.join(folder, OUTPUT_FILES[name])
        write_image(image, paths[name])

    report(0.0, "warping the moving image")
    vectors = displacement_to_physical(result.displacement, result.fixed)
    warped = warp_image(result.moving, result.displacement, result.fixed, vectors=vectors)
    save("warped", warped)
    report(0.3, "writing the displacement field")
    save("displacement", displacement_field_image(result.displacement, result.fixed, vectors))
    paths["affine"] = os.path.join(folder, OUTPUT_FILES["affine"])
    sitk.WriteTransform(global_transform(result), paths["affine"])
    save("deformable", displacement_field_image(result.deformable_part(), result.fixed))
    determinant = jacobian_determinant_map(result.displacement)
    save("jacobian", image_from_array(determinant.astype(np.float32), result.fixed))
    grid = warped_grid(result.displacement)
    save("grid", image_from_array(grid, result.fixed))
    warped_labels = None
    if moving_labels is not None:
        report(0.5, "propagating labels")
        warped_labels = warp_image(moving_labels, result.displacement, result.fixed, nearest=True,
                                   vectors=vectors)
        save("warped_labels", warped_labels)
    report(0.6, "computing metrics")
    summary = summarise(result, warped, determinant, fixed_labels, moving_labels, warped_labels,
                        vectors)
    summary.update(composition_summary(result, determinant))
    summary.update(extra or {})
    if figure:
        report(0.75, "drawing the QA figure")
        from .qa import qa_figure
        paths["qa"] = os.path.join(folder, OUTPUT_FILES["qa"])
        qa_figure(result, warped, determinant, grid, summary, paths["qa"])
    paths["summary"] = os.path.join(folder, OUTPUT_FILES["summary"])
    summary["outputs"] = {name: os.path.basename(path) for name, path in paths.items()}
    with open(paths["summary"], "w") as handle:
        json.dump(summary, handle, indent=2)
    report(1.0, f"outputs written to {folder}")
    return summary
