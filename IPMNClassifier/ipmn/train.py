"""Training one model on a cohort (``ipmn train``), also used for every fold of ``ipmn cv``.

Samples (paper, section IV-B): every window of ``k`` consecutive ROI slices of every training case
(sliding, stride ``train.window_stride``), tiled into a √k × √k grid and labelled with its case's label;
``train.windows_per_case`` caps how many of a case's windows are drawn per epoch (drawn afresh each
epoch; 1 = the reference code's "random start slice"). Validation uses the central window, or every
window with the class probabilities averaged per case (``train.val_windows: all``).

Augmentation (paper): per sample a random horizontal flip and a random number of quarter turns,
applied identically to every cell (slice) and channel of the grid (``ipmn.explain.cell_transform``; a
plain MONAI flip/rotation of the tiled image would move slices between cells).

Determinism and resuming: all sampling, shuffling and augmentation of epoch ``e`` come from generators
seeded with ``(seed, e)``; dropout uses torch's global generator, whose state is checkpointed. After
every epoch a checkpoint (model, optimiser, LR schedule, grad scaler, RNG states, history) is written
atomically as ONE ``.safetensors`` file whose header metadata holds the JSON state (no pickle); a
killed run resumed with ``resume=True`` reaches bit-identical weights on CPU with the same seed and
thread count. Best-epoch selection uses the validation split only; without one, the last epoch (or
``stop_epoch``, chosen by nested CV on inner folds) is kept. Class weights come from the training
split only.

Multi-GPU: under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialised (NCCL on CUDA,
gloo on CPU), the model is wrapped in DistributedDataParallel and each rank takes every
``world_size``-th sample of the epoch's plan (the global batch is ``batch_size × world_size``); every
rank evaluates the full validation set (identical weights → identical decisions, no broadcast) and only
rank 0 writes files.

Working files of a run live in ``out_dir`` (``run.json``, ``checkpoint.safetensors``,
``history.json``, ``summary.json``); the model package is written with ``ipmn.models.save_package``
to ``package_dir`` (default ``out_dir/model``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np

from ipmn import CLASS_NAMES
from ipmn.device import resolve_device
from ipmn.errors import IPMNError
from ipmn.io import atomic_path, json_default, write_json

# ------------------------------------------------------------------------------------------------ config
SECTIONS = ("model", "preprocess", "train", "cv", "data")

TRAIN_DEFAULTS = {
    "optimizer": "adam",  # paper: Adam, lr 0.003, batch 8
    "lr": 0.003,
    "weight_decay": 0.0,
    "momentum": 0.9,  # SGD only
    "batch_size": 8,
    "epochs": 50,  # paper: 3000 (see the paper preset)
    "warmup_epochs": 0,
    "schedule": "none",  # none | cosine (per step, after the warm-up)
    "min_lr_ratio": 0.0,  # cosine floor as a fraction of lr
    "class_weights": "balanced",  # balanced (training split only) | none | [w_normal, w_low, w_high]
    "label_smoothing": 0.0,
    "augment": True,
    "windows_per_case": None,  # cap on training windows drawn per case and epoch (None = all)
    "window_stride": 1,
    "val_windows": "central",  # central | all (probabilities averaged per case)
    "select_metric": "balanced_accuracy",  # balanced_accuracy | accuracy | macro_auc | loss
    "early_stopping_patience": None,
    "grad_clip": None,
    "amp": "auto",  # auto (bf16 on CUDA, off on CPU) | bf16 | fp16 (CUDA) | none
    "num_workers": 0,
    "seed": 0,
    "deterministic": True,
    "save_dtype": "float32",  # float32 | float16 (package weights)
    "keep_checkpoint": False,  # keep the last checkpoint after a finished run
    "tensorboard": False,  # also log each epoch's scalars to <run folder>/tensorboard (needs `tensorboard`)
}
# Train options that change what is logged, not what is trained: left out of a run's fingerprint, so that
# a run may be resumed with them switched.
LOGGING_ONLY = ("tensorboard",)
DATA_DEFAULTS = {
    "roi_margin_mm": 10.0,  # margin around a mask's bounding box when the ROI comes from a mask
    "nonfinite": "refuse",
    "pad": False,  # replicate the last slice of ROIs with fewer than k slices (reference code)
    "cache_dir": None,
}
CV_DEFAULTS = {
    "outer": 10,
    "inner": 3,
    "select": ["epoch"],  # [epoch] or [epoch, lr]
    "lr_grid": None,
    "temperature": True,
    "seed": 0,
    "group_by": "patient",  # patient | center
    "leave_one_center_out": False,
    "stratify_center": True,
    "examples": 4,  # test grids with rollout maps per fold in the report
}
SELECT_METRICS = ("balanced_accuracy", "accuracy", "macro_auc", "loss")
PRESETS_DIR = Path(__file__).resolve().parent / "presets"
MODEL_ALIASES = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
    "densenet": "densenet121",
    "resnet": "resnet18",
    "mobilenet_v2": "mobilenetv2_100",
    "mobilenetv2": "mobilenetv2_100",
    "efficientnet": "efficientnet_b5",
}


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise IPMNError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise IPMNError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise IPMNError(f"config file {path} must hold a mapping with sections {list(SECTIONS)}")
    return data


def load_config(spec=None) -> dict:
    """A YAML config file, or the name of a bundled preset (``ipmn.train.list_presets()``); ``None`` = {}."""
    if spec is None or spec == "":
        return {}
    if isinstance(spec, dict):
        return copy.deepcopy(spec)
    path = Path(spec).expanduser()
    if path.is_file():
        raw = _read_yaml(path)
    elif str(spec) in list_presets():
        raw = _read_yaml(PRESETS_DIR / f"{spec}.yaml")
    else:
        raise IPMNError(f"config file not found: {spec} (or give a preset name: {', '.join(list_presets())})")
    check_sections(raw, where=str(spec))
    return raw


def check_sections(raw: dict, where: str = "config") -> None:
    unknown = [k for k in raw if k not in SECTIONS]
    if unknown:
        raise IPMNError(f"{where}: unknown section(s) {unknown}; valid sections: {list(SECTIONS)}")
    for section in SECTIONS:
        if raw.get(section) is not None and not isinstance(raw[section], dict):
            raise IPMNError(f"{where}: section '{section}' must be a mapping of options")


def _check_keys(section: str, values: dict, defaults: dict) -> None:
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise IPMNError(f"config section '{section}': unknown key(s) {unknown}; valid keys: {sorted(defaults)}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v > 0 and math.isfinite(v)


def resolve_config(raw: dict | None = None, overrides: dict | None = None) -> dict:
    """Defaults + config file + overrides (e.g. CLI flags), every section validated.

    Returns ``{"model": normalised model config, "preprocess": PreprocessConfig dict, "train": ...,
    "cv": ..., "data": ...}``. Any unknown key raises an :class:`IPMNError` naming it and the valid ones.
    """
    from ipmn.models import normalize_config
    from ipmn.preprocess import PreprocessConfig

    raw = copy.deepcopy(raw or {})
    check_sections(raw)
    for section, values in (overrides or {}).items():
        if section not in SECTIONS:
            raise IPMNError(f"unknown config section {section!r}; valid sections: {list(SECTIONS)}")
        merged = dict(raw.get(section) or {})
        merged.update({k: v for k, v in values.items() if v is not None})
        raw[section] = merged

    model = dict(raw.get("model") or {})
    if isinstance(model.get("arch"), str):
        model["arch"] = MODEL_ALIASES.get(model["arch"], model["arch"])
    model = normalize_config(model)

    pre = dict(raw.get("preprocess") or {})
    if "cell" in pre and pre["cell"] != model["cell"]:
        raise IPMNError(f"preprocess.cell ({pre['cell']}) differs from model.cell ({model['cell']}); set one of them")
    pre["cell"] = model["cell"]
    pre = PreprocessConfig.from_dict(pre).to_dict()

    train = dict(raw.get("train") or {})
    _check_keys("train", train, TRAIN_DEFAULTS)
    train = {**TRAIN_DEFAULTS, **train}
    _validate_train(train, model["num_classes"])

    data = dict(raw.get("data") or {})
    _check_keys("data", data, DATA_DEFAULTS)
    data = {**DATA_DEFAULTS, **data}
    if not isinstance(data["roi_margin_mm"], int | float) or data["roi_margin_mm"] < 0:
        raise IPMNError(f"data.roi_margin_mm must be a number >= 0 (got {data['roi_margin_mm']!r})")
    if data["nonfinite"] not in ("refuse", "clean"):
        raise IPMNError(f"data.nonfinite must be refuse or clean (got {data['nonfinite']!r})")
    if not isinstance(data["pad"], bool):
        raise IPMNError(f"data.pad must be true or false (got {data['pad']!r})")

    cv = dict(raw.get("cv") or {})
    _check_keys("cv", cv, CV_DEFAULTS)
    cv = {**CV_DEFAULTS, **cv}
    _validate_cv(cv)
    return {"model": model, "preprocess": pre, "train": train, "cv": cv, "data": data}


def _validate_train(t: dict, num_classes: int) -> None:
    def bad(key, what):
        raise IPMNError(f"train.{key} must be {what} (got {t[key]!r})")

    if t["optimizer"] not in ("adam", "adamw", "sgd"):
        bad("optimizer", "adam, adamw or sgd")
    if not _positive(t["lr"]):
        bad("lr", "a positive number")
    for key in ("weight_decay", "momentum", "min_lr_ratio", "label_smoothing"):
        v = t[key]
        if not isinstance(v, int | float) or isinstance(v, bool) or v < 0:
            bad(key, "a number >= 0")
    if t["label_smoothing"] >= 1 or t["min_lr_ratio"] > 1:
        bad("label_smoothing" if t["label_smoothing"] >= 1 else "min_lr_ratio", "below 1")
    for key in ("batch_size", "epochs", "window_stride"):
        if not _is_int(t[key]) or t[key] < 1:
            bad(key, "an integer >= 1")
    if not _is_int(t["warmup_epochs"]) or t["warmup_epochs"] < 0:
        bad("warmup_epochs", "an integer >= 0")
    if t["schedule"] not in ("cosine", "none"):
        bad("schedule", "cosine or none")
    cw = t["class_weights"]
    if cw is None or cw is False:
        t["class_weights"] = "none"
    elif isinstance(cw, str):
        if cw not in ("balanced", "none"):
            bad("class_weights", "balanced, none or a list of weights")
    elif not (isinstance(cw, list) and len(cw) == num_classes and all(_positive(w) for w in cw)):
        bad("class_weights", f"balanced, none or a list of {num_classes} positive weights")
    for key in ("augment", "deterministic", "keep_checkpoint", "tensorboard"):
        if not isinstance(t[key], bool):
            bad(key, "true or false")
    if t["windows_per_case"] is not None and (not _is_int(t["windows_per_case"]) or t["windows_per_case"] < 1):
        bad("windows_per_case", "an integer >= 1 or null")
    if t["val_windows"] not in ("central", "all"):
        bad("val_windows", "central or all")
    if t["select_metric"] not in SELECT_METRICS:
        bad("select_metric", " | ".join(SELECT_METRICS))
    p = t["early_stopping_patience"]
    if p is not None and (not _is_int(p) or p < 1):
        bad("early_stopping_patience", "an integer >= 1 or null")
    if t["grad_clip"] is not None and not _positive(t["grad_clip"]):
        bad("grad_clip", "a positive number or null")
    if t["amp"] not in ("auto", "bf16", "fp16", "none"):
        bad("amp", "auto, bf16, fp16 or none")
    if not _is_int(t["num_workers"]) or t["num_workers"] < 0:
        bad("num_workers", "an integer >= 0")
    if not _is_int(t["seed"]):
        bad("seed", "an integer")
    if t["save_dtype"] not in ("float32", "float16"):
        bad("save_dtype", "float32 or float16")


def _validate_cv(c: dict) -> None:
    def bad(key, what):
        raise IPMNError(f"cv.{key} must be {what} (got {c[key]!r})")

    if not _is_int(c["outer"]) or c["outer"] < 2:
        bad("outer", "an integer >= 2")
    if not _is_int(c["inner"]) or c["inner"] < 2:
        bad("inner", "an integer >= 2")
    sel = c["select"]
    if isinstance(sel, str):
        sel = c["select"] = [sel]
    if not isinstance(sel, list) or "epoch" not in sel or any(s not in ("epoch", "lr") for s in sel):
        bad("select", "[epoch] or [epoch, lr]")
    if "lr" in sel:
        grid = c["lr_grid"]
        if not isinstance(grid, list) or not grid or not all(_positive(v) for v in grid):
            bad("lr_grid", "a non-empty list of positive learning rates when select includes lr")
    elif c["lr_grid"] is not None and not (isinstance(c["lr_grid"], list) and all(_positive(v) for v in c["lr_grid"])):
        bad("lr_grid", "a list of positive learning rates or null")
    for key in ("temperature", "leave_one_center_out", "stratify_center"):
        if not isinstance(c[key], bool):
            bad(key, "true or false")
    if c["group_by"] not in ("patient", "center"):
        bad("group_by", "patient or center")
    if not _is_int(c["seed"]):
        bad("seed", "an integer")
    if not _is_int(c["examples"]) or c["examples"] < 0:
        bad("examples", "an integer >= 0")


def config_digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_phantom_cohort(spec) -> bool:
    """True when the cohort was written by ``ipmn phantoms`` (``phantom_truth.json`` beside it)."""
    if spec is None:
        return False
    p = Path(spec)
    folder = p if p.is_dir() else p.parent
    return (folder / "phantom_truth.json").is_file()


# ------------------------------------------------------------------------------------------------ data
def split_validation(cases, fraction: float = 0.1, seed: int = 0):
    """Patient-grouped, label-stratified train/validation split (``fraction`` of the patients)."""
    from sklearn.model_selection import StratifiedGroupKFold

    if not 0 < fraction < 1:
        raise IPMNError(f"--val-fraction must be between 0 and 1 (got {fraction})")
    n_splits = max(2, int(round(1.0 / fraction)))
    labels = np.array([c.label for c in cases])
    groups = np.array([c.patient_id or c.case_id for c in cases])
    if len(set(groups.tolist())) < n_splits:
        raise IPMNError(
            f"--val-fraction {fraction} needs at least {n_splits} patients; the cohort has {len(set(groups.tolist()))}"
        )
    counts = np.bincount(labels)
    y = labels if counts[counts > 0].min() >= n_splits else np.zeros_like(labels)
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tr, va = next(sgkf.split(np.zeros(len(cases)), y, groups))
    return [cases[i] for i in tr], [cases[i] for i in va]


def pick_cases(cases, ids) -> tuple[list, list]:
    """(cases whose id is in ``ids``, the rest); unknown ids raise one error listing them."""
    ids = list(ids)
    known = {c.case_id for c in cases}
    missing = [i for i in ids if i not in known]
    if missing:
        raise IPMNError(f"--val-cases: unknown case id(s) {missing[:10]}")
    chosen = set(ids)
    return [c for c in cases if c.case_id in chosen], [c for c in cases if c.case_id not in chosen]


def check_labels(cases, num_classes: int, what: str = "the training set") -> None:
    present = sorted({c.label for c in cases})
    if len(present) < 2:
        names = [CLASS_NAMES[i] if i < len(CLASS_NAMES) else str(i) for i in present]
        raise IPMNError(f"{what} has fewer than two classes ({names or 'no cases'}); a classifier needs at least two")
    too_big = [c.case_id for c in cases if c.label >= num_classes]
    if too_big:
        raise IPMNError(f"case(s) {too_big[:5]} have labels outside the model's {num_classes} classes")


def prepare_arrays(cases, grids: dict, cfg: dict, landmarks: dict | None) -> dict:
    """case_id → standardised (C, S, cell, cell) float32, padded to ≥ k slices when data.pad is set."""
    from ipmn.cache import standardize
    from ipmn.grid import pad_slices
    from ipmn.preprocess import PreprocessConfig

    pre = PreprocessConfig.from_dict(cfg["preprocess"])
    k = cfg["model"]["k"]
    mods = cfg["model"]["modalities"]
    short = [f"{c.case_id} ({grids[c.case_id].n_slices})" for c in cases if grids[c.case_id].n_slices < k]
    if short and not cfg["data"]["pad"]:
        raise IPMNError(
            f"{len(short)} case(s) have fewer ROI slices than k={k}: {', '.join(short[:10])}; enlarge their ROIs, "
            "lower model.k, or set data.pad: true to replicate the last slice"
        )
    out = {}
    for c in cases:
        arr = standardize(grids[c.case_id].data, mods, pre, landmarks)
        out[c.case_id] = pad_slices(arr, k) if arr.shape[1] < k else arr
    return out


def load_grids(cases, cfg: dict, progress=None, cache_dir=None) -> dict:
    from ipmn.cache import GridCache

    cache = GridCache(cfg["preprocess"], cfg["model"]["modalities"], cache_dir or cfg["data"]["cache_dir"],
                      cfg["data"]["roi_margin_mm"], cfg["data"]["nonfinite"])
    return cache.get_many(cases, progress=progress)


def landmarks_for(train_cases, grids: dict, cfg: dict) -> dict | None:
    """Nyúl landmarks learned on the training cases only (None unless preprocess.standardize is nyul)."""
    if cfg["preprocess"]["standardize"] != "nyul":
        return None
    from ipmn.cache import fit_landmarks

    return fit_landmarks([grids[c.case_id].data for c in train_cases], cfg["model"]["modalities"])


# ------------------------------------------------------------------------------------------------ torch helpers
def dist_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment variables."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


def seed_everything(seed: int, deterministic: bool = True) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)


def autocast_for(amp: str, device):
    """(autocast context, precision used or None) for ``train.amp``; auto = bf16 on CUDA, off on the CPU."""
    import contextlib

    from ipmn.device import autocast

    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    if amp == "none":
        return contextlib.nullcontext(), None
    if amp == "fp16" and device.type != "cuda":
        raise IPMNError("train.amp fp16 needs a CUDA device; use bf16 or none on CPU")
    return autocast(amp, device), amp


def class_weight_vector(spec, counts: np.ndarray) -> np.ndarray | None:
    """Loss weights from the per-class training-sample counts (``balanced``: n / (C · n_c); absent class → 0)."""
    if spec == "none":
        return None
    if isinstance(spec, list):
        return np.asarray(spec, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    w = np.zeros_like(counts)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return w


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or "cls_token" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_optimizer(model, t: dict, lr: float):
    import torch

    groups = _param_groups(model, float(t["weight_decay"]))
    if t["optimizer"] == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if t["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=float(t["momentum"]))


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str, floor: float) -> float:
    """Linear warm-up then cosine decay to ``floor`` (or constant); a function of the step only."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "none":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------------ checkpoints
CHECKPOINT = "checkpoint.safetensors"
BEST = "best.safetensors"


def _is_disk_full(exc: BaseException) -> bool:
    import errno

    return (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left" in str(exc)


def save_tensors(dest: Path, tensors: dict, meta: dict | None = None) -> None:
    """Atomic safetensors write; a full disk raises an IPMNError and leaves the previous file intact."""
    from safetensors.torch import save_file

    metadata = {"format": "pt"}
    if meta is not None:
        metadata["ipmn_state"] = json.dumps(meta, default=json_default)
    try:
        with atomic_path(dest) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
    except Exception as exc:
        if _is_disk_full(exc):
            raise IPMNError(
                f"disk full while writing {dest}; the previous checkpoint is intact: free some space and rerun "
                "with --resume"
            ) from exc
        raise


TENSORBOARD_SCALARS = (
    ("train_loss", "loss/train"), ("val_loss", "loss/validation"), ("val_acc", "validation/accuracy"),
    ("val_balanced_accuracy", "validation/balanced_accuracy"), ("val_macro_auc", "validation/macro_auc"),
    ("val_macro_f1", "validation/macro_f1"), ("lr", "optimizer/lr"), ("samples_per_s", "speed/samples_per_s"),
    ("data_wait_s", "speed/data_wait_s"),
)


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise IPMNError("train.tensorboard (--tensorboard) needs the tensorboard package: pip install tensorboard") from exc
    return SummaryWriter


def read_tensors(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    state = json.loads(meta["ipmn_state"]) if "ipmn_state" in meta else {}
    return tensors, state


def _cpu_view(v):
    """A CPU tensor to serialise right away: a copy only when it lives on a GPU or is not contiguous.

    (Cloning on the CPU copied the model and Adam state at every checkpoint: a 100-case ViT-B/16 CV
    peaked 0.57 GB higher.)
    """
    return v.detach().to("cpu").contiguous()


def _state_tensors(module) -> dict:
    return {k: _cpu_view(v) for k, v in module.state_dict().items()}


def _optimizer_split(optimizer) -> tuple[dict, dict]:
    import torch

    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = _cpu_view(val)
            else:
                scalars[f"{idx}.{key}"] = val
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _optimizer_join(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for name, val in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = val
    for name, val in meta.get("scalars", {}).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = val
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def _rng_tensors() -> dict:
    import torch

    out = {"rng.torch": torch.get_rng_state().clone()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s.clone()
    return out


def _restore_rng(tensors: dict) -> None:
    import torch

    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        states = [tensors[k] for k in cuda][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)


# ------------------------------------------------------------------------------------------------ samples
class WindowDataset:
    """Tiled training windows for one epoch's plan of ``(case index, start, hflip, quarter turns)``."""

    def __init__(self, arrays: list, labels: list, k: int, cell: int, augment: bool):
        self.arrays, self.labels, self.k, self.cell, self.augment = arrays, labels, k, cell, augment
        self.plan: list = []

    def __len__(self):
        return len(self.plan)

    def __getitem__(self, i):
        import torch

        from ipmn.grid import tile

        ci, start, flip, rot = self.plan[i]
        x = torch.from_numpy(np.ascontiguousarray(tile(self.arrays[ci][:, start : start + self.k])))
        if self.augment and (flip or rot):
            from ipmn.explain import cell_transform

            x = cell_transform(x, self.k, self.cell, bool(flip), int(rot)).contiguous()
        return x, int(self.labels[ci])


def case_starts(arrays: list, k: int, stride: int) -> list[list[int]]:
    from ipmn.grid import window_starts

    return [window_starts(a.shape[1], k, stride) for a in arrays]


def per_epoch_counts(starts: list[list[int]], cap: int | None) -> list[int]:
    return [len(s) if cap is None else min(cap, len(s)) for s in starts]


def epoch_plan(starts: list[list[int]], cap: int | None, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list:
    """The (shuffled) samples of ``epoch``: a function of (seed, epoch) only; rank r takes items r::world."""
    rng = np.random.default_rng([int(seed) % 2**32, int(epoch), 0x1B3])
    items = []
    for ci, s in enumerate(starts):
        chosen = s if cap is None or len(s) <= cap else sorted(rng.choice(s, size=cap, replace=False).tolist())
        items.extend((ci, int(x)) for x in chosen)
    order = rng.permutation(len(items))
    flips = rng.integers(0, 2, len(items))
    rots = rng.integers(0, 4, len(items))
    plan = [(items[j][0], items[j][1], int(flips[i]), int(rots[i])) for i, j in enumerate(order)]
    if world > 1:
        pad = (-len(plan)) % world
        plan = plan + plan[:pad]
        plan = plan[rank::world]
    return plan


def predict_cases(net, arrays: list, k: int, windows: str, device, amp_ctx, batch_size: int = 16,
                  stride: int = 1) -> np.ndarray:
    """Per-case log of the window-averaged class probabilities, shape (n_cases, n_classes)."""
    import torch

    from ipmn.grid import case_windows

    was_training = net.training
    net.eval()
    out = []
    with torch.no_grad():
        for arr in arrays:
            _, w = case_windows(arr, k, windows, stride, pad=True)
            probs = []
            for i in range(0, len(w), batch_size):
                x = torch.from_numpy(w[i : i + batch_size]).to(device)
                with amp_ctx:
                    logits = net(x)
                probs.append(torch.softmax(logits.float(), dim=-1).cpu())
            p = torch.cat(probs).mean(0).numpy().astype(np.float64)
            out.append(np.log(np.clip(p, 1e-12, 1.0)))
    net.train(was_training)
    return np.stack(out) if out else np.zeros((0, 0))


# ------------------------------------------------------------------------------------------------ training
def _score(metrics: dict, loss: float, name: str) -> tuple:
    """Higher is better; ties on the metric are broken by the lower validation loss."""
    if name == "loss":
        return (-loss, 0.0)
    v = metrics.get(name)
    v = v if v is not None and math.isfinite(v) else -1.0
    return (v, -loss)


def _card(cohort_info: dict | None, n_train: int, mcfg: dict) -> str:
    info = cohort_info or {}
    what = "synthetic phantom cases" if info.get("synthetic") else "cases"
    text = f"{mcfg['arch']} ({'+'.join(m.upper() for m in mcfg['modalities'])}, {mcfg['fusion']} fusion) trained on {n_train} {what}"
    if info.get("source"):
        text += f" from {info['source']}"
    text += ". Research use only; not a medical device and not for clinical use."
    if info.get("synthetic"):
        text += (" Trained on synthetic phantoms whose labels follow guideline rules: much easier than real IPMN"
                 " grading, so its numbers say nothing about clinical performance.")
    return text


def train_model(cases, config, out_dir, val_cases=None, device="cpu", progress=None, resume=False, *,
                package_dir=None, stop_epoch: int | None = None, grids: dict | None = None,
                cohort_info: dict | None = None, keep_val_logits: bool = False, overwrite: bool = False) -> dict:
    """Train one model; returns a summary dict (history, best epoch, validation metrics, package path).

    ``config``: a raw config dict (sections model/preprocess/train/cv/data) or a resolved one.
    ``out_dir``: working folder (checkpoint, history, summary). ``package_dir``: where the model package
    goes (default ``out_dir/model``; ``False`` = no package, e.g. for inner CV folds). ``stop_epoch``:
    stop after this epoch (the LR schedule still spans ``train.epochs``, as in the inner folds that chose
    it). ``grids``: preloaded cache entries (case_id → CachedGrid). ``resume``: continue from the last
    checkpoint; a finished run is returned as it is. ``keep_val_logits``: record per-epoch validation
    log-probabilities in the history (nested CV uses them for temperature scaling).
    """
    import torch

    det = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        return _train_model(cases, config, out_dir, val_cases, device, progress, resume, package_dir, stop_epoch,
                            grids, cohort_info, keep_val_logits, overwrite)
    finally:  # deterministic mode is process-wide: give the caller back its own setting
        torch.use_deterministic_algorithms(det[0], warn_only=det[1])


def _train_model(cases, config, out_dir, val_cases, device, progress, resume, package_dir, stop_epoch, grids,
                 cohort_info, keep_val_logits, overwrite) -> dict:
    import torch

    from ipmn.cohort import summarize
    from ipmn.metrics import classification_metrics
    from ipmn.models import build_model, save_package
    from ipmn.progress import EtaClock, Progress

    cfg = config if _is_resolved(config) else resolve_config(config)
    mcfg, t = cfg["model"], cfg["train"]
    summary_writer = _summary_writer_class() if t["tensorboard"] else None  # refuse before any work
    progress = progress or Progress("none")
    out_dir = Path(out_dir)
    package_dir = (out_dir / "model") if package_dir is None else (Path(package_dir) if package_dir else None)
    cases = list(cases)
    val_cases = list(val_cases or [])
    if not cases:
        raise IPMNError("no training cases")
    check_labels(cases, mcfg["num_classes"])
    overlap = {c.case_id for c in cases} & {c.case_id for c in val_cases}
    if overlap:
        raise IPMNError(f"case(s) {sorted(overlap)[:5]} are in both the training and the validation set")
    overlap_p = {c.patient_id for c in cases} & {c.patient_id for c in val_cases}
    if overlap_p:
        raise IPMNError(f"patient(s) {sorted(overlap_p)[:5]} have cases in both training and validation")

    rank, world, local_rank = dist_info()
    is_main = rank == 0
    if not is_main:
        progress = Progress("none")
    epochs = int(t["epochs"])
    last_epoch = min(epochs, int(stop_epoch)) if stop_epoch else epochs
    identity = {
        "config": {k: cfg[k] for k in ("model", "preprocess", "data")}
        | {"train": {k: v for k, v in t.items() if k not in LOGGING_ONLY}},
        "train": sorted((c.case_id, c.label) for c in cases),
        "val": sorted((c.case_id, c.label) for c in val_cases),
        "stop_epoch": last_epoch,
    }
    fingerprint = config_digest(identity)

    # ---- distributed set-up (before any file is written, so that every rank sees the same folder)
    dev = resolve_device(device, local_rank)
    ddp = world > 1
    if ddp:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)

    # ---- the output folder: new, the same run (resume), or refused; decided read-only by every rank
    run_json = out_dir / "run.json"
    summary_json = out_dir / "summary.json"
    wipe = False
    if out_dir.exists() and any(out_dir.iterdir()):
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
        elif summary_json.exists():
            done = json.loads(summary_json.read_text(encoding="utf-8"))
            if done.get("finished") and (package_dir is None or (package_dir / "config.json").exists()):
                progress.stage("train", f"already finished: {out_dir}")
                return done
    if package_dir and package_dir.is_dir() and any(package_dir.iterdir()):
        if not (package_dir / "config.json").is_file():
            raise IPMNError(f"{package_dir} is a non-empty folder that is not a model package; choose another --out")
        if not overwrite and not (out_dir.exists() and run_json.exists() and not wipe and resume):
            raise IPMNError(f"{package_dir} already holds a model package; pass --overwrite to replace it, "
                            "or --resume to continue the run that wrote it")
    if ddp:
        dist.barrier()
    if is_main:
        if wipe:
            shutil.rmtree(out_dir)
            if package_dir and package_dir.exists() and (package_dir / "config.json").exists():
                shutil.rmtree(package_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if not run_json.exists():
            write_json({"kind": "ipmn-train", "fingerprint": fingerprint, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        "config": identity["config"], "stop_epoch": last_epoch,
                        "train_cases": [c.case_id for c in cases], "val_cases": [c.case_id for c in val_cases]},
                       run_json)
    if ddp:
        dist.barrier()

    # ---- data
    seed = int(t["seed"])
    seed_everything(seed, t["deterministic"])
    if grids is None:
        grids = load_grids(cases + val_cases, cfg, progress)
    landmarks = landmarks_for(cases, grids, cfg)
    arrays_by_id = prepare_arrays(cases + val_cases, grids, cfg, landmarks)
    k, cell = mcfg["k"], mcfg["cell"]
    train_arrays = [arrays_by_id[c.case_id] for c in cases]
    train_labels = [c.label for c in cases]
    val_arrays = [arrays_by_id[c.case_id] for c in val_cases]
    val_y = np.array([c.label for c in val_cases], dtype=int)
    starts = case_starts(train_arrays, k, t["window_stride"])
    per_case = per_epoch_counts(starts, t["windows_per_case"])
    counts = np.bincount(np.repeat(train_labels, per_case), minlength=mcfg["num_classes"])
    weights = class_weight_vector(t["class_weights"], counts)
    n_items = int(sum(per_case))
    steps_per_epoch = math.ceil(math.ceil(n_items / world) / t["batch_size"])
    total_steps = steps_per_epoch * epochs
    warmup_steps = steps_per_epoch * int(t["warmup_epochs"])

    # ---- model, optimiser, schedule (model init consumes the seeded RNG identically on resume)
    torch.manual_seed(seed)
    net = build_model(mcfg).to(dev)
    model = net
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
    lr = float(t["lr"])
    optimizer = make_optimizer(net, t, lr)
    floor = float(t["min_lr_ratio"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps, total_steps, t["schedule"], floor))
    amp_ctx, amp_used = autocast_for(t["amp"], dev)
    scaler = torch.amp.GradScaler("cuda") if amp_used == "fp16" else None
    loss_fn = torch.nn.CrossEntropyLoss(
        weight=None if weights is None else torch.tensor(weights, dtype=torch.float32, device=dev),
        label_smoothing=float(t["label_smoothing"]))

    history: list[dict] = []
    best = {"epoch": None, "score": None, "metrics": None, "val_loss": None}
    start_epoch = 1
    ckpt = out_dir / CHECKPOINT
    if resume and ckpt.exists():
        try:
            tensors, state = read_tensors(ckpt)
        except Exception as exc:  # noqa: BLE001 - a damaged checkpoint is a user-facing problem
            raise IPMNError(f"cannot read the checkpoint {ckpt} ({type(exc).__name__}); pass --overwrite to restart") from exc
        if state.get("fingerprint") != fingerprint:
            raise IPMNError(f"the checkpoint in {out_dir} belongs to a different run; pass --overwrite to restart")
        net.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        optimizer.load_state_dict(_optimizer_join(tensors, state["optimizer"]))
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        _restore_rng(tensors)
        history = state["history"]
        best = state["best"]
        start_epoch = int(state["epoch"]) + 1
        progress.stage("train", f"resuming after epoch {state['epoch']} from {ckpt}", epoch=state["epoch"])

    dataset = WindowDataset(train_arrays, train_labels, k, cell, t["augment"])
    progress.stage("train", f"{len(cases)} training case(s), {n_items} window(s)/epoch, {len(val_cases)} validation "
                   f"case(s), epochs {start_epoch}-{last_epoch} on {dev}" + (f" x{world}" if ddp else ""),
                   n_train=len(cases), n_val=len(val_cases), windows=n_items)
    clock = EtaClock()
    tb = summary_writer(str(out_dir / "tensorboard")) if (summary_writer and is_main) else None
    t_start = time.perf_counter()
    stopped_early = False
    epoch = start_epoch - 1
    for epoch in range(start_epoch, last_epoch + 1):
        t_ep = time.perf_counter()
        dataset.plan = epoch_plan(starts, t["windows_per_case"], seed, epoch, rank, world)
        loader = torch.utils.data.DataLoader(dataset, batch_size=t["batch_size"], shuffle=False,
                                             num_workers=t["num_workers"], drop_last=False)
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64)
        n_seen = 0
        data_wait = 0.0  # time the step waits for the loader (benchmarks: data must not be the bottleneck)
        t_train = time.perf_counter()
        batches = iter(loader)
        while True:
            t_wait = time.perf_counter()
            try:
                x, y = next(batches)
            except StopIteration:
                break
            data_wait += time.perf_counter() - t_wait
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with amp_ctx:
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            if scaler is not None:
                scaler.scale(loss).backward()
                if t["grad_clip"]:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(net.parameters(), float(t["grad_clip"]))
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                if t["grad_clip"]:
                    torch.nn.utils.clip_grad_norm_(net.parameters(), float(t["grad_clip"]))
                optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach()) * len(y)
            n_seen += len(y)
        if not math.isfinite(float(loss_sum)):
            raise IPMNError(f"training diverged (loss is NaN/Inf at epoch {epoch}); lower train.lr or use train.amp none")
        if ddp:
            import torch.distributed as dist

            buf = torch.tensor([float(loss_sum), float(n_seen)], dtype=torch.float64)
            dist.all_reduce(buf)
            train_loss = float(buf[0] / max(buf[1], 1))
        else:
            train_loss = float(loss_sum) / max(n_seen, 1)
        train_s = time.perf_counter() - t_train
        entry = {"epoch": epoch, "train_loss": train_loss, "lr": float(optimizer.param_groups[0]["lr"]),
                 "train_s": round(train_s, 4), "data_wait_s": round(data_wait, 4),
                 "samples_per_s": round(n_seen / max(train_s, 1e-9), 3)}

        improved = False
        if val_cases:
            logp = predict_cases(net, val_arrays, k, t["val_windows"], dev, amp_ctx, stride=t["window_stride"])
            m = classification_metrics(val_y, np.exp(logp), mcfg["num_classes"])
            val_loss = float(-np.mean(logp[np.arange(len(val_y)), val_y]))
            entry.update(val_loss=val_loss, val_acc=m["accuracy"], val_balanced_accuracy=m["balanced_accuracy"],
                         val_macro_auc=m["macro_auc"], val_macro_f1=m["macro_f1"])
            if keep_val_logits:
                entry["val_logits"] = np.round(logp, 6).tolist()
            score = list(_score(m, val_loss, t["select_metric"]))
            if best["score"] is None or score > best["score"]:
                best = {"epoch": epoch, "score": score, "metrics": {k2: v for k2, v in m.items()}, "val_loss": val_loss}
                improved = True
        entry["time_s"] = round(time.perf_counter() - t_ep, 3)
        history.append(entry)
        if tb is not None:
            for key, tag in TENSORBOARD_SCALARS:
                if entry.get(key) is not None:
                    tb.add_scalar(tag, entry[key], epoch)
            tb.flush()  # a killed run keeps its curves up to the last epoch

        patience = t["early_stopping_patience"]
        if val_cases and patience and best["epoch"] is not None and epoch - best["epoch"] >= patience:
            stopped_early = True
        if is_main:
            if improved:
                save_tensors(out_dir / BEST, _state_tensors(net), {"epoch": epoch, "fingerprint": fingerprint})
            opt_tensors, opt_meta = _optimizer_split(optimizer)
            tensors = {f"model.{k2}": v for k2, v in _state_tensors(net).items()}
            tensors.update(opt_tensors)
            tensors.update(_rng_tensors())
            state = {"epoch": epoch, "fingerprint": fingerprint, "optimizer": opt_meta,
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                     "history": history, "best": best, "stopped_early": stopped_early}
            save_tensors(ckpt, tensors, state)
            write_json({"history": history, "best": best}, out_dir / "history.json")
        eta = clock.tick((last_epoch - epoch) if not stopped_early else 0)
        progress.epoch(epoch, last_epoch, train_loss=train_loss, val_loss=entry.get("val_loss"),
                       val_acc=entry.get("val_acc"), eta_s=eta, lr=entry["lr"])
        if stopped_early:
            progress.stage("train", f"early stopping at epoch {epoch} (best {best['epoch']})")
            break

    if tb is not None:
        tb.close()
    # ---- final weights: best validation epoch, else the last one
    if val_cases and best["epoch"] is not None and (out_dir / BEST).exists():
        best_tensors, _ = read_tensors(out_dir / BEST)
        net.load_state_dict(best_tensors)
        chosen = best["epoch"]
    else:
        chosen = epoch
    train_time = time.perf_counter() - t_start + sum(h["time_s"] for h in history[: start_epoch - 1])
    val_metrics = best["metrics"] if val_cases else None
    cohort = summarize(cases)
    training = {
        "optimizer": t["optimizer"], "lr": lr, "batch_size": t["batch_size"], "epochs": epochs,
        "stop_epoch": last_epoch, "epochs_run": epoch, "selected_epoch": chosen,
        "selection": (f"best validation {t['select_metric']} on {len(val_cases)} held-out case(s)" if val_cases
                      else "last epoch (fixed in advance)" if not stop_epoch else
                      "fixed epoch chosen on inner cross-validation folds"),
        "stopped_early": stopped_early, "class_weights": None if weights is None else weights.tolist(),
        "class_weights_from": "training split" if t["class_weights"] == "balanced" else t["class_weights"],
        "windows_per_epoch": n_items, "world_size": world, "device": str(dev), "amp": amp_used or "none",
        "seed": seed, "train_time_s": round(train_time, 1), "history": history if not keep_val_logits else
        [{k2: v for k2, v in h.items() if k2 != "val_logits"} for h in history],
        "cohort": (cohort_info or {}).get("source") or f"{len(cases)} cases",
    }
    summary = {
        "finished": True, "fingerprint": fingerprint, "best_epoch": best["epoch"], "selected_epoch": chosen,
        "epochs_run": epoch, "history": history, "val_metrics": val_metrics, "landmarks": landmarks,
        "class_weights": training["class_weights"], "train_cases": [c.case_id for c in cases],
        "val_cases": [c.case_id for c in val_cases], "package": str(package_dir) if package_dir else None,
    }
    if is_main:
        if package_dir:
            trained_on = (f"{len(cases)} {'synthetic phantom ' if (cohort_info or {}).get('synthetic') else ''}cases ("
                          + ", ".join(f"{v} {k2}" for k2, v in cohort["per_class"].items()) + ")")
            pre = dict(cfg["preprocess"])
            if landmarks:
                pre["landmarks"] = landmarks
            pkg = {
                **mcfg,
                "name": f"{mcfg['arch']} ({'synthetic phantoms' if (cohort_info or {}).get('synthetic') else Path(package_dir).name})",
                "preprocess": pre,
                "landmarks": landmarks,
                "data": {"roi_margin_mm": cfg["data"]["roi_margin_mm"], "pad": cfg["data"]["pad"]},
                "val_windows": t["val_windows"],
                "weights_source": {
                    "kind": "trained with ipmn train",
                    "initialisation": mcfg["pretrained"] or "random",
                    "selected_epoch": chosen,
                    "selection": training["selection"],
                },
                "training": training,
                "trained_on": trained_on,
                "cohort": {"description": trained_on, "train": cohort,
                           "validation": summarize(val_cases) if val_cases else None,
                           **({k2: v for k2, v in (cohort_info or {}).items()})},
                "validation": val_metrics,
                "metrics": {k2: val_metrics[k2] for k2 in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")}
                if val_metrics else {},
                "card": _card(cohort_info, len(cases), mcfg),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            save_package(package_dir, net, pkg, dtype=t["save_dtype"])
        write_json(summary, summary_json)
        if not t["keep_checkpoint"]:
            for name in (CHECKPOINT, BEST):
                try:
                    (out_dir / name).unlink()
                except OSError:
                    pass
    if ddp:
        import torch.distributed as dist

        dist.barrier()
    progress.stage("train", f"finished: epoch {chosen} kept" + (f", model package {package_dir}" if package_dir else ""))
    return summary


def _is_resolved(config) -> bool:
    return (isinstance(config, dict) and set(config) == set(SECTIONS)
            and isinstance(config.get("train"), dict) and set(config["train"]) == set(TRAIN_DEFAULTS))
