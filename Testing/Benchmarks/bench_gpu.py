"""GPU benchmark (issue 6, item 5): ViT-B/16 training samples/s and the MFU it implies, bf16 vs fp32,
channels-last and ``torch.compile`` on and off, and the model's predict latency.

* Training: a bare loop (forward, cross-entropy, backward, Adam step) on random (B, 2, 192, 192) tensors —
  the same step ``ipmn train`` runs (its overhead over such a loop is measured by ``bench_train.py``).
* FLOPs per sample are counted once with ``torch.utils.flop_counter.FlopCounterMode`` over a forward +
  backward pass (matrix products and convolutions; the optimiser step is not counted), so MFU =
  FLOPs/sample × samples/s ÷ the card's peak dense bf16 (or fp32) throughput. Peaks come from the table
  below by device name, or ``--peak-tflops``; without either MFU is not reported.
* Predict: the model alone in ``inference_mode`` for 1 window and for 17 windows (all windows of the
  standard case) — end-to-end predict latency on the GPU is ``bench_predict.py --device cuda``.

Runs on the CPU too (``--device cpu``; a smoke run with a small model checks the script itself).
Writes ``bench-gpu.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import re
import sys
import time

import torch

# Dense (no sparsity) peak TFLOP/s from the vendors' data sheets: (bf16 tensor core, TF32 tensor core).
# "fp32" rows run with TF32 matrix products (as PyTorch users on these cards do), so they are divided by
# the TF32 peak. Longest names are matched first, on word boundaries ("L4" is not "L40S", "A10" not "A10G").
PEAK_TFLOPS = {
    "H200 NVL": (836.0, 418.0),
    "H200": (989.0, 494.7),
    "H100 NVL": (835.0, 417.5),
    "H100 PCIe": (756.0, 378.0),
    "H100": (989.0, 494.7),  # SXM
    "A100": (312.0, 156.0),
    "L40S": (362.1, 183.0),
    "L4": (121.0, 60.0),
    "A10": (125.0, 62.5),
}


def peak_for(name: str, precision: str, overrides: dict) -> float | None:
    if overrides.get(precision):
        return overrides[precision]
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if re.search(rf"\b{re.escape(key)}\b", name, flags=re.IGNORECASE):
            bf16, tf32 = PEAK_TFLOPS[key]
            return bf16 if precision == "bf16" else tf32
    return None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(args, channels_last: bool, compiled: bool, device):
    from ipmn.models import build_model

    cfg = {"arch": args.arch} | ({"depth": args.depth} if args.depth else {})
    model = build_model(cfg).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return (torch.compile(model) if compiled else model), model


def flops_per_sample(args, device) -> float:
    """Forward + backward FLOPs of one sample, with attention as explicit matrix products so that the count
    is the same on every device (fused SDPA kernels are not counted on the CPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    _, model = build(args, False, False, device)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    x = torch.randn(2, 2, 192, 192, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops() / 2


def train_rate(args, precision: str, channels_last: bool, compiled: bool, device) -> float:
    from ipmn.device import autocast

    torch.manual_seed(0)
    model, _ = build(args, channels_last, compiled, device)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(args.batch, 2, 192, 192, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 3, (args.batch,), device=device)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync(device)
            t = time.perf_counter()
        with autocast(precision, device):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    return args.steps * args.batch / (time.perf_counter() - t)


def predict_latency(args, precision: str, windows: int, device) -> float:
    from ipmn.device import autocast

    _, model = build(args, False, False, device)
    model.eval()
    x = torch.randn(windows, 2, 192, 192, device=device)
    times = []
    with torch.inference_mode(), autocast(precision, device):
        for i in range(args.warmup + args.steps):
            sync(device)
            t = time.perf_counter()
            model(x)
            sync(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--arch", default="vit_base_patch16_224")
    ap.add_argument("--depth", type=int, default=0, help="0: the architecture's own depth")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    ap.add_argument("--peak-tflops-bf16", type=float, help="the device's dense bf16 peak (overrides the table)")
    ap.add_argument("--peak-tflops-fp32", type=float, help="the device's dense TF32/fp32 peak (overrides the table)")
    ap.add_argument("--out", default="bench-gpu.json")
    args = ap.parse_args(argv)

    from ipmn.device import resolve_device

    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # what "fp32" means on a tensor-core GPU in practice
        torch.backends.cudnn.allow_tf32 = True
    fps = flops_per_sample(args, device)
    results = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "arch": args.arch,
               "depth": args.depth or None, "batch": args.batch, "flops_per_sample": fps, "rows": []}
    print(f"device: {name}; {args.arch}, batch {args.batch}; {fps / 1e9:.1f} GFLOPs per training sample "
          "(forward + backward)")

    def row(name_, value, unit, **extra):
        value = None if value is None or (isinstance(value, float) and math.isnan(value)) else round(value, 4)
        results["rows"].append({"name": name_, "value": value, "unit": unit, **extra})
        shown = "—" if value is None else f"{value:10.3f}"
        print(f"{name_:<60} {shown:>10} {unit}  {json.dumps(extra) if extra else ''}", flush=True)
        with open(args.out, "w") as fh:  # after every row: a crash later keeps what was measured
            json.dump(results, fh, indent=2)

    def attempt(label, unit, fn, **extra):
        """One measurement; out of memory or a failing variant (e.g. compile) is a row, not the end of the run."""
        error = None
        try:
            value = fn()
        except torch.cuda.OutOfMemoryError:
            value, error = None, "out of memory: lower --batch"
        except Exception as exc:  # noqa: BLE001 - report it and go on with the other variants
            value, error = None, f"{type(exc).__name__}: {str(exc)[:200]}"
        gc.collect()  # outside the except block: the traceback no longer holds the failed step's tensors
        if device.type == "cuda":
            torch.cuda.empty_cache()
        with contextlib.suppress(Exception):
            torch._dynamo.reset()
        row(label, value, unit, **extra, **({"error": error} if error else {}))
        return value

    peaks = {"bf16": args.peak_tflops_bf16, "fp32": args.peak_tflops_fp32}
    compiles = (False,) if args.no_compile else (False, True)
    for precision in ("fp32", "bf16"):
        peak = peak_for(name, precision, peaks)
        for channels_last in (False, True):
            for compiled in compiles:
                label = (f"train {precision}, channels-last {'on' if channels_last else 'off'}, "
                         f"compile {'on' if compiled else 'off'}")
                rate = attempt(label, "samples/s",
                               lambda p=precision, c=channels_last, k=compiled: train_rate(args, p, c, k, device),
                               peak_tflops=peak)
                if rate is not None and peak:
                    results["rows"][-1]["mfu"] = round(fps * rate / (peak * 1e12), 4)
                    print(f"{'':<60} MFU {results['rows'][-1]['mfu']:.3f}", flush=True)
    if device.type == "cuda":
        row("peak GPU memory allocated, training variants", torch.cuda.max_memory_allocated(device) / 1024**3, "GB")
        torch.cuda.reset_peak_memory_stats(device)
    for precision in ("fp32", "bf16"):
        for windows in (1, 17):
            attempt(f"predict latency, model only, {windows} window(s), {precision}", "s",
                    lambda p=precision, w=windows: predict_latency(args, p, w, device))
    if device.type == "cuda":
        row("peak GPU memory allocated, predict", torch.cuda.max_memory_allocated(device) / 1024**3, "GB")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
