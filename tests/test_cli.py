"""The ``synrepl`` command, run as users run it (a subprocess), against real
Redis and the simulated homeserver: help, errors, demo, watch (its filters,
full events from a database or an admin API, --resume read-only), catchup, top.

``positions`` and ``doctor`` are in test_cli_positions.py and test_cli_doctor.py.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import redis as redis_py
import yaml
from client_helpers import sleep, unique_server_name, wait_until
from redis_server import RedisServer, free_port, redis_server_available
from test_cli_support import (
    FakeAdminApi,
    SynapseDb,
    json_lines,
    kill_leftover_clis,
    run_synrepl_blocking,
    start_cli,
    write_config,
    write_event,
)
from twisted.internet import reactor

from synrepl.cli._render import Output, event_record
from synrepl.commands import UserIpCommand, UserSyncCommand, encode
from synrepl.events import FullEvent, MissingEvent
from synrepl.streams import AllStateRow, CurrentStateRow, EventRow, ReceiptsRow, TypingRow
from synrepl.testing.homeserver import FakeHomeserver

__all__ = ("kill_leftover_clis",)  # the fixture, used by every test here

SUBCOMMANDS = ("demo", "watch", "positions", "doctor", "catchup", "top", "exporter")


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


def row(
    n: int, room: str = "!a:test", type: str = "m.room.message", state_key: str | None = None
) -> EventRow:
    return EventRow(f"$e{n}", room, type, state_key, None, None, None, False, False)


@pytest_twisted.ensureDeferred
async def test_watch_room_and_type_filter_the_events_rows(tmp_path: Path) -> None:
    """--room and --type (shell wildcards) select events rows by what the row
    names, without any content: ev rows by room and type, state rows by the
    state entry's room and type, state-all rows by room. Alone they show only
    the events stream; with --stream, the other streams named are unaffected."""
    hs = await homeserver()
    config = str(write_config(tmp_path / "homeserver.yaml", hs))
    filtered = ("--room", "!a:test", "--type", "m.room.m*")
    alone = start_cli("watch", "-c", config, "--json", *filtered)
    with_typing = start_cli("watch", "-c", config, "--json", *filtered, "--stream", "events,typing")
    clis = (alone, with_typing)
    try:
        for cli in clis:
            await cli.wait_for_stderr("synrepl watch:")
        hs.write("events", [row(1), row(2, room="!b:test")])
        hs.write(
            "events", [row(3, type="m.reaction"), row(4, type="m.room.member", state_key="@x")]
        )
        hs.write(
            "events",
            [
                CurrentStateRow("!a:test", "m.room.member", "@x", "$e4"),
                CurrentStateRow("!a:test", "m.room.topic", "", "$e5"),
                CurrentStateRow("!b:test", "m.room.member", "@x", "$e6"),
                AllStateRow("!a:test"),
                AllStateRow("!b:test"),
            ],
        )
        hs.write("typing", [TypingRow("!b:test", ("@x",))])
        await wait_until(lambda: "typing" in with_typing.stdout, what="typing row")
        await sleep(0.3)
    finally:
        for cli in clis:
            cli.signal("INT")
        for cli in clis:
            assert await cli.wait() == 0, cli.stderr
        await hs.stop()

    def shown(cli: Any) -> list[tuple[str, str | None, Any]]:
        return [
            (r["stream"], r["kind"], r["row"].get("event_id", r["row"].get("type")))
            for r in json_lines(cli.stdout)
        ]

    events = [
        ("events", "ev", "$e1"),
        ("events", "ev", "$e4"),
        ("events", "state", "$e4"),
        ("events", "state-all", None),
    ]
    assert shown(alone) == events
    assert shown(with_typing) == [*events, ("typing", None, None)]
    assert "RDATA 10" in alone.stderr  # every row counted, shown or not


def test_full_events_render_as_one_safe_line_each() -> None:
    """Text output of EVENT records: a message as `ROOM SENDER: BODY`, a
    redacted or encrypted one said so, a state event with its fields, a
    rejected one with the reason, a missing one named; every character a
    sender chose that is not printable (newline, escape, bidi override) is
    escaped, so each event stays one line that cannot drive the terminal."""
    events: list[FullEvent | MissingEvent] = [
        FullEvent("$1", "!r:t", "m.room.message", "@a:t", content={"body": "a\u202eb\nc\x1b[2J"}),
        FullEvent("$2", "!r:t", "m.room.message", "@a:t", redacted=True, redacted_by="$9"),
        FullEvent("$3", "!r:t", "m.room.encrypted", "@a:t", content={"ciphertext": "xyz"}),
        FullEvent(
            "$4",
            "!r:t",
            "m.room.member",
            "@a:t",
            state_key="@b:t",
            content={"membership": "join", "displayname": "B\nob"},
            rejected=True,
            rejection_reason="auth_error",
        ),
        MissingEvent("$5", "!r:t", "m.room.message", "not found after 6 attempts"),
    ]
    out = io.StringIO()
    output = Output(json_mode=False, color="never", file=out)
    for n, event in enumerate(events, start=1):
        output.emit(event_record("events", "master", n, event, ts=0.0))
    lines = out.getvalue().splitlines()
    assert len(lines) == len(events)
    assert [" ".join(line.split()[5:]) for line in lines] == [
        "!r:t @a:t: a\\u202eb\\nc\\u001b[2J",
        "!r:t @a:t: (redacted)",
        "!r:t @a:t: (encrypted)",
        (
            '!r:t @a:t m.room.member state_key=@b:t membership=join displayname="B\\nob" '
            "(rejected: auth_error)"
        ),
        "!r:t no content for $5 (m.room.message): not found after 6 attempts",
    ]
    assert [line.split()[1:5] for line in lines] == [
        ["EVENT", "events", "master", str(n)] for n in range(1, 6)
    ]
    assert not any(c in out.getvalue() for c in "\x1b\u202e")


def database_config(tmp_path: Path, hs: FakeHomeserver, db: SynapseDb) -> str:
    """homeserver.yaml for ``hs`` with ``db`` as its SQLite database."""
    database = {"name": "sqlite3", "args": {"database": str(db.path)}}
    return str(write_config(tmp_path / "homeserver.yaml", hs, database=database))


def message(body: str, msgtype: str = "m.text") -> dict[str, Any]:
    return {"msgtype": msgtype, "body": body}


def shown_events(cli: Any) -> list[tuple[str, str, str | None, bool]]:
    """(event ID, sender, body, fetched) of each EVENT printed as JSON."""
    return [
        (
            r["event"]["event_id"],
            r["event"]["sender"],
            r["event"]["content"].get("body"),
            r["fetched"],
        )
        for r in json_lines(cli.stdout)
        if r["command"] == "EVENT"
    ]


@pytest_twisted.ensureDeferred
async def test_watch_full_prints_whole_events_from_the_database(tmp_path: Path) -> None:
    """--full reads each event from the SQLite database homeserver.yaml
    names, read-only (no REPLICATE): JSON has every FullEvent field; text is
    `ROOM SENDER: BODY` for messages (escaped, so a body cannot break the line
    or drive the terminal) and the content's fields for state events;
    --sender (implying --full) keeps one user's events."""
    hs = await homeserver()
    db = SynapseDb(tmp_path / "homeserver.db")
    write_event(hs, db, "$e0", "!a:test", "@alice:test", message("before the watch"))
    config = database_config(tmp_path, hs, db)
    as_json = start_cli("watch", "-c", config, "--full", "--json")
    as_text = start_cli("watch", "-c", config, "--full", "--color", "never")
    alice = start_cli("watch", "-c", config, "--sender", "@alice:test", "--color", "never")
    clis = (as_json, as_text, alice)
    try:
        for cli in clis:
            await cli.wait_for_stderr("synrepl watch:")
        first = write_event(hs, db, "$e1", "!a:test", "@alice:test", message("hello\nworld\x1b[2J"))
        write_event(hs, db, "$e2", "!a:test", "@bob:test", message("cat.png", "m.image"))
        topic = {"topic": "the topic"}
        write_event(
            hs, db, "$e3", "!a:test", "@alice:test", topic, type="m.room.topic", state_key=""
        )
        for cli in clis:
            await wait_until(lambda cli=cli: "m.room.topic" in cli.stdout, what="the topic")
        await sleep(0.3)
    finally:
        for cli in clis:
            cli.signal("INT")
        for cli in clis:
            assert await cli.wait() == 0, cli.stderr
        await hs.stop()
        db.close()
    assert hs.replicates_seen == 0
    records = [{k: v for k, v in r.items() if k != "ts"} for r in json_lines(as_json.stdout)]
    assert records[0] == {
        "command": "EVENT",
        "stream": "events",
        "writer": "master",
        "token": first,
        "event": {
            "event_id": "$e1",
            "room_id": "!a:test",
            "type": "m.room.message",
            "sender": "@alice:test",
            "state_key": None,
            "content": {"msgtype": "m.text", "body": "hello\nworld\x1b[2J"},
            "origin_server_ts": 1_700_000_000_000 + first,
            "unsigned": {"age_ts": 1_700_000_000_000},
            "redacts": None,
            "room_version": "10",
            "rejected": False,
            "rejection_reason": None,
            "outlier": False,
            "redacted": False,
            "redacted_by": None,
        },
        "missing": None,
        "fetched": True,  # the first token after connecting comes over HTTP
    }
    assert [(r["event"]["event_id"], r["fetched"]) for r in records] == [
        ("$e1", True),
        ("$e2", False),
        ("$e3", False),
    ]
    lines = [line.split(" ", 1)[1] for line in as_text.stdout.splitlines()]
    assert [" ".join(line.split()[4:]) for line in lines] == [
        "!a:test @alice:test: hello\\nworld\\u001b[2J (fetched)",
        "!a:test @bob:test: [m.image] cat.png",
        '!a:test @alice:test m.room.topic state_key="" topic="the topic"',
    ]
    assert "\x1b" not in as_text.stdout
    assert [line.split()[1:4] for line in lines] == [
        ["events", "master", str(first + n)] for n in range(3)
    ]
    assert "$e2" not in alice.stdout and "@bob:test" not in alice.stdout
    assert alice.stdout.count("@alice:test") == 2
    assert f"events read from SQLite '{db.path}'" in as_json.stderr
    assert "3 events read" in as_json.stderr


@pytest_twisted.ensureDeferred
async def test_watch_full_reads_the_admin_api_and_never_shows_the_token(tmp_path: Path) -> None:
    """--admin-url with --admin-token-file reads each event from the admin
    API with the admin's token, which appears nowhere; a token the API
    refuses is one error line at start, exit status 1."""
    hs = await homeserver()
    db = SynapseDb(tmp_path / "homeserver.db")
    token = "syt_YWRtaW4_SECRETadminTOKEN_0a1b2c"
    api = FakeAdminApi(db, token)
    url = api.listen()
    good, wrong = tmp_path / "admin.token", tmp_path / "wrong.token"
    good.write_text(token + "\n")
    wrong.write_text("syt_not_an_admin_WRONGtoken\n")
    write_event(hs, db, "$e0", "!a:test", "@alice:test", message("before"))
    config = str(write_config(tmp_path / "homeserver.yaml", hs))
    common = ("watch", "-c", config, "--full", "--admin-url", url)
    cli = start_cli(*common, "--admin-token-file", str(good), "--json")
    refused = start_cli(*common, "--admin-token-file", str(wrong))
    try:
        await cli.wait_for_stderr("synrepl watch:")
        write_event(hs, db, "$e1", "!a:test", "@alice:test", message("over the admin API"))
        write_event(hs, db, "$e2", "!a:test", "@bob:test", message("me too"))
        await wait_until(lambda: "$e2" in cli.stdout, what="$e2")
        assert await refused.wait() == 1
    finally:
        cli.signal("INT")
        assert await cli.wait() == 0, cli.stderr
        await hs.stop()
        await api.stop()
        db.close()
    assert [(e, s, b) for e, s, b, _ in shown_events(cli)] == [
        ("$e1", "@alice:test", "over the admin API"),
        ("$e2", "@bob:test", "me too"),
    ]
    assert f"events read from the admin API at {url}" in cli.stderr
    assert "/_synapse/admin/v1/fetch_event/$e1" in api.requests
    for run in (cli, refused):
        assert token not in run.stdout + run.stderr
        assert "WRONGtoken" not in run.stdout + run.stderr
    no_traceback(refused.stderr)
    assert refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.startswith(
        f"synrepl: error: cannot read events from the admin API at {url}"
    )
    assert "the access token is not a server admin's" in refused.stderr


def test_watch_full_without_a_usable_source_is_one_line(tmp_path: Path) -> None:
    """No source for --full, contradicting options, a bad filter: one line,
    exit status 2, before Redis is tried; a database that cannot be read:
    one line, exit status 1. Neither a token nor a password is ever shown."""
    bare = tmp_path / "homeserver.yaml"
    bare.write_text(yaml.safe_dump({"server_name": "e.test", "redis": {"enabled": True}}))
    token = tmp_path / "admin.token"
    token.write_text("syt_TOKENthatmustnotshow\n")
    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    watch = ("watch", "--server-name", "e.test", "--redis-url", "redis://127.0.0.1:1")

    def admin(url: str, token_file: Path = token) -> tuple[str, ...]:
        return (*watch, "--full", "--admin-url", url, "--admin-token-file", str(token_file))

    no_database = (
        "--full reads each event from Synapse's database, but the config has no database "
        "section; pass --database DSN|PATH, or --admin-url URL --admin-token-file FILE"
    )
    usage: dict[str, tuple[tuple[str, ...], str]] = {
        "no database": (("watch", "-c", str(bare), "--full"), no_database),
        "no config": (
            (*watch, "--sender", "@a:e.test"),
            "--full reads each event from Synapse's database, but no -c homeserver.yaml given",
        ),
        "url alone": (
            (*watch, "--full", "--admin-url", "http://127.0.0.1:1"),
            "--admin-url and --admin-token-file go together",
        ),
        "database without full": (
            (*watch, "--database", "x.db"),
            "--database says where --full reads events; add --full",
        ),
        "both": (
            (*admin("http://h"), "--database", "x.db"),
            "read events from --database or from --admin-url, not both",
        ),
        "credentials in the url": (
            admin("http://admin:hunter2pw@h"),
            "--admin-url must not carry credentials",
        ),
        "token in the url": (
            admin("http://h/?access_token=hunter2pw"),
            "--admin-url must not carry a query",
        ),
        "no token file": (
            admin("http://h", tmp_path / "nope"),
            f"--admin-token-file: cannot read the secret file '{tmp_path / 'nope'}'",
        ),
        "empty token file": (
            admin("http://h", empty),
            f"--admin-token-file: '{empty}' is empty",
        ),
        "bad connection string": (
            (*watch, "--full", "--database", "host=db password=hunter2 pw"),
            "--database: libpq cannot read this connection string (not shown",
        ),
        "an alias": (
            (*watch, "--room", "#lobby:e.test"),
            "--room takes a room ID (!opaque:server), got '#lobby:e.test' (that is an alias",
        ),
        "a wildcard room": (
            (*watch, "--room", "!a*:e.test"),
            "--room: no wildcards here, got '!a*:e.test'",
        ),
        "not a user": (
            (*watch, "--sender", "alice"),
            "--sender takes a user ID (@user:server) or a pattern",
        ),
        "empty type": ((*watch, "--type", ""), "--type: empty pattern"),
        "events left out": (
            (*watch, "--stream", "typing", "--full"),
            "are about the events stream, which --stream leaves out; add events to --stream",
        ),
    }
    for name, (args, expected) in usage.items():
        result = run_synrepl_blocking(*args)
        assert result.returncode == 2, (name, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("synrepl: error: "), (name, lines)
        assert expected in lines[0], (name, lines[0])
        for secret in ("TOKENthatmustnotshow", "hunter2"):
            assert secret not in result.stdout + result.stderr, name
    missing = tmp_path / "no" / "such.db"
    unreadable = run_synrepl_blocking(*watch, "--full", "--database", str(missing))
    assert unreadable.returncode == 1, unreadable.stderr
    assert unreadable.stderr.count("\n") == 1, unreadable.stderr
    assert unreadable.stderr.startswith(
        f"synrepl: error: cannot read events from SQLite '{missing}': "
    )
    no_traceback(unreadable.stderr)


@pytest_twisted.ensureDeferred
async def test_watch_resume_read_only_alone_prints_exactly_the_rows_it_missed(
    tmp_path: Path,
) -> None:
    """--resume on its own, read-only, with writers that never send POSITION
    (nobody sends REPLICATE): each writer is started at its own first row; a
    writer still silent is named after --silent-after; once every writer has
    a position, FILE holds them all and watch says so; restarted, watch
    prints each writer's missed rows as soon as it writes again, then goes
    on live: every row once over the runs, none missing."""
    hs = await homeserver(writers=("master", "persister1"), page_limit=3)
    hs.write("receipts", [ReceiptsRow("!r:test", "m.read", "@a:test", "$e0", None, {})])
    hs.write("events", [ev(0)], writer="persister1")
    config = str(write_config(tmp_path / "homeserver.yaml", hs))
    position_file = tmp_path / "watch.pos"
    args = ("watch", "-c", config, "--json", "--stream", "events,receipts")
    args += ("--resume", str(position_file), "--silent-after", "1")

    def receipt(n: int) -> ReceiptsRow:
        return ReceiptsRow("!r:test", "m.read", "@a:test", f"$e{n}", None, {"ts": n})

    def printed(cli: Any) -> list[tuple[str, int, str, bool]]:
        return [
            (r["stream"], r["token"], r["row"]["event_id"], r["fetched"])
            for r in json_lines(cli.stdout)
        ]

    first = start_cli(*args)
    try:
        await first.wait_for_stderr("synrepl watch:")
        assert "from now, positions kept in" in first.stderr
        r1 = hs.write("receipts", [receipt(1)])
        await first.wait_for_stderr("no position yet, after 1 s, from events: persister1")
        assert "ready" not in first.stderr
        e1 = hs.write("events", [ev(1)], writer="persister1")
        await first.wait_for_stderr("synrepl watch: ready: every writer has a position")
        # Saved while running, not only on exit (ready can come before e1's
        # batch is handled, so the save holding e1 may be the one after it):
        expected = {"receipts": {"master": r1}, "events": {"persister1": e1}}
        await wait_until(
            lambda: (
                position_file.exists()
                and json.loads(position_file.read_text())["positions"] == expected
            ),
            what=f"{expected} saved",
        )
        r2 = hs.write("receipts", [receipt(2)])
        await wait_until(lambda: len(printed(first)) == 3, what="first run's rows")
    finally:
        first.signal("INT")
        assert await first.wait() == 0, first.stderr
    assert printed(first) == [
        ("receipts", r1, "$e1", True),
        ("events", e1, "$e1", True),
        ("receipts", r2, "$e2", False),
    ]
    saved = json.loads(position_file.read_text())["positions"]
    assert saved == {"receipts": {"master": r2}, "events": {"persister1": e1}}

    missed = [
        ("receipts", hs.write("receipts", [receipt(n)]), f"$e{n}", True) for n in range(3, 10)
    ]
    missed += [("events", hs.write("events", [ev(n)], writer="persister1"), f"$e{n}", True) for n in (10, 11)]  # fmt: skip
    second = start_cli(*args)
    try:
        await second.wait_for_stderr("synrepl watch: ready: every writer has a position")
        assert f"resuming from '{position_file}': each writer's missed rows" in second.stderr
        await sleep(0.5)
        assert printed(second) == []  # nothing until a writer writes again
        trigger = [
            ("receipts", hs.write("receipts", [receipt(12)]), "$e12", True),
            ("events", hs.write("events", [ev(13)], writer="persister1"), "$e13", True),
        ]
        await wait_until(lambda: len(printed(second)) == len(missed) + 2, what="missed rows")
        live = ("receipts", hs.write("receipts", [receipt(14)]), "$e14", False)
        await wait_until(lambda: len(printed(second)) == len(missed) + 3, what="live row")
        await sleep(0.3)
    finally:
        second.signal("INT")
        assert await second.wait() == 0, second.stderr
        await hs.stop()
    rows = printed(second)
    for stream in ("receipts", "events"):
        assert [r for r in rows if r[0] == stream] == [
            r for r in [*missed, *trigger, live] if r[0] == stream
        ]
    assert hs.replicates_seen == 0
    assert "no position yet" not in second.stderr


@pytest_twisted.ensureDeferred
async def test_watch_resume_does_not_save_a_batch_cut_short_by_a_closed_stdout(
    tmp_path: Path,
) -> None:
    """`watch --resume FILE | head -n 1`: head leaves after the first row;
    the next batch (two rows) meets a closed stdout, so it is not saved as
    seen, and the next run prints it, whole, when the writer speaks again."""
    hs = await homeserver()
    hs.write("typing", [TypingRow("!r0:test", ())])
    config = str(write_config(tmp_path / "homeserver.yaml", hs))
    position_file = tmp_path / "watch.pos"
    args = ["watch", "-c", config, "--json", "--stream", "typing", "--resume", str(position_file)]
    command = " ".join([sys.executable, "-m", "synrepl", *args]) + " | head -n 1"
    out, err = tmp_path / "head.out", tmp_path / "head.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        # A shell for the pipe; polled below, so the reactor keeps running.
        piped = subprocess.Popen(command, shell=True, stdout=stdout, stderr=stderr)  # noqa: ASYNC220
    try:
        await wait_until(lambda: "synrepl watch:" in err.read_text(), what="banner")
        first = hs.write("typing", [TypingRow("!r1:test", ("@a:test",))])
        await wait_until(lambda: "!r1:test" in out.read_text(), what="first row")
        batch = hs.write("typing", [TypingRow("!r2:test", ("@a:test",)), TypingRow("!r3:test", ())])
        await wait_until(lambda: piped.poll() is not None, timeout=20, what="the pipeline's end")
        assert piped.returncode == 0, err.read_text()
        assert [r["row"]["room_id"] for r in json_lines(out.read_text())] == ["!r1:test"]
        assert json.loads(position_file.read_text())["positions"] == {"typing": {"master": first}}
        again = start_cli(*args)
        await again.wait_for_stderr("synrepl watch: ready")
        later = hs.write("typing", [TypingRow("!r4:test", ())])  # the writer speaks again
        await wait_until(lambda: len(json_lines(again.stdout)) == 3, what="the batch again")
        again.signal("INT")
        assert await again.wait() == 0, again.stderr
    finally:
        if piped.poll() is None:
            piped.kill()
        await hs.stop()
    rows = [(r["token"], r["row"]["room_id"]) for r in json_lines(again.stdout)]
    assert rows == [(batch, "!r2:test"), (batch, "!r3:test"), (later, "!r4:test")]


@pytest_twisted.ensureDeferred
async def test_watch_resume_full_starts_from_the_database_and_resumes(tmp_path: Path) -> None:
    """--resume with --full, from now: the database gives every events
    writer's position at start, so FILE is complete and watch ready before
    any writer speaks; restarted, it prints the chosen sender's missed
    messages with their bodies, once each."""
    hs = await homeserver(writers=("master", "persister1"))
    db = SynapseDb(tmp_path / "homeserver.db")
    seed = write_event(hs, db, "$e0", "!a:test", "@alice:test", message("old"), writer="persister1")
    config = database_config(tmp_path, hs, db)
    position_file = tmp_path / "watch.pos"
    args = (
        "watch",
        "-c",
        config,
        "--json",
        "--sender",
        "@alice:test",
        "--resume",
        str(position_file),
    )

    def say(n: int, sender: str = "@alice:test") -> int:
        return write_event(
            hs, db, f"$e{n}", "!a:test", sender, message(f"m{n}"), writer="persister1"
        )

    first = start_cli(*args)
    try:
        await first.wait_for_stderr("synrepl watch: ready: every writer has a position")
        saved = json.loads(position_file.read_text())["positions"]
        assert saved == {"events": {"persister1": seed}}
        say(1)
        say(2, "@bob:test")
        await wait_until(lambda: len(shown_events(first)) == 1, what="first message")
        await sleep(0.3)
    finally:
        first.signal("INT")
        assert await first.wait() == 0, first.stderr
    for n in range(3, 7):
        say(n, "@alice:test" if n % 2 else "@bob:test")
    second = start_cli(*args)
    try:
        await second.wait_for_stderr("synrepl watch: ready")
        say(7)
        await wait_until(lambda: "$e7" in second.stdout, what="$e7")
        say(8)
        await wait_until(lambda: "$e8" in second.stdout, what="$e8")
        await sleep(0.3)
    finally:
        second.signal("INT")
        assert await second.wait() == 0, second.stderr
        await hs.stop()
        db.close()
    assert shown_events(first) == [("$e1", "@alice:test", "m1", True)]
    assert shown_events(second) == [
        ("$e3", "@alice:test", "m3", True),
        ("$e5", "@alice:test", "m5", True),
        ("$e7", "@alice:test", "m7", True),
        ("$e8", "@alice:test", "m8", False),
    ]
    assert hs.replicates_seen == 0


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
