"""Example-based tests of the delivery state machine, one rule at a time."""

from __future__ import annotations

import pytest

from synrepl.commands import PositionCommand, RdataCommand
from synrepl.delivery import (
    Action,
    DeadLetterBatch,
    Delivery,
    HandlerFailurePolicy,
    PositionReached,
    Ready,
    RetryBatch,
    SaveCheckpoint,
    StopDelivery,
)
from synrepl.positions import (
    FetchNeeded,
    GapUnfillable,
    RowsReceived,
    StateError,
    StreamReset,
    WriterBehind,
)
from synrepl.streams import AnyRow, parse_row


def row(n: int) -> AnyRow:
    return parse_row(
        "events", ["ev", [f"$e{n}", "!r:x", "m.room.message", None, None, None, None, False, False]]
    )


def rdata(
    token: int | None, n: int = 0, writer: str = "master", stream: str = "events"
) -> RdataCommand:
    return RdataCommand(stream, writer, token, row(n))


def pos(prev: int, new: int, writer: str = "master", stream: str = "events") -> PositionCommand:
    return PositionCommand(stream, writer, prev, new)


def batches(actions: list[Action]) -> list[RowsReceived]:
    return [a for a in actions if isinstance(a, RowsReceived)]


def connected(start: int = 10, **kw: object) -> Delivery:
    d = Delivery(start={"events": {"master": start}}, **kw)  # type: ignore[arg-type]
    assert d.receive(pos(start, start)) == []
    return d


def handle_all(d: Delivery, actions: list[Action]) -> list[Action]:
    """Handle every batch handed out, as a synchronous handler would; all actions seen."""
    seen: list[Action] = []
    todo = list(actions)
    while todo:
        action = todo.pop(0)
        seen.append(action)
        if isinstance(action, RowsReceived):
            todo.extend(d.handled(action))
    return seen


# ---------------------------------------------------------------- rule 1: one batch out per stream


def test_one_batch_per_stream_is_out_at_a_time() -> None:
    """The next batch of a stream waits for the one out; other streams do not wait."""
    d = Delivery(start={"events": {"master": 10}, "typing": {"master": 3}})
    d.receive(pos(10, 10))
    d.receive(pos(3, 3, stream="typing"))
    first = batches(d.receive(rdata(11, 1)))
    assert [b.token for b in first] == [11]
    assert d.receive(rdata(12, 2)) == []
    assert d.pending_rows("events") == 1
    typing = batches(d.receive(rdata(4, 3, stream="typing")))
    assert [(b.stream, b.token) for b in typing] == [("typing", 4)]
    assert [b.token for b in batches(d.handled(first[0]))] == [12]


def test_handled_must_name_the_batch_out() -> None:
    """Reporting a batch that is not out with the handlers is a caller bug."""
    d = connected(10)
    (batch,) = batches(d.receive(rdata(11, 1)))
    with pytest.raises(StateError, match="not the batch out"):
        d.handled(RowsReceived("events", "master", 11, batch.rows, False))
    d.handled(batch)
    with pytest.raises(StateError):
        d.handled(batch)


def test_a_long_queue_is_worked_through_without_recursion() -> None:
    """Fifty thousand queued batches handled synchronously: no recursion, all in order."""
    d = connected(0, max_pending_rows=100_000)
    (first,) = batches(d.receive(rdata(1, 1)))
    for n in range(2, 50_001):
        assert d.receive(rdata(n, n)) == []
    tokens = [first.token]
    actions = d.handled(first)
    while actions:
        (batch,) = batches(actions)
        tokens.append(batch.token)
        actions = d.handled(batch)
    assert tokens == list(range(1, 50_001))


# ---------------------------------------------------------------- rule 2: processed positions


def test_positions_are_processed_not_received() -> None:
    """positions() moves when a batch is handled, not when it arrives."""
    d = connected(10)
    (batch,) = batches(d.receive(rdata(11, 1)))
    d.receive(rdata(12, 2))
    assert d.positions() == {"events": {"master": 10}}
    assert d.wire.current_token("events", "master") == 12
    handle_all(d, d.handled(batch))
    assert d.positions() == {"events": {"master": 12}}


def test_gaps_and_resets_come_out_in_order_with_the_rows() -> None:
    """A gap is reported when the handlers reach it, after the rows before it."""
    d = connected(10)
    (first,) = batches(d.receive(rdata(11, 1)))
    (fetch,) = d.receive(pos(13, 14))
    assert isinstance(fetch, FetchNeeded)
    assert d.fetch_failed("events", "master", "down") == []  # waits behind batch 11
    actions = d.handled(first)
    assert [type(a) for a in actions] == [GapUnfillable]
    assert d.positions() == {"events": {"master": 14}}


def test_a_reset_moves_the_processed_position_back() -> None:
    """StreamReset (and a trusted WriterBehind) move the checkpoint back with the writer."""
    d = Delivery(start={"typing": {"master": 50}, "events": {"master": 500}})
    assert d.receive(pos(3, 3, stream="typing")) == [StreamReset("typing", "master", 50, 3)]
    assert d.receive(pos(7, 7)) == [WriterBehind("events", "master", 500, 7, True)]
    assert d.positions() == {"typing": {"master": 3}, "events": {"master": 7}}


def test_persisted_upto_is_the_lowest_processed_over_writers() -> None:
    """Over the expected writers and those heard; None until each has a position."""
    d = Delivery(local_instance="me", writers={"events": ["p1", "p2", "me"]})
    d.receive(pos(10, 10, writer="p1"))
    assert d.persisted_upto("events") is None
    d.receive(pos(12, 12, writer="p2"))
    assert d.persisted_upto("events") == 10
    d.receive(pos(3, 3, writer="p3"))
    assert d.persisted_upto("events") == 3


# ---------------------------------------------------------------- rule 3: the bound


def test_live_rows_beyond_the_bound_are_refetched_at_half() -> None:
    """With a bound of 4, rows past it are not kept; when the queue is down to half
    the skipped range is fetched, while the handler still has rows queued."""
    d = connected(10, max_pending_rows=4)
    (first,) = batches(d.receive(rdata(11, 11)))
    for n in range(12, 20):
        assert d.receive(rdata(n, n)) == []
    assert d.pending_rows("events") == 4  # 12..15 queued, 16..19 skipped
    assert d.wire.counters.overflows == 1
    actions = d.handled(first)
    assert [b.token for b in batches(actions)] == [12]
    actions = d.handled(batches(actions)[0])  # 13 out, 2 queued: half the bound
    assert [type(a) for a in actions] == [RowsReceived, FetchNeeded]
    assert actions[1] == FetchNeeded("events", "master", 15, 19)
    assert d.pending_rows("events") == 2


def test_a_handler_busy_with_a_writers_only_batch_does_not_get_it_twice() -> None:
    """The range skipped on overflow starts after the batch the handler is running,
    even when nothing else of that writer is queued (caches, no POSITIONs)."""
    d = Delivery(start={"caches": {"master": 1, "p1": 1}}, streams={"caches"}, max_pending_rows=3)
    d.receive(pos(1, 1, stream="caches"))
    d.receive(pos(1, 1, writer="p1", stream="caches"))
    (held,) = batches(d.receive(rdata(2, 2, writer="p1", stream="caches")))
    for n in range(3, 7):
        d.receive(rdata(n, n, stream="caches"))
    assert d.receive(rdata(7, 7, writer="p1", stream="caches")) == []  # refused
    actions = handle_all(d, d.handled(held))
    fetches = [a for a in actions if isinstance(a, FetchNeeded)]
    assert FetchNeeded("caches", "p1", 2, 7) in fetches


def test_waiting_fetches_are_sent_when_the_queue_empties() -> None:
    """A gap revealed while the queue is over half waits; it is asked for once
    the handlers work the queue down."""
    d = connected(10, max_pending_rows=2)
    (first,) = batches(d.receive(rdata(11, 11)))
    d.receive(rdata(12, 12))
    d.receive(rdata(13, 13))
    assert d.receive(pos(15, 16)) == []  # queue full: the fetch waits
    actions = handle_all(d, d.handled(first))
    assert FetchNeeded("events", "master", 13, 16) in actions


# ---------------------------------------------------------------- rule 4: waiters


def test_wait_for_already_processed() -> None:
    """wait_for is True at once when processed already, or for our own instance."""
    d = connected(10, local_instance="me")
    assert d.wait_for("events", "master", 10, "a") is True
    assert d.wait_for("events", "me", 10_000, "b") is True


def test_waiters_fire_on_processed_positions_by_every_path() -> None:
    """PositionReached comes once the handlers are past the token: rows, a POSITION,
    a fetch and a gap alike."""
    d = connected(10)
    for key, token in (("rdata", 11), ("position", 12), ("fetch", 14), ("gap", 20)):
        assert d.wait_for("events", "master", token, key) is False
    (batch,) = batches(d.receive(rdata(11, 1)))
    assert d.handled(batch) == [PositionReached("rdata", "events", "master", 11)]
    assert d.receive(pos(11, 12)) == [PositionReached("position", "events", "master", 12)]
    d.receive(pos(13, 20))
    actions = d.fetched("events", "master", [(14, row(14))], 14, True)
    (fetched,) = batches(actions)
    assert d.handled(fetched)[0] == PositionReached("fetch", "events", "master", 14)
    actions = d.fetch_failed("events", "master", "down")
    assert actions[-1] == PositionReached("gap", "events", "master", 20)


def test_waiter_reports_the_processed_token_and_fires_once() -> None:
    """The event carries the processed token, which may pass the awaited one."""
    d = connected(10)
    d.wait_for("events", "master", 12, "k")
    assert d.receive(pos(10, 30)) == [PositionReached("k", "events", "master", 30)]
    assert d.receive(pos(30, 40)) == []


def test_cancel_wait_and_duplicate_keys() -> None:
    """A key may wait once at a time; cancel_wait removes it; untracked streams refuse."""
    d = Delivery(streams={"events"}, start={"events": {"master": 10}})
    d.wait_for("events", "master", 12, "k")
    with pytest.raises(StateError, match="already"):
        d.wait_for("events", "master", 13, "k")
    assert d.waiter_keys() == ["k"]
    assert d.cancel_wait("k") is True
    assert d.cancel_wait("k") is False
    with pytest.raises(StateError, match="not followed"):
        d.wait_for("typing", "master", 3, "t")


def test_max_pending_rows_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_pending_rows"):
        Delivery(max_pending_rows=0)


# ---------------------------------------------------------------- rule 5: acknowledge after handling


def test_a_handled_batch_waits_for_the_checkpoint_that_includes_it() -> None:
    """With acknowledge, the next batch of a stream goes out only once a save
    covering the handled one is done; saves never overlap, and coalesce."""
    d = connected(10, acknowledge=True)
    (first,) = batches(d.receive(rdata(11, 1)))
    d.receive(rdata(12, 2))
    actions = d.handled(first)
    assert actions == [SaveCheckpoint({"events": {"master": 11}})]
    d.receive(rdata(13, 3))  # more arrives meanwhile: nothing goes out
    assert d.running("events") is None
    actions = d.checkpoint_saved()
    assert [b.token for b in batches(actions)] == [12]
    (second,) = batches(actions)
    assert d.handled(second) == [SaveCheckpoint({"events": {"master": 12}})]


def test_position_moves_are_saved_without_blocking() -> None:
    """A POSITION moves the processed position and asks for a save, but blocks nothing."""
    d = connected(10, acknowledge=True)
    assert d.receive(pos(10, 15)) == [SaveCheckpoint({"events": {"master": 15}})]
    (batch,) = batches(d.receive(rdata(16, 1)))  # not blocked by the save in flight
    d.receive(pos(16, 20))  # queued behind batch 16
    assert d.handled(batch) == []  # a save is in flight: the next one will include it
    assert d.running("events") is None
    assert d.checkpoint_saved() == [SaveCheckpoint({"events": {"master": 16}})]
    assert d.checkpoint_saved() == [SaveCheckpoint({"events": {"master": 20}})]
    assert d.checkpoint_saved() == []


def test_a_failed_save_blocks_until_saved_again() -> None:
    """Nothing moves past an unsaved batch; save_again asks once more."""
    d = connected(10, acknowledge=True)
    (first,) = batches(d.receive(rdata(11, 1)))
    d.receive(rdata(12, 2))
    d.handled(first)
    assert d.checkpoint_failed() == []
    assert d.running("events") is None
    assert d.save_again() == [SaveCheckpoint({"events": {"master": 11}})]
    assert [b.token for b in batches(d.checkpoint_saved())] == [12]


# ---------------------------------------------------------------- rule 6: handler failures


def test_a_failing_batch_is_retried_then_dead_lettered() -> None:
    """Retries with doubling delays, then a DeadLetterBatch; only dead_lettered()
    moves the position past it."""
    policy = HandlerFailurePolicy(retries=2, base_delay=0.5, then="dead_letter")
    d = connected(10, failure_policy=policy)
    (batch,) = batches(d.receive(rdata(11, 1)))
    d.receive(rdata(12, 2))
    assert d.handler_failed(batch, "boom") == [RetryBatch(batch, 0.5, 1, "boom")]
    assert d.retry(batch) == [batch]
    assert d.handler_failed(batch, "boom") == [RetryBatch(batch, 1.0, 2, "boom")]
    d.retry(batch)
    assert d.handler_failed(batch, "boom") == [DeadLetterBatch(batch, 3, "boom")]
    assert d.positions() == {"events": {"master": 10}}
    assert [b.token for b in batches(d.dead_lettered(batch))] == [12]
    assert d.positions() == {"events": {"master": 11}}


def test_a_batch_nobody_may_take_stops_its_stream() -> None:
    """then="stop": StopDelivery, and nothing of that stream goes out again."""
    d = connected(10, failure_policy=HandlerFailurePolicy(retries=0))
    (batch,) = batches(d.receive(rdata(11, 1)))
    assert d.handler_failed(batch, "boom") == [StopDelivery(batch, 1, "boom")]
    assert d.receive(rdata(12, 2)) == []
    assert d.positions() == {"events": {"master": 10}}
    with pytest.raises(StateError):
        d.retry(batch)


def test_a_success_after_failures_starts_the_count_again() -> None:
    d = connected(10, failure_policy=HandlerFailurePolicy(retries=1))
    (batch,) = batches(d.receive(rdata(11, 1)))
    d.receive(rdata(12, 2))
    d.handler_failed(batch, "boom")
    d.retry(batch)
    (second,) = batches(d.handled(batch))
    assert d.handler_failed(second, "boom")[0] == RetryBatch(second, 1.0, 1, "boom")


def test_failure_policy_validates() -> None:
    with pytest.raises(ValueError):
        HandlerFailurePolicy(retries=-1)
    with pytest.raises(ValueError):
        HandlerFailurePolicy(then="skip")  # type: ignore[arg-type]


# ---------------------------------------------------------------- rule 7: readiness


def test_ready_once_every_expected_writer_has_a_position() -> None:
    """Ready comes out once, when the last expected writer is heard; silent_writers
    names the others until then."""
    d = Delivery(local_instance="me", streams={"events"}, writers={"events": ["p1", "p2", "me"]})
    assert not d.ready
    assert d.silent_writers() == {"events": ["p1", "p2"]}
    assert d.receive(pos(5, 5, writer="p1")) == []
    assert d.receive(pos(7, 7, writer="p2")) == [Ready({"events": {"p1": 5, "p2": 7}})]
    assert d.ready and d.silent_writers() == {}
    assert d.receive(pos(7, 9, writer="p2")) == []


def test_seed_starts_unknown_writers_and_catches_up_the_others() -> None:
    """seed() starts writers we know nothing of there; a writer we are behind is
    fetched up to its seed at once, without waiting for its traffic, and stays
    unconnected."""
    d = Delivery(start={"events": {"p1": 3}}, writers={"events": ["p1", "p2"]})
    actions = d.seed({"events": {"p1": 100, "p2": 50}})
    assert actions == [
        FetchNeeded("events", "p1", 3, 100),
        Ready({"events": {"p1": 3, "p2": 50}}),
    ]
    assert d.positions() == {"events": {"p1": 3, "p2": 50}}
    assert d.wire.current_token("events", "p2") == 50
    d.fetched("events", "p1", [], 100, False)
    assert d.positions() == {"events": {"p1": 100, "p2": 50}}
    assert not d.wire.is_connected("events", "p1")
    assert d.seed({"events": {"p1": 90}}) == []  # not behind: nothing to do
