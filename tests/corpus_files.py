"""Access to the real replication traffic kept in the repository's ``corpus/``.

The corpus (gzipped JSON lines, captured from Synapse 1.163.2; see
``corpus/README.md``) is part of the repository, so a clone passes its tests
with nothing beside it.  ``SYNREPL_CORPUS_DIR`` points elsewhere (plain or
gzipped files).  A missing corpus fails loudly: a silently skipped corpus
test would prove nothing.
"""

from __future__ import annotations

import gzip
import json
import os
from functools import cache
from pathlib import Path

CORPUS_FILES = ("replication-corpus.jsonl", "replication-corpus-pg.jsonl")


def corpus_dir() -> Path:
    override = os.environ.get("SYNREPL_CORPUS_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[1] / "corpus"


def corpus_path(name: str) -> Path:
    """The file of one corpus, ``name`` or ``name.gz``."""
    for candidate in (corpus_dir() / name, corpus_dir() / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"replication corpus {name} not found in {corpus_dir()}; "
        "set SYNREPL_CORPUS_DIR to its folder"
    )


@cache
def corpus_entries(name: str) -> tuple[tuple[str, str], ...]:
    """``(channel, line)`` pairs of one corpus file, in capture order."""
    path = corpus_path(name)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return tuple((d["channel"], d["line"]) for d in map(json.loads, f))


def all_corpus_entries() -> list[tuple[str, str]]:
    return [entry for name in CORPUS_FILES for entry in corpus_entries(name)]
