"""Make the demo pair the module registers with Slicer's Sample Data module.

    python DeepRegistration/Resources/SampleData/make_sample_data.py

Needs the library's dependencies, ``nilearn`` (the MNI152 2009a template ships inside it, no
download) and PyPI's ``slicer-core`` (Slicer's own segmentation writer, for the .seg.nrrd files).
The pair is ``DeepRegistrationLib.sample_data.demo_pair`` at 2 mm: the template and a copy
deformed by a random smooth diffeomorphism (seed 7, up to 8 mm) with a mild intensity change and
noise, each with a grey / white matter segmentation. The volumes are stored as 8-bit integers
(rounded and clipped to 0-255, the range of the template nilearn ships) to keep the repository
small: 0.8 MB instead of 7 MB as float. It prints the SHA-256 of every file; they
are listed in ``DeepRegistrationLib/slicer_bridge.py`` (``DEMO_FILES``), and a test checks that
the files match them.
"""
import os
import sys

import numpy as np
import SimpleITK as sitk
import vtk

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(HERE))))

from DeepRegistrationLib import slicer_bridge as bridge  # noqa: E402
from DeepRegistrationLib.sample_data import MNI_LABELS, demo_pair  # noqa: E402

#: Segment colours (RGB in [0, 1]) of the demo segmentations.
TISSUE_COLORS = {1: (0.89, 0.64, 0.40), 2: (0.38, 0.67, 0.89)}


def write_segmentation(labels: sitk.Image, path: str, name: str) -> None:
    """A .seg.nrrd written by Slicer's own segmentation storage node (slicer-core)."""
    import slicer

    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    # the module logic registers the segmentation representations (binary labelmap, ...),
    # as Slicer does at start-up
    segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations_logic.SetMRMLScene(scene)
    folder = os.path.dirname(path)
    labelmap_path = os.path.join(folder, "_labels.nii.gz")
    sitk.WriteImage(labels, labelmap_path)
    try:
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        reader = slicer.vtkMRMLVolumeArchetypeStorageNode()
        reader.SetFileName(labelmap_path)
        reader.SetSingleFile(1)
        if not reader.ReadData(labelmap):
            raise RuntimeError(f"cannot read {labelmap_path}")
    finally:
        os.remove(labelmap_path)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segment_ids = vtk.vtkStringArray()  # label value N goes to the N-th id
    for value in range(1, max(MNI_LABELS) + 1):
        tissue = MNI_LABELS[value]
        # the segment ID is the name, so the file is the same every time it is made
        segmentation.GetSegmentation().AddEmptySegment(tissue, tissue, TISSUE_COLORS[value])
        segment_ids.InsertNextValue(tissue)
    if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
            labelmap, segmentation, segment_ids):
        raise RuntimeError("cannot import the labels into a segmentation")
    writer = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    writer.SetFileName(path)
    writer.SetUseCompression(1)
    if not writer.WriteData(segmentation):
        raise RuntimeError(f"cannot write {path}")


def to_uint8(image: sitk.Image) -> sitk.Image:
    array = np.clip(np.round(sitk.GetArrayFromImage(image)), 0, 255).astype(np.uint8)
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out


def thumbnail(fixed: sitk.Image, moving: sitk.Image, path: str) -> None:
    """Two axial slices side by side, about the size the Sample Data module shows."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(2.8, 1.6), dpi=100)
    for axis, image, title in zip(axes, (fixed, moving), ("fixed", "moving")):
        array = sitk.GetArrayViewFromImage(image)
        axis.imshow(np.flipud(array[array.shape[0] // 2 + 5]), cmap="gray")
        axis.set_title(title, fontsize=8)
        axis.axis("off")
    figure.tight_layout(pad=0.2)
    figure.savefig(path)
    plt.close(figure)


def main() -> None:
    fixed, moving, fixed_labels, moving_labels = demo_pair(spacing_mm=2.0, magnitude_mm=8.0, seed=7)
    names = [entry[0] for entry in bridge.DEMO_FILES]
    paths = [os.path.join(HERE, name) for name in names]
    sitk.WriteImage(to_uint8(fixed), paths[0], True)
    sitk.WriteImage(to_uint8(moving), paths[1], True)
    write_segmentation(fixed_labels, paths[2], bridge.DEMO_FILES[2][1])
    write_segmentation(moving_labels, paths[3], bridge.DEMO_FILES[3][1])
    thumbnail(fixed, moving, os.path.join(HERE, bridge.DEMO_SAMPLE_NAME + ".png"))
    for name, path in zip(names, paths):
        print(f"{name}  {os.path.getsize(path)} bytes  {bridge.file_sha256(path)}")


if __name__ == "__main__":
    main()
