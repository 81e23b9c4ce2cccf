"""Choosing one DICOM series in a folder.

A study folder often holds several series (T1, T2, localisers, derived maps). Using the one with the
most files is a silent guess that can grade the wrong sequence, so a folder with several series is an
error listing them (description, number of files, UID) unless the series is chosen by its
SeriesInstanceUID (``--t1-series`` / ``--t2-series``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from ipmn.errors import IPMNError


@dataclass(frozen=True)
class Series:
    uid: str
    description: str
    files: tuple[str, ...]  # sorted along the slice normal, as GDCM orders them


def _description(first_file: str) -> str:
    reader = sitk.ImageFileReader()
    reader.SetFileName(first_file)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return ""
    tag = "0008|103e"  # SeriesDescription
    return reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else ""


def list_series(folder: str | os.PathLike) -> list[Series]:
    """Every DICOM series in ``folder`` (not its subfolders), largest first."""
    reader = sitk.ImageSeriesReader()
    uids = reader.GetGDCMSeriesIDs(str(folder)) or ()
    found = []
    for uid in uids:
        files = tuple(reader.GetGDCMSeriesFileNames(str(folder), uid))
        if files:
            found.append(Series(uid, _description(files[0]), files))
    return sorted(found, key=lambda s: (-len(s.files), s.uid))


def _describe(series: list[Series]) -> str:
    return "; ".join(f"{s.uid} ('{s.description or 'no description'}', {len(s.files)} files)" for s in series)


def choose_series(folder: str | os.PathLike, name: str = "volume", uid: str | None = None) -> Series:
    """The one series of ``folder``, or the one whose SeriesInstanceUID is ``uid``."""
    folder = Path(folder)
    series = list_series(folder)
    option = f"--{name.lower()}-series"
    if not series:
        raise IPMNError(f"{name}: no DICOM series found in folder {folder}")
    if uid:
        chosen = [s for s in series if s.uid == str(uid).strip()]
        if not chosen:
            raise IPMNError(f"{name}: no series {uid} in {folder}; it holds {len(series)}: {_describe(series)}")
        return chosen[0]
    if len(series) > 1:
        raise IPMNError(
            f"{name}: {folder} holds {len(series)} DICOM series; choose one with {option} UID (cohort column "
            f"{name.lower()}_series): {_describe(series)}"
        )
    return series[0]


def read_series(folder: str | os.PathLike, name: str = "volume", uid: str | None = None) -> sitk.Image:
    series = choose_series(folder, name, uid)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(series.files))
    return reader.Execute()
