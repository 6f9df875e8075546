"""Read Synapse's own YAML configuration into one frozen :class:`SynapseConfig`.

A synrepl process joins a cluster that is already configured, so it reads
the same files the Synapse processes read (``homeserver.yaml`` plus a worker
file) instead of asking for the facts again. Later files replace earlier
top-level keys, as Synapse's repeated ``-c`` options do.

Every mistake is a :class:`~synrepl.errors.ConfigError` whose ``path`` names
the offending key. Secrets (the replication secret, the Redis password) are
wrapped in :class:`Secret` so they never show in a repr, a log line or an
error message.
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

from synrepl.errors import ConfigError
from synrepl.sharding import (
    MAIN_INSTANCE_NAME,
    MAIN_MAP_KEY,
    STREAM_WRITER_KEYS,
    InstanceLocation,
    StreamWriters,
    canonical_instance_name,
)

__all__ = (
    "load_config",
    "config_from_dict",
    "SynapseConfig",
    "RedisConfig",
    "Secret",
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
            known = ", ".join(sorted(self.instance_map)) or "none"
            raise ConfigError(
                f"no entry for instance {instance_name!r} (known instances: {known}); "
                "add it with host and port, or path",
                ("instance_map",),
            )
        return location


# --- files -----------------------------------------------------------------


def load_config(*paths: StrPath) -> SynapseConfig:
    """Load and merge Synapse config files, later ones replacing top-level keys.

    A directory stands for its ``*.yaml`` files in sorted order, as with
    Synapse's ``-c``. Relative secret file paths are taken from the current
    directory, as Synapse takes them.
    """
    if not paths:
        raise ConfigError("no config file given; pass homeserver.yaml (and the worker file)")
    merged: dict[str, Any] = {}
    warnings: list[str] = []
    for file in _expand_paths(paths):
        merged.update(_read_yaml_file(file, warnings))
    return _build(merged, None, warnings)


def _expand_paths(paths: Iterable[StrPath]) -> list[Path]:
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".yaml"))
        else:
            files.append(path)
    return files


def _read_yaml_file(file: Path, warnings: list[str]) -> Mapping[str, Any]:
    """Parse one file; its error messages name the file but quote none of it."""
    try:
        with file.open(encoding="utf-8") as stream:
            data = yaml.safe_load(stream)
    except OSError as e:
        raise ConfigError(f"cannot read config file '{file}': {_os_reason(e)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{file}' is not UTF-8 text") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{file}' is not valid YAML: {_yaml_reason(e)}") from None
    if data is None:
        warnings.append(f"config file '{file}' is empty")
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file '{file}' must hold a mapping of option names to values, "
            f"not a {type(data).__name__}"
        )
    return data


def _os_reason(error: OSError) -> str:
    return error.strerror or type(error).__name__


def _yaml_reason(error: yaml.YAMLError) -> str:
    # Never str(error): its snippet could quote a secret on the bad line.
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return f"{error.problem or 'syntax error'}{where}"
    return type(error).__name__


def _read_secret_file(file: str, path: KeyPath, base_dir: StrPath | None) -> str:
    """Read a secret file, stripped; errors say why but never what it held."""
    full = Path(base_dir, file) if base_dir is not None else Path(file)
    try:
        return full.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ConfigError(f"cannot read the file '{file}': {_os_reason(e)}", path) from None
    except UnicodeDecodeError:
        raise ConfigError(f"the file '{file}' is not UTF-8 text", path) from None


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
        raise ConfigError(f"must be a string, got {value!r}", (*where, key))
    return value


def _bool(section: Mapping[str, Any], key: str, where: KeyPath, default: bool) -> bool:
    value = section.get(key, default)
    if type(value) is not bool:
        raise ConfigError(f"must be true or false, got {value!r}", (*where, key))
    return value


def _port(value: object, path: KeyPath) -> int:
    if type(value) is not int or not 1 <= value <= 65535:
        raise ConfigError(f"must be a whole number from 1 to 65535, got {value!r}", path)
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
        raise ConfigError(f"must be a non-empty string, got {value!r}", path)
    return value


def _dbid(value: object, path: KeyPath) -> int | None:
    if value is not None and (type(value) is not int or value < 0):
        raise ConfigError(f"must be a Redis database number (0 or more), got {value!r}", path)
    return value


def _location(fields: Mapping[str, Any], paths: Mapping[str, KeyPath]) -> InstanceLocation:
    """Build a location, re-rooting its error path at the config key."""
    try:
        return InstanceLocation(**fields)
    except ConfigError as e:
        field = e.path[0] if e.path else ""
        raise ConfigError(e.message, paths.get(field, paths[""])) from None


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
            raise ConfigError(f"instance names must be strings, got {key!r}", ("instance_map",))
        result[canonical_instance_name(key)] = _parse_location(
            entry, ("instance_map", key), warnings
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
        raise ConfigError(f"must be a URL string, got {uri!r}", path)
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"must be an http:// or https:// URL with a host, got {uri!r}", path)
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"has an invalid port: {uri!r}", path) from None
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


def _writer_names(value: object, path: KeyPath) -> tuple[str, ...]:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"must be an instance name or a list of them, got {value!r}", path)
    return tuple(names)


def _parse_stream_writers(raw: object, federation_senders: object = None) -> StreamWriters:
    section = _mapping(raw, ("stream_writers",))
    values: dict[str, tuple[str, ...]] = {}
    for key, value in section.items():
        path = ("stream_writers", str(key))
        if key not in STREAM_WRITER_KEYS:
            raise ConfigError(
                f"unknown stream writer key; known keys: {', '.join(STREAM_WRITER_KEYS)}", path
            )
        values[key] = _writer_names(value, path)
    if federation_senders is None:  # Synapse's default: the main process sends
        return StreamWriters(**values)
    senders = (
        ()
        if federation_senders == []
        else _writer_names(federation_senders, ("federation_sender_instances",))
    )
    return StreamWriters(**values, federation_senders=senders)


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
                else f"; add instance_map.{name} with host and port, or path"
            )
            raise ConfigError(
                f"writer {name!r} is not in instance_map{hint}", ("stream_writers", key)
            )


def _worker_identity(data: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """``(worker_app, worker_name)``; like Synapse, the name defaults to the app."""
    app = _opt_str(data, "worker_app", ())
    if app in _MAIN_WORKER_APPS:
        app = None
    name = data.get("worker_name", app)
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"must be a string, got {name!r}", ("worker_name",))
    return app, name or None


# --- assembly --------------------------------------------------------------


def config_from_dict(data: Mapping[str, Any], *, base_dir: StrPath | None = None) -> SynapseConfig:
    """Build a config from already-merged YAML data.

    ``base_dir`` anchors relative ``*_path`` secret files; by default they
    are taken from the current directory, as Synapse does.
    """
    return _build(data, base_dir, [])


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
