"""The QA figure: what a person looks at to judge a registration in ten seconds.

Rows are the axial, coronal and sagittal planes of the fixed image -- chosen from its direction
cosines (the voxel axis closest to S-I is held for the axial row, A-P for coronal, L-R for
sagittal), so an image stored coronally still shows a real axial slice in the axial row -- through
the worst (strict) folding when the field folds, else through the centre. Each panel is oriented
as viewers show it, in the radiological convention (patient's right on the viewer's left; axial
seen from the feet with anterior up, coronal from the front with superior up, sagittal with
anterior on the left and superior up), and its edges carry the anatomical letters.

Columns: fixed, moving (on the fixed grid, before registration), warped, a checkerboard of fixed
and warped, the absolute difference (with its colour bar), the deformed grid (thin lines every
few millimetres over the fixed image) and the central-difference Jacobian determinant on a
diverging scale centred on 1, with voxels folded by the strict measure (any one-sided det <= 0)
painted over it; that colour is always in the legend.

Only the slices shown are read, normalised and drawn: the figure never converts whole volumes.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

# LPS physical axes: 0 = x (towards the patient's Left), 1 = y (Posterior), 2 = z (Superior).
# The letters at the low and the high end of each.
AXIS_LETTERS = {0: ("R", "L"), 1: ("A", "P"), 2: ("I", "S")}
# Radiological display of each plane: the physical axis held, then the physical axis (and the
# direction it runs, +1 = towards its high end) from left to right and from top to bottom.
VIEWS = {
    "axial": (2, (0, +1), (1, +1)),      # R ... L across, A at the top
    "coronal": (1, (0, +1), (2, -1)),    # R ... L across, S at the top
    "sagittal": (0, (1, +1), (2, -1)),   # A ... P across, S at the top
}
PLANES = ("axial", "coronal", "sagittal")
CONVENTION = ("radiological convention: the patient's right is on the viewer's left "
              "(axial seen from the feet, coronal from the front)")
FOLDED_COLOUR = "#39ff14"
GRID_COLOUR = "#ff6a1f"


def anatomical_axes(direction: Sequence[float]) -> Tuple[Tuple[int, int, int], Tuple[int, int, int],
                                                         float]:
    """For each voxel axis (i, j, k) the LPS axis it is closest to and the sign of its direction
    along that axis, and the largest angle (degrees) between a voxel axis and its LPS axis.

    The assignment is the permutation that best matches the direction cosines (largest sum of
    ``|cos|``), so every LPS axis gets exactly one voxel axis even for oblique storage.
    """
    matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3)  # [lps, voxel axis]
    best = max(itertools.permutations(range(3)),
               key=lambda perm: sum(abs(matrix[perm[c], c]) for c in range(3)))
    signs = tuple(1 if matrix[best[c], c] >= 0 else -1 for c in range(3))
    cosines = [abs(matrix[best[c], c]) / max(np.linalg.norm(matrix[:, c]), 1e-12) for c in range(3)]
    angle = float(np.degrees(np.arccos(np.clip(min(cosines), -1.0, 1.0))))
    return tuple(int(b) for b in best), signs, angle


@dataclass
class PlaneView:
    """How to cut and orient one plane of a (k, j, i) array for display.

    ``held`` is the numpy axis held at ``index``; the displayed panel's rows run along numpy
    axis ``row_axis`` (reversed when ``flip_rows``) and its columns along ``col_axis``
    (reversed when ``flip_cols``); ``row_mm`` and ``col_mm`` are their voxel spacings; ``letters``
    are (left, right, top, bottom).
    """
    name: str
    held: int
    index: int
    row_axis: int
    col_axis: int
    flip_rows: bool
    flip_cols: bool
    row_mm: float
    col_mm: float
    letters: Tuple[str, str, str, str]

    def take(self, volume: np.ndarray) -> np.ndarray:
        """The 2-D panel of a (k, j, i) array (or array view), rows top to bottom."""
        plane = np.take(volume, self.index, axis=self.held)
        remaining = [a for a in range(3) if a != self.held]
        if remaining.index(self.row_axis) != 0:
            plane = plane.T
        if self.flip_rows:
            plane = plane[::-1]
        if self.flip_cols:
            plane = plane[:, ::-1]
        return np.ascontiguousarray(plane)

    def extent(self, shape) -> Tuple[float, float, float, float]:
        """imshow extent in millimetres (origin at the top-left corner of the panel)."""
        return (0.0, shape[1] * self.col_mm, shape[0] * self.row_mm, 0.0)

    def in_plane_displacement(self, displacement_kji: np.ndarray):
        """(rows, columns) displacement in display millimetres of a (3, D, H, W) voxel field:
        positive down and to the right, as the panel is drawn."""
        rows = self.take(displacement_kji[self.row_axis]) * self.row_mm
        cols = self.take(displacement_kji[self.col_axis]) * self.col_mm
        return (-rows if self.flip_rows else rows), (-cols if self.flip_cols else cols)


def plane_views(image: sitk.Image, index_kji: Sequence[int]) -> List[PlaneView]:
    """The axial, coronal and sagittal views of ``image`` through voxel ``index_kji``."""
    lps_of_voxel, signs, _ = anatomical_axes(image.GetDirection())
    spacing_kji = image.GetSpacing()[::-1]

    def numpy_axis(lps_axis):
        voxel = lps_of_voxel.index(lps_axis)  # 0, 1, 2 = i, j, k
        return 2 - voxel, signs[voxel]

    views = []
    for name in PLANES:
        held_lps, (col_lps, col_dir), (row_lps, row_dir) = VIEWS[name]
        held, _ = numpy_axis(held_lps)
        col_axis, col_sign = numpy_axis(col_lps)
        row_axis, row_sign = numpy_axis(row_lps)
        col_low, col_high = AXIS_LETTERS[col_lps]
        row_low, row_high = AXIS_LETTERS[row_lps]
        letters = ((col_low, col_high) if col_dir > 0 else (col_high, col_low)) + \
            ((row_low, row_high) if row_dir > 0 else (row_high, row_low))
        views.append(PlaneView(name, held, int(index_kji[held]), row_axis, col_axis,
                               row_sign * row_dir < 0, col_sign * col_dir < 0,
                               float(spacing_kji[row_axis]), float(spacing_kji[col_axis]),
                               letters))
    return views


def checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    rows = (np.arange(a.shape[0]) * tiles // max(a.shape[0], 1)) % 2
    cols = (np.arange(a.shape[1]) * tiles // max(a.shape[1], 1)) % 2
    return np.where((rows[:, None] + cols[None, :]) % 2 == 0, a, b)


def _normalise_together(panels: List[np.ndarray]) -> List[np.ndarray]:
    """Clip to the 0.5 / 99.5 percentiles of the shown slices of one image and scale to [0, 1]."""
    values = np.concatenate([p.ravel() for p in panels]).astype(np.float64)
    low, high = np.percentile(values, [0.5, 99.5])
    if high <= low:
        low, high = float(values.min()), float(values.max())
    if high <= low:
        return [np.zeros(p.shape, np.float32) for p in panels]
    return [((np.clip(p, low, high) - low) / (high - low)).astype(np.float32) for p in panels]


def grid_spacing_mm(extent_mm: float, target_lines: int = 6) -> float:
    """10 mm when that gives at least ``target_lines`` lines across, else the largest of
    5, 2, 1, 0.5 ... mm that does."""
    spacing = 10.0
    for candidate in (10.0, 5.0, 2.0, 1.0, 0.5, 0.2, 0.1):
        spacing = candidate
        if extent_mm / candidate >= target_lines:
            break
    return spacing


def _letters(axis, letters, colour="white"):
    """The anatomical letters at the middle of each edge (plain text: a boxed or outlined text
    costs several times more to draw, and 84 of them are a third of the figure's time)."""
    left, right, top, bottom = letters
    style = dict(color=colour, fontsize=7, fontweight="bold", transform=axis.transAxes)
    axis.text(0.015, 0.5, left, ha="left", va="center", **style)
    axis.text(0.985, 0.5, right, ha="right", va="center", **style)
    axis.text(0.5, 0.985, top, ha="center", va="top", **style)
    axis.text(0.5, 0.015, bottom, ha="center", va="bottom", **style)


def _deformed_grid(axis, view: PlaneView, displacement_kji: np.ndarray, shape, spacing_mm: float):
    """Contours of the moving-space coordinates ``x + u(x)`` (in-plane components) at multiples
    of ``spacing_mm``: the moving image's straight grid lines pulled back onto the fixed plane,
    so lines bend where the field moves and cross where it folds. Returns the contour sets."""
    rows, cols = view.in_plane_displacement(displacement_kji)
    y = (np.arange(shape[0]) + 0.5) * view.row_mm
    x = (np.arange(shape[1]) + 0.5) * view.col_mm
    contour_sets = []
    for mapped in (x[None, :] + cols, y[:, None] + rows):
        low, high = float(mapped.min()), float(mapped.max())
        levels = np.arange(np.ceil(low / spacing_mm), np.floor(high / spacing_mm) + 1) * spacing_mm
        if levels.size:
            contour_sets.append(axis.contour(x, y, mapped, levels=levels, colors=GRID_COLOUR,
                                             linewidths=0.5, linestyles="solid"))
    return contour_sets


# Layout in inches: panels of one width, row heights from each plane's aspect ratio in mm.
PANEL_WIDTH, GAP, LEFT, TOP, BOTTOM = 1.85, 0.06, 0.42, 0.42, 0.5
COLOUR_BAR_ROOM = 0.78  # after the difference and the Jacobian columns


def qa_figure(result, warped: sitk.Image, determinant: np.ndarray, folded: np.ndarray, summary,
              path: str) -> str:
    """Draw the QA figure of a registration into ``path`` (PNG).

    ``determinant`` is the central-difference det J on the fixed grid, ``folded`` the strict
    folding mask (``metrics.folding_strict_mask``), both (k, j, i). Matplotlib is imported here,
    without pyplot (the Agg canvas directly: no GUI backend, faster to import).

    The garbage collector is paused while drawing: matplotlib allocates tens of thousands of
    small objects, and every collection they trigger walks all of torch's objects in the
    process -- about a quarter of the figure's time. Nothing drawn here needs collecting early.
    """
    import gc
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _draw_figure(result, warped, determinant, folded, summary, path)
    finally:
        if was_enabled:
            gc.enable()


def _draw_figure(result, warped, determinant, folded, summary, path) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap, TwoSlopeNorm
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    fixed_image = result.fixed
    shape = tuple(fixed_image.GetSize()[::-1])
    centre = (summary["worst_folding"]["index_kji"] if np.any(folded)
              else [n // 2 for n in shape])
    views = plane_views(fixed_image, centre)
    _, _, obliquity = anatomical_axes(fixed_image.GetDirection())

    def slices(image):
        array = sitk.GetArrayViewFromImage(image)
        return [view.take(array) for view in views]

    fixed = _normalise_together(slices(fixed_image))
    moving = _normalise_together(slices(result.moving_in_fixed_frame()))
    warped_panels = _normalise_together(slices(warped))
    det_panels = [view.take(determinant) for view in views]
    fold_panels = [view.take(folded) for view in views]
    displacement = result.displacement[0].detach().cpu().numpy()

    shown = np.concatenate([p.ravel() for p in det_panels])
    high = max(float(np.percentile(shown, 99.5)), 1.5)
    norm = TwoSlopeNorm(vcenter=1.0, vmin=min(float(np.min(determinant)), 0.0), vmax=high)
    extents = [view.extent(panel.shape) for view, panel in zip(views, fixed)]
    spacing_mm = grid_spacing_mm(max(max(e[1], e[2]) for e in extents))
    folded_map = ListedColormap([FOLDED_COLOUR])

    titles = ["fixed", "moving", "warped", "checkerboard", "|fixed - warped|",
              f"deformed grid ({spacing_mm:g} mm)", "Jacobian det (central)"]
    heights = [PANEL_WIDTH * min(max(e[2] / e[1], 0.4), 1.6) for e in extents]
    lefts = [LEFT + c * (PANEL_WIDTH + GAP) + (COLOUR_BAR_ROOM if c >= 5 else 0.0)
             for c in range(len(titles))]
    width = lefts[-1] + PANEL_WIDTH + COLOUR_BAR_ROOM
    height = TOP + sum(heights) + GAP * (len(views) - 1) + BOTTOM
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)

    def box(left, bottom, w, h):  # inches from the bottom-left corner -> figure fractions
        return [left / width, bottom / height, w / width, h / height]

    tops = [height - TOP - sum(heights[:r]) - GAP * r for r in range(len(views))]
    for row, view in enumerate(views):
        f, m, w = fixed[row], moving[row], warped_panels[row]
        extent = extents[row]
        axes = [fig.add_axes(box(lefts[c], tops[row] - heights[row], PANEL_WIDTH, heights[row]))
                for c in range(len(titles))]
        grey = dict(cmap="gray", vmin=0, vmax=1, extent=extent, interpolation="nearest")
        for col, panel in enumerate((f, m, w, checkerboard(f, w))):
            axes[col].imshow(panel, **grey)
        difference = axes[4].imshow(np.abs(f - w), cmap="magma", vmin=0, vmax=0.3,
                                    extent=extent, interpolation="nearest")
        axes[5].imshow(f, **grey)
        _deformed_grid(axes[5], view, displacement, f.shape, spacing_mm)
        jacobian = axes[6].imshow(det_panels[row], cmap="RdBu_r", norm=norm, extent=extent,
                                  interpolation="nearest")
        fold = fold_panels[row]
        if fold.any():
            axes[6].imshow(np.ma.masked_where(~fold, np.ones(fold.shape)), cmap=folded_map,
                           vmin=0, vmax=1, extent=extent, interpolation="nearest")
        axes[0].set_ylabel(f"{view.name}\n({'kji'[view.held]} = {view.index})", fontsize=8)
        for col, axis in enumerate(axes):
            axis.set_xlim(extent[0], extent[1])
            axis.set_ylim(extent[2], extent[3])
            axis.set_xticks([])
            axis.set_yticks([])
            _letters(axis, view.letters, "black" if col == 6 else "white")
            if row == 0:
                axis.set_title(titles[col], fontsize=8, pad=3)
    span_bottom = tops[-1] - heights[-1]
    span = tops[0] - span_bottom
    for col, image, label in ((4, difference, "|fixed - warped| (normalised intensity)"),
                              (6, jacobian, "det J (central differences)")):
        bar = fig.add_axes(box(lefts[col] + PANEL_WIDTH + 0.1, span_bottom + 0.2 * span, 0.1,
                               0.6 * span))
        fig.colorbar(image, cax=bar).set_label(label, fontsize=7)
        bar.tick_params(labelsize=6)
    fig.legend(handles=[Patch(facecolor=FOLDED_COLOUR, edgecolor="black", linewidth=0.5,
                              label=f"folded, strict measure "
                                    f"({summary['folded_voxels_strict']} voxels)")],
               loc="lower right", bbox_to_anchor=(1.0 - 0.1 / width, 0.02), fontsize=7,
               frameon=False, handlelength=1.2)

    line = (f"{summary['method']}  |  NCC {summary['similarity_before']:.3f} -> "
            f"{summary['similarity_after']:.3f}  |  folding {summary['folding_percent']:.3f}% "
            f"central (ITK/Learn2Reg), {summary['folding_percent_strict']:.3f}% strict "
            f"({summary['folded_voxels_strict']} voxels)  |  det J in "
            f"[{summary['jacobian_min']:.2f}, {summary['jacobian_max']:.2f}]  |  SDlogJ "
            f"{summary['sdlogj']:.3f}  |  {summary['runtime_seconds']:.1f} s")
    if "mean_dice_after" in summary:
        line += (f"  |  Dice {summary['mean_dice_before']:.3f} -> "
                 f"{summary['mean_dice_after']:.3f}")
    fig.text(0.5, 1.0 - 0.08 / height, line, ha="center", va="top", fontsize=8)
    caption = CONVENTION + "."
    if obliquity > 1.0:
        caption += (f" Oblique storage: each row is the voxel plane nearest to its anatomical "
                    f"plane (up to {obliquity:.0f} degrees off).")
    caption += ("\nDeformed grid: the moving image's straight lines pulled back onto the fixed "
                "plane.  Strict folding: any of the 8 one-sided finite-difference det J <= 0 "
                "(central differences cannot see folds that alternate every voxel).")
    fig.text(LEFT / width, 0.06 / height, caption, ha="left", va="bottom", fontsize=6.5)
    fig.savefig(path, dpi=90)
    return path
