"""Render the sample case's result as Slicer's slice views compose it: `make screenshots`.

The bundled phantom case (Resources/SampleData) goes through the Slicer module's logic (ClassifierLogic:
inputs written, the real engine `python -m ipmn predict` with the demo model on all windows, outputs read
back with their display settings), then Slicer's own slice compositing (vtkMRMLSliceLogic from slicer-core)
blends T1 (grey) + attention map (foreground, the module's colour map / threshold / opacity 0.5) + attention
levels (label layer) into Resources/Screenshots/slice-*.png. No Slicer application, Qt or OpenGL needed.

slicer-core ships no colour files, so Inferno (the module's first choice, a file-based table in Slicer) is
rebuilt here from matplotlib's table, from which Slicer's Inferno.txt was made.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "IPMNClassifier")]

import slicer  # noqa: E402
import vtk  # noqa: E402

from IPMNClassifierLib.engine import EngineLauncher  # noqa: E402
from IPMNClassifierLib.logic import ClassifierLogic, PredictOptions  # noqa: E402
from IPMNClassifierLib.slicecompose import SliceComposer, sceneWithLogics  # noqa: E402

SIZE = (480, 480)


def scene_with_logics():
    scene, volumes = sceneWithLogics()
    slicer.mrmlScene = scene
    return scene, volumes, scene._ipmn_logics


def inferno(scene):
    from matplotlib import colormaps

    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "Inferno")
    table.SetTypeToUser()
    table.SetNumberOfColors(256)
    for i, (r, g, b, _a) in enumerate(colormaps["inferno"](np.linspace(0.0, 1.0, 256))):
        table.SetColor(i, f"{i}", float(r), float(g), float(b), 1.0)
    return table


def main(out=REPO / "Resources" / "Screenshots"):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sample = REPO / "Resources" / "SampleData"
    scene, volumes, _keep = scene_with_logics()
    t1 = volumes.AddArchetypeVolume(str(sample / "sample_t1.nii.gz"), "IPMN phantom T1", 0)
    t2 = volumes.AddArchetypeVolume(str(sample / "sample_t2.nii.gz"), "IPMN phantom T2", 0)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "IPMN phantom ROI")
    storage = slicer.vtkMRMLMarkupsROIJsonStorageNode()
    storage.SetFileName(str(sample / "sample_roi.mrk.json"))
    if not storage.ReadData(roi):
        raise SystemExit("cannot read the sample ROI")
    logic = ClassifierLogic(launcher=EngineLauncher(python=sys.executable, module_dir=REPO / "IPMNClassifier"),
                            moduleDir=REPO / "IPMNClassifier")
    model = next(m for m in logic.listModels(includeInvalid=False) if m.source == "bundled")
    result = logic.process(t1, t2, roi, model, PredictOptions(device="cpu", windows="all"), timeout=900)
    print(result.summary())
    if scene.GetNodeByID("vtkMRMLColorTableNodeFileInferno.txt") is None:
        result.heatmapNode.GetDisplayNode().SetAndObserveColorNodeID(inferno(scene).GetID())

    # the slices through the centre of the top-5 % attention region
    levels = slicer.util.arrayFromVolume(result.labelNode)
    k, j, i = np.argwhere(levels == levels.max()).mean(axis=0)
    matrix = vtk.vtkMatrix4x4()
    t1.GetIJKToRASMatrix(matrix)
    focus = matrix.MultiplyPoint([float(i), float(j), float(k), 1.0])[:3]
    written = []
    for orientation, showLabels in (("Axial", False), ("Coronal", False), ("Axial", True)):
        composer = SliceComposer(scene, orientation, size=SIZE, name=f"IPMN{orientation}{int(showLabels)}")
        composer.showResult(t1, result.heatmapNode, result.labelNode, opacity=0.5, showLabels=showLabels)
        composer.through(focus)
        path = out / f"slice-{orientation.lower()}{'-levels' if showLabels else ''}.png"
        composer.writePng(path)
        written.append(path)
    print("wrote", ", ".join(str(p.relative_to(REPO)) for p in written))


if __name__ == "__main__":
    main(*sys.argv[1:])
