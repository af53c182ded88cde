"""Choices of the N-wire simulator, importable without OpenCV (the command line builds its parser from them)."""

from __future__ import annotations

__all__ = ["PROBES", "OVERLAYS"]

#: Probe types the simulator renders.
PROBES = ("linear", "convex", "trus")
#: Frame-grabbed screen content the simulator can add (``SimulationSettings.overlays``).
OVERLAYS = ("text", "calipers", "colour-bar", "letterbox")
