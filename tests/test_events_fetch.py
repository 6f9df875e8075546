"""Fetching full events: the batch state machine (EventFetch), the database
reader behind both SQL sources (on a small SQLite file laid out like
Synapse's), the admin API source (on a loopback HTTP server), and choosing a
source from homeserver.yaml."""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from synrepl.config import Secret
from synrepl.connection import ReconnectBackoff
from synrepl.errors import ConfigError
from synrepl.events import (
    AdminApiEventSource,
    Done,
    EventFetch,
    EventFetchPolicy,
    EventFetchStateError,
    EventFetchStats,
    EventSource,
    EventSourceError,
    EventSourceUnavailable,
    Fetch,
    FullEvent,
    MissingEvent,
    PostgresEventSource,
    SqliteEventSource,
    Wait,
    event_source_from_config,
    redacted_content,
    thaw,
)
from synrepl.events._database import fetch_events, read_positions
from synrepl.streams import EventRow

NO_JITTER = ReconnectBackoff(1.0, 8.0, rng=lambda: 0.0)
POLICY = EventFetchPolicy(
    missing_attempts=3, missing_delay=0.5, missing_max_delay=0.75, unavailable_backoff=NO_JITTER
)


def ev(event_id: str, room: str = "!r:hs", type: str = "m.room.message") -> FullEvent:
    return FullEvent(event_id, room, type, "@a:hs", content={"body": event_id})


def evrow(event_id: str, room: str = "!r:hs", type: str = "m.room.message") -> EventRow:
    return EventRow(event_id, room, type, None, None, None, None, False, False)


def down() -> EventSourceUnavailable:
    return EventSourceUnavailable("db: OperationalError: connection refused")


# ================================================================ EventFetch


def test_all_found_at_once() -> None:
    fetch = EventFetch([evrow("$1"), evrow("$2")], POLICY)
    assert fetch.next() == Fetch(("$1", "$2"))
    fetch.got({"$1": ev("$1"), "$2": ev("$2")})
    done = fetch.next()
    assert done == Done({"$1": ev("$1"), "$2": ev("$2")}, ())
    assert fetch.next() is done, "Done is final"


def test_found_after_retries_only_the_rest_is_asked_again() -> None:
    fetch = EventFetch(["$1", "$2", "$3"], POLICY)
    assert fetch.next() == Fetch(("$1", "$2", "$3"))
    fetch.got({"$2": ev("$2")})
    assert fetch.next() == Wait(0.5, "not found")
    assert fetch.next() == Fetch(("$1", "$3"))
    fetch.got({"$3": ev("$3")})
    assert fetch.next() == Wait(0.75, "not found"), "doubled, capped at missing_max_delay"
    assert fetch.next() == Fetch(("$1",))
    fetch.got({"$1": ev("$1")})
    done = fetch.next()
    assert isinstance(done, Done)
    assert list(done.found) == ["$1", "$2", "$3"], "in the batch's order"
    assert done.missing == ()


def test_given_up_as_missing_keeps_room_and_type_from_the_row() -> None:
    stats = EventFetchStats()
    fetch = EventFetch([evrow("$gone", "!x:hs", "m.room.topic"), evrow("$ok")], POLICY, stats)
    fetch.next()
    fetch.got({"$ok": ev("$ok")})
    for _ in range(POLICY.missing_attempts - 1):
        assert isinstance(fetch.next(), Wait)
        assert fetch.next() == Fetch(("$gone",))
        fetch.got({})
    done = fetch.next()
    assert done == Done(
        {"$ok": ev("$ok")},
        (MissingEvent("$gone", "!x:hs", "m.room.topic", "not found in 3 attempts"),),
    )
    assert (stats.missing, stats.found, stats.fetches, stats.not_found_retries) == (1, 1, 3, 2)
    assert stats.batches == stats.batches_done == 1


def test_bare_ids_are_missing_without_room_or_type() -> None:
    fetch = EventFetch(["$gone"], EventFetchPolicy(missing_attempts=1))
    fetch.next()
    fetch.got({})
    done = fetch.next()
    assert isinstance(done, Done)
    assert done.missing == (MissingEvent("$gone", None, None, "not found in 1 attempt"),)


def test_source_down_then_up_is_retried_with_backoff_for_ever() -> None:
    stats = EventFetchStats()
    fetch = EventFetch(["$1"], POLICY, stats)
    waits = []
    for _ in range(10):  # far more failures than missing_attempts
        assert fetch.next() == Fetch(("$1",))
        fetch.failed(down())
        step = fetch.next()
        assert isinstance(step, Wait) and step.reason == "unavailable"
        waits.append(step.seconds)
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0]
    assert fetch.failures == 10 and "connection refused" in (fetch.last_failure or "")
    assert fetch.next() == Fetch(("$1",))
    fetch.got({"$1": ev("$1")})
    assert fetch.next() == Done({"$1": ev("$1")}, ())
    assert fetch.failures == 0
    assert stats.source_failures == 10 and stats.missing == 0


def test_failures_do_not_use_up_not_found_attempts() -> None:
    fetch = EventFetch(["$1"], POLICY)
    fetch.next()
    fetch.got({})  # attempt 1: not found
    assert fetch.next().reason == "not found"  # type: ignore[union-attr]
    fetch.next()
    fetch.failed(down())
    assert fetch.next() == Wait(1.0, "unavailable"), "backoff starts afresh"
    fetch.next()
    fetch.got({})  # attempt 2
    assert isinstance(fetch.next(), Wait)
    fetch.next()
    fetch.got({"$1": ev("$1")})  # attempt 3 finds it
    assert fetch.next() == Done({"$1": ev("$1")}, ())
    assert fetch.attempts == 3


def test_backoff_jitter_comes_from_the_policy() -> None:
    policy = EventFetchPolicy(unavailable_backoff=ReconnectBackoff(1.0, 60.0, rng=lambda: 0.5))
    fetch = EventFetch(["$1"], policy)
    fetch.next()
    fetch.failed(down())
    assert fetch.next() == Wait(0.75, "unavailable")


def test_repeats_are_fetched_once_and_extra_answers_ignored() -> None:
    fetch = EventFetch(["$1", evrow("$1"), "$2", "$1"], POLICY)
    assert fetch.next() == Fetch(("$1", "$2"))
    fetch.got({"$1": ev("$1"), "$2": ev("$2"), "$other": ev("$other")})
    assert fetch.next() == Done({"$1": ev("$1"), "$2": ev("$2")}, ())


def test_empty_batch_is_done_at_once() -> None:
    assert EventFetch([], POLICY).next() == Done({}, ())


def test_calls_out_of_turn_are_refused() -> None:
    fetch = EventFetch(["$1"], POLICY)
    with pytest.raises(EventFetchStateError):
        fetch.got({})
    fetch.next()
    with pytest.raises(EventFetchStateError, match="outstanding"):
        fetch.next()
    fetch.got({"$1": ev("$1")})
    with pytest.raises(EventFetchStateError):
        fetch.failed(down())


def test_items_must_be_rows_or_ids() -> None:
    with pytest.raises(TypeError, match="EventRow or str"):
        EventFetch([3], POLICY)  # type: ignore[list-item]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"missing_attempts": 0},
        {"missing_attempts": True},
        {"missing_delay": 0},
        {"missing_delay": float("nan")},
        {"missing_delay": 2.0, "missing_max_delay": 1.0},
    ],
)
def test_policy_refuses_values_out_of_range(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        EventFetchPolicy(**kwargs)


def test_default_policy_gives_up_within_seconds() -> None:
    policy = EventFetchPolicy()
    waited = sum(policy.delay_after_not_found(n) for n in range(1, policy.missing_attempts))
    assert 1 < waited < 10


# A source that is down for a while, or has some events only later.
_behaviour = st.lists(
    st.one_of(st.just("down"), st.frozensets(st.sampled_from(["$1", "$2", "$3", "$4"]))),
    max_size=30,
)


@given(st.lists(st.sampled_from(["$1", "$2", "$3", "$4"]), max_size=6), _behaviour)
def test_every_event_ends_found_or_missing_once(ids: list[str], answers: list[Any]) -> None:
    """Whatever the source does, the batch ends with each event exactly
    once, found or missing; missing only after missing_attempts answers."""
    fetch = EventFetch(ids, POLICY)
    answers = list(answers)
    answered = 0
    for _ in range(200):
        step = fetch.next()
        if isinstance(step, Done):
            break
        if isinstance(step, Wait):
            assert step.seconds > 0
            continue
        assert set(step.event_ids) <= set(ids) and step.event_ids
        behaviour = answers.pop(0) if answers else frozenset()
        if behaviour == "down":
            fetch.failed(down())
        else:
            answered += 1
            fetch.got({i: ev(i) for i in step.event_ids if i in behaviour})
    else:
        raise AssertionError("never done")
    assert isinstance(step, Done)
    ended = list(step.found) + [m.event_id for m in step.missing]
    assert sorted(ended) == sorted(set(ids))
    if step.missing:
        assert answered == POLICY.missing_attempts


# ================================================================ the database reader

# Only the tables and columns synrepl reads, as Synapse 1.163.2 names them.
SCHEMA = """
CREATE TABLE events (stream_ordering INTEGER PRIMARY KEY, event_id TEXT, room_id TEXT,
                     type TEXT, outlier BOOL, sender TEXT, instance_name TEXT);
CREATE TABLE event_json (event_id TEXT, room_id TEXT, internal_metadata TEXT, json TEXT,
                         format_version INTEGER);
CREATE TABLE rooms (room_id TEXT PRIMARY KEY, room_version TEXT);
CREATE TABLE rejections (event_id TEXT, reason TEXT, last_check TEXT);
CREATE TABLE redactions (event_id TEXT, redacts TEXT, have_censored BOOL DEFAULT 0,
                         received_ts BIGINT, recheck BOOL DEFAULT 1);
CREATE TABLE room_ban_redactions (room_id TEXT, user_id TEXT, redacting_event_id TEXT,
                                  redact_end_ordering BIGINT);
CREATE TABLE stream_positions (stream_name TEXT, instance_name TEXT, stream_id BIGINT);
CREATE TABLE current_state_delta_stream (stream_id BIGINT, room_id TEXT, type TEXT,
                                         state_key TEXT, event_id TEXT, instance_name TEXT);
CREATE TABLE ex_outlier_stream (event_stream_ordering BIGINT, event_id TEXT,
                                state_group BIGINT, instance_name TEXT);
"""


class FakeHomeserverDb:
    """A SQLite file in WAL mode laid out like Synapse's, written as Synapse would."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.executescript(SCHEMA)
        self.ordering = 0

    def room(self, room_id: str, version: str = "10") -> None:
        self.conn.execute("INSERT INTO rooms VALUES (?, ?)", (room_id, version))

    def event(
        self,
        event_id: str,
        room_id: str = "!r:hs",
        type: str = "m.room.message",
        sender: str = "@alice:hs",
        content: dict[str, Any] | None = None,
        *,
        state_key: str | None = None,
        redacts: str | None = None,
        outlier: bool = False,
        rejected: str | None = None,
        metadata: dict[str, Any] | None = None,
        writer: str = "master",
        ordering: int | None = None,
    ) -> int:
        self.ordering = ordering if ordering is not None else self.ordering + 1
        pdu: dict[str, Any] = {
            "type": type,
            "room_id": room_id,
            "sender": sender,
            "content": content if content is not None else {"body": f"body of {event_id}"},
            "origin_server_ts": 1_700_000_000_000 + self.ordering,
            "unsigned": {"age_ts": 1_700_000_000_000},
            "depth": self.ordering,
        }
        if state_key is not None:
            pdu["state_key"] = state_key
        if redacts is not None:
            pdu["redacts"] = redacts
        self.conn.execute(
            "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?)",
            (self.ordering, event_id, room_id, type, int(outlier), sender, writer),
        )
        self.conn.execute(
            "INSERT INTO event_json VALUES (?, ?, ?, ?, 3)",
            (event_id, room_id, json.dumps(metadata or {}), json.dumps(pdu)),
        )
        if rejected is not None:
            self.conn.execute("INSERT INTO rejections VALUES (?, ?, 'x')", (event_id, rejected))
        if redacts is not None:
            recheck = bool((metadata or {}).get("recheck_redaction"))
            self.conn.execute(
                "INSERT INTO redactions (event_id, redacts, recheck) VALUES (?, ?, ?)",
                (event_id, redacts, int(recheck)),
            )
        return self.ordering

    def position(self, writer: str, token: int) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO stream_positions VALUES ('events', ?, ?)", (writer, token)
        )


@pytest.fixture
def db(tmp_path: Path) -> Iterator[FakeHomeserverDb]:
    database = FakeHomeserverDb(tmp_path / "homeserver.db")
    database.room("!r:hs")
    yield database
    database.conn.close()


@pytest.fixture
def source(db: FakeHomeserverDb) -> Iterator[SqliteEventSource]:
    with SqliteEventSource(db.path) as s:
        yield s


def test_fetches_a_batch_with_everything_a_full_event_holds(
    db: FakeHomeserverDb, source: SqliteEventSource
) -> None:
    db.event("$m", content={"body": "hi", "msgtype": "m.text"})
    db.event("$s", type="m.room.topic", state_key="", content={"topic": "t"})
    db.event("$o", outlier=True)
    got = source.fetch(["$m", "$s", "$o", "$unknown"])
    assert set(got) == {"$m", "$s", "$o"}, "unknown events are absent"
    m = got["$m"]
    assert (m.event_id, m.room_id, m.type, m.sender) == (
        "$m",
        "!r:hs",
        "m.room.message",
        "@alice:hs",
    )
    assert thaw(m.content) == {"body": "hi", "msgtype": "m.text"}
    assert m.origin_server_ts == 1_700_000_000_001
    assert thaw(m.unsigned) == {"age_ts": 1_700_000_000_000}
    assert (m.state_key, m.room_version, m.rejected, m.outlier, m.redacted) == (
        None,
        "10",
        False,
        False,
        False,
    )
    assert got["$s"].state_key == "" and got["$s"].is_state
    assert got["$o"].outlier is True


def test_content_is_read_only(db: FakeHomeserverDb, source: SqliteEventSource) -> None:
    db.event("$m", content={"body": "hi", "m.mentions": {"user_ids": ["@b:hs"]}})
    content = source.fetch(["$m"])["$m"].content
    with pytest.raises(TypeError):
        content["body"] = "changed"  # type: ignore[index]
    with pytest.raises(TypeError):
        content["m.mentions"]["room"] = True
    assert json.loads(json.dumps(content)) == thaw(content)


def test_rejected_events_are_returned_marked(
    db: FakeHomeserverDb, source: SqliteEventSource
) -> None:
    db.event("$bad", rejected="auth_error")
    bad = source.fetch(["$bad"])["$bad"]
    assert bad.rejected is True and bad.rejection_reason == "auth_error"


def test_validated_redaction_prunes_content(
    db: FakeHomeserverDb, source: SqliteEventSource
) -> None:
    db.event("$m")
    db.event("$red", type="m.room.redaction", redacts="$m", content={"reason": "spam"})
    got = source.fetch(["$m", "$red"])
    assert got["$m"].redacted is True and got["$m"].redacted_by == "$red"
    assert thaw(got["$m"].content) == {}
    assert got["$red"].redacts == "$m" and got["$red"].redacted is False


def test_member_event_keeps_membership_when_redacted(
    db: FakeHomeserverDb, source: SqliteEventSource
) -> None:
    db.event(
        "$j",
        type="m.room.member",
        state_key="@alice:hs",
        content={"membership": "join", "displayname": "Alice"},
    )
    db.event("$red", type="m.room.redaction", redacts="$j")
    joined = source.fetch(["$j"])["$j"]
    assert thaw(joined.content) == {"membership": "join"}
    assert joined.membership == "join"


def test_create_event_is_never_redacted(db: FakeHomeserverDb, source: SqliteEventSource) -> None:
    db.event("$c", type="m.room.create", state_key="", content={"creator": "@a:hs", "x": 1})
    db.event("$red", type="m.room.redaction", redacts="$c")
    c = source.fetch(["$c"])["$c"]
    assert c.redacted is False and thaw(c.content) == {"creator": "@a:hs", "x": 1}


def test_redaction_from_another_server_needs_the_recheck_to_pass(
    db: FakeHomeserverDb, source: SqliteEventSource
) -> None:
    db.event("$m", sender="@alice:hs")
    db.event(
        "$evil",
        type="m.room.redaction",
        sender="@mallory:elsewhere",
        redacts="$m",
        metadata={"recheck_redaction": True},
    )
    db.event("$n", sender="@bob:elsewhere")
    db.event(
        "$fine",
        type="m.room.redaction",
        sender="@mallory:elsewhere",
        redacts="$n",
        metadata={"recheck_redaction": True},
    )
    got = source.fetch(["$m", "$n"])
    assert got["$m"].redacted is False, "different servers: the redaction does not apply"
    assert got["$n"].redacted is True, "same server: it does"


def test_unvalidated_redaction_needs_a_known_accepted_event_in_the_room(
    db: FakeHomeserverDb, source: SqliteEventSource
) -> None:
    db.room("!other:hs")
    db.event("$a")
    db.event("$b")
    db.event("$c")
    db.event("$rej", type="m.room.redaction", redacts="$a", rejected="auth")
    db.event("$far", type="m.room.redaction", redacts="$b", room_id="!other:hs")
    # A redaction row whose event this server never got.
    db.conn.execute("INSERT INTO redactions (event_id, redacts, recheck) VALUES ('$x', '$c', 1)")
    db.conn.execute("UPDATE redactions SET recheck = 1")
    got = source.fetch(["$a", "$b", "$c"])
    assert [got[e].redacted for e in ("$a", "$b", "$c")] == [False, False, False]
    # Once Synapse has validated one (recheck false), it applies as it is.
    db.conn.execute("UPDATE redactions SET recheck = 0 WHERE event_id = '$x'")
    assert source.fetch(["$c"])["$c"].redacted_by == "$x"


def test_censored_event_reads_as_redacted(db: FakeHomeserverDb, source: SqliteEventSource) -> None:
    db.event("$m", content={"body": "secret"})
    db.event("$red", type="m.room.redaction", redacts="$m")
    db.conn.execute(
        "UPDATE event_json SET json = json_set(json, '$.content', json('{}')) WHERE event_id = '$m'"
    )
    db.conn.execute("UPDATE redactions SET have_censored = 1")
    m = source.fetch(["$m"])["$m"]
    assert m.redacted is True and thaw(m.content) == {}


def test_ban_redactions_cover_events_before_their_end(
    db: FakeHomeserverDb, source: SqliteEventSource
) -> None:
    db.event("$before", sender="@spam:hs")
    db.event("$ban", type="m.room.member", state_key="@spam:hs", content={"membership": "ban"})
    end = db.event("$rejoin", type="m.room.member", sender="@spam:hs", state_key="@spam:hs")
    db.event("$after", sender="@spam:hs")
    db.event("$other", sender="@alice:hs")
    db.conn.execute(
        "INSERT INTO room_ban_redactions VALUES ('!r:hs', '@spam:hs', '$ban', ?)", (end,)
    )
    got = source.fetch(["$before", "$after", "$other"])
    assert got["$before"].redacted is True and got["$before"].redacted_by == "$ban"
    assert got["$after"].redacted is False
    assert got["$other"].redacted is False


def test_room_version_11_redaction_of_a_redaction_keeps_redacts(
    db: FakeHomeserverDb, source: SqliteEventSource
) -> None:
    db.room("!v11:hs", "11")
    db.event("$m", room_id="!v11:hs")
    db.event(
        "$red1",
        room_id="!v11:hs",
        type="m.room.redaction",
        content={"redacts": "$m", "reason": "x"},
    )
    db.event("$red2", room_id="!v11:hs", type="m.room.redaction", redacts="$red1")
    red1 = source.fetch(["$red1"])["$red1"]
    assert red1.redacts == "$m", "from the content in room version 11"
    assert red1.redacted is True and thaw(red1.content) == {"redacts": "$m"}


def test_a_batch_is_a_few_queries_not_one_per_event(db: FakeHomeserverDb) -> None:
    for n in range(250):
        db.event(f"$e{n}")
    statements: list[str] = []
    conn = sqlite3.connect(db.path)

    def run(sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        statements.append(sql)
        return conn.execute(sql, args).fetchall()

    got = fetch_events(run, [f"$e{n}" for n in range(250)], chunk=400)
    assert len(got) == 250
    assert len(statements) == 3  # events, redactions, ban redactions
    statements.clear()
    fetch_events(run, [f"$e{n}" for n in range(250)], chunk=100)
    assert len(statements) == 3 + 3 + 1
    conn.close()


def test_source_is_read_only_and_does_not_block_the_writer(
    db: FakeHomeserverDb, source: SqliteEventSource
) -> None:
    db.event("$1")
    assert "$1" in source.fetch(["$1"])
    conn = source._conn
    assert conn is not None
    with pytest.raises(sqlite3.OperationalError, match=r"readonly|read-only|query_only"):
        conn.execute("INSERT INTO rooms VALUES ('!x:hs', '1')")
    # The homeserver writes while the source is open, and the source sees it.
    db.event("$2")
    assert "$2" in source.fetch(["$2"])


def test_missing_file_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(EventSourceUnavailable, match="unable to open"):
        SqliteEventSource(tmp_path / "nope.db").fetch(["$1"])


def test_not_a_synapse_database_is_an_error_not_an_outage(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    sqlite3.connect(path).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(EventSourceError, match="no such table") as caught:
        SqliteEventSource(path).fetch(["$1"])
    assert not isinstance(caught.value, EventSourceUnavailable)


def test_closed_source_refuses_calls(source: SqliteEventSource) -> None:
    source.close()
    with pytest.raises(EventSourceError, match="closed"):
        source.fetch(["$1"])


def test_sources_follow_the_protocol(source: SqliteEventSource) -> None:
    assert isinstance(source, EventSource)
    assert isinstance(PostgresEventSource("host=127.0.0.1"), EventSource)
    assert isinstance(AdminApiEventSource("http://127.0.0.1:1", "t"), EventSource)


@pytest.mark.parametrize("path", ["", ":memory:"])
def test_sqlite_needs_a_file(path: str) -> None:
    with pytest.raises(ValueError):
        SqliteEventSource(path)


# ---------------------------------------------------------------- positions


def test_positions_of_a_single_writer(db: FakeHomeserverDb, source: SqliteEventSource) -> None:
    for n in range(5):
        db.event(f"$e{n}")
    db.position("master", 3)  # recorded after a write; the walk finds 4 and 5
    assert source.positions() == {"events": {"master": 5}}


def test_positions_stop_at_a_hole(db: FakeHomeserverDb, source: SqliteEventSource) -> None:
    for n in (1, 2, 3, 5, 6):
        db.event(f"$e{n}", ordering=n)
    db.position("master", 1)
    assert source.positions() == {"events": {"master": 3}}, "4 may still be in flight"


def test_positions_count_state_deltas_and_ex_outliers(
    db: FakeHomeserverDb, source: SqliteEventSource
) -> None:
    db.event("$e1", ordering=1)
    db.position("master", 1)
    db.conn.execute("INSERT INTO current_state_delta_stream (stream_id) VALUES (2)")
    db.conn.execute("INSERT INTO ex_outlier_stream (event_stream_ordering) VALUES (3)")
    assert source.positions() == {"events": {"master": 3}}


def test_idle_writer_is_where_everyone_is(db: FakeHomeserverDb) -> None:
    for n in range(1, 11):
        db.event(f"$e{n}", writer="p1" if n <= 4 else "p2", ordering=n)
    db.position("p1", 4)
    db.position("p2", 10)
    db.position("gone", 2)  # a writer removed from the configuration
    with SqliteEventSource(db.path, writers=["p1", "p2", "new"]) as s:
        assert s.positions() == {"events": {"p1": 10, "p2": 10, "new": 10}}
    with SqliteEventSource(db.path) as s:
        assert s.positions() == {"events": {"p1": 10, "p2": 10, "gone": 10}}


def test_a_writer_ahead_keeps_its_own_position(db: FakeHomeserverDb) -> None:
    for n in (1, 2, 4):
        db.event(f"$e{n}", ordering=n)
    db.position("p1", 1)
    db.position("p2", 4)
    with SqliteEventSource(db.path, writers=["p1", "p2"]) as s:
        assert s.positions() == {"events": {"p1": 2, "p2": 4}}


def test_positions_with_nothing_recorded_take_the_largest_id(
    db: FakeHomeserverDb, source: SqliteEventSource
) -> None:
    assert source.positions() == {"events": {"master": 1}}
    db.event("$e7", ordering=7)
    assert source.positions() == {"events": {"master": 7}}


def test_position_scan_is_bounded(db: FakeHomeserverDb) -> None:
    for n in range(1, 21):
        db.event(f"$e{n}", ordering=n)
    db.position("master", 1)
    conn = sqlite3.connect(db.path)

    def run(sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        return conn.execute(sql, args).fetchall()

    assert read_positions(run, None, scan_limit=5) == {"events": {"master": 6}}
    conn.close()


# ================================================================ redaction rules


@pytest.mark.parametrize(
    ("version", "type", "content", "kept"),
    [
        ("1", "m.room.aliases", {"aliases": ["#a:hs"]}, {"aliases": ["#a:hs"]}),
        ("6", "m.room.aliases", {"aliases": ["#a:hs"]}, {}),
        ("7", "m.room.join_rules", {"join_rule": "restricted", "allow": [1]}, {"join_rule": "restricted"}),
        ("8", "m.room.join_rules", {"join_rule": "restricted", "allow": [1]}, {"join_rule": "restricted", "allow": [1]}),
        ("8", "m.room.member", {"membership": "join", "join_authorised_via_users_server": "@a:hs"}, {"membership": "join"}),
        ("9", "m.room.member", {"membership": "join", "join_authorised_via_users_server": "@a:hs", "displayname": "A"}, {"membership": "join", "join_authorised_via_users_server": "@a:hs"}),
        ("10", "m.room.create", {"creator": "@a:hs", "room_version": "10"}, {"creator": "@a:hs"}),
        ("11", "m.room.create", {"creator": "@a:hs", "room_version": "11"}, {"creator": "@a:hs", "room_version": "11"}),
        ("10", "m.room.power_levels", {"ban": 50, "invite": 0, "notifications": {}}, {"ban": 50}),
        ("11", "m.room.power_levels", {"ban": 50, "invite": 0, "notifications": {}}, {"ban": 50, "invite": 0}),
        ("11", "m.room.member", {"membership": "invite", "third_party_invite": {"signed": {"s": 1}, "display_name": "x"}}, {"membership": "invite", "third_party_invite": {"signed": {"s": 1}}}),
        ("10", "m.room.redaction", {"redacts": "$x", "reason": "r"}, {}),
        ("12", "m.room.redaction", {"redacts": "$x", "reason": "r"}, {"redacts": "$x"}),
        ("org.matrix.msc3757.10", "m.room.create", {"creator": "@a", "x": 1}, {"creator": "@a"}),
        ("some.future.version", "m.room.create", {"creator": "@a", "x": 1}, {"creator": "@a", "x": 1}),
        (None, "m.room.history_visibility", {"history_visibility": "shared", "x": 1}, {"history_visibility": "shared"}),
        ("10", "m.room.message", {"body": "secret"}, {}),
    ],
)  # fmt: skip
def test_redaction_rules_per_room_version(
    version: str | None, type: str, content: dict[str, Any], kept: dict[str, Any]
) -> None:
    assert redacted_content(type, content, version) == kept


# ================================================================ the admin API source


class _AdminHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _AdminServer

    def do_GET(self) -> None:
        self.server.requests.append((self.path, self.headers.get("Authorization")))
        status, body = self.server.answer(self.path)
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _AdminServer(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _AdminHandler)
        self.requests: list[tuple[str, str | None]] = []
        self.events: dict[str, dict[str, Any]] = {}
        self.rooms: dict[str, str] = {"!r:hs": "10"}
        self.fail: tuple[int, dict[str, Any]] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def answer(self, path: str) -> tuple[int, Any]:
        if self.fail is not None:
            return self.fail
        if path.startswith("/_synapse/admin/v1/fetch_event/"):
            event = self.events.get(unquote(path.rsplit("/", 1)[1]))
            if event is None:
                return 404, {"errcode": "M_NOT_FOUND", "error": "Event not found"}
            return 200, {"event": event}
        if path.startswith("/_synapse/admin/v1/rooms/"):
            room = unquote(path.rsplit("/", 1)[1])
            if room in self.rooms:
                return 200, {"room_id": room, "version": self.rooms[room]}
            return 404, {"errcode": "M_NOT_FOUND", "error": "Room not found"}
        return 404, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}


@pytest.fixture
def admin() -> Iterator[_AdminServer]:
    server = _AdminServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _pdu(event_id: str, body: str) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "room_id": "!r:hs",
        "type": "m.room.message",
        "sender": "@a:hs",
        "content": {"body": body},
        "origin_server_ts": 5,
        "unsigned": {"age": 1},
    }


def test_admin_source_fetches_one_by_one_and_remembers_room_versions(
    admin: _AdminServer,
) -> None:
    admin.events = {"$1": _pdu("$1", "one"), "$2/x": _pdu("$2/x", "two")}
    with AdminApiEventSource(admin.url, Secret("tok")) as source:
        got = source.fetch(["$1", "$2/x", "$unknown", "$1"])
        assert {k: v.content["body"] for k, v in got.items()} == {"$1": "one", "$2/x": "two"}
        assert got["$1"].room_version == "10" and got["$1"].unsigned == {"age": 1}
        assert source.positions() == {}
    paths = [p for p, _ in admin.requests]
    assert paths == [
        "/_synapse/admin/v1/fetch_event/%241",
        "/_synapse/admin/v1/rooms/%21r%3Ahs",
        "/_synapse/admin/v1/fetch_event/%242%2Fx",
        "/_synapse/admin/v1/fetch_event/%24unknown",
    ], "one request per event, the room asked once, repeats once"
    assert {auth for _, auth in admin.requests} == {"Bearer tok"}


def test_admin_source_keeps_a_path_prefix(admin: _AdminServer) -> None:
    admin.events = {"$1": _pdu("$1", "one")}
    with AdminApiEventSource(admin.url + "/", "tok") as source:
        source.fetch(["$1"])
    assert admin.requests[0][0].startswith("/_synapse/")


@pytest.mark.parametrize(
    ("status", "body", "words"),
    [
        (401, {"errcode": "M_UNKNOWN_TOKEN"}, "not a server admin"),
        (403, {"errcode": "M_FORBIDDEN"}, "not a server admin"),
        (404, {"errcode": "M_UNRECOGNIZED"}, "is the admin API served"),
        (502, None, "HTTP 502"),
        (429, {"errcode": "M_LIMIT_EXCEEDED"}, "429"),
    ],
)
def test_admin_refusals_and_outages_are_unavailable(
    admin: _AdminServer, status: int, body: Any, words: str
) -> None:
    admin.fail = (status, body)
    source = AdminApiEventSource(admin.url, "secret-token-value")
    with pytest.raises(EventSourceUnavailable, match=words) as caught:
        source.fetch(["$1"])
    assert "secret-token-value" not in str(caught.value)
    # and it recovers once the server does
    admin.fail = None
    admin.events = {"$1": _pdu("$1", "one")}
    assert set(source.fetch(["$1"])) == {"$1"}


def test_admin_odd_answers_are_errors(admin: _AdminServer) -> None:
    admin.fail = (400, {"errcode": "M_INVALID_PARAM"})
    with pytest.raises(EventSourceError) as caught:
        AdminApiEventSource(admin.url, "t").fetch(["$1"])
    assert not isinstance(caught.value, EventSourceUnavailable)


def test_admin_down_is_unavailable() -> None:
    server = _AdminServer()
    url = server.url
    server.server_close()  # nobody listens there now
    with pytest.raises(EventSourceUnavailable):
        AdminApiEventSource(url, "t", timeout=2).fetch(["$1"])


@pytest.mark.parametrize(
    ("url", "token"),
    [
        ("ftp://x", "t"),
        ("http://", "t"),
        ("http://u:p@h", "t"),
        ("http://h?x=1", "t"),
        ("http://h", ""),
    ],
)
def test_admin_source_checks_its_arguments(url: str, token: str) -> None:
    with pytest.raises(ValueError):
        AdminApiEventSource(url, token)


# ================================================================ choosing a source


def test_config_sqlite() -> None:
    raw = {"database": {"name": "sqlite3", "args": {"database": "/data/homeserver.db"}}}
    source = event_source_from_config(raw)
    assert isinstance(source, SqliteEventSource)
    assert str(source.path) == "/data/homeserver.db" and source.writers == ("master",)
    assert isinstance(event_source_from_config({"database_path": "/d/h.db"}), SqliteEventSource)


def test_config_postgres_args_become_libpq_parameters() -> None:
    raw = {
        "database": {
            "name": "psycopg2",
            "args": {
                "user": "synapse",
                "password": "pw-in-config",
                "database": "synapse",
                "host": "db",
                "port": 5433,
                "cp_min": 5,
                "cp_max": 10,
                "sslmode": "require",
            },
        },
        "stream_writers": {"events": ["p1", "p2"]},
    }
    source = event_source_from_config(raw)
    assert isinstance(source, PostgresEventSource)
    assert source.writers == ("p1", "p2")
    assert "pw-in-config" not in repr(source)
    assert repr(source) == "PostgresEventSource('synapse@db:5433/synapse')"
    conninfo = source._conninfo
    assert "dbname=synapse" in conninfo and "sslmode=require" in conninfo
    assert not re.search(r"(^| )cp_", conninfo)  # Synapse's pool settings dropped


def test_config_databases_picks_the_main_store() -> None:
    raw = {
        "databases": {
            "state": {"name": "psycopg2", "data_stores": ["state"], "args": {"dbname": "st"}},
            "main": {"name": "psycopg2", "data_stores": ["main"], "args": {"dbname": "mn"}},
        }
    }
    source = event_source_from_config(raw)
    assert isinstance(source, PostgresEventSource) and "/mn" in repr(source)


def test_config_override_replaces_the_connection() -> None:
    raw = {"database": {"name": "psycopg2", "args": {"user": "synapse", "dbname": "s"}}}
    source = event_source_from_config(raw, database="host=replica user=observer dbname=s")
    assert repr(source) == "PostgresEventSource('observer@replica:/s')"
    sqlite = {"database": {"name": "sqlite3", "args": {"database": "/a.db"}}}
    assert str(event_source_from_config(sqlite, database="/b.db").path) == "/b.db"  # type: ignore[attr-defined]
    assert isinstance(event_source_from_config({}, database="/c.db"), SqliteEventSource)
    assert isinstance(
        event_source_from_config({}, database="postgresql://o@h/s"), PostgresEventSource
    )


def test_config_admin_api() -> None:
    source = event_source_from_config(
        {"database": {"name": "sqlite3", "args": {"database": "/a.db"}}},
        admin_url="http://127.0.0.1:8008",
        admin_token="tok",
    )
    assert isinstance(source, AdminApiEventSource)


@pytest.mark.parametrize(
    ("raw", "kwargs", "words"),
    [
        ({}, {}, "no database section"),
        ({"database": {"name": "mysql"}}, {}, "unsupported database engine"),
        ({"database": {"name": "sqlite3", "args": {}}}, {}, "needs args.database"),
        ({"database": {"name": "sqlite3", "args": {"database": ":memory:"}}}, {}, "database file"),
        ({"database": {"name": "psycopg2", "args": {"port": [1]}}}, {}, "string or a number"),
        ({"databases": {"s": {"data_stores": ["state"]}}}, {}, "main"),
        ({}, {"admin_url": "http://h"}, "go together"),
        ({}, {"admin_url": "http://h", "admin_token": "t", "database": "/a"}, "not both"),
        ({}, {"admin_url": "ftp://h", "admin_token": "t"}, "http"),
        ({"database": {"name": "psycopg2"}, "stream_writers": {"events": []}}, {}, "non-empty"),
    ],
)
def test_config_mistakes_are_config_errors(
    raw: dict[str, Any], kwargs: dict[str, Any], words: str
) -> None:
    with pytest.raises(ConfigError, match=words):
        event_source_from_config(raw, **kwargs)


def test_bad_conninfo_is_refused_at_once_without_the_password() -> None:
    with pytest.raises(ValueError, match="bad PostgreSQL connection string") as caught:
        PostgresEventSource("host=h password=sekrit nonsense")
    assert "sekrit" not in str(caught.value)
    # libpq quotes the piece after a space: half a password must not leak either
    with pytest.raises(ValueError) as caught:
        PostgresEventSource("host=h password=abc def")
    assert "def" not in str(caught.value) and "abc" not in str(caught.value)


def test_a_database_of_an_older_release_is_read_as_that_release_reads_it(tmp_path: Path) -> None:
    """Before ``redactions.recheck`` (schema 94) and ``room_ban_redactions``
    (schema 92) existed, Synapse checked every redaction as it read the
    event: a redaction from the same room applies, one from another room or a
    rejected one does not, and no ban table is asked for."""
    db = FakeHomeserverDb(tmp_path / "old.db")
    db.conn.execute("ALTER TABLE redactions DROP COLUMN recheck")
    db.conn.execute("DROP TABLE room_ban_redactions")
    db.room("!r:hs")
    db.room("!other:hs")
    for event_id in ("$a", "$b", "$c"):
        db.event(event_id)
    for event_id, redacts, extra in (
        ("$red", "$a", {}),
        ("$far", "$b", {"room_id": "!other:hs"}),
        ("$rej", "$c", {"rejected": "auth"}),
    ):
        db.ordering += 1
        pdu = {"type": "m.room.redaction", "sender": "@alice:hs", "redacts": redacts, "content": {}}
        room = extra.get("room_id", "!r:hs")
        db.conn.execute(
            "INSERT INTO events VALUES (?, ?, ?, 'm.room.redaction', 0, '@alice:hs', 'master')",
            (db.ordering, event_id, room),
        )
        db.conn.execute(
            "INSERT INTO event_json VALUES (?, ?, '{}', ?, 3)", (event_id, room, json.dumps(pdu))
        )
        db.conn.execute(
            "INSERT INTO redactions (event_id, redacts) VALUES (?, ?)", (event_id, redacts)
        )
        if "rejected" in extra:
            db.conn.execute("INSERT INTO rejections VALUES (?, 'auth', 'x')", (event_id,))
    with SqliteEventSource(db.path) as old:
        got = old.fetch(["$a", "$b", "$c"])
    assert (got["$a"].redacted, got["$a"].redacted_by) == (True, "$red")
    assert got["$b"].redacted is False, "a redaction from another room does not apply"
    assert got["$c"].redacted is False, "a rejected redaction does not apply"
    db.conn.close()


def test_a_redaction_names_what_it_redacts_in_its_content_too() -> None:
    """As the client API shows it: a redaction stored (by older releases, in
    rooms before version 11) with ``redacts`` only at the top level."""
    from synrepl.events._database import event_from_pdu

    pdu = {"type": "m.room.redaction", "redacts": "$m", "content": {"reason": "spam"}}
    event = event_from_pdu(pdu, event_id="$red", room_id="!r:hs", room_version="10")
    assert event.redacts == "$m"
    assert thaw(event.content) == {"reason": "spam", "redacts": "$m"}
