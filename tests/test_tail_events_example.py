"""examples/tail_events.py, run as users would, against the simulated
homeserver on a private Redis that is restarted under it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
import yaml
from client_helpers import sleep, unique_server_name, wait_until
from redis_server import RedisServer, redis_server_available
from twisted.internet import reactor

from synrepl.connection import TransportOptions
from synrepl.streams import CurrentStateRow, EventRow
from synrepl.testing.homeserver import FakeHomeserver

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tail_events.py"


def ev(n: int, writer_room: str) -> EventRow:
    return EventRow(f"$e{n}", writer_room, "m.room.message", None, None, None, None, False, False)


@pytest.mark.skipif(not redis_server_available(), reason="no redis-server binary")
@pytest_twisted.ensureDeferred
async def test_tail_events_prints_every_event_once_across_a_redis_restart(tmp_path: Path) -> None:
    """One JSON object per ev row (event_id, room_id, type, writer, token), in
    order, none lost or repeated although Redis restarts mid-stream; state
    rows are not printed."""
    with RedisServer(tmp_path) as server:
        hs = FakeHomeserver(
            reactor,
            server_name=unique_server_name(),
            writers=("master", "persister1"),
            redis_port=server.port,
            transport_options=TransportOptions(max_backoff=0.5),
        )
        await hs.start()
        hs.write("events", [ev(0, "!a:test")], writer="master")
        hs.write("events", [ev(0, "!b:test")], writer="persister1")
        config_file = tmp_path / "homeserver.yaml"
        config_file.write_text(yaml.safe_dump(hs.config_dict()))
        out_file = tmp_path / "out.jsonl"
        with out_file.open("w") as out:
            proc = subprocess.Popen(  # noqa: ASYNC220 - started once, not awaited
                [sys.executable, str(EXAMPLE), "-c", str(config_file)],
                stdout=out,
                stderr=subprocess.PIPE,
            )
        try:
            await wait_until(lambda: hs.replicates_seen >= 1, timeout=30, what="REPLICATE")
            await sleep(0.3)
            expected: list[dict[str, object]] = []
            for n in range(1, 41):
                writer = "master" if n % 2 else "persister1"
                room = "!a:test" if writer == "master" else "!b:test"
                rows = [ev(n, room), CurrentStateRow(room, "m.topic", "", f"$e{n}")]
                token = hs.write("events", rows, writer=writer)
                expected.append(
                    {
                        "event_id": f"$e{n}",
                        "room_id": room,
                        "type": "m.room.message",
                        "writer": writer,
                        "token": token,
                    }
                )
                if n == 20:
                    server.kill()
                    await sleep(0.3)
                    server.start()
                await sleep(0.02)

            def printed() -> list[dict[str, object]]:
                return [json.loads(line) for line in out_file.read_text().splitlines()]

            # The example reconnects within its backoff (at most 5 s); until
            # then, and until a POSITION reveals what it missed, keep going.
            for _ in range(150):
                if len(printed()) >= len(expected):
                    break
                hs.position("events", writer="master")
                hs.position("events", writer="persister1")
                await sleep(0.2)
            got = printed()
            by_writer = {w: [e for e in got if e["writer"] == w] for w in ("master", "persister1")}
            for writer in ("master", "persister1"):
                assert by_writer[writer] == [e for e in expected if e["writer"] == writer]
            assert len(got) == len(expected)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
            await hs.stop()
