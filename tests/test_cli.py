"""The ``synrepl`` command, run as users run it (a subprocess), against real
Redis and the simulated homeserver: help, errors, demo, watch, catchup, top.

``positions`` and ``doctor`` are in test_cli_positions.py and test_cli_doctor.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import redis as redis_py
import yaml
from client_helpers import sleep, unique_server_name, wait_until
from redis_server import RedisServer, free_port, redis_server_available
from test_cli_support import json_lines, kill_leftover_clis, start_cli, write_config
from twisted.internet import reactor

from synrepl.commands import UserIpCommand, UserSyncCommand, encode
from synrepl.streams import CurrentStateRow, EventRow, ReceiptsRow, TypingRow
from synrepl.testing.homeserver import FakeHomeserver

__all__ = ("kill_leftover_clis",)  # the fixture, used by every test here

SUBCOMMANDS = ("demo", "watch", "positions", "doctor", "catchup", "top")


def ev(n: int, room: str = "!room:test") -> EventRow:
    return EventRow(f"$e{n}", room, "m.room.message", None, None, None, None, False, False)


async def homeserver(**kwargs: Any) -> FakeHomeserver:
    hs = FakeHomeserver(reactor, server_name=unique_server_name(), **kwargs)
    await hs.start()
    return hs


def no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


@pytest_twisted.ensureDeferred
async def test_help_for_every_command_has_examples_and_exit_codes() -> None:
    """`synrepl --help` and `synrepl COMMAND --help` exit 0 and show examples
    and the exit statuses."""
    runs = [start_cli("--help")] + [start_cli(name, "--help") for name in SUBCOMMANDS]
    for cli in runs:
        assert await cli.wait() == 0, cli.stderr
        assert "examples:" in cli.stdout, cli
        assert "exit status" in cli.stdout, cli
    top_level = runs[0].stdout
    for name in SUBCOMMANDS:
        assert name in top_level


@pytest_twisted.ensureDeferred
async def test_bad_usage_and_bad_config_are_one_line_with_status_2(tmp_path: Path) -> None:
    """A config that cannot be read, an invalid one, bad arguments: one line
    on stderr, `synrepl: error: ...`, exit status 2, never a traceback."""
    not_yaml = tmp_path / "broken.yaml"
    not_yaml.write_text("server_name: [unclosed\n")
    inconsistent = tmp_path / "inconsistent.yaml"
    inconsistent.write_text(
        yaml.safe_dump(
            {
                "server_name": "example.com",
                "redis": {"enabled": True},
                "stream_writers": {"events": ["event_persister1"]},
            }
        )
    )
    runs = {
        "missing": start_cli("watch", "-c", str(tmp_path / "nope.yaml")),
        "yaml": start_cli("positions", "-c", str(not_yaml)),
        "writer": start_cli("watch", "-c", str(inconsistent)),
        "catchup": start_cli(
            "catchup",
            "events",
            "--writer",
            "x",
            "--from",
            "5",
            "--to",
            "1",
            "--server-name",
            "e.com",
        ),
        "nowhere": start_cli("watch"),
        "option": start_cli("top", "--interval", "-1"),
        "command": start_cli("watch", "--server-name", "e.com", "--command", "NOPE"),
    }
    for name, cli in runs.items():
        assert await cli.wait() == 2, (name, cli.stderr)
        no_traceback(cli.stderr)
        errors = [line for line in cli.stderr.splitlines() if line.startswith("synrepl: error:")]
        assert len(errors) == 1, (name, cli.stderr)
    assert "cannot read config file" in runs["missing"].stderr
    assert "not valid YAML" in runs["yaml"].stderr
    assert "writer 'event_persister1' is not in instance_map" in runs["writer"].stderr
    assert "add instance_map.event_persister1" in runs["writer"].stderr
    assert "--to (1) must be above --from (5)" in runs["catchup"].stderr
    assert "-c homeserver.yaml" in runs["nowhere"].stderr
    assert "unknown command NOPE" in runs["command"].stderr


@pytest_twisted.ensureDeferred
async def test_unreachable_redis_is_one_line_with_status_1() -> None:
    """Nothing listens on the Redis port: one line with a hint, exit status 1."""
    url = f"redis://127.0.0.1:{free_port()}"
    runs = [
        start_cli("watch", "--server-name", "e.com", "--redis-url", url),
        start_cli("positions", "--server-name", "e.com", "--redis-url", url),
        start_cli("top", "--server-name", "e.com", "--redis-url", url),
    ]
    for cli in runs:
        assert await cli.wait() == 1, cli.stderr
        no_traceback(cli.stderr)
        assert cli.stderr.count("\n") == 1, cli.stderr
        assert "synrepl: error: cannot connect to Redis at 127.0.0.1:" in cli.stderr
        assert "connection refused (is redis-server running there?" in cli.stderr


@pytest_twisted.ensureDeferred
async def test_demo_prints_decoded_traffic_and_a_summary() -> None:
    """`synrepl demo --duration` runs a simulated homeserver on the local Redis
    and prints its traffic decoded (events with their state rows, typing,
    ...), access tokens redacted, then a summary, and exits 0."""
    as_json = start_cli(
        "demo",
        "--duration",
        "3",
        "--rate",
        "20",
        "--seed",
        "7",
        "--json",
        "--server-name",
        unique_server_name(),
    )
    as_text = start_cli("demo", "--duration", "2", "--server-name", unique_server_name())
    assert await as_json.wait() == 0, as_json.stderr
    assert await as_text.wait() == 0, as_text.stderr
    records = json_lines(as_json.stdout)
    rows = [r for r in records if r["command"] == "RDATA"]
    assert {r["kind"] for r in rows if r["stream"] == "events"} == {"ev", "state"}
    assert {"events", "typing", "receipts"} <= {r["stream"] for r in rows}
    assert {r["writer"] for r in rows if r["stream"] == "events"} == {
        "event_persister1",
        "event_persister2",
    }
    for r in rows:
        assert isinstance(r["token"], int) and isinstance(r["row"], dict)
    user_ips = [r for r in records if r["command"] == "USER_IP"]
    assert user_ips and all(r["access_token"] == "<redacted>" for r in user_ips)
    assert "syt_" not in as_json.stdout + as_json.stderr
    assert "synrepl demo:" in as_json.stderr and "lines in" in as_json.stderr
    assert "RDATA" in as_text.stdout and "events" in as_text.stdout
    assert "synrepl demo:" in as_text.stderr


@pytest_twisted.ensureDeferred
async def test_watch_json_shape_batches_and_other_commands(tmp_path: Path) -> None:
    """Rows come out as {command, stream, writer, token, kind, row} with the
    token their batch belongs to; POSITION and USER_SYNC with their fields;
    Ctrl-C stops it with a summary on stderr and exit status 0."""
    hs = await homeserver(writers=("master", "persister1"))
    config = write_config(tmp_path / "homeserver.yaml", hs)
    cli = start_cli("watch", "-c", str(config), "--json")
    try:
        await cli.wait_for_stderr("synrepl watch:")
        room = "!r:test"
        token = hs.write(
            "events",
            [ev(1, room), CurrentStateRow(room, "m.room.topic", "", "$e1")],
            writer="persister1",
        )
        typing = hs.write("typing", [TypingRow(room, ("@a:test",))])
        hs.position("events", writer="master")
        await hs.publish_raw(encode(UserSyncCommand("sync1", "@a:test", "DEV", True, 1234)))
        await wait_until(lambda: "USER_SYNC" in cli.stdout, what="USER_SYNC printed")
    finally:
        cli.signal("INT")
        code = await cli.wait()
        await hs.stop()
    assert code == 0, cli.stderr
    records = [{k: v for k, v in r.items() if k != "ts"} for r in json_lines(cli.stdout)]
    assert records == [
        {
            "command": "RDATA",
            "stream": "events",
            "writer": "persister1",
            "token": token,
            "kind": "ev",
            "fetched": False,
            "row": {
                "event_id": "$e1",
                "room_id": room,
                "type": "m.room.message",
                "state_key": None,
                "redacts": None,
                "relates_to": None,
                "membership": None,
                "rejected": False,
                "outlier": False,
            },
        },
        {
            "command": "RDATA",
            "stream": "events",
            "writer": "persister1",
            "token": token,
            "kind": "state",
            "fetched": False,
            "row": {"room_id": room, "type": "m.room.topic", "state_key": "", "event_id": "$e1"},
        },
        {
            "command": "RDATA",
            "stream": "typing",
            "writer": "master",
            "token": typing,
            "kind": None,
            "fetched": False,
            "row": {"room_id": room, "user_ids": ["@a:test"]},
        },
        {
            "command": "POSITION",
            "stream": "events",
            "writer": "master",
            "prev_token": token,
            "new_token": token,
        },
        {
            "command": "USER_SYNC",
            "instance": "sync1",
            "user_id": "@a:test",
            "device_id": "DEV",
            "is_syncing": True,
            "last_sync_ms": 1234,
        },
    ]
    assert "synrepl watch: 5 lines in" in cli.stderr
    assert "RDATA 3" in cli.stderr


@pytest_twisted.ensureDeferred
async def test_watch_filters_by_stream_writer_and_command(tmp_path: Path) -> None:
    """--stream, --writer and --command show only what they name."""
    hs = await homeserver(writers=("master", "persister1"))
    config = str(write_config(tmp_path / "homeserver.yaml", hs))
    by_stream_writer = start_cli(
        "watch", "-c", config, "--json", "--stream", "events", "--writer", "persister1"
    )
    by_command = start_cli("watch", "-c", config, "--json", "--command", "POSITION,USER_SYNC")
    clis = (by_stream_writer, by_command)
    try:
        for cli in clis:
            await cli.wait_for_stderr("synrepl watch:")
        hs.write("events", [ev(1)], writer="master")
        hs.write("events", [ev(2)], writer="persister1")
        hs.write("typing", [TypingRow("!r:test", ())], writer="persister1")
        hs.position("typing", writer="master")
        await hs.publish_raw(encode(UserSyncCommand("sync1", "@a:test", None, False, 1)))
        await wait_until(lambda: "USER_SYNC" in by_command.stdout, what="USER_SYNC")
        await wait_until(lambda: "$e2" in by_stream_writer.stdout, what="$e2")
        await sleep(0.3)
    finally:
        for cli in clis:
            cli.signal("INT")
        for cli in clis:
            await cli.wait()
        await hs.stop()
    shown = json_lines(by_stream_writer.stdout)
    assert [(r["command"], r["stream"], r["writer"], r["row"]["event_id"]) for r in shown] == [
        ("RDATA", "events", "persister1", "$e2")
    ]
    assert [r["command"] for r in json_lines(by_command.stdout)] == ["POSITION", "USER_SYNC"]


@pytest_twisted.ensureDeferred
async def test_user_ip_access_tokens_are_redacted_unless_asked(tmp_path: Path) -> None:
    """USER_IP (on <server>/USER_IP) shows '<redacted>' for the access token,
    in text and JSON, unless --show-access-tokens."""
    hs = await homeserver()
    config = str(write_config(tmp_path / "homeserver.yaml", hs))
    clis = {
        "json": start_cli("watch", "-c", config, "--json"),
        "text": start_cli("watch", "-c", config),
        "clear": start_cli("watch", "-c", config, "--json", "--show-access-tokens"),
    }
    secret = "syt_c2VjcmV0_abcdefSECRET_1a2b3c"
    cmd = UserIpCommand("@a:test", secret, "10.0.0.1", "Element", "DEV", 99)
    publisher = redis_py.Redis(host="127.0.0.1", port=6379)
    try:
        for cli in clis.values():
            await cli.wait_for_stderr("synrepl watch:")
        publisher.publish(cmd.channel(hs.server_name), encode(cmd))
        for cli in clis.values():
            await wait_until(lambda cli=cli: "USER_IP" in cli.stdout, what="USER_IP")
    finally:
        publisher.close()
        for cli in clis.values():
            cli.signal("INT")
        for cli in clis.values():
            await cli.wait()
        await hs.stop()
    for name in ("json", "text"):
        assert secret not in clis[name].stdout + clis[name].stderr
        assert "<redacted>" in clis[name].stdout
    (shown,) = json_lines(clis["json"].stdout)
    assert shown["access_token"] == "<redacted>" and shown["ip"] == "10.0.0.1"
    (clear,) = json_lines(clis["clear"].stdout)
    assert clear["access_token"] == secret


@pytest.mark.skipif(not redis_server_available(), reason="no redis-server binary")
@pytest_twisted.ensureDeferred
async def test_watch_is_read_only_unless_replicate(tmp_path: Path) -> None:
    """Without --replicate watch publishes nothing (no REPLICATE; it does not
    even open a publishing connection) and still shows rows from the first
    line; with it, one REPLICATE goes out and the writers' POSITIONs show."""
    with RedisServer(tmp_path) as server:
        hs = FakeHomeserver(reactor, server_name=unique_server_name(), redis_port=server.port)
        await hs.start()
        hs.write("typing", [TypingRow("!r:test", ())])
        config = str(write_config(tmp_path / "homeserver.yaml", hs))
        client = server.client()
        sub = client.pubsub()
        sub.subscribe(hs.server_name, f"{hs.server_name}/USER_IP")
        seen: list[str] = []
        try:
            quiet = start_cli("watch", "-c", config, "--json")
            await quiet.wait_for_stderr("synrepl watch:")
            names = [c.get("name", "") for c in client.client_list()]
            assert "synrepl-watch-sub" in names and "synrepl-watch-pub" not in names
            token = hs.write("typing", [TypingRow("!r:test", ("@a:test",))])
            await wait_until(lambda: "typing" in quiet.stdout, what="row printed")
            await sleep(0.3)
            quiet.signal("INT")
            assert await quiet.wait() == 0
            assert hs.replicates_seen == 0
            (row,) = json_lines(quiet.stdout)
            assert (row["stream"], row["token"]) == ("typing", token)

            loud = start_cli("watch", "-c", config, "--json", "--replicate")
            await wait_until(lambda: hs.replicates_seen == 1, what="REPLICATE")
            await wait_until(lambda: "POSITION" in loud.stdout, what="POSITION printed")
            loud.signal("INT")
            assert await loud.wait() == 0
        finally:
            while (message := sub.get_message(timeout=0.1)) is not None:
                if message["type"] == "message":
                    seen.append(message["data"].decode())
            sub.close()
            await hs.stop()
    assert seen.count("REPLICATE ") == 1, seen
    assert [line for line in seen if not line.startswith(("RDATA", "POSITION", "REPLICATE"))] == []


@pytest_twisted.ensureDeferred
async def test_watch_resume_prints_exactly_the_rows_it_missed(tmp_path: Path) -> None:
    """With --resume, a restarted watch first fetches over HTTP the rows
    written while it was down (fetched: true), then goes on live: every row
    printed once over both runs, none missing."""
    hs = await homeserver(writers=("master", "persister1"), page_limit=3)
    hs.write("receipts", [ReceiptsRow("!r:test", "m.read", "@a:test", "$e0", None, {})])
    hs.write("events", [ev(0)], writer="persister1")
    config = str(write_config(tmp_path / "homeserver.yaml", hs))
    position_file = tmp_path / "watch.pos"
    args = ("watch", "-c", config, "--json", "--replicate", "--resume", str(position_file))

    def receipt(n: int) -> ReceiptsRow:
        return ReceiptsRow("!r:test", "m.read", "@a:test", f"$e{n}", None, {"ts": n})

    def printed(cli: Any) -> list[tuple[str, str, int, str, bool]]:
        return [
            (r["stream"], r["writer"], r["token"], r["row"]["event_id"], r["fetched"])
            for r in json_lines(cli.stdout)
            if r["command"] == "RDATA"
        ]

    first = start_cli(*args)
    try:
        await first.wait_for_stderr("synrepl watch:")
        await wait_until(lambda: hs.replicates_seen >= 1, what="REPLICATE")
        await sleep(0.5)
        live1 = [(hs.write("receipts", [receipt(n)]), n) for n in range(1, 4)]
        await wait_until(lambda: len(printed(first)) == 3, what="first run's rows")
    finally:
        first.signal("INT")
        assert await first.wait() == 0, first.stderr
    saved = json.loads(position_file.read_text())
    assert saved["server_name"] == hs.server_name
    assert saved["positions"]["receipts"]["master"] == live1[-1][0]

    missed = [(hs.write("receipts", [receipt(n)]), f"$e{n}") for n in range(4, 11)]
    missed_events = [(hs.write("events", [ev(n)], writer="persister1"), f"$e{n}") for n in (11, 12)]
    second = start_cli(*args)
    try:
        await second.wait_for_stderr("synrepl watch:")
        await wait_until(lambda: len(printed(second)) == 9, what="missed rows")
        live2 = hs.write("receipts", [receipt(13)])
        await wait_until(lambda: len(printed(second)) == 10, what="live row")
        await sleep(0.3)
    finally:
        second.signal("INT")
        assert await second.wait() == 0, second.stderr
        await hs.stop()
    rows = printed(second)
    fetched_receipts = [(t, e) for s, w, t, e, f in rows if s == "receipts" and f]
    assert fetched_receipts == missed
    fetched_events = [(t, e) for s, w, t, e, f in rows if s == "events" and f]
    assert fetched_events == missed_events
    assert [r for r in rows if not r[4]] == [("receipts", "master", live2, "$e13", False)]
    assert "rows fetched over HTTP" in second.stderr


@pytest_twisted.ensureDeferred
async def test_catchup_prints_a_range_page_by_page(tmp_path: Path) -> None:
    """catchup fetches (from, to] over HTTP in pages and prints every row
    once, in order, with its token; an unknown writer is a usage error and
    a refused secret a runtime failure, each one line."""
    hs = await homeserver(page_limit=4)
    tokens = [
        hs.write("receipts", [ReceiptsRow("!r:test", "m.read", "@a:test", f"$e{n}", None, {})])
        for n in range(1, 12)
    ]
    config = write_config(tmp_path / "homeserver.yaml", hs)
    wrong = write_config(tmp_path / "wrong.yaml", hs, worker_replication_secret="not-it")
    common = ("catchup", "receipts", "--writer", "main", "--from", str(tokens[1]))
    good = start_cli(*common, "--to", str(tokens[-2]), "-c", str(config), "--json")
    text = start_cli(*common, "--to", str(tokens[-1]), "-c", str(config))
    refused = start_cli(*common, "--to", str(tokens[-1]), "-c", str(wrong))
    unknown = start_cli(
        "catchup", "receipts", "--writer", "nobody", "--from", "0", "--to", "5", "-c", str(config)
    )
    try:
        assert await good.wait() == 0, good.stderr
        assert await text.wait() == 0, text.stderr
        assert await refused.wait() == 1
        assert await unknown.wait() == 2
    finally:
        await hs.stop()
    rows = json_lines(good.stdout)
    assert [(r["token"], r["row"]["event_id"], r["fetched"]) for r in rows] == [
        (t, f"$e{n}", True) for n, t in enumerate(tokens, start=1) if tokens[1] < t <= tokens[-2]
    ]
    assert "2 page(s)" in good.stderr  # 4 rows, then the last 4
    assert "$e11" in text.stdout and "$e2 " not in text.stdout
    for cli in (refused, unknown):
        no_traceback(cli.stderr)
        assert cli.stderr.count("synrepl: error:") == 1
    assert (
        "answered HTTP 500 M_UNKNOWN 'Internal server error': either it refused the "
        "replication secret" in refused.stderr
    )
    assert "'nobody' is not in instance_map" in unknown.stderr


@pytest_twisted.ensureDeferred
async def test_top_prints_rates_per_stream_and_writer(tmp_path: Path) -> None:
    """top --duration, with stdout not a terminal, prints plain blocks with
    rows/s, tokens and lag per stream and writer, then exits 0."""
    hs = await homeserver(writers=("master", "persister1"))
    config = str(write_config(tmp_path / "homeserver.yaml", hs))
    cli = start_cli("top", "-c", config, "--duration", "2.5", "--interval", "0.5")
    try:
        await wait_until(lambda: "synrepl top:" in cli.stdout, what="first block")
        for n in range(20):
            hs.write("events", [ev(n)], writer="master" if n % 4 else "persister1")
            await sleep(0.05)
        assert await cli.wait() == 0, cli.stderr
    finally:
        await hs.stop()
    blocks = cli.stdout.split("--- ")
    assert len(blocks) >= 4
    last = blocks[-1]
    assert "rows/s" in last and "lag" in last
    assert "persister1" in last and "master" in last
    assert "synrepl top:" in cli.stderr  # the summary
