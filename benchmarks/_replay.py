"""The benchmarks' traffic and server: the corpus, renumbered, replayed into a private redis-server.

Not a benchmark itself: ``bench_e2e``, ``bench_watch`` and ``bench_memory``
import it (run them from this folder, or with it on ``sys.path``).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from synrepl.config import RedisConfig

CORPUS_FILES = ("replication-corpus.jsonl", "replication-corpus-pg.jsonl")

Entries = list[tuple[str, str]]


def corpus_segments() -> list[Entries]:
    """``(channel, line)`` of each corpus file (``SYNREPL_CORPUS_DIR`` overrides corpus/)."""
    folder = Path(
        os.environ.get("SYNREPL_CORPUS_DIR") or Path(__file__).resolve().parents[1] / "corpus"
    )
    segments = []
    for name in CORPUS_FILES:
        path = folder / name
        opener: Any = open if path.is_file() else gzip.open
        with opener(path if path.is_file() else folder / f"{name}.gz", "rt", encoding="utf-8") as f:
            segments.append([(d["channel"], d["line"]) for d in map(json.loads, f)])
    return segments


_RDATA = re.compile(r"RDATA (\S+) (\S+) (\d+) ")
_POSITION = re.compile(r"POSITION (\S+) (\S+) (\d+) (\d+)$")


def renumbered(segments: Sequence[Entries], repeat: int) -> Entries:
    """The segments, ``repeat`` times over, each stream's tokens shifted past
    the previous segment's so that they keep increasing (the two files come
    from different servers; their tokens would otherwise go backwards)."""
    base: dict[str, int] = {}
    out: Entries = []
    for _ in range(repeat):
        for segment in segments:
            top: dict[str, int] = {}
            out.extend((channel, _shifted(line, base, top)) for channel, line in segment)
            base.update(top)
    return out


def _shifted(line: str, base: dict[str, int], top: dict[str, int]) -> str:
    """``line`` with its stream tokens moved up by ``base``; ``top`` keeps the highest."""

    def shift(stream: str, token: str) -> str:
        new = base.get(stream, 0) + int(token)
        top[stream] = max(top.get(stream, 0), new)
        return str(new)

    if m := _RDATA.match(line):
        stream, instance, token = m.groups()
        return f"RDATA {stream} {instance} {shift(stream, token)} {line[m.end() :]}"
    if m := _POSITION.match(line):
        stream, instance, prev, new = m.groups()
        return f"POSITION {stream} {instance} {shift(stream, prev)} {shift(stream, new)}"
    return line


class PrivateRedis:
    """A redis-server on a free port with an unlimited pub/sub output buffer,
    so the whole backlog waits for the subscriber."""

    def __init__(self, executable: str) -> None:
        self.directory = tempfile.mkdtemp(prefix="synrepl-bench-")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        args = [executable, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", self.directory]
        args += ["--client-output-buffer-limit", "pubsub 0 0 0"]
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        self.client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=30)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)

    @property
    def config(self) -> RedisConfig:
        return RedisConfig(enabled=True, host="127.0.0.1", port=self.port)

    def publish(self, entries: Entries) -> None:
        """PUBLISH every entry (see :func:`publish`)."""
        publish(self.client, entries)

    def close(self) -> None:
        self.client.close()
        self.process.kill()
        self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


def publish(client: Any, entries: Entries) -> None:
    """PUBLISH every entry with ``client`` (redis-py), pipelined; each must
    reach exactly one subscriber."""
    received = 0
    for start in range(0, len(entries), 5000):
        pipe = client.pipeline(transaction=False)
        for channel, line in entries[start : start + 5000]:
            pipe.publish(channel, line)
        received += sum(pipe.execute())
    if received != len(entries):
        raise RuntimeError(f"{received} of {len(entries)} messages reached a subscriber")
