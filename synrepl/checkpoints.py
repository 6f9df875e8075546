"""Checkpoint stores: where processed positions are kept across restarts.

A checkpoint is the map :meth:`~synrepl.delivery.Delivery.positions`
returns, ``{stream: {writer: token}}``: everything at or below it was
handled.  A store saves one such map under a ``name`` (one observer's
checkpoint among several kept in the same file or table) for one
``server_name``, and refuses a checkpoint that was saved for another server:
resuming one homeserver from another's positions would skip or repeat rows
without a word.

Every call blocks.  The client runs them in a worker thread, so a store
holds no event-loop object, is safe to call from any thread (one call at a
time is all the client makes), and does no I/O in its constructor.  Every
failure to open, read or write is a :class:`StoreError`, whose message is
bounded and never shows a password.

Three stores, with the same guarantee: when :meth:`~CheckpointStore.save`
returns, the new checkpoint survives a crash or a power cut, and a save cut
short leaves the previous one whole.

- :class:`FileCheckpointStore`: a JSON file, replaced atomically.
- :class:`SqliteCheckpointStore`: a table in an SQLite database.
- :class:`PostgresCheckpointStore`: a table in PostgreSQL (``synrepl[postgres]``).

:func:`checkpoint_store` builds one from a string (``sqlite:PATH``,
``postgresql://...``, a path).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import sqlite3
import stat
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, TypeVar

from synrepl._files import file_kind, os_reason
from synrepl.config import FileRefusedError, read_regular_file
from synrepl.errors import SynreplError, excerpt, shown

if TYPE_CHECKING:
    import psycopg
    from psycopg import sql

__all__ = (
    "CheckpointStore",
    "StoreError",
    "FileCheckpointStore",
    "SqliteCheckpointStore",
    "PostgresCheckpointStore",
    "checkpoint_store",
    "Positions",
    "MAX_CHECKPOINT_FILE_SIZE",
)

#: ``{stream: {writer: token}}``.
Positions = dict[str, dict[str, int]]

#: The largest checkpoint file read or written, in bytes (16 MiB).  A
#: position is a stream, a writer and a token, some 60 bytes: room for a
#: quarter of a million, far more than a deployment has, while a wrong file
#: is refused before it is parsed.
MAX_CHECKPOINT_FILE_SIZE = 16 << 20

_T = TypeVar("_T")
_StrPath = str | os.PathLike[str]


class StoreError(SynreplError, OSError):
    """A checkpoint or dead-letter store cannot be opened, read or written.

    An :class:`OSError`, so code that catches what file I/O raises catches
    this too.  The message names the store (a path, or a PostgreSQL address
    without its password), says why, and is bounded.

    Attributes:
        message: the whole message.
        reason: why, without the store's name (also ``strerror``).
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = message if reason is None else reason
        self.strerror = self.reason

    def __str__(self) -> str:
        return self.message


class CheckpointStore(Protocol):
    """Where a client's checkpoint is kept.  Every call blocks; see the module."""

    def load(self) -> Positions | None:
        """The saved checkpoint, or None when none was saved yet.

        Raises:
            StoreError: it cannot be read, or it was saved for another server.
        """
        ...

    def save(self, positions: Mapping[str, Mapping[str, int]]) -> None:
        """Replace the checkpoint with ``positions``; durable when this returns.

        Raises:
            StoreError: it cannot be written (the previous one is then intact).
        """
        ...

    def close(self) -> None:
        """Release connections; the store is not used after this."""
        ...


# ---------------------------------------------------------------- shared checks


def _check_names(server_name: str, name: str) -> None:
    """The names a store is bound to are the user's own: wrong ones fail at once."""
    for what, value in (("server_name", server_name), ("name", name)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{what} must be a non-empty string, not {shown(value)}")


def _shown_path(path: _StrPath) -> str:
    """A path for a message: the user's own, on one line and bounded."""
    text = os.fspath(path)
    return excerpt(text if text.isprintable() else repr(text)[1:-1], 300)


def _copy_positions(positions: Mapping[str, Mapping[str, int]]) -> Positions:
    """A plain copy of what the caller passed, checked: a bad map is a bug here."""
    out: Positions = {}
    for stream, writers in positions.items():
        if not isinstance(stream, str) or not isinstance(writers, Mapping):
            raise TypeError("a checkpoint maps stream names to {writer: token} maps")
        copied = out[stream] = {}
        for writer, token in writers.items():
            if not isinstance(writer, str) or type(token) is not int:
                raise TypeError("a checkpoint maps writer names to integer tokens")
            copied[writer] = token
    return out


def _checked_positions(value: object) -> Positions:
    """``value`` (decoded JSON) as a checkpoint map; ValueError or TypeError
    if it is not one."""
    if not isinstance(value, dict):
        raise TypeError("not a map")
    out: Positions = {}
    for stream, writers in value.items():
        if not isinstance(stream, str) or not isinstance(writers, dict):
            raise TypeError("not a map of maps")
        copied = out[stream] = {}
        for writer, token in writers.items():
            if not isinstance(writer, str) or type(token) is not int:
                raise ValueError("a token is not an integer")
            copied[writer] = token
    return out


def _foreign(where: str, owner: object, server_name: str, advice: str) -> StoreError:
    reason = f"it belongs to server {shown(owner)}, not {shown(server_name)}"
    return StoreError(
        f"{where} belongs to server {shown(owner)}, not {shown(server_name)}; {advice}", reason
    )


# ---------------------------------------------------------------- files

#: How long a save waits for another process's save of the same directory.
_LOCK_TIMEOUT = 10.0
#: The end of a temporary file's name, so a leftover one is recognised.
_TEMP_SUFFIX = ".synrepl-tmp"
#: The checkpoint kept at the top level of the file (where files written
#: before names existed keep their only one).
_DEFAULT = "default"


def _lock(fd: int) -> bool:
    """Lock ``fd`` exclusively, waiting at most :data:`_LOCK_TIMEOUT`.

    False if the file system cannot lock it (NFS emulates flock with POSIX
    locks, which a read-only descriptor cannot take): the caller goes on
    unlocked, as a single writer needs no lock.

    Raises:
        TimeoutError: another process held the lock all that time.
    """
    deadline = time.monotonic() + _LOCK_TIMEOUT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    errno.ETIMEDOUT, "another process kept the file locked"
                ) from None
            time.sleep(0.01)
        except OSError:
            return False


@contextlib.contextmanager
def _locked_directory(directory: str) -> Iterator[tuple[int, bool]]:
    """The directory, open and locked: saves of every checkpoint file in it
    take turns, so two stores sharing one file never lose each other's write.
    Yields its descriptor (to fsync the rename) and whether it is locked."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC)
    try:
        yield fd, _lock(fd)
    finally:
        os.close(fd)


def _fsync_directory(fd: int) -> None:
    """Make a rename durable; best effort (not every file system can)."""
    with contextlib.suppress(OSError):
        os.fsync(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _encode_file(
    server_name: str, checkpoints: Mapping[str, tuple[Positions, str | None]]
) -> bytes:
    """The file's bytes.  The default checkpoint sits at the top level, where
    files written before names existed keep theirs; the others under
    ``checkpoints``."""
    data: dict[str, Any] = {"server_name": server_name}
    named: dict[str, Any] = {}
    for name, (positions, saved_at) in checkpoints.items():
        entry: dict[str, Any] = {"positions": positions}
        if saved_at is not None:
            entry["saved_at"] = saved_at
        if name == _DEFAULT:
            data.update(entry)
        else:
            named[name] = entry
    if named:
        data["checkpoints"] = named
    return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode("ascii")


def _decode_file(data: bytes) -> tuple[str, dict[str, tuple[Positions, str | None]]]:
    """The owner and checkpoints of a file; ValueError or TypeError (or
    RecursionError for absurd nesting) if it is not a checkpoint file."""
    value = json.loads(data.decode("utf-8"))
    if not isinstance(value, dict) or not isinstance(value.get("server_name"), str):
        raise TypeError("no server_name")

    def entry(item: dict[str, Any]) -> tuple[Positions, str | None]:
        saved_at = item.get("saved_at")
        if saved_at is not None and not isinstance(saved_at, str):
            raise ValueError("saved_at is not a string")
        return _checked_positions(item["positions"]), saved_at

    checkpoints: dict[str, tuple[Positions, str | None]] = {}
    if "positions" in value:
        checkpoints[_DEFAULT] = entry(value)
    named = value.get("checkpoints", {})
    if not isinstance(named, dict):
        raise TypeError("checkpoints is not a map")
    for name, item in named.items():
        if name == _DEFAULT or not isinstance(item, dict) or "positions" not in item:
            raise ValueError("a named checkpoint is not one")
        checkpoints[name] = entry(item)
    return value["server_name"], checkpoints


class FileCheckpointStore:
    """A checkpoint in a JSON file, which may hold several, one per ``name``.

    A save writes the whole file to a temporary file in the same directory,
    fsyncs it, renames it over the old one and fsyncs the directory: a crash
    at any point leaves either the old file or the new one, never half of
    one.  Saves of one directory take turns (an ``flock`` on it), so stores
    with different names can share a file, across threads and processes.

    The file is read as config files are (a regular file only, at most
    :data:`MAX_CHECKPOINT_FILE_SIZE`), so a FIFO or a device given as the
    path is an error, never a hang, and is left alone.  Files written by
    ``synrepl watch --resume`` load as the ``"default"`` checkpoint.

    Args:
        path: the file; its directory must exist.
        server_name: the homeserver the checkpoint is for.
        name: which checkpoint in the file.
    """

    #: What the file is called in messages.
    _noun: ClassVar[str] = "checkpoint file"

    def __init__(self, path: _StrPath, *, server_name: str, name: str = _DEFAULT) -> None:
        _check_names(server_name, name)
        self.path = Path(path)
        self.server_name = server_name
        self.name = name
        self._closed = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {_shown_path(self.path)!r} name={self.name!r}>"

    @property
    def _shown(self) -> str:
        return _shown_path(self.path)

    def load(self) -> Positions | None:
        """The checkpoint saved under ``name``, or None (no file, or none by that name).

        Raises:
            StoreError: the file cannot be read, is not a regular file, is too
                large, is not a checkpoint file, or belongs to another server.
        """
        self._check_open()
        saved = self._read()
        if saved is None or self.name not in saved:
            return None
        return saved[self.name][0]

    def save(self, positions: Mapping[str, Mapping[str, int]]) -> None:
        """Replace the checkpoint under ``name``, keeping the file's others.

        Raises:
            StoreError: the file cannot be written; the path names something
                other than a regular file (left alone, not replaced); or the
                file is not a checkpoint file or belongs to another server.
        """
        checked = _copy_positions(positions)
        self._check_open()
        directory = os.path.dirname(self.path) or "."
        try:
            with _locked_directory(directory) as (dir_fd, locked):
                self._check_target()
                saved = self._read() or {}
                saved[self.name] = (checked, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
                data = _encode_file(self.server_name, saved)
                if len(data) > MAX_CHECKPOINT_FILE_SIZE:
                    raise StoreError(
                        f"cannot write the {self._noun} '{self._shown}': it would be larger "
                        f"than {MAX_CHECKPOINT_FILE_SIZE >> 20} MiB, too large to read back"
                    )
                self._replace(directory, data)
                _fsync_directory(dir_fd)
                if locked:
                    self._remove_leftovers(directory)
        except StoreError:
            raise
        except OSError as e:
            reason = os_reason(e)
            raise StoreError(
                f"cannot write the {self._noun} '{self._shown}': {reason}", reason
            ) from None

    def close(self) -> None:
        """Nothing to release; later calls fail."""
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the store for '{self._shown}' is closed")

    def _read(self) -> dict[str, tuple[Positions, str | None]] | None:
        try:
            data = read_regular_file(self.path, MAX_CHECKPOINT_FILE_SIZE, f"a {self._noun}")
        except FileRefusedError as e:
            if e.errno == errno.ENOENT:
                return None
            raise StoreError(
                f"cannot read the {self._noun} '{self._shown}': {e.reason}", e.reason
            ) from None
        try:
            owner, saved = _decode_file(data)
        except (ValueError, KeyError, TypeError, RecursionError):
            # ValueError covers text that is not UTF-8 and JSON that does not parse.
            raise StoreError(
                f"'{self._shown}' is not a synrepl {self._noun}; remove it to start from now"
            ) from None
        if owner != self.server_name:
            raise _foreign(
                f"the {self._noun} '{self._shown}'", owner, self.server_name, "use another file"
            )
        return saved

    def _check_target(self) -> None:
        """Refuse a path that is not a regular file.

        os.replace would put the file in place of a FIFO or a device node
        without a word (and fails on a directory with a bare errno): a path
        like that is a mistake the user hears about.
        """
        try:
            mode = os.stat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISREG(mode):
            raise StoreError(f"'{self._shown}' is not a regular file, so it is not replaced")

    def _replace(self, directory: str, data: bytes) -> None:
        fd, temporary = tempfile.mkstemp(
            prefix=f".{self.path.name}.", suffix=_TEMP_SUFFIX, dir=directory
        )
        try:
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    def _remove_leftovers(self, directory: str) -> None:
        """Remove temporary files of saves killed before their rename.  Only
        under the lock: then no save of this directory is under way."""
        prefix = f".{self.path.name}."
        with contextlib.suppress(OSError), os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.startswith(prefix) and entry.name.endswith(_TEMP_SUFFIX):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)


# ---------------------------------------------------------------- SQLite


class _SqliteDatabase:
    """One lazily opened SQLite connection, a transaction per call."""

    def __init__(self, path: _StrPath, schema: tuple[str, ...]) -> None:
        self.path = os.fspath(path)
        if not self.path or self.path == ":memory:":
            raise StoreError(f"an SQLite store needs a file, not {shown(self.path)}")
        self.description = f"the SQLite database '{_shown_path(self.path)}'"
        self._schema = schema
        self._connection: sqlite3.Connection | None = None
        self._closed = False
        self._lock = threading.Lock()

    def run(self, doing: str, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """``work`` in one write transaction (BEGIN IMMEDIATE: concurrent
        writers wait their turn rather than fail at commit)."""
        with self._lock:
            if self._closed:
                raise StoreError(f"cannot {doing}: the store is closed")
            try:
                connection = self._connect()
                connection.execute("BEGIN IMMEDIATE")
                try:
                    result = work(connection)
                    connection.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        connection.execute("ROLLBACK")
                    raise
                return result
            except StoreError:
                raise
            except (sqlite3.Error, OverflowError, UnicodeError) as e:
                # OverflowError: an integer SQLite cannot hold; UnicodeError: a
                # lone surrogate in a name.
                reason = excerpt(str(e) or type(e).__name__, 300)
                raise StoreError(
                    f"cannot {doing} in {self.description}: {reason}", reason
                ) from None
            except OSError as e:
                reason = os_reason(e)
                raise StoreError(
                    f"cannot {doing} in {self.description}: {reason}", reason
                ) from None

    def _connect(self) -> sqlite3.Connection:
        if self._connection is not None:
            return self._connection
        try:
            kind = file_kind(os.stat(self.path).st_mode)
        except FileNotFoundError:
            kind = None
        if kind is not None:
            raise StoreError(f"cannot open {self.description}: it is {kind}, not a regular file")
        connection = sqlite3.connect(
            self.path, timeout=_LOCK_TIMEOUT, isolation_level=None, check_same_thread=False
        )
        try:
            # FULL: a commit is on disk when it returns, in any journal mode.
            connection.execute("PRAGMA synchronous = FULL")
            for statement in self._schema:
                connection.execute(statement)
        except BaseException:
            connection.close()
            raise
        self._connection = connection
        return connection

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._connection is not None:
                self._connection.close()
                self._connection = None


_SQLITE_CHECKPOINTS = (
    """CREATE TABLE IF NOT EXISTS synrepl_checkpoints (
        name TEXT PRIMARY KEY NOT NULL,
        server_name TEXT NOT NULL,
        positions TEXT NOT NULL,
        saved_at REAL NOT NULL
    )""",
)


class SqliteCheckpointStore:
    """A checkpoint in an SQLite database: a row per ``name`` in its
    ``synrepl_checkpoints`` table (created if missing).

    A save is one transaction with ``synchronous = FULL``, so it is on disk
    when it returns, and a crash leaves the previous checkpoint.  The path
    may be a database other things use too: only that table is touched.

    Args:
        path: the database file (created if missing).
        server_name: the homeserver the checkpoint is for.
        name: which checkpoint in the table.
    """

    def __init__(self, path: _StrPath, *, server_name: str, name: str = _DEFAULT) -> None:
        _check_names(server_name, name)
        self.server_name = server_name
        self.name = name
        self._db = _SqliteDatabase(path, _SQLITE_CHECKPOINTS)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._db.description} name={self.name!r}>"

    @property
    def _where(self) -> str:
        return f"checkpoint {shown(self.name)} in {self._db.description}"

    def load(self) -> Positions | None:
        """The checkpoint saved under ``name``, or None.

        Raises:
            StoreError: the database cannot be read, or the checkpoint was
                saved for another server or is not one.
        """

        def read(db: sqlite3.Connection) -> Positions | None:
            row = db.execute(
                "SELECT server_name, positions FROM synrepl_checkpoints WHERE name = ?",
                (self.name,),
            ).fetchone()
            if row is None:
                return None
            if row[0] != self.server_name:
                raise _foreign(self._where, row[0], self.server_name, "use another name")
            try:
                return _checked_positions(json.loads(row[1]))
            except (ValueError, TypeError, RecursionError):
                raise StoreError(f"{self._where} is not a valid checkpoint") from None

        return self._db.run(f"load checkpoint {shown(self.name)}", read)

    def save(self, positions: Mapping[str, Mapping[str, int]]) -> None:
        """Replace the checkpoint under ``name`` in one transaction.

        Raises:
            StoreError: the database cannot be written, or the checkpoint
                under ``name`` belongs to another server.
        """
        text = json.dumps(_copy_positions(positions), separators=(",", ":"), sort_keys=True)

        def write(db: sqlite3.Connection) -> None:
            row = db.execute(
                "SELECT server_name FROM synrepl_checkpoints WHERE name = ?", (self.name,)
            ).fetchone()
            if row is not None and row[0] != self.server_name:
                raise _foreign(self._where, row[0], self.server_name, "use another name")
            db.execute(
                "INSERT INTO synrepl_checkpoints (name, server_name, positions, saved_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (name) DO UPDATE "
                "SET positions = excluded.positions, saved_at = excluded.saved_at",
                (self.name, self.server_name, text, time.time()),
            )

        self._db.run(f"save checkpoint {shown(self.name)}", write)

    def close(self) -> None:
        """Close the connection; later calls fail."""
        self._db.close()


# ---------------------------------------------------------------- PostgreSQL

#: libpq settings used unless the connection string sets them: a database
#: that is down or unreachable fails in bounded time, never hangs.
_PG_DEFAULTS = {
    "connect_timeout": "10",
    "application_name": "synrepl",
    # A peer that vanished mid-call is noticed within about a minute.
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
    "tcp_user_timeout": "60000",
}
#: Set on each session when the server has no statement timeout: a save
#: stuck behind a lock fails instead of waiting for ever.
_PG_STATEMENT_TIMEOUT_MS = 30_000
_PG_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def _import_psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise StoreError(
            "PostgreSQL stores need psycopg 3: pip install 'synrepl[postgres]'"
        ) from None
    return psycopg


class _PostgresDatabase:
    """One lazily opened PostgreSQL connection, a transaction per call.

    A connection found lost (the server restarted, an idle connection was
    cut) is dropped, and the call is made once more on a new one, so a call
    fails only when the database cannot be reached now.  Every call is safe
    to repeat (an upsert, an insert keyed by a unique id, a read).
    """

    def __init__(
        self,
        conninfo: str,
        table: str,
        schema: Callable[[sql.Identifier, str], tuple[sql.Composed, ...]],
    ) -> None:
        self._pg = _import_psycopg()
        try:
            params = self._pg.conninfo.conninfo_to_dict(conninfo)
        except self._pg.Error:
            # Its own message may quote the string, password and all.
            raise StoreError(
                "the PostgreSQL connection string does not parse (it is not shown: "
                "it may hold a password)"
            ) from None
        parts = table.split(".")
        if len(parts) > 2 or not all(_PG_IDENTIFIER.fullmatch(p) for p in parts):
            raise ValueError(f"table must be a name or schema.name, not {shown(table)}")
        self._conninfo = conninfo
        self._secrets = self._secrets_of(conninfo, params.get("password"))
        self._defaults = {k: v for k, v in _PG_DEFAULTS.items() if k not in params}
        self.table: sql.Identifier = self._pg.sql.Identifier(*parts)
        self._schema = schema(self.table, parts[-1])
        where = "{}@{}".format(params.get("user", ""), params.get("host", "localhost"))
        if "port" in params:
            where += f":{params['port']}"
        where += "/{}".format(params.get("dbname", ""))
        self.description = f"table {'.'.join(parts)} of postgresql://{excerpt(where, 200)}"
        self._connection: psycopg.Connection[Any] | None = None
        self._closed = False
        self._lock = threading.Lock()

    @staticmethod
    def _secrets_of(conninfo: str, password: str | None) -> list[str]:
        """The password as it may appear in a message: decoded, and as written."""
        found = [password] if password else []
        with contextlib.suppress(ValueError):
            raw = urllib.parse.urlsplit(conninfo).password
            if raw:
                found.append(raw)
        if password:
            found.append(urllib.parse.quote(password, safe=""))
        return sorted(set(found), key=len, reverse=True)

    def _reason(self, error: Exception) -> str:
        diag = getattr(error, "diag", None)
        text = (diag.message_primary if diag is not None else None) or str(error)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        text = " ".join(text.split()) or type(error).__name__
        return excerpt(text, 300)

    def run(self, doing: str, work: Callable[[psycopg.Connection[Any]], _T]) -> _T:
        """``work`` in one transaction, on a connection made or checked now."""
        with self._lock:
            if self._closed:
                raise StoreError(f"cannot {doing}: the store is closed")
            for _ in range(2):
                fresh = self._connection is None
                try:
                    if self._connection is None:
                        self._connection = self._connect()
                    with self._connection.transaction():
                        return work(self._connection)
                except self._pg.Error as e:
                    connection = self._connection
                    if connection is not None and (connection.broken or connection.closed):
                        self._discard()
                        if not fresh:
                            continue  # lost while idle: once more, on a new connection
                    reason = self._reason(e)
                    raise StoreError(
                        f"cannot {doing} in {self.description}: {reason}", reason
                    ) from None
            raise AssertionError("not reached")

    def _connect(self) -> psycopg.Connection[Any]:
        connection: psycopg.Connection[Any] = self._pg.connect(
            self._conninfo, autocommit=True, **self._defaults
        )
        try:
            timeout, sync = connection.execute(
                "SELECT current_setting('statement_timeout'), current_setting('synchronous_commit')"
            ).fetchone() or ("", "")
            if timeout == "0":
                connection.execute(f"SET statement_timeout = {_PG_STATEMENT_TIMEOUT_MS}")
            if sync == "off":  # then a commit is not durable when it returns
                connection.execute("SET synchronous_commit = on")
            self._create_table(connection)
        except BaseException:
            connection.close()
            raise
        return connection

    def _create_table(self, connection: psycopg.Connection[Any]) -> None:
        """Create the table unless it exists (checked first, so a role that
        may use the table but not create in the schema works)."""
        name = self.table.as_string(connection)
        row = connection.execute("SELECT to_regclass(%s)", (name,)).fetchone()
        if row is not None and row[0] is not None:
            return
        with connection.transaction():
            # Stores starting together take turns, so IF NOT EXISTS sees the
            # table another one just made (concurrent CREATEs collide otherwise).
            connection.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (name,))
            for statement in self._schema:
                connection.execute(statement)

    def _discard(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._discard()


def _pg_checkpoint_schema(table: sql.Identifier, bare: str) -> tuple[sql.Composed, ...]:
    from psycopg import sql

    return (
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} ("
            " name text PRIMARY KEY,"
            " server_name text NOT NULL,"
            " positions jsonb NOT NULL,"
            " saved_at timestamptz NOT NULL DEFAULT now())"
        ).format(table),
    )


class PostgresCheckpointStore:
    """A checkpoint in a PostgreSQL table: one row per ``name``, holding the
    whole map as ``jsonb`` (the table is created if missing).

    A save is one upsert, committed before it returns (``synchronous_commit``
    is turned on for the session if the server has it off).  A lost
    connection is replaced on the next call; connecting gives up after
    ``connect_timeout`` (10 s unless the connection string says otherwise).
    Needs ``synrepl[postgres]`` (psycopg 3).

    Args:
        conninfo: a libpq connection string, ``postgresql://user@host/db``.
        server_name: the homeserver the checkpoint is for.
        name: which checkpoint in the table.
        table: the table, ``name`` or ``schema.name``.
    """

    def __init__(
        self,
        conninfo: str,
        *,
        server_name: str,
        name: str = _DEFAULT,
        table: str = "synrepl_checkpoints",
    ) -> None:
        _check_names(server_name, name)
        self.server_name = server_name
        self.name = name
        self._db = _PostgresDatabase(conninfo, table, _pg_checkpoint_schema)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._db.description} name={self.name!r}>"

    @property
    def _where(self) -> str:
        return f"checkpoint {shown(self.name)} in {self._db.description}"

    def load(self) -> Positions | None:
        """The checkpoint saved under ``name``, or None.

        Raises:
            StoreError: the database cannot be reached or read, or the
                checkpoint was saved for another server or is not one.
        """
        from psycopg import sql

        def read(db: psycopg.Connection[Any]) -> Positions | None:
            row = db.execute(
                sql.SQL("SELECT server_name, positions FROM {} WHERE name = %s").format(
                    self._db.table
                ),
                (self.name,),
            ).fetchone()
            if row is None:
                return None
            if row[0] != self.server_name:
                raise _foreign(self._where, row[0], self.server_name, "use another name")
            try:
                return _checked_positions(row[1])
            except (ValueError, TypeError):
                raise StoreError(f"{self._where} is not a valid checkpoint") from None

        return self._db.run(f"load checkpoint {shown(self.name)}", read)

    def save(self, positions: Mapping[str, Mapping[str, int]]) -> None:
        """Replace the checkpoint under ``name``: one upsert, one transaction.

        Raises:
            StoreError: the database cannot be reached or written, or the
                checkpoint under ``name`` belongs to another server.
        """
        from psycopg import sql
        from psycopg.types.json import Jsonb

        value = Jsonb(_copy_positions(positions))
        upsert = sql.SQL(
            "INSERT INTO {t} AS t (name, server_name, positions) VALUES (%s, %s, %s) "
            "ON CONFLICT (name) DO UPDATE SET positions = excluded.positions, saved_at = now() "
            "WHERE t.server_name = excluded.server_name RETURNING 1"
        ).format(t=self._db.table)
        owner = sql.SQL("SELECT server_name FROM {} WHERE name = %s").format(self._db.table)

        def write(db: psycopg.Connection[Any]) -> None:
            if db.execute(upsert, (self.name, self.server_name, value)).fetchone() is None:
                row = db.execute(owner, (self.name,)).fetchone()
                raise _foreign(self._where, row and row[0], self.server_name, "use another name")

        self._db.run(f"save checkpoint {shown(self.name)}", write)

    def close(self) -> None:
        """Close the connection; later calls fail."""
        self._db.close()


# ---------------------------------------------------------------- from a string


def _parse_spec(spec: str) -> tuple[Literal["file", "sqlite", "postgres"], str]:
    """What a store string names: a plain path or ``file:PATH``, ``sqlite:PATH``,
    or a ``postgresql://`` / ``postgres://`` URI."""
    if not isinstance(spec, str) or not spec:
        raise StoreError(f"a store is named by a non-empty string, not {shown(spec)}")
    if spec.startswith(("postgresql://", "postgres://")):
        return "postgres", spec
    if spec.startswith("sqlite:"):
        return "sqlite", _spec_path(spec, "sqlite:")
    if spec.startswith("file:"):
        return "file", _spec_path(spec, "file:")
    scheme = re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", spec)
    if scheme:
        # Not shown whole: a URI may hold a password.
        raise StoreError(
            f"unknown store {scheme.group(0)!r}: use a path, file:PATH, sqlite:PATH or "
            "postgresql://... (write ./PATH for a file whose name has a colon)"
        )
    return "file", spec


def _spec_path(spec: str, prefix: str) -> str:
    path = spec[len(prefix) :]
    if not path:
        raise StoreError(f"{prefix}PATH needs a path after {prefix!r}")
    return path


def checkpoint_store(spec: str, *, server_name: str, name: str = _DEFAULT) -> CheckpointStore:
    """The checkpoint store a string names.

    - ``PATH`` or ``file:PATH``: :class:`FileCheckpointStore`,
    - ``sqlite:PATH``: :class:`SqliteCheckpointStore`,
    - ``postgresql://...`` or ``postgres://...``: :class:`PostgresCheckpointStore`
      (table ``synrepl_checkpoints``).

    Nothing is opened yet: the first call does that.

    Raises:
        StoreError: the string names no store synrepl knows.
    """
    kind, target = _parse_spec(spec)
    if kind == "postgres":
        return PostgresCheckpointStore(target, server_name=server_name, name=name)
    if kind == "sqlite":
        return SqliteCheckpointStore(target, server_name=server_name, name=name)
    return FileCheckpointStore(target, server_name=server_name, name=name)
