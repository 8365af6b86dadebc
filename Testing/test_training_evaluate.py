"""Evaluation: our method and a peer on the same case, measured by the same code, written as
results.md / results.csv / results.png."""
import csv
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepRegistrationLib.errors import UserInputError
from training import evaluate as ev


def test_tiny_evaluation_writes_the_report(tmp_path):
    pytest.importorskip("nilearn", reason="the tiny case is the MNI152 template from nilearn")
    options = ev.EvaluateOptions(methods=["io", "vm-diff"], peers=["demons"],
                                 output=str(tmp_path), cases="tiny",
                                 options={"io": {"iterations": [12, 6]}}, verbose=False)
    runs, notes = ev.plan_runs(options)
    has_checkpoint = any(r["name"] == "vm-diff" for r in runs)
    table = ev.evaluate(options)
    for name in ("results.md", "results.csv", "results.png", "cases/mni152-tiny/fixed.nii.gz",
                 "cases/mni152-tiny/truth.nii.gz"):
        assert (tmp_path / name).is_file(), name
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    by_method = {r["method"]: r for r in rows}
    assert {"identity", "io", "demons"} <= set(by_method)
    for name in ("io", "demons"):
        row = by_method[name]
        assert row["status"] == "ok", row["note"]
        assert float(row["dice"]) > float(by_method["identity"]["dice"])
        assert float(row["gt_error_mm"]) < float(by_method["identity"]["gt_error_mm"])
        assert float(row["seconds"]) > 0 and float(row["peak_mib"]) >= 0
        assert 0.0 <= float(row["folding_percent"]) < 5.0
    text = open(tmp_path / "results.md").read()
    assert "| io |" in text and "| demons |" in text and "peak MiB" in text
    assert "| io |" in table
    if not has_checkpoint:  # a method without weights is skipped with a note, not an error
        assert "vm-diff: skipped, no checkpoint" in text


def test_other_grid_case_keeps_the_ground_truth_physical():
    """The moving image on a rotated, anisotropic grid: the ground-truth field (defined on the
    fixed grid in physical space) still maps the moving labels onto the fixed ones."""
    pytest.importorskip("nilearn")
    case = ev.build_case(ev.CaseSpec("t", "mni152", 0.6, other_grid=True), 8.0, 0)
    assert not np.allclose(case.moving.GetDirection(), case.fixed.GetDirection())
    assert case.moving.GetSize() != case.fixed.GetSize()
    truth = ev.field_metrics(case, case.truth)
    identity = ev.field_metrics(case, torch.zeros_like(case.truth))
    assert truth["gt_error_mm"] == 0.0
    assert truth["ncc"] > identity["ncc"] + 0.02 and truth["ncc"] > 0.98
    # labels resampled (nearest) onto a coarser rotated 8 mm grid lose thin structures: the
    # ground truth's Dice is the ceiling any method can reach on this case (reported as "truth")
    assert truth["dice"] > identity["dice"] + 0.1


def test_unknown_names_are_user_errors(tmp_path):
    with pytest.raises(UserInputError, match="unknown method"):
        ev.plan_runs(ev.EvaluateOptions(["nope"], [], str(tmp_path)))
    with pytest.raises(UserInputError, match="unknown peer"):
        ev.plan_runs(ev.EvaluateOptions([], ["flirt"], str(tmp_path)))
    with pytest.raises(UserInputError, match="--cases"):
        ev.case_specs("huge", ["mni152"])


def test_a_refused_request_creates_no_output_folder(tmp_path, capsys):
    """--unseen-source (and an unknown method, peer or case set) is refused before the output
    folder or its evaluate.log is created, through evaluate() and the command line alike."""
    requests = [dict(cases="small", unseen_source="pydeface"),  # --cases unseen only
                dict(cases="unseen", unseen_source=str(tmp_path / "missing.nii.gz")),
                dict(cases="huge"), dict(methods=["nope"]), dict(peers=["flirt"])]
    for index, request in enumerate(requests):
        output = tmp_path / f"out{index}"
        options = dict(methods=["io"], peers=[], output=str(output), verbose=False)
        options.update(request)
        with pytest.raises(UserInputError):
            ev.evaluate(ev.EvaluateOptions(**options))
        assert not output.exists(), request
    from training.__main__ import main
    output = tmp_path / "cli"
    code = main(["evaluate", "--output", str(output), "--cases", "small",
                 "--unseen-source", "pydeface", "--quiet"])
    assert code == 2 and "--cases unseen only" in capsys.readouterr().err
    assert not output.exists()


def test_other_grid_covers_the_same_region():
    image = sitk.Image((20, 24, 16), sitk.sitkFloat32)
    image.SetSpacing((2.0, 2.0, 3.0))
    reference = ev.other_grid(image)
    centre = lambda im: np.array(im.TransformContinuousIndexToPhysicalPoint(  # noqa: E731
        [(n - 1) / 2.0 for n in im.GetSize()]))
    np.testing.assert_allclose(centre(reference), centre(image), atol=1e-9)
    direction = np.array(reference.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(direction @ direction.T, np.eye(3), atol=1e-12)


def test_variant_labels_are_planned_and_bad_variants_refused():
    from DeepRegistrationLib.errors import UserInputError
    from training.evaluate import EvaluateOptions, plan_runs

    runs, _ = plan_runs(EvaluateOptions(methods=["io"], peers=[], output="unused"))
    assert runs[0]["label"] == "io" and runs[0]["variant"] is None
    with pytest.raises(UserInputError, match="has no variant"):
        plan_runs(EvaluateOptions(methods=["io@ADDD"], peers=[], output="unused"))


def test_bspline_case_truth_is_itks_inverse_and_brings_the_labels_back():
    """The unseen set's deformation family comes from SimpleITK (random cubic B-spline) and its
    ground truth from ITK's field inversion: resampling the moving labels through the truth with
    SimpleITK itself recovers the fixed labels far better than the identity does."""
    pytest.importorskip("nilearn")
    case = ev.build_case(ev.CaseSpec("b", "mni152", 6.0, deformation="bspline"), 6.0, 1)
    assert case.sources == ("mni152",) and case.truth is not None
    from DeepRegistrationLib.outputs import displacement_field_image
    field = sitk.Cast(displacement_field_image(case.truth, case.fixed), sitk.sitkVectorFloat64)
    through = sitk.Resample(case.moving_labels, case.fixed, sitk.DisplacementFieldTransform(field),
                            sitk.sitkNearestNeighbor, 0)
    fixed = sitk.GetArrayFromImage(case.fixed_labels)
    moving = sitk.GetArrayFromImage(case.moving_labels)
    recovered = sitk.GetArrayFromImage(through)
    inside = fixed > 0
    assert (recovered[inside] == fixed[inside]).mean() > 0.9
    assert (moving[inside] == fixed[inside]).mean() < (recovered[inside] == fixed[inside]).mean() - 0.05
    metrics = ev.field_metrics(case, case.truth)
    assert metrics["gt_error_mm"] == 0.0


def test_seen_and_unseen_follow_the_model_card():
    class Spec:
        needs_checkpoint = True

        def __init__(self, path):
            self.path = path

        def checkpoint_path(self):
            return self.path

    import json
    import os
    import tempfile
    folder = tempfile.mkdtemp()
    with open(os.path.join(folder, "net.json"), "w") as handle:
        json.dump({"data": {"sources": [{"name": "mni152"}, {"name": "pydeface"}]}}, handle)
    run = {"kind": "method", "spec": Spec(os.path.join(folder, "net.pt"))}
    case = ev.Case("c", None, None, None, None, None, sources=("itk-t1",))
    assert ev.anatomy_seen(run, case) == "unseen"
    case.sources = ("mni152",)
    assert ev.anatomy_seen(run, case) == "seen"
    case.sources = ("itk-t1", "mni152")
    assert ev.anatomy_seen(run, case) == "mixed"
    assert ev.anatomy_seen({"kind": "peer", "name": "ants"}, case) == "-"
    specs = ev.case_specs("unseen", ["mni152", "itk-t1"])
    assert {s.source for s in specs} == {"itk-t1"}
    assert any(s.deformation == "subject" and s.moving_source == "mni152" for s in specs)


def test_tuning_cases_share_no_anatomy_or_seed_with_the_unseen_cases(monkeypatch):
    installed = ["mni152", "pydeface", "itk-t1", "invesalius-ct"]
    tuning, unseen = ev.case_specs("tuning", installed), ev.case_specs("unseen", installed)
    assert {s.source for s in tuning}.isdisjoint({s.source for s in unseen})
    assert {s.deformation for s in tuning} == {"bspline"}
    assert ev.case_spacing("tuning") == ev.case_spacing("unseen")
    # the seeds a case set draws: build_cases passes offset + position to build_case
    class Drawn(Exception):
        pass

    def first_case(spec, spacing, index):
        raise Drawn(index)

    seen = {}
    monkeypatch.setattr(ev, "build_case", first_case)
    monkeypatch.setattr("training.data.available_sources", lambda: installed)
    for which in ("tuning", "unseen"):
        with pytest.raises(Drawn) as drawn:
            ev.build_cases(which, "/nonexistent")
        seen[which] = drawn.value.args[0]
    assert seen["tuning"] >= ev.TUNING_INDEX_OFFSET > len(unseen) and seen["unseen"] == 0


def test_tradeoff_averages_common_cases_and_suffixes_each_run(tmp_path):
    from training import tradeoff

    header = "case,method,kind,status,dice,seconds\n"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "results.csv").write_text(
        header + "c1,identity,baseline,ok,0.5,0\nc2,identity,baseline,ok,0.7,0\n"
        "c1,vtn,method,ok,0.6,2\nc2,vtn,method,ok,0.8,4\n"
        "c1,ants,peer,ok,0.9,10\nc2,ants,peer,failed,,\n")
    (tmp_path / "b" / "results.csv").write_text(
        header + "c1,identity,baseline,ok,0.5,0\nc2,identity,baseline,ok,0.7,0\n"
        "c1,vtn,method,ok,0.7,5\nc2,vtn,method,ok,0.9,7\n")
    rows = tradeoff.read_runs([str(tmp_path / "a"), f"{tmp_path / 'b'}=+refine 60"])
    cases, summary = tradeoff.summarise(rows)
    assert cases == ["c1"]  # ANTs failed on c2: only c1 is common to every method
    assert summary["vtn"]["dice"] == pytest.approx(0.6)
    assert summary["vtn +refine 60"]["seconds"] == pytest.approx(5.0)
    assert summary["identity"]["dice"] == pytest.approx(0.5)
    assert math.isnan(summary["vtn"]["gt_error_mm"])  # a run without the column: nan, not 0
    assert tradeoff.main([str(tmp_path / "a"), f"{tmp_path / 'b'}=+refine 60",
                          "--output", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "tradeoff.png").stat().st_size > 1000
    assert "vtn +refine 60" in (tmp_path / "out" / "tradeoff.md").read_text()


def test_curves_read_every_grid_and_its_identity_from_a_training_log(tmp_path):
    from training import curves

    log = tmp_path / "run.log"
    log.write_text(
        "2026-12-02 14:10:08 train vtn: 5 parameters, sources ['a'], canvas (128, 128, 128) at "
        "2.0 mm, batch 1\n"
        "2026-12-02 14:10:08 validation: 4 cases (seed 1); identity dice 0.7276 gt_error_mm 4.7\n"
        "2026-12-02 14:10:08 validation at 8.0 mm (coarse stage): identity dice 0.80 "
        "gt_error_mm 5.0\n"
        "2026-12-02 14:10:08 unseen-anatomy validation (itk-t1): identity dice 0.565 "
        "gt_error_mm 4.4\n"
        "2026-12-02 14:10:09 step 0: validation at 8.0 mm dice 0.80 gt_error_mm 5.0 loss 0.4\n"
        "2026-12-02 14:11:00 step 10: 1A_similarity 0.1 loss 0.2 lr 1.00e-03\n"
        "2026-12-02 14:12:00 step 250: validation dice 0.75 gt_error_mm 4.1 loss 0.3\n"
        "2026-12-02 14:12:01 step 250: unseen-anatomy validation dice 0.55 gt_error_mm 4.6 "
        "loss 0.3\n")
    run = curves.read_log(str(log))
    assert run["working"] == "2.0"
    assert run["identity"]["2.0"]["dice"] == 0.7276 and run["identity"]["8.0"]["dice"] == 0.80
    assert run["identity"]["unseen"]["gt_error_mm"] == 4.4
    assert run["curves"]["8.0"] == [(0, {"dice": 0.80, "gt_error_mm": 5.0, "loss": 0.4})]
    assert run["curves"]["2.0"][0][0] == 250 and run["curves"]["unseen"][0][1]["dice"] == 0.55
    assert curves.main([str(log), "--output", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_unseen_cases_take_another_subject_and_never_fall_back_to_seen_anatomy(tmp_path):
    """--unseen-source: leave-one-source-out with an installed source, or a user's own image
    (case names from its file name; a bspline case built from it carries its path as the case's
    source, so every network's card marks it unseen). Without the held-out itk-t1 the set is
    refused instead of quietly built on anatomy the networks were trained on."""
    installed = ["mni152", "pydeface"]
    with pytest.raises(UserInputError, match="'itk-t1' source, which is not installed"):
        ev.case_specs("unseen", installed)
    specs = ev.case_specs("unseen", installed, "pydeface")
    assert {s.source for s in specs} == {"pydeface"}
    assert not any(s.deformation == "subject" for s in specs)  # labels of two subjects: itk-t1 only
    with pytest.raises(UserInputError, match="neither a data source"):
        ev.case_specs("unseen", installed, str(tmp_path / "missing.nii.gz"))
    with pytest.raises(UserInputError, match="--cases unseen only"):
        ev.case_specs("small", installed, "pydeface")

    from conftest import blob_volume, make_image
    path = str(tmp_path / "my_scan.nii.gz")
    sitk.WriteImage(make_image(blob_volume((30, 34, 30), seed=3, blobs=12), spacing=(4.0,) * 3),
                    path)
    specs = ev.case_specs("unseen", installed, path)
    assert [s.name for s in specs][:2] == ["my_scan-bspline-35mm", "my_scan-bspline-55mm"]
    case = ev.build_case(specs[0], 6.0, 0)
    assert case.sources == (path,) and case.truth is not None
    assert sitk.GetArrayFromImage(case.fixed_labels).max() > 0  # Otsu classes give Dice labels


def test_several_refine_settings_and_another_checkpoint_in_one_run(tmp_path):
    """``--refine 0,4x2`` runs each network once per setting (io once), ``METHOD=FILE`` reads
    that method's network from a file (a run's 4 mm stage, a candidate) under its own label, and
    the registry is left as it was."""
    from conftest import blob_volume, make_image
    from test_training_loop import TINY

    from DeepRegistrationLib.methods import METHODS, get_method, save_checkpoint
    from DeepRegistrationLib.methods.base import _NETWORK_CACHE

    spec = get_method("vm-diff")
    path = str(tmp_path / "candidate.4mm.pt")
    save_checkpoint(path, spec.build_network(dict(spec.config, **TINY)), "vm-diff",
                    dict(spec.config, **TINY), {"working_spacing_mm": 8.0})
    runs, _ = ev.plan_runs(ev.EvaluateOptions(methods=["io", f"vm-diff={path}"], peers=[],
                                              output="unused", refine="0,4x2"))
    assert [(r["label"], r["refine"]) for r in runs] == [
        ("io", "0"), ("vm-diff [candidate.4mm.pt]", "0"),
        ("vm-diff [candidate.4mm.pt] +refine 4x2", "4x2")]
    assert ev.refine_settings("60, 0,60") == ["60", "0"]
    with pytest.raises(UserInputError):
        ev.refine_settings("0,fast")
    with pytest.raises(UserInputError, match="not found"):
        ev.plan_runs(ev.EvaluateOptions(methods=[f"vtn={tmp_path / 'nope.pt'}"], peers=[],
                                        output="unused"))
    with pytest.raises(UserInputError, match="holds a 'vm-diff' network"):
        ev.plan_runs(ev.EvaluateOptions(methods=[f"vtn={path}"], peers=[], output="unused"))
    with pytest.raises(UserInputError, match="no network"):
        ev.plan_runs(ev.EvaluateOptions(methods=[f"io={path}"], peers=[], output="unused"))

    image = make_image(blob_volume((24, 28, 20), seed=2), spacing=(4.0, 4.0, 4.0))
    for name in ("fixed", "moving"):
        sitk.WriteImage(image, str(tmp_path / f"{name}.nii.gz"))
    registered = METHODS["vm-diff"]
    job = dict(kind="method", name="vm-diff", fixed=str(tmp_path / "fixed.nii.gz"),
               moving=str(tmp_path / "moving.nii.gz"), refine="0",
               checkpoint=runs[1]["checkpoint"], options={})
    result = ev.run_one(job)
    assert result["displacement"].shape == (1, 3, 24, 28, 20)
    assert METHODS["vm-diff"] is registered
    assert any(key[0] == runs[1]["checkpoint"] for key in _NETWORK_CACHE)
