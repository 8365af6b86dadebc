"""The MultiProp ablation script (``training/multiprop_ablation.py``, issue #12): two seeds by
default, every arm evaluated at its final weights (the same step for every arm, as the MMLN
ablation), the recovered share with per-seed values and a bootstrap interval over cases, paired
comparisons over cases (seeds averaged) split by unseen anatomy, bilevel from a mis-set start
against the grid's best, and the transfer case started from the grid's best on brains. Made-up
rows, model cards and tiny networks; nothing is trained."""
import argparse
import csv
import json
import math
import os

import numpy as np
import pytest
import torch

from conftest import fake_ablation_evaluation, fake_training_run
from DeepRegistrationLib.methods import get_method, multiprop
from training import multiprop_ablation as ablation

CASES = [f"c{i}" for i in range(6)]  # c4, c5 unseen
# the share of the gap each case recovers (varied, so the bootstrap interval has a width)
SHARES = (0.2, 1.0, 0.3, 0.9, 0.1, 1.1)
BASE = {"reg0.1": 0.60, "default": 0.70, "reg10": 0.62, "bilevel": 0.70, "additive": 0.69}


def dice(arm, index, seed):
    """Dice of made-up registrations: a per-case and per-seed offset common to every arm, so
    the shares are exact; bilevel from reg0.1 closes ``SHARES[index]`` of its gap to
    ``default`` (on seed 1 half of it), bilevel from reg10 an eighth of its gap."""
    offset = 0.01 * index + 0.005 * seed
    if arm == "bilevel-reg0.1":
        share = SHARES[index] * (1.0 if seed == 0 else 0.5)
        return BASE["reg0.1"] + share * (BASE["default"] - BASE["reg0.1"]) + offset
    if arm == "bilevel-reg10":
        return BASE["reg10"] + 0.125 * (BASE["default"] - BASE["reg10"]) + offset
    return BASE[arm] + offset


def made_up_rows(seeds=(0, 1)):
    rows = []
    for seed in seeds:
        for arm in ablation.ARMS:
            for index, case in enumerate(CASES):
                d = dice(arm, index, seed)
                rows.append({"seed": seed, "arm": arm, "step": 4, "case": case, "source": "s",
                             "anatomy": "unseen" if index >= 4 else "seen", "seconds": 1.0,
                             "dice": d, "gt_error_mm": 3.0 - d, "folding_percent_strict": 0.0,
                             "folding_percent": 0.0, "sdlogj": 0.1})
    return rows


def made_up_cards(best_by_seed=None, seeds=(0, 1)):
    """Model cards whose validation Dice makes ``best_by_seed[seed]`` (default: ``default``) the
    grid's best."""
    best_by_seed = best_by_seed or {}
    cards = {}
    for seed in seeds:
        for arm in ablation.ARMS:
            best = arm == best_by_seed.get(seed, "default")
            cards[(seed, arm)] = {
                "validation": {"metrics": {"dice": 0.8 if best else 0.7}},
                "training": {"guidance": {}, "clean_similarity": False},
                "weights": {"which": "final", "step": 4, "best_step": 2},
                "loss_weights": {"values": {"regularisation": 1.0}}}
    return cards


def find(results, **keys):
    return next(r for r in results if all(r[k] == v for k, v in keys.items()))


def test_two_seeds_by_default():
    args = ablation._parser().parse_args(["train", "--iterations", "2", "--output", "x"])
    assert args.seeds == "0,1"


def test_comparisons_are_over_cases_split_by_anatomy_and_include_the_grid_best():
    cards = made_up_cards({0: "default", 1: "reg10"})
    results = ablation.paired_comparisons(made_up_rows(), cards)
    for anatomy, cases in (("all", 6), ("unseen", 2), ("seen", 4)):
        against_best = find(results, first="bilevel-reg10", second=ablation.GRID_BEST,
                            metric="dice", anatomy=anatomy)
        assert against_best["units"] == cases  # seeds averaged: each case once
    # grid-best is default on seed 0 and reg10 on seed 1, averaged per case
    against_best = find(results, first="bilevel-reg10", second=ablation.GRID_BEST,
                        metric="dice", anatomy="all")
    expected = np.mean([(dice("default", i, 0) + dice("reg10", i, 1)) / 2 for i in range(6)])
    assert against_best["mean_second"] == pytest.approx(expected)
    assert against_best["first_lower"] == 6


def test_the_recovered_share_has_per_seed_values_and_a_bootstrap_interval():
    results = ablation.recovery(made_up_rows(), made_up_cards())
    share = find(results, anatomy="all", start="reg0.1", metric="dice")
    mean_share = float(np.mean(SHARES))
    assert share["per_seed_shares"] == pytest.approx({0: mean_share, 1: mean_share / 2})
    assert share["recovered_share"] == pytest.approx(0.75 * mean_share)  # seeds averaged
    assert share["interval_low"] < share["recovered_share"] < share["interval_high"]
    assert share["interval_low"] < 0.5 < share["interval_high"]
    assert share["claim"] == "inconclusive"
    assert share["grid_best"] == {0: "default", 1: "default"}
    # lower-is-better metrics get the same share (the gap's sign)
    assert find(results, anatomy="all", start="reg0.1", metric="gt_error_mm")[
        "recovered_share"] == pytest.approx(share["recovered_share"])
    # an eighth of the gap on every case: the whole interval is below one half
    small = find(results, anatomy="all", start="reg10", metric="dice")
    assert small["recovered_share"] == pytest.approx(0.125)
    assert small["interval_high"] < 0.5 and small["claim"] == "fails"
    unseen = find(results, anatomy="unseen", start="reg0.1", metric="dice")
    assert unseen["cases"] == 2
    assert unseen["recovered_share"] == pytest.approx(0.75 * np.mean(SHARES[4:]))


def test_verdicts():
    assert ablation.verdict(0.55, 0.9) == "holds"
    assert ablation.verdict(0.1, 0.45) == "fails"
    assert ablation.verdict(0.4, 0.9) == "inconclusive"
    assert ablation.verdict(float("nan"), float("nan")) == "no gap"


def test_a_misset_start_that_is_the_grid_best_has_no_gap():
    results = ablation.recovery(made_up_rows(), made_up_cards({0: "reg10", 1: "reg10"}))
    start = find(results, anatomy="all", start="reg10", metric="dice")
    assert start["claim"] == "no gap" and np.isnan(start["recovered_share"])


def test_the_transfer_case_starts_from_the_grid_best_on_brains():
    line = ablation.transfer_lines(made_up_cards({0: "reg10", 1: "reg10"}))[0]
    assert "reg10 (seed 0), reg10 (seed 1)" in line
    assert "--arms reg10,bilevel-reg10 --source invesalius-ct" in line
    disagreeing = ablation.transfer_lines(made_up_cards({0: "default", 1: "reg0.1"}))[0]
    assert "the seeds disagree" in disagreeing
    assert "--arms default,bilevel,reg0.1,bilevel-reg0.1" in disagreeing
    grid_missing = {k: v for k, v in made_up_cards().items() if k[1] != "reg10"}
    assert "unknown" in ablation.transfer_lines(grid_missing)[0]


def test_the_report_writes_the_recovery_comparisons_and_transfer(tmp_path):
    args = argparse.Namespace(output=str(tmp_path), cases="full")
    ablation.write_evaluation(args, made_up_rows(), made_up_cards())
    report = open(tmp_path / "results.md").read()
    for heading in ("## Recovery from a mis-set regularisation weight", "## Paired comparisons",
                    "## Transfer case", "95 % interval (bootstrap over cases)"):
        assert heading in report
    assert '"clean_similarity": false, "guidance": {}' in report
    assert "Weights evaluated: each arm's final weights, step 4" in report
    with open(tmp_path / "comparisons.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["anatomy"] for r in rows} == {"all", "unseen", "seen"}
    assert any(r["second"] == ablation.GRID_BEST for r in rows)
    recovered = json.load(open(tmp_path / "recovery.json"))
    assert {r["claim"] for r in recovered} >= {"inconclusive", "fails"}
    # per-seed rows stay in per_case.csv, without the grid-best copies
    with open(tmp_path / "per_case.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 2 * len(ablation.ARMS) * len(CASES)


# ---------------------------------------------------------------------------- final weights
TINY = {"features": [4, 6, 6], "matching": [6], "context": [4, 4]}
# validation Dice at the best step (2) and the final one (4): reg10 leads the grid at step 2,
# reg0.1 at step 4
VALIDATION_DICE = {"reg0.1": {2: 0.6, 4: 0.9}, "default": {2: 0.7, 4: 0.8},
                   "reg10": {2: 0.8, 4: 0.7}, "bilevel": {2: 0.7, 4: 0.8}}


def fake_arm(folder, seed, arm, final_step=4):
    """What the trainer leaves for ``arm`` (``fake_training_run``): the best step's weights a
    fresh network (the identity: zero heads), the final ones moved; a bilevel arm's final loss
    weights have a doubled regularisation weight (its self-tuning acted after the best step)."""
    variant, overrides = ablation.ARMS[arm]
    config = dict(get_method("multiprop").config, **TINY, **overrides, variant=variant)
    best, final = multiprop.build_network(config), multiprop.build_network(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in final.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
        if variant == "bilevel":
            final.loss_weights.log_values[
                final.loss_weights.names.index("regularisation")] += math.log(2.0)
    return fake_training_run(ablation.arm_path(folder, seed, arm), "multiprop", config, best,
                             final, final_step=final_step,
                             training={"guidance": {}, "clean_similarity": False},
                             validation_dice=lambda step: VALIDATION_DICE[arm][step])


def test_evaluate_registers_with_each_arms_final_weights(tmp_path, monkeypatch):
    """The whole ``evaluate`` command, the cases and their metrics faked: the best checkpoints
    are the identity and the final weights are not, so a zero field would mean the best ones
    were used; the grid's best, the loss weights and the report are the final weights'."""
    for arm in VALIDATION_DICE:
        fake_arm(str(tmp_path), 0, arm)
    cases = fake_ablation_evaluation(monkeypatch, "multiprop", ablation.METRICS)
    monkeypatch.delenv("DEEPREG_CHECKPOINTS", raising=False)
    assert ablation.main(["evaluate", "--cases", "small", "--output", str(tmp_path)]) == 0
    assert "DEEPREG_CHECKPOINTS" not in os.environ  # as it was before
    assert os.path.isfile(tmp_path / "seed0" / "bilevel" / "final" / "multiprop-bilevel.pt")
    with open(tmp_path / "per_case.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(VALIDATION_DICE) * len(cases)
    for row in rows:
        assert row["step"] == "4"
        assert float(row["folding_percent_strict"]) > 1e-3, row  # not the identity
    report = open(tmp_path / "results.md").read()
    assert "Weights evaluated: each arm's final weights, step 4" in report
    assert "(their steps: 2)" in report
    # the grid's best on the final weights' validation (reg10 led at the best steps)
    assert "the grid's best on them (validation Dice): reg0.1 (seed 0)" in report
    weights = json.load(open(tmp_path / "weights.json"))
    assert weights["seed0/bilevel"]["values"]["regularisation"] == pytest.approx(
        2 * weights["seed0/default"]["values"]["regularisation"])


def test_arms_that_ended_at_different_steps_are_refused(tmp_path, capsys):
    fake_arm(str(tmp_path), 0, "default")
    fake_arm(str(tmp_path), 0, "bilevel", final_step=2)  # e.g. stopped half-way
    assert ablation.main(["evaluate", "--output", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "the runs ended at different steps (seed 0 bilevel: 2, seed 0 default: 4)" in error
