"""On-disk cache of preprocessed ROI grids, one entry per case.

What is cached: the *unstandardised* grid of every modality, i.e. ``prepare_case(..., raw=True).data``
(N4 → smoothing → resampling onto the ROI grid), shape (channels, slices, cell, cell), float32. The
cheap last steps (z-score, optional Nyúl mapping, 0–1 scaling) are applied in memory by
:func:`standardize`, because Nyúl landmarks must be learned on each training split separately; the
result is identical to ``prepare_case(..., raw=False)`` (the same ``standardize_array`` is applied).

Key: SHA-256 over (cache format version, modalities, the preprocessing options that act before
standardisation, the ROI margin and NaN policy, and the SHA-256 of the *full contents* of every input
file: T1, T2, ROI file or mask, every file of a DICOM folder). Full-content hashes, not size + mtime:
copying a cohort changes mtimes (a needless miss) and rewriting a file within the filesystem's mtime
granularity keeps size + mtime (a wrong hit); hashing a few-MB NIfTI costs milliseconds. Digests are
memoised per (path, size, mtime, inode) in ``file-digests.json`` so later runs do not re-read large
cohorts; a stale memo can only happen if all four stay equal while the contents change.

Entry: ``<root>/grids/<kk>/<key>.npz`` (written atomically) plus ``<key>.json`` (written after it; it
records the npz's SHA-256, the array shape and the grid geometry). An entry whose sidecar is missing,
whose checksum or shape does not match, or whose npz does not load is *corrupt*: it is rebuilt and
counted. Concurrent writers (``--fold K`` in parallel) write identical content with atomic renames.

Location (first that applies): the ``cache_dir`` argument (``--cache-dir``, ``data.cache_dir`` in the
config); ``$IPMN_CACHE_DIR``; ``$XDG_CACHE_HOME/ipmn``; ``~/.cache/ipmn``. One shared, content-keyed
cache (not one per output folder) so that ``train``, ``cv`` and every fold reuse the same grids.

Counters: :attr:`GridCache.stats` for one cache and :func:`stats` for the whole process (``hits``,
``misses``, ``corrupt``, ``build_s``) — benchmarks read them.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ipmn.errors import IPMNError
from ipmn.io import atomic_path, write_json
from ipmn.vocab import sha256_file

CACHE_VERSION = 2
"""Bumped when reading changes what a file gives: 2 = NIfTI NaN/Inf voxels are refused or cleaned to the
median (ITK's 0 before) and truncated files are refused, so grids cached from them must not be reused."""
# Options applied after the cached stage: they do not enter the key.
_POST_CACHE = ("standardize", "scale01", "scale_percentiles", "version")
_STATS = {"hits": 0, "misses": 0, "corrupt": 0, "build_s": 0.0}
_LOCK = threading.Lock()


def stats() -> dict:
    """Process-wide cache counters (a copy)."""
    with _LOCK:
        return dict(_STATS)


def reset_stats() -> None:
    with _LOCK:
        for k in _STATS:
            _STATS[k] = 0 if k != "build_s" else 0.0


def default_dir() -> Path:
    if os.environ.get("IPMN_CACHE_DIR"):
        return Path(os.environ["IPMN_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "ipmn"
    return Path.home() / ".cache" / "ipmn"


@dataclass
class CachedGrid:
    case_id: str
    data: np.ndarray  # (channels, slices, cell, cell) float32, unstandardised
    grid: dict
    modalities: tuple

    @property
    def n_slices(self) -> int:
        return int(self.data.shape[1])


class GridCache:
    """Preprocessed (unstandardised) ROI grids for a cohort under one preprocessing configuration."""

    def __init__(self, preprocess, modalities=("t1", "t2"), cache_dir=None, roi_margin_mm: float = 10.0,
                 nonfinite: str = "refuse"):
        from ipmn.config import PreprocessConfig

        self.cfg = preprocess if isinstance(preprocess, PreprocessConfig) else PreprocessConfig.from_dict(preprocess)
        self.modalities = tuple(modalities)
        self.root = Path(cache_dir).expanduser() if cache_dir else default_dir()
        self.roi_margin_mm = float(roi_margin_mm)
        self.nonfinite = nonfinite
        self.stats = {"hits": 0, "misses": 0, "corrupt": 0, "build_s": 0.0}
        self._digests: dict | None = None
        self._digests_dirty = False
        try:
            (self.root / "grids").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise IPMNError(f"cannot create the cache folder {self.root}: {exc.strerror or exc}") from exc

    # ---------------------------------------------------------------------------------- hashing
    def _digest_memo(self) -> dict:
        if self._digests is None:
            try:
                self._digests = json.loads((self.root / "file-digests.json").read_text(encoding="utf-8"))
                if not isinstance(self._digests, dict):
                    self._digests = {}
            except (OSError, ValueError):
                self._digests = {}
        return self._digests

    def file_digest(self, path) -> str:
        path = Path(path).resolve()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            h = hashlib.sha256()
            for p in files:
                h.update(p.relative_to(path).as_posix().encode())
                h.update(self.file_digest(p).encode())
            return h.hexdigest()
        st = path.stat()
        memo_key = f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
        memo = self._digest_memo()
        if memo_key not in memo:
            memo[memo_key] = sha256_file(path)
            self._digests_dirty = True
        return memo[memo_key]

    def _flush_digests(self) -> None:
        if self._digests_dirty and self._digests is not None:
            try:
                write_json(self._digests, self.root / "file-digests.json")
            except OSError:
                pass  # the memo only saves time
            self._digests_dirty = False

    def _inputs(self, case) -> dict:
        inputs = {}
        for m in self.modalities:
            p = getattr(case, m, None)
            if p is None:
                raise IPMNError(f"case {case.case_id}: no {m.upper()} volume (needed by modalities {self.modalities})")
            inputs[m] = p
        if case.roi:
            roi_path = Path(case.roi)
            inputs["roi"] = roi_path if roi_path.exists() else str(case.roi)  # a path or an 'R,A,S:W,H,D' box
        elif case.mask is not None:
            inputs["mask"] = case.mask
        else:
            raise IPMNError(f"case {case.case_id}: no ROI and no mask")
        for column in ("mask_segment", "t1_series", "t2_series"):  # choices within files holding several
            if (case.extra or {}).get(column):
                inputs[column] = str(case.extra[column])
        return inputs

    def key(self, case) -> str:
        cfg = {k: v for k, v in self.cfg.to_dict().items() if k not in _POST_CACHE}
        parts = {
            "version": CACHE_VERSION,
            "modalities": list(self.modalities),
            "preprocess": cfg,
            "roi_margin_mm": self.roi_margin_mm,
            "nonfinite": self.nonfinite,
            "inputs": {
                name: (self.file_digest(v) if isinstance(v, Path) else f"text:{v}")
                for name, v in self._inputs(case).items()
            },
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    # ---------------------------------------------------------------------------------- entries
    def _paths(self, key: str) -> tuple[Path, Path]:
        folder = self.root / "grids" / key[:2]
        return folder / f"{key}.npz", folder / f"{key}.json"

    def _read(self, key: str, case_id: str) -> CachedGrid | None:
        npz, side = self._paths(key)
        if not npz.exists() and not side.exists():
            return None
        try:
            meta = json.loads(side.read_text(encoding="utf-8"))
            if meta.get("sha256") != sha256_file(npz):
                raise ValueError("checksum mismatch")
            with np.load(npz, allow_pickle=False) as z:
                data = np.asarray(z["data"], dtype=np.float32)
            if list(data.shape) != list(meta["shape"]) or not np.isfinite(data).all():
                raise ValueError("shape or values do not match the sidecar")
            return CachedGrid(case_id, data, meta.get("grid", {}), tuple(meta["modalities"]))
        except (OSError, ValueError, KeyError, TypeError, EOFError):  # any damage: rebuild the entry
            self._count("corrupt")
            for p in (side, npz):
                try:
                    p.unlink()
                except OSError:
                    pass
            return None

    def _count(self, name: str, amount=1) -> None:
        self.stats[name] += amount
        with _LOCK:
            _STATS[name] += amount

    def _build(self, case) -> CachedGrid:
        from ipmn.inputs import load_inputs
        from ipmn.preprocess import prepare_case

        volumes, roi = load_inputs(
            case.t1 if "t1" in self.modalities else None,
            case.t2 if "t2" in self.modalities else None,
            **case.roi_spec, modalities=self.modalities, margin_mm=self.roi_margin_mm, nonfinite=self.nonfinite,
            **case.choices,
        )
        grid = prepare_case(volumes, roi, self.cfg, self.modalities, raw=True)
        return CachedGrid(case.case_id, np.ascontiguousarray(grid.data, dtype=np.float32), grid.grid.to_dict(),
                          self.modalities)

    def _write(self, key: str, entry: CachedGrid, case) -> None:
        npz, side = self._paths(key)
        try:
            with atomic_path(npz) as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(fh, data=entry.data)
            meta = {
                "version": CACHE_VERSION,
                "case_id": case.case_id,
                "sha256": sha256_file(npz),
                "shape": list(entry.data.shape),
                "dtype": "float32",
                "modalities": list(entry.modalities),
                "grid": entry.grid,
                "preprocess": self.cfg.to_dict(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            write_json(meta, side)
        except OSError as exc:
            # A full disk or a read-only cache costs only speed: keep going without caching.
            for p in (side, npz):
                try:
                    p.unlink()
                except OSError:
                    pass
            import sys

            print(f"ipmn: warning: could not write the grid cache entry for {case.case_id} in {self.root}: "
                  f"{exc.strerror or exc}", file=sys.stderr)

    def get(self, case) -> CachedGrid:
        key = self.key(case)
        entry = self._read(key, case.case_id)
        if entry is not None:
            self._count("hits")
            return entry
        self._count("misses")
        t = time.perf_counter()
        entry = self._build(case)
        self._write(key, entry, case)
        self._count("build_s", time.perf_counter() - t)
        return entry

    def get_many(self, cases, progress=None) -> dict[str, CachedGrid]:
        """Every case's grid; problems with individual cases are collected and raised together."""
        out, problems = {}, []
        n = len(cases)
        if progress is not None:
            progress.stage("cache", f"preprocessing {n} case(s) (cached in {self.root})", n=n)
        for i, case in enumerate(cases):
            try:
                out[case.case_id] = self.get(case)
            except IPMNError as exc:
                problems.append(f"{case.case_id}: {exc}")
            if progress is not None and progress.mode == "jsonl" and (i + 1) % 10 == 0:
                progress.stage("cache", f"{i + 1}/{n}", done=i + 1, n=n)
        self._flush_digests()
        if problems:
            shown = "; ".join(problems[:20]) + (f"; ... and {len(problems) - 20} more" if len(problems) > 20 else "")
            raise IPMNError(f"{len(problems)} case(s) could not be preprocessed: {shown}")
        return out


def standardize(raw: np.ndarray, modalities, cfg, landmarks: dict | None = None) -> np.ndarray:
    """Apply the post-cache steps (z-score / Nyúl / 0–1) to a cached grid, channel by channel."""
    from ipmn.preprocess import standardize_array

    return np.stack([standardize_array(raw[i], m, cfg, landmarks) for i, m in enumerate(modalities)]).astype(np.float32)


def fit_landmarks(raws: list[np.ndarray], modalities) -> dict:
    """Nyúl landmarks per modality, learned on the given (training) grids after z-scoring."""
    from ipmn.preprocess import NyulStandardizer, zscore

    # standard scale 0-1: since rules version 2 the network sees Nyul's output as it is
    return {m: NyulStandardizer(scale=(0.0, 1.0)).fit([zscore(r[i]) for r in raws]).to_dict()
            for i, m in enumerate(modalities)}
