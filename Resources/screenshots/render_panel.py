"""Render the Slicer module's panel from its .ui file, with Qt stand-ins for Slicer's widgets.

    QT_QPA_PLATFORM=offscreen python Resources/screenshots/render_panel.py

This is a rendering, not a screenshot of Slicer (3D Slicer cannot run here): PySide6 loads
DeepRegistration/Resources/UI/DeepRegistration.ui unchanged, and the Slicer/CTK classes it uses are
replaced by the nearest Qt widgets (qMRMLNodeComboBox -> QComboBox, ctkCollapsibleButton ->
QGroupBox, ctkSliderWidget -> slider and spin box). The image says so at its top.

What the panel shows is real: the method list and its curated description come from
``python -m DeepRegistrationLib methods --json``, the choices from the module's lists, and the key
figures and the measures from a registration of the Sample Data demo pair that this script runs
(``vm-diff``, the module's command line). It also runs the module's default method (``io``) on the
pair; both summaries are written to docs/slicer_demo_summary.json ({method: summary}), the figures
docs/slicer.md quotes for the demo.
"""
import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from PySide6.QtCore import QFile, QIODevice, Qt  # noqa: E402
from PySide6.QtGui import QColor, QFont, QPainter  # noqa: E402
from PySide6.QtUiTools import QUiLoader  # noqa: E402
from PySide6.QtWidgets import (QApplication, QComboBox, QDoubleSpinBox, QGroupBox, QHBoxLayout,  # noqa: E402
                               QLabel, QSlider, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget)

from DeepRegistrationLib import slicer_bridge as bridge  # noqa: E402

UI_FILE = os.path.join(ROOT, "DeepRegistration", "Resources", "UI", "DeepRegistration.ui")
IMAGE = os.path.join(ROOT, "Resources", "screenshots", "slicer_panel_rendering.png")
SUMMARY = os.path.join(ROOT, "docs", "slicer_demo_summary.json")
PANEL_WIDTH = 360  # about the width of Slicer's module panel on a laptop screen
BANNER = "Rendering of DeepRegistration.ui with Qt stand-ins, not a Slicer screenshot"


class SliderStandIn(QWidget):
    """ctkSliderWidget: a slider and a spin box."""

    def __init__(self, parent=None):
        super().__init__(parent)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.slider = QSlider(Qt.Horizontal)
        self.spin = QDoubleSpinBox()
        layout.addWidget(self.slider, 1)
        layout.addWidget(self.spin)

    def sync(self):
        for name, setter in (("decimals", self.spin.setDecimals), ("minimum", self.spin.setMinimum),
                             ("maximum", self.spin.setMaximum), ("value", self.spin.setValue),
                             ("suffix", self.spin.setSuffix)):
            value = self.property(name)
            if value is not None:
                setter(value)
        self.slider.setRange(0, 100)
        span = self.spin.maximum() - self.spin.minimum()
        self.slider.setValue(int(100 * (self.spin.value() - self.spin.minimum()) / span) if span else 0)


class StandInLoader(QUiLoader):
    """QUiLoader that builds stand-ins for the Slicer and CTK classes of the .ui."""

    STAND_INS = {"qMRMLWidget": QWidget, "qMRMLNodeComboBox": QComboBox, "ctkCollapsibleButton": QGroupBox,
                 "ctkSliderWidget": SliderStandIn}

    def createWidget(self, className, parent=None, name=""):
        if className in self.STAND_INS:
            widget = self.STAND_INS[className](parent)
            widget.setObjectName(name)
            widget.setProperty("slicerClass", className)
            return widget
        return super().createWidget(className, parent, name)


def load_panel():
    """The .ui loaded with stand-ins; returns (top widget, {object name: widget})."""
    handle = QFile(UI_FILE)
    if not handle.open(QIODevice.ReadOnly):
        raise RuntimeError(f"cannot open {UI_FILE}")
    try:
        top = StandInLoader().load(handle)
    finally:
        handle.close()
    widgets = {w.objectName(): w for w in top.findChildren(QWidget) if w.objectName()}
    for widget in widgets.values():
        kind = widget.property("slicerClass")
        if kind == "ctkCollapsibleButton":
            widget.setTitle(("\u25b8 " if widget.property("collapsed") else "\u25be ") + str(widget.property("text")))
            if widget.property("collapsed"):  # a collapsed ctkCollapsibleButton shows its header only
                for child in widget.findChildren(QWidget):
                    child.setVisible(False)
                widget.setFlat(True)
                widget.setFixedHeight(widget.fontMetrics().height() + 4)
        elif kind == "ctkSliderWidget":
            widget.sync()
        elif kind == "qMRMLNodeComboBox" and widget.property("noneDisplay"):
            widget.addItem(str(widget.property("noneDisplay")))
    return top, widgets


def fill_combo(combo, items, current=0):
    combo.clear()
    for text in items:
        combo.addItem(text)
    combo.setCurrentIndex(current)


def run_demo(method):
    """Register the demo pair with the module's command line; returns the summary. The labels
    are those the demo's segmentations were made from (DeepRegistrationLib.sample_data.demo_pair,
    as make_sample_data.py does: grey matter 1, white matter 2)."""
    import SimpleITK as sitk
    from DeepRegistrationLib.sample_data import demo_pair

    folder = os.path.join(ROOT, "DeepRegistration", "Resources", "SampleData")
    fixed_path, moving_path = (os.path.join(folder, entry[0]) for entry in bridge.DEMO_FILES[:2])
    fixed_labels, moving_labels = demo_pair(spacing_mm=2.0, magnitude_mm=8.0, seed=7)[2:]
    with tempfile.TemporaryDirectory() as work:
        labels = {}
        for role, image in (("fixed", fixed_labels), ("moving", moving_labels)):
            labels[role] = os.path.join(work, f"{role}_labels.nii.gz")
            sitk.WriteImage(image, labels[role])
        output = os.path.join(work, "out")
        command = bridge.build_register_command(sys.executable, fixed_path, moving_path, output, method,
                                                fixed_labels=labels["fixed"], moving_labels=labels["moving"],
                                                figure=False)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL,
                       env=bridge.subprocess_environment(None, bridge.library_root()))
        with open(os.path.join(output, "summary.json")) as handle:
            return json.load(handle)


def main():
    app = QApplication.instance() or QApplication([])
    app.setFont(QFont(app.font().family(), 9))
    method = "vm-diff"
    listing = subprocess.run(bridge.build_methods_command(sys.executable), capture_output=True, text=True,
                             check=True, env=bridge.subprocess_environment(None, bridge.library_root()))
    methods = bridge.parse_methods_json(listing.stdout)
    summaries = {name: run_demo(name) for name in ("io", method)}
    summary = summaries[method]
    os.makedirs(os.path.dirname(SUMMARY), exist_ok=True)
    with open(SUMMARY, "w") as handle:
        json.dump(summaries, handle, indent=2)

    top, w = load_panel()
    names = [entry[1] for entry in bridge.DEMO_FILES]
    fill_combo(w["fixedVolumeSelector"], [names[0]])
    fill_combo(w["movingVolumeSelector"], [names[1]])
    fill_combo(w["fixedLabelsSelector"], [names[2]])
    fill_combo(w["movingLabelsSelector"], [names[3]])
    short = [bridge.method_short_name(info) for info in methods]
    current = [info["name"] for info in methods].index(method)
    fill_combo(w["methodComboBox"], short, current)
    w["methodDescriptionLabel"].setText(bridge.method_description_html(methods[current]))
    fill_combo(w["initialComboBox"], [label for _t, label in bridge.INITIAL_CHOICES])
    fill_combo(w["similarityComboBox"], [label for _t, label in bridge.SIMILARITY_CHOICES])
    fill_combo(w["deviceComboBox"], [label for _t, label in bridge.DEVICE_CHOICES])
    fill_combo(w["comparisonComboBox"], ["Fixed", "Warped", "Checkerboard", "Difference"], 1)
    base = f"{names[1]} to {names[0]}"
    fill_combo(w["outputTransformSelector"], [f"{base} ({method})"])
    fill_combo(w["warpedVolumeSelector"], [f"{names[1]} warped"])
    fill_combo(w["jacobianVolumeSelector"], [f"{base} Jacobian"])
    fill_combo(w["warpedLabelsSelector"], [f"{names[3]} warped"])
    fill_combo(w["resultsTableSelector"], [f"{base} measures"])
    w["applyButton"].setEnabled(True)
    w["progressBar"].setVisible(False)
    w["logTextEdit"].setVisible(False)
    w["statusLabel"].setText("Done.")
    w["keyFiguresLabel"].setText(bridge.key_figures_html(summary))
    w["jumpToWorstFoldingButton"].setEnabled(True)
    rows = bridge.results_table_rows(summary, {"1": "grey matter", "2": "white matter"})
    table = w["resultsTableWidget"]
    table.setRowCount(len(rows))
    for row, (name, value) in enumerate(rows):
        table.setItem(row, 0, QTableWidgetItem(name))
        table.setItem(row, 1, QTableWidgetItem(value))

    frame = QWidget()
    layout = QVBoxLayout(frame)
    layout.setContentsMargins(4, 4, 4, 4)
    banner = QLabel(BANNER)
    banner.setWordWrap(True)
    banner.setStyleSheet("background:#fff3c4; color:#5a4300; padding:3px; border:1px solid #d9b300;")
    layout.addWidget(banner)
    layout.addWidget(top)
    minimum = frame.minimumSizeHint().width()
    if minimum > PANEL_WIDTH:
        raise SystemExit(f"the panel needs {minimum} px, more than a side panel's {PANEL_WIDTH} px")
    frame.setFixedWidth(PANEL_WIDTH)
    frame.setFixedHeight(layout.heightForWidth(PANEL_WIDTH) if layout.hasHeightForWidth()
                         else frame.sizeHint().height())
    image = frame.grab()
    image.save(IMAGE)
    print(f"wrote {IMAGE} ({image.width()} x {image.height()} px) and {SUMMARY}")
    for name, result in summaries.items():
        print(f"{name}: " + "; ".join(f"{label} {value}" for label, value in bridge.key_figures(result)))


if __name__ == "__main__":
    main()
