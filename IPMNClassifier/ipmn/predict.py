"""Inference: one case → class probabilities, an explanation map, and volumes in T1's geometry.

:class:`Predictor` loads one model package (or several, e.g. the CV folds, as an ensemble) once and
then predicts case after case; ``ipmn predict`` builds one per process, ``ipmn worker`` keeps one alive
between requests (the Slicer module's way to pay torch's start-up once).

Per case: read volumes + ROI → ROI grid and preprocessing as recorded in the model's config → the
central window (paper) or all windows → model (optionally test-time flips/rotations, identical on every
cell) → probabilities averaged over windows, TTA and models → Attention Rollout (ViT) or Grad-CAM (CNN)
maps put back on their ROI slices and resampled into T1's geometry → a heat map in [0, 1] and a label
map of the most-attended voxels. All files are written atomically.
"""

from __future__ import annotations

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

from ipmn import CLASS_NAMES
from ipmn.device import autocast, resolve_device, resolve_precision
from ipmn.errors import IPMNError
from ipmn.grid import case_windows, central_start, roi_to_reference, window_to_roi
from ipmn.inputs import load_inputs
from ipmn.io import geometry, write_image, write_json
from ipmn.preprocess import PreprocessConfig, prepare_case

SCHEMA = "ipmn.prediction/1"
DEFAULT_LEVELS = (20.0, 10.0, 5.0)  # label 1, 2, 3 = top 20 %, 10 %, 5 % of attention inside the ROI


def preprocess_of(config: dict) -> tuple[PreprocessConfig, dict | None]:
    """The preprocessing a model was trained with (and its learned Nyúl landmarks, if any)."""
    pre = dict(config.get("preprocess") or {})
    landmarks = pre.pop("landmarks", None) or config.get("landmarks")
    pre.setdefault("cell", int(config.get("cell", 64)))
    return PreprocessConfig.from_dict(pre), landmarks


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

    # ------------------------------------------------------------------------------------------
    def _autocast(self):
        return autocast(self.precision, self.device)

    def _run_model(self, model, x: torch.Tensor, tta: bool):
        """(probabilities (W, classes), maps (W, H, W)) averaged over TTA."""
        from ipmn.explain import explain, tta_transforms

        transforms = tta_transforms(self.k, self.cell) if tta else [(lambda t: t, lambda t: t)]
        probs, maps = [], []
        for forward, inverse in transforms:
            with self._autocast():
                logits, sal = explain(model, forward(x))
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
        levels=DEFAULT_LEVELS,
        fidelity: bool = False,
        progress=None,
        series: dict | None = None,
        segment: str | None = None,
        dicom_out=None,
    ) -> dict:
        report = progress or (lambda stage, fraction: None)
        timing: dict[str, float] = {}
        t0 = time.perf_counter()
        if dicom_out is not None:
            from ipmn.dicom_out import check_dicom_out

            check_dicom_out(t1, self.modalities)
        report("read", 0.05)
        volumes, box = load_inputs(t1, t2, roi, mask, self.modalities, margin_mm, nonfinite, series, segment)
        timing["read"] = time.perf_counter() - t0

        # Preprocess once per distinct preprocessing (fold models may carry their own Nyúl landmarks).
        report("preprocess", 0.2)
        t = time.perf_counter()
        grids: dict[str, object] = {}
        per_model_case = []
        for config in self.configs:
            cfg, landmarks = preprocess_of(config)
            key = json.dumps([cfg.to_dict(), landmarks], sort_keys=True)
            if key not in grids:
                grids[key] = prepare_case(volumes, box, cfg, self.modalities, landmarks)
            per_model_case.append(grids[key])
        case = per_model_case[0]
        timing["preprocess_wall"] = time.perf_counter() - t  # T1 and T2 run side by side: < sum of stages
        for name, seconds in case.timing.items():
            stage = name.split("_", 1)[-1]
            timing[stage] = timing.get(stage, 0.0) + seconds

        report("model", 0.5)
        t = time.perf_counter()
        all_probs, all_maps, starts, first_arr = [], [], None, None
        explain_time = 0.0
        for model, mcase in zip(self.models, per_model_case, strict=True):
            starts, arr = case_windows(mcase.data, self.k, windows, stride, pad)
            first_arr = arr if first_arr is None else first_arr
            x = torch.from_numpy(arr).to(self.device)
            te = time.perf_counter()
            try:
                probs, maps = self._run_model(model, x, tta)
            except torch.cuda.OutOfMemoryError as exc:
                raise IPMNError("out of GPU memory; run with --device cpu or --windows central") from exc
            explain_time += time.perf_counter() - te
            all_probs.append(probs.cpu().numpy())  # (W, C)
            all_maps.append(maps.cpu().numpy())  # (W, H, W)
        timing["model_and_explain"] = time.perf_counter() - t
        model_probs = np.stack([p.mean(0) for p in all_probs])  # (models, C)
        mean_probs = model_probs.mean(0)
        mean_probs = mean_probs / mean_probs.sum()
        pred = int(np.argmax(mean_probs))
        window_maps = np.stack(all_maps).mean(0)  # (W, H, W)
        shown = int(np.argmin(np.abs(np.array(starts) - central_start(max(case.n_slices, self.k), self.k))))

        fid = None
        if fidelity:
            report("fidelity", 0.7)
            t = time.perf_counter()
            fid = self._fidelity(first_arr[shown], window_maps[shown], pred)
            timing["fidelity"] = time.perf_counter() - t

        report("maps", 0.8)
        t = time.perf_counter()
        reference = volumes[self.modalities[0]] if "t1" not in volumes else volumes["t1"]
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
        timing["maps"] = time.perf_counter() - t

        uncertainty = {
            "entropy": float(-(mean_probs * np.log(np.clip(mean_probs, 1e-12, 1))).sum() / math.log(len(mean_probs))),
            "window_std": {n: float(v) for n, v in zip(self.class_names, np.stack(all_probs).mean(0).std(0), strict=True)},
            "ensemble_std": (
                {n: float(v) for n, v in zip(self.class_names, model_probs.std(0, ddof=1), strict=True)}
                if len(self.models) > 1 else None
            ),
        }
        first = self.configs[0]
        result = {
            "schema": SCHEMA,
            "classes": self.class_names,
            "probabilities": {n: float(p) for n, p in zip(self.class_names, mean_probs, strict=True)},
            "predicted_class": self.class_names[pred],
            "predicted_index": pred,
            "uncertainty": uncertainty,
            "model": {
                "name": first.get("name") or self.dirs[0].name,
                "id": first.get("id") or self.dirs[0].name,
                "arch": first.get("arch"),
                "fusion": first.get("fusion"),
                "modalities": list(self.modalities),
                "card": first.get("card", ""),
                "trained_on": (first.get("cohort") or {}).get("description") if isinstance(first.get("cohort"), dict) else first.get("cohort"),
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
            "attention_levels": {str(i + 1): f"top {lv:g}%" for i, lv in enumerate(levels)},
            "device": str(self.device),
            "precision": self.precision,
            "input_geometry": {m: geometry(v) for m, v in volumes.items()} | {"roi": box.to_dict(), "grid": case.grid.to_dict()},
        }
        if dicom_out is not None:
            from ipmn.dicom_out import write_dicom_outputs

            report("dicom", 0.85)
            t = time.perf_counter()
            result["dicom"] = write_dicom_outputs(dicom_out, t1, (series or {}).get("t1"), label_img, result, levels)
            timing["dicom"] = time.perf_counter() - t
        if out is not None:
            report("write", 0.9)
            t = time.perf_counter()
            out = Path(out)
            out.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".ipmn-predict-", dir=out))
            try:
                self._write(staging, result, heat, label_img, first_arr[shown], window_maps[shown])
                timing["write"] = time.perf_counter() - t
                timing["total"] = time.perf_counter() - t0
                result["timing_s"] = {k: round(v, 4) for k, v in timing.items()}
                write_json(result, staging / "prediction.json")
                for name in ("attention.nii.gz", "attention_labels.nii.gz", "grid.png", "prediction.json"):
                    os.replace(staging / name, out / name)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        else:
            timing["total"] = time.perf_counter() - t0
            result["timing_s"] = {k: round(v, 4) for k, v in timing.items()}
        report("done", 1.0)
        return result

    def _fidelity(self, image: np.ndarray, saliency: np.ndarray, pred: int) -> dict:
        from ipmn.explain import deletion_curve

        x = torch.from_numpy(image[None]).to(self.device)
        with torch.inference_mode(), self._autocast():
            curve = deletion_curve(self.models[0], x, torch.from_numpy(saliency), pred, steps=8)
        return {"auc_saliency": float(curve["auc_saliency"]), "auc_random": float(curve["auc_random"])}

    def _write(self, out: Path, result, heat, labels, image: np.ndarray, saliency: np.ndarray):
        from ipmn.render import grid_png

        write_image(heat, out / "attention.nii.gz")
        write_image(labels, out / "attention_labels.nii.gz")
        probs = ", ".join(f"{n} {p:.2f}" for n, p in result["probabilities"].items())
        grid_png(out / "grid.png", image, self.modalities, saliency,
                 title=f"{result['predicted_class'].upper()}  ({probs})", k=self.k)
        result["outputs"] = {"attention": "attention.nii.gz", "attention_labels": "attention_labels.nii.gz",
                             "grid_png": "grid.png", "prediction": "prediction.json"}


def _is_vit(model) -> bool:
    from ipmn.models import is_vit

    return is_vit(model)


def attention_labels(heat: np.ndarray, inside: np.ndarray, levels=DEFAULT_LEVELS) -> np.ndarray:
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
def serve(stdin=None, stdout=None) -> int:
    """Answer JSON requests, one per line, keeping models loaded between them (``ipmn worker``)."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout

    def emit(obj):
        stdout.write(json.dumps(obj) + "\n")
        stdout.flush()

    cache: dict[tuple, Predictor] = {}
    emit({"event": "ready", "pid": os.getpid()})
    for line in stdin:
        line = line.strip()
        if not line:
            continue
        try:
            req = json.loads(line)
        except json.JSONDecodeError:
            emit({"event": "error", "message": "request is not valid JSON"})
            continue
        cmd = req.get("cmd", "predict")
        if cmd == "quit":
            emit({"event": "bye"})
            return 0
        if cmd != "predict":
            emit({"event": "error", "message": f"unknown cmd {cmd!r}"})
            continue
        try:
            models = req.get("ensemble") or [req["model"]]
            device = resolve_device(req.get("device", "auto"))
            precision = resolve_precision(req.get("precision", "auto"), device)
            key = (tuple(str(Path(m).resolve()) for m in models), str(device), precision)
            if key not in cache:
                cache.clear()  # one model set alive at a time: memory stays bounded
                emit({"event": "stage", "stage": "load_model", "fraction": 0.02})
                cache[key] = Predictor(models, device=str(device), precision=precision)
            result = cache[key].predict(
                t1=req.get("t1"), t2=req.get("t2"), roi=req.get("roi"), mask=req.get("mask"), out=req["out"],
                windows=req.get("windows", "central"), tta=bool(req.get("tta", False)),
                fidelity=bool(req.get("fidelity", False)),
                progress=lambda s, f: emit({"event": "stage", "stage": s, "fraction": f}),
                series={m: req[f"{m}_series"] for m in ("t1", "t2") if req.get(f"{m}_series")},
                segment=req.get("mask_segment"), dicom_out=req.get("dicom_out"),
            )
            emit({"event": "done", "out": str(req["out"]), "prediction": result})
        except IPMNError as exc:
            emit({"event": "error", "message": str(exc)})
        except KeyError as exc:
            emit({"event": "error", "message": f"request misses {exc}"})
        except Exception as exc:  # noqa: BLE001 - a worker must survive one bad case
            emit({"event": "error", "message": f"internal error: {type(exc).__name__}: {str(exc)[:300]}"})
    return 0
