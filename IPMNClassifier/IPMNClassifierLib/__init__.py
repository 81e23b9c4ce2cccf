"""Helpers of the IPMNClassifier Slicer module that do not need Qt.

* ``engine``: starts and talks to the ``ipmn`` engine process (pure Python, no slicer/qt imports);
* ``logic``: the MRML side (inputs to files, outputs back into the scene, ROIs); it runs inside Slicer
  and with ``slicer-core`` (real MRML without the application), which is how it is tested;
* ``dependencies``: checks and installs the Python packages the engine needs (at the point of use).
"""
