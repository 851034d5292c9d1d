"""Protocol-buffer wire format pieces shared by the TF-free model checks."""

from __future__ import annotations


def read_varint(
    buf: memoryview, pos: int, error: type[Exception], what: str = ""
) -> tuple[int, int]:
    """The base-128 varint at buf[pos:] and the position after it; `error` if malformed."""
    where = f" in {what}" if what else ""
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise error(f"truncated varint{where}")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise error(f"varint longer than 10 bytes{where}")
