"""Real anatomy that installs offline: loaders returning a SimpleITK image and a label map.

There is no multi-subject collection that installs without a download, so training and
evaluation deform a few real volumes synthetically (``training.synth``). Each source below is a
file inside a PyPI or Debian package; a loader finds it and, when the package is missing, raises
:class:`~DeepRegistrationLib.errors.UserInputError` naming the exact install command.

=================  ====================================================  =========================
source             file                                                  labels
=================  ====================================================  =========================
``mni152``         nilearn: MNI152 2009a symmetric T1, 1 mm, skull        1 grey matter, 2 white
                   stripped (``nilearn/datasets/data``)                   matter, 3 CSF (derived)
``pydeface``       pydeface: mean T1 head with skull and face             1 head (Otsu)
                   (``pydeface/data/mean_reg2mean.nii.gz``), ~1 mm
``itk-t1``         Debian insighttoolkit5-examples: a real T1 head,       1 GM, 2 WM, 3 CSF (the
                   2x2x3 mm, coronal direction cosines                    example's k-means classes
                   (``KmeansTest_T1UCharRaw``)                            inside its skull strip)
``invesalius-ct``  Debian invesalius-examples: a head CT in HU            1 soft tissue
                   (``Cranium.inv3``), 0.96x0.96x1.5 mm                   (-200..300 HU), 2 bone
                                                                          (> 300 HU), in the head
=================  ====================================================  =========================

Every loader returns a :class:`Volume`: a float32 image and an Int32 label map on the same grid,
label names, modality and where the data came from (for model cards).
"""
from __future__ import annotations

import functools
import importlib.util
import io
import os
import plistlib
import tarfile
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import SimpleITK as sitk

from DeepRegistrationLib.errors import UserInputError
from DeepRegistrationLib.images import image_from_array
from DeepRegistrationLib.sample_data import mni152, nilearn_data_folder, resample_isotropic

# Debian installs example data under /usr/share/doc; tests point this elsewhere.
DEBIAN_DOC = "/usr/share/doc"
ITK_DATA = ("insighttoolkit5-examples", "examples/Data")
INVESALIUS_DATA = ("invesalius-examples", "examples/Cranium.inv3")

BRAIN_LABELS = {1: "grey matter", 2: "white matter", 3: "CSF"}


@dataclass
class Volume:
    """One anatomy: image and labels on the same grid, with what a model card needs to know."""
    name: str
    image: sitk.Image             # float32
    labels: sitk.Image            # Int32, same grid
    label_names: Dict[int, str]
    modality: str                 # "T1" or "CT"
    origin: str                   # package and file the data came from
    notes: List[str] = field(default_factory=list)

    def describe(self) -> Dict:
        return {"name": self.name, "modality": self.modality, "origin": self.origin,
                "size": list(self.image.GetSize()),
                "spacing_mm": [round(s, 4) for s in self.image.GetSpacing()],
                "labels": {str(k): v for k, v in self.label_names.items()}}

    def oriented(self, orientation: str = "LPS") -> "Volume":
        """The same volume with its axes permuted and flipped (no resampling) so the direction
        matrix is the closest to ``orientation``'s; "LPS" is the canonical order in which the
        engine hands images to networks."""
        return Volume(self.name, sitk.DICOMOrient(self.image, orientation),
                      sitk.DICOMOrient(self.labels, orientation), dict(self.label_names),
                      self.modality, self.origin, list(self.notes))

    def resampled(self, spacing_mm: Optional[float]) -> "Volume":
        """The same volume on an isotropic ``spacing_mm`` grid (same extent and direction)."""
        if not spacing_mm:
            return self
        return Volume(self.name, resample_isotropic(self.image, spacing_mm),
                      resample_isotropic(self.labels, spacing_mm, nearest=True),
                      dict(self.label_names), self.modality, self.origin, list(self.notes))


@dataclass
class Source:
    name: str
    description: str
    install: str                       # the exact command that installs the data
    locate: Callable[[], str]          # path of the data file, or UserInputError
    load: Callable[[], Volume]


# ------------------------------------------------------------------------------------- helpers
def _debian_file(package: str, relative: str, candidates=None) -> str:
    """The path of a file a Debian package installs under /usr/share/doc, or a clear error."""
    folder = os.path.join(DEBIAN_DOC, package)
    names = candidates or [relative]
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    install = f"apt-get install -y {package}"
    if os.path.isdir(folder):  # installed, but dpkg may drop /usr/share/doc (slim images)
        raise UserInputError(
            f"Debian package '{package}' is installed but {os.path.join(folder, names[0])} is "
            f"missing (is /usr/share/doc excluded in /etc/dpkg/dpkg.cfg.d?); remove the "
            f"path-exclude line and reinstall with: apt-get install -y --reinstall {package}")
    raise UserInputError(f"this data comes with the Debian package '{package}', which is not "
                         f"installed; install it with: {install}")


def _largest_component(mask: sitk.Image) -> sitk.Image:
    components = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    return sitk.Cast(components == 1, sitk.sitkUInt8)


def _fill_holes_slicewise(mask: sitk.Image) -> sitk.Image:
    """3-D hole filling, then 2-D per slice along k (closes sinuses and ear canals that touch the
    outside in 3-D but are enclosed in most axial slices)."""
    mask = sitk.BinaryFillhole(mask)
    array = sitk.GetArrayFromImage(mask)
    for k in range(array.shape[0]):
        array[k] = sitk.GetArrayFromImage(sitk.BinaryFillhole(sitk.GetImageFromArray(array[k])))
    return image_from_array(array.astype(np.uint8), mask)


def head_mask(image: sitk.Image, threshold: Optional[float] = None) -> sitk.Image:
    """Head (or body) mask: Otsu threshold (or ``threshold``), largest connected component
    (drops the scanner table and head holder), holes filled; UInt8 0/1."""
    if threshold is None:
        mask = sitk.OtsuThreshold(image, 0, 1)
    else:
        mask = sitk.Cast(image > threshold, sitk.sitkUInt8)
    mask = sitk.BinaryMorphologicalOpening(mask, [1, 1, 1])
    return _fill_holes_slicewise(_largest_component(mask))


# ----------------------------------------------------------------------------------- (a) MNI152
def locate_mni152() -> str:
    return nilearn_data_folder()


def load_mni152() -> Volume:
    """MNI152 2009a T1 (1 mm, skull stripped) with GM=1, WM=2 (``sample_data.mni152``) and CSF=3.

    nilearn ships no CSF map, so CSF is derived from the template: voxels inside the brain --
    the non-zero template filled (3-D hole filling) and eroded by 1 voxel (the skull-strip rim is
    a partial-volume blur towards the zero background) -- that are neither GM nor WM and darker
    than 0.75 x the median GM intensity. That picks the ventricles, the interhemispheric fissure
    and sulcal CSF; what remains unlabelled inside the brain is partial-volume tissue.
    """
    t1, labels = mni152(1.0)
    array = sitk.GetArrayFromImage(t1)
    label_array = sitk.GetArrayFromImage(labels)
    brain = sitk.BinaryFillhole(sitk.Cast(t1 > 0, sitk.sitkUInt8))
    inside = sitk.GetArrayFromImage(sitk.BinaryErode(brain, [1, 1, 1])) > 0
    grey = float(np.median(array[label_array == 1]))
    csf = inside & (label_array == 0) & (array < 0.75 * grey)
    label_array = np.where(csf, 3, label_array).astype(np.int32)
    return Volume("mni152", t1, image_from_array(label_array, t1), dict(BRAIN_LABELS), "T1",
                  "PyPI nilearn: datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                  ["GM/WM: the larger probability where it exceeds 0.5; CSF: dark unlabelled "
                   "voxels inside the eroded brain mask"])


# --------------------------------------------------------------------------------- (b) pydeface
PYDEFACE_INSTALL = "python -m pip install --no-deps pydeface"


def locate_pydeface() -> str:
    spec = importlib.util.find_spec("pydeface")
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError("the mean head comes with the 'pydeface' package, which is not "
                             f"installed; install it with: {PYDEFACE_INSTALL}")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "mean_reg2mean.nii.gz")
    if not os.path.isfile(path):
        raise UserInputError(f"pydeface is installed but lacks {path}; reinstall it with: "
                             "python -m pip install --no-deps --force-reinstall pydeface")
    return path


def load_pydeface() -> Volume:
    """pydeface's mean T1 head (skull, scalp and face), label 1 = head mask (Otsu threshold,
    largest component, holes filled)."""
    image = sitk.ReadImage(locate_pydeface(), sitk.sitkFloat32)
    mask = head_mask(image)
    return Volume("pydeface", image, sitk.Cast(mask, sitk.sitkInt32), {1: "head"}, "T1",
                  "PyPI pydeface: pydeface/data/mean_reg2mean.nii.gz",
                  ["label 1: Otsu head mask, largest component, holes filled"])


# ---------------------------------------------------------------------------------- (c) ITK T1
ITK_T1_NAMES = ("KmeansTest_T1UCharRaw", "KmeansTest_T1RawSkullStrip",
                "KmeansTest_T1KmeansPrelimSegmentation")
# The example's preliminary k-means segmentation has classes 1..6 (0 = a few unclassified
# voxels); inside its skull strip only 4, 5, 6 occur, with mean T1 48, 76, 101: CSF, GM, WM.
ITK_KMEANS_TO_LABEL = {4: 3, 5: 1, 6: 2}


def _itk_file(stem: str) -> str:
    package, folder = ITK_DATA
    # Debian 12 ships NIfTI; other releases keep MetaImage headers (.mhd/.mha) beside raw data.
    return _debian_file(package, f"{folder}/{stem}.nii.gz",
                        [f"{folder}/{stem}{ext}" for ext in (".nii.gz", ".nii", ".mha", ".mhd",
                                                             ".nrrd", ".nhdr")])


def locate_itk_t1() -> str:
    return _itk_file(ITK_T1_NAMES[0])


def load_itk_t1() -> Volume:
    """ITK's example T1 head (128x128x62, 2x2x3 mm, coronal direction cosines as stored).

    Labels: the example's k-means classes inside its skull strip, renamed to the MNI numbering
    (1 GM, 2 WM, 3 CSF; ``ITK_KMEANS_TO_LABEL``); outside the brain 0.
    """
    t1 = sitk.ReadImage(locate_itk_t1(), sitk.sitkFloat32)
    strip = sitk.GetArrayFromImage(sitk.ReadImage(_itk_file(ITK_T1_NAMES[1])))
    kmeans = sitk.GetArrayFromImage(sitk.ReadImage(_itk_file(ITK_T1_NAMES[2])))
    labels = np.zeros(kmeans.shape, np.int32)
    for cls, label in ITK_KMEANS_TO_LABEL.items():
        labels[(strip > 0) & (kmeans == cls)] = label
    label_image = image_from_array(labels, t1)
    return Volume("itk-t1", t1, label_image, dict(BRAIN_LABELS), "T1",
                  f"Debian {ITK_DATA[0]}: {ITK_DATA[1]}/KmeansTest_T1UCharRaw",
                  ["labels: k-means classes 5/6/4 inside KmeansTest_T1RawSkullStrip"])


# ----------------------------------------------------------------------------- (d) InVesalius CT
def locate_invesalius_ct() -> str:
    return _debian_file(*INVESALIUS_DATA)


def read_inv3(path: str) -> sitk.Image:
    """Read the volume of an InVesalius 3 project (``.inv3``: a gzipped tar).

    ``main.plist`` gives ``matrix`` (file name, dtype, shape as slices x rows x columns) and
    ``spacing`` (x, y, z in mm); ``matrix.dat`` is the raw C-order array (little-endian). The
    project keeps no direction cosines: InVesalius stores rows flipped (the face is at high row
    indices) and slices from inferior to superior, so the LPS direction is diag(1, -1, 1) --
    columns towards the patient's left as in DICOM (left/right cannot be verified from the
    file). The origin puts the volume's centre at (0, 0, 0).
    """
    with tarfile.open(path, "r:gz") as archive:
        members = {os.path.basename(m.name): m for m in archive.getmembers() if m.isfile()}
        if "main.plist" not in members:
            raise UserInputError(f"'{path}' is not an InVesalius 3 project (no main.plist)")
        main = plistlib.load(io.BytesIO(archive.extractfile(members["main.plist"]).read()))
        matrix = main["matrix"]
        raw = archive.extractfile(members[matrix["filename"]]).read()
    dtype = np.dtype(matrix["dtype"]).newbyteorder("<")
    array = np.frombuffer(raw, dtype=dtype).reshape(matrix["shape"]).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    spacing = [float(s) for s in main["spacing"]]
    direction = np.diag([1.0, -1.0, 1.0])
    image.SetSpacing(spacing)
    image.SetDirection(tuple(direction.ravel()))
    half = direction @ ((np.array(image.GetSize()) - 1) * np.array(spacing) / 2.0)
    image.SetOrigin(tuple(-half))
    return image


def load_invesalius_ct() -> Volume:
    """InVesalius' example head CT (256x256x108, HU). Labels inside the head (HU > -200, largest
    component -- which drops the head holder --, holes filled): 2 bone (> 300 HU), 1 soft tissue
    (-200..300 HU); air and everything outside 0."""
    ct = read_inv3(locate_invesalius_ct())
    array = sitk.GetArrayFromImage(ct)
    head = sitk.GetArrayFromImage(head_mask(ct, threshold=-200.0)) > 0
    labels = np.zeros(array.shape, np.int32)
    labels[head & (array >= -200) & (array <= 300)] = 1
    labels[head & (array > 300)] = 2
    return Volume("invesalius-ct", ct, image_from_array(labels, ct),
                  {1: "soft tissue", 2: "bone"}, "CT",
                  f"Debian {INVESALIUS_DATA[0]}: {INVESALIUS_DATA[1]}",
                  ["labels: bone > 300 HU, soft tissue -200..300 HU inside the head mask"])


# ------------------------------------------------------------------------------- (e) Colin 27
# Debian's mricron-data installs MRIcron's templates here (not under /usr/share/doc); tests point
# this elsewhere
MRICRON_TEMPLATES = "/usr/share/mricron/templates"
COLIN27_PACKAGE = "mricron-data"
COLIN27_FILES = ("ch2.nii.gz", "ch2bet.nii.gz")   # whole head; the same, brain extracted


def _mricron_file(name: str) -> str:
    path = os.path.join(MRICRON_TEMPLATES, name)
    if not os.path.isfile(path):
        raise UserInputError(f"this data comes with the Debian package '{COLIN27_PACKAGE}' "
                             f"({path} is missing); install it with: "
                             f"apt-get install -y {COLIN27_PACKAGE}")
    return path


def locate_colin27() -> str:
    for name in COLIN27_FILES:
        path = _mricron_file(name)
    return os.path.dirname(path)


def load_colin27() -> Volume:
    """Colin 27 (``ch2``: one subject scanned 27 times and averaged; whole head with skull, 1 mm,
    181x217x181 in MNI space) -- a real single subject, sharper than the MNI152 average.

    Labels: three k-means classes of the brain-extracted copy (``ch2bet``), renamed by mean
    intensity to the MNI numbering (darkest 3 CSF, then 1 GM, brightest 2 WM); outside the
    brain 0."""
    head = sitk.ReadImage(_mricron_file(COLIN27_FILES[0]), sitk.sitkFloat32)
    brain = sitk.ReadImage(_mricron_file(COLIN27_FILES[1]), sitk.sitkFloat32)
    classes = sitk.GetArrayFromImage(sitk.ScalarImageKmeans(brain, [0.0, 30.0, 70.0, 110.0],
                                                            False))
    values = sitk.GetArrayViewFromImage(brain)
    inside = values > 0
    means = {c: float(values[inside & (classes == c)].mean()) for c in (1, 2, 3)
             if np.any(inside & (classes == c))}
    if len(means) != 3:
        raise UserInputError(f"Colin 27's brain did not split into three tissue classes "
                             f"({os.path.join(MRICRON_TEMPLATES, COLIN27_FILES[1])})")
    darkest, middle, brightest = sorted(means, key=means.get)
    labels = np.zeros(classes.shape, np.int32)
    for cls, label in ((darkest, 3), (middle, 1), (brightest, 2)):
        labels[inside & (classes == cls)] = label
    return Volume("colin27", head, image_from_array(labels, head), dict(BRAIN_LABELS), "T1",
                  f"Debian {COLIN27_PACKAGE}: mricron/templates/{COLIN27_FILES[0]}",
                  ["labels: 3 k-means classes of ch2bet (CSF, GM, WM by mean intensity)"])


# ------------------------------------------------------------------------------------ registry
SOURCES: Dict[str, Source] = {
    "mni152": Source("mni152", "MNI152 2009a T1 template (skull stripped, 1 mm)",
                     "python -m pip install nilearn", locate_mni152, load_mni152),
    "pydeface": Source("pydeface", "pydeface mean T1 head with skull and face (1 mm)",
                       PYDEFACE_INSTALL, locate_pydeface, load_pydeface),
    "itk-t1": Source("itk-t1", "ITK example T1 head (2x2x3 mm, coronal direction cosines)",
                     f"apt-get install -y {ITK_DATA[0]}", locate_itk_t1, load_itk_t1),
    "invesalius-ct": Source("invesalius-ct", "InVesalius example head CT (HU)",
                            f"apt-get install -y {INVESALIUS_DATA[0]}", locate_invesalius_ct,
                            load_invesalius_ct),
    "colin27": Source("colin27", "Colin 27 single-subject T1 head with skull (1 mm, MNI space)",
                      f"apt-get install -y {COLIN27_PACKAGE}", locate_colin27, load_colin27),
}


def get_source(name: str) -> Source:
    try:
        return SOURCES[name]
    except KeyError:
        raise UserInputError(f"unknown data source '{name}'; choose from "
                             f"{', '.join(SOURCES)}") from None


def available_sources() -> List[str]:
    """Names of the sources whose data files are installed (checked without loading them)."""
    names = []
    for name, source in SOURCES.items():
        try:
            source.locate()
        except UserInputError:
            continue
        names.append(name)
    return names


def missing_sources() -> Dict[str, str]:
    """``{name: install command}`` for the sources that are not installed."""
    return {name: source.install for name, source in SOURCES.items()
            if name not in available_sources()}


@functools.lru_cache(maxsize=16)
def _load_cached(name: str, spacing_mm: Optional[float]) -> Volume:
    volume = get_source(name).load()
    return volume.resampled(spacing_mm)


def load_source(name: str, spacing_mm: Optional[float] = None) -> Volume:
    """Load source ``name`` (optionally on an isotropic ``spacing_mm`` grid); cached per process.

    ``name`` may also be the path of an image file (any format SimpleITK reads): its labels are
    then three Otsu classes inside an Otsu head mask (1 darkest .. 3 brightest).
    """
    if name not in SOURCES and os.path.isfile(name):
        return load_file(name).resampled(spacing_mm)
    return _load_cached(name, float(spacing_mm) if spacing_mm else None)


def load_file(path: str) -> Volume:
    """A user's own volume as a source: labels from Otsu (see :func:`load_source`)."""
    from DeepRegistrationLib.images import load_image
    image, notes = load_image(path, "training image")
    mask = sitk.GetArrayFromImage(head_mask(image)) > 0
    classes = sitk.GetArrayFromImage(sitk.OtsuMultipleThresholds(image, 2)).astype(np.int32) + 1
    labels = np.where(mask, classes, 0).astype(np.int32)
    return Volume(os.path.basename(path), image, image_from_array(labels, image),
                  {1: "dark", 2: "medium", 3: "bright"}, "unknown", os.path.abspath(path),
                  notes + ["labels: 3 Otsu classes inside an Otsu head mask"])


def parse_sources(text: str) -> List[str]:
    """``"mni152,itk-t1"`` -> names (checked); ``"all"`` -> every installed source."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        names = available_sources()
        if not names:
            raise UserInputError("no training data is installed; run training/install_data.sh")
        return names
    for name in names:  # unknown names first: a typo is not an installation problem
        if name not in SOURCES and not os.path.isfile(name):
            get_source(name)  # raises with the list of names
    for name in names:
        if name in SOURCES:
            SOURCES[name].locate()  # raises with the install command
    return names

