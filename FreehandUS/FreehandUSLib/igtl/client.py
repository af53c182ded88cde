"""A robust headless OpenIGTLink client (what SlicerOpenIGTLink's connector does inside Slicer).

One background thread connects, reads whole messages with exact-length reads
(:class:`~.framing.MessageReader`: CRC check, malformed input counted and skipped, resync after a
bad header) and puts them in a bounded FIFO. The consumer takes them with :meth:`IGTLClient.get`.

- **Nothing is dropped silently**: when the FIFO is full (more than ``queue_size`` messages or
  ``queue_bytes`` bytes waiting) the *oldest* message is dropped and counted in
  ``stats().dropped``; memory stays bounded however slow the consumer is.
- **Connection state** (``connecting`` -> ``connected`` -> ``disconnected`` ... ``closed``) is
  reported to ``on_state(state, detail)`` callbacks (called on the reader thread) and can be
  waited for with :meth:`IGTLClient.wait_for_state`.
- **Reconnect** with exponential backoff (``reconnect_delay_s`` doubling up to
  ``reconnect_max_delay_s``) after a refused connection, a closed connection, or a **stall**: no
  byte for ``stall_timeout_s`` (PlusServer sends a keep-alive STATUS every 0.25 s when idle, so a
  silent server is a dead one).
- PLUS remote-control commands: :meth:`IGTLClient.command` in the STRING or COMMAND form.
- :meth:`IGTLClient.close` stops the thread and closes the socket; the client is a context manager.

Example
-------
>>> with IGTLClient("127.0.0.1", 18944).start() as client:      # doctest: +SKIP
...     client.wait_for_state("connected", timeout_s=5)
...     msg = client.get(timeout_s=1.0)          # ImageMessage, TransformMessage, ...
...     reply = client.command("RequestChannelIds")
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import socket
import threading
import time
from dataclasses import asdict, dataclass, field

from ..errors import FreehandUSError
from .commands import (
    CommandReply,
    command_device_name,
    command_xml,
    parse_reply_xml,
)
from .crc64 import crc64
from .framing import DEFAULT_MAX_BODY_BYTES, MessageReader, SocketSource, StreamClosed, StreamStats, send_message
from .protocol import (
    CommandMessage,
    ImageMessage,
    Message,
    ProtocolError,
    RTSCommandMessage,
    StatusMessage,
    StringMessage,
)

__all__ = ["IGTLClient", "ClientStats", "IGTLConnectionError", "CommandTimeoutError", "STATES"]

logger = logging.getLogger(__name__)

#: Connection states, in the order a session goes through them.
STATES = ("idle", "connecting", "connected", "disconnected", "closed")
_POLL_S = 0.1  # how often the reader looks at the stop flag and the stall clock
_SEND_TIMEOUT_S = 10.0
_SOCKET_BUFFER = 8 * 1024 * 1024


class IGTLConnectionError(FreehandUSError):
    """Not connected, or the connection failed while sending."""


class CommandTimeoutError(FreehandUSError):
    """A command got no reply in time."""


class _Stalled(Exception):
    pass


class _Stopping(Exception):
    pass


@dataclass
class ClientStats:
    """A snapshot of the client's counters (see :meth:`IGTLClient.stats`).

    Attributes
    ----------
    received : int
        Messages decoded (all connections).
    delivered : int
        Messages taken by the consumer.
    dropped : int
        Messages discarded because the FIFO was full (oldest first).
    queued : int
        Messages waiting now; ``queued_bytes`` their approximate size.
    max_queued : int
        Largest FIFO length seen.
    by_type : dict[str, int]
        Decoded messages per type.
    connects, disconnects, failed_connects : int
    command_replies : int
        Replies matched to a pending :meth:`IGTLClient.command` (not queued).
    stream : dict
        :class:`~.framing.StreamStats` of all connections (crc_errors, malformed, ...).
    last_disconnect_reason : str
    """

    received: int = 0
    delivered: int = 0
    dropped: int = 0
    queued: int = 0
    queued_bytes: int = 0
    max_queued: int = 0
    by_type: dict = field(default_factory=dict)
    connects: int = 0
    disconnects: int = 0
    failed_connects: int = 0
    command_replies: int = 0
    stream: dict = field(default_factory=dict)
    last_disconnect_reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        s = self.stream
        return (
            f"received {self.received}, delivered {self.delivered}, dropped {self.dropped}, "
            f"queued {self.queued}; connects {self.connects}, disconnects {self.disconnects}; "
            f"crc errors {s.get('crc_errors', 0)}, malformed {s.get('malformed', 0)}, "
            f"bad headers {s.get('bad_headers', 0)}, unknown {s.get('unknown_types', 0)}"
        )


def _message_bytes(message: Message) -> int:
    if isinstance(message, ImageMessage):
        return int(message.pixels.nbytes) + 200
    return 200


class IGTLClient:
    """Headless OpenIGTLink client with a reader thread and a bounded FIFO (module docstring).

    Parameters
    ----------
    host : str
    port : int
    queue_size : int
        Most messages waiting in the FIFO.
    queue_bytes : int
        Most bytes (approximately: pixels + 200 per message) waiting in the FIFO.
    reconnect : bool
        Reconnect after a failed or lost connection (until :meth:`close`).
    reconnect_delay_s, reconnect_max_delay_s : float
        First wait before reconnecting, doubled after each failed attempt up to the maximum.
    max_connect_attempts : int, optional
        Give up (state ``closed``) after this many consecutive failed attempts.
    connect_timeout_s : float
    stall_timeout_s : float
        A connection with no byte received for this long is dropped and reconnected.
    header_version : 1 or 2
        Version of the headers this client sends. With 2 the client announces itself with a
        version-2 keep-alive STATUS on connect, so a PLUS server answers with version 2
        (metadata) from then on.
    check_crc : bool
    max_body_bytes : int
    on_state : callable(state: str, detail: str), optional
        Called on the reader thread at each state change.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 18944,
        *,
        queue_size: int = 512,
        queue_bytes: int = 512 * 1024 * 1024,
        reconnect: bool = True,
        reconnect_delay_s: float = 0.05,
        reconnect_max_delay_s: float = 2.0,
        max_connect_attempts: int | None = None,
        connect_timeout_s: float = 2.0,
        stall_timeout_s: float = 5.0,
        header_version: int = 1,
        check_crc: bool = True,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        on_state=None,
    ):
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        if header_version not in (1, 2):
            raise ValueError(f"header_version must be 1 or 2, got {header_version}")
        if stall_timeout_s <= 0 or connect_timeout_s <= 0:
            raise ValueError(
                f"stall_timeout_s and connect_timeout_s must be > 0, got {stall_timeout_s}, {connect_timeout_s}"
            )
        self.host = host
        self.port = int(port)
        self.queue_size = int(queue_size)
        self.queue_bytes = int(queue_bytes)
        self.reconnect = bool(reconnect)
        self.reconnect_delay_s = float(reconnect_delay_s)
        self.reconnect_max_delay_s = float(reconnect_max_delay_s)
        self.max_connect_attempts = max_connect_attempts
        self.connect_timeout_s = float(connect_timeout_s)
        self.stall_timeout_s = float(stall_timeout_s)
        self.header_version = int(header_version)
        self.check_crc = bool(check_crc)
        self.max_body_bytes = int(max_body_bytes)
        self._callbacks = [on_state] if on_state is not None else []

        self._cond = threading.Condition()
        self._queue: collections.deque = collections.deque()
        self._queued_bytes = 0
        self._state = "idle"
        self._detail = ""
        self._stats = ClientStats()
        self._stream = StreamStats()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._uids = itertools.count(1)
        self._pending: dict[int, list] = {}  # uid -> [Event, reply]
        self._last_drop_log = 0.0

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> IGTLClient:
        """Start the reader thread (connects in the background); returns self."""
        if self._thread is not None:
            return self
        if self.check_crc:
            crc64(b"\0")  # load the CRC kernel before data arrive (its first call takes ~0.5 s)
        self._thread = threading.Thread(target=self._run, name=f"igtl-client-{self.host}:{self.port}", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the reader thread and close the connection (idempotent)."""
        self._stop.set()
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning(
                    "reader thread of %s:%d did not stop within %.1f s", self.host, self.port, timeout_s
                )
        if self._state != "closed":
            self._set_state("closed", "closed by the application")
        with self._cond:
            self._cond.notify_all()

    def __enter__(self) -> IGTLClient:
        return self.start()

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def add_state_callback(self, callback) -> None:
        """Also call ``callback(state, detail)`` at every state change."""
        self._callbacks.append(callback)

    # -- state -------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        return self._state

    @property
    def connected(self) -> bool:
        return self._state == "connected"

    def wait_for_state(self, state: str, timeout_s: float | None = None) -> bool:
        """Block until the state is ``state`` (or one of a tuple of states); False on timeout."""
        wanted = (state,) if isinstance(state, str) else tuple(state)
        for s in wanted:
            if s not in STATES:
                raise ValueError(f"unknown state {s!r}; expected one of {STATES}")
        with self._cond:
            return self._cond.wait_for(lambda: self._state in wanted, timeout_s)

    def wait_for_connects(self, n: int, timeout_s: float | None = None) -> bool:
        """Block until ``n`` connections have been made in total; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._stats.connects >= n, timeout_s)

    def wait_for(self, predicate, timeout_s: float | None = None) -> bool:
        """Block until ``predicate(stats)`` is true for a :class:`ClientStats` snapshot; False on timeout.

        Re-evaluated at every message and state change, e.g.
        ``client.wait_for(lambda s: s.received >= 100, timeout_s=5)``.
        """
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self._snapshot()), timeout_s)

    def _set_state(self, state: str, detail: str = "") -> None:
        with self._cond:
            if state == self._state and detail == self._detail:
                return
            self._state = state
            self._detail = detail
            if state == "connected":
                self._stats.connects += 1
            elif state == "disconnected":
                self._stats.disconnects += 1
                self._stats.last_disconnect_reason = detail
            self._cond.notify_all()
        log = logger.info if state in ("connected", "disconnected") else logger.debug
        log("OpenIGTLink %s:%d %s%s", self.host, self.port, state, f" ({detail})" if detail else "")
        for callback in list(self._callbacks):
            try:
                callback(state, detail)
            except Exception:  # a faulty callback must not kill the reader
                logger.exception("state callback %r failed", callback)

    # -- messages ----------------------------------------------------------------------------
    def get(self, timeout_s: float | None = None) -> Message | None:
        """The oldest waiting message; None after ``timeout_s`` (None = wait forever) or once closed
        (messages received before the close are still returned)."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self._queue or self._stop.is_set() or self._state == "closed", timeout_s
            )
            if not ok or not self._queue:
                return None
            message, size = self._queue.popleft()
            self._queued_bytes -= size
            self._stats.delivered += 1
            return message

    def get_nowait(self) -> Message | None:
        """The oldest waiting message, or None."""
        return self.get(timeout_s=0)

    def drain(self) -> list[Message]:
        """All waiting messages, oldest first."""
        with self._cond:
            items = [m for m, _ in self._queue]
            self._queue.clear()
            self._queued_bytes = 0
            self._stats.delivered += len(items)
            return items

    def stats(self) -> ClientStats:
        """A consistent snapshot of the counters."""
        with self._cond:
            return self._snapshot()

    def _snapshot(self) -> ClientStats:
        snap = ClientStats(**{k: v for k, v in asdict(self._stats).items()})
        snap.by_type = dict(self._stats.by_type)
        snap.queued = len(self._queue)
        snap.queued_bytes = self._queued_bytes
        snap.stream = self._stream.to_dict()
        return snap

    def _deliver(self, message: Message) -> None:
        if self._pending and self._match_reply(message):
            return
        size = _message_bytes(message)
        dropped = 0
        with self._cond:
            st = self._stats
            st.received += 1
            st.by_type[message.type] = st.by_type.get(message.type, 0) + 1
            while self._queue and (
                len(self._queue) >= self.queue_size or self._queued_bytes + size > self.queue_bytes
            ):
                _, old = self._queue.popleft()
                self._queued_bytes -= old
                st.dropped += 1
                dropped += 1
            self._queue.append((message, size))
            self._queued_bytes += size
            st.max_queued = max(st.max_queued, len(self._queue))
            self._cond.notify_all()
        if dropped:
            now = time.monotonic()
            if now - self._last_drop_log > 1.0:
                self._last_drop_log = now
                logger.warning(
                    "consumer too slow: FIFO full, dropped the oldest message(s) (%d dropped so far)",
                    self._stats.dropped,
                )

    # -- sending -----------------------------------------------------------------------------
    def send(self, message: Message, *, header_version: int | None = None) -> None:
        """Send one message now; raises :class:`IGTLConnectionError` when not connected."""
        sock = self._sock
        if sock is None or self._state != "connected":
            raise IGTLConnectionError(f"cannot send {message.type}: not connected to {self.host}:{self.port}")
        version = self.header_version if header_version is None else header_version
        try:
            send_message(sock, message, header_version=version, lock=self._send_lock)
        except OSError as exc:
            raise IGTLConnectionError(f"sending {message.type} to {self.host}:{self.port} failed: {exc}") from exc

    def command(self, name: str, *, form: str = "string", timeout_s: float = 5.0, **attributes) -> CommandReply:
        """Send a PLUS command and wait for its reply.

        Parameters
        ----------
        name : str
            ``"StartRecording"``, ``"StopRecording"``, ``"RequestChannelIds"``, ...
        form : "string" or "command"
            STRING ``CMD_<uid>`` -> ``ACK_<uid>`` (any PlusServer), or COMMAND -> RTS_COMMAND
            (OpenIGTLink 3).
        timeout_s : float
        **attributes
            Command attributes (``OutputFilename="rec.mhd"``).

        Raises
        ------
        CommandTimeoutError
            No reply within ``timeout_s``.
        IGTLConnectionError
            Not connected.
        """
        if form not in ("string", "command"):
            raise ValueError(f"form must be 'string' or 'command', got {form!r}")
        uid = next(self._uids)
        text = command_xml(name, **attributes)
        if form == "string":
            message = StringMessage(text=text, device_name=command_device_name(uid), timestamp_s=time.time())
        else:
            message = CommandMessage(
                command_id=uid, command_name=name, content=text, device_name="FreehandUS", timestamp_s=time.time()
            )
        waiter = [threading.Event(), None]
        self._pending[uid] = waiter
        try:
            self.send(message)
            if not waiter[0].wait(timeout_s):
                raise CommandTimeoutError(
                    f"no reply to {name} (uid {uid}, {form} form) from {self.host}:{self.port} within {timeout_s} s"
                )
            return waiter[1]
        finally:
            self._pending.pop(uid, None)

    def _match_reply(self, message: Message) -> bool:
        uid = None
        if isinstance(message, RTSCommandMessage):
            uid = message.command_id
            text = message.content
        elif isinstance(message, StringMessage) and message.device_name.startswith("ACK_"):
            try:
                uid = int(message.device_name[4:])
            except ValueError:
                return False
            text = message.text
        waiter = self._pending.get(uid) if uid is not None else None
        if waiter is None:
            return False
        try:
            reply = parse_reply_xml(text, message.metadata)
        except ProtocolError as exc:
            reply = CommandReply(status="FAIL", message=str(exc), text=text, metadata=dict(message.metadata))
        if isinstance(message, RTSCommandMessage) and not reply.name:
            reply = dataclasses.replace(reply, name=message.command_name)
        waiter[1] = reply
        waiter[0].set()
        with self._cond:
            self._stats.command_replies += 1
        return True

    # -- reader thread -------------------------------------------------------------------------
    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
        except OSError:
            pass
        sock.settimeout(_SEND_TIMEOUT_S)  # reads poll with select (SocketSource)
        return sock

    def _run(self) -> None:
        failures = 0
        try:
            while not self._stop.is_set():
                self._set_state("connecting", f"{self.host}:{self.port}")
                try:
                    sock = self._connect()
                except OSError as exc:
                    failures += 1
                    with self._cond:
                        self._stats.failed_connects += 1
                    self._set_state("disconnected", f"connect failed: {exc}")
                    if not self.reconnect or (
                        self.max_connect_attempts is not None and failures >= self.max_connect_attempts
                    ):
                        break
                    delay = min(self.reconnect_max_delay_s, self.reconnect_delay_s * 2 ** (failures - 1))
                    self._stop.wait(delay)
                    continue
                failures = 0
                self._sock = sock
                reason = self._serve(sock)
                self._sock = None
                try:
                    sock.close()
                except OSError:
                    pass
                if self._stop.is_set():
                    break
                self._set_state("disconnected", reason)
                if not self.reconnect:
                    break
                self._stop.wait(self.reconnect_delay_s)
        finally:
            self._set_state("closed", "stopped" if self._stop.is_set() else "gave up")
            with self._cond:
                self._cond.notify_all()

    def _serve(self, sock: socket.socket) -> str:
        timed = SocketSource(sock, _POLL_S)

        def on_idle():
            if self._stop.is_set():
                raise _Stopping()
            if time.monotonic() - timed.last_rx > self.stall_timeout_s:
                raise _Stalled()

        reader = MessageReader(
            timed,
            check_crc=self.check_crc,
            max_body_bytes=self.max_body_bytes,
            on_idle=on_idle,
            stats=self._stream,
        )
        self._set_state("connected", f"{self.host}:{self.port}")
        if self.header_version == 2:
            try:
                self.send(StatusMessage(timestamp_s=time.time()), header_version=2)
            except IGTLConnectionError as exc:
                return f"announcing header version 2 failed: {exc}"
        try:
            while True:
                self._deliver(reader.read())
        except StreamClosed as exc:
            return "closed by the server" + (f" ({exc.partial} bytes of a message lost)" if exc.partial else "")
        except _Stalled:
            return f"stalled: no data for {self.stall_timeout_s:g} s"
        except _Stopping:
            return "closed by the application"
        except OSError as exc:
            if self._stop.is_set():
                return "closed by the application"
            return f"connection error: {exc}"
