"""Push a calibration into a running PlusServer (PLUS remote commands over OpenIGTLink).

What PlusRemote users do instead of pasting the ``<Transform>`` element into the configuration
and restarting PlusServer: send ``UpdateTransform`` (the new ImageToProbe goes into the
server's transform repository at once, so ``Image_Reference`` is placed with it from the next
frame) and ``SaveConfig`` (the server writes its configuration with the persistent transform,
to the file it was started with or to ``Filename``). Both are PLUS STRING commands
(``CMD_<uid>`` -> ``ACK_<uid>``, :mod:`FreehandUSLib.igtl.commands`) sent by the project's own
client on a connection of its own to the server the Slicer connector uses (PlusServer serves
any number of clients).

No ``slicer`` and no MRML here: :func:`NWireCalibrationLib.mrml_calibration.push_calibration_node`
reads the transform node and calls :func:`push_calibration`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from FreehandUSLib.errors import FreehandUSError

__all__ = ["push_calibration", "parse_server", "PushResult", "PlusRemoteError", "DEFAULT_PORT"]

#: PlusServer's default OpenIGTLink port.
DEFAULT_PORT = 18944

logger = logging.getLogger(__name__)


class PlusRemoteError(FreehandUSError):
    """PlusServer could not be reached, or refused or did not answer a command."""


@dataclass(frozen=True, eq=False)
class PushResult:
    """What the server answered.

    Attributes
    ----------
    server : str
        ``host:port``.
    transform_name : str
    update_reply : FreehandUSLib.igtl.commands.CommandReply
    save_reply : CommandReply or None
        None when ``save_config`` was false.
    """

    server: str
    transform_name: str
    update_reply: object
    save_reply: object

    def __str__(self) -> str:
        saved = "" if self.save_reply is None else f"; configuration saved ({self.save_reply.message or 'OK'})"
        return f"{self.transform_name} updated in PlusServer at {self.server}{saved}"

    def to_dict(self) -> dict:
        return {
            "server": self.server,
            "transform_name": self.transform_name,
            "update": self.update_reply.to_dict(),
            "save": None if self.save_reply is None else self.save_reply.to_dict(),
        }


def parse_server(text: str = "", *, connector_node=None) -> tuple[str, int]:
    """(host, port) of the PlusServer: ``"host:port"`` or ``"host"``, else a connector's, else the default.

    Parameters
    ----------
    text : str
        ``"192.168.0.5:18944"``, ``"localhost"`` (port 18944) or "" (use ``connector_node``).
    connector_node : vtkMRMLIGTLConnectorNode, optional
        SlicerOpenIGTLink's connector (client type): its ``GetServerHostname()`` and
        ``GetServerPort()``; without one, ``127.0.0.1:18944``.

    Raises
    ------
    PlusRemoteError
        A port that is not a number from 1 to 65535, or an empty host.
    """
    text = (text or "").strip()
    if not text:
        if connector_node is not None:
            return str(connector_node.GetServerHostname() or "127.0.0.1"), int(connector_node.GetServerPort())
        return "127.0.0.1", DEFAULT_PORT
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = text, str(DEFAULT_PORT)
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not host or not 1 <= port <= 65535:
        raise PlusRemoteError(f"PlusServer {text[:60]!r}: expected host:port with a port from 1 to 65535")
    return host, port


def push_calibration(image_to_probe, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                     transform_name: str = "ImageToProbe", error_mm=None, date: str | None = None,
                     save_config: bool = True, config_filename: str | None = None,
                     timeout_s: float = 5.0) -> PushResult:
    """Send a calibration to a running PlusServer: ``UpdateTransform``, then ``SaveConfig``.

    Parameters
    ----------
    image_to_probe : (4, 4) array_like
        Image pixels -> Probe mm (PLUS's ImageToProbe, as the calibration computes it).
    host, port : str, int
        The PlusServer (the Slicer connector's server; PlusServer's default port is 18944).
    transform_name : str
        The repository transform to replace.
    error_mm, date : optional
        ``TransformError`` (mm) and ``TransformDate`` written with it.
    save_config : bool
        Also ask the server to write its configuration (the transform is persistent).
    config_filename : str, optional
        ``SaveConfig``'s ``Filename`` (a path on the server's machine); default: the server's
        own choice (the file it was started with).
    timeout_s : float
        Longest wait for the connection and for each reply (s).

    Returns
    -------
    PushResult

    Raises
    ------
    PlusRemoteError
        No server at ``host:port`` within ``timeout_s``, no reply, or a FAIL reply (the
        server's message); ``SaveConfig`` is not sent when ``UpdateTransform`` failed.
    FreehandUSLib.igtl.protocol.ProtocolError
        A bad matrix or transform name (checked before connecting).
    """
    from FreehandUSLib.igtl.client import CommandTimeoutError, IGTLClient, IGTLConnectionError
    from FreehandUSLib.igtl.commands import update_transform_attributes

    if not (np.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a finite number of seconds > 0, got {timeout_s}")
    attributes = update_transform_attributes(
        transform_name, np.asarray(image_to_probe, dtype=np.float64), error_mm=error_mm, date=date, persistent=True
    )
    server = f"{host}:{int(port)}"
    client = IGTLClient(host, int(port), reconnect=False, max_connect_attempts=1,
                        connect_timeout_s=float(timeout_s)).start()
    try:
        client.wait_for_state(("connected", "closed"), float(timeout_s))  # "closed": refused, gave up
        if client.state != "connected":
            raise PlusRemoteError(f"no PlusServer answers at {server} (start it, or check the connector's host and port)")
        try:
            update = client.command("UpdateTransform", timeout_s=float(timeout_s), **attributes)
            if not update.ok:
                raise PlusRemoteError(f"PlusServer at {server} refused UpdateTransform {transform_name}: {update}")
            saved = None
            if save_config:
                extra = {} if not config_filename else {"Filename": str(config_filename)}
                saved = client.command("SaveConfig", timeout_s=float(timeout_s), **extra)
                if not saved.ok:
                    raise PlusRemoteError(
                        f"PlusServer at {server} took {transform_name} but could not save its configuration: {saved}"
                    )
        except (CommandTimeoutError, IGTLConnectionError) as exc:
            raise PlusRemoteError(f"PlusServer at {server}: {exc}") from exc
    finally:
        client.close()
    result = PushResult(server, transform_name, update, saved)
    logger.info("%s", result)
    return result
