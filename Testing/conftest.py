"""Shared fixtures: small synthetic volumes with real geometry (oblique, anisotropic), and the
checks of a network method through the engine (no checkpoint; a saved random network)."""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from DeepRegistrationLib.runtime import configure_openmp  # noqa: E402

configure_openmp()  # before torch loads: see runtime.py

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def oblique_direction(angle=0.5, axis=(0.3, 0.2, 0.9)):
    return sitk.VersorTransform(tuple(axis), angle).GetMatrix()


def blob_volume(shape, seed=0, blobs=12):
    """A smooth volume of Gaussian blobs on a background: texture everywhere, no edges at the
    border, like a head in its field of view."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    volume = np.zeros(shape, np.float32)
    for _ in range(blobs):
        centre = rng.uniform(-0.6, 0.6, 3)
        width = rng.uniform(0.12, 0.3)
        volume += rng.uniform(0.5, 1.0) * np.exp(-((k - centre[0]) ** 2 + (j - centre[1]) ** 2
                                                  + (i - centre[2]) ** 2) / (2 * width ** 2))
    return volume.astype(np.float32)


def deformed_blob_pair(shape, blob_seed, blobs, magnitude, field_seed, spacing=(1.0, 1.0, 1.0),
                       origin=(0.0, 0.0, 0.0)):
    """A blob image and a copy deformed by a random smooth diffeomorphism (10-voxel control
    spacing), both as SimpleITK images on the same grid."""
    from DeepRegistrationLib.spatial import warp
    from DeepRegistrationLib.synthetic import random_diffeomorphism
    fixed_array = blob_volume(shape, seed=blob_seed, blobs=blobs)
    field = random_diffeomorphism(shape, magnitude=magnitude, control_spacing=10, seed=field_seed)
    moving_array = warp(torch.from_numpy(fixed_array)[None, None], field)[0, 0].numpy()
    return (make_image(fixed_array, spacing=spacing, origin=origin),
            make_image(moving_array, spacing=spacing, origin=origin))


def make_image(array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None):
    image = sitk.GetImageFromArray(np.asarray(array))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(tuple(np.ravel(direction)))
    return image


@pytest.fixture
def oblique_fixed():
    """24x28x20 (i, j, k) blob image, anisotropic spacing, oblique direction cosines."""
    return make_image(blob_volume((20, 28, 24)), spacing=(1.2, 1.0, 1.6), origin=(-10.0, 5.0, 3.0),
                      direction=oblique_direction())


@pytest.fixture
def moving_other_grid(oblique_fixed):
    """The fixed image's content resampled on a differently oriented, finer, shifted grid."""
    reference = sitk.Image((30, 26, 28), sitk.sitkFloat32)
    reference.SetSpacing((0.9, 1.1, 1.0))
    reference.SetDirection(oblique_direction(0.3, (0.9, 0.1, 0.2)))
    centre_fixed = np.mean([oblique_fixed.TransformContinuousIndexToPhysicalPoint(c) for c in
                            [(0, 0, 0), tuple(n - 1 for n in oblique_fixed.GetSize())]], axis=0)
    half = np.array(reference.GetDirection()).reshape(3, 3) @ (
        (np.array(reference.GetSize()) - 1) * np.array(reference.GetSpacing()) / 2)
    reference.SetOrigin(tuple(centre_fixed - half + np.array([1.5, -1.0, 0.5])))
    return sitk.Resample(oblique_fixed, reference, sitk.Transform(), sitk.sitkLinear, 0.0)


def shifted_blob_images(shape=(30, 36, 28), spacing=(2.0, 2.0, 2.0)):
    """A blob image and the same blobs shifted one voxel along k, as SimpleITK images: a pair
    for running a network method through the engine, small enough for a quick test."""
    fixed = blob_volume(shape, seed=12)
    moving = np.roll(blob_volume(shape, seed=12), 1, axis=0)
    return make_image(fixed, spacing), make_image(moving, spacing)


def assert_engine_refuses_without_checkpoint(method, variant, tmp_path, monkeypatch):
    """With no checkpoint in the only checkpoint folder (``tmp_path``), the engine refuses
    ``method`` with a one-line ``UserInputError``, and for ``variant`` names the file it looked
    for (``<method>-<variant>.pt``): what a user without trained weights sees."""
    from DeepRegistrationLib import engine
    from DeepRegistrationLib.errors import UserInputError
    from DeepRegistrationLib.methods import base
    monkeypatch.setattr(base, "checkpoint_folders", lambda: [str(tmp_path)])
    fixed, moving = shifted_blob_images()
    with pytest.raises(UserInputError, match="no trained checkpoint") as error:
        engine.register(fixed, moving, method)
    assert "\n" not in str(error.value)
    with pytest.raises(UserInputError, match=f"{method}-{variant}.pt"):
        engine.register(fixed, moving, method, options={"variant": variant})


def assert_engine_registers_with_checkpoint(method, network, config, tmp_path, monkeypatch):
    """Save ``network`` (built from ``config``) as ``method``'s checkpoint in the only checkpoint
    folder (``tmp_path``) and register ``shifted_blob_images`` with it through the engine: the
    field must be on the fixed grid, finite and not zero (so the saved weights were used).
    Returns the pair, for the caller's further checks with other files in the folder."""
    from DeepRegistrationLib import engine
    from DeepRegistrationLib.methods import base, save_checkpoint
    monkeypatch.setattr(base, "checkpoint_folders", lambda: [str(tmp_path)])
    fixed, moving = shifted_blob_images()
    save_checkpoint(str(tmp_path / f"{method}.pt"), network, method, config, {"test": 1})
    result = engine.register(fixed, moving, method)
    assert result.displacement.shape == (1, 3, 30, 36, 28)  # the fixed grid, (k, j, i)
    assert torch.isfinite(result.displacement).all()
    assert result.displacement.abs().max() > 1e-3
    return fixed, moving


def fake_training_run(checkpoint, method, config, best, final, best_step=2, final_step=4,
                      sources=("mni152",), training=None, validation_dice=None):
    """What the trainer leaves after a run of ``final_step`` steps, without training: the
    ``best`` network as ``checkpoint`` with its model card (the best step ``best_step``; a
    validation record every ``best_step`` steps on the 2 mm working grid, Dice
    ``validation_dice(step)``; 10 s a step after a 100-step warm start of 1000 s; ``training``
    overrides the card's training block) and the ``final`` network in ``NAME.resume.pt``.
    Returns ``checkpoint``."""
    from DeepRegistrationLib.methods import save_checkpoint
    validation_dice = validation_dice or (lambda step: 0.5 + step / 100)
    history = [{"step": s, "spacing_mm": 2.0, "dice": validation_dice(s),
                "folding_percent_strict": 0.1 * s, "folding_percent": 0.05 * s, "sdlogj": 0.1,
                "gt_error_mm": 1.0} for s in range(best_step, final_step + 1, best_step)]
    card = {"working_spacing_mm": 2.0, "data": {"sources": [{"name": n} for n in sources]},
            "training": dict({"iterations": best_step, "run_iterations": final_step,
                              "wall_time_seconds": 10.0 * best_step,
                              "seconds_per_step": 10.0, "total_iterations": 100 + best_step,
                              "total_wall_time_seconds": 1000.0 + 10.0 * best_step},
                             **(training or {})),
            "validation": {"step": best_step, "metrics": dict(history[0]), "history": history}}
    save_checkpoint(checkpoint, best, method, config, card)
    torch.save({"method": method, "config": config, "state_dict": final.state_dict(),
                "optimizer": {}, "scheduler": {}, "step": final_step,
                "elapsed": 10.0 * final_step},
               os.path.splitext(checkpoint)[0] + ".resume.pt")
    return checkpoint


def fake_ablation_evaluation(monkeypatch, method, metrics, **extra):
    """An ablation's ``evaluate`` with two cases (one MNI152, one itk-t1) whose registrations
    run ``method`` through the engine on a shifted blob pair (the engine finds each arm's
    checkpoint as the real evaluation does) and whose metrics are faked: 0.5 for each of
    ``metrics`` (``(name, lower_is_better)``), ``extra`` added, and the strict folding set to the
    field's largest component, so a test can tell which weights registered. Returns the cases."""
    import types

    import training.evaluate as evaluate
    import training.mmln_ablation as mmln_ablation
    from DeepRegistrationLib import engine

    cases = [types.SimpleNamespace(name=name, source=source, paths={"fixed": "", "moving": ""})
             for name, source in (("a", "mni152"), ("b", "itk-t1"))]
    monkeypatch.setattr(evaluate, "build_cases", lambda which, folder, *rest: cases)
    monkeypatch.setattr(evaluate, "case_specs", lambda which, installed, *rest: cases)

    def run_one(job):
        fixed, moving = shifted_blob_images()
        field = engine.register(fixed, moving, method, options=job["options"]).displacement
        return {"displacement": field.numpy(), "seconds": 0.0}
    monkeypatch.setattr(evaluate, "run_one", run_one)
    monkeypatch.setattr(mmln_ablation, "case_metrics", lambda case, field: dict(
        {m: 0.5 for m, _ in metrics}, **extra, folding_percent_strict=float(field.abs().max())))
    return cases
