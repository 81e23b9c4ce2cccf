"""What a slice view shows, composed by Slicer's own ``vtkMRMLSliceLogic`` (no Qt, no OpenGL).

:func:`resultLayers` is the module's choice of layers for a result (T1 grey background, the attention map as
the foreground with the module's colour map, threshold and opacity, the attention levels as the label
layer); the widget passes it to ``slicer.util.setSliceViewerLayers`` and :class:`SliceComposer` to a slice
logic of its own, which is how the screenshots (``Resources/scripts/make_screenshots.py``) and the tests see
exactly what a Slicer slice view would blend. Works with slicer-core (needs the colour logic on the scene).
"""

from __future__ import annotations

import numpy as np
import slicer
import vtk

GREY_COLOR_ID = "vtkMRMLColorTableNodeGrey"


def resultLayers(t1, heatmap, labels, opacity: float, showLabels: bool, hiddenLabel=None) -> dict:
    """Keyword arguments for ``slicer.util.setSliceViewerLayers`` showing one result (``hiddenLabel``:
    what the label layer gets when the attention levels are not shown, e.g. "keep-current")."""
    return {"background": t1, "foreground": heatmap, "foregroundOpacity": float(opacity),
            "label": labels if showLabels else hiddenLabel}


class SliceComposer:
    """One off-screen slice view (slice node + composite node + slice logic) in ``scene``."""

    def __init__(self, scene, orientation: str = "Axial", size=(512, 512), name: str | None = None):
        self.scene = scene
        if not _hasPresets(scene):
            slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
        layout = name or f"IPMN{orientation}"
        self.sliceNode = scene.CreateNodeByClass("vtkMRMLSliceNode")  # with the scene's default presets
        self.sliceNode.SetName(layout)
        self.sliceNode.SetLayoutName(layout)
        scene.AddNode(self.sliceNode)
        self.sliceNode.SetOrientation(orientation)
        self.sliceNode.SetDimensions(int(size[0]), int(size[1]), 1)
        self.compositeNode = scene.CreateNodeByClass("vtkMRMLSliceCompositeNode")
        self.compositeNode.SetLayoutName(layout)
        scene.AddNode(self.compositeNode)
        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLScene(scene)
        self.logic.SetSliceNode(self.sliceNode)

    def show(self, background=None, foreground=None, foregroundOpacity: float = 0.0, label=None,
             labelOpacity: float = 1.0) -> None:
        """Set the layers as ``slicer.util.setSliceViewerLayers`` does for a view."""
        if background is not None and background.GetDisplayNode() is not None \
                and not background.GetDisplayNode().GetColorNodeID():
            background.GetDisplayNode().SetAndObserveColorNodeID(GREY_COLOR_ID)
        c = self.compositeNode
        c.SetBackgroundVolumeID(background.GetID() if background is not None else None)
        c.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
        c.SetForegroundOpacity(float(foregroundOpacity))
        c.SetLabelVolumeID(label.GetID() if label is not None else None)
        c.SetLabelOpacity(float(labelOpacity))

    def showResult(self, t1, heatmap, labels, opacity: float, showLabels: bool) -> None:
        self.show(**_composerArgs(resultLayers(t1, heatmap, labels, opacity, showLabels)))

    def through(self, ras) -> None:
        """Fit the view to the background and move the slice plane through the world point ``ras``."""
        self.logic.FitSliceToAll()
        self.sliceNode.JumpSliceByOffsetting(*[float(v) for v in ras])

    def rgba(self) -> np.ndarray:
        """The composed view as a (rows, columns, 4) uint8 array, row 0 at the bottom (VTK's order)."""
        blend = self.logic.GetBlend()
        blend.Update()
        image = blend.GetOutput()
        from vtk.util.numpy_support import vtk_to_numpy

        width, height, _ = image.GetDimensions()
        return vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1).copy()

    def pixelOf(self, ras) -> tuple:
        """(column, row) of a world point in :meth:`rgba` (row 0 at the bottom), and its distance to the plane."""
        xyToRas = vtk.vtkMatrix4x4()
        xyToRas.DeepCopy(self.sliceNode.GetXYToRAS())
        xyToRas.Invert()
        x, y, z, _ = xyToRas.MultiplyPoint([float(v) for v in ras] + [1.0])
        return x, y, z

    def writePng(self, path) -> None:
        """The composed view as an RGB PNG (top row first, as on screen; no alpha: outside the volume is
        black, as in a slice view)."""
        blend = self.logic.GetBlend()
        blend.Update()
        rgb = vtk.vtkImageExtractComponents()
        rgb.SetInputConnection(blend.GetOutputPort())
        rgb.SetComponents(0, 1, 2)
        writer = vtk.vtkPNGWriter()
        writer.SetFileName(str(path))
        writer.SetInputConnection(rgb.GetOutputPort())
        writer.Write()


def _hasPresets(scene) -> bool:
    """Whether the scene's default slice node has the Axial/Sagittal/Coronal presets."""
    defaults = scene.GetDefaultNodeByClass("vtkMRMLSliceNode")
    return bool(defaults is not None and defaults.GetNumberOfSliceOrientationPresets() > 0)


def _composerArgs(layers: dict) -> dict:
    return {"background": layers["background"], "foreground": layers["foreground"],
            "foregroundOpacity": layers["foregroundOpacity"], "label": layers["label"]}


def sceneWithLogics():
    """A real MRML scene with the application, colour and volumes logics wired as Slicer sets them up
    (what slice compositing needs without the application: scripts and slicer-core tests).
    Returns ``(scene, volumesLogic)``; the logics are kept alive on the scene."""
    scene = slicer.vtkMRMLScene()
    appLogic = slicer.vtkSlicerApplicationLogic()
    appLogic.SetMRMLScene(scene)
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLApplicationLogic(appLogic)
    colors.SetMRMLScene(scene)
    appLogic.SetModuleLogic("Colors", colors)
    volumes = slicer.vtkSlicerVolumesLogic()
    volumes.SetMRMLApplicationLogic(appLogic)
    volumes.SetMRMLScene(scene)
    scene._ipmn_logics = (appLogic, colors, volumes)
    return scene, volumes
