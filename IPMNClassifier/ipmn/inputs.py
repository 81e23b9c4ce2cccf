"""Reading one case's inputs: volumes by modality plus the ROI, with clear errors."""

from __future__ import annotations

import math

from ipmn.errors import IPMNError
from ipmn.io import read_volume
from ipmn.roi import ROI, load_roi

MAX_MARGIN_MM = 200.0
"""Largest margin around a mask's bounding box: more than the width of an abdomen is a typo."""


def check_margin(margin_mm, what: str = "--margin") -> float:
    """A margin in mm: a finite number in [0, MAX_MARGIN_MM]."""
    try:
        value = float(margin_mm)
    except (TypeError, ValueError) as exc:
        raise IPMNError(f"{what} must be a number of millimetres (got {margin_mm!r})") from exc
    if not math.isfinite(value) or not 0.0 <= value <= MAX_MARGIN_MM:
        raise IPMNError(f"{what} must be between 0 and {MAX_MARGIN_MM:g} mm (got {margin_mm!r})")
    return value


def load_inputs(
    t1=None,
    t2=None,
    roi=None,
    mask=None,
    modalities=("t1", "t2"),
    margin_mm: float = 10.0,
    nonfinite: str = "refuse",
    series: dict | None = None,
    segment: str | None = None,
) -> tuple[dict, ROI]:
    """Read the volumes a model needs and build the ROI (file, ``R,A,S:W,H,D``, or mask + margin).

    ``series``: SeriesInstanceUID per modality for DICOM folders; ``segment``: the ROI or segment to use
    from a file holding several.
    """
    paths = {"t1": t1, "t2": t2}
    missing = [m.upper() for m in modalities if not paths.get(m)]
    if missing:
        raise IPMNError(f"{' and '.join(missing)} needed by this model but not given (--{missing[0].lower()})")
    if roi is not None and mask is not None:
        raise IPMNError("give the ROI either as --roi or as --mask (its bounding box), not both")
    if roi is None and mask is None:
        raise IPMNError("no ROI given: pass --roi (a .mrk.json, 'R,A,S:W,H,D' in mm, or a mask volume)")
    margin_mm = check_margin(margin_mm)
    series = series or {}
    volumes = {m: read_volume(paths[m], name=m.upper(), nonfinite=nonfinite, series=series.get(m)) for m in modalities}
    box = load_roi(roi if roi is not None else mask, margin_mm=margin_mm, segment=segment)
    check_roi_size(box, volumes[modalities[0]], modalities[0].upper())
    return volumes, box


def check_roi_size(box: ROI, volume, name: str) -> None:
    """Refuse an ROI with a side smaller than one voxel of ``volume``: it holds no image to grade."""
    voxel = min(volume.GetSpacing())
    if float(box.size.min()) < voxel:
        raise IPMNError(
            f"ROI: a side of {float(box.size.min()):.3g} mm is smaller than one {name} voxel ({voxel:.3g} mm); "
            "the ROI must enclose the pancreas (sizes are in millimetres)"
        )


def model_configs(model_dirs) -> list[dict]:
    """Each model folder's ``config.json``, read without torch, its inputs and preprocessing checked: a
    bad package or a bad case is refused in well under a second, before any weights are loaded."""
    from pathlib import Path

    from ipmn.config import package_preprocess
    from ipmn.registry import read_config_json
    from ipmn.vocab import CONFIG_FILE, MODALITIES

    configs = []
    for d in model_dirs:
        folder = Path(d).expanduser()
        if not folder.is_dir():
            raise IPMNError(f"model package not found: {folder}" if not folder.exists() else
                            f"{folder} is not a model package folder (expected a folder with {CONFIG_FILE})")
        path = folder / CONFIG_FILE
        if not path.is_file():
            raise IPMNError(f"{folder} is not a model package: {CONFIG_FILE} is missing")
        config = read_config_json(path)
        mods = config.get("modalities")
        if not (isinstance(mods, list) and mods and all(m in MODALITIES for m in mods)):
            raise IPMNError(f"{path}: modalities must be a list drawn from {list(MODALITIES)}, got {mods!r}")
        package_preprocess(config, str(path))
        configs.append(config)
    return configs


def case_inputs(modalities, t1=None, t2=None, roi=None, mask=None, margin_mm: float = 10.0,
                nonfinite: str = "refuse", series: dict | None = None,
                segment: str | None = None) -> tuple[dict, ROI, list[str]]:
    """:func:`load_inputs` for a model that reads ``modalities``, plus notes on what it was given and
    will not read (a T2 given to a T1-only model): ``(volumes, roi, notes)``."""
    notes = [f"{m.upper()} was given but this model reads only {'+'.join(x.upper() for x in modalities)}; "
             f"{m.upper()} is not used" for m, path in (("t1", t1), ("t2", t2)) if path and m not in modalities]
    volumes, box = load_inputs(t1, t2, roi, mask, tuple(modalities), margin_mm, nonfinite, series, segment)
    return volumes, box, notes
