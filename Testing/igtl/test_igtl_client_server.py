"""Client and server on 127.0.0.1 with ephemeral ports: streaming, versions, commands, faults."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest
from igtl_testing import assert_transforms_close, frame_index, make_stream_sequence

from FreehandUSLib.errors import FreehandUSError
from FreehandUSLib.igtl import (
    CommandTimeoutError,
    IGTLClient,
    IGTLConnectionError,
    IGTLServer,
    ImageMessage,
    PositionMessage,
    RawMessage,
    ReplayServer,
    StatusMessage,
    StreamRecorder,
    StringMessage,
    TrackingDataElement,
    TrackingDataMessage,
    TransformMessage,
    record_stream,
)
from FreehandUSLib.igtl.protocol import encode_message, pack_header
from FreehandUSLib.io import read_sequence

pytestmark = pytest.mark.timeout(60)
TIMEOUT = 10.0


def collect(client, predicate, max_messages=10_000, timeout_s=TIMEOUT):
    """Messages from ``client`` until ``predicate(messages)``; fails after ``timeout_s`` per message."""
    out = []
    while not predicate(out):
        assert len(out) < max_messages, "too many messages"
        m = client.get(timeout_s=timeout_s)
        assert m is not None, f"no message within {timeout_s} s (got {len(out)})"
        out.append(m)
    return out


def n_images(n):
    return lambda msgs: sum(isinstance(m, ImageMessage) for m in msgs) >= n


@pytest.fixture
def sequence():
    return make_stream_sequence(20, invalid_reference=[3, 4, 11])


@pytest.fixture
def replay(sequence, tmp_path):
    servers = []

    def make(**options):
        options.setdefault("port", 0)
        options.setdefault("output_dir", tmp_path)
        s = ReplayServer(options.pop("seq", sequence), **options).start()
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def clients():
    made = []

    def make(port, **options):
        c = IGTLClient("127.0.0.1", port, **options).start()
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def test_replay_streams_plus_like_messages_to_several_clients(replay, clients, sequence):
    server = replay(fps=0, wait_for_clients=2, image_to_probe=np.diag([0.2, 0.2, 1.0, 1.0]))
    a, b = clients(server.port), clients(server.port)

    def complete(ms):
        names = [m.device_name for m in ms]
        return names.count("ProbeToTracker") == 20 and names.count("ReferenceToTracker") == 17

    results = [collect(c, complete) for c in (a, b)]
    assert server.wait_finished(TIMEOUT)
    for msgs in results:
        images = [m for m in msgs if isinstance(m, ImageMessage)]
        assert [frame_index(m.frame) for m in images] == list(range(sequence.n_frames))
        assert {m.device_name for m in images} == {"Image_Reference"}
        np.testing.assert_array_equal(images[5].frame, sequence.frames[5])
        # ImageToReference = inv(ReferenceToTracker) ProbeToTracker ImageToProbe, on valid frames
        repo = sequence.repository(fixed={"ImageToProbe": np.diag([0.2, 0.2, 1.0, 1.0])})
        expected = repo.get("ImageToReference")
        assert_transforms_close(images[5].ijk_to_world, expected[5], rtol=1e-6)
        np.testing.assert_array_equal(images[3].ijk_to_world, np.eye(4))  # invalid chain
        names = [m.device_name for m in msgs if isinstance(m, TransformMessage)]
        assert names.count("ProbeToTracker") == 20
        assert names.count("ReferenceToTracker") == 17  # only valid transforms are sent
        t_image = [m.timestamp_s for m in images]
        assert np.all(np.diff(t_image) >= 0)
    assert a.stats().dropped == 0 and a.stats().stream["crc_errors"] == 0
    assert server.server.stats().clients_connected == 2


def test_header_version_1_until_the_client_speaks_2(replay, clients):
    server = replay(fps=200, loop=True, wait_for_clients=2)
    old, new = clients(server.port), clients(server.port, header_version=2)

    def data(ms):
        return [m for m in ms if isinstance(m, (ImageMessage, TransformMessage))]

    # The v2 client announces itself on connect; frames sent before that arrives are v1.
    collect(new, lambda ms: any(m.header_version == 2 for m in data(ms)), max_messages=2000)
    after = data(collect(new, lambda ms: len(data(ms)) >= 6))
    assert all(m.header_version == 2 for m in after)
    transform = next(m for m in after if isinstance(m, TransformMessage))
    assert transform.metadata == {"TransformStatus": "OK"}
    before = data(collect(old, lambda ms: len(data(ms)) >= 6))
    assert all(m.header_version == 1 and m.metadata == {} for m in before)
    assert sorted(server.server.client_header_versions().values()) == [1, 2]


@pytest.mark.parametrize("form", ["string", "command"])
def test_plus_commands(replay, clients, tmp_path, form):
    server = replay(fps=200, loop=True, wait_for_clients=1)
    client = clients(server.port, header_version=2 if form == "command" else 1)
    assert client.wait_for_state("connected", TIMEOUT)
    reply = client.command("RequestChannelIds", form=form)
    assert reply.ok and reply.message == "TrackedVideoStream"
    reply = client.command("RequestDeviceIds", form=form)
    assert reply.ok and "CaptureDevice" in reply.message.split(",")
    reply = client.command("RequestDeviceIds", form=form, DeviceType="VirtualCapture")
    assert reply.ok and reply.message == "CaptureDevice"
    reply = client.command("RequestDeviceIds", form=form, DeviceType="NoSuchType")
    assert not reply.ok and "Unknown device type" in (reply.message + reply.error)

    reply = client.command("StartRecording", form=form, OutputFilename="../escape.igs.mhd")
    assert reply.ok and reply.message == str(tmp_path / "escape.igs.mhd")
    again = client.command("StartRecording", form=form)
    assert not again.ok and "already in progress" in again.message + again.error
    seen = client.stats().by_type.get("IMAGE", 0)
    assert client.wait_for(lambda s: s.by_type.get("IMAGE", 0) >= seen + 10, TIMEOUT)
    reply = client.command("StopRecording", form=form)
    assert reply.ok and reply.message == str(tmp_path / "escape.igs.mhd")
    recorded = read_sequence(tmp_path / "escape.igs.mhd")
    assert recorded.n_frames >= 5
    assert not client.command("StopRecording", form=form).ok

    reply = client.command("NoSuchCommand", form=form)
    assert not reply.ok and "Unknown command: NoSuchCommand" in reply.message + reply.error
    if form == "command":
        assert reply.name == "NoSuchCommand" and reply.metadata["Status"] == "FAIL"


def test_reconstruct_volume_command_fails_clearly_without_a_reconstructor(replay, clients):
    # the transport knows nothing of reconstruction: a server given no reconstruct_command
    # answers FAIL and lists no VolumeReconstructorDevice
    server = replay(fps=100, loop=True)
    client = clients(server.port)
    assert client.wait_for_state("connected", TIMEOUT)
    reply = client.command("ReconstructVolume", OutputVolFilename="v.mha")
    assert not reply.ok and "started without a reconstructor" in reply.message
    assert "VolumeReconstructorDevice" not in client.command("RequestDeviceIds").message
    with_command = replay(fps=100, loop=True, reconstruct_command=lambda srv, attributes, context: (True, "done"))
    other = clients(with_command.port)
    assert other.wait_for_state("connected", TIMEOUT)
    assert "VolumeReconstructorDevice" in other.command("RequestDeviceIds").message
    assert other.command("ReconstructVolume").message == "done"


def test_malformed_and_repeated_command_ids(replay, clients):
    server = replay(fps=50, loop=True)
    client = clients(server.port)
    assert client.wait_for_state("connected", TIMEOUT)
    client.send(StringMessage(device_name="CMD_abc", text='<Command Name="RequestChannelIds" />'))
    ack = collect(client, lambda ms: any(isinstance(m, StringMessage) for m in ms))[-1]
    assert ack.device_name == "ACK" and "Malformed DeviceName" in ack.text and 'Status="FAIL"' in ack.text
    for _ in range(2):
        client.send(StringMessage(device_name="CMD_77", text='<Command Name="RequestChannelIds" />'))
    assert client.wait_for(lambda s: s.by_type.get("STRING", 0) >= 2, TIMEOUT)
    server.server.flush(TIMEOUT)
    assert client.command("RequestChannelIds").ok  # processed after both CMD_77
    assert server.server.stats().duplicate_commands == 1
    assert client.stats().by_type["STRING"] == 2  # ACK + one ACK_77


def test_keepalive_when_idle(clients):
    with IGTLServer("127.0.0.1", 0, keepalive_interval_s=0.05) as server:
        client = clients(server.port)
        msgs = collect(client, lambda ms: len(ms) >= 3)
        assert all(isinstance(m, StatusMessage) and m.code == 1 and m.device_name == "" for m in msgs)
        assert server.stats().keepalives >= 3


def test_get_status_is_answered(clients):
    with IGTLServer("127.0.0.1", 0, keepalive_interval_s=60) as server:
        client = clients(server.port)
        assert client.wait_for_state("connected", TIMEOUT)
        client.send(RawMessage(type_name="GET_STATUS", device_name="ping"))
        reply = client.get(timeout_s=TIMEOUT)
        assert isinstance(reply, StatusMessage) and reply.code == 1
        assert server.stats().keepalives == 0


def test_other_message_types_reach_the_client(clients):
    with IGTLServer("127.0.0.1", 0) as server:
        client = clients(server.port)
        assert server.wait_for_clients(1, TIMEOUT)
        m = np.eye(4)
        m[:3, 3] = [1, 2, 3]
        server.broadcast([
            TrackingDataMessage(elements=[TrackingDataElement("StylusToTracker", m)], device_name="Tracker"),
            PositionMessage(position=[4, 5, 6], device_name="StylusTip"),
            StringMessage(text="hello", device_name="Note"),
        ])  # fmt: skip
        msgs = collect(client, lambda ms: len([x for x in ms if not isinstance(x, StatusMessage)]) >= 3)
        kinds = {type(x).__name__ for x in msgs}
        assert {"TrackingDataMessage", "PositionMessage", "StringMessage"} <= kinds


def test_state_callbacks_disconnect_and_reconnect(clients):
    events = []
    lock = threading.Lock()

    def on_state(state, detail):
        with lock:
            events.append((state, detail))

    first = IGTLServer("127.0.0.1", 0).start()
    port = first.port
    client = clients(port, on_state=on_state, reconnect_delay_s=0.02, reconnect_max_delay_s=0.1)
    assert client.wait_for_connects(1, TIMEOUT)
    first.stop()
    assert client.wait_for_state(("disconnected", "connecting"), TIMEOUT)
    second = IGTLServer("127.0.0.1", port).start()
    try:
        assert client.wait_for_connects(2, TIMEOUT)
        assert second.wait_for_clients(1, TIMEOUT)
    finally:
        second.stop()
    states = [s for s, _ in events]
    assert states[:2] == ["connecting", "connected"]
    assert "disconnected" in states[2:] and states.count("connected") >= 2
    assert client.stats().disconnects >= 1
    client.close()
    assert client.state == "closed" and events[-1][0] == "closed"
    assert client.get(timeout_s=0.01) is None


def test_stalled_server_is_dropped_and_reconnected(clients):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(TIMEOUT)
    done = threading.Event()
    accepted = []

    def stall():
        try:
            for _ in range(2):
                conn, _ = listener.accept()
                accepted.append(conn)
                # half a message, then silence
                conn.sendall(pack_header(1, "IMAGE", "Image", 1.0, 1000, 0) + b"\x00" * 10)
            done.wait(TIMEOUT)
        except OSError:
            pass

    thread = threading.Thread(target=stall, daemon=True)
    thread.start()
    try:
        client = clients(listener.getsockname()[1], stall_timeout_s=0.3, reconnect_delay_s=0.02)
        assert client.wait_for_connects(2, TIMEOUT)
        stats = client.stats()
        assert "stalled" in stats.last_disconnect_reason
        assert stats.received == 0
    finally:
        done.set()
        for conn in accepted:
            conn.close()
        listener.close()
        thread.join(TIMEOUT)


def test_slow_consumer_has_bounded_memory_and_counted_drops(clients):
    with IGTLServer("127.0.0.1", 0, keepalive_interval_s=60) as server:
        client = clients(server.port, queue_size=20)
        assert server.wait_for_clients(1, TIMEOUT)
        for i in range(300):
            server.broadcast([TransformMessage(device_name=f"T{i}To{i}")])
        assert client.wait_for(lambda s: s.received >= 300, TIMEOUT)
        stats = client.stats()
        assert (stats.received, stats.dropped, stats.queued, stats.max_queued) == (300, 280, 20, 20)
        kept = client.drain()
        assert [m.device_name for m in kept] == [f"T{i}To{i}" for i in range(280, 300)]  # newest kept

        client2 = clients(server.port, queue_size=1000, queue_bytes=50_000)
        assert server.wait_for_clients(2, TIMEOUT)
        frame = np.zeros((100, 100), np.uint8)  # 10 kB each
        for _ in range(30):
            server.broadcast([ImageMessage.from_frame(frame, device_name="Image")])
        assert client2.wait_for(lambda s: s.received >= 30, TIMEOUT)
        stats = client2.stats()
        assert stats.queued_bytes <= 50_000 and stats.queued == 4 and stats.dropped == 26


def test_refused_connection_gives_up_after_max_attempts():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        client = IGTLClient("127.0.0.1", port, max_connect_attempts=3, reconnect_delay_s=0.01).start()
        try:
            assert client.wait_for_state("closed", TIMEOUT)
            assert client.stats().failed_connects == 3 and client.stats().connects == 0
            with pytest.raises(IGTLConnectionError, match="not connected"):
                client.send(StatusMessage())
        finally:
            client.close()


def test_command_without_reply_times_out(clients):
    with IGTLServer("127.0.0.1", 0, command_handler=None) as server:
        client = clients(server.port)
        assert client.wait_for_state("connected", TIMEOUT)
        server.stop()
        with pytest.raises((CommandTimeoutError, IGTLConnectionError)):
            client.command("RequestChannelIds", timeout_s=0.3)


def test_silent_server_command_timeout():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = IGTLClient("127.0.0.1", listener.getsockname()[1]).start()
    try:
        conn, _ = listener.accept()
        assert client.wait_for_state("connected", TIMEOUT)
        with pytest.raises(CommandTimeoutError, match="no reply to RequestDeviceIds"):
            client.command("RequestDeviceIds", timeout_s=0.2)
        conn.close()
    finally:
        client.close()
        listener.close()


def test_port_in_use_and_bad_options():
    with IGTLServer("127.0.0.1", 0) as server:
        with pytest.raises(FreehandUSError, match="cannot listen"):
            IGTLServer("127.0.0.1", server.port).start()
    with pytest.raises(ValueError, match="queue_size"):
        IGTLClient(queue_size=0)
    with pytest.raises(ValueError, match="header_version"):
        IGTLClient(header_version=3)
    with pytest.raises(ValueError, match="fps"):
        ReplayServer(make_stream_sequence(2), fps=-1)
    with pytest.raises(ValueError, match="timestamps"):
        ReplayServer(make_stream_sequence(2), timestamps="wall")


def test_replay_rejects_unresolvable_or_long_transform_names():
    seq = make_stream_sequence(2)
    with pytest.raises(FreehandUSError, match="cannot stream transform 'StylusToTracker'"):
        ReplayServer(seq, transform_names=["StylusToTracker"])
    with pytest.raises(FreehandUSError, match="longer than"):
        ReplayServer(seq, transform_names=["ProbeToTracker"], image_name="AVeryLongImageName", embedded_frame="Tracker",
                     image_to_probe=np.eye(4))  # fmt: skip


def test_zero_timestamps_are_recorded_with_arrival_time(clients, tmp_path):
    with IGTLServer("127.0.0.1", 0) as server:
        client = clients(server.port)
        assert server.wait_for_clients(1, TIMEOUT)
        recorder = StreamRecorder(tmp_path / "z.igs.mhd")
        for i in range(5):
            server.broadcast([
                ImageMessage.from_frame(np.full((8, 8), i, np.uint8), device_name="Image_Reference"),
                TransformMessage(device_name="ProbeToTracker"),
            ])  # fmt: skip
        msgs = collect(client, lambda ms: len([m for m in ms if not isinstance(m, StatusMessage)]) >= 10)
        for m in msgs:
            recorder.add(m)
        summary = recorder.close()
    seq = read_sequence(tmp_path / "z.igs.mhd")
    assert summary.frames == 5 and summary.zero_timestamps == 10
    assert np.all(np.diff(seq.timestamps_s) >= 0) and seq.timestamps_s[0] > 1e9  # arrival times
    assert seq.transforms["ProbeToTracker"].valid.all()


def test_invalid_transforms_end_to_end(replay, sequence, tmp_path):
    server = replay(fps=0, timestamps="original")
    summary = record_stream("127.0.0.1", server.port, tmp_path / "r.igs.mhd", frames=sequence.n_frames)
    got = read_sequence(tmp_path / "r.igs.mhd")
    assert summary.frames == sequence.n_frames and summary.dropped == 0
    np.testing.assert_array_equal(
        got.transforms["ReferenceToTracker"].valid, sequence.transforms["ReferenceToTracker"].valid
    )
    assert summary.invalid_frames["ReferenceToTracker"] == 3
    np.testing.assert_allclose(got.timestamps_s, sequence.timestamps_s, atol=1e-9)


def test_record_stream_without_server_raises(tmp_path, caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with pytest.raises(IGTLConnectionError, match="no OpenIGTLink server answered"):
            record_stream("127.0.0.1", port, tmp_path / "x.igs.mhd", frames=1, connect_timeout_s=0.3)
        with caplog.at_level("WARNING", logger="FreehandUSLib.igtl.recorder"):
            with pytest.raises(IGTLConnectionError, match="within 1.5 s"):
                record_stream("127.0.0.1", port, tmp_path / "x.igs.mhd", frames=1, connect_timeout_s=1.5)
        # while it waits, it says so
        said = [r.getMessage().split(" (")[0] for r in caplog.records]
        assert said == [f"no OpenIGTLink server at 127.0.0.1:{port} yet"]
        assert not (tmp_path / "x.igs.mhd").exists()
    with pytest.raises(ValueError, match="duration_s or frames"):
        record_stream("127.0.0.1", 1, tmp_path / "x.igs.mhd")


def test_corrupt_bytes_from_a_server_are_counted_not_fatal(clients):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = clients(listener.getsockname()[1])
    conn, _ = listener.accept()
    try:
        good = encode_message(StringMessage(text="ok", device_name="A"))
        bad = bytearray(encode_message(StringMessage(text="bad", device_name="B")))
        bad[-1] ^= 1
        conn.sendall(good + bytes(bad) + b"\xff" * 100 + good)
        msgs = collect(client, lambda ms: len(ms) >= 2)
        assert [m.device_name for m in msgs] == ["A", "A"]
        stats = client.stats()
        assert stats.stream["crc_errors"] == 1 and stats.stream["resyncs"] == 1 and client.connected
    finally:
        conn.close()
        listener.close()
