"""Options shared by the subcommands, and the cluster configuration they describe.

A command finds the cluster either from Synapse's own files
(``-c homeserver.yaml [-c worker.yaml]``) or from plain options
(``--server-name``, ``--redis-url``, ``--instance NAME=URL``,
``--secret-file``); plain options given with ``-c`` override the files.

``watch`` also filters the events stream (``--room``, ``--type``,
``--sender``) and reads each event's content (``--full``) from an event
source: Synapse's database as homeserver.yaml describes it, ``--database``,
or the admin API (``--admin-url`` with ``--admin-token-file``).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import attrs

from synrepl.cli._errors import UsageError
from synrepl.commands import COMMAND_TYPES
from synrepl.config import (
    RedisConfig,
    Secret,
    SynapseConfig,
    load_config,
    read_config_files,
    read_secret_file,
)
from synrepl.errors import ConfigError
from synrepl.events import EventFilter, EventSource, event_source_from_config
from synrepl.releases import NEWEST, OLDEST_KNOWN, SynapseRelease, UnknownReleaseError, facts_for
from synrepl.sharding import InstanceLocation, canonical_instance_name

__all__ = (
    "release_argument",
    "DEFAULT_REDIS_URL",
    "add_cluster_options",
    "add_filter_options",
    "add_event_options",
    "add_output_options",
    "cluster_config",
    "event_filter",
    "wants_full_events",
    "event_source",
    "parse_redis_url",
    "parse_instance",
    "split_words",
)

#: Where Redis is looked for when neither a config file nor ``--redis-url`` says.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379"


def add_cluster_options(
    parser: argparse.ArgumentParser, *, redis: bool = True, http: bool = False
) -> None:
    """``-c``, ``--server-name`` and, as asked, the Redis and HTTP options."""
    group = parser.add_argument_group("cluster (Synapse's config files, or plain options)")
    group.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        action="append",
        default=[],
        help="a Synapse config file (homeserver.yaml, then a worker file); repeatable, "
        "later files replace top-level keys as in Synapse; a directory means its *.yaml",
    )
    group.add_argument(
        "--server-name",
        metavar="NAME",
        help="the homeserver's server_name, which is also the Redis channel (overrides the config)",
    )
    if redis:
        group.add_argument(
            "--redis-url",
            metavar="URL",
            help="redis://[[user]:password@]host[:port][/db], rediss:// for TLS, or "
            "unix:///path/to/redis.sock[?db=N] (overrides the config's redis section; "
            f"default without -c: {DEFAULT_REDIS_URL})",
        )
        group.add_argument(
            "--connect-timeout",
            metavar="SECONDS",
            type=positive_float,
            default=10.0,
            help="give up when Redis does not answer within this time (default: 10)",
        )
    if http:
        group.add_argument(
            "--instance",
            metavar="NAME=URL",
            action="append",
            default=[],
            help="where an instance serves HTTP replication: http://host:port, "
            "https://host:port or unix:/path (adds to or overrides instance_map; repeatable)",
        )
        group.add_argument(
            "--secret-file",
            metavar="FILE",
            help="read worker_replication_secret from FILE (overrides the config)",
        )


def add_filter_options(parser: argparse.ArgumentParser) -> None:
    """``--stream``, ``--command``, ``--writer``: what to show."""
    group = parser.add_argument_group("filters (repeatable, or comma-separated)")
    group.add_argument(
        "-s", "--stream", metavar="STREAM", action="append", default=[], help="only these streams"
    )
    group.add_argument(
        "--command",
        metavar="NAME",
        action="append",
        default=[],
        help="only these commands (RDATA, POSITION, USER_SYNC, USER_IP, ...)",
    )
    group.add_argument(
        "-w",
        "--writer",
        metavar="INSTANCE",
        action="append",
        default=[],
        help="only commands from these instances ('main' means 'master')",
    )


def add_event_options(parser: argparse.ArgumentParser) -> None:
    """``--room``, ``--type``, ``--sender``, ``--full`` and where content comes from."""
    group = parser.add_argument_group(
        "events (each repeatable; they show the events stream only, unless --stream names more)"
    )
    group.add_argument(
        "--room",
        metavar="ROOM_ID",
        action="append",
        default=[],
        help="only events of this room (!opaque:server), decided from the row",
    )
    group.add_argument(
        "--type",
        metavar="TYPE",
        action="append",
        default=[],
        help="only events of this type; wildcards as in the shell (m.room.*), decided from the row",
    )
    group.add_argument(
        "--sender",
        metavar="USER_ID",
        action="append",
        default=[],
        help="only events from this user (@user:server; wildcards allowed, "
        "@_bridge_*:example.org); needs each event's content, so implies --full",
    )
    group.add_argument(
        "--full",
        action="store_true",
        help="print whole events (sender, content, ...: ROOM_ID SENDER: BODY for a "
        "message) instead of the events stream's rows, reading them read-only from "
        "Synapse's database as homeserver.yaml says, or from --database or --admin-url",
    )
    group.add_argument(
        "--database",
        metavar="DSN|PATH",
        help="with --full: read events from this PostgreSQL connection string "
        "(a read-only role: 'host=db dbname=synapse user=observer') or SQLite file "
        "instead of the config's database section",
    )
    group.add_argument(
        "--admin-url",
        metavar="URL",
        help="with --full: read events from Synapse's admin API at this URL "
        "(http://127.0.0.1:8008) instead of the database; needs --admin-token-file",
    )
    group.add_argument(
        "--admin-token-file",
        metavar="FILE",
        help="a server admin's access token, read from FILE (never printed)",
    )


def add_request_options(parser: argparse.ArgumentParser) -> None:
    """``--timeout`` and ``--retries`` of the HTTP replication requests."""
    group = parser.add_argument_group("HTTP requests")
    group.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=positive_float,
        default=30.0,
        help="per-request timeout (default: 30)",
    )
    group.add_argument(
        "--retries",
        metavar="N",
        type=non_negative_int,
        default=2,
        help="retries after a timeout or a connection error (default: 2)",
    )


def add_output_options(parser: argparse.ArgumentParser, *, tokens: bool = True) -> None:
    """``--json``, ``--color`` and, as asked, ``--show-access-tokens``."""
    group = parser.add_argument_group("output")
    group.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per line on stdout instead of aligned text",
    )
    group.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="colour the text output: auto (when stdout is a terminal and NO_COLOR "
        "is not set), always or never",
    )
    if tokens:
        group.add_argument(
            "--show-access-tokens",
            action="store_true",
            help="print USER_IP access tokens in clear (they are redacted by default)",
        )


def positive_float(text: str) -> float:
    """argparse type: a number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text!r}")
    return value


def release_argument(text: str) -> SynapseRelease:
    """argparse type: a Synapse release synrepl knows, ``1.98.0``."""
    try:
        release = SynapseRelease.parse(text)
    except UnknownReleaseError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not facts_for(release).known:
        raise argparse.ArgumentTypeError(
            f"synrepl knows Synapse {OLDEST_KNOWN} to {NEWEST}, not {release}"
        )
    return release


def non_negative_int(text: str) -> int:
    """argparse type: a whole number, 0 or more."""
    if not re.fullmatch(r"[0-9]+", text):
        raise argparse.ArgumentTypeError(f"must be a whole number (0 or more), got {text!r}")
    return int(text)


def split_words(values: Sequence[str]) -> list[str]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]``."""
    return [word for value in values for word in value.split(",") if word.strip()]


def command_names(values: Sequence[str]) -> frozenset[str] | None:
    """The ``--command`` filter, checked against the known command names."""
    names = {word.strip().upper() for word in split_words(values)}
    if not names:
        return None
    unknown = sorted(names - set(COMMAND_TYPES))
    if unknown:
        raise UsageError(
            f"unknown command {', '.join(unknown)} for --command; "
            f"known: {', '.join(sorted(COMMAND_TYPES))}"
        )
    return frozenset(names)


def _pattern_errors(option: str, key: str, values: list[str]) -> None:
    """The library's checks of one criterion, worded for ``option``."""
    criterion: dict[str, Any] = {key: values}
    try:
        EventFilter(**criterion)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{option}: {str(e).removeprefix(key + ': ')}") from None


def event_filter(args: argparse.Namespace) -> EventFilter | None:
    """``--room``, ``--type`` and ``--sender`` as one filter (None: none given).

    Raises:
        UsageError: a room that is not a room ID, a sender that is neither a
            user ID nor a pattern, an empty pattern.
    """
    rooms: list[str] = list(getattr(args, "room", None) or [])
    types: list[str] = list(getattr(args, "type", None) or [])
    senders: list[str] = list(getattr(args, "sender", None) or [])
    if not (rooms or types or senders):
        return None
    for room in rooms:
        if not room.startswith("!"):
            hint = " (that is an alias: use the room's ID)" if room.startswith("#") else ""
            raise UsageError(f"--room takes a room ID (!opaque:server), got {room!r}{hint}")
    for sender in senders:
        if not sender.startswith(("@", "*", "?", "[")):
            raise UsageError(
                "--sender takes a user ID (@user:server) or a pattern "
                f"(@_bridge_*:example.org), got {sender!r}"
            )
    for option, key, values in (
        ("--room", "rooms", rooms),
        ("--type", "types", types),
        ("--sender", "senders", senders),
    ):
        if values:
            _pattern_errors(option, key, values)
    return EventFilter(rooms=rooms or None, types=types or None, senders=senders or None)


def wants_full_events(args: argparse.Namespace) -> bool:
    """``--full``, or ``--sender`` (which only the full event can decide)."""
    return bool(getattr(args, "full", False) or getattr(args, "sender", None))


_DATABASE_KEYS = ("database", "databases", "database_path")


def _admin_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        raise UsageError(
            "--admin-url must not carry credentials; the access token goes in --admin-token-file"
        )
    if parts.query or parts.fragment:
        raise UsageError(
            "--admin-url must not carry a query or a fragment (the access token goes in "
            "--admin-token-file)"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--admin-url must be http://host[:port] or https://..., got {url!r}")
    return url


def event_source(args: argparse.Namespace, *, timeout: float = 10.0) -> EventSource | None:
    """Where ``--full`` reads each event's content; None without ``--full``.

    Nothing is connected yet.  ``timeout`` bounds connecting and each answer.

    Raises:
        UsageError: a content option without ``--full``, options that
            contradict each other, a token file that cannot be read, or no
            source at all (no database section, no ``--database``, no
            ``--admin-url``).  The message never holds the access token or a
            database password.
    """
    database: str | None = getattr(args, "database", None)
    admin_url: str | None = getattr(args, "admin_url", None)
    token_file: str | None = getattr(args, "admin_token_file", None)
    if not wants_full_events(args):
        for option, value in (
            ("--database", database),
            ("--admin-url", admin_url),
            ("--admin-token-file", token_file),
        ):
            if value:
                raise UsageError(f"{option} says where --full reads events; add --full")
        return None
    if (admin_url is None) != (token_file is None):
        raise UsageError(
            "--admin-url and --admin-token-file go together: the admin API wants a "
            "server admin's access token"
        )
    if admin_url is not None and database is not None:
        raise UsageError("read events from --database or from --admin-url, not both")
    token: Secret | None = None
    if admin_url is not None and token_file is not None:
        admin_url = _admin_url(admin_url)
        try:
            text = read_secret_file(token_file)
        except ConfigError as e:  # names the file, never quotes it
            raise UsageError(f"--admin-token-file: {e.message}") from None
        if not text:
            raise UsageError(f"--admin-token-file: '{token_file}' is empty")
        token = Secret(text)
    files: list[str] = list(getattr(args, "config", []) or [])
    try:
        raw = read_config_files(*files) if files else {}
    except ConfigError as e:
        raise UsageError(f"bad config: {e}") from None
    if admin_url is None and database is None and not any(k in raw for k in _DATABASE_KEYS):
        where = "the config has no database section" if files else "no -c homeserver.yaml given"
        raise UsageError(
            f"--full reads each event from Synapse's database, but {where}; pass "
            "--database DSN|PATH, or --admin-url URL --admin-token-file FILE"
        )
    try:
        return event_source_from_config(
            raw, database=database, admin_url=admin_url, admin_token=token, timeout=timeout
        )
    except ImportError:
        raise UsageError(
            "--full on PostgreSQL needs psycopg 3: pip install 'synrepl[postgres]'"
        ) from None
    except ConfigError as e:
        if database is not None and "connection string" in e.message:
            # libpq's complaint may quote a piece of the string: a password, say.
            raise UsageError(
                "--database: libpq cannot read this connection string (not shown: it may "
                "hold a password); write key=value pairs or postgresql://user@host/dbname"
            ) from None
        raise UsageError(f"--full: cannot read events from this config: {e}") from None


def parse_redis_url(url: str) -> RedisConfig:
    """A ``RedisConfig`` from a redis://, rediss:// or unix:// URL.

    Raises:
        UsageError: the URL cannot be read (the message never quotes a password).
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "unix"):
        raise UsageError(
            "--redis-url must start with redis://, rediss:// or unix://, got "
            f"{_without_password(url)!r}"
        )
    try:
        port = parts.port
    except ValueError:
        raise UsageError(f"--redis-url has an invalid port: {_without_password(url)!r}") from None
    query = parse_qs(parts.query)
    dbid: int | None = None
    if scheme == "unix":
        db_text = query.get("db", [""])[0]
    else:
        db_text = parts.path.strip("/") or query.get("db", [""])[0]
    if db_text:
        if not db_text.isdigit():
            raise UsageError(f"--redis-url: the database must be a number, got {db_text!r}")
        dbid = int(db_text)
    username = unquote(parts.username) if parts.username else None
    password = Secret(unquote(parts.password)) if parts.password is not None else None
    if username and password is None:
        raise UsageError("--redis-url: a username needs a password (user:password@host)")
    if scheme == "unix":
        if not parts.path:
            raise UsageError(
                "--redis-url: unix:// needs a socket path, e.g. unix:///run/redis.sock"
            )
        return RedisConfig(
            enabled=True, path=unquote(parts.path), dbid=dbid, username=username, password=password
        )
    return RedisConfig(
        enabled=True,
        host=parts.hostname or "127.0.0.1",
        port=port or 6379,
        dbid=dbid,
        username=username,
        password=password,
        use_tls=scheme == "rediss",
    )


def _without_password(url: str) -> str:
    return re.sub(r"//([^/@]*):[^/@]*@", r"//\1:***@", url)


def parse_instance(text: str) -> tuple[str, InstanceLocation]:
    """``NAME=http://host:port`` (or ``https://``, or ``unix:/path``) for ``--instance``."""
    name, sep, url = text.partition("=")
    if not sep or not name or not url:
        raise UsageError(f"--instance must be NAME=URL, got {text!r}")
    if url.startswith("unix:"):
        path = url.removeprefix("unix:").removeprefix("//")
        return canonical_instance_name(name), InstanceLocation.unix(path)
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise UsageError(f"--instance {name}: invalid port in {url!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(
            f"--instance {name}: the URL must be http://host:port, https://host:port "
            f"or unix:/path, got {url!r}"
        )
    tls = parts.scheme == "https"
    return canonical_instance_name(name), InstanceLocation.tcp(
        parts.hostname, port or (443 if tls else 80), tls
    )


def cluster_config(
    args: argparse.Namespace, *, need_redis: bool, need_server_name: bool = True
) -> SynapseConfig:
    """The cluster's configuration from ``-c`` files and plain options.

    Raises:
        UsageError: nothing says where the cluster is, a file cannot be read,
            or the configuration is invalid (the message is the ConfigError's).
    """
    files: list[str] = list(getattr(args, "config", []) or [])
    server_name: str | None = getattr(args, "server_name", None)
    try:
        if files:
            config = load_config(*files)
        else:
            if not server_name and need_server_name:
                raise UsageError(
                    "say where the cluster is: -c homeserver.yaml [-c worker.yaml], "
                    "or --server-name NAME (with --redis-url)"
                )
            config = SynapseConfig(server_name=server_name or "synrepl.invalid")
    except ConfigError as e:
        raise UsageError(f"bad config: {e}") from None
    changes: dict[str, object] = {}
    if server_name:
        changes["server_name"] = server_name
    redis_url: str | None = getattr(args, "redis_url", None)
    if redis_url:
        changes["redis"] = parse_redis_url(redis_url)
    elif need_redis and not config.redis.enabled:
        if files:
            raise UsageError(
                "bad config: redis.enabled is not true, so the cluster has no Redis "
                "replication to look at; set redis: {enabled: true, host: ..., port: ...} "
                "as the Synapse processes have it, or pass --redis-url"
            )
        changes["redis"] = parse_redis_url(DEFAULT_REDIS_URL)
    instances = getattr(args, "instance", None) or []
    if instances:
        extra = dict(parse_instance(text) for text in instances)
        changes["instance_map"] = {**config.instance_map, **extra}
    secret_file: str | None = getattr(args, "secret_file", None)
    if secret_file:
        try:
            secret = read_secret_file(secret_file)
        except ConfigError as e:  # names the file, never quotes it
            raise UsageError(f"--secret-file: {e.message}") from None
        changes["worker_replication_secret"] = Secret(secret) if secret else None
    return attrs.evolve(config, **changes) if changes else config  # type: ignore[arg-type]
