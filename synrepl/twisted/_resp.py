"""A pure-Python RESP2 reply reader, for when hiredis is not installed."""

from __future__ import annotations

import txredisapi  # type: ignore[import-untyped]

__all__ = ("PythonReader",)

#: Consumed bytes are dropped from the buffer once this many have piled up.
_COMPACT_AFTER = 65536


class _Incomplete(Exception):
    """The buffer ends inside a reply."""


class PythonReader:
    """RESP2 with ``hiredis.Reader``'s ``feed()``/``gets()`` interface.

    Used instead of txredisapi's own line parser, which pauses and resumes
    the transport by itself and so cannot honour ``pause_reading()``.  Like
    hiredis without an encoding, it returns bytes for strings, int, None,
    lists, and a ``txredisapi.ResponseError`` for an error reply.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._pos = 0

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def gets(self) -> object:
        """The next complete reply, or False if there is none yet."""
        try:
            reply, self._pos = self._parse(self._pos)
        except _Incomplete:
            return False
        if self._pos == len(self._buffer) or self._pos > _COMPACT_AFTER:
            del self._buffer[: self._pos]
            self._pos = 0
        return reply

    def _parse(self, pos: int) -> tuple[object, int]:
        buffer = self._buffer
        end = buffer.find(b"\r\n", pos)
        if end < 0:
            raise _Incomplete
        kind, line, pos = buffer[pos], bytes(buffer[pos + 1 : end]), end + 2
        if kind == 0x2B:  # +
            return line, pos
        if kind == 0x2D:  # -
            return txredisapi.ResponseError(line.decode("utf-8", "replace")), pos
        try:
            number = int(line)
        except ValueError:
            raise txredisapi.InvalidData(f"bad length or integer {line[:40]!r}") from None
        if kind == 0x3A:  # :
            return number, pos
        if kind == 0x24:  # $
            if number < 0:
                return None, pos
            if len(buffer) < pos + number + 2:
                raise _Incomplete
            return bytes(buffer[pos : pos + number]), pos + number + 2
        if kind == 0x2A:  # *
            if number < 0:
                return None, pos
            items = []
            for _ in range(number):
                item, pos = self._parse(pos)
                items.append(item)
            return items, pos
        raise txredisapi.InvalidData(f"unknown reply type {chr(kind)!r}")
