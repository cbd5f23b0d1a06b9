"""Sans-IO framing for byte streams (serial, USB CDC, TCP/TLS): COBS, CRC-32, 0x00 delimiter.

A frame on the wire is ``0x00 COBS(payload || CRC32(payload)) 0x00``. COBS leaves
no zero byte inside the frame, so a receiver that lost sync (noise, a cable
plugged in mid-frame) resynchronises at the next zero. The CRC catches noise;
the signatures inside the payload give authenticity. Overhead: 1 byte per 254
plus 6, about 0.5 % for a 4 KiB payload.
"""

from __future__ import annotations

from binascii import crc32  # zlib's CRC-32 without loading libz

from agent.record import record

__all__ = [
    "DEFAULT_MAX_FRAME",
    "CorruptFrame",
    "Frame",
    "FrameDecoder",
    "FrameTooLarge",
    "cobs_decode",
    "cobs_encode",
    "encode_frame",
]

#: largest payload accepted (a 64 KiB file plus its RPC envelope)
DEFAULT_MAX_FRAME = 80 * 1024


def cobs_encode(data: bytes) -> bytes:
    """Consistent Overhead Byte Stuffing: the result contains no zero byte."""
    out = bytearray()
    for chunk in data.split(b"\x00"):
        # each zero-free chunk becomes blocks of at most 254 bytes
        while len(chunk) >= 254:
            out.append(255)
            out += chunk[:254]
            chunk = chunk[254:]
        out.append(len(chunk) + 1)
        out += chunk
    return bytes(out)


def cobs_decode(data: bytes) -> bytes:
    """Inverse of :func:`cobs_encode`.

    Raises:
        ValueError: not a valid COBS encoding.
    """
    out = bytearray()
    i = 0
    n = len(data)
    while i < n:
        code = data[i]
        if code == 0:
            raise ValueError("zero byte inside a COBS block")
        end = i + code
        if end > n:
            raise ValueError("COBS block runs past the end of the frame")
        block = data[i + 1:end]
        if 0 in block:
            raise ValueError("zero byte inside a COBS block")
        out += block
        i = end
        if code != 255 and i < n:
            out.append(0)
    return bytes(out)


def encode_frame(payload: bytes) -> bytes:
    """One frame, ready to write to the link."""
    crc = crc32(payload).to_bytes(4, "big")
    # a leading delimiter too: garbage or half a frame left on the line by an earlier
    # session is closed off at once instead of corrupting this frame (1 byte per frame)
    return b"\x00" + cobs_encode(payload + crc) + b"\x00"


@record(frozen=True)
class Frame:
    """A frame that passed its checksum."""

    payload: bytes


@record(frozen=True)
class CorruptFrame:
    """Bytes between two delimiters that are not a valid frame (noise, a torn frame)."""

    reason: str
    length: int


@record(frozen=True)
class FrameTooLarge:
    """More bytes than the size limit arrived without a delimiter; they were dropped."""

    length: int


FrameEvent = Frame | CorruptFrame | FrameTooLarge


class FrameDecoder:
    """Feed it bytes in any chunking; it returns complete frames and the errors it saw.

    Memory is bounded: at most ``max_frame`` encoded bytes are buffered; an
    oversized frame is discarded up to the next delimiter.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        # encoded size limit: payload + CRC + COBS overhead
        self.max_frame = max_frame
        self.max_encoded = max_frame + 4 + (max_frame + 4) // 254 + 2
        self._buf = bytearray()
        self._discarding = False
        self._discarded = 0

    def feed(self, data: bytes) -> list[FrameEvent]:
        events: list[FrameEvent] = []
        start = 0
        while start <= len(data):
            z = data.find(b"\x00", start)
            piece = data[start:] if z < 0 else data[start:z]
            if self._discarding:
                self._discarded += len(piece)
            else:
                self._buf += piece
                if len(self._buf) > self.max_encoded:
                    self._discarding = True
                    self._discarded = len(self._buf)
                    self._buf.clear()
            if z < 0:
                break
            # a delimiter: close the current frame
            if self._discarding:
                events.append(FrameTooLarge(self._discarded))
                self._discarding = False
                self._discarded = 0
            elif self._buf:
                events.append(self._close(bytes(self._buf)))
                self._buf.clear()
            start = z + 1
        return events

    def _close(self, encoded: bytes) -> Frame | CorruptFrame:
        try:
            raw = cobs_decode(encoded)
        except ValueError as exc:
            return CorruptFrame(str(exc), len(encoded))
        if len(raw) < 4:
            return CorruptFrame("frame shorter than its checksum", len(encoded))
        payload, crc = raw[:-4], raw[-4:]
        if len(payload) > self.max_frame:
            return CorruptFrame(f"payload of {len(payload)} bytes exceeds the frame limit",
                                len(encoded))
        if crc32(payload).to_bytes(4, "big") != crc:
            return CorruptFrame("checksum mismatch", len(encoded))
        return Frame(payload)

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def in_frame(self) -> bool:
        """Bytes of a frame not yet closed by its delimiter have arrived (or are being
        discarded as too large)."""
        return bool(self._buf) or self._discarding
