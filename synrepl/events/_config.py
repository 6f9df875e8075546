"""Choosing and building an event source from Synapse's own configuration.

Synapse's ``database:`` section says where its data is: ``name: psycopg2``
with libpq ``args`` (PostgreSQL) or ``name: sqlite3`` with
``args.database`` (a file).  The experimental ``databases:`` form is read
too (the entry holding the ``main`` data store), and so is the old
``database_path``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from synrepl.config import Secret
from synrepl.errors import ConfigError, shown
from synrepl.events._admin import AdminApiEventSource
from synrepl.events._postgres import PostgresEventSource
from synrepl.events._source import EventSource
from synrepl.events._sqlite import SqliteEventSource

__all__ = ("event_source_from_config",)

# Synapse's connection-pool settings, not libpq parameters.
_NOT_LIBPQ = frozenset({"cp_min", "cp_max", "cp_reconnect", "cp_openfun", "check_same_thread"})


def _main_database(raw: Mapping[str, Any]) -> tuple[Mapping[str, Any] | None, tuple[str, ...]]:
    """The database section that holds the ``main`` data store, and its key path."""
    many = raw.get("databases")
    if many is not None:
        if not isinstance(many, Mapping):
            raise ConfigError("must be a mapping of database sections", ("databases",))
        for label, section in many.items():
            if not isinstance(section, Mapping):
                raise ConfigError("must be a mapping", ("databases", str(label)))
            stores = section.get("data_stores", ["main", "state"])
            if isinstance(stores, list | tuple) and "main" in stores:
                return section, ("databases", str(label))
        raise ConfigError("no database holds the 'main' data store", ("databases",))
    section = raw.get("database")
    if section is not None:
        if not isinstance(section, Mapping):
            raise ConfigError("must be a mapping", ("database",))
        return section, ("database",)
    path = raw.get("database_path")
    if path is not None:
        return {"name": "sqlite3", "args": {"database": path}}, ("database_path",)
    return None, ()


def _event_writers(raw: Mapping[str, Any]) -> tuple[str, ...]:
    writers = raw.get("stream_writers")
    value = writers.get("events") if isinstance(writers, Mapping) else None
    if value is None:
        return ("master",)
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list | tuple) or not names:
        raise ConfigError(
            "must be a non-empty list of instance names", ("stream_writers", "events")
        )
    for name in names:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"not an instance name: {shown(name)}", ("stream_writers", "events"))
    return tuple(names)


def _libpq_params(args: object, where: tuple[str, ...]) -> dict[str, str | int]:
    if args is None:
        return {}
    if not isinstance(args, Mapping):
        raise ConfigError("must be a mapping", (*where, "args"))
    params: dict[str, str | int] = {}
    for key, value in args.items():
        if key in _NOT_LIBPQ:
            continue
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise ConfigError("must be a string or a number", (*where, "args", str(key)))
        params["dbname" if key == "database" else str(key)] = value
    return params


def _looks_like_conninfo(text: str) -> bool:
    return text.startswith(("postgres://", "postgresql://")) or "=" in text


def event_source_from_config(
    raw: Mapping[str, Any],
    *,
    database: str | None = None,
    admin_url: str | None = None,
    admin_token: str | Secret | None = None,
    timeout: float = 10.0,
) -> EventSource:
    """The event source for a homeserver, from its configuration or an override.

    Args:
        raw: the merged homeserver.yaml (:func:`synrepl.config.read_config_files`).
        database: instead of the configured database, this PostgreSQL
            connection string (for a read-only role: ``"host=db
            dbname=synapse user=observer"``) or, for a SQLite homeserver,
            this file.  It replaces the configured connection entirely.
        admin_url: use the admin API at this URL instead of the database
            (with ``admin_token``, a server admin's access token).
        admin_token: the admin's access token, with ``admin_url``.
        timeout: seconds for connecting (and, for the admin API, for each answer).

    Returns:
        A :class:`PostgresEventSource`, :class:`SqliteEventSource` or
        :class:`AdminApiEventSource`; nothing is connected yet.

    Raises:
        ConfigError: the configuration names no usable database, or the
            arguments contradict each other.
    """
    if (admin_url is None) != (admin_token is None):
        raise ConfigError("admin_url and admin_token go together")
    if admin_url is not None and admin_token is not None:
        if database is not None:
            raise ConfigError("pass either database or admin_url, not both")
        try:
            return AdminApiEventSource(admin_url, admin_token, timeout=timeout)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    section, where = _main_database(raw)
    writers = _event_writers(raw)
    if section is None:
        if database is None:
            raise ConfigError(
                "no database section: pass database= (a connection string or a file) "
                "or admin_url= and admin_token="
            )
        section = {"name": "psycopg2" if _looks_like_conninfo(database) else "sqlite3"}
        where = ("database",)
    engine = section.get("name", "sqlite3")
    try:
        if engine in ("psycopg2", "psycopg"):
            if database is not None:
                return PostgresEventSource(database, connect_timeout=timeout, writers=writers)
            params = _libpq_params(section.get("args"), where)
            return PostgresEventSource(params=params, connect_timeout=timeout, writers=writers)
        if engine == "sqlite3":
            path = database
            if path is None:
                args = section.get("args")
                path = args.get("database") if isinstance(args, Mapping) else None
            if not isinstance(path, str) or not path:
                raise ConfigError("a SQLite homeserver needs args.database", where)
            return SqliteEventSource(path, busy_timeout=min(timeout, 1.0), writers=writers)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e), where) from None
    raise ConfigError(f"unsupported database engine {shown(engine)}", (*where, "name"))
