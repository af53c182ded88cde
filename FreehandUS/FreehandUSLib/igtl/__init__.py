"""OpenIGTLink streams: PLUS-compatible client, replay server, lossless recorder, live pipelines.

Modules
-------
crc64      CRC-64/ECMA-182 as OpenIGTLink computes it (numba slice-by-8 kernel)
protocol   header v1/v2, metadata, IMAGE/TRANSFORM/STRING/STATUS/TDATA/POSITION/COMMAND codecs
framing    robust message reader (exact-length reads, CRC, skip + resync), send helpers
commands   PLUS remote-control command XML (CMD_/ACK_ STRING and COMMAND/RTS_COMMAND)
client     :class:`IGTLClient`: reader thread, bounded FIFO, state callbacks, reconnect
server     :class:`IGTLServer`: multi-client server core (keep-alive, v1 until the client speaks v2)
replay     :class:`ReplayServer`: a tracked sequence streamed as PlusServer streams
pairing    :class:`FramePairer`: each image with its transforms at its timestamp
recorder   :class:`StreamRecorder` / :func:`record_stream`: paired frames -> PLUS file, incrementally
live       headless live pipelines (:func:`run_live`; the consumers live in the capabilities)
cli        ``freehandus serve`` / ``freehandus record`` (:func:`add_parsers`)

Inside Slicer the SlicerOpenIGTLink connector node does the networking; these classes are the
headless twin used by the command line, tests and benchmarks.
"""

from .client import ClientStats, CommandTimeoutError, IGTLClient, IGTLConnectionError
from .commands import CommandReply
from .crc64 import crc64
from .framing import MessageReader, StreamStats
from .live import LiveSummary, run_live
from .pairing import FramePairer, PairedFrame
from .protocol import (
    CommandMessage,
    ImageMessage,
    Message,
    PositionMessage,
    ProtocolError,
    RawMessage,
    RTSCommandMessage,
    StatusMessage,
    StringMessage,
    TrackingDataElement,
    TrackingDataMessage,
    TransformMessage,
    decode_body,
    encode_message,
    unpack_header,
)
from .recorder import (
    IncrementalSequenceFile,
    RecordingExistsError,
    RecordingSummary,
    StreamRecorder,
    record_stream,
)
from .replay import ReplayServer
from .server import IGTLServer, ServerStats

__all__ = [
    "crc64",
    "ProtocolError",
    "Message",
    "ImageMessage",
    "TransformMessage",
    "StringMessage",
    "StatusMessage",
    "TrackingDataElement",
    "TrackingDataMessage",
    "PositionMessage",
    "CommandMessage",
    "RTSCommandMessage",
    "RawMessage",
    "encode_message",
    "decode_body",
    "unpack_header",
    "MessageReader",
    "StreamStats",
    "CommandReply",
    "IGTLClient",
    "ClientStats",
    "IGTLConnectionError",
    "CommandTimeoutError",
    "IGTLServer",
    "ServerStats",
    "ReplayServer",
    "StreamRecorder",
    "RecordingSummary",
    "IncrementalSequenceFile",
    "RecordingExistsError",
    "record_stream",
    "FramePairer",
    "PairedFrame",
    "LiveSummary",
    "run_live",
]
