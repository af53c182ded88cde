"""Worker process of the reader fuzz suite (``test_fuzz_readers.py``); not a test module.

Run as ``python fuzz_worker.py <address-space headroom in bytes>``. After importing the readers
it limits its own address space (``RLIMIT_AS``) to what it uses now plus the headroom, so a
reader that allocates from an unchecked header number gets a ``MemoryError`` here instead of
taking the machine's memory. It then reads one JSON request per line on stdin,
``{"reader": ..., "path": ...}``, runs that reader on the file and answers one JSON line:

- ``{"outcome": "parsed", "summary": ...}``: the reader returned its result;
- ``{"outcome": "error", "type": ..., "message": ...}``: it raised FreehandUSError (expected);
- ``{"outcome": "memory", ...}``: MemoryError;
- ``{"outcome": "unexpected", "type": ..., "message": ..., "trace": ...}``: any other exception.

The parent kills and restarts the worker when an answer takes longer than its time limit (a
hang) or the worker dies (a crash).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback

from FreehandUSLib.errors import FreehandUSError
from FreehandUSLib.io import read_plus_config, read_sequence, read_volume


def _summary(result) -> str:
    frames = getattr(result, "frames", None)
    if frames is not None:
        return f"sequence {tuple(frames.shape)} {frames.dtype}"
    voxels = getattr(result, "voxels", None)
    if voxels is not None:
        return f"volume {tuple(voxels.shape)} {voxels.dtype}"
    return type(result).__name__


READERS = {
    "sequence": read_sequence,
    "volume": read_volume,
    "plus_config": read_plus_config,
    # for the suite's test of this harness: allocate n bytes, sleep n seconds, exit with n
    "_test_allocate": lambda n: bytearray(int(n)),
    "_test_sleep": lambda n: time.sleep(float(n)),
    "_test_exit": lambda n: os._exit(int(n)),
}


def _limit_address_space(headroom: int) -> None:
    with open("/proc/self/statm", encoding="ascii") as f:
        used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = used + headroom
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def main() -> int:
    _limit_address_space(int(sys.argv[1]))
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            result = READERS[request["reader"]](request["path"])
            answer = {"outcome": "parsed", "summary": _summary(result)}
            del result
        except FreehandUSError as exc:
            answer = {"outcome": "error", "type": type(exc).__name__, "message": str(exc)}
        except MemoryError as exc:
            answer = {
                "outcome": "memory",
                "type": "MemoryError",
                "message": str(exc),
                "trace": traceback.format_exc(limit=-6),
            }
        except Exception as exc:  # noqa: BLE001 - the fuzz suite reports every other exception
            answer = {
                "outcome": "unexpected",
                "type": type(exc).__name__,
                "message": str(exc)[:2000],
                "trace": traceback.format_exc(limit=-6),
            }
        print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
