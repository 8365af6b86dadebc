"""Reading, checking and resampling images with their physical geometry.

SimpleITK images carry the geometry (origin, spacing, direction cosines, all in LPS). Arrays taken
from them are (k, j, i); the physical point of index (i, j, k) is ``origin + D S (i, j, k)^T``.
Every function that turns a user's file into an image checks it and raises
:class:`~DeepRegistrationLib.errors.UserInputError` with a message a user can act on.
"""
from __future__ import annotations

import bz2
import gzip
import os
import shutil
import zlib
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .errors import UserInputError
from .spatial import ALIGN_CORNERS

READABLE = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd)"


# ------------------------------------------------------------------------------------- reading
def read_image(path: str, role: str = "image") -> sitk.Image:
    """Read a 3-D scalar image; raise a clear :class:`UserInputError` for anything else
    (including a truncated or corrupt file, see :func:`check_file_complete`)."""
    return _read_checked(path, role)[0]


def _read_checked(path: str, role: str) -> Tuple[sitk.Image, int]:
    """:func:`read_image`, plus the NaN/inf count of a float NIfTI file (ITK reads them as 0)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserInputError(f"{role} file not found: {path}")
    if os.path.isdir(path):
        raise UserInputError(f"{role} '{path}' is a folder; give an image file ({READABLE})")
    nonfinite = check_file_complete(path, role)  # before ITK, which may read zeros or print
    try:
        image = sitk.ReadImage(path)
    except RuntimeError:
        raise UserInputError(f"cannot read {role} '{path}': not an image file SimpleITK can read "
                             f"({READABLE})") from None
    dimension = image.GetDimension()
    if dimension == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]  # a 4-D file holding one volume is a 3-D image
        dimension = 3
    if dimension != 3:
        raise UserInputError(f"{role} '{path}' is {dimension}-D (size {image.GetSize()}); "
                             "only 3-D volumes can be registered")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise UserInputError(f"{role} '{path}' has {image.GetNumberOfComponentsPerPixel()} "
                             "components per voxel (vector or colour image); give a scalar volume")
    if min(image.GetSize()) < 4:
        raise UserInputError(f"{role} '{path}' has size {image.GetSize()}; every axis needs at "
                             "least 4 voxels")
    return image, nonfinite


def check_intensities(image: sitk.Image, role: str, path: str = "") -> Tuple[sitk.Image, List[str]]:
    """Return a float32 copy with non-finite voxels replaced, and notes on what was done.

    Policy: NaN and +/-inf voxels are set to the smallest finite intensity of the image (the
    background of most scans) and reported; an image with no finite voxel, or a constant image,
    is refused because there is nothing to register.
    """
    notes = []
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    finite = np.isfinite(array)
    where = f" '{path}'" if path else ""
    if not finite.all():
        if not finite.any():
            raise UserInputError(f"{role}{where} has no finite voxel (all NaN or inf)")
        count = int((~finite).sum())
        array = array.copy()
        array[~finite] = array[finite].min()
        notes.append(f"{role}: replaced {count} NaN/inf voxels by the image minimum")
    if float(array.max()) == float(array.min()):
        raise UserInputError(f"{role}{where} is constant (every voxel = {float(array.min()):g}); "
                             "there is nothing to register")
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out, notes


def load_image(path: str, role: str = "image") -> Tuple[sitk.Image, List[str]]:
    """Read and check a volume: float32 SimpleITK image plus notes (see :func:`check_intensities`)."""
    image, hidden = _read_checked(path, role)
    if hidden and hidden >= image.GetNumberOfPixels():
        raise UserInputError(f"{role} '{path}' has no finite voxel (all NaN or inf)")
    image, notes = check_intensities(image, role, os.fspath(path))
    if hidden:
        notes.append(f"{role}: {hidden} NaN/inf voxels in the NIfTI file were read as 0 "
                     "(ITK's NIfTI reader replaces them)")
    return image, notes


# ------------------------------------------------------------------------------ complete files
# ITK reads a NIfTI file that was cut short without complaint (the missing voxels come back as
# zeros), and its MetaImage reader prints to stderr and then reports "No such file or directory".
# So before ITK sees a file, the data its header promises is counted here, decompressing what is
# compressed (which also checks gzip's CRC): a file with less is refused on one line.

def check_file_complete(path: str, role: str = "image") -> int:
    """Refuse a truncated or corrupt NIfTI, NRRD or MetaImage file (:class:`UserInputError`).

    Returns the number of NaN/inf values stored in a float NIfTI file (0 for anything else),
    counted while the data streams past, because ITK's NIfTI reader turns them into 0 silently.
    Files of other formats, and headers this check does not understand, are left to ITK.
    """
    path = os.fspath(path)
    lower = path.lower()
    if lower.endswith((".nii", ".nii.gz")):
        return _check_nifti(path, role)
    if lower.endswith((".nrrd", ".nhdr")):
        _check_nrrd(path, role)
    elif lower.endswith((".mha", ".mhd")):
        _check_metaimage(path, role)
    return 0


_STREAM_ERRORS = (EOFError, OSError, zlib.error)  # gzip.BadGzipFile is an OSError


def _damaged(role: str, path: str, what: str) -> UserInputError:
    return UserInputError(f"{role} '{path}' is truncated or damaged: {what}; copy or export the "
                          "file again")


def _holds(available: int, expected: int) -> str:
    return f"it holds {max(available, 0)} of the {expected} data bytes its header promises"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _check_nifti(path: str, role: str) -> int:
    import nibabel  # a dependency of the library; reads the header only here

    try:
        # the array proxy knows where the data starts (the loaded header's vox_offset is reset)
        proxy = nibabel.load(path).dataobj
        offset, dtype, shape = int(proxy.offset), np.dtype(proxy.dtype), tuple(proxy.shape)
    except Exception as error:  # nibabel's header errors have many types; each is the file's fault
        raise UserInputError(f"cannot read {role} '{path}': not a valid NIfTI file "
                             f"({_first_line(error)})") from None
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    floating = dtype.kind == "f"
    compressed = path.lower().endswith(".gz")
    if not compressed and not floating:
        size = os.path.getsize(path)
        if size < expected:
            raise _damaged(role, path, _holds(size - offset, expected - offset))
        return 0
    nonfinite, position, carry = 0, 0, b""
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as handle:
            # read to the end even past `expected`: gzip checks its CRC only there
            for block in iter(lambda: handle.read(1 << 22), b""):
                start, position = position, position + len(block)
                low, high = max(offset - start, 0), min(expected - start, len(block))
                if floating and high > low:
                    data = carry + block[low:high]
                    usable = len(data) - len(data) % dtype.itemsize
                    nonfinite += int(np.count_nonzero(~np.isfinite(
                        np.frombuffer(data[:usable], dtype))))
                    carry = data[usable:]
    except _STREAM_ERRORS as error:
        raise _damaged(role, path, f"the compressed data is incomplete or corrupt "
                                   f"({_first_line(error)})") from None
    if position < expected:
        raise _damaged(role, path, _holds(position - offset, expected - offset))
    return nonfinite


def _text_header(path: str, last_key: Optional[str]) -> Tuple[Dict[str, str], int, bool]:
    """``key -> value`` of a NRRD header (``key: value`` lines up to a blank line) or of a
    MetaImage header (``Key = Value`` up to ``last_key``), keys in lower case; with the byte
    offset where the header ends and whether it ended properly (False: the file stopped inside
    its header)."""
    fields: Dict[str, str] = {}
    separator = ": " if last_key is None else "="
    with open(path, "rb") as handle:
        if last_key is None:
            handle.readline()  # the NRRD000X magic line
        while True:
            line = handle.readline(1 << 16)
            if not line:
                return fields, handle.tell(), False
            text = line.decode("latin-1").strip()
            if last_key is None and not text:
                return fields, handle.tell(), True
            if text.startswith("#") or (last_key is None and ":=" in text):
                continue  # comments and NRRD key/value pairs
            key, found, value = text.partition(separator)
            if found:
                fields[key.strip().lower()] = value.strip()
                if last_key is not None and key.strip().lower() == last_key:
                    return fields, handle.tell(), True


def _element_count(sizes: str) -> int:
    return int(np.prod([int(v) for v in sizes.split()], dtype=np.int64))


def _data_file(header_path: str, name: str, role: str) -> str:
    path = name if os.path.isabs(name) else os.path.join(os.path.dirname(header_path), name)
    if not os.path.isfile(path):
        raise UserInputError(f"{role} '{header_path}' names the data file '{name}', which is "
                             f"missing (looked for {path})")
    return path


def _nrrd_type_size(name: str) -> Optional[int]:
    name = " ".join(name.lower().replace("_t", "").split())
    if name == "float":
        return 4
    if name == "double":
        return 8
    for marks, size in ((("long long", "longlong", "64"), 8), (("short", "16"), 2),
                        (("char", "8"), 1), (("int",), 4)):
        if any(mark in name for mark in marks):
            return size
    return None  # "block" or unknown: the size is not known here


def _zlib_length(handle) -> Tuple[int, bool]:
    """Bytes a zlib (or gzip) stream decompresses to, in bounded pieces, and whether it ended."""
    total, decompressor = 0, zlib.decompressobj(47)  # 32 + 15: zlib or gzip header
    for block in iter(lambda: handle.read(1 << 22), b""):
        while block and not decompressor.eof:
            total += len(decompressor.decompress(block, 1 << 24))
            block = decompressor.unconsumed_tail
        if decompressor.eof:
            break
    return total, decompressor.eof


def _stream_length(stream) -> int:
    """Bytes readable from a (decompressing) file object."""
    return sum(len(block) for block in iter(lambda: stream.read(1 << 22), b""))


def _check_nrrd(path: str, role: str) -> None:
    with open(path, "rb") as handle:
        if not handle.read(4) == b"NRRD":
            return  # not a NRRD header: ITK will say so
    fields, header_end, complete = _text_header(path, None)
    try:
        itemsize = _nrrd_type_size(fields["type"])
        expected = _element_count(fields["sizes"]) * (itemsize or 0)
        line_skip = int(fields.get("line skip", fields.get("lineskip", "0")))
        byte_skip = int(fields.get("byte skip", fields.get("byteskip", "0")))
    except (KeyError, ValueError):
        return  # a header this check does not understand: ITK decides
    encoding = fields.get("encoding", "raw").lower()
    data_name = fields.get("data file", fields.get("datafile"))
    if not itemsize or encoding not in ("raw", "gzip", "gz", "bzip2", "bz2") \
            or (data_name and (data_name.startswith("LIST") or "%" in data_name)):
        return  # text encodings, block types and file lists are left to ITK
    if data_name is None and not complete:
        raise _damaged(role, path, "the file ends inside its header")
    data_path, start = (_data_file(path, data_name, role), 0) if data_name else (path, header_end)
    with open(data_path, "rb") as handle:
        handle.seek(start)
        for _ in range(line_skip):
            handle.readline()
        if encoding == "raw":
            available = os.path.getsize(data_path) - handle.tell()
            needed = expected + max(byte_skip, 0)  # byte skip -1: the data ends the file
            if available < needed:
                raise _damaged(role, path, _holds(available - max(byte_skip, 0), expected))
            return
        try:  # these readers follow multi-member files and raise EOFError on a cut stream
            total = _stream_length(gzip.GzipFile(fileobj=handle) if encoding in ("gzip", "gz")
                                   else bz2.BZ2File(handle))
        except _STREAM_ERRORS as error:
            raise _damaged(role, path, f"the compressed data is incomplete or corrupt "
                                       f"({_first_line(error)})") from None
    if total < expected + max(byte_skip, 0):
        raise _damaged(role, path, _holds(total - max(byte_skip, 0), expected))


_META_TYPE_SIZES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4,
                    "MET_UINT": 4, "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8,
                    "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}


def _check_metaimage(path: str, role: str) -> None:
    fields, header_end, complete = _text_header(path, "elementdatafile")
    if not complete:
        if "ndims" in fields or "dimsize" in fields:
            raise _damaged(role, path, "the header has no ElementDataFile line (cut short?)")
        return  # not a MetaImage header: ITK will say so
    try:
        itemsize = _META_TYPE_SIZES.get(fields["elementtype"].upper())
        expected = _element_count(fields["dimsize"]) * (itemsize or 0) \
            * int(fields.get("elementnumberofchannels", "1"))
        header_size = int(fields.get("headersize", "0"))
    except (KeyError, ValueError):
        return  # a header this check does not understand: ITK decides
    name = fields["elementdatafile"]
    if not itemsize or name.upper().startswith("LIST") or "%" in name or len(name.split()) > 1:
        return  # file lists and patterns are left to ITK
    local = name.upper() == "LOCAL"
    data_path, start = (path, header_end) if local else (_data_file(path, name, role), 0)
    if fields.get("compresseddata", "false").lower() != "true":
        available = os.path.getsize(data_path) - start - max(header_size, 0)
        if available < expected:
            raise _damaged(role, path, _holds(available, expected))
        return
    if header_size:
        return  # skipped bytes in a compressed file: unusual, left to ITK
    with open(data_path, "rb") as handle:
        handle.seek(start)
        try:
            total, ended = _zlib_length(handle)
        except _STREAM_ERRORS as error:
            raise _damaged(role, path, f"the compressed data is incomplete or corrupt "
                                       f"({_first_line(error)})") from None
    if not ended:
        raise _damaged(role, path, "the compressed data ends before its end-of-stream marker")
    if total < expected:
        raise _damaged(role, path, _holds(total, expected))


def same_grid(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-3) -> bool:
    """True when both images have the same size, and origin/spacing/direction within tolerance."""
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=tolerance, atol=tolerance)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=tolerance,
                            atol=tolerance * max(a.GetSpacing()))
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance))


def load_labels(path: str, reference: sitk.Image, role: str = "labels") -> sitk.Image:
    """Read an integer label map that must lie on ``reference``'s grid; returns an Int32 image."""
    image = read_image(path, role)
    array = sitk.GetArrayFromImage(image)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise UserInputError(f"{role} '{path}' holds non-integer values "
                                 f"(pixel type {image.GetPixelIDTypeAsString()}); a label map "
                                 "must hold whole numbers")
    if not same_grid(image, reference):
        raise UserInputError(
            f"{role} '{path}' is not on its image's grid (labels: size {image.GetSize()}, "
            f"spacing {_fmt(image.GetSpacing())}, origin {_fmt(image.GetOrigin())}; image: size "
            f"{reference.GetSize()}, spacing {_fmt(reference.GetSpacing())}, origin "
            f"{_fmt(reference.GetOrigin())}); resample the labels onto the image first")
    out = sitk.GetImageFromArray(array.astype(np.int32))
    out.CopyInformation(reference)
    return out


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


_FLOATING = {sitk.sitkFloat32, sitk.sitkFloat64, sitk.sitkVectorFloat32, sitk.sitkVectorFloat64}


def write_image(image: sitk.Image, path: str, compression_level: Optional[int] = None) -> None:
    """Write ``image``; a ``.nii.gz`` file is compressed at zlib ``compression_level`` (0-9).

    By default integer volumes (labels, masks) get level 1, which shrinks them tens of times in
    milliseconds, and floating-point volumes level 0: a valid ``.nii.gz`` written at the speed of
    the disk, because zlib saves only about 10% on float32 images and fields (measured on the
    outputs of a 1 mm registration) at about 30 MB/s, seconds per 1 mm head. Other formats are
    written by ITK with its compression (level 1).
    """
    path = os.fspath(path)
    if not path.lower().endswith(".nii.gz"):
        sitk.WriteImage(image, path, useCompression=True, compressionLevel=1)
        return
    if compression_level is None:
        compression_level = 0 if image.GetPixelID() in _FLOATING else 1
    write_gzipped(lambda raw: sitk.WriteImage(image, raw, useCompression=False), path,
                  compression_level)


def write_gzipped(write_uncompressed: Callable[[str], None], path: str, level: int) -> None:
    """Write a ``.nii.gz`` file at zlib ``level``: ``write_uncompressed(p)`` writes the plain
    ``.nii`` file ``p`` (beside ``path``, removed afterwards), which Python's gzip then frames.

    ITK's NIfTI writer ignores the compression level it is given (its files came out the same at
    levels 0, 1 and 9), so the level is applied here; the header stays the writer's own.
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    raw = os.path.join(folder, f".{name[:-len('.nii.gz')]}.{os.getpid()}.uncompressed.nii")
    try:
        write_uncompressed(raw)
        with open(raw, "rb") as source, gzip.open(path, "wb", compresslevel=level) as target:
            shutil.copyfileobj(source, target, 16 << 20)
    finally:
        if os.path.exists(raw):
            os.remove(raw)


def image_from_array(array: np.ndarray, reference: sitk.Image, is_vector: bool = False) -> sitk.Image:
    """A SimpleITK image with ``reference``'s geometry holding a (k, j, i[, c]) array."""
    image = sitk.GetImageFromArray(array, isVector=is_vector)
    image.CopyInformation(reference)
    return image


# ------------------------------------------------------------------------------------ geometry
def index_to_physical_matrix(image: sitk.Image) -> np.ndarray:
    """4x4 matrix sending a homogeneous index (i, j, k, 1) to the LPS point (x, y, z, 1)."""
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def corner_points(image: sitk.Image) -> np.ndarray:
    """The eight physical corners (LPS, ``(8, 3)``) of the region the voxels cover."""
    size = np.array(image.GetSize(), dtype=np.float64)
    corners = np.array([[x, y, z] for x in (-0.5, size[0] - 0.5) for y in (-0.5, size[1] - 0.5)
                        for z in (-0.5, size[2] - 0.5)])
    matrix = index_to_physical_matrix(image)
    return corners @ matrix[:3, :3].T + matrix[:3, 3]


def overlap_fraction(fixed: sitk.Image, moving: sitk.Image, samples: int = 24) -> float:
    """Fraction of a regular sample of the fixed image's voxels that fall inside the moving image."""
    size = np.array(fixed.GetSize())
    axes = [np.linspace(0, n - 1, min(samples, n)) for n in size]
    index = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    points = np.c_[index, np.ones(len(index))] @ index_to_physical_matrix(fixed).T
    moving_index = points @ np.linalg.inv(index_to_physical_matrix(moving)).T
    inside = np.all((moving_index[:, :3] >= -0.5)
                    & (moving_index[:, :3] <= np.array(moving.GetSize()) - 0.5), axis=1)
    return float(inside.mean())


def check_overlap(fixed: sitk.Image, moving: sitk.Image, minimum: float = 0.05) -> float:
    """Refuse a pair whose physical extents barely overlap (usually a wrong origin or a wrong file)."""
    fraction = overlap_fraction(fixed, moving)
    if fraction < minimum:
        fixed_box = corner_points(fixed)
        moving_box = corner_points(moving)
        raise UserInputError(
            f"the fixed and moving images do not overlap in physical space ({100 * fraction:.1f}% "
            f"of the fixed image lies inside the moving one): fixed spans "
            f"{_fmt(fixed_box.min(0))} to {_fmt(fixed_box.max(0))} mm, moving spans "
            f"{_fmt(moving_box.min(0))} to {_fmt(moving_box.max(0))} mm (LPS); align them first "
            "(e.g. centre both origins) or check that these are the right files")
    return fraction


def resample_to_reference(image: sitk.Image, reference: sitk.Image, nearest: bool = False,
                          default: float = 0.0) -> sitk.Image:
    """``image`` on ``reference``'s grid through the identity (physical positions are kept)."""
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, default,
                         image.GetPixelID())


def physical_grid(reference: sitk.Image, device=None) -> torch.Tensor:
    """LPS points ``(D, H, W, 3)`` of ``reference``'s voxel centres (float64 for accuracy)."""
    matrix = torch.as_tensor(index_to_physical_matrix(reference), dtype=torch.float64, device=device)
    axes = [torch.arange(n, dtype=torch.float64, device=device) for n in reference.GetSize()[::-1]]
    k, j, i = torch.meshgrid(*axes, indexing="ij")
    index = torch.stack([i, j, k], dim=-1)
    return index @ matrix[:3, :3].T + matrix[:3, 3]


def sample_at_points(image: sitk.Image, points: torch.Tensor, nearest: bool = False,
                     default: float = 0.0) -> torch.Tensor:
    """Values of ``image`` at LPS ``points`` (``(..., 3)``), as ITK's resampler gives them.

    Linear (or nearest) interpolation; a point outside the image's extent (more than half a voxel
    past the first or last voxel centre) gets ``default``, like ``sitk.Resample``.
    """
    matrix = torch.as_tensor(np.linalg.inv(index_to_physical_matrix(image)), dtype=torch.float64,
                             device=points.device)
    index = points.to(torch.float64) @ matrix[:3, :3].T + matrix[:3, 3]  # (..., 3) as (i, j, k)
    size = torch.tensor(image.GetSize(), dtype=torch.float64, device=points.device)
    inside = ((index >= -0.5) & (index <= size - 0.5)).all(-1)
    normalised = (index * (2.0 / (size - 1).clamp_min(1.0)) - 1.0).to(torch.float32)
    array = sitk.GetArrayFromImage(image)
    values = torch.as_tensor(array.astype(np.float32), device=points.device)[None, None]
    grid = normalised.reshape(1, -1, 1, 1, 3)
    sampled = F.grid_sample(values, grid, mode="nearest" if nearest else "bilinear",
                            padding_mode="border", align_corners=ALIGN_CORNERS)
    sampled = sampled.reshape(points.shape[:-1])
    return torch.where(inside, sampled, torch.full_like(sampled, default))


def parallel_grid_sample(image: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear",
                         padding_mode: str = "border") -> torch.Tensor:
    """``F.grid_sample(image, grid, mode, padding_mode, align_corners=ALIGN_CORNERS)`` for a
    ``(1, C, ...)`` image and a ``(1, D, H, W, 3)`` grid, on every core.

    PyTorch's 3-D ``grid_sample`` on a CPU runs one thread per batch entry, so one image used one
    core. The points are independent: they are cut into one batch entry per thread, against the
    same (expanded, not copied) image; the result is the same numbers.
    """
    threads = torch.get_num_threads()
    depth, height, width = grid.shape[1:4]
    points = depth * height * width
    if (threads < 2 or image.shape[0] != 1 or grid.shape[0] != 1 or points % threads
            or points < 16_384 or image.device.type != "cpu"):
        return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode,
                             align_corners=ALIGN_CORNERS)
    parts = grid.reshape(threads, points // threads, 1, 1, 3)
    sampled = F.grid_sample(image.expand(threads, -1, -1, -1, -1), parts, mode=mode,
                            padding_mode=padding_mode, align_corners=ALIGN_CORNERS)
    return sampled.transpose(0, 1).reshape(1, image.shape[1], depth, height, width)


# a slab of the reference grid sampled at once: bounds the temporary grids (about 40 MB)
SAMPLING_SLAB_VOXELS = 2_000_000


def sample_displaced(image: sitk.Image, reference: sitk.Image, displacement: torch.Tensor,
                     nearest: bool = False, default: Optional[float] = 0.0) -> np.ndarray:
    """``image`` (any grid) at the physical points ``x + U(x)`` of ``reference``'s voxels, as a
    ``(D, H, W)`` float32 array; ``displacement`` is ``U`` in voxels of ``reference``
    (``(1, 3, D, H, W)``, (k, j, i) channels).

    The same values as ``sample_at_points(image, physical_grid(reference) + U_lps)`` (ITK's
    resampler: linear or nearest, ``default`` more than half a voxel outside; ``default=None``
    continues the border instead), computed in index space: the point's index in ``image`` is an
    affine map of ``index + u`` fixed by the two geometries, folded into grid_sample's normalised
    coordinates. No millimetre grid is built, the arithmetic is float32 (indices to ~1e-5 voxel)
    and the reference grid is done in slabs, so a 1 mm head needs tens of MB instead of about
    a gigabyte of float64 temporaries.
    """
    size = np.array(image.GetSize(), dtype=np.float64)  # (i, j, k)
    per_voxel = 2.0 / np.maximum(size - 1.0, 1.0)
    to_index = np.linalg.inv(index_to_physical_matrix(image)) @ index_to_physical_matrix(reference)
    linear = (per_voxel[:, None] * to_index[:3, :3]).astype(np.float32)  # (x, y, z) <- (i, j, k)
    offset = (per_voxel * to_index[:3, 3] - 1.0).astype(np.float32)
    low = (-0.5 * per_voxel - 1.0).astype(np.float32)
    high = ((size - 0.5) * per_voxel - 1.0).astype(np.float32)
    diagonal = not np.any(linear - np.diag(np.diag(linear)))
    array = sitk.GetArrayFromImage(image)
    values = torch.from_numpy(array.astype(np.float32, copy=False))[None, None]
    field = displacement[0].to(torch.float32)
    depth, height, width = field.shape[1:]
    out = np.empty((depth, height, width), dtype=np.float32)
    step = max(SAMPLING_SLAB_VOXELS // (height * width), 1)
    i_index = torch.arange(width, dtype=torch.float32)
    j_index = torch.arange(height, dtype=torch.float32).view(-1, 1)
    with torch.no_grad():
        for start in range(0, depth, step):
            stop = min(start + step, depth)
            k_index = torch.arange(start, stop, dtype=torch.float32).view(-1, 1, 1)
            moved = (field[2, start:stop] + i_index, field[1, start:stop] + j_index,
                     field[0, start:stop] + k_index)  # index + u, as (i, j, k)
            axes = []
            for row in range(3):
                if diagonal:
                    axes.append(moved[row] * float(linear[row, row]) + float(offset[row]))
                else:
                    axes.append(moved[0] * float(linear[row, 0]) + moved[1] * float(linear[row, 1])
                                + moved[2] * float(linear[row, 2]) + float(offset[row]))
            grid = torch.stack(axes, dim=-1)[None]
            sampled = parallel_grid_sample(values, grid, "nearest" if nearest else "bilinear")[0, 0]
            if default is not None:
                inside = ((grid >= torch.from_numpy(low)) & (grid <= torch.from_numpy(high))).all(-1)
                sampled = torch.where(inside[0], sampled, torch.tensor(float(default)))
            out[start:stop] = sampled.numpy()
    return out


# ---------------------------------------------------------------------------------- intensities
def normalise_intensity(array: np.ndarray, lower: float = 0.5, upper: float = 99.5) -> np.ndarray:
    """Clip to the ``lower``/``upper`` percentiles and scale to [0, 1] (robust to hot voxels)."""
    lo, hi = np.percentile(array, [lower, upper])
    if hi <= lo:
        lo, hi = float(array.min()), float(array.max())
    if hi <= lo:
        return np.zeros_like(array, dtype=np.float32)
    return ((np.clip(array, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def image_to_tensor(image: sitk.Image, normalise: bool = True, device=None) -> torch.Tensor:
    """``(1, 1, D, H, W)`` float32 tensor of a SimpleITK image (optionally normalised)."""
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    if normalise:
        array = normalise_intensity(array)
    return torch.from_numpy(array)[None, None].to(device)
