"""Training presets and pretrained weights for the trainer panel (no Qt, no torch).

The panel shows the chosen preset's values (paper / practical / reference / demo, or a YAML file) and sends
only the values the user changed: everything else comes from the preset itself, so "paper" really trains
with lr 0.003 and 3000 epochs. Pretrained weights: the timm hub (needs internet once), a local file
(``.safetensors`` / ``.npz`` / ``.pth`` ...), or none; hospital machines are often offline, so a hub failure
is explained with what to do instead.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from ipmn import registry
from ipmn.errors import IPMNError

PRESETS = ("practical", "paper", "reference", "demo")
WEIGHT_SUFFIXES = (".safetensors", ".npz", ".pth", ".pt", ".bin")  # what the engine's ViT loader reads
# panel value -> (config section, key)
PANEL_KEYS = {
    "epochs": ("train", "epochs"),
    "lr": ("train", "lr"),
    "batchSize": ("train", "batch_size"),
    "k": ("model", "k"),
    "modalities": ("model", "modalities"),
    "fusion": ("model", "fusion"),
    "outer": ("cv", "outer"),
    "inner": ("cv", "inner"),
}
_MODALITY_CODES = {("t1", "t2"): "t1t2", ("t1",): "t1", ("t2",): "t2"}
HUB_ADVICE = ("This computer cannot reach the model hub. Download the pretrained weights on a machine with "
              "internet (for example timm's model.safetensors of the architecture from huggingface.co), copy "
              "the file here, and choose it under 'Pretrained weights: local file'.")


def presetsDir() -> Path:
    return Path(registry.__file__).resolve().parent / "presets"


def presetPath(nameOrPath) -> Path:
    """The YAML file of a bundled preset name, or the given YAML path; raises IPMNError when missing."""
    text = str(nameOrPath or "").strip()
    if not text:
        raise IPMNError("choose a preset or a YAML config file")
    path = presetsDir() / f"{text}.yaml" if text in PRESETS else Path(text)
    if not path.is_file():
        raise IPMNError(f"training config not found: {path}")
    return path


def loadConfig(nameOrPath) -> dict:
    import yaml

    path = presetPath(nameOrPath)
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise IPMNError(f"cannot read the config {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise IPMNError(f"the config {path} must hold a mapping of options")
    return config


def panelValues(config: dict) -> dict:
    """The preset's values for the panel's fields (a field the config does not set is left out)."""
    values = {}
    for name, (section, key) in PANEL_KEYS.items():
        value = (config.get(section) or {}).get(key)
        if value is None:
            continue
        if name == "modalities":
            value = _MODALITY_CODES.get(tuple(value) if isinstance(value, (list, tuple)) else (str(value),))
            if value is None:
                continue
        values[name] = value
    pretrained = (config.get("model") or {}).get("pretrained", "absent")
    if pretrained != "absent":
        values["pretrained"] = "none" if pretrained in (None, False, "") else str(pretrained)
    return values


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-12)
    return a == b


def changedValues(shown: dict, current: dict) -> dict:
    """The panel values that differ from what the preset showed (only these are sent to the engine)."""
    return {k: v for k, v in current.items() if k not in shown or not _same(shown[k], v)}


def optionsFromPanel(base, shown: dict, current: dict):
    """``base`` (TrainingOptions) with the preset-tunable fields set only where the user changed them."""
    changed = changedValues(shown, current)
    fields = {name: changed.get(name) for name in PANEL_KEYS}
    if "pretrained" in changed:
        fields["pretrained"] = changed["pretrained"]
    return dataclasses.replace(base, **fields)


def configOverrides(options) -> dict:
    """Overrides for ``applyOverrides`` from TrainingOptions (None: the config's value stays)."""
    from IPMNTrainerLib.logic import MODALITIES

    return {"epochs": options.epochs, "lr": options.lr, "batch_size": options.batchSize, "k": options.k,
            "modalities": MODALITIES[options.modalities] if options.modalities else None, "fusion": options.fusion}


def pretrainedProblems(value) -> list:
    """Problems with a pretrained choice: "hub", "none", None (the preset's) or a local weights file."""
    if value in (None, "hub", "none"):
        return []
    path = Path(str(value))
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        return [f"Pretrained weights must be a {' / '.join(WEIGHT_SUFFIXES)} file, not '{path.name}'."]
    if not path.is_file():
        return [f"Pretrained weights file not found: {path}"]
    return []


def setPretrained(config: dict, value) -> None:
    """Write the pretrained choice into ``config['model']`` (None: keep the config's)."""
    if value is None:
        return
    config.setdefault("model", {})["pretrained"] = None if value == "none" else str(value)


def effectiveOptions(options, configPath):
    """``options`` with unset preset-tunable fields filled from the written config (for progress and display)."""
    import yaml

    config = yaml.safe_load(Path(configPath).read_text(encoding="utf-8")) or {}
    values = panelValues(config)
    filled = {k: values[k] for k in PANEL_KEYS if getattr(options, k) is None and k in values}
    return dataclasses.replace(options, **filled)


def explainFailure(message: str) -> str:
    """The engine's message, plus what to do offline when pretrained weights could not be downloaded."""
    text = str(message)
    lowered = text.lower()
    if ("timm hub" in lowered or "huggingface" in lowered or "hf_hub" in lowered) and HUB_ADVICE not in text:
        return f"{text} {HUB_ADVICE}"
    return text


def pretrainedValue(source: str, file: str = ""):
    """The panel's pretrained choice as TrainingOptions.pretrained ("preset" -> None: the preset's own)."""
    return {"preset": None, "hub": "hub", "none": "none"}.get(source, str(file or "").strip() or "missing file")


def startBlockers(cohort: str, output: str, preset: str, configPath: str, pretrained=None) -> list:
    """Why Start is disabled, in words for the panel (empty: ready)."""
    problems = []
    if not str(cohort or "").strip():
        problems.append("choose a cohort (a manifest CSV, or a Cyst-X folder with 'Folder...')")
    if not str(output or "").strip():
        problems.append("choose an output folder")
    if preset == "file" and not str(configPath or "").strip():
        problems.append("choose the YAML config file (or another preset)")
    if pretrained == "missing file":
        problems.append("choose the pretrained weights file")
    return problems


def presetSource(preset: str, configPath: str) -> str:
    """The config the panel's values come from: a preset name, or the YAML path."""
    return str(configPath or "").strip() if preset == "file" else preset
