"""PLUS device-set configuration files: typed parsing, PLUS defaults, errors, transform elements."""

import dataclasses
import json
import logging
from datetime import datetime

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation
from testdata import plus_file

from FreehandUSLib import ConfigError, FileFormatError, TransformError, TransformRepository
from FreehandUSLib.io.plus_config import (
    NWirePhantom,
    PhantomDefinition,
    SegmentationParameters,
    read_plus_config,
    transform_element,
)

CONFIGS = [
    "BoneUltrasound_L14_config.xml",
    "PlusDeviceSet_Server_Sim_NwirePhantom.xml",
    "PlusDeviceSet_SpinePhantomFreehandReconstructionOnly.xml",
    "PlusDeviceSet_VolumeReconstructionOnly_SonixRP_TRUS_D70mm_NN_LATE.xml",
    "PlusDeviceSet_VolumeReconstructionOnly_SpinePhantom_LN_MAXI.xml",
    "PlusDeviceSet_VolumeReconstructionOnly_SpinePhantom_NN_MEAN.xml",
    "PlusDeviceSet_fCal_Sim_SpatialCalibration_2.0.xml",
    "PlusDeviceSet_iCal_CalibrationOnly_FrameGrabber.xml",
]

SPINE_IMAGE_TO_PROBE = np.array(
    [
        [-0.00157821, 0.0785919, -0.00803285, 15.3978],
        [-0.0839128, 0.00372697, 0.0153803, 49.5705],
        [0.0159024, 0.00714276, 0.0803604, -8.63446],
        [0, 0, 0, 1],
    ]
)
SPINE_PHANTOM_TO_REFERENCE = np.array(
    [
        [-0.0263954, 0.0123051, -0.999576, 11.9823],
        [0.0167829, 0.999789, 0.0118645, -37.1153],
        [0.999511, -0.0164626, -0.0265963, -85.3543],
        [0, 0, 0, 1],
    ]
)
IDENTITY = "1 0 0 0 0 1 0 0 0 0 1 0 0 0 0 1"
IMAGE_TO_PROBE_XML = (
    '<Transform From="Image" To="Probe" Matrix="0.08 0 0 11  0 0.08 0 50  0 0 0.08 0  0 0 0 1"/>'
)


def write_config(tmp_path, body: str, name: str = "cfg.xml", root: str = "PlusConfiguration"):
    path = tmp_path / name
    path.write_text(f'<{root} version="2.1">\n{body}\n</{root}>\n', encoding="utf-8")
    return path


def recon_xml(**attrs) -> str:
    base = {"OutputSpacing": "0.5 0.5 0.5"}
    base.update(attrs)
    text = " ".join(f'{k}="{v}"' for k, v in base.items() if v is not None)
    return f"<VolumeReconstruction {text} />"


def nwire_xml(*wires) -> str:
    return '<Pattern Type="NWire">' + "".join(wires) + "</Pattern>"


def wire_xml(name, front, back) -> str:
    return f'<Wire Name="{name}" EndPointFront="{front}" EndPointBack="{back}" />'


GOOD_NWIRE = nwire_xml(
    wire_xml("a", "30 0 20", "30 40 20"),
    wire_xml("b", "55 0 20", "35 40 20"),
    wire_xml("c", "60 0 20", "60 40 20"),
)


def phantom_xml(geometry: str) -> str:
    description = '<Description Name="P" Type="Multi-N"/>'
    return f"<PhantomDefinition>{description}<Geometry>{geometry}</Geometry></PhantomDefinition>"


# ------------------------------------------------------------------------------------------
# The real PLUS configuration files
# ------------------------------------------------------------------------------------------


@pytest.mark.realdata
@pytest.mark.parametrize("name", CONFIGS)
def test_every_plus_config_parses(name):
    path = plus_file(f"ConfigFiles/{name}")
    cfg = read_plus_config(path)
    assert cfg.path == path
    assert cfg.version in ("2.1", "2.3")
    assert cfg.coordinate_definitions.transforms, "every shipped config defines at least one transform"
    for matrix in cfg.coordinate_definitions.transforms.values():
        assert matrix.shape == (4, 4) and matrix.dtype == np.float64
        np.testing.assert_array_equal(matrix[3], [0, 0, 0, 1])
    back = json.loads(json.dumps(cfg.to_dict()))
    assert back["path"] == str(path)
    assert set(back["coordinate_definitions"]["transforms"]) == set(cfg.coordinate_definitions.transforms)
    text = str(cfg)
    assert name in text and "transforms:" in text


@pytest.mark.realdata
def test_nn_mean_config_values():
    cfg = read_plus_config(
        plus_file("ConfigFiles/PlusDeviceSet_VolumeReconstructionOnly_SpinePhantom_NN_MEAN.xml")
    )
    vr = cfg.require_volume_reconstruction()
    np.testing.assert_array_equal(vr.output_spacing_mm, [0.5, 0.5, 0.5])
    assert vr.interpolation == "NEAREST_NEIGHBOR"
    assert vr.compounding_mode == "MEAN"
    assert vr.optimization == "FULL"
    assert vr.fill_holes is True
    assert vr.number_of_threads == 1
    assert vr.clip_rectangle_origin_px == (0, 0) and vr.clip_rectangle_size_px == (820, 616)
    assert vr.output_origin_mm is None and vr.output_extent is None and not vr.fan_clipping
    assert len(vr.hole_filling) == 1
    stick = vr.hole_filling[0]
    assert (stick.type, stick.stick_length_limit, stick.number_of_sticks_to_use) == ("STICK", 9, 1)
    assert stick.size is None and stick.stdev is None
    assert vr.image_to_reference_name == "ImageToReference"
    assert vr.extra == {}
    np.testing.assert_array_equal(cfg.require_transform("ImageToProbe"), SPINE_IMAGE_TO_PROBE)
    np.testing.assert_array_equal(cfg.require_transform("PhantomToReference"), SPINE_PHANTOM_TO_REFERENCE)
    assert cfg.coordinate_definitions.errors == {"ImageToProbe": 1.68149, "PhantomToReference": 1.87619}
    assert cfg.coordinate_definitions.dates["ImageToProbe"] == "022312_110631"
    assert cfg.phantom is None and cfg.segmentation is None and cfg.devices == []


@pytest.mark.realdata
def test_nn_late_and_ln_maxi_configs():
    late = read_plus_config(
        plus_file("ConfigFiles/PlusDeviceSet_VolumeReconstructionOnly_SonixRP_TRUS_D70mm_NN_LATE.xml")
    ).require_volume_reconstruction()
    assert (late.interpolation, late.compounding_mode, late.fill_holes) == (
        "NEAREST_NEIGHBOR",
        "LATEST",
        False,
    )
    np.testing.assert_array_equal(late.fan_angles_deg, [-45, 45])
    np.testing.assert_array_equal(late.fan_origin_px, [380, 20])
    assert (late.fan_radius_start_px, late.fan_radius_stop_px) == (120.0, 360.0)
    assert late.clip_rectangle_origin_px == (192, 16) and late.clip_rectangle_size_px == (420, 580)
    assert late.fan_clipping and late.hole_filling == []
    maxi = read_plus_config(
        plus_file("ConfigFiles/PlusDeviceSet_VolumeReconstructionOnly_SpinePhantom_LN_MAXI.xml")
    ).require_volume_reconstruction()
    assert (maxi.interpolation, maxi.compounding_mode, maxi.fill_holes) == ("LINEAR", "MAXIMUM", False)


@pytest.mark.realdata
def test_fcal_2_0_config_phantom_segmentation_and_transforms():
    cfg = read_plus_config(plus_file("ConfigFiles/PlusDeviceSet_fCal_Sim_SpatialCalibration_2.0.xml"))
    phantom = cfg.require_phantom()
    assert isinstance(phantom, NWirePhantom)
    assert (phantom.name, phantom.type, phantom.version, phantom.wiring_version) == (
        "fCAL",
        "Multi-N",
        "2.0",
        "2.0",
    )
    assert phantom.institution == "Queen's University PerkLab"
    assert phantom.geometry_layout == "Pattern"
    assert len(phantom.nwires) == 3 and all(len(nw.wires) == 3 for nw in phantom.nwires)
    assert [w.name for w in phantom.nwires[0].wires] == ["7:G1_g1", "8:L1_h1", "9:M1_m1"]
    np.testing.assert_array_equal(phantom.nwires[0].front_mm, [[30, 0, 20], [55, 0, 20], [60, 0, 20]])
    np.testing.assert_array_equal(phantom.nwires[0].back_mm, [[30, 40, 20], [35, 40, 20], [60, 40, 20]])
    np.testing.assert_array_equal(phantom.nwires[1].wires[1].end_point_front_mm, [35, 0, 10])
    np.testing.assert_array_equal(phantom.nwires[1].wires[1].end_point_back_mm, [55, 40, 10])
    np.testing.assert_array_equal(phantom.nwires[2].wires[1].end_point_back_mm, [40, 40, 0])
    assert phantom.nwires[2].wires[0].name == "1:H5_h5" and phantom.nwires[2].wires[0].id is None
    assert len(phantom.wires) == 9
    assert len(phantom.landmarks) == 8
    np.testing.assert_array_equal(phantom.landmarks["#1"], [104.3, 5.0, 20.0])
    np.testing.assert_array_equal(phantom.landmarks["#8"], [-34.3, 45.0, 0.0])
    assert len(phantom.planes) == 8 and phantom.planes["Superior"].shape == (3, 3)

    seg = cfg.require_segmentation()
    assert seg.approximate_spacing_mm_per_px == 0.078
    assert seg.morphological_opening_circle_radius_mm == 0.27
    assert seg.clip_rectangle_origin_px == (27, 27) and seg.clip_rectangle_size_px == (766, 562)
    assert (seg.min_theta_deg, seg.max_theta_deg) == (-70.0, 70.0)
    assert seg.collinear_points_max_distance_from_line_mm == 0.6
    assert seg.use_original_image_intensity_for_dot_intensity_score is False
    assert seg.number_of_maximum_fiducial_point_candidates == 20
    assert seg.extra == {}

    np.testing.assert_allclose(
        cfg.require_transform("PhantomToReference")[:3, 3], [15.6642, -25.3628, -40.7799], rtol=0, atol=0
    )
    assert cfg.coordinate_definitions.errors["PhantomToReference"] == 0.660751
    # This config has no ImageToProbe (fCal computes it): the message names file and element.
    with pytest.raises(ConfigError, match=r'PlusDeviceSet_fCal_Sim.*From="Image" To="Probe"'):
        cfg.require_transform("ImageToProbe")
    assert cfg.devices == [("TrackedVideoDevice", "SavedDataSource"), ("CaptureDevice", "VirtualCapture")]
    assert "Rendering" in cfg.other_elements and "fCal" in cfg.other_elements
    assert "3 N-wire(s)" in str(phantom) and "0.078 mm/px" in str(seg)


@pytest.mark.realdata
def test_ical_config_has_two_nwires_and_no_reconstruction():
    cfg = read_plus_config(plus_file("ConfigFiles/PlusDeviceSet_iCal_CalibrationOnly_FrameGrabber.xml"))
    phantom = cfg.require_phantom()
    assert phantom.name == "iCAL" and len(phantom.nwires) == 2
    np.testing.assert_array_equal(phantom.nwires[1].wires[1].end_point_front_mm, [19.86, 34.385, 62.05])
    seg = cfg.require_segmentation()
    assert (seg.approximate_spacing_mm_per_px, seg.number_of_maximum_fiducial_point_candidates) == (0.26, 55)
    assert seg.clip_rectangle_origin_px == (50, 40) and seg.clip_rectangle_size_px == (550, 300)
    assert set(cfg.coordinate_definitions.transforms) == {
        "TemplateHolderToTemplateHome",
        "TemplateHolderToPhantom",
    }
    assert cfg.devices == [("TrackerDevice", "BrachyTracker")]
    with pytest.raises(ConfigError, match=r"iCal_CalibrationOnly.*no <VolumeReconstruction> element"):
        cfg.require_volume_reconstruction()


@pytest.mark.realdata
def test_server_config_reads_reconstruction_nested_in_a_device():
    cfg = read_plus_config(plus_file("ConfigFiles/PlusDeviceSet_Server_Sim_NwirePhantom.xml"))
    vr = cfg.require_volume_reconstruction()
    np.testing.assert_array_equal(vr.output_spacing_mm, [0.15, 0.15, 0.15])
    np.testing.assert_array_equal(vr.output_origin_mm, [-15, -15, 30])
    assert vr.output_extent == (0, 300, 0, 300, 0, 300)
    assert (vr.optimization, vr.number_of_threads, vr.image_to_reference_name) == (
        "NONE",
        2,
        "ImageToReference",
    )
    assert ("VolumeReconstructorDevice", "VirtualVolumeReconstructor") in cfg.devices
    np.testing.assert_array_equal(
        cfg.require_transform("ImageToProbe"),
        [[0, 0.08, 0, 11], [-0.08, 0, 0, 50], [0, 0, 0.08, 0], [0, 0, 0, 1]],
    )


@pytest.mark.realdata
def test_bone_config_deprecated_compounding_and_tab_separated_matrix(caplog):
    with caplog.at_level(logging.WARNING, logger="FreehandUSLib.io.plus_config"):
        cfg = read_plus_config(plus_file("ConfigFiles/BoneUltrasound_L14_config.xml"))
    vr = cfg.require_volume_reconstruction()
    assert vr.compounding is True and vr.compounding_mode == "MEAN" and vr.fill_holes is False
    assert "deprecated" in caplog.text
    m = cfg.require_transform("ImageToProbe")
    assert m[0, 1] == 0.0854272 and m[1, 3] == 50.76
    assert cfg.coordinate_definitions.dates["ImageToProbe"] == "2012.02.06 17:57:00"
    assert cfg.other_elements == ["ScanConversion"]


@pytest.mark.realdata
def test_repository_fixed_feeds_the_transform_repository():
    cfg = read_plus_config(plus_file("ConfigFiles/PlusDeviceSet_SpinePhantomFreehandReconstructionOnly.xml"))
    rng = np.random.default_rng(1)
    probe_to_reference = np.tile(np.eye(4), (3, 1, 1))
    probe_to_reference[:, :3, :3] = Rotation.random(3, random_state=2).as_matrix()
    probe_to_reference[:, :3, 3] = rng.normal(scale=30, size=(3, 3))
    repo = TransformRepository(
        {"ProbeToReference": (probe_to_reference, np.ones(3, bool))},
        fixed=cfg.coordinate_definitions.repository_fixed(),
    )
    expected = np.linalg.inv(SPINE_PHANTOM_TO_REFERENCE) @ probe_to_reference @ SPINE_IMAGE_TO_PROBE
    np.testing.assert_allclose(repo.get("ImageToPhantom"), expected, atol=1e-9)


# ------------------------------------------------------------------------------------------
# Synthetic configurations: layouts, defaults, deprecated attributes
# ------------------------------------------------------------------------------------------


def test_empty_configuration_and_require_messages(tmp_path):
    path = write_config(tmp_path, "<Unknown><Nested Anything='1'/></Unknown>", name="empty.xml")
    cfg = read_plus_config(path)
    assert cfg.phantom is None and cfg.segmentation is None and cfg.volume_reconstruction is None
    assert cfg.coordinate_definitions.transforms == {} and cfg.other_elements == ["Unknown"]
    with pytest.raises(
        ConfigError, match=r"empty\.xml: no <PhantomDefinition> element; add one or pass --phantom"
    ):
        cfg.require_phantom()
    with pytest.raises(ConfigError, match=r"empty\.xml: no <Segmentation> element"):
        cfg.require_segmentation()
    with pytest.raises(ConfigError, match=r"empty\.xml: no <VolumeReconstruction> element.*--spacing"):
        cfg.require_volume_reconstruction()
    with pytest.raises(ConfigError, match=r'empty\.xml: no <Transform From="Image" To="Probe">.*none'):
        cfg.require_transform("ImageToProbe")
    with pytest.raises(ConfigError, match=r"empty\.xml: .*<From>To<To>"):
        cfg.require_transform("Probe")


def test_require_transform_inverts_a_stored_inverse(tmp_path):
    body = (
        '<CoordinateDefinitions><Transform From="Probe" To="Image"'
        ' Matrix="2 0 0 1  0 4 0 2  0 0 8 3  0 0 0 1" Error="0.5" Date="d"/></CoordinateDefinitions>'
    )
    cfg = read_plus_config(write_config(tmp_path, body))
    probe_to_image = np.array([[2, 0, 0, 1], [0, 4, 0, 2], [0, 0, 8, 3], [0, 0, 0, 1.0]])
    np.testing.assert_allclose(cfg.require_transform("ImageToProbeTransform"), np.linalg.inv(probe_to_image))
    np.testing.assert_array_equal(cfg.require_transform("ProbeToImage"), probe_to_image)
    assert cfg.coordinate_definitions.errors == {"ProbeToImage": 0.5}


def test_results_are_frozen_and_arrays_read_only(tmp_path):
    cfg = read_plus_config(
        write_config(
            tmp_path, f"<CoordinateDefinitions>{IMAGE_TO_PROBE_XML}</CoordinateDefinitions>" + recon_xml()
        )
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.phantom = None
    with pytest.raises(ValueError):
        cfg.coordinate_definitions.transforms["ImageToProbe"][0, 0] = 1.0
    with pytest.raises(ValueError):
        cfg.volume_reconstruction.output_spacing_mm[0] = 2.0
    fixed = cfg.coordinate_definitions.repository_fixed()
    fixed["ImageToProbe"][0, 0] = 5.0  # a copy, writable
    assert cfg.coordinate_definitions.transforms["ImageToProbe"][0, 0] == 0.08


def test_legacy_nwire_layout_in_a_standalone_phantom_definition(tmp_path):
    body = """
      <Description Name="fCAL" Type="Double-N" Version="1.0" Institution="PerkLab"/>
      <Model File="FCal_1.0.stl" ModelToPhantomTransform="1 0 0 -15  0 1 0 10  0 0 1 -5  0 0 0 1"/>
      <Geometry>
        <NWire>
          <Wire Id="1" Name="1:E3_e3" EndPointFront="20 0 5" EndPointBack="20 40 5"/>
          <Wire Id="2" Name="2:F3_j3" EndPointFront="25 0 5" EndPointBack="45 40 5"/>
          <Wire Id="3" Name="3:K3_k3" EndPointFront="50 0 5" EndPointBack="50 40 5"/>
        </NWire>
        <NWire>
          <Wire Id="4" Name="4:E4_e4" EndPointFront="20 0 0" EndPointBack="20 40 0"/>
          <Wire Id="5" Name="5:J4_f4" EndPointFront="45 0 0" EndPointBack="25 40 0"/>
          <Wire Id="6" Name="6:K4_k4" EndPointFront="50 0 0" EndPointBack="50 40 0"/>
        </NWire>
        <Landmarks><Landmark Name="#1" Position="95 5 15"/></Landmarks>
        <Registration MatrixName="PhantomToPhantomReference" MatrixValue="1 0 0 0 0 1 0 0 0 0 1 0 0 0 0 1"/>
      </Geometry>"""
    cfg = read_plus_config(write_config(tmp_path, body, root="PhantomDefinition"))
    phantom = cfg.require_phantom()
    assert phantom.geometry_layout == "NWire" and len(phantom.nwires) == 2
    assert [w.id for w in phantom.wires] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal(phantom.nwires[1].wires[1].end_point_front_mm, [45, 0, 0])
    assert phantom.model_file == "FCal_1.0.stl"
    np.testing.assert_array_equal(phantom.model_to_phantom[:3, 3], [-15, 10, -5])
    np.testing.assert_array_equal(phantom.landmarks["#1"], [95, 5, 15])
    np.testing.assert_allclose(phantom.nwires[0].wires[0].direction, [0, 1, 0])
    assert PhantomDefinition is NWirePhantom and cfg.other_elements == []


def test_cirs_coplanar_pattern_is_kept_but_is_not_an_nwire(tmp_path):
    geometry = (
        '<Pattern Type="CoplanarParallelWires" Id="0">'
        '<Wire Id="0" Name="F1" EndPointFront="60.65 38 3" EndPointBack="60.65 38 103"/>'
        '<Wire Id="1" Name="F2" EndPointFront="60.65 48 3" EndPointBack="60.65 48 103"/>'
        "</Pattern><Landmarks><Landmark Name='?' Position='0 0 0'/></Landmarks>"
    )
    cfg = read_plus_config(write_config(tmp_path, phantom_xml(geometry), name="cirs.xml"))
    assert cfg.phantom.nwires == []
    assert len(cfg.phantom.other_patterns) == 1
    pattern = cfg.phantom.other_patterns[0]
    assert (pattern.type, pattern.id, len(pattern.wires)) == ("CoplanarParallelWires", "0", 2)
    with pytest.raises(ConfigError, match=r'cirs\.xml: <PhantomDefinition> has no N-wire.*Type="NWire"'):
        cfg.require_phantom()


def test_segmentation_defaults_and_extra_attributes(tmp_path):
    cfg = read_plus_config(
        write_config(
            tmp_path, '<Segmentation ComputeSegmentationParametersFromPhantomDefinition="0" Custom="x" />'
        )
    )
    seg = cfg.require_segmentation()
    default = SegmentationParameters()
    for name in SegmentationParameters.__dataclass_fields__:
        if name != "extra":
            assert getattr(seg, name) == getattr(default, name), name
    assert (default.approximate_spacing_mm_per_px, default.morphological_opening_bar_size_mm) == (0.078, 2.0)
    assert (default.threshold_image_percent, default.number_of_maximum_fiducial_point_candidates) == (
        10.0,
        20,
    )
    assert default.clip_rectangle_origin_px is None  # whole image, as PLUS without a clip rectangle
    assert seg.extra == {"ComputeSegmentationParametersFromPhantomDefinition": "0", "Custom": "x"}
    assert json.loads(json.dumps(seg.to_dict()))["extra"]["Custom"] == "x"


def test_segmentation_legacy_region_of_interest_and_numeric_bool(tmp_path, caplog):
    body = (
        '<Segmentation RegionOfInterest="27 27 793 589" UseOriginalImageIntensityForDotIntensityScore="1" />'
    )
    with caplog.at_level(logging.WARNING, logger="FreehandUSLib.io.plus_config"):
        seg = read_plus_config(write_config(tmp_path, body)).require_segmentation()
    assert seg.clip_rectangle_origin_px == (27, 27) and seg.clip_rectangle_size_px == (766, 562)
    assert seg.use_original_image_intensity_for_dot_intensity_score is True
    assert "RegionOfInterest is deprecated" in caplog.text


def test_volume_reconstruction_defaults(tmp_path):
    vr = read_plus_config(write_config(tmp_path, recon_xml())).require_volume_reconstruction()
    assert vr.interpolation == "NEAREST_NEIGHBOR" and vr.compounding_mode == "MEAN"
    assert (vr.optimization, vr.fill_holes, vr.number_of_threads, vr.skip_interval) == ("FULL", False, 0, 1)
    assert (vr.fan_radius_start_px, vr.fan_radius_stop_px) == (0.0, 500.0) and not vr.fan_clipping
    assert vr.pixel_rejection_threshold is None and vr.clip_rectangle_size_px is None
    assert vr.image_to_reference_name == "ImageToReference"


def test_volume_reconstruction_deprecated_attributes(tmp_path, caplog):
    body = recon_xml(
        FanAngles="-30 30",
        FanOrigin="410 -10",
        FanDepth="700",
        Calculation="Maximum",
        Interpolation="linear",
        ImageCoordinateFrame="Img",
        ReferenceCoordinateFrame="Ref",
        PixelRejectionThreshold="3",
        SkipInterval="2",
        Unknown="u",
    )
    with caplog.at_level(logging.WARNING, logger="FreehandUSLib.io.plus_config"):
        vr = read_plus_config(write_config(tmp_path, body)).require_volume_reconstruction()
    np.testing.assert_array_equal(vr.fan_angles_deg, [-30, 30])
    np.testing.assert_array_equal(vr.fan_origin_px, [410, -10])
    assert vr.fan_radius_stop_px == 700.0 and vr.fan_clipping
    assert (vr.calculation, vr.compounding_mode, vr.interpolation) == ("MAXIMUM", "MAXIMUM", "LINEAR")
    assert vr.image_to_reference_name == "ImgToRef"
    assert (vr.pixel_rejection_threshold, vr.skip_interval) == (3.0, 2)
    assert vr.extra == {"Unknown": "u"}
    assert "FanAngles is deprecated" in caplog.text
    off = read_plus_config(write_config(tmp_path, recon_xml(Compounding="Off"), name="off.xml"))
    assert off.volume_reconstruction.compounding_mode == "LATEST"


def test_all_hole_filling_types(tmp_path):
    body = (
        '<VolumeReconstruction OutputSpacing="1 1 1" FillHoles="on"><HoleFilling>'
        '<HoleFillingElement Type="GAUSSIAN" Size="3" Stdev="0.6667" MinimumKnownVoxelsRatio="0.5"/>'
        '<HoleFillingElement Type="gaussian_accumulation" Size="5" Stdev="1" MinimumKnownVoxelsRatio="0.25"/>'
        '<HoleFillingElement Type="DISTANCE_WEIGHT_INVERSE" Size="7" MinimumKnownVoxelsRatio="0.1"/>'
        '<HoleFillingElement Type="NEAREST_NEIGHBOR" Size="9" MinimumKnownVoxelsRatio="0"/>'
        '<HoleFillingElement Type="STICK" StickLengthLimit="9" NumberOfSticksToUse="2"/>'
        "<Comment/></HoleFilling></VolumeReconstruction>"
    )
    vr = read_plus_config(write_config(tmp_path, body)).require_volume_reconstruction()
    assert vr.fill_holes is True
    assert [h.type for h in vr.hole_filling] == [
        "GAUSSIAN",
        "GAUSSIAN_ACCUMULATION",
        "DISTANCE_WEIGHT_INVERSE",
        "NEAREST_NEIGHBOR",
        "STICK",
    ]
    g = vr.hole_filling[0]
    assert (g.size, g.stdev, g.minimum_known_voxels_ratio) == (3, 0.6667, 0.5)
    assert (vr.hole_filling[3].size, vr.hole_filling[3].minimum_known_voxels_ratio) == (9, 0.0)
    assert vr.hole_filling[4].number_of_sticks_to_use == 2
    assert "GAUSSIAN (size 3" in str(vr)
    assert json.loads(json.dumps(vr.to_dict()))["hole_filling"][4]["stick_length_limit"] == 9


# ------------------------------------------------------------------------------------------
# Bad inputs: each names the file and the problem
# ------------------------------------------------------------------------------------------


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileFormatError, match=r"nope\.xml: file not found"):
        read_plus_config(tmp_path / "nope.xml")
    with pytest.raises(FileFormatError, match="not a file"):
        read_plus_config(tmp_path)


def test_xml_syntax_error_gives_the_line(tmp_path):
    path = tmp_path / "broken.xml"
    path.write_text('<PlusConfiguration>\n  <Segmentation\n    Foo="1" <oops/>\n</PlusConfiguration>\n')
    with pytest.raises(
        FileFormatError,
        match=r"broken\.xml: not well-formed XML at line 3, column 13: not well-formed \(invalid token\)$",
    ):
        read_plus_config(path)


def test_wrong_root_element(tmp_path):
    path = write_config(tmp_path, "", name="results.xml", root="CalibrationResults")
    with pytest.raises(
        ConfigError, match=r"results\.xml: root element is <CalibrationResults>, expected <PlusConfiguration>"
    ):
        read_plus_config(path)


BAD_CASES = {
    "spacing_two_numbers": (
        recon_xml(OutputSpacing="0.5 0.5"),
        r"<VolumeReconstruction> attribute OutputSpacing='0.5 0.5': expected 3 numbers .*got 2",
    ),
    "spacing_missing": (recon_xml(OutputSpacing=None), r"OutputSpacing: required attribute is missing"),
    "spacing_not_numeric": (recon_xml(OutputSpacing="0.5 abc 0.5"), r"OutputSpacing.*'abc' is not a number"),
    "spacing_nan": (recon_xml(OutputSpacing="0.5 nan 0.5"), r"OutputSpacing.*NaN"),
    "spacing_negative": (recon_xml(OutputSpacing="0.5 -1 0.5"), r"OutputSpacing.*positive"),
    "extent_reversed": (recon_xml(OutputExtent="0 10 5 2 0 1"), r"OutputExtent.*maximum index must be >="),
    "extent_float": (recon_xml(OutputExtent="0 10.5 0 2 0 1"), r"OutputExtent.*expected 6 integers"),
    "interpolation": (
        recon_xml(Interpolation="CUBIC"),
        r"Interpolation='CUBIC': expected one of LINEAR, NEAREST_NEIGHBOR",
    ),
    "compounding": (
        recon_xml(CompoundingMode="SUM"),
        r"CompoundingMode='SUM': expected one of MEAN, MAXIMUM",
    ),
    "fill_holes_value": (recon_xml(FillHoles="MAYBE"), r"FillHoles='MAYBE': expected TRUE/FALSE"),
    "fill_holes_without_elements": (recon_xml(FillHoles="ON"), r"FillHoles.*no <HoleFilling> element"),
    "importance_mask_file": (
        recon_xml(CompoundingMode="IMPORTANCE_MASK"),
        r"needs an ImportanceMaskFilename",
    ),
    "fan_radius": (
        recon_xml(FanRadiusStartPixel="100", FanRadiusStopPixel="50"),
        r"FanRadiusStopPixel.*larger",
    ),
    "threads_negative": (recon_xml(NumberOfThreads="-1"), r"NumberOfThreads.*>= 0"),
    "hole_type": (
        '<VolumeReconstruction OutputSpacing="1 1 1" FillHoles="ON"><HoleFilling>'
        '<HoleFillingElement Type="BLUR" Size="3"/></HoleFilling></VolumeReconstruction>',
        r"HoleFillingElement #1> attribute Type='BLUR': expected one of GAUSSIAN",
    ),
    "hole_missing_stdev": (
        '<VolumeReconstruction OutputSpacing="1 1 1" FillHoles="ON"><HoleFilling>'
        '<HoleFillingElement Type="GAUSSIAN" Size="3" MinimumKnownVoxelsRatio="0.5"/></HoleFilling>'
        "</VolumeReconstruction>",
        r"attribute Stdev: required attribute is missing for Type=GAUSSIAN",
    ),
    "hole_ratio": (
        '<VolumeReconstruction OutputSpacing="1 1 1" FillHoles="ON"><HoleFilling>'
        '<HoleFillingElement Type="NEAREST_NEIGHBOR" Size="3" MinimumKnownVoxelsRatio="2"/></HoleFilling>'
        "</VolumeReconstruction>",
        r"MinimumKnownVoxelsRatio='2': expected a ratio in \[0, 1\]",
    ),
    "matrix_15_numbers": (
        '<CoordinateDefinitions><Transform From="Image" To="Probe" Matrix="1 0 0 0 0 1 0 0 0 0 1 0 0 0 1"/>'
        "</CoordinateDefinitions>",
        r'Transform From="Image" To="Probe"> attribute Matrix=.*expected 16 numbers .*got 15',
    ),
    "matrix_nan": (
        '<CoordinateDefinitions><Transform From="Image" To="Probe" '
        'Matrix="1 0 0 nan 0 1 0 0 0 0 1 0 0 0 0 1"/>'
        "</CoordinateDefinitions>",
        r'cfg\.xml: <CoordinateDefinitions/Transform From="Image" To="Probe"> attribute Matrix: '
        r"ImageToProbe: matrix holds NaN",
    ),
    "matrix_singular": (
        '<CoordinateDefinitions><Transform From="Image" To="Probe" Matrix="1 0 0 0 0 0 0 0 0 0 1 0 0 0 0 1"/>'
        "</CoordinateDefinitions>",
        r"cfg\.xml: .*Matrix: ImageToProbe: matrix is not invertible",
    ),
    "matrix_last_row": (
        '<CoordinateDefinitions><Transform From="Image" To="Probe" Matrix="1 0 0 0 0 1 0 0 0 0 1 0 0 0 1 1"/>'
        "</CoordinateDefinitions>",
        r"cfg\.xml: .*Matrix: ImageToProbe: last row must be 0 0 0 1",
    ),
    "matrix_missing": (
        '<CoordinateDefinitions><Transform From="Image" To="Probe"/></CoordinateDefinitions>',
        r"attribute Matrix: required attribute is missing; expected 16 numbers",
    ),
    "transform_without_to": (
        '<CoordinateDefinitions><Transform From="Image" Matrix="1 0 0 0 0 1 0 0 0 0 1 0 0 0 0 1"/>'
        "</CoordinateDefinitions>",
        r"attribute To: required attribute is missing",
    ),
    "transform_bad_frame": (
        f'<CoordinateDefinitions><Transform From="My Image" To="Probe" Matrix="{IDENTITY}"/>'
        "</CoordinateDefinitions>",
        r"attribute From='My Image': expected a coordinate frame name",
    ),
    "transform_twice": (
        f"<CoordinateDefinitions>{IMAGE_TO_PROBE_XML}{IMAGE_TO_PROBE_XML}</CoordinateDefinitions>",
        r"transform ImageToProbe is defined twice",
    ),
    "transform_and_inverse": (
        f"<CoordinateDefinitions>{IMAGE_TO_PROBE_XML}"
        f'<Transform From="Probe" To="Image" Matrix="{IDENTITY}"/></CoordinateDefinitions>',
        r"ProbeToImage is defined although its inverse ImageToProbe",
    ),
    "transform_error_text": (
        '<CoordinateDefinitions><Transform From="Image" To="Probe" Matrix="1 0 0 0 0 1 0 0 0 0 1 0 0 0 0 1"'
        ' Error="small"/></CoordinateDefinitions>',
        r"attribute Error='small': expected a number \(mm\), 'small' is not a number",
    ),
    "nwire_two_wires": (
        phantom_xml(nwire_xml(wire_xml("a", "0 0 0", "0 40 0"), wire_xml("b", "5 0 0", "9 40 0"))),
        r'Pattern #1 Type="NWire">: an N-wire needs exactly 3 <Wire> elements, got 2',
    ),
    "wire_two_numbers": (
        phantom_xml(
            nwire_xml(
                wire_xml("a", "0 0", "0 40 0"),
                wire_xml("b", "5 0 0", "9 40 0"),
                wire_xml("c", "9 0 0", "9 40 0"),
            )
        ),
        r'Wire #1 Name="a"> attribute EndPointFront=\'0 0\': expected 3 numbers .*got 2',
    ),
    "wire_zero_length": (
        phantom_xml(
            nwire_xml(
                wire_xml("a", "0 0 0", "0 0 0"),
                wire_xml("b", "5 0 0", "9 40 0"),
                wire_xml("c", "9 0 0", "9 40 0"),
            )
        ),
        r"EndPointFront and EndPointBack are the same point",
    ),
    "wire_missing_back": (
        phantom_xml(nwire_xml('<Wire Name="a" EndPointFront="0 0 0"/>')),
        r"attribute EndPointBack: required attribute is missing",
    ),
    "pattern_without_type": (
        phantom_xml("<Pattern/>"),
        r"Pattern #1> attribute Type: required attribute is missing",
    ),
    "model_matrix_singular": (
        '<PhantomDefinition><Model File="m.stl" ModelToPhantomTransform="0 0 0 0 0 1 0 0 0 0 1 0 0 0 0 1"/>'
        "<Geometry/></PhantomDefinition>",
        r"<PhantomDefinition/Model> attribute ModelToPhantomTransform: "
        r"ModelToPhantomTransform: matrix is not invertible",
    ),
    "phantom_without_geometry": (
        "<PhantomDefinition><Description/></PhantomDefinition>",
        r"has no <Geometry>",
    ),
    "landmark_position": (
        phantom_xml(GOOD_NWIRE + '<Landmarks><Landmark Name="#1" Position="1 2"/></Landmarks>'),
        r"Landmark #1> attribute Position='1 2': expected 3 numbers",
    ),
    "landmark_twice": (
        phantom_xml(
            GOOD_NWIRE + '<Landmarks><Landmark Name="#1" Position="1 2 3"/>'
            '<Landmark Name="#1" Position="1 2 4"/></Landmarks>'
        ),
        r"attribute Name='#1': landmark names must be unique",
    ),
    "segmentation_spacing_zero": (
        '<Segmentation ApproximateSpacingMmPerPixel="0"/>',
        r"<Segmentation> attribute ApproximateSpacingMmPerPixel='0': expected a positive number",
    ),
    "segmentation_clip_half": (
        '<Segmentation ClipRectangleOrigin="27 27"/>',
        r"ClipRectangleSize is missing",
    ),
    "segmentation_clip_three": (
        '<Segmentation ClipRectangleOrigin="27 27 1" ClipRectangleSize="5 5"/>',
        r"ClipRectangleOrigin='27 27 1': expected 2 numbers \(x y in pixels\), got 3",
    ),
    "segmentation_theta": (
        '<Segmentation MinThetaDegrees="70" MaxThetaDegrees="-70"/>',
        r"MinThetaDegrees.*smaller than MaxThetaDegrees",
    ),
    "segmentation_threshold": (
        '<Segmentation ThresholdImagePercent="150"/>',
        r"ThresholdImagePercent.*\[0, 100\]",
    ),
    "segmentation_candidates": (
        '<Segmentation NumberOfMaximumFiducialPointCandidates="2.5"/>',
        r"NumberOfMaximumFiducialPointCandidates='2.5': expected an integer",
    ),
    "segmentation_bool": (
        '<Segmentation UseOriginalImageIntensityForDotIntensityScore="perhaps"/>',
        r"expected TRUE/FALSE",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_config_values_raise_config_error(tmp_path, case):
    body, pattern = BAD_CASES[case]
    path = write_config(tmp_path, body)
    with pytest.raises(ConfigError, match=pattern) as exc:
        read_plus_config(path)
    assert str(path) in str(exc.value)


def test_matrix_errors_are_config_errors_wrapping_transform_errors(tmp_path):
    body, _ = BAD_CASES["matrix_nan"]
    with pytest.raises(ConfigError) as exc:
        read_plus_config(write_config(tmp_path, body))
    assert not isinstance(exc.value, TransformError)
    assert isinstance(exc.value.__cause__, TransformError)
    assert 'Transform From="Image" To="Probe"' in str(exc.value)


# ------------------------------------------------------------------------------------------
# transform_element
# ------------------------------------------------------------------------------------------


def read_back(tmp_path, element: str, name: str = "ImageToProbe"):
    cfg = read_plus_config(
        write_config(tmp_path, f"<CoordinateDefinitions>\n{element}\n</CoordinateDefinitions>")
    )
    cd = cfg.coordinate_definitions
    return cd.transforms[name], cd.errors.get(name), cd.dates.get(name)


def test_transform_element_round_trip_and_layout(tmp_path):
    rng = np.random.default_rng(7)
    m = np.eye(4)
    m[:3, :3] = Rotation.random(random_state=3).as_matrix() @ np.diag([0.0796446, 0.0744856, 0.0770651])
    m[:3, 3] = rng.normal(scale=40, size=3)
    text = transform_element("ImageToProbe", m, error_mm=0.5399, date=datetime(2025, 1, 2, 10, 0, 0))
    assert text.startswith('<Transform From="Image" To="Probe"') and text.endswith("/>")
    matrix_text = text.split('Matrix="')[1].split('"')[0]
    rows = [r for r in matrix_text.splitlines() if r.strip()]
    assert len(rows) == 4 and all(len(r.split("\t")) == 4 for r in rows)
    assert rows[3].split() == ["0", "0", "0", "1"]
    assert 'Error="0.5399"' in text and 'Date="2025.01.02 10:00:00"' in text
    matrix, error, date = read_back(tmp_path, text)
    np.testing.assert_allclose(matrix, m, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(matrix, m)  # shortest round-trip text: exact
    assert (error, date) == (0.5399, "2025.01.02 10:00:00")


def test_transform_element_without_optional_attributes_and_escaped_date(tmp_path):
    text = transform_element("PhantomToReferenceTransform", np.eye(4))
    assert "Error" not in text and "Date" not in text and 'From="Phantom" To="Reference"' in text
    matrix, error, date = read_back(tmp_path, text, "PhantomToReference")
    np.testing.assert_array_equal(matrix, np.eye(4))
    assert error is None and date is None
    odd = transform_element("ImageToProbe", np.eye(4), date='5" & <later>')
    assert read_back(tmp_path, odd)[2] == '5" & <later>'


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False), min_size=12, max_size=12),
)
def test_transform_element_round_trip_property(tmp_path_factory, values):
    m = np.eye(4)
    m[:3, :] = np.reshape(values, (3, 4))
    if abs(np.linalg.det(m[:3, :3])) < 1e-6:
        m[:3, :3] += np.eye(3) * 10.0
    if abs(np.linalg.det(m[:3, :3])) < 1e-6:
        return
    tmp = tmp_path_factory.mktemp("rt")
    matrix, _, _ = read_back(tmp, transform_element("ImageToProbe", m))
    np.testing.assert_array_equal(matrix, m)


def test_transform_element_bad_inputs():
    bad = np.eye(4)
    bad[0, 0] = np.nan
    with pytest.raises(TransformError, match="ImageToProbe: matrix holds NaN"):
        transform_element("ImageToProbe", bad)
    with pytest.raises(TransformError, match="expected a 4x4 matrix"):
        transform_element("ImageToProbe", np.eye(3))
    with pytest.raises(TransformError, match="<From>To<To>"):
        transform_element("Probe", np.eye(4))
    with pytest.raises(ValueError, match=r"error_mm: expected a finite number >= 0 \(mm\), got -1.0"):
        transform_element("ImageToProbe", np.eye(4), error_mm=-1)


# ------------------------------------------------------------------------------------------------
# hostile files (issue 21)


@pytest.mark.parametrize("name", ["/etc/passwd", "../mask.png", "sub/../../mask.png"])
def test_importance_mask_outside_the_config_folder_is_refused(tmp_path, name):
    folder = tmp_path / "cfg"
    folder.mkdir()
    path = write_config(folder, recon_xml(CompoundingMode="IMPORTANCE_MASK", ImportanceMaskFilename=name))
    with pytest.raises(ConfigError, match=r"ImportanceMaskFilename=.*configuration's folder or below"):
        read_plus_config(path)
    path = write_config(folder, recon_xml(CompoundingMode="IMPORTANCE_MASK", ImportanceMaskFilename="masks/m.png"))
    assert read_plus_config(path).volume_reconstruction.importance_mask_filename == "masks/m.png"


def test_entity_expansion_and_external_entities_are_not_followed(tmp_path):
    import time

    laughs = "".join(f'<!ENTITY l{i} "{("&l" + str(i - 1) + ";") * 10}">' for i in range(1, 12))
    bomb = f'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY l0 "lol">{laughs}]><PlusConfiguration a="&l11;"/>'
    path = tmp_path / "bomb.xml"
    path.write_text(bomb)
    start = time.monotonic()
    with pytest.raises(FileFormatError, match=r"bomb\.xml: not well-formed XML") as info:
        read_plus_config(path)
    assert time.monotonic() - start < 2 and "\n" not in str(info.value)
    secret = tmp_path / "secret.txt"
    secret.write_text("1 0 0 0 0 1 0 0 0 0 1 0 0 0 0 1")
    external = (
        f'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY m SYSTEM "file://{secret}">]>'
        '<PlusConfiguration><CoordinateDefinitions><Transform From="A" To="B" Matrix="&m;"/>'
        "</CoordinateDefinitions></PlusConfiguration>"
    )
    path.write_text(external)
    with pytest.raises(FileFormatError, match=r"external entity"):
        read_plus_config(path)


def test_huge_attribute_values_are_not_echoed(tmp_path):
    # found by the fuzz suite: the element label repeated a 5000-digit To="..." attribute
    long = "9" * 5000
    bodies = [
        f'<CoordinateDefinitions><Transform From="Image" To="{long}" Matrix="1 0 0"/></CoordinateDefinitions>',
        f'<CoordinateDefinitions><Transform From="{long}" To="{long}" Matrix="1 0 0 0 0 1 0 0 0 0 1 0 0 0 0 1"/>'
        "</CoordinateDefinitions>",
        f'<CoordinateDefinitions><Transform From="A" To="B" Matrix="1 0 0 x{long} 0 1 0 0 0 0 1 0 0 0 0 1"/>'
        "</CoordinateDefinitions>",
        phantom_xml(f'<Pattern Type="{long}"><Wire Name="{long}" EndPointFront="0 0 0" EndPointBack="0 0 0"/></Pattern>'),
    ]
    for body in bodies:
        with pytest.raises(ConfigError) as info:
            read_plus_config(write_config(tmp_path, body))
        assert len(str(info.value)) < 400 and "\n" not in str(info.value)
