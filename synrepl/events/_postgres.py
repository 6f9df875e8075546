"""Full events from Synapse's PostgreSQL database, over psycopg 3, read-only.

Every call is one ``READ ONLY`` transaction; a role with ``SELECT`` on the
tables read (``events``, ``event_json``, ``rooms``, ``rejections``,
``redactions``, ``room_ban_redactions``, ``stream_positions``,
``current_state_delta_stream``, ``ex_outlier_stream``) is enough, and the
source never asks for more.  A streaming replica works too, with the
"missing" retries of the fetch policy covering its lag.

Connecting is bounded by ``connect_timeout``, each statement by
``statement_timeout`` (on the server) and each call by that plus a few
seconds (on our side: a server that stopped answering has its connection
cut), and a dead peer is noticed by TCP keepalives; a lost connection is
dropped and re-made on the next call.  psycopg is imported
only when a source is made, so the rest of synrepl works without it.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Self, TypeVar

from synrepl.events._database import Run, SchemaReader, fetch_events, read_positions
from synrepl.events._errors import EventSourceError, EventSourceUnavailable, describe_error
from synrepl.events._model import FullEvent

if TYPE_CHECKING:
    import psycopg

__all__ = ("PostgresEventSource",)

_T = TypeVar("_T")

# One statement per 1000 IDs: the lists stay small for the planner.
_CHUNK = 1000

#: libpq keepalive settings used unless the connection string sets them:
#: a peer that vanished without closing is noticed in about a minute.
KEEPALIVES: Mapping[str, str] = {
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
    # unacknowledged data for 60 s: the connection is dead
    "tcp_user_timeout": "60000",
}

#: Seconds a call may wait for the server beyond its statement timeout
#: before the connection is cut from our side: a server (or a pooler in
#: front of it) that stopped answering cannot enforce its own timeout.
_GRACE = 5.0


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "PostgresEventSource needs psycopg 3: pip install 'psycopg[binary]>=3.1' "
            "(or synrepl's 'postgres' extra)"
        ) from e
    return psycopg


#: A table's column names, for :class:`SchemaReader`.
_COLUMNS_SQL = (
    "SELECT column_name FROM information_schema.columns "
    "WHERE table_schema = current_schema() AND table_name = ?"
)


class PostgresEventSource:
    """Events from Synapse's PostgreSQL database, read in read-only transactions.

    Args:
        conninfo: a libpq connection string or URI
            (``"host=db dbname=synapse user=observer"``,
            ``"postgresql://observer@db/synapse"``).
        params: more connection parameters, overriding ``conninfo``
            (``{"password": ...}``).
        connect_timeout: seconds that a connection attempt may take.
        statement_timeout: seconds that one statement may run.
        writers: the ``events`` stream writers (Synapse's
            ``stream_writers.events``): :meth:`positions` answers for
            exactly these, as Synapse does.  By default, every writer the
            database has recorded.

    Raises:
        ValueError: the connection string does not parse, or a timeout is
            not positive.
        ImportError: psycopg 3 is not installed.
    """

    def __init__(
        self,
        conninfo: str = "",
        *,
        params: Mapping[str, str | int] | None = None,
        connect_timeout: float = 10.0,
        statement_timeout: float = 30.0,
        writers: Sequence[str] | None = None,
    ) -> None:
        for name, value in (
            ("connect_timeout", connect_timeout),
            ("statement_timeout", statement_timeout),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be more than 0, got {value!r}")
        pg = _psycopg()
        extra = {str(k): str(v) for k, v in (params or {}).items()}
        try:
            given = pg.conninfo.conninfo_to_dict(conninfo, **extra)
        except pg.Error:
            # libpq's complaint quotes pieces of the string, a password's too.
            raise ValueError(
                "bad PostgreSQL connection string (not quoted: it may hold a password); "
                "use key=value pairs or a postgresql:// URI"
            ) from None
        settings = {**KEEPALIVES, "application_name": "synrepl-events", **given}
        # libpq counts whole seconds, and 1 is taken as 2.
        settings["connect_timeout"] = str(max(2, math.ceil(connect_timeout)))
        self._conninfo: str = pg.conninfo.make_conninfo("", **settings)
        self._secrets = (settings.get("password"), os.environ.get("PGPASSWORD"))
        self._where = "{}@{}:{}/{}".format(
            settings.get("user", ""),
            settings.get("host", settings.get("hostaddr", "")),
            settings.get("port", ""),
            settings.get("dbname", ""),
        )
        self.connect_timeout = connect_timeout
        self.statement_timeout = statement_timeout
        self.writers = tuple(writers) if writers is not None else None
        self._schema = SchemaReader(_COLUMNS_SQL)
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"PostgresEventSource({self._where!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        if self._closed:
            raise EventSourceError(f"{self!r} is closed")
        conn = self._conn
        if conn is not None and not (conn.closed or conn.broken):
            return conn
        self._drop()
        fresh: psycopg.Connection[tuple[Any, ...]] = _psycopg().connect(
            self._conninfo, autocommit=False
        )
        fresh.read_only = True  # every transaction: BEGIN READ ONLY
        self._conn = fresh
        return fresh

    def _read(self, work: Callable[[Run], _T]) -> _T:
        pg = _psycopg()
        with self._lock:
            try:
                conn = self._connect()
                watchdog = threading.Timer(self.statement_timeout + _GRACE, _sever, (conn,))
                watchdog.daemon = True
                watchdog.start()
                try:
                    return self._run(conn, work)
                finally:
                    watchdog.cancel()
            except (pg.OperationalError, pg.InterfaceError) as e:
                self._drop()
                raise EventSourceUnavailable(self._message(e)) from None
            except pg.errors.InsufficientPrivilege as e:
                # Refused: the operator can grant SELECT without restarting us.
                raise EventSourceUnavailable(self._message(e)) from None
            except pg.Error as e:
                raise EventSourceError(self._message(e)) from None

    def _run(self, conn: psycopg.Connection[tuple[Any, ...]], work: Callable[[Run], _T]) -> _T:
        """``work`` in one read-only transaction, under the statement timeout."""
        with conn.cursor() as cur:

            def run(sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
                cur.execute(sql.replace("?", "%s"), list(args))
                return cur.fetchall()

            try:
                cur.execute(
                    "SELECT set_config('statement_timeout', %s, true)",
                    [f"{math.ceil(self.statement_timeout * 1000)}ms"],
                )
                return work(run)
            finally:
                if not conn.broken:
                    conn.rollback()  # nothing to keep: it only read

    def _message(self, error: BaseException) -> str:
        return f"{self!r}: {describe_error(error, self._secrets)}"

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # it is gone either way
                conn.close()

    def fetch(self, event_ids: Sequence[str]) -> dict[str, FullEvent]:
        """The events found (three or four statements per 1000 IDs); absent ones are left out."""
        if not event_ids:
            return {}
        return self._read(lambda run: fetch_events(run, event_ids, _CHUNK, self._schema(run)))

    def positions(self) -> dict[str, dict[str, int]]:
        """The ``events`` position of each writer, from one read-only transaction."""
        return self._read(lambda run: read_positions(run, self.writers))

    def close(self) -> None:
        """Close the connection; later calls raise :class:`~synrepl.events.EventSourceError`."""
        with self._lock:
            self._closed = True
            self._drop()


def _sever(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
    """Cut a connection whose server stopped answering, from another thread:
    the call blocked on it then fails at once (and the source reconnects)."""
    with contextlib.suppress(Exception):  # already closed: nothing to cut
        fd = os.dup(conn.pgconn.socket)
        with socket.socket(fileno=fd) as sock:
            sock.shutdown(socket.SHUT_RDWR)
