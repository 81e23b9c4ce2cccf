"""Reading one case's inputs: volumes by modality plus the ROI, with clear errors."""

from __future__ import annotations

from ipmn.errors import IPMNError
from ipmn.io import read_volume
from ipmn.roi import ROI, load_roi


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
    series = series or {}
    volumes = {m: read_volume(paths[m], m.upper(), nonfinite, series.get(m)) for m in modalities}
    if roi is None and mask is None:
        raise IPMNError("no ROI given: pass --roi (a .mrk.json, 'R,A,S:W,H,D' in mm, or a mask volume)")
    box = load_roi(roi if roi is not None else mask, margin_mm=margin_mm, segment=segment)
    return volumes, box
