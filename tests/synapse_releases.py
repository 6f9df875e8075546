"""Reading a Synapse release's replication facts from its wheel (as data).

A wheel is a zip of Synapse's source: its stream classes (``NAME`` and the
fields of their ``ROW_TYPE``), command classes, HTTP endpoint classes
(``NAME``, by class) and the fields of its ``WriterLocations`` (the
``stream_writers`` keys) are read with ``ast``, never imported or run, so
any release can be read beside the installed one.  ``python tests/synapse_releases.py DIR``
prints what changed from release to release among the wheels in DIR; the
tests compare :mod:`synrepl.releases` with the same reading.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import attrs

__all__ = ("WheelFacts", "read_wheel", "read_installed", "download_wheel")


@attrs.frozen
class WheelFacts:
    """What a release's source defines (stream name -> row fields, or None
    for a stream whose rows are of several types, as ``events``; endpoint
    class name -> the ``NAME`` it declares, since two classes may declare
    one name)."""

    streams: dict[str, tuple[str, ...] | None]
    commands: frozenset[str]
    endpoints: frozenset[str]
    endpoint_classes: dict[str, str]
    writer_keys: tuple[str, ...]


def _named_classes(tree: ast.AST) -> Iterator[tuple[ast.ClassDef, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for stmt in node.body:
                if (
                    isinstance(stmt, ast.Assign)
                    and len(stmt.targets) == 1
                    and isinstance(stmt.targets[0], ast.Name)
                    and stmt.targets[0].id == "NAME"
                    and isinstance(stmt.value, ast.Constant)
                    and isinstance(stmt.value.value, str)
                ):
                    yield node, stmt.value.value


def _annotated_fields(cls: ast.ClassDef) -> tuple[str, ...]:
    """An attrs class's fields: its annotated names, in order."""
    return tuple(
        s.target.id
        for s in cls.body
        if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
    )


def _row_fields(cls: ast.ClassDef, classes: dict[str, ast.ClassDef]) -> tuple[str, ...] | None:
    for stmt in cls.body:
        if (
            isinstance(stmt, ast.Assign)
            and isinstance(stmt.targets[0], ast.Name)
            and stmt.targets[0].id == "ROW_TYPE"
            and isinstance(stmt.value, ast.Name)
            and stmt.value.id in classes
        ):
            return _annotated_fields(classes[stmt.value.id])
    return None


def read_wheel(wheel: Path) -> WheelFacts:
    """The replication facts of the release packed in ``wheel``."""
    with zipfile.ZipFile(wheel) as z:
        return _read((name, lambda name=name: z.read(name)) for name in z.namelist())


def read_installed() -> WheelFacts:
    """The replication facts of the Synapse installed here (its files, read
    the same way, so the installed release checks the reading itself)."""
    import synapse

    root = Path(synapse.__file__).parent.parent
    paths = [*(root / "synapse" / "replication").rglob("*.py"), root / _WORKERS_CONFIG]
    return _read((str(path.relative_to(root)), path.read_bytes) for path in paths)


#: Where ``WriterLocations`` (the ``stream_writers`` keys) is defined.
_WORKERS_CONFIG = "synapse/config/workers.py"


def _read(files: Iterable[tuple[str, Callable[[], bytes]]]) -> WheelFacts:
    streams: dict[str, tuple[str, ...] | None] = {}
    commands: set[str] = set()
    endpoint_classes: dict[str, str] = {}
    writer_keys: tuple[str, ...] = ()
    for name, data in files:
        if not name.endswith(".py"):
            continue
        if name.startswith("synapse/replication/tcp/streams/"):
            tree = ast.parse(data())
            classes = {c.name: c for c in ast.walk(tree) if isinstance(c, ast.ClassDef)}
            for cls, value in _named_classes(tree):
                streams[value] = _row_fields(cls, classes)
        elif name == "synapse/replication/tcp/commands.py":
            commands.update(v for _, v in _named_classes(ast.parse(data())))
        elif name.startswith("synapse/replication/http/"):
            endpoint_classes.update((c.name, v) for c, v in _named_classes(ast.parse(data())))
        elif name == _WORKERS_CONFIG:
            tree = ast.parse(data())
            writer_keys = next(
                _annotated_fields(c)
                for c in ast.walk(tree)
                if isinstance(c, ast.ClassDef) and c.name == "WriterLocations"
            )
    endpoints = frozenset(endpoint_classes.values())
    return WheelFacts(streams, frozenset(commands), endpoints, endpoint_classes, writer_keys)


def download_wheel(version: str, directory: Path) -> Path:
    """Synapse ``version``'s wheel from the package index, binary only (the
    sdists need a Rust toolchain), kept in ``directory`` for the next run."""
    directory.mkdir(parents=True, exist_ok=True)
    found = sorted(directory.glob(f"matrix_synapse-{version}-*.whl"))
    if not found:
        subprocess.run(
            [
                *(sys.executable, "-m", "pip", "download", f"matrix-synapse=={version}"),
                *("--only-binary=:all:", "--no-deps", "--quiet", "-d", str(directory)),
            ],
            check=True,
            timeout=300,
        )
        found = sorted(directory.glob(f"matrix_synapse-{version}-*.whl"))
    return found[0]


def _key(wheel: Path) -> tuple[int, ...]:
    return tuple(int(p) for p in wheel.name.split("-")[1].split("."))


if __name__ == "__main__":
    previous: WheelFacts | None = None
    for wheel in sorted(Path(sys.argv[1]).glob("matrix_synapse-*.whl"), key=_key):
        facts = read_wheel(wheel)
        version = wheel.name.split("-")[1]
        if previous is None:
            print(version, "streams", sorted(facts.streams), "commands", sorted(facts.commands))
            print(version, "writer keys", facts.writer_keys)
        else:
            changes = {
                "streams +": sorted(set(facts.streams) - set(previous.streams)),
                "streams -": sorted(set(previous.streams) - set(facts.streams)),
                "rows changed": sorted(
                    s
                    for s in facts.streams
                    if previous.streams.get(s, facts.streams[s]) != facts.streams[s]
                ),
                "commands +": sorted(facts.commands - previous.commands),
                "commands -": sorted(previous.commands - facts.commands),
                "endpoints +": sorted(facts.endpoints - previous.endpoints),
                "endpoints -": sorted(previous.endpoints - facts.endpoints),
                "endpoint classes renamed": sorted(
                    f"{cls}: {previous.endpoint_classes[cls]} -> {name}"
                    for cls, name in facts.endpoint_classes.items()
                    if previous.endpoint_classes.get(cls, name) != name
                ),
                "writer keys +": sorted(set(facts.writer_keys) - set(previous.writer_keys)),
                "writer keys -": sorted(set(previous.writer_keys) - set(facts.writer_keys)),
            }
            if any(changes.values()):
                print(version, {k: v for k, v in changes.items() if v})
        previous = facts
