"""Synthetic T1/T2 abdominal MRI phantoms with a labelled pancreas (the project's only data here).

Anatomy is defined analytically in patient RAS millimetres (body, fat, liver, spleen, kidneys, spine,
aorta, gallbladder, a curved pancreas with its main duct) and sampled on each scan's own voxel grid, so
every case has its own spacing, orientation (LPS, RAS, flipped, permuted, oblique), field of view,
T2-vs-T1 misregistration, bias field, Rician noise and scanner gain.

Labels follow the Fukuoka/Kyoto rules and are visible only inside the pancreas ROI:

* normal: no cyst, main duct < 4 mm;
* low risk: 1–3 simple cysts (the largest 16–28 mm, the others 8–14 mm), main duct < 5 mm, no nodule;
* high risk: an enhancing mural nodule ≥ 5 mm inside a cyst, or a main duct ≥ 10 mm, or a cyst ≥ 30 mm
  with a worrisome feature (thick enhancing wall, duct 5–9 mm).

A nodule-bearing case has its cysts and duct drawn exactly as a low-risk case has (sizes, number, duct
width): only the nodule tells the two apart, so a model cannot grade by cyst size instead (the earlier
generator gave nodule cases the larger cysts, and a model learnt that shortcut).

Cysts/duct are bright on T2 and dark on T1. A mural nodule is what a radiologist looks for: a
soft-tissue filling defect attached to the inner cyst wall, clearly darker than the cyst fluid on T2
(0.28 vs 1.00) and clearly brighter than it on T1 (0.62 vs 0.12, an enhancing nodule), and brighter
than the thickened wall of large cysts on T1. T2 is misregistered against T1 by a rigid shift of
0–1.5 mm (uniform length, random direction), as between two breath-holds of one examination.

Each case also has a lesion label volume in T1's geometry (``lesion``: 1 cyst incl. wall, 2 mural
nodule, 3 dilated main duct ≥ 5 mm; 0 elsewhere; all zero for normal cases), written as
``<id>_lesion.nii.gz`` and listed in ``cohort.csv``'s ``lesion`` column (nonzero = lesion). Everything
that could leak the label outside the ROI — gain, field of view, matrix, ROI size, file names — is
drawn independently of the label. These phantoms are far easier than real IPMN grading: never present their
numbers as clinical results.

Slightly over 500 lines on purpose: anatomy, rendering and acquisition share the tissue signals and
label values above, so a change to the generator stays a change to this one file.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ipmn import CLASS_NAMES
from ipmn.errors import IPMNError
from ipmn.io import write_image, write_json
from ipmn.roi import RAS_TO_LPS, ROI, write_mrk_json

# (T1, T2) relative signal of each tissue.
TISSUE = {
    "fat": (0.85, 0.65),
    "soft": (0.42, 0.30),
    "liver": (0.55, 0.24),
    "spleen": (0.40, 0.55),
    "kidney": (0.38, 0.62),
    "bone": (0.60, 0.38),
    "csf": (0.15, 0.95),
    "aorta": (0.05, 0.05),
    "gallbladder": (0.15, 0.92),
    "pancreas": (0.72, 0.40),
    "fluid": (0.12, 1.00),
    "wall": (0.50, 0.45),
    "nodule": (0.62, 0.28),  # enhancing soft tissue: T1 >> fluid, T2 << fluid
}
CENTERS = ("A", "B", "C")
LESION_LABELS = {"cyst": 1, "nodule": 2, "duct": 3}
"""Values of the lesion label volume (0 = no lesion)."""
GENERATOR_VERSION = 2
"""Recorded in ``phantom_truth.json``: the same seed gives different cases under another version (2: nodule
cases draw their cysts as low-risk cases do; 1, before 2026-11-30: nodule cysts drawn larger)."""
MAIN_CYST_R_MM = (8.0, 14.0)
"""Radius range of the largest cyst of a low-risk or nodule-bearing case (diameter 16–28 mm, under 30 mm)."""
DILATED_DUCT_MM = 5.0
"""A main duct at least this wide (diameter) counts as a lesion (worrisome feature from 5 mm)."""
MAX_T2_SHIFT_MM = 1.5
"""Largest T2-vs-T1 misregistration (length of the rigid shift)."""


@dataclass
class Lesion:
    kind: str  # "cyst" | "nodule"
    center: np.ndarray  # RAS mm
    radius: float
    wall_mm: float = 0.0


@dataclass
class Anatomy:
    body_axes: tuple
    fat_mm: float
    pancreas_x: tuple  # (tail x, head x) in RAS (head on the patient's right: larger x)
    y0: float
    curve: float
    z0: float
    slope: float
    r_head: float
    r_tail: float
    duct_r: float
    lesions: list = field(default_factory=list)

    def centerline(self, x):
        xm = 0.5 * (self.pancreas_x[0] + self.pancreas_x[1])
        half = 0.5 * (self.pancreas_x[1] - self.pancreas_x[0])
        u = (x - xm) / half
        y = self.y0 - self.curve * u**2
        z = self.z0 + self.slope * (x - xm)
        t = (x - self.pancreas_x[0]) / (self.pancreas_x[1] - self.pancreas_x[0])
        r = self.r_tail + (self.r_head - self.r_tail) * np.clip(t, 0, 1)
        return y, z, r


# --------------------------------------------------------------------------------------------- sampling
def _soft(signed, h):
    """Partial-volume weight from a signed distance (negative inside), edge width ``h`` mm."""
    return np.clip(0.5 - signed / h, 0.0, 1.0)


def _ellipsoid(p, c, semi):
    q = (p - np.asarray(c, dtype=np.float32)) / np.asarray(semi, dtype=np.float32)
    return (np.sqrt((q * q).sum(-1)) - 1.0) * float(min(semi))


def _cylinder_z(p, cx, cy, r):
    return np.sqrt((p[..., 0] - cx) ** 2 + (p[..., 1] - cy) ** 2) - r


def _make_geometry(rng, matrix, n_slices, fov_xy, slice_mm, orientation, oblique_deg, center_ras):
    """Origin/spacing/direction (LPS) for an axial acquisition stored with the given orientation."""
    spacing_phys = np.array([fov_xy / matrix[0], fov_xy / matrix[1], slice_mm])  # along L/R, A/P, S
    size_phys = np.array([matrix[0], matrix[1], n_slices])
    # Physical axes in LPS for each storage orientation (columns = voxel axes i, j, k).
    bases = {
        "LPS": np.eye(3),
        "RAS": np.diag([-1.0, -1.0, 1.0]),
        "LPI": np.diag([1.0, 1.0, -1.0]),
        "RPS": np.diag([-1.0, 1.0, 1.0]),
        "PLS": np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),
        "SLP": np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]),
    }
    base = bases[orientation]
    # which physical axis each voxel axis runs along
    perm = [int(np.argmax(np.abs(base[:, a]))) for a in range(3)]
    spacing = spacing_phys[perm]
    size = size_phys[perm].astype(int)
    rot = np.eye(3)
    if oblique_deg:
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        a = math.radians(oblique_deg)
        kx = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        rot = np.eye(3) + math.sin(a) * kx + (1 - math.cos(a)) * kx @ kx
    direction = rot @ base
    center_lps = RAS_TO_LPS @ np.asarray(center_ras, dtype=float)
    origin = center_lps - direction @ ((size - 1) / 2.0 * spacing)
    return origin, spacing, direction, size


def _voxel_ras(origin, spacing, direction, size, sl):
    """RAS coordinates (float32, shape (k, j, i, 3)) of the voxels in index slices ``sl`` (z, y, x)."""
    ks, js, is_ = (np.arange(size[2])[sl[0]], np.arange(size[1])[sl[1]], np.arange(size[0])[sl[2]])
    kk, jj, ii = np.meshgrid(ks, js, is_, indexing="ij")
    idx = np.stack([ii, jj, kk], -1).astype(np.float32) * spacing.astype(np.float32)
    lps = idx @ direction.T.astype(np.float32) + origin.astype(np.float32)
    return lps * np.array([-1, -1, 1], dtype=np.float32)


def _index_box(origin, spacing, direction, size, lo_ras, hi_ras):
    """Index-space slices (z, y, x) covering an RAS box, or None if outside."""
    corners = np.array([[x, y, z] for x in (lo_ras[0], hi_ras[0]) for y in (lo_ras[1], hi_ras[1]) for z in (lo_ras[2], hi_ras[2])])
    lps = corners * np.array([-1, -1, 1])
    idx = np.linalg.solve(direction, (lps - origin).T).T / spacing
    lo = np.maximum(np.floor(idx.min(0)).astype(int) - 1, 0)
    hi = np.minimum(np.ceil(idx.max(0)).astype(int) + 2, size)
    if np.any(hi <= lo):
        return None
    return (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))


def _render(anat: Anatomy, geom, shift_ras, channel: int, h: float):
    """Paint the anatomy on a voxel grid; returns (image float32 (z,y,x), pancreas mask uint8, lesion labels uint8).

    Lesion labels (:data:`LESION_LABELS`) mark voxel centres inside a cyst (wall included), a nodule or a
    main duct of diameter ≥ :data:`DILATED_DUCT_MM`; later lesions overwrite earlier ones.
    """
    origin, spacing, direction, size = geom
    full = (slice(None), slice(None), slice(None))
    shape = (size[2], size[1], size[0])
    img = np.zeros(shape, dtype=np.float32)

    def paint(sl, signed, tissue):
        w = _soft(signed, h)
        val = TISSUE[tissue][channel]
        region = img[sl]
        region += w * (val - region)

    p = _voxel_ras(origin, spacing, direction, size, full) - shift_ras
    a, b = anat.body_axes
    body = (np.sqrt((p[..., 0] / a) ** 2 + (p[..., 1] / b) ** 2) - 1.0) * b
    paint(full, body, "fat")
    paint(full, body + anat.fat_mm, "soft")

    def organ(c, semi, tissue):
        # Only the ellipsoid's bounding box (+ the edge width) can change: the weight is 0 beyond it.
        reach = np.asarray(semi, dtype=float) + h + 1.0
        sl = _index_box(origin, spacing, direction, size, np.asarray(c) - reach + shift_ras, np.asarray(c) + reach + shift_ras)
        if sl is not None:
            paint(sl, _ellipsoid(p[sl], c, semi), tissue)

    organ((68, 8, 45), (72, 62, 85), "liver")
    organ((-88, -38, 40), (34, 44, 52), "spleen")
    for sx in (1, -1):
        organ((sx * 62, -48, -25), (24, 26, 46), "kidney")
    paint(full, _cylinder_z(p, 0, -68, 19), "bone")
    paint(full, _cylinder_z(p, 0, -93, 7), "csf")
    paint(full, _cylinder_z(p, -14, -38, 11), "aorta")
    organ((78, 42, 10), (14, 15, 30), "gallbladder")
    del p

    # Pancreas, duct and lesions inside their bounding box only.
    x0, x1 = anat.pancreas_x
    pad = max(anat.r_head, 40.0) + 10
    lo = np.array([x0 - 15, anat.y0 - anat.curve - pad, anat.z0 - 60]) + shift_ras
    hi = np.array([x1 + 15, anat.y0 + pad, anat.z0 + 60]) + shift_ras
    mask = np.zeros(shape, dtype=np.uint8)
    lesion = np.zeros(shape, dtype=np.uint8)
    sl = _index_box(origin, spacing, direction, size, lo, hi)
    if sl is not None:
        p = _voxel_ras(origin, spacing, direction, size, sl) - shift_ras
        x = np.clip(p[..., 0], x0, x1)
        yc, zc, r = anat.centerline(x)
        along = np.maximum(x0 - p[..., 0], 0) + np.maximum(p[..., 0] - x1, 0)
        radial = np.sqrt((p[..., 1] - yc) ** 2 + (p[..., 2] - zc) ** 2)
        tube = np.sqrt(np.maximum(radial - r, 0) ** 2 + along**2) + np.minimum(radial - r, 0)
        paint(sl, tube, "pancreas")
        duct = np.sqrt(np.maximum(radial - anat.duct_r, 0) ** 2 + along**2) + np.minimum(radial - anat.duct_r, 0)
        paint(sl, duct, "fluid")
        inside = tube < 0
        labels = np.zeros(inside.shape, dtype=np.uint8)
        if 2 * anat.duct_r >= DILATED_DUCT_MM:
            labels[duct < 0] = LESION_LABELS["duct"]
        for les in anat.lesions:
            d = np.sqrt(((p - les.center.astype(np.float32)) ** 2).sum(-1)) - les.radius
            if les.kind == "cyst":
                if les.wall_mm > 0:
                    paint(sl, d - les.wall_mm, "wall")
                paint(sl, d, "fluid")
                labels[d - les.wall_mm < 0] = LESION_LABELS["cyst"]
            else:
                paint(sl, d, "nodule")
                labels[d < 0] = LESION_LABELS["nodule"]
            inside |= d < 0
        mask[sl] = inside.astype(np.uint8)
        lesion[sl] = labels
    return img, mask, lesion


# --------------------------------------------------------------------------------------------- cases
def _anatomy(rng, label: int) -> tuple[Anatomy, dict]:
    length = rng.uniform(95, 115)
    head_x = rng.uniform(38, 48)
    anat = Anatomy(
        body_axes=(rng.uniform(130, 160), rng.uniform(95, 115)),
        fat_mm=rng.uniform(8, 20),
        pancreas_x=(head_x - length, head_x),
        y0=rng.uniform(-4, 6),
        curve=rng.uniform(8, 20),
        z0=rng.uniform(-4, 4),
        slope=rng.uniform(0.08, 0.2),
        r_head=rng.uniform(12, 15),
        r_tail=rng.uniform(8, 10),
        duct_r=rng.uniform(0.8, 1.6),
    )
    info = {"stigmata": [], "worrisome": []}

    def place(radius, offset_frac=0.3):
        x = rng.uniform(anat.pancreas_x[0] + 15, anat.pancreas_x[1] - 12)
        y, z, r = anat.centerline(np.array(x))
        ang = rng.uniform(0, 2 * np.pi)
        off = offset_frac * float(r) * np.array([math.cos(ang), math.sin(ang)])
        return np.array([x, float(y) + off[0], float(z) + off[1]]), float(r)

    def cysts_as_in_low_risk():
        """The largest cyst (returned) and 0-2 smaller ones, and the duct: drawn alike for low-risk and
        nodule-bearing cases, so that only the nodule tells them apart (no size or duct shortcut)."""
        cyst_r = rng.uniform(*MAIN_CYST_R_MM)
        c, _r = place(cyst_r)
        anat.lesions.append(Lesion("cyst", c, cyst_r))
        for _ in range(rng.choice(3, p=[0.5, 0.3, 0.2])):
            anat.lesions.append(Lesion("cyst", place(0)[0], rng.uniform(4.0, 7.0)))
        anat.duct_r = rng.uniform(0.8, 2.2)
        return c, cyst_r

    if label == 1:  # low risk: simple cysts
        cysts_as_in_low_risk()
    elif label == 2:
        scenario = rng.choice(["nodule", "duct", "large"], p=[0.6, 0.25, 0.15])  # nodules: the hard case
        if scenario == "nodule":
            c, cyst_r = cysts_as_in_low_risk()
            nod_r = rng.uniform(2.75, 4.5)  # diameter 5.5–9 mm
            v = rng.normal(size=3)
            v /= np.linalg.norm(v)
            # broad-based on the inner wall, bulging into the lumen (a filling defect in the fluid)
            anat.lesions.append(Lesion("nodule", c + v * (cyst_r - nod_r * 0.9), nod_r))
            info["stigmata"].append(f"enhancing mural nodule {2 * nod_r:.1f} mm")
        elif scenario == "duct":
            anat.duct_r = rng.uniform(5.2, 7.5)
            anat.r_head = max(anat.r_head, anat.duct_r + 4)
            anat.r_tail = max(anat.r_tail, anat.duct_r + 2.5)
            info["stigmata"].append(f"main pancreatic duct {2 * anat.duct_r:.1f} mm")
        else:
            cyst_r = rng.uniform(15.0, 18.0)
            c, _r = place(cyst_r, 0.1)
            anat.lesions.append(Lesion("cyst", c, cyst_r, wall_mm=rng.uniform(2.0, 3.0)))
            anat.duct_r = rng.uniform(2.6, 4.4)
            info["worrisome"] += [f"cyst {2 * cyst_r:.0f} mm", "thickened enhancing wall", f"main duct {2 * anat.duct_r:.1f} mm"]
        if scenario == "duct" and rng.random() < 0.4:
            anat.lesions.append(Lesion("cyst", place(0)[0], rng.uniform(4.0, 8.0)))
        info["scenario"] = str(scenario)
    info["duct_diameter_mm"] = round(2 * anat.duct_r, 2)
    info["cyst_diameters_mm"] = [round(2 * les.radius, 1) for les in anat.lesions if les.kind == "cyst"]
    info["cyst_volume_ml"] = round(sum(4 / 3 * math.pi * les.radius**3 for les in anat.lesions if les.kind == "cyst") / 1000, 3)
    return anat, info


def _roi_for(anat: Anatomy, rng) -> ROI:
    x0, x1 = anat.pancreas_x
    xs = np.linspace(x0, x1, 50)
    y, z, r = anat.centerline(xs)
    margin = rng.uniform(10, 16)
    lo = np.array([x0 - r[0], (y - r).min(), (z - r).min()]) - margin
    hi = np.array([x1 + r[-1], (y + r).max(), (z + r).max()]) + margin
    # Lesions protrude at most a few mm beyond the tube; the box is label-independent by construction.
    jitter = rng.uniform(-3, 3, size=3)
    return ROI((lo + hi) / 2 + jitter, hi - lo, np.eye(3))


def _acquire(anat, geom, shift, channel, rng, center_idx, h):
    img, mask, lesion = _render(anat, geom, shift, channel, h)
    origin, spacing, direction, size = geom
    # Smooth multiplicative bias field in physical space.
    p = _voxel_ras(origin, spacing, direction, size, (slice(None),) * 3)
    c = rng.uniform(-1, 1, size=5)
    logb = 0.22 * (c[0] * p[..., 0] / 150 + c[1] * p[..., 1] / 150 + c[2] * p[..., 2] / 100 + c[3] * (p[..., 0] ** 2 + p[..., 1] ** 2) / 150**2 + c[4] * p[..., 0] * p[..., 2] / 15000)
    del p
    img *= np.exp(logb).astype(np.float32)
    sigma = rng.uniform(0.015, 0.04) * (1 + 0.3 * center_idx)
    n1 = rng.normal(0, sigma, img.shape).astype(np.float32)
    n2 = rng.normal(0, sigma, img.shape).astype(np.float32)
    img = np.sqrt((img + n1) ** 2 + n2**2)
    gain = rng.uniform(300, 1800) * (1.0 + 0.25 * center_idx)
    arr = np.clip(np.round(img * gain), 0, 32767).astype(np.int16)
    image = sitk.GetImageFromArray(arr)
    image.SetOrigin([float(v) for v in origin])
    image.SetSpacing([float(v) for v in spacing])
    image.SetDirection([float(v) for v in direction.ravel()])
    mask_img = sitk.GetImageFromArray(mask)
    mask_img.CopyInformation(image)
    lesion_img = sitk.GetImageFromArray(lesion)
    lesion_img.CopyInformation(image)
    return image, mask_img, lesion_img


def make_case(
    seed: int,
    label: int,
    center: str = "A",
    t1_shape: tuple | None = None,
    t2_shape: tuple | None = None,
    t1_orientation: str | None = None,
    t2_orientation: str | None = None,
    nodule: bool = True,
):
    """One phantom case: dict with ``t1``, ``t2`` (sitk int16), ``mask`` (pancreas, T1 grid), ``lesion``
    (lesion labels, T1 grid, see :data:`LESION_LABELS`), ``roi``, ``info``.

    ``t1_shape``/``t2_shape`` = (matrix, matrix, slices) force the sampling (benchmarks); by default the
    matrix and slice thickness are drawn at random. ``nodule=False`` renders the same case (same random
    draws, same anatomy, noise and geometry) without its mural nodules: an ablation of the one finding
    that makes a nodule case high risk (``info["nodule_removed"]`` is then true).
    """
    if label not in (0, 1, 2):
        raise IPMNError(f"phantom label must be 0, 1 or 2 (got {label})")
    rng = np.random.default_rng(seed)
    center_idx = CENTERS.index(center) if center in CENTERS else 0
    anat, info = _anatomy(rng, label)
    if not nodule:
        info["nodule_removed"] = any(les.kind == "nodule" for les in anat.lesions)
        anat.lesions = [les for les in anat.lesions if les.kind != "nodule"]
    roi = _roi_for(anat, rng)
    orientations = ["LPS", "RAS", "LPI", "RPS", "PLS", "SLP"]
    o1 = t1_orientation or str(rng.choice(orientations))
    o2 = t2_orientation or str(rng.choice(orientations))
    look_at = np.array([rng.uniform(-10, 10), rng.uniform(-10, 10), rng.uniform(-8, 8)])
    # T1: in-plane matrix and slices drawn per case.
    if t1_shape:
        m1, n1 = t1_shape[:2], t1_shape[2]
        fov1 = rng.uniform(300, 360)
        s1 = rng.uniform(2.5, 3.5)
    else:
        m = int(rng.choice([160, 192, 224]))
        m1 = (m, m)
        fov1 = rng.uniform(280, 360)
        s1 = rng.uniform(2.5, 5.0)
        n1 = int(rng.uniform(120, 170) / s1)
    if t2_shape:
        m2, n2 = t2_shape[:2], t2_shape[2]
        fov2 = rng.uniform(300, 380)
        s2 = rng.uniform(3.5, 5.0)
    else:
        m = int(rng.choice([160, 192, 256]))
        m2 = (m, m)
        fov2 = rng.uniform(280, 380)
        s2 = rng.uniform(3.0, 6.0)
        n2 = int(rng.uniform(110, 160) / s2)
    obl1 = float(rng.uniform(0, 8)) if rng.random() < 0.3 else 0.0
    obl2 = float(rng.uniform(0, 12)) if rng.random() < 0.5 else 0.0
    g1 = _make_geometry(rng, m1, n1, fov1, s1, o1, obl1, look_at)
    g2 = _make_geometry(rng, m2, n2, fov2, s2, o2, obl2, look_at + rng.uniform(-10, 10, 3))
    # T2 vs T1 misregistration: a rigid shift of 0–MAX_T2_SHIFT_MM mm in a random direction
    v = rng.normal(size=3)
    shift = (v / np.linalg.norm(v) * rng.uniform(0, MAX_T2_SHIFT_MM)).astype(np.float32)
    t1, mask, lesion = _acquire(anat, g1, np.zeros(3, np.float32), 0, rng, center_idx, h=float(np.mean(g1[1])))
    t2, _, _ = _acquire(anat, g2, shift, 1, rng, center_idx, h=float(np.mean(g2[1])))
    info.update(
        {
            "label": CLASS_NAMES[label],
            "center": center,
            "t1_orientation": o1,
            "t2_orientation": o2,
            "t1_oblique_deg": round(obl1, 2),
            "t2_oblique_deg": round(obl2, 2),
            "t2_shift_mm": [round(float(v), 2) for v in shift],
        }
    )
    return {"t1": t1, "t2": t2, "mask": mask, "lesion": lesion, "roi": roi, "info": info}


def write_case(case: dict, folder: Path, case_id: str) -> dict:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "t1": folder / f"{case_id}_t1.nii.gz",
        "t2": folder / f"{case_id}_t2.nii.gz",
        "roi": folder / f"{case_id}_roi.mrk.json",
        "mask": folder / f"{case_id}_pancreas.nii.gz",
    }
    if case.get("lesion") is not None:
        paths["lesion"] = folder / f"{case_id}_lesion.nii.gz"
    write_image(case["t1"], paths["t1"])
    write_image(case["t2"], paths["t2"])
    write_image(case["mask"], paths["mask"])
    if "lesion" in paths:
        write_image(case["lesion"], paths["lesion"])
    write_mrk_json(case["roi"], paths["roi"])
    return paths


def balanced_labels(n: int, rng) -> list[int]:
    labels = [i % 3 for i in range(n)]
    rng.shuffle(labels)
    return labels


def _cohort_case(job: tuple) -> tuple[dict, dict]:
    """Write one cohort case (runs in a worker process when ``workers`` > 1): (manifest row, truth)."""
    out, case_id, case_seed, label, center = job
    case = make_case(case_seed, label, center=center)
    paths = write_case(case, out / "cases", case_id)
    row = {
        "case_id": case_id,
        "t1": paths["t1"].relative_to(out).as_posix(),
        "t2": paths["t2"].relative_to(out).as_posix(),
        "roi": paths["roi"].relative_to(out).as_posix(),
        "label": CLASS_NAMES[label],
        "center": center,
        "mask": paths["mask"].relative_to(out).as_posix(),
        "lesion": paths["lesion"].relative_to(out).as_posix(),
    }
    return row, case["info"]


def make_cohort(out: str | Path, n: int = 60, seed: int = 0, centers: int = 1, progress=None, workers: int = 1) -> Path:
    """Write ``n`` phantom cases and ``cohort.csv`` into ``out``; returns the manifest path.

    ``workers`` > 1 renders cases in that many processes; the cohort is the same for any ``workers``
    (every case's seed, label and id are drawn up front from ``seed``).
    """
    if n < 1:
        raise IPMNError(f"--n must be at least 1 (got {n})")
    if not 1 <= centers <= len(CENTERS):
        raise IPMNError(f"--centers must be between 1 and {len(CENTERS)} (got {centers})")
    if workers < 1:
        raise IPMNError(f"--workers must be at least 1 (got {workers})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    root = np.random.SeedSequence(seed)
    rng = np.random.default_rng(root.spawn(1)[0])
    labels = balanced_labels(n, rng)
    case_seeds = root.spawn(n + 1)[1:]
    used = set()
    jobs = []
    for i, (label, ss) in enumerate(zip(labels, case_seeds, strict=True)):
        case_rng = np.random.default_rng(ss)
        while True:
            case_id = f"ph{case_rng.integers(0, 16**5):05x}"
            if case_id not in used:
                used.add(case_id)
                break
        jobs.append((out, case_id, int(case_rng.integers(0, 2**31)), label, CENTERS[i % centers]))
    rows = []
    truth = {}
    if workers == 1:
        results = map(_cohort_case, jobs)
        pool = None
    else:
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(max_workers=workers)
        results = pool.map(_cohort_case, jobs)
    try:
        for i, (row, info) in enumerate(results):
            rows.append(row)
            truth[row["case_id"]] = info
            if progress:
                progress(i + 1, n)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    rows.sort(key=lambda r: r["case_id"])
    manifest = out / "cohort.csv"
    from ipmn.io import atomic_path

    with atomic_path(manifest) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_json({"seed": seed, "n": n, "centers": centers, "generator_version": GENERATOR_VERSION, "cases": truth,
                "note": "synthetic phantoms, not patient data"}, out / "phantom_truth.json")
    return manifest
