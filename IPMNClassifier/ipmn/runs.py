"""Run folders of ``ipmn train`` and ``ipmn cv``: what a folder holds, and whether a new run may use it.

Each run folder has a ``run.json`` whose ``kind`` (``ipmn-train`` / ``ipmn-cv``) and ``fingerprint``
(a digest of everything that changes the result: config less logging-only options, the cases and their
labels, the variants) identify the run. The policy, in one table:

=====================================  ======================================  ==========================================
folder holds                           ``ipmn train``                           ``ipmn cv``
=====================================  ======================================  ==========================================
nothing                                start                                    start
the same run                           ``--resume`` continues (a finished run   continues (finished folds are kept)
                                       is returned as it is); else refused
a different run of the same kind       refused; ``--overwrite`` replaces it     refused; ``--resume`` continues *that* run
                                                                                with its own settings; ``--overwrite``
                                                                                replaces it
anything else                          refused, also with ``--overwrite``       refused, also with ``--overwrite``
=====================================  ======================================  ==========================================

A training's model package folder must be empty, or hold a package that ``--overwrite`` may replace
(or that the resumed run wrote).

``--overwrite`` never deletes the run it replaces before the new one has finished: the new run is built
in a hidden folder beside it (``.NAME.overwrite``) and swapped into place on success (the model package
is replaced by one rename at the end, as every package write is). A new run that fails or is killed
leaves the old one as it was; the next ``--overwrite`` removes the abandoned folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

from ipmn.config import LOGGING_ONLY, config_digest
from ipmn.errors import IPMNError
from ipmn.io import write_json

RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
TRAIN_KIND = "ipmn-train"
CV_KIND = "ipmn-cv"


def fingerprinted_config(cfg: dict, sections=("model", "preprocess", "data")) -> dict:
    """The parts of a resolved config that change a result (logging-only train options left out)."""
    return {k: cfg[k] for k in sections} | {"train": {k: v for k, v in cfg["train"].items() if k not in LOGGING_ONLY}}


def _non_empty(folder: Path) -> bool:
    return folder.exists() and any(folder.iterdir())


def read_run_json(path: Path) -> dict:
    """A run folder's ``run.json`` as a dict; one clear error when it is unreadable or not a JSON object
    (``FileNotFoundError`` passes through: callers decide what a missing one means)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise IPMNError(f"{path} is damaged (not readable JSON); pass --overwrite to restart the run") from exc
    if not isinstance(data, dict):
        raise IPMNError(f"{path} is damaged (it holds a JSON {type(data).__name__}, not an object); "
                        "pass --overwrite to restart the run")
    return data


# ------------------------------------------------------------------------------------------------ overwrite
def overwrite_staging(folder: Path, clean: bool = True) -> Path:
    """The hidden folder beside ``folder`` where an ``--overwrite`` run is built; with ``clean`` the one an
    abandoned run left is removed, and a run a killed swap left aside is put back."""
    folder = Path(folder)
    staging = folder.parent / f".{folder.name}.overwrite"
    replaced = folder.parent / f".{folder.name}.replaced"
    if clean:
        if replaced.exists() and not folder.exists():
            os.replace(replaced, folder)
        for path in (staging, replaced):
            if path.exists():
                shutil.rmtree(path)
    return staging


@contextlib.contextmanager
def built_beside(folder: Path, replace: bool, main: bool = True, barrier=lambda: None):
    """Yield the folder a run is built in: ``folder`` itself, or with ``replace`` its staging folder, which
    takes ``folder``'s place when the block finishes and is removed when it fails. ``main``: this process
    does the file work (rank 0 of a torchrun job); ``barrier`` waits for the others after the swap."""
    if not replace:
        yield Path(folder)
        return
    staging = overwrite_staging(folder, clean=main)
    try:
        yield staging
    except BaseException:
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if main:
        commit_overwrite(staging, folder)
    barrier()


def commit_overwrite(staging: Path, folder: Path) -> None:
    """Swap a finished ``--overwrite`` run into place; the old run is deleted only once the new one is there."""
    folder = Path(folder)
    replaced = folder.parent / f".{folder.name}.replaced"
    if folder.exists():
        os.replace(folder, replaced)
    os.replace(staging, folder)
    shutil.rmtree(replaced, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ train
def train_identity(cfg: dict, cases, val_cases, last_epoch: int) -> dict:
    """What makes two trainings the same run (``fingerprint`` added)."""
    identity = {
        "config": fingerprinted_config(cfg),
        "train": sorted((c.case_id, c.label) for c in cases),
        "val": sorted((c.case_id, c.label) for c in val_cases),
        "stop_epoch": last_epoch,
    }
    return {"fingerprint": config_digest(identity), **identity}


def check_train_folder(out_dir: Path, package_dir: Path | None, fingerprint: str, resume: bool,
                       overwrite: bool) -> tuple[bool, dict | None]:
    """Decide, without writing, what a training may do with ``out_dir``: ``(wipe, finished summary)``.

    ``wipe``: the folder (and its package) is to be replaced; a finished summary: the same run already
    finished and ``resume`` was asked for, so there is nothing to do.
    """
    run_json = out_dir / RUN_FILE
    wipe = False
    if _non_empty(out_dir):
        try:
            same = json.loads(run_json.read_text(encoding="utf-8")).get("fingerprint") == fingerprint
        except (OSError, ValueError, AttributeError):
            same = False
        if overwrite:
            if not run_json.exists():
                raise IPMNError(f"refusing to overwrite {out_dir}: it is not an ipmn training folder")
            wipe = True
        elif not same:
            what = "a different training run" if run_json.exists() else "other files"
            raise IPMNError(f"{out_dir} holds {what}; choose another folder, pass --overwrite to replace it"
                            + (", or --resume without new settings to continue it" if run_json.exists() else ""))
        elif not resume:
            raise IPMNError(f"{out_dir} holds this run already; pass --resume to continue it or --overwrite to restart")
        elif (out_dir / SUMMARY_FILE).exists():
            done = json.loads((out_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
            if done.get("finished") and (package_dir is None or (package_dir / "config.json").exists()):
                return False, done
    if package_dir and package_dir.is_dir() and any(package_dir.iterdir()):
        if not (package_dir / "config.json").is_file():
            raise IPMNError(f"{package_dir} is a non-empty folder that is not a model package; choose another --out")
        if not overwrite and not (out_dir.exists() and run_json.exists() and not wipe and resume):
            raise IPMNError(f"{package_dir} already holds a model package; pass --overwrite to replace it, "
                            "or --resume to continue the run that wrote it")
    return wipe, None


def start_train_folder(out_dir: Path, identity: dict, cases, val_cases) -> None:
    """Create a training folder and write its ``run.json`` once."""
    out_dir.mkdir(parents=True, exist_ok=True)
    run_json = out_dir / RUN_FILE
    if not run_json.exists():
        write_json({"kind": TRAIN_KIND, "fingerprint": identity["fingerprint"],
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "config": identity["config"],
                    "stop_epoch": identity["stop_epoch"], "train_cases": [c.case_id for c in cases],
                    "val_cases": [c.case_id for c in val_cases]}, run_json)


def stored_train_run(work: Path) -> dict | None:
    """The ``run.json`` of the training in ``work`` (``None`` if there is none); refuses anything else."""
    try:
        stored = read_run_json(work / RUN_FILE)
    except FileNotFoundError:
        return None
    if stored.get("kind") != TRAIN_KIND or "config" not in stored:
        raise IPMNError(f"{work} does not hold an ipmn training run; choose another --work-dir")
    return stored


# ------------------------------------------------------------------------------------------------ cv
def cv_identity(cfg: dict, variants: list, cases) -> dict:
    """What makes two cv runs the same run (``fingerprint`` added)."""
    ident = {
        "config": fingerprinted_config(cfg, ("preprocess", "data"))
        | {"cv": {k: v for k, v in cfg["cv"].items() if k != "examples"}},
        "variants": [{"name": v["name"], "model": v["model"], **({"train": v["train"]} if "train" in v else {})}
                     for v in variants],
        "cases": [(c.case_id, int(c.label), c.patient_id, c.center) for c in cases],
    }
    return {"fingerprint": config_digest(ident), **ident}


def replaces_cv_run(run_dir: Path) -> bool:
    """True when ``run_dir`` holds a cv run that ``--overwrite`` may replace; False when it is empty or
    absent; refuses anything else."""
    run_dir = Path(run_dir)
    if not _non_empty(run_dir):
        return False
    if not (run_dir / RUN_FILE).exists():
        raise IPMNError(f"{run_dir} is not empty and is not an ipmn cv run folder; choose another --out")
    stored = read_run_json(run_dir / RUN_FILE)
    if stored.get("kind") != CV_KIND:
        raise IPMNError(f"{run_dir} holds something else than a cv run ({stored.get('kind')}); choose another --out")
    return True


def prepare_cv_folder(run_dir: Path, identity: dict, resume: bool, overwrite: bool, extra: dict) -> dict | None:
    """Create / check a cv run folder. Returns the stored run.json when continuing a different run (--resume).
    ``--overwrite`` runs are built in a staging folder (:func:`overwrite_staging`), never here."""
    run_dir = Path(run_dir)
    run_json = run_dir / RUN_FILE
    if _non_empty(run_dir):
        if not run_json.exists():
            raise IPMNError(f"{run_dir} is not empty and is not an ipmn cv run folder; choose another --out")
        try:
            stored = read_run_json(run_json)
        except FileNotFoundError as exc:
            raise IPMNError(f"{run_json} is missing") from exc
        if stored.get("kind") != CV_KIND:
            raise IPMNError(f"{run_dir} holds something else than a cv run ({stored.get('kind')}); choose another --out")
        if overwrite:
            raise ValueError("an --overwrite cv run is built in its staging folder (runs.overwrite_staging)")
        if stored.get("fingerprint") == identity["fingerprint"]:
            return None
        if resume:
            return stored
        else:
            raise IPMNError(
                f"{run_dir} holds a different cv run (other settings or cohort); pass --resume to continue that run "
                "with its own settings, --overwrite to replace it, or choose another --out"
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json({"kind": CV_KIND, **identity, **extra, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, run_json)
    return None


# ------------------------------------------------------------------------------------------------ cohorts
def is_phantom_cohort(spec) -> bool:
    """True when the cohort was written by ``ipmn phantoms`` (``phantom_truth.json`` beside it)."""
    if spec is None:
        return False
    p = Path(spec)
    folder = p if p.is_dir() else p.parent
    return (folder / "phantom_truth.json").is_file()


def cohort_info(spec) -> dict:
    """How a run records its cohort: the command that regenerates phantoms, else the cohort's path."""
    synthetic = is_phantom_cohort(spec)
    source = str(spec)
    if synthetic:  # name the command that regenerates the very same cases, not a local path
        p = Path(spec)
        truth = json.loads(((p if p.is_dir() else p.parent) / "phantom_truth.json").read_text(encoding="utf-8"))
        source = f"`ipmn phantoms --n {truth['n']} --seed {truth['seed']} --centers {truth.get('centers', 1)}`"
    return {"source": source, "synthetic": synthetic}
