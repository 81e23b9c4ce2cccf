"""IPMN: pancreatic cyst (IPMN) risk grading on T1/T2 MRI with a Vision Transformer.

The engine is pure Python (SimpleITK, numpy, torch, timm); it never imports Slicer, Qt or VTK.
Import submodules explicitly (``ipmn.grid``, ``ipmn.models`` ...) so that light commands stay fast.
"""

__version__ = "0.1.0"

from ipmn.vocab import CLASS_NAMES  # noqa: E402,F401 - the package-level name of the three grades
