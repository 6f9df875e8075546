"""``synrepl exporter`` as users run it (a subprocess), against the
FakeHomeserver on real Redis, scraped over real HTTP."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from client_helpers import poll_until, unique_server_name
from prometheus_helpers import Samples, check_metrics, check_rules, samples
from redis_server import free_port
from test_cli_support import kill_leftover_clis, run_cli, start_cli, write_config
from twisted.internet import reactor, threads

from synrepl.cli._errors import UsageError
from synrepl.cli.exporter import parse_listen
from synrepl.streams import EventRow
from synrepl.testing.homeserver import FakeHomeserver

__all__ = ("kill_leftover_clis",)


def ev(n: int) -> EventRow:
    return EventRow(f"$e{n}", "!room:test", "m.room.message", None, None, None, None, False, False)


async def homeserver(**kwargs: Any) -> FakeHomeserver:
    hs = FakeHomeserver(reactor, server_name=unique_server_name(), **kwargs)
    await hs.start()
    return hs


def scrape(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return bytes(answer.read())


def pair(stream: str, writer: str) -> tuple[tuple[str, str], ...]:
    return (("stream", stream), ("writer", writer))


def test_listen_address_is_checked() -> None:
    assert parse_listen("127.0.0.1:9469") == ("127.0.0.1", 9469)
    assert parse_listen("[::1]:80") == ("::1", 80)
    for bad in ("9469", "host:", ":80", "host:port", "h:70000"):
        with pytest.raises(UsageError, match="HOST:PORT"):
            parse_listen(bad)


@pytest_twisted.ensureDeferred
async def test_exporter_serves_positions_lag_silence_and_its_health(tmp_path: Path) -> None:
    hs = await homeserver(writers=("master", "persister1", "persister2"))
    config = str(write_config(tmp_path / "homeserver.yaml", hs))
    port = free_port()
    cli = start_cli("exporter", "-c", config, "--listen", f"127.0.0.1:{port}")
    try:
        await cli.wait_for_stderr("metrics on http://127.0.0.1:")
        for n in range(5):
            hs.write("events", [ev(n)], writer="persister1")
        hs.write("caches", [["get_user_by_id", ["@u:test"], 1]], writer="master")
        await hs.publish_raw("RDATA events persister1 7 not json")

        async def scraped() -> Samples:
            return samples(await threads.deferToThread(scrape, port))

        first = await poll_until(
            scraped,
            lambda got: got.get(("synrepl_exporter_bad_lines_total", ()), 0) == 1,
            what="every line seen",
        )
        newest = hs.token("events")
        assert first["synrepl_stream_position", pair("events", "persister1")] == newest
        assert first["synrepl_stream_rows_total", pair("events", "persister1")] == 5
        assert first["synrepl_stream_writer_silent", pair("events", "persister1")] == 0
        assert first["synrepl_stream_writer_silent", pair("events", "persister2")] == 1
        assert ("synrepl_stream_minimum_position", (("stream", "events"),)) not in first
        rdata = (("command", "RDATA"), ("sender", "persister1"))
        assert first["synrepl_commands_total", rdata] == 5  # the bad line did not parse
        assert first["synrepl_exporter_redis_connected", ()] == 1
        assert first["synrepl_exporter_lines_total", ()] == 7

        hs.write("events", [ev(9)], writer="persister2")
        hs.position("events", writer="persister1")  # persister1 moves on without rows

        later = await poll_until(
            scraped,
            lambda got: (
                got.get(("synrepl_stream_writer_silent", pair("events", "persister2"))) == 0
            ),
            what="persister2's row",
        )
        top = hs.token("events")
        assert later["synrepl_stream_position", pair("events", "persister2")] == top
        assert later["synrepl_stream_position", pair("events", "persister1")] == top
        assert later["synrepl_stream_minimum_position", (("stream", "events"),)] == top
        assert later["synrepl_stream_writer_lag_tokens", pair("events", "persister1")] == 0
        assert later["synrepl_stream_writer_last_row_age_seconds", pair("events", "persister1")] > 0
        exposition = await threads.deferToThread(scrape, port)
    finally:
        cli.signal("INT")
        status = await cli.wait()
        await hs.stop()
    assert status == 0, cli.stderr
    check_metrics(exposition)


@pytest_twisted.ensureDeferred
async def test_exporter_that_cannot_listen_says_so(tmp_path: Path) -> None:
    hs = await homeserver()
    config = str(write_config(tmp_path / "homeserver.yaml", hs))
    try:
        cli = await run_cli("exporter", "-c", config, "--listen", "192.0.2.1:80")
    finally:
        await hs.stop()
    assert cli.code == 1
    assert "cannot listen on 192.0.2.1:80" in cli.stderr
    assert "Traceback" not in cli.stderr


REPO = Path(__file__).resolve().parent.parent


def test_the_grafana_dashboard_queries_parse_and_name_documented_metrics(tmp_path: Path) -> None:
    """Every query of docs/grafana-dashboard.json is valid PromQL (promtool
    checks it as a recording rule) and uses only metrics docs/metrics.md lists."""
    dashboard = json.loads((REPO / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    documented = set(
        re.findall(
            r"^\| `(synrepl_[a-z_]+)`", (REPO / "docs" / "metrics.md").read_text(), re.MULTILINE
        )
    )
    for expr in exprs:
        for name in re.findall(r"synrepl_[a-z_]+", expr):
            assert re.sub(r"_bucket$", "", name) in documented, (name, expr)
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"synrepl:dashboard_{n}", "expr": e.replace("$stream", ".*")}
                    for n, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps(rules))
    check_rules(path)


def test_cluster_view_keeps_the_newest_token_lag_and_minimum() -> None:
    """The view on its own clock: a writer at token 0 counts, a restarted
    writer's lower token is its newest, a silent configured writer hides
    the minimum."""
    from synrepl.cli._cluster import ClusterView
    from synrepl.commands import parse_line
    from synrepl.config import config_from_dict

    config = config_from_dict(
        {
            "server_name": "test",
            "instance_map": {
                "main": {"host": "127.0.0.1", "port": 1},
                "p1": {"host": "127.0.0.1", "port": 2},
                "p2": {"host": "127.0.0.1", "port": 3},
            },
            "stream_writers": {"events": ["p1", "p2"]},
        }
    )
    view = ClusterView(config)
    view.saw(parse_line("POSITION events p1 0 0"), now=101.0)
    assert view.minimum("events") is None and view.silent("events", "p2")
    view.saw(parse_line("POSITION events p2 0 7"), now=102.0)
    assert view.lag("events", "p1") == 7 and view.lag("events", "p2") == 0
    assert view.minimum("events") == 0
    view.saw(parse_line("POSITION typing master 40 2"), now=103.0)  # restarted lower
    assert view.token("typing", "master") == 2
    assert view.commands["p2", "POSITION"] == 1
