"""Full events from a single-process Synapse's SQLite file, read-only.

The file is opened with ``mode=ro``: this process can never write to it.
Synapse runs SQLite in WAL mode, where readers do not block the writer; each
call is one short read transaction (so the WAL can still be checkpointed)
and waits at most ``busy_timeout`` for a lock.  Reading needs read access to
the database file and its ``-wal`` file, and write access to its ``-shm``
file (SQLite's shared-memory index; as the user Synapse runs as, or a group
member).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar
from urllib.parse import quote

from synrepl.events._database import Run, SchemaReader, fetch_events, read_positions
from synrepl.events._errors import EventSourceError, EventSourceUnavailable, describe_error
from synrepl.events._model import FullEvent

__all__ = ("SqliteEventSource",)

_T = TypeVar("_T")

# Far below SQLite's limit on bound parameters (32766 since 3.32, 999 before).
_CHUNK = 400

# "no such table/column" and the like say the file is not a Synapse database
# of a version we read, which waiting will not change.
_SCHEMA_WORDS = ("no such table", "no such column", "syntax error")


#: A table's column names, for :class:`SchemaReader`.
_COLUMNS_SQL = "SELECT name FROM pragma_table_info(?)"


class SqliteEventSource:
    """Events from Synapse's SQLite database file, opened read-only.

    Args:
        path: the database file (Synapse's ``database.args.database``).
        busy_timeout: seconds to wait for a lock before giving up
            (:class:`~synrepl.events.EventSourceUnavailable`).
        writers: the ``events`` stream writers (Synapse's
            ``stream_writers.events``; by default whatever the database
            recorded, normally ``master``).

    Raises:
        ValueError: ``path`` is ``:memory:`` or empty, or a timeout is not positive.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 1.0,
        writers: Sequence[str] | None = None,
    ) -> None:
        text = os.fspath(path)
        if not text or text == ":memory:":
            raise ValueError(f"SqliteEventSource needs a database file, got {text!r}")
        if not busy_timeout > 0:
            raise ValueError(f"busy_timeout must be more than 0, got {busy_timeout!r}")
        self.path = Path(text)
        self.busy_timeout = busy_timeout
        self.writers = tuple(writers) if writers is not None else None
        self._schema = SchemaReader(_COLUMNS_SQL)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"SqliteEventSource({str(self.path)!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _connect(self) -> sqlite3.Connection:
        if self._closed:
            raise EventSourceError(f"{self!r} is closed")
        if self._conn is None:
            uri = "file:" + quote(str(self.path.absolute())) + "?mode=ro"
            conn = sqlite3.connect(
                uri,
                uri=True,
                timeout=self.busy_timeout,
                isolation_level=None,  # we BEGIN and COMMIT ourselves
                check_same_thread=False,  # any worker thread, one at a time
            )
            try:
                conn.execute("PRAGMA query_only = ON")
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _read(self, work: Callable[[Run], _T]) -> _T:
        with self._lock:
            try:
                conn = self._connect()
                conn.execute("BEGIN")
                try:

                    def run(sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
                        return conn.execute(sql, args).fetchall()

                    return work(run)
                finally:
                    conn.execute("COMMIT")
            except sqlite3.Error as e:
                self._drop()
                reason = describe_error(e)
                message = f"{self!r}: {reason}"
                if isinstance(e, sqlite3.OperationalError) and not any(
                    word in str(e) for word in _SCHEMA_WORDS
                ):
                    raise EventSourceUnavailable(message) from None
                raise EventSourceError(message) from None

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def fetch(self, event_ids: Sequence[str]) -> dict[str, FullEvent]:
        """The events found (a few queries per 400 IDs); absent ones are left out."""
        if not event_ids:
            return {}
        return self._read(lambda run: fetch_events(run, event_ids, _CHUNK, self._schema(run)))

    def positions(self) -> dict[str, dict[str, int]]:
        """The ``events`` position of each writer, from one read transaction."""
        return self._read(lambda run: read_positions(run, self.writers))

    def close(self) -> None:
        """Close the file; later calls raise :class:`~synrepl.events.EventSourceError`."""
        with self._lock:
            self._closed = True
            self._drop()
