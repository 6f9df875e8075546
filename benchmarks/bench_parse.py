"""Parse throughput: synrepl against Synapse's own parse path, in one run.

Baseline: what a Synapse worker does with each line it receives:
``parse_command_from_line`` and, for RDATA, the stream's ``parse_row``.
Measured against it, over every line of the repository's corpus/:

* ``synrepl.parse_line`` -- every command parsed, every row typed;
* ``synrepl.SelectiveParser(streams={STREAM})`` -- a caller that wants one
  stream's rows (and its POSITIONs), skipping the rest undecoded.

Run: ``python benchmarks/bench_parse.py [--rounds N] [--stream events]``.
Reports commands/second and the ratio to the baseline (best of N rounds).
This is a benchmark, not a test: it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import synrepl

CORPUS_FILES = ("replication-corpus.jsonl", "replication-corpus-pg.jsonl")


def corpus_lines() -> list[str]:
    """Every line of the repository's corpus (``SYNREPL_CORPUS_DIR`` overrides it)."""
    folder = Path(
        os.environ.get("SYNREPL_CORPUS_DIR") or Path(__file__).resolve().parents[1] / "corpus"
    )
    lines: list[str] = []
    for name in CORPUS_FILES:
        path = folder / name
        opener: Any = open if path.is_file() else gzip.open
        with opener(path if path.is_file() else folder / f"{name}.gz", "rt", encoding="utf-8") as f:
            lines.extend(json.loads(entry)["line"] for entry in f)
    return lines


def synapse_parser() -> Callable[[str], Any]:
    from synapse.replication.tcp.commands import RdataCommand, parse_command_from_line
    from synapse.replication.tcp.streams import STREAMS_MAP

    def parse(line: str) -> Any:
        cmd = parse_command_from_line(line)
        if isinstance(cmd, RdataCommand):
            return STREAMS_MAP[cmd.stream_name].parse_row(cmd.row)
        return cmd

    return parse


def best_rate(parse: Callable[[str], Any], lines: Sequence[str], rounds: int) -> float:
    """Lines per second, best of ``rounds`` passes (the least disturbed one)."""
    best = float("inf")
    for _ in range(rounds):
        gc.collect()
        start = time.perf_counter()
        for line in lines:
            parse(line)
        best = min(best, time.perf_counter() - start)
    return len(lines) / best


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--stream", default="events", help="the one stream of the selective run")
    ap.add_argument(
        "--each-stream",
        action="store_true",
        help="also the selective ratio for every stream in the corpus",
    )
    args = ap.parse_args(argv)

    lines = corpus_lines()
    wanted = sum(
        1 for line in lines if line.split(" ", 2)[1:2] == [args.stream] and line[:1] in "RP"
    )
    candidates = {
        "synapse (baseline)": synapse_parser(),
        "synrepl parse_line": synrepl.parse_line,
        f"synrepl SelectiveParser({args.stream})": synrepl.SelectiveParser(
            streams={args.stream}, commands={"RDATA", "POSITION"}
        ),
    }
    for parse in candidates.values():  # warm up: imports, caches, branch predictors
        for line in lines[:2000]:
            parse(line)
    print(f"{len(lines)} corpus lines; {wanted} are {args.stream} RDATA/POSITION")
    print(f"Python {sys.version.split()[0]}, best of {args.rounds} rounds")
    baseline = None
    for label, parse in candidates.items():
        rate = best_rate(parse, lines, args.rounds)
        baseline = baseline or rate
        print(f"  {label:<40} {rate:>12,.0f} commands/s   {rate / baseline:5.2f}x")
    if args.each_stream:
        print("SelectiveParser(one stream), against the same baseline:")
        streams = sorted({line.split(" ", 2)[1] for line in lines if line.startswith("RDATA ")})
        for stream in streams:
            select = synrepl.SelectiveParser(streams={stream}, commands={"RDATA", "POSITION"})
            share = sum(1 for line in lines if line.startswith(f"RDATA {stream} ")) / len(lines)
            rate = best_rate(select, lines, args.rounds)
            print(f"  {stream:<24} {share:6.1%} of lines   {rate / baseline:5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
