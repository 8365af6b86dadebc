"""DeepRegistrationLib.slicer_bridge: what the Slicer module needs, tested without Slicer.

Geometry is checked against references built independently: VTK's own image geometry
(vtkImageData with a direction matrix, the PyPI ``vtk`` wheel) and SimpleITK's
TransformIndexToPhysicalPoint, with the LPS -> RAS flip applied by hand.
"""
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import SimpleITK as sitk
import vtk

from DeepRegistrationLib import slicer_bridge as bridge

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def oblique_image(size=(7, 9, 11), spacing=(0.7, 1.3, 2.9), origin=(12.5, -40.0, 7.25)):
    """An anisotropic image whose axes are rotated about all three axes (not a permutation)."""
    transform = sitk.Euler3DTransform()
    transform.SetRotation(0.3, -0.45, 0.8)
    direction = np.array(transform.GetMatrix()).reshape(3, 3)
    image = sitk.Image(list(size), sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction.ravel().tolist())
    return image


def vtk_lps_to_ras_matrix():
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 0, -1.0)
    matrix.SetElement(1, 1, -1.0)
    return matrix


# ----------------------------------------------------------------------------- geometry
def test_ijk_to_ras_matrix_matches_vtk_image_geometry():
    image = oblique_image()
    data = vtk.vtkImageData()
    data.SetDimensions(image.GetSize())
    data.SetSpacing(image.GetSpacing())
    data.SetOrigin(image.GetOrigin())
    data.SetDirectionMatrix(list(image.GetDirection()))
    ras = vtk.vtkMatrix4x4()
    vtk.vtkMatrix4x4.Multiply4x4(vtk_lps_to_ras_matrix(), data.GetIndexToPhysicalMatrix(), ras)
    expected = np.array([[ras.GetElement(r, c) for c in range(4)] for r in range(4)])
    np.testing.assert_allclose(bridge.ijk_to_ras_matrix(image), expected, atol=1e-12)

    # and point by point through vtkImageData's own index -> physical transform
    for index in [(0, 0, 0), (6, 8, 10), (2.5, 3.25, 7.0)]:
        lps = [0.0, 0.0, 0.0]
        data.TransformContinuousIndexToPhysicalPoint(*index, lps)
        ras_point = bridge.ijk_to_ras_matrix(image) @ np.array([*index, 1.0])
        np.testing.assert_allclose(ras_point[:3], [-lps[0], -lps[1], lps[2]], atol=1e-9)


def test_ijk_to_ras_matrix_identity_image():
    image = sitk.Image([4, 5, 6], sitk.sitkUInt8)
    np.testing.assert_allclose(bridge.ijk_to_ras_matrix(image), np.diag([-1.0, -1.0, 1.0, 1.0]))


def test_ijk_to_ras_matrix_rejects_2d():
    with pytest.raises(ValueError, match="3-D"):
        bridge.ijk_to_ras_matrix(sitk.Image([4, 5], sitk.sitkUInt8))


def test_vtk_matrix_round_trip_and_multiply():
    matrix = bridge.ijk_to_ras_matrix(oblique_image())
    vmatrix = bridge.vtk_matrix_from_numpy(matrix)
    assert isinstance(vmatrix, vtk.vtkMatrix4x4)
    np.testing.assert_array_equal(bridge.numpy_from_vtk_matrix(vmatrix), matrix)
    point = [1.0, 2.0, 3.0, 1.0]
    np.testing.assert_allclose(vmatrix.MultiplyPoint(point), matrix @ point, atol=1e-12)
    with pytest.raises(ValueError):
        bridge.vtk_matrix_from_numpy(np.eye(3))


def test_lps_ras_round_trip():
    rng = np.random.default_rng(0)
    for point in rng.normal(scale=100.0, size=(20, 3)):
        ras = bridge.lps_to_ras(point)
        np.testing.assert_allclose(ras, [-point[0], -point[1], point[2]])
        np.testing.assert_allclose(bridge.ras_to_lps(ras), point)
    assert bridge.lps_to_ras((1, 2, 3)) == [-1.0, -2.0, 3.0]


def test_kji_index_to_ras_matches_simpleitk():
    image = oblique_image()
    for k, j, i in [(0, 0, 0), (10, 8, 6), (3, 1, 5), (10, 0, 6)]:
        lps = image.TransformIndexToPhysicalPoint((i, j, k))
        np.testing.assert_allclose(bridge.kji_index_to_ras((k, j, i), image),
                                   [-lps[0], -lps[1], lps[2]], atol=1e-9)
    lps = image.TransformContinuousIndexToPhysicalPoint((1.5, 2.25, 0.5))
    np.testing.assert_allclose(bridge.kji_index_to_ras((0.5, 2.25, 1.5), image),
                               [-lps[0], -lps[1], lps[2]], atol=1e-9)


def test_worst_folding_ras_uses_the_lps_point():
    summary = {"worst_folding": {"index_kji": [1, 2, 3], "point_lps": [10.0, -20.0, 30.0],
                                 "determinant": -0.2}}
    assert bridge.worst_folding_ras(summary) == [-10.0, 20.0, 30.0]
    assert bridge.worst_folding_ras({}) is None
    assert bridge.worst_folding_ras({"worst_folding": {}}) is None


def test_same_geometry():
    matrix = bridge.ijk_to_ras_matrix(oblique_image())
    assert bridge.same_geometry((7, 9, 11), matrix, (7, 9, 11), matrix + 1e-6)
    assert not bridge.same_geometry((7, 9, 11), matrix, (7, 9, 12), matrix)
    shifted = matrix.copy()
    shifted[0, 3] += 0.5
    assert not bridge.same_geometry((7, 9, 11), matrix, (7, 9, 11), shifted)


# ----------------------------------------------------------------------------- command line
def test_build_register_command_content(tmp_path):
    command = bridge.build_register_command(
        "/opt/Slicer/bin/PythonSlicer", "in/fixed.nii.gz", "in/moving.nii.gz", "out", "io",
        refine=25, similarity="mind", device="cuda", regularization=0.5,
        fixed_labels="in/fl.nii.gz", moving_labels="in/ml.nii.gz")
    assert command[:4] == ["/opt/Slicer/bin/PythonSlicer", "-m", "DeepRegistrationLib", "register"]
    assert command[4:6] == [os.path.abspath("in/fixed.nii.gz"), os.path.abspath("in/moving.nii.gz")]

    def value(flag):
        return command[command.index(flag) + 1]
    assert value("--method") == "io"
    assert value("--output") == os.path.abspath("out")
    assert value("--refine") == "25"
    assert value("--similarity") == "mind"
    assert value("--device") == "cuda"
    assert float(value("--regularization")) == 0.5
    assert value("--fixed-labels") == os.path.abspath("in/fl.nii.gz")
    assert value("--moving-labels") == os.path.abspath("in/ml.nii.gz")
    assert command[-1] == "--progress-json"
    assert "--no-figure" not in command
    assert all(isinstance(part, str) for part in command)
    command = bridge.build_register_command("python", "/a", "/b", "/o", "io", figure=False)
    assert command[-2:] == ["--no-figure", "--progress-json"]
    # the global stage: the command line's default is left out (a library without --initial runs)
    assert "--initial" not in bridge.build_register_command("python", "/a", "/b", "/o", "io", initial="auto")
    command = bridge.build_register_command("python", "/a", "/b", "/o", "io", initial="rigid")
    assert command[command.index("--initial") + 1] == "rigid"


def test_build_register_command_leaves_out_defaults():
    command = bridge.build_register_command("python", "/a.nii", "/b.nii", "/out", "io")
    for flag in ("--similarity", "--device", "--regularization", "--fixed-labels",
                 "--moving-labels"):
        assert flag not in command
    assert command[command.index("--refine") + 1] == "0"
    # a regularization of 0 is a value, not "missing"
    command = bridge.build_register_command("python", "/a", "/b", "/o", "io", regularization=0.0)
    assert command[command.index("--regularization") + 1] == "0.0"


def test_refine_is_a_total_or_a_half_and_full_grid_pair():
    """The module's two spin boxes become ``--refine AxB``, the command line's explicit split."""
    assert bridge.refine_argument(60) == "60"
    assert bridge.refine_argument((10, 2)) == "10x2"
    assert bridge.refine_argument([0, 0]) == "0x0"
    for bad in (-1, (10, -2), (1, 2, 3), ()):
        with pytest.raises(ValueError):
            bridge.refine_argument(bad)


@pytest.mark.parametrize("kwargs", [dict(method=""), dict(refine=-1), dict(refine=(4, -1)),
                                    dict(initial="sideways"),
                                    dict(regularization=float("nan")), dict(regularization=-1.0)])
def test_build_register_command_rejects_bad_values(kwargs):
    arguments = dict(python_executable="python", fixed_path="/a", moving_path="/b",
                     output_dir="/o", method="io")
    arguments.update(kwargs)
    with pytest.raises(ValueError):
        bridge.build_register_command(**arguments)


def test_the_command_line_accepts_the_built_command(tmp_path):
    """The library's parser accepts every option the module passes: the run fails on the missing
    input file (exit 2, one line), not on the arguments."""
    command = bridge.build_register_command(
        sys.executable, str(tmp_path / "missing_fixed.nii.gz"), str(tmp_path / "missing.nii.gz"),
        str(tmp_path / "out"), "io", refine=(3, 1), similarity="mind", device="cpu",
        regularization=1.5, fixed_labels=str(tmp_path / "fl.nii.gz"),
        moving_labels=str(tmp_path / "ml.nii.gz"), figure=False, initial="affine")
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300,
                               env=bridge.subprocess_environment(None, bridge.library_root()))
    assert completed.returncode == 2, completed.stderr
    assert "unrecognized arguments" not in completed.stderr
    assert "invalid choice" not in completed.stderr
    assert "deepreg: error:" in completed.stderr
    events = [bridge.parse_progress_line(line) for line in completed.stdout.splitlines()]
    assert any(e and e["type"] == "error" for e in events)


def test_the_command_line_offers_the_modules_choices():
    completed = subprocess.run([sys.executable, "-m", "DeepRegistrationLib", "register", "--help"],
                               capture_output=True, text=True, timeout=300,
                               env=bridge.subprocess_environment(None, bridge.library_root()))
    assert completed.returncode == 0, completed.stderr
    text = completed.stdout
    for similarity in bridge.SIMILARITIES:
        assert similarity in text
    for initial in bridge.INITIALS:
        assert initial in text
    for flag in ("--refine", "--similarity", "--regularization", "--device", "--fixed-labels",
                 "--moving-labels", "--progress-json", "--output", "--method", "--no-figure",
                 "--initial"):
        assert flag in text


def test_methods_json_from_the_command_line_parses():
    completed = subprocess.run(bridge.build_methods_command(sys.executable), capture_output=True,
                               text=True, timeout=300,
                               env=bridge.subprocess_environment(None, bridge.library_root()))
    assert completed.returncode == 0, completed.stderr
    methods = bridge.parse_methods_json(completed.stdout)
    names = [m["name"] for m in methods]
    assert "io" in names
    for info in methods:
        html = bridge.method_description_html(info)
        assert html and "{" not in html, info["name"]
        assert "(" not in bridge.method_short_name(info)


def test_parse_methods_json_tolerates_leading_text():
    text = "UserWarning: something\n" + json.dumps([{"name": "io", "title": "IO"}], indent=2)
    assert bridge.parse_methods_json(text) == [{"name": "io", "title": "IO"}]
    with pytest.raises(ValueError):
        bridge.parse_methods_json("no json here")
    with pytest.raises(ValueError):
        bridge.parse_methods_json('[{"title": "no name"}]')


def test_python_executable_prefers_pythonslicer():
    assert bridge.python_executable(lambda name: "/s/bin/PythonSlicer") == "/s/bin/PythonSlicer"
    assert bridge.python_executable(lambda name: None) == sys.executable


def test_subprocess_environment_puts_the_library_first():
    env = bridge.subprocess_environment({"PYTHONPATH": os.pathsep.join(["/x", "/lib"]), "A": "1"},
                                        "/lib")
    assert env["PYTHONPATH"].split(os.pathsep) == ["/lib", "/x"]
    assert env["A"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    env = bridge.subprocess_environment({}, "/lib")
    assert env["PYTHONPATH"] == "/lib"
    assert bridge.library_root() == ROOT


def test_missing_modules():
    assert bridge.missing_modules(["json", "numpy"]) == []
    assert bridge.missing_modules(["json", "no_such_module_deepreg_xyz"]) == ["no_such_module_deepreg_xyz"]
    assert set(bridge.REQUIRED_MODULES) >= {"torch", "SimpleITK", "nibabel"}


def test_importing_the_bridge_loads_neither_torch_nor_vtk():
    """The module imports the bridge when Slicer starts: that must stay light."""
    code = ("import sys, DeepRegistrationLib.slicer_bridge; "
            "print(sorted(m for m in ('torch', 'vtk', 'SimpleITK') if m in sys.modules))")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               cwd=ROOT, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- progress lines
def test_parse_progress_line_real_lines():
    lines = [json.dumps({"type": "progress", "fraction": 0.42, "stage": "optimise level 2/3",
                         "message": "step 5/40"}),
             json.dumps({"type": "log", "message": "fixed image: 2 mm"}),
             json.dumps({"type": "done", "output": "/abs/dir", "summary": {"folding_percent": 0.1}}),
             json.dumps({"type": "error", "message": "cancelled"})]
    progress, log, done, error = (bridge.parse_progress_line(line) for line in lines)
    assert progress == {"type": "progress", "fraction": 0.42, "stage": "optimise level 2/3",
                        "message": "step 5/40"}
    assert log["message"] == "fixed image: 2 mm"
    assert done["summary"]["folding_percent"] == 0.1
    assert error["type"] == "error"
    assert bridge.parse_progress_line(lines[0].encode() + b"\n") == progress
    assert bridge.parse_progress_line("  " + lines[1] + "\r\n") == log


@pytest.mark.parametrize("line", [None, "", "   ", "hello", "Traceback (most recent call last):",
                                  "{not json", "[1, 2]", '"text"', "42", '{"no": "type"}',
                                  '{"type": 3}', b"\xff\xfe garbage", "{\"type\": \"progress\""])
def test_parse_progress_line_garbage(line):
    assert bridge.parse_progress_line(line) is None


def test_parse_progress_line_cleans_progress_fields():
    event = bridge.parse_progress_line('{"type": "progress", "fraction": 1.7}')
    assert event["fraction"] == 1.0 and event["stage"] == "" and event["message"] == ""
    assert bridge.parse_progress_line('{"type": "progress", "fraction": -3}')["fraction"] == 0.0
    assert bridge.parse_progress_line('{"type": "progress", "fraction": NaN}')["fraction"] == 0.0
    assert bridge.parse_progress_line('{"type": "progress", "fraction": "x"}')["fraction"] == 0.0
    assert bridge.parse_progress_line('{"type": "future", "x": 1}') == {"type": "future", "x": 1}


# ----------------------------------------------------------------------------- results table
FULL_SUMMARY = {
    "method": "io", "version": "0.1.0", "runtime_seconds": 6.04, "device": "cpu", "refine": 0,
    "similarity_metric": "ncc", "similarity_before": 0.61234, "similarity_after": 0.9,
    "folding_percent": 0.0123, "folded_voxels": 45, "jacobian_min": -0.25, "jacobian_max": 2.5,
    "folding_percent_strict": 0.05, "folded_voxels_strict": 183, "jacobian_min_strict": -0.7,
    "sdlogj": 0.0812, "worst_folding": {"index_kji": [1, 2, 3], "point_lps": [1.0, 2.0, 3.0],
                                        "determinant": -0.7, "determinant_central": 0.1},
    "initial": {"requested": "auto", "used": "rigid", "reason": "not aligned", "seconds": 1.26,
                "matrix_lps": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]},
    "dice": {"10": {"before": 0.5, "after": 0.8}, "2": {"before": 0.6, "after": 0.7}},
    "mean_dice_before": 0.55, "mean_dice_after": 0.75,
}


def test_results_table_rows_full_summary():
    rows = bridge.results_table_rows(FULL_SUMMARY, {"2": "white matter"})
    table = dict(rows)
    assert table["Method"] == "io (DeepRegistrationLib 0.1.0)"
    assert table["Global alignment"] == "Rigid (asked: Automatic; not aligned; 1.3 s)"
    assert table["Runtime"] == "6.0 s on cpu"
    assert table["Similarity (ncc) before \u2192 after"] == "0.6123 \u2192 0.9"
    assert table[bridge.FOLDING_STRICT_LABEL] == "0.05 % (183 voxels)"
    assert table[bridge.FOLDING_CENTRAL_LABEL] == "0.0123 % (45 voxels)"
    assert "ITK/Learn2Reg-comparable" in bridge.FOLDING_CENTRAL_LABEL
    assert table["Smallest det J, strict"] == "-0.7"
    assert table["det J min / max (central)"] == "-0.25 / 2.5"
    assert table["SD of log Jacobian"] == "0.0812"
    # the stored LPS point, in RAS, with the strict and the central determinant
    assert table["Worst folding at (RAS mm)"] == "(-1.0, -2.0, 3.0): det J -0.7 (central 0.1)"
    assert table["Dice white matter"] == "0.6 \u2192 0.7"
    assert table["Dice label 10"] == "0.5 \u2192 0.8"
    assert table["Mean Dice"] == "0.55 \u2192 0.75"
    names = [name for name, _ in rows]
    assert names.index("Dice white matter") < names.index("Dice label 10")  # numeric order
    assert names.index(bridge.FOLDING_STRICT_LABEL) < names.index(bridge.FOLDING_CENTRAL_LABEL)
    assert all(isinstance(value, str) for _, value in rows)
    assert table["Refinement steps"] == "0"
    refined = dict(bridge.results_table_rows(dict(FULL_SUMMARY, refine=33,
                                                  refine_schedule=[30, 3]), {}))
    assert refined["Refinement steps"] == "33 (30 on the half grid, 3 on the full grid)"


def test_results_table_rows_partial_and_odd_values():
    assert bridge.results_table_rows({}) == []
    # an older summary: central folding only, no initial stage, worst point without strict values
    rows = dict(bridge.results_table_rows({"folding_percent": float("nan"), "jacobian_min": None,
                                           "jacobian_max": 1.0,
                                           "worst_folding": {"point_lps": [0, 0, 0], "determinant": 0.2}}))
    assert rows[bridge.FOLDING_CENTRAL_LABEL] == "n/a %"
    assert bridge.FOLDING_STRICT_LABEL not in rows and "Global alignment" not in rows
    assert rows["det J min / max (central)"] == "n/a / 1"
    assert rows["Worst folding at (RAS mm)"] == "(-0.0, -0.0, 0.0): det J 0.2"
    assert "Dice" not in " ".join(rows)


def test_key_figures_are_dice_folding_and_time():
    figures = dict(bridge.key_figures(FULL_SUMMARY))
    assert list(figures) == ["Dice", "Folding", "Run time"]
    assert figures["Dice"] == "0.55 \u2192 0.75"
    assert figures["Folding"] == "0.05 % strict, 0.0123 % central"
    assert figures["Run time"] == "6 s (cpu)"
    older = dict(bridge.key_figures({"folding_percent": 0.2, "runtime_seconds": 100}))
    assert older == {"Folding": "0.2 % (central)", "Run time": "1.7 min"}
    assert bridge.key_figures({}) == []
    # a caution about the result comes first, in the panel and in the table; notes in the table
    warned = dict(FULL_SUMMARY, cautions=["caution: vtn was trained on images of one contrast"],
                  notes=["moving image: replaced 3 NaN/inf voxels by the image minimum"])
    assert bridge.key_figures(warned)[0] == ("Caution", "vtn was trained on images of one contrast")
    rows = bridge.results_table_rows(warned)
    assert ("Caution", "vtn was trained on images of one contrast") in rows
    assert ("Note", "moving image: replaced 3 NaN/inf voxels by the image minimum") in rows
    html = bridge.key_figures_html({"folding_percent": 0.2, "device": "<cuda>", "runtime_seconds": 1})
    assert "<b>Folding:</b>" in html and "&lt;cuda&gt;" in html


# ----------------------------------------------------------------------------- the method panel
def shipped_card(name):
    with open(os.path.join(ROOT, "Resources", "checkpoints", f"{name}.json")) as handle:
        return json.load(handle)


def test_model_card_lines_from_a_shipped_card():
    """The curated lines against the card's own JSON values."""
    card = shipped_card("vm-diff")
    lines = dict(bridge.model_card_lines(card))
    assert list(lines) == ["Trained on", "Seen anatomy", "Training steps", "Validation Dice",
                           "Unseen-anatomy Dice", "Date"]
    sources = [s["name"] for s in card["data"]["sources"]]
    assert lines["Trained on"].startswith(", ".join(n.upper() if n == "mni152" else n for n in sources))
    assert "synthetic deformations" in lines["Trained on"]
    assert lines["Seen anatomy"] == "; ".join(dict.fromkeys(bridge.SOURCE_ANATOMY[n]
                                                            for n in sources))
    assert lines["Training steps"] == str(card["training"]["run_iterations"])
    before, after = card["validation"]["identity"]["dice"], card["validation"]["metrics"]["dice"]
    assert lines["Validation Dice"].startswith(f"{before:.2g} \u2192 {after:.2g}")
    unseen = card["unseen_validation"]
    assert lines["Unseen-anatomy Dice"] == (
        f"{unseen['identity']['dice']:.2g} \u2192 {unseen['metrics']['dice']:.2g} "
        f"({', '.join(unseen['sources'])}, never trained on)")
    assert lines["Date"] == card["created"][:10]
    # a warm-started checkpoint states the steps of its whole lineage, not its last run's
    vtn = shipped_card("vtn")["training"]
    assert vtn["runs"] > 1 and vtn["total_iterations"] > vtn["iterations"]
    assert dict(bridge.model_card_lines(shipped_card("vtn")))["Training steps"] == (
        f"{vtn['total_iterations']} steps over {vtn['runs']} runs, "
        f"{vtn['total_wall_time_seconds'] / 3600:.1f} h of training")
    # an incomplete lineage says so in the panel too (the same wording as deepreg methods)
    older = dict(vtn, total_wall_time_seconds=None, lineage_complete=False)
    assert dict(bridge.model_card_lines({"training": older}))["Training steps"] == (
        f"{vtn['total_iterations']} steps over {vtn['runs']} runs (at least: an earlier run's "
        "record is incomplete)")
    assert bridge.model_card_lines(None) == [] and bridge.model_card_lines({}) == []
    odd = dict(bridge.model_card_lines({"data": {"sources": [{"name": "scan7", "modality": "CT"}]},
                                        "validation": {"metrics": {"dice": 0.8}}}))
    assert odd == {"Trained on": "scan7", "Seen anatomy": "scan7 CT", "Validation Dice": "0.8"}


def test_method_description_html_is_curated_and_escaped():
    card = shipped_card("vm-diff")
    html = bridge.method_description_html({
        "name": "vm-diff", "title": "VoxelMorph-diff (U-Net velocity + scaling and squaring)",
        "description": "A small U-Net predicts a stationary velocity on a 4 mm grid.",
        "estimated_seconds": {"2mm": 6.0, "1mm": 150.0}, "model_card": card,
        "checkpoint": "/x/Resources/checkpoints/vm-diff.pt", "available": True})
    assert bridge.PLAIN_DESCRIPTIONS["vm-diff"] in html
    assert "6 s at 2mm" in html and "2.5 min at 1mm" in html
    sources = ", ".join(s["name"].upper() if s["name"] == "mni152" else s["name"]
                        for s in card["data"]["sources"])
    assert (f"Trained on {sources} (synthetic deformations), "
            f"{card['training']['run_iterations']} steps, {card['created'][:10]}") in html
    assert "Seen anatomy:" in html and "Validation Dice:" in html
    # nothing of the raw card: no dictionaries, commands, paths or synthetic-data settings
    for raw in ("{", "synth_config", "config", "--", "/x/", ".pt", "affine_probability", "U-Net velocity",
                "lncc", "iterations"):
        assert raw not in html, raw
    escaped = bridge.method_description_html({"name": "new", "description": "A & B <i>. More.",
                                              "available": False})
    assert escaped.startswith("A &amp; B &lt;i&gt;.") and "More" not in escaped
    assert "Not available" in escaped
    assert bridge.method_description_html({"name": "io"}).startswith(bridge.PLAIN_DESCRIPTIONS["io"])
    assert bridge.method_description_html({"name": "x"}) == "<b>x</b>"


def test_method_short_names_and_tooltips():
    assert bridge.method_short_name({"name": "vtn", "title": "VTN (Volume Tweening Network: affine)"}) == "VTN"
    assert bridge.method_short_name({"name": "io"}) == "io"
    tip = bridge.method_tooltip({"name": "vtn", "title": "VTN (long)", "paper": "Zhao et al."})
    assert tip == "VTN (long)\nPaper: Zhao et al."


def test_readable_choices_cover_the_tokens():
    for choices in (bridge.SIMILARITY_CHOICES, bridge.DEVICE_CHOICES, bridge.INITIAL_CHOICES):
        tokens = [token for token, _ in choices]
        labels = [label for _, label in choices]
        assert len(set(tokens)) == len(tokens) and len(set(labels)) == len(labels)
        assert all(label != token for token, label in choices if token not in ("cpu",))
    assert bridge.choice_label(bridge.SIMILARITY_CHOICES, "lncc") == "Same contrast (local correlation)"
    assert bridge.choice_label(bridge.SIMILARITY_CHOICES, "mind") == "Different contrasts (MIND)"
    assert bridge.choice_label(bridge.INITIAL_CHOICES, "none") == "None (already aligned)"
    assert bridge.INITIALS[0] == bridge.DEFAULT_INITIAL == "auto"
    assert bridge.choice_label(bridge.DEVICE_CHOICES, "unknown") == "unknown"


def test_demo_files_match_their_checksums():
    import hashlib
    folder = os.path.join(ROOT, "DeepRegistration", "Resources", "SampleData")
    for file_name, node_name, file_type, checksum in bridge.DEMO_FILES:
        with open(os.path.join(folder, file_name), "rb") as handle:
            assert checksum == "SHA256:" + hashlib.sha256(handle.read()).hexdigest(), file_name
        assert file_type in ("VolumeFile", "SegmentationFile")
    assert os.path.isfile(os.path.join(folder, bridge.DEMO_SAMPLE_NAME + ".png"))


def test_pick_inputs_prefers_the_demo_pair():
    demo = [entry[1] for entry in bridge.DEMO_FILES]
    assert bridge.pick_inputs(["a", demo[1], "b", demo[0]]) == (3, 1)
    assert bridge.pick_inputs(["a", "b", "c"]) == (0, 1)
    assert bridge.pick_inputs(["a"]) == (0, None) and bridge.pick_inputs([]) == (None, None)
    assert bridge.pick_labels(["x", demo[3], demo[2]], demo[0]) == 2
    assert bridge.pick_labels(["x"], demo[0]) is None and bridge.pick_labels([demo[2]], "other") is None


def test_folding_mask_from_jacobian():
    mask = bridge.folding_mask_from_jacobian(np.array([[-1.0, 0.0], [0.5, np.nan]]))
    assert mask.dtype == np.uint8 and mask.tolist() == [[1, 1], [0, 0]]


# ----------------------------------------------------------------------------- labels and QA images
def test_segment_label_values_share_names():
    values = bridge.segment_label_values(["liver", "spleen"], ["spleen", "kidney", "liver"])
    assert values == {"liver": 1, "spleen": 2, "kidney": 3}
    assert bridge.segment_label_values([]) == {}


def test_checkerboard_and_difference():
    rng = np.random.default_rng(1)
    fixed = rng.normal(size=(8, 10, 12)).astype(np.float32)
    warped = rng.normal(size=(8, 10, 12)).astype(np.float32) * 10 + 5
    board = bridge.checkerboard(fixed, warped, (4, 5, 6))
    a, b = bridge.robust_normalise(fixed), bridge.robust_normalise(warped)
    assert board.shape == fixed.shape and board.dtype == np.float32
    np.testing.assert_array_equal(board[:4, :5, :6], a[:4, :5, :6])
    np.testing.assert_array_equal(board[4:, :5, :6], b[4:, :5, :6])
    np.testing.assert_array_equal(board[4:, 5:, :6], a[4:, 5:, :6])
    np.testing.assert_array_equal(board[4:, 5:, 6:], b[4:, 5:, 6:])
    diff = bridge.difference(fixed, warped)
    np.testing.assert_allclose(diff, a - b)
    assert diff.min() >= -1 and diff.max() <= 1
    np.testing.assert_array_equal(bridge.difference(fixed, fixed), 0)
    with pytest.raises(ValueError):
        bridge.checkerboard(fixed, warped[:-1])


def test_robust_normalise_constant_and_nan():
    assert np.all(bridge.robust_normalise(np.full((3, 3), 7.0)) == 0)
    values = np.array([0.0, 1.0, np.nan, 2.0])
    out = bridge.robust_normalise(values, 0, 100)
    np.testing.assert_allclose(out[[0, 1, 3]], [0.0, 0.5, 1.0])


def test_checkerboard_tile_voxels_square_in_mm():
    assert bridge.checkerboard_tile_voxels((40, 100, 100), (2.5, 1.0, 1.0), tiles=10) == (4, 10, 10)
    assert bridge.checkerboard_tile_voxels((2, 2, 2), (1.0, 1.0, 1.0), tiles=50) == (1, 1, 1)


def test_diverging_window_level_centred():
    values = np.concatenate([np.full(1000, 1.0), np.linspace(0.4, 1.2, 1000)])
    window, level = bridge.diverging_window_level(values, center=1.0, percentile=100)
    assert level == 1.0 and math.isclose(window, 2 * 0.6)
    window, level = bridge.diverging_window_level(np.full(10, 1.0))
    assert (window, level) == (0.1, 1.0)
    window, _ = bridge.diverging_window_level(np.array([-5.0, 9.0]), percentile=100,
                                              maximum_half_width=1.0)
    assert window == 2.0
    window, level = bridge.diverging_window_level(np.array([-0.5, 0.25]), center=0.0,
                                                  percentile=100)
    assert (window, level) == (1.0, 0.0)


# ----------------------------------------------------------------------------- subprocess
def write_script(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_registration_process_reads_events_and_output(tmp_path):
    script = write_script(tmp_path, "fake.py", """
        import json, sys
        def emit(**kw): print(json.dumps(kw), flush=True)
        print("plain text line", flush=True)
        emit(type="progress", fraction=0.5, stage="optimise", message="half")
        print("a warning", file=sys.stderr, flush=True)
        emit(type="log", message="note")
        emit(type="done", output="/tmp/x", summary={"folding_percent": 0.0})
    """)
    process = bridge.RegistrationProcess([sys.executable, script]).start()
    events = process.wait(timeout=60)
    assert process.returncode == 0 and process.is_finished()
    kinds = [e["type"] for e in events]
    assert kinds.count("progress") == 1 and kinds.count("done") == 1 and kinds.count("log") == 1
    outputs = [e for e in events if e["type"] == "output"]
    assert {(e["stream"], e["message"]) for e in outputs} == {("stdout", "plain text line"),
                                                              ("stderr", "a warning")}
    assert process.done_event()["summary"] == {"folding_percent": 0.0}
    assert "[stderr] a warning" in process.log_text()
    assert "optimise: half" in process.log_text()
    assert process.stdout_lines[0] == "plain text line"
    assert not process.cancel_requested


def test_registration_process_error_message(tmp_path):
    script = write_script(tmp_path, "fail.py", """
        import json, sys
        print(json.dumps({"type": "error", "message": "fixed image not found"}), flush=True)
        print("deepreg: error: fixed image not found", file=sys.stderr, flush=True)
        sys.exit(2)
    """)
    process = bridge.RegistrationProcess([sys.executable, script]).start()
    process.wait(timeout=60)
    assert process.returncode == 2
    assert process.done_event() is None
    assert process.error_message() == "fixed image not found"

    crash = write_script(tmp_path, "crash.py", "raise RuntimeError('boom')\n")
    process = bridge.RegistrationProcess([sys.executable, crash]).start()
    process.wait(timeout=60)
    assert process.returncode == 1
    assert "RuntimeError: boom" in process.error_message()


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not yet reaped by its parent) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


LAUNCHER = """
    # stands in for PythonSlicer: a launcher that runs the real interpreter as a child
    import subprocess, sys
    sys.exit(subprocess.call([sys.executable, sys.argv[1]] + sys.argv[2:]))
"""


@pytest.mark.skipif(os.name == "nt", reason="process groups and /proc are POSIX")
def test_cancel_stops_the_child_of_a_launcher(tmp_path):
    child = write_script(tmp_path, "child.py", """
        import json, os, signal, sys, time
        cancelled = []
        signal.signal(signal.SIGTERM, lambda *a: cancelled.append(1))
        print(json.dumps({"type": "log", "message": f"pid {os.getpid()}"}), flush=True)
        for step in range(600):
            if cancelled:
                print(json.dumps({"type": "error", "message": "cancelled"}), flush=True)
                sys.exit(130)
            print(json.dumps({"type": "progress", "fraction": step / 600, "stage": "work"}), flush=True)
            time.sleep(0.05)
    """)
    launcher = write_script(tmp_path, "launcher.py", LAUNCHER)
    process = bridge.RegistrationProcess([sys.executable, launcher, child], grace_seconds=10).start()
    child_pid = None
    deadline = time.monotonic() + 30
    while child_pid is None and time.monotonic() < deadline:
        for event in process.poll():
            if event["type"] == "log" and event["message"].startswith("pid "):
                child_pid = int(event["message"].split()[1])
        time.sleep(0.02)
    assert child_pid is not None
    start = time.monotonic()
    process.cancel()
    process.wait(timeout=30)
    assert time.monotonic() - start < 8, "the child should stop on SIGTERM, well before the grace"
    assert process.cancel_requested
    assert any(e.get("type") == "error" and e.get("message") == "cancelled" for e in process.events)
    # the child has said "cancelled" and is in sys.exit: give its interpreter a moment to finish
    # (on a loaded machine the launcher can be gone before its orphaned child is reaped)
    gone_by = time.monotonic() + 5
    while pid_alive(child_pid) and time.monotonic() < gone_by:
        time.sleep(0.05)
    assert not pid_alive(child_pid)


@pytest.mark.skipif(os.name == "nt", reason="process groups and /proc are POSIX")
def test_cancel_kills_a_child_that_ignores_sigterm(tmp_path):
    child = write_script(tmp_path, "stubborn.py", """
        import json, os, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(json.dumps({"type": "log", "message": f"pid {os.getpid()}"}), flush=True)
        time.sleep(120)
    """)
    launcher = write_script(tmp_path, "launcher.py", LAUNCHER)
    process = bridge.RegistrationProcess([sys.executable, launcher, child], grace_seconds=1.0).start()
    child_pid = None
    deadline = time.monotonic() + 30
    while child_pid is None and time.monotonic() < deadline:
        for event in process.poll():
            if event["type"] == "log":
                child_pid = int(event["message"].split()[1])
        time.sleep(0.02)
    assert child_pid is not None
    start = time.monotonic()
    process.cancel()
    process.wait(timeout=30)
    assert time.monotonic() - start < 10
    assert process.returncode is not None and process.returncode != 0
    assert not pid_alive(child_pid)


def test_cancel_after_exit_is_harmless(tmp_path):
    script = write_script(tmp_path, "quick.py", "print('hi')\n")
    process = bridge.RegistrationProcess([sys.executable, script]).start()
    process.wait(timeout=60)
    process.cancel()
    process.kill()
    assert process.returncode == 0
    with pytest.raises(RuntimeError):
        process.start()


def test_wait_times_out(tmp_path):
    script = write_script(tmp_path, "slow.py", "import time\ntime.sleep(30)\n")
    process = bridge.RegistrationProcess([sys.executable, script]).start()
    try:
        with pytest.raises(TimeoutError):
            process.wait(timeout=0.3)
    finally:
        process.kill()
        process.wait(timeout=30)
    if os.name != "nt":
        assert process.returncode == -signal.SIGKILL


@pytest.mark.skipif(os.name == "nt", reason="process groups and /proc are POSIX")
def test_stop_now_ends_the_tree_without_polling(tmp_path):
    """For scene close and exit: one call, no event loop, the launcher's child gone even when it
    ignores SIGTERM."""
    child = write_script(tmp_path, "stubborn.py", """
        import json, os, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(json.dumps({"type": "log", "message": f"pid {os.getpid()}"}), flush=True)
        time.sleep(120)
    """)
    launcher = write_script(tmp_path, "launcher.py", LAUNCHER)
    process = bridge.RegistrationProcess([sys.executable, launcher, child]).start()
    child_pid = None
    deadline = time.monotonic() + 30
    while child_pid is None and time.monotonic() < deadline:
        for event in process.poll():
            if event["type"] == "log":
                child_pid = int(event["message"].split()[1])
        time.sleep(0.02)
    assert child_pid is not None
    start = time.monotonic()
    process.stop_now(grace_seconds=0.5)
    assert time.monotonic() - start < 10
    assert process.process.poll() is not None and process.cancel_requested
    deadline = time.monotonic() + 5
    while pid_alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(child_pid)
    process.stop_now()  # twice is harmless
