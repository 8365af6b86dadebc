"""Checkpoints are read as weights only: a .pt file carrying a pickled callable is refused on one
line, and the callable never runs.

The crafted checkpoint's payload is harmless but observable: unpickling it calls ``os.mkdir`` on
a marker path. The control test shows that torch's full unpickler does run it, so the refusals
below are real.
"""
import hashlib
import json
import os
import subprocess
import sys

import pytest
import SimpleITK as sitk
import torch

from DeepRegistrationLib.errors import UserInputError
from DeepRegistrationLib.methods import get_method, load_network
from DeepRegistrationLib.methods.base import read_checkpoint, read_model_card, sha256_of
from conftest import ROOT, blob_volume, make_image

SHIPPED = ["ms-r2net", "r2net-nsvf", "r2net-svf", "vm-diff", "vtn"]


class _Payload:
    """Unpickling this calls ``os.mkdir(marker)``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _crafted_checkpoint(folder, name, marker):
    """A vm-diff checkpoint with the real weights plus the payload, and a model card whose sha256
    matches it (whoever crafts the file writes its card too)."""
    state = read_checkpoint(get_method("vm-diff").checkpoint_path())
    state["note"] = _Payload(str(marker))
    path = os.path.join(str(folder), name)
    torch.save(state, path)
    with open(os.path.splitext(path)[0] + ".json", "w") as handle:
        json.dump({"method": "vm-diff", "sha256": sha256_of(path)}, handle)
    return path


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_checkpoint_loads_as_weights_only_and_matches_its_card(name):
    spec = get_method(name)
    path = spec.checkpoint_path()
    assert path and os.path.dirname(path).endswith(os.path.join("Resources", "checkpoints"))
    state = torch.load(path, map_location="cpu", weights_only=True)  # torch itself, no wrapper
    assert state["method"] == name and state["state_dict"]
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert read_model_card(path)["sha256"] == digest
    assert read_checkpoint(path)["config"] == read_model_card(path)["config"]


def test_control_the_full_unpickler_runs_the_payload(tmp_path):
    marker = tmp_path / "ran"
    path = _crafted_checkpoint(tmp_path, "vm-diff.pt", marker)
    torch.load(path, map_location="cpu", weights_only=False)
    assert marker.is_dir()


def test_crafted_checkpoint_is_refused_and_its_payload_never_runs(tmp_path):
    marker = tmp_path / "ran"
    path = _crafted_checkpoint(tmp_path, "vm-diff.pt", marker)
    with pytest.raises(UserInputError, match="holds Python code, not only weights") as error:
        load_network(get_method("vm-diff"), path=path)
    assert "posix.mkdir" in str(error.value) and "\n" not in str(error.value)
    assert not marker.exists()


def test_crafted_checkpoint_through_deepreg_checkpoints_is_one_line_exit_2(tmp_path):
    """The path a user takes: $DEEPREG_CHECKPOINTS points at a folder with a crafted vm-diff.pt."""
    marker = tmp_path / "ran"
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    _crafted_checkpoint(folder, "vm-diff.pt", marker)
    images = []
    for seed in (1, 2):
        images.append(str(tmp_path / f"image{seed}.nii.gz"))
        sitk.WriteImage(make_image(blob_volume((40, 44, 36), seed=seed), spacing=(2.0, 2.0, 2.0)),
                        images[-1])
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=ROOT, DEEPREG_CHECKPOINTS=str(folder))
    completed = subprocess.run([sys.executable, "-m", "DeepRegistrationLib", "register", *images,
                                "--method", "vm-diff", "--output", str(out), "--no-figure", "--quiet"],
                               cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    assert completed.returncode == 2, completed.stderr
    assert len(lines) == 1 and lines[0].startswith("deepreg: error: checkpoint") \
        and "holds Python code" in lines[0], lines
    assert not marker.exists() and not out.exists()


def test_training_resume_and_ms_init_refuse_the_crafted_file(tmp_path):
    from training.__main__ import main as training_main
    from training.train import _load_state
    marker = tmp_path / "ran"
    path = _crafted_checkpoint(tmp_path, "vm-diff.resume.pt", marker)
    with pytest.raises(UserInputError, match="holds Python code"):
        _load_state(path, get_method("vm-diff"))
    code = training_main(["ms-init", "--from", path, "--output", str(tmp_path / "ms.pt")])
    assert code == 2
    assert not marker.exists() and not (tmp_path / "ms.pt").exists()


def test_damaged_and_foreign_files_are_one_line_errors(tmp_path):
    real = get_method("vm-diff").checkpoint_path()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(open(real, "rb").read()[:100000])
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint" * 100)
    plain = tmp_path / "plain.pt"
    torch.save([1, 2, 3], plain)
    for path, expected in ((cut, "cannot read checkpoint"), (junk, "cannot read checkpoint"),
                           (plain, "not a DeepRegistration checkpoint")):
        with pytest.raises(UserInputError, match=expected) as error:
            read_checkpoint(str(path))
        assert "\n" not in str(error.value)
