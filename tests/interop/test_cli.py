"""The `synrepl` command against real Synapse: watch --json, positions, doctor."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest_twisted
import yaml
from harness import Deployment, subscribers
from matrix_api import Api
from twisted.internet import reactor, task


def synrepl(*args: str) -> list[str]:
    return [sys.executable, "-m", "synrepl", *args]


def config_args(files: Sequence[Path]) -> list[str]:
    return [arg for path in files for arg in ("-c", str(path))]


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the command in a thread-free way: poll it from the reactor."""
    proc = subprocess.Popen(  # noqa: ASYNC220 - polled below, the reactor keeps running
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{argv} did not finish in {timeout} s")
        await sleep(0.1)
    out, err = proc.communicate()
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@pytest_twisted.ensureDeferred
async def test_watch_json_prints_the_typed_rows_of_real_events(
    main_only: Deployment, api: Api, tmp_path: Path
) -> None:
    """`synrepl watch --json` (read-only) prints each RDATA of a real message
    as one object with command, stream, writer, token, kind and the row's fields."""
    before = subscribers(main_only.redis_port, main_only.server_name)
    out = tmp_path / "watch.jsonl"
    with out.open("w") as sink:
        proc = subprocess.Popen(  # noqa: ASYNC220 - polled below
            synrepl(
                "watch",
                "--json",
                "--duration",
                "20",
                *config_args(main_only.config_files["master"]),
            ),
            stdout=sink,
            stderr=subprocess.PIPE,
            text=True,
        )
    try:
        for _ in range(200):
            if subscribers(main_only.redis_port, main_only.server_name) > before:
                break
            await sleep(0.05)
        user = await api.register(f"watcher{int(time.time() * 1000) % 10**8}")
        room = await user.create_room()
        event_id = await user.message(room, "seen by synrepl watch")

        def records() -> list[dict[str, Any]]:
            return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]

        for _ in range(200):
            if any(r.get("row", {}).get("event_id") == event_id for r in records()):
                break
            await sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    matching = [
        r for r in records() if r.get("command") == "RDATA" and r["row"].get("event_id") == event_id
    ]
    assert matching, out.read_text()[-2000:]
    ev = next(r for r in matching if r["kind"] == "ev")
    assert ev["stream"] == "events" and ev["writer"] == "master" and isinstance(ev["token"], int)
    assert ev["row"]["room_id"] == room and ev["row"]["type"] == "m.room.message"
    assert set(ev["row"]) >= {"event_id", "room_id", "type", "state_key", "rejected", "outlier"}
    assert not any(r.get("command") == "REPLICATE" for r in records())


@pytest_twisted.ensureDeferred
async def test_positions_names_every_writer_of_the_cluster(cluster: Deployment) -> None:
    """`synrepl positions --json` on the multi-writer cluster: both event
    persisters answer for events, the minimum is the lower token, and the
    typing and to_device writers answer for their streams."""
    result = await run(
        synrepl(
            "positions", "--json", "--window", "3", *config_args(cluster.config_files["master"])
        )
    )
    assert result.returncode in (0, 3), result.stderr
    table = json.loads(result.stdout)
    events = table["streams"]["events"]
    assert {"persister1", "persister2"} <= set(events["writers"])
    tokens = [w["token"] for w in events["writers"].values() if w["answered"]]
    assert events["minimum"] == min(tokens)
    assert "typing1" in table["streams"]["typing"]["writers"]
    assert "writer1" in table["streams"]["to_device"]["writers"]


@pytest_twisted.ensureDeferred
async def test_doctor_passes_on_a_right_config_and_names_the_fix_for_a_wrong_secret(
    main_only: Deployment, tmp_path: Path
) -> None:
    """`synrepl doctor` exits 0 on the real deployment's config, and 1 with a
    line naming the replication secret when the secret is wrong."""
    files = main_only.config_files["master"]
    good = await run(synrepl("doctor", "--listen", "1", *config_args(files)))
    assert good.returncode == 0, good.stdout + good.stderr
    data = {}
    for path in files:
        data.update(yaml.safe_load(Path(path).read_text()))
    data["worker_replication_secret"] = "not-the-secret"
    wrong = tmp_path / "wrong-secret.yaml"
    wrong.write_text(yaml.safe_dump(data))
    bad = await run(synrepl("doctor", "--listen", "1", "-c", str(wrong)))
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "secret" in (bad.stdout + bad.stderr).lower()
    assert "not-the-secret" not in bad.stdout + bad.stderr
