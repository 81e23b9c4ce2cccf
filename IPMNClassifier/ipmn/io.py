"""Reading volumes and writing outputs atomically.

Volumes are read with SimpleITK (NIfTI, NRRD, MHA, a DICOM series folder) and checked before any work
starts: 3-D, scalar, finite, not constant. Outputs are written to a temporary file in the destination
folder and renamed into place, so a crash never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ipmn.errors import IPMNError

_UMASK = os.umask(0)
os.umask(_UMASK)

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


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
    """
    path = Path(path)
    if not path.exists():
        raise IPMNError(f"{name}: file not found: {path}")
    if series and not path.is_dir():
        raise IPMNError(f"{name}: a series UID was given but {path} is not a DICOM folder")
    try:
        image = _read_dicom_folder(path, name, series) if path.is_dir() else sitk.ReadImage(str(path))
    except IPMNError:
        raise
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        raise IPMNError(
            f"{name}: cannot read {path} as an image (NIfTI, NRRD, MHA or a DICOM folder): {first[:160]}"
        ) from exc
    return check_volume(image, name=name, source=path, nonfinite=nonfinite, allow_constant=allow_constant)


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
    if float(array.max()) == float(array.min()) and not allow_constant:
        raise IPMNError(f"{name}{where}: every voxel has the same value ({float(array.min()):g})")
    return image


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
