"""Training data loaders: a missing package names its install command; installed sources give a
3-D image and a label map on the same grid."""
import importlib.util
import io
import plistlib
import tarfile

import numpy as np
import pytest
import SimpleITK as sitk

from DeepRegistrationLib.errors import UserInputError
from training import data

EXPECTED_LABELS = {"mni152": {1, 2, 3}, "pydeface": {1}, "itk-t1": {1, 2, 3},
                   "invesalius-ct": {1, 2}, "colin27": {1, 2, 3}}
DEBIAN = {"itk-t1": "insighttoolkit5-examples", "invesalius-ct": "invesalius-examples",
          "colin27": "mricron-data"}


def _hide(monkeypatch, *names):
    real = importlib.util.find_spec

    def fake(name, *args, **kwargs):
        return None if name in names else real(name, *args, **kwargs)
    monkeypatch.setattr(importlib.util, "find_spec", fake)


def test_missing_pip_packages_name_the_install_command(monkeypatch):
    _hide(monkeypatch, "nilearn", "pydeface")
    with pytest.raises(UserInputError, match=r"python -m pip install nilearn"):
        data.load_mni152()  # not load_source: that one caches volumes already loaded
    with pytest.raises(UserInputError, match=r"python -m pip install --no-deps pydeface"):
        data.load_pydeface()
    assert "mni152" not in data.available_sources()
    assert "pydeface" not in data.available_sources()


def test_missing_debian_packages_name_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "DEBIAN_DOC", str(tmp_path))
    with pytest.raises(UserInputError, match=r"apt-get install -y insighttoolkit5-examples"):
        data.load_itk_t1()
    with pytest.raises(UserInputError, match=r"apt-get install -y invesalius-examples"):
        data.load_invesalius_ct()
    # installed, but /usr/share/doc stripped by dpkg (slim images): say how to get the files
    (tmp_path / "invesalius-examples").mkdir()
    with pytest.raises(UserInputError, match=r"--reinstall invesalius-examples"):
        data.locate_invesalius_ct()
    assert not {"itk-t1", "invesalius-ct"} & set(data.available_sources())
    monkeypatch.setattr(data, "MRICRON_TEMPLATES", str(tmp_path / "templates"))
    with pytest.raises(UserInputError, match=r"apt-get install -y mricron-data"):
        data.load_colin27()
    assert "colin27" not in data.available_sources()
    _hide(monkeypatch, "nilearn", "pydeface")
    with pytest.raises(UserInputError, match="install_data.sh"):
        data.parse_sources("all")
    with pytest.raises(UserInputError, match="unknown data source 'brains'"):
        data.parse_sources("mni152,brains")


def test_inv3_reader_geometry(tmp_path):
    """A tiny InVesalius project: raw int16 C-order volume + plist, read with its spacing."""
    volume = np.arange(4 * 5 * 6, dtype="<i2").reshape(4, 5, 6) - 60
    main = {"matrix": {"dtype": "int16", "filename": "matrix.dat", "shape": [4, 5, 6]},
            "spacing": [0.5, 0.75, 2.0], "modality": "CT"}
    path = tmp_path / "tiny.inv3"
    with tarfile.open(path, "w:gz") as archive:
        for name, payload in (("proj/main.plist", plistlib.dumps(main)),
                              ("proj/matrix.dat", volume.tobytes())):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    image = data.read_inv3(str(path))
    assert image.GetSize() == (6, 5, 4)
    assert image.GetSpacing() == (0.5, 0.75, 2.0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), volume.astype(np.float32))
    np.testing.assert_allclose(image.GetDirection(), (1, 0, 0, 0, -1, 0, 0, 0, 1))
    centre = image.TransformContinuousIndexToPhysicalPoint([2.5, 2.0, 1.5])
    np.testing.assert_allclose(centre, (0.0, 0.0, 0.0), atol=1e-9)


@pytest.mark.parametrize("name", list(data.SOURCES))
def test_installed_sources_give_labels_on_the_image_grid(name):
    source = data.SOURCES[name]
    try:
        source.locate()
    except UserInputError as error:
        if name in DEBIAN:
            pytest.skip(f"Debian package {DEBIAN[name]} is not installed here "
                        f"(apt-get install -y {DEBIAN[name]}): {error}")
        if name == "pydeface":
            pytest.skip("pydeface is not installed (it needs Python >= 3.10; "
                        "python -m pip install --no-deps pydeface)")
        raise
    volume = data.load_source(name)
    image, labels = volume.image, volume.labels
    assert image.GetDimension() == 3 and min(image.GetSize()) > 16
    assert image.GetPixelID() == sitk.sitkFloat32 and labels.GetPixelID() == sitk.sitkInt32
    assert labels.GetSize() == image.GetSize()
    np.testing.assert_allclose(labels.GetSpacing(), image.GetSpacing())
    np.testing.assert_allclose(labels.GetOrigin(), image.GetOrigin())
    np.testing.assert_allclose(labels.GetDirection(), image.GetDirection())
    values = set(np.unique(sitk.GetArrayViewFromImage(labels)).tolist()) - {0}
    assert values == EXPECTED_LABELS[name] == set(volume.label_names)
    # every label is a real structure, not a few stray voxels
    counts = np.bincount(sitk.GetArrayViewFromImage(labels).ravel())
    assert all(counts[v] > 1000 for v in values)
    # resampled to a working grid, image and labels stay together
    coarse = volume.resampled(6.0)
    assert coarse.image.GetSize() == coarse.labels.GetSize()
    assert coarse.image.GetSpacing() == (6.0, 6.0, 6.0)


def test_colin27_tissue_classes_follow_intensity_not_the_kmeans_numbering(monkeypatch, tmp_path):
    """A synthetic ch2 / ch2bet pair with three tissues: the darkest becomes CSF (3), the middle
    GM (1), the brightest WM (2), whatever order k-means numbers them in; outside the brain 0."""
    rng = np.random.default_rng(0)
    shape = (20, 24, 22)
    tissue = np.zeros(shape, np.uint8)
    tissue[4:16, 4:20, 4:18] = 1       # the brain, GM
    tissue[7:13, 8:16, 7:15] = 2       # WM inside
    tissue[9:11, 10:14, 9:13] = 3      # ventricles
    means = {1: 80.0, 2: 110.0, 3: 40.0}
    brain = np.zeros(shape, np.float32)
    for value, mean in means.items():
        brain[tissue == value] = mean + rng.normal(0, 3, int((tissue == value).sum()))
    head = brain.copy()
    head[1:19, 1:23, 1:21] = np.where(tissue[1:19, 1:23, 1:21] == 0, 60.0, head[1:19, 1:23, 1:21])
    folder = tmp_path / "templates"
    folder.mkdir()
    for name, array in zip(data.COLIN27_FILES, (head, brain)):
        sitk.WriteImage(sitk.Cast(sitk.GetImageFromArray(np.clip(array, 0, 254)), sitk.sitkUInt8),
                        str(folder / name))
    monkeypatch.setattr(data, "MRICRON_TEMPLATES", str(folder))
    volume = data.load_colin27()
    labels = sitk.GetArrayFromImage(volume.labels)
    expected = np.select([tissue == 3, tissue == 1, tissue == 2], [3, 1, 2], 0)
    assert (labels == expected).mean() > 0.99
    assert volume.image.GetPixelID() == sitk.sitkFloat32 and "colin27" in data.available_sources()


def test_label_semantics_of_the_real_volumes():
    """Tissue labels mean what they say: WM brighter than GM brighter than CSF on T1, bone
    above 300 HU on CT."""
    for name in ("mni152", "itk-t1", "colin27"):
        try:
            volume = data.load_source(name)
        except UserInputError:
            continue
        image = sitk.GetArrayFromImage(volume.image)
        labels = sitk.GetArrayFromImage(volume.labels)
        csf, grey, white = (np.median(image[labels == v]) for v in (3, 1, 2))
        assert csf < grey < white, name
    try:
        ct = data.load_source("invesalius-ct")
    except UserInputError:
        return
    image = sitk.GetArrayFromImage(ct.image)
    labels = sitk.GetArrayFromImage(ct.labels)
    assert image[labels == 2].min() > 300 and image[labels == 1].max() <= 300
    assert -1100 <= image.min() and image.max() < 4000  # Hounsfield units
