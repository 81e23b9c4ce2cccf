"""Model registry: where IPMN model packages live on this computer, and which ones can be used.

A *model package* is a folder with ``model.safetensors`` + ``config.json``. A *fold ensemble* is a folder
with an ``ensemble.json`` (``{"schema": "ipmn.ensemble/1", "name": ..., "members": ["fold_0", ...]}``)
whose members are model packages (relative or absolute paths).

Models are found in three places:

* bundled folders shipped with the Slicer extension (the demo model), passed in by the caller;
* the user-level models folder, one sub-folder per registered model. It is the same for every Slicer
  version (models are not downloaded again after a Slicer upgrade) and can be moved with the
  environment variable ``IPMN_MODELS_DIR`` (e.g. to a shared drive in a hospital without internet);
* folders registered *by reference* (not copied), listed in ``references.json`` in that folder.

Manual install (no internet): copy a model package folder into the user-level models folder
(``python -c "import ipmn.registry as r; print(r.user_models_dir())"`` prints it), or use
"Add model folder..." in the IPMNClassifier module.

Pure Python: no slicer, qt, vtk or torch imports.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ipmn.errors import IPMNError
from ipmn.vocab import CONFIG_FILE, WEIGHTS_FILE, slug

ENV_VAR = "IPMN_MODELS_DIR"
ENSEMBLE_FILE = "ensemble.json"
REFERENCES_FILE = "references.json"
ENSEMBLE_SCHEMA = "ipmn.ensemble/1"
CARD_SUMMARY_CHARS = 300
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


# ------------------------------------------------------------------------------------------- locations
def user_models_dir(create: bool = False) -> Path:
    """The user-level models folder (``$IPMN_MODELS_DIR`` if set).

    Default: ``%LOCALAPPDATA%\\IPMN\\models`` on Windows (local, not roaming: model files are large),
    ``~/Library/Application Support/IPMN/models`` on macOS, ``$XDG_CONFIG_HOME/IPMN/models``
    (``~/.config/IPMN/models``) elsewhere.
    """
    override = os.environ.get(ENV_VAR, "").strip()
    if override:
        path = Path(os.path.expandvars(override)).expanduser()
    elif sys.platform.startswith("win"):
        base = os.environ.get("LOCALAPPDATA") or os.environ.get("APPDATA") or str(Path.home() / "AppData" / "Local")
        path = Path(base) / "IPMN" / "models"
    elif sys.platform == "darwin":
        path = Path.home() / "Library" / "Application Support" / "IPMN" / "models"
    else:
        base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        path = Path(base) / "IPMN" / "models"
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise IPMNError(f"cannot create the models folder {path}: {exc.strerror or exc}") from exc
    return path


# ------------------------------------------------------------------------------------------- model info
@dataclass
class ModelInfo:
    """One selectable model (a package or a fold ensemble)."""

    id: str
    name: str
    path: Path  # the package folder, or the ensemble folder
    source: str  # "bundled" | "user" | "reference"
    arch: str = ""
    class_names: list = field(default_factory=list)
    card: str = ""
    trained_on: str = ""
    metrics: dict = field(default_factory=dict)
    metrics_source: str = ""  # what the metrics were measured on (held-out cohort, nested CV, validation)
    members: list = field(default_factory=list)  # package folders (one for a single model)
    valid: bool = True
    problem: str = ""

    @property
    def is_ensemble(self) -> bool:
        return len(self.members) > 1

    @property
    def primary(self) -> Path:
        """The folder passed as ``--model``."""
        return self.members[0] if self.members else self.path

    @property
    def ensemble_members(self) -> list:
        """The folders passed as ``--ensemble`` (all members; the engine averages them)."""
        return list(self.members) if self.is_ensemble else []

    def label(self) -> str:
        """Short text for a combo box."""
        text = self.name
        if self.is_ensemble:
            text += f" (ensemble of {len(self.members)})"
        if self.source == "bundled":
            text += " [bundled]"
        if not self.valid:
            text += " [invalid]"
        return text

    def summary(self) -> str:
        """A few lines describing the model (its card)."""
        if not self.valid:
            return f"{self.name}: {self.problem}"
        lines = [f"{self.name} ({self.arch or 'unknown architecture'}; {self.source}: {self.path})"]
        if self.class_names:
            lines.append("Classes: " + ", ".join(str(c) for c in self.class_names))
        if self.trained_on:
            lines.append(f"Trained on: {self.trained_on}")
        metric_text = format_metrics(self.metrics)
        if metric_text:
            lines.append(f"Metrics ({self.metrics_source}): {metric_text}" if self.metrics_source
                         else f"Metrics: {metric_text}")
        if self.card:
            lines.append(self.card)
        return "\n".join(lines)


def _summarize_card(card) -> str:
    if isinstance(card, dict):
        parts = [str(card.get(k)) for k in ("summary", "description", "intended_use", "warning") if card.get(k)]
        text = " ".join(parts) if parts else json.dumps(card)[:CARD_SUMMARY_CHARS]
    else:
        text = str(card or "")
    text = " ".join(text.split())
    if len(text) > CARD_SUMMARY_CHARS:
        text = text[: CARD_SUMMARY_CHARS - 1].rstrip() + "…"
    return text


def format_metrics(metrics) -> str:
    """``accuracy 0.70±0.11, macro_f1 ...`` from a config's ``metrics`` (numbers or mean/std dicts)."""
    if not isinstance(metrics, dict):
        return ""
    source = metrics.get("summary") if isinstance(metrics.get("summary"), dict) else metrics
    parts = []
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc"):
        value = source.get(key)
        if isinstance(value, dict) and isinstance(value.get("mean"), (int, float)):
            std = value.get("std")
            parts.append(f"{key} {value['mean']:.2f}" + (f"±{std:.2f}" if isinstance(std, (int, float)) else ""))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(f"{key} {value:.2f}")
    return ", ".join(parts)


def honest_metrics(config: dict) -> tuple[dict, str]:
    """The metrics a model picker should show, and what they were measured on, best evidence first:
    ``evaluation`` (``ipmn evaluate`` on a cohort the model never saw), ``cv_metrics`` (nested CV: mean ±
    std over outer folds), else the validation split that chose the epoch — labelled as optimistic,
    since those cases picked the epoch. A bare ``metrics`` entry is read as such a validation result."""
    evaluation = config.get("evaluation")
    if isinstance(evaluation, dict) and isinstance(evaluation.get("metrics"), dict):
        what = evaluation.get("cohort") or "a held-out cohort"
        return evaluation["metrics"], f"held-out: {what}"
    cv = config.get("cv_metrics")
    if isinstance(cv, dict) and isinstance(cv.get("summary"), dict):
        return cv, "nested cross-validation, mean±std over outer folds"
    for key in ("validation", "metrics"):
        if isinstance(config.get(key), dict) and format_metrics(config[key]):
            return config[key], "validation cases that chose the epoch: optimistic"
    return {}, ""


def _trained_on_text(config: dict) -> str:
    value = config.get("trained_on")
    if value is None and isinstance(config.get("training"), dict):
        value = config["training"].get("cohort") or config["training"].get("trained_on")
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items() if not isinstance(v, (dict, list)))
    return str(value) if value else ""


# ------------------------------------------------------------------------------------------- validation
def _check_safetensors(path: Path) -> str | None:
    """A cheap integrity check of a .safetensors file (header length + JSON header); None when fine."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{WEIGHTS_FILE} is empty or truncated ({size} bytes)"
            if head.startswith(b"version "):
                return f"{WEIGHTS_FILE} is a Git LFS pointer, not the weights (fetch the file with 'git lfs pull')"
            (n,) = struct.unpack("<Q", head)
            if n <= 0 or n > _MAX_SAFETENSORS_HEADER or 8 + n > size:
                return f"{WEIGHTS_FILE} is not a valid safetensors file (bad header length; truncated download?)"
            header = json.loads(fh.read(n).decode("utf-8"))
    except OSError as exc:
        return f"cannot read {WEIGHTS_FILE}: {exc.strerror or exc}"
    except (ValueError, UnicodeDecodeError):
        return f"{WEIGHTS_FILE} is not a valid safetensors file (unreadable header)"
    if not isinstance(header, dict) or not any(k != "__metadata__" for k in header):
        return f"{WEIGHTS_FILE} holds no tensors"
    return None


def read_config_json(path: Path) -> dict:
    """A package's ``config.json`` as a dict, or one clear error (stdlib only: the GUI process uses it).

    The one reader of that file: :func:`ipmn.models.read_package_config` checks its format on top.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    except json.JSONDecodeError as exc:
        raise IPMNError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise IPMNError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    if not isinstance(config, dict):
        raise IPMNError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def validate_package(folder) -> dict:
    """Check that ``folder`` is a model package; return its config. Raises IPMNError listing every problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise IPMNError(f"model folder not found: {folder}")
    problems = []
    config = {}
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        problems.append(f"{WEIGHTS_FILE} is missing")
    else:
        problem = _check_safetensors(weights)
        if problem:
            problems.append(problem)
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        problems.append(f"{CONFIG_FILE} is missing")
    else:
        try:
            config = read_config_json(cfg_path)
        except IPMNError as exc:
            problems.append(str(exc))
        else:
            if not (config.get("arch") or (isinstance(config.get("model"), dict) and config["model"].get("arch"))):
                problems.append(f"{CONFIG_FILE} does not name the architecture ('arch')")
            names = config.get("class_names")
            if names is not None and (not isinstance(names, list) or len(names) < 2):
                problems.append(f"{CONFIG_FILE} 'class_names' must be a list of at least two names")
    if problems:
        raise IPMNError(f"{folder} is not a usable IPMN model package: " + "; ".join(problems))
    return config


def _ensemble_members(folder: Path) -> tuple[str, list]:
    data = read_config_json(folder / ENSEMBLE_FILE)
    if data.get("schema", ENSEMBLE_SCHEMA) != ENSEMBLE_SCHEMA:
        raise IPMNError(f"{folder / ENSEMBLE_FILE}: unsupported schema {data.get('schema')!r}")
    members = data.get("members")
    if not isinstance(members, list) or not members:
        raise IPMNError(f"{folder / ENSEMBLE_FILE} lists no members")
    paths = [(folder / m) if not Path(m).is_absolute() else Path(m) for m in map(str, members)]
    return str(data.get("name") or folder.name), paths


def validate_model_folder(folder) -> dict:
    """Validate a package or an ensemble folder; returns the (first member's) config."""
    folder = Path(folder)
    if (folder / ENSEMBLE_FILE).is_file():
        _, members = _ensemble_members(folder)
        problems, config = [], {}
        for i, member in enumerate(members):
            try:
                cfg = validate_package(member)
                config = config or cfg
            except IPMNError as exc:
                problems.append(f"member {i}: {exc}")
        if problems:
            raise IPMNError(f"ensemble {folder} has problems: " + " | ".join(problems))
        return config
    return validate_package(folder)


def _slug(text: str) -> str:
    return slug(text, strip="-._", max_len=80)


def model_info(folder, source: str = "user", name: str | None = None) -> ModelInfo:
    """Describe a model folder (package or ensemble). Never raises: invalid folders have ``valid=False``."""
    folder = Path(folder)
    members = [folder]
    ensemble_name = None
    try:
        if (folder / ENSEMBLE_FILE).is_file():
            ensemble_name, members = _ensemble_members(folder)
        config = validate_model_folder(folder)
    except IPMNError as exc:
        return ModelInfo(id=f"{source}:{_slug(folder.name)}", name=name or folder.name, path=folder, source=source,
                         members=members, valid=False, problem=str(exc))
    arch = config.get("arch") or (config.get("model") or {}).get("arch", "")
    display = name or ensemble_name or config.get("name") or folder.name
    metrics, metrics_source = honest_metrics(config)
    return ModelInfo(
        id=f"{source}:{_slug(folder.name if source != 'reference' else str(folder))}",
        name=str(display),
        path=folder,
        source=source,
        arch=str(arch),
        class_names=list(config.get("class_names") or []),
        card=_summarize_card(config.get("card")),
        trained_on=_trained_on_text(config),
        metrics=metrics,
        metrics_source=metrics_source,
        members=members,
    )


# ------------------------------------------------------------------------------------------- listing
def _references_path(models_dir: Path) -> Path:
    return models_dir / REFERENCES_FILE


def _read_references(models_dir: Path) -> list:
    path = _references_path(models_dir)
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    items = data.get("models", []) if isinstance(data, dict) else []
    return [item for item in items if isinstance(item, dict) and item.get("path")]


def _write_references(models_dir: Path, items: list) -> None:
    models_dir.mkdir(parents=True, exist_ok=True)
    path = _references_path(models_dir)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"models": items}, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def list_models(bundled=(), models_dir=None, include_invalid: bool = False) -> list:
    """Bundled models first, then the user's (copied) models, then models registered by reference."""
    models_dir = Path(models_dir) if models_dir else user_models_dir()
    found = []
    for folder in bundled:
        if folder and Path(folder).is_dir():
            found.append(model_info(folder, "bundled"))
    if models_dir.is_dir():
        for sub in sorted(p for p in models_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if (sub / CONFIG_FILE).exists() or (sub / ENSEMBLE_FILE).exists() or (sub / WEIGHTS_FILE).exists():
                found.append(model_info(sub, "user"))
    for item in _read_references(models_dir):
        found.append(model_info(item["path"], "reference", name=item.get("name")))
    return [m for m in found if include_invalid or m.valid]


def find_model(model_id: str, bundled=(), models_dir=None) -> ModelInfo | None:
    for info in list_models(bundled, models_dir, include_invalid=True):
        if info.id == model_id:
            return info
    return None


# ------------------------------------------------------------------------------------------- registering
def _unique_dir(models_dir: Path, name: str, overwrite: bool) -> Path:
    dest = models_dir / _slug(name)
    if overwrite or not dest.exists():
        return dest
    i = 2
    while (models_dir / f"{dest.name}-{i}").exists():
        i += 1
    return models_dir / f"{dest.name}-{i}"


def _copy_atomic(copy_fn, dest: Path, overwrite: bool) -> None:
    """Build the folder next to ``dest`` and move it into place, so a failed copy leaves nothing behind."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=dest.parent))
    try:
        copy_fn(tmp)
        if dest.exists():
            if not overwrite:
                raise IPMNError(f"a model named {dest.name} is already registered")
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except OSError as exc:
        raise IPMNError(f"cannot copy the model into {dest}: {exc.strerror or exc}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def register_model(folder, name: str | None = None, copy: bool = True, models_dir=None,
                   overwrite: bool = False) -> ModelInfo:
    """Make a model package (or ensemble folder) selectable. ``copy=False`` registers it where it is."""
    folder = Path(folder).expanduser().resolve()
    config = validate_model_folder(folder)
    models_dir = Path(models_dir) if models_dir else user_models_dir(create=True)
    display = name or config.get("name") or folder.name
    if not copy:
        items = [i for i in _read_references(models_dir) if Path(i["path"]).resolve() != folder]
        items.append({"path": str(folder), "name": str(display)})
        _write_references(models_dir, items)
        return model_info(folder, "reference", name=str(display))
    try:
        folder.relative_to(models_dir.resolve())
        return model_info(folder, "user")  # already inside the models folder
    except ValueError:
        pass
    dest = _unique_dir(models_dir, str(display), overwrite)

    def copy_fn(tmp: Path) -> None:
        if (folder / ENSEMBLE_FILE).is_file():
            ens_name, members = _ensemble_members(folder)
            _copy_members(tmp, members, ens_name)
        else:
            for item in folder.iterdir():
                if item.is_file():
                    shutil.copy2(item, tmp / item.name)

    _copy_atomic(copy_fn, dest, overwrite)
    return model_info(dest, "user")


def _copy_members(tmp: Path, members, name: str) -> None:
    names = []
    for i, member in enumerate(members):
        sub = tmp / f"fold_{i}"
        sub.mkdir()
        for fname in (WEIGHTS_FILE, CONFIG_FILE):
            shutil.copy2(Path(member) / fname, sub / fname)
        names.append(sub.name)
    (tmp / ENSEMBLE_FILE).write_text(
        json.dumps({"schema": ENSEMBLE_SCHEMA, "name": name, "members": names}, indent=2), encoding="utf-8"
    )


def register_ensemble(members, name: str, models_dir=None, overwrite: bool = False) -> ModelInfo:
    """Copy several model packages (e.g. the CV folds) into one ensemble entry."""
    members = [Path(m).expanduser().resolve() for m in members]
    if not members:
        raise IPMNError("an ensemble needs at least one model package")
    problems = []
    for i, member in enumerate(members):
        try:
            validate_package(member)
        except IPMNError as exc:
            problems.append(f"member {i}: {exc}")
    if problems:
        raise IPMNError("cannot register the ensemble: " + " | ".join(problems))
    models_dir = Path(models_dir) if models_dir else user_models_dir(create=True)
    dest = _unique_dir(models_dir, name, overwrite)
    _copy_atomic(lambda tmp: _copy_members(tmp, members, name), dest, overwrite)
    return model_info(dest, "user")


def unregister_model(info: ModelInfo, models_dir=None, delete_files: bool = True) -> None:
    """Remove a user or reference entry (bundled models cannot be removed)."""
    models_dir = Path(models_dir) if models_dir else user_models_dir()
    if info.source == "bundled":
        raise IPMNError("bundled models cannot be removed")
    if info.source == "reference":
        target = Path(info.path).resolve()
        _write_references(models_dir, [i for i in _read_references(models_dir) if Path(i["path"]).resolve() != target])
        return
    path = Path(info.path).resolve()
    try:
        path.relative_to(models_dir.resolve())
    except ValueError as exc:
        raise IPMNError(f"{path} is not inside the models folder {models_dir}") from exc
    if delete_files:
        shutil.rmtree(path)
