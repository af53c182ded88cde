"""``freehandus serve`` and ``freehandus record``: the streaming subcommands.

:func:`add_parsers` registers both on the main ``freehandus`` parser (same conventions as
``FreehandUSLib/cli.py``: ``func`` set per subcommand, ``--json``, errors raised as
:class:`~FreehandUSLib.errors.FreehandUSError`). ``python -m FreehandUSLib.igtl.cli`` runs them
stand-alone.

``serve`` prints ``serving <file> on <host>:<port> ...`` on its first line (the real port when
``--port 0`` asked for a free one) and runs until Ctrl-C/SIGTERM, ``--duration``, or, with
``--exit-when-done``, until a non-looping replay has been sent. ``record`` stops after
``--duration`` seconds or ``--frames`` frames, or on Ctrl-C/SIGTERM, always leaving a valid file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
import time

from ..errors import FreehandUSError

__all__ = ["add_parsers", "main", "serve_command", "record_command"]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _stop_on_signals(event: threading.Event):
    """Set ``event`` on SIGTERM/SIGINT (main thread only); restore the handlers afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum, frame):
        event.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _names(text: str | None) -> list[str] | None:
    if not text:
        return None
    return [n.strip() for n in text.split(",") if n.strip()]


def serve_command(args) -> int:
    """Run ``freehandus serve`` (see :func:`add_parsers`)."""
    from ..io import read_sequence
    from .replay import ReplayServer

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
        if config.volume_reconstruction is not None:
            from ..reconstruction import options_from_plus_config

            options = options_from_plus_config(config)
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
    )
    stop = threading.Event()
    with _stop_on_signals(stop):
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
        )
    return 0


def record_command(args) -> int:
    """Run ``freehandus record`` (see :func:`add_parsers`)."""
    from .recorder import record_stream

    if args.duration is None and args.frames is None:
        raise FreehandUSError("record: give --duration S or --frames N so the recording can end")
    stop = threading.Event()
    with _stop_on_signals(stop):
        summary = record_stream(
            args.host,
            args.port,
            args.out,
            duration_s=args.duration,
            frames=args.frames,
            connect_timeout_s=args.connect_timeout,
            stop_event=stop,
            image_device=args.image_device,
            transform_names=_names(args.transforms),
        )
    print(json.dumps(summary.to_dict(), indent=2) if args.json else str(summary))
    return 0


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def add_parsers(subparsers) -> None:
    """Register ``serve`` and ``record`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "serve",
        help="stream a tracked sequence as PlusServer does (OpenIGTLink replay server)",
        description="Stream a tracked sequence over OpenIGTLink like PlusServer: IMAGE Image_Reference "
        "(ImageToReference matrix) + valid TRANSFORMs per frame, keep-alive STATUS, PLUS commands.",
    )
    p.add_argument("sequence", help="tracked sequence file (.igs.mha/.igs.mhd/.igs.nrrd/.seq.nrrd/.h5)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=18944, help="TCP port (default 18944; 0 = any free port)")
    p.add_argument(
        "--fps", type=_non_negative_float, default=None,
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
    p.add_argument("--output-dir", default=".", help="folder for StartRecording/ReconstructVolume output")
    p.add_argument("--duration", type=_positive_float, help="stop serving after this many seconds")
    p.add_argument("--exit-when-done", action="store_true", help="exit once a non-looping replay was sent")
    p.add_argument("--no-wait", action="store_true", help="start streaming before any client connects")
    p.add_argument("--json", action="store_true", help="print the final statistics as JSON")
    p.set_defaults(func=serve_command)

    p = subparsers.add_parser(
        "record",
        help="record a live OpenIGTLink stream (PlusServer, serve) into a PLUS sequence file",
        description="Record images + transforms from an OpenIGTLink server into a tracked sequence "
        "file, incrementally (a crash loses at most the frame in flight).",
    )
    p.add_argument("--host", default="127.0.0.1", help="server host (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=18944, help="server port (default 18944)")
    p.add_argument(
        "--out",
        required=True,
        help="output sequence (.igs.mhd written incrementally; others converted at the end)",
    )
    p.add_argument("--duration", type=_positive_float, help="record for this many seconds")
    p.add_argument("--frames", type=_positive_int, help="record this many frames")
    p.add_argument("--connect-timeout", type=_positive_float, default=10.0, help="seconds to wait for the server")
    p.add_argument("--image-device", help="IMAGE device to record (default: the first one seen)")
    p.add_argument("--transforms", help="comma-separated transform names to record (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=record_command)


def main(argv=None) -> int:
    """Stand-alone entry point: ``python -m FreehandUSLib.igtl.cli serve|record ...``."""
    parser = argparse.ArgumentParser(prog="freehandus-igtl", description="OpenIGTLink replay server and recorder")
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
