"""What both module panels (IPMN Classifier, IPMN Trainer) do the same way: bind the parameter node to the
GUI, and show status and log text. The widgets stay template-shaped and call these.

Needs the Slicer application's Python (vtk); no Qt import here (the ``ui`` objects come from the widget).
"""

from __future__ import annotations

import logging

import vtk

ERROR_STYLE = "<span style='color:#c62828'>{}</span>"


def bindParameterNode(widget, node, onModified) -> None:
    """Connect ``node`` (or ``None``) to ``widget.ui`` and call ``onModified`` whenever it changes; the
    previously bound node is disconnected first (the ``setParameterNode`` of Slicer's module template)."""
    unbindParameterNode(widget, onModified)
    widget._parameterNode = node
    if node:
        widget._parameterNodeGuiTag = node.connectGui(widget.ui)
        widget.addObserver(node, vtk.vtkCommand.ModifiedEvent, onModified)
        onModified()


def unbindParameterNode(widget, onModified) -> None:
    """Disconnect the bound parameter node from the GUI (the template's ``exit``)."""
    if widget._parameterNode:
        widget._parameterNode.disconnectGui(widget._parameterNodeGuiTag)
        widget._parameterNodeGuiTag = None
        widget.removeObserver(widget._parameterNode, vtk.vtkCommand.ModifiedEvent, onModified)


def showStatus(ui, module: str, text, error: bool = False) -> None:
    """The panel's status line (red for an error), also written to Slicer's log."""
    text = str(text)
    ui.statusLabel.text = ERROR_STYLE.format(text) if error else text
    (logging.warning if error else logging.info)(f"{module}: {text}")


def appendLog(ui, text) -> None:
    ui.logTextEdit.appendPlainText(str(text))
