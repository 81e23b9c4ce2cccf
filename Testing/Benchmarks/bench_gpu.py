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
import json
import platform
import sys
import time

import torch

# Dense (no sparsity) peak TFLOP/s from the vendors' data sheets: (bf16 tensor core, fp32 / tf32 non-tensor).
PEAK_TFLOPS = {
    "H200": (989.0, 67.0),
    "H100 80GB HBM3": (989.0, 67.0),  # SXM
    "H100 PCIe": (756.0, 51.0),
    "H100 NVL": (835.0, 60.0),
    "A100": (312.0, 19.5),
    "L40S": (362.0, 91.6),
    "L4": (121.0, 30.3),
    "A10": (125.0, 31.2),
}


def peak_for(name: str, precision: str, override: float | None) -> float | None:
    if override:
        return override
    for key, (bf16, fp32) in PEAK_TFLOPS.items():
        if key.lower() in name.lower():
            return bf16 if precision == "bf16" else fp32
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
    from torch.utils.flop_counter import FlopCounterMode

    _, model = build(args, False, False, device)
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
    ap.add_argument("--peak-tflops", type=float, help="the device's peak for the precision measured (overrides the table)")
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
        results["rows"].append({"name": name_, "value": round(value, 4), "unit": unit, **extra})
        print(f"{name_:<60} {value:10.3f} {unit}  {json.dumps(extra) if extra else ''}", flush=True)

    compiles = (False,) if args.no_compile else (False, True)
    for precision in ("fp32", "bf16"):
        for channels_last in (False, True):
            for compiled in compiles:
                label = f"train {precision}, channels-last {'on' if channels_last else 'off'}, compile {'on' if compiled else 'off'}"
                try:
                    rate = train_rate(args, precision, channels_last, compiled, device)
                except torch.cuda.OutOfMemoryError:
                    row(label, float("nan"), "samples/s", error="out of memory: lower --batch")
                    torch.cuda.empty_cache()
                    continue
                peak = peak_for(name, precision, args.peak_tflops)
                mfu = fps * rate / (peak * 1e12) if peak else None
                row(label, rate, "samples/s", mfu=None if mfu is None else round(mfu, 4), peak_tflops=peak)
                with contextlib.suppress(Exception):
                    torch._dynamo.reset()
    for precision in ("fp32", "bf16"):
        for windows in (1, 17):
            row(f"predict latency, model only, {windows} window(s), {precision}",
                predict_latency(args, precision, windows, device), "s")
    if device.type == "cuda":
        row("peak GPU memory allocated", torch.cuda.max_memory_allocated(device) / 1024**3, "GB")
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
