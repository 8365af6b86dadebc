"""--similarity for every method: what ``io`` optimises, and after a network what ``--refine``
optimises (the instance optimisation's own list, one rule for every network), refused on one line
where it would change nothing (a network without --refine); the command line, ``methods --json``
and the Slicer module's check agree with the engine."""
import pytest
import torch

from DeepRegistrationLib import cli, engine, slicer_bridge
from DeepRegistrationLib.alignment import MEASURES
from DeepRegistrationLib.errors import UserInputError
from DeepRegistrationLib.methods import base, get_method, list_methods, save_checkpoint
from DeepRegistrationLib.methods.instance_optimisation import SIMILARITIES
from conftest import shifted_blob_images

# every registered method that runs a trained network (found in the registry, so a new one is
# covered without being named here)
NETWORKS = sorted(spec.name for spec in list_methods() if spec.needs_checkpoint)
# R2Net's default Lipschitz parametrisation costs seconds per build; the tests need no trained or
# exact network, only one that runs
SMALL = {"blocks": 2, "lipschitz": "matrix", "encoder": [8, 8, 8, 8], "features": 8}
SMALL_CONFIGS = {"r2net-svf": SMALL, "r2net-nsvf": SMALL, "ms-r2net": SMALL}


def test_every_network_method_is_covered():
    assert set(NETWORKS) >= {"mmln", "multiprop", "vm-diff", "vtn", "r2net-svf", "r2net-nsvf",
                             "ms-r2net", "suits"}
    assert "io" not in NETWORKS and get_method("io").optimises_similarity


@pytest.mark.parametrize("method", NETWORKS)
def test_a_network_refines_with_the_similarity_asked_for(method, tmp_path, monkeypatch):
    """A tiny random checkpoint: ``--refine`` with mutual information is accepted, the
    refinement optimises mutual information, and it changes the network's field."""
    spec = get_method(method)
    assert spec.similarities == SIMILARITIES and not spec.optimises_similarity
    monkeypatch.setattr(base, "checkpoint_folders", lambda: [str(tmp_path)])
    config = dict(spec.config, **SMALL_CONFIGS.get(method, {}))
    torch.manual_seed(0)
    save_checkpoint(str(tmp_path / spec.checkpoint), spec.build_network(config), method, config,
                    {"test": 1})
    used = []

    def spy(*args, **kwargs):
        used.append(args[3])  # (fixed, moving, initial, similarity, ...)
        return real(*args, **kwargs)

    real = engine.instance_optimisation
    monkeypatch.setattr(engine, "instance_optimisation", spy)
    fixed, moving = shifted_blob_images((16, 18, 14))
    alone = engine.register(fixed, moving, method, initial="none")
    assert used == [] and alone.similarity == "lncc"
    refined = engine.register(fixed, moving, method, refine="4x2", similarity="mi",
                              initial="none")
    assert used == ["mi"] and refined.similarity == "mi" and refined.refine_schedule == (4, 2)
    assert refined.displacement.shape == (1, 3, 16, 18, 14)
    assert torch.isfinite(refined.displacement).all()
    assert (refined.displacement - alone.displacement).abs().max() > 1e-3
    # a pair declared multi-contrast (MIND) and nothing to correct the network: a caution, unless
    # the network was trained on such pairs (SUITS); refinement steps or same contrast: none
    assert alone.cautions == [] and refined.cautions == []
    declared = engine.register(fixed, moving, method, similarity="mind")  # global stage: MIND
    assert bool(declared.cautions) == (not spec.multimodal)
    assert all(method in c and "io" in c for c in declared.cautions)
    # MIND as well (it also picks the global stage's measure, with or without --refine)
    assert engine.check_similarity(spec, "mind", refine=True) == "mind"
    assert engine.check_similarity(spec, "mind", refine=False) == "mind"


@pytest.mark.parametrize("method", NETWORKS)
def test_a_similarity_a_network_would_ignore_is_refused_on_one_line(method, tmp_path, capsys):
    fixed, moving = shifted_blob_images((16, 18, 14))
    for similarity in ("mi", "ngf", "ncc", "mse"):  # nothing uses them without --refine
        with pytest.raises(UserInputError, match=f"'{similarity}' without --refine") as error:
            engine.register(fixed, moving, method, similarity=similarity)
        message = str(error.value)
        assert "\n" not in message and "--refine N" in message and "lncc or mind" in message
    # no global stage either: then even mind would change nothing
    with pytest.raises(UserInputError, match="without --refine and with --initial none"):
        engine.register(fixed, moving, method, similarity="mind", initial="none")
    # explicit default: the same request as no --similarity (what the Slicer module sends)
    assert engine.check_similarity(get_method(method), "lncc", False, "none") == "lncc"
    # the command line refuses it before reading or creating anything, on one line, exit 2
    out = tmp_path / "out"
    code = cli.main(["register", str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz"),
                     "--output", str(out), "--method", method, "--similarity", "mi"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and not out.exists()
    assert lines[0].startswith("deepreg: error: method") and "--refine N" in lines[0]
    # and accepts it with --refine (it fails later only because the files do not exist)
    args = cli._build_parser().parse_args(
        ["register", "f.nii.gz", "m.nii.gz", "--output", str(out), "--method", method,
         "--similarity", "mi", "--refine", "30"])
    cli._validate_request(args)


@pytest.mark.parametrize("method", [spec.name for spec in list_methods()])
def test_methods_json_and_the_slicer_check_agree_with_the_engine(method):
    """``methods --json`` lists what is accepted with and without --refine (and without a global
    stage), and the module's check (slicer_bridge.similarity_problem, which reads those lists)
    refuses exactly what the engine refuses, for every initial alignment the module offers."""
    spec = get_method(method)
    info = spec.describe()
    assert info["similarities"] == list(SIMILARITIES)
    expected = SIMILARITIES if spec.optimises_similarity else MEASURES
    assert info["similarities_without_refine"] == list(expected)
    alone = SIMILARITIES if spec.optimises_similarity else (spec.default_similarity,)
    assert info["similarities_without_refine_or_alignment"] == list(alone)
    for initial in slicer_bridge.INITIALS:
        for similarity in slicer_bridge.SIMILARITIES:
            for refine in (0, 60):
                try:
                    engine.check_similarity(spec, similarity, refine > 0, initial)
                    refused = False
                except UserInputError:
                    refused = True
                problem = slicer_bridge.similarity_problem(info, similarity, refine, initial)
                assert bool(problem) == refused, (initial, similarity, refine, problem)
                if problem:
                    assert "Refinement steps above 0" in problem, problem
                    assert ("Global alignment" in problem) == (
                        initial == "none" and similarity in MEASURES), problem
    # the module's choice: already aligned, MIND, no refinement steps (a network refuses it)
    problem = slicer_bridge.similarity_problem(info, "mind", 0, "none")
    assert bool(problem) == (not spec.optimises_similarity)
    assert slicer_bridge.similarity_problem(info, "mind", 0, "auto") is None
    assert slicer_bridge.similarity_problem(info, "mind", 0) is None  # the default: auto
    # without the lists (the placeholder entry, an older library) the command line decides
    for initial in ("auto", "none"):
        assert slicer_bridge.similarity_problem({"name": method}, "mi", 0, initial) is None


def test_only_suits_is_trained_on_pairs_of_two_contrasts():
    assert [name for name in NETWORKS if get_method(name).multimodal] == ["suits"]
    assert engine.contrast_caution(get_method("io"), "mind", 0) is None


def test_io_optimises_every_similarity_itself():
    spec = get_method("io")
    for similarity in SIMILARITIES:
        for refine in (False, True):
            for initial in ("auto", "none"):
                assert engine.check_similarity(spec, similarity, refine, initial) == similarity
    with pytest.raises(UserInputError, match="does not support similarity 'cosine'; choose one"):
        engine.check_similarity(spec, "cosine", True)
