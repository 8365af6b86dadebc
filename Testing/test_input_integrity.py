"""A truncated or corrupt image file is refused on one line (exit 2) before any work, in every
format the library reads, and nothing is created.

The files are real: written by SimpleITK (attached and detached headers, raw and compressed) and
then cut short like ``head -c`` would, or with bytes of the compressed stream overwritten. For
NIfTI the test also shows the hazard the check exists for: ITK reads the cut file without error
(the missing voxels as zeros) while nibabel, reading the same bytes, fails.
"""
import os
import re

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk

from DeepRegistrationLib.cli import main
from DeepRegistrationLib.images import load_image, read_image
from conftest import blob_volume, make_image

SHAPE = (12, 14, 16)
# name -> (file name, compressed): every way SimpleITK writes the formats the library reads
FORMATS = {
    "nii": ("image.nii", False), "nii.gz": ("image.nii.gz", True),
    "nrrd": ("image.nrrd", False), "nrrd-gzip": ("image.nrrd", True),
    "nhdr+raw": ("image.nhdr", False), "nhdr+raw.gz": ("image.nhdr", True),
    "mha": ("image.mha", False), "mha-zlib": ("image.mha", True),
    "mhd+raw": ("image.mhd", False), "mhd+zraw": ("image.mhd", True),
}


def _array(dtype=np.float32):
    """A head-like volume: blobs on a zero background, so compressed files are small."""
    array = blob_volume(SHAPE, seed=3)
    array[array < 0.2] = 0
    return (array * 1000).astype(dtype)


def _write(folder, kind, array):
    """Write ``array`` as ``kind``; return (header path, path of the file holding the data)."""
    name, compressed = FORMATS[kind]
    folder = os.path.join(str(folder), kind)
    os.makedirs(folder)
    path = os.path.join(folder, name)
    sitk.WriteImage(make_image(array, spacing=(1.0, 1.1, 1.2)), path, useCompression=compressed)
    header = open(path, "rb").read(2048).decode("latin-1")
    detached = re.search(r"^(?:data file: |ElementDataFile = )(\S+)$", header, re.M)
    if detached and detached.group(1) != "LOCAL":
        return path, os.path.join(folder, detached.group(1))
    return path, path


def _cut(path, keep):
    data = open(path, "rb").read()
    keep = keep if keep > 0 else len(data) + keep
    with open(path, "wb") as handle:
        handle.write(data[:keep])


def _data_start(path, data_path):
    """Where the pixel data starts in ``data_path`` (attached headers: after the header)."""
    if path != data_path:
        return 0
    if path.endswith((".nii", ".nii.gz")):
        return 352
    data = open(path, "rb").read()
    end = data.index(b"\n\n") + 2 if path.endswith(".nrrd") else \
        data.index(b"\n", data.index(b"ElementDataFile")) + 1
    return end


def _one_error_line(capfd, argv):
    """Exit code and stderr lines (file-descriptor level: ITK's C++ output counts too)."""
    code = main(argv)
    err = capfd.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


@pytest.fixture
def good_moving(tmp_path):
    path = str(tmp_path / "moving.nrrd")
    sitk.WriteImage(make_image(_array(), spacing=(1.0, 1.1, 1.2)), path)
    return path


@pytest.mark.parametrize("kind", sorted(FORMATS))
def test_intact_files_read_back_exactly(kind, tmp_path):
    """The control: each test file is valid and the check lets it through unchanged."""
    array = _array()
    path, _ = _write(tmp_path, kind, array)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(path)), array)


@pytest.mark.parametrize("where", ["half", "last bytes"])
@pytest.mark.parametrize("kind", sorted(FORMATS))
def test_truncated_file_is_one_line_exit_2_and_nothing_is_created(kind, where, tmp_path, capfd,
                                                                  good_moving):
    path, data_path = _write(tmp_path, kind, _array())
    start = _data_start(path, data_path)
    size = os.path.getsize(data_path)
    # "half": half of the data gone; "last bytes": only the last 7 bytes (for a gzip file its
    # CRC and length trailer, for a raw file two voxels)
    _cut(data_path, start + (size - start) // 2 if where == "half" else -7)
    out = tmp_path / "result"
    code, lines = _one_error_line(capfd, ["register", path, good_moving, "--output", str(out)])
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("deepreg: error: fixed image") and "truncated or damaged" in lines[0]
    assert not out.exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no staging folder


@pytest.mark.parametrize("kind", ["nii", "nii.gz"])
def test_itk_alone_reads_a_cut_nifti_as_zeros_but_nibabel_and_the_loader_refuse_it(kind,
                                                                                   tmp_path):
    """Why the check exists: without it the loader would hand zeros to the registration."""
    array = _array()
    path, _ = _write(tmp_path, kind, array)
    _cut(path, os.path.getsize(path) // 2 + 176)  # half the data, or half the gzip stream
    cut = sitk.GetArrayFromImage(sitk.ReadImage(path))  # no error from ITK ...
    lost = cut != array
    assert cut.shape == array.shape and lost.any() and np.all(cut[lost] == 0)  # ... only zeros
    with pytest.raises(Exception):  # ... but nibabel sees the file is short
        np.asanyarray(nibabel.load(path).dataobj)
    from DeepRegistrationLib.errors import UserInputError
    with pytest.raises(UserInputError, match="truncated or damaged"):
        load_image(path, "fixed image")


@pytest.mark.parametrize("kind", ["nii.gz", "nrrd-gzip", "nhdr+raw.gz", "mha-zlib", "mhd+zraw"])
def test_corrupt_compressed_data_is_refused(kind, tmp_path, capfd, good_moving):
    """Bytes overwritten inside the compressed stream (length unchanged): gzip's CRC or the
    deflate stream itself gives it away."""
    path, data_path = _write(tmp_path, kind, _array())
    data = bytearray(open(data_path, "rb").read())
    start = _data_start(path, data_path)
    middle = start + (len(data) - start) // 2
    data[middle:middle + 16] = bytes(255 - b for b in data[middle:middle + 16])
    open(data_path, "wb").write(bytes(data))
    code, lines = _one_error_line(capfd, ["register", path, good_moving, "--output",
                                          str(tmp_path / "out")])
    assert code == 2 and len(lines) == 1, lines
    assert "truncated or damaged" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["nhdr+raw", "mhd+raw"])
def test_missing_data_file_is_named(kind, tmp_path, capfd, good_moving):
    path, data_path = _write(tmp_path, kind, _array())
    os.remove(data_path)
    code, lines = _one_error_line(capfd, ["register", good_moving, path, "--output",
                                          str(tmp_path / "out")])
    assert code == 2 and len(lines) == 1, lines
    assert "moving image" in lines[0] and os.path.basename(data_path) in lines[0] \
        and "missing" in lines[0]


def test_integer_nifti_and_truncated_labels(tmp_path, capfd, good_moving):
    """The uncompressed-integer path (file size only) and a label map cut short."""
    labels = (_array() > 300).astype(np.int16)
    path, _ = _write(tmp_path, "nii", labels)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(path)), labels)
    _cut(path, -3)
    fixed, _ = _write(tmp_path, "mha", _array())
    code, lines = _one_error_line(capfd, ["register", fixed, good_moving, "--output",
                                          str(tmp_path / "out"), "--fixed-labels", path,
                                          "--moving-labels", path])
    assert code == 2 and len(lines) == 1 and "fixed labels" in lines[0] \
        and "truncated or damaged" in lines[0], lines


def test_nan_count_of_a_compressed_float_nifti_spans_read_blocks(tmp_path):
    """NaN voxels are counted while the data streams past in 4 MiB blocks: those on either side
    of a block boundary are each counted once."""
    array = np.ones((64, 128, 130), np.float32)  # 4.26 MB of data: two read blocks
    flat = array.reshape(-1)
    boundary = ((1 << 22) - 352) // 4
    flat[[0, 5, boundary - 1, boundary, boundary + 1, flat.size - 1]] = np.nan
    flat[1000:1010] = np.arange(10)  # not constant
    path = str(tmp_path / "nan.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(array), path, useCompression=True)
    _, notes = load_image(path, "moving image")
    assert any("6 NaN/inf voxels in the NIfTI file were read as 0" in n for n in notes), notes
