"""Decoding the channel line by line for ``watch``, ``demo`` and ``top``.

:class:`LineWatcher` prints every line from the first one it sees: unlike
the position bookkeeping it does not wait for a writer's POSITION, because
it is not promising completeness, only showing what flows.  Rows sent as
``batch`` are held (per stream and writer, at most :data:`MAX_HELD`) until
the numeric token that completes them, so each printed row carries the token
it belongs to.  A batch that never completes (a POSITION for the pair came
first, the command stopped, or the hold limit was reached) is printed with
``token`` null.

:class:`PositionFile` keeps ``watch --resume`` positions on disk, written
atomically.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from synrepl.cli._errors import UsageError
from synrepl.cli._render import Filters, Output, Stats, command_record, error_record, row_record
from synrepl.commands import PositionCommand, RdataCommand, parse_line
from synrepl.errors import ProtocolError, UnknownCommandError
from synrepl.streams import AnyRow

__all__ = ("MAX_HELD", "LineWatcher", "PositionFile")

#: Rows of one unfinished batch held back per (stream, writer).
MAX_HELD = 10_000


class LineWatcher:
    """Parses each line and prints what the filters let through.

    Args:
        output: where records go.
        filters: what to show.
        stats: counts for the summary (everything seen, shown or not).
        show_access_tokens: print USER_IP access tokens in clear.
        limit: stop (call ``on_limit``) after this many records shown.
    """

    def __init__(
        self,
        output: Output,
        filters: Filters,
        stats: Stats,
        *,
        show_access_tokens: bool = False,
        limit: int | None = None,
        on_limit: Callable[[], None] | None = None,
        on_command: Callable[[Any], None] | None = None,
    ) -> None:
        self._output = output
        self._filters = filters
        self._stats = stats
        self._show_access_tokens = show_access_tokens
        self._limit = limit
        self._on_limit = on_limit
        self._on_command = on_command
        self._held: dict[tuple[str, str], list[tuple[AnyRow, float]]] = {}

    def emit(self, record: Mapping[str, Any]) -> None:
        """Print one record, counting it against ``limit``."""
        if self._limit is not None and self._stats.shown >= self._limit:
            return
        self._stats.shown += 1
        self._output.emit(record)
        if self._limit is not None and self._stats.shown >= self._limit and self._on_limit:
            self._on_limit()

    def on_line(self, channel: str, line: str) -> None:
        """The transport's ``on_line``: one message from Redis."""
        self._stats.lines += 1
        ts = time.time()
        try:
            cmd = parse_line(line)
        except ProtocolError as e:
            if isinstance(e, UnknownCommandError):
                self._stats.unknown_commands += 1
            else:
                self._stats.bad_lines += 1
            if self._filters == Filters():
                self.emit(error_record(e, channel, ts=ts))
            return
        self._stats.saw_command(cmd)
        if self._on_command is not None:
            self._on_command(cmd)
        if isinstance(cmd, RdataCommand):
            self._rdata(cmd, ts)
            return
        if isinstance(cmd, PositionCommand):
            self._flush((cmd.stream_name, cmd.instance_name), None)
        if self._filters.wants(cmd):
            self.emit(command_record(cmd, show_access_tokens=self._show_access_tokens, ts=ts))

    def _rdata(self, cmd: RdataCommand, ts: float) -> None:
        stream, writer = cmd.stream_name, cmd.instance_name
        self._stats.saw_rows(stream, writer, 1)
        if not self._filters.wants_rows(stream, writer):
            return
        key = (stream, writer)
        if cmd.token is None:
            held = self._held.setdefault(key, [])
            held.append((cmd.row, ts))
            if len(held) >= MAX_HELD:
                self._flush(key, None)
            return
        self._flush(key, cmd.token)
        self.emit(row_record(stream, writer, cmd.token, cmd.row, ts=ts))

    def _flush(self, key: tuple[str, str], token: int | None) -> None:
        for row, ts in self._held.pop(key, ()):
            self.emit(row_record(key[0], key[1], token, row, ts=ts))

    def finish(self) -> None:
        """Print the rows of batches that never completed (token null)."""
        for key in list(self._held):
            self._flush(key, None)


class PositionFile:
    """``{stream: {writer: token}}`` on disk, for ``watch --resume``.

    The file is JSON: ``{"server_name": ..., "positions": {...}, "saved_at": ...}``.
    Writes go to a temporary file that then replaces the old one, so a crash
    never leaves half a file.
    """

    def __init__(self, path: str | os.PathLike[str], server_name: str) -> None:
        self.path = Path(path)
        self.server_name = server_name
        self._saved: dict[str, dict[str, int]] = {}

    def load(self) -> dict[str, dict[str, int]] | None:
        """The saved positions, or None when the file does not exist yet.

        Raises:
            UsageError: the file cannot be read, is not a position file, or
                belongs to another server.
        """
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
            raise UsageError(f"cannot read the position file '{self.path}': {reason}") from None
        try:
            data = json.loads(text)
            positions = data["positions"]
            checked = {
                str(stream): {str(w): _token(t) for w, t in writers.items()}
                for stream, writers in positions.items()
            }
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UsageError(
                f"'{self.path}' is not a synrepl position file; remove it to start from now"
            ) from None
        owner = data.get("server_name")
        if owner != self.server_name:
            raise UsageError(
                f"the position file '{self.path}' belongs to server {owner!r}, not "
                f"{self.server_name!r}; use another file"
            )
        self._saved = checked
        return {s: dict(w) for s, w in checked.items()}

    def save(self, positions: Mapping[str, Mapping[str, int]]) -> None:
        """Merge ``positions`` into what is saved and write the file atomically."""
        merged = {s: dict(w) for s, w in self._saved.items()}
        for stream, writers in positions.items():
            merged.setdefault(stream, {}).update(writers)
        if merged == self._saved and self.path.exists():
            return
        data = {
            "server_name": self.server_name,
            "positions": merged,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        directory = self.path.parent
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._saved = merged


def _token(value: object) -> int:
    if type(value) is not int:
        raise TypeError("a token must be an integer")
    return value
