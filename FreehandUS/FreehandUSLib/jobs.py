"""Long work that reports progress, can be cancelled, and leaves the scene as it was.

What the three modules use so that reconstructing, calibrating, estimating and training do not
freeze 3D Slicer and stop when the user presses Cancel. Nothing here imports ``slicer`` or
``qt``: the module's Widget owns the progress bar and the ``qt.QTimer``; the Lib owns the
rules, and the tests run them headless.

- :class:`CancelToken` -- a flag another thread (or a Cancel button) sets;
  :meth:`CancelToken.check` raises :class:`Cancelled` once it is set.
- :func:`cancellable_progress` -- wraps a ``progress(done, total)`` callback so that every
  call also checks the token (the Lib's long loops call progress every batch of frames, well
  under 0.5 s apart) and, in the GUI, lets the event loop run (``tick``).
- :func:`scene_rollback` -- a context manager: when the work inside raises (Cancelled or an
  error), every node added to the MRML scene meanwhile is removed again, so no half-made
  output stays.
- :func:`step_progress` -- the ``progress`` of one step of a longer job, scaled into the
  job's whole bar; :func:`write_cancellable` -- a file writer without a progress hook of its
  own run on a worker thread into a private folder, its files put in place only when not
  cancelled (a cancelled save leaves no file and the old file untouched).
- :class:`ProcessJob` -- a command run as a separate process (training: ``python -m
  SensorlessTrackingLib.train_job``) whose standard output is JSON lines (``{"event":
  "progress", "done": 3, "total": 10}``...); a reader thread queues them, :meth:`ProcessJob.poll`
  returns what arrived (the panel calls it from a timer), :meth:`ProcessJob.cancel` kills the
  process (its whole process group, by PID) and reaps it, so no orphan is left.

Example (in a module's Logic)
-----------------------------
>>> token = CancelToken()                     # the Cancel button calls token.cancel()
>>> with scene_rollback(slicer.mrmlScene):
...     reconstruct_browser_to_volume_node(browser, progress=cancellable_progress(bar, token))
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .errors import FreehandUSError

__all__ = [
    "Cancelled",
    "CancelToken",
    "cancellable_progress",
    "scene_rollback",
    "ProcessJob",
    "JobError",
    "ProgressRelay",
    "run_in_thread",
    "step_progress",
    "write_cancellable",
    "wait_for_event",
]

logger = logging.getLogger(__name__)


class Cancelled(FreehandUSError):
    """The user cancelled the work (nothing was written)."""


class JobError(FreehandUSError):
    """A background process failed (its last error line or exit status)."""


class CancelToken:
    """A thread-safe cancel flag (a ``threading.Event``) with a check that raises.

    Parameters
    ----------
    what : str
        What is being done, for the :class:`Cancelled` message (``"reconstruction"``).
    """

    def __init__(self, what: str = "the work"):
        self.what = what
        self._event = threading.Event()

    def cancel(self) -> None:
        """Ask the work to stop (from any thread)."""
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise :class:`Cancelled` when :meth:`cancel` was called."""
        if self._event.is_set():
            raise Cancelled(f"{self.what} was cancelled; nothing was written")

    def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` seconds for a cancel; True when cancelled."""
        return self._event.wait(timeout_s)


def cancellable_progress(progress=None, cancel: CancelToken | None = None, *, tick=None):
    """A ``progress(done, total)`` callback that also checks ``cancel`` (and runs ``tick``).

    Parameters
    ----------
    progress : callable(done, total), optional
        Forwarded every call (e.g. sets a progress bar).
    cancel : CancelToken, optional
        Checked after every call: the Lib function that called progress stops with
        :class:`Cancelled`.
    tick : callable(), optional
        Called every call before the check, e.g. ``slicer.app.processEvents`` so that the panel
        (and its Cancel button) stay responsive while the work runs on the GUI thread.

    Returns
    -------
    callable(done, total)
    """

    def report(done, total):
        if progress is not None:
            progress(done, total)
        if tick is not None:
            tick()
        if cancel is not None:
            cancel.check()

    return report


class ProgressRelay:
    """Progress reported on a worker thread, passed on by the calling thread (:func:`run_in_thread`).

    ``report`` is the worker's ``progress(done, total)``: it keeps the latest values and checks
    the token (so a worker with a progress hook stops at its next report). ``beat`` is the
    calling thread's heartbeat: it calls ``progress`` with the latest values (``(0, 1)`` before
    the first), so the panel's bar moves and its events run on the GUI thread only.
    """

    def __init__(self, progress=None, cancel: CancelToken | None = None):
        self.progress = progress
        self.cancel = cancel
        self._latest = (0, 1)

    def report(self, done, total) -> None:
        self._latest = (done, total)
        if self.cancel is not None:
            self.cancel.check()

    def beat(self) -> None:
        if self.progress is not None:
            self.progress(*self._latest)


def run_in_thread(fn, *, cancel: CancelToken, heartbeat=None, poll_s: float = 0.1, grace_s: float = 0.2):
    """Run ``fn()`` on a worker thread while this thread checks ``cancel`` every ``poll_s`` seconds.

    For a long computation that has no progress hook of its own (a model run, the speckle
    decorrelation): this thread stays free to call ``heartbeat()`` (e.g. a progress callback
    that lets Slicer's event loop run, so the Cancel button can be pressed) and stops with
    :class:`Cancelled` within ``poll_s`` of the cancel. ``fn`` must not touch MRML (it runs on
    another thread). A cancelled ``fn`` that does not check the token itself runs on to its end
    on its (daemon) thread and its result is dropped; one that checks it (e.g. a model with the
    token in its layer hooks) is given ``grace_s`` seconds to stop before this returns.

    Returns
    -------
    What ``fn()`` returned; its exception is raised here.
    """
    outcome = {}

    def target():
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001  (handed to the caller's thread)
            outcome["error"] = exc

    worker = threading.Thread(target=target, name="freehandus-work", daemon=True)
    worker.start()
    try:
        while True:  # at least one check and heartbeat, however fast fn is
            cancel.check()
            if heartbeat is not None:
                heartbeat()
            if not worker.is_alive():
                break
            worker.join(poll_s)
        cancel.check()
    except Cancelled:
        worker.join(grace_s)
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


#: The bar's length of :func:`step_progress` (per mille of the whole job).
STEP_TOTAL = 1000


def step_progress(progress, start: float, stop: float):
    """``progress(done, total)`` of one step, reported as the ``[start, stop]`` part of a whole job.

    Parameters
    ----------
    progress : callable(done, total) or None
        The whole job's callback (e.g. :func:`cancellable_progress`, which also checks the token).
    start, stop : float
        Fractions of the job (0 <= start <= stop <= 1) the step covers.

    Returns
    -------
    callable(done, total) or None
        Calls ``progress(d, STEP_TOTAL)`` with ``d`` the step's position in per mille of the
        job; None when ``progress`` is None.
    """
    if progress is None:
        return None
    if not 0.0 <= start <= stop <= 1.0:
        raise ValueError(f"step_progress: need 0 <= start <= stop <= 1, got {start}, {stop}")

    def report(done, total):
        fraction = min(max(done / total, 0.0), 1.0) if total else 1.0
        progress(int(round(STEP_TOTAL * (start + (stop - start) * fraction))), STEP_TOTAL)

    return report


def write_cancellable(write, path, *, cancel: CancelToken, heartbeat=None, poll_s: float = 0.1):
    """Run ``write(target)`` on a worker thread; its files replace those at ``path`` unless cancelled.

    For a file writer that has no progress hook (a recording's compressed metafile can take
    several seconds): ``write`` writes into a new private folder beside ``path`` (so a header
    and its data file, ``.mhd`` + ``.raw``, are written together), and only once it has ended,
    and the work was not cancelled, are its files moved next to ``path`` (``os.replace``, file
    by file). Meanwhile this thread checks ``cancel`` and calls ``heartbeat`` every ``poll_s``
    seconds (:func:`run_in_thread`). When cancelled, nothing is moved: ``path`` keeps its old
    content (or stays absent), and the worker removes the private folder when it ends. A cancel
    that comes while the files are being moved is too late: the call then returns normally.

    Parameters
    ----------
    write : callable(Path) -> Path or None
        Writes the file named like ``path`` in the folder it is given; must not touch MRML.
    path : str or Path
        The file to write.
    cancel : CancelToken

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    Cancelled
        When cancelled before the files were moved.
    """
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    lock = threading.Lock()
    state = {"published": False}

    def work():
        private = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".part", dir=folder)
        try:
            write(Path(private) / os.path.basename(path))
            with lock:
                if cancel.cancelled:
                    return None
                for name in sorted(os.listdir(private), key=lambda n: n == os.path.basename(path)):
                    os.replace(os.path.join(private, name), os.path.join(folder, name))  # the header last
                state["published"] = True
            return path
        finally:
            shutil.rmtree(private, ignore_errors=True)

    try:
        run_in_thread(work, cancel=cancel, heartbeat=heartbeat, poll_s=poll_s)
    except Cancelled:
        with lock:
            if not state["published"]:
                raise
        logger.info("%s: cancelled after it was written; kept", path)
    return Path(path)


def _node_ids(scene) -> set:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


@contextlib.contextmanager
def scene_rollback(scene):
    """Remove the nodes added to ``scene`` inside the block when the block raises.

    The exception is raised again after the removal. Nodes that existed before (e.g. a given
    output node) are not removed; the Lib functions write them only after the long part, so a
    cancel leaves them as they were.
    """
    before = _node_ids(scene)
    try:
        yield
    except BaseException:
        added = [scene.GetNodeByID(i) for i in _node_ids(scene) - before]
        for node in added:
            if node is not None and node.GetScene() is scene:
                scene.RemoveNode(node)
        if added:
            logger.info("removed %d nodes made before the work stopped", len(added))
        raise


class ProcessJob:
    """A separate process streaming JSON progress lines; cancel kills it by PID.

    Parameters
    ----------
    args : list of str
        The command, e.g. ``[sys.executable, "-m", "SensorlessTrackingLib.train_job", spec]``.
    cwd, env : optional
        As for :class:`subprocess.Popen` (``env`` extends the current environment).

    Each line the process writes to standard output that parses as a JSON object is an event
    (``event`` key: ``"progress"`` with ``done``/``total``, ``"done"``, ``"error"`` with
    ``message``...); other lines are logged. Standard error is kept (the last 50 lines) for
    the failure message.
    """

    def __init__(self, args, *, cwd=None, env=None):
        self.args = [str(a) for a in args]
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        popen_kw = {}
        if os.name == "posix":
            popen_kw["start_new_session"] = True  # its own process group: cancel kills the children too
        else:
            popen_kw["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        self._events: queue.Queue = queue.Queue()
        self._stderr: list[str] = []
        self.process = subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=cwd,
            env=full_env, text=True, bufsize=1, **popen_kw,
        )
        self.pid = self.process.pid
        self.cancelled = False
        self._readers = [
            threading.Thread(target=self._read_stdout, name=f"job-{self.pid}-out", daemon=True),
            threading.Thread(target=self._read_stderr, name=f"job-{self.pid}-err", daemon=True),
        ]
        for t in self._readers:
            t.start()

    @classmethod
    def python_module(cls, module: str, *args, python=None, pythonpath=(), env=None, **kw) -> ProcessJob:
        """Run ``python -m module args...`` with this Python (Slicer's own in Slicer).

        ``pythonpath``: folders put first on the child's ``PYTHONPATH`` (in Slicer the
        modules' folders are on ``sys.path`` only, so the caller names them).
        """
        env = dict(env or {})
        paths = [str(p) for p in pythonpath]
        if paths:
            old = env.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
            env["PYTHONPATH"] = os.pathsep.join(paths + ([old] if old else []))
        return cls([python or _python_executable(), "-m", module, *args], env=env, **kw)

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if isinstance(event, dict):
                self._events.put(event)
            else:
                logger.info("[job %d] %s", self.pid, line)
        self.process.stdout.close()

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            self._stderr.append(line.rstrip())
            del self._stderr[:-50]
        self.process.stderr.close()

    def poll(self) -> list[dict]:
        """The events that arrived since the last call (never blocks)."""
        out = []
        while True:
            try:
                out.append(self._events.get_nowait())
            except queue.Empty:
                return out

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def wait(self, timeout_s: float | None = None) -> int:
        """Wait for the process to end (and its output to be read); returns its exit status."""
        code = self.process.wait(timeout_s)
        for t in self._readers:
            t.join(timeout_s)
        return code

    def cancel(self, timeout_s: float = 5.0) -> None:
        """Stop the process: SIGTERM to its process group, SIGKILL after ``timeout_s``; reaps it."""
        if self.process.poll() is not None:
            return
        self.cancelled = True
        self._signal(signal.SIGTERM if os.name == "posix" else None)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL if os.name == "posix" else None)
            self.process.wait(timeout_s)
        for t in self._readers:
            t.join(1.0)
        logger.info("job %d cancelled", self.pid)

    def _signal(self, sig) -> None:
        if os.name != "posix":
            self.process.kill()
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def error_text(self) -> str:
        """One line saying why the process failed (its error event, else its last stderr line)."""
        code = self.process.poll()
        lines = [s for s in self._stderr if s.strip()]
        tail = lines[-1] if lines else ""
        return f"the process {self.args[2] if len(self.args) > 2 else self.args[0]} ended with status {code}" + (
            f": {tail}" if tail else ""
        )

    def __enter__(self) -> ProcessJob:
        return self

    def __exit__(self, *exc) -> bool:
        self.cancel()
        return False


def _python_executable() -> str:
    """The Python that runs this code: Slicer's ``PythonSlicer`` when inside Slicer, else sys.executable."""
    exe = sys.executable
    name = os.path.basename(exe).lower()
    if name.startswith("slicer"):  # sys.executable is the Slicer application, not a Python
        candidate = os.path.join(os.path.dirname(exe), "PythonSlicer" + (".exe" if os.name == "nt" else ""))
        if os.path.isfile(candidate):
            return candidate
    return exe


def wait_for_event(job: ProcessJob, predicate, timeout_s: float) -> dict | None:
    """Poll ``job`` until an event satisfies ``predicate`` or ``timeout_s`` passes (tests, scripts)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for event in job.poll():
            if predicate(event):
                return event
        if not job.running and job._events.empty():
            return None
        time.sleep(0.02)
    return None
