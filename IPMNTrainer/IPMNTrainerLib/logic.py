"""The IPMN trainer without Qt: cohort check, ``ipmn cv`` / ``ipmn train`` commands, progress, learning
curves (plot chart nodes), the results table from ``metrics.json`` and registering the trained model.

The engine process is started with the classifier's process helpers (both modules are installed in the same
folder, so ``IPMNClassifierLib`` and ``ipmn`` are importable here). Presets and the values the panel sends
are in :mod:`IPMNTrainerLib.presets`. About 600 lines: the options, the command, the progress and the
results of one run belong together; each class is short.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import slicer
import vtk

from ipmn import registry
from ipmn.errors import IPMNError
from ipmn.vocab import CONFIG_FILE, MODALITY_SETS, is_perfect_square
from IPMNClassifierLib import engine as eng
from IPMNTrainerLib.presets import (
    configOverrides,
    effectiveOptions,
    loadConfig,
    pretrainedProblems,
    setPretrained,
)

ATTR_ROLE = "IPMN.Role"
ROLE_CURVE_TABLE = "learning_curve"
ROLE_CURVE_CHART = "learning_curves"
ROLE_RESULTS = "cv_results"
CURVE_COLUMNS = ("epoch", "train_loss", "val_loss", "val_acc")
# UI option -> key names it may have in the engine's YAML config (set wherever they occur).
CONFIG_ALIASES = {
    "epochs": ("epochs", "max_epochs", "n_epochs"),
    "lr": ("lr", "learning_rate"),
    "batch_size": ("batch_size", "batch"),
    "k": ("k",),
    "modalities": ("modalities",),
    "fusion": ("fusion",),
}
MODALITIES = MODALITY_SETS  # the panel's choice -> the model's modalities
SERIES_COLORS = ((0.12, 0.47, 0.71), (1.0, 0.5, 0.05), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16), (0.58, 0.4, 0.74),
                 (0.55, 0.34, 0.29), (0.89, 0.47, 0.76), (0.5, 0.5, 0.5), (0.74, 0.74, 0.13), (0.09, 0.75, 0.81))


@dataclass
class TrainingOptions:
    cohort: Path
    output: Path
    kind: str = "cv"  # cv | train
    config: Path | None = None  # base YAML (a preset by default)
    models: list = field(default_factory=lambda: ["vit_base"])
    # None below: the base config's (preset's) value is used; only values given here override it.
    modalities: str | None = "t1t2"  # t1t2 | t1 | t2
    fusion: str | None = "early"  # early | late
    k: int | None = 9
    epochs: int | None = None
    lr: float | None = None
    batchSize: int | None = None
    outer: int | None = None
    inner: int | None = None
    device: str = "auto"  # auto | cpu | cuda
    resume: bool = False
    pretrained: str | None = None  # "hub", a local weights file, "none" (random init); None: the preset's

    @property
    def totalFolds(self) -> int:
        outer = int(self.outer) if self.outer is not None else 5
        return max(1, outer * max(1, len(self.models))) if self.kind == "cv" else 1


# ------------------------------------------------------------------------------------------- config
def _setEverywhere(config, names, value) -> int:
    """Set every key named in ``names`` in nested dicts; returns how many were set."""
    count = 0
    if isinstance(config, dict):
        for key in list(config):
            if key in names and not isinstance(config[key], dict):
                config[key] = value
                count += 1
            else:
                count += _setEverywhere(config[key], names, value)
    elif isinstance(config, list):
        for item in config:
            count += _setEverywhere(item, names, value)
    return count


def applyOverrides(config: dict, overrides: dict) -> list:
    """Apply the panel's values to a config; returns notes about values that had no key to go to."""
    notes = []
    for option, value in overrides.items():
        if value is None:
            continue
        if not _setEverywhere(config, CONFIG_ALIASES.get(option, (option,)), value):
            notes.append(f"'{option}' is not a key of the base config: the engine's value is used, not {value}")
    return notes


def parseModels(text) -> list:
    """Architecture names from 'vit_base, densenet121' or a list."""
    items = text if isinstance(text, (list, tuple)) else str(text).replace(",", " ").split()
    return [str(m).strip() for m in items if str(m).strip()]


# ------------------------------------------------------------------------------------------- progress
class TrainingProgress:
    """Turns epoch / fold_done events into fold and overall fractions and an ETA.

    In nested CV each outer fold trains its inner folds (events carry ``inner``) and then the final
    model on the whole outer training set (no ``inner``): the fold's fraction counts all of them.
    """

    def __init__(self, totalFolds: int = 1, innerFolds: int = 0):
        self.totalFolds = max(1, int(totalFolds))
        self.innerFolds = max(0, int(innerFolds))
        self.completed = set()
        self.current = None
        self.currentFraction = 0.0
        self.zeroBasedEpochs = False
        self.started = time.monotonic()
        self.foldEta = None
        self.lastEvent = {}

    @staticmethod
    def foldKey(event: dict):
        return (event.get("model"), event.get("fold", 0))

    @staticmethod
    def curveKey(event: dict):
        """One learning curve per training run: (model, outer fold, inner fold or None for the final model)."""
        return (event.get("model"), event.get("fold", 0), event.get("inner"))

    def update(self, event: dict) -> dict:
        name = event.get("event")
        if name == "epoch":
            self.lastEvent = event
            self.current = self.foldKey(event)
            epoch, epochs = event.get("epoch"), event.get("epochs")
            if epoch == 0:
                self.zeroBasedEpochs = True
            if isinstance(epoch, (int, float)) and isinstance(epochs, (int, float)) and epochs > 0:
                done = epoch + 1 if self.zeroBasedEpochs else epoch
                fraction = max(0.0, min(1.0, done / epochs))
                if self.innerFolds:
                    inner = event.get("inner")
                    stage = min(int(inner), self.innerFolds - 1) if isinstance(inner, int) else self.innerFolds
                    fraction = (stage + fraction) / (self.innerFolds + 1)
                self.currentFraction = fraction
            self.foldEta = event.get("eta_s")
        elif name == "fold_done":
            self.completed.add(self.foldKey(event))
            if self.current == self.foldKey(event):
                self.currentFraction = 1.0
        return self.state()

    @property
    def overallFraction(self) -> float:
        running = 0.0 if (self.current is None or self.current in self.completed) else self.currentFraction
        return max(0.0, min(1.0, (len(self.completed) + running) / self.totalFolds))

    def state(self) -> dict:
        overall = self.overallFraction
        elapsed = time.monotonic() - self.started
        eta = elapsed * (1.0 - overall) / overall if overall > 0.01 else None
        event = self.lastEvent
        parts = []
        if self.current is not None:
            model, fold = self.current
            parts.append((f"{model} " if model else "") + f"fold {fold}")
            if event.get("inner") is not None:
                parts.append(f"inner {event['inner']}")
        if event.get("epoch") is not None:
            parts.append(f"epoch {event.get('epoch')}/{event.get('epochs', '?')}")
        for key in ("train_loss", "val_loss", "val_acc"):
            if isinstance(event.get(key), (int, float)):
                parts.append(f"{key} {event[key]:.3f}")
        return {"foldFraction": self.currentFraction, "overallFraction": overall, "foldEta": self.foldEta,
                "overallEta": eta, "text": ", ".join(parts), "foldsDone": len(self.completed),
                "totalFolds": self.totalFolds}


def formatSeconds(seconds) -> str:
    if seconds is None or not math.isfinite(float(seconds)):
        return "-"
    seconds = int(round(float(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else (f"{minutes}m {secs:02d}s" if minutes else f"{secs}s")


# ------------------------------------------------------------------------------------------- MRML
def _findByRole(cls: str, role: str, extra: tuple | None = None) -> list:
    scene = slicer.mrmlScene
    nodes = scene.GetNodesByClass(cls)
    found = []
    for i in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(i)
        if node.GetAttribute(ATTR_ROLE) != role:
            continue
        if extra and node.GetAttribute(extra[0]) != extra[1]:
            continue
        found.append(node)
    return found


class LearningCurves:
    """One table per fold (epoch, train_loss, val_loss, val_acc) and a plot chart with their loss curves."""

    def __init__(self, title: str = "IPMN learning curves"):
        self.title = title
        self.tables = {}
        charts = _findByRole("vtkMRMLPlotChartNode", ROLE_CURVE_CHART)
        self.chart = charts[0] if charts else None

    def reset(self) -> None:
        """Remove the curves of an earlier run."""
        scene = slicer.mrmlScene
        for cls in ("vtkMRMLPlotSeriesNode", "vtkMRMLTableNode"):
            for node in _findByRole(cls, ROLE_CURVE_TABLE):
                scene.RemoveNode(node)
        if self.chart is not None:
            self.chart.RemoveAllPlotSeriesNodeIDs()
        self.tables = {}

    def chartNode(self):
        if self.chart is None or slicer.mrmlScene.GetNodeByID(self.chart.GetID()) is None:
            self.chart = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotChartNode", self.title)
            self.chart.SetAttribute(ATTR_ROLE, ROLE_CURVE_CHART)
            self.chart.SetTitle(self.title)
            self.chart.SetXAxisTitle("epoch")
            self.chart.SetYAxisTitle("loss")
        return self.chart

    def _table(self, key):
        if key in self.tables:
            return self.tables[key]
        model, fold, inner = key
        label = (f"{model} " if model else "") + f"fold {fold}" + (f" inner {inner}" if inner is not None else "")
        scene = slicer.mrmlScene
        table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"IPMN learning curve {label}")
        table.SetAttribute(ATTR_ROLE, ROLE_CURVE_TABLE)
        for column in CURVE_COLUMNS:
            array = vtk.vtkDoubleArray()
            array.SetName(column)
            table.AddColumn(array)
        chart = self.chartNode()
        color = SERIES_COLORS[len(self.tables) % len(SERIES_COLORS)]
        for column, style in (("train_loss", slicer.vtkMRMLPlotSeriesNode.LineStyleSolid),
                              ("val_loss", slicer.vtkMRMLPlotSeriesNode.LineStyleDash)):
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{label} {column.replace('_', ' ')}")
            series.SetAttribute(ATTR_ROLE, ROLE_CURVE_TABLE)
            series.SetAndObserveTableNodeID(table.GetID())
            series.SetXColumnName("epoch")
            series.SetYColumnName(column)
            series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
            series.SetLineStyle(style)
            series.SetColor(*color)
            chart.AddAndObservePlotSeriesNodeID(series.GetID())
        self.tables[key] = table
        return table

    def add(self, event: dict):
        """Append one epoch event; returns the fold's table."""
        table = self._table(TrainingProgress.curveKey(event))
        vtable = table.GetTable()
        for column in CURVE_COLUMNS:
            value = event.get(column)
            vtable.GetColumnByName(column).InsertNextValue(float(value) if isinstance(value, (int, float)) else math.nan)
        vtable.Modified()
        table.Modified()
        return table


def _numeric(value):
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def metricRows(metrics: dict):
    """(rows, foldColumns, perFold) from a ``metrics.json``.

    rows are (metric, mean, std, ddof); perFold[metric][column] = value. With several models (``models``: a
    list of entries with their own ``summary`` and ``folds``), metric names are prefixed ``<model>/``;
    otherwise the top-level ``summary`` and ``folds`` are used.
    """
    rows = []

    def flatten(summary, prefix=""):
        for key, value in summary.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict) and _numeric(value.get("mean")) is not None:
                rows.append((name, _numeric(value["mean"]), _numeric(value.get("std")), value.get("ddof")))
            elif _numeric(value) is not None:
                rows.append((name, _numeric(value), None, None))
            elif isinstance(value, dict):
                flatten(value, prefix=f"{name}/")

    models = [m for m in (metrics.get("models") or []) if isinstance(m, dict) and isinstance(m.get("summary"), dict)]
    if len(models) > 1:
        sources = [(str(m.get("name") or f"model {i}"), m["summary"], m.get("folds") or [])
                   for i, m in enumerate(models)]
    else:
        sources = [(None, metrics.get("summary") or {}, metrics.get("folds") or [])]
    foldColumns, perFold = [], {}
    for name, summary, folds in sources:
        prefix = f"{name}/" if name else ""
        flatten(summary, prefix)
        for index, entry in enumerate(folds):
            if not isinstance(entry, dict):
                continue
            entryPrefix = prefix or (f"{entry['model']}/" if entry.get("model") else "")
            column = f"fold {entry.get('fold', index)}"
            if column not in foldColumns:
                foldColumns.append(column)
            for key, value in (entry.get("metrics") or {}).items():
                if _numeric(value) is not None:
                    perFold.setdefault(f"{entryPrefix}{key}", {})[column] = _numeric(value)
    known = {r[0] for r in rows}
    for key in perFold if not rows else ():  # no summary: mean and std from the folds
        if key not in known:
            values = [v for v in perFold[key].values() if math.isfinite(v)]
            if not values:
                continue
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
            rows.append((key, mean, std, 1 if std is not None else None))
    return rows, foldColumns, perFold


# ------------------------------------------------------------------------------------------- logic
def _flags(items) -> list:
    """["--flag", text] for every value that is set (None: the config's value stays)."""
    out = []
    for flag, value, convert in items:
        if value is not None:
            out += [flag, str(convert(value))]
    return out


class TrainerLogic:
    def __init__(self, launcher: eng.EngineLauncher | None = None, moduleDir=None, classifierDir=None):
        self.moduleDir = Path(moduleDir) if moduleDir else Path(__file__).resolve().parent.parent
        # The engine lives in the classifier module folder (next to this one once installed).
        engineDir = Path(classifierDir) if classifierDir else Path(registry.__file__).resolve().parent.parent
        self.launcher = launcher or eng.EngineLauncher(module_dir=engineDir)
        self.modelsDir = None  # None: registry.user_models_dir()

    # --------------------------------------------------------------------------------- cohort
    @staticmethod
    def loadCohort(path, modalities: str = "t1t2"):
        from ipmn import cohort

        loader = getattr(cohort, "load_cohort", None) or cohort.load_manifest
        return loader(Path(path), tuple(MODALITIES[modalities]))

    def cohortSummary(self, path, modalities: str = "t1t2") -> tuple:
        """(summary dict, text for the panel); raises IPMNError listing the cohort's problems."""
        from ipmn import cohort

        if not path or str(path) in ("", ".") or not Path(path).exists():
            raise IPMNError(f"cohort not found: {path or '(none chosen)'}")
        summary = cohort.summarize(self.loadCohort(path, modalities))
        return summary, self.summaryText(summary)

    @staticmethod
    def summaryText(summary: dict) -> str:
        lines = [f"{summary.get('n_cases', 0)} cases"
                 + (f" from {summary['n_patients']} patients" if summary.get("n_patients") else "")]
        perClass = summary.get("per_class") or {}
        if perClass:
            lines.append("per class: " + ", ".join(f"{k} {v}" for k, v in perClass.items()))
        perCenter = summary.get("per_center") or {}
        if perCenter:
            lines.append("per centre: " + ", ".join(f"{k} {v}" for k, v in perCenter.items()))
        if "with_t1" in summary or "with_t2" in summary:
            lines.append(f"with T1: {summary.get('with_t1', '?')}, with T2: {summary.get('with_t2', '?')}")
        lines += [f"note: {note}" for note in summary.get("notes") or []]  # e.g. the Cyst-X release's
        return "\n".join(lines)

    # --------------------------------------------------------------------------------- config
    def presetConfigs(self) -> list:
        presets = Path(registry.__file__).resolve().parent / "presets"
        return sorted(presets.glob("*.yaml")) if presets.is_dir() else []

    def defaultConfig(self) -> Path | None:
        presets = self.presetConfigs()
        practical = [p for p in presets if p.name == "practical.yaml"]
        return (practical or presets or [None])[0]

    def writeRunConfig(self, options: TrainingOptions, folder) -> tuple:
        """The base config with the panel's values applied, written to ``folder``; returns (path, notes)."""
        import yaml

        base = Path(options.config) if options.config else self.defaultConfig()
        if base is None:
            raise IPMNError("choose a training config (YAML): no preset was found in the engine")
        config = loadConfig(base)
        notes = applyOverrides(config, configOverrides(options))
        setPretrained(config, options.pretrained)
        path = Path(folder) / "ipmn-trainer-config.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        return path, notes

    # --------------------------------------------------------------------------------- commands
    @staticmethod
    def buildArgs(options: TrainingOptions, configPath) -> list:
        """Arguments after ``-m ipmn`` for the run described by ``options``.

        Epochs, learning rate and batch size go as command-line overrides; k (no flag) through the config.
        """
        models = parseModels(options.models)
        common = ["--config", str(configPath), "--out", str(options.output), "--device", options.device]
        common += _flags((("--epochs", options.epochs, int), ("--lr", options.lr, lambda v: repr(float(v))),
                          ("--batch-size", options.batchSize, int)))
        series = _flags((("--modalities", options.modalities, str), ("--fusion", options.fusion, str)))
        if options.kind == "cv":
            args = ["cv", "--cohort", str(options.cohort), *common,
                    *_flags((("--outer", options.outer, int), ("--inner", options.inner, int)))]
            if models:
                args += ["--models", *models]
            args += series
        elif options.kind == "train":
            args = ["train", "--cohort", str(options.cohort), *common]
            if models:
                args += ["--arch", models[0]]
            args += series
        else:
            raise IPMNError(f"unknown run kind {options.kind!r} (cv or train)")
        if options.resume:
            args.append("--resume")
        return args + ["--progress", "jsonl"]

    def checkOptions(self, options: TrainingOptions) -> list:
        problems = []
        if not options.cohort or str(options.cohort) in ("", ".") or not Path(options.cohort).exists():
            problems.append("Choose a cohort (manifest CSV or Cyst-X-style folder).")
        if not options.output or str(options.output) in ("", "."):
            problems.append("Choose an output folder.")
        if options.kind == "train" and len(parseModels(options.models)) > 1:
            problems.append("Train one model: name one architecture (several are for cross-validation).")
        if options.kind == "cv":
            if any(v is not None and int(v) < 2 for v in (options.outer, options.inner)):
                problems.append("Use at least 2 outer and 2 inner folds.")
        if options.k is not None and not is_perfect_square(int(options.k)):
            problems.append(f"k must be a perfect square (4, 9, 16 ...), not {options.k}.")
        problems += pretrainedProblems(options.pretrained)
        return problems

    def start(self, options: TrainingOptions, curves: LearningCurves | None = None) -> TrainingRun:
        problems = self.checkOptions(options)
        if problems:
            raise IPMNError(" ".join(problems))
        configDir = Path(tempfile.mkdtemp(prefix="IPMN-train-"))
        configPath, notes = self.writeRunConfig(options, configDir)
        args = self.buildArgs(options, configPath)
        Path(options.output).parent.mkdir(parents=True, exist_ok=True)
        proc = self.launcher.start(self.launcher.command(*args), device=options.device)
        run = eng.EngineRun(proc, description=f"ipmn {options.kind}")
        if curves is not None and not options.resume:
            curves.reset()
        return TrainingRun(effectiveOptions(options, configPath), run, configDir, notes, curves)

    # --------------------------------------------------------------------------------- results
    def resultsTable(self, runDir, tableNode=None):
        """Fill (or create) a table node from RUN_DIR/metrics.json: mean, std and one column per fold."""
        path = Path(runDir) / "metrics.json"
        try:
            metrics = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise IPMNError(f"no metrics.json in {runDir}: the run has not finished") from exc
        except (OSError, ValueError) as exc:
            raise IPMNError(f"cannot read {path}: {exc}") from exc
        rows, foldColumns, perFold = metricRows(metrics)
        if not rows:
            raise IPMNError(f"{path} has no metrics")
        if tableNode is None:
            existing = _findByRole("vtkMRMLTableNode", ROLE_RESULTS, ("IPMN.RunDir", str(runDir)))
            tableNode = existing[0] if existing else slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLTableNode", f"IPMN CV results {Path(runDir).name}")
        ddofs = {r[3] for r in rows if r[3] is not None}
        stdName = "Std" + (f" (ddof={ddofs.pop()})" if len(ddofs) == 1 else "")
        names = vtk.vtkStringArray()
        names.SetName("Metric")
        columns = [("Mean", vtk.vtkDoubleArray()), (stdName, vtk.vtkDoubleArray())]
        columns += [(c, vtk.vtkDoubleArray()) for c in foldColumns]
        for title, array in columns:
            array.SetName(title)
        for name, mean, std, _ddof in rows:
            names.InsertNextValue(name)
            columns[0][1].InsertNextValue(mean)
            columns[1][1].InsertNextValue(std if std is not None else math.nan)
            for column, array in columns[2:]:
                array.InsertNextValue(perFold.get(name, {}).get(column, math.nan))
        wasModifying = tableNode.StartModify()
        tableNode.RemoveAllColumns()
        tableNode.AddColumn(names)
        for _title, array in columns:
            tableNode.AddColumn(array)
        tableNode.SetAttribute(ATTR_ROLE, ROLE_RESULTS)
        tableNode.SetAttribute("IPMN.RunDir", str(runDir))
        if metrics.get("models"):
            tableNode.SetAttribute("IPMN.Models", json.dumps(metrics["models"]))
        tableNode.EndModify(wasModifying)
        return tableNode

    @staticmethod
    def resultsText(tableNode) -> str:
        """'accuracy 0.71 ± 0.10' lines from a results table."""
        vtable = tableNode.GetTable()
        names, means, stds = vtable.GetColumn(0), vtable.GetColumn(1), vtable.GetColumn(2)
        lines = []
        for row in range(vtable.GetNumberOfRows()):
            mean, std = means.GetValue(row), stds.GetValue(row)
            value = "n/a" if math.isnan(mean) else f"{mean:.3f}" + ("" if math.isnan(std) else f" ± {std:.3f}")
            lines.append(f"{names.GetValue(row)}: {value}")
        return "\n".join(lines)

    @staticmethod
    def foldPackages(runDir) -> dict:
        """{model name: [fold model package folders]} of a finished ``ipmn cv`` run."""
        found = {}
        for package in sorted(Path(runDir).glob("*/fold_*/model")):
            if (package / CONFIG_FILE).is_file():
                found.setdefault(package.parent.parent.name, []).append(package)
        for name in found:
            found[name].sort(key=lambda p: int(p.parent.name.split("_")[-1]) if p.parent.name.split("_")[-1].isdigit() else 0)
        return found

    def registerTrainedModel(self, runDir, kind: str, name: str) -> list:
        """Make the trained model (``train``) or each architecture's fold ensemble (``cv``) selectable."""
        runDir = Path(runDir)
        name = name.strip() or runDir.name
        if kind == "train":
            return [registry.register_model(runDir, name=name, models_dir=self.modelsDir)]
        packages = self.foldPackages(runDir)
        if not packages:
            raise IPMNError(f"no fold models found under {runDir} (expected <model>/fold_<k>/model/)")
        infos = []
        for model, members in packages.items():
            label = name if len(packages) == 1 else f"{name} {model}"
            if len(members) == 1:
                infos.append(registry.register_model(members[0], name=label, models_dir=self.modelsDir))
            else:
                infos.append(registry.register_ensemble(members, name=label, models_dir=self.modelsDir))
        return infos


class TrainingRun:
    """A running ``ipmn cv`` / ``ipmn train``; ``poll()`` it from a timer.

    Items: ``("progress", state)`` (see :meth:`TrainingProgress.state`), ``("fold_done", event)``,
    ``("log", line)``, and finally ``("finished", done event)`` or ``("failed", EngineError)``.
    """

    def __init__(self, options: TrainingOptions, run: eng.EngineRun, configDir: Path, notes: list,
                 curves: LearningCurves | None):
        self.options = options
        self.run = run
        self.configDir = configDir
        self.notes = list(notes)
        self.curves = curves
        self.progress = TrainingProgress(options.totalFolds, options.inner if options.kind == "cv" else 0)
        self.finished = False
        self.job = eng.EngineJob(run, default_done={"event": "done", "out": str(options.output)})

    def handle(self, kind: str, payload) -> list:
        """One raw item of the engine run → the panel's items (through :class:`EngineJob`)."""
        out = []
        for kind2, item in self.job.feed(kind, payload):
            if kind2 == "event":
                name = item.get("event")
                if name == "epoch":
                    if self.curves is not None:
                        self.curves.add(item)
                    out.append(("progress", self.progress.update(item)))
                elif name == "fold_done":
                    out.append(("progress", self.progress.update(item)))
                    out.append(("fold_done", item))
                elif name == "stage":
                    text = item.get("message") or (f"{item['fraction']:.0%}" if isinstance(
                        item.get("fraction"), (int, float)) else "")
                    out.append(("log", f"{item.get('stage', '')}: {text}".rstrip(": ")))
                elif name == "warning":
                    out.append(("log", f"warning: {item.get('message', '')}"))
            else:  # log, finished, failed
                out.append((kind2, item))
        self.finished = self.job.finished
        return out

    def poll(self) -> list:
        out = []
        for kind, payload in self.run.poll():
            out += self.handle(kind, payload)
        return out

    def wait(self, onItem=None, timeout: float | None = None) -> dict:
        """Block until the run ends (tests and scripts); returns the done event or raises the error."""
        return eng.wait_items(self.poll, self.cancel, on_item=onItem, timeout=timeout)

    def cancel(self) -> None:
        """Kill the process tree; a later run with ``resume`` continues from the last checkpoint."""
        self.run.cancel()

    def cleanup(self) -> None:
        shutil.rmtree(self.configDir, ignore_errors=True)
