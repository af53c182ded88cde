"""Test helpers for cancelling long work from another thread (issue 22, item 5)."""

from __future__ import annotations

import threading
import time

import pytest

__all__ = ["CancelOnFirstReport", "assert_cancelled_fast", "node_ids"]


def node_ids(scene) -> set:
    """IDs of every node of an MRML scene."""
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


class CancelOnFirstReport:
    """A progress callback: on its first call another thread cancels; records when that happened."""

    def __init__(self, token, *, after: int = 1):
        self.token = token
        self.after = after
        self.calls = 0
        self.cancelled_at = None

    def __call__(self, done, total):
        self.calls += 1
        if self.calls == self.after:
            def cancel():
                self.cancelled_at = time.perf_counter()
                self.token.cancel()

            worker = threading.Thread(target=cancel)
            worker.start()
            worker.join()
            assert self.token.cancelled


def assert_cancelled_fast(call, reporter: CancelOnFirstReport, limit_s: float = 1.0):
    """``call()`` raises Cancelled within ``limit_s`` of the other thread's cancel."""
    from FreehandUSLib.jobs import Cancelled

    with pytest.raises(Cancelled, match="cancelled"):
        call()
    stopped = time.perf_counter()
    assert reporter.cancelled_at is not None, "the work ended before it reported progress"
    assert stopped - reporter.cancelled_at < limit_s
