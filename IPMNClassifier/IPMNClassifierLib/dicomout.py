"""DICOM out from the classifier panel, without Qt: which DICOM series a T1 volume node was loaded from, and
what the engine request then carries (``--t1 <that series> --t1-series UID --dicom-out DIR``).

Slicer's DICOM module records a loaded series in two places (``DICOMLib/DICOMPlugin.py``
``addSeriesInSubjectHierarchy`` and ``DICOMScalarVolumePlugin``): the subject-hierarchy series item carries
the SeriesInstanceUID as its ``DICOM`` UID and the space-separated SOPInstanceUIDs as its
``DICOMInstanceUID`` UID, and the volume node has the same SOPInstanceUIDs in its ``DICOM.instanceUIDs``
attribute. The files come from the DICOM database (``slicer.dicomDatabase.fileForInstance(uid)``).

The engine's SEG lies on the source series' frames, so the engine reads T1 from those files (copied, or
hard-linked, into the case's temporary folder: only this series, whatever else the database folder holds).
A T1 node that no longer has the series' geometry (cropped, resampled, a hardened transform) is refused.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import slicer
import vtk

from ipmn.errors import IPMNError

INSTANCE_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"
STAGED_FOLDER = "t1-dicom"
POSITION_TOLERANCE_MM = 0.05


@dataclass(frozen=True)
class DicomSource:
    """The DICOM series a volume node was loaded from."""

    seriesUID: str  # "" when the subject hierarchy does not say (the staged folder holds one series anyway)
    files: tuple[Path, ...]


def _shItem(volumeNode):
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(volumeNode.GetScene())
    if sh is None:
        return None, 0
    return sh, sh.GetItemByDataNode(volumeNode)


def instanceUIDs(volumeNode) -> list[str]:
    """SOPInstanceUIDs of the series the node was loaded from (empty: not loaded from DICOM)."""
    text = ""
    sh, item = _shItem(volumeNode)
    if item:
        text = sh.GetItemUID(item, slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMInstanceUIDName()) or ""
    text = text or volumeNode.GetAttribute(INSTANCE_UIDS_ATTRIBUTE) or ""
    return [uid for uid in text.split() if uid and uid != "Unknown"]


def seriesUID(volumeNode) -> str:
    sh, item = _shItem(volumeNode)
    if not item:
        return ""
    return sh.GetItemUID(item, slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMUIDName()) or ""


def _databaseLookup():
    database = getattr(slicer, "dicomDatabase", None)
    if database is None or not getattr(database, "isOpen", False):
        return None
    return database.fileForInstance


def dicomSource(volumeNode, fileForInstance=None) -> DicomSource:
    """The node's DICOM series with its files; IPMNError saying why not (the panel's tooltip)."""
    if volumeNode is None:
        raise IPMNError("select the T1 volume first")
    uids = instanceUIDs(volumeNode)
    if not uids:
        raise IPMNError(f"'{volumeNode.GetName()}' was not loaded from DICOM (load T1 with the DICOM browser): "
                        "the SEG and SR must reference the T1 series")
    lookup = fileForInstance or _databaseLookup()
    if lookup is None:
        raise IPMNError("the DICOM database is not open: open it in the DICOM module")
    files = []
    for uid in uids:
        path = lookup(uid) or ""
        if not path or not Path(path).is_file():
            raise IPMNError(f"the DICOM database no longer holds the file of an image of '{volumeNode.GetName()}' "
                            "(re-import the series)")
        files.append(Path(path))
    source = DicomSource(seriesUID(volumeNode), tuple(files))
    _checkGeometry(volumeNode, source)
    return source


def unavailableReason(volumeNode, fileForInstance=None) -> str:
    """Why DICOM out cannot be used with this T1 node ('' when it can)."""
    try:
        dicomSource(volumeNode, fileForInstance)
    except IPMNError as exc:
        return str(exc)
    return ""


def _checkGeometry(volumeNode, source: DicomSource) -> None:
    """The node still has the series' grid: one slice per file, rows x columns, an origin on a source image."""
    import pydicom

    def header(path):
        try:
            return pydicom.dcmread(str(path), stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file: the series cannot be referenced
            raise IPMNError(f"cannot read the DICOM file {Path(path).name} of '{name}': {type(exc).__name__}") from exc

    name = volumeNode.GetName()
    image = volumeNode.GetImageData()
    dims = image.GetDimensions() if image is not None else (0, 0, 0)
    first = header(source.files[0])
    if dims[2] != len(source.files) or (dims[1], dims[0]) != (int(first.Rows), int(first.Columns)):
        raise IPMNError(f"'{name}' ({dims[0]}x{dims[1]}x{dims[2]}) is no longer its DICOM series' grid "
                        f"({int(first.Columns)}x{int(first.Rows)}x{len(source.files)}): was it cropped or resampled?")
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    origin = np.array([matrix.GetElement(i, 3) for i in range(3)]) * np.array([-1.0, -1.0, 1.0])  # RAS -> LPS
    positions = [np.array([float(v) for v in ds.ImagePositionPatient]) for ds in (first, header(source.files[-1]))]
    if min(np.linalg.norm(origin - p) for p in positions) > POSITION_TOLERANCE_MM:
        raise IPMNError(f"'{name}' was moved from where its DICOM series lies (a hardened transform?): "
                        "DICOM out references the original images")


def stageSeries(source: DicomSource, workDir) -> Path:
    """The series' files in ``workDir/t1-dicom`` (hard links where possible, else copies)."""
    folder = Path(workDir) / STAGED_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for index, path in enumerate(source.files):
        target = folder / f"{index:05d}.dcm"
        try:
            os.link(path, target)
        except OSError:
            shutil.copyfile(path, target)
    return folder


def outputFolder(root, volumeNode) -> Path:
    """Where the SEG and SR of this T1 go: a folder per T1 volume under the chosen folder."""
    import re

    name = re.sub(r"[^A-Za-z0-9_-]+", "_", volumeNode.GetName()).strip("_") or "T1"
    return Path(root) / name[:60]
