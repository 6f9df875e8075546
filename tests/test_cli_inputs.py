"""Files the CLI is pointed at (``--secret-file``, ``watch --resume``, a
``doctor -c`` directory) are read as config files are: a regular file only,
bounded in size. A FIFO, a device or a directory is one error line, never a
hang; every command runs with a timeout, so a regression fails instead."""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from test_cli_support import run_synrepl_blocking

from synrepl.cli._errors import UsageError
from synrepl.cli._watcher import MAX_POSITION_FILE_SIZE, PositionFile
from synrepl.config import MAX_SECRET_FILE_SIZE, FileRefusedError, read_regular_file

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="FIFOs and /dev/null are POSIX")

#: Nothing listens on port 1: a command that gets past its inputs fails fast.
NO_REDIS = ("--server-name", "inputs.test", "--redis-url", "redis://127.0.0.1:1")


def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


def directory(tmp_path: Path) -> Path:
    path = tmp_path / "dir"
    path.mkdir()
    return path


def device(tmp_path: Path) -> Path:
    return Path(os.devnull)


SPECIAL = [
    pytest.param(fifo, "a FIFO (named pipe)", id="fifo"),
    pytest.param(directory, "a directory", id="directory"),
    pytest.param(device, "a character device", id="device"),
]

Make = Callable[[Path], Path]


def error_line(stderr: str) -> str:
    """The one line a usage error prints (no usage text, no traceback)."""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("synrepl: error: "), stderr
    return lines[0]


# --- the public reader ---------------------------------------------------------


@pytest.mark.parametrize(("make", "kind"), SPECIAL)
def test_read_regular_file_refuses_what_is_not_a_regular_file(
    tmp_path: Path, make: Make, kind: str
) -> None:
    """A FIFO is refused without being opened for a writer to come; the
    refusal is an OSError whose reason says what the path is."""
    with pytest.raises(FileRefusedError) as info:
        read_regular_file(make(tmp_path), 100, "a test file")
    assert info.value.reason == f"it is {kind}, not a regular file"
    assert isinstance(info.value, OSError)
    assert info.value.errno is None


def test_read_regular_file_keeps_the_errno_and_the_size_limit(tmp_path: Path) -> None:
    """A missing file keeps ENOENT (so callers can treat it as "not yet");
    a file of ``limit`` bytes is read, one byte more is refused."""
    with pytest.raises(FileRefusedError) as info:
        read_regular_file(tmp_path / "missing", 100, "a test file")
    assert info.value.errno == errno.ENOENT
    file = tmp_path / "f"
    file.write_bytes(b"x" * 100)
    assert read_regular_file(file, 100, "a test file") == b"x" * 100
    file.write_bytes(b"x" * 101)
    with pytest.raises(FileRefusedError, match="larger than 100 bytes, too large for a test"):
        read_regular_file(file, 100, "a test file")


# --- --secret-file ---------------------------------------------------------------


@pytest.mark.parametrize(("make", "kind"), SPECIAL)
def test_secret_file_that_is_not_a_regular_file_is_a_usage_error(
    tmp_path: Path, make: Make, kind: str
) -> None:
    """``--secret-file FIFO`` used to wait for a writer forever, and
    ``/dev/null`` was an empty secret: now each is exit 2 with one line."""
    path = make(tmp_path)
    result = run_synrepl_blocking("watch", *NO_REDIS, "--secret-file", str(path))
    assert result.returncode == 2, result.stderr
    assert error_line(result.stderr) == (
        f"synrepl: error: --secret-file: cannot read the secret file '{path}': "
        f"it is {kind}, not a regular file"
    )


def test_secret_file_larger_than_the_limit_is_refused_unquoted(tmp_path: Path) -> None:
    """A secret file is a line: one over MAX_SECRET_FILE_SIZE is refused
    before it is read, and the message never quotes it."""
    path = tmp_path / "secret"
    path.write_text("SECRETSECRET" * (MAX_SECRET_FILE_SIZE // 12 + 1))
    result = run_synrepl_blocking("watch", *NO_REDIS, "--secret-file", str(path))
    assert result.returncode == 2, result.stderr
    line = error_line(result.stderr)
    assert "larger than 64 KiB, too large for a secret" in line
    assert "SECRET" not in line.replace(str(path), "")


# --- watch --resume FILE ------------------------------------------------------------


@pytest.mark.parametrize(("make", "kind"), SPECIAL)
def test_resume_file_that_is_not_a_regular_file_is_a_usage_error(
    tmp_path: Path, make: Make, kind: str
) -> None:
    """``--resume FIFO`` used to hang, a device read as an empty file: now
    exit 2 with one line naming what the path is, before Redis is tried."""
    path = make(tmp_path)
    result = run_synrepl_blocking("watch", *NO_REDIS, "--resume", str(path))
    assert result.returncode == 2, result.stderr
    assert error_line(result.stderr) == (
        f"synrepl: error: cannot read the position file '{path}': it is {kind}, not a regular file"
    )
    assert stat.S_ISREG(os.stat(path).st_mode) is False  # left as it was


def test_resume_file_larger_than_the_limit_is_refused(tmp_path: Path) -> None:
    """A position file over MAX_POSITION_FILE_SIZE (16 MiB) is refused
    before it is parsed."""
    path = tmp_path / "watch.pos"
    with path.open("wb") as f:
        f.truncate(MAX_POSITION_FILE_SIZE + 1)
    result = run_synrepl_blocking("watch", *NO_REDIS, "--resume", str(path))
    assert result.returncode == 2, result.stderr
    assert error_line(result.stderr) == (
        f"synrepl: error: cannot read the position file '{path}': "
        "it is larger than 16 MiB, too large for a position file"
    )


def test_missing_resume_file_still_means_start_from_now(tmp_path: Path) -> None:
    """A file that does not exist yet is created (then Redis fails: exit 1)."""
    path = tmp_path / "watch.pos"
    result = run_synrepl_blocking(
        "watch", *NO_REDIS, "--connect-timeout", "2", "--resume", str(path)
    )
    assert result.returncode == 1, result.stderr
    assert "position file" not in result.stderr
    assert json.loads(path.read_text())["server_name"] == "inputs.test"


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("[" * 100_000, id="nested too deeply"),
        pytest.param("\xff\xfe\x00", id="not UTF-8"),
        pytest.param('{"positions": {"events": {"master": "1"}}}', id="a string token"),
        pytest.param("[]", id="a list"),
    ],
)
def test_a_file_that_is_not_a_position_file_is_a_usage_error(tmp_path: Path, text: str) -> None:
    """Whatever the file holds, it is "not a synrepl position file", never
    an internal error (deep nesting used to escape as RecursionError)."""
    path = tmp_path / "watch.pos"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(UsageError, match="is not a synrepl position file; remove it"):
        PositionFile(path, "inputs.test").load()


def test_another_servers_file_is_named_in_a_bounded_message(tmp_path: Path) -> None:
    """The owner's name comes from the file: it is quoted as an excerpt."""
    path = tmp_path / "watch.pos"
    path.write_text(json.dumps({"server_name": "x" * 10**6, "positions": {}}))
    with pytest.raises(UsageError, match="belongs to server 'xxx") as info:
        PositionFile(path, "inputs.test").load()
    assert len(info.value.message) < 500


@pytest.mark.parametrize("make", [fifo, directory], ids=["fifo", "directory"])
def test_save_leaves_a_path_that_is_not_a_regular_file_alone(tmp_path: Path, make: Make) -> None:
    """Saving over a FIFO (or a directory) that took the file's place is an
    OSError (watch prints it as a warning), and the FIFO stays: os.replace
    used to put the file in its place without a word."""
    file = PositionFile(tmp_path / "watch.pos", "inputs.test")
    file.save({"events": {"master": 1}})
    (tmp_path / "watch.pos").unlink()
    make(tmp_path).rename(tmp_path / "watch.pos")
    with pytest.raises(OSError, match="is not a regular file, so it is not replaced"):
        file.save({"events": {"master": 2}})
    assert stat.S_ISREG(os.stat(tmp_path / "watch.pos").st_mode) is False
    assert [p.name for p in tmp_path.iterdir()] == ["watch.pos"]  # no temporary file left


def test_save_then_load_round_trips_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    """Saved positions merge, load back in a new run, and only the file remains."""
    path = tmp_path / "watch.pos"
    file = PositionFile(path, "inputs.test")
    assert file.load() is None
    file.save({"events": {"master": 5}})
    file.save({"typing": {"master": 2}})
    assert PositionFile(path, "inputs.test").load() == {
        "events": {"master": 5},
        "typing": {"master": 2},
    }
    assert [p.name for p in tmp_path.iterdir()] == ["watch.pos"]


# --- doctor -c DIRECTORY ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_entry", "kind"),
    [
        pytest.param(os.mkfifo, "a FIFO (named pipe)", id="fifo"),
        pytest.param(os.mkdir, "a directory", id="directory"),
    ],
)
def test_doctor_reads_a_config_directory_as_load_config_does(
    tmp_path: Path, make_entry: Callable[[Path], None], kind: str
) -> None:
    """doctor re-read the files for their listeners with its own reader,
    which waited forever on a FIFO named ``*.yaml`` in a ``-c`` directory
    (and failed on a directory) that load_config skips: now both read with
    load_config's reader, so the entry is a warning and the checks go on."""
    config = tmp_path / "conf.d"
    config.mkdir()
    (config / "homeserver.yaml").write_text(yaml.safe_dump({"server_name": "inputs.test"}))
    make_entry(config / "zz.yaml")
    result = run_synrepl_blocking("doctor", "-c", str(config), "--color", "never")
    assert "Traceback" not in result.stdout + result.stderr
    assert "internal error" not in result.stderr
    assert result.returncode == 1, result.stdout + result.stderr  # redis.enabled is not true
    assert (
        f"[warn] config: config file '{config / 'zz.yaml'}' skipped: it is {kind}, "
        "not a regular file (Synapse skips it too)"
    ) in result.stdout.splitlines()
    assert "[FAIL] config: redis.enabled is not true" in result.stdout
