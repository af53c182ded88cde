"""NWireCalibrationLib: fully automatic N-wire probe calibration (Slicer-free).

Liu et al., "A Novel Shape-Prior-Guided Automatic Calibration Method for Free-Hand
Three-Dimensional Ultrasonography", Sensors 2025, 25(16):5104, with PLUS-compatible parts.

Modules (import what you need; nothing heavy is imported here):

- :mod:`.phantom` -- N-wire phantom model, PLUS ``<PhantomDefinition>`` import, JSON library
- :mod:`.detect_hessian` -- the paper's detector (top-hat, scale-space Hessian, N-wire prior)
- :mod:`.detect_baselines` -- AGC-FD, TACD and PLUS-style detectors
- :mod:`.labeling` -- N-wire geometric filtering, PLUS wire order
- :mod:`.sequence_labeling` -- the sequence stage: frames recovered from neighbours and tracked motion,
  labels that jump refused
- :mod:`.plane_refinement` -- each frame's dots replaced by ONE fitted image plane's crossings with the wires
- :mod:`.correspondences` -- 3D positions of the dots (alpha, plane intersections)
- :mod:`.solvers` -- PLUS linear least squares, Levenberg-Marquardt, RANSAC + LM
- :mod:`.metrics` -- PLUS 3D/2D errors, detection rates, CRE
- :mod:`.keyframes` -- keyframe selection and live calibration until convergence
- :mod:`.simulate` -- simulated tracked N-wire recordings with known truth
- :mod:`.results` -- result dataclasses, PLUS ``<Transform>`` element
- :mod:`.pipeline` -- ``load_setup``, ``detect_sequence``, ``calibrate`` (what the CLI/Logic call)
- :mod:`.cli` -- ``freehandus detect | calibrate | simulate nwire``
"""

__all__: list[str] = []
