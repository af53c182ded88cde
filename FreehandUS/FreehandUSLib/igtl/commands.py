"""PLUS remote-control commands: the XML they carry and the device names that route them.

PlusServer accepts a command in two forms and answers in the same form:

- **STRING** (OpenIGTLink 1/2, "old style"): device name ``CMD_<uid>`` and text
  ``<Command Name="StartRecording" OutputFilename="a.mha" />``; the reply is a STRING named
  ``ACK_<uid>`` with ``<CommandReply Status="SUCCESS" Message="..." />`` (``FAIL`` on error).
- **COMMAND** (OpenIGTLink 3): ``command_id`` = uid, ``command_name`` = the command name and
  the same XML as content; the reply is an RTS_COMMAND with the same id and name and content
  ``<CommandReply Name="..." Status="SUCCESS" Message="..."></CommandReply>``; with header
  version 2 the status, message and error also travel as metadata.

Text in attributes is XML-escaped (``"`` ``<`` ``&``...).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from xml.sax.saxutils import quoteattr

from .protocol import ProtocolError

__all__ = [
    "CommandReply",
    "command_xml",
    "parse_command_xml",
    "reply_xml",
    "parse_reply_xml",
    "command_device_name",
    "reply_device_name",
    "uid_from_command_device",
    "update_transform_attributes",
    "COMMAND_PREFIX",
    "REPLY_PREFIX",
]

COMMAND_PREFIX = "CMD_"
REPLY_PREFIX = "ACK_"
_UID_RE = re.compile(r"^CMD_(\d+)$")


@dataclass(frozen=True)
class CommandReply:
    """A server's answer to a command.

    Attributes
    ----------
    status : str
        ``"SUCCESS"`` or ``"FAIL"``.
    message : str
        The result (a file name, a comma-separated id list...) or a description of the failure.
    name : str
        Command name (RTS_COMMAND replies carry it).
    error : str
        Error text of a failed command (RTS_COMMAND replies).
    metadata : dict[str, str]
        Version-2 metadata of the reply.
    text : str
        The raw reply text.
    """

    status: str
    message: str = ""
    name: str = ""
    error: str = ""
    metadata: dict = field(default_factory=dict)
    text: str = ""

    @property
    def ok(self) -> bool:
        return self.status.upper() == "SUCCESS"

    def to_dict(self) -> dict:
        return {
            "status": self.status,
            "message": self.message,
            "name": self.name,
            "error": self.error,
            "metadata": dict(self.metadata),
        }

    def __str__(self) -> str:
        extra = f" ({self.error})" if self.error else ""
        return f"{self.name or 'command'}: {self.status} {self.message}{extra}".rstrip()


def _attrs_text(attrs: dict) -> str:
    return "".join(f" {key}={quoteattr(str(value))}" for key, value in attrs.items())


def command_xml(name: str, **attributes) -> str:
    """``<Command Name="name" Key="value" ... />``."""
    if not name or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
        raise ProtocolError(f"command name {name!r} is not a plain identifier")
    return f"<Command{_attrs_text({'Name': name, **attributes})} />"


def parse_command_xml(text: str) -> tuple[str, dict[str, str]]:
    """``(name, attributes)`` of a ``<Command Name=...>`` element (attributes without Name)."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise ProtocolError(f"command text is not XML ({exc}): {text[:200]!r}") from exc
    if root.tag != "Command":
        raise ProtocolError(f"command XML root is <{root.tag}>, expected <Command>")
    attrs = dict(root.attrib)
    name = attrs.pop("Name", "")
    if not name:
        raise ProtocolError("command XML has no Name attribute")
    return name, attrs


def reply_xml(status: bool, message: str, *, name: str | None = None, error: str = "") -> str:
    """The PLUS reply text; with ``name`` the RTS_COMMAND form, without it the STRING form."""
    word = "SUCCESS" if status else "FAIL"
    if name is None:
        return f"<CommandReply{_attrs_text({'Status': word, 'Message': message})} />"
    attrs = {"Name": name, "Status": word}
    if not status:
        attrs["Error"] = error
    attrs["Message"] = message
    return f"<CommandReply{_attrs_text(attrs)}></CommandReply>"


def parse_reply_xml(text: str, metadata: dict | None = None) -> CommandReply:
    """Parse a ``<CommandReply .../>`` (metadata, when given, fills in missing fields)."""
    metadata = dict(metadata or {})
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        if "Status" in metadata:
            return CommandReply(
                status=metadata.get("Status", ""),
                message=metadata.get("Message", text),
                error=metadata.get("Error", ""),
                metadata=metadata,
                text=text,
            )
        raise ProtocolError(f"command reply is not XML ({exc}): {text[:200]!r}") from exc
    if root.tag != "CommandReply":
        raise ProtocolError(f"command reply root is <{root.tag}>, expected <CommandReply>")
    a = root.attrib
    return CommandReply(
        status=a.get("Status", metadata.get("Status", "")),
        message=a.get("Message", metadata.get("Message", "")),
        name=a.get("Name", ""),
        error=a.get("Error", metadata.get("Error", "")),
        metadata=metadata,
        text=text,
    )


def command_device_name(uid: int) -> str:
    return f"{COMMAND_PREFIX}{int(uid)}"


def reply_device_name(uid: int | None) -> str:
    """``ACK_<uid>``; ``ACK`` when the uid could not be read (as PlusServer replies)."""
    return "ACK" if uid is None else f"{REPLY_PREFIX}{int(uid)}"


def uid_from_command_device(device_name: str) -> int | None:
    """The uid of ``CMD_<uid>``, None when the suffix is not a number."""
    match = _UID_RE.match(device_name)
    return int(match.group(1)) if match else None


def update_transform_attributes(name: str, matrix, *, error_mm=None, date: str | None = None,
                                persistent: bool = True) -> dict:
    """The attributes of PLUS's ``UpdateTransform`` command for a 4x4 matrix.

    PlusServer reads ``TransformName`` (``"ImageToProbe"``), ``TransformValue`` (16 numbers,
    row by row, separated by spaces), ``TransformPersistent`` (``TRUE``: written into the
    configuration by a later ``SaveConfig``), ``TransformError`` (mm) and ``TransformDate``.

    Parameters
    ----------
    name : str
        ``<From>To<To>``, a transform of the server's repository.
    matrix : (4, 4) array_like of finite numbers
        Written with full float precision (``repr``).
    error_mm : float, optional
    date : str, optional
        As PLUS writes it (``"2026.12.07 15:04:05"``).
    persistent : bool

    Raises
    ------
    ProtocolError
        A name that is not an identifier, or a matrix that is not 4x4 finite numbers.
    """
    import math

    if not re.match(r"^[A-Za-z][A-Za-z0-9]*To[A-Z][A-Za-z0-9]*$", name or ""):
        raise ProtocolError(f"UpdateTransform: transform name {name!r} is not of the form <From>To<To>")
    try:
        rows = [[float(v) for v in row] for row in matrix]
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"UpdateTransform {name}: the matrix is not numbers ({exc})") from exc
    values = [v for row in rows for v in row]
    if len(rows) != 4 or any(len(row) != 4 for row in rows) or not all(math.isfinite(v) for v in values):
        raise ProtocolError(f"UpdateTransform {name}: expected a 4x4 matrix of finite numbers")
    attributes = {
        "TransformName": name,
        "TransformValue": " ".join(repr(v) for v in values),
        "TransformPersistent": "TRUE" if persistent else "FALSE",
    }
    if error_mm is not None and math.isfinite(float(error_mm)):
        attributes["TransformError"] = repr(float(error_mm))
    if date:
        attributes["TransformDate"] = str(date)
    return attributes

