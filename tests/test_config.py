"""Tests for synrepl.config: loading Synapse's YAML into SynapseConfig."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli_support import limit_memory, run_synrepl_blocking

from synrepl.config import (
    MAX_CONFIG_FILE_SIZE,
    MAX_SECRET_FILE_SIZE,
    RedisConfig,
    Secret,
    SynapseConfig,
    config_from_dict,
    load_config,
    read_config_files,
    read_secret_file,
)
from synrepl.errors import ConfigError
from synrepl.sharding import (
    SINGLE_WRITER_KEYS,
    STREAM_WRITER_KEYS,
    InstanceLocation,
    StreamWriters,
)

SECRET = "repl-S3cret-value-1234"
REDIS_PASSWORD = "redis-Pa55word-5678"
HS: dict[str, Any] = {"server_name": "example.com", "report_stats": False}


def write_yaml(directory: Path, name: str, data: object) -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def conf(**extra: Any) -> SynapseConfig:
    return config_from_dict({**HS, **extra})


def error(data: dict[str, Any], base_dir: Path | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        config_from_dict({**HS, **data}, base_dir=base_dir)
    return info.value


def worker(**extra: Any) -> dict[str, Any]:
    """A worker config fragment with the main process in instance_map."""
    return {
        "worker_app": "synapse.app.generic_worker",
        "worker_name": "w1",
        "instance_map": {
            "main": {"host": "127.0.0.1", "port": 9093},
            "w1": {"host": "127.0.0.1", "port": 9094},
        },
        **extra,
    }


# --- files -------------------------------------------------------------------


def test_minimal_homeserver_yaml(tmp_path: Path) -> None:
    """Only server_name is required; everything else has Synapse's default."""
    config = load_config(write_yaml(tmp_path, "homeserver.yaml", HS))
    assert config.server_name == "example.com"
    assert config.worker_name is None
    assert config.worker_app is None
    assert config.instance_name == "master"
    assert config.is_main
    assert config.redis == RedisConfig(enabled=False)
    assert config.worker_replication_secret is None
    assert dict(config.instance_map) == {}
    assert config.stream_writers == StreamWriters()
    assert config.warnings == ()


def test_later_files_replace_top_level_keys(tmp_path: Path) -> None:
    """Like `-c a -c b`: whole top-level sections from b replace a's."""
    shared = write_yaml(
        tmp_path,
        "homeserver.yaml",
        {
            **HS,
            "redis": {"enabled": True, "host": "redis1", "port": 6380},
            "instance_map": {"main": {"host": "10.0.0.1", "port": 9093}},
        },
    )
    worker_file = write_yaml(
        tmp_path,
        "worker.yaml",
        {
            "worker_app": "synapse.app.generic_worker",
            "worker_name": "w1",
            "redis": {"enabled": True},
        },
    )
    config = load_config(str(shared), worker_file)
    assert config.instance_name == "w1"
    assert not config.is_main
    assert config.redis.host == "localhost"
    assert config.redis.port == 6379
    assert config.location_of("main") == InstanceLocation.tcp("10.0.0.1", 9093)


def test_directory_means_its_yaml_files_sorted(tmp_path: Path) -> None:
    """A directory is read as its *.yaml files in sorted order, others ignored."""
    conf_dir = tmp_path / "conf.d"
    conf_dir.mkdir()
    write_yaml(conf_dir, "10-base.yaml", {**HS, "worker_name": "first"})
    write_yaml(conf_dir, "20-worker.yaml", {"worker_name": "second"})
    write_yaml(conf_dir, "30-ignored.yml", {"worker_name": "third"})
    assert load_config(conf_dir).worker_name == "second"


def test_empty_file_is_a_warning(tmp_path: Path) -> None:
    """An empty worker file adds nothing but is reported."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("", encoding="utf-8")
    config = load_config(write_yaml(tmp_path, "hs.yaml", HS), empty)
    assert any("empty.yaml" in w and "empty" in w for w in config.warnings)


def test_no_files_is_an_error() -> None:
    """load_config needs at least one file."""
    with pytest.raises(ConfigError, match="no config file"):
        load_config()


def test_missing_file_is_named(tmp_path: Path) -> None:
    """A file that cannot be read is named in the error."""
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml") as info:
        load_config(missing)
    assert "cannot read" in info.value.message


def test_bad_yaml_is_named_without_quoting_it(tmp_path: Path) -> None:
    """A YAML syntax error names file and line but never echoes the content."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        f'server_name: example.com\nworker_replication_secret: "{SECRET}\n  : [\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert "bad.yaml" in str(info.value)
    assert "not valid YAML" in str(info.value)
    assert SECRET not in str(info.value)


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    """A file holding a list (or a scalar) is not a config."""
    listed = write_yaml(tmp_path, "list.yaml", ["server_name", "example.com"])
    with pytest.raises(ConfigError, match=r"list\.yaml.*mapping"):
        load_config(listed)


def test_non_utf8_file(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 give a clear error."""
    bad = tmp_path / "latin.yaml"
    bad.write_bytes(b"server_name: \xe9\xff\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(bad)


# --- server_name and identity -----------------------------------------------


@pytest.mark.parametrize("value", [None, 5, "", ["a"]])
def test_server_name_required(value: object) -> None:
    """server_name must be a non-empty string."""
    data = {} if value is None else {"server_name": value}
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert info.value.path == ("server_name",)


def test_worker_name_is_the_instance_name() -> None:
    """A worker's instance name is its worker_name."""
    config = conf(**worker())
    assert config.worker_name == "w1"
    assert config.instance_name == "w1"
    assert config.worker_app == "synapse.app.generic_worker"


def test_worker_name_defaults_to_worker_app() -> None:
    """Synapse falls back to worker_app when worker_name is absent."""
    config = conf(worker_app="synapse.app.generic_worker")
    assert config.instance_name == "synapse.app.generic_worker"


def test_homeserver_app_means_main() -> None:
    """worker_app synapse.app.homeserver is the main process."""
    config = conf(worker_app="synapse.app.homeserver")
    assert config.worker_app is None
    assert config.instance_name == "master"


@pytest.mark.parametrize(("key", "value"), [("worker_name", 3), ("worker_app", ["x"])])
def test_identity_must_be_strings(key: str, value: object) -> None:
    """worker_name and worker_app are strings."""
    assert error({key: value}).path == (key,)


def test_worker_without_main_location_is_warned() -> None:
    """A worker that cannot reach the main process over HTTP is told so."""
    config = conf(worker_name="w1")
    assert any("instance_map.main" in w for w in config.warnings)


# --- redis ---------------------------------------------------------------------


def test_redis_disabled_ignores_the_rest() -> None:
    """Like Synapse, a disabled redis section is not read further."""
    config = conf(redis={"enabled": False, "port": "junk"})
    assert config.redis == RedisConfig(enabled=False)
    assert conf(redis=None).redis.enabled is False


def test_redis_defaults() -> None:
    """enabled: true alone means localhost:6379, no auth, no TLS."""
    redis = conf(redis={"enabled": True}).redis
    assert redis == RedisConfig(enabled=True)
    assert (redis.host, redis.port, redis.path, redis.dbid) == ("localhost", 6379, None, None)
    assert redis.password is None
    assert redis.use_tls is False


def test_redis_every_option() -> None:
    """Every redis key is carried over."""
    redis = conf(
        redis={
            "enabled": True,
            "host": "redis.internal",
            "port": 6380,
            "path": "/run/redis.sock",
            "dbid": 2,
            "username": "synapse",
            "password": REDIS_PASSWORD,
            "use_tls": True,
            "certificate_file": "/c.pem",
            "private_key_file": "/k.pem",
            "ca_file": "/ca.pem",
            "ca_path": "/etc/ssl/certs",
        }
    ).redis
    assert redis.host == "redis.internal"
    assert redis.port == 6380
    assert redis.path == "/run/redis.sock"
    assert redis.dbid == 2
    assert redis.username == "synapse"
    assert redis.password is not None and redis.password.reveal() == REDIS_PASSWORD
    assert redis.use_tls is True
    assert redis.certificate_file == "/c.pem"
    assert redis.private_key_file == "/k.pem"
    assert redis.ca_file == "/ca.pem"
    assert redis.ca_path == "/etc/ssl/certs"


def test_redis_password_path_is_read_and_stripped(tmp_path: Path) -> None:
    """password_path's file content, stripped, is the password."""
    (tmp_path / "redis.pw").write_text(f"  {REDIS_PASSWORD}\n", encoding="utf-8")
    redis = config_from_dict(
        {**HS, "redis": {"enabled": True, "password_path": "redis.pw"}}, base_dir=tmp_path
    ).redis
    assert redis.password == Secret(REDIS_PASSWORD)


def test_redis_password_and_path_conflict(tmp_path: Path) -> None:
    """password and password_path together are an error."""
    (tmp_path / "pw").write_text("other", encoding="utf-8")
    err = error(
        {"redis": {"enabled": True, "password": REDIS_PASSWORD, "password_path": "pw"}},
        base_dir=tmp_path,
    )
    assert err.path == ("redis", "password_path")
    assert REDIS_PASSWORD not in str(err)


def test_redis_username_needs_password() -> None:
    """Synapse 1.163.2 refuses a username without a password."""
    err = error({"redis": {"enabled": True, "username": "synapse"}})
    assert err.path == ("redis", "username")
    assert "password" in err.message


def test_redis_username_with_empty_password_is_allowed() -> None:
    """An empty password is set (a nopass ACL user), unlike a missing one."""
    redis = conf(redis={"enabled": True, "username": "u", "password": ""}).redis
    assert redis.password == Secret("")


def test_redis_unreadable_password_file(tmp_path: Path) -> None:
    """The error names the config key and says why the file could not be read."""
    err = error({"redis": {"enabled": True, "password_path": str(tmp_path / "missing")}})
    assert err.path == ("redis", "password_path")
    assert "cannot read" in err.message
    assert "No such file" in err.message


@pytest.mark.parametrize("port", [True, "6379", 0, 65536, 6379.5])
def test_redis_bad_port(port: object) -> None:
    """The Redis port is an int in 1..65535."""
    assert error({"redis": {"enabled": True, "port": port}}).path == ("redis", "port")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("host", 5),
        ("host", ""),
        ("dbid", -1),
        ("dbid", True),
        ("dbid", "0"),
        ("use_tls", "yes"),
        ("enabled", "true"),
        ("path", 3),
        ("username", 7),
        ("certificate_file", 1),
        ("ca_path", []),
        ("password", 1234),
    ],
)
def test_redis_bad_values(key: str, value: object) -> None:
    """Each redis key's type is checked and the key is named."""
    assert error({"redis": {"enabled": True, key: value}}).path == ("redis", key)


def test_redis_section_must_be_a_mapping() -> None:
    """redis: [..] is not a section."""
    assert error({"redis": ["enabled"]}).path == ("redis",)


# --- replication secret ------------------------------------------------------------


def test_inline_replication_secret() -> None:
    """worker_replication_secret is wrapped in a Secret."""
    config = conf(worker_replication_secret=SECRET)
    assert config.worker_replication_secret is not None
    assert config.worker_replication_secret.reveal() == SECRET


def test_replication_secret_path(tmp_path: Path) -> None:
    """worker_replication_secret_path is read and stripped."""
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n", encoding="utf-8")
    config = conf(worker_replication_secret_path=str(secret_file))
    assert config.worker_replication_secret == Secret(SECRET)


def test_relative_secret_path_uses_base_dir(tmp_path: Path) -> None:
    """base_dir anchors relative secret paths."""
    (tmp_path / "secret").write_text(SECRET, encoding="utf-8")
    config = config_from_dict({**HS, "worker_replication_secret_path": "secret"}, base_dir=tmp_path)
    assert config.worker_replication_secret == Secret(SECRET)


def test_replication_secret_conflict(tmp_path: Path) -> None:
    """Both forms at once is an error naming the _path key."""
    (tmp_path / "secret").write_text("x", encoding="utf-8")
    err = error(
        {
            "worker_replication_secret": SECRET,
            "worker_replication_secret_path": str(tmp_path / "secret"),
        }
    )
    assert err.path == ("worker_replication_secret_path",)
    assert SECRET not in str(err)


def test_unreadable_replication_secret_file(tmp_path: Path) -> None:
    """A directory is not a readable secret file; the key is named."""
    err = error({"worker_replication_secret_path": str(tmp_path)})
    assert err.path == ("worker_replication_secret_path",)
    assert "cannot read" in err.message


def test_empty_replication_secret_means_none(tmp_path: Path) -> None:
    """An empty secret means no auth, as Synapse treats it."""
    (tmp_path / "secret").write_text("\n", encoding="utf-8")
    assert conf(worker_replication_secret="").worker_replication_secret is None
    config = conf(worker_replication_secret_path=str(tmp_path / "secret"))
    assert config.worker_replication_secret is None


def test_replication_secret_must_be_a_string() -> None:
    """A number is not a secret; the value is not echoed."""
    err = error({"worker_replication_secret": 123456789})
    assert err.path == ("worker_replication_secret",)
    assert "123456789" not in str(err)


# --- secrets never shown --------------------------------------------------------


def test_secret_repr_hides_the_value() -> None:
    """Secret prints as Secret('***') in repr, str and f-strings."""
    secret = Secret(SECRET)
    assert repr(secret) == "Secret('***')"
    assert str(secret) == "Secret('***')"
    assert SECRET not in f"{secret} {secret!r}"
    assert secret.reveal() == SECRET


def test_config_repr_hides_secrets() -> None:
    """No secret appears in the repr or str of the config or its parts."""
    config = conf(
        **worker(
            worker_replication_secret=SECRET,
            redis={"enabled": True, "username": "u", "password": REDIS_PASSWORD},
        )
    )
    for text in (repr(config), str(config), repr(config.redis), str(config.redis)):
        assert SECRET not in text
        assert REDIS_PASSWORD not in text


@pytest.mark.parametrize(
    "bad",
    [
        {"redis": {"enabled": True, "port": "x"}},
        {"redis": {"enabled": True, "password_path": "/nonexistent/pw"}},
        {"instance_map": {"main": {"host": "h", "port": 0}}},
        {"stream_writers": {"events": ["w9"]}},
        {"stream_writers": {"typing": ["a", "b"]}},
        {"worker_main_http_uri": "ftp://x"},
        {"worker_replication_secret_path": "/nonexistent/secret"},
    ],
)
def test_errors_never_contain_secrets(bad: dict[str, Any]) -> None:
    """Whatever goes wrong, the secrets elsewhere in the config stay hidden."""
    data = {**HS, "worker_replication_secret": SECRET, **bad}
    redis = data.get("redis")
    if isinstance(redis, dict) and "password_path" not in redis:
        data["redis"] = {**redis, "password": REDIS_PASSWORD}
    if "worker_replication_secret_path" in data:
        del data["worker_replication_secret"]
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    text = f"{info.value} {info.value!r} {info.value.message} {info.value.path}"
    assert SECRET not in text
    assert REDIS_PASSWORD not in text


def test_secret_file_content_not_in_errors(tmp_path: Path) -> None:
    """A secret read from a file does not leak into a later error."""
    (tmp_path / "pw").write_text(REDIS_PASSWORD, encoding="utf-8")
    err = error(
        {"redis": {"enabled": True, "password_path": str(tmp_path / "pw"), "port": "not-a-port"}}
    )
    assert err.path == ("redis", "port")
    assert REDIS_PASSWORD not in f"{err} {err!r}"


# --- instance_map ----------------------------------------------------------------


def test_main_key_becomes_master() -> None:
    """instance_map.main is stored under the instance name 'master'."""
    config = conf(**worker())
    assert set(config.instance_map) == {"master", "w1"}
    main = InstanceLocation.tcp("127.0.0.1", 9093)
    assert config.location_of("main") == main
    assert config.location_of("master") == main
    assert config.warnings == ()


def test_instance_map_forms() -> None:
    """TCP with tls, and unix sockets, are both understood."""
    config = conf(
        instance_map={
            "main": {"host": "main.internal", "port": 8443, "tls": True},
            "p1": {"path": "/run/synapse/p1.sock"},
        }
    )
    assert config.location_of("main").url_base() == "https://main.internal:8443"
    assert config.location_of("p1") == InstanceLocation.unix("/run/synapse/p1.sock")


def test_instance_map_is_read_only() -> None:
    """The loaded map cannot be changed."""
    config = conf(**worker())
    with pytest.raises(TypeError):
        config.instance_map["x"] = InstanceLocation.unix("/x")  # type: ignore[index]


def test_location_of_unknown_instance_lists_known_ones() -> None:
    """The error names the instance and every known one."""
    with pytest.raises(ConfigError) as info:
        conf(**worker()).location_of("p9")
    assert info.value.path == ("instance_map",)
    assert "'p9'" in info.value.message
    assert "master, w1" in info.value.message


def test_master_key_is_accepted_with_a_warning() -> None:
    """'master' as a key works for synrepl, though Synapse wants 'main'."""
    config = conf(instance_map={"master": {"host": "h", "port": 1}})
    assert config.location_of("main") == InstanceLocation.tcp("h", 1)
    assert any("instance_map.master" in w for w in config.warnings)


def test_main_and_master_together_is_an_error() -> None:
    """The main process cannot be listed twice."""
    err = error(
        {"instance_map": {"main": {"host": "h", "port": 1}, "master": {"host": "h", "port": 2}}}
    )
    assert err.path == ("instance_map", "master")


def test_host_port_and_path_prefers_tcp_like_synapse() -> None:
    """Synapse's parser picks host/port when all three are given; so do we."""
    config = conf(instance_map={"w1": {"host": "h", "port": 1, "path": "/s"}})
    assert config.location_of("w1") == InstanceLocation.tcp("h", 1)
    assert any("instance_map.w1" in w for w in config.warnings)


@pytest.mark.parametrize(
    ("entry", "path"),
    [
        ({}, ("instance_map", "w1")),
        ({"tls": True}, ("instance_map", "w1")),
        ("h:1", ("instance_map", "w1")),
        ({"host": "h"}, ("instance_map", "w1", "port")),
        ({"port": 1}, ("instance_map", "w1", "host")),
        ({"host": "h", "port": 0}, ("instance_map", "w1", "port")),
        ({"host": "h", "port": 65536}, ("instance_map", "w1", "port")),
        ({"host": "h", "port": True}, ("instance_map", "w1", "port")),
        ({"host": "h", "port": "9093"}, ("instance_map", "w1", "port")),
        ({"host": 10, "port": 1}, ("instance_map", "w1", "host")),
        ({"host": "h", "port": 1, "tls": "yes"}, ("instance_map", "w1", "tls")),
        ({"path": 5}, ("instance_map", "w1", "path")),
    ],
)
def test_bad_instance_map_entries(entry: object, path: tuple[str, ...]) -> None:
    """Each bad entry is reported at its own key path."""
    err = error({"instance_map": {"w1": entry}})
    assert err.path == path


def test_instance_map_must_be_a_mapping() -> None:
    """instance_map: [..] is rejected."""
    assert error({"instance_map": ["main"]}).path == ("instance_map",)


# --- the old ways to locate the main process ----------------------------------------


def test_old_host_and_port_make_the_master_entry() -> None:
    """worker_replication_host/_http_port(/_http_tls) still work, with a warning."""
    config = conf(
        worker_name="w1",
        worker_replication_host="10.1.1.1",
        worker_replication_http_port=9093,
        worker_replication_http_tls=True,
    )
    assert config.location_of("main") == InstanceLocation.tcp("10.1.1.1", 9093, tls=True)
    assert len(config.warnings) == 1
    assert "deprecated" in config.warnings[0]
    assert "worker_replication_host" in config.warnings[0]


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"worker_replication_host": "h"}, ("worker_replication_http_port",)),
        ({"worker_replication_http_port": 9093}, ("worker_replication_host",)),
        (
            {"worker_replication_host": "h", "worker_replication_http_port": 0},
            ("worker_replication_http_port",),
        ),
        (
            {"worker_replication_host": 7, "worker_replication_http_port": 9093},
            ("worker_replication_host",),
        ),
        (
            {
                "worker_replication_host": "h",
                "worker_replication_http_port": 1,
                "worker_replication_http_tls": "no",
            },
            ("worker_replication_http_tls",),
        ),
    ],
)
def test_old_keys_errors(data: dict[str, Any], path: tuple[str, ...]) -> None:
    """Errors in the old keys name the old key."""
    assert error(data).path == path


@pytest.mark.parametrize(
    ("uri", "location"),
    [
        ("http://main.internal:9093", InstanceLocation.tcp("main.internal", 9093)),
        ("https://main.internal:8443/", InstanceLocation.tcp("main.internal", 8443, tls=True)),
        ("http://main.internal", InstanceLocation.tcp("main.internal", 80)),
        ("https://[fd00::1]", InstanceLocation.tcp("fd00::1", 443, tls=True)),
    ],
)
def test_worker_main_http_uri(uri: str, location: InstanceLocation) -> None:
    """worker_main_http_uri gives scheme, host and port (default 80/443)."""
    config = conf(worker_main_http_uri=uri)
    assert config.location_of("master") == location
    assert any("worker_main_http_uri" in w and "1.73" in w for w in config.warnings)


@pytest.mark.parametrize("uri", ["ftp://h", "main:9093", "http://", "http://h:99999", 9093])
def test_bad_worker_main_http_uri(uri: object) -> None:
    """A URI that is not http(s) with a host, or has a bad port, is an error."""
    assert error({"worker_main_http_uri": uri}).path == ("worker_main_http_uri",)


def test_instance_map_main_wins_over_old_keys() -> None:
    """With instance_map.main present, old keys are ignored and reported."""
    config = conf(**worker(worker_replication_host="old", worker_replication_http_port=1))
    assert config.location_of("main") == InstanceLocation.tcp("127.0.0.1", 9093)
    assert any("ignored" in w for w in config.warnings)


def test_old_tls_alone_is_ignored_with_a_warning() -> None:
    """worker_replication_http_tls without host and port locates nothing."""
    config = conf(worker_replication_http_tls=True)
    assert "master" not in config.instance_map
    assert any("worker_replication_http_tls" in w for w in config.warnings)


# --- stream_writers ------------------------------------------------------------------


def test_stream_writers_loaded() -> None:
    """Lists and single strings are both accepted; missing keys are master."""
    config = conf(
        **worker(
            instance_map={
                "main": {"host": "h", "port": 1},
                "p1": {"host": "h", "port": 2},
                "p2": {"path": "/p2"},
            },
            stream_writers={"events": ["p1", "p2"], "typing": "p1", "receipts": ["master", "p2"]},
        )
    )
    writers = config.stream_writers
    assert writers.events == ("p1", "p2")
    assert writers.typing == ("p1",)
    assert writers.receipts == ("master", "p2")
    assert writers.to_device == ("master",)
    assert writers.writers_for_stream("backfill") == ("p1", "p2")


def test_null_stream_writers_means_defaults() -> None:
    """stream_writers: null is the same as leaving it out."""
    assert conf(stream_writers=None).stream_writers == StreamWriters()


def test_writer_missing_from_instance_map() -> None:
    """A writer other than master must be in instance_map."""
    err = error({"stream_writers": {"events": ["master", "p9"]}})
    assert err.path == ("stream_writers", "events")
    assert "'p9'" in err.message
    assert "instance_map.p9" in err.message


def test_writer_called_main_gets_a_hint() -> None:
    """'main' is not a writer name; the error says to use 'master'."""
    err = error(
        {"instance_map": {"main": {"host": "h", "port": 1}}, "stream_writers": {"typing": "main"}}
    )
    assert err.path == ("stream_writers", "typing")
    assert "'master'" in err.message


@pytest.mark.parametrize("key", sorted(SINGLE_WRITER_KEYS))
def test_single_writer_keys_in_config(key: str) -> None:
    """Synapse's single-writer keys cannot list two instances."""
    err = error(
        {
            "instance_map": {"a": {"path": "/a"}, "b": {"path": "/b"}},
            "stream_writers": {key: ["a", "b"]},
        }
    )
    assert err.path == ("stream_writers", key)


@pytest.mark.parametrize("key", STREAM_WRITER_KEYS)
def test_empty_writer_lists_in_config(key: str) -> None:
    """An empty list leaves a stream without a writer."""
    assert error({"stream_writers": {key: []}}).path == ("stream_writers", key)


@pytest.mark.parametrize("value", [None, 5, {"a": 1}, ["a", 5], [""]])
def test_bad_writer_values(value: object) -> None:
    """Writer values are a name or a list of names."""
    assert error({"stream_writers": {"events": value}}).path == ("stream_writers", "events")


def test_unknown_writer_key() -> None:
    """A key Synapse does not know is an error that lists the known ones."""
    err = error({"stream_writers": {"groups": ["master"]}})
    assert err.path == ("stream_writers", "groups")
    assert "thread_subscriptions" in err.message


def test_stream_writers_must_be_a_mapping() -> None:
    """stream_writers: [..] is rejected."""
    assert error({"stream_writers": ["events"]}).path == ("stream_writers",)


def test_config_is_frozen_and_comparable() -> None:
    """Two loads of the same data are equal and cannot be changed."""
    a = conf(**worker(worker_replication_secret=SECRET))
    b = conf(**worker(worker_replication_secret=SECRET))
    assert a == b
    assert hash(a) == hash(b)
    with pytest.raises(AttributeError):
        a.server_name = "other"  # type: ignore[misc]


# --- differential: Synapse's own parser -------------------------------------------

_names = st.from_regex(r"[a-z][a-z0-9_-]{0,8}", fullmatch=True).filter(
    lambda n: n not in ("master", "main")
)
_tcp = st.fixed_dictionaries(
    {
        "host": st.sampled_from(["127.0.0.1", "localhost", "::1", "w.internal"]),
        "port": st.integers(1, 65535),
    },
    optional={"tls": st.booleans()},
)
_unix = st.fixed_dictionaries({"path": st.from_regex(r"/run/[a-z]{1,8}\.sock", fullmatch=True)})


@st.composite
def worker_configs(draw: st.DrawFn) -> dict[str, Any]:
    """Valid worker configs: instance_map with main, writers drawn from it."""
    names = draw(st.lists(_names, min_size=1, max_size=4, unique=True))
    instance_map = {n: draw(st.one_of(_tcp, _unix)) for n in ["main", *names]}
    candidates = ["master", *names]
    writers: dict[str, Any] = {}
    for key in STREAM_WRITER_KEYS:
        size = 1 if key in SINGLE_WRITER_KEYS else draw(st.integers(1, 3))
        chosen = draw(st.lists(st.sampled_from(candidates), min_size=size, max_size=size))
        form = draw(st.sampled_from(["absent", "list", "str"]))
        if form == "list":
            writers[key] = chosen
        elif form == "str" and size == 1:
            writers[key] = chosen[0]
    data: dict[str, Any] = {
        **HS,
        "worker_app": "synapse.app.generic_worker",
        "worker_name": draw(st.sampled_from(names)),
        "instance_map": instance_map,
        "stream_writers": writers,
    }
    if draw(st.booleans()):
        data["worker_replication_secret"] = draw(st.text("abcXYZ0189", min_size=1, max_size=20))
    data["redis"] = draw(redis_sections())
    return data


def redis_sections() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"enabled": st.booleans()},
        optional={
            "host": st.sampled_from(["localhost", "redis.internal"]),
            "port": st.integers(1, 65535),
            "path": st.just("/run/redis.sock"),
            "dbid": st.integers(0, 15),
            "password": st.text("abcdef0123", min_size=1, max_size=12),
            "use_tls": st.booleans(),
            "certificate_file": st.just("/c.pem"),
            "private_key_file": st.just("/k.pem"),
            "ca_file": st.just("/ca.pem"),
            "ca_path": st.just("/etc/ssl"),
        },
    )


def _synapse_parse(data: dict[str, Any]) -> tuple[Any, Any]:
    """Run Synapse's WorkerConfig and RedisConfig over a plain dict."""
    workers = pytest.importorskip("synapse.config.workers")
    redis = pytest.importorskip("synapse.config.redis")
    worker_conf = workers.WorkerConfig(None)
    worker_conf.read_config(copy.deepcopy(data), allow_secrets_in_config=True)
    with pytest.MonkeyPatch.context() as patch:
        # RedisConfig checks the installed txredisapi version, which is
        # irrelevant to how it reads the section.
        patch.setattr(redis, "check_requirements", lambda *args: None)
        redis_conf = redis.RedisConfig(None)
        redis_conf.read_config(copy.deepcopy(data), allow_secrets_in_config=True)
    return worker_conf, redis_conf


def _their_location(loc: Any) -> InstanceLocation:
    if hasattr(loc, "path"):
        return InstanceLocation.unix(loc.path)
    return InstanceLocation.tcp(loc.host, loc.port, loc.tls)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(data=worker_configs())
def test_matches_synapse_parser(data: dict[str, Any]) -> None:
    """Differential: worker configs read the same through Synapse and synrepl."""
    theirs, their_redis = _synapse_parse(data)
    ours = config_from_dict(data)
    assert ours.instance_name == theirs.instance_name
    assert ours.worker_name == theirs.worker_name
    assert {k: _their_location(v) for k, v in theirs.instance_map.items()} == dict(
        ours.instance_map
    )
    for key in STREAM_WRITER_KEYS:
        assert ours.stream_writers.for_key(key) == tuple(getattr(theirs.writers, key))
    secret = ours.worker_replication_secret
    assert (secret.reveal() if secret else None) == (theirs.worker_replication_secret or None)
    assert ours.redis.enabled == their_redis.redis_enabled
    if ours.redis.enabled:
        password = ours.redis.password
        assert (
            ours.redis.host,
            ours.redis.port,
            ours.redis.path,
            ours.redis.dbid,
            ours.redis.username,
            password.reveal() if password else None,
            ours.redis.use_tls,
            ours.redis.certificate_file,
            ours.redis.private_key_file,
            ours.redis.ca_file,
            ours.redis.ca_path,
        ) == (
            their_redis.redis_host,
            their_redis.redis_port,
            their_redis.redis_path,
            their_redis.redis_dbid,
            their_redis.redis_username,
            their_redis.redis_password,
            their_redis.redis_use_tls,
            their_redis.redis_certificate,
            their_redis.redis_private_key,
            their_redis.redis_ca_file,
            their_redis.redis_ca_path,
        )


@pytest.mark.parametrize(
    "bad",
    [
        {"stream_writers": {"typing": ["master", "w1"]}},
        {"stream_writers": {"to_device": []}},
        {"stream_writers": {"events": []}},
        {"stream_writers": {"events": ["p9"]}},
        {"instance_map": {"main": {"host": "h", "port": "1"}, "w1": {"path": "/s"}}},
        {"instance_map": {"main": {"host": "h"}, "w1": {"path": "/s"}}},
        {"worker_replication_secret": "a", "worker_replication_secret_path": "/x"},
        {"redis": {"enabled": True, "username": "u"}},
        {"redis": {"enabled": True, "password": "p", "password_path": "/x"}},
    ],
)
def test_rejects_what_synapse_rejects(bad: dict[str, Any]) -> None:
    """Differential: configs Synapse refuses are refused here too."""
    pytest.importorskip("synapse.config.workers")
    synapse_errors = pytest.importorskip("synapse.config._base").ConfigError
    data = {**HS, **worker(), **bad}
    with pytest.raises(synapse_errors):
        _synapse_parse(data)
    with pytest.raises(ConfigError):
        config_from_dict(data)


def test_federation_sender_instances_make_master_the_federation_writer() -> None:
    """federation_sender_instances (a name or a list, absent = the main process)
    is read: the main process writes the federation stream only when it does
    not send federation itself."""
    base = {"server_name": "example.com"}
    assert config_from_dict(base).stream_writers.writers_for_stream("federation") == ()
    with_senders = config_from_dict({**base, "federation_sender_instances": "fed1"})
    assert with_senders.stream_writers.federation_senders == ("fed1",)
    assert with_senders.stream_writers.writers_for_stream("federation") == ("master",)
    nobody = config_from_dict({**base, "federation_sender_instances": []})
    assert nobody.stream_writers.writers_for_stream("federation") == ("master",)


# --- hostile input: bounded time, bounded messages, clear errors ------------------
#
# What could hang or exhaust memory runs in a child process with a timeout and
# a memory cap, so that a regression fails the test instead of the run.

_CHILD = """
import json, sys
from synrepl.config import config_from_dict, load_config
from synrepl.errors import ConfigError
try:
    if sys.argv[1] == "load":
        load_config(*sys.argv[2:])
    else:
        exec(sys.argv[2])  # builds `data`
        config_from_dict(data)  # noqa: F821
except ConfigError as e:
    print(json.dumps({"raised": "ConfigError", "message": e.message, "path": list(e.path)}))
except BaseException as e:
    print(json.dumps({"raised": type(e).__name__}))
else:
    print(json.dumps({"raised": None}))
"""


def _child(*args: str, timeout: float = 20.0) -> dict[str, Any]:
    """Run _CHILD; its one-line JSON verdict, or fail after ``timeout``."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            preexec_fn=limit_memory(1 << 30),
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"no answer within {timeout} s")
    assert done.stdout, done.stderr[-2000:]
    *printed, last = done.stdout.splitlines()
    verdict: dict[str, Any] = json.loads(last)
    verdict["printed"] = printed
    return verdict


def load_in_child(*paths: Path | str) -> dict[str, Any]:
    """load_config(*paths) in a child process."""
    return _child("load", *map(str, paths))


def config_error_in_child(*paths: Path | str) -> ConfigError:
    verdict = load_in_child(*paths)
    assert verdict["raised"] == "ConfigError", verdict
    return ConfigError(verdict["message"], tuple(verdict["path"]))


#: Nine lists of nine aliases to the one before: 9**9 (387 million) leaves.
BILLION_LAUGHS = "\n".join(
    [
        "server_name: example.com",
        "l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]",
        *(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)),
        "stream_writers:",
        "  events: *l8",
        "",
    ]
)


def _bounded(err: ConfigError, limit: int = 600) -> None:
    text = str(err)
    assert len(text) <= limit, f"{len(text)} chars: {text[:300]}..."
    assert "\n" not in text


def test_alias_bomb_is_refused_without_expanding_it(tmp_path: Path) -> None:
    """Billion laughs under stream_writers: a quick, short ConfigError that
    names the file, not a hang and a 2 GB message."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BILLION_LAUGHS, encoding="utf-8")
    err = config_error_in_child(bomb)
    assert "bomb.yaml" in err.message
    assert "alias" in err.message
    _bounded(err)


def test_merge_key_bomb_is_refused(tmp_path: Path) -> None:
    """`<<:` merges copy their mapping at construction time: the same bound holds."""
    lines = ["server_name: example.com", "m0: &m0 {a: 1, b: 2, c: 3, d: 4}"]
    for i in range(1, 12):
        merged = ", ".join([f"*m{i - 1}"] * 8)
        lines.append(f"m{i}: &m{i} {{<<: [{merged}], k{i}: {i}}}")
    bomb = tmp_path / "merge.yaml"
    bomb.write_text("\n".join(lines) + "\n", encoding="utf-8")
    err = config_error_in_child(bomb)
    assert "alias" in err.message
    _bounded(err)


def test_recursive_alias_is_refused(tmp_path: Path) -> None:
    """A node that contains itself has no finite expansion."""
    loop = tmp_path / "loop.yaml"
    loop.write_text("server_name: example.com\nx: &x [1, *x]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"loop\.yaml.*itself") as info:
        load_config(loop)
    _bounded(info.value)


def test_ordinary_aliases_and_merges_still_load(tmp_path: Path) -> None:
    """Anchors used the way operators use them (shared lists, `<<:` merges) load."""
    path = tmp_path / "homeserver.yaml"
    path.write_text(
        "server_name: example.com\n"
        "worker_name: w1\n"
        "x-persisters: &persisters [p1, p2]\n"
        "x-local: &local {host: 127.0.0.1, tls: false}\n"
        "instance_map:\n"
        "  main: {<<: *local, port: 9093}\n"
        "  w1: {<<: *local, port: 9094}\n"
        "  p1: {<<: *local, port: 9095}\n"
        "  p2: {<<: *local, port: 9096}\n"
        "stream_writers:\n"
        "  events: *persisters\n"
        "  typing: w1\n",
        encoding="utf-8",
    )
    config = load_config(path)
    assert config.stream_writers.events == ("p1", "p2")
    assert config.location_of("p2") == InstanceLocation.tcp("127.0.0.1", 9096)


def test_shared_structure_in_a_dict_gives_a_short_message() -> None:
    """config_from_dict has no YAML to bound: the error message itself is
    what must not expand a value made of shared references."""
    code = "x = ['lol'] * 9\nfor _ in range(8): x = [x] * 9\ndata = {'server_name': 'hs', 'stream_writers': {'events': x}}"
    verdict = _child("dict", code)
    assert verdict["raised"] == "ConfigError", verdict
    assert verdict["path"] == ["stream_writers", "events"]
    err = ConfigError(verdict["message"], tuple(verdict["path"]))
    _bounded(err)
    assert "..." in err.message


_HUGE = "x" * 100_000
_MANY = list(range(100_000))


@pytest.mark.parametrize(
    "bad",
    [
        {"worker_name": _MANY},
        {"worker_app": _MANY},
        {"redis": {"enabled": True, "host": _MANY}},
        {"redis": {"enabled": True, "port": _HUGE}},
        {"redis": {"enabled": True, "dbid": _HUGE}},
        {"redis": {"enabled": True, "use_tls": _HUGE}},
        {"redis": {"enabled": True, "path": _MANY}},
        {"redis": {"enabled": _MANY}},
        {"redis": {"enabled": True, "password_path": f"/nonexistent/{_HUGE}"}},
        {"worker_replication_secret_path": f"/nonexistent/{_HUGE}"},
        {"worker_main_http_uri": _MANY},
        {"worker_main_http_uri": f"ftp://{_HUGE}"},
        {"worker_main_http_uri": f"http://h:{_HUGE}"},
        {"worker_replication_host": _HUGE},
        {"worker_replication_host": "h", "worker_replication_http_port": _HUGE},
        {
            "instance_map": {_HUGE: {"host": "h", "port": 1}, "main": {"path": "/m"}},
            "stream_writers": {"events": [f"{_HUGE}-other"]},
        },
        {"instance_map": {_HUGE: {"host": _MANY, "port": 1}}},
        {"instance_map": {"w": {"host": "h", "port": _HUGE}}},
        {"instance_map": {"w": {"host": "h", "port": 1, "tls": _HUGE}}},
        {"instance_map": {"w": {"path": _MANY}}},
        {"instance_map": {"w": _MANY}},
        {"stream_writers": {_HUGE: ["master"]}},
        {"stream_writers": {"events": _MANY}},
        {"stream_writers": {"events": [_HUGE]}},
        {"stream_writers": {"typing": ["master", _HUGE]}, "instance_map": {_HUGE: {"path": "/s"}}},
        {"federation_sender_instances": _MANY},
    ],
)
def test_error_messages_are_bounded(bad: dict[str, Any]) -> None:
    """However big the offending value or key, the message stays short and
    on one line (an excerpt, with the rest elided)."""
    _bounded(error(bad))


def test_location_of_lists_a_bounded_number_of_instances() -> None:
    """Thousands of instances are summed up, not all listed."""
    instance_map = {f"worker{i}": {"path": f"/s{i}"} for i in range(5000)}
    config = conf(instance_map=instance_map)
    with pytest.raises(ConfigError) as info:
        config.location_of("x" * 100_000)
    _bounded(info.value)
    assert "more" in info.value.message


def test_fifo_as_config_file_does_not_block(tmp_path: Path) -> None:
    """A FIFO is refused at once, by name, instead of waiting for a writer."""
    fifo = tmp_path / "homeserver.yaml"
    os.mkfifo(fifo)
    err = config_error_in_child(fifo)
    assert str(fifo) in err.message
    assert "not a regular file" in err.message
    assert "FIFO" in err.message


def test_device_as_config_file_is_refused(tmp_path: Path) -> None:
    """/dev/zero would never end: a device is not a config file."""
    err = config_error_in_child("/dev/zero")
    assert "/dev/zero" in err.message
    assert "not a regular file" in err.message


def test_fifo_in_a_config_directory_is_skipped_with_a_warning(tmp_path: Path) -> None:
    """A directory's *.yaml entries that are not regular files are skipped, as
    Synapse skips them, without blocking; unlike Synapse, synrepl says so."""
    conf_dir = tmp_path / "conf.d"
    conf_dir.mkdir()
    write_yaml(conf_dir, "10-base.yaml", HS)
    os.mkfifo(conf_dir / "20-worker.yaml")
    (conf_dir / "30-dir.yaml").mkdir()
    code = (
        "import json\n"
        "from synrepl.config import load_config\n"
        f"print(json.dumps(load_config({str(conf_dir)!r}).warnings))\n"
        "data = {'server_name': 'hs'}"
    )
    verdict = _child("dict", code)
    assert verdict["raised"] is None, verdict
    skipped = [w for w in json.loads(verdict["printed"][0]) if "not a regular file" in w]
    assert len(skipped) == 2, skipped
    assert any("20-worker.yaml" in w and "FIFO" in w for w in skipped)
    assert any("30-dir.yaml" in w and "directory" in w for w in skipped)


def test_unreadable_config_directory(tmp_path: Path) -> None:
    """A directory that cannot be listed is a ConfigError naming it."""
    if os.geteuid() == 0:
        pytest.skip("root can list any directory")
    conf_dir = tmp_path / "conf.d"
    conf_dir.mkdir(mode=0)
    try:
        with pytest.raises(ConfigError, match=r"conf\.d"):
            load_config(conf_dir)
    finally:
        conf_dir.chmod(0o700)


def test_nul_in_a_path_is_a_config_error(tmp_path: Path) -> None:
    """Paths with a NUL byte cannot exist; that is the user's error, not ours."""
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(f"{tmp_path}/a\0b.yaml")
    err = error({"worker_replication_secret_path": "/etc/a\0b"})
    assert err.path == ("worker_replication_secret_path",)


def test_config_file_size_is_limited(tmp_path: Path) -> None:
    """A file over MAX_CONFIG_FILE_SIZE is refused before it is parsed
    (pure-Python YAML reads about 0.2 MiB/s in the worst case)."""
    big = tmp_path / "big.yaml"
    line = "# " + "padding " * 12 + "\n"
    with big.open("w", encoding="utf-8") as f:
        f.write("server_name: example.com\n")
        f.write(line * (MAX_CONFIG_FILE_SIZE // len(line) + 1))
    with pytest.raises(ConfigError, match=r"big\.yaml.*larger than 1 MiB"):
        load_config(big)


def test_config_file_just_under_the_limit_loads(tmp_path: Path) -> None:
    """The limit is on bytes; a file at the limit (comments mostly) loads."""
    path = tmp_path / "homeserver.yaml"
    head = "server_name: example.com\n"
    path.write_text(head + "#" * (MAX_CONFIG_FILE_SIZE - len(head) - 1) + "\n")
    assert path.stat().st_size == MAX_CONFIG_FILE_SIZE
    assert load_config(path).server_name == "example.com"


@pytest.mark.parametrize(
    "text",
    [
        "x: " + "[" * 100_000,
        "x: " + "[" * 100_000 + "]" * 100_000,
        "x: " + "{a: " * 50_000 + "1" + "}" * 50_000,
        "x:\n" + "- " * 3000 + "1",
    ],
    ids=["open-flow", "closed-flow", "flow-mappings", "block-sequences"],
)
def test_deep_nesting_is_a_config_error(tmp_path: Path, text: str) -> None:
    """Nesting beyond MAX_YAML_DEPTH is a ConfigError with the line, never a
    RecursionError (an 'internal error' in the CLI)."""
    deep = tmp_path / "deep.yaml"
    deep.write_text("server_name: example.com\n" + text + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"deep\.yaml") as info:
        load_config(deep)
    assert "nested" in info.value.message
    _bounded(info.value)


def test_nesting_within_the_limit_loads(tmp_path: Path) -> None:
    """Options Synapse does not know may nest; 50 levels is fine."""
    path = tmp_path / "homeserver.yaml"
    path.write_text("server_name: example.com\nx: " + "[" * 50 + "]" * 50 + "\n")
    assert load_config(path).server_name == "example.com"


def test_parse_near_the_recursion_limit_is_a_config_error(tmp_path: Path) -> None:
    """Even when the caller's stack is already deep, the loader's own
    RecursionError becomes a ConfigError."""
    path = tmp_path / "homeserver.yaml"
    path.write_text("server_name: example.com\nx: " + "[" * 90 + "]" * 90 + "\n")

    def dive(depth: int) -> ConfigError:
        if depth:
            return dive(depth - 1)
        with pytest.raises(ConfigError) as info:
            load_config(path)
        return info.value

    err = dive(sys.getrecursionlimit() - 150)
    assert "nested" in err.message


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("port: " + "9" * 5000, 2),
        ("since: 2020-02-30", 2),
    ],
    ids=["int-too-long", "no-such-date"],
)
def test_values_yaml_cannot_convert(tmp_path: Path, text: str, line: int) -> None:
    """Scalars the YAML constructors choke on (ValueError) are ConfigErrors
    with the line, not internal errors."""
    path = tmp_path / "homeserver.yaml"
    path.write_text(f"server_name: example.com\n{text}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"line {line}\b") as info:
        load_config(path)
    _bounded(info.value)


@pytest.mark.parametrize("key", ["worker_replication_secret_path", "redis.password_path"])
def test_fifo_as_secret_file_does_not_block(tmp_path: Path, key: str) -> None:
    """Secret files get the same treatment as config files."""
    fifo = tmp_path / "secret"
    os.mkfifo(fifo)
    data: dict[str, Any] = {**HS}
    if key.startswith("redis."):
        data["redis"] = {"enabled": True, "password_path": str(fifo)}
    else:
        data[key] = str(fifo)
    path = write_yaml(tmp_path, "homeserver.yaml", data)
    err = config_error_in_child(path)
    assert err.path == tuple(key.split("."))
    assert "not a regular file" in err.message
    assert "FIFO" in err.message


def test_device_as_secret_file_is_refused() -> None:
    """/dev/zero as password_path is refused, not read for ever."""
    verdict = _child(
        "dict",
        "data = {'server_name': 'hs', 'redis': {'enabled': True, 'password_path': '/dev/zero'}}",
    )
    assert verdict["raised"] == "ConfigError", verdict
    assert verdict["path"] == ["redis", "password_path"]
    assert "not a regular file" in verdict["message"]


def test_secret_file_size_is_limited(tmp_path: Path) -> None:
    """A secret is short; a big file named as one is a mistake."""
    big = tmp_path / "secret"
    big.write_bytes(b"s" * (MAX_SECRET_FILE_SIZE + 1))
    err = error({"worker_replication_secret_path": str(big)})
    assert err.path == ("worker_replication_secret_path",)
    assert "larger than 64 KiB" in err.message
    exact = tmp_path / "exact"
    exact.write_bytes(b"s" * MAX_SECRET_FILE_SIZE)
    secret = conf(worker_replication_secret_path=str(exact)).worker_replication_secret
    assert secret is not None and len(secret.reveal()) == MAX_SECRET_FILE_SIZE


def test_read_secret_file_is_public(tmp_path: Path) -> None:
    """The CLI's --secret-file reads through the same checks."""
    (tmp_path / "s").write_text(f"{SECRET}\n", encoding="utf-8")
    assert read_secret_file(tmp_path / "s") == SECRET
    with pytest.raises(ConfigError, match="not a regular file"):
        read_secret_file(tmp_path)


def test_read_config_files_merges_with_the_same_limits(tmp_path: Path) -> None:
    """The raw merged YAML (for what SynapseConfig does not keep) is read
    with the same checks as load_config."""
    a = write_yaml(tmp_path, "a.yaml", {**HS, "listeners": [{"port": 1}]})
    b = write_yaml(tmp_path, "b.yaml", {"worker_name": "w1"})
    assert read_config_files(a, b) == {**HS, "listeners": [{"port": 1}], "worker_name": "w1"}
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BILLION_LAUGHS, encoding="utf-8")
    with pytest.raises(ConfigError, match="alias"):
        read_config_files(bomb)


# --- the same inputs through the CLI: exit status 2, one line ----------------------


def _cli_inputs(tmp_path: Path) -> dict[str, Path]:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BILLION_LAUGHS, encoding="utf-8")
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    deep = tmp_path / "deep.yaml"
    deep.write_text("server_name: example.com\nx: " + "[" * 100_000 + "\n", encoding="utf-8")
    return {"alias-bomb": bomb, "fifo": fifo, "deep": deep}


@pytest.mark.parametrize("command", ["watch", "doctor"])
@pytest.mark.parametrize("case", ["alias-bomb", "fifo", "deep"])
def test_cli_reports_hostile_config_as_a_usage_error(
    tmp_path: Path, command: str, case: str
) -> None:
    """`synrepl watch|doctor -c FILE` ends at once with status 2 and one
    `synrepl: error: ...` line, never a hang or an 'internal error'."""
    path = _cli_inputs(tmp_path)[case]
    done = run_synrepl_blocking(command, "-c", str(path), timeout=20)
    lines = done.stderr.splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1, lines[:5]
    assert lines[0].startswith("synrepl: error: ")
    assert "internal error" not in lines[0]
    assert str(path) in lines[0]
    assert len(lines[0]) < 600


@pytest.mark.parametrize("key", ["worker_replication_secret_path", "redis.password_path"])
def test_cli_reports_a_fifo_secret_file_as_a_usage_error(tmp_path: Path, key: str) -> None:
    """A secret file that is a FIFO ends `synrepl watch` at once, status 2."""
    fifo = tmp_path / "secret"
    os.mkfifo(fifo)
    redis: dict[str, Any] = {"enabled": True, "host": "127.0.0.1", "port": 1}
    data: dict[str, Any] = {**HS, "redis": redis}
    if key.startswith("redis."):
        redis["password_path"] = str(fifo)
    else:
        data[key] = str(fifo)
    done = run_synrepl_blocking("watch", "-c", str(write_yaml(tmp_path, "hs.yaml", data)))
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"synrepl: error: bad config: {key}: cannot read the file '{fifo}'")
    assert "FIFO" in line
