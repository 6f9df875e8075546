"""The checkpoint stores against real files, real SQLite databases and the
machine's real PostgreSQL (a fresh database for this module, dropped after).

PostgreSQL is found at SYNREPL_TEST_POSTGRES (a libpq URI of a database to
connect to while creating the test one; default the local server as
postgres, trust auth).  It is shared with other tests: a lost connection is
made by terminating this module's own backend, never by stopping it.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
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

from synrepl.checkpoints import (
    MAX_CHECKPOINT_FILE_SIZE,
    CheckpointStore,
    FileCheckpointStore,
    PostgresCheckpointStore,
    SqliteCheckpointStore,
    StoreError,
    checkpoint_store,
)

ADMIN = os.environ.get("SYNREPL_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
SERVER = "checkpoints.test"


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


def pg_uri(conninfo: str, **extra: str) -> str:
    """The database's URI form (what checkpoint_store takes), with ``extra`` settings."""
    info = {**psycopg.conninfo.conninfo_to_dict(conninfo), **extra}
    host, port = info.pop("host", "127.0.0.1"), info.pop("port", "5432")
    user, dbname = info.pop("user", "postgres"), info.pop("dbname")
    info.pop("password", None)
    query = "&".join(f"{k}={v}" for k, v in info.items())
    return f"postgresql://{user}@{host}:{port}/{dbname}" + (f"?{query}" if query else "")


#: A store factory: (server_name, name) -> store, all sharing one file/table.
Factory = Callable[..., CheckpointStore]


@pytest.fixture(params=["file", "sqlite", "postgres"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    """Stores of one backend that share one file, database or table."""
    opened: list[CheckpointStore] = []
    table = f"checkpoints_{secrets.token_hex(4)}"

    def make(server_name: str = SERVER, name: str = "default") -> CheckpointStore:
        store: CheckpointStore
        if request.param == "file":
            store = FileCheckpointStore(tmp_path / "cp.json", server_name=server_name, name=name)
        elif request.param == "sqlite":
            store = SqliteCheckpointStore(tmp_path / "cp.db", server_name=server_name, name=name)
        else:
            conninfo = request.getfixturevalue("pg_database")
            store = PostgresCheckpointStore(
                conninfo, server_name=server_name, name=name, table=table
            )
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


# --- every store -----------------------------------------------------------------


def test_round_trip_replaces_and_survives_reopening(make_store: Factory) -> None:
    """Nothing saved is None; a save replaces the whole checkpoint (a stream
    left out is gone); a new store on the same place after close reads it."""
    store = make_store()
    assert store.load() is None
    store.save({"events": {"master": 5, "persister1": 9}, "typing": {"master": 2}})
    assert store.load() == {"events": {"master": 5, "persister1": 9}, "typing": {"master": 2}}
    store.save({"events": {"master": 6, "persister1": 9}})
    store.close()
    again = make_store()
    assert again.load() == {"events": {"master": 6, "persister1": 9}}
    again.save({})
    assert make_store().load() == {}


def test_large_tokens_and_many_pairs_round_trip(make_store: Factory) -> None:
    """Tokens up to 2**63 - 1 (Synapse's bigint) and hundreds of pairs."""
    positions = {f"s{i}": {f"w{j}": 2**63 - 1 - i * j for j in range(20)} for i in range(30)}
    store = make_store()
    store.save(positions)
    assert make_store().load() == positions


def test_another_servers_checkpoint_is_refused_naming_both(make_store: Factory) -> None:
    """A checkpoint saved for one server is neither loaded nor overwritten by
    a store for another; the error names both servers, and the checkpoint
    stays as it was."""
    make_store().save({"events": {"master": 5}})
    other = make_store(server_name="other.test")
    for call in (other.load, lambda: other.save({"events": {"master": 1}})):
        with pytest.raises(StoreError) as info:
            call()
        assert "'checkpoints.test'" in str(info.value)
        assert "'other.test'" in str(info.value)
        assert isinstance(info.value, OSError)
    assert make_store().load() == {"events": {"master": 5}}


def test_names_keep_separate_checkpoints_in_one_place(make_store: Factory) -> None:
    """Observers with different names share a file or table without
    touching each other's checkpoint."""
    a, b = make_store(name="audit"), make_store(name="bridge")
    a.save({"events": {"master": 1}})
    b.save({"typing": {"master": 2}})
    a.save({"events": {"master": 3}})
    assert make_store(name="audit").load() == {"events": {"master": 3}}
    assert make_store(name="bridge").load() == {"typing": {"master": 2}}
    assert make_store(name="default").load() is None


def test_concurrent_saves_under_different_names_lose_nothing(make_store: Factory) -> None:
    """Four threads, each its own store and name, saving at once: each
    ends with its own last save (a read-modify-write race would drop some)."""
    stores = [make_store(name=f"n{i}") for i in range(4)]
    errors: list[BaseException] = []

    def run(store: CheckpointStore, i: int) -> None:
        try:
            for token in range(25):
                store.save({"events": {f"w{i}": token}})
        except Exception as e:  # noqa: BLE001 - the test asserts there were none
            errors.append(e)

    threads = [threading.Thread(target=run, args=(s, i)) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for i in range(4):
        assert make_store(name=f"n{i}").load() == {"events": {f"w{i}": 24}}


def test_a_closed_store_refuses_calls(make_store: Factory) -> None:
    """Use after close is an error, not a silent reopen."""
    store = make_store()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.load()
    with pytest.raises(StoreError, match="closed"):
        store.save({})
    store.close()  # twice is fine


def test_a_bad_map_is_a_type_error(make_store: Factory) -> None:
    """A token that is not an int (a bool, a string) is the caller's bug."""
    store = make_store()
    for bad in ({"events": {"master": "5"}}, {"events": {"master": True}}, {"events": 5}):
        with pytest.raises(TypeError):
            store.save(bad)  # type: ignore[arg-type]


def test_constructors_refuse_empty_names(tmp_path: Path) -> None:
    """The names a store is bound to fail at once when empty."""
    with pytest.raises(ValueError, match="server_name"):
        FileCheckpointStore(tmp_path / "x", server_name="")
    with pytest.raises(ValueError, match="name"):
        SqliteCheckpointStore(tmp_path / "x", server_name=SERVER, name="")


# --- files ---------------------------------------------------------------------


def test_a_file_written_by_watch_resume_loads_as_the_default(tmp_path: Path) -> None:
    """The format ``synrepl watch --resume`` wrote before names existed
    loads as the "default" checkpoint, and a save keeps that layout, so an
    older synrepl can read it back."""
    path = tmp_path / "watch.pos"
    path.write_text(
        '{\n "positions": {\n  "events": {\n   "master": 7\n  }\n },\n'
        ' "saved_at": "2026-01-01T00:00:00Z",\n "server_name": "checkpoints.test"\n}\n'
    )
    store = FileCheckpointStore(path, server_name=SERVER)
    assert store.load() == {"events": {"master": 7}}
    FileCheckpointStore(path, server_name=SERVER, name="other").save({"typing": {"m": 1}})
    store.save({"events": {"master": 8}})
    data = json.loads(path.read_text())
    assert data["server_name"] == SERVER
    assert data["positions"] == {"events": {"master": 8}}
    assert data["checkpoints"]["other"]["positions"] == {"typing": {"m": 1}}


def test_a_failed_rename_leaves_the_old_checkpoint_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save that fails between writing and renaming (here: the rename
    itself) raises and leaves the previous checkpoint whole."""
    path = tmp_path / "cp.json"
    store = FileCheckpointStore(path, server_name=SERVER)
    store.save({"events": {"master": 1}})
    before = path.read_bytes()

    def refuse(src: Any, dst: Any) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(StoreError, match=r"cannot write the checkpoint file .*Input/output error"):
        store.save({"events": {"master": 2}})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert FileCheckpointStore(path, server_name=SERVER).load() == {"events": {"master": 1}}
    assert [p.name for p in tmp_path.iterdir()] == ["cp.json"]


KILLED_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    from synrepl.checkpoints import FileCheckpointStore

    def die(src, dst):
        os.kill(os.getpid(), signal.SIGKILL)

    os.replace = die
    FileCheckpointStore(sys.argv[1], server_name=sys.argv[2]).save({"events": {"master": 2}})
    """
)


def test_a_process_killed_before_the_rename_leaves_the_old_checkpoint(tmp_path: Path) -> None:
    """A real SIGKILL after the new file is written and fsync'd but before
    the rename: the old checkpoint loads, and the next save removes the
    leftover temporary file."""
    path = tmp_path / "cp.json"
    FileCheckpointStore(path, server_name=SERVER).save({"events": {"master": 1}})
    child = subprocess.run(
        [sys.executable, "-c", KILLED_SAVE, str(path), SERVER],
        check=False,
        capture_output=True,
        timeout=60,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "cp.json"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".cp.json.")
    store = FileCheckpointStore(path, server_name=SERVER)
    assert store.load() == {"events": {"master": 1}}
    store.save({"events": {"master": 3}})
    assert [p.name for p in tmp_path.iterdir()] == ["cp.json"]
    assert store.load() == {"events": {"master": 3}}


def test_a_save_fsyncs_the_file_before_the_rename_and_the_directory_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The order that makes a save durable and atomic: write, fsync the
    temporary file, rename it over, fsync the directory."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync file")
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    FileCheckpointStore(tmp_path / "cp.json", server_name=SERVER).save({"events": {"w": 1}})
    assert events == ["fsync file", "rename", "fsync dir"]


def test_processes_saving_different_names_to_one_file_lose_nothing(tmp_path: Path) -> None:
    """Saves of one directory take turns across processes (flock), so two
    processes with different names in one file keep both checkpoints."""
    script = textwrap.dedent(
        """
        import sys
        from synrepl.checkpoints import FileCheckpointStore
        store = FileCheckpointStore(sys.argv[1], server_name=sys.argv[2], name=sys.argv[3])
        for token in range(40):
            store.save({"events": {sys.argv[3]: token}})
        """
    )
    path = tmp_path / "cp.json"
    children = [
        subprocess.Popen([sys.executable, "-c", script, str(path), SERVER, name])
        for name in ("a", "b", "c")
    ]
    assert [child.wait(timeout=120) for child in children] == [0, 0, 0]
    for name in ("a", "b", "c"):
        loaded = FileCheckpointStore(path, server_name=SERVER, name=name).load()
        assert loaded == {"events": {name: 39}}


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        pytest.param(lambda p: os.mkfifo(p), "a FIFO (named pipe)", id="fifo"),
        pytest.param(lambda p: os.mkdir(p), "a directory", id="directory"),
    ],
)
def test_a_path_that_is_not_a_regular_file_is_refused_and_left_alone(
    tmp_path: Path, make: Callable[[Path], None], kind: str
) -> None:
    """Loading a FIFO never waits for a writer, and a save never replaces it."""
    path = tmp_path / "cp.json"
    make(path)
    store = FileCheckpointStore(path, server_name=SERVER)
    with pytest.raises(StoreError) as info:
        store.load()
    assert str(info.value) == (
        f"cannot read the checkpoint file '{path}': it is {kind}, not a regular file"
    )
    with pytest.raises(StoreError, match="is not a regular file, so it is not replaced"):
        store.save({"events": {"master": 1}})
    assert not path.is_file() and path.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["cp.json"]


def test_a_device_is_refused(tmp_path: Path) -> None:
    """/dev/null is not an empty checkpoint."""
    with pytest.raises(StoreError, match="it is a character device, not a regular file"):
        FileCheckpointStore(os.devnull, server_name=SERVER).load()


def test_a_file_too_large_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "cp.json"
    with path.open("wb") as f:
        f.truncate(MAX_CHECKPOINT_FILE_SIZE + 1)
    with pytest.raises(StoreError, match="larger than 16 MiB, too large for a checkpoint file"):
        FileCheckpointStore(path, server_name=SERVER).load()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[]",
        "{}",
        '{"server_name": "checkpoints.test", "positions": {"e": {"w": 1.5}}}',
        '{"server_name": "checkpoints.test", "checkpoints": {"default": {"positions": {}}}}',
        "[" * 100_000,
        "not json",
    ],
)
def test_a_file_that_is_not_a_checkpoint_is_refused_and_not_overwritten(
    tmp_path: Path, text: str
) -> None:
    """Whatever the file holds, it is "not a synrepl checkpoint file", for
    loads and saves alike: the file may be someone's, given by mistake."""
    path = tmp_path / "cp.json"
    path.write_text(text)
    store = FileCheckpointStore(path, server_name=SERVER)
    for call in (store.load, lambda: store.save({})):
        with pytest.raises(StoreError, match="is not a synrepl checkpoint file; remove it"):
            call()
    assert path.read_text() == text


def test_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    store = FileCheckpointStore(tmp_path / "nowhere" / "cp.json", server_name=SERVER)
    assert store.load() is None
    with pytest.raises(StoreError, match=r"cannot write .*No such file or directory"):
        store.save({})


names = st.text(min_size=1, max_size=20)
positions = st.dictionaries(
    st.text(max_size=20),
    st.dictionaries(st.text(max_size=20), st.integers(-(2**63), 2**63 - 1), max_size=4),
    max_size=5,
)


@given(server_name=names, saved=st.dictionaries(names, positions, min_size=1, max_size=4))
def test_file_format_round_trips(server_name: str, saved: dict[str, Any]) -> None:
    """Any names (unicode, lone surrogates, quotes) and tokens saved under
    any checkpoint names load back exactly, each under its own name."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "cp.json"
        for name, checkpoint in saved.items():
            FileCheckpointStore(path, server_name=server_name, name=name).save(checkpoint)
        for name, checkpoint in saved.items():
            loaded = FileCheckpointStore(path, server_name=server_name, name=name).load()
            assert loaded == checkpoint


@given(data=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_any_file_content_loads_or_is_a_store_error(data: bytes) -> None:
    """Garbage never escapes as another exception."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "cp.json"
        path.write_bytes(data)
        try:
            FileCheckpointStore(path, server_name=SERVER).load()
        except StoreError:
            pass


# --- SQLite ----------------------------------------------------------------------


def test_sqlite_commits_with_synchronous_full_and_touches_only_its_table(
    tmp_path: Path,
) -> None:
    """A database the user has other tables in keeps them; the store's
    session is synchronous=FULL (2), so a commit is on disk when it returns."""
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE mine (x)")
        db.execute("INSERT INTO mine VALUES (1)")
    store = SqliteCheckpointStore(path, server_name=SERVER)
    store.save({"events": {"master": 1}})
    assert store._db._connection is not None
    assert store._db._connection.execute("PRAGMA synchronous").fetchone() == (2,)
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT x FROM mine").fetchall() == [(1,)]
        (row,) = db.execute("SELECT name, server_name, positions FROM synrepl_checkpoints")
    assert row == ("default", SERVER, '{"events":{"master":1}}')


def test_sqlite_refuses_a_fifo_without_blocking_and_a_file_that_is_no_database(
    tmp_path: Path,
) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(StoreError, match="it is a FIFO \\(named pipe\\), not a regular file"):
        SqliteCheckpointStore(fifo, server_name=SERVER).load()
    text = tmp_path / "text.db"
    text.write_text("hello, this is not a database, " * 100)
    with pytest.raises(StoreError, match="cannot load checkpoint 'default' in the SQLite"):
        SqliteCheckpointStore(text, server_name=SERVER).load()


# --- PostgreSQL ----------------------------------------------------------------


def backend_pids(conninfo: str, application_name: str) -> list[int]:
    with psycopg.connect(conninfo, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = %s",
            (application_name,),
        ).fetchall()
    return [row[0] for row in rows]


def terminate(conninfo: str, application_name: str) -> None:
    """Cut the store's connection, as a server restart or a proxy would."""
    with psycopg.connect(conninfo, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = %s",
            (application_name,),
        )
    for _ in range(100):
        if not backend_pids(conninfo, application_name):
            return
        time.sleep(0.05)
    raise AssertionError("the backend did not go away")


def test_postgres_save_after_a_lost_connection_reconnects(pg_database: str) -> None:
    """The store's backend is terminated between two saves: the next save
    makes a new connection (a new backend) and is stored."""
    uri = pg_uri(pg_database, application_name="synrepl_lost_connection")
    store = checkpoint_store(uri, server_name=SERVER, name="lost")
    store.save({"events": {"master": 1}})
    (first,) = backend_pids(pg_database, "synrepl_lost_connection")
    terminate(pg_database, "synrepl_lost_connection")
    store.save({"events": {"master": 2}})
    (second,) = backend_pids(pg_database, "synrepl_lost_connection")
    assert second != first
    terminate(pg_database, "synrepl_lost_connection")
    assert store.load() == {"events": {"master": 2}}
    store.close()


def test_postgres_unreachable_fails_fast_without_the_password(tmp_path: Path) -> None:
    """Nothing listens on the port: the call fails at once, with an error
    that names the database but not the password; the next call tries again."""
    port = free_port()
    store = checkpoint_store(
        f"postgresql://postgres:hunter2-secret@127.0.0.1:{port}/db", server_name=SERVER
    )
    assert "hunter2" not in repr(store)
    for _ in range(2):
        started = time.monotonic()
        with pytest.raises(StoreError) as info:
            store.save({"events": {"master": 1}})
        assert time.monotonic() - started < 10
        message = str(info.value)
        assert f"postgresql://postgres@127.0.0.1:{port}/db" in message
        assert "Connection refused" in message
        assert "hunter2" not in message
    store.close()


def test_postgres_that_accepts_but_never_answers_fails_after_connect_timeout() -> None:
    """A server that takes the TCP connection and then says nothing (hung,
    or a black-holing proxy) fails after connect_timeout, never hangs."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        store = checkpoint_store(
            f"postgresql://postgres@127.0.0.1:{port}/db?connect_timeout=2", server_name=SERVER
        )
        started = time.monotonic()
        with pytest.raises(StoreError, match="cannot load checkpoint 'default'"):
            store.load()
        assert time.monotonic() - started < 30
        store.close()


def test_postgres_connection_strings_that_do_not_parse_never_show_the_password() -> None:
    for bad in (
        "postgresql://postgres:hunter 2@127.0.0.1/db",
        "postgresql://postgres:hunter2@127.0.0.1:notaport/db",
    ):
        with pytest.raises(StoreError) as info:
            store = checkpoint_store(bad, server_name=SERVER)
            store.load()
        assert "hunter" not in str(info.value)
    with pytest.raises(ValueError, match="table"):
        PostgresCheckpointStore("postgresql://h/db", server_name=SERVER, table="a; DROP")


def test_postgres_layout_is_one_jsonb_row_per_name(pg_database: str) -> None:
    """One row per (name): the whole map as jsonb, in a schema-qualified
    table created on first use."""
    with psycopg.connect(pg_database, autocommit=True) as admin:
        admin.execute("CREATE SCHEMA IF NOT EXISTS synrepl_layout")
    store = PostgresCheckpointStore(
        pg_database, server_name=SERVER, name="layout", table="synrepl_layout.cp"
    )
    store.save({"events": {"master": 3, "p1": 4}, "typing": {"master": 1}})
    store.close()
    with psycopg.connect(pg_database, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT name, server_name, positions FROM synrepl_layout.cp"
        ).fetchall()
    assert rows == [("layout", SERVER, {"events": {"master": 3, "p1": 4}, "typing": {"master": 1}})]


def test_postgres_turns_synchronous_commit_on_for_its_session(pg_database: str) -> None:
    """A database set to synchronous_commit=off would acknowledge commits
    before they are on disk: the store's session turns it back on."""
    with psycopg.connect(pg_database, autocommit=True) as admin:
        dbname = admin.info.dbname
        admin.execute(f"ALTER DATABASE {dbname} SET synchronous_commit = off")
    try:
        store = PostgresCheckpointStore(pg_database, server_name=SERVER, name="sync")
        store.save({})
        connection = store._db._connection
        assert connection is not None
        assert connection.execute("SHOW synchronous_commit").fetchone() == ("on",)
        store.close()
    finally:
        with psycopg.connect(pg_database, autocommit=True) as admin:
            admin.execute(f"ALTER DATABASE {dbname} RESET synchronous_commit")


def test_postgres_role_that_may_not_create_tables_uses_an_existing_one(
    pg_database: str,
) -> None:
    """A DBA creates the table and grants only reads and writes: the store
    checks the table exists before any CREATE, so it works."""
    role = f"synrepl_role_{secrets.token_hex(4)}"
    with psycopg.connect(pg_database, autocommit=True) as admin:
        PostgresCheckpointStore(pg_database, server_name=SERVER, table="granted").save({})
        admin.execute(f"CREATE ROLE {role} LOGIN")
        admin.execute(f"REVOKE CREATE ON SCHEMA public FROM {role}, PUBLIC")
        admin.execute(f"GRANT SELECT, INSERT, UPDATE ON granted TO {role}")
    try:
        uri = pg_uri(pg_database, user=role)
        store = PostgresCheckpointStore(uri, server_name=SERVER, name="limited", table="granted")
        store.save({"events": {"master": 1}})
        assert store.load() == {"events": {"master": 1}}
        store.close()
        denied = PostgresCheckpointStore(uri, server_name=SERVER, table="not_granted")
        with pytest.raises(StoreError, match="permission denied"):
            denied.save({})
        denied.close()
    finally:
        with psycopg.connect(pg_database, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (role,),
            )
            admin.execute(f"DROP OWNED BY {role}")
            admin.execute(f"DROP ROLE {role}")


# --- from a string -------------------------------------------------------------


def test_checkpoint_store_reads_the_spec(tmp_path: Path) -> None:
    """A plain path or file:PATH is a file, sqlite:PATH SQLite, a
    postgresql:// or postgres:// URI PostgreSQL; nothing is opened yet."""
    plain = checkpoint_store(str(tmp_path / "a.json"), server_name=SERVER, name="x")
    assert isinstance(plain, FileCheckpointStore)
    assert (plain.path, plain.name) == (tmp_path / "a.json", "x")
    assert isinstance(checkpoint_store("file:a:b.json", server_name=SERVER), FileCheckpointStore)
    assert isinstance(checkpoint_store("sqlite:x.db", server_name=SERVER), SqliteCheckpointStore)
    for uri in ("postgresql://u@127.0.0.1:1/db", "postgres://u@127.0.0.1:1/db"):
        assert isinstance(checkpoint_store(uri, server_name=SERVER), PostgresCheckpointStore)
    assert not (tmp_path / "a.json").exists()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "non-empty string"),
        ("sqlite:", "needs a path"),
        ("file:", "needs a path"),
        ("mysql://root:pw@db/x", "unknown store 'mysql:'"),
        ("redis:thing", "unknown store 'redis:'"),
    ],
)
def test_checkpoint_store_refuses_what_it_does_not_know(spec: str, message: str) -> None:
    with pytest.raises(StoreError, match=message) as info:
        checkpoint_store(spec, server_name=SERVER)
    assert "pw" not in str(info.value)
