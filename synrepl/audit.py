"""Did Synapse publish every row it wrote?  The sans-IO half of ``synrepl audit``.

A writer's HTTP history (``get_repl_stream_updates``) is what it persisted;
the channel is what it told the cluster.  :class:`ChannelRecord` keeps, per
(stream, writer), the token ranges it watched in full and the rows that came
in them; :func:`check_range` compares one range with the writer's history
and names every row the history holds that never came as RDATA, with the
POSITION that stepped over it, if one did.

A range opens at the pair's first command after a subscription: a POSITION
opens it at its new token, an RDATA at its token (whose rows are left out:
the subscription may have started inside that token's batch).  It grows with
each later token, and closes when the subscription is lost (the next one
opens a new range, so what was published meanwhile is never judged) or
when the record is frozen.  After :meth:`freeze` rows
still count for the ranges as they stand, so that rows published just
before a writer's last POSITION, and still on their way, are not taken for
lost.  Tokens at or below a range's start are never judged.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Collection, Iterable

import attrs

from synrepl.commands import Command, PositionCommand, RdataCommand
from synrepl.streams import AnyRow

__all__ = (
    "ChannelRecord",
    "WatchedRange",
    "LostRow",
    "RangeCheck",
    "check_range",
    "row_key",
)


_canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


@attrs.frozen
class WatchedRange:
    """Tokens ``(after, upto]`` of one writer's stream, watched without a break."""

    stream: str
    writer: str
    after: int
    upto: int
    #: Rows that came on the channel in the range, as :func:`row_key` counts.
    seen: Counter[tuple[int, str]] = attrs.field(eq=False, repr=False)
    #: The POSITIONs of this writer and stream heard in the range: (prev, new).
    positions: tuple[tuple[int, int], ...] = attrs.field(eq=False, repr=False)

    @property
    def rows_seen(self) -> int:
        return sum(self.seen.values())

    def skipped_by(self, token: int) -> tuple[int, int] | None:
        """The POSITION that said nothing was written at ``token``, if one did."""
        for prev, new in self.positions:
            if prev < token <= new:
                return prev, new
        return None


@attrs.frozen
class LostRow:
    """A row in the writer's history that never came as RDATA."""

    stream: str
    writer: str
    token: int
    row: AnyRow
    #: The POSITION (prev, new] that stepped over the row; None: none did.
    skipped_by: tuple[int, int] | None


@attrs.frozen
class RangeCheck:
    """One watched range against the writer's history."""

    range: WatchedRange
    rows_in_history: int
    lost: tuple[LostRow, ...]

    @property
    def silent(self) -> bool:
        """The history holds rows in the range, and none came on the channel."""
        return self.rows_in_history > 0 and self.range.rows_seen == 0


def row_key(row: AnyRow) -> str:
    """One row's identity across the channel and HTTP (its canonical JSON)."""
    return _canonical.encode(row.to_raw())


def check_range(rng: WatchedRange, history: Iterable[tuple[int, AnyRow]]) -> RangeCheck:
    """Compare ``rng`` with the writer's history of it (rows outside the range
    are ignored, so a page that reaches further does no harm)."""
    unmatched = Counter(rng.seen)
    lost: list[LostRow] = []
    total = 0
    for token, row in history:
        if not rng.after < token <= rng.upto:
            continue
        total += 1
        key = (token, row_key(row))
        if unmatched[key] > 0:
            unmatched[key] -= 1
            continue
        lost.append(LostRow(rng.stream, rng.writer, token, row, rng.skipped_by(token)))
    return RangeCheck(rng, total, tuple(lost))


@attrs.define
class _Open:
    after: int
    upto: int
    seen: Counter[tuple[int, str]] = attrs.Factory(Counter)
    positions: list[tuple[int, int]] = attrs.Factory(list)
    batch: list[AnyRow] = attrs.Factory(list)

    def closed(self, stream: str, writer: str) -> WatchedRange:
        return WatchedRange(stream, writer, self.after, self.upto, self.seen, tuple(self.positions))


class ChannelRecord:
    """What the channel carried, range by range (see the module docs).

    Args:
        streams: only these streams (None: all).
    """

    def __init__(self, streams: Collection[str] | None = None) -> None:
        self._streams = None if streams is None else frozenset(streams)
        self._open: dict[tuple[str, str], _Open] = {}
        self._closed: list[WatchedRange] = []
        self._frozen = False

    def subscribed(self) -> None:
        """A (re)subscription: what came before it is a range of its own, and
        nothing between the two is judged."""
        self._close_all()

    def freeze(self) -> None:
        """The window is over: ranges stop growing, their rows still count."""
        self._frozen = True

    def command(self, cmd: Command) -> None:
        if isinstance(cmd, RdataCommand):
            self._rdata(cmd)
        elif isinstance(cmd, PositionCommand):
            self._position(cmd)

    def heard(self) -> set[tuple[str, str]]:
        """Every (stream, writer) a range was opened for."""
        return {(r.stream, r.writer) for r in self.ranges()}

    def ranges(self) -> list[WatchedRange]:
        """Every range, closed ones first, open ones as they stand."""
        current = [o.closed(s, w) for (s, w), o in self._open.items()]
        return [*self._closed, *current]

    # ---------------------------------------------------------------- internals

    def _wanted(self, stream: str) -> bool:
        return self._streams is None or stream in self._streams

    def _rdata(self, cmd: RdataCommand) -> None:
        if not self._wanted(cmd.stream_name):
            return
        key = (cmd.stream_name, cmd.instance_name)
        opened = self._open.get(key)
        if opened is None:
            if cmd.token is not None and not self._frozen:
                self._open[key] = _Open(cmd.token, cmd.token)
            return
        if cmd.token is None:
            opened.batch.append(cmd.row)
            return
        rows, opened.batch = [*opened.batch, cmd.row], []
        token = cmd.token
        if token <= opened.after:
            return
        if token > opened.upto:
            if self._frozen:
                return
            opened.upto = token
        for row in rows:
            opened.seen[(token, row_key(row))] += 1

    def _position(self, cmd: PositionCommand) -> None:
        if not self._wanted(cmd.stream_name):
            return
        key = (cmd.stream_name, cmd.instance_name)
        opened = self._open.get(key)
        if opened is None:
            if not self._frozen:
                self._open[key] = _Open(cmd.new_token, cmd.new_token)
            return
        opened.batch.clear()
        if cmd.new_token > cmd.prev_token:
            opened.positions.append((cmd.prev_token, cmd.new_token))
        if not self._frozen and cmd.new_token > opened.upto:
            opened.upto = cmd.new_token

    def _close_all(self) -> None:
        self._closed.extend(o.closed(s, w) for (s, w), o in self._open.items())
        self._open.clear()
