"""The deepreg command line end to end, and a clear one-line error for every bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepRegistrationLib.cli import main
from DeepRegistrationLib.spatial import warp
from DeepRegistrationLib.synthetic import random_diffeomorphism
from conftest import ROOT, blob_volume, make_image

SHAPE = (24, 28, 26)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    fixed_array = blob_volume(SHAPE, seed=5)
    field = random_diffeomorphism(SHAPE, magnitude=3.0, control_spacing=8, seed=2)
    moving_array = warp(torch.from_numpy(fixed_array)[None, None], field)[0, 0].numpy()
    fixed = make_image(fixed_array, spacing=(1.0, 1.2, 1.5))
    moving = make_image(moving_array, spacing=(1.0, 1.2, 1.5))
    paths = {"fixed": folder / "fixed.nii.gz", "moving": folder / "moving.nrrd",
             "fixed_labels": folder / "fixed_labels.nii.gz",
             "moving_labels": folder / "moving_labels.mha"}
    sitk.WriteImage(fixed, str(paths["fixed"]))
    sitk.WriteImage(moving, str(paths["moving"]))
    for name, array, reference in (("fixed_labels", fixed_array, fixed),
                                   ("moving_labels", moving_array, moving)):
        labels = sitk.GetImageFromArray(np.digitize(array, [0.3, 0.7]).astype(np.uint8))
        labels.CopyInformation(reference)
        sitk.WriteImage(labels, str(paths[name]))
    return {k: str(v) for k, v in paths.items()}


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "DeepRegistrationLib", *args], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=600)


def test_register_end_to_end_with_progress_json(files, tmp_path):
    out = tmp_path / "result"
    completed = run_cli("register", files["fixed"], files["moving"], "--method", "io",
                        "--output", str(out), "--fixed-labels", files["fixed_labels"],
                        "--moving-labels", files["moving_labels"], "--progress-json")
    assert completed.returncode == 0, completed.stderr
    messages = [json.loads(line) for line in completed.stdout.splitlines() if line.strip()]
    progress = [m["fraction"] for m in messages if m["type"] == "progress"]
    assert len(progress) > 5 and progress == sorted(progress) and progress[-1] == 1.0
    done = messages[-1]
    assert done["type"] == "done" and done["output"] == str(out)
    for name in ("warped.nii.gz", "displacement.nii.gz", "jacobian.nii.gz", "grid.nii.gz",
                 "warped_labels.nii.gz", "summary.json", "qa.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary == done["summary"]
    assert summary["mean_dice_after"] > summary["mean_dice_before"]
    assert summary["similarity_after"] > summary["similarity_before"]
    assert summary["folding_percent"] == 0.0 and summary["jacobian_min"] > 0
    assert set(summary["dice"]) == {"1", "2"}
    k, j, i = summary["worst_folding"]["index_kji"]  # where the strict (one-sided) det is least
    jacobian = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "jacobian.nii.gz")))
    assert jacobian[k, j, i] == pytest.approx(summary["worst_folding"]["determinant_central"],
                                              rel=1e-5)
    assert summary["worst_folding"]["determinant"] == summary["jacobian_min_strict"]
    assert summary["jacobian_min_strict"] <= jacobian.min() + 1e-5  # strict <= central everywhere
    assert summary["folding_percent_strict"] == 0.0
    assert not sitk.GetArrayFromImage(sitk.ReadImage(str(out / "folding.nii.gz"))).any()
    with open(out / "qa.png", "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_methods_lists_io_as_json(capsys):
    assert main(["methods", "--json"]) == 0
    methods = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert methods["io"]["available"] and "lncc" in methods["io"]["similarities"]


def _error(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    return code, lines


def _bad(tmp_path, name, array, spacing=(1.0, 1.0, 1.0), **kwargs):
    path = str(tmp_path / name)
    image = sitk.GetImageFromArray(array, **kwargs)
    if image.GetDimension() == 3:
        image.SetSpacing(spacing)
    sitk.WriteImage(image, path)
    return path


def test_bad_inputs_give_one_clear_line_and_exit_2(files, tmp_path, capsys):
    out = str(tmp_path / "out")
    not_image = tmp_path / "notes.txt"
    not_image.write_text("hello")
    cases = {
        "not found": [str(tmp_path / "missing.nii.gz"), files["moving"]],
        "not an image file": [str(not_image), files["moving"]],
        "is 2-D": [_bad(tmp_path, "slice.nii.gz", np.random.rand(20, 20).astype(np.float32)),
                   files["moving"]],
        "is 4-D": [_bad(tmp_path, "series.nii.gz",
                        np.random.rand(3, 10, 10, 10).astype(np.float32), isVector=False),
                   files["moving"]],
        "components per voxel": [_bad(tmp_path, "rgb.nii.gz", np.random.rand(10, 10, 10, 3)
                                      .astype(np.float32), isVector=True), files["moving"]],
        "is constant": [_bad(tmp_path, "flat.nii.gz", np.ones((10, 10, 10), np.float32)),
                        files["moving"]],
        "no finite voxel": [_bad(tmp_path, "nan.nii.gz", np.full((10, 10, 10), np.nan,
                                                                 np.float32)), files["moving"]],
    }
    for expected, inputs in cases.items():
        code, lines = _error(capsys, ["register", *inputs, "--output", out])
        assert code == 2, expected
        assert len(lines) == 1 and expected in lines[0] and lines[0].startswith("deepreg: error:")
    assert not os.path.exists(out)  # nothing was written for a failed run


def test_bad_requests_and_labels(files, tmp_path, capsys):
    out = str(tmp_path / "out")
    base = ["register", files["fixed"], files["moving"], "--output", out]
    float_labels = _bad(tmp_path, "float_labels.nii.gz", np.random.rand(*SHAPE).astype(np.float32),
                        spacing=(1.0, 1.2, 1.5))
    wrong_grid = _bad(tmp_path, "small_labels.nii.gz", np.zeros((10, 10, 10), np.uint8))
    far = sitk.ReadImage(files["moving"])
    far.SetOrigin((900.0, 0.0, 0.0))
    far_path = str(tmp_path / "far.nii.gz")
    sitk.WriteImage(far, far_path)
    cases = {
        "unknown method": base + ["--method", "nonsense"],
        "non-integer values": base + ["--fixed-labels", float_labels, "--moving-labels",
                                      files["moving_labels"]],
        "not on its image's grid": base + ["--moving-labels", wrong_grid],
        # with --initial auto the global stage brings such a pair together instead
        "do not overlap": ["register", files["fixed"], far_path, "--output", out, "--initial",
                           "none"],
    }
    if not torch.cuda.is_available():
        cases["no CUDA"] = base + ["--device", "cuda"]
    for expected, argv in cases.items():
        code, lines = _error(capsys, argv)
        assert code == 2 and len(lines) == 1 and expected in lines[0], (expected, lines)


def test_existing_output_is_never_overwritten_without_flag(files, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, lines = _error(capsys, ["register", files["fixed"], files["moving"], "--output",
                                  str(out)])
    assert code == 2 and "already exists" in lines[0] and "--overwrite" in lines[0]
    assert (out / "precious.txt").read_text() == "keep me"
    assert sorted(os.listdir(out)) == ["precious.txt"]


def test_nan_voxels_are_replaced_and_reported(files, tmp_path, capsys):
    array = sitk.GetArrayFromImage(sitk.ReadImage(files["moving"]))
    array[0, 0, :5] = np.nan
    # MetaImage keeps NaN; ITK's NIfTI reader turns it into 0, which we detect and report
    for name, expected in (("some_nan.mha", "replaced 5 NaN/inf voxels"),
                           ("some_nan.nii.gz", "5 NaN/inf voxels in the NIfTI file were read as 0")):
        path = _bad(tmp_path, name, array, spacing=(1.0, 1.2, 1.5))
        out = tmp_path / (name + "_out")
        code = main(["register", files["fixed"], path, "--output", str(out), "--quiet",
                     "--no-figure"])
        assert code == 0
        summary = json.loads((out / "summary.json").read_text())
        assert any(expected in note for note in summary["notes"]), summary["notes"]


def test_cancel_by_sigterm_exits_130(files, earlier, tmp_path):
    """Cancelled with --overwrite over an earlier result: that result is left exactly as it was."""
    import signal
    import time
    out = _copy(earlier, tmp_path / "cancelled")
    before = _snapshot(out)
    env = dict(os.environ, PYTHONPATH=ROOT)
    process = subprocess.Popen([sys.executable, "-m", "DeepRegistrationLib", "register",
                                files["fixed"], files["moving"], "--output",
                                str(out), "--overwrite", "--progress-json"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    for line in process.stdout:  # wait until the optimisation is running
        if '"progress"' in line and "optimise" in line:
            break
    process.send_signal(signal.SIGTERM)
    started = time.time()
    code = process.wait(timeout=120)
    assert code == 130 and time.time() - started < 60
    assert "cancelled" in process.stderr.read()
    assert _snapshot(out) == before and not _staging_left(tmp_path)


# ------------------------------------------------------------------ output folder: swap, overwrite
def _snapshot(folder):
    """Every file of ``folder`` with its bytes."""
    return {name: open(os.path.join(folder, name), "rb").read()
            for name in sorted(os.listdir(folder))}


def _staging_left(folder):
    return [name for name in os.listdir(folder) if ".deepreg-" in name]


def _copy(source, target):
    import shutil
    shutil.copytree(source, target)
    return target


@pytest.fixture(scope="module")
def earlier(files, tmp_path_factory):
    """A real earlier result: labels (so warped_labels.nii.gz) and the QA figure."""
    out = tmp_path_factory.mktemp("earlier") / "result"
    assert main(["register", files["fixed"], files["moving"], "--output", str(out), "--quiet",
                 "--fixed-labels", files["fixed_labels"], "--moving-labels",
                 files["moving_labels"]]) == 0
    assert {"qa.png", "warped_labels.nii.gz", "summary.json"} <= set(os.listdir(out))
    return out


def test_overwrite_leaves_only_the_new_runs_files(files, earlier, tmp_path):
    out = _copy(earlier, tmp_path / "result")
    old_summary = json.loads((out / "summary.json").read_text())
    assert main(["register", files["fixed"], files["moving"], "--output", str(out), "--quiet",
                 "--no-figure", "--overwrite"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(os.listdir(out)) == sorted(summary["outputs"].values())
    assert "qa.png" not in os.listdir(out) and "warped_labels.nii.gz" not in os.listdir(out)
    assert "dice" in old_summary and "dice" not in summary
    assert not _staging_left(tmp_path)


@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_run_failing_while_writing_leaves_the_earlier_result_intact(files, earlier, tmp_path,
                                                                     monkeypatch, failure):
    """The writer fails after warped, displacement and Jacobian files are written (in the
    staging folder): the earlier result is untouched and the staging folder is gone."""
    import DeepRegistrationLib.outputs as outputs
    out = _copy(earlier, tmp_path / "result")
    before = _snapshot(out)
    written = []

    def failing_summarise(*args, **kwargs):
        written.extend(n for n in os.listdir(tmp_path) if ".deepreg-partial-" in n)
        raise failure
    monkeypatch.setattr(outputs, "summarise", failing_summarise)
    argv = ["register", files["fixed"], files["moving"], "--output", str(out), "--quiet",
            "--overwrite", "--moving-labels", files["moving_labels"]]
    if isinstance(failure, KeyboardInterrupt):
        assert main(argv) == 130
    else:
        with pytest.raises(RuntimeError, match="disk full"):
            main(argv)
    assert written  # the new files were being written beside the result, not into it
    assert _snapshot(out) == before
    assert not _staging_left(tmp_path)


def test_overwrite_never_removes_files_deepreg_did_not_write(files, earlier, tmp_path, capsys):
    plain = tmp_path / "mine"
    plain.mkdir()
    (plain / "precious.txt").write_text("keep me")
    mixed = _copy(earlier, tmp_path / "mixed")
    (mixed / "notes.txt").write_text("my notes")
    for folder in (plain, mixed):
        before = _snapshot(folder)
        code, lines = _error(capsys, ["register", files["fixed"], files["moving"], "--output",
                                      str(folder), "--overwrite"])
        assert code == 2 and len(lines) == 1 and "which no earlier deepreg run wrote" in lines[0]
        assert _snapshot(folder) == before


def test_a_failed_run_removes_the_folders_it_created(files, tmp_path, monkeypatch):
    import DeepRegistrationLib.outputs as outputs

    def failing_summarise(*args, **kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr(outputs, "summarise", failing_summarise)
    with pytest.raises(RuntimeError):
        main(["register", files["fixed"], files["moving"], "--output",
              str(tmp_path / "new" / "nested" / "out"), "--quiet"])
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------- validate before creating anything
def _exit(capsys, argv):
    """Exit code and stderr lines, for errors main() returns and for argparse's SystemExit."""
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, [line for line in captured.err.splitlines() if line.strip()]


def test_every_refused_request_is_one_line_and_creates_nothing(files, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["register", files["fixed"], files["moving"], "--output", str(out)]
    (tmp_path / "a-file").write_text("x")
    far = sitk.ReadImage(files["moving"])
    far.SetOrigin((900.0, 0.0, 0.0))
    far_path = os.path.join(os.path.dirname(files["moving"]), "far.nrrd")  # not in tmp_path
    sitk.WriteImage(far, far_path)
    cases = {
        "unknown method": base + ["--method", "nonsense"],
        "unknown similarity 'bogus'": base + ["--similarity", "bogus"],
        "does not support similarity 'ngf'": base + ["--method", "vm-diff", "--similarity",
                                                     "ngf"],
        "has no variant 'XYZ'": base + ["--variant", "XYZ"],
        "--refine must be a number of steps": base + ["--refine", "-3"],
        "--regularization must be": base + ["--regularization", "-1"],
        "not 'many'": base + ["--refine", "many"],
        "not '3x'": base + ["--refine", "3x"],
        "--fixed-labels needs --moving-labels": base + ["--fixed-labels", files["fixed_labels"]],
        "do not overlap": ["register", files["fixed"], far_path, "--output", str(out),
                           "--initial", "none"],
        "exists and is a file": ["register", files["fixed"], files["moving"], "--output",
                                 str(tmp_path / "a-file")],
        "demo: unknown method": ["demo", "--output", str(out), "--method", "bogus"],
        "demo: --spacing must be": ["demo", "--output", str(out), "--spacing", "0"],
    }
    if not torch.cuda.is_available():
        cases["no CUDA"] = base + ["--device", "cuda"]
    for expected, argv in cases.items():
        code, lines = _exit(capsys, argv)
        assert code == 2 and len(lines) == 1, (expected, lines)
        assert lines[0].startswith("deepreg: error:") and expected.split(": ")[-1] in lines[0], \
            (expected, lines)
        assert not out.exists() and sorted(os.listdir(tmp_path)) == ["a-file"], expected


def test_moving_labels_alone_are_carried_and_the_summary_says_no_dice(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["register", files["fixed"], files["moving"], "--output", str(out),
                 "--no-figure", "--moving-labels", files["moving_labels"]]) == 0
    note = "no Dice without --fixed-labels"
    assert note in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert any(note in n for n in summary["notes"]) and "dice" not in summary
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped_labels.nii.gz")))
    assert set(np.unique(warped)) <= {0, 1, 2} and (warped == 2).any()


# ----------------------------------------------------------------------------- deepreg methods
def test_methods_text_shows_each_model_card(capsys, tmp_path, monkeypatch):
    import dataclasses
    import hashlib
    import shutil

    from DeepRegistrationLib.methods import METHODS, get_method
    monkeypatch.setitem(METHODS, "test-untrained", dataclasses.replace(
        get_method("vm-diff"), name="test-untrained", checkpoint="test-untrained.pt"))
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    blocks = {block.split()[0]: block for block in text.split("\n\n") if block.strip()}
    vtn = blocks["vtn"]
    path = get_method("vtn").checkpoint_path()
    card = json.load(open(os.path.splitext(path)[0] + ".json"))
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert f"checkpoint: {path}" in vtn
    assert f"sha256: {digest[:12]}... (matches the file), created {card['created']}" in vtn
    first_source = card["data"]["sources"][0]
    assert f"trained on: {first_source['name']} ({first_source['modality']}" in vtn
    assert f"at {card['data']['spacing_mm']:g} mm" in vtn
    training = card["training"]
    run_steps = training.get("run_iterations", training["iterations"])
    run_seconds = training.get("run_wall_time_seconds", training["wall_time_seconds"])
    assert f"training: {run_steps} steps, {run_seconds / 60:.1f} min wall time" in vtn
    validation = card["validation"]
    assert f"validation ({validation['cases']} synthetic cases, step {validation['step']}" in vtn
    assert f"Dice {validation['identity']['dice']:.3f} -> {validation['metrics']['dice']:.3f}" \
        in vtn
    assert "checkpoint: none needed" in blocks["io"]
    assert "checkpoint: none found" in blocks["test-untrained"]
    assert "[no checkpoint (train it first)]" in blocks["test-untrained"]
    # a card that does not match its checkpoint is called out
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    shutil.copy(get_method("vm-diff").checkpoint_path(), folder / "vm-diff.pt")
    wrong = dict(json.load(open(os.path.splitext(get_method("vm-diff").checkpoint_path())[0]
                                + ".json")), sha256="0" * 64)
    (folder / "vm-diff.json").write_text(json.dumps(wrong))
    monkeypatch.setenv("DEEPREG_CHECKPOINTS", str(folder))
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    block = [b for b in text.split("\n\n") if b.startswith("vm-diff")][0]
    assert "sha256: 000000000000... (DOES NOT match the file" in block


def test_run_ends_with_os_exit_unless_profiled(monkeypatch):
    """``cli.run`` ends the process with ``os._exit(main())`` (no interpreter teardown), but
    leaves by ``sys.exit`` under a profiler, whose report is written after the program returns."""
    from DeepRegistrationLib import cli as module
    exits = []
    monkeypatch.setattr(module, "main", lambda: 2)
    monkeypatch.setattr(module.os, "_exit", lambda code: exits.append(("os._exit", code)))
    monkeypatch.setattr(module.sys, "gettrace", lambda: None)  # coverage may trace the tests
    monkeypatch.setattr(module.sys, "getprofile", lambda: None)
    module.run()
    assert exits == [("os._exit", 2)]
    monkeypatch.setattr(module.sys, "getprofile", lambda: print)  # any profile function
    with pytest.raises(SystemExit) as stopped:
        module.run()
    assert stopped.value.code == 2 and exits == [("os._exit", 2)]


def test_the_process_exits_with_every_line_written_and_the_right_code(files, tmp_path):
    """``python -m DeepRegistrationLib`` and ``deepreg`` end with ``cli.run``: ``os._exit`` after
    flushing, skipping the interpreter's teardown (issue #18). Piped output must still arrive
    whole and the exit code must be main()'s."""
    listed = run_cli("methods")
    assert listed.returncode == 0, listed.stderr
    from DeepRegistrationLib.methods import list_methods
    names = [spec.name for spec in list_methods()]
    assert all(f"{name} " in listed.stdout for name in names)
    assert listed.stdout.rstrip().splitlines()[-1].strip()  # the last method's lines arrived
    refused = run_cli("register", str(tmp_path / "missing.nii.gz"), files["moving"],
                      "--output", str(tmp_path / "out"))
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    with open(os.path.join(ROOT, "pyproject.toml")) as handle:
        assert 'deepreg = "DeepRegistrationLib.cli:run"' in handle.read()
