"""Predict benchmark: stages, in-process latency, cold CLI, scaling, and same-run baselines.

Standard case: phantom T1 256×256×64 (LPS) and T2 320×320×40 (PLS, another orientation), ViT-B/16 at
192 px randomly initialised (timing needs no weights). Baselines measured in the same run:
* the bare timm forward on the same tensor (the pipeline's model stage must stay ≤ 2× of it);
* the naive pipeline: full-resolution N4 over the whole volume, then crop (run ``--naive-runs`` times).

Prints a table and writes ``bench-results.json`` (medians over ``--repeats`` runs after a warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch


def median_time(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", default="vit_base_patch16_224")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--naive-runs", type=int, default=1, help="full-resolution N4 baseline runs (minutes each)")
    ap.add_argument("--out", default="bench-results.json")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto", help="auto (bf16 where the hardware has it) | fp32 | bf16")
    args = ap.parse_args(argv)

    from ipmn.device import autocast
    from ipmn.models import build_model, save_package
    from ipmn.phantoms import make_case, write_case
    from ipmn.predict import Predictor
    from ipmn.preprocess import PreprocessConfig, n4_correct, prepare_case

    work = Path(tempfile.mkdtemp(prefix="ipmn-bench-"))
    case = make_case(2022, 2, t1_shape=(256, 256, 64), t2_shape=(320, 320, 40), t1_orientation="LPS",
                     t2_orientation="PLS")
    paths = write_case(case, work / "case", "std")
    torch.manual_seed(0)
    cfg = {"arch": args.arch}
    model = build_model(cfg)
    model_dir = save_package(work / "model", model, {**cfg, "name": f"{args.arch}-random"})
    results = {"machine": machine(), "case": {"t1": list(case["t1"].GetSize()), "t2": list(case["t2"].GetSize())},
               "arch": args.arch, "repeats": args.repeats, "rows": []}

    def row(name, seconds, unit="s", **extra):
        key = "median_s" if unit == "s" else unit
        results["rows"].append({"name": name, key: round(seconds, 4), **extra})
        print(f"{name:<52} {seconds:8.3f} {unit}  {json.dumps(extra) if extra else ''}", flush=True)

    predictor = Predictor(model_dir, device=args.device, precision=args.precision)
    fp32 = predictor if predictor.precision == "fp32" else Predictor(model_dir, device=args.device, precision="fp32")
    results["precision"] = predictor.precision
    print(f"precision: {predictor.precision} (fp32 rows are the same-run baseline)")
    kw = {"t1": paths["t1"], "t2": paths["t2"], "roi": paths["roi"]}

    # 1. in process, model loaded: stages of the central-window prediction
    stage_runs = []

    def central():
        stage_runs.append(predictor.predict(**kw, out=work / "out", windows="central", fidelity=True)["timing_s"])

    t_central, _ = median_time(central, args.repeats)
    row("predict central window (in process, fidelity on)", t_central, target_s=1.0)
    t_nofid, _ = median_time(lambda: predictor.predict(**kw, out=work / "out", fidelity=False), args.repeats)
    row("predict central window (no fidelity check)", t_nofid, target_s=1.0)
    stages = {k: statistics.median(r.get(k, 0.0) for r in stage_runs[1:] or stage_runs) for k in stage_runs[-1]}
    for k, v in stages.items():
        row(f"  stage {k}", v)

    n_all = {}

    def all_tta():
        r = predictor.predict(**kw, out=work / "out_all", windows="all", tta=True, fidelity=False)
        n_all["windows"] = len(r["windows"]["starts"])

    t_all, _ = median_time(all_tta, max(3, args.repeats // 2))
    row(f"predict all windows + TTA (in process, {predictor.precision})", t_all, target_s=5.0,
        windows=n_all["windows"], tta_views=5)
    if fp32 is not predictor:
        t_all32, _ = median_time(lambda: fp32.predict(**kw, windows="all", tta=True, fidelity=False), 3)
        row("  baseline: all windows + TTA in fp32", t_all32, speedup=round(t_all32 / t_all, 2))
        t_c32, _ = median_time(lambda: fp32.predict(**kw, fidelity=False), args.repeats)
        row("  baseline: central window in fp32", t_c32)

    # bare timm forward on the same tensor (same model object, no hooks)
    vit = predictor.models[0]
    x = torch.from_numpy(prepare_case({"t1": sitk.ReadImage(str(paths["t1"]), sitk.sitkFloat32),
                                       "t2": sitk.ReadImage(str(paths["t2"]), sitk.sitkFloat32)},
                                      case["roi"], PreprocessConfig()).data[:, :9].copy())
    from ipmn.grid import tile

    xt = torch.from_numpy(tile(x.numpy())[None].copy())

    def bare(precision):
        with torch.inference_mode(), autocast(precision, predictor.device):
            vit(xt.to(predictor.device))
        if predictor.device.type == "cuda":
            torch.cuda.synchronize(predictor.device)  # time the work, not the kernel launches

    t_bare, _ = median_time(lambda: bare(predictor.precision), args.repeats)
    row(f"bare timm forward (1 window, inference_mode, {predictor.precision})", t_bare)
    if predictor.precision != "fp32":
        t_bare32, _ = median_time(lambda: bare("fp32"), args.repeats)
        row("bare timm forward (1 window, inference_mode, fp32)", t_bare32)
    rest = t_nofid - stages.get("model_and_explain", 0)
    row("ratio: rest of the pipeline (read, preprocessing, maps, write) / bare forward", rest / t_bare, "x",
        rest_s=round(rest, 3))
    row("ratio: model+explain stage / bare forward", stages.get("model_and_explain", 0) / t_bare, "x", target=2.0)

    # scaling: number of windows, and ROI size (in-plane and superior-inferior)
    n_total = n_all["windows"]
    for label, extra in (("1 (central)", {}), ("4", {"windows": "all", "stride": max(1, (n_total - 1) // 3)}),
                         (f"{n_total} (all)", {"windows": "all"})):
        t_n, _ = median_time(lambda extra=extra: predictor.predict(**kw, fidelity=False, **extra), 3)
        row(f"scaling: {label} window(s)", t_n)
    roi = case["roi"]
    for factor in (0.75, 1.0, 1.5):
        size = roi.size * np.array([factor, factor, factor])
        spec = ",".join(f"{v:.2f}" for v in roi.center) + ":" + ",".join(f"{v:.2f}" for v in size)
        t_r, _ = median_time(lambda spec=spec: predictor.predict(t1=paths["t1"], t2=paths["t2"], roi=spec,
                                                                  fidelity=False), 3)
        row(f"scaling: ROI size x{factor} ({size[0]:.0f}x{size[1]:.0f}x{size[2]:.0f} mm)", t_r)

    # naive baseline: full-resolution N4 on the whole T1 then crop
    t1 = sitk.ReadImage(str(paths["t1"]), sitk.sitkFloat32)
    naive = []
    for _ in range(args.naive_runs):
        t = time.perf_counter()
        n4_correct(t1, shrink=1)
        naive.append(time.perf_counter() - t)
    if naive:
        ours = stages.get("n4", 0.0)
        row("baseline: naive full-resolution N4 on T1 (whole volume)", statistics.median(naive),
            runs=len(naive), ratio_vs_ours=round(statistics.median(naive) / max(ours, 1e-6), 1))

    # cold CLI: a new process, as Slicer's first run or a script would start it
    def cold():
        proc = subprocess.run([sys.executable, "-m", "ipmn", "predict", "--t1", str(paths["t1"]), "--t2",
                               str(paths["t2"]), "--roi", str(paths["roi"]), "--model", str(model_dir), "--out",
                               str(work / "cold"), "--device", args.device, "--precision", args.precision], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(proc.stderr)

    t_cold, _ = median_time(cold, 3, warmup=1)
    row("cold CLI: ipmn predict as a new process", t_cold, target_s=6.0)
    imp = subprocess.run([sys.executable, "-c", "import time; t=time.perf_counter(); import torch, timm, SimpleITK; "
                          "print(time.perf_counter()-t)"], capture_output=True, text=True)
    row("  of which: import torch + timm + SimpleITK", float(imp.stdout.strip() or "nan"))
    heavy = subprocess.run([sys.executable, "-c", "import sys, ipmn.predict, ipmn.models, ipmn.explain, ipmn.render; "
                            "print(','.join(m for m in ('monai','sklearn','matplotlib') if m in sys.modules))"],
                           capture_output=True, text=True).stdout.strip()
    row("  heavy modules imported on the predict path", 0.0, modules=heavy or "none")

    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    row("peak RSS of this benchmark process", peak_gb, "GB", target=3.0)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
