"""Training benchmark: `ipmn train` throughput vs a bare timm loop, data-wait, cache reuse, CV fold scaling.

* Throughput: samples/s of ``train_model`` (epochs after the first) against a bare loop over the same
  tiled tensors with the same model, batch, optimiser and autocast, measured in the same run: the
  engine's overhead must stay ≤ 10 %; the time the step waits for data is reported.
* Cache: a second training on the same cohort must preprocess nothing (cache misses counted).
* CV scaling: two outer folds as two ``ipmn cv --fold K`` processes with one thread each, against one
  process running both folds with two threads.
Writes ``bench-train.json``.
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
import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", default="vit_tiny_patch16_224")
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--cases", type=int, default=18)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"],
                    help="autocast for both loops (bf16 on CPU: only worth it with AVX512-BF16/AMX)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--skip-cv", action="store_true")
    ap.add_argument("--out", default="bench-train.json")
    args = ap.parse_args(argv)

    from ipmn import cache
    from ipmn.cohort import load_manifest
    from ipmn.device import autocast
    from ipmn.models import build_model
    from ipmn.phantoms import make_cohort
    from ipmn.train import train_model

    work = Path(tempfile.mkdtemp(prefix="ipmn-bench-train-"))
    os.environ["IPMN_CACHE_DIR"] = str(work / "cache")
    manifest = make_cohort(work / "cohort", n=args.cases, seed=3)
    cases = load_manifest(manifest)
    model_cfg = {"arch": args.arch, "depth": args.depth}
    config = {"model": model_cfg, "train": {"epochs": args.epochs, "batch_size": args.batch, "optimizer": "adamw",
                                            "lr": 5e-4, "amp": args.amp, "windows_per_case": 6, "seed": 0}}
    results = {"arch": args.arch, "depth": args.depth, "batch": args.batch, "amp": args.amp, "threads": torch.get_num_threads(),
               "torch": torch.__version__, "rows": []}

    def row(name, value, **extra):
        results["rows"].append({"name": name, "value": value, **extra})
        print(f"{name:<58} {value:>10.3f}  {json.dumps(extra) if extra else ''}", flush=True)

    cache.reset_stats()
    t = time.perf_counter()
    train_model(cases, config, work / "run1", device=args.device, progress=None)
    first = cache.stats()
    row("first training: wall time (s), preprocessing included", time.perf_counter() - t,
        cache_misses=first["misses"], build_s=round(first["build_s"], 2))
    hist = json.loads((work / "run1" / "history.json").read_text())
    hist = hist["history"] if isinstance(hist, dict) else hist
    later = [h for h in hist if h["epoch"] > 1] or hist
    sps = float(np.median([h["samples_per_s"] for h in later]))
    wait = float(np.median([h["data_wait_s"] / max(h["train_s"], 1e-9) for h in later]))
    row("ipmn train: samples/s (median of epochs after the first)", sps)
    row("ipmn train: fraction of step time waiting for data", wait)

    cache.reset_stats()
    train_model(cases, config, work / "run2", device=args.device, progress=None)
    second = cache.stats()
    row("second training on the same cohort: cache misses", float(second["misses"]), hits=second["hits"])

    # bare 20-line loop on the same tensors
    from ipmn.grid import case_windows

    grids = cache.GridCache({}, ("t1", "t2")).get_many(cases)
    from ipmn.cache import standardize
    from ipmn.preprocess import PreprocessConfig

    windows = [case_windows(standardize(grids[c.case_id].data, ("t1", "t2"), PreprocessConfig()), 9, "all")[1]
               for c in cases]
    from ipmn.device import resolve_device

    dev = resolve_device(args.device)
    x_all = torch.from_numpy(np.concatenate(windows)).to(dev)
    y_all = torch.randint(0, 3, (len(x_all),)).to(dev)
    torch.manual_seed(0)
    model = build_model(model_cfg).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
    n_steps = max(8, len(x_all) // args.batch)
    for step in range(n_steps + 2):  # 2 warm-up steps
        if step == 2:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t = time.perf_counter()
        idx = torch.randint(0, len(x_all), (args.batch,), device=dev)
        with autocast("fp32" if args.amp == "none" else args.amp, dev):
            loss = torch.nn.functional.cross_entropy(model(x_all[idx]), y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    bare = n_steps * args.batch / (time.perf_counter() - t)
    row("bare timm loop: samples/s (same model, batch, optimiser)", bare)
    row("overhead of ipmn train vs bare loop (target <= 0.10)", 1 - sps / bare)

    if not args.skip_cv:
        cfg_path = work / "cv.yaml"
        import yaml

        cfg_path.write_text(yaml.safe_dump({**config, "train": {**config["train"], "epochs": 2},
                                            "cv": {"outer": 2, "inner": 2}}))
        base = [sys.executable, "-m", "ipmn", "cv", "--cohort", str(manifest), "--config", str(cfg_path),
                "--device", args.device, "--progress", "none", "--no-report"]
        env1 = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        t = time.perf_counter()
        procs = [subprocess.Popen([*base, "--out", str(work / "cvpar"), "--fold", str(k)], env=env1,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for k in (0,)]
        procs[0].wait()  # splits.json is written by the first; then the second fold runs beside it
        procs.append(subprocess.Popen([*base, "--out", str(work / "cvpar"), "--fold", "1", "--resume"], env=env1,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        procs[1].wait()
        seq_one = time.perf_counter() - t
        t = time.perf_counter()
        par = [subprocess.Popen([*base, "--out", str(work / "cvpar2"), "--fold", str(k)], env=env1,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for k in (0, 1)]
        for p in par:
            p.wait()
        par_time = time.perf_counter() - t
        t = time.perf_counter()
        subprocess.run([*base, "--out", str(work / "cvseq")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        seq_time = time.perf_counter() - t
        row("CV 2 outer folds: one process, 2 threads (s)", seq_time)
        row("CV 2 outer folds: two --fold processes in parallel, 1 thread each (s)", par_time,
            speedup=round(seq_time / par_time, 2))
        row("CV 2 outer folds: --fold processes one after the other, 1 thread (s)", seq_one)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
