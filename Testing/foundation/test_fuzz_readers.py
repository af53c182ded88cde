"""Property-based fuzzing of the four file readers (issue 21).

Each reader (PLUS sequence metafile / MetaImage volume, NRRD sequence and volume, TUS-REC HDF5,
PLUS XML configuration) is fed mutated versions of real PLUS files (``../shared/data/plus``, used
when present) and of small files this module writes itself (so the suite also runs without the
shared data). The property: every outcome is a parsed result or one of the project's own errors
(:class:`FreehandUSError`) whose message is one line, of bounded length, without numpy reprs; no
``MemoryError`` (the readers run in a worker process whose address space is limited to what it
uses after start-up plus ``FREEHANDUS_FUZZ_MEMORY_MIB``, 1024 by default), no crash and no case
slower than ``FREEHANDUS_FUZZ_TIMEOUT_S`` (15 s by default, generous for a loaded CI machine; the
worker is killed and restarted; cases over 3 s are counted as "slow" in the summary).

Mutations: a header line's value replaced by an "interesting" token (huge, negative, NaN,
thousands of digits, a path outside the folder, a device file, another format's keyword), header
lines deleted, duplicated or inserted, bytes overwritten, inserted, deleted or repeated, the file
truncated, a compression bomb appended, an XML entity expansion prepended; 1 to 4 per case.

Environment:

- ``FREEHANDUS_FUZZ_CASES``: cases per reader (default 300: the four readers together take
  well under a few minutes on two cores); ``FREEHANDUS_FUZZ_SEED``: Hypothesis seed (default 21, so the
  normal run is reproducible; give a fresh one for a hand run).
- ``FREEHANDUS_FUZZ_KEEP_GOING=1``: do not stop at the first failing case; count every outcome
  and fail at the end. ``FREEHANDUS_FUZZ_REPORT=<file>``: append one JSON line per reader with the
  counts (cases, parsed, errors, unexpected, memory, hangs, crashes, bad messages) and the first
  failures. ``FREEHANDUS_FUZZ_SAVE=<folder>``: keep a copy of every failing case there.

A hand run with 2,000 cases per reader and a fresh seed::

    FREEHANDUS_FUZZ_CASES=2000 FREEHANDUS_FUZZ_SEED=$RANDOM FREEHANDUS_FUZZ_KEEP_GOING=1 \\
    FREEHANDUS_FUZZ_REPORT=fuzz.jsonl python -m pytest -q -s Testing/foundation/test_fuzz_readers.py
"""

from __future__ import annotations

import collections
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from testdata import PLUS_CONFIGS, PLUS_IMAGES, make_synthetic_sequence

import FreehandUSLib
from FreehandUSLib import Volume
from FreehandUSLib.io.metaimage import write_sequence_metafile, write_volume_metafile
from FreehandUSLib.io.nrrd_io import write_sequence_nrrd, write_volume_nrrd
from FreehandUSLib.io.tusrec import write_tusrec_h5

CASES = int(os.environ.get("FREEHANDUS_FUZZ_CASES", "300"))
SEED = int(os.environ.get("FREEHANDUS_FUZZ_SEED", "21"))
TIMEOUT_S = float(os.environ.get("FREEHANDUS_FUZZ_TIMEOUT_S", "15"))
SLOW_S = 3.0  # cases slower than this are counted ("slow") in the summary
HEADROOM_BYTES = int(os.environ.get("FREEHANDUS_FUZZ_MEMORY_MIB", "1024")) << 20
KEEP_GOING = os.environ.get("FREEHANDUS_FUZZ_KEEP_GOING", "") not in ("", "0")
REPORT = os.environ.get("FREEHANDUS_FUZZ_REPORT")
SAVE = os.environ.get("FREEHANDUS_FUZZ_SAVE")
WORKER = Path(__file__).with_name("fuzz_worker.py")
MAX_MESSAGE_CHARS = 1000
pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the worker limits its memory with /proc and RLIMIT_AS (Linux)"
)

#: Signs of a message that echoes a numpy repr instead of a plain number.
_NUMPY_REPR = re.compile(r"np\.(int|uint|float|bool|str)\w*\(|array\(")


# ------------------------------------------------------------------------------------------------
# the worker process


class FuzzWorker:
    """A reader process with a limited address space, restarted after a hang or a crash."""

    def __init__(self):
        self.proc = None
        self.answers: queue.Queue = queue.Queue()
        self.start()

    def start(self):
        env = dict(os.environ)
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = "1"
        # the worker imports FreehandUSLib from where this process found it
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(Path(FreehandUSLib.__file__).resolve().parents[1]), env.get("PYTHONPATH")) if p
        )
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(HEADROOM_BYTES)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=str(WORKER.parent),
        )
        self.answers = queue.Queue()
        threading.Thread(target=self._pump, args=(self.proc, self.answers), daemon=True).start()
        ready = self.answers.get(timeout=120)
        assert ready == {"ready": True}, ready

    @staticmethod
    def _pump(proc, answers):
        for line in proc.stdout:
            answers.put(json.loads(line))
        answers.put(None)  # the process ended

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()
            self.proc.stdin.close()
            self.proc.stdout.close()

    def ask(self, reader: str, path: Path) -> dict:
        start = time.monotonic()
        try:
            self.proc.stdin.write(json.dumps({"reader": reader, "path": str(path)}) + "\n")
            self.proc.stdin.flush()
            answer = self.answers.get(timeout=sys.modules[__name__].TIMEOUT_S)
        except queue.Empty:
            answer = {"outcome": "hang", "message": f"no answer within {TIMEOUT_S:g} s"}
        except BrokenPipeError:
            answer = None
        if answer is None:
            answer = {"outcome": "crash", "message": f"worker exited with {self.proc.poll()}"}
        if answer["outcome"] in ("hang", "crash"):
            self.stop()
            self.start()
        answer["seconds"] = time.monotonic() - start
        return answer


@pytest.fixture(scope="module")
def worker():
    w = FuzzWorker()
    yield w
    w.stop()


# ------------------------------------------------------------------------------------------------
# seeds: real PLUS files when present, and small files written here


class Seed:
    """One or more files (name -> bytes); ``main`` is the one read, ``reader`` the entry point."""

    def __init__(self, label: str, reader: str, main: str, files: dict[str, bytes]):
        self.label, self.reader, self.main, self.files = label, reader, main, files


def _header_end(name: str, blob: bytes) -> int:
    """Bytes of text header at the start of ``blob`` (the whole file for XML/HDF5)."""
    lower = name.lower()
    if lower.endswith((".mha", ".mhd")):
        at = blob.find(b"ElementDataFile")
        return len(blob) if at < 0 else blob.find(b"\n", at) + 1 or len(blob)
    if lower.endswith((".nrrd", ".nhdr")):
        at = blob.find(b"\n\n")
        return len(blob) if at < 0 else at + 2
    return len(blob)


def _seed_from_folder(label: str, reader: str, folder: Path, main: str) -> Seed:
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
    return Seed(label, reader, main, files)


def _written(tmp: Path, label: str, reader: str, main: str, write) -> Seed:
    folder = tmp / label
    folder.mkdir()
    write(folder / main)
    return _seed_from_folder(label, reader, folder, main)


def _small_volume() -> Volume:
    rng = np.random.default_rng(3)
    return Volume(
        voxels=rng.integers(0, 255, (5, 6, 7), dtype=np.uint8),
        spacing_mm=(0.5, 0.6, 0.7),
        origin_mm=(1.0, -2.0, 3.0),
        directions=np.eye(3),
        metadata={"Note": "fuzz"},
    )


def _real(path: Path, reader: str) -> Seed | None:
    if not path.is_file():
        return None
    return Seed(f"real:{path.name}", reader, path.name, {path.name: path.read_bytes()})


def metafile_seeds(tmp: Path) -> list[Seed]:
    seq = make_synthetic_sequence(4, 12, 16)
    seeds = [
        _written(tmp, "mha-raw", "sequence", "s.igs.mha", lambda p: write_sequence_metafile(seq, p)),
        _written(tmp, "mha-zlib", "sequence", "s.igs.mha", lambda p: write_sequence_metafile(seq, p, compress=True)),
        _written(tmp, "mhd-raw", "sequence", "s.igs.mhd", lambda p: write_sequence_metafile(seq, p)),
        _written(tmp, "mhd-zraw", "sequence", "s.igs.mhd", lambda p: write_sequence_metafile(seq, p, compress=True)),
        _written(
            tmp,
            "mha-float-rgb",
            "sequence",
            "f.igs.mha",
            lambda p: write_sequence_metafile(make_synthetic_sequence(3, 6, 5, dtype=np.float32, n_channels=3), p),
        ),
        _written(tmp, "vol-mha", "volume", "v.mha", lambda p: write_volume_metafile(_small_volume(), p)),
        _written(tmp, "vol-mhd-z", "volume", "v.mhd", lambda p: write_volume_metafile(_small_volume(), p, compress=True)),
    ]
    # the shape of the 174-byte file: a transform, no timestamps, a few bytes of pixels
    tiny = (
        b"ObjectType = Image\nNDims = 3\nCompressedData = False\nDimSize = 2 2 2\n"
        b"ElementType = MET_UCHAR\nSeq_Frame0000_ProbeToTrackerTransform = 1 0 0 0 0 1 0 0 0 0 1 0 0 0 0 1\n"
        b"ElementDataFile = LOCAL\n" + bytes(range(8))
    )
    seeds.append(Seed("tiny-no-timestamps", "sequence", "t.igs.mha", {"t.igs.mha": tiny}))
    for path in sorted(PLUS_IMAGES.glob("*.mha")) if PLUS_IMAGES.is_dir() else []:
        seeds.append(_real(path, "volume" if "volumeRef" in path.name else "sequence"))
    return seeds


def nrrd_seeds(tmp: Path) -> list[Seed]:
    seq = make_synthetic_sequence(4, 12, 16)
    seeds = [
        _written(tmp, "nrrd-gz", "sequence", "s.igs.nrrd", lambda p: write_sequence_nrrd(seq, p)),
        _written(tmp, "nrrd-raw", "sequence", "s.igs.nrrd", lambda p: write_sequence_nrrd(seq, p, compress=False)),
        _written(tmp, "seq-nrrd", "sequence", "s.seq.nrrd", lambda p: write_sequence_nrrd(seq, p)),
        _written(tmp, "nhdr-raw", "sequence", "s.seq.nhdr", lambda p: write_sequence_nrrd(seq, p, compress=False)),
        _written(
            tmp,
            "nrrd-rgb",
            "sequence",
            "c.igs.nrrd",
            lambda p: write_sequence_nrrd(make_synthetic_sequence(3, 6, 5, n_channels=3), p),
        ),
        _written(tmp, "vol-nrrd", "volume", "v.nrrd", lambda p: write_volume_nrrd(_small_volume(), p)),
        _written(tmp, "vol-nhdr", "volume", "v.nhdr", lambda p: write_volume_nrrd(_small_volume(), p, compress=False)),
    ]
    tiny = (
        b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 2 2\nkinds: domain domain list\nencoding: raw\n"
        b"Seq_Frame0000_ProbeToTrackerTransform:=1 0 0 0 0 1 0 0 0 0 1 0 0 0 0 1\n\n" + bytes(range(8))
    )
    seeds.append(Seed("tiny-no-timestamps", "sequence", "t.igs.nrrd", {"t.igs.nrrd": tiny}))
    real = PLUS_IMAGES / "NwirePhantomFreehand.igs.nrrd"
    if real.is_file():
        seeds.append(_real(real, "sequence"))
        from FreehandUSLib.io import read_sequence

        first = read_sequence(real)[:4]  # real frames and transforms in a Slicer .seq.nrrd
        seeds.append(_written(tmp, "real-seq-nrrd", "sequence", "n.seq.nrrd", lambda p: write_sequence_nrrd(first, p)))
    return seeds


def tusrec_seeds(tmp: Path) -> list[Seed]:
    seq = make_synthetic_sequence(4, 12, 16)
    frames = seq.frames
    tforms = seq.transforms["ProbeToTracker"].matrices.astype(np.float32)

    def plain(p):
        with h5py.File(p, "w") as h5:
            h5.create_dataset("frames", data=frames)
            h5.create_dataset("tforms", data=tforms)

    def external(p):
        (p.parent / "pixels.raw").write_bytes(frames.tobytes())
        with h5py.File(p, "w") as h5:
            h5.create_dataset("frames", shape=frames.shape, dtype=np.uint8, external=[("pixels.raw", 0, frames.nbytes)])
            h5.create_dataset("tforms", data=tforms)

    def linked(p):
        with h5py.File(p, "w") as h5:
            h5.create_dataset("scan/frames", data=frames, chunks=(1, 12, 16), compression="gzip")
            h5["frames"] = h5py.SoftLink("/scan/frames")
            h5.create_dataset("tforms", data=tforms, compression="lzf")

    seeds = [
        _written(tmp, "h5-tusrec", "sequence", "s.h5", lambda p: write_tusrec_h5(seq, p)),
        _written(tmp, "h5-plain", "sequence", "s.h5", plain),
        _written(tmp, "h5-external", "sequence", "s.h5", external),
        _written(tmp, "h5-links", "sequence", "s.h5", linked),
    ]
    real = PLUS_IMAGES / "SpinePhantomFreehand.igs.mha"
    if real.is_file():
        from FreehandUSLib.io import read_sequence

        first = read_sequence(real)[:3]  # real PLUS frames and ProbeToTracker as a TUS-REC scan
        seeds.append(_written(tmp, "real-h5", "sequence", "spine.h5", lambda p: write_tusrec_h5(first, p)))
    return seeds


_CONFIG = """<PlusConfiguration version="2.1">
  <DataCollection StartupDelaySec="1.0">
    <DeviceSet Name="fuzz" Description="synthetic"/>
    <Device Id="TrackerDevice" Type="FakeTracker"/>
  </DataCollection>
  <CoordinateDefinitions>
    <Transform From="Image" To="Probe" Matrix="0.1 0 0 10  0 0.1 0 20  0 0 0.1 30  0 0 0 1" Error="0.5" Date="2024"/>
    <Transform From="Phantom" To="Reference" Matrix="1 0 0 0 0 1 0 0 0 0 1 0 0 0 0 1"/>
  </CoordinateDefinitions>
  <Segmentation ApproximateSpacingMmPerPixel="0.078" MorphologicalOpeningCircleRadiusMm="0.27"
    MorphologicalOpeningBarSizeMm="2.0" ClipRectangleOrigin="27 27" ClipRectangleSize="766 562"
    MaxLinePairDistanceErrorPercent="10" AngleToleranceDegrees="10" MaxAngleDifferenceDegrees="10"
    MinThetaDegrees="-70" MaxThetaDegrees="70" MaxLineShiftMm="10.0" ThresholdImagePercent="10"
    CollinearPointsMaxDistanceFromLineMm="0.6" UseOriginalImageIntensityForDotIntensityScore="FALSE"/>
  <VolumeReconstruction OutputSpacing="0.5 0.5 0.5" ClipRectangleOrigin="0 0" ClipRectangleSize="820 616"
    Interpolation="LINEAR" Optimization="FULL" CompoundingMode="MEAN" FillHoles="ON" NumberOfThreads="1">
    <HoleFilling><HoleFillingElement Type="STICK" StickLengthLimit="9" NumberOfSticksToUse="1"/></HoleFilling>
  </VolumeReconstruction>
</PlusConfiguration>
"""


def plus_config_seeds(tmp: Path) -> list[Seed]:
    seeds = [Seed("config-synthetic", "plus_config", "c.xml", {"c.xml": _CONFIG.encode()})]
    for path in sorted(PLUS_CONFIGS.glob("*.xml")) if PLUS_CONFIGS.is_dir() else []:
        seeds.append(_real(path, "plus_config"))
    return seeds


# ------------------------------------------------------------------------------------------------
# mutations

_BIG = "9" * 5000
TOKENS = [
    "", "0", "-1", "1", "2", "3", "255", "65536", "2147483648", "4294967296", "18446744073709551616",
    "99999999999", "1" * 24, _BIG, "1e308", "-1e308", "nan", "inf", "-inf", "1e-300", "x" * 100_000,
    "/etc/passwd", "../../../../../../etc/passwd", "../outside.raw", "/dev/zero", "/dev/urandom", "/proc/self/mem",
    "LOCAL", "LIST", "%d.raw 1 3 1", "True", "False", "MET_DOUBLE", "MET_FLOAT", "MET_SHORT", "MET_CHAR",
    "MET_UCHAR", "MET_STRING", "raw", "gzip", "bzip2", "ascii", "hex", "big", "little", "list", "domain",
    "vector", "none", "(1,0) (0,1) none", "(nan,nan,nan)", "()", "MF", "UN", "XY", "OK", "INVALID",
    "4294967296 4294967296 3", "1 1 100000000", "100000 100000 100000", "0 0 0", "0 0 1000000000000",
    "1 0 0 0 0 1 0 0 0 0 1 0 0 0 0 1", " ".join(["nan"] * 16), "\x00", "\u00e9", "<", "&lol;", "&amp;",
]
_ENTITY_BOMB = (
    b'<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lollollollollollollollollollol">'
    + b"".join(
        f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">'.encode()
        for i in range(1, 10)
    )
    + b"]>\n"
)


def _bomb(kind: str) -> bytes:
    """64 MiB of zeros compressed (~64 kB): zlib for metafiles, gzip for NRRD."""
    wbits = zlib.MAX_WBITS | (16 if kind == "gzip" else 0)
    compressor = zlib.compressobj(9, zlib.DEFLATED, wbits)
    block = bytes(1 << 20)
    return b"".join(compressor.compress(block) for _ in range(64)) + compressor.flush()


_BOMBS = {}


def bomb(kind: str) -> bytes:
    if kind not in _BOMBS:
        _BOMBS[kind] = _bomb(kind)
    return _BOMBS[kind]


#: Header fields whose values size or locate the data, per format (the "field" mutation picks
#: one, replaces its value or adds it).
FIELDS = {
    "metafile": [
        "DimSize", "NDims", "ElementNumberOfChannels", "ElementType", "CompressedData",
        "CompressedDataSize", "HeaderSize", "ElementDataFile", "BinaryData", "BinaryDataByteOrderMSB",
        "ElementSpacing", "Offset", "TransformMatrix", "UltrasoundImageOrientation",
        "Seq_Frame0000_ProbeToTrackerTransform", "Seq_Frame0001_Timestamp", "Seq_Frame0000_ImageStatus",
    ],
    "nrrd": [
        "sizes", "dimension", "type", "encoding", "endian", "kinds", "line skip", "byte skip",
        "data file", "space origin", "space directions", "space", "spacings", "space dimension",
        "axis 3 index values", "Seq_Frame0000_ProbeToTrackerTransform", "Seq_Frame0001_Timestamp",
        "ultrasound image orientation",
    ],
    "xml": [
        "Matrix", "OutputSpacing", "ClipRectangleOrigin", "ClipRectangleSize", "From", "To",
        "Interpolation", "CompoundingMode", "NumberOfThreads", "StickLengthLimit", "FillHoles",
        "ApproximateSpacingMmPerPixel", "EndPointFront", "EndPointBack", "ImportanceMaskFilename",
    ],
}
#: Tokens that size or locate data (drawn half the time by the "field" mutation).
SIZE_TOKENS = [
    "0", "-1", "1", "4294967296", "18446744073709551616", "99999999999", "1" * 24, _BIG,
    "4294967296 4294967296 3", "1 1 100000000", "100000 100000 100000", "0 0 1000000000000",
    "820 616 100000", "16 12 40000", "/etc/passwd", "../outside.raw", "/dev/zero", "nan", "inf", "",
]


def _field(data, name: str, blob: bytes, end: int, ops: list) -> bytes:
    """Replace the value of one important field, or add the field to the header."""
    lower = name.lower()
    kind = "xml" if lower.endswith(".xml") else "nrrd" if lower.endswith((".nrrd", ".nhdr")) else "metafile"
    key = data.draw(st.sampled_from(FIELDS[kind]), label="field")
    if data.draw(st.booleans(), label="size token"):
        token = data.draw(st.sampled_from(SIZE_TOKENS), label="token")
    else:
        token = _token(data)
    value = token.encode("utf-8", "surrogateescape")
    head, rest = blob[:end], blob[end:]
    if kind == "xml":
        pattern = re.compile(rb"\b" + re.escape(key.encode()) + rb'="[^"]*"')
        found = list(pattern.finditer(head))
        if not found:
            ops.append(f"field {key} absent")
            return blob
        m = found[data.draw(st.integers(0, len(found) - 1), label="which")]
        ops.append(f"field {key} -> {token[:40]!r}")
        return head[: m.start()] + key.encode() + b'="' + value + b'"' + head[m.end() :] + rest
    sep = b" = " if kind == "metafile" else (b":=" if key[0].isupper() or key.startswith(("axis", "ultra")) else b": ")
    pattern = re.compile(rb"(?m)^" + re.escape(key.encode()) + rb"\s*(:=|=|:)[^\n]*")
    m = pattern.search(head)
    ops.append(f"field {key} -> {token[:40]!r}")
    if m:
        return head[: m.start()] + key.encode() + sep + value + head[m.end() :] + rest
    # absent: add it as the second line (after the NRRD magic / the first metafile field)
    first = head.find(b"\n") + 1
    return head[:first] + key.encode() + sep + value + b"\n" + head[first:] + rest


def _token(data) -> str:
    if data.draw(st.integers(0, 3), label="token kind") == 0:
        numbers = data.draw(st.lists(st.integers(-3, 2**40), min_size=1, max_size=5), label="numbers")
        return " ".join(map(str, numbers))
    return data.draw(st.sampled_from(TOKENS), label="token")


def mutate(data, name: str, blob: bytes, ops: list) -> bytes:
    """Apply 1 to 4 drawn mutations to ``blob`` (the file ``name``); describe each in ``ops``."""
    for _ in range(data.draw(st.integers(1, 4), label="n mutations")):
        end = max(_header_end(name, blob), 1)
        in_header = data.draw(st.integers(0, 9), label="where") < 7
        limit = end if in_header else max(len(blob), 1)
        op = data.draw(
            st.sampled_from(
                ["field", "field", "field", "field", "strip", "strip", "frames", "frames", "value", "value",
                 "line", "byte", "bytes", "truncate", "insert", "delete", "repeat", "tail"]
            ),
            label="op",
        )
        if op == "field" and not name.lower().endswith((".h5", ".raw", ".zraw")):
            blob = _field(data, name, blob, end, ops)
        elif op == "strip" and not name.lower().endswith((".h5", ".raw", ".zraw", ".xml")):
            word = data.draw(st.sampled_from([b"_Timestamp", b"Transform", b"Status", b"Seq_Frame", b"index"]), label="strip")
            head, rest = blob[:end], blob[end:]
            blob = b"\n".join(line for line in head.split(b"\n") if word not in line) + rest
            ops.append(f"strip lines with {word.decode()}")
        elif op == "frames" and not name.lower().endswith((".h5", ".raw", ".zraw", ".xml")):
            # one size of DimSize / sizes multiplied (the frame count, usually): the sizes stay
            # plausible while the data no longer match them
            head, rest = blob[:end], blob[end:]
            m = re.search(rb"(?m)^(DimSize|sizes)\s*[=:]([^\n]*)", head)
            if m is None:
                ops.append("frames: no size field")
            else:
                values = m.group(2).split()
                which = max(len(values) - 1, 0)  # the frame axis half of the time
                if values and data.draw(st.booleans(), label="other axis"):
                    which = data.draw(st.integers(0, len(values) - 1), label="axis")
                factor = data.draw(st.sampled_from([2, 10, 1000, 10**6, 10**8, 2**32, 2**64]), label="factor")
                if values:
                    old = values[which]
                    small = old.isdigit() and len(old) < 30  # int() refuses thousands of digits
                    values[which] = str(int(old) * factor if small else factor).encode()
                line = m.group(1) + (b" = " if m.group(1) == b"DimSize" else b": ") + b" ".join(values)
                blob = head[: m.start()] + line + head[m.end() :] + rest
                ops.append(f"size {which} x{factor}")
        elif op in ("value", "line"):
            head, rest = blob[:end], blob[end:]
            lines = head.split(b"\n")
            i = data.draw(st.integers(0, max(len(lines) - 1, 0)), label="line")
            line = lines[i]
            if op == "value":
                token = _token(data).encode("utf-8", "surrogateescape")
                spans = [m.span(1) for m in re.finditer(rb'="([^"]*)"', line)]
                if spans:  # XML: one attribute value
                    a, b = spans[data.draw(st.integers(0, len(spans) - 1), label="attribute")]
                    line = line[:a] + token + line[b:]
                else:  # Key = Value, field: value, key:=value
                    sep = re.search(rb":=|=|:", line)
                    line = (line[: sep.end()] + b" " + token) if sep else token
                lines[i] = line
                ops.append(f"value of line {i} -> {token[:40]!r}")
            else:
                action = data.draw(st.sampled_from(["delete", "duplicate", "insert"]), label="line action")
                if action == "delete":
                    del lines[i]
                elif action == "duplicate":
                    lines.insert(i, line)
                else:
                    key = data.draw(
                        st.sampled_from(
                            [b"DimSize = ", b"ElementDataFile = ", b"HeaderSize = ", b"ElementNumberOfChannels = ",
                             b"data file: ", b"line skip: ", b"byte skip: ", b"space origin: ", b"sizes: ",
                             b"Seq_Frame0000_ProbeToTrackerTransform = ", b"Seq_Frame9999_Timestamp:=",
                             b"CompressedDataSize = ", b"encoding: "]
                        ),
                        label="inserted key",
                    )
                    lines.insert(i, key + _token(data).encode("utf-8", "surrogateescape"))
                ops.append(f"{action} line {i}")
            blob = b"\n".join(lines) + rest
        elif op in ("byte", "field", "strip", "frames"):
            pos = data.draw(st.integers(0, limit - 1), label="pos")
            value = data.draw(st.integers(0, 255), label="value")
            blob = blob[:pos] + bytes([value]) + blob[pos + 1 :]
            ops.append(f"byte {pos} -> {value}")
        elif op == "bytes":
            pos = data.draw(st.integers(0, limit - 1), label="pos")
            chunk = data.draw(st.binary(min_size=1, max_size=16), label="bytes")
            blob = blob[:pos] + chunk + blob[pos + len(chunk) :]
            ops.append(f"bytes at {pos}")
        elif op == "truncate":
            pos = data.draw(st.integers(0, max(len(blob) - 1, 0)), label="pos")
            blob = blob[:pos]
            ops.append(f"truncate at {pos}")
        elif op == "insert":
            pos = data.draw(st.integers(0, limit), label="pos")
            chunk = data.draw(st.binary(min_size=1, max_size=64), label="bytes")
            blob = blob[:pos] + chunk + blob[pos:]
            ops.append(f"insert at {pos}")
        elif op == "delete":
            pos = data.draw(st.integers(0, limit), label="pos")
            n = data.draw(st.integers(1, 64), label="n")
            blob = blob[:pos] + blob[pos + n :]
            ops.append(f"delete {n} at {pos}")
        elif op == "repeat":
            pos = data.draw(st.integers(0, limit), label="pos")
            n = data.draw(st.integers(1, 256), label="n")
            times = data.draw(st.integers(2, 64), label="times")
            blob = blob[:pos] + blob[pos : pos + n] * times + blob[pos + n :]
            ops.append(f"repeat {n} at {pos} x{times}")
        else:  # tail: replace what follows the header with a bomb, or prepend an entity bomb
            lower = name.lower()
            if lower.endswith(".xml"):
                blob = _ENTITY_BOMB + blob
                ops.append("entity bomb")
            elif lower.endswith((".mha", ".nrrd")):
                blob = blob[:end] + bomb("gzip" if lower.endswith(".nrrd") else "zlib")
                ops.append("compression bomb")
            else:
                blob = blob + blob[: data.draw(st.integers(0, len(blob)), label="n")]
                ops.append("tail repeated")
    return blob


# ------------------------------------------------------------------------------------------------
# the property


def _problem(answer: dict) -> str | None:
    """Why an answer breaks the property, or None."""
    outcome = answer["outcome"]
    if outcome == "parsed":
        return None
    if outcome != "error":
        return outcome
    message = answer["message"]
    if "\n" in message or len(message) > MAX_MESSAGE_CHARS or _NUMPY_REPR.search(message):
        return "bad message"
    return None


def run_fuzz(reader_name: str, seeds: list[Seed], worker: FuzzWorker, tmp_path: Path) -> None:
    seeds = [s for s in seeds if s is not None]
    counts = collections.Counter()
    per_seed = collections.Counter()  # cases per seed file
    failures = []
    case_root = tmp_path / "cases"
    (tmp_path / "outside.raw").write_bytes(bytes(4096))  # a decoy for ../outside.raw

    options = {}
    if KEEP_GOING:  # count every case; no shrinking (a failing case is recorded as it was)
        options["phases"] = [Phase.generate]

    @seed(SEED)
    @settings(
        max_examples=CASES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        **options,
    )
    @given(data=st.data())
    def one_case(data):
        chosen = data.draw(st.sampled_from(seeds), label="seed")
        target = chosen.main
        others = [n for n in chosen.files if n != chosen.main]
        if others and data.draw(st.integers(0, 4), label="mutate data file") == 0:
            target = data.draw(st.sampled_from(others), label="file")
        ops: list[str] = []
        blob = mutate(data, target, chosen.files[target], ops)
        if case_root.exists():
            shutil.rmtree(case_root)
        case_root.mkdir()
        for name, content in chosen.files.items():
            (case_root / name).write_bytes(blob if name == target else content)
        answer = worker.ask(chosen.reader, case_root / chosen.main)
        problem = _problem(answer)
        counts["cases"] += 1
        counts[answer["outcome"]] += 1
        per_seed[chosen.label] += 1
        counts["slowest_ms"] = max(counts["slowest_ms"], int(answer["seconds"] * 1000))
        if answer["seconds"] > SLOW_S:
            counts["slow"] += 1
        if problem is None:
            return
        counts["failures"] += 1
        if problem == "bad message":
            counts["bad message"] += 1
        record = {
            "problem": problem,
            "seed": chosen.label,
            "file": target,
            "ops": ops,
            "type": answer.get("type"),
            "message": (answer.get("message") or "")[:300],
            "trace": (answer.get("trace") or "")[-1500:],
        }
        failures.append(record)
        if SAVE:
            saved = Path(SAVE) / f"{reader_name}-{len(failures):04d}"
            shutil.copytree(case_root, saved, dirs_exist_ok=True)
            (saved / "case.json").write_text(json.dumps(record, indent=1))
        if not KEEP_GOING:
            pytest.fail(f"{reader_name}: {problem} on {chosen.label} after {ops}: {record['type']}: "
                        f"{record['message']}\n{record['trace']}")

    one_case()
    summary = {
        "reader": reader_name,
        "seed": SEED,
        "seeds": len(seeds),
        **counts,
        "cases_per_seed": dict(per_seed),
        "first_failures": failures[:10],
    }
    print(json.dumps({k: v for k, v in summary.items() if k not in ("first_failures", "cases_per_seed")}))
    if REPORT:
        with open(REPORT, "a", encoding="utf-8") as f:
            f.write(json.dumps(summary) + "\n")
    assert not failures, json.dumps(failures[:5], indent=1)
    assert counts["cases"] >= min(CASES, 10)


# one test per reader (the metafile reader also reads MetaImage volumes, the NRRD reader NRRD
# volumes); every test runs without the shared data and uses it when it is there


def test_fuzz_metafile_reader(worker, tmp_path_factory):
    run_fuzz("metafile", metafile_seeds(tmp_path_factory.mktemp("seeds")), worker, tmp_path_factory.mktemp("fuzz"))


def test_fuzz_nrrd_reader(worker, tmp_path_factory):
    run_fuzz("nrrd", nrrd_seeds(tmp_path_factory.mktemp("seeds")), worker, tmp_path_factory.mktemp("fuzz"))


def test_fuzz_tusrec_reader(worker, tmp_path_factory):
    run_fuzz("tusrec", tusrec_seeds(tmp_path_factory.mktemp("seeds")), worker, tmp_path_factory.mktemp("fuzz"))


def test_fuzz_plus_config_reader(worker, tmp_path_factory):
    run_fuzz("plus_config", plus_config_seeds(tmp_path_factory.mktemp("seeds")), worker, tmp_path_factory.mktemp("fuzz"))


def test_worker_reports_memory_errors_hangs_and_unexpected_exceptions(tmp_path, monkeypatch):
    """The harness itself: a MemoryError, an unexpected exception, a hang and a crash are caught."""
    monkeypatch.setattr(sys.modules[__name__], "TIMEOUT_S", 3.0)
    w = FuzzWorker()
    try:
        assert w.ask("_test_allocate", str(8 * HEADROOM_BYTES))["outcome"] == "memory"
        assert w.ask("_test_allocate", str(1 << 20))["outcome"] == "parsed"
        answer = w.ask("nonexistent", "x")
        assert answer["outcome"] == "unexpected" and answer["type"] == "KeyError"
        assert w.ask("_test_sleep", "60")["outcome"] == "hang"
        assert w.ask("_test_exit", "3")["outcome"] == "crash"
        answer = w.ask("sequence", tmp_path / "none.igs.mha")  # the restarted worker answers
        assert answer["outcome"] == "error" and _problem(answer) is None
    finally:
        w.stop()
    assert _problem({"outcome": "error", "message": "a\nb"}) == "bad message"
    assert _problem({"outcome": "error", "message": "x = np.int64(820)"}) == "bad message"
    assert _problem({"outcome": "error", "message": "x" * 2000}) == "bad message"
    assert _problem({"outcome": "memory", "message": ""}) == "memory"
