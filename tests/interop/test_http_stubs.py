"""synrepl's HTTP replication stubs against a real Synapse main process (scenario 5).

- ``get_repl_stream_updates`` pages through more rows than Synapse puts in
  one answer, and the pages together are exactly the rows published live;
- ``presence_set_state`` changes what the client API reports;
- ``add_user_account_data`` and ``add_tag`` return only once the
  ``account_data`` row they caused has been delivered by the
  ``ReplicationClient`` (read-after-write through ``_INT_STREAM_POS``);
- a wrong ``worker_replication_secret`` is one request, one clear error.
"""

from __future__ import annotations

import time
from typing import Any

import attrs
import pytest
import pytest_twisted
from harness import Deployment
from matrix_api import Api, User
from repl import Observation
from twisted.internet import reactor
from twisted.web.client import Agent

from synrepl.config import Secret, load_config
from synrepl.http import HttpReplicationError, RetryPolicy
from synrepl.streams import AccountDataRow, PresenceRow, parse_row
from synrepl.twisted.http_client import ReplicationHttpClient

pytestmark = pytest.mark.main_only


async def new_user(api: Api, name: str) -> User:
    return await api.register(f"{name}{time.time_ns() % 10**12}")


@pytest_twisted.ensureDeferred
async def test_get_repl_stream_updates_pages_through_a_long_range(
    api: Api, obs: Observation
) -> None:
    """250 account_data rows are more than one page (Synapse answers at most
    100 rows): synrepl follows ``limited`` from ``upto_token`` and the pages
    together are, token for token, the rows published over Redis."""
    client, http = obs.client, obs.client.http  # type: ignore[union-attr]
    assert client is not None and http is not None
    alice = await new_user(api, "pager")
    start = client.positions()["account_data"]["master"]
    for n in range(250):
        await alice.set_account_data(f"org.example.page.{n}", {"n": n})
    rows = await obs.rec.wait_for(
        "250 account_data rows",
        "account_data",
        where=lambda r: r.user_id == alice.user_id,
        count=250,
    )
    end = client.positions()["account_data"]["master"]
    live = [
        (t, r)
        for (s, _, t), rs in sorted(obs.rec.keyed().items())
        if s == "account_data" and start < t <= end
        for r in rs
    ]
    assert len(live) >= len(rows) == 250

    pages = []
    token = start
    while True:
        page = await http.get_repl_stream_updates("master", "account_data", token, end)
        pages.append(page)
        if not page.limited:
            assert page.upto_token == end
            break
        assert start < page.upto_token < end
        token = page.upto_token
    assert len(pages) >= 3 and all(p.limited for p in pages[:-1])
    assert all(len(p.updates) <= 100 for p in pages)
    fetched = [(t, r) for p in pages for t, r in p.updates]
    assert fetched == live
    assert all(parse_row("account_data", r) == AccountDataRow.from_raw(r) for _, r in fetched)
    await obs.assert_matches_wire()


@pytest_twisted.ensureDeferred
async def test_presence_set_state(api: Api, obs: Observation) -> None:
    """``presence_set_state`` on the main process: the client API then
    reports that state, and the presence row is on replication."""
    http = obs.client.http  # type: ignore[union-attr]
    assert http is not None
    alice = await new_user(api, "presence")
    await http.presence_set_state(
        user_id=alice.user_id,
        device_id=alice.device_id,
        state={"presence": "unavailable", "status_msg": "set over replication"},
    )
    (row,) = await obs.rec.wait_for(
        "the presence row",
        "presence",
        where=lambda r: r.user_id == alice.user_id and r.state == "unavailable",
    )
    assert isinstance(row, PresenceRow) and row.status_msg == "set over replication"
    seen = await alice.presence_of(alice.user_id)
    assert (seen["presence"], seen["status_msg"]) == ("unavailable", "set over replication")
    await obs.assert_matches_wire()


# "client.http" pins a bug this suite found: the client's own HTTP client
# once took the config's instance name ("master" for a homeserver.yaml), so
# answers from the main process looked like its own writes and read-after-
# write was skipped.
@pytest.mark.parametrize("which", ["client.http", "explicit"])
@pytest_twisted.ensureDeferred
async def test_account_data_stubs_return_after_the_row_is_seen(
    api: Api, obs: Observation, which: str
) -> None:
    """``add_user_account_data`` and ``add_tag`` answer with the writer's
    ``account_data`` position; by the time the stub returns, synrepl's
    handlers have already been given the row at that position.

    ``client.http`` is the HTTP client the ReplicationClient made itself;
    ``explicit`` is one made by hand with the ReplicationClient as its
    position waiter and the client's instance name."""
    client = obs.client
    assert client is not None
    if which == "client.http":
        assert client.http is not None
        http = client.http
    else:
        http = ReplicationHttpClient(
            reactor, obs.config, position_waiter=client, instance_name=client.instance_name
        )
    # Spy on the waits, so that the check does not depend on whether Redis
    # or the HTTP answer happens to arrive first.
    waits: list[tuple[str, str, int]] = []
    original = client.wait_for_stream_position

    def spy(stream: str, writer: str, token: int) -> Any:
        waits.append((stream, writer, token))
        return original(stream, writer, token)

    client.wait_for_stream_position = spy  # type: ignore[method-assign]
    try:
        ids = await _stubs_wait_for_their_rows(api, obs, http)
        assert [w for w in waits if w[0] == "account_data"] == [
            ("account_data", "master", i) for i in ids
        ]
    finally:
        del client.wait_for_stream_position
        if which != "client.http":
            await http.close()


async def _stubs_wait_for_their_rows(
    api: Api, obs: Observation, http: ReplicationHttpClient
) -> tuple[int, int]:
    alice = await new_user(api, "writer")
    room = await alice.create_room()
    rec = obs.rec

    def rows_now(data_type: str) -> list[tuple[int, Any]]:
        return [
            (b.token, r)
            for b in rec.batches
            for r in b.rows
            if b.stream == "account_data"
            and r.user_id == alice.user_id
            and r.data_type == data_type
        ]

    stream_id = await http.add_user_account_data(
        user_id=alice.user_id, account_data_type="org.example.stub", content={"via": "synrepl"}
    )
    # No waiting here: the row must already be there.
    assert rows_now("org.example.stub") == [
        (stream_id, AccountDataRow(alice.user_id, None, "org.example.stub"))
    ]
    assert await alice.get_account_data("org.example.stub") == {"via": "synrepl"}

    tag_id = await http.add_tag(
        user_id=alice.user_id, room_id=room, tag="u.synrepl", content={"order": 0.5}
    )
    assert tag_id > stream_id
    assert rows_now("m.tag") == [(tag_id, AccountDataRow(alice.user_id, room, "m.tag"))]
    assert await alice.tags(room) == {"u.synrepl": {"order": 0.5}}
    await obs.assert_matches_wire()
    return stream_id, tag_id


@attrs.define
class CountingAgent:
    """An Agent that counts the requests it makes."""

    agent: Any
    requests: list[bytes] = attrs.Factory(list)

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None):  # type: ignore[no-untyped-def]
        self.requests.append(uri)
        return self.agent.request(method, uri, headers, bodyProducer)


@pytest_twisted.ensureDeferred
async def test_wrong_secret_is_one_request_and_a_clear_error(
    api: Api, main_only: Deployment
) -> None:
    """Synapse 1.163.2 answers a wrong replication secret with a 500; synrepl
    does not retry an error answer and says what the likely cause is."""
    config = load_config(*main_only.config_files["master"])
    wrong = attrs.evolve(config, worker_replication_secret=Secret("not-the-secret"))
    agent = CountingAgent(Agent(reactor))
    http = ReplicationHttpClient(reactor, wrong, agent=agent, retry=RetryPolicy())
    alice = await new_user(api, "secret")
    with pytest.raises(HttpReplicationError) as raised:
        await http.add_user_account_data(
            user_id=alice.user_id, account_data_type="org.example.never", content={}
        )
    error = raised.value
    assert error.status == 500
    assert "worker_replication_secret" in str(error)
    assert "not-the-secret" not in str(error) and "not-the-secret" not in repr(error)
    assert len(agent.requests) == 1
    # Nothing was written.
    with pytest.raises(AssertionError, match="404"):
        await alice.get_account_data("org.example.never")
    # And get_repl_stream_updates fails the same way, once.
    with pytest.raises(HttpReplicationError):
        await http.get_repl_stream_updates("master", "account_data", 0, 1)
    assert len(agent.requests) == 2
