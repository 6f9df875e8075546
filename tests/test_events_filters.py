"""EventFilter: what the replication row decides, what needs the full event,
and that the two never disagree."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from synrepl.events import EventFilter, FullEvent
from synrepl.streams import EventRow

ROOMS = ("!a:hs", "!b:hs", "!c:hs")
TYPES = ("m.room.message", "m.room.member", "m.room.topic", "m.reaction", "org.custom.x")
SENDERS = ("@alice:hs", "@bob:hs", "@_bridge_x:hs", "@carol:other")
MEMBERSHIPS = ("join", "leave", "invite", "ban", "knock")


def row(
    type: str = "m.room.message",
    room: str = "!a:hs",
    membership: str | None = None,
    rejected: bool = False,
    event_id: str = "$e",
) -> EventRow:
    state_key = "@alice:hs" if type == "m.room.member" else None
    return EventRow(event_id, room, type, state_key, None, None, membership, rejected, False)


def event_for(r: EventRow, sender: str = "@alice:hs") -> FullEvent:
    """The full event a row describes."""
    content: dict[str, Any] = {"body": "x"}
    if r.type == "m.room.member" and r.membership is not None:
        content = {"membership": r.membership}
    return FullEvent(
        event_id=r.event_id,
        room_id=r.room_id,
        type=r.type,
        sender=sender,
        state_key=r.state_key,
        content=content,
        rejected=r.rejected,
        rejection_reason="auth" if r.rejected else None,
    )


# ---------------------------------------------------------------- examples


def test_no_criteria_accepts_everything_from_the_row() -> None:
    f = EventFilter()
    assert f.row_decides(row()) is True
    assert f.accepts(event_for(row())) is True


def test_room_filter_refuses_other_rooms_without_content() -> None:
    f = EventFilter(rooms=["!a:hs"])
    assert f.row_decides(row(room="!a:hs")) is True
    assert f.row_decides(row(room="!b:hs")) is False


def test_type_wildcards_are_shell_style() -> None:
    f = EventFilter(types=["m.room.*", "org.?ustom.[xy]"])
    assert f.row_decides(row("m.room.message")) is True
    assert f.row_decides(row("m.room.member", membership="join")) is True
    assert f.row_decides(row("org.custom.x")) is True
    assert f.row_decides(row("org.custom.z")) is False
    assert f.row_decides(row("m.reaction")) is False
    # case sensitive, anchored at both ends
    assert f.row_decides(row("M.ROOM.MESSAGE")) is False
    assert f.row_decides(row("xm.room.message")) is False


def test_exact_type_is_not_a_prefix() -> None:
    f = EventFilter(types=["m.room"])
    assert f.row_decides(row("m.room.message")) is False


def test_sender_filter_needs_the_full_event() -> None:
    f = EventFilter(senders=["@_bridge_*:hs"])
    r = row()
    assert f.row_decides(r) is None
    assert f.accepts(event_for(r, "@_bridge_x:hs")) is True
    assert f.accepts(event_for(r, "@alice:hs")) is False


def test_a_refusing_criterion_beats_an_undecided_sender() -> None:
    f = EventFilter(rooms=["!a:hs"], senders=["@alice:hs"])
    assert f.row_decides(row(room="!b:hs")) is False
    assert f.row_decides(row(room="!a:hs")) is None


def test_memberships_only_restrict_member_events() -> None:
    f = EventFilter(memberships=["join"])
    assert f.row_decides(row("m.room.member", membership="join")) is True
    assert f.row_decides(row("m.room.member", membership="leave")) is False
    assert f.row_decides(row("m.room.message")) is True


def test_member_row_without_membership_waits_for_the_event() -> None:
    f = EventFilter(memberships=["join"])
    r = row("m.room.member", membership=None)
    assert f.row_decides(r) is None
    joined = FullEvent("$e", "!a:hs", "m.room.member", "@a:hs", "@a:hs", {"membership": "join"})
    assert f.accepts(joined) is True


def test_rejected_events_can_be_left_out() -> None:
    assert EventFilter().row_decides(row(rejected=True)) is True
    f = EventFilter(include_rejected=False)
    assert f.row_decides(row(rejected=True)) is False
    assert f.accepts(event_for(row(rejected=True))) is False
    assert f.row_decides(row()) is True


def test_wanted_keeps_rows_to_fetch_in_order() -> None:
    f = EventFilter(rooms=["!a:hs"], senders=["@alice:hs"])
    rows = [row(room="!a:hs", event_id="$1"), row(room="!b:hs", event_id="$2")]
    rows.append(row(room="!a:hs", event_id="$3"))
    assert [r.event_id for r in f.wanted(rows)] == ["$1", "$3"]


def test_filters_compare_by_their_criteria() -> None:
    assert EventFilter(types=["m.*"]) == EventFilter(types=("m.*",))
    assert EventFilter(types=["m.*", "m.*"]).types == ("m.*",)
    assert hash(EventFilter(rooms=["!a:hs"])) == hash(EventFilter(rooms=["!a:hs"]))


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("name", ["rooms", "types", "senders", "memberships"])
def test_empty_list_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name} is empty"):
        EventFilter(**{name: []})


@pytest.mark.parametrize("name", ["rooms", "types", "senders", "memberships"])
@pytest.mark.parametrize("pattern", ["", "   "])
def test_empty_pattern_is_refused(name: str, pattern: str) -> None:
    with pytest.raises(ValueError, match="empty pattern"):
        EventFilter(**{name: [pattern]})


def test_bare_string_is_refused() -> None:
    with pytest.raises(TypeError, match="must be a list of strings"):
        EventFilter(types="m.room.*")  # type: ignore[arg-type]


def test_non_string_item_is_refused() -> None:
    with pytest.raises(TypeError, match="not a string"):
        EventFilter(senders=["@a:hs", 3])  # type: ignore[list-item]


def test_padded_pattern_is_refused() -> None:
    with pytest.raises(ValueError, match="leading or trailing spaces"):
        EventFilter(types=[" m.room.message"])


@pytest.mark.parametrize("name", ["rooms", "memberships"])
def test_wildcards_only_where_they_mean_something(name: str) -> None:
    with pytest.raises(ValueError, match="no wildcards"):
        EventFilter(**{name: ["!*"]})


# ---------------------------------------------------------------- properties


def _criteria(values: tuple[str, ...], wild: bool) -> st.SearchStrategy[list[str] | None]:
    items = st.sampled_from(values)
    if wild:
        items = items | st.sampled_from(("m.room.*", "m.*", "*", "org.*.x", "@_bridge_*:hs"))
    return st.none() | st.lists(items, min_size=1, max_size=3)


filters = st.builds(
    EventFilter,
    rooms=_criteria(ROOMS, False),
    types=_criteria(TYPES, True),
    senders=_criteria(SENDERS, True),
    memberships=_criteria(MEMBERSHIPS, False),
    include_rejected=st.booleans(),
)


@st.composite
def rows_and_events(draw: st.DrawFn) -> tuple[EventRow, FullEvent]:
    type = draw(st.sampled_from(TYPES))
    membership = draw(st.sampled_from(MEMBERSHIPS)) if type == "m.room.member" else None
    r = row(type, draw(st.sampled_from(ROOMS)), membership, draw(st.booleans()))
    return r, event_for(r, draw(st.sampled_from(SENDERS)))


@given(filters, rows_and_events())
def test_row_verdict_never_contradicts_the_full_event(
    f: EventFilter, pair: tuple[EventRow, FullEvent]
) -> None:
    """Whatever the row decides, the full event decides the same: a refused
    row is never an event the observer wanted."""
    r, event = pair
    verdict = f.row_decides(r)
    if verdict is not None:
        assert verdict == f.accepts(event)


@given(filters, rows_and_events())
def test_only_senders_leave_a_complete_row_undecided(
    f: EventFilter, pair: tuple[EventRow, FullEvent]
) -> None:
    r, _ = pair
    if f.senders is None:
        assert f.row_decides(r) is not None


@given(rows_and_events())
def test_unrestricted_filter_accepts_all(pair: tuple[EventRow, FullEvent]) -> None:
    r, event = pair
    assert EventFilter().row_decides(r) is True
    assert EventFilter().accepts(event) is True


@given(st.lists(st.sampled_from(TYPES), min_size=1), rows_and_events())
def test_exact_types_match_by_set_membership(
    types: list[str], pair: tuple[EventRow, FullEvent]
) -> None:
    r, _ = pair
    assert (EventFilter(types=types).row_decides(r) is True) == (r.type in types)
