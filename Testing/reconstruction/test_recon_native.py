"""The C insertion kernels (``reconstruction/native``) against the numba kernels, bit for bit.

PLUS emulation's fixed-point insertion has two implementations: numba's (``kernels_plus``,
checked pixel by pixel against PLUS's rule and against IGSIO's reference volumes) and the C
library that loads without numba. Random batches of frames (rows crossing every face of the
volume, lattice-aligned positions, skip segments, rejected pixels, part-full and saturated
buffers, uint8 / float32 / RGB, 1-3 workers) must leave identical buffers and counts.
"""

from __future__ import annotations

import numpy as np
import pytest

from FreehandUSLib.reconstruction import native
from FreehandUSLib.reconstruction import kernels as K
from FreehandUSLib.reconstruction.kernels_plus import insert_per_pixel
from FreehandUSLib.reconstruction.native_build import build_library, find_compiler


@pytest.fixture(scope="module", autouse=True)
def built_library():
    if not native.reload():
        if native.kernels_choice() == "numba":
            pytest.skip("FREEHANDUS_KERNELS=numba")
        if find_compiler() is None:
            pytest.skip("no C compiler to build the native kernels")
        build_library()
        assert native.reload(), native._state.get("reason")
    yield


def _case(rng, dtype, nc, linear):
    shape = (int(rng.integers(4, 14)), int(rng.integers(4, 14)), int(rng.integers(4, 14)))  # k, j, i
    n_rows, n_cols = int(rng.integers(3, 9)), int(rng.integers(20, 90))
    top = 255
    frames = rng.integers(0, top + 1, size=(5, n_rows, n_cols, nc)).astype(dtype)
    if dtype == np.float32:
        frames += rng.random(frames.shape).astype(np.float32)
    acc = rng.integers(0, top + 1, size=(*shape, nc)).astype(dtype)
    kind = rng.integers(0, 4)
    if kind == 0:
        weight = np.zeros(shape, np.uint16)
    elif kind == 1:
        weight = (rng.integers(0, 256, size=shape) * 256).astype(np.uint16)
    elif kind == 2:
        weight = rng.choice(np.array([0, 65279, 65280, 65535, 65024], np.uint16), size=shape)
    else:
        weight = rng.integers(0, 65536, size=shape).astype(np.uint16)
    n = int(rng.integers(1, 5))
    mats = np.empty((n, 3, 3))
    for m in range(n):
        for r, size in enumerate((shape[2], shape[1], shape[0])):
            if rng.random() < 0.4:  # lattice: positions on cell boundaries
                mats[m, r] = [rng.integers(-5, 6) / 16.0, rng.integers(-5, 6) / 16.0,
                              rng.integers(-64, 16 * size + 48) / 16.0]
            else:
                mats[m, r] = [rng.choice([0.0, rng.uniform(-0.35, 0.35), rng.uniform(-0.02, 0.02)]),
                              rng.uniform(-1.5, 1.5), rng.uniform(-4.0, size + 3.0)]
    mats = np.round(mats * 16384.0) / 16384.0
    ranges = np.zeros((2, n_rows, 4), np.int32)
    for mk in range(2):
        for y in range(n_rows):
            x0, x1 = sorted(int(v) for v in rng.integers(-1, n_cols, size=2))
            x0 = max(x0, 0)
            if rng.random() < 0.15:
                x0, x1 = 1, 0  # empty row
            s0, s1 = (sorted(int(v) for v in rng.integers(x0, max(x0, x1) + 1, size=2)) if rng.random() < 0.4
                      else (0, -1))
            ranges[mk, y] = (x0, x1, s0, s1)
    ids = rng.integers(0, 5, size=n).astype(np.int64)
    mask_ids = rng.integers(0, 2, size=n).astype(np.int64)
    return frames, ids, mats, ranges, mask_ids, acc, weight


@pytest.mark.parametrize("linear", [False, True], ids=["nearest", "linear"])
@pytest.mark.parametrize("mode", [K.MODE_MEAN_PLUS, K.MODE_MAX, K.MODE_LATEST], ids=["mean", "max", "latest"])
@pytest.mark.parametrize("dtype, nc", [(np.uint8, 1), (np.float32, 1), (np.uint8, 3)], ids=["u8", "f32", "rgb"])
def test_native_matches_numba(linear, mode, dtype, nc):
    rng = np.random.default_rng(7 + 100 * linear + 10 * mode + nc + 5 * (dtype == np.float32))
    for case in range(60):
        frames, ids, mats, ranges, mask_ids, acc, weight = _case(rng, dtype, nc, linear)
        use_reject = case % 4 == 3
        reject = float(rng.integers(0, 200))
        threads = int(rng.integers(1, 4))
        slab = None if rng.random() < 0.5 else int(rng.integers(1, 6))
        want_acc, want_w = acc.copy(), weight.copy()
        want = insert_per_pixel(frames, ids, mats, ranges, mask_ids, want_acc, want_w, mode, linear,
                                np.ones((1, 1), np.float32), use_reject, reject, threads, None, slab, True)
        got = native.insert_per_pixel_native(frames, ids, mats, ranges, mask_ids, acc, weight, mode, linear,
                                             use_reject, reject, threads, None, slab)
        where = f"case {case} ({threads} threads, slab {slab})"
        np.testing.assert_array_equal(got, want, err_msg=f"{where}: pixels per frame")
        np.testing.assert_array_equal(acc, want_acc, err_msg=f"{where}: values")
        np.testing.assert_array_equal(weight, want_w, err_msg=f"{where}: accumulation buffer")


def test_stale_library_is_not_used(tmp_path, monkeypatch):
    """A library built from other sources is refused (it would compute something else)."""
    monkeypatch.setattr(native, "source_hash", lambda: "000000000000000000000000")
    try:
        assert not native.reload()
        assert "other sources" in native._state["reason"]
    finally:
        monkeypatch.undo()
        assert native.reload()


def test_kernels_switch(monkeypatch):
    monkeypatch.setenv("FREEHANDUS_KERNELS", "numba")
    assert not native.available()
    monkeypatch.setenv("FREEHANDUS_KERNELS", "fast")
    with pytest.raises(ValueError, match="auto, native or numba"):
        native.kernels_choice()


@pytest.mark.parametrize("setting, library, message", [
    ("fast", True, "FREEHANDUS_KERNELS='fast': use auto, native or numba"),
    ("native", False, "FREEHANDUS_KERNELS=native: .* is not built"),
])
def test_cli_says_one_line_for_a_bad_kernels_setting(tmp_path, setting, library, message):
    """A wrong switch, or a required library that is missing: one line and exit 2, no traceback."""
    import re
    import subprocess
    import sys

    from recon_synthetic import linear_sweep

    from FreehandUSLib.io import write_sequence

    path = write_sequence(linear_sweep(n_frames=3, value=90), tmp_path / "s.igs.mha")
    code = ("import sys; from FreehandUSLib.reconstruction import native; "
            + ("" if library else "native.LIBRARY_NAME = 'missing.so'; ")
            + "from FreehandUSApp.cli import main; sys.exit(main(sys.argv[1:]))")
    run = subprocess.run([sys.executable, "-c", code, "reconstruct", str(path), "--spacing", "1", "--emulate-plus",
                          "--out", str(tmp_path / "v.mha")], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "FREEHANDUS_KERNELS": setting})
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), run.stderr
    assert not (tmp_path / "v.mha").exists()


def test_unsupported_cases_are_refused():
    assert not native.supports(mode=K.MODE_IMPORTANCE, fixed_point=True, unoptimized=False, frame_dtype=np.uint8)
    assert not native.supports(mode=K.MODE_MEAN_PLUS, fixed_point=True, unoptimized=True, frame_dtype=np.uint8)
    assert not native.supports(mode=K.MODE_MAX, fixed_point=False, unoptimized=False, frame_dtype=np.uint8)
    acc = np.zeros((4, 4, 4, 1), np.uint8)[:, :, ::2]
    assert not native.supports(mode=K.MODE_MAX, fixed_point=True, unoptimized=False, frame_dtype=np.uint8, acc=acc)
    with pytest.raises(ValueError, match="unsupported"):
        native.insert_per_pixel_native(np.zeros((1, 2, 2, 1), np.uint8), np.zeros(1, np.int64), np.zeros((1, 3, 3)),
                                       np.zeros((1, 2, 4), np.int32), np.zeros(1, np.int64),
                                       np.zeros((2, 2, 2, 1), np.uint8), np.zeros((2, 2, 2), np.uint16), K.MODE_MEAN,
                                       False, False, 0.0)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32], ids=["u8", "f32"])
@pytest.mark.parametrize("emulate", [True, False], ids=["plus", "exact"])
def test_native_stick_matches_numba(dtype, emulate):
    from FreehandUSLib.reconstruction.config import HoleFillingElement
    from FreehandUSLib.reconstruction.holefill import fill_holes_into
    from FreehandUSLib.reconstruction.holefill_common import STORE_FLOOR, STORE_RAW, STORE_ROUND

    rng = np.random.default_rng(11 + emulate + 2 * (dtype == np.float32))
    for case in range(25):
        shape = tuple(int(v) for v in rng.integers(3, 22, size=3))
        nc = int(rng.choice([1, 1, 3]))
        values = rng.integers(0, 256, size=(*shape, nc)).astype(dtype)
        if dtype == np.float32:
            values += rng.random(values.shape).astype(np.float32)
        known = rng.random(shape) < rng.choice([0.02, 0.1, 0.3, 0.6])
        if case % 5 == 0:  # a slab-like sweep: known planes with gaps between them
            known[:] = False
            known[:: int(rng.integers(2, 7))] = True
        elements = [HoleFillingElement(type="STICK", stick_length_limit=int(rng.integers(3, 12)),
                                       number_of_sticks_to_use=int(rng.integers(1, 5)))
                    for _ in range(int(rng.integers(1, 3)))]
        integer = dtype == np.uint8
        store = (STORE_FLOOR if emulate else STORE_ROUND) if integer else STORE_RAW
        weight = known.astype(np.float64)
        c = int(rng.integers(0, nc))
        base = rng.integers(0, 256, size=shape).astype(dtype)  # what the holes held before
        want = base.copy()
        got = base.copy()
        want_stats = fill_holes_into(want[..., None], values[..., c : c + 1], known, weight, elements, store=store,
                                     emulate_plus=emulate, integer_values=integer)
        got_stats = native.fill_holes_native(got, values, c, known, elements, store=store,
                                             n_threads=int(rng.integers(1, 4)), emulate_plus=emulate,
                                             integer_values=integer)
        np.testing.assert_array_equal(got, want, err_msg=f"case {case}: {elements}")
        assert got_stats.holes == want_stats.holes
        assert got_stats.filled_per_element == want_stats.filled_per_element, f"case {case}"


def test_native_stick_refuses_what_it_does_not_cover():
    from FreehandUSLib.reconstruction.config import HoleFillingElement

    stick = HoleFillingElement(type="STICK")
    gauss = HoleFillingElement(type="GAUSSIAN", size=3, stdev=1.0)
    values = np.zeros((4, 4, 4, 1), np.uint8)
    assert native.supports_hole_filling([stick], divide=False, values=values, out_dtype=np.uint8)
    assert not native.supports_hole_filling([stick, gauss], divide=False, values=values)
    assert not native.supports_hole_filling([stick], divide=True, values=values)
    assert not native.supports_hole_filling([stick], divide=False, values=values.astype(np.float64))
    with pytest.raises(ValueError, match="only STICK"):
        native.fill_holes_native(np.zeros((4, 4, 4), np.uint8), values, 0, np.zeros((4, 4, 4), bool), [gauss],
                                 store=0)


def test_build_without_a_compiler_says_what_to_do(tmp_path, monkeypatch, capsys):
    from FreehandUSLib.reconstruction import native_build

    monkeypatch.setattr(native_build, "find_compiler", lambda: None)
    assert native_build.main(["--out-dir", str(tmp_path), "--optional"]) == 0
    assert native_build.main(["--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("numba kernels" in line and "ziglang" in line for line in err)
    assert not list(tmp_path.iterdir())


def test_a_failing_compiler_leaves_no_library(tmp_path, monkeypatch, capsys):
    from FreehandUSLib.reconstruction import native_build

    monkeypatch.setenv("CC", "false")
    assert native_build.main(["--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "C compiler failed" in err[0]
    assert not list(tmp_path.iterdir())  # no half-written library, no temporary left
