"""Redis MONITOR lines, read back exactly.

MONITOR reports every command a Redis server runs, in the order it ran
them, as ``<unix time> [<db> <client>] "arg" "arg" ...``, each argument
quoted and escaped the way ``redis-cli`` shows strings (``\\"``, ``\\\\``,
``\\n``, ``\\r``, ``\\t``, ``\\a``, ``\\b`` and ``\\xHH`` for every other
unprintable byte).  A conformance check watches a process under test this
way: what it subscribed to and published, and in which order, from the
server's point of view.  Arguments are returned as bytes because a process
may publish bytes that are not UTF-8, and saying so is part of the check.
"""

from __future__ import annotations

import attrs

__all__ = ("MonitorEntry", "parse_monitor_line")

_SIMPLE_ESCAPES = {
    ord("\\"): b"\\",
    ord('"'): b'"',
    ord("n"): b"\n",
    ord("r"): b"\r",
    ord("t"): b"\t",
    ord("a"): b"\a",
    ord("b"): b"\b",
}
_HEX = b"0123456789abcdefABCDEF"


@attrs.frozen
class MonitorEntry:
    """One command a Redis server ran.

    Attributes:
        at: the server's clock when it ran, in Unix seconds.
        db: the database index the client had selected.
        client: the client's address (``127.0.0.1:50312``, ``unix:/path``,
            ``lua`` for scripts).
        args: the command and its arguments, unescaped.
    """

    at: float
    db: int
    client: str
    args: tuple[bytes, ...]

    @property
    def command(self) -> str:
        """The command's name, lowercased (``publish``, ``subscribe``)."""
        return self.args[0].decode("ascii", "replace").lower() if self.args else ""


def parse_monitor_line(line: bytes | str) -> MonitorEntry:
    """One MONITOR line (without its ``+`` or line ending) as an entry.

    Raises:
        ValueError: the line is not a MONITOR line; the message says where.
    """
    data = line.encode("utf-8", "surrogateescape") if isinstance(line, str) else line
    head, sep, rest = data.partition(b" [")
    close = rest.find(b"] ")
    if not sep or close < 0:
        raise ValueError(f"not a MONITOR line (no '[db client]'): {data[:80]!r}")
    try:
        at = float(head)
        db_text, _, client = rest[:close].partition(b" ")
        db = int(db_text)
    except ValueError:
        raise ValueError(f"not a MONITOR line (bad time or db): {data[:80]!r}") from None
    return MonitorEntry(at, db, client.decode("utf-8", "replace"), _arguments(rest[close + 2 :]))


def _arguments(data: bytes) -> tuple[bytes, ...]:
    args: list[bytes] = []
    i, n = 0, len(data)
    while i < n:
        if data[i] == 0x20:
            i += 1
            continue
        if data[i] != 0x22:
            raise ValueError(f"MONITOR argument does not start with a quote at {i}: {data!r}")
        i += 1
        out = bytearray()
        while True:
            if i >= n:
                raise ValueError(f"MONITOR argument not closed: {data!r}")
            byte = data[i]
            if byte == 0x22:
                i += 1
                break
            if byte != 0x5C:
                out.append(byte)
                i += 1
                continue
            escaped = data[i + 1] if i + 1 < n else -1
            if escaped == ord("x") and i + 3 < n and _is_hex(data[i + 2 : i + 4]):
                out.append(int(data[i + 2 : i + 4], 16))
                i += 4
            elif escaped in _SIMPLE_ESCAPES:
                out += _SIMPLE_ESCAPES[escaped]
                i += 2
            else:
                raise ValueError(f"bad escape in MONITOR argument at {i}: {data!r}")
        args.append(bytes(out))
    return tuple(args)


def _is_hex(pair: bytes) -> bool:
    return len(pair) == 2 and all(c in _HEX for c in pair)
