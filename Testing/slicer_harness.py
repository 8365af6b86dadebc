"""Run the Slicer module outside Slicer: real MRML, fake application and widgets.

PyPI's ``slicer-core`` is Slicer's MRML, its storage nodes, the module logics (colours,
segmentations, transforms) and ``slicer.util`` as a Python package, without the Qt application.
Everything the module does with MRML therefore runs on Slicer's own code here. What ``slicer-core``
lacks is faked, and only that:

- ``qt``: a timer fired by ``slicer.app.processEvents()``, table items, a message box;
- ``slicer.app``: temporary path, event processing, testing mode;
- ``slicer.modules``: the real module logics of slicer-core, set on the test scene;
- the scripted-module base classes (``slicer.ScriptedLoadableModule``), ``slicer.i18n`` and
  ``slicer.parameterNodeWrapper`` (a small stand-in that stores the fields in the real
  ``vtkMRMLScriptedModuleNode``, by node reference for nodes and by name for enums, as Slicer's
  serialisers do);
- the widgets of the .ui file (``FakeWidget``); the .ui itself is loaded by PySide6 in
  test_slicer_ui.py.

Slice views are three real ``vtkMRMLSliceNode`` / ``vtkMRMLSliceCompositeNode`` pairs (Red,
Yellow, Green), as Slicer's layout creates them.
"""
import enum
import importlib
import os
import sys
import types
import typing
import unittest
import xml.etree.ElementTree as ET

import pytest

slicer = pytest.importorskip("slicer", reason="PyPI slicer-core is needed (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)
import slicer.util  # noqa: E402  (the real one, from slicer-core)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE_DIR = os.path.join(ROOT, "DeepRegistration")
UI_FILE = os.path.join(MODULE_DIR, "Resources", "UI", "DeepRegistration.ui")
SLICE_VIEWS = ("Red", "Yellow", "Green")


# ----------------------------------------------------------------------------- qt
class FakeTimer:
    active = set()

    def __init__(self):
        self.callbacks = []

    def setInterval(self, milliseconds):
        self.interval = milliseconds

    def connect(self, signal, callback):
        assert signal == "timeout()"
        self.callbacks.append(callback)

    def start(self):
        FakeTimer.active.add(self)

    def stop(self):
        FakeTimer.active.discard(self)


def process_events():
    for timer in list(FakeTimer.active):
        for callback in list(timer.callbacks):
            if timer in FakeTimer.active:
                callback()


class FakeTableWidgetItem:
    def __init__(self, text=""):
        self._text = text
        self.tip = ""

    def text(self):
        return self._text

    def setToolTip(self, tip):
        self.tip = tip


class FakeMessageBox:
    """Answers with ``FakeMessageBox.answer``; records what it was asked."""
    Question, Yes, No, Cancel = 4, 0x4000, 0x10000, 0x400000
    answer = Yes
    asked = []

    def __init__(self, icon, title, text, buttons):
        self.title, self.text = title, text
        self._buttons = {}
        FakeMessageBox.asked.append(self)

    def button(self, which):
        return self._buttons.setdefault(which, types.SimpleNamespace(text=""))

    def setDefaultButton(self, which):
        self.default = which

    def exec_(self):
        return FakeMessageBox.answer


def make_qt():
    qt = types.ModuleType("qt")
    qt.QTimer = FakeTimer
    qt.QTableWidgetItem = FakeTableWidgetItem
    qt.QMessageBox = FakeMessageBox
    qt.Qt = types.SimpleNamespace(ToolTipRole=3, WaitCursor=3)
    return qt


# ----------------------------------------------------------------------------- widgets
class FakeWidget:
    """Holds the properties the module sets (PythonQt style: ``widget.enabled = False``) and the
    slots it connects; ``emit`` calls them."""

    def __init__(self, name, className):
        self.name = name
        self.className = className
        self.enabled = True
        self.hidden = False
        self.text = ""
        self.toolTip = ""
        self.checked = False
        self.value = 0
        self.currentIndex = -1
        self.collapsed = False
        self.items = []
        self.itemData = {}
        self.rows = {}
        self.rowCount = 0
        self.lines = []
        self.signals = {}
        self.blocked = False

    # signals
    def connect(self, signal, slot):
        self.signals.setdefault(signal, []).append(slot)

    def emit(self, signal, *args):
        if not self.blocked:
            for slot in self.signals.get(signal, []):
                slot(*args)

    def blockSignals(self, blocked):
        previous, self.blocked = self.blocked, blocked
        return previous

    # QWidget
    def setVisible(self, visible):
        self.hidden = not visible

    def isVisible(self):
        return not self.hidden

    # QComboBox
    def clear(self):
        self.items = []
        self.itemData = {}
        self.lines = []
        self.currentIndex = -1

    def addItem(self, text):
        self.items.append(text)
        if self.currentIndex < 0:
            self.currentIndex = 0

    @property
    def count(self):
        return len(self.items)

    def setItemData(self, index, data, role):
        self.itemData[(index, role)] = data

    # QTableWidget
    def setRowCount(self, count):
        self.rowCount = count
        self.rows = {k: v for k, v in self.rows.items() if k[0] < count}

    def setItem(self, row, column, item):
        self.rows[(row, column)] = item

    def item(self, row, column):
        return self.rows.get((row, column))

    def resizeColumnToContents(self, column):
        pass

    def setHorizontalHeaderLabels(self, labels):
        self.headers = list(labels)

    # QPlainTextEdit
    def appendPlainText(self, line):
        self.lines.append(line)

    # qMRMLWidget / qMRMLNodeComboBox
    def setMRMLScene(self, scene):
        self.scene = scene


def fake_ui():
    """A FakeWidget for every named widget of the .ui file, as ``slicer.util.childWidgetVariables``
    returns them."""
    root = ET.parse(UI_FILE).getroot()
    ui = types.SimpleNamespace()
    for element in root.iter("widget"):
        setattr(ui, element.get("name"), FakeWidget(element.get("name"), element.get("class")))
    return ui


# ----------------------------------------------------------------------------- parameterNodeWrapper
def _node_classes(annotation):
    """The MRML classes of a node field (``vtkMRMLXNode`` or ``Union[..., None]``), else None."""
    candidates = typing.get_args(annotation) or (annotation,)
    classes = [c for c in candidates if isinstance(c, type) and c.__name__.startswith("vtkMRML")]
    return classes or None


def parameter_node_wrapper(cls):
    """Stand-in for Slicer's @parameterNodeWrapper: each field is a property stored in the real
    vtkMRMLScriptedModuleNode (nodes as references, enums by member name, the rest as text)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {}
    for name, hint in hints.items():
        base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
        fields[name] = (base, getattr(cls, name, None))

    def make_property(name, base):
        classes = _node_classes(base)

        def getter(self):
            if classes:
                return self.parameterNode.GetNodeReference(name)
            text = self.parameterNode.GetParameter(name)
            if isinstance(base, type) and issubclass(base, enum.Enum):
                return base[text]
            if base is bool:
                return text == "true"
            return base(text)

        def setter(self, value):
            if classes:
                if value is not None and not any(value.IsA(c.__name__) for c in classes):
                    raise TypeError(f"{name}: {value.GetClassName()} is not a {[c.__name__ for c in classes]}")
                self.parameterNode.SetNodeReferenceID(name, value.GetID() if value is not None else None)
            elif isinstance(value, enum.Enum):
                self.parameterNode.SetParameter(name, value.name)
            elif isinstance(value, bool):
                self.parameterNode.SetParameter(name, "true" if value else "false")
            else:
                self.parameterNode.SetParameter(name, str(value))
        return property(getter, setter)

    def __init__(self, parameterNode):
        self.parameterNode = parameterNode
        for name, (base, default) in fields.items():
            if not _node_classes(base) and not parameterNode.GetParameter(name):
                if default is None:
                    default = base.__members__[next(iter(base.__members__))] if isinstance(base, type) and \
                        issubclass(base, enum.Enum) else base()
                setattr(self, name, default)

    namespace = {name: make_property(name, base) for name, (base, _default) in fields.items()}
    namespace.update(
        __init__=__init__, allParameters=dict(fields),
        connectGui=lambda self, gui: object(), disconnectGui=lambda self, tag: None,
        StartModify=lambda self: self.parameterNode.StartModify(),
        EndModify=lambda self, wasModifying: self.parameterNode.EndModify(wasModifying),
        AddObserver=lambda self, event, callback, priority=0.0: self.parameterNode.AddObserver(event, callback, priority),
        RemoveObserver=lambda self, tag: self.parameterNode.RemoveObserver(tag),
        Modified=lambda self: self.parameterNode.Modified())
    return type(cls.__name__, (), namespace)


def make_parameter_node_wrapper_module():
    module = types.ModuleType("slicer.parameterNodeWrapper")
    module.parameterNodeWrapper = parameter_node_wrapper
    module.Choice = lambda choices: ("Choice", tuple(choices))
    module.WithinRange = lambda lo, hi: ("WithinRange", lo, hi)
    return module


# ----------------------------------------------------------------------------- scripted module bases
def make_scripted_loadable_module():
    module = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent or types.SimpleNamespace(isEntered=True)
            self.moduleName = "DeepRegistration"

        def setup(self):
            self.layout = types.SimpleNamespace(addWidget=lambda widget: None)

        def resourcePath(self, filename):
            return os.path.join(MODULE_DIR, "Resources", filename)

    class ScriptedLoadableModuleLogic:
        """getParameterNode as Slicer's: one singleton vtkMRMLScriptedModuleNode per module."""
        moduleName = "DeepRegistration"

        def __init__(self, parent=None):
            pass

        def getParameterNode(self):
            scene = slicer.mrmlScene
            node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is not None:
                return node
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(self.moduleName)
            node.SetModuleName(self.moduleName)
            node.SetName(scene.GenerateUniqueName(self.moduleName))
            return scene.AddNode(node)

    class ScriptedLoadableModuleTest(unittest.TestCase):
        messages = []

        def delayDisplay(self, message, msec=1000):
            ScriptedLoadableModuleTest.messages.append(message)

    module.ScriptedLoadableModule = ScriptedLoadableModule
    module.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    module.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    module.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    module.__all__ = ["ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                      "ScriptedLoadableModuleTest"]
    return module


class FakeApp:
    def __init__(self, temporary_path):
        self.temporaryPath = str(temporary_path)
        self.connections = []
        self.testing = True

    def processEvents(self):
        process_events()

    def testingEnabled(self):
        return self.testing

    def connect(self, signal, slot):
        self.connections.append((signal, slot))

    def layoutManager(self):
        return None

    def setOverrideCursor(self, cursor):
        pass

    def restoreOverrideCursor(self):
        pass

    applicationName = "Slicer"


# ----------------------------------------------------------------------------- the environment
def make_scene():
    """A real scene with Slicer's default colour tables, the segmentation representations and
    three slice views."""
    scene = slicer.vtkMRMLScene()
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLScene(scene)
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations.SetMRMLScene(scene)
    transforms = slicer.vtkSlicerTransformLogic()
    transforms.SetMRMLScene(scene)
    for name in SLICE_VIEWS:
        sliceNode = slicer.vtkMRMLSliceNode()
        sliceNode.SetName(name)
        sliceNode.SetLayoutName(name)
        sliceNode.SetSingletonTag(name)
        scene.AddNode(sliceNode)
        composite = slicer.vtkMRMLSliceCompositeNode()
        composite.SetName(f"{name} composite")
        composite.SetLayoutName(name)
        composite.SetSingletonTag(name)
        scene.AddNode(composite)
    logics = {"colors": colors, "segmentations": segmentations, "transforms": transforms}
    return scene, logics


@pytest.fixture
def environment(tmp_path, monkeypatch):
    """The real slicer package with a fresh scene, fake app/qt/module bases, and the module
    imported on top; yields a namespace (module, scene, logics, temp)."""
    from DeepRegistrationLib import slicer_bridge as bridge

    temp = tmp_path / "slicer-temp"
    temp.mkdir()
    scene, logics = make_scene()
    app = FakeApp(temp)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(
        **{name: types.SimpleNamespace(logic=(lambda value=logic: value)) for name, logic in logics.items()}),
        raising=False)
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    for name, module in (("qt", make_qt()), ("slicer.i18n", i18n),
                         ("slicer.ScriptedLoadableModule", make_scripted_loadable_module()),
                         ("slicer.parameterNodeWrapper", make_parameter_node_wrapper_module())):
        monkeypatch.setitem(sys.modules, name, module)

    def no_install(*args, **kwargs):
        raise AssertionError("nothing may be installed in these tests")
    monkeypatch.setattr(slicer.util, "pip_install", no_install)
    monkeypatch.setattr(slicer.util, "startupEnvironment", lambda: dict(os.environ))
    monkeypatch.syspath_prepend(MODULE_DIR)
    monkeypatch.delitem(sys.modules, "DeepRegistration", raising=False)
    # the subprocess runs this interpreter (PythonSlicer is not on PATH here)
    monkeypatch.setattr(bridge, "python_executable", lambda which=None: sys.executable)
    FakeTimer.active.clear()
    FakeMessageBox.asked.clear()
    FakeMessageBox.answer = FakeMessageBox.Yes
    module = importlib.import_module("DeepRegistration")
    env = types.SimpleNamespace(module=module, scene=scene, logics=logics, temp=temp, app=app, bridge=bridge,
                                widgets=[])
    yield env
    for widget in env.widgets:  # as Slicer does when it exits: the widget stops observing
        widget.cleanup()
    FakeTimer.active.clear()
    sys.modules.pop("DeepRegistration", None)
    scene.Clear(1)


def make_widget(env, monkeypatch):
    """The module's widget on fake widgets (setup() as in Slicer, with loadUI faked)."""
    ui = fake_ui()
    root = getattr(ui, "DeepRegistration")
    monkeypatch.setattr(slicer.util, "loadUI", lambda path: root)
    monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda widget: ui)
    widget = env.module.DeepRegistrationWidget()
    monkeypatch.setattr(widget, "refreshMethods", lambda: None)  # the method list is tested on its own
    widget.setup()
    env.widgets.append(widget)
    return widget
