"""Preprocessing as in the paper, each step optional: N4 bias-field correction → edge-preserving smoothing
→ intensity standardisation on the ROI grid, one of: z-score inside the ROI, Nyúl landmarks learned on the
training cohort, or per-case percentile 0–1 ("minmax") scaling.

Each standardisation does what its name says (rules version 2). Version 1 (model packages written before
the ``version`` key existed) followed z-score and Nyúl by the per-case 0–1 scaling whenever ``scale01``
was set, which cancels the z-score exactly and partly undoes Nyúl; :meth:`PreprocessConfig.from_package`
reads such packages with those old rules, so they predict exactly as they were trained. The options
themselves are :class:`ipmn.config.PreprocessConfig`.

Only the part of each volume that covers the ROI plus a margin is touched: N4 is fitted on a shrunk copy
of that crop and its smooth bias field evaluated directly on the ROI grid; the volume is resampled onto
the grid (with a Gaussian anti-aliasing prefilter where the grid is coarser) and smoothed there. A case
costs well under a second instead of minutes (full-resolution N4 on a whole abdomen). Everything returns a :class:`CaseGrid`: the stacked
modalities on the ROI grid plus the grid's geometry, which is what the way back needs.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from ipmn.config import PreprocessConfig
from ipmn.errors import IPMNError
from ipmn.grid import RoiGrid, coverage, crop_to_roi, make_roi_grid, resample_to_grid
from ipmn.roi import ROI
from ipmn.vocab import MODALITIES


@dataclass
class CaseGrid:
    """Preprocessed modalities on the ROI grid: ``data`` is (channels, slices, cell, cell) float32."""

    data: np.ndarray
    grid: RoiGrid
    modalities: tuple
    timing: dict = field(default_factory=dict)
    coverage: dict = field(default_factory=dict)  # modality -> fraction of the ROI grid inside its volume

    @property
    def n_slices(self) -> int:
        return int(self.data.shape[1])


# ----------------------------------------------------------------------------------------------- filters
def n4_fit(image: sitk.Image, shrink: int = 4, iterations=(25, 15)):
    """Fit N4 on a shrunk copy of ``image``. Returns ``(corrector, offset, shrunk image)``.

    ``corrector.GetLogBiasFieldAsImage(ref)`` evaluates the fitted B-spline field on ``ref``, which must
    share the fitted image's orientation (the full-resolution image, or the shrunk one); the correction
    applies to ``image + offset`` (N4 needs positive intensities).
    """
    arr = sitk.GetArrayViewFromImage(image)
    lo = float(np.percentile(arr, 1))
    offset = -lo + 1e-3 * (float(arr.max()) - lo + 1.0)
    positive = sitk.Cast(image, sitk.sitkFloat32) + offset
    # Mask: tissue (not air/fluid-dark background) by Otsu on the crop.
    mask = sitk.OtsuThreshold(positive, 0, 1, 128)
    if sitk.GetArrayViewFromImage(mask).sum() < 64:
        mask = sitk.Image(positive.GetSize(), sitk.sitkUInt8) + 1
        mask.CopyInformation(positive)
    factors = [max(1, min(int(shrink), s // 8)) for s in positive.GetSize()]
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([int(i) for i in iterations])
    small = sitk.Shrink(positive, factors)
    corrector.Execute(small, sitk.Shrink(mask, factors))
    return corrector, offset, small


def n4_correct(image: sitk.Image, shrink: int = 4, iterations=(25, 15)) -> sitk.Image:
    """N4 bias-field correction fitted on a shrunk copy; the field is evaluated at full resolution."""
    corrector, offset, _ = n4_fit(image, shrink, iterations)
    positive = sitk.Cast(image, sitk.sitkFloat32) + offset
    return sitk.Cast(positive / sitk.Exp(corrector.GetLogBiasFieldAsImage(positive)), sitk.sitkFloat32)


def smooth(image: sitk.Image, method: str = "curvature", iterations: int = 5, conductance: float = 1.0) -> sitk.Image:
    """Edge-preserving anisotropic diffusion with a time step that is stable for the image's spacing."""
    if method == "none" or iterations <= 0:
        return image
    dim = image.GetDimension()
    # Stable for both conventions ITK may apply (voxel units or mm): dt <= min(1, spacing) / 2^(d+1).
    step = min(1.0, min(image.GetSpacing())) / 2.0 ** (dim + 1)
    f = sitk.CurvatureAnisotropicDiffusionImageFilter() if method == "curvature" else sitk.GradientAnisotropicDiffusionImageFilter()
    f.SetTimeStep(step)
    f.SetNumberOfIterations(int(iterations))
    f.SetConductanceParameter(float(conductance))
    return f.Execute(sitk.Cast(image, sitk.sitkFloat32))


def antialias(image: sitk.Image, grid: RoiGrid) -> sitk.Image:
    """Gaussian prefilter along each voxel axis by how much coarser the grid is there."""
    d = np.array(image.GetDirection()).reshape(3, 3)
    g = np.array(grid.direction).reshape(3, 3)
    sigmas = []
    for axis in range(3):
        # grid spacing along this voxel axis: the grid axis most aligned with it
        target = grid.spacing[int(np.argmax(np.abs(g.T @ d[:, axis])))]
        src = image.GetSpacing()[axis]
        sigmas.append(0.5 * float(np.sqrt(max(target**2 - src**2, 0.0))) if target > 1.5 * src else 0.0)
    if max(sigmas) == 0:
        return image
    return sitk.SmoothingRecursiveGaussian(image, [max(s, 1e-3) for s in sigmas])


def zscore(array: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    values = array[mask] if mask is not None else array
    mean = float(values.mean())
    std = float(values.std())
    return ((array - mean) / (std if std > 1e-8 else 1.0)).astype(np.float32)


def scale01(array: np.ndarray, percentiles=(0.5, 99.5)) -> np.ndarray:
    lo, hi = np.percentile(array, percentiles)
    if hi - lo < 1e-8:
        return np.zeros_like(array, dtype=np.float32)
    return np.clip((array - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


class NyulStandardizer:
    """Piecewise-linear histogram standardisation (Nyúl & Udupa 2000).

    ``fit`` learns the mean landmark positions on a *training* cohort only; ``to_dict`` saves them in
    the model's config so inference applies exactly the same mapping.
    """

    def __init__(self, percentiles=(1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99), scale=(0.0, 100.0), landmarks=None):
        self.percentiles = tuple(float(p) for p in percentiles)
        self.scale = tuple(float(s) for s in scale)
        self.landmarks = None if landmarks is None else np.asarray(landmarks, dtype=float)

    def _mapped(self, array: np.ndarray) -> np.ndarray:
        lm = np.percentile(array, self.percentiles)
        lo, hi = lm[0], lm[-1]
        span = hi - lo if hi - lo > 1e-8 else 1.0
        return self.scale[0] + (lm - lo) / span * (self.scale[1] - self.scale[0])

    def fit(self, arrays) -> NyulStandardizer:
        mapped = [self._mapped(np.asarray(a, dtype=float).ravel()) for a in arrays]
        if not mapped:
            raise IPMNError("Nyul standardisation: no training images to learn landmarks from")
        self.landmarks = np.mean(mapped, axis=0)
        return self

    def transform(self, array: np.ndarray) -> np.ndarray:
        if self.landmarks is None:
            raise IPMNError("Nyul standardisation asked for but no landmarks were learned (fit on the training cohort)")
        src = np.percentile(array, self.percentiles)
        src = np.maximum.accumulate(src + np.arange(len(src)) * 1e-9)  # strictly increasing
        out = np.interp(array, src, self.landmarks)
        # linear extrapolation beyond the end landmarks
        lo_slope = (self.landmarks[1] - self.landmarks[0]) / max(src[1] - src[0], 1e-8)
        hi_slope = (self.landmarks[-1] - self.landmarks[-2]) / max(src[-1] - src[-2], 1e-8)
        out = np.where(array < src[0], self.landmarks[0] + (array - src[0]) * lo_slope, out)
        out = np.where(array > src[-1], self.landmarks[-1] + (array - src[-1]) * hi_slope, out)
        return out.astype(np.float32)

    def to_dict(self) -> dict:
        return {
            "percentiles": list(self.percentiles),
            "scale": list(self.scale),
            "landmarks": None if self.landmarks is None else [float(v) for v in self.landmarks],
        }

    @classmethod
    def from_dict(cls, d: dict) -> NyulStandardizer:
        return cls(d["percentiles"], d["scale"], d.get("landmarks"))


# ----------------------------------------------------------------------------------------------- pipeline
def filtered_on_grid(image: sitk.Image, roi: ROI, grid: RoiGrid, cfg: PreprocessConfig, name: str, timing: dict,
                     covered: dict | None = None) -> np.ndarray:
    """Crop → N4 (fitted on the shrunk crop) → resample onto the grid → smoothing. (slices, rows, cols).

    The bias field is evaluated directly on the ROI grid and the edge-preserving smoothing runs on the
    grid too: both cost milliseconds there, against seconds on the native crop.
    """
    t = time.perf_counter()
    inside = coverage(image, grid)
    if covered is not None:
        covered[name] = inside
    if inside < cfg.min_coverage:
        raise IPMNError(
            f"the {name.upper()} volume covers only {100 * inside:.0f}% of the ROI; "
            f"at least {100 * cfg.min_coverage:.0f}% is needed (does {name.upper()} show the same region as the ROI?)"
        )
    # A fixed pixel size may sample beyond the ROI: crop around what the grid covers.
    crop = crop_to_roi(image, roi if cfg.pixel_mm is None else grid.field_roi(), cfg.margin_mm, name=name.upper())
    timing[f"{name}_crop"] = time.perf_counter() - t
    t = time.perf_counter()
    source = antialias(crop, grid) if cfg.antialias else crop
    on_grid = resample_to_grid(source, grid)
    timing[f"{name}_resample"] = time.perf_counter() - t
    if cfg.n4:
        t = time.perf_counter()
        corrector, offset, small = n4_fit(crop, cfg.n4_shrink, cfg.n4_iterations)
        # The field is smooth: evaluate it on the shrunk crop, interpolate it onto the grid.
        log_bias = resample_to_grid(corrector.GetLogBiasFieldAsImage(small), grid, default=0.0)
        on_grid = sitk.Cast((on_grid + offset) / sitk.Exp(log_bias), sitk.sitkFloat32)
        timing[f"{name}_n4"] = time.perf_counter() - t
    if cfg.smoothing != "none":
        t = time.perf_counter()
        on_grid = smooth(on_grid, cfg.smoothing, cfg.smoothing_iterations, cfg.smoothing_conductance)
        timing[f"{name}_smooth"] = time.perf_counter() - t
    return sitk.GetArrayFromImage(on_grid)


def standardize_array(array: np.ndarray, modality: str, cfg: PreprocessConfig, landmarks: dict | None = None) -> np.ndarray:
    """One modality's grid standardised as ``cfg`` says.

    Version 2: ``zscore`` → mean 0, sd 1 over the ROI grid; ``nyul`` → the training cohort's landmarks
    (their standard scale); ``minmax`` (or ``none`` + ``scale01``) → per-case percentiles to 0–1, clipped;
    ``none`` → unchanged. Version 1 (old packages): z-score / Nyúl, then 0–1 scaling when ``scale01``.
    """
    if cfg.standardize in ("zscore", "nyul"):
        array = zscore(array)
    if cfg.standardize == "nyul":
        spec = (landmarks or {}).get(modality)
        if not spec:
            raise IPMNError(f"Nyul standardisation: no landmarks for {modality.upper()} in the model/config")
        array = NyulStandardizer.from_dict(spec).transform(array)
    if cfg.standardize == "minmax" or (cfg.scale01 and (cfg.version == 1 or cfg.standardize == "none")):
        array = scale01(array, cfg.scale_percentiles)
    return array.astype(np.float32)


def prepare_case(
    volumes: dict[str, sitk.Image],
    roi: ROI,
    cfg: PreprocessConfig | None = None,
    modalities=MODALITIES,
    landmarks: dict | None = None,
    raw: bool = False,
) -> CaseGrid:
    """Volumes (by modality name) + ROI → preprocessed :class:`CaseGrid`.

    ``raw=True`` stops before standardisation (used to learn Nyúl landmarks on a training cohort).
    """
    cfg = cfg or PreprocessConfig()
    modalities = tuple(modalities)
    missing = [m for m in modalities if volumes.get(m) is None]
    if missing:
        raise IPMNError(f"missing modality: {', '.join(m.upper() for m in missing)} is needed")
    ref_name = cfg.reference if cfg.reference in modalities else modalities[0]
    timing: dict[str, float] = {}
    covered: dict[str, float] = {}
    t = time.perf_counter()
    grid = make_roi_grid(roi, volumes[ref_name], cell=cfg.cell, slice_spacing=cfg.slice_spacing,
                         pixel_mm=cfg.pixel_mm)
    crop_to_roi(volumes[ref_name], roi, 0.0, name=ref_name.upper())  # intersection check, clear message
    timing["grid"] = time.perf_counter() - t

    def one(m):
        arr = filtered_on_grid(volumes[m], roi, grid, cfg, m, timing, covered)
        if not raw:
            t = time.perf_counter()
            arr = standardize_array(arr, m, cfg, landmarks)
            timing[f"{m}_standardize"] = time.perf_counter() - t
        return arr

    if len(modalities) > 1:
        # T1 and T2 side by side: ITK releases the GIL, and N4 on a small crop uses one core poorly.
        with ThreadPoolExecutor(max_workers=len(modalities)) as pool:
            futures = [pool.submit(one, m) for m in modalities]
            channels = [f.result() for f in futures]  # in modality order: T1's error is reported first
    else:
        channels = [one(modalities[0])]
    return CaseGrid(np.stack(channels).astype(np.float32), grid, modalities, timing,
                    {m: covered[m] for m in modalities})
