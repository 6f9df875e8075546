"""The realistic strategies draw what Synapse writes: Matrix identifiers in
their grammar, and event rows whose fields agree with their type."""

from __future__ import annotations

import re

from hypothesis import find, given
from hypothesis import strategies as st

from synrepl.commands import RdataCommand, encode, parse_line
from synrepl.streams import EventRow
from synrepl.testing import strategies as rs

SERVER = re.compile(
    r"([a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+|\d+(\.\d+){3})(:\d+)?"
)


@given(rs.user_ids(), rs.room_ids(), rs.event_ids(), rs.server_names())
def test_identifiers_follow_the_matrix_grammar(
    user: str, room: str, event: str, server: str
) -> None:
    assert re.fullmatch(r"@[a-z0-9._=/+-]+:" + SERVER.pattern, user)
    assert re.fullmatch(r"![A-Za-z]{18}:" + SERVER.pattern, room)
    assert re.fullmatch(r"\$[A-Za-z0-9_-]{43}", event)
    assert SERVER.fullmatch(server)
    assert len(user) <= 255


@given(rs.event_rows())
def test_event_rows_agree_with_their_type_and_survive_the_wire(row: EventRow) -> None:
    if row.type == "m.room.member":
        assert row.state_key is not None and row.state_key.startswith("@")
        assert row.membership in ("join", "leave", "invite", "ban", "knock")
    elif row.type in rs.STATE_TYPES:
        assert row.state_key == "" and row.membership is None
    else:
        assert row.state_key is None and row.membership is None
    assert (row.redacts is not None) == (row.type == "m.room.redaction")
    if row.type == "m.reaction":
        assert row.relates_to is not None
    cmd = RdataCommand("events", "persister1", 7, row)
    assert parse_line(encode(cmd)) == cmd


def test_messages_come_often_and_can_be_asked_for_alone() -> None:
    """The complaint that started these strategies: rows(EventRow) never drew
    an m.room.message.  Here one is found at once, and types=just(...) gives
    nothing else."""
    found = find(rs.event_rows(), lambda r: r.type == "m.room.message")
    assert found.type == "m.room.message"

    @given(rs.event_rows(st.just("m.room.message"), room_id="!room:example.com"))
    def only_messages(row: EventRow) -> None:
        assert row.type == "m.room.message" and row.room_id == "!room:example.com"

    only_messages()
