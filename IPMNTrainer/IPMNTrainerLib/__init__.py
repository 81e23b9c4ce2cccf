"""Helpers of the IPMNTrainer Slicer module that do not need Qt (``logic``: command building, progress
parsing, learning curves and results as MRML nodes, model registration). Tested with ``slicer-core``."""
