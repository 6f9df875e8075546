"""Example-based tests of the stream position state machine, one rule at a time."""

from __future__ import annotations

import collections

import pytest
from corpus_files import CORPUS_FILES, corpus_entries

from synrepl.commands import (
    PingCommand,
    PositionCommand,
    RdataCommand,
    ReplicateCommand,
    parse_line,
)
from synrepl.positions import (
    RESETTABLE_STREAMS,
    Event,
    FetchNeeded,
    GapUnfillable,
    PositionAdvanced,
    RowsReceived,
    StateError,
    StreamPositions,
    StreamReset,
    UnnamedWriter,
    WriterBehind,
)
from synrepl.streams import AnyRow, parse_row

# ---------------------------------------------------------------- helpers


def row(stream: str, n: int) -> AnyRow:
    """A typed row of ``stream`` made unique by ``n``."""
    if stream == "typing":
        return parse_row("typing", [f"!r{n}:x", [f"@u{n}:x"]])
    if stream == "receipts":
        return parse_row("receipts", ["!r:x", "m.read", f"@u{n}:x", f"$e{n}", None, {"ts": n}])
    return parse_row(
        "events", ["ev", [f"$e{n}", "!r:x", "m.room.message", None, None, None, None, False, False]]
    )


def rdata(stream: str, writer: str, token: int | None, n: int = 0) -> RdataCommand:
    return RdataCommand(stream, writer, token, row(stream, n))


def pos(stream: str, writer: str, prev: int, new: int) -> PositionCommand:
    return PositionCommand(stream, writer, prev, new)


def rows_of(events: list[Event]) -> list[tuple[int, tuple[AnyRow, ...]]]:
    return [(e.token, e.rows) for e in events if isinstance(e, RowsReceived)]


def connected(
    start: int = 10, stream: str = "events", writer: str = "master", **kw: object
) -> StreamPositions:
    """A machine whose (stream, writer) is connected at ``start``."""
    sp = StreamPositions(start={stream: {writer: start}}, **kw)  # type: ignore[arg-type]
    assert sp.receive(pos(stream, writer, start, start)) == []
    assert sp.is_connected(stream, writer)
    return sp


# ---------------------------------------------------------------- rule 1: what is ignored


def test_own_echoes_are_ignored_and_counted() -> None:
    """RDATA and POSITION from ``local_instance`` change nothing; each is counted."""
    sp = StreamPositions(local_instance="me")
    assert sp.receive(pos("events", "me", 1, 5)) == []
    assert sp.receive(rdata("events", "me", 6)) == []
    assert sp.current_token("events", "me") is None
    assert sp.counters.own_echoes == 2


def test_untracked_streams_are_ignored() -> None:
    """With ``streams`` given, other streams' commands are ignored and counted."""
    sp = StreamPositions(streams=["events"])
    assert sp.receive(pos("typing", "master", 1, 5)) == []
    assert sp.receive(rdata("typing", "master", 6)) == []
    assert sp.current_token("typing", "master") is None
    assert sp.counters.ignored_streams == 2
    assert sp.positions() == {}


def test_other_commands_give_nothing() -> None:
    """Commands other than RDATA and POSITION produce no events."""
    sp = StreamPositions()
    assert sp.receive(ReplicateCommand()) == []
    assert sp.receive(PingCommand("123")) == []


# ---------------------------------------------------------------- rule 2: connectedness


def test_rdata_before_any_position_is_dropped() -> None:
    """RDATA for a pair with no POSITION on this connection is dropped, batches too."""
    sp = StreamPositions(start={"events": {"master": 3}})
    assert sp.receive(rdata("events", "master", None, 1)) == []
    assert sp.receive(rdata("events", "master", 4, 2)) == []
    assert sp.current_token("events", "master") == 3
    assert sp.counters.unconnected_dropped == 2


def test_first_position_of_unknown_writer_starts_from_now() -> None:
    """A writer never heard of takes the POSITION's token; later RDATA is delivered."""
    sp = StreamPositions()
    assert sp.receive(pos("events", "master", 7, 9)) == [PositionAdvanced("events", "master", 9)]
    assert sp.is_connected("events", "master")
    assert sp.receive(rdata("events", "master", 10, 1)) == [
        RowsReceived("events", "master", 10, (row("events", 1),), False)
    ]


def test_connection_lost_disconnects_and_keeps_tokens() -> None:
    """After connection_lost, RDATA is dropped until the next POSITION; the token stays."""
    sp = connected(10)
    assert sp.connection_lost() == []
    assert not sp.is_connected("events", "master")
    assert sp.current_token("events", "master") == 10
    assert sp.receive(rdata("events", "master", 11, 1)) == []
    assert sp.counters.unconnected_dropped == 1
    # The answer to REPLICATE reveals the missed row.
    assert sp.receive(pos("events", "master", 11, 11)) == [FetchNeeded("events", "master", 10, 11)]


def test_connection_lost_drops_pending_batch() -> None:
    """A batch begun before the connection dropped never joins a later token's rows."""
    sp = connected(10)
    sp.receive(rdata("events", "master", None, 1))
    sp.connection_lost()
    assert sp.counters.batches_dropped == 1
    sp.receive(pos("events", "master", 10, 10))
    assert rows_of(sp.receive(rdata("events", "master", 12, 2))) == [(12, (row("events", 2),))]


# ---------------------------------------------------------------- rule 3: RDATA, batches, duplicates


def test_rdata_is_delivered_and_moves_the_token() -> None:
    """A numeric RDATA above the token gives RowsReceived(fetched=False) and moves it."""
    sp = connected(10)
    assert sp.receive(rdata("events", "master", 11, 1)) == [
        RowsReceived("events", "master", 11, (row("events", 1),), False)
    ]
    assert sp.current_token("events", "master") == 11


def test_duplicate_rdata_is_dropped() -> None:
    """RDATA at or below the token is a duplicate: dropped and counted."""
    sp = connected(10)
    assert sp.receive(rdata("events", "master", 10)) == []
    assert sp.receive(rdata("events", "master", 9)) == []
    assert sp.counters.duplicates_dropped == 2


def test_batch_rows_are_delivered_together_at_the_next_token() -> None:
    """``batch`` rows wait for the writer's next numeric token, then all go out at once."""
    sp = connected(10)
    assert sp.receive(rdata("events", "master", None, 1)) == []
    assert sp.receive(rdata("events", "master", None, 2)) == []
    assert sp.receive(rdata("events", "master", 11, 3)) == [
        RowsReceived(
            "events", "master", 11, (row("events", 1), row("events", 2), row("events", 3)), False
        )
    ]


def test_interleaved_batches_of_two_writers_stay_apart() -> None:
    """Batches are kept per writer, so two writers' batches may interleave on the wire."""
    sp = StreamPositions()
    sp.receive(pos("events", "p1", 10, 10))
    sp.receive(pos("events", "p2", 20, 20))
    sp.receive(rdata("events", "p1", None, 1))
    sp.receive(rdata("events", "p2", None, 2))
    assert rows_of(sp.receive(rdata("events", "p1", 11, 3))) == [
        (11, (row("events", 1), row("events", 3)))
    ]
    assert rows_of(sp.receive(rdata("events", "p2", 21, 4))) == [
        (21, (row("events", 2), row("events", 4)))
    ]


def test_duplicate_completion_drops_its_batch() -> None:
    """A batch completed by a duplicate token is dropped with it, not carried forward."""
    sp = connected(10)
    sp.receive(rdata("events", "master", None, 1))
    assert sp.receive(rdata("events", "master", 10, 2)) == []
    assert rows_of(sp.receive(rdata("events", "master", 11, 3))) == [(11, (row("events", 3),))]


# ---------------------------------------------------------------- rule 4: POSITION


def test_position_without_gap_advances() -> None:
    """prev <= cur <= new: the token moves to new with PositionAdvanced."""
    sp = connected(10)
    assert sp.receive(pos("events", "master", 9, 15)) == [PositionAdvanced("events", "master", 15)]
    assert sp.current_token("events", "master") == 15


def test_position_at_current_token_connects_silently() -> None:
    """A POSITION that matches the token exactly connects the pair and emits nothing."""
    sp = StreamPositions(start={"events": {"master": 10}})
    assert sp.receive(pos("events", "master", 10, 10)) == []
    assert sp.is_connected("events", "master")


def test_redundant_position_is_ignored() -> None:
    """A connected pair ignores a POSITION whose new token is its own, whatever
    its prev says."""
    sp = connected(10)
    assert sp.receive(pos("events", "master", 2, 10)) == []
    assert sp.receive(pos("events", "master", 10, 10)) == []
    assert sp.counters.redundant_positions == 2
    assert sp.current_token("events", "master") == 10


def test_gap_emits_exact_fetch() -> None:
    """cur < prev: rows were missed; FetchNeeded asks for exactly (cur, new]."""
    sp = connected(10)
    assert sp.receive(pos("events", "master", 12, 15)) == [FetchNeeded("events", "master", 10, 15)]
    assert sp.is_fetching("events", "master")
    assert not sp.is_connected("events", "master")


def test_gap_drops_pending_batch() -> None:
    """The pending batch is dropped when a POSITION starts a fetch (the fetch brings its rows)."""
    sp = connected(10)
    sp.receive(rdata("events", "master", None, 1))
    sp.receive(pos("events", "master", 12, 15))
    assert sp.counters.batches_dropped == 1
    events = sp.fetched(
        "events", "master", [(11, row("events", 1)), (11, row("events", 2))], 15, False
    )
    assert rows_of(events) == [(11, (row("events", 1), row("events", 2)))]


def test_reset_of_resettable_stream() -> None:
    """cur > new on a resettable stream: the writer restarted, StreamReset, token = new."""
    assert "typing" in RESETTABLE_STREAMS
    sp = connected(50, stream="typing")
    assert sp.receive(pos("typing", "master", 3, 3)) == [StreamReset("typing", "master", 50, 3)]
    assert sp.current_token("typing", "master") == 3
    assert sp.is_connected("typing", "master")
    assert rows_of(sp.receive(rdata("typing", "master", 4, 1))) == [(4, (row("typing", 1),))]
    assert sp.counters.resets == 1


def test_writer_behind_on_monotonic_stream_is_trusted_by_default() -> None:
    """cur > new on a monotonic stream (a checkpoint kept across a database
    restore): WriterBehind, and by default the token becomes the writer's, so
    its next rows are delivered instead of dropped as duplicates."""
    sp = StreamPositions(start={"events": {"master": 500}})
    assert sp.receive(pos("events", "master", 7, 7)) == [
        WriterBehind("events", "master", 500, 7, True)
    ]
    assert sp.current_token("events", "master") == 7
    assert sp.is_connected("events", "master")
    assert rows_of(sp.receive(rdata("events", "master", 8, 1))) == [(8, (row("events", 1),))]
    assert sp.counters.writers_behind == 1


def test_writer_behind_when_connected_after_a_forged_rdata() -> None:
    """A forged RDATA far ahead moves a connected pair's token; the writer's next
    POSITION shows it, instead of being ignored as redundant."""
    sp = connected(10)
    sp.receive(rdata("events", "master", 1_000_000, 1))
    assert sp.receive(pos("events", "master", 10, 11)) == [
        WriterBehind("events", "master", 1_000_000, 11, True)
    ]
    assert sp.current_token("events", "master") == 11


def test_writer_behind_can_keep_our_token() -> None:
    """trust_writer=False keeps our token (and still says so)."""
    sp = StreamPositions(start={"caches": {"master": 50}}, trust_writer=False)
    assert sp.receive(pos("caches", "master", 3, 3)) == [
        WriterBehind("caches", "master", 50, 3, False)
    ]
    assert sp.current_token("caches", "master") == 50
    assert sp.is_connected("caches", "master")


def test_caches_is_monotonic() -> None:
    """caches is not resettable: a writer behind us is WriterBehind, never a reset."""
    assert "caches" not in RESETTABLE_STREAMS
    sp = connected(50, stream="caches")
    events = sp.receive(pos("caches", "master", 3, 3))
    assert [type(e) for e in events] == [WriterBehind]


def test_resettable_streams_can_be_configured() -> None:
    """``resettable_streams`` replaces the default set."""
    sp = connected(50, resettable_streams={"events"})
    assert sp.receive(pos("events", "master", 3, 3)) == [StreamReset("events", "master", 50, 3)]


def test_malformed_position_is_ignored() -> None:
    """A POSITION with prev > new is counted and ignored."""
    sp = connected(10)
    assert sp.receive(pos("events", "master", 20, 15)) == []
    assert sp.counters.malformed_positions == 1
    assert sp.current_token("events", "master") == 10


# ---------------------------------------------------------------- rules 5-6: fetching


def test_commands_during_fetch_are_queued_then_replayed() -> None:
    """While fetching, RDATA and POSITION wait; after the fetch they replay in order and
    those the fetch already covered are duplicates."""
    sp = connected(10)
    sp.receive(pos("events", "master", 12, 13))
    assert sp.receive(rdata("events", "master", 13, 3)) == []  # covered by the fetch
    assert sp.receive(rdata("events", "master", None, 4)) == []
    assert sp.receive(rdata("events", "master", 14, 5)) == []
    assert sp.receive(pos("events", "master", 14, 16)) == []
    events = sp.fetched(
        "events", "master", [(12, row("events", 2)), (13, row("events", 3))], 13, False
    )
    assert events == [
        RowsReceived("events", "master", 12, (row("events", 2),), True),
        RowsReceived("events", "master", 13, (row("events", 3),), True),
        RowsReceived("events", "master", 14, (row("events", 4), row("events", 5)), False),
        PositionAdvanced("events", "master", 16),
    ]
    assert sp.counters.duplicates_dropped == 1
    assert sp.is_connected("events", "master")
    assert not sp.is_fetching("events", "master")


def test_fetched_groups_rows_by_token_and_skips_old_ones() -> None:
    """Fetched rows sharing a token come out together; tokens <= cur are skipped;
    the token ends at the target even when the last rows are below it."""
    sp = connected(10)
    sp.receive(pos("events", "master", 12, 20))
    events = sp.fetched(
        "events",
        "master",
        [
            (9, row("events", 9)),
            (11, row("events", 1)),
            (11, row("events", 2)),
            (14, row("events", 3)),
        ],
        20,
        False,
    )
    assert events == [
        RowsReceived("events", "master", 11, (row("events", 1), row("events", 2)), True),
        RowsReceived("events", "master", 14, (row("events", 3),), True),
        PositionAdvanced("events", "master", 20),
    ]


def test_limited_pages() -> None:
    """A limited page moves the token to its end and asks for the next page up to the target."""
    sp = connected(10)
    sp.receive(pos("events", "master", 12, 20))
    events = sp.fetched(
        "events", "master", [(11, row("events", 1)), (13, row("events", 2))], 13, True
    )
    assert events == [
        RowsReceived("events", "master", 11, (row("events", 1),), True),
        RowsReceived("events", "master", 13, (row("events", 2),), True),
        FetchNeeded("events", "master", 13, 20),
    ]
    assert sp.current_token("events", "master") == 13
    assert sp.is_fetching("events", "master")
    events = sp.fetched("events", "master", [(18, row("events", 3))], 20, False)
    assert events == [
        RowsReceived("events", "master", 18, (row("events", 3),), True),
        PositionAdvanced("events", "master", 20),
    ]
    assert sp.is_connected("events", "master")


def test_limited_page_without_progress_is_a_gap() -> None:
    """A limited page that moves nothing would loop for ever: it is reported as a gap."""
    sp = connected(10)
    sp.receive(pos("events", "master", 12, 20))
    events = sp.fetched("events", "master", [], 10, True)
    assert isinstance(events[0], GapUnfillable)
    assert (events[0].from_token, events[0].upto_token) == (10, 20)
    assert "progress" in events[0].reason


def test_fetched_or_failed_without_fetch_is_an_error() -> None:
    """Reporting a fetch the machine did not ask for is a caller bug: StateError."""
    sp = connected(10)
    with pytest.raises(StateError, match="no fetch in flight"):
        sp.fetched("events", "master", [], 12, False)
    with pytest.raises(StateError):
        sp.fetch_failed("events", "master", "boom")
    with pytest.raises(ValueError):
        sp.fetched("events", "nobody", [], 12, False)


def test_queue_overflow_refetches_what_it_forgot() -> None:
    """Past max_buffered queued entries the queue is forgotten, but its highest token
    is fetched after the current fetch, so no row is lost."""
    sp = connected(10, max_buffered=3)
    sp.receive(pos("events", "master", 12, 12))
    for n in range(13, 20):
        assert sp.receive(rdata("events", "master", n, n)) == []
    assert sp.counters.buffer_overflows >= 1
    events = sp.fetched("events", "master", [], 12, False)
    assert events[-1] == FetchNeeded("events", "master", 12, 19)
    rows = [(n, row("events", n)) for n in range(13, 20)]
    events = sp.fetched("events", "master", rows, 19, False)
    assert [t for t, _ in rows_of(events)] == list(range(13, 20))
    assert sp.current_token("events", "master") == 19


def test_queue_overflow_keeps_a_position_as_position() -> None:
    """A collapsed queue that held a POSITION replays as a POSITION, so the pair connects
    even when the connection was lost during the fetch."""
    sp = connected(10, max_buffered=2)
    sp.receive(pos("events", "master", 12, 12))
    sp.connection_lost()
    sp.receive(pos("events", "master", 14, 14))  # the answer to REPLICATE
    sp.receive(rdata("events", "master", 15, 15))
    sp.receive(rdata("events", "master", 16, 16))
    assert sp.counters.buffer_overflows == 1
    events = sp.fetched("events", "master", [], 12, False)
    assert events[-1] == FetchNeeded("events", "master", 12, 16)
    sp.fetched("events", "master", [(n, row("events", n)) for n in (13, 15, 16)], 16, False)
    assert sp.is_connected("events", "master")


def test_queue_bound_counts_rows_not_commands() -> None:
    """A queued batch counts with all its rows, so one big batch cannot pile up
    max_buffered times over; it is refetched instead."""
    sp = connected(10, max_buffered=3)
    sp.receive(pos("events", "master", 12, 12))
    for n in range(3):
        sp.receive(rdata("events", "master", None, n))
    sp.receive(rdata("events", "master", 13, 3))
    assert sp.counters.buffer_overflows == 1
    assert sp.fetched("events", "master", [], 12, False)[-1] == FetchNeeded(
        "events", "master", 12, 13
    )


def test_batch_overflow_becomes_a_fetch() -> None:
    """A batch longer than max_buffered is forgotten; its token is fetched instead."""
    sp = connected(10, max_buffered=2)
    for n in range(3):
        sp.receive(rdata("events", "master", None, n))
    assert sp.counters.batch_overflows == 1
    assert sp.receive(rdata("events", "master", 11, 3)) == [FetchNeeded("events", "master", 10, 11)]
    rows = [(11, row("events", n)) for n in range(4)]
    events = sp.fetched("events", "master", rows, 11, False)
    assert rows_of(events) == [(11, tuple(r for _, r in rows))]


def test_replay_can_start_another_fetch() -> None:
    """A queued POSITION revealing a new gap starts another fetch; later entries wait."""
    sp = connected(10)
    sp.receive(pos("events", "master", 12, 12))
    sp.receive(pos("events", "master", 15, 15))
    sp.receive(rdata("events", "master", 16, 16))
    events = sp.fetched("events", "master", [], 12, False)
    assert events == [
        PositionAdvanced("events", "master", 12),
        FetchNeeded("events", "master", 12, 15),
    ]
    events = sp.fetched("events", "master", [(14, row("events", 14))], 15, False)
    assert rows_of(events) == [(14, (row("events", 14),)), (16, (row("events", 16),))]


def test_connection_lost_during_fetch() -> None:
    """A fetch outlives the connection, but its end does not connect the pair, and what
    was queued before the loss is forgotten; the new connection's POSITION decides."""
    sp = connected(10)
    sp.receive(pos("events", "master", 12, 12))
    sp.receive(rdata("events", "master", 13, 13))
    sp.connection_lost()
    assert sp.is_fetching("events", "master")
    events = sp.fetched("events", "master", [], 12, False)
    assert events == [PositionAdvanced("events", "master", 12)]
    assert not sp.is_connected("events", "master")
    assert sp.receive(pos("events", "master", 13, 13)) == [FetchNeeded("events", "master", 12, 13)]


def test_position_queued_before_connection_lost_does_not_connect() -> None:
    """A POSITION queued on the old connection is forgotten with it: it must not make the
    pair connected on the new one, where rows sent meanwhile were missed."""
    sp = connected(10)
    sp.receive(pos("events", "master", 12, 12))
    sp.receive(pos("events", "master", 12, 13))
    sp.connection_lost()
    sp.fetched("events", "master", [], 12, False)
    assert not sp.is_connected("events", "master")
    assert sp.receive(rdata("events", "master", 20, 20)) == []


def test_rdata_after_reconnect_waits_for_position_even_when_a_fetch_ends() -> None:
    """RDATA sent on the new connection before the writer's POSITION, queued behind a fetch
    from the old connection, is dropped: the POSITION will reveal the rows in between."""
    sp = connected(10)
    sp.receive(pos("events", "master", 12, 12))
    sp.connection_lost()
    sp.receive(rdata("events", "master", 20, 20))
    assert sp.fetched("events", "master", [], 12, False) == [
        PositionAdvanced("events", "master", 12)
    ]
    assert sp.receive(pos("events", "master", 20, 20)) == [FetchNeeded("events", "master", 12, 20)]


# ---------------------------------------------------------------- rule 7: failed fetches


def test_fetch_failed_reports_the_exact_gap() -> None:
    """A failed fetch reports (cur, target] as lost, moves past it and replays the queue."""
    sp = connected(10)
    sp.receive(pos("events", "master", 12, 20))
    sp.fetched("events", "master", [(13, row("events", 13))], 13, True)
    sp.receive(rdata("events", "master", 21, 21))
    events = sp.fetch_failed("events", "master", "HTTP 500")
    assert events == [
        GapUnfillable("events", "master", 13, 20, "HTTP 500"),
        PositionAdvanced("events", "master", 20),
        RowsReceived("events", "master", 21, (row("events", 21),), False),
    ]
    assert sp.counters.gaps_unfillable == 1
    assert sp.is_connected("events", "master")


# ---------------------------------------------------------------- queries


def test_persisted_upto_is_the_minimum_over_writers() -> None:
    """Without expected writers: the minimum over the writers seen."""
    sp = StreamPositions()
    assert sp.persisted_upto("events") is None
    sp.receive(pos("events", "p1", 10, 10))
    sp.receive(pos("events", "p2", 7, 7))
    assert sp.persisted_upto("events") == 7


def test_persisted_upto_with_expected_writers() -> None:
    """With expected writers, an unknown one makes it None; our own instance is left out."""
    sp = StreamPositions(local_instance="me", writers={"events": ["p1", "p2", "me"]})
    sp.receive(pos("events", "p1", 10, 10))
    assert sp.persisted_upto("events") is None
    sp.receive(pos("events", "p2", 12, 12))
    assert sp.persisted_upto("events") == 10


def test_positions_round_trip_as_start() -> None:
    """positions() is a checkpoint: a new machine started from it resumes there and
    fetches what it missed."""
    sp = StreamPositions()
    sp.receive(pos("events", "p1", 10, 10))
    sp.receive(rdata("events", "p1", 11, 1))
    sp.receive(pos("typing", "master", 4, 4))
    sp.receive(rdata("events", "p2", 3, 1))  # never connected: unknown token, not saved
    checkpoint = sp.positions()
    assert checkpoint == {"events": {"p1": 11}, "typing": {"master": 4}}
    again = StreamPositions(start=checkpoint)
    assert again.positions() == checkpoint
    assert again.receive(pos("events", "p1", 15, 15)) == [FetchNeeded("events", "p1", 11, 15)]


def test_max_buffered_must_be_positive() -> None:
    """max_buffered below 1 is refused at once."""
    with pytest.raises(ValueError, match="max_buffered"):
        StreamPositions(max_buffered=0)


# ---------------------------------------------------------------- real traffic


@pytest.mark.parametrize("name", CORPUS_FILES)
def test_corpus_traffic(name: str) -> None:
    """Fed real Synapse traffic as a third process, the machine fetches exactly where
    Synapse's own rule (prev above our token) says rows may be missing, and delivers
    every non-duplicate RDATA row of a writer whose POSITION came first.

    Synapse writers announce ``prev`` = their last processed token, which may be
    past the last RDATA they sent (ids taken but unused), so a real worker fetches
    now and then too; the fetch is answered here with no rows.
    """
    sp = StreamPositions(local_instance="observer")
    seen: dict[tuple[str, str], int] = {}  # highest token known per pair (model)
    expected_rows = 0
    expected_fetches: list[FetchNeeded] = []
    delivered_rows = 0
    fetches: list[FetchNeeded] = []
    batch: collections.Counter[tuple[str, str]] = collections.Counter()
    for _, line in corpus_entries(name):
        cmd = parse_line(line)
        if isinstance(cmd, PositionCommand):
            key = (cmd.stream_name, cmd.instance_name)
            cur = seen.get(key)
            if cur is not None and cur < cmd.prev_token:
                expected_fetches.append(FetchNeeded(*key, cur, cmd.new_token))
            seen[key] = max(cmd.new_token, cur if cur is not None else cmd.new_token)
            batch[key] = 0
        elif isinstance(cmd, RdataCommand):
            key = (cmd.stream_name, cmd.instance_name)
            if key in seen:
                batch[key] += 1
                if cmd.token is not None:
                    if cmd.token > seen[key]:
                        expected_rows += batch[key]
                        seen[key] = cmd.token
                    batch[key] = 0
        for event in sp.receive(cmd):
            if isinstance(event, RowsReceived):
                delivered_rows += len(event.rows)
            elif isinstance(event, FetchNeeded):
                fetches.append(event)
                for later in sp.fetched(event.stream, event.writer, [], event.upto_token, False):
                    assert not isinstance(later, (RowsReceived, FetchNeeded, GapUnfillable))
            elif isinstance(event, (StreamReset, GapUnfillable, WriterBehind, UnnamedWriter)):
                pytest.fail(f"unexpected {event!r}")
    assert fetches == expected_fetches
    assert delivered_rows == expected_rows > 1000
    assert sp.counters.unconnected_dropped == 0
    for (stream, writer), token in seen.items():
        assert sp.current_token(stream, writer) == token


# ---------------------------------------------------------------- rule 6: the budget


class Room:
    """A budget that refuses live rows while ``full`` and wants pages unless ``busy``."""

    def __init__(self) -> None:
        self.full = False
        self.busy = False
        self.taken: list[tuple[int, bool]] = []

    def reserve(self, stream: str, rows: int, refusable: bool) -> bool:
        if refusable and self.full:
            return False
        self.taken.append((rows, refusable))
        return True

    def wants_pages(self, stream: str) -> bool:
        return not self.busy


def test_refused_rows_wait_for_room_then_are_fetched() -> None:
    """Live rows the budget refuses are not kept: the pair waits for room,
    remembering only how far to fetch; resume() asks for exactly that range."""
    room = Room()
    sp = connected(10, budget=room)
    room.full = room.busy = True
    assert sp.receive(rdata("events", "master", 11, 1)) == []
    assert sp.counters.overflows == 1
    assert sp.current_token("events", "master") == 10
    assert sp.is_fetching("events", "master") and not sp.is_requesting("events", "master")
    for n in (12, 13):
        assert sp.receive(rdata("events", "master", n, n)) == []
    assert sp.receive(pos("events", "master", 13, 15)) == []
    waiting = sp.waiting_streams  # a live view: it follows without being asked again
    assert sp.is_waiting("events") and "events" in waiting
    assert sp.resume("events") == []  # still no room for a page
    room.full = room.busy = False
    assert sp.resume("events") == [FetchNeeded("events", "master", 10, 15)]
    assert not sp.is_waiting("events") and "events" not in waiting
    rows = [(n, row("events", n)) for n in (11, 12, 13)]
    events = sp.fetched("events", "master", rows, 15, False)
    assert rows_of(events) == [(n, (row("events", n),)) for n in (11, 12, 13)]
    assert events[-1] == PositionAdvanced("events", "master", 15)
    assert sp.is_connected("events", "master")  # the absorbed POSITION connects


def test_target_is_fixed_while_a_request_is_in_flight() -> None:
    """Rows arriving while a page is on its way are queued, not added to the
    request: the answer covers exactly what was asked, and the queued rows
    follow it (the overflow-refill loss of issue 9)."""
    room = Room()
    sp = connected(10, budget=room)
    room.full = True
    sp.receive(rdata("events", "master", 11, 1))
    room.full = False
    assert sp.resume("events") == [FetchNeeded("events", "master", 10, 11)]
    assert sp.receive(rdata("events", "master", 12, 2)) == []  # live, while in flight
    events = sp.fetched("events", "master", [(11, row("events", 1))], 11, False)
    assert rows_of(events) == [(11, (row("events", 1),)), (12, (row("events", 2),))]


def test_rows_beyond_the_target_in_a_page_are_ignored() -> None:
    """A page that carries rows past what was asked does not move the token past
    the target: those rows come again, in order, from the queue or a fetch."""
    sp = connected(10)
    sp.receive(pos("events", "master", 12, 12))
    events = sp.fetched(
        "events", "master", [(12, row("events", 12)), (13, row("events", 13))], 13, False
    )
    assert rows_of(events) == [(12, (row("events", 12),))]
    assert sp.current_token("events", "master") == 12


def test_next_page_waits_for_room() -> None:
    """After a limited page, the next page is asked for only when the budget wants one."""
    room = Room()
    sp = connected(10, budget=room)
    sp.receive(pos("events", "master", 12, 20))
    room.busy = True
    events = sp.fetched("events", "master", [(11, row("events", 1))], 11, True)
    assert rows_of(events) == [(11, (row("events", 1),))]
    assert not any(isinstance(e, FetchNeeded) for e in events)
    assert room.taken == [(1, False)]  # fetched rows are always taken
    room.busy = False
    assert sp.resume("events") == [FetchNeeded("events", "master", 11, 20)]


def test_refusal_during_replay_waits_with_the_rest() -> None:
    """A queued row refused when the fetch ends makes the pair wait again; the
    rest of the queue only raises the target."""
    room = Room()
    sp = connected(10, budget=room)
    sp.receive(pos("events", "master", 12, 12))
    for n in (13, 14, 15):
        sp.receive(rdata("events", "master", n, n))
    room.full = room.busy = True
    events = sp.fetched("events", "master", [(12, row("events", 12))], 12, False)
    assert rows_of(events) == [(12, (row("events", 12),))]
    assert sp.current_token("events", "master") == 12
    room.full = room.busy = False
    assert sp.resume("events") == [FetchNeeded("events", "master", 12, 15)]


# ---------------------------------------------------------------- rule 9: unnamed writers


def test_unnamed_writer_rows_are_delivered_but_never_fetched() -> None:
    """A writer the configuration does not name: said once, its rows delivered, a gap
    its POSITION reveals skipped and counted, never a FetchNeeded or a loss."""
    sp = StreamPositions(fetchable={"master"})
    assert sp.receive(pos("caches", "ghost", 5, 5)) == [
        UnnamedWriter("caches", "ghost"),
        PositionAdvanced("caches", "ghost", 5),
    ]
    assert rows_of(sp.receive(rdata("caches", "ghost", 6, 1))) == [(6, (row("caches", 1),))]
    assert sp.receive(pos("caches", "ghost", 9, 10)) == [PositionAdvanced("caches", "ghost", 10)]
    assert sp.counters.unnamed_writer_gaps == 1
    assert sp.counters.unnamed_writer_commands == 3
    assert sp.counters.fetches == sp.counters.gaps_unfillable == 0


def test_unnamed_writer_rows_are_never_refused() -> None:
    """Rows that could not be fetched back are taken even when the budget is full."""
    room = Room()
    room.full = True
    sp = StreamPositions(fetchable={"master"}, budget=room)
    sp.receive(pos("caches", "ghost", 5, 5))
    assert rows_of(sp.receive(rdata("caches", "ghost", 6, 1))) == [(6, (row("caches", 1),))]
    assert room.taken == [(1, False)]


# ---------------------------------------------------------------- rule 2b: connecting at RDATA


def test_rdata_connects_a_from_now_pair_by_fetching_its_whole_token() -> None:
    """Without REPLICATE, the first numeric RDATA of a "from now" writer connects
    it: its token is fetched whole (its batch began before we listened)."""
    sp = StreamPositions(connect_on_rdata=True)
    assert sp.receive(rdata("events", "p1", None, 1)) == []  # the tail of a batch
    events = sp.receive(rdata("events", "p1", 40, 2))
    assert events == [
        PositionAdvanced("events", "p1", 39),
        FetchNeeded("events", "p1", 39, 40),
    ]
    events = sp.fetched(
        "events",
        "p1",
        [(40, row("events", 0)), (40, row("events", 1)), (40, row("events", 2))],
        40,
        False,
    )
    assert rows_of(events) == [(40, (row("events", 0), row("events", 1), row("events", 2)))]
    assert sp.is_connected("events", "p1")
    assert rows_of(sp.receive(rdata("events", "p1", 41, 3))) == [(41, (row("events", 3),))]
    assert sp.counters.rdata_connects == 1


def test_rdata_reconnects_after_a_lost_connection_with_a_catch_up() -> None:
    """After a reconnect, the next RDATA fetches what lies between our token and it."""
    sp = connected(10, connect_on_rdata=True)
    sp.connection_lost()
    assert sp.receive(rdata("events", "master", 15, 5)) == [FetchNeeded("events", "master", 10, 15)]


def test_rdata_at_or_below_our_token_does_not_connect() -> None:
    """An old RDATA on an unconnected pair is a duplicate; it connects nothing."""
    sp = StreamPositions(start={"events": {"master": 10}}, connect_on_rdata=True)
    assert sp.receive(rdata("events", "master", 9, 1)) == []
    assert not sp.is_connected("events", "master")
    assert sp.counters.duplicates_dropped == 1


def test_rdata_connects_an_unnamed_writer_at_its_token() -> None:
    """Nothing can be fetched from an unnamed writer: it connects at the RDATA's
    token, that token skipped and counted."""
    sp = StreamPositions(connect_on_rdata=True, fetchable={"master"})
    events = sp.receive(rdata("caches", "ghost", 7, 1))
    assert events == [UnnamedWriter("caches", "ghost"), PositionAdvanced("caches", "ghost", 7)]
    assert sp.counters.unnamed_writer_gaps == 1
    assert rows_of(sp.receive(rdata("caches", "ghost", 8, 2))) == [(8, (row("caches", 2),))]


def test_without_connect_on_rdata_unconnected_rdata_is_dropped() -> None:
    """Synapse's rule stays the default."""
    sp = StreamPositions()
    assert sp.receive(rdata("events", "p1", 40, 2)) == []
    assert sp.counters.unconnected_dropped == 1
