"""``freehandus serve`` and ``freehandus record``: the streaming subcommands.

:func:`add_parsers` registers both on the main ``freehandus`` parser (same conventions as
``FreehandUSApp/cli.py``: ``func`` set per subcommand, ``--json``, errors raised as
:class:`~FreehandUSLib.errors.FreehandUSError`). ``python -m FreehandUSLib.igtl.cli`` runs them
stand-alone.

``serve`` prints ``serving <file> on <host>:<port> ...`` on its first line (the real port when
``--port 0`` asked for a free one) and runs until Ctrl-C/SIGTERM, ``--duration``, or, with
``--exit-when-done``, until a non-looping replay has been sent. Listening on anything but a
loopback address prints a warning: the server has no authentication.

``record`` stops after ``--duration`` seconds or ``--frames`` frames, on Ctrl-C (exit 130) or
SIGTERM (exit 0), or when the server has been gone for ``--reconnect-timeout`` seconds (exit 1),
always leaving a valid file and printing its summary. It never replaces a file (exit 2) unless ``--overwrite`` moves the old one to a backup
folder. On a terminal it shows frames, rate, drops and reconnects as it goes (``--progress`` /
``--no-progress`` decide otherwise; ``--json`` alone turns it off); with stderr not a terminal it
prints only the summary and one line per lost/regained connection.

Every number is checked by argparse with the types of :mod:`..cli_support` (ports in 0/1 to
65535, finite times and rates, bounded waits), so a bad value is one line on stderr and exit 2
before any file is read or any connection is made.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from ..cli_support import (
    ArgumentParser,
    add_progress_option,
    float_in,
    int_in,
    non_negative_float,
    positive_float,
    positive_int,
    progress_enabled,
)
from ..errors import FreehandUSError

__all__ = ["add_parsers", "main", "serve_command", "record_command"]

logger = logging.getLogger(__name__)

_INTERRUPTED = 130  # exit status after Ctrl-C (the file is complete; SIGTERM ends with 0)


@contextlib.contextmanager
def _stop_on_signals(event: threading.Event):
    """Set ``event`` on SIGTERM/SIGINT (main thread only); restore the handlers afterwards.

    Yields a list that receives the signal numbers caught."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    previous = {}

    def handler(signum, frame):
        caught.append(signum)
        event.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield caught
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _names(text: str | None) -> list[str] | None:
    if not text:
        return None
    return [n.strip() for n in text.split(",") if n.strip()]


def _is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback address (127.x, ::1)."""
    if not host:
        return False  # all interfaces
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return True  # cannot be bound either; the bind reports it
    return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def _exposure_warning(host: str, port: int, output_dir) -> str:
    return (
        f"freehandus serve: warning: listening on {host or '*'}:{port}, not only on this machine, and "
        f"OpenIGTLink has no authentication: anyone who can reach this port receives every image and "
        f"transform, can start and stop recordings and run volume reconstructions that write new files "
        f"into {output_dir} (existing files are never replaced) and use this machine's CPU. Use "
        f"--host 127.0.0.1 (the default) unless the network is trusted."
    )


def serve_command(args) -> int:
    """Run ``freehandus serve`` (see :func:`add_parsers`)."""
    from ..io import read_sequence
    from .replay import ReplayServer

    # ReconstructVolume is the reconstruction capability's, handed in by the application
    # (freehandus serve); this transport never imports it
    hooks = getattr(args, "reconstruction", None)
    reconstruction = hooks() if hooks is not None else None
    seq = read_sequence(args.sequence)
    fixed = {}
    options = None
    streamed = {}
    if args.config:
        from .replay import plus_server_settings

        streamed = plus_server_settings(args.config)
        streamed.pop("port", None)  # --port decides
        from ..io.plus_config import read_plus_config

        config = read_plus_config(args.config)
        fixed = config.coordinate_definitions.repository_fixed()
        if config.volume_reconstruction is not None and reconstruction is not None:
            options = reconstruction.options_from_plus_config(config)
    server = ReplayServer(
        seq,
        host=args.host,
        port=args.port,
        fps=args.fps,
        loop=args.loop,
        fixed_transforms=fixed,
        transform_names=_names(args.transforms) or streamed.get("transform_names"),
        image_name=streamed.get("image_name", "Image"),
        embedded_frame=streamed.get("embedded_frame", "Reference"),
        timestamps=args.timestamps,
        wait_for_clients=0 if args.no_wait else 1,
        output_dir=args.output_dir,
        reconstruction_options=options,
        reconstruct_command=None if reconstruction is None else reconstruction.reconstruct_for_command,
    )
    stop = threading.Event()
    with _stop_on_signals(stop) as caught:
        server.start()
        try:
            rate = (
                "file timestamps" if args.fps is None else ("max rate" if args.fps == 0 else f"{args.fps:g} fps")
            )
            print(
                f"serving {args.sequence} on {server.host}:{server.port} ({seq.n_frames} frames, {rate}"
                f"{', loop' if args.loop else ''}; images as {server.image_device})",
                flush=True,
            )
            commands = "StartRecording writes" if reconstruction is None else "StartRecording/ReconstructVolume write"
            print(f"remote {commands} new files into {server.output_dir}", flush=True)
            if not _is_loopback(args.host):
                print(_exposure_warning(args.host, server.port, server.output_dir), file=sys.stderr, flush=True)
            t_end = None if args.duration is None else time.monotonic() + args.duration
            while not stop.is_set():
                if t_end is not None and time.monotonic() >= t_end:
                    break
                if args.exit_when_done and server.finished.is_set():
                    break
                stop.wait(0.1)
        finally:
            server.stop(flush_s=5.0)  # what is queued for the clients still goes out
    result = {
        "file": str(args.sequence),
        "host": server.host,
        "port": server.port,
        "replay": server.stats.to_dict(),
        "server": server.server.stats().to_dict(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        st = result["server"]
        print(
            f"sent {result['replay']['frames_sent']} frames ({st['messages_sent']} messages, "
            f"{st['bytes_sent'] / 1e6:.1f} MB) to {st['clients_connected']} client(s); dropped {st['dropped']}"
            + (f", {st['clients_cut']} client(s) cut loose for taking no data" if st["clients_cut"] else "")
        )
    return _INTERRUPTED if signal.SIGINT in caught else 0


class _StatusLine:
    """``record``'s live status on a terminal (tqdm); nothing when stderr is not a terminal."""

    def __init__(self, total, stream=None, *, enabled: bool | None = None):
        from tqdm import tqdm

        stream = sys.stderr if stream is None else stream
        if enabled is None:
            enabled = stream.isatty()
        fmt = "{n_fmt}" + ("/{total_fmt}" if total else "") + " frames{postfix}"  # postfix: ", ..."
        self.bar = tqdm(total=total, unit="frame", file=stream, disable=not enabled, dynamic_ncols=True,
                        bar_format=fmt)  # fmt: skip

    def __call__(self, status) -> None:
        if self.bar.disable:
            return
        self.bar.n = status.frames
        text = f"{status.fps:.1f} fps, dropped {status.dropped}, missing {status.missing_frames}"
        if status.state != "connected":
            text += f", reconnecting for {status.reconnecting_s:.0f} s"
        self.bar.set_postfix_str(text, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def record_command(args) -> int:
    """Run ``freehandus record`` (see :func:`add_parsers`)."""
    from ..io import sequence_format
    from .recorder import RecordingExistsError, prepare_output, record_stream

    if args.duration is None and args.frames is None:
        raise FreehandUSError("record: give --duration S or --frames N so the recording can end")
    sequence_format(args.out)  # an unknown file type is refused before anything is created
    try:
        if not args.overwrite:
            prepare_output(args.out)
    except RecordingExistsError as exc:
        raise FreehandUSError(f"{exc}; choose another --out, or --overwrite to move the old files to a backup folder")
    folder = Path(args.out).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FreehandUSError(f"--out {args.out}: cannot create the folder {folder}: {exc.strerror or exc}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise FreehandUSError(f"--out {args.out}: the folder {folder} is not writable")
    stop = threading.Event()
    status = _StatusLine(args.frames, enabled=progress_enabled(args))
    try:
        with _stop_on_signals(stop) as caught:
            summary = record_stream(
                args.host,
                args.port,
                args.out,
                duration_s=args.duration,
                frames=args.frames,
                connect_timeout_s=args.connect_timeout,
                reconnect_timeout_s=args.reconnect_timeout,
                stop_event=stop,
                image_device=args.image_device,
                transform_names=_names(args.transforms),
                overwrite=args.overwrite,
                monitor=status,
            )
    finally:
        status.close()
    print(json.dumps(summary.to_dict(), indent=2) if args.json else str(summary))
    if summary.stopped.startswith(("server gone", "cannot write")):
        print(f"freehandus record: error: {summary.stopped}; the {summary.frames} frame(s) recorded are in "
              f"{summary.path or '(nothing)'}", file=sys.stderr)  # fmt: skip
        return 1
    return _INTERRUPTED if signal.SIGINT in caught else 0


#: argparse type: a TCP port to listen on (0: any free port).
listen_port = int_in(0, 65535)
#: argparse type: a TCP port to connect to.
connect_port = int_in(1, 65535)
#: Longest wait for a server, seconds (about 11.6 days): a longer one is a typing mistake, and the
#: operating system's limit on one wait is 49.7 days on Windows (``threading.TIMEOUT_MAX``).
MAX_WAIT_S = 1e6
#: argparse type: a wait for a server in seconds, in (0, :data:`MAX_WAIT_S`].
wait_seconds = float_in(0.0, MAX_WAIT_S, low_open=True)
#: Slowest paced replay, frames per second: one frame every 1000 s (a slower rate would make the
#: replay thread wait longer than the operating system allows).
MIN_FPS = 1e-3


def replay_fps(text: str) -> float:
    """argparse type: frames per second, 0 (as fast as clients read) or >= :data:`MIN_FPS`."""
    value = non_negative_float(text)
    if 0 < value < MIN_FPS:
        raise argparse.ArgumentTypeError(f"must be 0 or at least {MIN_FPS:g} frames per second, got {text!r}")
    return value


def add_parsers(subparsers, *, reconstruction=None) -> None:
    """Register ``serve`` and ``record`` on an ``argparse`` subparsers object.

    ``reconstruction``: a callable returning an object with ``options_from_plus_config(config)``
    and ``reconstruct_for_command(server, attributes, context)`` (the application passes one
    that imports :mod:`FreehandUSLib.reconstruction.live` when ``serve`` runs); without it
    ``serve`` answers ``ReconstructVolume`` with FAIL.
    """
    p = subparsers.add_parser(
        "serve",
        help="stream a tracked sequence as PlusServer does (OpenIGTLink replay server)",
        description="Stream a tracked sequence over OpenIGTLink like PlusServer: IMAGE Image_Reference "
        "(ImageToReference matrix) + valid TRANSFORMs per frame, keep-alive STATUS, PLUS commands.",
    )
    p.add_argument("sequence", help="tracked sequence file (.igs.mha/.igs.mhd/.igs.nrrd/.seq.nrrd/.h5)")
    p.add_argument(
        "--host", default="127.0.0.1",
        help="interface to listen on (default 127.0.0.1, this machine only; others are warned about: "
        "no authentication)",
    )  # fmt: skip
    p.add_argument("--port", type=listen_port, default=18944, help="TCP port (default 18944; 0 = any free port)")
    p.add_argument(
        "--fps", type=replay_fps, default=None,
        help="frames per second (default: follow the file's timestamps; 0 = as fast as clients read)",
    )  # fmt: skip
    p.add_argument("--loop", action="store_true", help="start again after the last frame")
    p.add_argument(
        "--config",
        help="PLUS device-set XML: CoordinateDefinitions give ImageToProbe etc. (so images are sent as "
        "Image_Reference), PlusOpenIGTLinkServer the image and transform names to send, "
        "VolumeReconstruction the ReconstructVolume command's options",
    )
    p.add_argument("--transforms", help="comma-separated TRANSFORM names to send (default: the file's)")
    p.add_argument(
        "--timestamps", choices=("live", "original"), default="live",
        help="send the current time (like a live PlusServer, default) or the file's timestamps",
    )  # fmt: skip
    p.add_argument(
        "--output-dir",
        help="folder for the files remote StartRecording/ReconstructVolume commands write (never replacing one; "
        "default: a new folder freehandus-serve-<date>-<time>-<pid> here)",
    )
    p.add_argument("--duration", type=positive_float, help="stop serving after this many seconds")
    p.add_argument("--exit-when-done", action="store_true", help="exit once a non-looping replay was sent")
    p.add_argument("--no-wait", action="store_true", help="start streaming before any client connects")
    p.add_argument("--json", action="store_true", help="print the final statistics as JSON")
    p.set_defaults(func=serve_command, reconstruction=reconstruction)

    p = subparsers.add_parser(
        "record",
        help="record a live OpenIGTLink stream (PlusServer, serve) into a PLUS sequence file",
        description="Record images + transforms from an OpenIGTLink server into a tracked sequence "
        "file, incrementally (a crash loses at most the frame in flight).",
    )
    p.add_argument("--host", default="127.0.0.1", help="server host (default 127.0.0.1)")
    p.add_argument("--port", type=connect_port, default=18944, help="server port (default 18944)")
    p.add_argument(
        "--out",
        required=True,
        help="output sequence (.igs.mhd written incrementally; others converted at the end); never replaced",
    )
    p.add_argument("--duration", type=positive_float, help="record for this many seconds")
    p.add_argument("--frames", type=positive_int, help="record this many frames")
    p.add_argument("--connect-timeout", type=wait_seconds, default=10.0,
                   help=f"seconds to wait for the server (default 10, at most {MAX_WAIT_S:g})")  # fmt: skip
    p.add_argument(
        "--reconnect-timeout", type=wait_seconds, default=60.0,
        help="after a lost connection, stop (keeping what was recorded, exit 1) when the server is not back "
        "within this many seconds (default 60)",
    )  # fmt: skip
    p.add_argument(
        "--overwrite", action="store_true",
        help="if --out (or an unfinished recording to it) exists, move it to <out>.backup-<date>-<time>/ "
        "instead of refusing",
    )  # fmt: skip
    p.add_argument("--image-device", help="IMAGE device to record (default: the first one seen)")
    p.add_argument("--transforms", help="comma-separated transform names to record (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_progress_option(p)
    p.set_defaults(func=record_command)


def main(argv=None) -> int:
    """Stand-alone entry point: ``python -m FreehandUSLib.igtl.cli serve|record ...``."""
    parser = ArgumentParser(prog="freehandus-igtl", description="OpenIGTLink replay server and recorder")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_parsers(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except FreehandUSError as exc:
        print(f"freehandus {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
