"""Who writes which stream, where each instance listens, and which event
persister owns a room.

Synapse splits its write work by the ``stream_writers`` option: each key
(``events``, ``typing``, ...) names the instances allowed to write one or
more replication streams. A consumer needs that map to know whose positions
to track, and the ``instance_map`` to know where to fetch missed rows from.

Facts here were checked against Synapse 1.163.2
(``synapse/config/workers.py``, ``synapse/replication/tcp/handler.py`` and
the stream id generators in ``synapse/storage``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from hashlib import sha256
from types import MappingProxyType

import attrs

from synrepl.errors import ConfigError, shown
from synrepl.streams import STREAM_NAMES

__all__ = (
    "MAIN_INSTANCE_NAME",
    "MAIN_MAP_KEY",
    "STREAM_WRITER_KEYS",
    "SINGLE_WRITER_KEYS",
    "STREAMS_BY_WRITER_KEY",
    "WRITER_KEY_BY_STREAM",
    "MAIN_ONLY_STREAMS",
    "ANY_INSTANCE_STREAMS",
    "InstanceLocation",
    "StreamWriters",
    "event_persister_for_room",
    "shard_index",
    "canonical_instance_name",
)

#: The instance name the main process uses on the wire and in ``stream_writers``.
MAIN_INSTANCE_NAME = "master"

#: The key under which the main process is listed in ``instance_map``.
MAIN_MAP_KEY = "main"

#: Every ``stream_writers`` key that Synapse 1.163.2 accepts, in its order.
STREAM_WRITER_KEYS: tuple[str, ...] = (
    "events",
    "typing",
    "to_device",
    "account_data",
    "receipts",
    "presence",
    "push_rules",
    "device_lists",
    "thread_subscriptions",
    "quarantined_media_changes",
)

#: Keys that Synapse refuses to shard: exactly one writer each.
SINGLE_WRITER_KEYS: frozenset[str] = frozenset(
    {"typing", "to_device", "account_data", "presence", "push_rules"}
)

#: The replication streams that the writers of each key publish.
#:
#: ``sticky_events`` and ``profile_updates`` are written while events are
#: persisted, so they follow the ``events`` writers; the presence writer also
#: publishes ``presence_federation``.
STREAMS_BY_WRITER_KEY: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "events": ("events", "backfill", "sticky_events", "profile_updates"),
        "typing": ("typing",),
        "to_device": ("to_device",),
        "account_data": ("account_data",),
        "receipts": ("receipts",),
        "presence": ("presence", "presence_federation"),
        "push_rules": ("push_rules",),
        "device_lists": ("device_lists",),
        "thread_subscriptions": ("thread_subscriptions",),
        "quarantined_media_changes": ("quarantined_media",),
    }
)

#: Replication stream name -> the ``stream_writers`` key that governs it.
WRITER_KEY_BY_STREAM: Mapping[str, str] = MappingProxyType(
    {stream: key for key, streams in STREAMS_BY_WRITER_KEY.items() for stream in streams}
)

#: Streams only the main process publishes. Their id generators are pinned to
#: ``master`` (pushers, un-partial-stated rooms and events) or, for
#: ``federation``, the main process's send queue feeds the federation senders
#: (the senders answer with ``FEDERATION_ACK``; they do not publish the stream).
MAIN_ONLY_STREAMS: frozenset[str] = frozenset(
    {"pushers", "federation", "un_partial_stated_room", "un_partial_stated_event"}
)

#: Streams that any instance may publish: every process that invalidates a
#: cache writes ``caches`` rows under its own name (with Redis and PostgreSQL).
ANY_INSTANCE_STREAMS: frozenset[str] = frozenset({"caches"})


def canonical_instance_name(name: str) -> str:
    """Map the ``instance_map`` key of the main process to its instance name.

    Lets callers say ``"main"`` or ``"master"`` and mean the same process.
    """
    return MAIN_INSTANCE_NAME if name == MAIN_MAP_KEY else name


def _check_port(port: object) -> None:
    # bool is an int subclass, but `port: true` is a mistake, not port 1.
    if type(port) is not int or not 1 <= port <= 65535:
        raise ConfigError(f"must be a whole number from 1 to 65535, got {shown(port)}", ("port",))


def _check_text(value: object, key: str) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"must be a non-empty string, got {shown(value)}", (key,))


@attrs.frozen
class InstanceLocation:
    """Where an instance serves HTTP replication: TCP host/port or a unix socket.

    Exactly one form is set. Build one with :meth:`tcp` or :meth:`unix`.
    Invalid values raise :class:`ConfigError` whose path is relative to the
    entry (``("port",)``), so config loading can prefix the entry's own path.
    """

    host: str | None = None
    port: int | None = None
    tls: bool = False
    path: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.path is not None:
            self._check_unix()
        else:
            self._check_tcp()

    def _check_unix(self) -> None:
        _check_text(self.path, "path")
        if self.host is not None or self.port is not None or self.tls:
            raise ConfigError("give either host and port, or path, not both", ("path",))

    def _check_tcp(self) -> None:
        if self.host is None and self.port is None:
            raise ConfigError("needs host and port (TCP) or path (unix socket)")
        _check_text(self.host, "host")
        _check_port(self.port)
        if type(self.tls) is not bool:
            raise ConfigError(f"must be true or false, got {shown(self.tls)}", ("tls",))

    @classmethod
    def tcp(cls, host: str, port: int, tls: bool = False) -> InstanceLocation:
        """A location reached over TCP, with HTTPS when ``tls`` is true."""
        return cls(host=host, port=port, tls=tls)

    @classmethod
    def unix(cls, path: str) -> InstanceLocation:
        """A location reached through a unix domain socket."""
        return cls(path=path)

    @property
    def is_unix(self) -> bool:
        """True for a unix socket location; then ``path`` is set."""
        return self.path is not None

    @property
    def scheme(self) -> str:
        """``http``, ``https`` or ``unix``, as Synapse names the three forms."""
        if self.is_unix:
            return "unix"
        return "https" if self.tls else "http"

    @property
    def netloc(self) -> str:
        """``host:port`` (IPv6 hosts in brackets), or the socket path."""
        if self.path is not None:
            return self.path
        host = f"[{self.host}]" if ":" in (self.host or "") else self.host
        return f"{host}:{self.port}"

    def url_base(self) -> str:
        """``scheme://host:port`` to prefix replication paths with (TCP only).

        Raises:
            ValueError: for a unix socket, which has no URL; connect to
                ``path`` instead.
        """
        if self.is_unix:
            raise ValueError("a unix socket location has no URL; connect to its path")
        return f"{self.scheme}://{self.netloc}"


def _writer_list(value: str | Iterable[str]) -> tuple[str, ...]:
    """Accept one name or several, as Synapse does for each writer key."""
    if isinstance(value, str):
        return (value,)
    return tuple(value)


_MAIN_ONLY: tuple[str, ...] = (MAIN_INSTANCE_NAME,)


def _writer_tuple(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(names)


@attrs.frozen
class StreamWriters:
    """The ``stream_writers`` option: writers for each key, main by default.

    Construction checks what Synapse checks about the lists themselves
    (names are strings, none empty, single-writer keys have one writer) and
    raises :class:`ConfigError` naming ``stream_writers.<key>``. That every
    writer is in ``instance_map`` is checked by :mod:`synrepl.config`.
    """

    events: tuple[str, ...] = attrs.field(default=_MAIN_ONLY, converter=_writer_list)
    typing: tuple[str, ...] = attrs.field(default=_MAIN_ONLY, converter=_writer_list)
    to_device: tuple[str, ...] = attrs.field(default=_MAIN_ONLY, converter=_writer_list)
    account_data: tuple[str, ...] = attrs.field(default=_MAIN_ONLY, converter=_writer_list)
    receipts: tuple[str, ...] = attrs.field(default=_MAIN_ONLY, converter=_writer_list)
    presence: tuple[str, ...] = attrs.field(default=_MAIN_ONLY, converter=_writer_list)
    push_rules: tuple[str, ...] = attrs.field(default=_MAIN_ONLY, converter=_writer_list)
    device_lists: tuple[str, ...] = attrs.field(default=_MAIN_ONLY, converter=_writer_list)
    thread_subscriptions: tuple[str, ...] = attrs.field(default=_MAIN_ONLY, converter=_writer_list)
    quarantined_media_changes: tuple[str, ...] = attrs.field(
        default=_MAIN_ONLY, converter=_writer_list
    )
    #: ``federation_sender_instances``: the processes that send federation
    #: (absent from the config: the main process).  The main process publishes
    #: the ``federation`` stream, to feed the others, only when it does not
    #: send federation itself.
    federation_senders: tuple[str, ...] = attrs.field(default=_MAIN_ONLY, converter=_writer_tuple)

    def __attrs_post_init__(self) -> None:
        for key in STREAM_WRITER_KEYS:
            _check_writer_list(key, self.for_key(key))

    def for_key(self, key: str) -> tuple[str, ...]:
        """The writers configured under one ``stream_writers`` key.

        Raises:
            KeyError: ``key`` is not one of :data:`STREAM_WRITER_KEYS`.
        """
        if key not in STREAMS_BY_WRITER_KEY:
            raise KeyError(key)
        writers: tuple[str, ...] = getattr(self, key)
        return writers

    def writers_for_stream(self, stream_name: str) -> tuple[str, ...]:
        """The instances that publish a replication stream.

        Returns ``("master",)`` for streams only the main process writes, and
        an empty tuple when nobody does (``federation`` while the main process
        sends federation itself) or when the set is not fixed in configuration: ``caches``
        (any instance) and stream names synrepl does not know. For those,
        learn the writers from the ``POSITION`` and ``RDATA`` commands seen.
        """
        key = WRITER_KEY_BY_STREAM.get(stream_name)
        if key is not None:
            return self.for_key(key)
        if stream_name == "federation" and MAIN_INSTANCE_NAME in self.federation_senders:
            return ()
        if stream_name in MAIN_ONLY_STREAMS:
            return _MAIN_ONLY
        return ()

    def streams_written_by(self, instance: str) -> tuple[str, ...]:
        """The streams ``instance`` publishes, as it answers REPLICATE: those
        the configuration gives it, then ``caches`` (every instance writes it)."""
        mine = [s for s in STREAM_NAMES if instance in self.writers_for_stream(s)]
        return (*mine, "caches")

    def all_writers(self) -> frozenset[str]:
        """Every instance named under any key (useful for config checks)."""
        return frozenset(name for key in STREAM_WRITER_KEYS for name in self.for_key(key))

    def event_persister_for_room(self, room_id: str) -> str:
        """The ``events`` writer that persists events for ``room_id``."""
        return event_persister_for_room(room_id, self.events)


def _check_writer_list(key: str, writers: tuple[str, ...]) -> None:
    path = ("stream_writers", key)
    for name in writers:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"writer names must be non-empty strings, got {shown(name)}", path)
    if not writers:
        raise ConfigError(
            f"needs at least one writer; remove the key to let {MAIN_INSTANCE_NAME!r} write it",
            path,
        )
    if key in SINGLE_WRITER_KEYS and len(writers) > 1:
        raise ConfigError(
            f"Synapse allows exactly one writer here, got {len(writers)}: {shown(list(writers))}",
            path,
        )


def event_persister_for_room(room_id: str, writers: Sequence[str]) -> str:
    """Pick the event persister for a room the way every Synapse process does.

    All processes must agree on the owner without talking, so the choice is a
    pure function of the room id and the ordered writer list: SHA-256 of the
    UTF-8 room id, read as a little-endian integer, modulo the writer count.

    Raises:
        ConfigError: ``writers`` is empty (a ``ValueError``).
    """
    if not writers:
        raise ConfigError("no event persisters configured", ("stream_writers", "events"))
    return writers[shard_index(room_id, len(writers))]


def shard_index(key: str, count: int) -> int:
    """Which of ``count`` shards owns ``key``: SHA-256 of the UTF-8 key, read
    as a little-endian integer, modulo ``count``.

    This is how Synapse spreads rooms over event persisters, so a room's
    shard here is its persister's index in the ``events`` writer list; the
    export partitions (:mod:`synrepl.export`) split rooms the same way.

    Raises:
        ValueError: ``count`` is below 1.
    """
    if count < 1:
        raise ValueError(f"the shard count must be at least 1, got {count}")
    if count == 1:
        return 0
    return int.from_bytes(sha256(key.encode("utf8")).digest(), "little") % count
