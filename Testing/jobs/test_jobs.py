"""FreehandUSLib.jobs without MRML: the cancel token, the worker thread and process jobs."""

from __future__ import annotations

import threading
import time

import pytest

from FreehandUSLib.jobs import Cancelled, CancelToken, ProcessJob, run_in_thread


def test_run_in_thread_returns_raises_and_beats():
    beat = threading.Event()

    def needs_a_beat():  # finishes only once the caller's thread has beaten
        assert beat.wait(10)
        return 42

    assert run_in_thread(needs_a_beat, cancel=CancelToken(), heartbeat=beat.set) == 42
    assert run_in_thread(lambda: 7, cancel=CancelToken()) == 7

    def fail():
        raise ValueError("inside")

    with pytest.raises(ValueError, match="inside"):
        run_in_thread(fail, cancel=CancelToken())


def test_run_in_thread_stops_within_the_poll_when_cancelled_from_another_thread():
    token = CancelToken("work")
    release = threading.Event()
    stopped = []

    def slow():  # a computation without a hook of its own
        release.wait(30)
        stopped.append(time.perf_counter())
        return "late"

    canceller = threading.Timer(0.2, token.cancel)
    started = time.perf_counter()
    canceller.start()
    try:
        with pytest.raises(Cancelled, match="work was cancelled"):
            run_in_thread(slow, cancel=token, poll_s=0.05, grace_s=0.1)
        assert time.perf_counter() - started < 1.0
    finally:
        release.set()
        canceller.cancel()
    assert not stopped or stopped[0] > started


def test_run_in_thread_waits_for_a_worker_that_checks_the_token():
    token = CancelToken()
    finished = threading.Event()

    def checking():
        while True:
            try:
                token.check()
            except Cancelled:
                finished.set()
                raise
            time.sleep(0.01)

    threading.Timer(0.1, token.cancel).start()
    with pytest.raises(Cancelled):
        run_in_thread(checking, cancel=token, poll_s=0.05, grace_s=1.0)
    assert finished.is_set()  # the worker stopped before run_in_thread returned


def test_a_process_job_that_prints_no_json_is_logged_and_ends(caplog):
    job = ProcessJob.python_module("json.tool", "--help")
    assert job.wait(60) == 0
    assert job.poll() == [] and not job.running
    job.cancel()  # a finished job: nothing to do
    assert not job.cancelled


def test_progress_relay_passes_the_workers_latest_report_on_the_callers_thread():
    from FreehandUSLib.jobs import ProgressRelay

    seen = []
    token = CancelToken()
    relay = ProgressRelay(lambda d, t: seen.append((d, t, threading.current_thread().name)), token)
    relay.beat()
    worker = threading.Thread(target=lambda: (relay.report(3, 10), relay.report(5, 10)), name="worker")
    worker.start()
    worker.join()
    relay.beat()
    main = threading.current_thread().name
    assert seen == [(0, 1, main), (5, 10, main)]
    token.cancel()
    with pytest.raises(Cancelled):
        relay.report(6, 10)  # the worker's next report stops it


def test_run_in_thread_beats_once_even_when_the_work_is_instant():
    """A cancel pressed at the first heartbeat counts even if fn finished first (nothing is kept)."""
    token = CancelToken("instant")
    beats = []

    def beat():
        beats.append(1)
        token.cancel()

    for _ in range(20):  # the worker usually ends before the first look at it
        beats.clear()
        token = CancelToken("instant")
        with pytest.raises(Cancelled):
            run_in_thread(lambda: 1, cancel=token, heartbeat=beat)
        assert beats == [1]
