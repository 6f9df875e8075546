"""The pure HTTP replication core: table, requests, answers, retries, routing."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from synrepl.config import Secret, config_from_dict
from synrepl.errors import ConfigError, ProtocolError, SynreplError
from synrepl.http import (
    ENDPOINTS,
    REPLICATION_PREFIX,
    STREAM_POSITIONS_KEY,
    Endpoint,
    EventWritten,
    HttpReplicationError,
    MalformedResponseError,
    RegisteredDevice,
    ReplicationResponse,
    ReplicationStubs,
    RequestArgumentError,
    RequestPositions,
    RetryPolicy,
    StreamUpdates,
    build_request,
    parse_response,
    parse_result,
    route_instance,
    target_uri,
)
from synrepl.http._codegen import render_stubs, splice_docs
from synrepl.http.endpoints import ANY, BOOL, INT, OBJECT_LIST, OBJECT_T, OPT_STR, STR, STR_LIST
from synrepl.http.results import parse_event_written, parse_registered_device
from synrepl.sharding import InstanceLocation

ROOT = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t-Repl1cation"

_SAMPLES = {
    STR.name: "x",
    OPT_STR.name: None,
    INT.name: 7,
    BOOL.name: True,
    OBJECT_T.name: {"k": "v"},
    STR_LIST.name: ["a"],
    OBJECT_LIST.name: [{"event": {"room_id": "!r:hs"}}],
    ANY.name: 1,
}


def sample_args(endpoint: Endpoint) -> dict[str, Any]:
    """Valid arguments for any endpoint."""
    args = {}
    for field in endpoint.arguments:
        args[field.name] = field.choices[0] if field.choices else _SAMPLES[field.type.name]
    return args


ALL = sorted(ENDPOINTS)


# --- the table ----------------------------------------------------------------


def test_table_lists_every_endpoint_by_name() -> None:
    """ENDPOINTS maps each name to its entry, and holds Synapse 1.163.2's 37."""
    assert len(ENDPOINTS) == 37
    for name, endpoint in ENDPOINTS.items():
        assert endpoint.name == name
        assert endpoint.method in ("POST", "PUT", "GET")
        assert isinstance(endpoint.cache, bool)
        assert all(isinstance(arg, str) for arg in endpoint.path_args)
        assert endpoint.summary and endpoint.send_to and endpoint.synapse_class
    assert ENDPOINTS["remote_join"].request_fields == ("requester", "remote_room_hosts", "content")
    assert ENDPOINTS["remote_join"].response_fields == ("event_id", "stream_id")
    assert ENDPOINTS["get_repl_stream_updates"].request_fields == ("from_token", "upto_token")


def test_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        ENDPOINTS["x"] = ENDPOINTS["add_tag"]  # type: ignore[index]


@pytest.mark.parametrize("name", ALL)
def test_every_endpoint_has_a_typed_stub(name: str) -> None:
    """Each stub takes exactly the endpoint's arguments, keyword-only, plus instance."""
    endpoint = ENDPOINTS[name]
    if endpoint.stub is None:
        return
    stub = getattr(ReplicationStubs, endpoint.stub)
    params = list(inspect.signature(stub).parameters.values())[1:]
    assert [p.name for p in params] == [
        *endpoint.path_args,
        *(f.name for f in endpoint.fields),
        "instance",
    ]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params)
    for param, field in zip(params, endpoint.arguments, strict=False):
        assert param.annotation == field.type.annotation
        assert (param.default is inspect.Parameter.empty) == field.required
    assert inspect.signature(stub).return_annotation == endpoint.response.annotation
    assert inspect.getdoc(stub)


def test_get_repl_stream_updates_keeps_its_signature() -> None:
    signature = inspect.signature(ReplicationStubs.get_repl_stream_updates)
    assert list(signature.parameters) == ["self", "instance", "stream", "from_token", "upto_token"]
    assert signature.return_annotation == "StreamUpdates"


def test_generated_stubs_are_current() -> None:
    """synrepl/http/_stubs.py is what the table generates (run the codegen if not)."""
    assert (ROOT / "synrepl" / "http" / "_stubs.py").read_text() == render_stubs()


def test_generated_docs_are_current() -> None:
    page = (ROOT / "docs" / "http.md").read_text()
    assert splice_docs(page) == page
    for name, endpoint in ENDPOINTS.items():
        assert f"### `{name}`" in page
        for arg in endpoint.arguments:
            assert f"`{arg.name}`" in page


# --- building requests ----------------------------------------------------------


def _segments(path: str) -> list[str]:
    prefix = f"{REPLICATION_PREFIX}/"
    assert path.startswith(prefix)
    return urlsplit(path).path[len(prefix) :].split("/")


@pytest.mark.parametrize("name", ALL)
def test_txn_id_segment_present_iff_endpoint_caches(name: str) -> None:
    endpoint = ENDPOINTS[name]
    request = build_request(endpoint, sample_args(endpoint))
    segments = _segments(request.path)
    assert segments[0] == name
    args = segments[1:]
    if not endpoint.path_args and not endpoint.cache:
        assert args == [""], "Synapse's route needs the trailing slash"
    else:
        assert len(args) == len(endpoint.path_args) + endpoint.cache
    if endpoint.cache:
        assert request.txn_id and args[-1] == request.txn_id
        assert request.txn_id.isalpha()
    else:
        assert request.txn_id is None


def test_fresh_txn_id_per_request_unless_given() -> None:
    args = {"room_id": "!r:hs"}
    first = build_request("update_current_state", args)
    second = build_request("update_current_state", args)
    assert first.txn_id != second.txn_id
    given_txn = build_request("update_current_state", args, txn_id="abc")
    assert given_txn.path == "/_synapse/replication/update_current_state/%21r%3Ahs/abc"
    with pytest.raises(RequestArgumentError, match="no txn_id"):
        build_request("add_tag", sample_args(ENDPOINTS["add_tag"]), txn_id="abc")


def test_paths_of_argumentless_endpoints() -> None:
    assert build_request("handle_new_device_update", {}).path == (
        "/_synapse/replication/handle_new_device_update/"
    )
    request = build_request("send_events", {"events": []}, txn_id="T")
    assert request.path == "/_synapse/replication/send_events/T"


def test_path_arguments_are_quoted_with_nothing_safe() -> None:
    request = build_request(
        "add_tag",
        {"user_id": "@a/b:c d", "room_id": "!r?x=1#f", "tag": "u.ü%", "content": {}},
    )
    assert request.path == (
        "/_synapse/replication/add_tag/%40a%2Fb%3Ac%20d/%21r%3Fx%3D1%23f/u.%C3%BC%25"
    )


@given(st.text(min_size=1), st.text(min_size=1), st.text(min_size=1))
def test_path_arguments_round_trip(user_id: str, room_id: str, tag: str) -> None:
    """Whatever the values, each becomes one segment that unquotes back to it."""
    try:
        tag.encode("utf-8")
        user_id.encode("utf-8")
        room_id.encode("utf-8")
    except UnicodeEncodeError:
        return  # lone surrogates cannot be URL-quoted (nor sent by Synapse)
    request = build_request(
        "add_tag", {"user_id": user_id, "room_id": room_id, "tag": tag, "content": {}}
    )
    assert request.path.isascii()
    segments = _segments(request.path)
    assert [unquote(s) for s in segments[1:]] == [user_id, room_id, tag]


def test_authorization_header_only_with_a_secret() -> None:
    args = sample_args(ENDPOINTS["add_tag"])
    with_secret = dict(build_request("add_tag", args, secret=Secret(SECRET)).header_lines())
    assert with_secret["Authorization"] == f"Bearer {SECRET}"
    assert "Authorization" not in dict(build_request("add_tag", args).header_lines())
    assert "Authorization" not in dict(
        build_request("add_tag", args, secret=Secret("")).header_lines()
    )


def test_non_ascii_secret_is_a_config_error_that_hides_it() -> None:
    with pytest.raises(ConfigError) as info:
        build_request("add_tag", sample_args(ENDPOINTS["add_tag"]), secret=Secret("pässword"))
    assert "pässword" not in str(info.value)


def test_request_repr_hides_secret_and_body() -> None:
    request = build_request(
        "post_register",
        {"user_id": "@u:hs", "auth_result": {}, "access_token": "syt_TOKEN"},
        secret=Secret(SECRET),
    )
    for text in (repr(request), str(request)):
        assert SECRET not in text
        assert "syt_TOKEN" not in text
        assert "with authorization" in text


def test_json_body_holds_the_fields_and_defaults() -> None:
    request = build_request(
        "presence_set_state",
        {"user_id": "@u:hs", "device_id": None, "state": {"presence": "online"}},
    )
    assert request.method == "POST"
    assert dict(request.header_lines())["Content-Type"] == "application/json"
    assert request.body is not None
    assert json.loads(request.body) == {
        "device_id": None,
        "state": {"presence": "online"},
        "force_notify": False,
        "is_sync": False,
    }


def test_path_arguments_are_not_in_the_body() -> None:
    request = build_request("add_tag", sample_args(ENDPOINTS["add_tag"]))
    assert request.body is not None
    assert json.loads(request.body) == {"content": {"k": "v"}}


def test_remove_tag_sends_an_empty_object() -> None:
    request = build_request("remove_tag", {"user_id": "@u:hs", "room_id": "!r:hs", "tag": "t"})
    assert request.body == b"{}"


def test_request_positions_are_attached_as_synapse_does() -> None:
    positions = RequestPositions("worker1", {"events": 10, "account_data": 3})
    request = build_request("add_tag", sample_args(ENDPOINTS["add_tag"]), positions=positions)
    assert request.body is not None
    assert json.loads(request.body)[STREAM_POSITIONS_KEY] == {
        "streams": {"events": 10, "account_data": 3},
        "instance_name": "worker1",
    }


def test_get_sends_query_parameters_and_no_positions() -> None:
    args = {"stream_name": "typing", "from_token": 3, "upto_token": 10}
    request = build_request("get_repl_stream_updates", args, txn_id="T")
    assert request.method == "GET"
    assert request.body is None
    parts = urlsplit(request.path)
    assert parts.path == "/_synapse/replication/get_repl_stream_updates/typing/T"
    assert parse_qs(parts.query) == {"from_token": ["3"], "upto_token": ["10"]}
    assert "Content-Type" not in dict(request.header_lines())
    with pytest.raises(RequestArgumentError, match="no stream positions"):
        build_request(
            "get_repl_stream_updates", args, positions=RequestPositions("w", {"events": 1})
        )


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(st.text(), _json_values, max_size=5), st.text(min_size=1))
def test_body_round_trips_any_json(content: dict[str, Any], origin: str) -> None:
    """Whatever JSON the caller gives, the body decodes back to it."""
    request = build_request(
        "fed_send_edu", {"edu_type": "m.x", "origin": origin, "content": content}
    )
    assert request.body is not None and request.body.isascii()
    assert json.loads(request.body) == {"origin": origin, "content": content}


@given(_json_values, st.dictionaries(st.text(), st.integers(), max_size=3))
def test_answers_round_trip(value: Any, positions: dict[str, int]) -> None:
    body = json.dumps({"value": value, STREAM_POSITIONS_KEY: positions}).encode()
    response = parse_response("fed_query", "w", 200, body)
    assert response.body == {"value": value}
    assert dict(response.positions) == positions


def test_mappings_and_tuples_encode_as_json() -> None:
    from types import MappingProxyType

    request = build_request(
        "fed_send_edu",
        {"edu_type": "m.typing", "origin": "o", "content": MappingProxyType({"a": (1, 2)})},
    )
    assert request.body is not None
    assert json.loads(request.body) == {"origin": "o", "content": {"a": [1, 2]}}


@pytest.mark.parametrize(
    ("name", "args", "match"),
    [
        ("add_tag", {"user_id": "@u:hs", "room_id": "!r", "tag": "t"}, "content=...\\): missing"),
        ("remove_tag", {"user_id": "u", "room_id": "r", "tag": "t", "x": 1}, "unknown argument"),
        ("remove_tag", {"user_id": 5, "room_id": "r", "tag": "t"}, "must be a string"),
        ("added_delayed_event", {"next_send_ts": True}, "must be a integer"),
        ("notify_device_update", {"user_id": "u", "device_ids": "AB"}, "list of strings"),
        (
            "membership_change",
            {"room_id": "r", "user_id": "u", "change": "joined"},
            "must be one of 'left'",
        ),
        ("no_such_endpoint", {}, "no such replication endpoint"),
        ("fed_send_edu", {"edu_type": "t", "origin": "o", "content": {"x": {1, 2}}}, "JSON"),
        ("added_delayed_event", {"next_send_ts": 1}, None),
    ],
)
def test_bad_arguments_are_refused_before_sending(
    name: str, args: dict[str, Any], match: str | None
) -> None:
    if match is None:
        build_request(name, args)
        return
    with pytest.raises(RequestArgumentError, match=match) as info:
        build_request(name, args)
    assert isinstance(info.value, TypeError)
    assert isinstance(info.value, SynreplError)


def test_target_uris() -> None:
    path = "/_synapse/replication/x/"
    assert target_uri(InstanceLocation.tcp("w1", 8034), path) == b"http://w1:8034" + path.encode()
    assert target_uri(InstanceLocation.tcp("::1", 443, tls=True), path) == (
        b"https://[::1]:443" + path.encode()
    )
    assert target_uri(InstanceLocation.unix("/run/syn apse.sock"), path) == (
        b"http+unix://%2Frun%2Fsyn%20apse.sock" + path.encode()
    )


# --- reading answers -----------------------------------------------------------------


def test_success_answer_sheds_its_positions() -> None:
    body = b'{"max_stream_id": 5, "_INT_STREAM_POS": {"account_data": 5, "events": 100}}'
    response = parse_response("add_tag", "main", 200, body)
    assert response.instance == "master"
    assert response.body == {"max_stream_id": 5}
    assert dict(response.positions) == {"account_data": 5, "events": 100}
    assert parse_result(response, ENDPOINTS["add_tag"].response.parser) == 5


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"_INT_STREAM_POS": {"events": "5"}}',
        b'{"_INT_STREAM_POS": 3}',
        b"\xff",
    ],
)
def test_malformed_success_answers(body: bytes) -> None:
    with pytest.raises(MalformedResponseError) as info:
        parse_response("add_tag", "worker1", 200, body)
    assert isinstance(info.value, ProtocolError)
    assert info.value.endpoint == "add_tag"
    assert info.value.instance == "worker1"


def test_error_answer_carries_status_errcode_and_message() -> None:
    body = b'{"errcode": "M_LIMIT_EXCEEDED", "error": "Too many", "retry_after_ms": 500}'
    with pytest.raises(HttpReplicationError) as info:
        parse_response("send_events", "persister1", 429, body, "Too Many Requests")
    error = info.value
    assert (error.status, error.errcode, error.error) == (429, "M_LIMIT_EXCEEDED", "Too many")
    assert error.details == {"retry_after_ms": 500}
    assert (error.endpoint, error.instance) == ("send_events", "persister1")
    assert "send_events on persister1" in str(error)
    assert "HTTP 429 M_LIMIT_EXCEEDED: Too many" in str(error)


def test_error_answer_without_matrix_error() -> None:
    with pytest.raises(HttpReplicationError) as info:
        parse_response("add_tag", "master", 500, b"<html>oops</html>", "Internal Server Error")
    error = info.value
    assert (error.errcode, error.error) == ("M_UNKNOWN", "Internal Server Error")
    # Not Synapse's own answer to a refused secret, so the secret is not blamed.
    assert "worker_replication_secret" not in str(error)


def test_hints_only_where_synapse_hides_the_cause() -> None:
    def message(status: int, body: bytes) -> str:
        with pytest.raises(HttpReplicationError) as info:
            parse_response("remove_user_account_data", "master", status, body, "x")
        return str(info.value)

    unrecognized = b'{"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}'
    assert "served by that instance" in message(404, unrecognized)
    assert "served by that instance" not in message(404, b'{"errcode": "M_NOT_FOUND"}')
    assert "served by that instance" not in message(404, b'{"error": "No row found"}')


def test_typed_results() -> None:
    def response(body: dict[str, Any]) -> ReplicationResponse:
        return ReplicationResponse("x", "master", body)

    assert parse_result(response({"event_id": "$e", "stream_id": 4}), parse_event_written) == (
        EventWritten("$e", 4)
    )
    device = parse_result(
        response(
            {
                "device_id": "D",
                "access_token": "syt_A",
                "valid_until_ms": None,
                "refresh_token": "R",
            }
        ),
        parse_registered_device,
    )
    assert device == RegisteredDevice("D", "syt_A", None, "R")
    assert "syt_A" not in repr(device) and "'R'" not in repr(device)
    updates = parse_result(
        response({"updates": [[3, ["a"]], [4, None]], "upto_token": 4, "limited": False}),
        ENDPOINTS["get_repl_stream_updates"].response.parser,
    )
    assert updates == StreamUpdates([(3, ["a"]), (4, None)], 4, False)
    with pytest.raises(MalformedResponseError, match="'stream_id' must be an integer"):
        parse_result(response({"event_id": "$e", "stream_id": "4"}), parse_event_written)
    with pytest.raises(MalformedResponseError, match="token, row"):
        parse_result(
            response({"updates": [["3", 1]], "upto_token": 4, "limited": False}),
            ENDPOINTS["get_repl_stream_updates"].response.parser,
        )


# --- retries --------------------------------------------------------------------------


def test_default_retry_policy_follows_synapse_for_connection_errors() -> None:
    policy = RetryPolicy()
    assert [policy.delay("connect", n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 32, None]


def test_retry_policy_is_bounded() -> None:
    policy = RetryPolicy(connect_retries=10, connect_base_delay=1, max_delay=5, timeout_retries=2)
    assert [policy.delay("connect", n) for n in (1, 3, 4, 10, 11)] == [1, 4, 5, 5, None]
    assert [policy.delay("timeout", n) for n in (1, 2, 3)] == [1, 1, None]
    assert RetryPolicy.never().delay("connect", 1) is None
    assert RetryPolicy.never().delay("timeout", 1) is None
    assert RetryPolicy(connect_retries=10**6).delay("connect", 10**6) == 32
    with pytest.raises(ValueError):
        RetryPolicy(max_delay=-1)


# --- routing --------------------------------------------------------------------------


@pytest.fixture
def sharded_config() -> Any:
    return config_from_dict(
        {
            "server_name": "hs",
            "instance_map": {
                "main": {"host": "m", "port": 1},
                "p1": {"host": "p1", "port": 1},
                "p2": {"host": "p2", "port": 1},
                "ad": {"host": "ad", "port": 1},
                "pres": {"host": "pres", "port": 1},
                "dev1": {"host": "d1", "port": 1},
                "dev2": {"host": "d2", "port": 1},
                "typ": {"host": "t", "port": 1},
            },
            "stream_writers": {
                "events": ["p1", "p2"],
                "account_data": "ad",
                "presence": "pres",
                "device_lists": ["dev1", "dev2"],
                "typing": "typ",
            },
        }
    )


def test_routing_follows_synapse_callers(sharded_config: Any) -> None:
    def route(name: str, **args: Any) -> str:
        endpoint = ENDPOINTS[name]
        return route_instance(endpoint, sharded_config, {**sample_args(endpoint), **args})

    writers = sharded_config.stream_writers
    assert route("remote_join") == "master"
    assert route("add_tag") == "ad"
    assert route("presence_set_state") == "pres"
    assert route("handle_new_device_update") == "dev1"
    assert route("profile_set_field") == "p1"
    assert route("copy_push_rules") == "master"
    for room in ("!a:hs", "!b:hs", "!c:hs", "!d:hs"):
        owner = writers.event_persister_for_room(room)
        assert route("update_current_state", room_id=room) == owner
        assert route("fed_send_events", room_id=room) == owner
        assert route("send_events", events=[{"event": {"room_id": room}}]) == owner
    assert route("fed_send_edu", edu_type="m.typing") == "typ"
    assert route("fed_send_edu", edu_type="m.signing_key_update") == "dev1"
    assert route("fed_send_edu", edu_type="m.something") == "master"
    with pytest.raises(RequestArgumentError, match="the writer whose rows"):
        route("get_repl_stream_updates")
    with pytest.raises(RequestArgumentError, match="room"):
        route("send_events", events=[])


# --- secrets ------------------------------------------------------------------------


def test_no_error_or_object_shows_the_secret() -> None:
    secret = Secret(SECRET)
    request = build_request("add_tag", sample_args(ENDPOINTS["add_tag"]), secret=secret)
    texts = [repr(request), str(request), repr(secret)]
    for status in (400, 401, 403, 404, 500):
        try:
            parse_response("add_tag", "master", status, b"{}", "x")
        except HttpReplicationError as e:
            texts += [str(e), repr(e)]
    assert not any(SECRET in text for text in texts)
