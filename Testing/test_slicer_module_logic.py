"""The module's Logic and self-test driven end to end outside Slicer: real MRML (PyPI
slicer-core), the real command line as the subprocess, fake application (slicer_harness.py).

This checks the module's own control flow: what it writes, the command it runs, progress, the
refusal of a second run, the method list, the dependency check (nothing is installed without
the user's consent, and the self-test never installs), and the module's own self-test.
"""
import os
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from slicer_harness import FakeTimer, environment, process_events, slicer  # noqa: F401

from DeepRegistrationLib import slicer_bridge as bridge


def pair(env, shape=(20, 22, 24)):
    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    center = [n / 2 for n in shape]

    def blob(offset, scale):
        r2 = sum(((axis - c - o) / (s * scale)) ** 2
                 for axis, c, o, s in zip((k, j, i), center, offset, (5.0, 6.0, 7.0)))
        return (100 * np.exp(-2 * r2) + 40 * (r2 < 1)).astype(np.float32), (r2 < 1).astype(np.int16)

    matrix = np.diag([2.0, 1.8, 2.5, 1.0])
    matrix[:3, 3] = [-20.0, 10.0, 5.0]
    (fixed, fixed_labels), (moving, moving_labels) = blob((0, 0, 0), 1.0), blob((1.0, -1.5, 1.0), 1.1)
    nodes = [slicer.util.addVolumeFromArray(fixed, matrix, "fixed"),
             slicer.util.addVolumeFromArray(moving, matrix, "moving"),
             slicer.util.addVolumeFromArray(fixed_labels, matrix, "fixed labels", "vtkMRMLLabelMapVolumeNode"),
             slicer.util.addVolumeFromArray(moving_labels, matrix, "moving labels", "vtkMRMLLabelMapVolumeNode")]
    return nodes


def test_run_writes_the_inputs_in_world_coordinates_and_runs_the_command_line(environment, monkeypatch):
    env = environment
    fixed, moving, fixed_labels, moving_labels = pair(env)
    logic = env.module.DeepRegistrationLogic()
    commands, exported = [], {}
    original = bridge.RegistrationProcess

    class Recording(original):
        def start(self):
            inputs = os.path.dirname(self.command[4])
            commands.append(list(self.command))
            exported.update({name: sitk.ReadImage(os.path.join(inputs, name)) for name in os.listdir(inputs)})
            return super().start()

    monkeypatch.setattr(env.module.bridge, "RegistrationProcess", Recording)
    progress = []
    result = logic.run(fixed, moving, method="io", refine=(2, 1), similarity="lncc", device="cpu", initial="rigid",
                       fixedLabels=fixed_labels, movingLabels=moving_labels,
                       progressCallback=lambda f, s, m: progress.append(f), timeoutSeconds=600)
    assert result["status"] == "success", result["message"] + "\n" + result["log"]
    command = commands[0]
    assert command[1:4] == ["-m", "DeepRegistrationLib", "register"]

    def value(flag):
        return command[command.index(flag) + 1]
    assert value("--method") == "io" and value("--refine") == "2x1" and value("--initial") == "rigid"
    assert os.path.basename(value("--fixed-labels")) == "fixed_labels.nii.gz"
    assert sorted(exported) == ["fixed.nii.gz", "fixed_labels.nii.gz", "moving.nii.gz", "moving_labels.nii.gz"]
    # written with the geometry Slicer has for the nodes
    import vtk
    matrix = vtk.vtkMatrix4x4()
    fixed.GetIJKToRASMatrix(matrix)
    for name in exported:
        np.testing.assert_allclose(bridge.ijk_to_ras_matrix(exported[name]), bridge.numpy_from_vtk_matrix(matrix),
                                   atol=1e-4, err_msg=name)
    assert progress and progress == sorted(progress) and progress[-1] > 0.9
    assert "write outputs" in result["log"]
    assert not os.listdir(env.temp), "the work folder is removed"
    assert not FakeTimer.active
    assert result["labelNames"] == {"1": slicer.util.getNode("moving labels").GetDisplayNode().GetColorNode().GetColorName(1)}


def test_keep_output_folder_draws_the_qa_figure_and_keeps_the_files(environment):
    env = environment
    fixed, moving = pair(env)[:2]
    result = env.module.DeepRegistrationLogic().run(fixed, moving, keepOutputFolder=True, timeoutSeconds=600)
    assert result["status"] == "success", result["log"]
    assert os.path.isfile(os.path.join(result["outputFolder"], "summary.json"))
    assert os.path.isfile(os.path.join(result["outputFolder"], "qa.png"))
    assert result["nodes"]["warped"].GetStorageNode().GetFileName() == os.path.join(result["outputFolder"], "warped.nii.gz")


def test_a_second_run_is_refused_while_one_runs(environment):
    env = environment
    fixed, moving = pair(env)[:2]
    logic = env.module.DeepRegistrationLogic()
    logic.startRegistration(fixed, moving, refine=2000)
    try:
        with pytest.raises(RuntimeError):
            logic.startRegistration(fixed, moving)
    finally:
        logic.cancel(wait=True)
    assert not logic.isRunning()


def test_query_methods(environment):
    env = environment
    received = []
    job = env.module.DeepRegistrationLogic().queryMethods(lambda methods, error: received.append((methods, error)))
    while not received:
        process_events()
    methods, error = received[0]
    assert error is None
    assert "io" in [m["name"] for m in methods]
    assert job.process.is_finished()


def test_missing_packages_declined(environment, monkeypatch):
    env = environment
    monkeypatch.setattr(env.module.bridge, "missing_modules", lambda names=None: ["nibabel"])
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *a, **k: False)
    assert env.module.DeepRegistrationLogic().ensureDependencies(askConfirmation=True) is False


def test_missing_packages_installed_after_confirmation(environment, monkeypatch):
    env = environment
    state = {"missing": ["torch", "nibabel"]}
    installed = []

    def pip_install(requirements):
        installed.append(list(requirements))
        state["missing"] = []
    monkeypatch.setattr(env.module.bridge, "missing_modules", lambda names=None: list(state["missing"]))
    monkeypatch.setattr(slicer.util, "pip_install", pip_install)
    asked = []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *a, **k: asked.append(a) or True)
    assert env.module.DeepRegistrationLogic().ensureDependencies(askConfirmation=True) is True
    assert asked, "the user is asked first"
    # without the PyTorch extension torch comes from pip, then the rest
    assert installed == [["torch>=2.0"], ["nibabel"]]


def test_the_self_test_never_installs_and_skips_registration_without_torch(environment, monkeypatch):
    env = environment
    monkeypatch.setattr(env.module.bridge, "missing_modules", lambda names=None: ["torch"])
    started = []
    monkeypatch.setattr(env.module.DeepRegistrationLogic, "startRegistration",
                        lambda *a, **k: started.append(1))
    test = env.module.DeepRegistrationTest()
    messages = sys.modules["slicer.ScriptedLoadableModule"].ScriptedLoadableModuleTest.messages
    messages.clear()
    test.runTest()  # slicer.util.pip_install raises in these tests: nothing may be installed
    assert not started
    assert "Geometry round trip passed" in messages
    assert any("Skipping the registration tests" in m and "torch" in m for m in messages)


def test_the_modules_self_test_passes(environment):
    """DeepRegistrationTest.runTest as Slicer runs it (ctest / Reload and Test): geometry round
    trip, instance optimisation with segmentations (transform checked in Slicer coordinates,
    jump to the worst folding), a trained network on the demo pair, and cancel."""
    env = environment
    messages = sys.modules["slicer.ScriptedLoadableModule"].ScriptedLoadableModuleTest.messages
    messages.clear()
    env.module.DeepRegistrationTest().runTest()
    for expected in ("Geometry round trip passed", "Registration test passed", "Network test passed",
                     "Cancel test passed"):
        assert expected in messages, messages
