"""The wire protocol between the supervisor and its workers."""

from .framing import DEFAULT_MAX_FRAME, FrameDecoder, ProtocolError, encode_frame
from .messages import (
    Cancel,
    Finished,
    Hello,
    Kind,
    Message,
    Output,
    Run,
    SetEnv,
    Shutdown,
    Started,
    Stream,
    decode_message,
)

__all__ = [
    "DEFAULT_MAX_FRAME",
    "Cancel",
    "Finished",
    "FrameDecoder",
    "Hello",
    "Kind",
    "Message",
    "Output",
    "ProtocolError",
    "Run",
    "SetEnv",
    "Shutdown",
    "Started",
    "Stream",
    "decode_message",
    "encode_frame",
]
