"""The module's .ui file loaded by Qt's own loader (PySide6 QUiLoader, offscreen).

Slicer's widget classes (qMRMLWidget, qMRMLNodeComboBox, ctkCollapsibleButton, ctkSliderWidget)
are not available outside Slicer. QUiLoader does not refuse them: its QFormBuilder creates the base
class each <customwidget> declares in <extends> (and prints "QFormBuilder was unable to create a
custom widget ... defaulting to base class"), so the file is loaded as it is, unmodified. Signals
that only the Slicer classes have (mrmlSceneChanged) cannot be connected here; Qt prints a warning
for each and that is expected. Slicer's own loader (slicer.util.loadUI) is a QUiLoader as well.
"""
import os
import re
import xml.etree.ElementTree as ET

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402
from PySide6.QtCore import QFile, QIODevice, Qt  # noqa: E402
from PySide6.QtUiTools import QUiLoader  # noqa: E402
from PySide6.QtWidgets import (QAbstractSpinBox, QApplication, QCheckBox, QComboBox, QLabel,  # noqa: E402
                               QPlainTextEdit, QProgressBar, QPushButton, QSpinBox,
                               QTableWidget, QWidget)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UI_FILE = os.path.join(ROOT, "DeepRegistration", "Resources", "UI", "DeepRegistration.ui")
MODULE_PY = os.path.join(ROOT, "DeepRegistration", "DeepRegistration.py")


@pytest.fixture(scope="module")
def app():
    return QApplication.instance() or QApplication([])


@pytest.fixture(scope="module")
def ui(app):
    handle = QFile(UI_FILE)
    assert handle.open(QIODevice.ReadOnly)
    try:
        widget = QUiLoader().load(handle)
    finally:
        handle.close()
    assert widget is not None, "QUiLoader could not load the .ui file"
    children = {child.objectName(): child for child in widget.findChildren(QWidget)
                if child.objectName()}
    children[widget.objectName()] = widget
    yield children
    widget.deleteLater()


def referenced_ui_names():
    with open(MODULE_PY, encoding="utf-8") as handle:
        source = handle.read()
    return sorted(set(re.findall(r"\.ui\.(\w+)", source)))


def declared_bases():
    root = ET.parse(UI_FILE).getroot()
    return {c.findtext("class"): c.findtext("extends") for c in root.iter("customwidget")}


def test_every_widget_the_module_uses_exists(ui):
    names = referenced_ui_names()
    assert len(names) >= 15
    missing = [name for name in names if name not in ui]
    assert not missing, f"self.ui.<name> used in DeepRegistration.py but not in the .ui: {missing}"


def test_widget_classes_match_their_use(ui):
    expected = {
        "applyButton": QPushButton, "cancelButton": QPushButton, "showLogButton": QPushButton,
        "jumpToWorstFoldingButton": QPushButton, "progressBar": QProgressBar,
        "statusLabel": QLabel, "methodDescriptionLabel": QLabel, "keyFiguresLabel": QLabel,
        "logTextEdit": QPlainTextEdit, "resultsTableWidget": QTableWidget, "methodComboBox": QComboBox,
        "similarityComboBox": QComboBox, "deviceComboBox": QComboBox, "initialComboBox": QComboBox,
        "comparisonComboBox": QComboBox, "refineSpinBox": QSpinBox, "refineFullSpinBox": QSpinBox,
        "showGridCheckBox": QCheckBox, "showJacobianCheckBox": QCheckBox, "showFoldingCheckBox": QCheckBox,
        "overrideRegularizationCheckBox": QCheckBox, "keepOutputFolderCheckBox": QCheckBox,
        "applyToMovingCheckBox": QCheckBox, "hardenMovingCheckBox": QCheckBox,
    }
    for name, cls in expected.items():
        assert isinstance(ui[name], cls), f"{name} is a {type(ui[name]).__name__}"


def test_slicer_widgets_fall_back_to_their_declared_base(ui):
    root = ET.parse(UI_FILE).getroot()
    bases = declared_bases()
    for element in root.iter("widget"):
        cls = element.get("class")
        if cls in bases:
            widget = ui[element.get("name")]
            assert widget.metaObject().className() == bases[cls]


def test_parameter_names_are_readable_dynamic_properties(ui):
    """parameterNodeWrapper finds its widgets with widget.property("SlicerParameterName")."""
    root = ET.parse(UI_FILE).getroot()
    expected = {}
    for element in root.iter("widget"):
        for prop in element.findall("property[@name='SlicerParameterName']"):
            expected[element.get("name")] = prop.findtext("string")
    assert len(expected) >= 15
    for name, parameter in expected.items():
        assert ui[name].property("SlicerParameterName") == parameter
    found = {w.property("SlicerParameterName") for w in ui.values()
             if w.property("SlicerParameterName")}
    assert found == set(expected.values())


def test_initial_state(ui):
    assert ui["DeepRegistration"].metaObject().className() == "QWidget"  # qMRMLWidget's base
    assert not ui["applyButton"].isEnabled()
    assert not ui["cancelButton"].isEnabled()
    assert ui["showLogButton"].isCheckable()
    assert ui["logTextEdit"].isHidden() and ui["logTextEdit"].isReadOnly()
    assert ui["advancedCollapsibleButton"].property("collapsed") is True
    assert ui["detailsCollapsibleButton"].property("collapsed") is True
    assert ui["inputsCollapsibleButton"].property("text") == "Inputs"
    table = ui["resultsTableWidget"]
    assert table.columnCount() == 2
    assert [table.horizontalHeaderItem(c).text() for c in range(2)] == ["Measure", "Value"]
    assert table.editTriggers() == QTableWidget.NoEditTriggers
    half, full = ui["refineSpinBox"], ui["refineFullSpinBox"]
    assert (half.minimum(), half.maximum(), half.value()) == (0, 5000, 0)
    assert (full.minimum(), full.maximum(), full.value()) == (0, 1000, 0)
    assert isinstance(half, QAbstractSpinBox)
    # the two read as one setting: "10 at half resolution + 2 at full resolution"
    assert half.suffix() == " at half resolution" and full.prefix() == "+ "
    assert full.suffix() == " at full resolution"
    for name in ("similarityComboBox", "deviceComboBox", "initialComboBox", "comparisonComboBox"):
        assert ui[name].count() == 0, "parameterNodeWrapper fills Choice / Enum combo boxes"
    assert ui["keyFiguresLabel"].textFormat() == Qt.RichText and ui["keyFiguresLabel"].wordWrap()


def test_no_command_line_wording_in_the_panel():
    """Labels and tooltips speak to a clinician: no raw option tokens."""
    root = ET.parse(UI_FILE).getroot()
    texts = [p.findtext("string") or "" for p in root.iter("property") if p.get("name") in ("text", "toolTip")]
    joined = " ".join(texts)
    for token in ("lncc", "mind", "--", "cuda", "python -m", "DeepRegistrationLib"):
        assert token not in joined, token


def test_node_selector_properties(ui):
    """The qMRMLNodeComboBox properties survive as dynamic properties of the fallback QWidget
    (in Slicer they are real properties)."""
    fixed = ui["fixedVolumeSelector"]
    assert list(fixed.property("nodeTypes")) == ["vtkMRMLScalarVolumeNode"]
    assert fixed.property("noneEnabled") is False
    assert fixed.property("showChildNodeTypes") is False
    labels = ui["movingLabelsSelector"]
    assert list(labels.property("nodeTypes")) == ["vtkMRMLLabelMapVolumeNode",
                                                  "vtkMRMLSegmentationNode"]
    assert labels.property("noneEnabled") is True
    # outputs: "Create new" (the none item) or an existing node
    for name in ("outputTransformSelector", "warpedVolumeSelector", "jacobianVolumeSelector",
                 "warpedLabelsSelector", "resultsTableSelector"):
        assert ui[name].property("noneEnabled") is True, name
        assert ui[name].property("noneDisplay").startswith("Create new"), name
        assert ui[name].property("addEnabled") is False, name
    # the transform selector shows every transform class (the result is read into a
    # vtkMRMLTransformNode; a user may pick a grid or linear transform node)
    transform = ui["outputTransformSelector"]
    assert list(transform.property("nodeTypes")) == ["vtkMRMLTransformNode"]
    assert transform.property("showChildNodeTypes") is True
    assert list(ui["resultsTableSelector"].property("nodeTypes")) == ["vtkMRMLTableNode"]
    # long node names must not widen the side panel
    root = ET.parse(UI_FILE).getroot()
    for element in root.iter("widget"):
        if element.get("class") == "qMRMLNodeComboBox":
            policy = element.find("property[@name='sizeAdjustPolicy']/enum")
            assert policy is not None and policy.text == "QComboBox::AdjustToMinimumContentsLengthWithIcon", \
                element.get("name")


def test_slider_ranges(ui):
    for name, (minimum, maximum, value) in {
            "regularizationSliderWidget": (0.0, 10.0, 1.0),
            "gridSpacingSliderWidget": (2.0, 50.0, 10.0),
            "jacobianOpacitySliderWidget": (0.0, 1.0, 0.5)}.items():
        widget = ui[name]
        assert (widget.property("minimum"), widget.property("maximum"),
                widget.property("value")) == (minimum, maximum, value), name


def test_the_panel_fits_a_side_panel_with_real_content(app):
    """The .ui with Qt stand-ins for Slicer's widgets (the loader of the committed rendering),
    filled with the library's method names, the readable choices and long node names, needs no
    more than the 360 px of a side panel."""
    import importlib.util
    import subprocess
    import sys

    from DeepRegistrationLib import slicer_bridge as bridge

    spec = importlib.util.spec_from_file_location(
        "render_panel", os.path.join(ROOT, "Resources", "screenshots", "render_panel.py"))
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    top, widgets = render.load_panel()
    listing = subprocess.run(bridge.build_methods_command(sys.executable), capture_output=True, text=True,
                             timeout=300, env=bridge.subprocess_environment(None, bridge.library_root()))
    methods = bridge.parse_methods_json(listing.stdout)
    render.fill_combo(widgets["methodComboBox"], [bridge.method_short_name(m) for m in methods])
    longest = max(methods, key=lambda m: len(bridge.method_description_html(m)))
    widgets["methodDescriptionLabel"].setText(bridge.method_description_html(longest))
    render.fill_combo(widgets["similarityComboBox"], [label for _t, label in bridge.SIMILARITY_CHOICES])
    render.fill_combo(widgets["initialComboBox"], [label for _t, label in bridge.INITIAL_CHOICES])
    for name in ("fixedVolumeSelector", "outputTransformSelector", "warpedLabelsSelector"):
        render.fill_combo(widgets[name], ["A very long node name " * 4])
    assert top.minimumSizeHint().width() <= render.PANEL_WIDTH
    # the key figures come right after Apply and the status line, above every result selector,
    # and within the first 700 px of the panel (visible without scrolling on a 1080p screen)
    from PySide6.QtCore import QPoint
    height = top.layout().heightForWidth(render.PANEL_WIDTH) if top.layout().hasHeightForWidth() \
        else top.sizeHint().height()
    top.resize(render.PANEL_WIDTH, height)
    top.layout().activate()

    def y(name):
        return widgets[name].mapTo(top, QPoint(0, 0)).y()
    assert y("applyButton") < y("statusLabel") < y("keyFiguresLabel") < y("outputsCollapsibleButton")
    assert y("keyFiguresLabel") < 700, y("keyFiguresLabel")
    # the old titles (with their parentheses) were what made the panel wide
    assert all("(" not in bridge.method_short_name(m) for m in methods)
    top.deleteLater()
