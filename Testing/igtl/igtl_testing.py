"""Helpers of the OpenIGTLink test suite: ports, subprocesses stopped by PID, C++ peers, streams.

Every process started here is bounded in time and stopped by its PID (never by name).
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from FreehandUSLib import TrackedSequence

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = Path(__file__).resolve().parent / "build_openigtlink_examples.sh"
EXAMPLES_DIR = Path(os.environ.get("OPENIGTLINK_EXAMPLES_DIR", "/usr/share/doc/openigtlink-examples/examples"))
PYTHON = sys.executable


def free_port() -> int:
    """A TCP port that was free a moment ago (for programs that cannot bind port 0 themselves)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_stream_sequence(
    n_frames: int = 20,
    n_rows: int = 32,
    n_cols: int = 40,
    *,
    fps: float = 30.0,
    invalid_reference=(),
    seed: int = 0,
) -> TrackedSequence:
    """Frames whose first pixels encode their index (so a received frame names its source) and
    smooth ProbeToTracker/ReferenceToTracker poses; ``invalid_reference`` frames are invalid."""
    rng = np.random.default_rng(seed)
    distinct = min(n_frames, 16)  # random content is slow to make; the index pixels tell frames apart
    frames = rng.integers(0, 256, size=(distinct, n_rows, n_cols), dtype=np.uint8)
    frames = np.resize(frames, (n_frames, n_rows, n_cols))
    frames[:, 0, 0] = np.arange(n_frames) % 256
    frames[:, 0, 1] = np.arange(n_frames) // 256
    t = np.arange(n_frames) / fps
    probe = np.tile(np.eye(4), (n_frames, 1, 1))
    probe[:, :3, :3] = Rotation.from_rotvec(np.outer(np.sin(t), [0.1, 0.2, 0.3])).as_matrix()
    probe[:, :3, 3] = np.stack([100 + 20 * t, -50 + 5 * np.cos(t), 250 + 0.5 * t], axis=1)
    reference = np.tile(np.eye(4), (n_frames, 1, 1))
    reference[:, :3, :3] = Rotation.from_rotvec([0.05, -0.1, 0.2]).as_matrix()
    reference[:, :3, 3] = [12.5, 80.25, -190.0]
    ref_valid = np.ones(n_frames, dtype=bool)
    ref_valid[list(invalid_reference)] = False
    return TrackedSequence(
        frames=frames,
        timestamps_s=1000.0 + t,
        transforms={
            "ProbeToTracker": (probe, np.ones(n_frames, dtype=bool)),
            "ReferenceToTracker": (reference, ref_valid),
        },
    )


def frame_index(frame: np.ndarray) -> int:
    """The source index written into a frame by :func:`make_stream_sequence`."""
    return int(frame[0, 0]) + 256 * int(frame[0, 1])


def assert_transforms_close(actual: np.ndarray, expected: np.ndarray, *, rtol: float = 1e-6) -> None:
    """Equal within ``rtol`` of each value's magnitude (at least 1): the float32 on the wire keeps
    about 7 significant digits, so a 250 mm translation comes back within ~1e-5 mm."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    err = np.abs(actual - expected)
    bound = rtol * np.maximum(1.0, np.abs(expected))
    worst = float(np.max(err / bound)) if err.size else 0.0
    assert worst <= 1.0, f"transforms differ: max error {err.max():.3g} exceeds rtol {rtol:g} (ratio {worst:.3g})"


class LineReader:
    """Collects a subprocess's output lines on a thread so tests can wait for one with a timeout."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream) -> None:
        for line in iter(stream.readline, ""):
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, predicate, timeout_s: float) -> str | None:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                return None
            if line is None:
                return None
            if predicate(line):
                return line

    def text(self) -> str:
        return "".join(self.lines)


def stop_process(proc: subprocess.Popen, timeout_s: float = 5.0) -> None:
    """Terminate ``proc`` by its PID (SIGTERM, then SIGKILL) and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout_s)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


@contextlib.contextmanager
def running(args, *, env=None, cwd=None):
    """Start ``args`` (stdout+stderr merged, text) and always stop it by PID afterwards."""
    proc = subprocess.Popen(
        [str(a) for a in args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=cwd,
    )
    reader = LineReader(proc.stdout)
    try:
        yield proc, reader
    finally:
        stop_process(proc)


def serve_args(sequence_path, *extra) -> list:
    """Command line of the replay server run as a separate Python process."""
    return [PYTHON, "-m", "FreehandUSLib.igtl.cli", "serve", str(sequence_path), *extra]


def wait_for_port_line(reader: LineReader, timeout_s: float = 30.0) -> int:
    """The port announced by ``serve``'s first line (``serving ... on host:port (...)``)."""
    line = reader.wait_for(lambda s: s.startswith("serving "), timeout_s)
    if line is None:
        raise AssertionError(f"replay server did not start within {timeout_s} s; output:\n{reader.text()}")
    return int(line.split(" on ", 1)[1].split(" ", 1)[0].rsplit(":", 1)[1])


_BUILT: dict[str, Path] = {}


def openigtlink_examples() -> Path:
    """Folder of the built C++ example programs; skips the test when they cannot be built."""
    if "bin" in _BUILT:
        return _BUILT["bin"]
    if shutil.which("cmake") is None:
        pytest.skip("interop: cmake not installed (apt-get install cmake)")
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("interop: no C++ compiler (apt-get install g++)")
    if not EXAMPLES_DIR.is_dir():
        pytest.skip(f"interop: OpenIGTLink example sources not found in {EXAMPLES_DIR} "
                    "(apt-get install libopenigtlink-dev openigtlink-examples)")  # fmt: skip
    try:
        done = subprocess.run(
            ["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT
        )
    except subprocess.TimeoutExpired:
        pytest.fail("building the OpenIGTLink examples took more than 300 s")
    if done.returncode == 3:
        pytest.skip(f"interop: {done.stderr.strip().splitlines()[-1]}")
    if done.returncode != 0:
        pytest.fail(f"building the OpenIGTLink examples failed:\n{done.stderr[-4000:]}")
    _BUILT["bin"] = Path(done.stdout.strip().splitlines()[-1])
    return _BUILT["bin"]
