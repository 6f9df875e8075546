"""Parse throughput: synrepl against Synapse's own parse path, in one run.

Baseline: what a Synapse worker does with each line it receives:
``parse_command_from_line`` and, for RDATA, the stream's ``parse_row``.
Measured against it, over every line of the repository's corpus/:

* ``synrepl.parse_line`` -- every command parsed, every row typed: over the
  mixed corpus, then per command type and per RDATA stream;
* ``synrepl.SelectiveParser(streams={STREAM})`` -- a caller that wants one
  stream's rows (and its POSITIONs), skipping the rest undecoded: for
  ``--stream`` over the mixed corpus, then for every stream in the corpus.

Run: ``python benchmarks/bench_parse.py [--rounds N] [--stream events]
[--no-tables]``; about a minute for 7 rounds on two cores.
Every round times the baseline and the candidates on the same lines,
taking turns chunk by chunk and counting CPU time, so each ratio compares
runs that shared the machine's state; the report gives the median ratio
over the rounds and its spread (lowest-highest).  On a shared machine the
ratios are what to read, not the absolute rates.
This is a benchmark, not a test: it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from _replay import corpus_segments

import synrepl

#: Lines timed per round for one command type / stream (small groups repeat).
GROUP_PASS_LINES = 12_000
#: Lines each side parses in turn before the next one takes over.
CHUNK_LINES = 500

#: The speed goals of issue 12, as ratios to the baseline.
GOAL_MIXED, GOAL_PER_TYPE, GOAL_SELECTIVE = 2.0, 1.5, 5.0

Parse = Callable[[str], Any]


def corpus_lines() -> list[str]:
    """Every line of the repository's corpus, in file order (see :mod:`_replay`)."""
    return [line for segment in corpus_segments() for _, line in segment]


def synapse_parser() -> Parse:
    from synapse.replication.tcp.commands import RdataCommand, parse_command_from_line
    from synapse.replication.tcp.streams import STREAMS_MAP

    def parse(line: str) -> Any:
        cmd = parse_command_from_line(line)
        if isinstance(cmd, RdataCommand):
            return STREAMS_MAP[cmd.stream_name].parse_row(cmd.row)
        return cmd

    return parse


def group_of(line: str) -> str:
    """``RDATA <stream>`` for rows, else the command name: a table row."""
    name, _, args = line.partition(" ")
    return f"RDATA {args.partition(' ')[0]}" if name == "RDATA" else name


def compare(
    baseline: Parse, candidates: dict[str, Parse], lines: Sequence[str]
) -> tuple[float, dict[str, float]]:
    """CPU seconds of the baseline and of each candidate over ``lines``.

    The lines go by in chunks, each parsed by every side in turn (the order
    rotating from chunk to chunk), so a burst of load on the shared machine
    weighs on all sides alike; CPU time leaves out the time other processes
    hold the cores.
    """
    sides = [("", baseline), *candidates.items()]
    totals = dict.fromkeys((label for label, _ in sides), 0.0)
    chunks = [lines[i : i + CHUNK_LINES] for i in range(0, len(lines), CHUNK_LINES)]
    clock = time.process_time
    gc.collect()
    for number, chunk in enumerate(chunks):
        shift = number % len(sides)
        for label, parse in sides[shift:] + sides[:shift]:
            start = clock()
            for line in chunk:
                parse(line)
            totals[label] += clock() - start
    return totals.pop(""), totals


class Ratios:
    """Per-round ``baseline time / candidate time``, summarised."""

    def __init__(self) -> None:
        self.ratios: list[float] = []
        self.rates: list[float] = []

    def add(self, baseline: float, candidate: float, lines: int) -> None:
        self.ratios.append(baseline / candidate)
        self.rates.append(lines / candidate)

    def median(self) -> float:
        return statistics.median(self.ratios)

    def summary(self) -> str:
        low, high = min(self.ratios), max(self.ratios)
        return f"{self.median():5.2f}x  [{low:4.2f}-{high:4.2f}]"


def selective(stream: str) -> Parse:
    return synrepl.SelectiveParser(streams={stream}, commands={"RDATA", "POSITION"})


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--stream", default="events", help="the one stream of the selective run")
    ap.add_argument(
        "--each-stream",
        action="store_true",
        help="kept for old command lines: every stream's selective ratio is always reported",
    )
    ap.add_argument(
        "--no-tables",
        action="store_true",
        help="only the mixed-corpus figures (no per-type or per-stream tables)",
    )
    args = ap.parse_args(argv)
    rounds = max(1, args.rounds)

    lines = corpus_lines()
    baseline = synapse_parser()
    ours: Parse = synrepl.parse_line
    groups: dict[str, list[str]] = {}
    for line in lines:
        groups.setdefault(group_of(line), []).append(line)
    streams = sorted(key.split(" ", 1)[1] for key in groups if key.startswith("RDATA "))
    selected = {stream: selective(stream) for stream in dict.fromkeys([args.stream, *streams])}

    for parse in (baseline, ours, *selected.values()):  # warm up: imports, caches
        for line in lines[:3000]:
            parse(line)

    mixed = {"parse_line": Ratios(), **{f"select {s}": Ratios() for s in selected}}
    baseline_rates: list[float] = []
    per_group = {key: Ratios() for key in groups}
    candidates: dict[str, Parse] = {"parse_line": ours}
    for stream, parse in selected.items():
        if not args.no_tables or stream == args.stream:
            candidates[f"select {stream}"] = parse
    for _ in range(rounds):
        t_base, times = compare(baseline, candidates, lines)
        baseline_rates.append(len(lines) / t_base)
        for label, seconds in times.items():
            mixed[label].add(t_base, seconds, len(lines))
        if args.no_tables:
            continue
        for key, group in groups.items():
            # Small groups repeat within each chunk, so that timer calls stay
            # a negligible part of every timed chunk.
            pool = group * max(1, GROUP_PASS_LINES // len(group))
            t_b, t_o = compare(baseline, {"parse_line": ours}, pool)
            per_group[key].add(t_b, t_o["parse_line"], len(pool))

    print(f"{len(lines)} corpus lines; Python {sys.version.split()[0]}; {rounds} rounds")
    print("ratio = Synapse's time / synrepl's, per round: median [lowest-highest]")
    print()
    print("Mixed corpus:")
    print(f"  {'synapse (baseline)':<34} {statistics.median(baseline_rates):>11,.0f} lines/s")
    rows = [("parse_line", mixed["parse_line"])]
    rows.append((f"SelectiveParser({args.stream})", mixed[f"select {args.stream}"]))
    for label, ratios in rows:
        rate = statistics.median(ratios.rates)
        print(f"  {label:<34} {rate:>11,.0f} lines/s  {ratios.summary()}")
    if args.no_tables:
        return 0

    print()
    print("parse_line per command type and RDATA stream (same baseline, per type):")
    print(f"  {'type':<30} {'lines':>6} {'share':>6}  ratio")
    for key in sorted(groups, key=lambda k: (-len(groups[k]), k)):
        share = len(groups[key]) / len(lines)
        print(f"  {key:<30} {len(groups[key]):>6} {share:6.1%}  {per_group[key].summary()}")
    worst = min(per_group, key=lambda k: per_group[k].median())
    print(f"  lowest: {worst} {per_group[worst].median():.2f}x")

    print()
    print("SelectiveParser(one stream) over the mixed corpus (same baseline):")
    for stream in streams:
        wanted = len(groups.get(f"RDATA {stream}", ())) / len(lines)
        print(f"  {stream:<24} {wanted:6.1%} of lines  {mixed[f'select {stream}'].summary()}")
    worst_stream = min(streams, key=lambda s: mixed[f"select {s}"].median())
    print(f"  lowest: {worst_stream} {mixed[f'select {worst_stream}'].median():.2f}x")

    print()
    print("Goals (medians):")
    goals = [
        ("parse_line, mixed corpus", mixed["parse_line"].median(), GOAL_MIXED),
        (f"parse_line, lowest type ({worst})", per_group[worst].median(), GOAL_PER_TYPE),
        (
            f"SelectiveParser, lowest stream ({worst_stream})",
            mixed[f"select {worst_stream}"].median(),
            GOAL_SELECTIVE,
        ),
    ]
    for label, ratio, goal in goals:
        verdict = "met" if ratio >= goal else "NOT met"
        print(f"  {label:<50} {ratio:5.2f}x  (goal {goal:.1f}x: {verdict})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
