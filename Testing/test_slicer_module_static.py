"""The Slicer module checked without Slicer: it compiles (with Python 3.9 syntax), the CMake lists
name exactly the files on disk, and the parameter node binds to the .ui the way Slicer's
parameterNodeWrapper would (field names, widget classes, Choice / range annotations)."""
import ast
import glob
import os
import py_compile
import re
import xml.etree.ElementTree as ET

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE_DIR = os.path.join(ROOT, "DeepRegistration")
MODULE_PY = os.path.join(MODULE_DIR, "DeepRegistration.py")
MODULE_CMAKE = os.path.join(MODULE_DIR, "CMakeLists.txt")
UI_FILE = os.path.join(MODULE_DIR, "Resources", "UI", "DeepRegistration.ui")
LIB_DIR = os.path.join(ROOT, "DeepRegistrationLib")


def read(path):
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def cmake_list(text, variable):
    """Entries of ``set(VARIABLE ...)`` in a CMakeLists.txt (comments removed)."""
    text = re.sub(r"#[^\n]*", "", text)
    match = re.search(r"set\(\s*" + re.escape(variable) + r"\s+(.*?)\)", text, re.S)
    assert match, f"no set({variable} ...) in the CMakeLists.txt"
    return match.group(1).split()


def module_ast():
    return ast.parse(read(MODULE_PY), MODULE_PY)


# ----------------------------------------------------------------------------- compiling
def test_module_compiles(tmp_path):
    py_compile.compile(MODULE_PY, cfile=str(tmp_path / "DeepRegistration.pyc"), doraise=True)


@pytest.mark.parametrize("path", [MODULE_PY, os.path.join(LIB_DIR, "slicer_bridge.py")])
def test_python39_syntax(path):
    """Slicer 5.4-5.8 embed Python 3.9."""
    ast.parse(read(path), path, feature_version=(3, 9))


def test_module_annotations_are_python39():
    """The module has no ``from __future__ import annotations``: parameterNodeWrapper evaluates
    its annotations, so ``X | None`` (Python 3.10) must not appear in any annotation."""
    tree = module_ast()
    annotations = []
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            annotations.extend(a.annotation for a in node.args.args + node.args.kwonlyargs if a.annotation)
            if node.returns is not None:
                annotations.append(node.returns)
    for annotation in annotations:
        for sub in ast.walk(annotation):
            assert not (isinstance(sub, ast.BinOp) and isinstance(sub.op, ast.BitOr)), \
                f"PEP 604 union in an annotation at line {annotation.lineno}"


# ----------------------------------------------------------------------------- CMake
def test_library_files_listed_in_cmake_match_the_files_on_disk():
    listed = cmake_list(read(MODULE_CMAKE), "DEEPREGISTRATIONLIB_PYTHON_SCRIPTS")
    assert len(listed) == len(set(listed)), "a library file is listed twice"
    on_disk = sorted(os.path.relpath(path, ROOT).replace(os.sep, "/")
                     for path in glob.glob(os.path.join(LIB_DIR, "**", "*.py"), recursive=True)
                     if "__pycache__" not in path)
    missing = sorted(set(on_disk) - set(listed))
    extra = sorted(set(listed) - set(on_disk))
    assert not missing and not extra, (
        f"DeepRegistration/CMakeLists.txt DEEPREGISTRATIONLIB_PYTHON_SCRIPTS is out of date; "
        f"add {missing}, remove {extra}")


def test_library_is_installed_into_the_module_path():
    """The package is copied with SOURCE_DIR = repository root (not '../' paths, which
    ctkMacroCompilePythonScript would copy outside qt-scripted-modules)."""
    text = re.sub(r"#[^\n]*", "", read(MODULE_CMAKE))
    assert "../DeepRegistrationLib" not in text
    call = re.search(r"ctkMacroCompilePythonScript\((.*?)\n\s*\)", text, re.S).group(1)
    assert re.search(r"SCRIPTS\s+\"\$\{DEEPREGISTRATIONLIB_PYTHON_SCRIPTS\}\"", call)
    assert re.search(r"SOURCE_DIR\s+\$\{DEEPREGISTRATION_ROOT_DIR\}", call)
    assert re.search(r"DESTINATION_DIR\s+\$\{CMAKE_BINARY_DIR\}/\$\{Slicer_QTSCRIPTEDMODULES_LIB_DIR\}\s", call)
    assert re.search(r"INSTALL_DIR\s+\$\{Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR\}\s", call)
    assert "NO_INSTALL_SUBDIR" in call
    assert re.search(r"get_filename_component\(DEEPREGISTRATION_ROOT_DIR \$\{CMAKE_CURRENT_SOURCE_DIR\}/\.\. ABSOLUTE\)", text)


def test_module_scripts_and_resources_exist():
    text = read(MODULE_CMAKE)
    assert re.search(r"set\(MODULE_NAME DeepRegistration\)", text)
    for variable in ("MODULE_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES"):
        for entry in cmake_list(text, variable):
            path = os.path.join(MODULE_DIR, entry.replace("${MODULE_NAME}", "DeepRegistration"))
            assert os.path.isfile(path), f"{variable} lists {entry}, which does not exist"
    resources = cmake_list(text, "MODULE_PYTHON_RESOURCES")
    assert "Resources/UI/${MODULE_NAME}.ui" in resources
    assert "Resources/Icons/${MODULE_NAME}.png" in resources
    assert "WITH_GENERIC_TESTS" in text
    assert re.search(r"slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)", text)
    assert os.path.isfile(os.path.join(MODULE_DIR, "Testing", "CMakeLists.txt"))


def test_icon_is_128_pixels():
    from PIL import Image

    with Image.open(os.path.join(MODULE_DIR, "Resources", "Icons", "DeepRegistration.png")) as icon:
        assert icon.size == (128, 128)


def test_extension_cmake_metadata():
    text = read(os.path.join(ROOT, "CMakeLists.txt"))
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                     "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert re.search(r"set\(" + variable + r" ", text), variable
    # no invented hosts or names: the URLs come from the repository's own remote
    assert "DeepRegistration/DeepRegistration" not in text
    assert "DeepRegistration developers" not in text
    assert "remote.origin.url" in text
    assert 'set(EXTENSION_CATEGORY "Registration")' in text
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in text
    assert "find_package(Slicer REQUIRED)" in text
    assert "include(${Slicer_USE_FILE})" in text
    assert "add_subdirectory(DeepRegistration)" in text
    assert "include(${Slicer_EXTENSION_CPACK})" in text


# ----------------------------------------------------------------------------- parameter node <-> .ui
def parameter_fields():
    """{name: annotation AST} of the @parameterNodeWrapper class."""
    for node in module_ast().body:
        if isinstance(node, ast.ClassDef) and any(
                isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in node.decorator_list):
            return {item.target.id: item.annotation for item in node.body
                    if isinstance(item, ast.AnnAssign)}
    raise AssertionError("no @parameterNodeWrapper class in DeepRegistration.py")


def ui_bindings():
    """{SlicerParameterName: (widget class, widget element)} of the .ui file."""
    bindings = {}
    for widget in ET.parse(UI_FILE).getroot().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                assert prop.get("stdset") == "0", "SlicerParameterName must be a dynamic property"
                name = prop.find("string").text
                assert name not in bindings, f"{name} is bound to two widgets"
                bindings[name] = (widget.get("class"), widget)
    return bindings


def annotation_parts(annotation):
    """(base type source, [annotation call names]) of ``Annotated[T, A(...), ...]`` or ``T``."""
    if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) == "Annotated":
        elements = annotation.slice.elts if isinstance(annotation.slice, ast.Tuple) else [annotation.slice]
        base, extras = elements[0], elements[1:]
        return ast.unparse(base), [ast.unparse(e.func) for e in extras if isinstance(e, ast.Call)]
    return ast.unparse(annotation), []


def node_classes(base):
    """Node class names of ``vtkMRMLXNode`` or ``Union[vtkMRMLANode, vtkMRMLBNode, None]``."""
    return [name for name in re.findall(r"vtkMRML\w+", base)]


def test_every_bound_widget_names_a_parameter():
    fields = parameter_fields()
    bindings = ui_bindings()
    unknown = sorted(set(bindings) - set(fields))
    assert not unknown, f"SlicerParameterName without a parameter node field: {unknown}"
    assert {"fixedVolume", "movingVolume", "fixedLabels", "movingLabels", "refineHalf", "refineFull", "similarity",
            "device", "initial", "regularization", "showGrid", "gridSpacing", "showJacobian",
            "jacobianOpacity", "comparisonView", "showFolding", "applyToMoving", "hardenMoving",
            "outputTransform", "warpedVolume", "jacobianVolume", "warpedLabels",
            "resultsTable"} <= set(bindings)


def test_bound_widgets_match_what_parameterNodeWrapper_can_connect():
    """Mirror of the GUI connectors of Slicer 5.4's parameterNodeWrapper (guiConnectors.py):
    QCheckBox<->bool, QSpinBox<->int, ctkSliderWidget<->bounded float, QComboBox<->Choice,
    qMRMLNodeComboBox<->node or Union of nodes."""
    fields = parameter_fields()
    for name, (widget_class, widget) in ui_bindings().items():
        base, extras = annotation_parts(fields[name])
        if widget_class == "QCheckBox":
            assert base == "bool", name
        elif widget_class == "QSpinBox":
            assert base == "int", name
            assert "WithinRange" in extras, f"{name}: give the spin box a range"
        elif widget_class == "ctkSliderWidget":
            assert base == "float", name
            assert "WithinRange" in extras, f"{name}: ctkSliderWidget needs a bounded float"
        elif widget_class == "QComboBox":
            # QComboBoxToStringableConnector (Choice) or QComboBoxToEnumConnector (an Enum,
            # shown by its label())
            if base in choice_enums():
                assert not extras, name
            else:
                assert base in ("str", "int", "float", "bool"), name
                assert "Choice" in extras, f"{name}: a QComboBox needs the Choice annotation or an Enum"
            assert widget.find("item") is None, f"{name}: the connector fills the items"
        elif widget_class == "qMRMLNodeComboBox":
            classes = node_classes(base)
            assert classes, f"{name}: a node selector needs a node type"
            ui_types = [s.text for s in widget.find("property[@name='nodeTypes']/stringlist")]
            assert ui_types == classes, f"{name}: nodeTypes {ui_types} != annotation {classes}"
            none_enabled = widget.find("property[@name='noneEnabled']/bool").text == "true"
            if "None" in base:
                assert none_enabled, f"{name} is optional: the selector needs noneEnabled"
        else:
            raise AssertionError(f"{name}: no parameterNodeWrapper connector for {widget_class}")


def choice_enums():
    """{enum name: the bridge list it is made from} of ``X = _choiceEnum("X", bridge.Y, ...)``."""
    enums = {}
    for node in module_ast().body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) \
                and ast.unparse(node.value.func) == "_choiceEnum":
            enums[node.targets[0].id] = ast.unparse(node.value.args[1])
    return enums


def test_choice_values_come_from_the_bridge():
    fields = parameter_fields()
    enums = choice_enums()
    assert enums == {"Similarity": "bridge.SIMILARITY_CHOICES", "Device": "bridge.DEVICE_CHOICES",
                     "Initial": "bridge.INITIAL_CHOICES"}
    assert ast.unparse(fields["similarity"]) == "Similarity"
    assert ast.unparse(fields["device"]) == "Device"
    assert ast.unparse(fields["initial"]) == "Initial"
    assert "COMPARISON_VIEWS" in ast.unparse(fields["comparisonView"])


def test_every_node_selector_gets_the_scene():
    """As in Slicer's template: mrmlSceneChanged(vtkMRMLScene*) of the top-level qMRMLWidget
    is connected to setMRMLScene(vtkMRMLScene*) of every qMRMLNodeComboBox."""
    root = ET.parse(UI_FILE).getroot()
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget"
    selectors = {w.get("name") for w in root.iter("widget") if w.get("class") == "qMRMLNodeComboBox"}
    connected = set()
    for connection in root.iter("connection"):
        if (connection.findtext("sender") == top.get("name")
                and connection.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                and connection.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"):
            connected.add(connection.findtext("receiver"))
    assert selectors and selectors == connected


def test_custom_widgets_are_declared_with_their_base_class():
    root = ET.parse(UI_FILE).getroot()
    declared = {c.findtext("class"): c for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    custom = {c for c in used if c.startswith(("qMRML", "qSlicer", "ctk"))}
    assert custom <= set(declared), f"undeclared custom widgets: {custom - set(declared)}"
    # the bases Slicer's own .ui files give these classes (e.g. the scripted-module template)
    expected = {"qMRMLWidget": "QWidget", "qMRMLNodeComboBox": "QWidget",
                "ctkCollapsibleButton": "QWidget", "ctkSliderWidget": "QWidget"}
    for name, element in declared.items():
        assert element.findtext("extends") == expected[name], name
        assert element.findtext("header") == f"{name}.h"
    assert declared["qMRMLWidget"].findtext("container") == "1"
    assert declared["ctkCollapsibleButton"].findtext("container") == "1"


def test_advanced_section_is_collapsed():
    root = ET.parse(UI_FILE).getroot()
    advanced = [w for w in root.iter("widget") if w.get("name") == "advancedCollapsibleButton"][0]
    assert advanced.get("class") == "ctkCollapsibleButton"
    assert advanced.find("property[@name='collapsed']/bool").text == "true"
    names = {w.get("name") for w in advanced.iter("widget")}
    assert "regularizationSliderWidget" in names


def test_module_structure():
    """Module / ParameterNode / Widget / Logic / Test, as in Slicer's scripted-module template."""
    classes = {node.name: [ast.unparse(b) for b in node.bases]
               for node in module_ast().body if isinstance(node, ast.ClassDef)}
    assert classes["DeepRegistration"] == ["ScriptedLoadableModule"]
    assert "ScriptedLoadableModuleWidget" in classes["DeepRegistrationWidget"]
    assert "VTKObservationMixin" in classes["DeepRegistrationWidget"]
    assert classes["DeepRegistrationLogic"] == ["ScriptedLoadableModuleLogic"]
    assert classes["DeepRegistrationTest"] == ["ScriptedLoadableModuleTest"]
    assert "DeepRegistrationParameterNode" in classes


def test_packages_are_installed_only_after_confirmation():
    """pip / PyTorchUtils appear only in Logic.installPackages, which only ensureDependencies
    calls, after slicer.util.confirmOkCancelDisplay."""
    tree = module_ast()
    source = read(MODULE_PY)
    logic = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DeepRegistrationLogic"][0]
    methods = {f.name: ast.unparse(f) for f in logic.body if isinstance(f, ast.FunctionDef)}
    assert "pip_install" in methods["installPackages"]
    assert "installTorch" in methods["installPackages"]
    assert source.count("pip_install(") == methods["installPackages"].count("pip_install(")
    ensure = methods["ensureDependencies"]
    assert ensure.index("confirmOkCancelDisplay") < ensure.index("self.installPackages(")
    callers = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
               and ast.unparse(n.func).endswith("installPackages")]
    assert len(callers) == 1
    # nothing is installed or imported from torch at import time
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            assert "torch" not in ast.unparse(node)


def test_license_file_is_the_license_the_project_states():
    """LICENSE.txt is the Apache License 2.0 text, as pyproject.toml says."""
    text = read(os.path.join(ROOT, "LICENSE.txt"))
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert 'license = {text = "Apache-2.0"}' in read(os.path.join(ROOT, "pyproject.toml"))


def test_screenshot_and_icon_named_in_the_metadata_exist():
    """The icon and screenshot URLs point at files of this repository."""
    text = read(os.path.join(ROOT, "CMakeLists.txt"))
    for variable in ("DEEPREGISTRATION_ICON_PATH", "DEEPREGISTRATION_SCREENSHOT_PATH"):
        match = re.search(r"set\(" + variable + r" \"([^\"]+)\"\)", text)
        assert match, variable
        assert os.path.isfile(os.path.join(ROOT, match.group(1))), match.group(1)


def test_sample_data_files_are_installed_with_the_module():
    from DeepRegistrationLib import slicer_bridge as bridge
    resources = cmake_list(read(MODULE_CMAKE), "MODULE_PYTHON_RESOURCES")
    for entry in bridge.DEMO_FILES:
        assert f"Resources/SampleData/{entry[0]}" in resources, entry[0]
    assert f"Resources/SampleData/{bridge.DEMO_SAMPLE_NAME}.png" in resources


def configure_metadata(tmp_path, *arguments, git_remote=None):
    """Configure the extension's metadata block of the top-level CMakeLists.txt on its own (no
    Slicer needed) and return the EXTENSION_* values it sets."""
    import shutil
    import subprocess
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    text = read(os.path.join(ROOT, "CMakeLists.txt"))
    start = text.index("# Extension meta-information")
    end = text.index("# Extension dependencies")
    source = tmp_path / "source"
    source.mkdir(parents=True)
    names = ("EXTENSION_HOMEPAGE", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_CONTRIBUTORS")
    (source / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.16)\nproject(MetadataCheck NONE)\n" + text[start:end] +
        "".join(f'message(STATUS "{name}=[${{{name}}}]")\n' for name in names))
    if git_remote:
        subprocess.run(["git", "init", "-q", str(source)], check=True)
        subprocess.run(["git", "-C", str(source), "remote", "add", "origin", git_remote], check=True)
    completed = subprocess.run(["cmake", "-S", str(source), "-B", str(tmp_path / "build"), *arguments],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    values = dict(re.findall(r"-- (EXTENSION_\w+)=\[(.*)\]", completed.stdout))
    return values, " ".join(completed.stderr.split())  # CMake wraps its warnings


def test_extension_urls_follow_the_repository_remote(tmp_path):
    values, warnings = configure_metadata(tmp_path, git_remote="git@github.com:someone/SlicerDeepReg.git")
    assert values["EXTENSION_HOMEPAGE"] == "https://github.com/someone/SlicerDeepReg#readme"
    raw = "https://raw.githubusercontent.com/someone/SlicerDeepReg/main/"
    assert values["EXTENSION_ICONURL"] == raw + "DeepRegistration/Resources/Icons/DeepRegistration.png"
    assert values["EXTENSION_SCREENSHOTURLS"] == raw + "Resources/screenshots/slicer_panel_rendering.png"
    assert "DEEPREGISTRATION_CONTRIBUTORS is empty" in warnings


def test_extension_urls_without_a_remote_are_empty_and_said_so(tmp_path):
    values, warnings = configure_metadata(tmp_path, "-DDEEPREGISTRATION_CONTRIBUTORS=Ada Lovelace (Analytical Engines)")
    assert values["EXTENSION_ICONURL"] == "" and values["EXTENSION_SCREENSHOTURLS"] == ""
    assert values["EXTENSION_CONTRIBUTORS"] == "Ada Lovelace (Analytical Engines)"
    assert "icon and screenshot URLs are empty" in warnings
    values, _ = configure_metadata(tmp_path / "again", "-DDEEPREGISTRATION_REPOSITORY_URL=https://github.com/org/repo")
    assert values["EXTENSION_HOMEPAGE"] == "https://github.com/org/repo#readme"
