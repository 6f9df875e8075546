"""The audit's record of the channel, and its comparison with a writer's history."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from synrepl.audit import ChannelRecord, check_range
from synrepl.commands import PositionCommand, RdataCommand
from synrepl.streams import AnyRow, TypingRow


def row(n: int) -> TypingRow:
    return TypingRow(f"!r{n}:test", (f"@u{n}:test",))


def rdata(token: int | None, r: AnyRow, writer: str = "master") -> RdataCommand:
    return RdataCommand("typing", writer, token, r)


def position(prev: int, new: int, writer: str = "master") -> PositionCommand:
    return PositionCommand("typing", writer, prev, new)


def test_a_range_opens_at_the_first_command_and_leaves_that_token_out() -> None:
    record = ChannelRecord()
    record.subscribed()
    record.command(rdata(None, row(1)))  # a batch the subscription began inside
    record.command(rdata(5, row(2)))
    record.command(rdata(6, row(3)))
    record.command(rdata(None, row(4)))
    record.command(rdata(7, row(5)))
    [rng] = record.ranges()
    assert (rng.stream, rng.writer, rng.after, rng.upto, rng.rows_seen) == (
        "typing",
        "master",
        5,
        7,
        3,
    )
    history = [(5, row(1)), (5, row(2)), (6, row(3)), (7, row(4)), (7, row(5))]
    check = check_range(rng, history)
    assert check.lost == () and check.rows_in_history == 3 and not check.silent


def test_rows_missing_from_the_channel_are_named_with_the_position_that_skipped_them() -> None:
    record = ChannelRecord()
    record.subscribed()
    record.command(position(10, 10))
    record.command(rdata(11, row(11)))
    record.command(position(11, 14))  # 12 and 13 were written: never published
    record.command(rdata(16, row(16)))  # 15 dropped on the way
    [rng] = record.ranges()
    assert (rng.after, rng.upto) == (10, 16)
    history = [(t, row(t)) for t in (9, 11, 12, 13, 15, 16, 17)]
    lost = check_range(rng, history).lost
    assert [(x.token, x.row, x.skipped_by) for x in lost] == [
        (12, row(12), (11, 14)),
        (13, row(13), (11, 14)),
        (15, row(15), None),
    ]


def test_a_range_with_history_and_no_traffic_is_silent() -> None:
    record = ChannelRecord()
    record.subscribed()
    record.command(position(3, 3))
    record.command(position(3, 8))
    [rng] = record.ranges()
    check = check_range(rng, [(5, row(5)), (7, row(7))])
    assert check.silent and [x.token for x in check.lost] == [5, 7]


def test_a_lost_subscription_splits_the_ranges_and_nothing_between_is_judged() -> None:
    record = ChannelRecord()
    record.subscribed()
    record.command(rdata(2, row(2)))
    record.command(rdata(3, row(3)))
    record.subscribed()  # 4 and 5 published while the subscription was lost
    record.command(rdata(6, row(6)))
    record.command(rdata(7, row(7)))
    assert [(r.after, r.upto) for r in record.ranges()] == [(2, 3), (6, 7)]


def test_after_freeze_ranges_stop_growing_but_late_rows_still_count() -> None:
    record = ChannelRecord()
    record.subscribed()
    record.command(position(0, 0))
    record.command(position(0, 2))  # the answer to the closing REPLICATE: rows 1, 2 on their way
    record.freeze()
    record.command(rdata(1, row(1)))
    record.command(rdata(2, row(2)))
    record.command(rdata(3, row(3)))  # after the window
    record.command(rdata(5, row(5), writer="other"))  # a pair first heard after it
    [rng] = record.ranges()
    assert (rng.after, rng.upto) == (0, 2)
    assert check_range(rng, [(t, row(t)) for t in (1, 2, 3)]).lost == ()


def test_streams_outside_the_filter_are_not_recorded() -> None:
    record = ChannelRecord(streams={"events"})
    record.subscribed()
    record.command(rdata(4, row(4)))
    assert record.ranges() == []


def test_a_row_published_once_matches_one_history_row_only() -> None:
    record = ChannelRecord()
    record.subscribed()
    record.command(rdata(1, row(1)))
    record.command(rdata(2, row(2)))
    [rng] = record.ranges()
    lost = check_range(rng, [(2, row(2)), (2, row(2))]).lost
    assert [x.token for x in lost] == [2]


@given(
    st.lists(st.tuples(st.integers(1, 3), st.booleans(), st.booleans()), min_size=1, max_size=40),
)
def test_what_is_lost_is_exactly_what_was_written_and_not_published(
    writes: list[tuple[int, bool, bool]],
) -> None:
    """A writer at tokens 1..n, each with 1-3 rows; some tokens never published
    (a POSITION steps over them, or nothing does).  The audit names exactly
    the unpublished rows after the first token heard."""
    record = ChannelRecord()
    record.subscribed()
    history: list[tuple[int, AnyRow]] = []
    unpublished: list[tuple[int, AnyRow]] = []
    first: int | None = None
    last_sent = 0
    for token, (count, published, announce) in enumerate(writes, start=1):
        rows = [row(token * 10 + i) for i in range(count)]
        history.extend((token, r) for r in rows)
        if published or first is None:
            for i, r in enumerate(rows):
                record.command(rdata(token if i == count - 1 else None, r))
            first = token if first is None else first
            last_sent = token
        else:
            unpublished.extend((token, r) for r in rows)
            if announce:
                record.command(position(last_sent, token))
                last_sent = token
    [rng] = record.ranges()
    lost = check_range(rng, history).lost
    assert [(x.token, x.row) for x in lost] == [(t, r) for t, r in unpublished if t <= rng.upto]
