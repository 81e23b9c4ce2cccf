"""Helpers for the Slicer-module tests that run without the Slicer application (``slicer-core``).

Imported by ``test_slicer_logic.py`` / ``test_slicer_static.py``; not a pytest conftest on purpose (the
shared ``conftest.py`` belongs to the engine tests).
"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CLASSIFIER_DIR = REPO / "IPMNClassifier"
TRAINER_DIR = REPO / "IPMNTrainer"
for _p in (CLASSIFIER_DIR, TRAINER_DIR):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))


def make_scene(monkeypatch):
    """A real MRML scene with the application, colour and subject-hierarchy logics, as Slicer sets it up."""
    import slicer

    from IPMNClassifierLib.slicecompose import sceneWithLogics

    scene, volumes = sceneWithLogics()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    return scene, volumes


def write_volume(
    path,
    shape=(16, 40, 48),
    spacing=(0.9, 0.8, 4.0),
    origin=(10.0, -20.0, 30.0),
    direction=None,
    seed=0,
    dtype=np.float32,
) -> Path:
    """A random volume written with SimpleITK (array shape is (slices, rows, columns))."""
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    image = sitk.GetImageFromArray((rng.random(shape) * 100).astype(dtype))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    if direction is not None:
        image.SetDirection([float(d) for d in np.asarray(direction, dtype=float).ravel()])
    sitk.WriteImage(image, str(path))
    return Path(path)


def oblique_direction(degrees: float = 10.0) -> np.ndarray:
    """LPS direction cosines rotated about the A-P axis (an oblique acquisition)."""
    a = np.deg2rad(degrees)
    return np.array([[np.cos(a), 0.0, -np.sin(a)], [0.0, 1.0, 0.0], [np.sin(a), 0.0, np.cos(a)]])


def ijk_to_ras(node) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])


# A stand-in for ``python -m ipmn`` that follows the engine contract (predict, worker, cv, train) and writes
# outputs with SimpleITK, so the Slicer logic can be tested without torch. Behaviour switches by env vars:
# FAKE_IPMN_MODE=user_error | crash | hang | spawn_and_hang.
FAKE_ENGINE = textwrap.dedent(r"""
    import json, os, sys, time
    from pathlib import Path
    import numpy as np
    import SimpleITK as sitk

    MODE = os.environ.get("FAKE_IPMN_MODE", "")

    def emit(obj):
        print(json.dumps(obj), flush=True)

    def roi_mask(image, roi_path):
        data = json.load(open(roi_path, encoding="utf-8"))["markups"][0]
        center = np.array(data["center"], float)
        axes = np.array(data.get("orientation", [1, 0, 0, 0, 1, 0, 0, 0, 1]), float).reshape(3, 3)
        if data.get("coordinateSystem", "LPS") == "RAS":
            flip = np.diag([-1.0, -1.0, 1.0])
            center, axes = flip @ center, flip @ axes
        half = np.array(data["size"], float) / 2.0
        size = image.GetSize()
        idx = np.stack(np.meshgrid(*[np.arange(s) for s in size], indexing="ij"), -1).reshape(-1, 3)
        d = np.array(image.GetDirection()).reshape(3, 3)
        pts = np.array(image.GetOrigin()) + (idx * np.array(image.GetSpacing())) @ d.T
        local = (pts - center) @ axes
        inside = np.all(np.abs(local) <= half + 1e-6, axis=1)
        return inside.reshape(size).transpose(2, 1, 0)  # (z, y, x)

    def read(path):
        if Path(path).is_dir():  # a DICOM series folder (DICOM out from Slicer)
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
            return reader.Execute()
        return sitk.ReadImage(path)

    def predict(t1, t2, roi, model, out, device="auto", windows="central", tta=False, ensemble=(), extra=None):
        if MODE == "user_error":
            print("ipmn: error: the ROI covers 3 slices; k=9 needs 9", file=sys.stderr, flush=True)
            return 2
        if MODE == "crash":
            print("Traceback (most recent call last):", file=sys.stderr, flush=True)
            print("RuntimeError: DefaultCPUAllocator: not enough memory", file=sys.stderr, flush=True)
            return 1
        if MODE == "spawn_and_hang":
            import subprocess
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "child.pid").write_text(str(child.pid))
            emit({"event": "stage", "stage": "spawned", "fraction": 0.1})
            time.sleep(120)
        emit({"event": "stage", "stage": "read", "fraction": 0.05})
        image = read(t1)
        read(t2)
        inside = roi_mask(image, roi)
        rng = np.random.default_rng(int(os.environ.get("FAKE_IPMN_SEED", "1")))
        heat = np.where(inside, rng.random(inside.shape), 0.0).astype(np.float32)
        labels = np.zeros(inside.shape, np.uint8)
        values = heat[inside]
        for i, lv in enumerate((20.0, 10.0, 5.0)):
            labels[inside & (heat >= np.percentile(values, 100 - lv))] = i + 1
        emit({"event": "stage", "stage": "explain", "fraction": 0.8})
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for name, arr in (("attention.nii.gz", heat), ("attention_labels.nii.gz", labels)):
            img = sitk.GetImageFromArray(arr)
            img.CopyInformation(image)
            sitk.WriteImage(img, str(out / name))
        sitk.WriteImage(sitk.GetImageFromArray((rng.random((32, 32)) * 255).astype(np.uint8)), str(out / "grid.png"))
        p = rng.random(3) + 0.1
        p = p / p.sum()
        classes = ["normal", "low", "high"]
        pred = {"schema": "ipmn.prediction/1", "classes": classes,
                "probabilities": dict(zip(classes, map(float, p))),
                "predicted_class": classes[int(np.argmax(p))], "predicted_index": int(np.argmax(p)),
                "uncertainty": {"entropy": float(-(p * np.log(p)).sum()),
                                "ensemble_std": {c: 0.01 for c in classes} if ensemble else None},
                "model": {"name": Path(model).name, "id": "fake", "arch": "vit_tiny_patch16_224",
                          "card": "fake model for tests", "trained_on": "nothing"},
                "windows": {"mode": windows, "k": 9, "starts": [0]},
                "explanation": {"method": "attention_rollout", "deletion_auc": 0.2, "random_deletion_auc": 0.4},
                "attention_levels": {"1": "top 20%", "2": "top 10%", "3": "top 5%"},
                "timing_s": {"total": 0.1},
                "outputs": {"attention": "attention.nii.gz", "attention_labels": "attention_labels.nii.gz",
                            "grid_png": "grid.png"},
                "args": {"device": device, "tta": tta, "ensemble": list(ensemble), "pid": os.getpid(),
                         "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "t1": t1, **(extra or {})}}
        (out / "prediction.json").write_text(json.dumps(pred))
        return 0

    def arg(argv, name, default=None):
        return argv[argv.index(name) + 1] if name in argv else default

    def many(argv, name):
        if name not in argv:
            return []
        vals = []
        for a in argv[argv.index(name) + 1:]:
            if a.startswith("--"):
                break
            vals.append(a)
        return vals

    def worker():
        emit({"event": "ready", "pid": os.getpid()})
        for line in sys.stdin:
            req = json.loads(line)
            if req.get("cmd") == "quit":
                emit({"event": "bye"})
                return 0
            if MODE == "crash":
                print("Segmentation fault (core dumped)", flush=True)
                os._exit(139)
            try:
                code = predict(req["t1"], req["t2"], req["roi"], req["model"], req["out"], req.get("device"),
                               req.get("windows"), req.get("tta"), req.get("ensemble") or (),
                               {k: req[k] for k in ("t1_series", "dicom_out", "mask_segment") if k in req})
            except Exception as exc:
                emit({"event": "error", "message": f"internal error: {exc}"})
                continue
            if code == 0:
                emit({"event": "done", "out": req["out"]})
            else:
                emit({"event": "error", "message": "the ROI covers 3 slices; k=9 needs 9"})
        return 0

    def fake_package(folder):
        from safetensors.numpy import save_file
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"w": np.zeros(4, np.float32)}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"name": folder.parent.name, "arch": "vit_tiny_patch16_224",
                                                        "class_names": ["normal", "low", "high"], "k": 9,
                                                        "card": "fold model"}))

    def cv(argv):
        out = Path(arg(argv, "--out"))
        outer, inner = int(arg(argv, "--outer", 2)), int(arg(argv, "--inner", 2))
        models = many(argv, "--models") or ["vit_tiny"]
        epochs = 3
        folds = []
        for model in models:
            for fold in range(outer):
                for inn in list(range(inner)) + [None]:
                    for epoch in range(1, epochs + 1):
                        ev = {"event": "epoch", "model": model, "fold": fold, "epoch": epoch, "epochs": epochs,
                              "train_loss": 1.0 / epoch, "val_loss": 1.2 / epoch, "val_acc": 0.3 * epoch,
                              "eta_s": 1.0}
                        if inn is not None:
                            ev["inner"] = inn
                        emit(ev)
                        if MODE == "hang":
                            time.sleep(60)
                fake_package(out / model / f"fold_{fold}" / "model")
                metrics = {"accuracy": 0.5 + 0.1 * fold, "balanced_accuracy": 0.4 + 0.1 * fold, "macro_f1": 0.3}
                folds.append({"fold": fold, "metrics": metrics})
                emit({"event": "fold_done", "model": model, "fold": fold, "metrics": metrics})
        acc = [f["metrics"]["accuracy"] for f in folds]
        summary = {"accuracy": {"mean": float(np.mean(acc)), "std": float(np.std(acc, ddof=1)), "ddof": 1},
                   "balanced_accuracy": {"mean": 0.45, "std": 0.07, "ddof": 1}, "macro_f1": 0.3, "ece": 0.1}
        (out / "metrics.json").write_text(json.dumps({"summary": summary, "folds": folds, "models": models}))
        (out / "report.html").write_text("<html></html>")
        emit({"event": "done", "out": str(out)})
        return 0

    def main(argv):
        cmd = argv[0]
        if cmd == "predict":
            code = predict(arg(argv, "--t1"), arg(argv, "--t2"), arg(argv, "--roi"), arg(argv, "--model"),
                           arg(argv, "--out"), arg(argv, "--device", "auto"), arg(argv, "--windows", "central"),
                           "--tta" in argv, many(argv, "--ensemble"),
                           {k: arg(argv, f"--{k.replace('_', '-')}") for k in ("t1_series", "dicom_out")
                            if f"--{k.replace('_', '-')}" in argv})
            if code == 0:
                emit({"event": "done", "out": arg(argv, "--out")})
            return code
        if cmd == "worker":
            return worker()
        if cmd == "cv":
            return cv(argv)
        if cmd == "train":
            fake_package(Path(arg(argv, "--out")))
            emit({"event": "epoch", "fold": 0, "epoch": 1, "epochs": 1, "train_loss": 0.5, "val_loss": 0.6,
                  "val_acc": 0.5, "eta_s": 0})
            emit({"event": "done", "out": arg(argv, "--out")})
            return 0
        print(f"ipmn: error: unknown command {cmd}", file=sys.stderr)
        return 2

    if __name__ == "__main__":
        sys.exit(main(sys.argv[1:]))
""")


def fake_launcher(tmp_path, mode: str = "", extra_env: dict | None = None):
    """An EngineLauncher running FAKE_ENGINE instead of ``python -m ipmn``."""
    from IPMNClassifierLib.engine import EngineLauncher

    script = Path(tmp_path) / "fake_ipmn.py"
    if not script.exists():
        script.write_text(FAKE_ENGINE, encoding="utf-8")
    env = dict(os.environ)
    env["FAKE_IPMN_MODE"] = mode
    env.update(extra_env or {})
    return EngineLauncher(
        python=sys.executable,
        module_dir=CLASSIFIER_DIR,
        base_env=env,
        command_prefix=[sys.executable, str(script)],
    )


def fake_package(folder, name="model", k=9, **extra) -> Path:
    """A model package folder that passes the registry's checks (tiny safetensors + config.json)."""
    import json

    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"w": np.zeros(4, np.float32)}, str(folder / "model.safetensors"))
    config = {
        "name": name,
        "arch": "vit_tiny_patch16_224",
        "class_names": ["normal", "low", "high"],
        "k": k,
        "card": "Trained on synthetic phantoms; not for clinical use.",
        "trained_on": "phantoms",
        "metrics": {"summary": {"accuracy": {"mean": 0.8, "std": 0.05}}},
        **extra,
    }
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder
