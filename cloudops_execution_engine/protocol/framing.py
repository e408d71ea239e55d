"""Length-prefixed msgpack frames: a 4-byte big-endian length, then one msgpack object.

The decoder is incremental (feed bytes as they arrive, take whole frames out)
and refuses a frame longer than its limit before buffering it, so a peer that
writes garbage cannot make the reader allocate without bound. After any error
the decoder stays broken: its stream position is lost and nothing it could
still return would be trustworthy.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

__all__ = ["DEFAULT_MAX_FRAME", "FrameDecoder", "ProtocolError", "encode_frame", "frame_limit_for"]

DEFAULT_MAX_FRAME = 32 * 1024 * 1024
# Room in a `Finished` frame for everything but the two outputs: ids, numbers,
# the error text (which quotes at most a path or program name).
_FINISHED_ROOM = 1024 * 1024
_HEADER = struct.Struct(">I")


def frame_limit_for(max_output_bytes: int) -> int:
    """The largest frame a worker may send when results keep `max_output_bytes` of each stream.

    A worker cuts each kept stream to `max_output_bytes` of UTF-8 after
    decoding, so a `Finished` frame holds at most twice that plus a little:
    the two limits agree by construction, whatever the setting.
    """
    return max(DEFAULT_MAX_FRAME, 2 * max_output_bytes + _FINISHED_ROOM)


class ProtocolError(Exception):
    """The byte stream from a peer is not a valid frame sequence."""


def encode_frame(payload: Any) -> bytes:
    body = msgpack.packb(payload, use_bin_type=True)
    return _HEADER.pack(len(body)) + body


class FrameDecoder:
    __slots__ = ("_broken", "_buffer", "_max_frame")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._buffer = bytearray()
        self._max_frame = max_frame
        self._broken: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def max_frame(self) -> int:
        return self._max_frame

    @max_frame.setter
    def max_frame(self, value: int) -> None:
        self._max_frame = value

    def feed(self, data: bytes) -> list[Any]:
        """Add bytes; return every frame they complete, in order."""
        if self._broken is not None:
            raise ProtocolError(f"decoder is unusable after an earlier error: {self._broken}")
        buffer = self._buffer
        buffer += data
        frames: list[Any] = []
        offset = 0
        size = len(buffer)
        try:
            while size - offset >= 4:
                (length,) = _HEADER.unpack_from(buffer, offset)
                if length > self._max_frame:
                    raise ProtocolError(f"frame of {length} bytes exceeds the {self._max_frame}-byte limit")
                end = offset + 4 + length
                if end > size:
                    break
                frames.append(_unpack(memoryview(buffer)[offset + 4 : end]))
                offset = end
        except ProtocolError as exc:
            self._broken = exc
            raise
        finally:
            if offset:
                del buffer[:offset]
        return frames


def _unpack(body: memoryview) -> Any:
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # any failure to unpack untrusted bytes is a protocol error
        raise ProtocolError(f"malformed msgpack frame: {exc}") from exc
    finally:
        body.release()
