"""Which highdicom works with which pydicom, and the two places where their older pair differs.

PyPI metadata: highdicom 0.22.0 is the last release for pydicom 2 (``Requires-Dist: pydicom>=2.3.0,!=2.4.0``);
0.23.0 and later need ``pydicom>=3.0.1``. Slicer 5.10 ships pydicom 2.4.4 and numpy 2.0.2 (its DICOM module
relies on that pydicom, so it is never replaced); Slicer 5.12 ships pydicom 3.0.2 with highdicom 0.27.0.
So inside Slicer 5.10 the pair is pydicom 2.4.x + highdicom 0.22.x, elsewhere pydicom 3 + highdicom >= 0.25.

The SEG/SR calls of :mod:`ipmn.dicom_out` are the same for both pairs (measured: a SEG + SR written and read
back with pydicom 2.4.4 + highdicom 0.22.0 + numpy 2.0.2, and with pydicom 3.0.2 + highdicom 0.28.2). Two
things differ, both handled here: saving (``enforce_file_format`` is pydicom 3's keyword,
``write_like_original=False`` pydicom 2's) and highdicom 0.22 naming ``np.float_``, which numpy 2 removed.

Light on purpose (no numpy, pydicom or highdicom at import): the Slicer GUI's dependency installer uses
:func:`highdicom_requirement` to pick the highdicom release that fits the pydicom Slicer ships.
"""

from __future__ import annotations

import importlib.metadata
import os

HIGHDICOM_FOR_PYDICOM3 = ">=0.25"  # the SEG/SR API used by ipmn.dicom_out
HIGHDICOM_FOR_PYDICOM2 = ">=0.22,<0.23"  # the last highdicom for pydicom 2


def version_tuple(text: str | None) -> tuple[int, ...]:
    """``"2.4.4"`` -> (2, 4, 4); ``"3.0.0rc1"`` -> (3, 0, 0); anything unreadable stops the tuple."""
    parts = []
    for part in (text or "").split(".")[:3]:
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def highdicom_requirement(pydicom_version: str | None) -> str | None:
    """The highdicom requirement (``highdicom>=...``) that works with this pydicom; None when none does.

    pydicom 3: highdicom >= 0.25. pydicom 2.3 or 2.4 (not 2.4.0, which highdicom 0.22 excludes): highdicom
    0.22.x. Older pydicom, or none: no highdicom release fits.
    """
    found = version_tuple(pydicom_version)
    if found >= (3,):
        return f"highdicom{HIGHDICOM_FOR_PYDICOM3}"
    if (2, 3) <= found < (3,) and found[:3] != (2, 4, 0):
        return f"highdicom{HIGHDICOM_FOR_PYDICOM2}"
    return None


def compatibility_problem(pydicom_version: str | None, highdicom_version: str | None) -> str | None:
    """Why this pydicom + highdicom pair cannot write the SEG and SR, in words (None: it can)."""
    wanted = highdicom_requirement(pydicom_version)
    if wanted is None:
        return ("--dicom-out needs pydicom >= 2.3 (not 2.4.0) with a matching highdicom; "
                + (f"found pydicom {pydicom_version}" if pydicom_version else "pydicom is not installed"))
    found = version_tuple(highdicom_version)
    modern = wanted.endswith(HIGHDICOM_FOR_PYDICOM3)
    if not (found >= (0, 25) if modern else (0, 22) <= found < (0, 23)):
        return (f"--dicom-out with pydicom {pydicom_version} needs {wanted}; "
                + (f"found highdicom {highdicom_version}" if highdicom_version else "highdicom is not installed"))
    return None


def import_highdicom():
    """highdicom, working on numpy 2 also when it is the pydicom-2 release (0.22.x).

    highdicom 0.22 still names ``np.float_`` (removed in numpy 2.0) when it checks a SEG's pixel array: the
    alias is given back, as the ``np.float64`` it always was, in this (engine) process only.
    """
    import highdicom
    import numpy as np

    if version_tuple(getattr(highdicom, "__version__", "")) < (0, 23) and not hasattr(np, "float_"):
        np.float_ = np.float64
    return highdicom


def save_dataset(dataset, path) -> None:
    """Write a DICOM file with its file meta information, with pydicom 3's keyword or pydicom 2's."""
    import pydicom

    if version_tuple(pydicom.__version__) >= (3,):
        dataset.save_as(os.fspath(path), enforce_file_format=True)
    else:
        dataset.save_as(os.fspath(path), write_like_original=False)
