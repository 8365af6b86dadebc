"""The SUITS ablation script (``training/suits_ablation.py``): its training entry runs with the
``general`` recipe (SUITS' own loss, the recipe's guidance terms and clean similarity off), the
``mind-best`` lambda is chosen on second-contrast training pairs, plain ``io`` is a row, and the
report pairs every row per case with the unseen anatomy apart."""
import argparse
import json
import os

import numpy as np
import pytest

from conftest import blob_volume, make_image
from DeepRegistrationLib.images import image_from_array
from DeepRegistrationLib.methods import get_method
from training import suits_ablation
from training.data import Volume


def small_head():
    """Blobs on a 96 mm cube: 32 voxels a side on SUITS' 3 mm working grid, so a training step
    and a validation take seconds."""
    array = blob_volume((24, 24, 24), seed=5, blobs=10)
    image = make_image(array, spacing=(4.0,) * 3, origin=(-48.0, -48.0, -48.0))
    labels = np.digitize(array, [0.3, 0.7]).astype(np.int32)
    return Volume("blobs", image, image_from_array(labels, image), {1: "low", 2: "high"}, "T1",
                  "test blobs")


def test_the_ablation_trains_its_networks_with_the_general_recipe(tmp_path):
    # one step each: two would start the recipe's 4 mm stage, whose 192 mm windows need a
    # head-sized canvas. The trainer refuses the recipe's guidance terms and clean similarity for
    # SUITS before any step, so this fails at once if the ablation stops switching them off.
    args = argparse.Namespace(iterations=1, recipe="general", lr=1e-3, lr_end_to_end=1e-4,
                              threads=1, val_every=None, val_cases=1)
    folders = suits_ablation.network_folders(str(tmp_path), seed=0)
    notes = suits_ablation.train_missing(args, folders, 0, [small_head()])
    assert len(notes) == 3
    cards = {}
    for row, filename, config, start, _ in suits_ablation.TRAINING_PLAN:
        path = os.path.join(folders[row], filename)
        assert os.path.isfile(path), row
        with open(os.path.splitext(path)[0] + ".json") as handle:
            cards[row] = card = json.load(handle)
        training = card["training"]
        assert training["recipe"]["name"] == "general"
        assert training["guidance"] == {} and training["clean_similarity"] is False
        assert card["working_spacing_mm"] == get_method("suits").working_spacing_mm
        assert all(card["config"][key] == value for key, value in config.items())
        warm_start = training["warm_start"]
        assert (warm_start or {}).get("checkpoint") == ("suits-replica.pt" if start else None)
    assert cards["suits-matrix-grad"]["config"]["matrix_grad"] is True
    assert cards["suits"]["config"]["matrix_grad"] is False
    # checkpoints that exist are kept
    assert suits_ablation.train_missing(args, folders, 0, [small_head()]) == []


def fake_rows():
    """Registrations of three cases (two unseen, one seen; all second contrast): SUITS for seeds
    0 and 1, MIND and MIND at its best lambda once."""
    rows = []
    for case, anatomy, offset in (("a", "unseen", 0.0), ("b", "unseen", 0.1), ("c", "seen", 0.2)):
        labels = dict(case=case, source="s", multimodal=True, contrast="second contrast",
                      anatomy=anatomy, hd95=2.0, gt_error_mm=1.0, folding_percent=0.0,
                      folding_percent_strict=0.0, seconds=1.0)
        rows += [dict(labels, arm="suits", seed=0, dice=0.70 + offset),
                 dict(labels, arm="suits", seed=1, dice=0.72 + offset),
                 dict(labels, arm="mind", seed=0, dice=0.60 + offset),
                 dict(labels, arm="mind-best", seed=0, dice=0.65 + offset)]
    return rows


def comparison(results, first, second, anatomy, metric="dice"):
    return next(c for c in results if (c["first"], c["second"], c["anatomy"], c["metric"])
                == (first, second, anatomy, metric) and c["contrast"] == "second contrast")


def test_comparisons_pair_cases_with_seeds_averaged_and_report_the_unseen_anatomy_apart():
    results = suits_ablation.paired_comparisons(fake_rows())
    # SUITS' two seeds are averaged per case (0.71, 0.81, 0.91): each case is one unit, beside
    # MIND's one registration of it (a case counted once per seed would overstate significance)
    both = comparison(results, "suits", "mind-best", "all")
    assert both["units"] == 3 and both["first_higher"] == 3
    assert both["mean_difference"] == pytest.approx(0.06)
    assert comparison(results, "mind-best", "mind", "all")["units"] == 3
    unseen = comparison(results, "suits", "mind-best", "unseen")
    assert unseen["units"] == 2 and unseen["mean_second"] == pytest.approx(0.70)
    assert unseen["mean_first"] == pytest.approx(0.76)
    assert comparison(results, "suits", "mind-best", "seen")["units"] == 1
    assert not [c for c in results if c["contrast"] == "same contrast"]  # no such cases


def test_the_report_states_the_chosen_lambdas_and_the_paired_statistics():
    rows = fake_rows()
    payload = {"rows": rows, "comparisons": suits_ablation.paired_comparisons(rows), "notes": [],
               "lambdas": {"mind": 1.0, "mind-refine": 1.0, "mind-best": 2.0},
               "mind_best": {"chosen_lambda": 2.0, "dice": {"1.0": 0.70, "2.0": 0.72},
                             "plan": {"lambdas": [1.0, 2.0], "pairs": 6, "sources": ["mni152"],
                                      "spacing_mm": 3.0}},
               "seeds": [0, 1], "spacing_mm": 2.0, "refine": 60, "trained_on": ["mni152"],
               "environment": {"command": "test", "load_average": [1.0]}}
    report = "\n".join(suits_ablation.ablation_report(payload))
    assert "`mind-best` **2**" in report and "6 second-contrast training pairs" in report
    assert "| suits | unseen | 4 |" in report  # the means: two unseen cases, two seeds
    assert "| second contrast | unseen | suits vs mind-best | dice | 2 |" in report


def test_the_mind_best_lambda_is_chosen_on_second_contrast_training_pairs(tmp_path,
                                                                        monkeypatch):
    calls = []

    def pairs(count, spacing_mm, multimodal_only=False, sources=()):
        calls.append({"count": count, "multimodal_only": multimodal_only})
        return []

    def run(network, pairs, regularization, recompute, spacing_mm):
        dice = {0.5: 0.70, 1.0: 0.74, 2.0: 0.76, 4.0: 0.73}[regularization]
        return {"rows": [], "lambda": regularization, "recompute_features": recompute,
                "summary": {"all": {"dice": dice, "gt_error_mm": 1.0, "folding_percent": 0.0,
                                    "folding_percent_strict": 0.0, "seconds": 0.0}}}
    monkeypatch.setattr(suits_ablation, "training_pairs", pairs)
    monkeypatch.setattr(suits_ablation, "mind_run", run)
    args = argparse.Namespace(output=str(tmp_path), mind_lambdas=[0.5, 1.0, 2.0, 4.0],
                              mind_lambda_pairs=3)
    assert suits_ablation.mind_best_lambda(args, ["mni152"])["chosen_lambda"] == 2.0
    assert calls == [{"count": 3, "multimodal_only": True}]
    assert os.path.isfile(tmp_path / "mind-best-lambda.md")
    # the same plan again: the earlier choice, nothing registered
    assert suits_ablation.mind_best_lambda(args, ["mni152"])["chosen_lambda"] == 2.0
    assert len(calls) == 1
    args.mind_lambdas = [0.5, 1.0]  # another grid: chosen again
    assert suits_ablation.mind_best_lambda(args, ["mni152"])["chosen_lambda"] == 1.0
    assert len(calls) == 2


def test_rows_call_the_engine_with_their_method_similarity_and_lambda(monkeypatch):
    from DeepRegistrationLib import engine
    seen = []

    class Result:
        displacement = None

    def register(fixed, moving, method, refine=0, similarity=None, options=None):
        seen.append((method, similarity, dict(options or {})))
        return Result()
    monkeypatch.setattr(engine, "register", register)
    case = argparse.Namespace(fixed=None, moving=None)
    lambdas = {"mind": 1.0, "mind-best": 2.0, "mind-refine": 1.0}
    for row in ("io", "io-mi", "mind-best"):
        suits_ablation.run_row(row, case, {}, lambdas, refine=0)
    assert seen[0] == ("io", None, {}) and get_method("io").default_similarity == "lncc"
    assert seen[1] == ("io", "mi", {})
    assert seen[2] == ("suits", None, {"variant": "mind", "regularization": 2.0})
