"""The trainer: a tiny vm-diff run lowers the loss, keeps a checkpoint whose model card matches
its file, resumes, and the checkpoint is what ``deepreg register --method vm-diff`` loads; the
``loss_fn`` hook receives what the docstring promises."""
import contextlib
import dataclasses
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import blob_volume, make_image
from DeepRegistrationLib import cli
from DeepRegistrationLib.images import image_from_array
from DeepRegistrationLib.methods import METHODS, get_method, load_network
from DeepRegistrationLib.methods.base import sha256_of
from training.data import Volume
from training.train import TrainOptions, _ancestors, lineage_totals, soft_dice_loss, train

TINY = {"encoder": [8, 16, 16, 16], "features": 8}
CALM = {"contrast_probability": 0.0, "augment_probability": 0.0}


def tiny_volume():
    array = blob_volume((36, 40, 36), seed=5, blobs=18)
    image = make_image(array, spacing=(4.0,) * 3, origin=(-70.0, -80.0, -70.0))
    labels = np.digitize(array, [0.3, 0.7]).astype(np.int32)
    return Volume("blobs", image, image_from_array(labels, image), {1: "low", 2: "high"}, "T1",
                  "test blobs")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    output = str(folder / "vm-diff.pt")
    # overfit one batch of two pairs: 24 steps are enough to see the loss fall
    card = train(TrainOptions(method="vm-diff", output=output, iterations=24,
                              sources=[tiny_volume()], seed=1, val_every=12, val_cases=1,
                              lr=3e-3, batch_size=2, spacing_mm=8.0, config=TINY, synth=CALM,
                              overfit=2, progress=False))
    return folder, output, card


def test_training_lowers_the_loss_and_keeps_the_best_checkpoint(trained):
    folder, output, card = trained
    training = card["training"]
    assert training["loss_last_steps"] < 0.93 * training["loss_first_step"]
    history = card["validation"]["history"]
    assert [h["step"] for h in history] == [0, 12, 24]
    assert card["validation"]["step"] in (12, 24)
    assert card["validation"]["metrics"]["folding_percent"] < 1.0
    # the model card is complete and matches the file
    assert card["sha256"] == sha256_of(output)
    assert card["method"] == "vm-diff" and card["config"]["encoder"] == TINY["encoder"]
    for key in ("iterations", "wall_time_seconds", "seed", "losses", "batch_size", "lr"):
        assert key in card["training"], key
    assert card["training"]["losses"]["diffusion"] == 1.0
    assert card["data"]["sources"][0]["name"] == "blobs"
    assert card["library_version"] and card["validation"]["identity"]["dice"] > 0
    with open(os.path.splitext(output)[0] + ".json") as handle:
        assert json.load(handle)["sha256"] == card["sha256"]
    log = open(os.path.splitext(output)[0] + ".log").read()
    assert "step 24: validation" in log and "best so far" in log
    # the same cases without their affine part are validated too, logged and carded
    assert "step 24: deformable validation" in log
    deformable = card["deformable_validation"]
    assert deformable["metrics"]["gt_error_mm"] >= 0 and "step" not in deformable["metrics"]
    at_best = next(h for h in history if h["step"] == card["validation"]["step"])
    assert at_best["deformable"] == deformable["metrics"]
    network = load_network(get_method("vm-diff"), path=output)
    assert sum(p.numel() for p in network.parameters()) == card["parameters"]


def test_resume_continues_where_the_run_stopped(trained):
    folder, output, _ = trained
    resume = os.path.splitext(output)[0] + ".resume.pt"
    assert os.path.isfile(resume)
    card = train(TrainOptions(method="vm-diff", output=output, iterations=27,
                              sources=[tiny_volume()], seed=1, resume=resume, val_every=0,
                              val_cases=1, lr=1e-2, batch_size=2, spacing_mm=8.0, synth=CALM,
                              overfit=2, progress=False))
    log = open(os.path.splitext(output)[0] + ".log").read()
    assert "resumed from" in log and "at step 24" in log
    assert torch.load(resume, weights_only=False)["step"] == 27
    assert card["training"]["run_iterations"] == 27
    assert card["config"]["encoder"] == TINY["encoder"]  # the resumed run kept its network


def test_a_resumed_run_keeps_its_loss_options(trained):
    """A resume state continues one run: asking for other guidance terms or another clean
    similarity than the run was trained with is refused in one line, before any step."""
    from DeepRegistrationLib.errors import UserInputError
    _, output, _ = trained
    resume = os.path.splitext(output)[0] + ".resume.pt"
    assert torch.load(resume, weights_only=False)["loss_options"] == {
        "guidance": {}, "clean_similarity": False}
    for change in ({"guidance": {"supervised": 0.5}}, {"clean_similarity": True}):
        with pytest.raises(UserInputError, match="was trained with guidance"):
            train(TrainOptions(method="vm-diff", output=output, iterations=30,
                               sources=[tiny_volume()], seed=1, resume=resume, val_every=0,
                               val_cases=1, batch_size=2, spacing_mm=8.0, synth=CALM,
                               overfit=2, progress=False, **change))


def test_a_warm_started_run_carries_the_cost_of_its_whole_lineage(trained, tmp_path):
    """Continuing a checkpoint: the new card lists every earlier run and totals their steps and
    wall time with its own, twice over (a warm start of a warm start), and ``deepreg methods``
    prints the totals instead of 'its steps are not counted'."""
    _, output, _ = trained
    with open(os.path.splitext(output)[0] + ".json") as handle:
        first = json.load(handle)["training"]
    cards = []
    for generation, start in enumerate([output, str(tmp_path / "second.pt")]):
        cards.append(train(TrainOptions(
            method="vm-diff", output=str(tmp_path / ("second.pt", "third.pt")[generation]),
            iterations=2, sources=[tiny_volume()], seed=1, resume=start, val_every=0,
            val_cases=1, lr=1e-3, batch_size=2, spacing_mm=8.0, config=TINY, synth=CALM, overfit=2,
            progress=False)))
    second, third = (card["training"] for card in cards)
    lineage = third["warm_start"]["lineage"]
    assert [run["sha256"] for run in lineage] == [sha256_of(output),
                                                  sha256_of(str(tmp_path / "second.pt"))]
    assert [run["iterations"] for run in lineage] == [first["iterations"], 2]
    assert third["runs"] == 3 and third["lineage_complete"]
    assert third["total_iterations"] == first["iterations"] + 2 + third["iterations"]
    assert third["total_wall_time_seconds"] == pytest.approx(
        first["wall_time_seconds"] + second["wall_time_seconds"] + third["wall_time_seconds"],
        abs=0.2)
    lines = cli._card_lines({"checkpoint": str(tmp_path / "third.pt"), "model_card": cards[1]})
    assert f"in total: {third['total_iterations']} steps over 3 runs" in "\n".join(lines)
    assert not any("not counted" in line for line in lines)
    # a warm start recorded before lineages were (an older resume state): counted, but flagged
    older = lineage_totals(_ancestors({"sha256": "ab", "iterations": 3600}), 3000, 60.0)
    assert older == {"runs": 2, "total_iterations": 6600, "total_wall_time_seconds": None,
                     "lineage_complete": False}
    older_card = {"checkpoint": "x.pt", "model_card": {"training": {"iterations": 3000,
                                                                    **older}}}
    assert "in total: 6600 steps over 2 runs (at least" in "\n".join(cli._card_lines(older_card))


def test_checkpoint_loads_through_the_command_line(trained, tmp_path, monkeypatch):
    folder, output, card = trained
    monkeypatch.setenv("DEEPREG_CHECKPOINTS", str(folder))
    spec = get_method("vm-diff")
    assert spec.checkpoint_path() == output and spec.available
    fixed = make_image(blob_volume((24, 28, 26), seed=2), spacing=(3.0, 3.0, 3.0))
    moving = make_image(np.roll(blob_volume((24, 28, 26), seed=2), 1, axis=2),
                        spacing=(3.0, 3.0, 3.0))
    sitk.WriteImage(fixed, str(tmp_path / "f.nii.gz"))
    sitk.WriteImage(moving, str(tmp_path / "m.nii.gz"))
    code = cli.main(["register", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"),
                     "--method", "vm-diff", "--output", str(tmp_path / "out"), "--quiet",
                     "--no-figure"])
    assert code == 0
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert summary["method"] == "vm-diff" and summary["folding_percent"] < 1.0
    described = {m["name"]: m for m in (s.describe() for s in [spec])}
    assert described["vm-diff"]["model_card"]["sha256"] == card["sha256"]


def test_a_network_runs_on_the_grid_it_was_trained_on(trained, monkeypatch):
    """The run trained on 8 mm; vm-diff's spec says 4 mm: the checkpoint's grid wins, also for
    an older checkpoint whose file does not hold it (its model card does)."""
    from DeepRegistrationLib.methods.base import RegistrationInputs, run_network
    from DeepRegistrationLib.progress import ProgressScope

    folder, output, card = trained
    spec = get_method("vm-diff")
    assert spec.working_spacing_mm == 4.0 and card["working_spacing_mm"] == 8.0
    network = load_network(spec, path=output)
    assert network.working_spacing_mm == 8.0
    messages = []
    progress = ProgressScope(lambda fraction, stage, detail="": messages.append(detail or stage))
    image = torch.from_numpy(blob_volume((40, 44, 36), seed=4))[None, None]
    inputs = RegistrationInputs(image, image, (2.0, 2.0, 2.0), progress=progress)
    field = run_network(inputs, spec, network)
    assert field.shape == (1, 3, 40, 44, 36)
    # 2 mm x (40, 44, 36) voxels at 8 mm: about 11 x 12 x 10 (not 20 x 22 x 18 at 4 mm)
    assert any("11x12x10" in m for m in messages), messages
    # an older checkpoint: no grid in the file, the card's is used
    state = torch.load(output, weights_only=True)
    state.pop("working_spacing_mm", None)
    older = os.path.join(str(folder), "older", "vm-diff.pt")
    os.makedirs(os.path.dirname(older))
    torch.save(state, older)
    with open(older.replace(".pt", ".json"), "w") as handle:
        json.dump({"working_spacing_mm": 8.0}, handle)
    assert load_network(spec, path=older).working_spacing_mm == 8.0


@contextlib.contextmanager
def vm_diff_copy(name, training):
    """vm-diff registered as ``name`` with its own ``training`` schema, for the test's duration."""
    METHODS[name] = dataclasses.replace(get_method("vm-diff"), name=name,
                                        checkpoint=f"{name}.pt", training=training)
    try:
        yield
    finally:
        METHODS.pop(name)


def test_loss_fn_hook_receives_the_documented_arguments(tmp_path):
    calls = []

    def loss_fn(network, fixed, moving, batch):
        calls.append({"training": batch["training"], "step": batch["step"],
                      "keys": set(batch), "shape": tuple(fixed.shape)})
        displacement = network(fixed, moving)
        loss = soft_dice_loss(batch["fixed_labels"], batch["moving_labels"], displacement)
        return loss, {"dice_loss": loss}

    with vm_diff_copy("hook-test", {"loss_fn": loss_fn, "lr": 1e-3}):
        card = train(TrainOptions(method="hook-test", output=str(tmp_path / "hook-test.pt"),
                                  iterations=2, sources=[tiny_volume()], val_every=0,
                                  val_cases=1, batch_size=2, spacing_mm=8.0, config=TINY,
                                  progress=False))
    steps = [c["step"] for c in calls if c["training"]]
    assert steps == [0, 1]
    # validation at step 0 and at the end, each on the cases with and without their affine
    assert sum(1 for c in calls if not c["training"]) == 4
    expected = {"fixed_labels", "moving_labels", "displacement", "generating", "source",
                "multimodal", "step", "iterations", "training", "spec", "config"}
    assert expected <= calls[0]["keys"]
    first_step = next(c for c in calls if c["training"])
    assert first_step["shape"][0] == 2 and all(n % 16 == 0 for n in first_step["shape"][2:])
    assert "loss_fn" in card["training"]["losses"]
    log = open(tmp_path / "hook-test.log").read()
    assert "dice_loss" in log


def test_curriculum_trains_coarse_then_fine_and_keeps_only_fine_checkpoints(tmp_path):
    """The first steps run on the coarse grid with the coarse batch, the rest on the working grid;
    validation follows the stage's grid, and a coarse-stage network is never kept as "best"."""
    shapes = []

    def loss_fn(network, fixed, moving, batch):
        if batch["training"]:
            shapes.append(tuple(fixed.shape))
        displacement = network(fixed, moving)
        loss = soft_dice_loss(batch["fixed_labels"], batch["moving_labels"], displacement)
        return loss, {}

    curriculum = {"spacing_mm": 8.0, "fraction": 0.5, "batch_size": 3}
    with vm_diff_copy("curriculum-test",
                      {"loss_fn": loss_fn, "lr": 1e-3, "curriculum": curriculum}):
        card = train(TrainOptions(method="curriculum-test", output=str(tmp_path / "c.pt"),
                                  iterations=4, sources=[tiny_volume()], val_every=1,
                                  val_cases=1, batch_size=1, spacing_mm=4.0, config=TINY,
                                  progress=False))
        with pytest.raises(Exception, match="coarse-fraction"):
            train(TrainOptions(method="curriculum-test", output=str(tmp_path / "d.pt"),
                               iterations=4, sources=[tiny_volume()], spacing_mm=4.0,
                               config=TINY, coarse_fraction=1.0, progress=False))
    coarse_shape = (3, 1, 32, 32, 32)      # 144 mm at 8 mm -> 18 voxels -> multiple of 16
    fine_shape = (1, 1, 48, 48, 48)        # 36-40 voxels at 4 mm -> 48
    assert shapes == [coarse_shape, coarse_shape, fine_shape, fine_shape]
    assert card["training"]["curriculum"] == [{"spacing_mm": 8.0, "fraction": 0.5,
                                               "batch_size": 3, "steps": 2}]
    assert card["validation"]["step"] in (3, 4)   # a fine-stage network
    history = card["validation"]["history"]
    assert [(h["step"], h["spacing_mm"]) for h in history] == [
        (0, 8.0), (1, 8.0), (2, 4.0), (3, 4.0), (4, 4.0)]
    assert "curriculum: steps 0-1 at 8.0 mm" in open(tmp_path / "c.log").read()
    # the network as the 8 mm stage left it (step 2) is kept apart, runnable at 8 mm
    snapshot = tmp_path / "c.8mm.pt"
    stage_card = json.load(open(tmp_path / "c.8mm.json"))
    assert stage_card["working_spacing_mm"] == 8.0 and stage_card["validation"]["step"] == 2
    assert "end of the 8 mm curriculum stage" in stage_card["training"]["stage_snapshot"]
    assert stage_card["sha256"] != card["sha256"]
    with vm_diff_copy("curriculum-test", {}):
        network = load_network(get_method("curriculum-test"), path=str(snapshot))
    assert network.working_spacing_mm == 8.0
