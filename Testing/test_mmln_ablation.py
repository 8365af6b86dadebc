"""The MMLN ablation script (``training/mmln_ablation.py``, issue #11): the arms are evaluated at
their final weights (the same step for every arm), the paired statistics count cases rather than
(case, seed) units, the trainer's guidance terms and clean similarity can be switched off and are
recorded, and the unseen anatomy is reported apart. Made-up rows and tiny networks; no training."""
import json
import os

import numpy as np
import pytest
import torch
from scipy.stats import wilcoxon

from conftest import fake_ablation_evaluation, fake_training_run
from DeepRegistrationLib import engine
from DeepRegistrationLib.errors import UserInputError
from DeepRegistrationLib.methods import get_method, load_network, mmln
from training import ablation_common, mmln_ablation
from training.train import training_lineage

TINY = {"width": 4, "residual_blocks": 1}


def tiny_network(arm: str, jitter: float = 0.0, seed: int = 0) -> torch.nn.Module:
    """An arm's network; with ``jitter`` every parameter moved, so its field is not zero (a fresh
    one is the identity)."""
    branches, coupling = mmln.parse_variant(arm)
    network = mmln.build_network(dict(TINY, variant=branches, coupling=coupling))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(jitter * torch.randn(parameter.shape, generator=generator))
    return network


def fake_run(folder, arm, best, final, training=None, **run):
    """What the trainer leaves in ``folder`` (``fake_training_run``): ``mmln-<ARM>.pt`` with the
    best step's weights and its card, ``mmln-<ARM>.resume.pt`` with the last step's."""
    config = dict(get_method("mmln").config, **TINY, variant=best.variant,
                  coupling=best.coupling)
    return fake_training_run(
        os.path.join(folder, mmln.checkpoint_name(arm)), "mmln", config, best, final,
        training=dict({"guidance": {"supervised": 0.5}, "clean_similarity": True},
                      **(training or {})), **run)


def flat(network):
    return torch.cat([p.detach().flatten() for p in network.parameters()])


def export_arms(folder):
    return ablation_common.export_final_arms(str(folder), mmln_ablation.ARMS,
                                             mmln_ablation.arm_path, mmln_ablation.PROG)


# ---------------------------------------------------------------------------- final weights
def test_the_final_weights_are_exported_not_the_best_steps(tmp_path):
    best, final = tiny_network("L"), tiny_network("L", jitter=0.05)
    checkpoint = fake_run(str(tmp_path / "seed0"), "L", best, final)
    card = ablation_common.export_final_weights(checkpoint, str(tmp_path / "final" / "mmln-L.pt"))
    exported = load_network(get_method("mmln"), path=str(tmp_path / "final" / "mmln-L.pt"))
    assert torch.equal(flat(exported), flat(final))
    assert not torch.equal(flat(exported), flat(best))
    assert exported.working_spacing_mm == 2.0
    assert card["weights"]["which"] == "final"
    assert (card["weights"]["step"], card["weights"]["best_step"]) == (4, 2)
    # the card's validation is the final step's record, the best step's kept apart
    assert card["validation"]["step"] == 4 and card["validation"]["metrics"]["dice"] == 0.54
    assert card["best_step_validation"]["step"] == 2
    # the cost is the final step's (10 s a step after a 100-step, 1000 s warm start), so that a
    # warm start from these weights counts the steps and time that made them
    training = card["training"]
    assert (training["iterations"], training["wall_time_seconds"]) == (4, 40.0)
    assert (training["total_iterations"], training["total_wall_time_seconds"]) == (104, 1040.0)
    assert training["seconds_per_step"] == 10.0
    assert training_lineage(card, "mmln-L.pt")[-1]["iterations"] == 4
    assert training_lineage(card, "mmln-L.pt")[-1]["wall_time_seconds"] == 40.0


def test_runs_that_ended_at_different_steps_are_refused(tmp_path):
    fake_run(str(tmp_path / "seed0"), "L", tiny_network("L"), tiny_network("L"), final_step=4)
    fake_run(str(tmp_path / "seed0"), "LC", tiny_network("LC"), tiny_network("LC"),
             final_step=2)
    with pytest.raises(UserInputError, match="different steps.*seed 0 LC: 2"):
        export_arms(tmp_path)


def test_a_checkpoint_without_its_resume_state_is_refused(tmp_path):
    checkpoint = fake_run(str(tmp_path / "seed0"), "L", tiny_network("L"), tiny_network("L"))
    os.remove(ablation_common.resume_path(checkpoint))
    with pytest.raises(UserInputError, match="mmln-L.resume.pt"):
        export_arms(tmp_path)


def test_a_resume_state_ahead_of_the_finished_run_is_refused(tmp_path):
    # a continuation stopped part-way: its weights are not those of the run the card describes
    fake_run(str(tmp_path / "seed0"), "L", tiny_network("L"), tiny_network("L"),
             training={"run_iterations": 3})
    with pytest.raises(UserInputError, match="at step 4 but the run of mmln-L.pt ended at "
                                             "step 3"):
        export_arms(tmp_path)


def test_evaluate_registers_with_each_arms_final_weights(tmp_path, monkeypatch):
    """The whole ``evaluate`` command, the cases and their metrics faked: the best checkpoints
    are the identity and the final weights are not, so a zero field would mean the best ones
    were used."""
    for seed in (0, 1):
        for arm in ("L", "LC"):
            fake_run(str(tmp_path / f"seed{seed}"), arm, tiny_network(arm),
                     tiny_network(arm, jitter=0.02, seed=seed))
    fake_ablation_evaluation(monkeypatch, "mmln", mmln_ablation.METRICS, ncc=0.0, hd95=0.0)
    monkeypatch.setenv("DEEPREG_CHECKPOINTS", "earlier")
    assert mmln_ablation.main(["evaluate", "--cases", "small", "--output", str(tmp_path)]) == 0
    # the engine looked in each seed's final/ folder, and is pointed back where it was
    assert os.environ["DEEPREG_CHECKPOINTS"] == "earlier"
    for seed in (0, 1):
        assert os.path.isfile(tmp_path / f"seed{seed}" / "final" / "mmln-LC.pt")
    rows = open(tmp_path / "per_case.csv").read().splitlines()
    assert rows[0].startswith("seed,arm,step,case,source,anatomy")
    assert len(rows) == 1 + 2 * 2 * 2  # per-seed rows kept: seeds x arms x cases
    header = rows[0].split(",")
    for line in rows[1:]:
        row = dict(zip(header, line.split(",")))
        assert row["step"] == "4"
        assert float(row["folding_percent_strict"]) > 1e-3, row  # not the identity
        assert row["anatomy"] == ("unseen" if row["case"] == "b" else "seen")
    report = open(tmp_path / "results.md").read()
    assert "final weights, step 4" in report
    assert '"clean_similarity": true, "guidance": {"supervised": 0.5}' in report
    assert "Unseen anatomy (sources no arm was trained on): itk-t1." in report
    assert "seeds averaged per case first" in report


def test_the_checkpoint_folder_is_restored_after_the_registrations(tmp_path, monkeypatch):
    """``evaluate`` points the engine at each run's final weights; afterwards (an error too) the
    variable is as it was: unset stays unset."""
    monkeypatch.delenv("DEEPREG_CHECKPOINTS", raising=False)
    with pytest.raises(RuntimeError):
        with ablation_common.checkpoints_from(str(tmp_path)):
            assert os.environ["DEEPREG_CHECKPOINTS"] == str(tmp_path)
            raise RuntimeError("a registration failed")
    assert "DEEPREG_CHECKPOINTS" not in os.environ


# -------------------------------------------------------------------- paired over cases
def made_up_rows():
    """Arms L and LC on six cases (the last two unseen), two seeds each: LC folds less."""
    rows = []
    for index in range(6):
        for seed in (0, 1):
            anatomy = "unseen" if index >= 4 else "seen"
            base = dict(case=f"c{index}", source="s", anatomy=anatomy, seed=seed, seconds=1.0,
                        **{m: 0.5 for m, _ in mmln_ablation.METRICS})
            folding = 1.0 + 0.3 * index + 0.1 * seed
            rows.append(dict(base, arm="L", folding_percent_strict=folding))
            rows.append(dict(base, arm="LC", folding_percent_strict=folding
                             - (0.2 + 0.05 * index * (1 if seed else -1))))
    return rows


def test_seeds_are_averaged_per_case_before_the_paired_test():
    rows = made_up_rows()
    result = next(c for c in mmln_ablation.paired_comparisons(rows)
                  if (c["first"], c["second"], c["metric"], c["anatomy"])
                  == ("LC", "L", "folding_percent_strict", "all"))
    assert result["units"] == 6  # cases, not 12 (case, seed) pairs
    by_case = {}
    for row in rows:
        by_case.setdefault((row["arm"], row["case"]), []).append(row["folding_percent_strict"])
    lc = [np.mean(by_case[("LC", f"c{i}")]) for i in range(6)]
    plain = [np.mean(by_case[("L", f"c{i}")]) for i in range(6)]
    assert result["wilcoxon_p"] == pytest.approx(wilcoxon(lc, plain, zero_method="zsplit").pvalue)
    # (with seeds as units the test would see 12 pairs and a smaller p)
    per_seed = mmln_ablation.paired(rows, "LC", "L", "folding_percent_strict")
    assert per_seed["units"] == 12 and per_seed["wilcoxon_p"] < result["wilcoxon_p"]


def test_arms_pair_only_where_they_averaged_the_same_seeds():
    rows = [r for r in made_up_rows() if not (r["arm"] == "LC" and r["seed"] == 1
                                              and r["case"] == "c0")]
    means = mmln_ablation.seed_means(rows, mmln_ablation.METRICS)
    assert {m["seed"] for m in means if m["case"] == "c0"} == {"0", "0,1"}
    result = mmln_ablation.paired(means, "LC", "L", "folding_percent_strict")
    assert result["units"] == 5


def test_the_unseen_anatomy_is_compared_apart():
    results = mmln_ablation.paired_comparisons(made_up_rows())
    units = {c["anatomy"]: c["units"] for c in results
             if (c["first"], c["second"], c["metric"]) == ("LC", "L", "dice")}
    assert units == {"all": 6, "unseen": 2, "seen": 4}


# --------------------------------------------------------------- the trainer's loss options
def test_guidance_and_clean_similarity_reach_the_trainer_and_a_kept_run_must_match(
        tmp_path, monkeypatch):
    commands = []

    def run(command, check):  # the trainer, faked: it writes the card of a finished run
        commands.append(command)
        output = command[command.index("--output") + 1]
        guidance = json.loads(command[command.index("--guidance") + 1])
        os.makedirs(os.path.dirname(output), exist_ok=True)
        with open(os.path.splitext(output)[0] + ".json", "w") as handle:
            json.dump({"training": {"run_iterations": 2, "guidance": guidance,
                                    "clean_similarity": False}}, handle)
    monkeypatch.setattr(mmln_ablation.subprocess, "run", run)
    train = ["train", "--k", "1", "--iterations", "2", "--seeds", "0", "--arms", "L",
             "--output", str(tmp_path), "--recipe", "general"]
    assert mmln_ablation.main(train + ["--guidance", "{}", "--clean-similarity", "no"]) == 0
    command = commands[0]
    assert command[command.index("--guidance") + 1] == "{}"
    assert command[command.index("--clean-similarity") + 1] == "no"
    # kept: the same options again train nothing; other ones are refused in one line
    assert mmln_ablation.main(train + ["--guidance", "{}"]) == 0
    assert len(commands) == 1
    assert mmln_ablation.main(train + ["--guidance", '{"supervised": 0.5}']) == 2
    assert mmln_ablation.main(train + ["--clean-similarity", "yes"]) == 2
    assert len(commands) == 1
    # unset: the recipe's, and nothing is passed on
    assert "--guidance" not in ablation_common.trainer_command(
        "mmln", {}, 0, "x.pt", mmln_ablation._parser().parse_args(train), ("guidance",))


def test_a_malformed_guidance_is_refused_before_any_training(capsys):
    with pytest.raises(SystemExit):
        mmln_ablation._parser().parse_args(["train", "--k", "1", "--iterations", "2",
                                            "--output", "x", "--guidance", "[0.5]"])
    assert "must be a JSON object" in capsys.readouterr().err


def test_k_is_chosen_on_the_validation_of_the_last_step():
    history = [{"step": 2, "spacing_mm": 2.0, "folding_percent_strict": 0.3,
                "folding_percent": 0.2},
               {"step": 4, "spacing_mm": 2.0, "folding_percent_strict": 0.0,
                "folding_percent": 0.0}]
    card = {"working_spacing_mm": 2.0, "training": {"run_iterations": 4},
            "validation": {"step": 2, "metrics": history[0], "history": history}}
    validation = mmln_ablation.final_validation(card)
    assert validation["step"] == 4
    assert mmln_ablation.validation_folding(validation["metrics"]) == 0.0
