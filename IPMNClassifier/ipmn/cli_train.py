"""``ipmn train``, ``ipmn cv`` and ``ipmn cv-report``: argparse registration and handlers.

``ipmn.cli`` calls :func:`register` with its sub-parsers object. Handlers return an exit code and raise
:class:`~ipmn.errors.IPMNError` for anything the user can fix. Command-line flags override the config
file (``--config`` takes a YAML file or a bundled preset name: paper, reference, practical, demo).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ipmn.errors import IPMNError
from ipmn.vocab import MODALITY_SETS

MODALITY_CHOICES = tuple(MODALITY_SETS)
LABELS_HELP = "3class (none/low/high, default) or 2class (high vs no/low risk, Cyst-X's 2-class task)"


def _common(p, run_word: str) -> None:
    p.add_argument("--config", help="YAML config (sections model/preprocess/train/cv/data) or a preset name: "
                                    "paper | reference | practical | demo")
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default: CUDA if available)")
    p.add_argument("--progress", choices=["auto", "tqdm", "jsonl", "none"], default="auto",
                   help="tqdm bar on a terminal (auto), one JSON event per line on stdout (jsonl), or nothing")
    p.add_argument("--resume", action="store_true", help=f"continue a killed {run_word} from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help=f"replace the {run_word} already in the output folder")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--lr", type=float, help="override train.lr")
    p.add_argument("--batch-size", type=int, help="override train.batch_size")
    p.add_argument("--seed", type=int, help="override train.seed (and cv.seed for cv)")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"], help="override train.amp")
    p.add_argument("--workers", type=int, help="override train.num_workers (data-loader processes)")
    p.add_argument("--tensorboard", action="store_true", default=None,
                   help="also log each training's curves to <its folder>/tensorboard (view: tensorboard --logdir OUT)")
    p.add_argument("--cache-dir", help="preprocessed-grid cache (default $IPMN_CACHE_DIR or ~/.cache/ipmn)")


def register(sub) -> None:
    """Add ``train``, ``cv`` and ``cv-report`` to the ``ipmn`` sub-parsers."""
    p = sub.add_parser("train", help="train one model on a cohort and write a model package",
                       description="Train one model (paper section IV-B). The model package goes to --out; "
                                   "checkpoints and history to --work-dir.")
    p.add_argument("--cohort", required=True, help="cohort manifest CSV or a Cyst-X-style folder")
    p.add_argument("--out", required=True, help="model package folder to write")
    p.add_argument("--work-dir", help="checkpoints, history (default: <out>.train beside the package)")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-fraction", type=float, default=0.1,
                     help="fraction of patients held out for validation / epoch selection (0 = none) [0.1]")
    val.add_argument("--val-cases", nargs="+", metavar="CASE_ID", help="these cases are the validation split")
    p.add_argument("--arch", help="override model.arch (e.g. vit_tiny_patch16_224, densenet121)")
    p.add_argument("--modalities", choices=MODALITY_CHOICES, help="override model.modalities")
    p.add_argument("--fusion", choices=["early", "late"], help="override model.fusion")
    p.add_argument("--labels", choices=["3class", "2class"], help=LABELS_HELP)
    _common(p, "training run")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("cv", help="nested cross-validation (paper Tables I/II) with a report",
                       description="Nested cross-validation: patient-level outer folds estimate, inner folds "
                                   "choose epoch (and lr) and the temperature.")
    p.add_argument("--cohort", help="cohort manifest CSV or Cyst-X-style folder (optional with --resume)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--outer", type=int, help="outer folds (override cv.outer; paper: 10)")
    p.add_argument("--inner", type=int, help="inner folds (override cv.inner)")
    p.add_argument("--models", nargs="+", metavar="ARCH", help="several architectures on the same splits (Table I)")
    p.add_argument("--modalities", nargs="+", choices=MODALITY_CHOICES, help="input modalities (several: Table II)")
    p.add_argument("--fusion", nargs="+", choices=["early", "late"], help="T1+T2 fusion (several: Table II)")
    p.add_argument("--fold", type=int, help="run only this outer fold (parallel jobs); merge with cv-report")
    p.add_argument("--group-by", choices=["patient", "center"], help="keep patients (default) or whole centres together")
    p.add_argument("--leave-one-center-out", action="store_true", help="one outer fold per centre (external validation)")
    p.add_argument("--lr-grid", nargs="+", type=float, help="also select lr on inner folds from these values")
    p.add_argument("--examples", type=int, help="test grids with rollout maps per fold in the report [4]")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("--labels", choices=["3class", "2class"], help=LABELS_HELP)
    p.add_argument("--splits", choices=["cystx-3class", "cystx-2class"],
                   help="outer folds = the Cyst-X release's official folds (inner folds stay ours); "
                        "cystx-2class implies --labels 2class")
    _common(p, "cv run")
    p.set_defaults(func=cmd_cv)

    p = sub.add_parser("cv-report", help="merge the finished folds of a cv run into metrics.json / report.html")
    p.add_argument("run_dir", help="run folder of ipmn cv")
    p.add_argument("--readers", metavar="CSV",
                   help="readers' grades (patient id, truth, one column per reader), compared with the model on "
                        "the patients it was tested on; kept in the run folder for later reports")
    p.add_argument("--progress", choices=["auto", "tqdm", "jsonl", "none"], default="auto")
    p.set_defaults(func=cmd_cv_report)


# ------------------------------------------------------------------------------------------------ helpers
def _overrides(args, cv: bool = False) -> dict:
    train = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed,
             "amp": args.amp, "num_workers": args.workers, "tensorboard": args.tensorboard}
    for key in ("epochs", "batch_size"):
        if train[key] is not None and train[key] < 1:
            raise IPMNError(f"--{key.replace('_', '-')} must be at least 1 (got {train[key]})")
    if args.lr is not None and not args.lr > 0:
        raise IPMNError(f"--lr must be positive (got {args.lr})")
    out = {"train": train, "data": {"cache_dir": args.cache_dir}}
    if not cv:
        out["model"] = {"arch": args.arch, "modalities": MODALITY_SETS[args.modalities] if args.modalities else None,
                        "fusion": args.fusion}
    else:
        c = {"outer": args.outer, "inner": args.inner, "seed": args.seed, "group_by": args.group_by,
             "examples": args.examples}
        if args.leave_one_center_out:
            c["leave_one_center_out"] = True
        if args.lr_grid:
            c["lr_grid"] = list(args.lr_grid)
            c["select"] = ["epoch", "lr"]
        out["cv"] = c
    return out




def _drop_vit_overrides_for_cnn(raw: dict, arch: str) -> None:
    """``--arch densenet121`` on a ViT config: the ViT-only keys (depth, embed_dim ...) do not apply."""
    from ipmn.config import VIT_ONLY
    from ipmn.models import is_vit_arch
    from ipmn.vocab import resolve_arch

    if not is_vit_arch(resolve_arch(arch)):
        for key in VIT_ONLY:
            (raw.get("model") or {}).pop(key, None)


def _progress(args):
    from ipmn.device import dist_info
    from ipmn.progress import Progress

    return Progress(args.progress if dist_info()[0] == 0 else "none")  # under torchrun only rank 0 reports




def _device(args) -> str:
    from ipmn.device import resolve_device

    return str(resolve_device(args.device).type) if args.device in ("auto", "cuda") else args.device


# ------------------------------------------------------------------------------------------------ commands
def cmd_train(args) -> int:
    from ipmn.cohort import load_cohort, summarize, usable
    from ipmn.config import load_config, resolve_config
    from ipmn.cystx import TASKS, apply_label_task, config_for_task
    from ipmn.io import check_out_dir
    from ipmn.runs import cohort_info, stored_train_run
    from ipmn.splits import pick_cases, split_validation
    from ipmn.train import train_model

    out = check_out_dir(args.out)
    work = check_out_dir(args.work_dir if args.work_dir is not None else out.parent / f"{out.name}.train", "--work-dir")
    progress = _progress(args)
    stored = stored_train_run(work) if args.resume and not args.overwrite else None
    if stored is not None:
        # --resume continues the run in the folder with the settings and splits it was started with
        cfg = resolve_config(stored["config"])
        mods = tuple(cfg["model"]["modalities"])
        task = "2class" if cfg["model"]["class_names"] == list(TASKS["2class"]) else "3class"
        by_id = {c.case_id: c for c in apply_label_task(load_cohort(args.cohort, mods), task)}
        missing = [i for i in stored["train_cases"] + stored["val_cases"] if i not in by_id]
        if missing:
            raise IPMNError(f"--resume: the run in {work} used case(s) not in {args.cohort}: {missing[:5]}")
        train = [by_id[i] for i in stored["train_cases"]]
        val = [by_id[i] for i in stored["val_cases"]]
        progress.stage("train", f"resuming the run in {work} with its own settings")
    else:
        raw = config_for_task(load_config(args.config), args.labels or "3class")
        if args.arch:
            _drop_vit_overrides_for_cnn(raw, args.arch)
        cfg = resolve_config(raw, _overrides(args))
        mods = tuple(cfg["model"]["modalities"])
        cases = apply_label_task(load_cohort(args.cohort, mods), args.labels or "3class")
        cases, skipped = usable(cases, mods)
        if skipped:
            progress.warn(f"{len(skipped)} case(s) lack {'/'.join(m.upper() for m in mods)} and are not used")
        if args.val_cases:
            val, train = pick_cases(cases, args.val_cases)
        elif args.val_fraction and args.val_fraction > 0:
            train, val = split_validation(cases, args.val_fraction, cfg["train"]["seed"])
        else:
            train, val = cases, []
    s = summarize(train)
    progress.stage("cohort", f"{s['n_cases']} training case(s) {s['per_class']}, {len(val)} validation case(s)")
    summary = train_model(train, cfg, work, val_cases=val, device=_device(args), progress=progress,
                          resume=args.resume, package_dir=out, cohort_info=cohort_info(args.cohort),
                          overwrite=args.overwrite)
    vm = summary.get("val_metrics") or {}
    msg = f"model package written to {out} (epoch {summary['selected_epoch']} of {summary['epochs_run']})"
    if vm:
        msg += f"; validation accuracy {vm['accuracy']:.3f}, balanced accuracy {vm['balanced_accuracy']:.3f}"
    if args.progress == "jsonl":
        progress.done(out, selected_epoch=summary["selected_epoch"], val_metrics=vm or None)
    else:
        print(msg)
    return 0


def cmd_cv(args) -> int:
    from ipmn.cohort import load_cohort
    from ipmn.config import load_config, resolve_config
    from ipmn.cv import make_variants, run_cv
    from ipmn.cystx import apply_label_task, config_for_task, task_for
    from ipmn.cystx_splits import official_cv_splits
    from ipmn.io import check_out_dir
    from ipmn.runs import cohort_info

    check_out_dir(args.out)
    progress = _progress(args)
    cohort = args.cohort
    run_json = Path(args.out) / "run.json"
    if cohort is None:
        if not (args.resume and run_json.exists()):
            raise IPMNError("--cohort is required (it may be left out only with --resume on an existing run folder)")
        from ipmn.runs import read_run_json

        try:
            cohort = read_run_json(run_json).get("cohort_spec")
        except IPMNError as exc:
            raise IPMNError(f"{exc}; or give --cohort") from exc
        if not cohort:
            raise IPMNError(f"{run_json} does not record the cohort; give --cohort")
    task = task_for(args.labels, args.splits)
    cfg = resolve_config(config_for_task(load_config(args.config), task), _overrides(args, cv=True))
    if args.seed is not None:
        cfg["cv"]["seed"] = args.seed
    variants = make_variants(cfg, args.models, args.modalities, args.fusion)
    mod_sets = {tuple(v["modalities"]) for v in variants}
    cases = apply_label_task(load_cohort(cohort, next(iter(mod_sets)) if len(mod_sets) == 1 else ()), task)
    splits = None
    if args.splits:
        cases, splits, notes = official_cv_splits(cohort, cases, args.splits, mod_sets, cfg["cv"], Path(args.out),
                                                  args.overwrite, args.outer)
        cfg["cv"]["outer"] = splits["outer"]
        for note in notes:
            progress.warn(note)
    if args.fold is not None and args.fold < 0:
        raise IPMNError(f"--fold must be >= 0 (got {args.fold})")
    out = run_cv(cases, cfg, args.out, models=args.models, modalities=args.modalities, fusions=args.fusion,
                 fold=args.fold, device=_device(args), progress=progress, resume=args.resume,
                 overwrite=args.overwrite, cohort_spec=Path(cohort).resolve(), cohort_info=cohort_info(cohort),
                 make_report=not args.no_report, splits=splits)
    if args.progress == "jsonl":
        progress.done(args.out, complete=out["complete"])
    else:
        state = "complete" if out["complete"] else "partial (run the other folds, then ipmn cv-report)"
        print(f"cv run {args.out}: {state}" + (f"; report {out['report']['html']}" if out.get("report") else ""))
        if out.get("report"):
            _print_summary(Path(args.out) / "metrics.json")
    return 0


def _print_summary(path: Path) -> None:
    import json

    from ipmn.metrics import format_mean_std

    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    for model in m.get("models", []):
        s = model["summary"]
        print(f"  {model['label'] or model['name']}: " + ", ".join(
            f"{k} {format_mean_std(s[k])}" for k in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")
        ) + f"  (mean ± std over {len(model['folds_done'])} outer folds, ddof=1)")


def cmd_cv_report(args) -> int:
    from ipmn.report import write_report

    progress = _progress(args)
    if args.readers:
        from ipmn.readers import keep_readers

        keep_readers(args.readers, args.run_dir)
    out = write_report(args.run_dir, progress=progress)
    if args.progress == "jsonl":
        progress.done(out["html"], complete=out["complete"])
    else:
        print(f"{'complete' if out['complete'] else 'partial'} report: {out['html']}")
        _print_summary(Path(out["metrics"]))
    return 0


def main(argv=None) -> int:  # pragma: no cover - for running this module alone
    import argparse

    parser = argparse.ArgumentParser(prog="ipmn")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except IPMNError as exc:
        print(f"ipmn: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover - e.g. torchrun --nproc_per_node 2 -m ipmn.cli_train cv ... --fold 0
    sys.exit(main())
