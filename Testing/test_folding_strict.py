"""The strict (one-sided) folding measure against independent computations.

Oracles: one-sided Jacobians written out here with ``np.diff`` and ``np.linalg.det``; SimpleITK's
central-difference ``DisplacementFieldJacobianDeterminant`` and ``numpy.gradient`` (both blind to
odd-even folds); and, for what "folded" means, the order of the mapped points themselves (a 1-D
map folds where ``x + u(x)`` stops increasing).
"""
import itertools

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepRegistrationLib import losses, metrics, spatial
from DeepRegistrationLib.outputs import displacement_field_image
from DeepRegistrationLib.synthetic import random_diffeomorphism
from conftest import make_image, oblique_direction


def numpy_one_sided_determinants(u_kji):
    """The 8 one-sided determinants of x -> x + u(x) for a (3, D, H, W) voxel field, by hand.

    Forward difference u(x + e) - u(x) and backward u(x) - u(x - e) along each axis; at a border
    voxel the missing side takes the only difference there is. Returns (8, D, H, W).
    """
    u = np.asarray(u_kji, np.float64)
    sides = []
    for axis in range(3):
        step = np.diff(u, axis=axis + 1)
        last = np.take(step, [step.shape[axis + 1] - 1], axis=axis + 1)
        first = np.take(step, [0], axis=axis + 1)
        sides.append((np.concatenate([step, last], axis=axis + 1),     # forward
                      np.concatenate([first, step], axis=axis + 1)))   # backward
    results = []
    for choice in itertools.product((0, 1), repeat=3):
        # matrix[..., c, d] = delta_cd + du_c/dx_d with the chosen side on axis d
        columns = [sides[d][choice[d]] for d in range(3)]
        matrix = np.stack(columns, axis=1)           # (3 components, 3 axes, D, H, W)
        matrix = np.moveaxis(matrix, (0, 1), (-2, -1)) + np.eye(3)
        results.append(np.linalg.det(matrix))
    return np.stack(results)


def checkerboard_field(shape=(9, 10, 11), amplitude=0.6):
    """u_i = a (-1)^i: neighbours along i swap order (a fold every voxel) for a > 1/2."""
    i = np.arange(shape[2])
    field = np.zeros((1, 3) + tuple(shape))
    field[0, 2] = amplitude * (-1.0) ** i
    return torch.from_numpy(field)


def test_one_sided_determinants_match_numpy():
    rng = np.random.default_rng(0)
    # rough enough that many voxels fold one-sidedly, so both signs are tested
    field = torch.from_numpy(rng.normal(0, 0.4, (1, 3, 7, 8, 9)))
    expected = numpy_one_sided_determinants(field[0].numpy())
    ours = torch.stack(list(spatial.one_sided_jacobian_determinants(field)))[:, 0].numpy()
    # the same set of 8 at every voxel (order aside): compare sorted
    np.testing.assert_allclose(np.sort(ours, axis=0), np.sort(expected, axis=0), atol=1e-12)
    strict = metrics.strict_jacobian_determinant_map(field)
    np.testing.assert_allclose(strict, expected.min(axis=0), atol=1e-12)
    assert 0.05 < (strict <= 0).mean() < 0.95
    np.testing.assert_array_equal(metrics.folding_strict_mask(field), expected.min(axis=0) <= 0)
    assert metrics.folding_percent_strict(field) == pytest.approx(
        100.0 * (expected.min(axis=0) <= 0).mean())


def test_central_determinant_is_the_mean_of_the_one_sided_ones():
    # the determinant is linear in each column: central = mean of the 8, so strict <= central
    rng = np.random.default_rng(1)
    field = rng.normal(0, 0.3, (1, 3, 6, 7, 8))
    corners = numpy_one_sided_determinants(field[0])
    central = metrics.jacobian_determinant_map(field)
    np.testing.assert_allclose(central, corners.mean(axis=0), atol=1e-12)
    assert (metrics.strict_jacobian_determinant_map(field) <= central + 1e-12).all()


def test_checkerboard_fold_is_strictly_folded_where_central_differences_see_none():
    shape = (9, 10, 11)
    field = checkerboard_field(shape, amplitude=0.6)
    # what folding means: the mapped i-coordinates are not increasing between neighbours
    mapped = np.arange(shape[2]) + field[0, 2, 0, 0].numpy()
    assert (np.diff(mapped) <= 0).any()

    central = metrics.jacobian_determinant_map(field)
    inner = (slice(None), slice(None), slice(1, -1))
    np.testing.assert_allclose(central[inner], 1.0)                 # blind inside
    # ITK's filter (central differences) agrees: det 1 inside, no fold seen
    theirs = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(
        displacement_field_image(field.float(), make_image(np.zeros(shape, np.float32))), True))
    np.testing.assert_allclose(theirs[1:-1, 1:-1, 1:-1], 1.0, atol=1e-6)

    strict = metrics.strict_jacobian_determinant_map(field)
    np.testing.assert_allclose(strict[inner], 1.0 - 2 * 0.6)        # 1 - 2a inside
    # a voxel is folded where the map reverses the order of it and either neighbour along i;
    # with 11 voxels the last pair (9, 10) keeps its order, so the last column is not folded
    reversed_pair = np.diff(mapped) <= 0
    folded_1d = np.zeros(shape[2], bool)
    folded_1d[:-1] |= reversed_pair
    folded_1d[1:] |= reversed_pair
    assert not folded_1d[-1] and folded_1d[:-1].all()
    mask = metrics.folding_strict_mask(field)
    np.testing.assert_array_equal(mask, np.broadcast_to(folded_1d, shape))
    assert metrics.folding_percent_strict(field) == pytest.approx(100.0 * 10 / 11)
    assert metrics.folding_percent(central[inner]) == 0.0


def test_local_checkerboard_inside_a_smooth_field_is_found_only_there():
    shape = (16, 16, 16)
    field = random_diffeomorphism(shape, magnitude=1.5, control_spacing=6, seed=3).double()
    patch = (slice(6, 10), slice(6, 10), slice(6, 10))
    i = torch.arange(6, 10, dtype=torch.float64)
    field[(0, 2) + patch] += 0.7 * (-1.0) ** i
    strict_folded = metrics.folding_strict_mask(field)
    central_folded = metrics.jacobian_determinant_map(field) <= 0
    assert strict_folded[patch].mean() > 0.5
    outside = np.ones(shape, bool)
    outside[5:11, 5:11, 5:11] = False   # the patch and the voxels whose differences touch it
    assert not strict_folded[outside].any()
    assert strict_folded.sum() > 3 * central_folded.sum()


def compressive_bump(shape=(17, 17, 17), strength=2.0, sigma=2.5):
    """u_i = -s (x_i - c) g(x): near the centre d(x_i + u_i)/dx_i = 1 - s < 0, a smooth fold."""
    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    centre = [(n - 1) / 2 for n in shape]
    bump = np.exp(-((k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2)
                  / (2 * sigma ** 2))
    field = np.zeros((1, 3) + tuple(shape))
    field[0, 2] = -strength * (i - centre[2]) * bump
    return field


def test_smooth_fold_is_found_by_both_measures():
    field = compressive_bump()
    row = np.arange(17) + field[0, 2, 8, 8]
    assert (np.diff(row) <= 0).any()                                # a real fold on the centre row
    central = metrics.jacobian_determinant_map(field)
    strict = metrics.strict_jacobian_determinant_map(field)
    assert central[8, 8, 8] < 0 and strict[8, 8, 8] < 0
    assert (central <= 0).sum() >= 5
    # every centrally folded voxel is strictly folded (strict <= central everywhere)
    assert ((strict <= 0) | ~(central <= 0)).all()
    # a mild bump does not fold by either measure
    mild = compressive_bump(strength=0.5)
    assert metrics.folding_percent(metrics.jacobian_determinant_map(mild)) == 0.0
    assert metrics.folding_percent_strict(mild) == 0.0


def test_smooth_diffeomorphism_has_no_strict_folds():
    for seed in range(3):
        field = random_diffeomorphism((20, 22, 18), magnitude=4.0, control_spacing=6, seed=seed)
        strict = metrics.strict_jacobian_determinant_map(field)
        central = metrics.jacobian_determinant_map(field)
        assert strict.min() > 0 and metrics.folding_percent_strict(field) == 0.0
        assert strict.min() < central.min()      # the strict value is a different, lower number
        assert central.std() > 0.05              # a real deformation


def test_slabs_give_the_whole_volume_result(monkeypatch):
    field = torch.from_numpy(np.random.default_rng(2).normal(0, 0.4, (1, 3, 11, 6, 7)))
    with torch.no_grad():
        whole_strict = spatial.strict_jacobian_determinant(field)[0].numpy()
        whole_central = spatial.jacobian_determinant(field)[0].numpy()
    for slab in (1, 2, 3, 16):
        monkeypatch.setattr(metrics, "SLAB", slab)
        np.testing.assert_array_equal(metrics._by_slabs(spatial.strict_jacobian_determinant,
                                                        field, slab), whole_strict)
        np.testing.assert_array_equal(metrics._by_slabs(spatial.jacobian_determinant, field,
                                                        slab), whole_central)


def test_strict_determinant_is_the_physical_one_on_an_oblique_grid():
    """One-sided physical Jacobians from the exported LPS-mm field: I + [dU/dv] (D S)^-1 with the
    differences taken along each voxel axis v; their determinants equal the voxel-unit ones."""
    shape = (12, 14, 10)
    reference = make_image(np.zeros(shape, np.float32), spacing=(1.2, 0.8, 2.0),
                           direction=oblique_direction())
    field = random_diffeomorphism(shape, magnitude=3.0, control_spacing=4, seed=5).double()
    field[0, 2, 4:8, 4:8, 4:8] += 0.6 * (-1.0) ** torch.arange(4, 8, dtype=torch.float64)
    vectors = sitk.GetArrayFromImage(displacement_field_image(field, reference)).astype(np.float64)
    linear = np.array(reference.GetDirection()).reshape(3, 3) @ np.diag(reference.GetSpacing())
    inverse = np.linalg.inv(linear)          # physical -> (i, j, k) index
    sides = []
    for axis in range(3):                    # numpy axes (k, j, i); index axis 2 - axis
        step = np.diff(vectors, axis=axis)
        sides.append((np.concatenate([step, np.take(step, [-1], axis=axis)], axis=axis),
                      np.concatenate([np.take(step, [0], axis=axis), step], axis=axis)))
    minimum = np.full(shape, np.inf)
    for choice in itertools.product((0, 1), repeat=3):
        # dU/d(index i, j, k): columns in (i, j, k) order = numpy axes (2, 1, 0)
        by_index = np.stack([sides[2 - c][choice[c]] for c in range(3)], axis=-1)
        physical = np.eye(3) + by_index @ inverse
        minimum = np.minimum(minimum, np.linalg.det(physical))
    ours = metrics.strict_jacobian_determinant_map(field)
    np.testing.assert_allclose(ours, minimum, atol=2e-5)  # the file holds float32
    assert (ours <= 0).any() and (ours > 0).any()


def test_regularisers_see_an_odd_even_fold():
    a = 0.6
    field = checkerboard_field((8, 9, 10), a).float()
    # central differences (numpy.gradient) are blind to it inside the grid
    central = np.stack(np.gradient(field[0].numpy(), axis=(1, 2, 3)))
    assert np.abs(central[:, :, 1:-1, 1:-1, 1:-1]).max() == 0.0
    # forward differences: u_i changes by +-2a between every pair of neighbours along i
    assert losses.diffusion_loss(field).item() == pytest.approx(0.5 * (2 * a) ** 2, rel=1e-6)
    # folding penalty: inside, 4 of the 8 corners have det 1 - 2a and 4 have 1 + 2a; on the two
    # border columns along i both sides are the same difference, so all 8 have det 1 - 2a
    width = field.shape[-1]
    expected = ((width - 2) * 0.5 + 2 * 1.0) / width * (2 * a - 1)
    assert losses.negative_jacobian_loss(field).item() == pytest.approx(expected, rel=1e-5)
    smooth = random_diffeomorphism((8, 9, 10), magnitude=1.0, control_spacing=4, seed=1)
    assert losses.negative_jacobian_loss(smooth).item() == 0.0


def test_folding_penalty_has_gradients_that_unfold():
    field = checkerboard_field((6, 6, 8), 0.6).float().requires_grad_(True)
    loss = losses.negative_jacobian_loss(field)
    loss.backward()
    with torch.no_grad():
        stepped = field - 0.1 * field.grad / field.grad.abs().max()
    assert losses.negative_jacobian_loss(stepped) < loss


def test_evaluation_tables_report_strict_folding_beside_central():
    from training import evaluate as ev
    shape = (16, 18, 17)
    image = make_image(np.random.default_rng(3).random(shape).astype(np.float32))
    labels = make_image((np.arange(17) > 8).astype(np.int32)[None, None].repeat(16, 0)
                        .repeat(18, 1))
    case = ev.Case("c", image, image, labels, labels, torch.zeros((1, 3) + shape))
    field = torch.zeros_like(case.truth)
    field[0, 2, 6:10, 6:10, 6:10] = 0.7 * (-1.0) ** torch.arange(6, 10, dtype=torch.float32)
    values = ev.field_metrics(case, field)
    expected = 100.0 * metrics.folding_strict_mask(field).mean()
    assert values["folding_percent"] == 0.0
    assert values["folding_percent_strict"] == pytest.approx(expected) and expected > 0
    row = ev._row(case, "checkerboard", "method", dict(values, seconds=1.0, peak_mib=1.0), "ok",
                  "")
    for table in (ev.summary_table([row]), ev.case_table([row])):
        header, _, line = table.splitlines()[:3]
        cells = dict(zip([c.strip() for c in header.split("|")],
                         [c.strip() for c in line.split("|")]))
        assert cells["folding %"] == "0.0000"
        assert cells["strict folding %"] == f"{expected:.4f}"
