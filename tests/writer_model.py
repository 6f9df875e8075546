"""The model cluster of the state-machine tests: writers, their rows, their wire.

Each writer keeps, per stream, its rows by token, its current token and
``last`` (the token Synapse would put in a POSITION's ``prev``), and the
messages it sent that have not arrived yet.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import attrs

from synrepl.streams import AnyRow, parse_row

WRITERS_BY_STREAM = {
    "events": ("master", "p1", "p2"),
    "receipts": ("master", "p1"),
    "typing": ("master",),  # resettable, single writer as in Synapse
}
PAIRS = tuple((s, w) for s, ws in WRITERS_BY_STREAM.items() for w in ws)
WRITERS = ("master", "p1", "p2")

Pair = tuple[str, str]


def make_row(stream: str, n: int) -> AnyRow:
    if stream == "typing":
        return parse_row("typing", [f"!r{n}:x", [f"@u{n}:x"]])
    if stream == "receipts":
        return parse_row("receipts", ["!r:x", "m.read", "@u:x", f"$e{n}", None, {"ts": n}])
    return parse_row(
        "events", ["ev", [f"$e{n}", "!r:x", "m.room.message", None, None, None, None, False, False]]
    )


def label(row: AnyRow) -> str:
    """The unique name a model row was made with."""
    return getattr(row, "room_id" if type(row).__name__ == "TypingRow" else "event_id")  # type: ignore[no-any-return]


@attrs.define
class WriterStream:
    token: int = 0
    last: int = 0
    history: dict[int, list[AnyRow]] = attrs.Factory(dict)


@attrs.define
class Writer:
    name: str
    streams: dict[str, WriterStream]
    wire: deque[Any] = attrs.Factory(deque)
    owes_answer: bool = True
