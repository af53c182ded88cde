"""Build the C kernels (``native/plus_insert.c``, ``native/stick_fill.c``) into a shared library.

``python -m FreehandUSLib.reconstruction.native_build`` (``make install`` runs it) compiles
:mod:`.native`'s library next to its sources, with the first C compiler found: ``$CC``, then
``cc``, ``gcc``, ``clang`` on the PATH, then the Zig toolchain from PyPI (``pip install
ziglang``, the ``native`` extra), so a machine with Python alone can build it. Without any
compiler nothing is built and reconstruction keeps using the numba kernels (same results,
slower start). Exit status 0 when built (or ``--optional`` and no compiler), 2 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .native import C_FILES, LIBRARY_NAME, NATIVE_DIR, source_hash

__all__ = ["find_compiler", "build_library", "main"]

#: IEEE double arithmetic exactly as written (no fused multiply-add, no reassociation): the
#: kernels must give numba's results bit for bit.
_FLAGS = ["-O3", "-std=c99", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math"]


def _ziglang_available() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("ziglang") is not None
    except (ImportError, ValueError):
        return False


def find_compiler() -> list[str] | None:
    """The command of the first usable C compiler (a list of words), or None."""
    cc = os.environ.get("CC")
    if cc:
        return shlex.split(cc)
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return [path]
    if _ziglang_available():
        return [sys.executable, "-m", "ziglang", "cc"]
    return None


def build_library(out_dir: Path | None = None, compiler: list[str] | None = None, *, timeout_s: float = 300.0) -> Path:
    """Compile the kernels into ``out_dir / LIBRARY_NAME`` (default: next to the sources).

    The library is written to a temporary file and moved into place, so a process that has the
    old one loaded keeps working. Raises ``RuntimeError`` with the compiler's message when the
    build fails, ``FileNotFoundError`` when there is no compiler.
    """
    compiler = compiler or find_compiler()
    if not compiler:
        raise FileNotFoundError("no C compiler: install one (apt-get install gcc) or `pip install ziglang`")
    out_dir = Path(out_dir) if out_dir is not None else NATIVE_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / LIBRARY_NAME
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = [*compiler, *_FLAGS, f'-DFH_SOURCE_HASH="{source_hash()}"', "-o", tmp,
           *(str(NATIVE_DIR / name) for name in C_FILES), "-lm"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"C compiler failed ({shlex.join(cmd)}): {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"C compiler did not finish in {timeout_s:.0f} s ({shlex.join(cmd)})") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m FreehandUSLib.reconstruction.native_build",
                                     description="Build FreehandUS's C insertion kernels (PLUS arithmetic).")
    parser.add_argument("--out-dir", type=Path, default=None, help="where to write the library (default: the package)")
    parser.add_argument("--optional", action="store_true",
                        help="exit 0 with a note when no compiler is found (numba kernels are used instead)")
    args = parser.parse_args(argv)
    try:
        path = build_library(args.out_dir)
    except FileNotFoundError as exc:
        print(f"native kernels not built: {exc}; reconstruction uses the numba kernels", file=sys.stderr)
        return 0 if args.optional else 2
    except (RuntimeError, OSError) as exc:
        print(f"native kernels not built: {exc}", file=sys.stderr)
        return 2
    print(f"built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
