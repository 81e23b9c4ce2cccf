"""Test data: a .seg.nrrd holding liver, the pancreas (from a phantom's mask) and spleen, with SNOMED terminology.

The liver block overlaps the pancreas, so slicerio stores the segments in two layers (the multi-layer case).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk


def terminology(code: str, meaning: str) -> str:
    return (f"Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
            f"~SCT^{code}^{meaning}~^^~~^^~^^")


def write_organs(path: Path, mask: sitk.Image, pancreas_name: str = "pancreas") -> dict:
    """Write the three segments on ``mask``'s voxel grid (pancreas = its non-zero voxels); slicerio's dict."""
    import slicerio
    from slicerio.segmentation import terminology_entry_from_string

    pancreas = sitk.GetArrayFromImage(mask).transpose(2, 1, 0) > 0  # (i, j, k)
    liver, spleen = np.zeros_like(pancreas), np.zeros_like(pancreas)
    liver[5:40, 10:60, 2:25] = True
    spleen[60:90, 50:80, 5:28] = True
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = np.array(mask.GetDirection()).reshape(3, 3) * np.array(mask.GetSpacing())
    ijk_to_lps[:3, 3] = mask.GetOrigin()
    seg = slicerio.create_segmentation(pancreas.shape, ijk_to_lps)
    for name, voxels, term in (("liver", liver, terminology("10200004", "Liver")),
                               (pancreas_name, pancreas, terminology("15776009", "Pancreas")),
                               ("spleen", spleen, terminology("78961009", "Spleen"))):
        slicerio.add_segment(seg, voxels, {"name": name, "terminology": terminology_entry_from_string(term)})
    slicerio.write_segmentation(str(path), seg)
    return seg
