"""Faults with a real process boundary: the replay server killed mid-stream and restarted."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
from igtl_testing import (
    assert_transforms_close,
    frame_index,
    make_stream_sequence,
    running,
    serve_args,
    wait_for_port_line,
)

from FreehandUSLib.igtl import IGTLClient, StreamRecorder
from FreehandUSLib.io import read_sequence, write_sequence

pytestmark = pytest.mark.timeout(120)
TIMEOUT = 20.0


def pump(client, recorder, until, *, max_messages=20_000, timeout_s=TIMEOUT):
    """Feed the client's messages to the recorder until ``until()``; bounded in count and time."""
    deadline = time.monotonic() + timeout_s
    for _ in range(max_messages):
        if until():
            return
        assert time.monotonic() < deadline, f"condition not reached within {timeout_s} s"
        message = client.get(timeout_s=0.2)
        if message is not None:
            recorder.add(message)
    raise AssertionError("too many messages")


def check_against_source(seq, recorded, frames):
    """Every recorded frame equals its source frame (pixels, transforms where valid)."""
    for k in frames:
        i = frame_index(recorded.frames[k])
        np.testing.assert_array_equal(recorded.frames[k], seq.frames[i])
        for name, ft in seq.transforms.items():
            got = recorded.transforms[name]
            if got.valid[k]:
                assert ft.valid[i], f"frame {k} (source {i}): {name} valid but the source's is not"
                assert_transforms_close(got.matrices[k], ft.matrices[i])


def test_server_killed_mid_stream_client_reconnects_recording_stays_valid(tmp_path):
    seq = make_stream_sequence(50, 48, 64, invalid_reference=[7])
    source = write_sequence(seq, tmp_path / "source.igs.mhd", compress=False)
    events = []
    out = tmp_path / "rec.igs.mhd"
    recorder = StreamRecorder(out)
    common = ["--fps", "60", "--loop", "--timestamps", "original"]
    with running(serve_args(source, "--port", "0", *common)) as (proc, reader):
        port = wait_for_port_line(reader)
        client = IGTLClient(
            "127.0.0.1", port, reconnect_delay_s=0.05, reconnect_max_delay_s=0.2,
            on_state=lambda state, detail: events.append((state, detail)),
        ).start()  # fmt: skip
        try:
            pump(client, recorder, lambda: recorder.frames >= 25)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(TIMEOUT)
            assert client.wait_for_state(("disconnected", "connecting"), TIMEOUT)
            for message in client.drain():
                recorder.add(message)
            # What is on disk now is a valid sequence of every frame written before the kill.
            before = read_sequence(out)
            n_before = before.n_frames
            assert n_before == recorder.frames >= 25
            indices = [frame_index(f) for f in before.frames]
            assert np.all(np.diff(indices) % seq.n_frames == 1), "a frame is missing before the kill"
            check_against_source(seq, before, range(n_before))
        except BaseException:
            client.close()
            raise
    try:
        with running(serve_args(source, "--port", str(port), *common)) as (proc2, reader2):
            wait_for_port_line(reader2)
            assert client.wait_for_connects(2, TIMEOUT)
            pump(client, recorder, lambda: recorder.frames >= n_before + 15)
    finally:
        client.close()
    summary = recorder.close()
    after = read_sequence(out)
    assert after.n_frames == summary.frames >= n_before + 15
    np.testing.assert_array_equal(after.frames[:n_before], before.frames)
    check_against_source(seq, after, range(after.n_frames))
    # the restarted server replays from its first frame: the pairing restarted, nothing was lost
    restart = [frame_index(f) for f in after.frames[n_before + 1 :]]
    assert restart[:3] == [0, 1, 2] or restart[:3] == [1, 2, 3]
    states = [s for s, _ in events]
    assert states.count("connected") >= 2 and "disconnected" in states
    assert client.stats().stream["crc_errors"] == 0
