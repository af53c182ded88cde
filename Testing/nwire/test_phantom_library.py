"""The built-in phantom library: every PLUS phantom, its published geometry and the phantom API (issue 23).

The geometry checks work on the raw JSON numbers (not through :class:`NWirePattern`'s own
validation) so that a wrong end point in a file fails here with the wire's name; the spacings
are the ones PLUS's ``<PhantomDefinition>`` elements give (mm).
"""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest

from NWireCalibrationLib.phantom import NWirePhantom, builtin_phantom_names, load_phantom

# name -> (patterns, side-wire spacing per pattern, pattern-plane offsets from the first), mm.
PUBLISHED = {
    "fCal-1.0": (2, [30.0, 30.0], [0.0, 5.0]),
    "fCal-1.2": (3, [25.0, 30.0, 30.0], [0.0, 5.0, 10.0]),
    "fCal-2.0": (3, [30.0, 30.0, 25.0], [0.0, 10.0, 20.0]),
    "fCal-2.0-Aurora": (4, [15.0, 15.0, 15.0, 15.0], [0.0, 5.0, 10.0, 15.0]),
    "fCal-2.1": (3, [30.0, 30.0, 25.0], [0.0, 10.0, 20.0]),
    "fCal-3.0": (3, [30.0, 30.0, 20.0], [0.0, 10.0, 20.0]),
    "fCal-L-1.4": (3, [29.24, 29.24, 20.54], [0.0, 9.73, 19.46]),
    "Lego-3.1": (3, [29.3, 29.3, 20.83], [0.0, 10.26, 20.52]),
    "Lego-3.1-deep": (3, [61.11, 61.11, 51.88], [0.0, 10.26, 20.52]),
    "Lego-3.1-6N": (6, [29.3, 29.3, 20.83, 61.11, 61.11, 51.88], [0.0, 10.26, 20.52, 71.4, 81.66, 91.92]),
    "Lego-3.1-3N-wide": (3, [45.14, 61.65, 69.54], [0.0, 37.5, 72.99]),
    "iCal-1.0": (2, [40.0, 40.0], [0.0, 20.0]),
    "iCal-1.1": (3, [40.0, 40.0, 30.0], [0.0, 20.0, 40.0]),
}


def _raw(name: str) -> dict:
    for entry in resources.files("NWireCalibrationLib").joinpath("phantoms").iterdir():
        if entry.name.endswith(".json"):
            data = json.loads(entry.read_text(encoding="utf-8"))
            if data["name"] == name:
                return data
    raise AssertionError(f"no built-in phantom file named {name!r}")


def _line_gap(p, d, q, e) -> float:
    """Distance between the infinite lines p + s d and q + t e (mm)."""
    n = np.cross(d, e)
    return float(abs((q - p) @ n) / np.linalg.norm(n))


def test_every_plus_phantom_is_in_the_library():
    names = builtin_phantom_names()
    missing = sorted(set(PUBLISHED) - set(names))
    assert not missing, f"missing built-in phantoms: {missing}"
    assert len(names) == len(set(names)), "two phantom files share a name"


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_geometry_of_each_n(name):
    data = _raw(name)
    n_patterns, spacings, offsets = PUBLISHED[name]
    assert data["format"] == "freehandus-nwire-phantom" and data["units"] == "mm"
    assert len(data["patterns"]) == n_patterns
    normals, origins = [], []
    for k, pattern in enumerate(data["patterns"]):
        wires = pattern["wires"]
        assert len(wires) == 3, f"pattern {k + 1}: {len(wires)} wires"
        (f1, b1), (f2, b2), (f3, b3) = [(np.array(w["front"], float), np.array(w["back"], float)) for w in wires]
        d1, d2, d3 = b1 - f1, b2 - f2, b3 - f3
        d1, d3 = d1 / np.linalg.norm(d1), d3 / np.linalg.norm(d3)
        # Side wires parallel (to 3e-3: PLUS's Lego 3.1 has 0.09 mm over 40 mm), the middle one is the diagonal.
        assert np.linalg.norm(np.cross(d1, d3)) < 3e-3, f"{name} pattern {k + 1}: side wires not parallel"
        assert np.linalg.norm(np.cross(d1, d2 / np.linalg.norm(d2))) > 0.05, f"{name} pattern {k + 1}: no diagonal"
        # The middle wire crosses both side wires (extended lines meet).
        assert _line_gap(f1, d1, f2, d2) < 0.02, f"{name} pattern {k + 1}: diagonal misses wire 1"
        assert _line_gap(f3, d3, f2, d2) < 0.02, f"{name} pattern {k + 1}: diagonal misses wire 3"
        spacing = np.linalg.norm(np.cross(f3 - f1, d1))
        assert spacing == pytest.approx(spacings[k], abs=0.02), f"{name} pattern {k + 1}: side spacing"
        normal = np.cross(d1, d2)
        normals.append(normal / np.linalg.norm(normal))
        origins.append(f1)
    n0 = normals[0]
    got = np.abs([(o - origins[0]) @ n0 for o in origins])
    assert np.allclose(got, offsets, atol=0.02), f"{name}: pattern offsets {got}"


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_each_phantom_loads_through_the_api(name, tmp_path):
    ph = load_phantom(name)
    assert isinstance(ph, NWirePhantom) and ph.name == name
    n_patterns, spacings, offsets = PUBLISHED[name]
    assert ph.n_wires == 3 * n_patterns
    assert np.allclose(ph.side_spacings_mm, spacings, atol=0.02)
    assert np.allclose(np.abs(ph.layer_offsets_mm), offsets, atol=0.02)
    assert load_phantom(name.upper()).n_patterns == n_patterns  # names are case-insensitive
    for p in ph.patterns:  # a real crossing of the diagonal lies between its side wires
        assert 0.0 <= p.alpha_range[0] < p.alpha_range[1] <= 1.0
    assert ph.description and "PLUS" in ph.source
