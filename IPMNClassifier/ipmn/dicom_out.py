"""Results as DICOM, where hospitals keep them: a Segmentation of the attention levels and a Structured Report.

``ipmn predict --dicom-out DIR`` (T1 given as a DICOM series folder) writes

* ``attention_seg.dcm``: a binary DICOM Segmentation (SEG) on the T1 series' frames with one segment per
  attention level; segment *n* holds every voxel in the top ``levels[n]`` % (the segments nest: the top
  5 % lie inside the top 10 %), coded as a spatial concept in the pancreas, made by the model (AUTOMATIC);
* ``grade_sr.dcm``: a Comprehensive SR with a TID 1500 Measurement Report: one volumetric-ROI group that
  references the SEG's widest segment and the T1 series, holding the grade (coded), the class
  probabilities and the normalised entropy, and the model's name and version as algorithm identification.

highdicom builds and checks both instances (with pydicom 3, or Slicer 5.10's pydicom 2: see
:mod:`ipmn.dicom_compat`). The patient and study modules come from the source series (as DICOM
requires); every instance, series and the SEG's frame of content get new UIDs; nothing else of the source
is copied. Codes not in DICOM's or SNOMED's vocabularies use the private scheme ``99IPMN``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ipmn.dicom_compat import compatibility_problem, import_highdicom, installed_version, save_dataset
from ipmn.errors import IPMNError

SCHEME = "99IPMN"
SEG_FILE = "attention_seg.dcm"
SR_FILE = "grade_sr.dcm"
MANUFACTURER = "IPMN open-source project"


def check_dicom_out(t1, modalities) -> None:
    """Refuse ``--dicom-out`` before any work when T1 is not a DICOM series the model reads."""
    if not t1 or not Path(t1).is_dir():
        raise IPMNError("--dicom-out needs --t1 to be a DICOM series folder (the SEG and SR reference its images)")
    if "t1" not in modalities:
        raise IPMNError("--dicom-out needs a model that reads T1 (the SEG lies on the T1 series' frames)")
    problem = compatibility_problem(installed_version("pydicom"), installed_version("highdicom"))
    if problem:
        raise IPMNError(problem)


def _code(value: str, meaning: str):
    from pydicom.sr.coding import Code

    return Code(value, SCHEME, meaning)


def _read_source(t1_folder, series_uid: str | None) -> list:
    import pydicom

    from ipmn.dicom_series import choose_series

    series = choose_series(t1_folder, "T1", series_uid)
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in series.files]  # headers are enough


def _algorithm(result: dict) -> tuple[str, str]:
    from ipmn import __version__

    model = result["model"]
    return str(model.get("name") or "IPMN model"), f"{model.get('id') or 'unversioned'} (ipmn {__version__})"


def build_seg(sources: list, labels: sitk.Image, result: dict, levels):
    """A binary SEG on the source frames: segment n = voxels with attention label >= n (nested levels)."""
    from pydicom.sr.codedict import codes

    hd = import_highdicom()

    array = sitk.GetArrayFromImage(labels)  # (slices, rows, cols), slice order = source file order
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    if array.shape != (len(sources), rows, cols):
        raise IPMNError(
            f"--dicom-out: the attention map {array.shape} does not lie on the T1 series' "
            f"{len(sources)} frames of {rows}x{cols}"
        )
    ordered = sorted(levels, reverse=True)  # attention_labels: label i+1 = inside the top ordered[i] %
    masks = np.stack([array >= i + 1 for i in range(len(ordered))], axis=-1)
    name, version = _algorithm(result)
    algorithm = hd.AlgorithmIdentificationSequence(name=name, family=codes.cid7162.ArtificialIntelligence,
                                                   version=version)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=f"top {lv:g}% attention",
            segmented_property_category=codes.SCT.SpatialAndRelationalConcept,
            segmented_property_type=_code(f"ATTN{lv:g}", f"Top {lv:g} % of model attention"),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            anatomic_regions=[codes.SCT.Pancreas],
            tracking_uid=hd.UID(),
            tracking_id=f"IPMN attention top {lv:g}%",
        )
        for i, lv in enumerate(ordered)
    ]
    from ipmn import __version__

    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=9901,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name="ipmn",
        software_versions=str(__version__),
        device_serial_number="none",
        series_description="IPMN attention levels",
        content_label="ATTENTION",
        content_description="Most-attended voxels of the IPMN grading model",
        omit_empty_frames=False,  # one frame per source image: the geometry is the series' own
    )


def build_sr(sources: list, seg, result: dict):
    """A Comprehensive SR (TID 1500) with grade, probabilities, uncertainty and the model's identity."""
    from pydicom.sr.codedict import codes

    hd = import_highdicom()

    from ipmn import __version__

    name, version = _algorithm(result)
    algorithm = hd.sr.AlgorithmIdentification(name=name, version=version)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=name, manufacturer_name=MANUFACTURER, model_name="ipmn"),
    )
    measurements = [
        hd.sr.Measurement(name=_code(f"P-{cls.upper()}", f"Probability of {cls}"),
                          value=float(result["probabilities"][cls]), unit=codes.UCUM.NoUnits,
                          algorithm_id=algorithm)
        for cls in result["classes"]
    ]
    measurements.append(hd.sr.Measurement(
        name=_code("ENTROPY", "Normalised predictive entropy"), value=float(result["uncertainty"]["entropy"]),
        unit=codes.UCUM.NoUnits, algorithm_id=algorithm))
    grade = result["predicted_class"]
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="IPMN grade"),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=1,
            source_series=hd.sr.SourceSeriesForSegmentation(sources[0].SeriesInstanceUID)),
        finding_type=_code("IPMN-RISK", "IPMN risk of malignancy"),
        finding_sites=[hd.sr.FindingSite(codes.SCT.Pancreas)],
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(
            name=_code("GRADE", "IPMN risk grade"), value=_code(f"GRADE-{grade.upper()}", grade))],
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_code("IPMN-GRADING", "IPMN risk grading on MRI"),
        imaging_measurements=[group],
    )
    return hd.sr.ComprehensiveSR(
        evidence=[*sources, seg],
        content=report[0],
        series_instance_uid=hd.UID(),
        series_number=9902,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        series_description="IPMN grade",
        is_complete=True,
        is_final=False,
        is_verified=False,
        software_versions=str(__version__),
    )


def write_dicom_outputs(folder, t1_folder, series_uid, labels: sitk.Image, result: dict, levels) -> dict:
    """Write the SEG and the SR into ``folder`` (atomically, file by file); returns their file names."""
    from ipmn.io import atomic_path

    sources = _read_source(t1_folder, series_uid)
    seg = build_seg(sources, labels, result, levels)
    sr = build_sr(sources, seg, result)
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for dataset, name in ((seg, SEG_FILE), (sr, SR_FILE)):
            with atomic_path(folder / name) as tmp:
                save_dataset(dataset, tmp)
    except OSError as exc:
        raise IPMNError(f"--dicom-out: cannot write {folder}: {exc.strerror or exc}") from exc
    return {"folder": str(folder), "seg": SEG_FILE, "sr": SR_FILE}
