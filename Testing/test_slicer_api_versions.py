"""The module code against Slicer's APIs on the minimum supported version (5.10) and the newest (main).

The facts (Testing/slicer_api_facts.json) are read from Slicer's and SlicerPyTorch's own sources by
Resources/scripts/slicer_api_facts.py; slicer-core only has a current slicer.util and no SampleData,
slicer.app, slicer.packaging or PyTorchUtils, so those are checked here, statically.
"""

from __future__ import annotations

import ast
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest_slicer import CLASSIFIER_DIR, TRAINER_DIR

FACTS = json.loads((Path(__file__).parent / "slicer_api_facts.json").read_text(encoding="utf-8"))
MINIMUM, NEWEST = "5.10", "main"
QOBJECT = {"connect", "disconnect"}  # PythonQt QObject methods, on every version


def _module_files() -> list:
    files = [CLASSIFIER_DIR / "IPMNClassifier.py", TRAINER_DIR / "IPMNTrainer.py"]
    files += sorted((CLASSIFIER_DIR / "IPMNClassifierLib").glob("*.py"))
    files += sorted((TRAINER_DIR / "IPMNTrainerLib").glob("*.py"))
    return files


def _attribute_uses(chain: tuple) -> dict:
    """{name: file} for every ``<chain>.name`` in the module files (chain like ("slicer", "app"))."""
    used = {}
    for path in _module_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Attribute):
                continue
            value, parts = node.value, []
            while isinstance(value, ast.Attribute):
                parts.insert(0, value.attr)
                value = value.value
            if isinstance(value, ast.Name):
                parts.insert(0, value.id)
                if tuple(parts) == chain:
                    used.setdefault(node.attr, path.name)
    return used


def _guarded_by_hasattr(tree, name: str) -> bool:
    """Every call of ``.name(`` sits inside ``if hasattr(..., "name")``."""
    guarded, calls = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and 'hasattr' in ast.unparse(node.test) and repr(name) in ast.unparse(node.test):
            guarded |= {id(n) for n in ast.walk(node)}
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name:
            calls.add(id(node))
    return bool(calls) and calls <= guarded


@pytest.mark.parametrize("version", [MINIMUM, NEWEST])
def test_slicer_util_calls_exist(version):
    used = _attribute_uses(("slicer", "util"))
    assert {"loadUI", "setSliceViewerLayers"} <= set(used)
    missing = {n: f for n, f in used.items() if n not in FACTS["slicer"][version]["util"]}
    assert not missing, f"slicer.util of Slicer {version} has no {missing}"


@pytest.mark.parametrize("version", [MINIMUM, NEWEST])
def test_slicer_app_names_exist(version):
    used = _attribute_uses(("slicer", "app"))
    assert {"majorVersion", "layoutManager", "testingEnabled"} <= set(used)
    missing = {n: f for n, f in used.items() if n not in FACTS["slicer"][version]["app"] and n not in QOBJECT}
    assert not missing, f"slicer.app of Slicer {version} has no {missing}"


def test_sample_data_api_on_5_10_and_newer():
    source = (CLASSIFIER_DIR / "IPMNClassifierLib" / "sampledata.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    calls = {n.func.attr: n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    for version in (MINIMUM, "5.12", NEWEST):
        facts = FACTS["slicer"][version]
        assert "downloadSamples" in facts["sampledata_module"] and "downloadSamples" in calls
        assert "downloadSample" not in calls  # returns one node: downloadSamples(name)[0]
        register = calls["registerCustomSampleDataSource"]
        assert {k.arg for k in register.keywords} <= set(facts["register_source_params"]), version
    assert "registerCustomSampleDataCategory" not in FACTS["slicer"][MINIMUM]["sampledata_logic"]
    assert "registerCustomSampleDataCategory" in FACTS["slicer"][NEWEST]["sampledata_logic"]
    assert _guarded_by_hasattr(tree, "registerCustomSampleDataCategory")


def test_slicer_packaging_is_optional_and_called_as_on_5_12():
    """slicer.packaging does not exist in 5.10: it must be imported in a try block and checked with hasattr."""
    assert FACTS["slicer"][MINIMUM]["packaging"] is None and "pip_ensure" in FACTS["slicer"][NEWEST]["packaging"]
    path = CLASSIFIER_DIR / "IPMNClassifierLib" / "dependencies.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.Import) and any(a.name == "slicer.packaging" for a in n.names)]
    tries = [n for n in ast.walk(tree) if isinstance(n, ast.Try)]
    assert imports and all(any(i in list(ast.walk(t)) for t in tries) for i in imports)
    assert _guarded_by_hasattr(tree, "pip_ensure")
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "pip_ensure")
    for version in ("5.12", NEWEST):
        assert {k.arg for k in call.keywords} <= set(FACTS["slicer"][version]["pip_ensure_params"])


def test_pytorchutils_install_would_import_torch_so_it_is_not_used():
    facts = FACTS["pytorchutils"]
    assert facts["installTorch_imports_torch"]  # the reason for installing out of process
    for path in _module_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "installTorch":
                assert ast.unparse(node.func.value) == "dependencies" or path.name == "dependencies.py", path.name


@pytest.mark.parametrize("version", [MINIMUM, NEWEST])
@pytest.mark.parametrize("module", ["IPMNClassifier", "IPMNTrainer"])
def test_bound_widgets_have_a_gui_connector(module, version):
    """Every widget with a SlicerParameterName can be bound by parameterNodeWrapper on that version
    (Qt's own QCheckBox/QSpinBox/QComboBox... connectors are in every version; checked: the ctk/qMRML ones)."""
    folder = CLASSIFIER_DIR if module == "IPMNClassifier" else TRAINER_DIR
    root = ET.parse(folder / "Resources" / "UI" / f"{module}.ui").getroot()
    known = set(FACTS["slicer"][version]["gui_connector_widgets"])
    for widget in root.iter("widget"):
        cls = widget.get("class")
        bound = any(p.get("name") == "SlicerParameterName" for p in widget.findall("property"))
        if bound and cls.startswith(("ctk", "qMRML")) and cls not in ("ctkSliderWidget", "ctkDoubleSpinBox",
                                                                        "ctkCheckBox", "ctkComboBox"):
            assert cls in known, f"{module}.ui binds a {cls}: no connector in Slicer {version}"


def test_the_static_checks_connector_list_matches_slicer():
    """test_slicer_static._compatible lists qMRMLSubjectHierarchyComboBox: Slicer has that connector (in
    SubjectHierarchyLib, registered by the SubjectHierarchy module) on 5.10 and main."""
    for version in (MINIMUM, NEWEST):
        connectors = set(FACTS["slicer"][version]["gui_connector_widgets"])
        assert {"qMRMLSubjectHierarchyComboBox", "qMRMLNodeComboBox", "ctkPathLineEdit"} <= connectors
