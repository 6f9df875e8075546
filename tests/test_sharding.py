"""Tests for synrepl.sharding: writer keys, stream ownership, locations, rooms.

The tests against Synapse compare with the installed release, through what
:mod:`synrepl.releases` says that release has (its streams and
``stream_writers`` keys).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from synrepl.errors import ConfigError
from synrepl.releases import ReleaseFacts, SynapseRelease, facts_for
from synrepl.sharding import (
    ANY_INSTANCE_STREAMS,
    MAIN_INSTANCE_NAME,
    MAIN_MAP_KEY,
    MAIN_ONLY_STREAMS,
    SINGLE_WRITER_KEYS,
    STREAM_WRITER_KEYS,
    STREAMS_BY_WRITER_KEY,
    WRITER_KEY_BY_STREAM,
    InstanceLocation,
    StreamWriters,
    canonical_instance_name,
    event_persister_for_room,
)
from synrepl.streams import STREAM_NAMES

# --- constants against Synapse ----------------------------------------------


def _installed_facts() -> ReleaseFacts:
    """What synrepl.releases says the installed Synapse has (skips without one)."""
    try:
        version = importlib.metadata.version("matrix-synapse")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Synapse is not installed")
    return facts_for(SynapseRelease.parse(version))


def test_main_names_match_synapse() -> None:
    """The main process is 'master' on the wire and 'main' in instance_map."""
    workers = pytest.importorskip("synapse.config.workers")
    assert workers.MAIN_PROCESS_INSTANCE_NAME == MAIN_INSTANCE_NAME
    assert workers.MAIN_PROCESS_INSTANCE_MAP_NAME == MAIN_MAP_KEY


def test_writer_keys_match_synapse() -> None:
    """Synapse's WriterLocations fields are exactly the installed release's
    keys (STREAM_WRITER_KEYS on the newest), in order."""
    workers = pytest.importorskip("synapse.config.workers")
    facts = _installed_facts()
    fields = tuple(a.name for a in attrs.fields(workers.WriterLocations))
    assert fields == facts.writer_keys
    assert tuple(STREAMS_BY_WRITER_KEY) == STREAM_WRITER_KEYS


def test_every_synapse_stream_has_an_owner_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each stream Synapse registers is governed by a key, main-only or any-instance."""
    deps = pytest.importorskip("synapse.util.check_dependencies")
    # Importing the streams imports synapse.app, which exits when an optional
    # dependency's version is off; that check is irrelevant to stream names.
    monkeypatch.setattr(deps, "check_requirements", lambda *args, **kwargs: None)
    streams = pytest.importorskip("synapse.replication.tcp.streams")
    facts = _installed_facts()
    ours = set(WRITER_KEY_BY_STREAM) | MAIN_ONLY_STREAMS | ANY_INSTANCE_STREAMS
    assert set(streams.STREAMS_MAP) == facts.streams
    # A rule for every stream the release has, and no rule beyond those of
    # the streams synrepl knows (only the newer ones missing from the release).
    assert ours & facts.streams == set(streams.STREAMS_MAP)
    assert ours - set(streams.STREAMS_MAP) == set(STREAM_NAMES) - facts.streams
    assert not set(WRITER_KEY_BY_STREAM) & MAIN_ONLY_STREAMS
    assert not MAIN_ONLY_STREAMS & ANY_INSTANCE_STREAMS


def test_single_writer_keys() -> None:
    """Synapse refuses to shard exactly these five keys."""
    assert SINGLE_WRITER_KEYS == {"typing", "to_device", "account_data", "presence", "push_rules"}
    assert SINGLE_WRITER_KEYS <= set(STREAM_WRITER_KEYS)


def test_canonical_instance_name() -> None:
    """'main' means 'master'; other names pass through."""
    assert canonical_instance_name("main") == "master"
    assert canonical_instance_name("master") == "master"
    assert canonical_instance_name("worker1") == "worker1"


# --- StreamWriters -----------------------------------------------------------


def test_stream_writers_default_to_main() -> None:
    """Every key defaults to ('master',)."""
    writers = StreamWriters()
    for key in STREAM_WRITER_KEYS:
        assert writers.for_key(key) == ("master",)


def test_stream_writers_accept_a_string_or_a_list() -> None:
    """A string is one writer; a list keeps its order (it decides sharding)."""
    writers = StreamWriters(events=["p2", "p1"], typing="t1")
    assert writers.events == ("p2", "p1")
    assert writers.typing == ("t1",)


def test_for_key_rejects_unknown_keys() -> None:
    """Asking for a key Synapse does not know is a KeyError."""
    with pytest.raises(KeyError):
        StreamWriters().for_key("groups")


@pytest.mark.parametrize("key", sorted(SINGLE_WRITER_KEYS))
def test_single_writer_keys_reject_two_writers(key: str) -> None:
    """Two writers for a singleton key is a ConfigError naming the key."""
    with pytest.raises(ConfigError) as info:
        StreamWriters(**{key: ["a", "b"]})
    assert info.value.path == ("stream_writers", key)


@pytest.mark.parametrize("key", STREAM_WRITER_KEYS)
def test_empty_writer_list_is_rejected(key: str) -> None:
    """Every key needs at least one writer."""
    with pytest.raises(ConfigError) as info:
        StreamWriters(**{key: []})
    assert info.value.path == ("stream_writers", key)


def test_non_string_writer_names_are_rejected() -> None:
    """Writer names must be non-empty strings."""
    bad: list[Any] = ["a", 3]
    with pytest.raises(ConfigError) as info:
        StreamWriters(receipts=bad)
    assert info.value.path == ("stream_writers", "receipts")
    with pytest.raises(ConfigError):
        StreamWriters(receipts=[""])


def test_sharded_keys_accept_many_writers() -> None:
    """Keys that Synapse shards accept several writers."""
    writers = StreamWriters(
        events=["a", "b"],
        receipts=["a", "b"],
        device_lists=["a", "b"],
        thread_subscriptions=["a", "b"],
        quarantined_media_changes=["a", "b"],
    )
    assert writers.all_writers() == {"a", "b", "master"}


@pytest.mark.parametrize(
    ("stream", "key"),
    [
        ("events", "events"),
        ("backfill", "events"),
        ("sticky_events", "events"),
        ("profile_updates", "events"),
        ("typing", "typing"),
        ("to_device", "to_device"),
        ("account_data", "account_data"),
        ("receipts", "receipts"),
        ("presence", "presence"),
        ("presence_federation", "presence"),
        ("push_rules", "push_rules"),
        ("device_lists", "device_lists"),
        ("thread_subscriptions", "thread_subscriptions"),
        ("quarantined_media", "quarantined_media_changes"),
    ],
)
def test_writers_for_stream_follows_its_key(stream: str, key: str) -> None:
    """A stream's writers are those of the key that governs it."""
    writers = StreamWriters(**{key: "only-" + key})
    assert writers.writers_for_stream(stream) == ("only-" + key,)


@pytest.mark.parametrize("stream", sorted(MAIN_ONLY_STREAMS))
def test_main_only_streams(stream: str) -> None:
    """pushers, federation (for federation senders) and un-partial-stated
    streams come from master only."""
    writers = StreamWriters(events=["a", "b"], federation_senders=["fed1"])
    assert writers.writers_for_stream(stream) == ("master",)


def test_nobody_writes_federation_while_main_sends_it() -> None:
    """By default the main process sends federation itself and publishes no
    federation stream (seen against a real Synapse)."""
    assert StreamWriters().writers_for_stream("federation") == ()
    assert StreamWriters(federation_senders=[]).writers_for_stream("federation") == ("master",)


def test_caches_and_unknown_streams_have_no_fixed_writers() -> None:
    """caches can come from any instance; unknown streams are not guessed."""
    writers = StreamWriters()
    assert writers.writers_for_stream("caches") == ()
    assert writers.writers_for_stream("some_future_stream") == ()


def test_stream_writers_are_frozen() -> None:
    """The writer map cannot be changed after loading."""
    writers = StreamWriters()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        writers.events = ("x",)  # type: ignore[misc]


# --- InstanceLocation --------------------------------------------------------


def test_tcp_location() -> None:
    """A TCP location has a scheme, a netloc and a URL base."""
    loc = InstanceLocation.tcp("10.0.0.5", 9093)
    assert not loc.is_unix
    assert loc.scheme == "http"
    assert loc.netloc == "10.0.0.5:9093"
    assert loc.url_base() == "http://10.0.0.5:9093"
    assert InstanceLocation.tcp("h", 443, tls=True).url_base() == "https://h:443"


def test_ipv6_host_is_bracketed() -> None:
    """An IPv6 literal needs brackets in a URL."""
    assert InstanceLocation.tcp("::1", 80).url_base() == "http://[::1]:80"


def test_unix_location() -> None:
    """A unix socket location has a path and no URL."""
    loc = InstanceLocation.unix("/run/synapse/main.sock")
    assert loc.is_unix
    assert loc.scheme == "unix"
    assert loc.netloc == "/run/synapse/main.sock"
    with pytest.raises(ValueError, match="unix socket"):
        loc.url_base()


@pytest.mark.parametrize("port", [0, -1, 65536, True, False, "9093", 9093.0, None])
def test_bad_ports_are_rejected(port: Any) -> None:
    """Ports are ints in 1..65535; bools and strings are not ports."""
    with pytest.raises(ConfigError) as info:
        InstanceLocation(host="h", port=port)
    assert info.value.path == ("port",)


@pytest.mark.parametrize("port", [1, 8008, 65535])
def test_good_ports(port: int) -> None:
    """The whole range is accepted."""
    assert InstanceLocation.tcp("h", port).port == port


def test_bad_host_and_tls_are_rejected() -> None:
    """host must be a non-empty string and tls a bool."""
    bad: Any = 5
    with pytest.raises(ConfigError) as info:
        InstanceLocation(host=bad, port=1)
    assert info.value.path == ("host",)
    with pytest.raises(ConfigError) as info:
        InstanceLocation(host="h", port=1, tls=bad)
    assert info.value.path == ("tls",)


def test_location_needs_exactly_one_form() -> None:
    """Neither form, or both forms, is an error."""
    with pytest.raises(ConfigError, match="host and port"):
        InstanceLocation()
    with pytest.raises(ConfigError) as info:
        InstanceLocation(host="h", port=1, path="/s")
    assert info.value.path == ("path",)
    with pytest.raises(ConfigError):
        InstanceLocation(path="")


def _shared(depth: int) -> list[Any]:
    """A list whose repr doubles with each level (every level holds the one
    below twice): 2**depth leaves, as a YAML alias bomb builds."""
    value: list[Any] = []
    for _ in range(depth):
        value = [value, value]
    return value


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda v: InstanceLocation(host="h", port=v), id="port"),
        pytest.param(lambda v: InstanceLocation(host=v, port=1), id="host"),
        pytest.param(lambda v: InstanceLocation(host="h", port=1, tls=v), id="tls"),
        pytest.param(lambda v: InstanceLocation(path=v, host="h"), id="path"),
        pytest.param(lambda v: StreamWriters(receipts=["a", v]), id="writer name"),
        pytest.param(lambda v: StreamWriters(typing=["a", *v]), id="single writer"),
    ],
)
@pytest.mark.parametrize(
    "value",
    [pytest.param(["x" * 10**6, "y" * 10**6], id="huge"), pytest.param(_shared(22), id="shared")],
)
def test_error_messages_quote_a_bounded_excerpt_of_the_value(build: Any, value: Any) -> None:
    """A huge value, or one built of shared references, is quoted as a
    short excerpt: the message stays readable and costs nothing to build."""
    with pytest.raises(ConfigError) as info:
        build(value)
    assert len(str(info.value)) < 300, str(info.value)[:300]


# --- room -> event persister -------------------------------------------------


def test_single_persister_owns_every_room() -> None:
    """With one writer there is nothing to hash."""
    assert event_persister_for_room("!a:b", ["p1"]) == "p1"


def test_no_persisters_is_an_error() -> None:
    """An empty writer list cannot own a room (a ValueError)."""
    with pytest.raises(ValueError):
        event_persister_for_room("!a:b", [])


def test_room_hash_rule_by_hand() -> None:
    """SHA-256 of the UTF-8 room id, little-endian, modulo the writer count."""
    room = "!xyz:example.com"
    writers = ["p1", "p2", "p3"]
    n = int.from_bytes(hashlib.sha256(room.encode("utf8")).digest(), "little")
    assert event_persister_for_room(room, writers) == writers[n % 3]


def test_stream_writers_room_shortcut() -> None:
    """StreamWriters.event_persister_for_room uses the events writers."""
    writers = StreamWriters(events=["p1", "p2"])
    room = "!r:hs"
    assert writers.event_persister_for_room(room) == event_persister_for_room(room, ["p1", "p2"])


def test_rooms_spread_over_all_persisters() -> None:
    """Every persister gets some of 200 rooms."""
    writers = ["p1", "p2", "p3", "p4"]
    owners = {event_persister_for_room(f"!room{i}:hs", writers) for i in range(200)}
    assert owners == set(writers)


_room_ids = st.one_of(
    st.text(),
    st.builds(lambda local, server: f"!{local}:{server}", st.text(min_size=1), st.text(min_size=1)),
)
_writer_lists = st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=6)


@given(room_id=_room_ids, writers=_writer_lists)
def test_room_owner_matches_synapse(room_id: str, writers: list[str]) -> None:
    """Differential: our owner equals Synapse's RoutableShardedWorkerHandlingConfig."""
    base = pytest.importorskip("synapse.config._base")
    synapse_shards = base.RoutableShardedWorkerHandlingConfig(list(writers))
    assert event_persister_for_room(room_id, writers) == synapse_shards.get_instance(room_id)


def test_the_streams_an_instance_writes_end_with_caches() -> None:
    writers = StreamWriters(events=["p1", "p2"], typing="t1", federation_senders=["f1"])
    assert writers.streams_written_by("p1") == (
        "events", "backfill", "profile_updates", "sticky_events", "caches",
    )  # fmt: skip
    assert writers.streams_written_by("t1") == ("typing", "caches")
    assert writers.streams_written_by("nobody") == ("caches",)
    main = writers.streams_written_by("master")
    assert "federation" in main and "typing" not in main and main[-1] == "caches"
