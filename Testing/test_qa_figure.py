"""The QA figure: planes chosen from the direction cosines, radiological orientation, a readable
deformed grid, and a file that shows what it should.

Oracles: one analytic object sampled at the physical voxel centres of images stored in different
orientations (SimpleITK's DICOMOrient, PermuteAxes, Flip, an oblique grid), so every storage holds
the same anatomy; marker blobs at known patient positions (left/anterior/superior...) that must
land on the matching side of each panel; hand-written slicing for plain LPS storage.
"""
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepRegistrationLib import qa
from DeepRegistrationLib.engine import RegistrationResult
from DeepRegistrationLib.metrics import folding_strict_mask
from DeepRegistrationLib.outputs import OUTPUT_FILES, write_outputs
from DeepRegistrationLib.synthetic import random_diffeomorphism
from conftest import blob_volume, make_image

# Markers (LPS mm, x -> Left, y -> Posterior, z -> Superior), one in each central plane.
MARKERS = {
    "axial": (6.0, -6.0, 0.0),      # left, anterior   -> right half, top half
    "coronal": (-6.0, 0.0, 6.0),    # right, superior  -> left half, top half
    "sagittal": (0.0, 6.0, -6.0),   # posterior, inferior -> right half, bottom half
}
EXPECTED_HALVES = {"axial": ("right", "top"), "coronal": ("left", "top"),
                   "sagittal": ("right", "bottom")}


def anatomy(points):
    """An asymmetric smooth object plus the three markers, at (N, 3) LPS points."""
    x, y, z = points.T
    value = 0.1 * np.exp(-((x - 2) ** 2 / 60 + (y + 3) ** 2 / 90 + (z - 1) ** 2 / 40))
    value += 0.02 * (x + 2 * y - 0.5 * z) / 20
    for centre in MARKERS.values():
        value += np.exp(-np.sum((points - np.array(centre)) ** 2, axis=1) / (2 * 2.0 ** 2))
    return value


def sampled(size, spacing, direction):
    """The object sampled on a grid whose centre voxel (sizes are odd) sits at LPS (0, 0, 0)."""
    image = sitk.Image([int(n) for n in size], sitk.sitkFloat64)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection(tuple(np.ravel(direction)))
    matrix = np.array(direction, dtype=np.float64).reshape(3, 3) @ np.diag(spacing)
    half = (np.array(size) - 1) // 2
    image.SetOrigin(tuple(-(matrix @ half)))
    i, j, k = np.meshgrid(*[np.arange(n) for n in size], indexing="ij")
    index = np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1).astype(np.float64)
    points = index @ matrix.T + np.array(image.GetOrigin())
    values = anatomy(points).reshape(size)                      # (i, j, k)
    out = sitk.GetImageFromArray(np.transpose(values, (2, 1, 0)))  # (k, j, i)
    out.CopyInformation(image)
    return out


@pytest.fixture(scope="module")
def reference():
    """Plain LPS storage: i -> L, j -> P, k -> S, anisotropic voxels."""
    return sampled((31, 35, 25), (1.0, 0.8, 1.4), np.eye(3))


def views_through_origin(image):
    i, j, k = image.TransformPhysicalPointToIndex((0.0, 0.0, 0.0))
    return qa.plane_views(image, (k, j, i))


def storages(reference):
    yield "LPS", reference
    for code in ("RAS", "LIP", "PIR", "ASL", "SAR"):          # axial, coronal, sagittal ... storage
        yield code, sitk.DICOMOrient(reference, code)
    yield "permuted+flipped", sitk.Flip(sitk.PermuteAxes(reference, (2, 0, 1)), (True, False, True))


def test_lps_storage_is_shown_radiologically(reference):
    array = sitk.GetArrayFromImage(reference)
    k0, j0, i0 = (n // 2 for n in array.shape)
    views = {v.name: v for v in views_through_origin(reference)}
    # hand-written: axial = array[k] with rows j (A at top), columns i (R at left = low x)
    np.testing.assert_array_equal(views["axial"].take(array), array[k0])
    # coronal: rows k reversed (S at top), columns i;  sagittal: rows k reversed, columns j
    np.testing.assert_array_equal(views["coronal"].take(array), array[:, j0, :][::-1])
    np.testing.assert_array_equal(views["sagittal"].take(array), array[:, :, i0][::-1])
    assert views["axial"].letters == ("R", "L", "A", "P")
    assert views["coronal"].letters == ("R", "L", "S", "I")
    assert views["sagittal"].letters == ("A", "P", "S", "I")
    assert (views["axial"].row_mm, views["axial"].col_mm) == (0.8, 1.0)
    assert (views["sagittal"].row_mm, views["sagittal"].col_mm) == (1.4, 0.8)


def test_every_storage_shows_the_same_anatomy_in_each_row(reference):
    expected = {v.name: (v.take(sitk.GetArrayViewFromImage(reference)), v.letters, v.row_mm,
                         v.col_mm) for v in views_through_origin(reference)}
    held_axes = set()
    for code, image in storages(reference):
        assert image.GetDirection() != reference.GetDirection() or code == "LPS"
        array = sitk.GetArrayViewFromImage(image)
        for view in views_through_origin(image):
            panel, letters, row_mm, col_mm = expected[view.name]
            np.testing.assert_allclose(view.take(array), panel, atol=1e-12,
                                       err_msg=f"{code} {view.name}")
            assert view.letters == letters and (view.row_mm, view.col_mm) == (row_mm, col_mm)
            if view.name == "axial":
                held_axes.add(view.held)
    assert held_axes == {0, 1, 2}  # the axial row really held a different voxel axis per storage


def _marker_half(panel, view):
    row, col = np.unravel_index(int(np.argmax(panel)), panel.shape)
    middle_row, middle_col = (panel.shape[0] - 1) / 2, (panel.shape[1] - 1) / 2
    return ("right" if col > middle_col else "left"), ("bottom" if row > middle_row else "top")


def test_markers_land_on_their_anatomical_side_for_oblique_storage(reference):
    # coronal storage (LIP) tilted by 20 degrees: rows must still be the nearest planes and the
    # markers must appear where a radiologist expects them
    tilt = np.array(sitk.VersorTransform((0.3, 0.8, 0.5), np.radians(20.0)).GetMatrix()).reshape(3, 3)
    coronal = np.array(sitk.DICOMOrient(reference, "LIP").GetDirection()).reshape(3, 3)
    oblique = sampled((31, 25, 35), (1.0, 1.4, 0.8), tilt @ coronal)
    lps_of_voxel, signs, angle = qa.anatomical_axes(oblique.GetDirection())
    assert lps_of_voxel == (0, 2, 1) and signs == (1, -1, 1)   # i ~ L, j ~ I, k ~ P
    assert 10.0 < angle < 20.5
    array = sitk.GetArrayViewFromImage(oblique)
    for view in views_through_origin(oblique):
        panel = view.take(array)
        assert _marker_half(panel, view) == EXPECTED_HALVES[view.name], view.name
        # the tilted plane passes <= 2.7 mm from its marker (peak 1), >= 4 mm from the others
        assert panel.max() > 0.35
    for code, image in storages(reference):
        for view in views_through_origin(image):
            panel = view.take(sitk.GetArrayViewFromImage(image))
            assert _marker_half(panel, view) == EXPECTED_HALVES[view.name], (code, view.name)


def test_anatomical_axes_pick_one_lps_axis_per_voxel_axis():
    assert qa.anatomical_axes(np.eye(3).ravel()) == ((0, 1, 2), (1, 1, 1), 0.0)
    # 45 degrees between two axes is a tie: still a permutation
    c = np.sqrt(0.5)
    axes, _, angle = qa.anatomical_axes([c, -c, 0, c, c, 0, 0, 0, 1])
    assert sorted(axes) == [0, 1, 2] and angle == pytest.approx(45.0)


def _grid_lines(view, displacement_kji, shape, spacing):
    from matplotlib.figure import Figure
    axis = Figure().add_subplot()
    contour_sets = qa._deformed_grid(axis, view, displacement_kji, shape, spacing)
    return [np.concatenate(s) for cs in contour_sets for s in cs.allsegs if s]


def test_deformed_grid_lines_follow_the_field_in_millimetres(reference):
    array = sitk.GetArrayViewFromImage(reference)
    axial = views_through_origin(reference)[0]
    shape = axial.take(array).shape                          # rows j (0.8 mm), columns i (1 mm)
    still = np.zeros((3,) + array.shape)
    lines = _grid_lines(axial, still, shape, 5.0)
    verticals = sorted(float(np.median(line[:, 0])) for line in lines
                       if np.ptp(line[:, 0]) < 1e-6)
    assert verticals == pytest.approx([5.0, 10.0, 15.0, 20.0, 25.0, 30.0])
    # the moving image 3 mm further left (+x): its line at x = L lies at L - 3 on the fixed plane
    shifted = still.copy()
    shifted[2] = 3.0                                         # +3 voxels of 1 mm along i (x)
    moved = sorted(float(np.median(line[:, 0])) for line in _grid_lines(axial, shifted, shape, 5.0)
                   if np.ptp(line[:, 0]) < 1e-6)
    assert moved == pytest.approx([2.0, 7.0, 12.0, 17.0, 22.0, 27.0])
    # the same physical motion in RAS storage (i runs to the right: u_i = -3) draws the same lines
    ras = sitk.DICOMOrient(reference, "RAS")
    ras_axial = views_through_origin(ras)[0]
    ras_field = np.zeros((3,) + sitk.GetArrayViewFromImage(ras).shape)
    ras_field[2] = -3.0
    ras_lines = sorted(float(np.median(line[:, 0]))
                       for line in _grid_lines(ras_axial, ras_field, shape, 5.0)
                       if np.ptp(line[:, 0]) < 1e-6)
    assert ras_lines == pytest.approx(moved)


def test_grid_spacing_is_ten_millimetres_on_a_head():
    assert qa.grid_spacing_mm(180.0) == 10.0
    assert qa.grid_spacing_mm(30.0) == 5.0
    assert qa.grid_spacing_mm(8.0) == 1.0


def _lime_pixels(path):
    from matplotlib.image import imread
    rgb = imread(str(path))[..., :3]
    target = np.array([0x39, 0xFF, 0x14]) / 255.0
    return int(np.count_nonzero(np.all(np.abs(rgb - target) < 0.02, axis=-1))), rgb


def _result(fixed, field):
    moving = make_image(blob_volume(sitk.GetArrayViewFromImage(fixed).shape, seed=5),
                        spacing=fixed.GetSpacing(), origin=fixed.GetOrigin(),
                        direction=fixed.GetDirection())
    return RegistrationResult(fixed, moving, field, "test", "lncc", 0, "cpu", 0.1)


def test_figure_and_folding_file_mark_an_odd_even_fold(tmp_path):
    shape = (21, 24, 22)
    fixed = make_image(blob_volume(shape, seed=4), spacing=(1.5, 1.5, 1.5))
    field = random_diffeomorphism(shape, magnitude=1.0, control_spacing=6, seed=2)
    folded_field = field.clone()
    # an odd-even fold along i in a 4x4x4 patch away from the centre: central differences miss it
    folded_field[0, 2, 4:8, 4:8, 4:8] += 0.7 * (-1.0) ** torch.arange(4, 8, dtype=torch.float32)

    clean = write_outputs(_result(fixed, field), str(tmp_path / "clean"), figure=True)
    folded = write_outputs(_result(fixed, folded_field), str(tmp_path / "folded"), figure=True)
    assert clean["folded_voxels_strict"] == 0 and folded["folded_voxels_strict"] > 20
    assert folded["folding_percent_strict"] > folded["folding_percent"]
    worst = folded["worst_folding"]
    assert all(4 <= v < 8 for v in worst["index_kji"])      # the planes go through the patch
    assert worst["determinant"] <= 0 < worst["determinant_central"]
    assert worst["determinant"] == pytest.approx(folded["jacobian_min_strict"])

    mask_image = sitk.ReadImage(str(tmp_path / "folded" / OUTPUT_FILES["folding"]))
    assert mask_image.GetPixelID() == sitk.sitkUInt8
    assert mask_image.GetSpacing() == fixed.GetSpacing()
    mask = sitk.GetArrayFromImage(mask_image)
    np.testing.assert_array_equal(mask.astype(bool), folding_strict_mask(folded_field))
    assert json.loads((tmp_path / "folded" / "summary.json").read_text())["outputs"]["folding"] \
        == OUTPUT_FILES["folding"]

    clean_lime, clean_rgb = _lime_pixels(tmp_path / "clean" / OUTPUT_FILES["qa"])
    folded_lime, _ = _lime_pixels(tmp_path / "folded" / OUTPUT_FILES["qa"])
    assert clean_lime > 10                    # the legend shows the folded colour without folds
    assert folded_lime > clean_lime + 30      # and the panels mark the odd-even fold
    assert clean_rgb.shape[0] > 300 and clean_rgb.shape[1] > 900 and clean_rgb.std() > 0.1
