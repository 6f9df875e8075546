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
atomically. It reads the file as config files are read (a regular file only,
at most :data:`MAX_POSITION_FILE_SIZE`), so a FIFO or a device given as
``--resume FILE`` is an error line, never a hang.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from synrepl.cli._errors import UsageError
from synrepl.cli._render import Filters, Output, Stats, command_record, error_record, row_record
from synrepl.commands import PositionCommand, RdataCommand, parse_line
from synrepl.config import FileRefusedError, read_regular_file
from synrepl.errors import ProtocolError, UnknownCommandError, excerpt
from synrepl.streams import AnyRow

__all__ = ("MAX_HELD", "MAX_POSITION_FILE_SIZE", "LineWatcher", "PositionFile")

#: Rows of one unfinished batch held back per (stream, writer).
MAX_HELD = 10_000

#: The largest position file read, in bytes (16 MiB). A position is a stream,
#: a writer and a token, some 60 bytes: this is room for a quarter of a
#: million, far more than a deployment has, while a wrong file is refused
#: before it is parsed.
MAX_POSITION_FILE_SIZE = 16 << 20


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
    Writes go to a temporary file in the same directory, fsync'd, that then
    replaces the old one, so a crash never leaves half a file.
    """

    def __init__(self, path: str | os.PathLike[str], server_name: str) -> None:
        self.path = Path(path)
        self.server_name = server_name
        self._saved: dict[str, dict[str, int]] = {}

    @property
    def _name(self) -> str:
        """The path for a message: the user's own, but bounded."""
        return excerpt(str(self.path), 300)

    def load(self) -> dict[str, dict[str, int]] | None:
        """The saved positions, or None when the file does not exist yet.

        Raises:
            UsageError: the file cannot be read, is not a regular file, is
                larger than :data:`MAX_POSITION_FILE_SIZE`, is not a
                position file, or belongs to another server.
        """
        try:
            data = json.loads(
                read_regular_file(self.path, MAX_POSITION_FILE_SIZE, "a position file")
            )
            positions = data["positions"]
            checked = {
                str(stream): {str(w): _token(t) for w, t in writers.items()}
                for stream, writers in positions.items()
            }
        except FileRefusedError as e:
            if e.errno == errno.ENOENT:
                return None
            raise UsageError(f"cannot read the position file '{self._name}': {e.reason}") from None
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            # ValueError covers text that is not UTF-8 and JSON that does not parse.
            raise UsageError(
                f"'{self._name}' is not a synrepl position file; remove it to start from now"
            ) from None
        owner = data.get("server_name")
        if owner != self.server_name:
            raise UsageError(
                f"the position file '{self._name}' belongs to server "
                f"{excerpt(repr(owner), 100)}, not {excerpt(repr(self.server_name), 100)}; "
                "use another file"
            )
        self._saved = checked
        return {s: dict(w) for s, w in checked.items()}

    def save(self, positions: Mapping[str, Mapping[str, int]]) -> None:
        """Merge ``positions`` into what is saved and write the file atomically.

        Raises:
            OSError: the file cannot be written, or the path names something
                other than a regular file (a FIFO, a directory, ...), which
                is left alone rather than replaced.
        """
        merged = {s: dict(w) for s, w in self._saved.items()}
        for stream, writers in positions.items():
            merged.setdefault(stream, {}).update(writers)
        exists = self._check_target()
        if merged == self._saved and exists:
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
        _fsync_directory(directory)
        self._saved = merged

    def _check_target(self) -> bool:
        """Whether the file exists; refuses a path that is not a regular file.

        os.replace would put the file in place of a FIFO or a device node
        without a word (and fails on a directory with a bare errno): a path
        like that is a mistake the user hears about.
        """
        try:
            mode = os.stat(self.path).st_mode
        except FileNotFoundError:
            return False
        if stat.S_ISREG(mode):
            return True
        raise OSError(f"'{self._name}' is not a regular file, so it is not replaced")


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable; best effort (not every OS or file
    system can open or fsync a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _token(value: object) -> int:
    if type(value) is not int:
        raise TypeError("a token must be an integer")
    return value
