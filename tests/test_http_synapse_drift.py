"""synrepl's endpoint table against the installed Synapse's endpoint classes.

Every check runs Synapse's own code (its classes' attributes, its client-side
payload serializers, its server-side route registration and auth check), so
a Synapse release that adds, removes or changes an endpoint fails here.

The installed release is compared with what :mod:`synrepl.releases` says it
serves: by name, every endpoint; by shape, every endpoint synrepl has a table
entry for (under the name the release's path uses for it).  An endpoint of
synrepl's table the release lacks, or one of the release's that synrepl has
no entry for (removed since), is skipped with the reason.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import json
import pkgutil
import re
from typing import Any
from urllib.parse import unquote, urlencode, urlsplit

import pytest

synapse = pytest.importorskip("synapse")

from synapse.replication import http as synapse_http
from synapse.replication.http._base import ReplicationEndpoint
from test_http_endpoints import sample_args
from twisted.web.http_headers import Headers

from synrepl.config import Secret
from synrepl.http import ENDPOINTS, SYNAPSE_VERSION, Endpoint, build_request
from synrepl.http.requests import REPLICATION_PREFIX
from synrepl.http.retry import SYNAPSE_CONNECT_RETRY_ATTEMPTS
from synrepl.releases import ENDPOINTS_UNTIL, SynapseRelease, facts_for

# synapse.__version__ carries git details when run inside a git checkout;
# the installed distribution's version is the one that counts.
INSTALLED_VERSION = importlib.metadata.version("matrix-synapse")
INSTALLED = SynapseRelease.parse(INSTALLED_VERSION)
#: What synrepl.releases says the installed release serves.
FACTS = facts_for(INSTALLED)


def _synapse_endpoint_classes() -> list[type[ReplicationEndpoint]]:
    """Every endpoint class of the installed Synapse, each once (two classes
    may declare one NAME: see ENDPOINT_PATH_NAMES_UNTIL)."""
    found: dict[str, type[ReplicationEndpoint]] = {}
    for module_info in pkgutil.iter_modules(synapse_http.__path__):
        module = importlib.import_module(f"{synapse_http.__name__}.{module_info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if (
                issubclass(cls, ReplicationEndpoint)
                and cls is not ReplicationEndpoint
                and isinstance(cls.__dict__.get("NAME"), str)
            ):
                found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return sorted(found.values(), key=lambda cls: (cls.NAME, cls.__name__))


def _our_name(cls: type[ReplicationEndpoint]) -> str | None:
    """synrepl's name for the endpoint ``cls`` serves: its NAME, unless the
    release served one of synrepl's endpoints under that name (the class
    synrepl names tells which); None: synrepl has no table entry for it."""
    for name, endpoint in ENDPOINTS.items():
        if (
            name != cls.NAME
            and FACTS.path_name(name) == cls.NAME
            and endpoint.synapse_class == cls.__name__
        ):
            return name
    return cls.NAME if cls.NAME in ENDPOINTS else None


SYNAPSE_CLASSES = _synapse_endpoint_classes()
#: synrepl's endpoint name -> the installed Synapse's classes serving it.
_SERVING: dict[str, list[type[ReplicationEndpoint]]] = {}
#: The installed Synapse's endpoints synrepl has no table entry for, by NAME.
NO_ENTRY: dict[str, type[ReplicationEndpoint]] = {}
for _cls in SYNAPSE_CLASSES:
    _ours = _our_name(_cls)
    if _ours is None:
        NO_ENTRY[_cls.NAME] = _cls
    else:
        _SERVING.setdefault(_ours, []).append(_cls)
SYNAPSE_ENDPOINTS = {name: classes[-1] for name, classes in _SERVING.items()}

#: Every endpoint either side has, by synrepl's name where it has one.
ALL_NAMES = sorted(set(SYNAPSE_ENDPOINTS) | set(NO_ENTRY) | set(ENDPOINTS))


def _pair(name: str) -> tuple[type[ReplicationEndpoint], Endpoint]:
    """The installed Synapse's class for ``name`` and synrepl's entry, or a
    skip when the release lacks the endpoint or synrepl has no entry for it
    (as synrepl.releases says; anything else fails)."""
    cls = SYNAPSE_ENDPOINTS.get(name)
    if cls is not None:
        return cls, ENDPOINTS[name]
    if name in NO_ENTRY:
        assert name in FACTS.endpoints and name in ENDPOINTS_UNTIL, (
            f"{name} is missing from synrepl.http.ENDPOINTS"
        )
        pytest.skip(
            f"{name} was removed in Synapse {ENDPOINTS_UNTIL[name]}: synrepl has no table "
            f"entry to compare Synapse {INSTALLED}'s with (test_same_endpoint_names checks "
            "that it serves one)"
        )
    reason = FACTS.lacks_endpoint(name)
    assert reason is not None, f"Synapse {INSTALLED} has no class for {name}, which it serves"
    pytest.skip(reason)


def _path_in_release(ours: Endpoint, path: str) -> str:
    """``path`` (synrepl's, for ``ours``) as the installed release routes it:
    under another name where it served the endpoint under one."""
    served = FACTS.path_name(ours.name)
    if served == ours.name:
        return path
    prefix = f"{REPLICATION_PREFIX}/{ours.name}/"
    assert path.startswith(prefix), path
    return f"{REPLICATION_PREFIX}/{served}/{path[len(prefix) :]}"


def test_synapse_version_is_the_one_checked() -> None:
    """A different Synapse may still pass; this says which one the table names."""
    if INSTALLED_VERSION != SYNAPSE_VERSION:
        pytest.skip(
            f"table is for Synapse {SYNAPSE_VERSION}, installed {INSTALLED_VERSION}: "
            "compared with what synrepl.releases says it serves"
        )


def test_same_endpoint_names() -> None:
    """The installed Synapse's endpoint names are those synrepl.releases lists
    for it (synrepl's table on the newest), each served by one class."""
    names = {cls.NAME for cls in SYNAPSE_CLASSES}
    missing = sorted(names - FACTS.endpoints)
    extra = sorted(FACTS.endpoints - names)
    assert not missing, f"Synapse {INSTALLED} has endpoints synrepl lacks: {missing}"
    assert not extra, f"synrepl lists endpoints Synapse {INSTALLED} does not have: {extra}"
    shared = {name: classes for name, classes in _SERVING.items() if len(classes) > 1}
    assert not shared, f"several of Synapse {INSTALLED}'s classes serve one endpoint: {shared}"
    for name in ENDPOINTS:  # each endpoint served under another name is found under it
        if FACTS.path_name(name) != name:
            assert SYNAPSE_ENDPOINTS[name].NAME == FACTS.path_name(name)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_endpoint_class_attributes_agree(name: str) -> None:
    cls, ours = _pair(name)
    assert ours.synapse_class == cls.__name__
    assert ours.path_args == tuple(cls.PATH_ARGS)
    assert ours.method == cls.METHOD
    assert ours.cache == cls.CACHE
    assert ours.wait_for_streams == cls.WAIT_FOR_STREAMS
    assert ours.retry_on_timeout == cls.RETRY_ON_TIMEOUT
    assert ours.retry_on_connect_error == cls.RETRY_ON_CONNECT_ERROR
    assert cls.RETRY_ON_CONNECT_ERROR_ATTEMPTS == SYNAPSE_CONNECT_RETRY_ATTEMPTS
    assert "instance" not in ours.path_args + tuple(f.name for f in ours.fields)


# --- the client side: what Synapse's serializer sends ----------------------------------

#: Where synrepl's body deliberately differs from what Synapse's client sends.
_EXTRA_FIELDS = {"fed_query": {"origin"}}


def _run(coroutine: Any) -> Any:
    """Run a coroutine that never waits (Synapse's serializers, given no events)."""
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("the serializer waited for something")


def _synapse_kwargs(cls: type[ReplicationEndpoint], ours: Endpoint) -> tuple[dict, dict]:
    """Arguments for Synapse's serializer, and the same values in synrepl's form."""
    from synapse.api.room_versions import KNOWN_ROOM_VERSIONS
    from synapse.types import create_requester

    args = sample_args(ours)
    synapse_kwargs: dict[str, Any] = {}
    for param in inspect.signature(cls._serialize_payload).parameters.values():
        if param.name in ("store", "event_and_contexts", "events_and_context"):
            synapse_kwargs[param.name] = [] if param.name != "store" else None
            args.pop("events", None)
            if "events" in (f.name for f in ours.fields):
                args["events"] = []
        elif param.name == "extra_users":
            synapse_kwargs[param.name] = []
        elif param.name == "requester":
            requester = create_requester("@alice:hs", device_id="DEV")
            synapse_kwargs[param.name] = requester
            field = next((f for f in ours.fields if f.name == "requester"), None)
            if field is not None:  # send_events puts it inside each event instead
                as_string = field.type.name == "string"
                args["requester"] = (
                    requester.user.to_string() if as_string else requester.serialize()
                )
        elif param.name == "room_version":
            synapse_kwargs[param.name] = KNOWN_ROOM_VERSIONS["10"]
            args["room_version"] = "10"
        elif param.name == "ratelimit":
            synapse_kwargs[param.name] = True
        elif param.name in args:
            if param.default is not inspect.Parameter.empty:
                args.pop(param.name)  # leave defaults to both sides
            else:
                synapse_kwargs[param.name] = args[param.name]
        elif param.name == "content":  # taken by Synapse's client but never sent
            synapse_kwargs[param.name] = {}
        else:
            raise AssertionError(f"{ours.name}: Synapse's client takes {param.name!r}")
    return synapse_kwargs, args


@pytest.mark.parametrize("name", ALL_NAMES)
def test_body_is_what_synapse_client_sends(name: str) -> None:
    """Given the same values, synrepl sends the JSON Synapse's own client sends."""
    cls, ours = _pair(name)
    synapse_kwargs, args = _synapse_kwargs(cls, ours)
    payload = json.loads(json.dumps(_run(cls._serialize_payload(**synapse_kwargs))))
    request = build_request(ours, args)
    if ours.method == "GET":
        assert request.body is None
        assert urlsplit(request.path).query == urlencode(payload, True)
        return
    assert request.body is not None
    sent = json.loads(request.body)
    for extra in _EXTRA_FIELDS.get(name, ()):
        sent.pop(extra)
    assert sent == payload


# --- the server side: Synapse's route and auth check accept synrepl's requests -------


class _RecordingHttpServer:
    def __init__(self) -> None:
        self.routes: list[tuple[str, re.Pattern[str]]] = []

    def register_paths(self, method: str, patterns: Any, callback: Any, name: str) -> None:
        self.routes += [(method, pattern) for pattern in patterns]


@pytest.mark.parametrize("name", ALL_NAMES)
def test_synapse_route_matches_our_path(name: str) -> None:
    """Synapse's own route pattern for the endpoint matches the path synrepl builds
    (in the release's name for it), and gives back every argument (and the
    txn_id) unchanged."""
    cls, ours = _pair(name)
    server = _RecordingHttpServer()
    cls.register(cls.__new__(cls), server)  # class attributes only, no HomeServer
    ((method, pattern),) = server.routes
    assert method == ours.method
    args = sample_args(ours)
    for field in ours.path:
        if not field.choices:
            args[field.name] = f"{field.name} /:?#%@!ü"  # everything that needs quoting
    request = build_request(ours, args)
    path = _path_in_release(ours, urlsplit(request.path).path)
    match = pattern.match(path)
    assert match, f"{path} does not match {pattern.pattern}"
    got = {key: unquote(value) for key, value in match.groupdict().items()}
    expected = {arg: args[arg] for arg in ours.path_args}
    if ours.cache:
        expected["txn_id"] = request.txn_id
    assert got == expected


def test_synapse_auth_check_accepts_our_header() -> None:
    secret = "a-Secret_123"
    request = build_request(
        "remove_tag", {"user_id": "u", "room_id": "r", "tag": "t"}, secret=Secret(secret)
    )

    class FakeRequest:
        requestHeaders = Headers(
            {name.encode(): [value.encode()] for name, value in request.header_lines()}
        )

    class FakeEndpoint:
        _replication_secret = secret

    ReplicationEndpoint._check_auth(FakeEndpoint(), FakeRequest())  # type: ignore[arg-type]
    FakeEndpoint._replication_secret = "other"
    with pytest.raises(RuntimeError):
        ReplicationEndpoint._check_auth(FakeEndpoint(), FakeRequest())  # type: ignore[arg-type]
