"""The project's shared words: class names, modalities, architecture aliases, file names, attention levels.

Import-light on purpose (standard library only): the Slicer modules' GUI process imports it without
pulling in torch, SimpleITK or numpy. Every other module takes these values from here, so that a name
is defined once.
"""

from __future__ import annotations

import hashlib
import math
import operator
import os
import re
from pathlib import Path

# ---------------------------------------------------------------------------------------------- classes
CLASS_NAMES = ("normal", "low", "high")
CLASS_TITLES = {"normal": "Normal", "low": "Low risk", "high": "High risk"}


def class_name(index: int, names=CLASS_NAMES) -> str:
    """The name of class ``index`` (its number as text when there is no such class)."""
    return names[index] if 0 <= index < len(names) else str(index)


# ---------------------------------------------------------------------------------------------- inputs
MODALITIES = ("t1", "t2")
MODALITY_SETS = {"t1t2": ["t1", "t2"], "t1": ["t1"], "t2": ["t2"]}
"""Command-line / panel spelling of an input set → the model config's ``modalities`` list."""


def modality_set(text: str) -> list[str] | None:
    """``t1t2`` / ``t1+t2`` / ``t1,t2`` / ``t1`` / ``t2`` → the modality list (None if not one of them)."""
    key = str(text).lower().replace("+", "").replace(",", "")
    found = MODALITY_SETS.get(key)
    return list(found) if found else None


# ---------------------------------------------------------------------------------------------- models
ARCH_ALIASES = {
    "vit": "vit_base_patch16_224",
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
    "densenet": "densenet121",
    "resnet": "resnet18",
    "mobilenet_v2": "mobilenetv2_100",
    "mobilenetv2": "mobilenetv2_100",
    "efficientnet": "efficientnet_b5",
    "efficientnet-b5": "efficientnet_b5",
}
"""Short architecture names (the Slicer trainer, ``--arch``, ``ipmn cv --models``) → timm names."""


def resolve_arch(arch):
    """An architecture name with its alias resolved (anything that is not a string is returned as is)."""
    return ARCH_ALIASES.get(arch.lower(), arch) if isinstance(arch, str) else arch


# ---------------------------------------------------------------------------------------------- files
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PREDICTION_FILE = "prediction.json"
ATTENTION_FILE = "attention.nii.gz"
ATTENTION_LABELS_FILE = "attention_labels.nii.gz"
GRID_PNG_FILE = "grid.png"
PREDICT_OUTPUTS = (ATTENTION_FILE, ATTENTION_LABELS_FILE, GRID_PNG_FILE, PREDICTION_FILE)
PREDICTION_SCHEMA = "ipmn.prediction/1"

# ---------------------------------------------------------------------------------------------- maps
ATTENTION_LEVELS = (20.0, 10.0, 5.0)
"""Label 1, 2, 3 of ``attention_labels.nii.gz`` = the top 20 %, 10 %, 5 % of attention inside the ROI."""


# ---------------------------------------------------------------------------------------------- helpers
def is_perfect_square(k) -> bool:
    """True for 1, 4, 9, 16 ... (the number of slices of a √k × √k grid); any integer type, never a bool."""
    if isinstance(k, bool):
        return False
    try:
        k = operator.index(k)
    except TypeError:
        return False
    return k >= 1 and math.isqrt(k) ** 2 == k


def looks_like_box(text, root: str | os.PathLike | None = None) -> bool:
    """True when ``text`` is an ROI given as ``'R,A,S:W,H,D'`` rather than a path to a file."""
    text = str(text)
    if ":" not in text or "," not in text:
        return False
    return not (Path(root) / text if root is not None else Path(text)).exists()


def case_id_problem(case_id: str) -> str | None:
    """Why ``case_id`` cannot name a case (``None`` when it can). Ids become file names (example grids,
    cache entries), so path separators, ``..``, NUL and other control characters are refused."""
    text = str(case_id)
    if "/" in text or "\\" in text:
        return "contains a path separator ('/' or '\\')"
    if ".." in text:
        return "contains '..'"
    bad = [c for c in text if ord(c) < 32 or ord(c) == 127]
    if bad:
        return f"contains a control character ({', '.join(repr(c) for c in dict.fromkeys(bad))})"
    return None


def slug(text: str, fallback: str = "model", strip: str = "-", max_len: int | None = None) -> str:
    """A file-name-safe version of ``text`` (letters, digits, ``.``, ``_`` and ``-``; ``strip`` trimmed off
    both ends, at most ``max_len`` characters)."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip(strip)
    return (out[:max_len] if max_len else out) or fallback


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
