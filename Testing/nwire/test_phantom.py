"""N-wire phantom model, JSON library and PLUS <PhantomDefinition> import."""

from __future__ import annotations

import json

import numpy as np
import pytest

from FreehandUSLib.errors import ConfigError, FreehandUSError
from NWireCalibrationLib.errors import PhantomDefinitionError
from NWireCalibrationLib.phantom import (
    NWirePattern,
    NWirePhantom,
    Wire,
    builtin_phantom_names,
    load_phantom,
    phantom_from_plus,
    read_phantom_json,
    write_phantom_json,
)
from testdata import plus_file

FCAL2_XML = """<PlusConfiguration version="2.1">
  <CoordinateDefinitions>
    <Transform From="Phantom" To="Reference" Matrix="1 0 0 1  0 1 0 2  0 0 1 3  0 0 0 1" />
  </CoordinateDefinitions>
  <PhantomDefinition>
    <Description Name="fCAL" Type="Multi-N" Version="2.0" WiringVersion="2.0" Institution="x" />
    <Geometry>
      <Pattern Type="NWire">
        <Wire Name="7:G1_g1" EndPointFront="30.0 0.0 20.0" EndPointBack="30.0 40.0 20.0" />
        <Wire Name="8:L1_h1" EndPointFront="55.0 0.0 20.0" EndPointBack="35.0 40.0 20.0" />
        <Wire Name="9:M1_m1" EndPointFront="60.0 0.0 20.0" EndPointBack="60.0 40.0 20.0" />
      </Pattern>
      <Pattern Type="NWire">
        <Wire Name="4:G3_g3" EndPointFront="30.0 0.0 10.0" EndPointBack="30.0 40.0 10.0" />
        <Wire Name="5:H3_l3" EndPointFront="35.0 0.0 10.0" EndPointBack="55.0 40.0 10.0" />
        <Wire Name="6:M3_m3" EndPointFront="60.0 0.0 10.0" EndPointBack="60.0 40.0 10.0" />
      </Pattern>
      <Pattern Type="NWire">
        <Wire Name="1:H5_h5" EndPointFront="35.0 0.0 0.0" EndPointBack="35.0 40.0 0.0" />
        <Wire Name="2:L5_i5" EndPointFront="55.0 0.0 0.0" EndPointBack="40.0 40.0 0.0" />
        <Wire Name="3:M5_m5" EndPointFront="60.0 0.0 0.0" EndPointBack="60.0 40.0 0.0" />
      </Pattern>
      <Landmarks><Landmark Name="#1" Position="104.3 5.0 20.0" /></Landmarks>
    </Geometry>
  </PhantomDefinition>
</PlusConfiguration>
"""


def test_builtin_library_has_the_required_phantoms():
    names = builtin_phantom_names()
    for required in ("fCal-2.0", "fCal-1.0", "fCal-1.2", "iCal-1.0", "Liu2025-multilayer"):
        assert required in names
    multi = load_phantom("liu2025-multilayer")  # case-insensitive
    assert multi.n_patterns == 4
    assert np.allclose(np.diff(multi.layer_offsets_mm), 10.0)
    assert np.allclose(multi.side_spacings_mm, 25.0)


def test_fcal2_derived_geometry_matches_plus():
    ph = load_phantom("fCal-2.0")
    assert ph.n_wires == 9 and ph.wire_names[0] == "7:G1_g1" and ph.wire_names[-1] == "3:M5_m5"
    p1, p3 = ph.patterns[0], ph.patterns[2]
    # PLUS IntersectPosW12 / W32 of the first and last N-wire.
    assert np.allclose(p1.intersect_w12_mm, [30, 50, 20]) and np.allclose(p1.intersect_w32_mm, [60, -10, 20])
    assert np.allclose(p3.intersect_w12_mm, [35, 160 / 3, 0]) and np.allclose(p3.intersect_w32_mm, [60, -40 / 3, 0])
    assert np.allclose(ph.side_spacings_mm, [30, 30, 25])
    assert np.allclose(ph.layer_offsets_mm, [0, 10, 20])
    assert np.allclose(p1.alpha_range, [1 / 6, 5 / 6])
    assert ph.side_wires_parallel
    # alpha = 0.5 is half way between W12 and W32.
    assert np.allclose(p1.middle_point_mm(0.5), [45, 20, 20])


def test_json_round_trip(tmp_path):
    ph = load_phantom("fCal-2.0")
    path = write_phantom_json(ph, tmp_path / "mine.json")
    back = read_phantom_json(path)
    assert back.name == ph.name and back.wire_names == ph.wire_names
    assert np.allclose(back.wire_front_mm, ph.wire_front_mm) and np.allclose(back.wire_back_mm, ph.wire_back_mm)
    assert load_phantom(path).n_wires == 9
    data = json.loads(path.read_text())
    assert data["format"] == "freehandus-nwire-phantom" and data["units"] == "mm"


def test_plus_xml_import(tmp_path):
    path = tmp_path / "cfg.xml"
    path.write_text(FCAL2_XML)
    ph = load_phantom(path)
    ref = load_phantom("fCal-2.0")
    assert ph.wire_names == ref.wire_names
    assert np.allclose(ph.wire_front_mm, ref.wire_front_mm)
    assert "#1" in ph.landmarks


@pytest.mark.realdata
@pytest.mark.parametrize("name,patterns", [("PlusDeviceSet_fCal_Sim_SpatialCalibration_2.0.xml", 3),
                                           ("PlusDeviceSet_iCal_CalibrationOnly_FrameGrabber.xml", 2)])
def test_plus_configs_from_the_test_data(name, patterns):
    from FreehandUSLib.io.plus_config import read_plus_config

    cfg = read_plus_config(plus_file(f"ConfigFiles/{name}"))
    ph = phantom_from_plus(cfg)
    assert ph.n_patterns == patterns
    assert np.all(ph.side_spacings_mm > 0)


def _wires(front_back):
    return tuple(Wire(str(i), f, b) for i, (f, b) in enumerate(front_back))


def test_pattern_rejects_non_parallel_side_wires():
    with pytest.raises(PhantomDefinitionError, match="parallel"):
        NWirePattern(_wires([((0, 0, 0), (0, 40, 0)), ((20, 0, 0), (5, 40, 0)), ((25, 0, 0), (30, 40, 0))]))


def test_pattern_rejects_diagonal_that_misses_the_plane():
    with pytest.raises(PhantomDefinitionError, match="coplanar|cross"):
        NWirePattern(_wires([((0, 0, 0), (0, 40, 0)), ((20, 0, 3), (5, 40, 3)), ((25, 0, 0), (25, 40, 0))]))


def test_pattern_rejects_parallel_middle_wire():
    with pytest.raises(PhantomDefinitionError, match="diagonal"):
        NWirePattern(_wires([((0, 0, 0), (0, 40, 0)), ((10, 0, 0), (10, 40, 0)), ((25, 0, 0), (25, 40, 0))]))


def test_pattern_needs_three_wires():
    with pytest.raises(PhantomDefinitionError, match="exactly 3"):
        NWirePattern(_wires([((0, 0, 0), (0, 40, 0)), ((20, 0, 0), (5, 40, 0))]))


def test_wire_needs_two_distinct_points():
    with pytest.raises(PhantomDefinitionError, match="same point"):
        Wire("w", (1, 2, 3), (1, 2, 3))
    with pytest.raises(PhantomDefinitionError, match="3 finite numbers"):
        Wire("w", (1, 2), (1, 2, 3))


def test_phantom_rejects_non_parallel_patterns():
    a = NWirePattern(_wires([((0, 0, 0), (0, 40, 0)), ((20, 0, 0), (5, 40, 0)), ((25, 0, 0), (25, 40, 0))]))
    # Same kind of N, but in the plane x = 30 (normal along x instead of z).
    b = NWirePattern(_wires([((30, 0, 0), (30, 40, 0)), ((30, 0, 20), (30, 40, 5)), ((30, 0, 25), (30, 40, 25))]))
    with pytest.raises(PhantomDefinitionError, match="parallel"):
        NWirePhantom("tilted", (a, b))


def test_unknown_name_lists_the_library():
    with pytest.raises(PhantomDefinitionError, match="fCal-2.0"):
        load_phantom("no-such-phantom")


def test_bad_json_names_file_and_problem(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PhantomDefinitionError, match="bad.json.*not valid JSON"):
        read_phantom_json(bad)
    bad.write_text(json.dumps({"name": "x", "patterns": [{"wires": [{"front": [0, 0, 0]}]}]}))
    with pytest.raises(PhantomDefinitionError, match="exactly 3"):
        read_phantom_json(bad)
    bad.write_text(json.dumps({"name": "x", "units": "cm", "patterns": []}))
    with pytest.raises(PhantomDefinitionError, match="units"):
        read_phantom_json(bad)
    with pytest.raises(PhantomDefinitionError, match="not found"):
        read_phantom_json(tmp_path / "missing.json")


def test_config_without_phantom_definition_says_what_to_do(tmp_path):
    path = tmp_path / "nophantom.xml"
    path.write_text('<PlusConfiguration version="2.1"><CoordinateDefinitions/></PlusConfiguration>')
    with pytest.raises(ConfigError, match="PhantomDefinition.*--phantom"):
        load_phantom(path)


def test_errors_are_freehandus_errors():
    assert issubclass(PhantomDefinitionError, FreehandUSError)
    assert issubclass(PhantomDefinitionError, ConfigError)


def test_str_mentions_patterns():
    text = str(load_phantom("iCal-1.0"))
    assert "2 patterns" in text and "Wire5" in text
