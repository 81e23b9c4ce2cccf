"""Inference: one case → class probabilities, an explanation map, and volumes in T1's geometry.

:class:`Predictor` loads one model package (or several, e.g. the CV folds, as an ensemble) once and
then predicts case after case; ``ipmn predict`` builds one per process, ``ipmn worker`` keeps one alive
between requests (the Slicer module's way to pay torch's start-up once).

Per case: read volumes + ROI → ROI grid and preprocessing as recorded in the model's config → the
central window (paper) or all windows → model (optionally test-time flips/rotations, identical on every
cell) → probabilities averaged over windows, TTA and models → Attention Rollout (ViT) or Grad-CAM (CNN)
maps put back on their ROI slices and resampled into T1's geometry → a heat map in [0, 1] and a label
map of the most-attended voxels. All files are written atomically.

About 550 lines in one file on purpose: the Predictor and the worker protocol that keeps one alive
(:func:`serve`) share the request checks and output rules; split, those rules would live twice.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ipmn.config import PreprocessConfig, package_preprocess
from ipmn.device import autocast, resolve_device, resolve_precision
from ipmn.errors import IPMNError
from ipmn.grid import case_windows, central_start, roi_to_reference, window_to_roi
from ipmn.inputs import case_inputs
from ipmn.io import geometry, write_image, write_json
from ipmn.preprocess import prepare_case
from ipmn.vocab import (
    ATTENTION_FILE,
    ATTENTION_LABELS_FILE,
    ATTENTION_LEVELS,
    CLASS_NAMES,
    GRID_PNG_FILE,
    PREDICT_OUTPUTS,
    PREDICTION_FILE,
    PREDICTION_SCHEMA,
)


def preprocess_of(config: dict, where: str = "model") -> tuple[PreprocessConfig, dict | None]:
    """The preprocessing a model was trained with (and its learned Nyúl landmarks, if any), validated."""
    return package_preprocess(config, where)


def temperature_of(config: dict) -> float:
    """The softmax temperature recorded in a package (1.0 = uncalibrated); refuses a value that is not > 0."""
    t = (config.get("calibration") or {}).get("temperature", 1.0)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise IPMNError(f"the model's calibration temperature must be a positive number (got {t!r})")
    return float(t)


class Predictor:
    """Loaded model package(s) ready to predict cases."""

    def __init__(self, model_dirs, device: str = "auto", precision: str = "auto"):
        from ipmn.models import load_package

        dirs = [model_dirs] if isinstance(model_dirs, (str, os.PathLike)) else list(model_dirs)
        if not dirs:
            raise IPMNError("no model folder given")
        self.device = resolve_device(device)
        # auto: bf16 where the hardware has it (probabilities within ~0.002 of fp32, 3x faster on a CPU
        # with AVX512-BF16); fp32 elsewhere or when asked for.
        self.precision = resolve_precision(precision, self.device)
        self.dirs = [Path(d) for d in dirs]
        self.models, self.configs = [], []
        for d in self.dirs:
            model, config = load_package(d, device="cpu")
            preprocess_of(config, str(d / "config.json"))  # refuse values the filters cannot take, now
            self.models.append(model.to(self.device).eval())
            self.configs.append(config)
        first = self.configs[0]
        for d, c in zip(self.dirs[1:], self.configs[1:], strict=True):
            for key in ("modalities", "k", "cell", "class_names"):
                if c.get(key) != first.get(key):
                    raise IPMNError(f"ensemble: {d} has {key}={c.get(key)!r} but {self.dirs[0]} has {first.get(key)!r}")
        self.modalities = tuple(first["modalities"])
        self.k = int(first["k"])
        self.cell = int(first["cell"])
        self.class_names = list(first.get("class_names") or CLASS_NAMES)
        self.temperatures = [temperature_of(c) for c in self.configs]
        # a model trained with flips only (train.quarter_turns: false) is never shown a turned grid
        self.quarter_turns = all((c.get("training") or {}).get("augmentation") != "flips"
                                 for c in self.configs)

    # ------------------------------------------------------------------------------------------
    def _autocast(self):
        return autocast(self.precision, self.device)

    def _run_model(self, model, x: torch.Tensor, tta: bool):
        """(probabilities (W, classes), maps (W, H, W)) averaged over TTA."""
        from ipmn.augment import tta_transforms
        from ipmn.explain import explain

        identity = [(lambda t: t, lambda t: t)]
        transforms = tta_transforms(self.k, self.cell, quarter_turns=self.quarter_turns) if tta else identity
        probs, maps = [], []
        for forward, inverse in transforms:
            with self._autocast():
                logits, sal = explain(model, forward(x), k=self.k)
            probs.append(torch.softmax(logits.float(), dim=-1))
            maps.append(inverse(sal.float()))
        return torch.stack(probs).mean(0), torch.stack(maps).mean(0)

    def predict(
        self,
        t1=None,
        t2=None,
        roi=None,
        mask=None,
        out=None,
        windows: str = "central",
        tta: bool = False,
        stride: int = 1,
        margin_mm: float = 10.0,
        nonfinite: str = "refuse",
        pad: bool = False,
        levels=ATTENTION_LEVELS,
        fidelity: bool = False,
        progress=None,
        prepared: dict | None = None,
        series: dict | None = None,
        segment: str | None = None,
        dicom_out=None,
        inputs: tuple | None = None,
    ) -> dict:
        """Grade one case; write the outputs to ``out`` (when given) and return ``prediction.json``'s content.

        ``progress``: an :class:`ipmn.progress.Progress` told each stage with the fraction done.
        ``prepared`` (from :meth:`prepare`) skips reading and preprocessing, so that a batch can preprocess
        the next case while the model runs on this one (``ipmn evaluate``). ``inputs``: ``(volumes, roi,
        notes)`` already read by :func:`ipmn.inputs.case_inputs` (the CLI checks the case before loading
        the model). ``series`` / ``segment``: see :meth:`prepare`. ``dicom_out``: also write a DICOM SEG +
        SR there (:mod:`ipmn.dicom_out`). About 90 lines, 20 of them the signature: the body is the one-case
        pipeline in order, each stage a call to a helper.
        """
        from ipmn.progress import Progress

        progress = progress or Progress("none")
        check_options(windows, stride)
        t0 = time.perf_counter()
        if dicom_out is not None:  # refused before any work when T1 is not a DICOM series
            from ipmn.dicom_out import check_dicom_out

            check_dicom_out(t1, self.modalities)
        if prepared is None:
            prepared = self.prepare(t1, t2, roi, mask, margin_mm, nonfinite, progress, series, segment, inputs)
        volumes, box, per_model_case = prepared["volumes"], prepared["box"], prepared["cases"]
        timing: dict[str, float] = dict(prepared["timing"])
        case = per_model_case[0]
        for note in prepared["notes"]:
            progress.warn(note)

        progress.stage("model", fraction=0.5)
        t = time.perf_counter()
        starts, first_arr, all_probs, all_maps = self._infer(per_model_case, windows, stride, pad, tta)
        timing["model_and_explain"] = time.perf_counter() - t
        model_probs = self._calibrated(np.stack([p.mean(0) for p in all_probs]))  # (models, C)
        mean_probs = model_probs.mean(0)
        mean_probs = mean_probs / mean_probs.sum()
        pred = int(np.argmax(mean_probs))
        window_maps = np.stack(all_maps).mean(0)  # (W, H, W)
        shown = int(np.argmin(np.abs(np.array(starts) - central_start(max(case.n_slices, self.k), self.k))))

        fid = None
        if fidelity:
            progress.stage("fidelity", fraction=0.7)
            t = time.perf_counter()
            fid = self._fidelity(first_arr[shown], window_maps[shown], pred)
            timing["fidelity"] = time.perf_counter() - t

        progress.stage("maps", fraction=0.8)
        t = time.perf_counter()
        reference = volumes[self.modalities[0]] if "t1" not in volumes else volumes["t1"]
        heat, label_img, inside = self._maps_in_reference(case, window_maps, starts, reference, levels)
        self.last_maps = {"attention": heat, "inside": inside}  # for ipmn evaluate's localisation
        timing["maps"] = time.perf_counter() - t

        result = self._result(mean_probs, model_probs, all_probs, pred, windows, stride, starts, case, tta, fid,
                              levels, volumes, box)
        result["roi_coverage"] = {m: round(float(v), 4) for m, v in case.coverage.items()}
        result["warnings"] = list(prepared.get("notes") or [])
        if dicom_out is not None:
            from ipmn.dicom_out import write_dicom_outputs

            progress.stage("dicom", fraction=0.85)
            t = time.perf_counter()
            result["dicom"] = write_dicom_outputs(dicom_out, t1, (series or {}).get("t1"), label_img, result, levels)
            timing["dicom"] = time.perf_counter() - t
        if out is not None:
            progress.stage("write", fraction=0.9)
            t = time.perf_counter()
            self._write_outputs(Path(out), result, heat, label_img, first_arr[shown], window_maps[shown], timing, t, t0)
        else:
            timing["total"] = time.perf_counter() - t0
            result["timing_s"] = {k: round(v, 4) for k, v in timing.items()}
        progress.stage("done", fraction=1.0)
        return result

    def _calibrated(self, model_probs: np.ndarray) -> np.ndarray:
        """Each model's window-averaged probabilities with its fitted temperature applied (nested CV fits
        it on inner folds): ``softmax(log p / T)``, the same rule as the cv report's "after T"."""
        from ipmn.metrics import softmax

        out = model_probs.astype(np.float64)
        for i, t in enumerate(self.temperatures):
            if t != 1.0:
                out[i] = softmax(np.log(np.clip(out[i], 1e-12, 1.0))[None], t)[0]
        return out

    def prepare(self, t1=None, t2=None, roi=None, mask=None, margin_mm: float = 10.0, nonfinite: str = "refuse",
                progress=None, series: dict | None = None, segment: str | None = None, inputs: tuple | None = None) -> dict:
        """Read one case and put it on its ROI grid as every loaded model needs, once per distinct
        preprocessing (fold models may carry their own Nyúl landmarks). No torch: safe in a worker thread.
        ``series``: DICOM series UID per modality; ``segment``: which segment / ROI of a multi-part file;
        ``inputs``: ``(volumes, roi, notes)`` already read by :func:`ipmn.inputs.case_inputs`. The result's
        ``notes`` are the warnings the prediction records (inputs not used, ROI partly outside a volume)."""
        from ipmn.progress import Progress

        progress = progress or Progress("none")
        timing: dict[str, float] = {}
        t0 = time.perf_counter()
        progress.stage("read", fraction=0.05)
        if inputs is None:
            inputs = case_inputs(self.modalities, t1, t2, roi, mask, margin_mm, nonfinite, series, segment)
        volumes, box, notes = inputs
        timing["read"] = time.perf_counter() - t0
        progress.stage("preprocess", fraction=0.2)
        t = time.perf_counter()
        grids: dict[str, object] = {}
        per_model_case = []
        for d, config in zip(self.dirs, self.configs, strict=True):
            cfg, landmarks = preprocess_of(config, str(d / "config.json"))
            key = json.dumps([cfg.to_dict(), landmarks], sort_keys=True)
            if key not in grids:
                grids[key] = prepare_case(volumes, box, cfg, self.modalities, landmarks)
            per_model_case.append(grids[key])
        timing["preprocess_wall"] = time.perf_counter() - t  # T1 and T2 run side by side: < sum of stages
        for name, seconds in per_model_case[0].timing.items():
            stage = name.split("_", 1)[-1]
            timing[stage] = timing.get(stage, 0.0) + seconds
        notes = list(notes) + coverage_notes(per_model_case[0].coverage)
        return {"volumes": volumes, "box": box, "cases": per_model_case, "timing": timing, "notes": notes}

    def _infer(self, per_model_case, windows: str, stride: int, pad: bool, tta: bool):
        """Every model on its windows: (starts, first model's windows, [probs (W, C)], [maps (W, H, W)])."""
        all_probs, all_maps, starts, first_arr = [], [], None, None
        for model, mcase in zip(self.models, per_model_case, strict=True):
            starts, arr = case_windows(mcase.data, self.k, windows, stride, pad)
            first_arr = arr if first_arr is None else first_arr
            x = torch.from_numpy(arr).to(self.device)
            try:
                probs, maps = self._run_model(model, x, tta)
            except torch.cuda.OutOfMemoryError as exc:
                raise IPMNError("out of GPU memory; run with --device cpu or --windows central") from exc
            all_probs.append(probs.cpu().numpy())
            all_maps.append(maps.cpu().numpy())
        return starts, first_arr, all_probs, all_maps

    def _maps_in_reference(self, case, window_maps, starts, reference, levels):
        """Window maps → the ROI grid (normalised to a peak of 1) → T1's geometry; plus the level labels."""
        roi_map = window_to_roi(list(window_maps), starts, case.n_slices, self.k)
        peak = float(roi_map.max())
        if peak > 0:
            roi_map = roi_map / peak
        covered = np.zeros(case.n_slices, bool)
        for s in starts:
            covered[s : s + self.k] = True
        heat = roi_to_reference(case.grid.image_from_array(roi_map), reference)
        heat = sitk.Clamp(heat, sitk.sitkFloat32, 0.0, 1.0)
        inside_grid = case.grid.image_from_array(np.broadcast_to(covered[:, None, None], roi_map.shape).astype(np.float32))
        inside = sitk.GetArrayFromImage(roi_to_reference(inside_grid, reference, sitk.sitkNearestNeighbor)) > 0.5
        labels = attention_labels(sitk.GetArrayViewFromImage(heat), inside, levels)
        label_img = sitk.GetImageFromArray(labels)
        label_img.CopyInformation(reference)
        return heat, label_img, inside

    def _result(self, mean_probs, model_probs, all_probs, pred, windows, stride, starts, case, tta, fid, levels,
                volumes, box) -> dict:
        """The content of ``prediction.json`` (schema :data:`ipmn.vocab.PREDICTION_SCHEMA`), timing excluded."""
        names = self.class_names
        uncertainty = {
            "entropy": float(-(mean_probs * np.log(np.clip(mean_probs, 1e-12, 1))).sum() / math.log(len(mean_probs))),
            "window_std": {n: float(v) for n, v in zip(names, np.stack(all_probs).mean(0).std(0), strict=True)},
            "ensemble_std": (
                {n: float(v) for n, v in zip(names, model_probs.std(0, ddof=1), strict=True)}
                if len(self.models) > 1 else None
            ),
        }
        first = self.configs[0]
        cohort = first.get("cohort")
        return {
            "schema": PREDICTION_SCHEMA,
            "classes": names,
            "probabilities": {n: float(p) for n, p in zip(names, mean_probs, strict=True)},
            "predicted_class": names[pred],
            "predicted_index": pred,
            "uncertainty": uncertainty,
            "model": {
                "name": first.get("name") or self.dirs[0].name,
                "id": first.get("id") or self.dirs[0].name,
                "arch": first.get("arch"),
                "fusion": first.get("fusion"),
                "modalities": list(self.modalities),
                "card": first.get("card", ""),
                "trained_on": first.get("trained_on") or (cohort.get("description") if isinstance(cohort, dict)
                                                          else cohort),
                "n_models": len(self.models),
                "folders": [str(d) for d in self.dirs],
            },
            "windows": {"mode": windows, "k": self.k, "stride": stride, "starts": [int(s) for s in starts],
                        "n_roi_slices": case.n_slices, "tta": bool(tta)},
            "explanation": {
                "method": "attention_rollout" if _is_vit(self.models[0]) else "gradcam",
                "deletion_auc": None if fid is None else fid["auc_saliency"],
                "random_deletion_auc": None if fid is None else fid["auc_random"],
            },
            "calibration": {"temperature": self.temperatures if len(self.models) > 1 else self.temperatures[0],
                            "applied": any(t != 1.0 for t in self.temperatures)},
            "attention_levels": {str(i + 1): f"top {lv:g}%" for i, lv in enumerate(levels)},
            "device": str(self.device),
            "precision": self.precision,
            "input_geometry": {m: geometry(v) for m, v in volumes.items()} | {"roi": box.to_dict(), "grid": case.grid.to_dict()},
        }

    def _write_outputs(self, out: Path, result, heat, label_img, image, saliency, timing: dict, t_write, t0) -> None:
        """Stage every output in a hidden folder inside ``out``, then commit them as one unit.

        Under a lock on ``out`` (two predictions into one folder take turns): staging folders left by
        killed writers are removed, the old ``prediction.json`` goes first, the maps follow and the new
        ``prediction.json`` (which names every output and its SHA-256) comes last. A writer killed at any
        point leaves either the previous complete set or maps without a ``prediction.json``, never a new
        map beside an old ``prediction.json``.
        """
        from ipmn.vocab import sha256_file

        out.mkdir(parents=True, exist_ok=True)
        with output_lock(out):
            remove_stale_staging(out)
            staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
            try:
                self._write(staging, result, heat, label_img, image, saliency)
                result["output_sha256"] = {name: sha256_file(staging / name)
                                           for name in PREDICT_OUTPUTS if name != PREDICTION_FILE}
                timing["write"] = time.perf_counter() - t_write
                timing["total"] = time.perf_counter() - t0
                result["timing_s"] = {k: round(v, 4) for k, v in timing.items()}
                write_json(result, staging / PREDICTION_FILE)
                try:
                    os.unlink(out / PREDICTION_FILE)
                except FileNotFoundError:
                    pass
                for name in PREDICT_OUTPUTS:  # prediction.json last: it marks a complete set
                    os.replace(staging / name, out / name)
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    def _fidelity(self, image: np.ndarray, saliency: np.ndarray, pred: int) -> dict:
        from ipmn.explain import deletion_curve

        x = torch.from_numpy(image[None]).to(self.device)
        with torch.inference_mode(), self._autocast():
            curve = deletion_curve(self.models[0], x, torch.from_numpy(saliency), pred, steps=8)
        return {"auc_saliency": float(curve["auc_saliency"]), "auc_random": float(curve["auc_random"])}

    def _write(self, out: Path, result, heat, labels, image: np.ndarray, saliency: np.ndarray):
        from ipmn.render import grid_png

        write_image(heat, out / ATTENTION_FILE)
        write_image(labels, out / ATTENTION_LABELS_FILE)
        probs = ", ".join(f"{n} {p:.2f}" for n, p in result["probabilities"].items())
        grid_png(out / GRID_PNG_FILE, image, self.modalities, saliency,
                 title=f"{result['predicted_class'].upper()}  ({probs})", k=self.k)
        result["outputs"] = {"attention": ATTENTION_FILE, "attention_labels": ATTENTION_LABELS_FILE,
                             "grid_png": GRID_PNG_FILE, "prediction": PREDICTION_FILE}


STAGING_PREFIX = ".ipmn-predict-"


@contextlib.contextmanager
def output_lock(folder: Path):
    """An exclusive lock on an output folder (``flock`` on the folder itself: no lock file is left).
    Where ``flock`` does not exist (Windows) the block runs unlocked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def remove_stale_staging(folder: Path) -> None:
    """Remove staging folders of predictions killed mid-write (call with :func:`output_lock` held: every
    writer stages under the lock, so any staging folder found then is stale)."""
    for path in folder.glob(STAGING_PREFIX + "*"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


def check_options(windows, stride) -> None:
    """Refuse option values that would otherwise be changed silently."""
    if windows not in ("central", "all"):
        raise IPMNError(f"windows must be 'central' or 'all' (got {windows!r})")
    if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
        raise IPMNError(f"stride must be an integer >= 1 (got {stride!r})")


def coverage_notes(coverage: dict, full: float = 0.999) -> list[str]:
    """Warnings for modalities that do not cover the whole ROI grid (the rest is zero-filled)."""
    return [f"the ROI lies {100 * (1 - v):.0f}% outside the {m.upper()} volume; that part is filled with zeros"
            for m, v in coverage.items() if v < full]


def _is_vit(model) -> bool:
    from ipmn.models import is_vit

    return is_vit(model)


def attention_labels(heat: np.ndarray, inside: np.ndarray, levels=ATTENTION_LEVELS) -> np.ndarray:
    """uint8 labels: 1..n for voxels in the top ``levels[i]`` % of attention inside the ROI."""
    labels = np.zeros(heat.shape, np.uint8)
    values = heat[inside]
    if values.size == 0 or float(values.max()) <= 0:
        return labels
    for i, lv in enumerate(sorted(levels, reverse=True)):
        thr = np.percentile(values, 100.0 - lv)
        labels[inside & (heat >= thr) & (heat > 0)] = i + 1
    return labels


def summary_line(result: dict) -> str:
    probs = " ".join(f"{n}={p:.2f}" for n, p in result["probabilities"].items())
    return (f"{result['predicted_class'].upper()} ({probs}; uncertainty {result['uncertainty']['entropy']:.2f}) "
            f"model {result['model']['name']}, {len(result['windows']['starts'])} window(s), "
            f"{result.get('precision', 'precision not recorded')}, {result['timing_s'].get('total', 0):.2f} s")


# ------------------------------------------------------------------------------------------- worker
_REQUEST_TYPES = {"cmd": str, "model": str, "ensemble": list, "t1": str, "t2": str, "roi": str, "mask": str,
                  "out": str, "windows": str, "stride": int, "margin": (int, float), "nonfinite": str, "tta": bool,
                  "fidelity": bool, "pad": bool, "device": str, "precision": str, "t1_series": str,
                  "t2_series": str, "mask_segment": str, "dicom_out": str}


def check_request(req) -> dict:
    """A worker request as a dict of correctly typed values, or one IPMNError naming what is wrong.

    ``"tta": "false"`` is refused, not read as true; unknown keys are named."""
    if not isinstance(req, dict):
        raise IPMNError(f"a request must be a JSON object, got {type(req).__name__}")
    unknown = sorted(k for k in req if k not in _REQUEST_TYPES)
    if unknown:
        raise IPMNError(f"unknown request key(s) {unknown}; valid: {', '.join(_REQUEST_TYPES)}")
    for key, value in req.items():
        kind = _REQUEST_TYPES[key]
        if value is None and key not in ("cmd", "out"):
            continue
        wrong = not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, (int, float)))
        if wrong:
            want = {bool: "true or false", str: "a string", int: "an integer", list: "a list"}.get(kind, "a number")
            raise IPMNError(f"request key {key!r} must be {want}, got {json.dumps(value)}")
    if "ensemble" in req and req["ensemble"] is not None and not all(isinstance(m, str) for m in req["ensemble"]):
        raise IPMNError("request key 'ensemble' must be a list of model folders (strings)")
    return req


def serve(stdin=None, stdout=None) -> int:
    """Answer JSON requests, one per line, keeping models loaded between them (``ipmn worker``).

    Events go out in the protocol of :mod:`ipmn.progress` (``ready``, ``stage``, ``done``, ``error``, ``bye``).
    A request that is not a JSON object, has a value of the wrong type, or names an unwritable ``out``
    gets an ``error`` event; the worker keeps serving.
    """
    from ipmn.progress import Progress

    stdin = stdin or sys.stdin
    events = Progress("jsonl", stream=stdout or sys.stdout)
    cache: dict[tuple, Predictor] = {}
    events.emit("ready", pid=os.getpid())
    for line in stdin:
        line = line.strip()
        if not line:
            continue
        try:
            req = check_request(json.loads(line))
        except json.JSONDecodeError:
            events.error("request is not valid JSON")
            continue
        except IPMNError as exc:
            events.error(str(exc))
            continue
        cmd = req.get("cmd", "predict")
        if cmd == "quit":
            events.emit("bye")
            return 0
        if cmd != "predict":
            events.error(f"unknown cmd {cmd!r}")
            continue
        try:
            _serve_one(req, cache, events)
        except IPMNError as exc:
            events.error(str(exc))
        except Exception as exc:  # noqa: BLE001 - a worker must survive one bad case
            events.error(f"internal error: {type(exc).__name__}: {str(exc)[:300]}")
    return 0


def _serve_one(req: dict, cache: dict, events) -> None:
    """One predict request: inputs and ``out`` checked before the model set is (re)loaded."""
    from ipmn.inputs import model_configs
    from ipmn.io import check_out_dir

    models = req.get("ensemble") or ([req["model"]] if req.get("model") else [])
    if not models:
        raise IPMNError("request misses 'model' (or 'ensemble')")
    if "out" not in req:
        raise IPMNError("request misses 'out'")
    out = check_out_dir(req["out"], "out")
    windows = req["windows"] if req.get("windows") is not None else "central"
    stride = req["stride"] if req.get("stride") is not None else 1
    check_options(windows, stride)
    configs = model_configs(models)
    series = {m: req[f"{m}_series"] for m in ("t1", "t2") if req.get(f"{m}_series")}
    inputs = case_inputs(configs[0]["modalities"], req.get("t1"), req.get("t2"), req.get("roi"), req.get("mask"),
                         10.0 if req.get("margin") is None else req["margin"], req.get("nonfinite") or "refuse",
                         series, req.get("mask_segment"))
    device = resolve_device(req.get("device") or "auto")
    precision = resolve_precision(req.get("precision") or "auto", device)
    key = (tuple(str(Path(m).resolve()) for m in models), str(device), precision)
    if key not in cache:
        cache.clear()  # one model set alive at a time: memory stays bounded
        events.stage("load_model", fraction=0.02)
        cache[key] = Predictor(models, device=str(device), precision=precision)
    result = cache[key].predict(out=out, windows=windows, stride=stride, tta=bool(req.get("tta")),
                                pad=bool(req.get("pad")), fidelity=bool(req.get("fidelity")), progress=events,
                                inputs=inputs, t1=req.get("t1"), series=series, dicom_out=req.get("dicom_out"))
    events.emit("done", out=str(out), prediction=result)
