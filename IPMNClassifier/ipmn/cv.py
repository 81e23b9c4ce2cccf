"""Nested cross-validation (``ipmn cv``), paper section IV-C and Tables I–II.

Splits (patient-level, stratified; :mod:`ipmn.splits`): outer folds estimate, inner folds split each
outer *training* set the same way. Everything chosen is chosen on inner folds only: the epoch (and, with
``cv.select: [epoch, lr]``, the learning rate from ``cv.lr_grid``) maximising the mean inner-validation
``train.select_metric`` (ties: lower mean validation loss), and the softmax temperature (fitted on the
pooled inner-validation predictions at the selected epoch). The outer model is then trained on the whole
outer training set for the selected number of epochs (same LR schedule) and evaluated once on the outer
test fold, before and after temperature scaling.

Run folder::

    RUN_DIR/run.json            what this run is (config, cohort, variants) — a different run is refused
    RUN_DIR/splits.json         written first, reused (same seed → same splits)
    RUN_DIR/<variant>/fold_<k>/inner/lr<i>_split<j>/   inner trainings (resumable)
    RUN_DIR/<variant>/fold_<k>/selection.json          what the inner folds chose, and on which cases
    RUN_DIR/<variant>/fold_<k>/final/                  outer training (resumable)
    RUN_DIR/<variant>/fold_<k>/model/                  the fold's model package
    RUN_DIR/<variant>/fold_<k>/result.json             test predictions + metrics: the fold is finished
    RUN_DIR/metrics.json, predictions.csv, report.html (``ipmn.report``)

A finished fold (``result.json``) is never recomputed; an unfinished one resumes from its checkpoints.
``fold=K`` runs one outer fold so that folds can run in parallel processes or cluster jobs;
``ipmn cv-report`` merges whatever is finished. Variants (``--models``, ``--modalities``, ``--fusion``)
share the same splits; a variant uses the cases that have its modalities.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import numpy as np

from ipmn.errors import IPMNError
from ipmn.io import write_json
from ipmn.vocab import slug


# ------------------------------------------------------------------------------------------------ variants
def variant_config(cfg: dict, variant: dict) -> dict:
    """The run's config with the variant's model (and train overrides, e.g. no teacher for a CNN)."""
    vcfg = copy.deepcopy(cfg)
    vcfg["model"] = variant["model"]
    vcfg["train"].update(variant.get("train", {}))
    return vcfg


def make_variants(cfg: dict, models=None, modalities=None, fusions=None) -> list[dict]:
    """The (arch, modalities, fusion) combinations to cross-validate on the same splits.

    Distillation (``train.teacher_arch``) is part of the ViT recipe: a CNN variant is a baseline and trains
    without the teacher (its ``train`` overrides say so), as the paper's CNNs do. The lesion masks
    (``train.lesion_loss``) are the cohort's data, so every early-fusion variant, CNN or ViT, learns from
    them; late-fusion variants train without them (the lesion head reads one early-fusion feature map)."""
    from ipmn.config import VIT_ONLY, normalize_config
    from ipmn.models import is_vit_arch
    from ipmn.vocab import modality_set, resolve_arch, slug

    base = cfg["model"]
    archs = [resolve_arch(m) for m in (models or [base["arch"]])]
    mod_sets = []
    for m in modalities or ["+".join(base["modalities"])]:
        mods = modality_set(m)
        if mods is None:
            raise IPMNError(f"--modalities must be t1t2, t1 or t2 (got {m!r})")
        mod_sets.append(mods)
    fus = list(fusions or [base["fusion"]])
    for f in fus:
        if f not in ("early", "late"):
            raise IPMNError(f"--fusion must be early or late (got {f!r})")
    out, seen = [], set()
    for arch in archs:
        vit = is_vit_arch(arch)
        for mods in mod_sets:
            for f in fus:
                f_eff = f if len(mods) == 2 else "early"
                if f_eff == "late" and not vit:
                    raise IPMNError(f"late fusion is available for ViTs only, not {arch}")
                key = (arch, tuple(mods), f_eff)
                if key in seen:
                    continue
                seen.add(key)
                m = dict(base, arch=arch, modalities=list(mods), fusion=f_eff)
                if arch != base["arch"]:
                    if not vit:
                        for o in VIT_ONLY:
                            m.pop(o, None)
                    if m.get("pretrained") not in (None, "hub"):
                        m["pretrained"] = None
                v = {"arch": arch, "modalities": list(mods), "fusion": f_eff, "model": normalize_config(m)}
                train = {}
                if not vit and cfg.get("train", {}).get("teacher_arch"):
                    train |= {"teacher_arch": None, "teacher_epochs": None}
                if f_eff == "late" and cfg.get("train", {}).get("lesion_loss"):
                    train["lesion_loss"] = 0.0  # the lesion head reads one early-fusion feature map
                if train:
                    v["train"] = train
                out.append(v)
    several_inputs = len({(tuple(v["modalities"]), v["fusion"]) for v in out}) > 1
    for v in out:
        name = v["arch"]
        if several_inputs:
            name += "-" + "".join(v["modalities"]) + ("-" + v["fusion"] if len(v["modalities"]) == 2 else "")
        v["name"] = slug(name)
        v["label"] = _variant_label(v, several_inputs, len({x["arch"] for x in out}) > 1)
    return out


def _variant_label(v: dict, inputs: bool, archs: bool) -> str:
    mods = "+".join(m.upper() for m in v["modalities"])
    text = v["arch"] if archs or not inputs else ""
    if inputs:
        inp = mods + (f" {v['fusion']} fusion" if len(v["modalities"]) == 2 else "")
        text = f"{text} {inp}".strip()
    return text


# ------------------------------------------------------------------------------------------------ one fold
def _select(curves: list[dict], metric: str) -> dict:
    """Choose (lr, epoch) from inner curves: ``curves[i] = {"lr", "runs": [history lists]}``."""
    best = None
    table = []
    for cand in curves:
        runs = cand["runs"]
        n = min(len(h) for h in runs)
        for e in range(n):
            if metric == "loss":
                main = -float(np.mean([h[e]["val_loss"] for h in runs]))
            else:
                key = {"balanced_accuracy": "val_balanced_accuracy", "accuracy": "val_acc",
                       "macro_auc": "val_macro_auc"}[metric]
                vals = [h[e].get(key) for h in runs]
                vals = [v if v is not None and math.isfinite(v) else 0.0 for v in vals]
                main = float(np.mean(vals))
            loss = float(np.mean([h[e]["val_loss"] for h in runs]))
            table.append({"lr": cand["lr"], "epoch": e + 1, "score": main, "val_loss": loss})
            key_t = (main, -loss)
            if best is None or key_t > best[0]:
                best = (key_t, cand["lr"], e + 1, cand["index"])
    return {"lr": best[1], "epoch": best[2], "lr_index": best[3], "table": table}


def _choose_on_inner_folds(fold, variant, spec, vcfg, cfg, usable, lrs, fold_dir, grids, device, progress,
                           cases_by_id) -> tuple[list, dict, dict]:
    """Inner folds of one outer fold, on its outer training set only: a learning curve per candidate lr and
    inner split, the (lr, epoch) they choose, and the temperature fitted on their pooled validation
    predictions at that choice. Returns ``(curves, choice, selection record)``."""
    from ipmn.metrics import fit_temperature
    from ipmn.train import train_model

    curves, used = [], []
    for i, lr in enumerate(lrs):
        runs = []
        for j, inn in enumerate(spec["inner"]):
            icfg = copy.deepcopy(vcfg)
            icfg["train"]["lr"] = float(lr)
            tr, va = usable(inn["train"]), usable(inn["val"])
            summary = train_model(tr, icfg, fold_dir / "inner" / f"lr{i}_split{j}", val_cases=va, device=device,
                                  progress=progress.child(inner=j, lr=lr), resume=True, package_dir=False,
                                  grids=grids, keep_val_logits=True)
            runs.append(summary["history"])
            used.append({"lr": lr, "inner": j, "train": summary["train_cases"], "val": summary["val_cases"]})
        curves.append({"lr": lr, "index": i, "runs": runs})
    sel = _select(curves, cfg["train"]["select_metric"])
    logits, ys = [], []
    for j in range(len(spec["inner"])):
        hist = curves[sel["lr_index"]]["runs"][j]
        logits.extend(hist[sel["epoch"] - 1]["val_logits"])
        ys.extend(cases_by_id[c].label for c in used[sel["lr_index"] * len(spec["inner"]) + j]["val"])
    temperature = fit_temperature(np.array(logits), np.array(ys)) if cfg["cv"]["temperature"] and logits else 1.0
    selection = {"fold": fold, "variant": variant["name"], "metric": cfg["train"]["select_metric"],
                 "selected": {"lr": sel["lr"], "epoch": sel["epoch"]}, "temperature": temperature,
                 "temperature_fitted_on": f"{len(ys)} pooled inner-validation predictions",
                 "candidates": sel["table"], "inner_used": used,
                 "outer_test": spec["test"]}
    return curves, sel, selection


def run_fold(run_dir: Path, variant: dict, cfg: dict, splits: dict, fold: int, cases_by_id: dict, grids: dict,
             device="cpu", progress=None, cohort_info=None) -> dict:
    """Run (or resume) one outer fold of one variant; returns its result (also in result.json).

    Inner folds choose (:func:`_choose_on_inner_folds`); the outer model is trained once and tested once.
    About 100 lines because most of them spell out result.json, the record the report reads.
    """
    from ipmn.device import autocast_for, dist_info, resolve_device
    from ipmn.metrics import classification_metrics, softmax
    from ipmn.models import load_package
    from ipmn.progress import Progress
    from ipmn.train import train_model
    from ipmn.windows import predict_cases, prepare_arrays

    progress = progress or Progress("none")
    rank, world, local_rank = dist_info()
    fold_dir = Path(run_dir) / variant["name"] / f"fold_{fold}"
    result_path = fold_dir / "result.json"
    if result_path.exists():
        try:
            return json.loads(result_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass  # damaged: redo the evaluation (trainings resume from their finished state)
    spec = splits["folds"][fold]
    mods = variant["modalities"]

    def usable(ids):
        return [cases_by_id[i] for i in ids if all(cases_by_id[i].has(m) for m in mods)]

    vcfg = variant_config(cfg, variant)
    cvc = cfg["cv"]
    lrs = list(cvc["lr_grid"]) if "lr" in cvc["select"] else [cfg["train"]["lr"]]
    fold_progress = progress.child(model=variant["name"], fold=fold)
    fold_progress.stage("fold", f"outer fold {fold}: {len(spec['inner'])} inner fold(s) x {len(lrs)} lr")

    curves, sel, selection = _choose_on_inner_folds(fold, variant, spec, vcfg, cfg, usable, lrs, fold_dir, grids,
                                                    device, fold_progress, cases_by_id)
    temperature = selection["temperature"]
    if rank == 0:
        write_json(selection, fold_dir / "selection.json")

    # ---- the outer model: whole outer training set, selected lr and epoch, evaluated once
    fcfg = copy.deepcopy(vcfg)
    fcfg["train"]["lr"] = float(sel["lr"])
    train_cases, test_cases = usable(spec["train"]), usable(spec["test"])
    calibration = {"temperature": float(temperature), "fitted_on": selection["temperature_fitted_on"],
                   "applied_to": "log of the window-averaged probabilities"}
    final = train_model(train_cases, fcfg, fold_dir / "final", val_cases=None, device=device,
                        progress=fold_progress.child(stage="final"), resume=True, package_dir=fold_dir / "model",
                        stop_epoch=sel["epoch"], grids=grids, cohort_info=cohort_info,
                        package_extra={"calibration": calibration})
    if rank != 0:
        return {"fold": fold, "variant": variant["name"], "rank": rank}

    dev = resolve_device(device, local_rank)
    model, pkg = load_package(fold_dir / "model", device=str(dev))
    arrays = prepare_arrays(test_cases, grids, fcfg, final["landmarks"])
    amp_ctx, _ = autocast_for(cfg["train"]["amp"], dev)
    k = variant["model"]["k"]
    logp = predict_cases(model, [arrays[c.case_id] for c in test_cases], k, cfg["train"]["val_windows"], dev,
                         amp_ctx, stride=cfg["train"]["window_stride"])
    y = np.array([c.label for c in test_cases], dtype=int)
    nc = variant["model"]["num_classes"]
    probs = np.exp(logp) if len(test_cases) else np.zeros((0, nc))
    probs_t = softmax(logp, temperature) if len(test_cases) else np.zeros((0, nc))
    metrics = classification_metrics(y, probs, nc)
    metrics_t = classification_metrics(y, probs_t, nc)
    examples = _examples(fold_dir, model, test_cases, arrays, probs, variant, cvc["examples"], pkg)
    localisation = _localisation(fold_dir / "model", test_cases, cfg, str(dev))
    result = {
        "fold": fold,
        "variant": variant["name"],
        "label": variant["label"],
        "arch": variant["arch"],
        "modalities": mods,
        "fusion": variant["fusion"],
        "selected": selection["selected"],
        "temperature": temperature,
        "metrics": metrics,
        "metrics_calibrated": metrics_t,
        "n_train": len(train_cases),
        "n_test": len(test_cases),
        "n_excluded": len(spec["train"]) + len(spec["test"]) - len(train_cases) - len(test_cases),
        "test_center": spec.get("test_center"),
        "predictions": [
            {"case_id": c.case_id, "true": int(c.label), "probs": [float(v) for v in probs[i]],
             "probs_calibrated": [float(v) for v in probs_t[i]]}
            for i, c in enumerate(test_cases)
        ],
        "final_history": [{k2: v for k2, v in h.items() if k2 != "val_logits"} for h in final["history"]],
        "inner_curves": [{"lr": c["lr"], "runs": [[{k2: v for k2, v in h.items() if k2 != "val_logits"} for h in r]
                                                  for r in c["runs"]]} for c in curves],
        "examples": examples,
        "localisation": localisation,
        "class_names": variant["model"]["class_names"],
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json(result, result_path)
    fold_progress.fold_done(fold, {k2: metrics[k2] for k2 in ("accuracy", "balanced_accuracy", "macro_precision",
                                                            "macro_recall", "macro_f1", "macro_auc", "ece")},
                            ece_calibrated=metrics_t["ece"], selected_epoch=sel["epoch"], selected_lr=sel["lr"])
    return result


def _localisation(model_dir: Path, test_cases, cfg: dict, device: str) -> dict | None:
    """Where the fold model's maps sit on the outer test cases that have a lesion mask: the pointing game
    and attention lift of :mod:`ipmn.evaluate`, computed through the prediction path (maps in T1's
    geometry), so the numbers mean what ``ipmn evaluate`` reports. None when no test case has a mask."""
    cases = [c for c in test_cases if getattr(c, "lesion", None)]
    if not cases:
        return None
    from ipmn.evaluate import localisation_summary, localise
    from ipmn.predict import Predictor

    predictor = Predictor([model_dir], device=device, precision="fp32")
    rows = []
    for c in cases:
        predictor.predict(t1=c.t1, t2=c.t2, **c.roi_spec, **c.choices, windows=cfg["train"]["val_windows"],
                          margin_mm=cfg["data"]["roi_margin_mm"], nonfinite=cfg["data"]["nonfinite"],
                          pad=cfg["data"]["pad"])
        loc = localise(predictor.last_maps["attention"], predictor.last_maps["inside"], c.lesion)
        rows.append({"case_id": c.case_id, "label": c.label_name, "pointing_hit": loc["hit"],
                     "distance_mm": loc["distance_mm"], "lift": loc["lift"]})
    return {"cases": rows, **localisation_summary(rows, "label")}


def _examples(fold_dir: Path, model, test_cases, arrays, probs, variant, n: int, pkg: dict) -> list[dict]:
    """A few test grids with their explanation maps (rollout for ViTs): correct and wrong, each class."""
    if n <= 0 or not test_cases:
        return []
    import torch

    from ipmn.grid import case_windows

    pred = probs.argmax(axis=1)
    order = []
    for c in sorted({tc.label for tc in test_cases}):  # one correct per class first, then mistakes
        idx = [i for i, tc in enumerate(test_cases) if tc.label == c and pred[i] == c]
        if idx:
            order.append(idx[0])
    order += [i for i, tc in enumerate(test_cases) if pred[i] != tc.label and i not in order]
    order += [i for i in range(len(test_cases)) if i not in order]
    names = variant["model"]["class_names"]
    out = []
    try:
        from ipmn.explain import explain
        from ipmn.render import grid_png

        k = variant["model"]["k"]
        for i in order[:n]:
            c = test_cases[i]
            starts, w = case_windows(arrays[c.case_id], k, "central", pad=True)
            x = torch.from_numpy(w[:1])
            _, maps = explain(model, x.to(next(model.parameters()).device), k=k)
            dest = fold_dir / "examples" / f"{slug(c.case_id, fallback='case', max_len=120)}.png"  # never a path
            title = (f"{c.case_id}: true {names[c.label]}, predicted {names[int(pred[i])]} "
                     f"(p={probs[i, int(pred[i])]:.2f}); slices {starts[0]}-{starts[0] + k - 1}")
            grid_png(dest, w[0], variant["modalities"], maps[0].detach().float().cpu().numpy(), title, k)
            out.append({"case_id": c.case_id, "true": int(c.label), "pred": int(pred[i]),
                        "png": str(dest.relative_to(fold_dir.parent.parent))})
    except Exception as exc:  # noqa: BLE001 - a figure never fails a fold
        import sys

        print(f"ipmn: warning: could not draw example grids for {fold_dir}: {type(exc).__name__}: {exc}",
              file=sys.stderr)
    return out


def _barrier(world: int):
    """A function that waits for every process of a torchrun job (nothing to wait for in one process)."""
    def barrier() -> None:
        if world > 1:
            import torch.distributed as dist

            dist.barrier()

    return barrier


def _run_variants(run_dir: Path, variants, cases, cfg: dict, splits: dict, folds, device, progress,
                  cohort_info) -> dict:
    """Every requested outer fold of every variant; grids are read once per variant, only when a fold is left."""
    from ipmn.windows import load_grids

    cases_by_id = {c.case_id: c for c in cases}
    results = {}
    for v in variants:
        usable_cases = [c for c in cases if all(c.has(m) for m in v["modalities"])]
        skipped = len(cases) - len(usable_cases)
        if skipped:
            progress.warn(f"{v['name']}: {skipped} case(s) lack {'/'.join(m.upper() for m in v['modalities'])} "
                          f"and are left out of this variant ({len(usable_cases)} used)")
        todo = [k for k in folds if not (run_dir / v["name"] / f"fold_{k}" / "result.json").exists()]
        vcfg = variant_config(cfg, v)
        grids = load_grids(usable_cases, vcfg, progress) if todo else {}
        for k in folds:
            results[(v["name"], k)] = run_fold(run_dir, v, cfg, splits, k, cases_by_id, grids, device, progress,
                                               cohort_info)
    return results


# ------------------------------------------------------------------------------------------------ the run
def run_cv(cases, config, run_dir, models=None, modalities=None, fusions=None, fold: int | None = None,
           device: str = "cpu", progress=None, resume: bool = False, overwrite: bool = False,
           cohort_spec=None, cohort_info: dict | None = None, make_report: bool = True, splits: dict | None = None) -> dict:
    """Nested CV over ``cases``; returns ``{"run_dir", "variants", "results", "complete"}``.

    ``config``: raw or resolved config (its ``cv`` section gives outer/inner/seed/...). ``fold``: run only
    that outer fold. With ``resume`` a folder holding a different run is continued with *its* settings.
    ``splits``: ready-made splits for these cases (e.g. ``ipmn.cystx_splits.official_cv_splits``) instead of ours.
    About 90 lines: the run folder, --resume of another run, torchrun ranks and the splits must be settled in
    this order before any fold runs; each step is a call into :mod:`ipmn.runs` or :mod:`ipmn.splits`.
    """
    from ipmn.cohort import summarize
    from ipmn.config import is_resolved, resolve_config
    from ipmn.device import dist_info
    from ipmn.progress import Progress
    from ipmn.runs import built_beside, cv_identity, prepare_cv_folder, replaces_cv_run
    from ipmn.splits import check_labels, load_or_make_splits, make_splits, verify_splits

    progress = progress or Progress("none")
    run_dir = Path(run_dir)
    cfg = config if is_resolved(config) else resolve_config(config)
    cases = list(cases)
    check_labels(cases, cfg["model"]["num_classes"], "the cohort")
    variants = make_variants(cfg, models, modalities, fusions)
    identity = cv_identity(cfg, variants, cases)
    rank, world, _ = dist_info()
    if rank != 0:
        progress = Progress("none")
    extra = {"cohort_spec": str(cohort_spec) if cohort_spec else None, "cohort_info": cohort_info or {},
             "models": models, "modalities": modalities, "fusions": fusions, "resolved_config": cfg,
             "variants_full": variants, "cohort": summarize(cases)}
    # splits are checked (class counts, centres, --fold) before anything is written
    fresh = None
    if overwrite or not (run_dir / "splits.json").exists():
        cvc = cfg["cv"]
        fresh = splits or make_splits(cases, cvc["outer"], cvc["inner"], cvc["seed"], cvc["group_by"],
                                      cvc["leave_one_center_out"], cvc["stratify_center"])
        if fold is not None and not 0 <= fold < len(fresh["folds"]):
            raise IPMNError(f"--fold {fold} does not exist: this run has folds 0-{len(fresh['folds']) - 1}")
    # --overwrite builds the new run beside the old one, which stays until the new one has finished
    final_dir = run_dir
    with built_beside(final_dir, overwrite and replaces_cv_run(final_dir), rank == 0, _barrier(world)) as run_dir:
        stored = None
        if rank == 0:
            stored = prepare_cv_folder(run_dir, identity, resume, overwrite, extra)
        if world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                from ipmn.device import resolve_device

                dist.init_process_group("nccl" if resolve_device(device).type == "cuda" else "gloo")
            dist.barrier()
            stored = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
            if stored.get("fingerprint") == identity["fingerprint"]:
                stored = None
        if stored is not None:
            progress.warn(f"{run_dir} holds a different run; continuing it with its own settings (--resume)")
            cfg = stored["resolved_config"]
            variants = stored["variants_full"]
            ids = [c[0] for c in stored["cases"]]
            by_id = {c.case_id: c for c in cases}
            missing = [i for i in ids if i not in by_id]
            if missing:
                raise IPMNError(f"--resume: the stored run uses case(s) not in this cohort: {missing[:5]}")
            cases = [by_id[i] for i in ids]
            cohort_info = stored.get("cohort_info") or cohort_info

        splits = None
        if rank == 0:
            splits = load_or_make_splits(run_dir, cases, cfg["cv"], None if stored is not None else fresh)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
            splits = json.loads((run_dir / "splits.json").read_text(encoding="utf-8"))
        for w in verify_splits(splits):
            progress.warn(w)
        n_folds = len(splits["folds"])
        if fold is not None and not 0 <= fold < n_folds:
            raise IPMNError(f"--fold {fold} does not exist: this run has folds 0-{n_folds - 1}")
        folds = [fold] if fold is not None else list(range(n_folds))
        progress.stage("cv", f"{len(variants)} variant(s) x {len(folds)} outer fold(s) of {n_folds} "
                       f"(inner {splits['inner']}), run folder {run_dir}", variants=[v["name"] for v in variants],
                       folds=folds)
        results = _run_variants(run_dir, variants, cases, cfg, splits, folds, device, progress, cohort_info)
        complete = all((run_dir / v["name"] / f"fold_{k}" / "result.json").exists()
                       for v in variants for k in range(n_folds))
    run_dir = final_dir
    out = {"run_dir": str(run_dir), "variants": [v["name"] for v in variants], "complete": complete,
           "results": {f"{n}/fold_{k}": r.get("metrics") for (n, k), r in results.items()}}
    if rank == 0 and make_report:
        from ipmn.report import write_report

        out["report"] = write_report(run_dir, progress=progress)
    return out


