"""Push a calibration into a PlusServer (UpdateTransform + SaveConfig) against the project's own server.

The server is ``FreehandUSLib.igtl.server.IGTLServer`` (PlusServer's wire behaviour) on
127.0.0.1 with a command handler that reads the attributes the way PlusServer's
vtkPlusUpdateTransformCommand / vtkPlusSaveConfigCommand read them (TransformValue: 16 numbers
row by row; TransformPersistent TRUE/FALSE; SaveConfig's optional Filename) and keeps a
transform repository. Every wait is bounded.
"""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest

from FreehandUSLib.igtl.protocol import ProtocolError
from FreehandUSLib.igtl.server import IGTLServer
from NWireCalibrationLib.plus_remote import PlusRemoteError, push_calibration

IMAGE_TO_PROBE = np.array([
    [0.1011, -0.0023, 0.0051, -42.125],
    [0.0031, 0.0998, -0.0102, 3.3333333333333335],
    [0.0012, 0.0104, 0.0999, 17.0],
    [0.0, 0.0, 0.0, 1.0],
])


class PlusLikeServer:
    """What PlusServer does with the two commands (its repository and its saved configuration)."""

    def __init__(self, *, refuse: str | None = None):
        self.refuse = refuse
        self.repository = {}
        self.commands = []
        self.saved = []

    def __call__(self, name, attributes, context):
        self.commands.append((name, dict(attributes)))
        if name == self.refuse:
            return False, f"{name} is not allowed here"
        if name == "UpdateTransform":
            values = [float(v) for v in attributes["TransformValue"].split()]
            if len(values) != 16:
                return False, "TransformValue must hold 16 numbers"
            self.repository[attributes["TransformName"]] = {
                "matrix": np.array(values).reshape(4, 4),
                "persistent": attributes.get("TransformPersistent", "").upper() == "TRUE",
                "error": float(attributes["TransformError"]) if "TransformError" in attributes else None,
                "date": attributes.get("TransformDate"),
            }
            return True, f"Transform {attributes['TransformName']} updated"
        if name == "SaveConfig":
            filename = attributes.get("Filename", "PlusDeviceSet_Server.xml")
            self.saved.append((filename, {k: v for k, v in self.repository.items() if v["persistent"]}))
            return True, filename
        return False, f"unknown command {name}"


@pytest.fixture
def server():
    handler = PlusLikeServer()
    srv = IGTLServer("127.0.0.1", 0, command_handler=handler).start()
    srv.handler = handler
    yield srv
    srv.stop(timeout_s=5.0)


def test_the_calibration_reaches_the_repository_and_the_saved_configuration(server):
    result = push_calibration(IMAGE_TO_PROBE, host="127.0.0.1", port=server.port, error_mm=0.4321,
                              date="2026.12.07 15:04:05", config_filename="Updated.xml", timeout_s=5.0)
    handler = server.handler
    assert [name for name, _ in handler.commands] == ["UpdateTransform", "SaveConfig"]
    stored = handler.repository["ImageToProbe"]
    np.testing.assert_array_equal(stored["matrix"], IMAGE_TO_PROBE)  # full precision, row by row
    assert stored["persistent"] and stored["error"] == 0.4321 and stored["date"] == "2026.12.07 15:04:05"
    filename, saved = handler.saved[0]
    assert filename == "Updated.xml" and list(saved) == ["ImageToProbe"]
    assert result.update_reply.ok and result.save_reply.message == "Updated.xml"
    assert str(result) == f"ImageToProbe updated in PlusServer at 127.0.0.1:{server.port}; configuration saved (Updated.xml)"
    assert result.to_dict()["update"]["status"] == "SUCCESS"


def test_without_save_config_only_the_transform_is_updated(server):
    result = push_calibration(IMAGE_TO_PROBE, port=server.port, save_config=False)
    assert [name for name, _ in server.handler.commands] == ["UpdateTransform"]
    assert result.save_reply is None and "TransformError" not in server.handler.commands[0][1]


def test_a_refused_update_is_an_error_and_nothing_is_saved():
    handler = PlusLikeServer(refuse="UpdateTransform")
    with IGTLServer("127.0.0.1", 0, command_handler=handler) as srv:
        with pytest.raises(PlusRemoteError, match=r"refused UpdateTransform ImageToProbe.*not allowed"):
            push_calibration(IMAGE_TO_PROBE, port=srv.port, timeout_s=5.0)
    assert [name for name, _ in handler.commands] == ["UpdateTransform"]


def test_a_refused_save_says_the_transform_was_taken():
    handler = PlusLikeServer(refuse="SaveConfig")
    with IGTLServer("127.0.0.1", 0, command_handler=handler) as srv:
        with pytest.raises(PlusRemoteError, match="took ImageToProbe but could not save"):
            push_calibration(IMAGE_TO_PROBE, port=srv.port, timeout_s=5.0)
    assert "ImageToProbe" in handler.repository


def test_no_server_is_a_clear_error_within_the_timeout():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        started = time.monotonic()
        with pytest.raises(PlusRemoteError, match=f"no PlusServer answers at 127.0.0.1:{port}"):
            push_calibration(IMAGE_TO_PROBE, port=port, timeout_s=2.0)
        assert time.monotonic() - started < 4.0


@pytest.mark.parametrize("matrix, name, message", [
    (np.full((4, 4), np.nan), "ImageToProbe", "finite"),
    (np.eye(3), "ImageToProbe", "4x4"),
    (np.eye(4), "Image Probe", "<From>To<To>"),
])
def test_bad_input_is_refused_before_connecting(matrix, name, message):
    with pytest.raises(ProtocolError, match=message):
        push_calibration(matrix, port=1, transform_name=name)


def test_push_from_the_calibration_node(server):
    pytest.importorskip("slicer", reason="slicer-core (real MRML classes) is not installed")
    from FreehandUSLib import mrml
    from mrml_scene import make_scene, release_scene
    from NWireCalibrationLib import mrml_calibration as mc
    from NWireCalibrationLib.errors import CalibrationError

    scene = make_scene()
    try:
        node = mrml.transform_to_node(scene, IMAGE_TO_PROBE, name="MyCalibration")
        with pytest.raises(CalibrationError, match="holds no N-wire calibration"):
            mc.push_calibration_node(node, port=server.port)
        assert server.handler.commands == []  # nothing sent
        node.SetAttribute(mrml.ATTR_TRANSFORM_NAME, "ImageToProbe")
        node.SetAttribute(mc.ATTR_ERROR_MM, "0.61")
        node.SetAttribute(mc.ATTR_DATE, "2026.12.07 16:00:00")
        node.SetAttribute(mc.ATTR_RESULT, "{}")
        result = mc.push_calibration_node(node, port=server.port, save_config=True)
    finally:
        release_scene(scene)
    stored = server.handler.repository["ImageToProbe"]
    np.testing.assert_array_equal(stored["matrix"], IMAGE_TO_PROBE)
    assert stored["error"] == 0.61 and stored["date"] == "2026.12.07 16:00:00"
    assert result.save_reply.ok


class _Connector:
    """The two methods of SlicerOpenIGTLink's vtkMRMLIGTLConnectorNode that are read."""

    def GetServerHostname(self):
        return "10.0.0.7"

    def GetServerPort(self):
        return 18945


@pytest.mark.parametrize("text, connector, expected", [
    ("", None, ("127.0.0.1", 18944)),
    ("", _Connector(), ("10.0.0.7", 18945)),
    ("plus-pc:18950", _Connector(), ("plus-pc", 18950)),
    ("localhost", None, ("localhost", 18944)),
])
def test_parse_server(text, connector, expected):
    from NWireCalibrationLib.plus_remote import parse_server

    assert parse_server(text, connector_node=connector) == expected


@pytest.mark.parametrize("text", [":18944", "host:0", "host:70000", "host:port"])
def test_parse_server_refuses(text):
    from NWireCalibrationLib.plus_remote import parse_server

    with pytest.raises(PlusRemoteError, match="expected host:port"):
        parse_server(text)
