"""A multi-client OpenIGTLink server core that behaves like PlusServer on the wire.

:class:`IGTLServer` accepts any number of clients. Each client gets

- a **receiver** thread (exact-length reads, CRC check, malformed input counted and skipped) that
  tracks the highest header version the client has spoken: the server answers and streams with
  header version 1 **until the client sends a version-2 message**, then with version 2 (capped at
  ``max_header_version``), as PlusServer does;
- a **sender** thread fed by a bounded queue. :meth:`IGTLServer.broadcast` puts one bundle
  (e.g. the IMAGE + TRANSFORMs of a tracked frame) in every client's queue. When a queue is full
  the bundle is dropped *for that client* and counted, at once (``timeout_s=0``, a paced
  stream: nobody else is delayed) or after waiting for that client to make room (back-pressure,
  so an as-fast-as-possible replay never outruns a client that keeps up; never longer than the
  client could still be cut loose). Each bundle is encoded (CRC) once per header version, not
  once per client.
- a **slow or dead client is cut loose**: one that has had data waiting for ``send_timeout_s``
  without taking any is disconnected (logged, counted in ``clients_cut``); its first dropped
  bundle is logged too.
- a keep-alive: an empty-named STATUS OK (header version 1, as PlusServer's) whenever nothing was
  sent to that client for ``keepalive_interval_s`` (PlusServer: 0.25 s).

Incoming PLUS commands (STRING ``CMD_<uid>`` or COMMAND) are parsed, de-duplicated (the last 10
ids per client, as PlusServer) and executed one at a time on a worker thread by the
``command_handler(name, attributes, context) -> (ok, message)``; the reply (STRING ``ACK_<uid>``
or RTS_COMMAND) goes to the requesting client ahead of queued data. GET_STATUS is answered with
STATUS OK; STATUS from a client is a keep-alive; anything else is counted and skipped.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import socket
import threading
import time
from dataclasses import asdict, dataclass

from .commands import parse_command_xml, reply_device_name, reply_xml, uid_from_command_device
from .crc64 import crc64
from .framing import MessageReader, SocketSource, StreamClosed, StreamStats, send_parts
from .protocol import (
    CommandMessage,
    Message,
    ProtocolError,
    RawMessage,
    RTSCommandMessage,
    StatusMessage,
    StringMessage,
    encode_message_parts,
)

__all__ = ["IGTLServer", "ServerStats", "CommandContext"]

logger = logging.getLogger(__name__)

_POLL_S = 0.1
_SEND_TIMEOUT_S = 10.0  # a client that takes nothing for this long is disconnected
_SOCKET_BUFFER = 8 * 1024 * 1024
_RECENT_COMMAND_IDS = 10


@dataclass
class ServerStats:
    """Counters of an :class:`IGTLServer` (snapshot from :meth:`IGTLServer.stats`).

    Attributes
    ----------
    bundles : int
        Bundles broadcast (tracked frames, for the replay server).
    messages_sent, bytes_sent : int
        Over all clients.
    dropped : int
        Bundles dropped for a client whose queue was full.
    clients_cut : int
        Clients disconnected because they took no data for ``send_timeout_s``.
    keepalives : int
    clients_connected : int
        Clients accepted since start; ``clients_now`` connected now.
    commands : int
        Commands executed; ``duplicate_commands`` ignored repeats.
    received : int
        Messages received from clients; ``rejected`` malformed/CRC/unknown ones.
    """

    bundles: int = 0
    messages_sent: int = 0
    bytes_sent: int = 0
    dropped: int = 0
    clients_cut: int = 0
    keepalives: int = 0
    clients_connected: int = 0
    clients_now: int = 0
    commands: int = 0
    duplicate_commands: int = 0
    received: int = 0
    rejected: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CommandContext:
    """Who sent a command: ``client_id``, ``device_name``, ``header_version``, ``form``."""

    client_id: int
    device_name: str
    header_version: int
    form: str
    metadata: dict


class _Bundle:
    """Messages sent together; encoded lazily once per header version."""

    __slots__ = ("messages", "_encoded", "_lock", "priority", "version")

    def __init__(self, messages, *, priority: bool = False, version: int | None = None):
        self.messages = list(messages)
        self._encoded: dict[int, list] = {}
        self._lock = threading.Lock()
        self.priority = priority  # goes ahead of queued data (command replies, keep-alives)
        self.version = version  # header version forced for this bundle (keep-alive: 1)

    def encoded(self, version: int) -> list:
        with self._lock:
            parts = self._encoded.get(version)
            if parts is None:
                parts = []
                for m in self.messages:
                    try:
                        parts.append(encode_message_parts(m, header_version=version))
                    except ProtocolError as exc:  # one unsendable message must not end the session
                        logger.error("cannot send %s %r: %s", m.type, m.device_name, exc)
                self._encoded[version] = parts
            return parts


class _Session:
    """One connected client: socket, queue, threads, header version."""

    def __init__(self, server: IGTLServer, client_id: int, sock: socket.socket, address):
        self.server = server
        self.id = client_id
        self.sock = sock
        self.address = address
        self.header_version = 1
        self.queue: collections.deque = collections.deque()  # data bundles (bounded)
        self.urgent: collections.deque = collections.deque()  # replies, keep-alives: sent first, in order
        self.cond = threading.Condition()
        self.alive = True
        self.last_sent = time.monotonic()
        self.last_progress = self.last_sent  # last send completed, or start of the wait for one
        self.recent_ids: collections.deque = collections.deque(maxlen=_RECENT_COMMAND_IDS)
        self.stream = StreamStats()
        self.sent = 0
        self.dropped = 0
        self.in_flight = False
        self.threads = [
            threading.Thread(target=self._send_loop, name=f"igtl-send-{client_id}", daemon=True),
            threading.Thread(target=self._receive_loop, name=f"igtl-recv-{client_id}", daemon=True),
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    # -- sending -----------------------------------------------------------------------------
    def busy(self) -> bool:
        """Data is waiting for this client or being sent to it (call with ``cond`` held)."""
        return bool(self.queue or self.urgent or self.in_flight)

    def put(self, bundle: _Bundle, timeout_s: float) -> bool:
        """Queue ``bundle``; False when the client is gone or its queue stayed full (dropped).

        Waits at most ``timeout_s`` for room, and never past the moment this client would be
        cut loose (``send_timeout_s`` without progress)."""
        with self.cond:
            if bundle.priority:
                if not self.busy():
                    self.last_progress = time.monotonic()
                self.urgent.append(bundle)
                self.cond.notify_all()
                return True
            size = self.server.client_queue_size
            if len(self.queue) >= size and timeout_s > 0:
                limit = self.last_progress + self.server.send_timeout_s - time.monotonic()
                self.cond.wait_for(lambda: not self.alive or len(self.queue) < size, min(timeout_s, max(0.0, limit)))
            if not self.alive:
                return False
            if len(self.queue) >= size:
                self.dropped += 1
                if self.dropped == 1:
                    logger.warning("client %d (%s) is not keeping up: dropping data for it", self.id, self.address)
                return False
            if not self.busy():
                self.last_progress = time.monotonic()
            self.queue.append(bundle)
            self.cond.notify_all()
            return True

    def _send_loop(self) -> None:
        server = self.server
        try:
            while True:
                with self.cond:
                    self.cond.wait_for(lambda: self.urgent or self.queue or not self.alive, _POLL_S)
                    if not self.alive:
                        return
                    if self.urgent:
                        bundle = self.urgent.popleft()
                    elif self.queue:
                        bundle = self.queue.popleft()
                    else:
                        continue
                    self.in_flight = True
                    self.cond.notify_all()
                version = bundle.version or self.header_version
                nbytes = 0
                for parts in bundle.encoded(version):
                    nbytes += send_parts(self.sock, parts)
                self.last_sent = time.monotonic()
                self.sent += len(bundle.messages)
                server._count_sent(len(bundle.messages), nbytes)
                with self.cond:
                    self.in_flight = False
                    self.last_progress = self.last_sent
                    self.cond.notify_all()
        except OSError as exc:
            if self.alive:
                logger.info("client %d (%s): send failed (%s); disconnecting", self.id, self.address, exc)
        finally:
            server._drop_session(self)

    # -- receiving ---------------------------------------------------------------------------
    def _receive_loop(self) -> None:
        server = self.server

        def on_idle():
            if not self.alive:
                raise StreamClosed("session closed")

        reader = MessageReader(
            SocketSource(self.sock, _POLL_S),
            accept_raw=True,
            max_body_bytes=server.max_body_bytes,
            on_idle=on_idle,
            stats=self.stream,
        )
        try:
            while self.alive:
                message = reader.read()
                server._count_received(message)
                if message.header_version > self.header_version:
                    self.header_version = min(message.header_version, server.max_header_version)
                    logger.info("client %d speaks header version %d", self.id, self.header_version)
                self._handle(message)
        except (StreamClosed, OSError):
            pass
        finally:
            server._count_rejected(self.stream.rejected)
            server._drop_session(self)

    def _handle(self, message: Message) -> None:
        server = self.server
        if isinstance(message, StringMessage) and message.device_name.startswith("CMD"):
            uid = uid_from_command_device(message.device_name)
            if uid is None:
                reply = StringMessage(
                    device_name=reply_device_name(None),
                    text=reply_xml(False, "Malformed DeviceName. Expected CMD_cmdId (ex: CMD_001)"),
                )
                self.reply(reply)
                return
            if self._duplicate(uid):
                return
            server._queue_command(self, "string", uid, message.device_name, message.text, message.metadata, None)
        elif isinstance(message, CommandMessage) and not isinstance(message, RTSCommandMessage):
            if self._duplicate(message.command_id):
                return
            server._queue_command(
                self,
                "command",
                message.command_id,
                message.device_name,
                message.content,
                message.metadata,
                message.command_name,
            )
        elif isinstance(message, RawMessage) and message.type == "GET_STATUS":
            self.reply(StatusMessage(timestamp_s=time.time()))
        elif isinstance(message, StatusMessage):
            pass  # keep-alive
        else:
            server._count_unhandled(message)

    def _duplicate(self, uid: int) -> bool:
        if uid in self.recent_ids:
            logger.warning("client %d repeated command id %d; ignored (as PlusServer does)", self.id, uid)
            self.server._count_duplicate()
            return True
        self.recent_ids.append(uid)
        return False

    def reply(self, message: Message, *, version: int | None = None) -> None:
        self.put(_Bundle([message], priority=True, version=version), 0)

    def close(self) -> None:
        with self.cond:
            self.alive = False
            self.cond.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


class IGTLServer:
    """Multi-client OpenIGTLink server (module docstring).

    Parameters
    ----------
    host : str
        Interface to listen on (``"127.0.0.1"``: this machine only).
    port : int
        0 picks a free port (see :attr:`port` after :meth:`start`).
    keepalive_interval_s : float
    client_queue_size : int
        Bundles waiting per client; more are dropped for that client (or waited for, see
        :meth:`broadcast`).
    send_timeout_s : float
        A client that has had data waiting this long without taking any is disconnected; the
        longest :meth:`broadcast` waits for a full client queue.
    max_header_version : 1 or 2
    command_handler : callable(name, attributes, CommandContext) -> (bool, str), optional
        Executes commands; None answers every command with FAIL "unknown command".
    max_body_bytes : int
        Largest message accepted from a client.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 18944,
        *,
        keepalive_interval_s: float = 0.25,
        client_queue_size: int = 64,
        send_timeout_s: float = 5.0,
        max_header_version: int = 2,
        command_handler=None,
        max_body_bytes: int = 16 * 1024 * 1024,
    ):
        if client_queue_size < 1:
            raise ValueError(f"client_queue_size must be >= 1, got {client_queue_size}")
        if keepalive_interval_s <= 0:
            raise ValueError(f"keepalive_interval_s must be > 0, got {keepalive_interval_s}")
        if not send_timeout_s > 0:
            raise ValueError(f"send_timeout_s must be > 0, got {send_timeout_s}")
        if not 0 <= int(port) <= 65535:
            raise ValueError(f"port must be 0 (any free port) to 65535, got {port}")
        self.host = host
        self.requested_port = int(port)
        self.keepalive_interval_s = float(keepalive_interval_s)
        self.client_queue_size = int(client_queue_size)
        self.send_timeout_s = float(send_timeout_s)
        self.max_header_version = int(max_header_version)
        self.command_handler = command_handler
        self.max_body_bytes = int(max_body_bytes)
        self._listener: socket.socket | None = None
        self._sessions: dict[int, _Session] = {}
        self._lock = threading.Condition()
        self._stats = ServerStats()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._ids = itertools.count(1)
        self._commands: queue.Queue = queue.Queue()
        self.port: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> IGTLServer:
        """Bind, listen and start the accept/keep-alive/command threads; returns self."""
        if self._listener is not None:
            return self
        crc64(b"\0")  # load the CRC kernel now: its first call takes ~0.5 s, long enough to drop frames
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((self.host, self.requested_port))
        except (OSError, OverflowError) as exc:
            listener.close()
            from ..errors import FreehandUSError

            raise FreehandUSError(f"cannot listen on {self.host}:{self.requested_port}: {exc}") from exc
        listener.listen(16)
        listener.settimeout(_POLL_S)
        self._listener = listener
        self.port = listener.getsockname()[1]
        for target, name in (
            (self._accept_loop, "accept"),
            (self._keepalive_loop, "keepalive"),
            (self._command_loop, "commands"),
        ):
            t = threading.Thread(target=target, name=f"igtl-server-{name}-{self.port}", daemon=True)
            t.start()
            self._threads.append(t)
        logger.info("OpenIGTLink server listening on %s:%d", self.host, self.port)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Disconnect every client, close the listening socket and stop the threads."""
        self._stop.set()
        self._commands.put(None)
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            session.close()
        if self._listener is not None:
            try:
                self._listener.close()
            except OSError:
                pass
        deadline = time.monotonic() + timeout_s
        for t in self._threads + [t for s in sessions for t in s.threads]:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> IGTLServer:
        return self.start()

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False

    @property
    def running(self) -> bool:
        return self._listener is not None and not self._stop.is_set()

    # -- clients -----------------------------------------------------------------------------
    @property
    def n_clients(self) -> int:
        with self._lock:
            return len(self._sessions)

    def client_header_versions(self) -> dict[int, int]:
        """Client id -> header version used for it now."""
        with self._lock:
            return {cid: s.header_version for cid, s in self._sessions.items()}

    def wait_for_clients(self, n: int = 1, timeout_s: float | None = None) -> bool:
        """Block until at least ``n`` clients are connected; False on timeout or stop."""
        with self._lock:
            return self._lock.wait_for(lambda: len(self._sessions) >= n or self._stop.is_set(), timeout_s) and (
                len(self._sessions) >= n
            )

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, address = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if not self._stop.is_set():
                    logger.exception("accept failed")
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
            except OSError:
                pass
            sock.settimeout(_SEND_TIMEOUT_S)  # reads poll with select (SocketSource)
            session = _Session(self, next(self._ids), sock, address)
            with self._lock:
                self._sessions[session.id] = session
                self._stats.clients_connected += 1
                self._stats.clients_now = len(self._sessions)
                self._lock.notify_all()
            logger.info("client %d connected from %s:%d (%d connected)", session.id, *address[:2], self.n_clients)
            session.start()

    def _drop_session(self, session: _Session) -> None:
        with self._lock:
            present = self._sessions.pop(session.id, None) is not None
            self._stats.clients_now = len(self._sessions)
            self._lock.notify_all()
        if present:
            session.close()
            logger.info("client %d disconnected (%d connected)", session.id, self.n_clients)

    # -- sending -----------------------------------------------------------------------------
    def broadcast(self, messages, *, timeout_s: float | None = None) -> int:
        """Queue ``messages`` (one bundle) for every connected client; returns clients served.

        A client whose queue is full misses the bundle (counted in ``dropped``): at once with
        ``timeout_s=0`` (a paced stream: nobody waits for a slow client), else after waiting up
        to ``timeout_s`` (default ``send_timeout_s``) for it to make room, which a client that
        takes nothing ends within ``send_timeout_s`` (it is then cut loose).
        """
        bundle = _Bundle(messages)
        timeout = self.send_timeout_s if timeout_s is None else timeout_s
        with self._lock:
            sessions = list(self._sessions.values())
            self._stats.bundles += 1
        served = 0
        for session in sessions:
            if session.put(bundle, timeout):
                served += 1
            elif session.alive:
                with self._lock:
                    self._stats.dropped += 1
        return served

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every client's queue has been handed to the socket; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            with session.cond:
                done = session.cond.wait_for(
                    lambda s=session: not s.alive or (not s.queue and not s.urgent and not s.in_flight),
                    max(0.0, deadline - time.monotonic()),
                )
            if not done:
                return False
        return True

    def send_to(self, client_id: int, message: Message) -> bool:
        """Send one message to one client ahead of its queued data; False if it is gone."""
        with self._lock:
            session = self._sessions.get(client_id)
        if session is None:
            return False
        session.reply(message)
        return True

    def _keepalive_loop(self) -> None:
        """Keep-alives for idle clients; cut loose the clients that take nothing."""
        while not self._stop.wait(min(self.keepalive_interval_s / 2, _POLL_S)):
            now = time.monotonic()
            with self._lock:
                sessions = list(self._sessions.values())
            for session in sessions:
                with session.cond:
                    stuck = session.busy() and now - session.last_progress > self.send_timeout_s
                if stuck:
                    logger.warning(
                        "client %d (%s) took no data for %.1f s (%d bundle(s) dropped for it); disconnected",
                        session.id, session.address, now - session.last_progress, session.dropped,
                    )  # fmt: skip
                    with self._lock:
                        self._stats.clients_cut += 1
                    self._drop_session(session)
                    continue
                if now - session.last_sent >= self.keepalive_interval_s and not (session.queue or session.urgent):
                    session.last_sent = now
                    session.reply(StatusMessage(code=1, timestamp_s=time.time()), version=1)
                    with self._lock:
                        self._stats.keepalives += 1

    # -- commands ----------------------------------------------------------------------------
    def _queue_command(self, session, form, uid, device_name, text, metadata, command_name) -> None:
        self._commands.put((session, form, uid, device_name, text, dict(metadata), command_name))

    def _command_loop(self) -> None:
        while True:
            item = self._commands.get()
            if item is None or self._stop.is_set():
                return
            session, form, uid, device_name, text, metadata, command_name = item
            try:
                name, attributes = parse_command_xml(text)
            except ProtocolError as exc:
                name, attributes, ok, result = command_name or "", {}, False, f"Command failed: {exc}"
            else:
                context = CommandContext(session.id, device_name, session.header_version, form, metadata)
                if self.command_handler is None:
                    ok, result = False, f"Unknown command: {name}"
                else:
                    try:
                        ok, result = self.command_handler(name, attributes, context)
                    except Exception as exc:  # a failing command is a FAIL reply, never a dead server
                        logger.exception("command %s failed", name)
                        ok, result = False, f"{name} failed: {exc}"
            with self._lock:
                self._stats.commands += 1
            logger.info("command %s from client %d (%s form): %s %s", name, session.id, form,
                        "SUCCESS" if ok else "FAIL", result)  # fmt: skip
            if form == "string":
                reply = StringMessage(device_name=reply_device_name(uid), text=reply_xml(ok, result),
                                      timestamp_s=time.time())  # fmt: skip
            else:
                reply = RTSCommandMessage(
                    device_name=device_name,
                    command_id=uid,
                    command_name=command_name or name,
                    content=reply_xml(
                        ok,
                        result if ok else "Command failed. See error message.",
                        name=name,
                        error="" if ok else result,
                    ),  # fmt: skip
                    metadata={
                        "Status": "SUCCESS" if ok else "FAIL",
                        "Message": result,
                        **({} if ok else {"Error": result}),
                    },  # fmt: skip
                    timestamp_s=time.time(),
                )
            session.reply(reply)

    # -- counters ----------------------------------------------------------------------------
    def _count_sent(self, n: int, nbytes: int) -> None:
        with self._lock:
            self._stats.messages_sent += n
            self._stats.bytes_sent += nbytes

    def _count_received(self, message: Message) -> None:
        with self._lock:
            self._stats.received += 1

    def _count_rejected(self, n: int) -> None:
        with self._lock:
            self._stats.rejected += n

    def _count_duplicate(self) -> None:
        with self._lock:
            self._stats.duplicate_commands += 1

    def _count_unhandled(self, message: Message) -> None:
        logger.warning("ignoring %s message %r from a client", message.type, message.device_name)

    def stats(self) -> ServerStats:
        with self._lock:
            return ServerStats(**asdict(self._stats))
