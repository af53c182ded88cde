"""FreehandUS's application floor: the ``freehandus`` command line, the demo and its report.

The only package beside the Slicer modules that imports several capabilities (reconstruction
in ``FreehandUSLib.reconstruction``, calibration in ``NWireCalibrationLib``, sensorless tracking
in ``SensorlessTrackingLib``); nothing below imports it. See docs/architecture.md.
"""
