"""The Slicer module on Slicer's own MRML (PyPI slicer-core): every output read through Slicer's
storage nodes, display nodes and colour tables, segmentations, the table node, node and file
clean-up, the QA views and the geometry of the transform in Slicer coordinates.

Oracles: SimpleITK reads the same files (geometry, voxels, ``DisplacementFieldTransform``); label
resampling is checked against a nearest-neighbour lookup computed here from the grids' matrices;
the selector filter against the rule of Slicer's qMRMLSortFilterProxyModel applied to the .ui
properties PySide6 reads. Only the Qt application and widgets are fakes (slicer_harness.py).
"""
import json
import os
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import SimpleITK as sitk

from slicer_harness import (FakeMessageBox, FakeTimer, ROOT, UI_FILE, environment, make_widget,  # noqa: F401
                            process_events, slicer)

from DeepRegistrationLib import slicer_bridge as bridge

LABEL_NAMES = {1: "core", 2: "shell"}


# ----------------------------------------------------------------------------- data
def oblique_pair(shape=(20, 24, 28), shift=(1.5, -1.0, 2.0)):
    """A two-layer blob and a moved, larger copy on an oblique, anisotropic grid (SimpleITK)."""
    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    center = [n / 2 for n in shape]
    rotation = sitk.Euler3DTransform()
    rotation.SetRotation(0.15, -0.1, 0.25)
    images = []
    for offset, scale in (((0, 0, 0), 1.0), (shift, 1.12)):
        r2 = sum(((axis - c - o) / (s * scale)) ** 2
                 for axis, c, o, s in zip((k, j, i), center, offset, (5.0, 6.0, 7.0)))
        image = sitk.GetImageFromArray((100 * np.exp(-2 * r2) + 40 * (r2 < 1)).astype(np.float32))
        labels = sitk.GetImageFromArray(np.where(r2 < 0.3, 1, np.where(r2 < 1, 2, 0)).astype(np.int16))
        for item in (image, labels):
            item.SetSpacing((2.0, 1.8, 2.5))
            item.SetOrigin((12.0, -30.0, 7.5))
            item.SetDirection(rotation.GetMatrix())
        images += [image, labels]
    return images  # fixed, fixed labels, moving, moving labels


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """One real command-line registration of the oblique pair with labels, its folder kept."""
    folder = tmp_path_factory.mktemp("registered")
    fixed, fixed_labels, moving, moving_labels = oblique_pair()
    paths = {}
    for name, image in (("fixed", fixed), ("fixed_labels", fixed_labels), ("moving", moving),
                        ("moving_labels", moving_labels)):
        paths[name] = str(folder / f"{name}.nii.gz")
        sitk.WriteImage(image, paths[name])
    output = folder / "out"
    command = bridge.build_register_command(sys.executable, paths["fixed"], paths["moving"], str(output), "io",
                                            fixed_labels=paths["fixed_labels"],
                                            moving_labels=paths["moving_labels"], figure=False)
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600,
                               env=bridge.subprocess_environment(None, bridge.library_root()))
    assert completed.returncode == 0, completed.stderr[-3000:]
    with open(output / "summary.json") as handle:
        summary = json.load(handle)
    return {"folder": str(output), "summary": summary, "paths": paths}


def read_volume(path, name, className="vtkMRMLScalarVolumeNode"):
    """A file read into a new node by Slicer's volume storage node (what its reader does)."""
    node = slicer.mrmlScene.AddNewNodeByClass(className, name)
    reader = slicer.vtkMRMLVolumeArchetypeStorageNode()
    reader.SetSingleFile(1)
    reader.SetFileName(path)
    assert reader.ReadData(node), path
    node.CreateDefaultDisplayNodes()
    return node


def label_colors(names):
    """A colour table naming the labels, as a user's label map would carry."""
    table = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLColorTableNode", "tissue colours")
    table.SetTypeToUser()
    table.SetNumberOfColors(max(names) + 1)
    table.SetColor(0, "background", 0, 0, 0, 0)
    for value, name in names.items():
        table.SetColor(value, name, 0.2 * value, 0.5, 1.0 - 0.3 * value, 1.0)
    return table


def make_segmentation(labelmap, names_colors, name):
    """A segmentation from a label map node: {value: (segment name, colour)}."""
    import vtk
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    ids = vtk.vtkStringArray()
    for value in range(1, max(names_colors) + 1):
        segment_name, color = names_colors[value]
        segmentation.GetSegmentation().AddEmptySegment(segment_name, segment_name, color)
        ids.InsertNextValue(segment_name)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation, ids)
    return segmentation


def ijk_to_ras(node):
    import vtk
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return bridge.numpy_from_vtk_matrix(matrix)


def load_inputs(registered, labelmaps=True):
    paths = registered["paths"]
    fixed = read_volume(paths["fixed"], "fixed")
    moving = read_volume(paths["moving"], "moving")
    inputs = {"fixed": fixed, "moving": moving}
    if labelmaps:
        colors = label_colors(LABEL_NAMES)
        for role in ("fixed_labels", "moving_labels"):
            node = read_volume(paths[role], role.replace("_", " "), "vtkMRMLLabelMapVolumeNode")
            node.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
            inputs[role] = node
    return inputs


def context_for(env, registered, inputs, movingLabels=None, **extra):
    context = {"fixedVolume": inputs["fixed"], "movingVolume": inputs["moving"],
               "movingLabels": movingLabels if movingLabels is not None else inputs.get("moving_labels"),
               "method": "io", "labelNames": {str(k): v for k, v in LABEL_NAMES.items()},
               "segmentValues": {v: k for k, v in LABEL_NAMES.items()}, "keepOutputFolder": True,
               "outputNodes": {}, "workFolder": registered["folder"], "outputFolder": registered["folder"]}
    context.update(extra)
    return context


def scene_nodes():
    scene = slicer.mrmlScene
    return [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]


# ----------------------------------------------------------------------------- loading
def test_every_output_loads_through_slicer_storage_nodes(environment, registered):
    env = environment
    inputs = load_inputs(registered)
    logic = env.module.DeepRegistrationLogic()
    summary = registered["summary"]
    nodes = logic.loadResults(registered["folder"], summary, context_for(env, registered, inputs))
    folder = registered["folder"]

    assert nodes["transform"].GetClassName() == "vtkMRMLTransformNode"
    assert not nodes["transform"].IsLinear()
    # every volume has SimpleITK's geometry and voxels
    for key, file_key in (("warped", "warped"), ("jacobian", "jacobian"), ("warpedLabels", "warped_labels")):
        image = sitk.ReadImage(os.path.join(folder, summary["outputs"][file_key]))
        np.testing.assert_allclose(ijk_to_ras(nodes[key]), bridge.ijk_to_ras_matrix(image), atol=1e-4, err_msg=key)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(nodes[key]), sitk.GetArrayFromImage(image))
        np.testing.assert_allclose(ijk_to_ras(nodes[key]), ijk_to_ras(inputs["fixed"]), atol=1e-4, err_msg=key)
    assert nodes["warpedLabels"].IsA("vtkMRMLLabelMapVolumeNode")
    assert nodes["warpedLabels"].GetDisplayNode().GetColorNodeID() == \
        inputs["moving_labels"].GetDisplayNode().GetColorNodeID()
    # the warped volume is shown like the moving volume
    assert nodes["warped"].GetDisplayNode().GetColorNodeID() == inputs["moving"].GetDisplayNode().GetColorNodeID()

    # Jacobian: diverging colours centred on 1, a legend (hidden until the overlay is shown)
    display = nodes["jacobian"].GetDisplayNode()
    assert display.GetColorNodeID() == logic.divergingColorNodeID()
    assert display.GetLevel() == pytest.approx(1.0) and not display.GetAutoWindowLevel()
    legend = logic.jacobianLegend(nodes["jacobian"])
    assert legend is not None and legend.IsA("vtkMRMLColorLegendDisplayNode")
    assert legend.GetTitleText() == "Jacobian determinant" and not legend.GetVisibility()

    # folded voxels: the strict mask the command line wrote (or det J <= 0 for older outputs)
    folding = nodes["folding"]
    if "folding" in summary["outputs"]:
        expected = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, summary["outputs"]["folding"])))
        assert folding.GetAttribute("DeepRegistration.FoldingMeasure") == "strict"
    else:
        expected = (slicer.util.arrayFromVolume(nodes["jacobian"]) <= 0).astype(np.uint8)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(folding), expected)
    colors = folding.GetDisplayNode().GetColorNode()
    assert colors.GetColorName(1) == "folded voxel"
    rgba = [0.0] * 4
    colors.GetColor(1, rgba)
    np.testing.assert_allclose(rgba[:3], env.module.FOLDING_COLOR, atol=1 / 255)
    assert nodes["jacobian"].GetNodeReference(env.module.FOLDING_REFERENCE_ROLE) is folding

    # the measures table node has the panel's rows
    table = nodes["table"]
    rows = [(table.GetCellText(r, 0), table.GetCellText(r, 1)) for r in range(table.GetNumberOfRows())]
    assert rows == bridge.results_table_rows(summary, {str(k): v for k, v in LABEL_NAMES.items()})
    assert any(name == "Dice core" for name, _ in rows)
    for key, node in nodes.items():
        assert node.GetAttribute(env.module.ROLE_ATTRIBUTE) == key
    assert not [n for n in scene_nodes() if n.GetName() == env.module.TEMPORARY_NODE_NAME]


def test_folding_overlay_of_an_older_output_is_det_j_at_or_below_zero(environment, registered, tmp_path):
    """Outputs without folding.nii.gz (written before the strict measure): threshold det J."""
    import shutil
    env = environment
    folder = tmp_path / "old"
    shutil.copytree(registered["folder"], folder)
    summary = json.loads(json.dumps(registered["summary"]))
    (folder / "folding.nii.gz").unlink(missing_ok=True)
    summary["outputs"].pop("folding", None)
    jacobian_path = folder / "jacobian.nii.gz"
    image = sitk.ReadImage(str(jacobian_path))
    array = sitk.GetArrayFromImage(image)
    array[3:5, 4:6, 5:7] = -0.5  # a fold, so the mask is not all zeros
    changed = sitk.GetImageFromArray(array)
    changed.CopyInformation(image)
    sitk.WriteImage(changed, str(jacobian_path))
    inputs = load_inputs(registered)
    nodes = env.module.DeepRegistrationLogic().loadResults(str(folder), summary,
                                                           context_for(env, registered, inputs, outputFolder=str(folder)))
    mask = slicer.util.arrayFromVolume(nodes["folding"])
    np.testing.assert_array_equal(mask, (array <= 0).astype(np.uint8))
    assert mask.sum() >= 8
    assert nodes["folding"].GetAttribute("DeepRegistration.FoldingMeasure") == "central"


def test_transform_geometry_in_slicer_coordinates(environment, registered):
    """FromParent maps a fixed point x (RAS) to x + u(x), with u the LPS field SimpleITK reads,
    turned into RAS; ToParent maps it back."""
    env = environment
    inputs = load_inputs(registered, labelmaps=False)
    nodes = env.module.DeepRegistrationLogic().loadResults(
        registered["folder"], registered["summary"], context_for(env, registered, inputs, movingLabels=None))
    transform = nodes["transform"]
    field = sitk.ReadImage(os.path.join(registered["folder"], "displacement.nii.gz"))
    vectors = sitk.GetArrayFromImage(field)
    assert np.abs(vectors).max() > 0.5, "the registration should have moved something"
    itk = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    from_parent, to_parent = transform.GetTransformFromParent(), transform.GetTransformToParent()
    fixed_matrix = ijk_to_ras(inputs["fixed"])
    generator = np.random.default_rng(1)
    for _ in range(40):
        k, j, i = (int(generator.integers(2, n - 2)) for n in vectors.shape[:3])
        x = (fixed_matrix @ [i, j, k, 1.0])[:3]
        y = x + np.array(bridge.lps_to_ras(vectors[k, j, i]))
        np.testing.assert_allclose(from_parent.TransformPoint(x.tolist()), y, atol=1e-4)
        np.testing.assert_allclose(to_parent.TransformPoint(y.tolist()), x, atol=0.02)
        # between voxels Slicer interpolates cubically, ITK linearly: close on a smooth field (a
        # sign or axis error would be millimetres off)
        index = np.array([i, j, k], dtype=float) + generator.uniform(-0.5, 0.5, 3)
        point_lps = field.TransformContinuousIndexToPhysicalPoint(index.tolist())
        expected = bridge.lps_to_ras(itk.TransformPoint(point_lps))
        np.testing.assert_allclose(from_parent.TransformPoint(bridge.lps_to_ras(point_lps)), expected, atol=0.15)


def test_the_displacement_writer_against_nibabel_simpleitk_and_mrml(environment, tmp_path):
    """outputs.write_displacement_field: nibabel sees intent 1006 with RAS vectors on disk (the
    NIfTI convention), SimpleITK reads the LPS vectors and the geometry back, Slicer's storage
    node reads it without a message and maps voxel centres as SimpleITK's field says."""
    import nibabel
    from DeepRegistrationLib.outputs import write_displacement_field

    generator = np.random.default_rng(4)
    lps = generator.normal(size=(7, 8, 9, 3)).astype(np.float32)
    field = sitk.GetImageFromArray(lps, isVector=True)
    field.SetSpacing((1.5, 0.8, 2.5))
    field.SetOrigin((-20.0, 14.0, 3.5))
    field.SetDirection(sitk.VersorTransform((0.3, -0.5, 0.8), 0.7).GetMatrix())
    path = str(tmp_path / "field.nii.gz")
    write_displacement_field(field, path)

    disk = nibabel.load(path)
    assert int(disk.header["intent_code"]) == 1006
    raw = np.asarray(disk.dataobj)  # (i, j, k, 1, 3)
    np.testing.assert_allclose(raw[2, 5, 4, 0], lps[4, 5, 2] * [-1, -1, 1])
    np.testing.assert_allclose(disk.affine, bridge.ijk_to_ras_matrix(field), atol=1e-5)

    back = sitk.ReadImage(path)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), lps)
    np.testing.assert_allclose(back.GetDirection(), field.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(back.GetOrigin(), field.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(back.GetSpacing(), field.GetSpacing(), atol=1e-6)

    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTransformNode")
    reader = slicer.vtkMRMLTransformStorageNode()
    reader.SetFileName(path)
    assert reader.ReadData(node)
    assert reader.GetUserMessages().GetNumberOfMessages() == 0, reader.GetUserMessages().GetAllMessagesAsString()
    from_parent = node.GetTransformFromParent()
    for k, j, i in [(1, 2, 3), (5, 6, 7), (3, 3, 3)]:
        x = np.array(bridge.lps_to_ras(field.TransformIndexToPhysicalPoint((i, j, k))))
        np.testing.assert_allclose(from_parent.TransformPoint(x.tolist()),
                                   x + np.array(bridge.lps_to_ras(lps[k, j, i])), atol=1e-4)


def test_the_field_loads_without_the_intent_warning(environment, registered):
    """Slicer's transform storage node warns unless the NIfTI intent is 1006 (displacement
    vector); the field is written that way and still reads back in LPS with SimpleITK."""
    import nibabel
    header = nibabel.load(os.path.join(registered["folder"], "displacement.nii.gz")).header
    assert int(header["intent_code"]) == 1006
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTransformNode")
    reader = slicer.vtkMRMLTransformStorageNode()
    reader.SetFileName(os.path.join(registered["folder"], "displacement.nii.gz"))
    assert reader.ReadData(node)
    assert reader.GetUserMessages().GetNumberOfMessages() == 0, reader.GetUserMessages().GetAllMessagesAsString()


# ----------------------------------------------------------------------------- labels
def test_segmentation_inputs_come_back_as_segmentations_with_names_and_colours(environment, registered):
    env = environment
    inputs = load_inputs(registered)
    colors = {1: ("core", (0.9, 0.1, 0.3)), 2: ("shell", (0.15, 0.55, 0.35))}
    moving_segments = make_segmentation(inputs["moving_labels"], colors, "moving tissues")
    nodes = env.module.DeepRegistrationLogic().loadResults(
        registered["folder"], registered["summary"],
        context_for(env, registered, inputs, movingLabels=moving_segments))
    warped = nodes["warpedLabels"]
    assert warped.IsA("vtkMRMLSegmentationNode")
    assert warped.GetName() == "moving tissues warped"
    segmentation = warped.GetSegmentation()
    expected = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(registered["folder"], "warped_labels.nii.gz")))
    found = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        found[segment.GetName()] = segment.GetColor()
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(warped, segmentation.GetNthSegmentID(index), inputs["fixed"])
        value = {name: value for value, (name, _c) in colors.items()}[segment.GetName()]
        np.testing.assert_array_equal(mask > 0, expected == value, err_msg=segment.GetName())
    assert set(found) == {"core", "shell"}
    for value, (name, color) in colors.items():
        np.testing.assert_allclose(found[name], color, atol=1e-9)
    # no temporary label map or colour table stays behind
    assert not [n for n in scene_nodes() if n.GetName() == env.module.TEMPORARY_NODE_NAME]


def test_a_label_map_output_for_segment_inputs_gets_a_named_colour_table(environment, registered):
    env = environment
    inputs = load_inputs(registered)
    colors = {1: ("core", (0.9, 0.1, 0.3)), 2: ("shell", (0.15, 0.55, 0.35))}
    moving_segments = make_segmentation(inputs["moving_labels"], colors, "moving tissues")
    chosen = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "my label map")
    nodes = env.module.DeepRegistrationLogic().loadResults(
        registered["folder"], registered["summary"],
        context_for(env, registered, inputs, movingLabels=moving_segments, outputNodes={"warpedLabels": chosen}))
    assert nodes["warpedLabels"] is chosen
    table = chosen.GetDisplayNode().GetColorNode()
    assert table.GetColorName(1) == "core" and table.GetColorName(2) == "shell"
    rgba = [0.0] * 4
    table.GetColor(2, rgba)
    np.testing.assert_allclose(rgba[:3], colors[2][1], atol=1 / 255)


def test_export_labels_from_a_segmentation_and_from_a_label_map_on_another_grid(environment, tmp_path):
    """Segments become label values shared by name; a label map on another grid is resampled
    onto the volume's grid, checked against a nearest-neighbour lookup computed here."""
    env = environment
    logic = env.module.DeepRegistrationLogic()
    fixed_image, fixed_labels_image = oblique_pair()[:2]
    sitk.WriteImage(fixed_image, str(tmp_path / "f.nii.gz"))
    sitk.WriteImage(fixed_labels_image, str(tmp_path / "fl.nii.gz"))
    volume = read_volume(str(tmp_path / "f.nii.gz"), "volume")
    labelmap = read_volume(str(tmp_path / "fl.nii.gz"), "labels", "vtkMRMLLabelMapVolumeNode")

    # a segmentation: values follow the shared name table, not the segment order
    segments = make_segmentation(labelmap, {1: ("shell", (1, 0, 0)), 2: ("core", (0, 1, 0))}, "segments")
    values = bridge.segment_label_values(["core", "shell"], ["shell", "core"])
    names = logic.exportLabels(segments, volume, str(tmp_path / "seg.nii.gz"), values)
    assert names == {"1": "core", "2": "shell"}
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "seg.nii.gz")))
    original = sitk.GetArrayFromImage(fixed_labels_image)
    np.testing.assert_array_equal(written, np.where(original == 1, 2, np.where(original == 2, 1, 0)))

    # a label map on a coarser, shifted grid
    coarse = sitk.Resample(fixed_labels_image, [10, 12, 14], sitk.Transform(), sitk.sitkNearestNeighbor,
                           (13.0, -29.0, 8.0), (3.7, 3.9, 4.4), fixed_labels_image.GetDirection(), 0,
                           fixed_labels_image.GetPixelID())
    sitk.WriteImage(coarse, str(tmp_path / "coarse.nii.gz"))
    coarse_node = read_volume(str(tmp_path / "coarse.nii.gz"), "coarse", "vtkMRMLLabelMapVolumeNode")
    coarse_node.GetDisplayNode().SetAndObserveColorNodeID(label_colors(LABEL_NAMES).GetID())
    volume_path = str(tmp_path / "volume_export.nii.gz")
    logic.exportVolume(volume, volume_path)
    names = logic.exportLabels(coarse_node, volume, str(tmp_path / "resampled.nii.gz"), referencePath=volume_path)
    assert names == {"1": "core", "2": "shell"}
    resampled = sitk.ReadImage(str(tmp_path / "resampled.nii.gz"))
    assert resampled.GetSize() == fixed_image.GetSize()
    # the oracle: every voxel centre of the volume, mapped into the coarse grid's index space
    target = bridge.ijk_to_ras_matrix(fixed_image)
    source_inverse = np.linalg.inv(bridge.ijk_to_ras_matrix(coarse))
    shape = sitk.GetArrayViewFromImage(fixed_image).shape
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    points = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
    index = np.rint((source_inverse @ target @ points)[:3]).astype(int)
    coarse_array = sitk.GetArrayFromImage(coarse)
    inside = np.all((index >= 0) & (index < np.array(coarse.GetSize())[:, None]), axis=0)
    expected = np.zeros(i.size, dtype=coarse_array.dtype)
    expected[inside] = coarse_array[index[2, inside], index[1, inside], index[0, inside]]
    agreement = (sitk.GetArrayFromImage(resampled).ravel() == expected).mean()
    assert agreement > 0.995  # points exactly half-way between two voxels may round either way


def test_export_is_in_world_coordinates_and_leaves_the_node_alone(environment, tmp_path):
    env = environment
    logic = env.module.DeepRegistrationLogic()
    fixed_image = oblique_pair()[0]
    sitk.WriteImage(fixed_image, str(tmp_path / "f.nii.gz"))
    volume = read_volume(str(tmp_path / "f.nii.gz"), "volume")
    storage_before = volume.GetStorageNodeID()
    matrix_before = ijk_to_ras(volume)
    parent = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[:3, :3] = np.array(sitk.Euler3DTransform((0, 0, 0), 0.1, 0.0, 0.2).GetMatrix()).reshape(3, 3)
    shift[:3, 3] = [4.0, -6.0, 9.0]
    parent.SetMatrixTransformToParent(bridge.vtk_matrix_from_numpy(shift))
    volume.SetAndObserveTransformNodeID(parent.GetID())
    count = slicer.mrmlScene.GetNumberOfNodes()
    logic.exportVolume(volume, str(tmp_path / "world.nii.gz"))
    written = sitk.ReadImage(str(tmp_path / "world.nii.gz"))
    np.testing.assert_allclose(bridge.ijk_to_ras_matrix(written), shift @ matrix_before, atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), slicer.util.arrayFromVolume(volume))
    np.testing.assert_allclose(ijk_to_ras(volume), matrix_before)
    assert volume.GetTransformNodeID() == parent.GetID() and volume.GetStorageNodeID() == storage_before
    assert slicer.mrmlScene.GetNumberOfNodes() == count, "no node is left behind"


# ----------------------------------------------------------------------------- whole runs
def run_pair(env, tmp_path, **kwargs):
    """Load the oblique pair (with label maps) and register it through Logic.run."""
    fixed, fixed_labels, moving, moving_labels = oblique_pair()
    nodes = {}
    for name, image in (("fixed", fixed), ("moving", moving)):
        sitk.WriteImage(image, str(tmp_path / f"{name}.nii.gz"))
        nodes[name] = read_volume(str(tmp_path / f"{name}.nii.gz"), name)
    return nodes


def storage_files():
    return [n.GetFileName() for n in slicer.util.getNodesByClass("vtkMRMLStorageNode") if n.GetFileName()]


def test_two_runs_leave_no_stray_nodes_and_no_storage_node_in_a_deleted_folder(environment, tmp_path):
    env = environment
    logic = env.module.DeepRegistrationLogic()
    inputs = run_pair(env, tmp_path)
    baseline = {n.GetID() for n in scene_nodes()}

    first = logic.run(inputs["fixed"], inputs["moving"], method="io", timeoutSeconds=600)
    assert first["status"] == "success", first["message"] + first["log"][-2000:]
    assert not os.listdir(env.temp), "the work folder is removed"
    for path in storage_files():
        assert not path.startswith(str(env.temp)), f"a storage node points into the deleted folder: {path}"
    for key, node in first["nodes"].items():
        assert node.GetModifiedSinceRead(), f"{key} must be offered for saving"
    after_first = {n.GetID() for n in scene_nodes()}
    added = after_first - baseline
    classes = sorted(slicer.mrmlScene.GetNodeByID(i).GetClassName() for i in added)
    output_ids = {node.GetID() for node in first["nodes"].values()}
    assert output_ids <= added
    # besides the outputs: their display nodes, the Jacobian legend and the two colour tables
    extra = [slicer.mrmlScene.GetNodeByID(i) for i in added - output_ids]
    assert all(n.IsA("vtkMRMLDisplayNode") or n.IsA("vtkMRMLColorNode") for n in extra), classes
    assert not any(n.IsA("vtkMRMLStorageNode") for n in extra)

    # the second run writes into the first run's nodes, keeping its files this time
    second = logic.run(inputs["fixed"], inputs["moving"], method="io", timeoutSeconds=600,
                       outputNodes=first["nodes"], keepOutputFolder=True)
    assert second["status"] == "success", second["message"]
    assert {k: n.GetID() for k, n in second["nodes"].items()} == {k: n.GetID() for k, n in first["nodes"].items()}
    after_second = {n.GetID() for n in scene_nodes()}
    new = [slicer.mrmlScene.GetNodeByID(i) for i in after_second - after_first]
    # only storage nodes for the kept files (one per file-backed output)
    assert all(n.IsA("vtkMRMLStorageNode") for n in new), [n.GetClassName() for n in new]
    for path in storage_files():
        assert os.path.isfile(path), path
    assert second["nodes"]["transform"].GetStorageNode().GetFileName().endswith("displacement.nii.gz")
    # reading those results again without keeping the files drops the storage nodes again
    kept = second["outputFolder"]
    context = {"fixedVolume": inputs["fixed"], "movingVolume": inputs["moving"], "method": "io",
               "labelNames": {}, "keepOutputFolder": False, "outputNodes": first["nodes"]}
    with open(os.path.join(kept, "summary.json")) as handle:
        logic.loadResults(kept, json.load(handle), context)
    assert {n.GetID() for n in scene_nodes()} == after_first
    assert not [n for n in scene_nodes() if n.GetName() == env.module.TEMPORARY_NODE_NAME]


def test_a_users_output_node_keeps_its_own_storage_node(environment, registered, tmp_path):
    """Writing into a node the user loaded from a file never re-points its storage node."""
    env = environment
    inputs = load_inputs(registered)
    sitk.WriteImage(sitk.ReadImage(registered["paths"]["fixed"]), str(tmp_path / "mine.nii.gz"))
    mine = read_volume(str(tmp_path / "mine.nii.gz"), "mine")
    storage = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(tmp_path / "mine.nii.gz"))
    mine.SetAndObserveStorageNodeID(storage.GetID())
    nodes = env.module.DeepRegistrationLogic().loadResults(
        registered["folder"], registered["summary"],
        context_for(env, registered, inputs, keepOutputFolder=False, outputNodes={"warped": mine}))
    assert nodes["warped"] is mine
    assert mine.GetStorageNode() is storage and storage.GetFileName() == str(tmp_path / "mine.nii.gz")
    assert mine.GetModifiedSinceRead()
    assert mine.GetName() == "mine"


def test_outputs_that_are_inputs_are_refused(environment, tmp_path):
    env = environment
    logic = env.module.DeepRegistrationLogic()
    inputs = run_pair(env, tmp_path)
    with pytest.raises(ValueError, match="also an input"):
        logic.startRegistration(inputs["fixed"], inputs["moving"], outputNodes={"warped": inputs["moving"]})
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTransformNode", "old result")
    inputs["moving"].SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(ValueError, match="under the output transform"):
        logic.startRegistration(inputs["fixed"], inputs["moving"], outputNodes={"transform": transform})
    assert not os.listdir(env.temp) and not logic.isRunning()


def test_failure_timeout_cancel_and_abort(environment, tmp_path):
    env = environment
    logic = env.module.DeepRegistrationLogic()
    inputs = run_pair(env, tmp_path)
    failed = logic.run(inputs["fixed"], inputs["moving"], method="no_such_method_xyz", timeoutSeconds=300)
    assert failed["status"] == "failed" and failed["returnCode"] == 2
    assert "no_such_method_xyz" in failed["message"] and "nodes" not in failed

    # a timeout is a failure with its own message, not a cancel
    timed = logic.run(inputs["fixed"], inputs["moving"], method="io", refine=5000, timeoutSeconds=1)
    assert timed["status"] == "failed" and "Timed out" in timed["message"]
    assert not logic.isRunning() and not os.listdir(env.temp)

    completed = []
    job = logic.startRegistration(inputs["fixed"], inputs["moving"], method="io", refine=5000,
                                  completedCallback=completed.append)
    for _ in range(5):
        process_events()
    logic.cancel(wait=True)
    assert completed and completed[0]["status"] == "cancelled"

    # scene close: stopped at once, no event processing, nothing loaded, no callback
    completed.clear()
    count = slicer.mrmlScene.GetNumberOfNodes()
    job = logic.startRegistration(inputs["fixed"], inputs["moving"], method="io", refine=5000,
                                  completedCallback=completed.append)
    events = []
    env.app.processEvents = lambda: events.append(1)
    started = time.time()
    logic.abort()
    assert time.time() - started < 15
    assert job.finished and not logic.isRunning() and not completed and not events
    assert job.process.process.poll() is not None
    assert not os.path.exists(job.context["workFolder"])
    assert slicer.mrmlScene.GetNumberOfNodes() == count
    assert not FakeTimer.active


# ----------------------------------------------------------------------------- display and QA
def test_qa_views_use_the_fixed_volume_of_the_run(environment, registered, tmp_path):
    env = environment
    inputs = load_inputs(registered)
    logic = env.module.DeepRegistrationLogic()
    nodes = logic.loadResults(registered["folder"], registered["summary"], context_for(env, registered, inputs))
    p = logic.getParameterNode()
    p.outputTransform, p.warpedVolume, p.jacobianVolume = nodes["transform"], nodes["warped"], nodes["jacobian"]
    p.foldingVolume, p.warpedLabels, p.resultFixedVolume = nodes["folding"], nodes["warpedLabels"], inputs["fixed"]
    # the user then selects another fixed volume, on another grid
    other = slicer.util.addVolumeFromArray(np.zeros((5, 6, 7), np.float32), np.eye(4), "another volume")
    p.fixedVolume = other

    logic.showQA(p, comparisonView="Fixed", showGrid=True, gridSpacing=7.0)
    composites = slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode")
    assert {c.GetBackgroundVolumeID() for c in composites} == {inputs["fixed"].GetID()}
    display = nodes["transform"].GetDisplayNode()
    assert display.GetRegionNode() is inputs["fixed"]
    assert display.GetVisualizationMode() == slicer.vtkMRMLTransformDisplayNode.VIS_MODE_GRID
    assert display.GetGridSpacingMm() == 7.0 and display.GetVisibility2D()

    logic.showQA(p, comparisonView="Difference")
    difference = p.comparisonVolume
    expected = bridge.difference(slicer.util.arrayFromVolume(inputs["fixed"]),
                                 slicer.util.arrayFromVolume(nodes["warped"]))
    np.testing.assert_allclose(slicer.util.arrayFromVolume(difference), expected, atol=1e-6)
    assert {c.GetBackgroundVolumeID() for c in composites} == {difference.GetID()}
    logic.showQA(p, comparisonView="Checkerboard", showJacobian=True, jacobianOpacity=0.4, showFolding=True)
    assert p.comparisonVolume is difference, "one comparison node, reused"
    assert {c.GetForegroundVolumeID() for c in composites} == {nodes["jacobian"].GetID()}
    assert {c.GetForegroundOpacity() for c in composites} == {0.4}
    assert {c.GetLabelVolumeID() for c in composites} == {nodes["folding"].GetID()}
    assert logic.jacobianLegend(nodes["jacobian"]).GetVisibility()
    logic.showQA(p, comparisonView="Warped")
    assert {c.GetLabelVolumeID() for c in composites} == {nodes["warpedLabels"].GetID()}
    assert not logic.jacobianLegend(nodes["jacobian"]).GetVisibility()
    logic.removeComparisonVolume(p)
    assert p.comparisonVolume is None and slicer.mrmlScene.GetNodeByID(difference.GetID()) is None


def test_jump_to_worst_folding_centres_every_slice_view(environment, registered):
    env = environment
    summary = registered["summary"]
    logic = env.module.DeepRegistrationLogic()
    ras = logic.jumpToWorstFolding(summary)
    expected = bridge.lps_to_ras(summary["worst_folding"]["point_lps"])
    slices = slicer.util.getNodesByClass("vtkMRMLSliceNode")
    assert len(slices) == 3
    for node in slices:
        matrix = node.GetSliceToRAS()
        np.testing.assert_allclose([matrix.GetElement(r, 3) for r in range(3)], expected, atol=1e-9)
    np.testing.assert_allclose(ras, expected)
    markups = [n for n in slicer.util.getNodesByClass("vtkMRMLMarkupsFiducialNode")
               if n.GetAttribute(env.module.ROLE_ATTRIBUTE) == "worstFolding"]
    assert len(markups) == 1 and markups[0].GetNumberOfControlPoints() == 1
    logic.jumpToWorstFolding(summary)
    assert markups[0].GetNumberOfControlPoints() == 1, "the marker is reused"
    with pytest.raises(ValueError):
        logic.jumpToWorstFolding({})


def test_apply_and_harden_the_result_on_the_moving_volume(environment, registered):
    env = environment
    inputs = load_inputs(registered, labelmaps=False)
    before = slicer.util.arrayFromVolume(inputs["moving"]).copy()
    nodes = env.module.DeepRegistrationLogic().loadResults(
        registered["folder"], registered["summary"],
        context_for(env, registered, inputs, movingLabels=None, applyToMoving=True, hardenMoving=False))
    assert inputs["moving"].GetParentTransformNode() is nodes["transform"]
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(inputs["moving"]), before)
    env.module.DeepRegistrationLogic.applyTransform(inputs["moving"], nodes["transform"], harden=True)
    assert inputs["moving"].GetParentTransformNode() is None
    # Slicer resamples the hardened volume on a grid of its own: compare at the warped volume's
    # voxel centres (nearest voxel), inside the hardened grid
    hardened = slicer.util.arrayFromVolume(inputs["moving"])
    warped = slicer.util.arrayFromVolume(nodes["warped"])
    shape = warped.shape
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    points = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
    index = np.rint(np.linalg.inv(ijk_to_ras(inputs["moving"])) @ ijk_to_ras(nodes["warped"]) @ points)[:3].astype(int)
    inside = np.all((index >= 0) & (index < np.array(hardened.shape[::-1])[:, None]), axis=0)
    assert inside.mean() > 0.7
    sampled = hardened[index[2, inside], index[1, inside], index[0, inside]]
    reference = warped.ravel()[inside]
    correlation = np.corrcoef(sampled, reference)[0, 1]
    assert correlation > 0.97, correlation
    assert correlation > np.corrcoef(before.ravel()[inside], reference)[0, 1]


def test_the_transform_selector_accepts_the_loaded_transform(environment, registered):
    """qMRMLSortFilterProxyModel's rule (Libs/MRML/Widgets/qMRMLSortFilterProxyModel.cxx): a node
    passes when it IsA one of nodeTypes and, if showChildNodeTypes is false, its class is that
    type exactly; hideChildNodeTypes then excludes subclasses. Applied to the .ui properties read
    by PySide6 and to nodes Slicer's transform reader makes."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import QFile, QIODevice
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QApplication, QWidget

    app = QApplication.instance() or QApplication([])
    handle = QFile(UI_FILE)
    assert handle.open(QIODevice.ReadOnly)
    root = QUiLoader().load(handle)
    handle.close()
    selectors = {w.objectName(): w for w in root.findChildren(QWidget)}

    def accepts(selector, node, show_child=None):
        types = list(selector.property("nodeTypes"))
        show = selector.property("showChildNodeTypes") if show_child is None else show_child
        hidden = list(selector.property("hideChildNodeTypes") or [])
        for node_type in types:
            if not node.IsA(node_type) or (not show and node.GetClassName() != node_type):
                continue
            return not (show and any(node.IsA(h) for h in hidden))
        return False

    env = environment
    inputs = load_inputs(registered, labelmaps=False)
    nodes = env.module.DeepRegistrationLogic().loadResults(
        registered["folder"], registered["summary"], context_for(env, registered, inputs, movingLabels=None))
    grid = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLGridTransformNode", "grid")
    reader = slicer.vtkMRMLTransformStorageNode()
    reader.SetFileName(os.path.join(registered["folder"], "displacement.nii.gz"))
    assert reader.ReadData(grid)
    linear = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "linear")
    transform_selector = selectors["outputTransformSelector"]
    for node in (nodes["transform"], grid, linear):
        assert accepts(transform_selector, node), node.GetClassName()
    # the rule can fail: the old selector (showChildNodeTypes false) hid the grid transform
    assert not accepts(transform_selector, grid, show_child=False)
    assert not accepts(selectors["outputTransformSelector"], inputs["fixed"])
    # volumes: label maps are not scalar volumes to these selectors
    folding = nodes["folding"]
    for name in ("fixedVolumeSelector", "warpedVolumeSelector", "jacobianVolumeSelector"):
        assert accepts(selectors[name], inputs["fixed"]) and not accepts(selectors[name], folding), name
    assert accepts(selectors["warpedLabelsSelector"], folding)
    assert accepts(selectors["resultsTableSelector"], nodes["table"])
    root.deleteLater()
    del app


# ----------------------------------------------------------------------------- sample data
def test_the_demo_pair_is_registered_with_sample_data_and_loads(environment, monkeypatch, tmp_path):
    """registerSampleData passes what Slicer's SampleData module needs; each file:// URI is copied
    the way SampleData downloads (urllib.request.urlretrieve), its checksum verified with
    slicer.util.computeChecksum and loaded by the reader its file type names."""
    import types
    env = environment
    calls = []
    fake = types.ModuleType("SampleData")
    fake.SampleDataLogic = types.SimpleNamespace(
        registerCustomSampleDataSource=lambda **kwargs: calls.append(kwargs))
    monkeypatch.setitem(sys.modules, "SampleData", fake)
    # the module registers it once Slicer has started, as the scripted-module template does
    env.module.DeepRegistration(types.SimpleNamespace())
    assert ("startupCompleted()", env.module.registerSampleData) in env.app.connections
    env.module.registerSampleData()
    assert len(calls) == 1
    source = calls[0]
    count = len(source["uris"])
    assert count == 4
    assert all(len(source[key]) == count for key in ("fileNames", "nodeNames", "loadFileType", "checksums"))
    assert os.path.isfile(source["thumbnailFileName"])
    loaded = []
    for uri, file_name, node_name, file_type, checksum in zip(source["uris"], source["fileNames"], source["nodeNames"],
                                                              source["loadFileType"], source["checksums"]):
        assert uri.startswith("file://")
        destination = str(tmp_path / file_name)
        urllib.request.urlretrieve(uri, destination)
        algorithm, digest = slicer.util.extractAlgoAndDigest(checksum)
        assert slicer.util.computeChecksum(algorithm, destination) == digest, file_name
        if file_type == "SegmentationFile":
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", node_name)
            reader = slicer.vtkMRMLSegmentationStorageNode()
        else:
            assert file_type == "VolumeFile"
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", node_name)
            reader = slicer.vtkMRMLVolumeArchetypeStorageNode()
        reader.SetFileName(destination)
        assert reader.ReadData(node), file_name
        loaded.append(node)
    fixed, moving, fixed_segments, moving_segments = loaded
    assert slicer.util.arrayFromVolume(fixed).shape == slicer.util.arrayFromVolume(moving).shape
    for segments in (fixed_segments, moving_segments):
        segmentation = segments.GetSegmentation()
        assert sorted(segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())) == \
            ["grey matter", "white matter"]
    # the widget preselects the demo pair and its segmentations, whatever was loaded before
    slicer.util.addVolumeFromArray(np.zeros((4, 4, 4), np.float32), np.eye(4), "loaded first")
    for node in (fixed, moving):
        node.CreateDefaultDisplayNodes()
    widget = make_widget(env, monkeypatch)
    p = widget._parameterNode
    assert p.fixedVolume is fixed and p.movingVolume is moving
    assert p.fixedLabels is fixed_segments and p.movingLabels is moving_segments


# ----------------------------------------------------------------------------- the widget
def test_widget_shows_results_key_figures_and_replaces_old_comparison_nodes(environment, registered, monkeypatch):
    env = environment
    inputs = load_inputs(registered)
    widget = make_widget(env, monkeypatch)
    p = widget._parameterNode
    p.fixedVolume, p.movingVolume = inputs["fixed"], inputs["moving"]
    logic = widget.logic
    context = context_for(env, registered, inputs)
    nodes = logic.loadResults(registered["folder"], registered["summary"], context)
    result = {"status": "success", "nodes": nodes, "summary": registered["summary"], "fixedVolume": inputs["fixed"],
              "labelNames": context["labelNames"], "message": "", "log": ""}
    widget._onCompleted(result)
    assert p.outputTransform is nodes["transform"] and p.warpedVolume is nodes["warped"]
    assert p.resultsTable is nodes["table"] and p.resultFixedVolume is inputs["fixed"]
    key = widget.ui.keyFiguresLabel.text
    summary = registered["summary"]
    assert "Dice" in key and bridge._fmt(summary["mean_dice_after"]) in key
    assert "Folding" in key and "Run time" in key
    table = widget.ui.resultsTableWidget
    assert table.rowCount == len(bridge.results_table_rows(summary, context["labelNames"]))
    assert widget.ui.jumpToWorstFoldingButton.enabled and widget.ui.qaCollapsibleButton.enabled

    # a comparison view of this result, then a new result: the old comparison node goes
    logic.showQA(p, comparisonView="Checkerboard")
    old = p.comparisonVolume
    assert old is not None
    second = logic.loadResults(registered["folder"], summary, context_for(env, registered, inputs))
    widget._onCompleted(dict(result, nodes=second))
    assert p.comparisonVolume is None and slicer.mrmlScene.GetNodeByID(old.GetID()) is None

    # Apply asks before writing into the nodes that hold the results
    started, refine = [], []
    monkeypatch.setattr(logic, "startRegistration",
                        lambda *a, **k: (started.append(k["outputNodes"]), refine.append(k["refine"])))
    monkeypatch.setattr(logic, "ensureDependencies", lambda askConfirmation=True: True)
    env.app.testing = False
    p.refineHalf, p.refineFull = 10, 2
    FakeMessageBox.answer = FakeMessageBox.No
    widget.onApplyButton()
    assert FakeMessageBox.asked and second["transform"].GetName() in FakeMessageBox.asked[-1].text
    assert set(started[-1].values()) == {None}, "No: new nodes"
    assert refine[-1] == (10, 2), "the two spin boxes are one --refine 10x2"
    FakeMessageBox.answer = FakeMessageBox.Yes
    widget.onApplyButton()
    assert started[-1]["transform"] is second["transform"], "Yes: replace"
    FakeMessageBox.answer = FakeMessageBox.Cancel
    widget.onApplyButton()
    assert len(started) == 2, "Cancel: nothing starts"


def test_widget_failure_and_scene_close(environment, registered, monkeypatch):
    env = environment
    widget = make_widget(env, monkeypatch)
    shown = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kwargs: shown.append((text, kwargs)))
    widget._onCompleted({"status": "failed", "message": "deepreg: error: nope", "log": "the log",
                         "fixedVolume": None})
    assert "nope" in widget.ui.statusLabel.text and shown and shown[0][1]["detailedText"] == "the log"
    aborted = []
    monkeypatch.setattr(widget.logic, "abort", lambda: aborted.append(1))
    monkeypatch.setattr(widget.logic, "cancel", lambda wait=False: pytest.fail("scene close must not wait"))
    widget.onSceneStartClose(None, None)
    assert aborted and widget._parameterNode is None
    widget.cleanup()
    assert len(aborted) == 2


def test_fixed_labels_alone_are_left_out_of_the_command(environment, tmp_path, caplog):
    """The command line refuses --fixed-labels without --moving-labels (nothing to compare with);
    the module leaves them out instead of failing the run."""
    import logging
    env = environment
    logic = env.module.DeepRegistrationLogic()
    inputs = run_pair(env, tmp_path)
    _, fixed_labels, _, _ = oblique_pair()
    sitk.WriteImage(fixed_labels, str(tmp_path / "fixed_labels.nii.gz"))
    labels = read_volume(str(tmp_path / "fixed_labels.nii.gz"), "fixed labels", "vtkMRMLLabelMapVolumeNode")
    with caplog.at_level(logging.INFO):
        result = logic.run(inputs["fixed"], inputs["moving"], method="no_such_method_xyz",
                           fixedLabels=labels, timeoutSeconds=300)
    commands = [r.getMessage() for r in caplog.records if "--method" in r.getMessage()]
    assert commands and "--fixed-labels" not in commands[-1]
    assert result["status"] == "failed" and "no_such_method_xyz" in result["message"]
    assert "moving-labels" not in result["message"]
