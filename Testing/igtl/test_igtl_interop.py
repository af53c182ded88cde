"""Interoperability with OpenIGTLink's own C++ implementation (Debian's example programs).

The programs are built from the sources in ``openigtlink-examples`` with
``Testing/igtl/build_openigtlink_examples.sh`` (cached under ``build/``); the tests skip with the
reason when cmake, a compiler or the packages are missing. Loopback only; every program runs with
a time limit and is stopped by its PID.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from igtl_testing import EXAMPLES_DIR, free_port, make_stream_sequence, openigtlink_examples, running

from FreehandUSLib.igtl import (
    IGTLClient,
    ImageMessage,
    ReplayServer,
    StatusMessage,
    StringMessage,
    TransformMessage,
)

pytestmark = [pytest.mark.interop, pytest.mark.timeout(90)]
TIMEOUT = 15.0


@pytest.fixture(scope="module")
def bin_dir():
    return openigtlink_examples()


def receive(client, kind, n, *, max_messages=1000):
    out = []
    for _ in range(max_messages):
        m = client.get(timeout_s=TIMEOUT)
        assert m is not None, f"no message within {TIMEOUT} s after {len(out)} {kind.__name__}"
        if isinstance(m, kind):
            out.append(m)
            if len(out) == n:
                return out
    raise AssertionError(f"fewer than {n} {kind.__name__} in {max_messages} messages")


def connect(port, **options):
    # the C++ server may still be starting: the client retries with backoff until it listens
    client = IGTLClient("127.0.0.1", port, reconnect_delay_s=0.05, reconnect_max_delay_s=0.2, **options).start()
    assert client.wait_for_state("connected", TIMEOUT)
    return client


def test_our_client_receives_imagerserver_images(bin_dir):
    port = free_port()
    img_dir = EXAMPLES_DIR / "Imager" / "img"
    raw = [np.fromfile(img_dir / f"igtlTestImage{i}.raw", dtype=np.uint8)[: 256 * 256].reshape(256, 256)
           for i in range(1, 6)]  # fmt: skip
    with running([bin_dir / "ImagerServer", port, 50, img_dir]):
        client = connect(port)
        try:
            images = receive(client, ImageMessage, 12)
        finally:
            client.close()
    for k, m in enumerate(images):
        assert m.device_name == "ImagerClient" and m.pixels.shape == (1, 256, 256)
        np.testing.assert_array_equal(m.frame, raw[k % 5])  # the server cycles through 5 files
        # spacing (1, 1, 5), axes i -> +x, j -> -y; the centre of the image at the origin
        np.testing.assert_allclose(m.ijk_to_world[:3, :3], np.diag([1.0, -1.0, 5.0]), atol=1e-6)
        np.testing.assert_allclose(
            m.ijk_to_world[:3, :3] @ [127.5, 127.5, 0] + m.ijk_to_world[:3, 3], 0, atol=1e-4
        )
    assert client.stats().stream["crc_errors"] == 0


def test_our_client_receives_trackerserver_transforms(bin_dir):
    port = free_port()
    with running([bin_dir / "TrackerServer", port, 100]):
        client = connect(port)
        try:
            transforms = receive(client, TransformMessage, 30)
        finally:
            client.close()
    phi = np.float32(0.0)
    for m in transforms:
        assert m.device_name == "Tracker"
        expected = 50.0 * np.array([np.cos(phi), np.sin(phi), np.cos(phi)])
        np.testing.assert_allclose(m.matrix[:3, 3], expected, atol=1e-3)
        r = m.matrix[:3, :3]
        np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-5)
        phi = np.float32(phi + np.float32(0.2))  # the C++ example accumulates its angle in float


def test_our_client_receives_statusserver_status(bin_dir):
    port = free_port()
    with running([bin_dir / "StatusServer", port]):
        client = connect(port)
        try:
            (status,) = receive(client, StatusMessage, 1)
        finally:
            client.close()
    assert (status.device_name, status.code, status.subcode, status.error_name) == ("Device", 1, 128, "OK!")
    assert status.status == "This is a test to send status message."


def test_stringechoserver_echoes_our_strings(bin_dir):
    port = free_port()
    texts = ["hello", '<Command Name="RequestChannelIds" />', "x" * 3000]
    with running([bin_dir / "StringEchoServer", port]):
        client = connect(port)
        try:
            echoes = []
            for text in texts:
                client.send(StringMessage(text=text, device_name="FreehandUS"))
                echoes += receive(client, StringMessage, 1)
        finally:
            client.close()
    assert [e.text for e in echoes] == texts
    assert {e.device_name for e in echoes} == {"StringEchoServer"}


def _blocks(output: str):
    """Split ReceiveClient's output into (type, text) per received message."""
    parts = re.split(r"Time stamp: [0-9.]+\n", output)[1:]
    out = []
    for part in parts:
        m = re.match(r"Receiving (\w+) data type\.", part)
        out.append((m.group(1) if m else "?", part))
    return out


def test_receiveclient_decodes_everything_our_server_sends(bin_dir):
    seq = make_stream_sequence(8, 24, 32, invalid_reference=[2])
    image_to_probe = np.diag([0.2, 0.25, 1.0, 1.0])
    with ReplayServer(seq, port=0, fps=60, image_to_probe=image_to_probe, embedded_frame="Tracker",
                      keepalive_interval_s=0.1) as server:  # fmt: skip
        with running([bin_dir / "ReceiveClient", "127.0.0.1", server.port]) as (proc, reader):
            assert server.wait_finished(TIMEOUT)
            server.server.broadcast([StringMessage(text="end of replay", device_name="Note")])
            assert reader.wait_for(lambda line: "String: end of replay" in line, TIMEOUT)
            # the stream is idle now: a keep-alive STATUS follows within 0.1 s
            assert reader.wait_for(lambda line: "Receiving STATUS" in line, TIMEOUT)
            server.stop()  # ReceiveClient exits when the connection closes
            proc.wait(TIMEOUT)
            output = reader.text()
    blocks = _blocks(output)
    kinds = [k for k, _ in blocks]
    assert kinds.count("IMAGE") == 8
    assert kinds.count("TRANSFORM") == 8 + 7  # ProbeToTracker always, ReferenceToTracker when valid
    assert kinds.count("STRING") == 1 and kinds.count("STATUS") >= 1
    # Each body is printed only when the C++ library accepted its CRC.
    images = [text for k, text in blocks if k == "IMAGE"]
    assert all("Device Name           : Image_Tracker" in t for t in images)
    assert all("Dimensions            : (32, 24, 1)" in t for t in images)
    assert all("Spacing               : (0.2, 0.25, 1)" in t for t in images)
    matrices = [text for k, text in blocks if k == "TRANSFORM"]
    assert all(t.count("=============") == 2 for t in matrices)
    first = [float(v) for v in re.findall(r"-?[0-9.e+-]+", matrices[0].split("=============")[1])]
    np.testing.assert_allclose(
        np.reshape(first, (4, 4)), seq.transforms["ProbeToTracker"].matrices[0], rtol=1e-5, atol=1e-4
    )
    assert "String: end of replay" in output
    statuses = [text for k, text in blocks if k == "STATUS"]
    assert all("Code      : 1" in t for t in statuses)
    assert proc.returncode == 0
