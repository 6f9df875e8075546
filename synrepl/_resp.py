"""RESP2, the Redis wire format, without a reactor: commands out, replies in.

Shared by the Twisted and asyncio transports:

- :func:`encode_command` writes one command as Redis expects it;
- :class:`PythonReader` reads replies with ``hiredis.Reader``'s interface,
  for when hiredis is not installed; :func:`make_reader` picks one;
- :func:`pubsub_push` tells a pub/sub push (``message``, ``subscribe``)
  from the reply to a command;
- :class:`Subscription` tracks SUBSCRIBE's per-channel confirmations.

Values stay bytes: the connection policy (:mod:`synrepl.connection`)
decides how a message is decoded.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final, Protocol

__all__ = (
    "ReplyError",
    "RespProtocolError",
    "Reader",
    "PythonReader",
    "HIREDIS",
    "make_reader",
    "encode_command",
    "MESSAGE",
    "SUBSCRIBED",
    "pubsub_push",
    "Subscription",
)

#: Consumed bytes are dropped from the buffer once this many have piled up.
_COMPACT_AFTER = 65536


class ReplyError(Exception):
    """Redis answered with an error reply (``-ERR ...``); the text is Redis's."""


class RespProtocolError(Exception):
    """The bytes are not RESP2: the stream cannot be read further."""


class Reader(Protocol):
    """``hiredis.Reader``'s interface, as used here."""

    def feed(self, data: bytes, /) -> None: ...
    def gets(self) -> Any: ...


class _Incomplete(Exception):
    """The buffer ends inside a reply."""


class PythonReader:
    """RESP2 with ``hiredis.Reader``'s ``feed()``/``gets()`` interface (and its
    argument names).

    Like hiredis without an encoding, it returns bytes for strings, int,
    None, lists, and an instance of ``replyError`` for an error reply; bytes
    that are not RESP2 raise ``protocolError``.

    Args:
        protocolError: raised for bytes that are not RESP2.
        replyError: made (not raised) for each error reply.
    """

    def __init__(
        self,
        protocolError: type[Exception] = RespProtocolError,
        replyError: type[Exception] = ReplyError,
    ) -> None:
        self._buffer = bytearray()
        self._pos = 0
        self._protocol_error = protocolError
        self._reply_error = replyError

    def feed(self, data: bytes, /) -> None:
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
            return self._reply_error(line.decode("utf-8", "replace")), pos
        try:
            number = int(line)
        except ValueError:
            raise self._protocol_error(f"bad length or integer {line[:40]!r}") from None
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
        raise self._protocol_error(f"unknown reply type {chr(kind)!r}")


def _hiredis_importable() -> bool:
    try:
        import hiredis  # noqa: F401
    except ImportError:
        return False
    return True


#: Whether :func:`make_reader` uses hiredis (the C reply parser): whether it
#: is installed.
HIREDIS: bool = _hiredis_importable()


def make_reader(
    protocol_error: type[Exception] = RespProtocolError,
    reply_error: type[Exception] = ReplyError,
    *,
    use_hiredis: bool | None = None,
) -> Reader:
    """A reply reader: hiredis's where installed, else :class:`PythonReader`.

    Args:
        protocol_error: raised for bytes that are not RESP2.
        reply_error: made (not raised) for each error reply.
        use_hiredis: force one (True fails without hiredis); None: as
            :data:`HIREDIS` says.
    """
    if use_hiredis is None:
        use_hiredis = HIREDIS
    if use_hiredis:
        import hiredis

        reader: Reader = hiredis.Reader(protocolError=protocol_error, replyError=reply_error)
        return reader
    return PythonReader(protocolError=protocol_error, replyError=reply_error)


def _bulk(arg: str | bytes | int) -> bytes:
    if isinstance(arg, bytes):
        data = arg
    elif isinstance(arg, str):
        data = arg.encode("utf-8")
    elif isinstance(arg, int) and not isinstance(arg, bool):
        data = b"%d" % arg
    else:
        raise TypeError(f"a Redis command argument is str, bytes or int, not {type(arg).__name__}")
    return b"$%d\r\n%s\r\n" % (len(data), data)


def encode_command(*args: str | bytes | int) -> bytes:
    """One command as a RESP2 array of bulk strings (str is sent as UTF-8)."""
    return b"*%d\r\n" % len(args) + b"".join(map(_bulk, args))


#: The kinds of push :func:`pubsub_push` recognises.
MESSAGE: Final = b"message"
SUBSCRIBED: Final = b"subscribe"


def pubsub_push(reply: object) -> tuple[bytes, object, object] | None:
    """``(kind, channel, payload)`` if ``reply`` is a pub/sub ``message`` or
    ``subscribe`` push, else None (it answers a command, in order).

    A subscribed connection's PING is answered ``["pong", ""]`` (two items),
    so it is an answer, not a push.
    """
    if type(reply) is list and len(reply) == 3:
        kind = reply[0]
        if kind == MESSAGE or kind == SUBSCRIBED:
            return kind, reply[1], reply[2]
        if kind == "message" or kind == "subscribe":  # a reader with an encoding
            return kind.encode(), reply[1], reply[2]
    return None


class Subscription:
    """SUBSCRIBE's answer: one ``subscribe`` push per channel, in any order.

    Args:
        channels: the channels SUBSCRIBE named.
    """

    def __init__(self, channels: Iterable[str]) -> None:
        self.channels = tuple(channels)
        self._unconfirmed = {c.encode("utf-8") for c in self.channels}

    @property
    def command(self) -> bytes:
        """The SUBSCRIBE command to send."""
        return encode_command("SUBSCRIBE", *self.channels)

    def confirmed(self, channel: object) -> bool:
        """Redis confirmed ``channel``; returns whether every channel now is."""
        if isinstance(channel, str):
            channel = channel.encode("utf-8")
        if isinstance(channel, (bytes, bytearray)):
            self._unconfirmed.discard(bytes(channel))
        return not self._unconfirmed
