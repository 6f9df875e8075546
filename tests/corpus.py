"""Access to the real replication traffic in ../shared/corpus.

The corpus lives beside the repository (``../shared/corpus``), or wherever
``SYNREPL_CORPUS_DIR`` points.  Tests that need it fail loudly when it is
missing: a silently skipped corpus test would prove nothing.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

CORPUS_FILES = ("replication-corpus.jsonl", "replication-corpus-pg.jsonl")


def corpus_dir() -> Path:
    override = os.environ.get("SYNREPL_CORPUS_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[1].parent / "shared" / "corpus"


@cache
def corpus_entries(name: str) -> tuple[tuple[str, str], ...]:
    """``(channel, line)`` pairs of one corpus file, in capture order."""
    path = corpus_dir() / name
    if not path.is_file():
        raise FileNotFoundError(
            f"replication corpus {path} not found; set SYNREPL_CORPUS_DIR to its folder"
        )
    with path.open(encoding="utf-8") as f:
        return tuple((d["channel"], d["line"]) for d in map(json.loads, f))


def all_corpus_entries() -> list[tuple[str, str]]:
    return [entry for name in CORPUS_FILES for entry in corpus_entries(name)]
