"""Reading volumes and writing outputs atomically.

Volumes are read with SimpleITK (NIfTI, NRRD, MHA, a DICOM series folder) and checked before any work
starts: 3-D, scalar, finite, not constant. Outputs are written to a temporary file in the destination
folder and renamed into place, so a crash never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ipmn.errors import IPMNError

_UMASK = os.umask(0)
os.umask(_UMASK)

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
MIN_INTENSITY_RANGE = 1e-6
"""A volume whose intensities span less than this is refused: N4's offset and the 1e-8 guards of the
standardisation swamp it, and the case would be graded as if it were blank."""


def _read_dicom_folder(folder: Path, name: str, series: str | None = None) -> sitk.Image:
    from ipmn.dicom_series import read_series

    return read_series(folder, name, series)


def read_volume(
    path: str | os.PathLike, name: str = "volume", nonfinite: str = "refuse", series: str | None = None,
    allow_constant: bool = False,
) -> sitk.Image:
    """Read a 3-D scalar volume as float32, keeping its physical geometry.

    ``nonfinite``: ``"refuse"`` (default) rejects NaN/Inf voxels, ``"clean"`` replaces them with the
    median of the finite voxels. ``series``: the SeriesInstanceUID to read from a DICOM folder.
    ``allow_constant``: accept a volume whose voxels are all equal (an empty label map), refused otherwise.
    A truncated NIfTI (which ITK would pad with zeros), NaN/Inf voxels in a NIfTI (which ITK turns into
    zeros) and a sheared NRRD/MHA direction matrix (which ITK would orthogonalise silently) are found by
    reading the file's own header and data first.
    """
    path = Path(path)
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise IPMNError(f"{name}: cannot open {str(path)[:200]}: {exc.strerror or exc}") from exc
    if not exists:
        raise IPMNError(f"{name}: file not found: {path}")
    if series and not is_dir:
        raise IPMNError(f"{name}: a series UID was given but {path} is not a DICOM folder")
    nonfinite_mask = None
    if not is_dir:
        nonfinite_mask = nifti_nonfinite(path, name)
        check_header_direction(path, name)
    try:
        image = _read_dicom_folder(path, name, series) if is_dir else sitk.ReadImage(str(path))
    except IPMNError:
        raise
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        raise IPMNError(
            f"{name}: cannot read {path} as an image (NIfTI, NRRD, MHA or a DICOM folder): {first[:160]}"
        ) from exc
    if nonfinite_mask is not None and nonfinite_mask.size == image.GetNumberOfPixels():
        array = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32))
        array.reshape(-1)[nonfinite_mask] = np.nan  # give back what ITK's NIfTI reader replaced by 0
        restored = sitk.GetImageFromArray(array)
        restored.CopyInformation(image)
        image = restored
    return check_volume(image, name=name, source=path, nonfinite=nonfinite, allow_constant=allow_constant)


# NIfTI-1/-2 single-file headers: (sizeof_hdr, offset of datatype, of dim[8], dim type, of vox_offset, its type)
_NIFTI_LAYOUTS = {348: (70, 40, "h", 108, "f"), 540: (12, 16, "q", 168, "q")}
_NIFTI_FLOATS = {16: "f4", 64: "f8"}


def nifti_nonfinite(path: Path, name: str = "volume") -> np.ndarray | None:
    """For a ``.nii``/``.nii.gz``: check that the file holds all its voxels (a truncated gzip stream or
    data block is refused) and return a flat mask of its NaN/Inf voxels (``None`` when there are none,
    or for other formats)."""
    lower = path.name.lower()
    if not (lower.endswith(".nii") or lower.endswith(".nii.gz")):
        return None
    try:
        if lower.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                data = fh.read()
        else:
            data = path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise IPMNError(f"{name}: cannot read {path}: the file is truncated or corrupt ({exc})") from exc
    except OSError as exc:
        raise IPMNError(f"{name}: cannot read {path}: {exc.strerror or exc}") from exc
    header = None
    for endian in "<>":
        if len(data) >= 4 and struct.unpack(endian + "i", data[:4])[0] in _NIFTI_LAYOUTS:
            header = endian, _NIFTI_LAYOUTS[struct.unpack(endian + "i", data[:4])[0]]
            break
    if header is None:
        return None  # not a NIfTI header: let ITK say what it is
    endian, (dt_at, dim_at, dim_t, vox_at, vox_t) = header
    try:
        datatype, bitpix = struct.unpack_from(endian + "hh", data, dt_at)
        dims = struct.unpack_from(endian + "8" + dim_t, data, dim_at)
        vox_offset = int(struct.unpack_from(endian + vox_t, data, vox_at)[0])
    except struct.error as exc:
        raise IPMNError(f"{name}: cannot read {path}: the file is truncated (its NIfTI header is incomplete)") from exc
    if not 1 <= dims[0] <= 7 or bitpix <= 0:
        return None
    n_voxels = int(np.prod([max(int(d), 1) for d in dims[1 : dims[0] + 1]], dtype=np.int64))
    needed = vox_offset + n_voxels * bitpix // 8
    if len(data) < needed:
        raise IPMNError(
            f"{name}: cannot read {path}: the file is truncated: it holds {max(len(data) - vox_offset, 0)} of the "
            f"{n_voxels * bitpix // 8} bytes of voxel data its header announces"
        )
    if datatype not in _NIFTI_FLOATS:
        return None
    values = np.frombuffer(data, dtype=endian + _NIFTI_FLOATS[datatype], count=n_voxels, offset=vox_offset)
    bad = ~np.isfinite(values)
    return bad if bad.any() else None


_NRRD_VECTOR = re.compile(r"\(([^)]*)\)")


def header_direction(path: Path) -> np.ndarray | None:
    """The direction matrix a NRRD (``space directions``) or MHA/MHD (``TransformMatrix``) header gives,
    as written (columns = voxel axes, with their lengths), or ``None``."""
    lower = path.name.lower()
    if not lower.endswith((".nrrd", ".nhdr", ".mha", ".mhd")):
        return None
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError:
        return None
    text = head.split(b"\n\n", 1)[0].decode("latin-1")
    for line in text.splitlines():
        key, sep, value = line.partition(":" if lower.endswith((".nrrd", ".nhdr")) else "=")
        key = key.strip().lower()
        try:
            if key == "space directions" and sep:
                vectors = [v for v in _NRRD_VECTOR.findall(value)]
                cols = [[float(x) for x in v.split(",")] for v in vectors]
                if len(cols) == 3 and all(len(c) == 3 for c in cols):
                    return np.array(cols, dtype=float).T
            if key in ("transformmatrix", "rotation", "orientation") and sep:
                numbers = [float(x) for x in value.split()]
                if len(numbers) == 9:
                    return np.array(numbers, dtype=float).reshape(3, 3).T
        except ValueError:
            return None
    return None


def check_header_direction(path: Path, name: str = "volume", tolerance: float = 1e-3) -> None:
    """Refuse a non-orthogonal (sheared) direction matrix: ITK would silently make it orthogonal, and the
    maps would then be written in a geometry that does not overlay the input."""
    d = header_direction(path)
    if d is None:
        return
    lengths = np.linalg.norm(d, axis=0)
    if np.any(lengths <= 0) or not np.all(np.isfinite(d)):
        raise IPMNError(f"{name}: {path} has a degenerate direction matrix in its header")
    unit = d / lengths
    off = np.abs(unit.T @ unit - np.eye(3)).max()
    if off > tolerance:
        angle = float(np.degrees(np.arccos(np.clip(1 - off, -1, 1))))
        raise IPMNError(
            f"{name}: {path} has a sheared (non-orthogonal) direction matrix (axes {angle:.1f} degrees from "
            "perpendicular); resample it onto an orthogonal grid first (e.g. in 3D Slicer: Resample Scalar Volume)"
        )


def check_volume(image: sitk.Image, name: str = "volume", source=None, nonfinite: str = "refuse",
                 allow_constant: bool = False) -> sitk.Image:
    """Validate a volume already in memory and return it as float32."""
    where = f" ({source})" if source else ""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise IPMNError(
            f"{name}{where}: has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
            "a scalar (grey-level) volume is needed"
        )
    dim = image.GetDimension()
    if dim == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
        dim = 3
    if dim != 3:
        raise IPMNError(f"{name}{where}: is {dim}-D with size {image.GetSize()}; a 3-D volume is needed")
    if min(image.GetSize()) < 1:
        raise IPMNError(f"{name}{where}: is empty (size {image.GetSize()})")
    image = sitk.Cast(image, sitk.sitkFloat32)
    array = sitk.GetArrayViewFromImage(image)
    finite = np.isfinite(array)
    n_bad = int(array.size - np.count_nonzero(finite))
    if n_bad:
        if nonfinite != "clean":
            raise IPMNError(
                f"{name}{where}: has {n_bad} NaN/Inf voxels; fix the file or pass --nonfinite clean "
                "to replace them with the median intensity"
            )
        if not finite.any():
            raise IPMNError(f"{name}{where}: every voxel is NaN/Inf")
        cleaned = np.where(finite, array, np.median(array[finite])).astype(np.float32)
        out = sitk.GetImageFromArray(cleaned)
        out.CopyInformation(image)
        image = out
        array = cleaned
    lo, hi = float(array.min()), float(array.max())
    if hi == lo and not allow_constant:
        raise IPMNError(f"{name}{where}: every voxel has the same value ({lo:g})")
    if 0 < hi - lo < MIN_INTENSITY_RANGE:
        raise IPMNError(
            f"{name}{where}: its intensities span only {hi - lo:.3g} (from {lo:.3g}); below "
            f"{MIN_INTENSITY_RANGE:g} preprocessing cannot tell tissue apart, so the grade would be that of a "
            "blank volume; rescale the image"
        )
    return image


MIN_FREE_BYTES = 1 << 20


def check_out_dir(path, what: str = "--out") -> Path:
    """Refuse, before any work, an output folder that cannot be written: empty name, an existing file or
    device, a dangling link, a path under a file, a read-only or full file system."""
    text = os.fspath(path) if path is not None else ""
    if not str(text).strip():
        raise IPMNError(f"{what} is empty; give an output folder")
    p = Path(text)
    shown = str(p)[:200]
    try:
        if p.is_symlink() and not p.exists():
            raise IPMNError(f"cannot write {shown}: it is a dangling symbolic link")
        if p.exists() and not p.is_dir():
            raise IPMNError(f"cannot write {shown}: it exists and is not a folder")
        existing = p.absolute()
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise IPMNError(f"cannot write {shown}: {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise IPMNError(f"cannot write {shown}: {existing} is not writable (permissions or a read-only file system)")
        fs = os.statvfs(existing)
    except OSError as exc:
        raise IPMNError(f"cannot write {shown}: {exc.strerror or exc}") from exc
    if fs.f_bavail * fs.f_frsize < MIN_FREE_BYTES:
        raise IPMNError(f"cannot write {shown}: the file system holding {existing} is full")
    if fs.f_files > 0 and fs.f_favail == 0:
        raise IPMNError(f"cannot write {shown}: the file system holding {existing} has no free inodes")
    return p


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike):
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(dest.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name.split('.')[0]}-", suffix=suffix, dir=dest.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_image(image: sitk.Image, dest: str | os.PathLike, compress: bool = True) -> Path:
    with atomic_path(dest) as tmp:
        sitk.WriteImage(image, str(tmp), compress)
    return Path(dest)


def write_text(text: str, dest: str | os.PathLike) -> Path:
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(dest)


def write_json(obj, dest: str | os.PathLike) -> Path:
    return write_text(json.dumps(obj, indent=2, default=json_default) + "\n", dest)


def json_default(obj):
    """``json.dumps`` fallback for numpy/torch scalars and arrays, paths and sets."""
    if hasattr(obj, "tolist"):  # numpy and torch scalars and arrays
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def geometry(image: sitk.Image) -> dict:
    """The physical geometry of an image (LPS, as ITK stores it), JSON-ready."""
    return {
        "size": list(image.GetSize()),
        "spacing": [round(float(s), 6) for s in image.GetSpacing()],
        "origin_lps": [round(float(o), 6) for o in image.GetOrigin()],
        "direction_lps": [round(float(d), 8) for d in image.GetDirection()],
    }
