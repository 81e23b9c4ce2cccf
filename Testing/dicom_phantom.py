"""Test helper: write a phantom volume as a DICOM MR series (one file per slice) with pydicom.

Written from the DICOM standard's MR Image module directly (not by the code under test), with a
PatientName and PatientID set so that tests can check that no identifier leaks into JSON outputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

PATIENT_NAME = "Doe^Jane^Test"
PATIENT_ID = "PID-4711-SECRET"


def write_dicom_series(image: sitk.Image, folder, description: str, study_uid: str | None = None,
                       series_number: int = 1, prefix: str = "") -> dict:
    """One MR Image Storage file per slice; returns the series' UIDs and file list."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import MRImageStorage, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    array = sitk.GetArrayFromImage(image).astype(np.int16)  # (slices, rows, cols)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing = np.array(image.GetSpacing())
    origin = np.array(image.GetOrigin())
    study_uid = study_uid or generate_uid()
    series_uid, frame_uid = generate_uid(), generate_uid()
    files = []
    for k in range(array.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = PATIENT_NAME, PATIENT_ID, "19600101", "F"
        ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber = study_uid, "S1", "ACC-99"
        ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = "20240101", "120000", "Ref^Doc"
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series_uid, series_number, description
        ds.Modality, ds.Manufacturer = "MR", "Phantom"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "2D"
        ds.ImagePositionPatient = [float(v) for v in origin + k * spacing[2] * direction[:, 2]]
        ds.ImageOrientationPatient = [float(v) for v in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # row spacing, column spacing
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = array.shape[1], array.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray(array[k]).tobytes()
        path = folder / f"{prefix}{k:04d}.dcm"
        try:
            ds.save_as(path, enforce_file_format=True)  # pydicom 3
        except TypeError:  # pydicom 2 (Slicer's): the same file, older keyword
            ds.save_as(path, write_like_original=False)
        files.append(path)
    return {"series_uid": series_uid, "study_uid": study_uid, "files": files}
