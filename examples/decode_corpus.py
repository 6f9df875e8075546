"""Decode captured replication traffic and show what flows through it.

Reads JSON lines of ``{"channel": ..., "line": ...}`` (the format of
corpus/ in this repository, gzipped or not) or, with ``--raw``, plain wire lines, from files or stdin.
Prints a summary of commands and stream rows; with ``--json`` one decoded
command per line instead.

    python examples/decode_corpus.py corpus/replication-corpus.jsonl.gz
    python examples/decode_corpus.py --json --stream events corpus.jsonl | head
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import sys
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

import attrs

import synrepl
from synrepl.streams import RawRow


def wire_lines(paths: Sequence[str], raw: bool) -> Iterator[str]:
    if not paths:
        yield from _lines_of(sys.stdin, raw)
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            yield from _lines_of(f, raw)


def _lines_of(f: TextIO, raw: bool) -> Iterator[str]:
    for text in f:
        text = text.rstrip("\n")
        if text.strip():
            yield text if raw else json.loads(text)["line"]


def as_json(cmd: synrepl.Command) -> dict[str, Any]:
    if isinstance(cmd, synrepl.RdataCommand):
        return {
            "command": "RDATA",
            "stream": cmd.stream_name,
            "writer": cmd.instance_name,
            "token": cmd.token,
            "kind": cmd.row.TYPE_ID,
            "row": cmd.row.as_dict(),
        }
    if isinstance(cmd, synrepl.UserIpCommand):
        return {"command": cmd.NAME, "user_id": cmd.user_id, "access_token": "<redacted>"}
    out: dict[str, Any] = {"command": cmd.NAME}
    out.update(attrs.asdict(cmd, recurse=False))  # commands are slotted: no vars()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", help="corpus files (default: stdin)")
    ap.add_argument("--raw", action="store_true", help="input is plain wire lines")
    ap.add_argument("--json", action="store_true", help="print each decoded command")
    ap.add_argument(
        "--stream", action="append", help="only these streams' RDATA and POSITION (repeatable)"
    )
    args = ap.parse_args(argv)

    parse = synrepl.SelectiveParser(
        streams=args.stream if args.stream else None,
        commands={"RDATA", "POSITION"} if args.stream else None,
    )
    commands: collections.Counter[str] = collections.Counter()
    rows: collections.Counter[str] = collections.Counter()
    errors = 0
    for line in wire_lines(args.files, args.raw):
        try:
            cmd = parse(line)
        except synrepl.ProtocolError as e:
            errors += 1
            print(f"skipped: {e}", file=sys.stderr)
            continue
        if cmd is None:
            continue
        commands[cmd.NAME] += 1
        if isinstance(cmd, synrepl.RdataCommand):
            kind = "raw" if isinstance(cmd.row, RawRow) else type(cmd.row).__name__
            rows[f"{cmd.stream_name} ({kind})"] += 1
        if args.json:
            print(json.dumps(as_json(cmd), ensure_ascii=False))
    if not args.json:
        print(f"{sum(commands.values())} commands, {errors} undecodable")
        for name, count in commands.most_common():
            print(f"  {name:<18} {count:>8}")
        print("RDATA rows by stream:")
        for name, count in rows.most_common():
            print(f"  {name:<44} {count:>8}")
    return 1 if errors else 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except BrokenPipeError:  # output piped into head & co
        sys.stderr.close()
        raise SystemExit(0) from None
