"""Dead letters: batches the handlers kept failing on, kept for a person.

When a failure policy gives up on a batch (``then="dead_letter"``), the
client records it here and moves on; its position then counts as processed.
A :class:`DeadLetter` holds what is needed to look at it or run it again:
the stream, writer and token, the rows as they came on the wire (decoded
JSON; :func:`synrepl.streams.parse_row` types them again), the last error
and how often the handlers failed.

:meth:`DeadLetterStore.add` is durable when it returns, and the client only
then moves past the batch, so a crash never loses a dead letter.  The
stores are bound to a ``server_name`` and a ``name`` like the checkpoint
stores (:mod:`synrepl.checkpoints`), block like them, and fail with the same
:class:`~synrepl.checkpoints.StoreError`:

- :class:`FileDeadLetterStore`: JSON lines, appended and fsync'd.
- :class:`SqliteDeadLetterStore`: a table in an SQLite database.
- :class:`PostgresDeadLetterStore`: a table in PostgreSQL (``synrepl[postgres]``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from synrepl._files import file_kind, os_reason
from synrepl.checkpoints import (
    _DEFAULT,
    StoreError,
    _check_names,
    _foreign,
    _lock,
    _parse_spec,
    _PostgresDatabase,
    _shown_path,
    _SqliteDatabase,
    _StrPath,
    _write_all,
)
from synrepl.config import FileRefusedError, read_regular_file
from synrepl.errors import shown

if TYPE_CHECKING:
    import psycopg
    from psycopg import sql

__all__ = (
    "DeadLetter",
    "DeadLetterStore",
    "FileDeadLetterStore",
    "SqliteDeadLetterStore",
    "PostgresDeadLetterStore",
    "dead_letter_store",
    "StoreError",
    "MAX_ERROR_TEXT",
    "MAX_DEAD_LETTER_FILE_SIZE",
)

#: The longest error text a dead letter keeps, in characters.
MAX_ERROR_TEXT = 2000

#: The largest dead-letter file read or appended to, in bytes (256 MiB).
#: Dead letters are exceptions to look at, not a queue: a file this big
#: means the handlers are failing on everything, and an ``add`` that finds it
#: full fails (the client then waits and tries again) rather than fill the disk.
MAX_DEAD_LETTER_FILE_SIZE = 256 << 20


def _error_text(value: object) -> str:
    """Bounded, and the same when bounded twice (a letter read back is equal)."""
    # Neither NUL nor a lone surrogate: PostgreSQL's and SQLite's text hold neither.
    text = str(value).replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode()
    return text if len(text) <= MAX_ERROR_TEXT else text[: MAX_ERROR_TEXT - 3] + "..."


@attrs.frozen
class DeadLetter:
    """One batch the handlers gave up on.

    Attributes:
        stream: the stream.
        writer: the instance that wrote it.
        token: the batch's token.
        rows: the rows as raw JSON values (``row.to_raw()``, lists as they
            came on the wire).
        error: the last error, in words (at most :data:`MAX_ERROR_TEXT`
            characters).
        attempts: how many times the handlers failed on it.
        failed_at: when it was given up on, in seconds since the epoch.
    """

    stream: str
    writer: str
    token: int
    rows: tuple[Any, ...] = attrs.field(converter=tuple)
    error: str = attrs.field(converter=_error_text)
    attempts: int
    failed_at: float = attrs.field(converter=float)

    def to_json(self) -> dict[str, Any]:
        """The letter as a JSON object (what every store keeps)."""
        return {
            "stream": self.stream,
            "writer": self.writer,
            "token": self.token,
            "rows": list(self.rows),
            "error": self.error,
            "attempts": self.attempts,
            "failed_at": self.failed_at,
        }

    @classmethod
    def from_json(cls, value: Any) -> DeadLetter:
        """The letter :meth:`to_json` gave.

        Raises:
            ValueError: ``value`` lacks a field.
            TypeError: a field has the wrong type.
        """
        if not isinstance(value, dict):
            raise TypeError("a dead letter is a JSON object")
        try:
            stream, writer, token = value["stream"], value["writer"], value["token"]
            rows, error, attempts = value["rows"], value["error"], value["attempts"]
            failed_at = value["failed_at"]
        except KeyError as e:
            raise ValueError(f"a dead letter has no {e.args[0]!r}") from None
        if not (isinstance(stream, str) and isinstance(writer, str) and isinstance(error, str)):
            raise TypeError("stream, writer and error are strings")
        if type(token) is not int or type(attempts) is not int or not isinstance(rows, list):
            raise TypeError("token and attempts are integers, rows a list")
        if type(failed_at) not in (int, float):
            raise TypeError("failed_at is a number")
        return cls(stream, writer, token, rows, error, attempts, failed_at)


def _encode(value: Mapping[str, Any]) -> str:
    # ASCII: lone surrogates and NUL in rows are escaped, never raw bytes.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True)


class DeadLetterStore(Protocol):
    """Where dead letters are kept.  Every call blocks, like a checkpoint store's."""

    def add(self, letter: DeadLetter) -> None:
        """Keep ``letter``; durable when this returns.

        Raises:
            StoreError: it cannot be written.
        """
        ...

    def letters(self) -> list[DeadLetter]:
        """Every letter kept under this store's name, oldest first.

        Raises:
            StoreError: they cannot be read, or belong to another server.
        """
        ...

    def close(self) -> None:
        """Release connections; the store is not used after this."""
        ...


# ---------------------------------------------------------------- JSON lines

_FILE_TAG = "synrepl dead letters"
#: The first line is read alone; it is short.
_HEADER_LIMIT = 64 << 10
_OPEN_FLAGS = (
    os.O_RDWR
    | os.O_CREAT
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_NOCTTY", 0)
    | os.O_CLOEXEC
)


class FileDeadLetterStore:
    """Dead letters as JSON lines in one file, which several names may share.

    The first line names the server (``{"synrepl": "synrepl dead letters",
    "server_name": ...}``); each next one is a letter with its store's
    ``name``.  An add appends one line under an ``flock`` of the file, then
    fsyncs: a crash mid-line leaves a torn last line, which reading skips and
    the next add cuts off, so it never merges with a letter after it.  A
    path that is not a regular file is refused, never blocked on.

    Args:
        path: the file (created if missing; its directory must exist).
        server_name: the homeserver the letters are from.
        name: whose letters, among those in the file.
    """

    def __init__(self, path: _StrPath, *, server_name: str, name: str = _DEFAULT) -> None:
        _check_names(server_name, name)
        self.path = Path(path)
        self.server_name = server_name
        self.name = name
        self._closed = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {_shown_path(self.path)!r} name={self.name!r}>"

    @property
    def _where(self) -> str:
        return f"the dead-letter file '{_shown_path(self.path)}'"

    def add(self, letter: DeadLetter) -> None:
        """Append ``letter`` and fsync the file.

        Raises:
            StoreError: the file cannot be written, is full
                (:data:`MAX_DEAD_LETTER_FILE_SIZE`), is not a regular file or
                not a dead-letter file, or belongs to another server.
        """
        line = (_encode({"name": self.name, **letter.to_json()}) + "\n").encode("ascii")
        self._check_open()
        try:
            fd = os.open(self.path, _OPEN_FLAGS, 0o600)
        except OSError as e:
            raise self._cannot("write", os_reason(e)) from None
        try:
            self._append(fd, line)
        except StoreError:
            raise
        except OSError as e:
            raise self._cannot("write", os_reason(e)) from None
        finally:
            os.close(fd)

    def _append(self, fd: int, line: bytes) -> None:
        kind = file_kind(os.fstat(fd).st_mode)
        if kind is not None:
            raise self._cannot("write", f"it is {kind}, not a regular file")
        try:
            _lock(fd)
        except TimeoutError as e:
            raise self._cannot("write", os_reason(e)) from None
        size = os.fstat(fd).st_size
        if self._no_header_yet(os.pread(fd, len(self._header), 0)):
            os.ftruncate(fd, 0)
            _write_all(fd, self._header)
            size = len(self._header)
            new = True
        else:
            self._check_header(os.pread(fd, _HEADER_LIMIT, 0))
            size = self._cut_torn_line(fd, size)
            new = False
        if size + len(line) > MAX_DEAD_LETTER_FILE_SIZE:
            limit = MAX_DEAD_LETTER_FILE_SIZE >> 20
            raise self._cannot("write", f"it is full ({limit} MiB); look at its letters, move it")
        os.lseek(fd, size, os.SEEK_SET)
        _write_all(fd, line)
        os.fsync(fd)
        if new:
            _fsync_parent(self.path)

    @staticmethod
    def _cut_torn_line(fd: int, size: int) -> int:
        """Cut off a last line that a crash left without its newline; the new size."""
        if os.pread(fd, 1, size - 1) == b"\n":
            return size
        end = size
        while end > 0:
            start = max(0, end - 65536)
            chunk = os.pread(fd, end - start, start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                size = start + newline + 1
                break
            end = start
        else:
            size = 0
        os.ftruncate(fd, size)
        return size

    @property
    def _header(self) -> bytes:
        return (_encode({"synrepl": _FILE_TAG, "server_name": self.server_name}) + "\n").encode()

    def _no_header_yet(self, data: bytes) -> bool:
        """Empty, or a header a crash cut short: nothing was ever added."""
        return len(data) < len(self._header) and self._header.startswith(data)

    def _check_header(self, data: bytes) -> None:
        first = data.split(b"\n", 1)[0]
        try:
            header = json.loads(first.decode("utf-8"))
            owner = header["server_name"] if header["synrepl"] == _FILE_TAG else None
        except (ValueError, KeyError, TypeError, RecursionError):
            owner = None
        if not isinstance(owner, str):
            raise StoreError(f"{self._where} is not a synrepl dead-letter file; not touched")
        if owner != self.server_name:
            raise _foreign(self._where, owner, self.server_name, "use another file")

    def letters(self) -> list[DeadLetter]:
        """This name's letters, in the order they were added.

        Raises:
            StoreError: the file cannot be read, is not a regular file, too
                large, not a dead-letter file, or belongs to another server.
        """
        self._check_open()
        try:
            data = read_regular_file(self.path, MAX_DEAD_LETTER_FILE_SIZE, "a dead-letter file")
        except FileRefusedError as e:
            if e.errno == errno.ENOENT:
                return []
            raise self._cannot("read", e.reason) from None
        if self._no_header_yet(data):
            return []
        self._check_header(data)
        lines = data.split(b"\n")
        # The last piece is empty, or a line a crash cut short: skipped.
        out = []
        for number, line in enumerate(lines[1:-1], start=2):
            try:
                value = json.loads(line.decode("utf-8"))
                if value.get("name") != self.name:
                    continue
                out.append(DeadLetter.from_json(value))
            except (ValueError, TypeError, AttributeError, RecursionError):
                raise StoreError(
                    f"line {number} of {self._where} is not a dead letter; "
                    "fix or remove it to go on"
                ) from None
        return out

    def close(self) -> None:
        """Nothing to release; later calls fail."""
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the store for {self._where} is closed")

    def _cannot(self, doing: str, reason: str) -> StoreError:
        return StoreError(f"cannot {doing} {self._where}: {reason}", reason)


def _fsync_parent(path: Path) -> None:
    """Make a new file's name durable; best effort (not every file system can)."""
    try:
        fd = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- SQLite

_SQLITE_DEAD_LETTERS = (
    """CREATE TABLE IF NOT EXISTS synrepl_dead_letters (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        server_name TEXT NOT NULL,
        name TEXT NOT NULL,
        stream TEXT NOT NULL,
        writer TEXT NOT NULL,
        token INTEGER NOT NULL,
        rows TEXT NOT NULL,
        error TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        failed_at REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS synrepl_dead_letters_name ON synrepl_dead_letters (name, id)",
)

_COLUMNS = "stream, writer, token, rows, error, attempts, failed_at"


def _letter_of_row(row: Iterable[Any], where: str) -> DeadLetter:
    stream, writer, token, rows, error, attempts, failed_at = row
    try:
        return DeadLetter.from_json(
            {
                "stream": stream,
                "writer": writer,
                "token": token,
                "rows": json.loads(rows),
                "error": error,
                "attempts": attempts,
                "failed_at": failed_at,
            }
        )
    except (ValueError, TypeError, RecursionError):
        raise StoreError(f"a row of {where} is not a dead letter") from None


class SqliteDeadLetterStore:
    """Dead letters in an SQLite database's ``synrepl_dead_letters`` table
    (created if missing), one row each; an add is one transaction with
    ``synchronous = FULL``.

    Args:
        path: the database file (created if missing).
        server_name: the homeserver the letters are from.
        name: whose letters, among those in the table.
    """

    def __init__(self, path: _StrPath, *, server_name: str, name: str = _DEFAULT) -> None:
        _check_names(server_name, name)
        self.server_name = server_name
        self.name = name
        self._db = _SqliteDatabase(path, _SQLITE_DEAD_LETTERS)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._db.description} name={self.name!r}>"

    @property
    def _where(self) -> str:
        return f"dead letters {shown(self.name)} in {self._db.description}"

    def _check_owner(self, db: sqlite3.Connection) -> None:
        row = db.execute(
            "SELECT server_name FROM synrepl_dead_letters WHERE name = ? AND server_name <> ? "
            "LIMIT 1",
            (self.name, self.server_name),
        ).fetchone()
        if row is not None:
            raise _foreign(self._where, row[0], self.server_name, "use another name")

    def add(self, letter: DeadLetter) -> None:
        """Insert ``letter`` in one transaction.

        Raises:
            StoreError: the database cannot be written, or this name's
                letters belong to another server.
        """
        rows = _encode({"rows": list(letter.rows)})[len('{"rows":') : -1]

        def insert(db: sqlite3.Connection) -> None:
            self._check_owner(db)
            db.execute(
                f"INSERT INTO synrepl_dead_letters (server_name, name, {_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    self.server_name,
                    self.name,
                    letter.stream,
                    letter.writer,
                    letter.token,
                    rows,
                    letter.error,
                    letter.attempts,
                    letter.failed_at,
                ),
            )

        self._db.run(f"add a dead letter to {shown(self.name)}", insert)

    def letters(self) -> list[DeadLetter]:
        """This name's letters, oldest first.

        Raises:
            StoreError: the database cannot be read, or this name's letters
                belong to another server.
        """

        def read(db: sqlite3.Connection) -> list[DeadLetter]:
            self._check_owner(db)
            found = db.execute(
                f"SELECT {_COLUMNS} FROM synrepl_dead_letters WHERE name = ? ORDER BY id",
                (self.name,),
            ).fetchall()
            return [_letter_of_row(row, self._where) for row in found]

        return self._db.run(f"read dead letters {shown(self.name)}", read)

    def close(self) -> None:
        """Close the connection; later calls fail."""
        self._db.close()


# ---------------------------------------------------------------- PostgreSQL


def _pg_dead_letter_schema(table: sql.Identifier, bare: str) -> tuple[sql.Composed, ...]:
    from psycopg import sql

    return (
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} ("
            " id bigserial PRIMARY KEY,"
            # Makes an add that is tried again after a lost connection harmless.
            " uid text NOT NULL UNIQUE,"
            " server_name text NOT NULL,"
            " name text NOT NULL,"
            " stream text NOT NULL,"
            " writer text NOT NULL,"
            " token bigint NOT NULL,"
            # text, not json: it keeps what Synapse's JSON may hold and json may not.
            " rows text NOT NULL,"
            " error text NOT NULL,"
            " attempts integer NOT NULL,"
            " failed_at double precision NOT NULL)"
        ).format(table),
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (name, id)").format(
            sql.Identifier(f"{bare}_name_idx"), table
        ),
    )


class PostgresDeadLetterStore:
    """Dead letters in a PostgreSQL table (created if missing), one row each.

    An add is one committed insert; each carries a unique id, so when a lost
    connection makes the store try it again on a new one, it is kept once.
    Connections behave as :class:`~synrepl.checkpoints.PostgresCheckpointStore`'s.

    Args:
        conninfo: a libpq connection string, ``postgresql://user@host/db``.
        server_name: the homeserver the letters are from.
        name: whose letters, among those in the table.
        table: the table, ``name`` or ``schema.name``.
    """

    def __init__(
        self,
        conninfo: str,
        *,
        server_name: str,
        name: str = _DEFAULT,
        table: str = "synrepl_dead_letters",
    ) -> None:
        _check_names(server_name, name)
        self.server_name = server_name
        self.name = name
        self._db = _PostgresDatabase(conninfo, table, _pg_dead_letter_schema)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._db.description} name={self.name!r}>"

    @property
    def _where(self) -> str:
        return f"dead letters {shown(self.name)} in {self._db.description}"

    def _check_owner(self, db: psycopg.Connection[Any]) -> None:
        from psycopg import sql

        row = db.execute(
            sql.SQL(
                "SELECT server_name FROM {} WHERE name = %s AND server_name <> %s LIMIT 1"
            ).format(self._db.table),
            (self.name, self.server_name),
        ).fetchone()
        if row is not None:
            raise _foreign(self._where, row[0], self.server_name, "use another name")

    def add(self, letter: DeadLetter) -> None:
        """Insert ``letter``, committed before this returns.

        Raises:
            StoreError: the database cannot be reached or written, or this
                name's letters belong to another server.
        """
        from psycopg import sql

        rows = _encode({"rows": list(letter.rows)})[len('{"rows":') : -1]
        uid = secrets.token_hex(16)
        insert = sql.SQL(
            "INSERT INTO {} (uid, server_name, name, " + _COLUMNS + ") "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (uid) DO NOTHING"
        ).format(self._db.table)
        values = (
            uid,
            self.server_name,
            self.name,
            letter.stream,
            letter.writer,
            letter.token,
            rows,
            letter.error,
            letter.attempts,
            letter.failed_at,
        )

        def write(db: psycopg.Connection[Any]) -> None:
            self._check_owner(db)
            db.execute(insert, values)

        self._db.run(f"add a dead letter to {shown(self.name)}", write)

    def letters(self) -> list[DeadLetter]:
        """This name's letters, oldest first.

        Raises:
            StoreError: the database cannot be reached or read, or this
                name's letters belong to another server.
        """
        from psycopg import sql

        select = sql.SQL("SELECT " + _COLUMNS + " FROM {} WHERE name = %s ORDER BY id").format(
            self._db.table
        )

        def read(db: psycopg.Connection[Any]) -> list[DeadLetter]:
            self._check_owner(db)
            found = db.execute(select, (self.name,)).fetchall()
            return [_letter_of_row(row, self._where) for row in found]

        return self._db.run(f"read dead letters {shown(self.name)}", read)

    def close(self) -> None:
        """Close the connection; later calls fail."""
        self._db.close()


# ---------------------------------------------------------------- from a string


def dead_letter_store(spec: str, *, server_name: str, name: str = _DEFAULT) -> DeadLetterStore:
    """The dead-letter store a string names, read as
    :func:`~synrepl.checkpoints.checkpoint_store` reads it: ``PATH`` or
    ``file:PATH`` (JSON lines), ``sqlite:PATH``, ``postgresql://...`` (table
    ``synrepl_dead_letters``).  Nothing is opened yet.

    Raises:
        StoreError: the string names no store synrepl knows.
    """
    kind, target = _parse_spec(spec)
    if kind == "postgres":
        return PostgresDeadLetterStore(target, server_name=server_name, name=name)
    if kind == "sqlite":
        return SqliteDeadLetterStore(target, server_name=server_name, name=name)
    return FileDeadLetterStore(target, server_name=server_name, name=name)
