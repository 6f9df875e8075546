"""MONITOR lines read back exactly: whatever bytes a client sends, the parsed
arguments are those bytes, as a real redis-server reports them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis_server import RedisServer

from synrepl.monitor import MonitorEntry, parse_monitor_line


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("monitor")) as s:
        yield s


@pytest.fixture(scope="module")
def monitor(server: RedisServer) -> Iterator[redis.Connection]:
    conn = redis.Connection(port=server.port, socket_timeout=5)
    conn.connect()  # type: ignore[no-untyped-call]
    conn.send_command("MONITOR")  # type: ignore[no-untyped-call]
    assert conn.read_response() == b"OK"
    yield conn
    conn.disconnect()  # type: ignore[no-untyped-call]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(channel=st.binary(min_size=1, max_size=20), payload=st.binary(max_size=200))
def test_published_bytes_come_back_exactly(
    server: RedisServer, monitor: redis.Connection, channel: bytes, payload: bytes
) -> None:
    with redis.Redis(port=server.port) as client:
        client.publish(channel, payload)
        entry = _next_publish(monitor)
    assert entry.args[1:] == (channel, payload)
    assert entry.command == "publish"
    assert entry.db == 0
    assert entry.client.startswith("127.0.0.1:")


def _next_publish(conn: redis.Connection) -> MonitorEntry:
    while True:
        entry = parse_monitor_line(conn.read_response(disable_decoding=True))
        if entry.command == "publish":
            return entry


def test_an_entry_from_a_script_and_from_a_unix_socket() -> None:
    entry = parse_monitor_line('1796217319.483237 [3 lua] "publish" "x" "a \\"b\\"\\x00"')
    assert entry == MonitorEntry(1796217319.483237, 3, "lua", (b"publish", b"x", b'a "b"\x00'))
    entry = parse_monitor_line('1.5 [0 unix:/run/redis.sock] "SUBSCRIBE" "chan"')
    assert (entry.client, entry.command, entry.args[1]) == (
        "unix:/run/redis.sock",
        "subscribe",
        b"chan",
    )


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("OK", "no '\\[db client\\]'"),
        ('soon [0 127.0.0.1:1] "ping"', "bad time or db"),
        ('1.0 [0 127.0.0.1:1] "ping', "not closed"),
        ("1.0 [0 127.0.0.1:1] ping", "does not start with a quote"),
        ('1.0 [0 127.0.0.1:1] "p\\qing"', "bad escape"),
    ],
)
def test_what_is_not_a_monitor_line_is_said(line: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_monitor_line(line)
