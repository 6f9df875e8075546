"""Decoding the channel line by line for ``watch``, ``demo`` and ``top``.

:class:`LineWatcher` prints every line from the first one it sees (that the
filters let through, ``--room`` and ``--type`` included): unlike
the position bookkeeping it does not wait for a writer's POSITION, because
it is not promising completeness, only showing what flows.  Rows sent as
``batch`` are held (per stream and writer, at most :data:`MAX_HELD`) until
the numeric token that completes them, so each printed row carries the token
it belongs to.  A batch that never completes (a POSITION for the pair came
first, the command stopped, or the hold limit was reached) is printed with
``token`` null.

:class:`PositionFile` keeps ``watch --resume`` positions on disk: it is the
library's file checkpoint store (atomic writes; a regular file only, at most
:data:`MAX_POSITION_FILE_SIZE`, so a FIFO or a device given as ``--resume
FILE`` is an error line, never a hang) with the CLI's wording.  ``watch``
hands it to the ReplicationClient as its checkpoint store, which saves it
after each handled batch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from synrepl.checkpoints import MAX_CHECKPOINT_FILE_SIZE, FileCheckpointStore, StoreError
from synrepl.cli._errors import UsageError
from synrepl.cli._render import Filters, Output, Stats, command_record, error_record, row_record
from synrepl.commands import PositionCommand, RdataCommand, parse_line
from synrepl.errors import ProtocolError, UnknownCommandError
from synrepl.streams import AnyRow

__all__ = ("MAX_HELD", "MAX_POSITION_FILE_SIZE", "LineWatcher", "PositionFile")

#: Rows of one unfinished batch held back per (stream, writer).
MAX_HELD = 10_000

#: The largest position file read, in bytes (16 MiB): a checkpoint file's limit.
MAX_POSITION_FILE_SIZE = MAX_CHECKPOINT_FILE_SIZE


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
        wanted = self._filters.wants_row(stream, cmd.row)
        if cmd.token is None:
            if wanted:
                held = self._held.setdefault(key, [])
                held.append((cmd.row, ts))
                if len(held) >= MAX_HELD:
                    self._flush(key, None)
            return
        self._flush(key, cmd.token)  # the batch completes, whether this row is shown or not
        if wanted:
            self.emit(row_record(stream, writer, cmd.token, cmd.row, ts=ts))

    def _flush(self, key: tuple[str, str], token: int | None) -> None:
        for row, ts in self._held.pop(key, ()):
            self.emit(row_record(key[0], key[1], token, row, ts=ts))

    def finish(self) -> None:
        """Print the rows of batches that never completed (token null)."""
        for key in list(self._held):
            self._flush(key, None)


class PositionFile(FileCheckpointStore):
    """``{stream: {writer: token}}`` on disk, for ``watch --resume``: the
    library's :class:`~synrepl.checkpoints.FileCheckpointStore` (its
    ``"default"`` checkpoint), with the CLI's own wording and two policies.

    Saves merge into what was loaded or saved before, so a run that follows
    fewer streams keeps the others' positions; a save that changes nothing
    is skipped.  A file that cannot be loaded is a :class:`UsageError`.

    ``on_saved``, when set, is called with the whole saved map after each
    save that succeeded (skipped ones included), in the thread that saved.
    """

    _noun = "position file"

    def __init__(self, path: str | os.PathLike[str], server_name: str) -> None:
        super().__init__(path, server_name=server_name)
        self._saved: dict[str, dict[str, int]] = {}
        self.on_saved: Callable[[dict[str, dict[str, int]]], None] | None = None

    def load(self) -> dict[str, dict[str, int]] | None:
        """The saved positions, or None when the file does not exist yet.

        Raises:
            UsageError: the file cannot be read, is not a regular file, is
                larger than :data:`MAX_POSITION_FILE_SIZE`, is not a
                position file, or belongs to another server.
        """
        try:
            saved = super().load()
        except StoreError as e:
            raise UsageError(e.message) from None
        self._saved = {s: dict(w) for s, w in (saved or {}).items()}
        return saved

    def save(self, positions: Mapping[str, Mapping[str, int]]) -> None:
        """Merge ``positions`` into what is saved and write the file atomically.

        Raises:
            StoreError: (an OSError) the file cannot be written, or the path
                names something other than a regular file (a FIFO, a
                directory, ...), which is left alone rather than replaced.
        """
        merged = {s: dict(w) for s, w in self._saved.items()}
        for stream, writers in positions.items():
            merged.setdefault(stream, {}).update(writers)
        if merged != self._saved or not self.path.is_file():
            super().save(merged)
            self._saved = merged
        if self.on_saved is not None:
            self.on_saved({s: dict(w) for s, w in merged.items()})
