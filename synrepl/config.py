"""Read Synapse's own YAML configuration into one frozen :class:`SynapseConfig`.

A synrepl process joins a cluster that is already configured, so it reads
the same files the Synapse processes read (``homeserver.yaml`` plus a worker
file) instead of asking for the facts again. Later files replace earlier
top-level keys, as Synapse's repeated ``-c`` options do.

Every mistake is a :class:`~synrepl.errors.ConfigError` whose ``path`` names
the offending key. Secrets (the replication secret, the Redis password) are
wrapped in :class:`Secret` so they never show in a repr, a log line or an
error message.

Input is bounded, because a config error must be quick and short whatever
the file holds: only regular files are read (a FIFO or a device would block
or never end), config files up to :data:`MAX_CONFIG_FILE_SIZE` and secret
files up to :data:`MAX_SECRET_FILE_SIZE`; YAML may nest
:data:`MAX_YAML_DEPTH` levels and its aliases may add
:data:`MAX_ALIAS_EXPANSION` nodes, checked while composing, before anything
is expanded; and an error message quotes at most an excerpt of a value.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import attrs
import yaml

from synrepl._files import file_kind, os_reason
from synrepl.errors import ConfigError, SynreplError, excerpt, shown
from synrepl.sharding import (
    MAIN_INSTANCE_NAME,
    MAIN_MAP_KEY,
    SINGLE_WRITER_KEYS,
    STREAM_WRITER_KEYS,
    InstanceLocation,
    StreamWriters,
    canonical_instance_name,
)

__all__ = (
    "load_config",
    "config_from_dict",
    "read_config_files",
    "read_secret_file",
    "read_regular_file",
    "FileRefusedError",
    "SynapseConfig",
    "RedisConfig",
    "Secret",
    "MAX_CONFIG_FILE_SIZE",
    "MAX_SECRET_FILE_SIZE",
    "MAX_YAML_DEPTH",
    "MAX_ALIAS_EXPANSION",
)

KeyPath = tuple[str, ...]
StrPath = str | os.PathLike[str]

#: ``worker_app`` values that mean "this is the main process".
_MAIN_WORKER_APPS = frozenset({"synapse.app.homeserver"})

#: Old top-level keys that located the main process before ``instance_map.main``.
_OLD_HOST = "worker_replication_host"
_OLD_PORT = "worker_replication_http_port"
_OLD_TLS = "worker_replication_http_tls"
_OLD_URI = "worker_main_http_uri"
_OLD_KEYS = (_OLD_HOST, _OLD_PORT, _OLD_TLS, _OLD_URI)

#: The largest config file read, in bytes (1 MiB). A homeserver.yaml is a
#: few KiB (Synapse's old fully commented sample was about 100 KiB), and
#: PyYAML's pure-Python parser, the one Synapse uses, reads adversarial
#: YAML at a few hundred KiB a second: 1 MiB keeps a wrong file to seconds.
MAX_CONFIG_FILE_SIZE = 1 << 20

#: The largest secret file read, in bytes (64 KiB): a secret is a line.
MAX_SECRET_FILE_SIZE = 64 << 10

#: The deepest nesting of sequences and mappings in a config file. Synapse's
#: options nest a handful of levels; the parser recurses about three Python
#: frames a level, so this stays far from the recursion limit.
MAX_YAML_DEPTH = 100

#: How many nodes a config file's aliases may add once expanded. Anchors
#: shared a few dozen times add hundreds; "billion laughs" adds billions.
MAX_ALIAS_EXPANSION = 100_000

#: The longest key (of a path, or a file name) quoted in an error message.
_KEY_LIMIT = 80
#: The longest rendering of a value or a path quoted in an error message.
#: The longest error message, a net under the bounds above.
_MESSAGE_LIMIT = 1000


def _one_line(text: str) -> str:
    return text if text.isprintable() else repr(text)[1:-1]


def _key(key: object) -> str:
    """A key of the user's, bounded, for a ConfigError path or message."""
    return excerpt(_one_line(str(key)), _KEY_LIMIT)


def _show_path(path: object) -> str:
    """A file name for an error message (from argv or from the config)."""
    return excerpt(_one_line(os.fsdecode(path) if isinstance(path, bytes) else str(path)), 300)


def _capped(error: ConfigError) -> ConfigError:
    """``error`` with message and path cut to a readable length: a net under
    the checks, for messages built elsewhere (``synrepl.sharding``)."""
    path = tuple(excerpt(_one_line(p), _KEY_LIMIT) for p in error.path)
    message = excerpt(_one_line(error.message), _MESSAGE_LIMIT)
    if path == error.path and message == error.message:
        return error
    return ConfigError(message, path)


@attrs.frozen(repr=False)
class Secret:
    """A string that must not leak: its repr and str are ``Secret('***')``.

    Call :meth:`reveal` at the one place that needs the value (an HTTP
    header, a Redis AUTH).
    """

    _value: str = attrs.field(repr=False)

    def reveal(self) -> str:
        """The secret itself; keep it out of logs."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


@attrs.frozen
class RedisConfig:
    """The ``redis:`` section. Only ``enabled`` is read when Redis is off,
    as Synapse does."""

    enabled: bool = False
    host: str = "localhost"
    port: int = 6379
    path: str | None = None
    dbid: int | None = None
    username: str | None = None
    password: Secret | None = None
    use_tls: bool = False
    certificate_file: str | None = None
    private_key_file: str | None = None
    ca_file: str | None = None
    ca_path: str | None = None


def _frozen_map(value: Mapping[str, InstanceLocation]) -> Mapping[str, InstanceLocation]:
    return MappingProxyType(dict(value))


@attrs.frozen
class SynapseConfig:
    """What synrepl needs from a Synapse deployment's configuration.

    ``instance_map`` is keyed by instance name, so the main process is under
    ``"master"`` even though the YAML lists it as ``main``.
    """

    server_name: str
    redis: RedisConfig = attrs.field(factory=RedisConfig)
    worker_app: str | None = None
    worker_name: str | None = None
    worker_replication_secret: Secret | None = None
    instance_map: Mapping[str, InstanceLocation] = attrs.field(
        factory=dict, converter=_frozen_map, hash=False
    )
    stream_writers: StreamWriters = attrs.field(factory=StreamWriters)
    #: Deprecated or ignored settings that were met while loading.
    warnings: tuple[str, ...] = attrs.field(default=(), eq=False)

    @property
    def instance_name(self) -> str:
        """The name this process uses on the wire: worker name, or ``master``."""
        return self.worker_name or MAIN_INSTANCE_NAME

    @property
    def is_main(self) -> bool:
        """True when the configuration is the main process's own."""
        return self.instance_name == MAIN_INSTANCE_NAME

    def location_of(self, instance_name: str) -> InstanceLocation:
        """Where ``instance_name`` serves HTTP replication (``main`` = ``master``).

        Raises:
            ConfigError: the instance is not in ``instance_map``.
        """
        location = self.instance_map.get(canonical_instance_name(instance_name))
        if location is None:
            raise ConfigError(
                f"no entry for instance {shown(instance_name)} "
                f"(known instances: {_some_names(self.instance_map)}); "
                "add it with host and port, or path",
                ("instance_map",),
            )
        return location


def _some_names(names: Iterable[str], shown: int = 10) -> str:
    """``a, b, c and 7 more``: a bounded list of names for a message."""
    ordered = sorted(names)
    if not ordered:
        return "none"
    text = ", ".join(_key(name) for name in ordered[:shown])
    rest = len(ordered) - shown
    return f"{text} and {rest} more" if rest > 0 else text


# --- files -----------------------------------------------------------------


def load_config(*paths: StrPath) -> SynapseConfig:
    """Load and merge Synapse config files, later ones replacing top-level keys.

    A directory stands for its ``*.yaml`` files in sorted order, as with
    Synapse's ``-c``. Relative secret file paths are taken from the current
    directory, as Synapse takes them.

    Raises:
        ConfigError: a file cannot be read, is not a regular file, is too
            large, is not YAML or is refused by the limits above, or the
            merged configuration is invalid.
    """
    warnings: list[str] = []
    try:
        merged = _read_merged(paths, warnings)
        return _build(merged, None, warnings)
    except ConfigError as e:
        raise _capped(e) from None


def read_config_files(*paths: StrPath) -> dict[str, Any]:
    """The merged YAML of config files, read as :func:`load_config` reads
    them (same file checks and limits), for options SynapseConfig does not
    keep (``listeners``, ...).

    Raises:
        ConfigError: a file cannot be read, or is refused.
    """
    try:
        return _read_merged(paths, [])
    except ConfigError as e:
        raise _capped(e) from None


def read_secret_file(path: StrPath) -> str:
    """A secret read from a file, stripped, with the checks config files
    get: a regular file of at most :data:`MAX_SECRET_FILE_SIZE` bytes.

    Raises:
        ConfigError: it cannot be read; the message names the file and says
            why, but never shows what it holds.
    """
    return _secret_text(path, f"cannot read the secret file '{_show_path(path)}'", ())


def _read_merged(paths: tuple[StrPath, ...], warnings: list[str]) -> dict[str, Any]:
    if not paths:
        raise ConfigError("no config file given; pass homeserver.yaml (and the worker file)")
    merged: dict[str, Any] = {}
    for file in _expand_paths(paths, warnings):
        merged.update(_read_yaml_file(file, warnings))
    return merged


def _expand_paths(paths: Iterable[StrPath], warnings: list[str]) -> list[Path]:
    """Files to read, with directories replaced by their ``*.yaml`` entries.

    Entries that are not regular files are skipped, as Synapse skips them,
    with a warning (Synapse says nothing); checking with ``stat`` means a
    FIFO among them is never opened.
    """
    files: list[Path] = []
    for path in map(Path, paths):
        if not os.path.isdir(path):
            files.append(path)
            continue
        try:
            entries = sorted(path.iterdir())
        except OSError as e:
            raise ConfigError(
                f"cannot read config directory '{_show_path(path)}': {os_reason(e)}"
            ) from None
        for entry in entries:
            if entry.suffix != ".yaml":
                continue
            try:
                kind = file_kind(os.stat(entry).st_mode)
            except OSError as e:
                kind = f"unreadable ({os_reason(e)})"
            if kind is None:
                files.append(entry)
            else:
                warnings.append(
                    f"config file '{_show_path(entry)}' skipped: it is {kind}, "
                    "not a regular file (Synapse skips it too)"
                )
    return files


class FileRefusedError(SynreplError, OSError):
    """:func:`read_regular_file` did not read a file.

    An :class:`OSError`, so that code catching what ``open`` raises catches
    this too; its text is ``reason`` alone, so a message can name the file
    its own way.

    Attributes:
        reason: why, in words ("it is a FIFO (named pipe), not a regular
            file", "No such file or directory"); never what the file holds.
        errno: the OS error number when the OS refused (``errno.ENOENT``
            for a missing file, ...), else None.
    """

    def __init__(self, reason: str, errno: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.errno = errno


def _size_text(size: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} bytes"


#: Never wait: a FIFO opened for reading would wait for a writer. It is
#: refused after ``stat`` already; the flag closes the race where the path
#: is replaced by one in between. Reads from regular files ignore it.
_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_NOCTTY", 0)
    | getattr(os, "O_CLOEXEC", 0)
)


def read_regular_file(path: StrPath, limit: int, what: str) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes, read the way
    config and secret files are: it never blocks on a FIFO, never reads a
    device, and never reads more than ``limit + 1`` bytes, whatever the
    path names or turns into meanwhile (``stat``, then an ``O_NONBLOCK``
    open, then ``fstat``).

    Args:
        path: the file.
        limit: the largest size accepted, in bytes.
        what: what the file is, for the too-large reason ("a config file").

    Raises:
        FileRefusedError: it cannot be read, is not a regular file, or is
            larger than ``limit``.
    """
    try:
        return _read_checked(path, limit, what)
    except FileRefusedError:
        raise
    except OSError as e:
        raise FileRefusedError(os_reason(e), e.errno) from None
    except ValueError:  # "embedded null byte"
        raise FileRefusedError("the path contains a NUL character") from None


def _read_checked(path: StrPath, limit: int, what: str) -> bytes:
    too_large = f"it is larger than {_size_text(limit)}, too large for {what}"
    _refuse_special(os.stat(path).st_mode)
    with os.fdopen(os.open(path, _OPEN_FLAGS), "rb") as stream:
        info = os.fstat(stream.fileno())
        _refuse_special(info.st_mode)
        if info.st_size > limit:
            raise FileRefusedError(too_large)
        data = stream.read(limit + 1)
    if len(data) > limit:
        raise FileRefusedError(too_large)
    return data


def _refuse_special(mode: int) -> None:
    kind = file_kind(mode)
    if kind is not None:
        raise FileRefusedError(f"it is {kind}, not a regular file")


def _read_yaml_file(file: Path, warnings: list[str]) -> Mapping[str, Any]:
    """Parse one file; its error messages name the file but quote none of it."""
    name = _show_path(file)
    try:
        text = read_regular_file(file, MAX_CONFIG_FILE_SIZE, "a config file").decode("utf-8")
    except FileRefusedError as e:
        raise ConfigError(f"cannot read config file '{name}': {e.reason}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{name}' is not UTF-8 text") from None
    try:
        data = yaml.load(text, Loader=_BoundedLoader)  # a SafeLoader
    except _LimitError as e:
        hint = f"; {e.note}" if e.note else ""
        raise ConfigError(f"config file '{name}' is refused: {_yaml_reason(e)}{hint}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{name}' is not valid YAML: {_yaml_reason(e)}") from None
    except RecursionError:
        raise ConfigError(f"config file '{name}' is nested too deeply to read") from None
    if data is None:
        warnings.append(f"config file '{name}' is empty")
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file '{name}' must hold a mapping of option names to values, "
            f"not a {type(data).__name__}"
        )
    return data


class _LimitError(yaml.MarkedYAMLError):
    """A document refused by a limit (not a syntax error)."""


class _BoundedLoader(yaml.SafeLoader):
    """Synapse's loader (``yaml.safe_load``), refusing while it composes a
    document that nests deeper than :data:`MAX_YAML_DEPTH` or whose aliases
    would add more than :data:`MAX_ALIAS_EXPANSION` nodes once expanded.

    Composing never expands an alias (it reuses the anchored node), so the
    check costs one counter per node: each alias adds its anchor's expanded
    size, remembered when that node was composed. ``<<`` merges are covered
    too, since a merge copies at most what its alias expands to.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0  # the document's nodes so far, aliases expanded
        self._added = 0  # of which brought in by aliases
        self._anchor_sizes: dict[str, int] = {}

    def compose_document(self) -> yaml.Node | None:
        self._anchor_sizes = {}
        return super().compose_document()

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event: Any = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent):
            self._count_alias(event)
            return super().compose_node(parent, index)
        if self._depth >= MAX_YAML_DEPTH:
            raise _LimitError(
                problem=f"it is nested more than {MAX_YAML_DEPTH} levels deep",
                problem_mark=event.start_mark,
            )
        anchor: str | None = getattr(event, "anchor", None)
        before = self._nodes
        self._nodes += 1
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if anchor is not None:
            self._anchor_sizes[anchor] = self._nodes - before
        return node

    def _count_alias(self, event: Any) -> None:
        anchor: str | None = event.anchor
        if anchor is None or anchor not in self.anchors:
            return  # undefined: the composer says so
        size = self._anchor_sizes.get(anchor)
        if size is None:
            raise _LimitError(
                problem=f"the alias *{_key(anchor)} refers to itself",
                problem_mark=event.start_mark,
                note="it is inside the node it names",
            )
        self._nodes += size
        self._added += size
        if self._added > MAX_ALIAS_EXPANSION:
            raise _LimitError(
                problem=f"its aliases expand to more than {MAX_ALIAS_EXPANSION} extra values",
                problem_mark=event.start_mark,
                note="write the values out, or use fewer aliases",
            )

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        """A scalar the constructors choke on (``9`` x 5000, ``2020-02-30``)
        is a YAML error with its line, not a ValueError."""
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as e:
            why = str(e)
            value = getattr(node, "value", None)
            if not why or (isinstance(value, str) and value and value in why):
                why = type(e).__name__  # never echo the value: it may be a secret
            raise yaml.constructor.ConstructorError(
                problem=f"cannot read this value: {excerpt(why, 100)}",
                problem_mark=node.start_mark,
            ) from None


def _yaml_reason(error: yaml.YAMLError) -> str:
    # Never str(error): its snippet could quote a secret on the bad line.
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = excerpt(_one_line(error.problem or "syntax error"), 200)
        return f"{problem}{where}"
    return type(error).__name__


def _secret_text(file: StrPath, cannot: str, path: KeyPath) -> str:
    """Read a secret file, stripped; errors say why but never what it held."""
    try:
        return read_regular_file(file, MAX_SECRET_FILE_SIZE, "a secret").decode("utf-8").strip()
    except FileRefusedError as e:
        raise ConfigError(f"{cannot}: {e.reason}", path) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{cannot}: it is not UTF-8 text", path) from None


def _read_secret_file(file: str, path: KeyPath, base_dir: StrPath | None) -> str:
    full = Path(base_dir, file) if base_dir is not None else Path(file)
    return _secret_text(full, f"cannot read the file '{_show_path(file)}'", path)


# --- values ----------------------------------------------------------------


def _mapping(value: object, path: KeyPath) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"must be a mapping, got a {type(value).__name__}", path)
    return value


def _opt_str(section: Mapping[str, Any], key: str, where: KeyPath) -> str | None:
    value = section.get(key)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"must be a string, got {shown(value)}", (*where, key))
    return value


def _bool(section: Mapping[str, Any], key: str, where: KeyPath, default: bool) -> bool:
    value = section.get(key, default)
    if type(value) is not bool:
        raise ConfigError(f"must be true or false, got {shown(value)}", (*where, key))
    return value


def _port(value: object, path: KeyPath) -> int:
    if type(value) is not int or not 1 <= value <= 65535:
        raise ConfigError(f"must be a whole number from 1 to 65535, got {shown(value)}", path)
    return value


def _secret(
    section: Mapping[str, Any], key: str, where: KeyPath, base_dir: StrPath | None
) -> str | None:
    """An inline secret ``key`` or one read from ``key_path``; not both."""
    inline = section.get(key)
    if inline is not None and not isinstance(inline, str):
        raise ConfigError("must be a string (quote the value in YAML)", (*where, key))
    file_key = f"{key}_path"
    file = _opt_str(section, file_key, where)
    if not file:
        return inline
    if inline:
        raise ConfigError(f"set either {key} or {file_key}, not both", (*where, file_key))
    return _read_secret_file(file, (*where, file_key), base_dir)


# --- sections --------------------------------------------------------------


def _parse_redis(raw: object, base_dir: StrPath | None) -> RedisConfig:
    where: KeyPath = ("redis",)
    section = _mapping(raw, where)
    if not _bool(section, "enabled", where, False):
        return RedisConfig(enabled=False)
    password = _secret(section, "password", where, base_dir)
    username = _opt_str(section, "username", where)
    if username and password is None:
        raise ConfigError(
            "Redis needs a password with a username: set password or password_path",
            (*where, "username"),
        )
    return RedisConfig(
        enabled=True,
        host=_text(section.get("host", "localhost"), (*where, "host")),
        port=_port(section.get("port", 6379), (*where, "port")),
        path=_opt_str(section, "path", where),
        dbid=_dbid(section.get("dbid"), (*where, "dbid")),
        username=username,
        password=None if password is None else Secret(password),
        use_tls=_bool(section, "use_tls", where, False),
        certificate_file=_opt_str(section, "certificate_file", where),
        private_key_file=_opt_str(section, "private_key_file", where),
        ca_file=_opt_str(section, "ca_file", where),
        ca_path=_opt_str(section, "ca_path", where),
    )


def _text(value: object, path: KeyPath) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"must be a non-empty string, got {shown(value)}", path)
    return value


def _dbid(value: object, path: KeyPath) -> int | None:
    if value is not None and (type(value) is not int or value < 0):
        raise ConfigError(f"must be a Redis database number (0 or more), got {shown(value)}", path)
    return value


def _location(fields: Mapping[str, Any], paths: Mapping[str, KeyPath]) -> InstanceLocation:
    """Build a location, re-rooting its error path at the config key.

    The fields' values are checked here first, so that only short messages
    come from InstanceLocation (its own quote the whole value).
    """

    def where(field: str) -> KeyPath:
        return paths.get(field, paths[""])

    if "host" in fields:
        _text(fields["host"], where("host"))
    if "port" in fields:
        _port(fields["port"], where("port"))
    if "tls" in fields and type(fields["tls"]) is not bool:
        raise ConfigError(f"must be true or false, got {shown(fields['tls'])}", where("tls"))
    if "path" in fields:
        _text(fields["path"], where("path"))
    try:
        return InstanceLocation(**fields)
    except ConfigError as e:
        field = e.path[0] if e.path else ""
        raise _capped(ConfigError(e.message, where(field))) from None


def _parse_location(entry: object, where: KeyPath, warnings: list[str]) -> InstanceLocation:
    """One ``instance_map`` entry: ``{host, port, tls?}`` or ``{path}``."""
    if not isinstance(entry, Mapping):
        raise ConfigError("must be a mapping with host and port, or with path", where)
    if "host" in entry and "port" in entry:
        if "path" in entry:
            warnings.append(
                f"{'.'.join(where)}: has host, port and path; using host and port as Synapse does"
            )
        fields = {k: entry[k] for k in ("host", "port", "tls") if k in entry}
    elif "path" in entry:
        fields = {"path": entry["path"]}
    elif "host" in entry or "port" in entry:
        missing = "port" if "host" in entry else "host"
        raise ConfigError("missing; give both host and port, or path", (*where, missing))
    else:
        fields = {}
    paths = {"": where, **{k: (*where, k) for k in ("host", "port", "tls", "path")}}
    return _location(fields, paths)


def _parse_instance_map(raw: object, warnings: list[str]) -> dict[str, InstanceLocation]:
    entries = _mapping(raw, ("instance_map",))
    if MAIN_MAP_KEY in entries and MAIN_INSTANCE_NAME in entries:
        raise ConfigError(
            f"lists the main process twice, as {MAIN_MAP_KEY!r} and {MAIN_INSTANCE_NAME!r}; "
            f"keep only {MAIN_MAP_KEY!r}",
            ("instance_map", MAIN_INSTANCE_NAME),
        )
    if MAIN_INSTANCE_NAME in entries:
        warnings.append(
            f"instance_map.{MAIN_INSTANCE_NAME}: Synapse expects the main process under "
            f"{MAIN_MAP_KEY!r}; synrepl accepts both"
        )
    result: dict[str, InstanceLocation] = {}
    for key, entry in entries.items():
        if not isinstance(key, str):
            raise ConfigError(
                f"instance names must be strings, got {shown(key)}", ("instance_map",)
            )
        result[canonical_instance_name(key)] = _parse_location(
            entry, ("instance_map", _key(key)), warnings
        )
    return result


def _old_main_location(data: Mapping[str, Any]) -> InstanceLocation | None:
    """The main process's location from the pre-``instance_map`` keys, if any."""
    if data.get(_OLD_HOST) is not None or data.get(_OLD_PORT) is not None:
        return _old_host_port_location(data)
    if data.get(_OLD_URI) is not None:
        return _location_from_uri(data[_OLD_URI])
    return None


def _old_host_port_location(data: Mapping[str, Any]) -> InstanceLocation:
    for key, other in ((_OLD_HOST, _OLD_PORT), (_OLD_PORT, _OLD_HOST)):
        if data.get(key) is None:
            raise ConfigError(
                f"missing, but {other} is set; give both, or better, "
                f"list the main process as instance_map.{MAIN_MAP_KEY}",
                (key,),
            )
    tls = data.get(_OLD_TLS)
    fields = {"host": data[_OLD_HOST], "port": data[_OLD_PORT], "tls": tls is not None and tls}
    paths = {"": (_OLD_HOST,), "host": (_OLD_HOST,), "port": (_OLD_PORT,), "tls": (_OLD_TLS,)}
    return _location(fields, paths)


def _location_from_uri(uri: object) -> InstanceLocation:
    path: KeyPath = (_OLD_URI,)
    if not isinstance(uri, str):
        raise ConfigError(f"must be a URL string, got {shown(uri)}", path)
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"must be an http:// or https:// URL with a host, got {shown(uri)}", path)
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"has an invalid port: {shown(uri)}", path) from None
    tls = parts.scheme == "https"
    default_port = 443 if tls else 80
    return _location({"host": parts.hostname, "port": port or default_port, "tls": tls}, {"": path})


def _old_keys_present(data: Mapping[str, Any]) -> list[str]:
    return [k for k in _OLD_KEYS if data.get(k) is not None]


def _add_old_main(
    data: Mapping[str, Any], instance_map: dict[str, InstanceLocation], warnings: list[str]
) -> None:
    """Fill in ``master`` from the old keys when ``instance_map`` lacks it."""
    old = _old_keys_present(data)
    if not old:
        return
    names = ", ".join(old)
    if MAIN_INSTANCE_NAME in instance_map:
        warnings.append(f"{names}: ignored, instance_map.{MAIN_MAP_KEY} is used instead")
        return
    location = _old_main_location(data)
    if location is None:  # only worker_replication_http_tls was set
        warnings.append(f"{names}: ignored without {_OLD_HOST} and {_OLD_PORT}")
        return
    instance_map[MAIN_INSTANCE_NAME] = location
    why = (
        "ignored by Synapse since 1.73"
        if old == [_OLD_URI]
        else "rejected on workers by current Synapse"
    )
    warnings.append(
        f"{names}: deprecated ({why}); "
        f"move the main process's address to instance_map.{MAIN_MAP_KEY}"
    )


def _writer_names(value: object, path: KeyPath, single: bool = False) -> tuple[str, ...]:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"must be an instance name or a list of them, got {shown(value)}", path)
    if single and len(names) > 1:
        raise ConfigError(
            f"Synapse allows exactly one writer here, got {len(names)}: {shown(names)}", path
        )
    return tuple(names)


def _parse_stream_writers(raw: object, federation_senders: object = None) -> StreamWriters:
    section = _mapping(raw, ("stream_writers",))
    values: dict[str, tuple[str, ...]] = {}
    for key, value in section.items():
        path = ("stream_writers", _key(key))
        if key not in STREAM_WRITER_KEYS:
            raise ConfigError(
                f"unknown stream writer key; known keys: {', '.join(STREAM_WRITER_KEYS)}", path
            )
        values[key] = _writer_names(value, path, single=key in SINGLE_WRITER_KEYS)
    extra: dict[str, tuple[str, ...]] = {}
    if federation_senders is not None:  # None: Synapse's default, the main process sends
        extra["federation_senders"] = (
            ()
            if federation_senders == []
            else _writer_names(federation_senders, ("federation_sender_instances",))
        )
    try:
        return StreamWriters(**values, **extra)
    except ConfigError as e:
        raise _capped(e) from None


def _check_writers_located(
    writers: StreamWriters, instance_map: Mapping[str, InstanceLocation]
) -> None:
    """Every writer but the main process must be reachable for catch-up."""
    for key in STREAM_WRITER_KEYS:
        for name in writers.for_key(key):
            if name == MAIN_INSTANCE_NAME or name in instance_map:
                continue
            hint = (
                f"; the main process is called {MAIN_INSTANCE_NAME!r} here"
                if name == MAIN_MAP_KEY
                else f"; add instance_map.{_key(name)} with host and port, or path"
            )
            raise ConfigError(
                f"writer {shown(name)} is not in instance_map{hint}", ("stream_writers", key)
            )


def _worker_identity(data: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """``(worker_app, worker_name)``; like Synapse, the name defaults to the app."""
    app = _opt_str(data, "worker_app", ())
    if app in _MAIN_WORKER_APPS:
        app = None
    name = data.get("worker_name", app)
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"must be a string, got {shown(name)}", ("worker_name",))
    return app, name or None


# --- assembly --------------------------------------------------------------


def config_from_dict(data: Mapping[str, Any], *, base_dir: StrPath | None = None) -> SynapseConfig:
    """Build a config from already-merged YAML data.

    ``base_dir`` anchors relative ``*_path`` secret files; by default they
    are taken from the current directory, as Synapse does.
    """
    try:
        return _build(data, base_dir, [])
    except ConfigError as e:
        raise _capped(e) from None


def _build(data: Mapping[str, Any], base_dir: StrPath | None, warnings: list[str]) -> SynapseConfig:
    server_name = data.get("server_name")
    if not isinstance(server_name, str) or not server_name:
        raise ConfigError(
            "required: the homeserver's name, as in homeserver.yaml", ("server_name",)
        )
    worker_app, worker_name = _worker_identity(data)
    instance_map = _parse_instance_map(data.get("instance_map"), warnings)
    _add_old_main(data, instance_map, warnings)
    writers = _parse_stream_writers(
        data.get("stream_writers"), data.get("federation_sender_instances")
    )
    _check_writers_located(writers, instance_map)
    secret = _secret(data, "worker_replication_secret", (), base_dir)
    if worker_name and MAIN_INSTANCE_NAME not in instance_map:
        warnings.append(
            f"instance_map.{MAIN_MAP_KEY} is missing: "
            "HTTP replication to the main process will not work"
        )
    return SynapseConfig(
        server_name=server_name,
        redis=_parse_redis(data.get("redis"), base_dir),
        worker_app=worker_app,
        worker_name=worker_name,
        worker_replication_secret=Secret(secret) if secret else None,
        instance_map=instance_map,
        stream_writers=writers,
        warnings=tuple(warnings),
    )
