"""Static checks of the Slicer extension: .ui files against the code, slicer.util calls against slicer-core,
CMake lists against the source tree, Python 3.12 grammar, requirements, and the engine command lines."""

from __future__ import annotations

import ast
import fnmatch
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest_slicer import CLASSIFIER_DIR, REPO, TRAINER_DIR  # puts the module folders on sys.path

MODULES = {"IPMNClassifier": CLASSIFIER_DIR, "IPMNTrainer": TRAINER_DIR}
HEAVY = ("torch", "timm", "monai", "sklearn", "matplotlib")


def _module_python_files(folder: Path):
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def _ui(name: str) -> ET.Element:
    return ET.parse(MODULES[name] / "Resources" / "UI" / f"{name}.ui").getroot()


def _ui_widgets(name: str) -> dict:
    return {w.get("name"): w.get("class") for w in _ui(name).iter("widget")}


def _ui_parameters(name: str) -> dict:
    """{SlicerParameterName: widget class}"""
    out = {}
    for widget in _ui(name).iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                out[prop.find("string").text] = widget.get("class")
    return out


def _gui_sources(name: str) -> list:
    """The files that use ``self.ui``: the module file."""
    return [MODULES[name] / f"{name}.py"]


# ----------------------------------------------------------------------------------------------- .ui
@pytest.mark.parametrize("name", MODULES)
def test_every_widget_used_in_code_exists_in_the_ui(name):
    widgets = _ui_widgets(name)
    used = set()
    for path in _gui_sources(name):
        used |= set(re.findall(r"self\.ui\.(\w+)", path.read_text(encoding="utf-8")))
    assert used, "the widget uses no .ui widget?"
    missing = sorted(used - set(widgets))
    assert not missing, f"{name}.py uses widgets that are not in {name}.ui: {missing}"


def _parameter_fields(name: str) -> dict:
    """{field: annotation source} of the @parameterNodeWrapper class in the module file."""
    tree = ast.parse((MODULES[name] / f"{name}.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
            getattr(d, "id", None) == "parameterNodeWrapper" for d in node.decorator_list
        ):
            return {
                stmt.target.id: ast.unparse(stmt.annotation)
                for stmt in node.body
                if isinstance(stmt, ast.AnnAssign)
            }
    raise AssertionError(f"no @parameterNodeWrapper class in {name}.py")


def _enums(name: str) -> set:
    tree = ast.parse((MODULES[name] / f"{name}.py").read_text(encoding="utf-8"))
    return {
        n.name
        for n in tree.body
        if isinstance(n, ast.ClassDef)
        and any(getattr(b, "attr", getattr(b, "id", None)) == "Enum" for b in n.bases)
    }


# Which annotations each widget class can be bound to (Slicer's parameterNodeWrapper GUI connectors).
def _compatible(widget: str, annotation: str, enums: set) -> bool:
    base = annotation.split("[", 1)[1].split(",", 1)[0] if annotation.startswith("Annotated[") else annotation
    if widget in ("QCheckBox", "ctkCheckBox"):
        return base == "bool"
    if widget in ("QSpinBox", "QSlider"):
        return base == "int"
    if widget in ("QDoubleSpinBox", "ctkSliderWidget", "ctkDoubleSpinBox"):
        return base in ("float", "int")
    if widget in ("QComboBox", "ctkComboBox"):
        return base in enums or ("Choice(" in annotation and base in ("int", "float", "str", "bool"))
    if widget == "QLineEdit":
        return base == "str"
    if widget in ("ctkPathLineEdit", "ctkDirectoryButton"):
        return base in ("Path", "pathlib.Path")
    if widget in ("qMRMLNodeComboBox", "qMRMLSubjectHierarchyComboBox"):
        return base.startswith("vtkMRML")
    return False


@pytest.mark.parametrize("name", MODULES)
def test_parameter_names_in_the_ui_are_typed_fields(name):
    fields = _parameter_fields(name)
    enums = _enums(name)
    bound = _ui_parameters(name)
    assert bound
    for parameter, widget in bound.items():
        assert parameter in fields, f"{name}.ui binds {parameter!r}, which is not a parameter node field"
        assert _compatible(widget, fields[parameter], enums), (
            f"{name}.ui: a {widget} cannot be bound to {parameter}: {fields[parameter]}"
        )


@pytest.mark.parametrize("name", MODULES)
def test_mrml_widgets_get_the_scene(name):
    root = _ui(name)
    receivers = {
        c.find("receiver").text
        for c in root.iter("connection")
        if c.find("slot").text == "setMRMLScene(vtkMRMLScene*)"
    }
    needing = {
        n
        for n, cls in _ui_widgets(name).items()
        if cls in ("qMRMLNodeComboBox", "qMRMLSegmentSelectorWidget", "qMRMLSubjectHierarchyComboBox")
    }
    assert needing <= receivers
    declared = {c.find("class").text for c in root.iter("customwidget")}
    used = set(_ui_widgets(name).values())
    assert {c for c in used if c.startswith(("ctk", "qMRML"))} <= declared


# ----------------------------------------------------------------------------------------------- slicer.util
def _slicer_util_names() -> set:
    import slicer.util

    tree = ast.parse(Path(slicer.util.__file__).read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def _all_module_files() -> list:
    return [p for folder in MODULES.values() for p in _module_python_files(folder) if "ipmn" not in p.parts]


def test_slicer_util_functions_exist_in_slicer_core():
    available = _slicer_util_names()
    used = {}
    for path in _all_module_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Attribute)
                and node.value.attr == "util"
                and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "slicer"
            ):
                used.setdefault(node.attr, path.name)
            if isinstance(node, ast.ImportFrom) and node.module == "slicer.util":
                for alias in node.names:
                    used.setdefault(alias.name, path.name)
    assert {"loadUI", "childWidgetVariables", "tryWithErrorDisplay", "setSliceViewerLayers"} <= set(used)
    missing = {name: where for name, where in used.items() if name not in available}
    assert not missing, f"slicer.util has no: {missing}"


# ----------------------------------------------------------------------------------------------- CMake
def _cmake_list(text: str, variable: str) -> list:
    match = re.search(r"set\(\s*" + variable + r"\s+(.*?)\)", text, re.S)
    assert match, f"no set({variable} ...)"
    return [t for t in match.group(1).split() if not t.startswith("#")]


def _cmake_globs(text: str, variable: str) -> list:
    match = re.search(r"file\(\s*GLOB_RECURSE\s+" + variable + r"\s+(.*?)\)", text, re.S)
    assert match, f"no file(GLOB_RECURSE {variable} ...)"
    return [
        t.replace("${CMAKE_CURRENT_SOURCE_DIR}/", "")
        for t in match.group(1).split()
        if t.startswith("${CMAKE_CURRENT_SOURCE_DIR}/")
    ]


def _expand(entries: list, name: str) -> list:
    return [e.replace("${MODULE_NAME}", name) for e in entries if not e.startswith("${IPMN_")]


@pytest.mark.parametrize("name", MODULES)
def test_every_module_file_is_listed_in_cmake(name):
    folder = MODULES[name]
    text = (folder / "CMakeLists.txt").read_text(encoding="utf-8")
    scripts = _expand(_cmake_list(text, "MODULE_PYTHON_SCRIPTS"), name)
    resources = _expand(_cmake_list(text, "MODULE_PYTHON_RESOURCES"), name)
    patterns = []
    if name == "IPMNClassifier":
        # Rule for the engine package: every *.py is a script, every *.yaml / *.json / *.j2 a resource (globs).
        patterns = _cmake_globs(text, "IPMN_ENGINE_SCRIPTS") + _cmake_globs(text, "IPMN_ENGINE_RESOURCES")
        assert patterns == ["ipmn/*.py", "ipmn/*.yaml", "ipmn/*.json", "ipmn/*.j2"]
        assert "${IPMN_ENGINE_SCRIPTS}" in text.split("set(MODULE_PYTHON_SCRIPTS", 1)[1].split(")", 1)[0]
        assert "${IPMN_ENGINE_RESOURCES}" in text.split("set(MODULE_PYTHON_RESOURCES", 1)[1].split(")", 1)[0]
    listed = set(scripts) | set(resources)
    for entry in listed:
        assert (folder / entry).is_file(), f"{name}/CMakeLists.txt lists a missing file: {entry}"
    unlisted = []
    for path in folder.rglob("*"):
        if path.is_dir() or "__pycache__" in path.parts or path.suffix == ".pyc":
            continue
        if any(part.endswith(".egg-info") for part in path.parts):  # written by `pip install -e .`, git-ignored
            continue
        rel = path.relative_to(folder).as_posix()
        if rel == "CMakeLists.txt" or rel.startswith("Testing/"):
            continue
        if rel in listed:
            continue
        # GLOB_RECURSE 'ipmn/*.py' matches at any depth below ipmn/
        if any(
            rel.startswith(p.split("*")[0]) and fnmatch.fnmatch(rel, p.split("/")[0] + "/*" + p.split("*")[1])
            for p in patterns
        ):
            continue
        unlisted.append(rel)
    assert not unlisted, f"files in {name}/ that CMake does not ship: {sorted(unlisted)}"
    assert "slicerMacroBuildScriptedModule(" in text and "WITH_GENERIC_TESTS" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_shared_data_folders_are_shipped_whole():
    text = (CLASSIFIER_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"set\(IPMN_SHARED_DATA_FOLDERS\s+DemoModel\s+SampleData\)", text)
    assert "${IPMN_REPOSITORY_RESOURCES}/${folder}/*" in text  # every file of each folder
    from IPMNClassifierLib.logic import SAMPLE_FILES

    sample = REPO / "Resources" / "SampleData"
    if sample.is_dir():
        present = {p.name for p in sample.iterdir()}
        assert {name for name, _, _ in SAMPLE_FILES} <= present


def test_extension_cmake_metadata():
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    for key in (
        "EXTENSION_HOMEPAGE",
        "EXTENSION_CATEGORY",
        "EXTENSION_CONTRIBUTORS",
        "EXTENSION_DESCRIPTION",
        "EXTENSION_ICONURL",
        "EXTENSION_SCREENSHOTURLS",
    ):
        assert re.search(rf'set\({key} "[^"]+"\)', text), key
    assert 'set(EXTENSION_HOMEPAGE "${IPMN_REPOSITORY_URL}")' in text  # a marked placeholder until published
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in text
    assert "find_package(Slicer REQUIRED)" in text and "include(${Slicer_USE_FILE})" in text
    assert "add_subdirectory(IPMNClassifier)" in text and "add_subdirectory(IPMNTrainer)" in text
    assert (
        "include(${Slicer_EXTENSION_GENERATE_CONFIG})" in text
        and "include(${Slicer_EXTENSION_CPACK})" in text
    )


# ----------------------------------------------------------------------------------------------- Python
def test_module_files_parse_as_python_312_and_avoid_removed_apis():
    files = [p for folder in MODULES.values() for p in _module_python_files(folder)]
    assert files
    for path in files:
        source = path.read_text(encoding="utf-8")
        ast.parse(source, filename=str(path), feature_version=(3, 12))
        assert not re.search(r"^\s*import imp\b", source, re.M), f"{path}: 'imp' is gone in Python 3.12"
        assert not re.search(r"[\"'](/home/|/Users/|C:\\\\Users)", source), (
            f"{path}: hard-coded personal path"
        )


def test_gui_process_never_imports_heavy_packages():
    """The Slicer modules and their Lib folders import no torch/timm/monai/...: those run in the engine process."""
    for path in _all_module_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                assert n.split(".")[0] not in HEAVY, f"{path.name} imports {n} in the GUI process"
                if n.startswith("ipmn."):
                    assert n in GUI_ENGINE_MODULES, f"{path.name} imports {n}"


GUI_ENGINE_MODULES = ("ipmn.errors", "ipmn.registry", "ipmn.cohort", "ipmn.vocab", "ipmn.dicom_compat",
                      "ipmn.segments")


def test_engine_modules_the_gui_imports_stay_light():
    """What the GUI may import from the engine imports no numpy, torch, SimpleITK ... (checked in a fresh process)."""
    import subprocess
    import sys

    code = ("import sys; import " + ", ".join(GUI_ENGINE_MODULES) + "; "
            "print(sorted(m for m in ('numpy', 'torch', 'SimpleITK', 'timm', 'monai', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=CLASSIFIER_DIR).stdout.strip()
    assert out == "[]", out


def test_requirements_file():
    from IPMNClassifierLib import dependencies

    path = CLASSIFIER_DIR / "Resources" / "requirements.txt"
    assert dependencies.checkRequirementsFile(path) == []
    names = {
        re.split(r"[<>=!~ ]", line, maxsplit=1)[0].lower() for line in dependencies.readRequirements(path)
    }
    assert names == {"timm", "monai", "safetensors", "scikit-learn", "matplotlib", "tqdm", "pyyaml", "psutil",
                     "pillow", "scipy", "highdicom", "slicerio", "jinja2", "openpyxl"}
    assert all(">=" in line for line in dependencies.readRequirements(path))


def test_dependency_checks_do_not_import(monkeypatch):
    import sys

    from IPMNClassifierLib import dependencies

    assert dependencies.requirementSatisfied("pytest>=1") is True
    assert dependencies.requirementSatisfied("pytest>=999") is False
    assert dependencies.requirementSatisfied("surely-not-installed-ipmn-pkg>=1") is False
    assert dependencies.missingRequirements(["PyYAML>=6.0", "scikit-learn>=1.3"]) == []
    before = set(sys.modules)
    dependencies.torchMissing()
    assert "torch" not in set(sys.modules) - before
    constraints = dependencies.writeProtectionConstraints(extra=("pytest",))
    pins = constraints.read_text().split()
    assert any(p.startswith("numpy==") for p in pins) and any(p.startswith("SimpleITK==") for p in pins)
    assert any(p.startswith("pydicom==") for p in pins)  # Slicer's DICOM module relies on its own pydicom


@pytest.mark.parametrize("name", MODULES)
def test_icons_are_128px_png(name):
    data = (MODULES[name] / "Resources" / "Icons" / f"{name}.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (128, 128)


# ----------------------------------------------------------------------------------------------- engine contract
def _subparsers():
    cli = pytest.importorskip("ipmn.cli")
    parser = cli.build_parser()
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            return parser, action.choices
    raise AssertionError("ipmn has no subcommands")


def test_logic_command_lines_match_the_engine_parser(tmp_path):
    from IPMNClassifierLib.logic import PredictOptions, PredictTask
    from IPMNTrainerLib.logic import TrainerLogic, TrainingOptions

    parser, commands = _subparsers()
    task = PredictTask(
        key="k",
        workDir=tmp_path,
        t1Path=tmp_path / "t1.nrrd",
        t2Path=tmp_path / "t2.nrrd",
        roiPath=tmp_path / "roi.mrk.json",
        outDir=tmp_path / "out",
        model=tmp_path / "m",
        options=PredictOptions(device="cpu", windows="all", tta=True, ensemble=["a", "b"], precision="fp32"),
        t1NodeID="1",
        t2NodeID="2",
        roiNodeID="3",
    )
    args = parser.parse_args(task.predictArgs())
    assert (args.t1, args.model, args.device, args.windows, args.tta, args.ensemble, args.progress,
            args.precision) == (
        str(tmp_path / "t1.nrrd"),
        str(tmp_path / "m"),
        "cpu",
        "all",
        True,
        ["a", "b"],
        "jsonl",
        "fp32",
    )
    assert "worker" in commands
    assert set(task.workerRequest()) == {
        "t1",
        "t2",
        "roi",
        "model",
        "out",
        "device",
        "windows",
        "tta",
        "ensemble",
        "precision",
    }
    if "cv" not in commands:  # the training commands may not be wired into ``ipmn`` yet: use their module
        import argparse

        cli_train = pytest.importorskip("ipmn.cli_train")
        parser = argparse.ArgumentParser(prog="ipmn")
        cli_train.register(parser.add_subparsers(dest="command", required=True))
    for kind, models in (("cv", ["vit_tiny", "resnet18"]), ("train", ["vit_tiny"])):
        options = TrainingOptions(
            cohort=tmp_path / "c.csv",
            output=tmp_path / "run",
            kind=kind,
            models=models,
            device="cpu",
            resume=True,
            epochs=7,
            lr=3e-5,
            batchSize=4,
            modalities="t1",
        )
        parsed = parser.parse_args(TrainerLogic.buildArgs(options, tmp_path / "c.yaml"))
        assert (parsed.progress, parsed.resume, parsed.device) == ("jsonl", True, "cpu")
        assert (parsed.epochs, parsed.lr, parsed.batch_size) == (7, 3e-5, 4)
        if kind == "cv":
            assert (parsed.models, parsed.modalities, parsed.fusion, parsed.outer) == (
                models,
                ["t1"],
                ["early"],
                None,  # folds not set: the preset's value (cv.outer) is used, not a default of the panel
            )
        else:
            assert (parsed.arch, parsed.modalities, parsed.fusion) == ("vit_tiny", "t1", "early")
