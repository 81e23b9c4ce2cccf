"""``ipmn evaluate`` throughput against a plain loop of ``Predictor.predict`` over the same cases, same run.

Both use one already-loaded :class:`ipmn.predict.Predictor` (model load excluded from both) and write the
same per-case outputs; ``evaluate`` also preprocesses the next case in a worker thread while the model
runs, and writes predictions.csv / metrics.json / report.html. Cohort: ``--n`` fresh phantoms
(``ipmn phantoms``), model: the bundled demo model unless ``--model``. The two are run alternately
``--repeats`` times; the table shows medians. Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=8, help="phantom cases [8]")
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--model", help="model package (default: the bundled demo model)")
    ap.add_argument("--windows", choices=["central", "all"], default="central")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", default="bench-evaluate.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from ipmn.cohort import load_manifest
    from ipmn.demo import demo_model
    from ipmn.evaluate import evaluate
    from ipmn.phantoms import make_cohort
    from ipmn.predict import Predictor

    with tempfile.TemporaryDirectory(prefix="ipmn-bench-eval-") as tmp:
        tmp = Path(tmp)
        manifest = make_cohort(tmp / "cohort", n=args.n, seed=args.seed)
        cases = load_manifest(manifest)
        predictor = Predictor(args.model or demo_model(), device=args.device, precision=args.precision)
        c0 = cases[0]
        predictor.predict(c0.t1, c0.t2, c0.roi, c0.mask, out=tmp / "warmup", windows=args.windows)  # warm-up

        def loop(k):
            for c in cases:
                predictor.predict(c.t1, c.t2, **c.roi_spec, out=tmp / f"loop{k}" / c.case_id, windows=args.windows)

        def batch(k):
            evaluate(manifest, None, tmp / f"eval{k}", windows=args.windows, predictor=predictor)

        times = {"loop": [], "evaluate": []}
        for k in range(args.repeats):
            for name, fn in (("loop", loop), ("evaluate", batch)) if k % 2 == 0 else (("evaluate", batch), ("loop", loop)):
                t = time.perf_counter()
                fn(k)
                times[name].append(time.perf_counter() - t)

    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [(name, args.n, med[name], args.n / med[name]) for name in ("loop", "evaluate")]
    print(f"{'method':<34} {'cases':>5} {'seconds':>8} {'cases/s':>8}")
    labels = {"loop": "plain loop of Predictor.predict", "evaluate": "ipmn evaluate (prefetch thread)"}
    for name, n, s, r in rows:
        print(f"{labels[name]:<34} {n:>5} {s:>8.2f} {r:>8.3f}")
    print(f"speed-up {med['loop'] / med['evaluate']:.2f}x  (medians of {args.repeats}; runs "
          + ", ".join(f"{k}: " + "/".join(f"{v:.2f}" for v in vs) for k, vs in times.items()) + " s)")
    info = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "device": str(predictor.device), "precision": predictor.precision,
            "windows": args.windows, "n": args.n, "times_s": times, "median_s": med,
            "cases_per_s": {k: args.n / v for k, v in med.items()}}
    Path(args.out).write_text(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
