"""The dead-letter stores against real files, real SQLite databases and the
machine's real PostgreSQL (a fresh database for this module, dropped after;
SYNREPL_TEST_POSTGRES as in test_checkpoints.py)."""

from __future__ import annotations

import json
import os
import re
import secrets
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis_server import free_port

import synrepl.deadletters
from synrepl.deadletters import (
    MAX_ERROR_TEXT,
    DeadLetter,
    DeadLetterStore,
    FileDeadLetterStore,
    PostgresDeadLetterStore,
    SqliteDeadLetterStore,
    StoreError,
    dead_letter_store,
)
from synrepl.streams import EventRow, TypingRow, parse_row

ADMIN = os.environ.get("SYNREPL_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
SERVER = "deadletters.test"


@pytest.fixture(scope="module")
def pg_database() -> Iterator[str]:
    """A fresh database on the shared PostgreSQL; its URI."""
    name = f"synrepl_test_{secrets.token_hex(6)}"
    with psycopg.connect(ADMIN, autocommit=True, connect_timeout=10) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    info = psycopg.conninfo.conninfo_to_dict(ADMIN)
    info["dbname"] = name
    try:
        yield psycopg.conninfo.make_conninfo(**info)
    finally:
        with psycopg.connect(ADMIN, autocommit=True, connect_timeout=10) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def letter(token: int = 5, *, error: str = "boom", stream: str = "events") -> DeadLetter:
    row = EventRow(f"$e{token}", "!r:test", "m.room.message", None, None, None, None, False, False)
    return DeadLetter(
        stream=stream,
        writer="persister1",
        token=token,
        rows=[row.to_raw()],
        error=error,
        attempts=6,
        failed_at=1_700_000_000.25,
    )


Factory = Callable[..., DeadLetterStore]


@pytest.fixture(params=["file", "sqlite", "postgres"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    """Stores of one backend that share one file, database or table."""
    opened: list[DeadLetterStore] = []
    table = f"dead_{secrets.token_hex(4)}"

    def make(server_name: str = SERVER, name: str = "default") -> DeadLetterStore:
        store: DeadLetterStore
        if request.param == "file":
            store = FileDeadLetterStore(tmp_path / "dl.jsonl", server_name=server_name, name=name)
        elif request.param == "sqlite":
            store = SqliteDeadLetterStore(tmp_path / "dl.db", server_name=server_name, name=name)
        else:
            conninfo = request.getfixturevalue("pg_database")
            store = PostgresDeadLetterStore(
                conninfo, server_name=server_name, name=name, table=table
            )
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


# --- the letter ------------------------------------------------------------------


def test_a_letter_keeps_raw_rows_that_parse_back_and_a_bounded_error() -> None:
    """Rows are the wire's JSON (parse_row types them again); an error
    longer than MAX_ERROR_TEXT is cut once, and cutting again changes
    nothing, so a letter read back equals the one added."""
    row = TypingRow("!r:test", ("@a:test",))
    long = DeadLetter("typing", "master", 3, [row.to_raw()], "x" * 10_000, 1, 2)
    assert parse_row("typing", long.rows[0]) == row
    assert len(long.error) == MAX_ERROR_TEXT
    assert DeadLetter.from_json(long.to_json()) == long
    assert long.failed_at == 2.0 and isinstance(long.failed_at, float)
    odd = DeadLetter("typing", "master", 3, [], "nul\x00 and \udc80", 1, 2)
    assert odd.error == "nul\\x00 and \\udc80"


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=10)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)
letters = st.builds(
    DeadLetter,
    stream=st.text(max_size=10),
    writer=st.text(max_size=10),
    token=st.integers(-(2**63), 2**63 - 1),
    rows=st.lists(st.lists(json_values, max_size=4), max_size=4),
    error=st.text(max_size=50),
    attempts=st.integers(0, 1000),
    failed_at=st.floats(0, 2e9),
)


@given(items=st.lists(letters, min_size=1, max_size=5))
def test_file_format_round_trips(items: list[DeadLetter]) -> None:
    """Any letters (unicode, lone surrogates, nested rows, big tokens) read
    back equal and in order from a real file."""
    with tempfile.TemporaryDirectory() as directory:
        store = FileDeadLetterStore(Path(directory) / "dl.jsonl", server_name=SERVER)
        for item in items:
            store.add(item)
        assert (
            FileDeadLetterStore(Path(directory) / "dl.jsonl", server_name=SERVER).letters() == items
        )


# --- every store -----------------------------------------------------------------


def test_letters_round_trip_in_order_and_survive_reopening(make_store: Factory) -> None:
    store = make_store()
    assert store.letters() == []
    first, second = letter(5), letter(9, error="second failure")
    store.add(first)
    store.add(second)
    store.close()
    assert make_store().letters() == [first, second]


def test_names_keep_separate_letters_in_one_place(make_store: Factory) -> None:
    a, b = make_store(name="audit"), make_store(name="bridge")
    a.add(letter(1))
    b.add(letter(2))
    a.add(letter(3))
    assert [x.token for x in make_store(name="audit").letters()] == [1, 3]
    assert [x.token for x in make_store(name="bridge").letters()] == [2]


def test_another_servers_letters_are_refused_naming_both(make_store: Factory) -> None:
    make_store().add(letter(1))
    other = make_store(server_name="other.test")
    for call in (other.letters, lambda: other.add(letter(2))):
        with pytest.raises(StoreError) as info:
            call()
        assert "'deadletters.test'" in str(info.value)
        assert "'other.test'" in str(info.value)
    assert [x.token for x in make_store().letters()] == [1]


def test_concurrent_adds_keep_every_letter_whole(make_store: Factory) -> None:
    """Four threads adding at once, two names: every letter is there once,
    none torn or interleaved."""
    stores = [make_store(name=f"n{i % 2}") for i in range(4)]
    errors: list[BaseException] = []

    def run(store: DeadLetterStore, i: int) -> None:
        try:
            for n in range(15):
                store.add(letter(i * 100 + n, error="e" * 500))
        except Exception as e:  # noqa: BLE001 - the test asserts there were none
            errors.append(e)

    threads = [threading.Thread(target=run, args=(s, i)) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for name, ids in (("n0", (0, 2)), ("n1", (1, 3))):
        tokens = sorted(x.token for x in make_store(name=name).letters())
        assert tokens == sorted(i * 100 + n for i in ids for n in range(15))


def test_a_closed_store_refuses_calls(make_store: Factory) -> None:
    store = make_store()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.add(letter())
    with pytest.raises(StoreError, match="closed"):
        store.letters()


# --- JSON lines ------------------------------------------------------------------


def test_a_torn_last_line_is_skipped_then_cut_off(tmp_path: Path) -> None:
    """A crash mid-append leaves a line without its newline: reading skips
    it, and the next add cuts it off rather than glue a letter to it."""
    path = tmp_path / "dl.jsonl"
    store = FileDeadLetterStore(path, server_name=SERVER)
    store.add(letter(1))
    with path.open("ab") as f:
        f.write(b'{"name":"default","stream":"events","wri')
    assert store.letters() == [letter(1)]
    store.add(letter(2))
    assert store.letters() == [letter(1), letter(2)]
    assert path.read_bytes().endswith(b"}\n")
    assert b"wri{" not in path.read_bytes()


def test_a_header_cut_short_by_a_crash_counts_as_a_new_file(tmp_path: Path) -> None:
    """A crash while the first add wrote the header leaves part of it: no
    letter was added, and the next add starts the file again."""
    path = tmp_path / "dl.jsonl"
    path.write_bytes(b'{"synrepl":"synrepl dead')
    store = FileDeadLetterStore(path, server_name=SERVER)
    assert store.letters() == []
    store.add(letter(1))
    assert store.letters() == [letter(1)]
    assert path.read_bytes().count(b"synrepl dead letters") == 1


def test_an_add_fsyncs_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Durable when add returns: the file is fsync'd after the line is written."""
    path = tmp_path / "dl.jsonl"
    FileDeadLetterStore(path, server_name=SERVER).add(letter(1))
    synced: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_size)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    FileDeadLetterStore(path, server_name=SERVER).add(letter(2))
    assert synced == [path.stat().st_size]


def test_a_bad_line_in_the_middle_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "dl.jsonl"
    store = FileDeadLetterStore(path, server_name=SERVER)
    store.add(letter(1))
    with path.open("ab") as f:
        f.write(b"garbage\n")
    store.add(letter(2))
    with pytest.raises(StoreError, match=r"line 3 of the dead-letter file .* is not a dead letter"):
        store.letters()


@pytest.mark.parametrize("text", ["hello\n", '{"server_name": "x"}\n', "[]\n"])
def test_a_file_that_is_not_a_dead_letter_file_is_refused_and_untouched(
    tmp_path: Path, text: str
) -> None:
    path = tmp_path / "dl.jsonl"
    path.write_text(text)
    store = FileDeadLetterStore(path, server_name=SERVER)
    for call in (store.letters, lambda: store.add(letter())):
        with pytest.raises(StoreError, match="is not a synrepl dead-letter file"):
            call()
    assert path.read_text() == text


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        pytest.param(lambda p: os.mkfifo(p), "a FIFO (named pipe)", id="fifo"),
        pytest.param(lambda p: os.mkdir(p), "a directory", id="directory"),
    ],
)
def test_a_path_that_is_not_a_regular_file_is_refused_without_blocking(
    tmp_path: Path, make: Callable[[Path], None], kind: str
) -> None:
    path = tmp_path / "dl.jsonl"
    make(path)
    store = FileDeadLetterStore(path, server_name=SERVER)
    with pytest.raises(StoreError, match=re.escape(f"it is {kind}, not a regular file")):
        store.letters()
    with pytest.raises(StoreError, match="cannot write the dead-letter file"):
        store.add(letter())


def test_a_full_file_refuses_the_add(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_DEAD_LETTER_FILE_SIZE an add fails instead of filling the disk."""
    path = tmp_path / "dl.jsonl"
    store = FileDeadLetterStore(path, server_name=SERVER)
    store.add(letter(1))
    monkeypatch.setattr(synrepl.deadletters, "MAX_DEAD_LETTER_FILE_SIZE", path.stat().st_size + 10)
    with pytest.raises(StoreError, match="it is full"):
        store.add(letter(2))
    assert store.letters() == [letter(1)]


def test_the_file_names_its_server_on_the_first_line(tmp_path: Path) -> None:
    path = tmp_path / "dl.jsonl"
    FileDeadLetterStore(path, server_name=SERVER, name="obs").add(letter(1))
    header, line = path.read_text().splitlines()
    assert json.loads(header) == {"synrepl": "synrepl dead letters", "server_name": SERVER}
    assert json.loads(line) == {"name": "obs", **letter(1).to_json()}


# --- SQLite and PostgreSQL -----------------------------------------------------------


def test_sqlite_rows_hold_the_letter_as_columns(tmp_path: Path) -> None:
    path = tmp_path / "dl.db"
    store = SqliteDeadLetterStore(path, server_name=SERVER)
    store.add(letter(4))
    store.close()
    with sqlite3.connect(path) as db:
        (row,) = db.execute(
            "SELECT server_name, name, stream, writer, token, rows, attempts "
            "FROM synrepl_dead_letters"
        )
    assert row[:5] == (SERVER, "default", "events", "persister1", 4)
    assert json.loads(row[5]) == list(letter(4).rows)
    assert row[6] == 6


def test_postgres_add_after_a_lost_connection_reconnects_and_keeps_it_once(
    pg_database: str,
) -> None:
    """The store's backend is terminated between two adds: the next add
    reconnects, and the letter is kept exactly once."""
    info = psycopg.conninfo.conninfo_to_dict(pg_database)
    uri = psycopg.conninfo.make_conninfo(**info, application_name="synrepl_dl_lost")
    store = PostgresDeadLetterStore(uri, server_name=SERVER, name="lost")
    store.add(letter(1))
    with psycopg.connect(pg_database, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'synrepl_dl_lost'"
        )
    time.sleep(0.2)
    store.add(letter(2))
    assert [x.token for x in store.letters()] == [1, 2]
    store.close()


def test_postgres_unreachable_fails_fast_without_the_password() -> None:
    port = free_port()
    store = dead_letter_store(
        f"postgresql://postgres:hunter2-secret@127.0.0.1:{port}/db", server_name=SERVER
    )
    started = time.monotonic()
    with pytest.raises(StoreError) as info:
        store.add(letter())
    assert time.monotonic() - started < 10
    assert "Connection refused" in str(info.value)
    assert "hunter2" not in str(info.value)
    store.close()


def test_dead_letter_store_reads_the_spec(tmp_path: Path) -> None:
    spec: dict[str, type[Any]] = {
        str(tmp_path / "dl.jsonl"): FileDeadLetterStore,
        "file:dl.jsonl": FileDeadLetterStore,
        "sqlite:dl.db": SqliteDeadLetterStore,
        "postgresql://u@127.0.0.1:1/db": PostgresDeadLetterStore,
        "postgres://u@127.0.0.1:1/db": PostgresDeadLetterStore,
    }
    for text, kind in spec.items():
        store = dead_letter_store(text, server_name=SERVER, name="x")
        assert isinstance(store, kind)
    with pytest.raises(StoreError, match="unknown store 'kafka:'"):
        dead_letter_store("kafka://broker/topic", server_name=SERVER)
