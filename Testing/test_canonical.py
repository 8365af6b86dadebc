"""Canonical network input against SimpleITK: DICOMOrient's orientation, the canvas resampling,
the exact way back to the fixed grid, the framing, and a network that no longer cares how the
volume was stored."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepRegistrationLib.canonical import canonical_direction, canonical_frame, whole_image_frame
from DeepRegistrationLib.images import image_to_tensor, physical_grid
from DeepRegistrationLib.methods.base import MethodSpec, RegistrationInputs, run_network
from DeepRegistrationLib.methods.vmdiff import VoxelMorphDiff
from DeepRegistrationLib.outputs import displacement_to_physical, physical_to_displacement
from conftest import blob_volume, make_image, oblique_direction

CORONAL = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])   # j superior, k anterior
SAGITTAL = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # i posterior, k right
STORAGES = {"coronal": CORONAL, "sagittal": SAGITTAL, "oblique": oblique_direction(0.4)}


def stored(direction, shape=(22, 30, 26), spacing=(1.1, 0.9, 1.6), seed=5):
    """A blob volume stored with ``direction`` (anisotropic voxels, origin off zero)."""
    return make_image(blob_volume(shape, seed=seed), spacing=spacing,
                      origin=(-12.0, 7.0, 20.0), direction=np.asarray(direction).ravel())


def affine_vectors(points):
    """A smooth physical displacement (LPS mm) that linear interpolation reproduces exactly."""
    matrix = np.array([[0.04, -0.02, 0.01], [0.03, 0.02, -0.05], [-0.01, 0.06, 0.03]])
    return points @ matrix.T + np.array([1.5, -2.0, 0.7])


@pytest.mark.parametrize("name", list(STORAGES))
def test_orientation_is_dicomorient_lps(name):
    image = stored(STORAGES[name])
    expected = sitk.DICOMOrient(image, "LPS")
    np.testing.assert_allclose(canonical_direction(image).ravel(), expected.GetDirection(),
                               atol=1e-12)
    # at the image's own spacing the canvas over the whole image is DICOMOrient's image itself
    frame = whole_image_frame(image, None)
    assert frame.size == expected.GetSize()
    np.testing.assert_allclose(frame.origin, expected.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(frame.spacing, expected.GetSpacing(), atol=1e-12)
    canvas = frame.to_canvas(image_to_tensor(image, normalise=False))[0, 0].numpy()
    np.testing.assert_allclose(canvas, sitk.GetArrayFromImage(expected), atol=1e-5)


@pytest.mark.parametrize("name", list(STORAGES))
def test_canvas_matches_simpleitk_resample(name):
    image = stored(STORAGES[name])
    frame = canonical_frame(image_to_tensor(image), image_to_tensor(image), image, 2.0, 8)
    assert all(n % 8 == 0 for n in frame.size)
    reference = frame.reference_image()
    theirs = sitk.GetArrayFromImage(sitk.Resample(image, reference, sitk.Transform(),
                                                  sitk.sitkLinear, 0.0))
    ours = frame.to_canvas(image_to_tensor(image, normalise=False), antialias=False)[0, 0].numpy()
    # ITK and torch may decide differently for a point exactly on the half-voxel border
    close = np.isclose(ours, theirs, atol=1e-4)
    assert close.mean() > 0.995, f"{(~close).sum()} of {close.size} canvas voxels differ"
    assert np.abs(theirs).max() > 0.5


@pytest.mark.parametrize("name", list(STORAGES))
def test_field_maps_back_exactly_to_the_fixed_grid(name):
    image = stored(STORAGES[name])
    frame = canonical_frame(image_to_tensor(image), image_to_tensor(image), image, 2.0, 8)
    reference = frame.reference_image()
    canvas_vectors = affine_vectors(physical_grid(reference).numpy())
    canvas_field = physical_to_displacement(canvas_vectors, reference)
    back = frame.field_to_fixed(canvas_field)
    ours = displacement_to_physical(back, image)
    expected = affine_vectors(physical_grid(image).numpy())
    # fixed voxels inside the canvas: linear interpolation of an affine field is exact
    inside = _inside(image, reference)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(ours[inside], expected[inside], atol=2e-4)
    # and SimpleITK, resampling through the canvas field itself, agrees with the fixed field
    moving = stored(np.eye(3), shape=(40, 40, 40), spacing=(1.0, 1.0, 1.0), seed=9)
    moving.SetOrigin(tuple(np.array(image.GetOrigin()) - 20.0))
    canvas_image = sitk.GetImageFromArray(canvas_vectors.astype(np.float64), isVector=True)
    canvas_image.CopyInformation(reference)
    transform = sitk.DisplacementFieldTransform(canvas_image)
    theirs = sitk.GetArrayFromImage(sitk.Resample(moving, image, transform, sitk.sitkLinear, 0.0))
    mine = sitk.DisplacementFieldTransform(sitk.Cast(_field_image(ours, image),
                                                     sitk.sitkVectorFloat64))
    mine = sitk.GetArrayFromImage(sitk.Resample(moving, image, mine, sitk.sitkLinear, 0.0))
    np.testing.assert_allclose(mine[inside], theirs[inside], atol=1e-3)


def _field_image(vectors, reference):
    field = sitk.GetImageFromArray(vectors.astype(np.float64), isVector=True)
    field.CopyInformation(reference)
    return field


def _inside(image, reference):
    """Fixed voxels whose physical point lies within the canvas' voxel centres."""
    points = physical_grid(image).numpy()
    matrix = np.linalg.inv(_index_matrix(reference))
    index = points @ matrix[:3, :3].T + matrix[:3, 3]
    return np.all((index >= 0) & (index <= np.array(reference.GetSize()) - 1), axis=-1)


def _index_matrix(reference):
    matrix = np.eye(4)
    matrix[:3, :3] = np.array(reference.GetDirection()).reshape(3, 3) @ np.diag(
        reference.GetSpacing())
    matrix[:3, 3] = reference.GetOrigin()
    return matrix


def test_framing_crops_a_large_field_of_view_and_pads_a_tight_one():
    # a small head-like blob in a large, mostly empty field of view: cropped to blob + margin
    array = np.zeros((100, 110, 120), np.float32)
    array[30:46, 40:60, 65:85] = blob_volume((16, 20, 20), seed=2) + 0.5
    large = make_image(array, spacing=(1.0, 1.0, 1.0))
    tensor = image_to_tensor(large)
    frame = canonical_frame(tensor, tensor, large, 2.0, 16, margin_mm=10.0)
    # box (20, 20, 16) mm + 2 x 10 mm margin = 20 or 18 voxels of 2 mm -> 32 (multiple of 16)
    assert frame.size == (32, 32, 32), frame.size
    assert np.all(np.array(frame.size) * 2.0 < np.array(large.GetSize()) * 0.7)
    assert all(n % 16 == 0 for n in frame.size)
    canvas = frame.to_canvas(tensor)[0, 0].numpy()
    # the whole foreground is on the canvas, centred, with at least the margin around it
    mass = float(tensor.sum()) / 8.0  # 1 mm voxels onto 2 mm voxels
    assert abs(float(canvas.sum()) - mass) < 0.02 * mass
    rows = np.argwhere(canvas > 0.25)
    low, high = rows.min(0), rows.max(0)
    assert np.all(low >= 4) and np.all(np.array(canvas.shape) - 1 - high >= 4), (low, high)
    assert np.all(np.abs((low + high) / 2.0 - (np.array(canvas.shape) - 1) / 2.0) <= 1.5)
    # a tight crop (anatomy touching every border) gets the margin around it, not truncation
    head = 1.0 + 0.3 * blob_volume((20, 24, 22), seed=4)
    head[8:12, 10:14, 9:13] = 0.0  # a dark ventricle: the darkest 1% of the crop
    tight = make_image(head, spacing=(2.0, 2.0, 2.0))
    tight_tensor = image_to_tensor(tight)
    frame = canonical_frame(tight_tensor, tight_tensor, tight, 2.0, 16, margin_mm=10.0)
    assert all(n >= m + 10 for n, m in zip(frame.size, tight.GetSize())), frame.size
    canvas = frame.to_canvas(tight_tensor)[0, 0].numpy()
    assert abs(float(canvas.sum()) - float(tight_tensor.sum())) < 1e-3 * float(tight_tensor.sum())


def _spec():
    return MethodSpec(name="test-network", title="", paper="", description="", run=run_network,
                      working_spacing_mm=3.0, size_multiple=16)


def _random_network():
    torch.manual_seed(0)
    network = VoxelMorphDiff(encoder=(8, 16, 16), features=8, integration_steps=4)
    with torch.no_grad():  # the flow head starts near zero: make the field large enough to see
        network.flow.weight.normal_(0.0, 0.3)
    return network.eval()


def test_network_field_does_not_depend_on_storage_order():
    """The same physical pair stored axially and as a coronal permutation gives the same field
    (in LPS mm at the same physical points); without the canonical path it does not."""
    axial_fixed = stored(np.diag([-1.0, -1.0, 1.0]), shape=(30, 34, 28), spacing=(2.0, 2.0, 2.0),
                         seed=1)
    axial_moving = stored(np.diag([-1.0, -1.0, 1.0]), shape=(30, 34, 28),
                          spacing=(2.0, 2.0, 2.0), seed=3)
    # coronal storage of the same voxels: j and k swapped, one flipped, physical points kept
    coronal_fixed = sitk.Flip(sitk.PermuteAxes(axial_fixed, [0, 2, 1]), [False, True, False])
    coronal_moving = sitk.Flip(sitk.PermuteAxes(axial_moving, [0, 2, 1]), [False, True, False])
    assert np.allclose(np.array(coronal_fixed.GetDirection()).reshape(3, 3)[:, 1], [0, 0, -1])
    spec, network = _spec(), _random_network()
    fields = {}
    for label, (fixed, moving) in {"axial": (axial_fixed, axial_moving),
                                   "coronal": (coronal_fixed, coronal_moving)}.items():
        for canonical in (True, False):
            inputs = RegistrationInputs(image_to_tensor(fixed), image_to_tensor(moving),
                                        tuple(fixed.GetSpacing()[::-1]),
                                        geometry=fixed if canonical else None)
            displacement = run_network(inputs, spec, network=network)
            vectors = displacement_to_physical(displacement, fixed)
            # back on the axial grid's voxel order, to compare point by point
            fields[label, canonical] = _on_axial_grid(vectors, fixed, axial_fixed)
    size = np.abs(fields["axial", True]).max()
    assert size > 0.5, size  # the random network moves voxels by a visible amount
    difference = np.abs(fields["axial", True] - fields["coronal", True]).max()
    assert difference < 0.02 * size, (difference, size)
    stored_as_is = np.abs(fields["axial", False] - fields["coronal", False]).max()
    assert stored_as_is > 10 * difference, (stored_as_is, difference)


def _on_axial_grid(vectors, grid, axial):
    """``vectors`` (D, H, W, 3) on ``grid`` rearranged onto ``axial``'s voxels (same points)."""
    field = sitk.GetImageFromArray(vectors, isVector=True)
    field.CopyInformation(grid)
    resampled = sitk.Resample(field, axial, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0)
    return sitk.GetArrayFromImage(resampled)
