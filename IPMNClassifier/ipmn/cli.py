"""The ``ipmn`` command. Each subcommand imports only what it needs (cold start matters in Slicer).

Errors a user can fix print one line ``ipmn: error: ...`` and exit 2; nothing half-written is left.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import traceback

from ipmn import __version__
from ipmn.errors import IPMNError


def int_at_least(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high] (argparse prints the error and exits 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from exc
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be at least {low}" + (f" and at most {high}" if high else "")
                                             + f" (got {value})")
        return value

    parse.__name__ = "integer"
    return parse


_BOX = re.compile(r"^-[0-9.]")
_VALUE_OPTIONS = ("--roi",)


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--roi -9.8,-7.3,6.2:150,60,55`` → ``--roi=-9.8,...``: argparse would take a value that starts
    with '-' (an ROI on the patient's right) for an option."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in _VALUE_OPTIONS and i + 1 < len(argv) and _BOX.match(argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def _add_inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--t1", help="T1 volume: NIfTI, NRRD, MHA or a DICOM series folder")
    p.add_argument("--t2", help="T2 volume: NIfTI, NRRD, MHA or a DICOM series folder")
    p.add_argument("--roi", help="pancreas ROI: Slicer .mrk.json, 'R,A,S:W,H,D' (RAS mm) or a mask volume")
    p.add_argument("--mask", help="pancreas mask/segmentation; ROI = its bounding box + --margin")
    p.add_argument("--mask-segment", metavar="NAME",
                   help="the segment (name or terminology, e.g. Pancreas) of a .seg.nrrd, or the ROI of a "
                        ".mrk.json, to use when the file holds several")
    p.add_argument("--t1-series", metavar="UID", help="SeriesInstanceUID of T1 in a folder with several series")
    p.add_argument("--t2-series", metavar="UID", help="SeriesInstanceUID of T2 in a folder with several series")
    p.add_argument("--margin", type=float, default=10.0, help="margin (mm) around a mask's bounding box [10]")
    p.add_argument("--nonfinite", choices=["refuse", "clean"], default="refuse",
                   help="NaN/Inf voxels: refuse the volume (default) or replace them with the median")
    p.add_argument("--pad", action="store_true", help="replicate the last slice if the ROI has fewer than k slices")


# ------------------------------------------------------------------------------------------- commands
def cmd_phantoms(args) -> int:
    from ipmn.phantoms import make_cohort

    def progress(i, n):
        if not args.quiet:
            print(f"phantom {i}/{n}", file=sys.stderr, flush=True)

    manifest = make_cohort(args.out, n=args.n, seed=args.seed, centers=args.centers, progress=progress,
                           workers=args.workers)
    print(f"wrote {args.n} phantom cases and {manifest}")
    return 0


def cmd_grid(args) -> int:
    import numpy as np

    from ipmn.config import PreprocessConfig, read_yaml
    from ipmn.grid import case_windows
    from ipmn.inputs import load_inputs
    from ipmn.io import check_out_dir
    from ipmn.preprocess import prepare_case

    check_out_dir(args.out)
    modalities = tuple(args.modalities.split(",")) if args.modalities else ("t1", "t2")
    cfg = PreprocessConfig.from_dict(read_yaml(args.config).get("preprocess") if args.config else None)
    if args.cell is not None:
        cfg.cell = args.cell
    volumes, roi = load_inputs(args.t1, args.t2, args.roi, args.mask, modalities, args.margin, args.nonfinite,
                               _series(args), args.mask_segment)
    case = prepare_case(volumes, roi, cfg, modalities)
    starts, windows = case_windows(case.data, args.k, args.windows, args.stride, args.pad)
    os.makedirs(args.out, exist_ok=True)
    from ipmn.io import atomic_path, write_json
    from ipmn.render import grid_png

    with atomic_path(os.path.join(args.out, "grid.npy")) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, windows)
    grid_png(os.path.join(args.out, "grid.png"), windows[0], modalities, title=f"central window (slices {starts[0]}–{starts[0] + args.k - 1} of {case.n_slices})", k=args.k)
    info = {"shape": list(windows.shape), "starts": starts, "n_slices": case.n_slices, "grid": case.grid.to_dict(),
            "roi": roi.to_dict(), "timing_s": {k: round(v, 4) for k, v in case.timing.items()}}
    write_json(info, os.path.join(args.out, "grid.json"))
    print(f"grid {tuple(windows.shape[1:])} x {len(starts)} window(s) from {case.n_slices} ROI slices -> {args.out}/grid.png")
    return 0


def _series(args) -> dict:
    return {m: getattr(args, f"{m}_series") for m in ("t1", "t2") if getattr(args, f"{m}_series", None)}


def cmd_predict(args) -> int:
    from ipmn.inputs import case_inputs, model_configs
    from ipmn.io import check_out_dir

    models = list(args.ensemble or []) or ([args.model] if args.model else [])
    if not models:
        raise IPMNError("no model given: pass --model MODEL_DIR (or --ensemble DIR1 DIR2 ...)")
    # everything the user can get wrong is checked before torch is imported and the weights are loaded
    check_out_dir(args.out)
    if args.dicom_out is not None:
        from ipmn.dicom_out import check_dicom_out

        check_dicom_out(args.t1, ("t1",))  # the model's own modalities are checked again when it predicts
    configs = model_configs(models)
    inputs = case_inputs(configs[0]["modalities"], args.t1, args.t2, args.roi, args.mask, args.margin,
                         args.nonfinite, _series(args), args.mask_segment)

    from ipmn.predict import Predictor, summary_line
    from ipmn.progress import Progress

    predictor = Predictor(models, device=args.device, precision=args.precision)
    result = predictor.predict(
        t1=args.t1, out=args.out, windows=args.windows, tta=args.tta, stride=args.stride, pad=args.pad,
        fidelity=args.fidelity, progress=Progress(args.progress), inputs=inputs,
        series=_series(args), dicom_out=args.dicom_out,
    )
    if args.json:
        print(json.dumps(result, indent=2))
        print(summary_line(result), file=sys.stderr)
    elif args.progress == "jsonl":
        Progress("jsonl").done(args.out, summary=summary_line(result))
    else:
        print(summary_line(result))
        from ipmn.vocab import ATTENTION_FILE, ATTENTION_LABELS_FILE, GRID_PNG_FILE, PREDICTION_FILE

        print(f"outputs in {args.out}/: {PREDICTION_FILE} {ATTENTION_FILE} {ATTENTION_LABELS_FILE} {GRID_PNG_FILE}")
    return 0


def cmd_worker(args) -> int:
    from ipmn.predict import serve

    return serve()


def cmd_demo(args) -> int:
    from ipmn.demo import run_demo
    from ipmn.io import check_out_dir

    check_out_dir(args.out)
    return run_demo(args.out, device=args.device, windows=args.windows)


def cmd_cohort(args) -> int:
    from ipmn.cohort import load_cohort, summarize
    from ipmn.cystx import apply_label_task

    modalities = tuple(m for m in args.modalities.lower().replace("+", ",").split(",") if m)
    cases = apply_label_task(load_cohort(args.cohort, modalities), args.labels)
    summary = summarize(cases)
    if args.json:
        print(json.dumps(summary))
    else:
        per_class = ", ".join(f"{k} {v}" for k, v in summary["per_class"].items())
        print(f"{summary['n_cases']} cases ({summary['n_patients']} patients): {per_class}; "
              f"centres {summary['per_center']}; T1 {summary['with_t1']}, T2 {summary['with_t2']}")
        for note in summary.get("notes", []):
            print(f"  note: {note}")
    return 0


# ------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from ipmn.config import MAX_CELL

    parser = argparse.ArgumentParser(prog="ipmn", description="IPMN risk grading on T1/T2 MRI (ViT + Attention Rollout)")
    parser.add_argument("--version", action="version", version=f"ipmn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantoms", help="write a synthetic phantom cohort (NIfTI + .mrk.json + cohort.csv)")
    p.add_argument("--n", type=int_at_least(1), default=60)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--centers", type=int, default=1, help="number of simulated centres (1-3)")
    p.add_argument("--workers", type=int, default=1, help="processes rendering cases (same cohort for any number)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_phantoms)

    p = sub.add_parser("grid", help="preprocess one case and write its k-slice grid (PNG + .npy)")
    _add_inputs(p)
    p.add_argument("--out", required=True)
    p.add_argument("--k", type=int_at_least(1), default=9)
    p.add_argument("--cell", type=int_at_least(8, MAX_CELL), default=None)
    p.add_argument("--windows", choices=["central", "all"], default="central")
    p.add_argument("--stride", type=int_at_least(1), default=1)
    p.add_argument("--modalities", default=None, help="t1,t2 (default) | t1 | t2")
    p.add_argument("--config", help="YAML with a 'preprocess:' section")
    p.set_defaults(func=cmd_grid)

    p = sub.add_parser("predict", help="grade one case: probabilities, attention maps in T1's geometry, grid PNG")
    _add_inputs(p)
    p.add_argument("--model", help="model package folder (model.safetensors + config.json)")
    p.add_argument("--ensemble", nargs="+", metavar="DIR", help="several model folders averaged (e.g. CV folds)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="auto", help="auto (CUDA if available) | cpu | cuda")
    p.add_argument("--windows", choices=["central", "all"], default="central",
                   help="central: the paper's 9 central slices; all: every window, averaged")
    p.add_argument("--stride", type=int_at_least(1), default=1, help="slice step between windows with --windows all")
    p.add_argument("--tta", action="store_true", help="test-time flips/90-degree rotations, maps un-rotated")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: bfloat16 on GPUs and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32")
    p.add_argument("--fidelity", action="store_true",
                   help="also run the deletion-curve fidelity check of the map (18 extra forward passes)")
    p.add_argument("--progress", choices=["none", "jsonl"], default="none", help="jsonl: one JSON event per line")
    p.add_argument("--json", action="store_true", help="print prediction.json to stdout")
    p.add_argument("--dicom-out", metavar="DIR",
                   help="also write a DICOM SEG of the attention levels and a DICOM SR of the grade "
                        "(T1 must be a DICOM series folder)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("worker", help="long-lived predictor: JSON requests on stdin, JSON events on stdout")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("demo", help="predict the bundled sample phantom case with the bundled demo model")
    p.add_argument("--out", default="ipmn-demo")
    p.add_argument("--device", default="auto")
    p.add_argument("--windows", choices=["central", "all"], default="all")
    p.set_defaults(func=cmd_demo)

    from ipmn import cli_train

    cli_train.register(sub)  # train, cv, cv-report
    from ipmn import evaluate

    evaluate.register(sub)

    p = sub.add_parser("cohort", help="validate a cohort (manifest CSV or Cyst-X folder) and print its summary")
    p.add_argument("cohort")
    p.add_argument("--modalities", default="t1,t2",
                   help="t1,t2 | t1 | t2 (for the Cyst-X release: which of its tables; empty = all cases)")
    p.add_argument("--labels", choices=["3class", "2class"], default="3class",
                   help="3class (none/low/high) or 2class (high vs no/low risk, Cyst-X's 2-class task)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cohort)

    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(_join_negative_values(list(sys.argv[1:] if argv is None else map(str, argv))))
    try:
        return int(args.func(args) or 0)
    except IPMNError as exc:
        print(f"ipmn: error: {exc}", file=sys.stderr)
        if getattr(args, "progress", None) == "jsonl":
            from ipmn.progress import Progress

            Progress("jsonl").error(str(exc))
        return IPMNError.exit_code
    except KeyboardInterrupt:
        print("ipmn: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a file the user named or a disk: one line that names it, not a traceback
        where = f"{str(exc.filename)[:200]}: " if exc.filename else ""
        print(f"ipmn: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return IPMNError.exit_code
    except MemoryError:
        print("ipmn: error: out of memory; try --device cpu, --windows central, or close other programs", file=sys.stderr)
        return 3
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line, not a traceback
        if os.environ.get("IPMN_DEBUG"):
            traceback.print_exc()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"ipmn: internal error: {type(exc).__name__}: {first[:300]} (set IPMN_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
