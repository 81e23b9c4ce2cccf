"""Markups ROIs for the classifier: created around a point, or from a segment's bounding box, and the
geometry helpers (node matrices, parent transforms, slice counts) the module's logic shares.

:class:`RoiTools` is a part of :class:`IPMNClassifierLib.logic.ClassifierLogic` (a mixin: the methods are
the logic's, this file only keeps them apart from the engine plumbing and the result loading).
"""

from __future__ import annotations

import math

import numpy as np
import slicer
import vtk

from ipmn.errors import IPMNError
from ipmn.segments import pick_segment

DEFAULT_ROI_SIZE_MM = (100.0, 70.0, 60.0)  # R-L, A-P, S-I: a pancreas with some margin, >= 9 slices of 6 mm
SEGMENT_ATTRIBUTE = "IPMN.segment"  # on an ROI made from a segment: that segment's name
_TERMINOLOGY_FIELDS = ("contextName", "category", "type", "typeModifier", "anatomicContextName", "anatomicRegion",
                       "anatomicRegionModifier")


def _terminology(segment) -> dict:
    """A segment's terminology entry (Slicer's ``TerminologyEntry`` tag, ``~``-separated, codes as
    ``scheme^value^meaning``) in slicerio's layout: {"type": [scheme, value, meaning], ...}."""
    text = ""
    if hasattr(segment, "GetTerminology"):  # Slicer >= 5.8
        text = segment.GetTerminology() or ""
    if not text:
        tag = vtk.reference("") if hasattr(vtk, "reference") else None
        if tag is not None and segment.GetTag("TerminologyEntry", tag):
            text = str(tag)
    entry = {}
    for key, field in zip(_TERMINOLOGY_FIELDS, text.split("~"), strict=False):
        parts = field.split("^")
        if key.endswith("Name"):
            entry[key] = field
        elif len(parts) == 3 and any(parts):
            entry[key] = parts
    return entry


def segmentRecords(segmentationNode) -> list[dict]:
    """The node's segments as the engine describes a ``.seg.nrrd``'s (id, name, terminology)."""
    segmentation = segmentationNode.GetSegmentation()
    records = []
    for i in range(segmentation.GetNumberOfSegments()):
        segmentID = segmentation.GetNthSegmentID(i)
        segment = segmentation.GetSegment(segmentID)
        records.append({"id": segmentID, "name": segment.GetName() or segmentID, "terminology": _terminology(segment)})
    return records


def _matrix(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])


def _copyGeometryExactly(node, reference) -> None:
    """Give ``node`` exactly the reference's origin, spacing and axis directions.

    NIfTI stores the geometry in single precision, and volume nodes ignore direction changes below a
    tolerance: set clearly different directions first, so that the copy below is never skipped.
    """
    directions = _directions(reference)
    placeholder = -np.eye(3) if np.abs(directions - np.eye(3)).max() < 1e-3 else np.eye(3)
    node.SetIJKToRASDirections(*[float(v) for v in placeholder.ravel()])
    node.CopyOrientation(reference)


def _directions(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASDirectionMatrix(m)
    return np.array([[m.GetElement(i, j) for j in range(3)] for i in range(3)])


def _transformID(node) -> str:
    return (node.GetTransformNodeID() or "") if node is not None else ""


def _transformPoints(points, fromNode, toNode) -> np.ndarray:
    """RAS points from the coordinates under ``fromNode`` into those under ``toNode`` (None = world)."""
    points = np.asarray(points, dtype=float)
    if fromNode is None and toNode is None:
        return points
    transform = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(fromNode, toNode, transform)
    return np.array([transform.TransformPoint(*p) for p in points])


def _boxesOverlap(a, b) -> bool:
    return all(a[2 * i] <= b[2 * i + 1] and b[2 * i] <= a[2 * i + 1] for i in range(3))


def roiSliceCount(roiNode, volumeNode) -> tuple[int, float, float]:
    """How many slices the engine's ROI grid gets: (count, ROI S-I extent mm, slice spacing mm).

    Same rule as the engine: the ROI axis closest to Superior, the volume's voxel axis closest to it,
    ``floor(extent / spacing)``. Both nodes are taken in their own (node) coordinates.
    """
    toNode = roiNode.GetObjectToNodeMatrix()
    axes = np.array([[toNode.GetElement(i, j) for j in range(3)] for i in range(3)])
    size = np.array(roiNode.GetSize(), dtype=float)
    a = int(np.argmax(np.abs(axes[2, :])))
    direction = axes[:, a] / (np.linalg.norm(axes[:, a]) or 1.0)
    ijkToRas = _matrix(volumeNode)[:3, :3]
    spacing = np.linalg.norm(ijkToRas, axis=0)
    unit = ijkToRas / np.where(spacing > 0, spacing, 1.0)
    b = int(np.argmax(np.abs(unit.T @ direction)))
    dz = float(spacing[b]) or 1.0
    return max(0, int(math.floor(size[a] / dz + 1e-6))), float(size[a]), dz


class RoiTools:
    """ROI creation for :class:`~IPMNClassifierLib.logic.ClassifierLogic` (uses its ``scene``)."""

    def createRoi(self, center=None, size=None, referenceVolume=None, name: str = "IPMN ROI", roiNode=None):
        """A box of pancreas size (default 100 x 70 x 60 mm) centred at ``center`` (world RAS).

        Without a centre the box is centred on the reference volume. The ROI goes under the reference's
        parent transform so that it stays in the volume's space.
        """
        size = tuple(float(s) for s in (size or DEFAULT_ROI_SIZE_MM))
        if min(size) <= 0:
            raise IPMNError("the ROI size must be positive")
        transformNode = referenceVolume.GetParentTransformNode() if referenceVolume is not None else None
        if center is None:
            if referenceVolume is None:
                raise IPMNError("select a T1 volume (or give a centre) to create the ROI")
            bounds = [0.0] * 6
            referenceVolume.GetRASBounds(bounds)
            center = [(bounds[2 * i] + bounds[2 * i + 1]) / 2.0 for i in range(3)]
        local = _transformPoints([center], None, transformNode)[0]
        roi = roiNode or self.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", self.scene.GenerateUniqueName(name))
        roi.SetAndObserveTransformNodeID(transformNode.GetID() if transformNode is not None else None)
        roi.SetAndObserveObjectToNodeMatrix(vtk.vtkMatrix4x4())  # a reused ROI loses its rotation, like a new one
        roi.SetCenter(*[float(v) for v in local])
        roi.SetSize(*size)
        roi.CreateDefaultDisplayNodes()
        return roi

    def segmentBoundsRAS(self, segmentationNode, segmentID: str) -> np.ndarray:
        """World RAS axis-aligned bounds (6 numbers) of a segment's voxels (voxel edges included)."""
        if segmentationNode is None or not segmentID:
            raise IPMNError("select a segmentation and a segment (e.g. the pancreas)")
        segment = segmentationNode.GetSegmentation().GetSegment(segmentID)
        if segment is None:
            raise IPMNError(f"segment {segmentID} not found in '{segmentationNode.GetName()}'")
        image = slicer.vtkOrientedImageData()
        ok = slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
            segmentationNode, segmentID, image)
        if not ok or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
            raise IPMNError(f"cannot get a labelmap of segment '{segment.GetName()}'")
        from vtk.util.numpy_support import vtk_to_numpy

        dims = image.GetDimensions()
        voxels = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
        # Segments share labelmap layers: keep only this segment's label value.
        nonzero = np.argwhere(voxels == segment.GetLabelValue())
        if nonzero.size == 0:
            raise IPMNError(f"segment '{segment.GetName()}' is empty")
        extent = image.GetExtent()
        lo = nonzero.min(axis=0)[::-1] + np.array(extent[0::2]) - 0.5
        hi = nonzero.max(axis=0)[::-1] + np.array(extent[0::2]) + 0.5
        matrix = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(matrix)
        m = np.array([[matrix.GetElement(i, j) for j in range(4)] for i in range(4)])
        corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        # GetSegmentBinaryLabelmapRepresentation applies the segmentation's parent transform already
        # (applyParentTransform=True): the image-to-world matrix gives world RAS, nothing more to apply.
        points = (m @ corners.T).T[:, :3]
        return np.array([points[:, 0].min(), points[:, 0].max(), points[:, 1].min(), points[:, 1].max(),
                         points[:, 2].min(), points[:, 2].max()])

    @staticmethod
    def segmentID(segmentationNode, choice: str) -> str:
        """The ID of the segment ``choice`` names: its ID, or (the engine's ``--mask-segment`` rule) its name
        (any case), terminology meaning or code (``Pancreas``, ``SCT^15776009``); IPMNError listing them."""
        if segmentationNode is None or not choice:
            raise IPMNError("select a segmentation and a segment (e.g. the pancreas)")
        if segmentationNode.GetSegmentation().GetSegment(choice) is not None:
            return choice
        where = f"'{segmentationNode.GetName()}'"
        return pick_segment(segmentRecords(segmentationNode), choice, where)["id"]

    @staticmethod
    def pancreasSegmentID(segmentationNode) -> str:
        """The segment to offer for 'ROI from segmentation': the pancreas by the engine's rule (name or
        terminology), else one whose name contains pancreas (not the duct), else the first ('' when none)."""
        if segmentationNode is None:
            return ""
        records = segmentRecords(segmentationNode)
        try:
            return pick_segment(records, "pancreas", "")["id"]
        except IPMNError:
            pass
        match = next((r["id"] for r in records if "pancreas" in r["name"].lower() and "duct" not in r["name"].lower()),
                     None)
        return match or (records[0]["id"] if records else "")

    def roiFromSegment(self, segmentationNode, segment: str, marginMm: float = 10.0, roiNode=None,
                       referenceVolume=None, name: str = "IPMN ROI"):
        """An ROI = the segment's bounding box plus ``marginMm`` on every side (axis-aligned in RAS).

        ``segment``: its ID, name or terminology (:meth:`segmentID`); the ROI records the segment's name.
        """
        segmentID = self.segmentID(segmentationNode, segment)
        bounds = self.segmentBoundsRAS(segmentationNode, segmentID)
        center = [(bounds[2 * i] + bounds[2 * i + 1]) / 2.0 for i in range(3)]
        size = [bounds[2 * i + 1] - bounds[2 * i] + 2.0 * float(marginMm) for i in range(3)]
        transformNode = referenceVolume.GetParentTransformNode() if referenceVolume is not None else None
        if transformNode is not None:
            # Box corners into the reference's space, then their bounds there.
            corners = np.array([[x, y, z] for x in bounds[0:2] for y in bounds[2:4] for z in bounds[4:6]])
            local = _transformPoints(corners, None, transformNode)
            lo, hi = local.min(axis=0), local.max(axis=0)
            center = _transformPoints([(lo + hi) / 2.0], transformNode, None)[0]
            size = list(hi - lo + 2.0 * float(marginMm))
        roi = self.createRoi(center=center, size=size, referenceVolume=referenceVolume, name=name, roiNode=roiNode)
        roi.SetAttribute(SEGMENT_ATTRIBUTE, segmentationNode.GetSegmentation().GetSegment(segmentID).GetName())
        return roi

