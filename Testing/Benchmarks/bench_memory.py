"""Memory benchmark: peak RSS of ``ipmn cv`` on a 100-case phantom cohort, against its parts.

The CV runs as a child process (as a user or the Slicer Trainer starts it); its peak resident memory is
the kernel's ``ru_maxrss`` of that child (``os.wait4``), Linux only. Baselines
measured in the same run, each in a fresh child process:

* ``import``: python + torch + timm + SimpleITK + the engine imported, nothing else;
* ``model``: the same model built and trained for a few steps on random tensors (model, gradients,
  optimiser state, activations at this batch size) — what any training costs whatever the cohort;

so the cohort's own share (cached grids, windows, predictions) is the CV peak minus the model baseline.
The cohort's grids are also counted from the cache files (bytes of the float32 arrays in RAM).

Defaults keep the run short on a 2-core CPU: 2 outer × 2 inner folds, 1 epoch, 1 training window per case
and epoch — the number of folds and epochs changes the time, not the memory, since a fold's arrays are
dropped before the next. Writes ``bench-memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def peak_of(cmd: list[str], env: dict) -> tuple[float, float]:
    """Run ``cmd``; return (its peak RSS in GB, from the kernel's rusage of that child; wall seconds)."""
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            err.seek(0)
            raise SystemExit(f"benchmark child failed ({proc.returncode}): {err.read()[-2000:]}")
    return usage.ru_maxrss / 1024**2, time.perf_counter() - t  # ru_maxrss is in KiB on Linux


MODEL_ONLY = """
import sys, torch
from ipmn.models import build_model
arch, depth, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
cfg = {"arch": arch} | ({"depth": depth} if depth else {})
model = build_model(cfg).train()
opt = torch.optim.Adam(model.parameters(), lr=1e-4)
for _ in range(steps):
    x = torch.randn(batch, 2, 192, 192)
    loss = torch.nn.functional.cross_entropy(model(x), torch.randint(0, 3, (batch,)))
    opt.zero_grad(); loss.backward(); opt.step()
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", default="vit_base_patch16_224")
    ap.add_argument("--depth", type=int, default=0, help="0: the architecture's own depth")
    ap.add_argument("--cases", type=int, default=100)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--outer", type=int, default=2)
    ap.add_argument("--inner", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--windows-per-case", type=int, default=1)
    ap.add_argument("--out", default="bench-memory.json")
    args = ap.parse_args(argv)

    import yaml

    from ipmn.phantoms import make_cohort

    work = Path(tempfile.mkdtemp(prefix="ipmn-bench-mem-"))
    env = {**os.environ, "IPMN_CACHE_DIR": str(work / "cache")}
    rows = []

    def row(name, value, unit, **extra):
        rows.append({"name": name, "value": round(value, 3), "unit": unit, **extra})
        print(f"{name:<64} {value:9.3f} {unit}  {json.dumps(extra) if extra else ''}", flush=True)

    t = time.perf_counter()
    manifest = make_cohort(work / "cohort", n=args.cases, seed=11)
    row(f"phantom cohort generated ({args.cases} cases)", time.perf_counter() - t, "s")

    py = sys.executable
    imp, _ = peak_of([py, "-c", "import torch, timm, SimpleITK, ipmn.train, ipmn.cv"], env)
    row("baseline: imports only (peak RSS)", imp, "GB")
    model_args = [args.arch, str(args.depth), str(args.batch), "3"]
    mod, _ = peak_of([py, "-c", MODEL_ONLY, *model_args], env)
    row(f"baseline: {args.arch} built + 3 training steps, batch {args.batch} (peak RSS)", mod, "GB")

    model_cfg = {"arch": args.arch} | ({"depth": args.depth} if args.depth else {})
    cfg = {"model": model_cfg,
           "train": {"epochs": args.epochs, "batch_size": args.batch, "optimizer": "adam", "lr": 1e-4,
                     "windows_per_case": args.windows_per_case, "amp": "none"},
           "cv": {"outer": args.outer, "inner": args.inner, "examples": 0}}
    (work / "cv.yaml").write_text(yaml.safe_dump(cfg))
    cv_peak, cv_s = peak_of([py, "-m", "ipmn", "cv", "--cohort", str(manifest), "--config", str(work / "cv.yaml"),
                             "--out", str(work / "cv"), "--device", "cpu", "--progress", "none", "--no-report"], env)
    row(f"ipmn cv, {args.cases} cases, {args.outer}x{args.inner} folds, batch {args.batch} (peak RSS)", cv_peak, "GB",
        wall_s=round(cv_s, 1))
    row("cohort's share: CV peak minus the model baseline", cv_peak - mod, "GB")

    grid_bytes = 0
    for f in (work / "cache").rglob("*.npz"):
        with np.load(f) as z:
            grid_bytes += sum(z[k].nbytes for k in z.files)
    row("cached grids of the whole cohort as float32 arrays", grid_bytes / 1024**2, "MB")

    Path(args.out).write_text(json.dumps({"arch": args.arch, "cases": args.cases, "batch": args.batch,
                                          "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
