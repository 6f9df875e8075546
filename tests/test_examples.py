"""The example scripts the README points to actually run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from corpus_files import corpus_path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / "decode_corpus.py"), *args],
        check=False,
        capture_output=True,
        text=True,
        input=stdin,
        timeout=120,
    )


def test_decode_corpus_summarises_every_line() -> None:
    """The README's first command decodes the whole corpus with nothing undecodable."""
    result = run(str(corpus_path("replication-corpus.jsonl")))
    assert result.returncode == 0, result.stderr
    assert "24596 commands, 0 undecodable" in result.stdout
    assert "events (EventRow)" in result.stdout


def test_decode_corpus_json_for_one_stream() -> None:
    """--json --stream prints one object per typing command, rows as field dicts."""
    result = run("--json", "--stream", "typing", str(corpus_path("replication-corpus.jsonl")))
    assert result.returncode == 0, result.stderr
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    assert {o["command"] for o in objects} == {"RDATA", "POSITION"}
    rdata = [o for o in objects if o["command"] == "RDATA"]
    assert len(rdata) == 1184
    assert set(rdata[0]["row"]) == {"room_id", "user_ids"}


def test_decode_corpus_reports_bad_lines() -> None:
    """Undecodable raw lines are reported on stderr and make the exit status 1."""
    result = run("--raw", stdin="PING 1\nRDATA events master x []\n")
    assert result.returncode == 1
    assert "malformed RDATA" in result.stderr
    assert "2 commands" not in result.stdout and "1 commands, 1 undecodable" in result.stdout


def test_readme_first_command_shows_decoded_traffic() -> None:
    """`python3 -m synrepl demo --duration N` (the README's first command, after
    the install) prints decoded RDATA lines and a summary, and exits 0."""
    result = subprocess.run(
        [sys.executable, "-m", "synrepl", "demo", "--duration", "3"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert " RDATA " in result.stdout
    assert "events" in result.stdout
    assert "synrepl demo:" in result.stderr  # banner and summary go to stderr
