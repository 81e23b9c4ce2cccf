"""``ipmn evaluate``: a model (or fold ensemble) on a whole cohort, with localisation of its maps.

One process, the model loaded once (:class:`ipmn.predict.Predictor`); a one-worker thread reads and
preprocesses the next case while the model runs on the current one. Writes into ``--out``:

* ``predictions.csv`` - one row per case: label, probabilities, predicted class, pointing-game hit,
  distance and lift (where a lesion mask exists), error (a case that failed);
* ``metrics.json`` - with labels: accuracy, balanced accuracy, per-class recall, macro AUC, ECE,
  confusion (``ipmn.metrics``); localisation overall and per class; without labels: counts only;
* ``report.html`` - self-contained (base64 PNGs): the metrics and the worst cases' grids;
* ``cases/<case_id>/`` - what ``ipmn predict`` writes for each case.

Localisation (where the manifest's ``lesion`` column gives a label volume, nonzero = lesion, any
geometry; resampled onto T1 by nearest neighbour through physical space), in T1's geometry, inside the
ROI region the map covers:

* **pointing game** (Zhang et al. 2018): a hit when the attention maximum lies within ``tolerance_mm``
  (5 mm) of a lesion voxel, distances in millimetres. Ties at the maximum all have to be within it, so
  a flat map cannot score.
* **attention lift**: the share of the attention mass that falls on the lesion divided by the lesion's
  share of the region's voxels. 1 = no better than a uniform map; > 1 = attention concentrates on the
  lesion; < 1 = it avoids it.
"""

from __future__ import annotations

import base64
import csv
import html
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ipmn.errors import IPMNError

TOLERANCE_MM = 5.0


# ----------------------------------------------------------------------------------- localisation
def _voxel_spacing_zyx(spacing_xyz) -> np.ndarray:
    s = np.asarray(spacing_xyz, dtype=float)
    if s.shape != (3,) or np.any(s <= 0):
        raise IPMNError(f"spacing must be three positive numbers (x, y, z mm), got {spacing_xyz!r}")
    return s[::-1]


def pointing_game(attention: np.ndarray, lesion: np.ndarray, spacing_xyz, region: np.ndarray | None = None,
                  tolerance_mm: float = TOLERANCE_MM) -> dict:
    """Is the attention maximum within ``tolerance_mm`` of the lesion?

    ``attention``, ``lesion`` (bool) and ``region`` (bool, default everywhere) are (z, y, x) arrays on one
    voxel grid with voxel spacing ``spacing_xyz`` (mm, SimpleITK order; an orthonormal direction matrix
    keeps physical distances equal to spacing-scaled index distances). The maximum is taken inside
    ``region``; every voxel tied at the maximum must be within the tolerance. Returns ``hit`` (bool or
    None when there is no lesion or no attention), ``distance_mm`` (largest distance of a maximum voxel
    to the nearest lesion voxel) and ``peak_index`` (z, y, x of the first maximum).
    """
    from scipy.ndimage import distance_transform_edt

    attention = np.asarray(attention, dtype=float)
    lesion = np.asarray(lesion, dtype=bool)
    region = np.ones(attention.shape, bool) if region is None else np.asarray(region, dtype=bool)
    if not attention.shape == lesion.shape == region.shape:
        raise IPMNError(f"attention {attention.shape}, lesion {lesion.shape} and region {region.shape} differ")
    sampling = _voxel_spacing_zyx(spacing_xyz)
    values = np.where(region, attention, -np.inf)
    if not lesion.any() or not region.any() or not np.isfinite(values).any() or float(values.max()) <= 0:
        return {"hit": None, "distance_mm": None, "peak_index": None}
    peaks = np.argwhere(values == values.max())
    # distance to the lesion inside the bounding box of lesion + peaks (all of the lesion is inside)
    pts = np.concatenate([peaks, np.argwhere(lesion)])
    lo, hi = pts.min(0), pts.max(0) + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    dist = distance_transform_edt(~lesion[box], sampling=sampling)
    d = float(dist[tuple((peaks - lo).T)].max())
    return {"hit": bool(d <= tolerance_mm), "distance_mm": d, "peak_index": [int(v) for v in peaks[0]]}


def attention_lift(attention: np.ndarray, lesion: np.ndarray, region: np.ndarray | None = None) -> dict:
    """Share of the attention mass on the lesion ÷ the lesion's share of the region's voxels.

    Arrays as in :func:`pointing_game` (attention must be non-negative). Returns ``lift``,
    ``attention_share`` and ``lesion_share`` (None when the lesion misses the region or the map is 0).
    """
    attention = np.asarray(attention, dtype=float)
    lesion = np.asarray(lesion, dtype=bool)
    region = np.ones(attention.shape, bool) if region is None else np.asarray(region, dtype=bool)
    if not attention.shape == lesion.shape == region.shape:
        raise IPMNError(f"attention {attention.shape}, lesion {lesion.shape} and region {region.shape} differ")
    if np.any(attention[region] < 0):
        raise IPMNError("attention must be non-negative for the lift")
    n_region = int(region.sum())
    on = lesion & region
    mass = float(attention[region].sum())
    if n_region == 0 or not on.any() or mass <= 0:
        return {"lift": None, "attention_share": None, "lesion_share": None}
    attention_share = float(attention[on].sum()) / mass
    lesion_share = float(on.sum()) / n_region
    return {"lift": attention_share / lesion_share, "attention_share": attention_share, "lesion_share": lesion_share}


def labels_on_reference(lesion_path, reference) -> np.ndarray:
    """A lesion label volume (any geometry) as a float32 (z, y, x) array of its values on ``reference``
    (nearest neighbour; 0 outside it)."""
    import SimpleITK as sitk

    from ipmn.io import read_volume

    img = read_volume(lesion_path, name="lesion mask", allow_constant=True)  # empty: no lesion
    on_ref = sitk.Resample(sitk.Cast(img, sitk.sitkFloat32), reference, sitk.Transform(),
                           sitk.sitkNearestNeighbor, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(on_ref)


def lesion_on_reference(lesion_path, reference):
    """A lesion label volume (any geometry) as a bool (z, y, x) array on ``reference`` (nonzero = lesion)."""
    return labels_on_reference(lesion_path, reference) != 0


def localise(attention_img, inside: np.ndarray, lesion_path, tolerance_mm: float = TOLERANCE_MM) -> dict:
    """Pointing game + lift of one predicted case (attention in T1 geometry) against its lesion mask."""
    import SimpleITK as sitk

    attention = sitk.GetArrayFromImage(attention_img)
    lesion = lesion_on_reference(lesion_path, attention_img)
    out = {"lesion_voxels_in_roi": int((lesion & inside).sum())}
    out |= pointing_game(attention, lesion, attention_img.GetSpacing(), inside, tolerance_mm)
    out |= attention_lift(attention, lesion, inside)
    return out


def localisation_summary(rows: list[dict], by: str) -> dict:
    """Pointing-game hit rate and lift (mean, median) overall and per class (``by``: a row key)."""
    def one(sel):
        hits = [r["pointing_hit"] for r in sel if r.get("pointing_hit") is not None]
        lifts = [r["lift"] for r in sel if r.get("lift") is not None]
        return {
            "n": len(hits),
            "pointing_game": float(np.mean(hits)) if hits else None,
            "pointing_hits": int(sum(hits)),
            "lift_mean": float(np.mean(lifts)) if lifts else None,
            "lift_median": float(np.median(lifts)) if lifts else None,
        }

    with_lesion = [r for r in rows if r.get("pointing_hit") is not None or r.get("lift") is not None]
    classes = sorted({r[by] for r in with_lesion if r.get(by)})
    return {"overall": one(with_lesion), "per_class": {c: one([r for r in with_lesion if r[by] == c]) for c in classes},
            "per_class_by": by}


# ------------------------------------------------------------------------------------------ run
def _check_cases(cases, predictor) -> None:
    missing = [f"{c.case_id} ({m.upper()})" for c in cases for m in predictor.modalities if not c.has(m)]
    if missing:
        raise IPMNError(f"{len(missing)} case(s) lack a modality the model needs: {', '.join(missing[:10])}")
    unknown = sorted({c.label_name for c in cases if c.label >= 0} - set(predictor.class_names))
    if unknown:
        raise IPMNError(f"the cohort has label(s) {unknown} that the model's classes {predictor.class_names} lack")


def evaluate(cohort, models, out, windows: str = "central", tta: bool = False, device: str = "auto",
             precision: str = "auto", tolerance_mm: float = TOLERANCE_MM, worst: int = 8, predictor=None,
             margin_mm: float = 10.0, log=None) -> dict:
    """Evaluate ``models`` on the manifest ``cohort``; writes into ``out`` and returns metrics.json's content."""
    from ipmn.cohort import load_manifest
    from ipmn.io import write_json

    log = log or (lambda msg: None)
    if windows not in ("central", "all"):
        raise IPMNError(f"windows must be 'central' or 'all' (got {windows!r})")
    if not tolerance_mm > 0:
        raise IPMNError(f"the pointing-game tolerance must be positive (got {tolerance_mm})")
    cases = load_manifest(cohort, require_labels=False)  # every manifest problem at once, before any work
    if predictor is None:
        from ipmn.predict import Predictor  # torch: only after the manifest is known to be good

        predictor = Predictor(models, device=device, precision=precision)
    _check_cases(cases, predictor)
    labelled = cases[0].label >= 0
    out = Path(out)
    (out / "cases").mkdir(parents=True, exist_ok=True)

    def prepare(c):
        try:
            return predictor.prepare(c.t1, c.t2, **c.roi_spec, margin_mm=margin_mm, **c.choices)
        except IPMNError as exc:
            return exc

    rows: list[dict] = []
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(prepare, cases[0])
        for i, c in enumerate(cases):
            prepared = pending.result()
            if i + 1 < len(cases):
                pending = pool.submit(prepare, cases[i + 1])  # overlaps with the model on this case
            rows.append(_one_case(predictor, c, prepared, out, windows, tta, tolerance_mm))
            log(f"case {i + 1}/{len(cases)} {_row_text(rows[-1])}")
    seconds = time.perf_counter() - t0
    done = [r for r in rows if not r["error"]]
    if not done:
        raise IPMNError(f"no case could be predicted; first error: {rows[0]['error']}")
    metrics = _metrics(rows, done, predictor.class_names, labelled)
    metrics |= {
        "schema": "ipmn.evaluation/1",
        "cohort": str(cohort),
        "models": [str(d) for d in predictor.dirs],
        "windows": windows, "tta": bool(tta), "device": str(predictor.device), "precision": predictor.precision,
        "tolerance_mm": float(tolerance_mm),
        "n_cases": len(rows), "n_failed": len(rows) - len(done),
        "failed": {r["case_id"]: r["error"] for r in rows if r["error"]},
        "seconds": round(seconds, 3), "cases_per_second": round(len(rows) / seconds, 4) if seconds > 0 else None,
    }
    _write_csv(out / "predictions.csv", rows, predictor.class_names)
    write_json(metrics, out / "metrics.json")
    write_report(out / "report.html", metrics, rows, out, predictor.class_names, worst)
    return metrics


def _row_text(r: dict) -> str:
    if r["error"]:
        return f"{r['case_id']}: error: {r['error']}"
    text = f"{r['case_id']}: {r['predicted'].upper()}" + (f" (label {r['label']})" if r["label"] else "")
    if r["pointing_hit"] is not None:
        text += f", pointing {'hit' if r['pointing_hit'] else 'miss'} ({r['distance_mm']:.1f} mm)"
    if r["lift"] is not None:
        text += f", lift {r['lift']:.2f}"
    return text


def _one_case(predictor, c, prepared, out: Path, windows, tta, tolerance_mm) -> dict:
    row = {"case_id": c.case_id, "label": c.label_name, "predicted": "", "correct": None, "error": "",
           "pointing_hit": None, "distance_mm": None, "lift": None, "attention_share": None, "lesion_share": None,
           "probabilities": {}, "seconds": None}
    t = time.perf_counter()
    try:
        if isinstance(prepared, Exception):
            raise prepared
        result = predictor.predict(out=out / "cases" / c.case_id, windows=windows, tta=tta, prepared=prepared)
        row["probabilities"] = result["probabilities"]
        row["predicted"] = result["predicted_class"]
        row["correct"] = (row["predicted"] == c.label_name) if c.label >= 0 else None
        if c.lesion is not None:
            loc = localise(predictor.last_maps["attention"], predictor.last_maps["inside"], c.lesion, tolerance_mm)
            row |= {"pointing_hit": loc["hit"], "distance_mm": loc["distance_mm"], "lift": loc["lift"],
                    "attention_share": loc["attention_share"], "lesion_share": loc["lesion_share"]}
    except IPMNError as exc:
        row["error"] = str(exc)
    row["seconds"] = round(time.perf_counter() - t, 4)
    return row


def _metrics(rows, done, class_names, labelled) -> dict:
    out: dict = {"labelled": labelled}
    if labelled:
        from ipmn.metrics import classification_metrics

        y = np.array([class_names.index(r["label"]) for r in done])
        p = np.array([[r["probabilities"][n] for n in class_names] for r in done])
        m = classification_metrics(y, p, len(class_names))
        conf = np.asarray(m["confusion"])
        support = conf.sum(1)
        m["recall_per_class"] = {n: (float(conf[i, i] / support[i]) if support[i] else None)
                                 for i, n in enumerate(class_names)}
        m["support"] = {n: int(s) for n, s in zip(class_names, support, strict=True)}
        m["classes"] = list(class_names)
        out["classification"] = m
    if any(r["pointing_hit"] is not None or r["lift"] is not None for r in done):
        out["localisation"] = localisation_summary(done, "label" if labelled else "predicted")
    return out


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def _write_csv(dest: Path, rows, class_names) -> None:
    from ipmn.io import atomic_path

    cols = (["case_id", "label"] + [f"p_{n}" for n in class_names]
            + ["predicted", "correct", "pointing_hit", "distance_mm", "lift", "attention_share", "lesion_share",
               "seconds", "error"])
    with atomic_path(dest) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for r in rows:
            probs = [r["probabilities"].get(n) for n in class_names]
            w.writerow([_fmt(v) for v in [r["case_id"], r["label"], *probs, r["predicted"], r["correct"],
                                          r["pointing_hit"], r["distance_mm"], r["lift"], r["attention_share"],
                                          r["lesion_share"], r["seconds"], r["error"]]])


# ------------------------------------------------------------------------------------------ CLI
def register(sub) -> None:
    """Add ``evaluate`` to the ``ipmn`` sub-parsers."""
    p = sub.add_parser("evaluate", help="a model on a whole cohort: predictions.csv, metrics.json, localisation, report.html",
                       description="Predict every case of a manifest with one model (or a fold ensemble) loaded once. "
                                   "With labels: accuracy, balanced accuracy, per-class recall, macro AUC, ECE, "
                                   "confusion. With a 'lesion' column: pointing game and attention lift.")
    p.add_argument("--cohort", required=True, help="cohort manifest CSV (label optional; optional lesion column)")
    p.add_argument("--model", help="model package folder")
    p.add_argument("--ensemble", nargs="+", metavar="DIR", help="several model folders averaged (e.g. CV folds)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--windows", choices=["central", "all"], default="central")
    p.add_argument("--tta", action="store_true", help="test-time flips/90-degree rotations")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    p.add_argument("--tolerance-mm", type=float, default=TOLERANCE_MM, help="pointing-game tolerance [5 mm]")
    p.add_argument("--worst", type=int, default=8, help="worst cases shown with their grids in report.html [8]")
    p.add_argument("--record", metavar="DESCRIPTION",
                   help="also store these metrics in the model's config.json as its held-out evaluation "
                        "(the model picker shows them); DESCRIPTION says what the cohort is, e.g. "
                        "'90 fresh phantoms, ipmn phantoms --n 90 --seed 77'")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args) -> int:
    models = list(args.ensemble or []) or ([args.model] if args.model else [])
    if not models:
        raise IPMNError("no model given: pass --model MODEL_DIR (or --ensemble DIR1 DIR2 ...)")
    if args.record is not None and (len(models) != 1 or not args.record.strip()):
        raise IPMNError("--record needs one --model and a description of the cohort")
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    m = evaluate(args.cohort, models, args.out, args.windows, args.tta, args.device, args.precision,
                 args.tolerance_mm, args.worst, log=log)
    print(summary_text(m))
    print(f"outputs in {args.out}/: predictions.csv metrics.json report.html cases/")
    if args.record is not None:
        record_evaluation(models[0], m, args.record.strip())
        print(f"recorded as the held-out evaluation of {models[0]}")
    return 0


def record_evaluation(model_dir, metrics: dict, description: str) -> dict:
    """Store an evaluation in the package's config.json (``evaluation``), atomically: the headline numbers,
    per-class recall, localisation and how they were obtained. Returns what was stored."""
    from ipmn.io import write_json
    from ipmn.registry import read_config_json
    from ipmn.vocab import CONFIG_FILE

    cls = metrics.get("classification")
    if not cls:
        raise IPMNError("--record needs a labelled cohort (the manifest has no labels)")
    path = Path(model_dir) / CONFIG_FILE
    config = read_config_json(path)
    keep = ("accuracy", "balanced_accuracy", "macro_auc", "macro_f1", "ece", "recall_per_class", "support")
    entry = {
        "cohort": description,
        "n_cases": metrics["n_cases"] - metrics["n_failed"],
        "windows": metrics["windows"], "tta": metrics["tta"], "precision": metrics["precision"],
        "metrics": {k: cls[k] for k in keep if k in cls},
        "localisation": (metrics.get("localisation") or {}).get("overall"),
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    config["evaluation"] = entry
    write_json(config, path)
    return entry


def summary_text(m: dict) -> str:
    parts = [f"{m['n_cases'] - m['n_failed']}/{m['n_cases']} cases in {m['seconds']:.1f} s"]
    c = m.get("classification")
    if c:
        recall = ", ".join(f"{k} {v:.2f}" for k, v in c["recall_per_class"].items() if v is not None)
        parts.append(f"accuracy {c['accuracy']:.2f}, balanced {c['balanced_accuracy']:.2f}, macro AUC "
                     f"{c['macro_auc']:.2f}, ECE {c['ece']:.2f}; recall {recall}")
    loc = (m.get("localisation") or {}).get("overall")
    if loc and loc["n"]:
        parts.append(f"pointing game {loc['pointing_hits']}/{loc['n']}, lift mean {loc['lift_mean']:.2f} "
                     f"median {loc['lift_median']:.2f}")
    return "; ".join(parts)


# ----------------------------------------------------------------------------------------- report
def _worst(rows, worst: int) -> list[dict]:
    """Labelled: lowest probability on the true class first; unlabelled: most uncertain (flattest) first."""
    done = [r for r in rows if not r["error"]]

    def key(r):
        if r["label"]:
            return r["probabilities"][r["label"]]
        p = np.clip(np.array(list(r["probabilities"].values())), 1e-12, 1)
        return float((p * np.log(p)).sum())  # negative entropy: flattest first

    return sorted(done, key=key)[: max(0, int(worst))]


def _cell(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return esc(v)


def write_report(dest: Path, metrics: dict, rows, out: Path, class_names, worst: int = 8) -> None:
    """report.html: summary, metrics tables and the worst cases' grids (self-contained)."""
    from ipmn.io import write_text

    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>IPMN evaluation</title><style>"
             "body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}th{background:#eee}"
             "img{max-width:100%}</style></head><body>",
             "<h1>IPMN evaluation</h1>",
             f"<p>{esc(summary_text(metrics))}</p>",
             f"<p>cohort {esc(metrics['cohort'])}; model(s) {esc(', '.join(metrics['models']))}; windows "
             f"{esc(metrics['windows'])}{', TTA' if metrics['tta'] else ''}; {esc(metrics['device'])} "
             f"{esc(metrics['precision'])}</p>"]
    c = metrics.get("classification")
    if c:
        parts.append("<h2>Classification</h2><table><tr>" + "".join(
            f"<th>{esc(k)}</th>" for k in ("n", "accuracy", "balanced_accuracy", "macro_auc", "ece")) + "</tr><tr>"
            + "".join(f"<td>{_cell(c[k])}</td>" for k in ("n", "accuracy", "balanced_accuracy", "macro_auc", "ece"))
            + "</tr></table>")
        parts.append("<table><tr><th>true \\ predicted</th>" + "".join(f"<th>{esc(n)}</th>" for n in class_names)
                     + "<th>recall</th></tr>" + "".join(
                         f"<tr><th>{esc(n)}</th>" + "".join(f"<td>{v}</td>" for v in c["confusion"][i])
                         + f"<td>{_cell(c['recall_per_class'][n])}</td></tr>" for i, n in enumerate(class_names))
                     + "</table>")
    loc = metrics.get("localisation")
    if loc:
        parts.append(f"<h2>Localisation (tolerance {metrics['tolerance_mm']:g} mm)</h2><p>Pointing game: the attention "
                     "maximum within the tolerance of the lesion. Lift: share of attention on the lesion / the "
                     "lesion's share of the ROI (1 = uniform map).</p><table><tr><th>group</th><th>n</th>"
                     "<th>pointing game</th><th>lift mean</th><th>lift median</th></tr>")
        groups = [("all", loc["overall"])] + [(f"{loc['per_class_by']} {k}", v) for k, v in loc["per_class"].items()]
        parts += [f"<tr><th>{esc(g)}</th><td>{v['n']}</td><td>{_cell(v['pointing_game'])}</td>"
                  f"<td>{_cell(v['lift_mean'])}</td><td>{_cell(v['lift_median'])}</td></tr>" for g, v in groups]
        parts.append("</table>")
    chosen = _worst(rows, worst)
    if chosen:
        parts.append(f"<h2>Worst {len(chosen)} case(s)</h2>")
        for r in chosen:
            probs = ", ".join(f"{n} {r['probabilities'][n]:.2f}" for n in class_names)
            parts.append(f"<h3>{esc(r['case_id'])}: predicted {esc(r['predicted'])}"
                         + (f", label {esc(r['label'])}" if r["label"] else "") + f" ({esc(probs)})"
                         + (f"; pointing {'hit' if r['pointing_hit'] else 'miss'}" if r["pointing_hit"] is not None else "")
                         + (f"; lift {r['lift']:.2f}" if r["lift"] is not None else "") + "</h3>")
            b64 = png_b64(out / "cases" / r["case_id"] / "grid.png")
            if b64:
                parts.append(f"<img alt='grid of {esc(r['case_id'])}' src='data:image/png;base64,{b64}'>")
    if metrics["failed"]:
        parts.append("<h2>Failed cases</h2><ul>" + "".join(
            f"<li>{esc(k)}: {esc(v)}</li>" for k, v in metrics["failed"].items()) + "</ul>")
    parts.append("</body></html>")
    write_text("\n".join(parts), dest)


def png_b64(path: Path) -> str | None:
    try:
        return base64.b64encode(Path(path).read_bytes()).decode("ascii")
    except OSError:
        return None


def esc(v) -> str:
    return html.escape(str(v))
