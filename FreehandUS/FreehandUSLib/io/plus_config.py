"""Typed reading of PLUS device-set configuration files (``PlusDeviceSet_*.xml``).

A PLUS configuration is one XML tree whose root is ``<PlusConfiguration version="...">``. The
parts FreehandUS uses, and where PLUS keeps them:

==============================  ===========================================================
``<CoordinateDefinitions>``     fixed transforms: ``<Transform From="Image" To="Probe"
                                Matrix="16 numbers, row major" Error="mm" Date="..."/>``
``<PhantomDefinition>``         the calibration phantom: ``<Description>``, optional
                                ``<Model>``, ``<Geometry>`` with wire patterns, landmarks
                                and planes (coordinates in the Phantom frame, mm)
``<Segmentation>``              parameters of PLUS's N-wire dot segmentation (fCal/iCal)
``<VolumeReconstruction>``      parameters of PLUS/IGSIO's volume reconstructor; at the root
                                or inside a ``<Device Type="VirtualVolumeReconstructor">``
``<DataCollection>``            ``<Device Id=... Type=...>`` elements (kept for information)
==============================  ===========================================================

Everything else (``<Rendering>``, ``<fCal>``, ``<iCal>``, ``<ScanConversion>``,
``<PlusOpenIGTLinkServer>``, ``vtkPlus*Algo`` elements, a device's ``<USImagingParameters>``)
is ignored; unknown elements never make reading fail, and their top-level names are listed in
:attr:`PlusConfig.other_elements`.

Phantom geometry comes in two layouts, both read here:

- PLUS 1.4 and later (fCal 1.x, 2.x, 3.x, iCal, CIRS): ``<Geometry><Pattern Type="NWire">``
  with three ``<Wire Name=... EndPointFront="x y z" EndPointBack="x y z"/>`` children
  (``Type="CoplanarParallelWires"`` for the CIRS 045 phantom);
- PLUS 1.x phantom definition files: ``<Geometry><NWire>`` with ``<Wire Id=... Name=...
  EndPointFront=... EndPointBack=.../>`` children.

A stand-alone phantom definition file (root element ``<PhantomDefinition>``) is read too.

Defaults of absent attributes follow PLUS (``PlusFidSegmentation``) and IGSIO
(``vtkIGSIOVolumeReconstructor``, ``vtkIGSIOPasteSliceIntoVolume``); each field's docstring
names the attribute it comes from. Deprecated PLUS attributes (``FanAngles``, ``FanOrigin``,
``FanDepth``, ``Compounding``, ``Calculation``, ``RegionOfInterest``) are honoured with a
logged warning, as PLUS does.

Errors: a missing or malformed file raises :class:`~FreehandUSLib.errors.FileFormatError`
(XML syntax errors give the line and column); a well-formed file whose content is wrong
(a value with the wrong number of numbers, a non-number, a NaN or singular matrix, an
unknown enum value) raises :class:`~FreehandUSLib.errors.ConfigError`. Every message names
the file, the element, the attribute, what was expected and what was found.

The code is in two modules, whose public names this one gathers: the configuration model
(:mod:`.plus_config_model`, the dataclasses) and the XML side (:mod:`.plus_config_xml`,
:func:`read_plus_config` and :func:`transform_element`).

Examples
--------
>>> cfg = read_plus_config("PlusDeviceSet_fCal_Sim_SpatialCalibration_2.0.xml")
>>> phantom = cfg.require_phantom()                 # ConfigError if absent
>>> len(phantom.nwires), phantom.nwires[0].front_mm.shape
(3, (3, 3))
>>> repo = TransformRepository(seq.transform_items(), fixed=cfg.coordinate_definitions.repository_fixed())
>>> print(transform_element("ImageToProbe", image_to_probe, error_mm=0.54))
"""

from __future__ import annotations

from .plus_config_model import (
    COMPOUNDING_MODES,
    HOLE_FILLING_TYPES,
    INTERPOLATION_MODES,
    CoordinateDefinitions,
    HoleFillingElement,
    NWire,
    NWirePhantom,
    PhantomDefinition,
    PlusConfig,
    SegmentationParameters,
    VolumeReconstructionParameters,
    Wire,
)
from .plus_config_xml import read_plus_config, transform_element

__all__ = [
    "CoordinateDefinitions",
    "Wire",
    "NWire",
    "PhantomDefinition",
    "NWirePhantom",
    "SegmentationParameters",
    "HoleFillingElement",
    "VolumeReconstructionParameters",
    "PlusConfig",
    "read_plus_config",
    "transform_element",
    "INTERPOLATION_MODES",
    "COMPOUNDING_MODES",
    "HOLE_FILLING_TYPES",
]
