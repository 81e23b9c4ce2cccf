"""The bundled phantom case and Slicer's Sample Data module, on every supported Slicer (5.10 and later).

Checked against SampleData.py of Slicer 5.10, 5.12 and main:

* ``SampleData.downloadSample(name)`` returns ONE node (``downloadSamples(name)[0]``, an IndexError when
  nothing loads); ``downloadSamples(name)`` returns the list: use that one.
* ``SampleDataLogic.registerCustomSampleDataCategory`` exists from 5.12 only; on 5.10 the category is the
  plain name given to ``registerCustomSampleDataSource``.

No Qt here: the functions take the SampleData module as an argument so that tests can give a stand-in.
"""

from __future__ import annotations

from pathlib import Path

from IPMNClassifierLib.logic import sampleDataSpec

SAMPLE_NAME = "IPMNPhantom"
CATEGORY = "IPMN"


def registerSampleData(sampleData, moduleDir, title: str = "IPMN") -> bool:
    """Register the phantom case with ``sampleData`` (the SampleData module). False when it is not bundled."""
    spec = sampleDataSpec(Path(moduleDir))
    if spec is None:
        return False
    logic = sampleData.SampleDataLogic
    if hasattr(logic, "registerCustomSampleDataCategory"):  # Slicer >= 5.12: a translatable category title
        logic.registerCustomSampleDataCategory(CATEGORY, title=title)
    logic.registerCustomSampleDataSource(
        category=CATEGORY,
        sampleName=SAMPLE_NAME,
        thumbnailFileName=str(Path(moduleDir) / "Resources" / "Icons" / "IPMNClassifier.png"),
        uris=spec["uris"],
        fileNames=spec["fileNames"],
        nodeNames=spec["nodeNames"],
        checksums=spec["checksums"],
        loadFileTypes=spec["loadFileTypes"],
    )
    return True


def loadSampleNodes(sampleData) -> dict | None:
    """Load the phantom case; {"t1", "t2", "roi", "segmentation"} nodes, or None when it is not available."""
    nodes = sampleData.downloadSamples(SAMPLE_NAME) or []
    return sortSampleNodes(nodes)


def sortSampleNodes(nodes) -> dict | None:
    """The loaded nodes by role (the volumes come in the order T1, T2, as registered)."""
    volumes = [n for n in nodes if n is not None and n.IsA("vtkMRMLScalarVolumeNode")
               and not n.IsA("vtkMRMLLabelMapVolumeNode")]
    rois = [n for n in nodes if n is not None and n.IsA("vtkMRMLMarkupsROINode")]
    segmentations = [n for n in nodes if n is not None and n.IsA("vtkMRMLSegmentationNode")]
    if len(volumes) < 2 or not rois:
        return None
    return {"t1": volumes[0], "t2": volumes[1], "roi": rois[0],
            "segmentation": segmentations[0] if segmentations else None}


def expectedSampleClass(moduleDir) -> str | None:
    """The phantom's true grade (``label`` in sample.json), None when the case is not bundled."""
    import json

    from IPMNClassifierLib.logic import sampleDataFolder

    folder = sampleDataFolder(Path(moduleDir))
    if folder is None or not (folder / "sample.json").is_file():
        return None
    return json.loads((folder / "sample.json").read_text(encoding="utf-8")).get("label")
