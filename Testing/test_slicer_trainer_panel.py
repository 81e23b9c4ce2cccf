"""The trainer panel: presets shown and only changed values sent, pretrained weights offline, path fields,
Start's reasons, and results arriving after the scene was closed (issue 12, item 3 and 8)."""

from __future__ import annotations

import ast
import xml.etree.ElementTree as ET

import pytest
from conftest_slicer import TRAINER_DIR  # puts the module folders on sys.path

yaml = pytest.importorskip("yaml")

from ipmn.errors import IPMNError  # noqa: E402
from IPMNTrainerLib import presets  # noqa: E402
from IPMNTrainerLib.logic import TrainerLogic, TrainingOptions  # noqa: E402

UI = TRAINER_DIR / "Resources" / "UI" / "IPMNTrainer.ui"
MODULE = TRAINER_DIR / "IPMNTrainer.py"


def test_paper_preset_values_are_shown():
    values = presets.panelValues(presets.loadConfig("paper"))
    assert values == {"epochs": 3000, "lr": 0.003, "batchSize": 8, "k": 9, "modalities": "t1t2", "fusion": "early",
                      "outer": 10, "inner": 3, "pretrained": "hub"}
    assert presets.panelValues(presets.loadConfig("demo"))["pretrained"] == "none"


def test_only_changed_values_are_sent_so_the_paper_keeps_its_learning_rate(tmp_path):
    paper = presets.panelValues(presets.loadConfig("paper"))
    shown = {k: v for k, v in paper.items() if k != "pretrained"}
    current = dict(shown, epochs=100)  # the user shortened the run, nothing else
    base = TrainingOptions(cohort=tmp_path / "c.csv", output=tmp_path / "run", config=presets.presetPath("paper"))
    options = presets.optionsFromPanel(base, shown, current)
    args = TrainerLogic.buildArgs(options, tmp_path / "c.yaml")
    assert args[args.index("--epochs") + 1] == "100"
    for flag in ("--lr", "--batch-size", "--outer", "--inner", "--modalities", "--fusion"):
        assert flag not in args, flag
    path, notes = TrainerLogic().writeRunConfig(options, tmp_path)
    written = yaml.safe_load(path.read_text())
    assert written["train"]["lr"] == 0.003 and written["train"]["batch_size"] == 8
    assert written["train"]["epochs"] == 100 and written["cv"]["outer"] == 10 and notes == []


def test_options_left_unset_come_from_the_preset(tmp_path):
    """TrainingOptions' own defaults no longer override a preset (they differed from every preset)."""
    options = TrainingOptions(cohort=tmp_path / "c.csv", output=tmp_path / "run", config=presets.presetPath("paper"))
    args = TrainerLogic.buildArgs(options, tmp_path / "c.yaml")
    assert "--lr" not in args and "--epochs" not in args and "--batch-size" not in args
    path, _notes = TrainerLogic().writeRunConfig(options, tmp_path)
    assert yaml.safe_load(path.read_text())["train"]["lr"] == 0.003
    filled = presets.effectiveOptions(options, path)
    assert (filled.outer, filled.inner, filled.epochs) == (10, 3, 3000) and filled.totalFolds == 10


def test_the_engine_accepts_commands_without_overrides(tmp_path):
    cli = pytest.importorskip("ipmn.cli")
    parser = cli.build_parser()
    for kind in ("cv", "train"):
        options = TrainingOptions(cohort=tmp_path / "c.csv", output=tmp_path / "run", kind=kind, models=["vit_tiny"],
                                  modalities=None, fusion=None, k=None)
        parsed = parser.parse_args(TrainerLogic.buildArgs(options, tmp_path / "c.yaml"))
        assert parsed.epochs is None and parsed.lr is None and parsed.batch_size is None


def _spin_ranges() -> dict:
    ranges = {}
    for widget in ET.parse(UI).getroot().iter("widget"):
        props = {p.get("name"): p for p in widget.findall("property")}
        if "SlicerParameterName" in props and "maximum" in props:
            value = lambda p: float((p.find("number") if p.find("number") is not None else p.find("double")).text)  # noqa: E731
            ranges[props["SlicerParameterName"].find("string").text] = (value(props["minimum"]), value(props["maximum"]))
    return ranges


@pytest.mark.parametrize("name", presets.PRESETS)
def test_every_preset_fits_the_panel_without_clamping(name):
    """A clamped value would read as a user change and be sent."""
    fields = {"epochs": "epochs", "lr": "learningRate", "batchSize": "batchSize", "outer": "outerFolds",
              "inner": "innerFolds"}
    ranges = _spin_ranges()
    values = presets.panelValues(presets.loadConfig(name))
    for key, field in fields.items():
        low, high = ranges[field]
        assert low <= values[key] <= high, (name, key, values[key], (low, high))
    assert values["k"] in (4, 9, 16, 25)


def test_pretrained_weights_from_a_local_file_or_none(tmp_path):
    weights = tmp_path / "ViT-B_16.npz"
    weights.write_bytes(b"x")
    options = TrainingOptions(cohort=tmp_path, output=tmp_path / "run", config=presets.presetPath("paper"),
                              pretrained=str(weights))
    path, _ = TrainerLogic().writeRunConfig(options, tmp_path)
    assert yaml.safe_load(path.read_text())["model"]["pretrained"] == str(weights)
    options.pretrained = "none"
    path, _ = TrainerLogic().writeRunConfig(options, tmp_path)
    assert yaml.safe_load(path.read_text())["model"]["pretrained"] is None
    options.pretrained = None  # the preset's choice
    path, _ = TrainerLogic().writeRunConfig(options, tmp_path)
    assert yaml.safe_load(path.read_text())["model"]["pretrained"] == "hub"
    assert presets.pretrainedProblems(str(weights)) == []
    assert "not found" in presets.pretrainedProblems(str(tmp_path / "missing.safetensors"))[0]
    assert ".safetensors" in presets.pretrainedProblems(str(tmp_path / "weights.zip"))[0]
    problems = TrainerLogic().checkOptions(TrainingOptions(cohort=tmp_path, output=tmp_path / "r",
                                                           pretrained=str(tmp_path / "gone.pth")))
    assert any("not found" in p for p in problems)


def test_unreachable_hub_says_what_to_do_offline(monkeypatch):
    """The engine's own message (timm made to fail as without network) gets the offline advice."""
    pytest.importorskip("timm")
    import timm

    from ipmn.models import vit

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load this file")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(IPMNError) as info:
        vit.create_timm_model("vit_small_patch16_224", "hub")
    explained = presets.explainFailure(str(info.value))
    assert explained.startswith(str(info.value)) and "machine with internet" in explained
    assert "local file" in explained
    assert presets.explainFailure("the ROI is outside the T1 volume") == "the ROI is outside the T1 volume"


def test_start_says_why_it_is_disabled():
    assert presets.startBlockers("", "", "practical", "") == [
        "choose a cohort (a manifest CSV, or a Cyst-X folder with 'Folder...')", "choose an output folder"]
    assert presets.startBlockers("/c", "/o", "file", "") == ["choose the YAML config file (or another preset)"]
    assert presets.startBlockers("/c", "/o", "paper", "", presets.pretrainedValue("file", "")) == [
        "choose the pretrained weights file"]
    assert presets.startBlockers("/c", "/o", "paper", "", presets.pretrainedValue("hub")) == []


# ----------------------------------------------------------------------------------------------- static (widget)
def _ui_widgets():
    return {w.get("name"): (w.get("class"), {p.get("name"): p for p in w.findall("property")})
            for w in ET.parse(UI).getroot().iter("widget")}


def _field_annotations() -> dict:
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "IPMNTrainerParameterNode")
    return {s.target.id: ast.unparse(s.annotation) for s in cls.body if isinstance(s, ast.AnnAssign)}


def test_path_fields_are_not_bound_to_path_parameters():
    """An unset Path parameter reads back as '.', which ctkPathLineEdit / ctkDirectoryButton then show."""
    fields = _field_annotations()
    for name, (cls, props) in _ui_widgets().items():
        if cls in ("ctkPathLineEdit", "ctkDirectoryButton"):
            assert "SlicerParameterName" not in props, f"{name} is bound to a Path parameter"
    assert not [f for f, a in fields.items() if a in ("Path", "pathlib.Path")]
    for field in ("cohortPath", "configPath", "outputDir", "pretrainedFile"):
        assert fields[field] == "str"


def test_a_cohort_folder_can_be_chosen():
    widgets = _ui_widgets()
    cls, props = widgets["cohortPathLineEdit"]
    assert "Files" in props["filters"].find("set").text  # its Browse button opens a FILE dialog ...
    assert widgets["cohortFolderButton"][0] in ("QToolButton", "QPushButton")  # ... so folders get their own
    source = MODULE.read_text(encoding="utf-8")
    assert "getExistingDirectory" in source.split("def onChooseCohortFolder", 1)[1].split("def ", 1)[0]


def test_results_after_a_scene_close_do_not_use_a_dropped_parameter_node():
    """Closing the scene while the module is hidden sets _parameterNode to None; the timer's handlers run later."""
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "IPMNTrainerWidget")
    for method in widget.body:
        if isinstance(method, ast.FunctionDef) and method.name in ("_onFinished", "_onFailed", "onShowCurves"):
            direct = [n for n in ast.walk(method) if isinstance(n, ast.Attribute) and n.attr == "_parameterNode"]
            assert not direct, f"{method.name} uses self._parameterNode directly"
    params = next(m for m in widget.body if isinstance(m, ast.FunctionDef) and m.name == "_params")
    assert "initializeParameterNode" in ast.unparse(params)


def test_the_panel_shows_presets_and_sends_only_changes():
    source = MODULE.read_text(encoding="utf-8")
    options = source.split("def _options", 1)[1].split("\n    def ", 1)[0]
    assert "optionsFromPanel" in options and "epochs=int(p.epochs)" not in options
    assert "panelValues" in source and "presetShown" in source
