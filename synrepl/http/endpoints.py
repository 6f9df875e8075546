"""The table of Synapse's HTTP replication endpoints: one entry each.

Everything else in :mod:`synrepl.http` is made from this table: request
building and argument checking (:mod:`synrepl.http.requests`), the typed
stubs (generated into :mod:`synrepl.http._stubs` by
``python -m synrepl.http._codegen``), the endpoint reference in
``docs/http.md``, and the automatic choice of the instance to call
(:func:`route_instance`).

An entry records what Synapse 1.163.2 defines on its endpoint class (name,
path arguments, method, whether it caches and so takes a txn_id, whether it
exchanges stream positions, its retry flags) and what its client sends and
its handler answers. ``tests/test_http_synapse_drift.py`` compares the table
with the installed Synapse's classes, so a Synapse release that changes an
endpoint fails the tests.

Argument values are the JSON that goes on the wire: where Synapse's own
client takes Python objects (a ``Requester``, a ``RoomVersion``, events with
their contexts) and serializes them, the stubs take the serialized JSON.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Literal

import attrs

from synrepl.http.results import (
    EVENT_WRITTEN,
    MAX_STREAM_ID,
    NOTHING,
    OBJECT,
    OPTIONAL_MAX_STREAM_ID,
    REGISTERED_DEVICE,
    STREAM_UPDATES,
    ResponseShape,
)

__all__ = (
    "SYNAPSE_VERSION",
    "JsonType",
    "Field",
    "Route",
    "Endpoint",
    "ENDPOINTS",
    "EDU_WRITER_KEYS",
)

#: The Synapse release this table was checked against.
SYNAPSE_VERSION = "1.163.2"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_list_of(check: Callable[[object], bool]) -> Callable[[object], bool]:
    def is_list(value: object) -> bool:
        return isinstance(value, list | tuple) and all(check(item) for item in value)

    return is_list


def _or_none(check: Callable[[object], bool]) -> Callable[[object], bool]:
    def or_none(value: object) -> bool:
        return value is None or check(value)

    return or_none


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _is_bool(value: object) -> bool:
    return isinstance(value, bool)


def _is_object(value: object) -> bool:
    return isinstance(value, Mapping)


def _anything(value: object) -> bool:
    return True


@attrs.frozen
class JsonType:
    """The JSON type of an argument.

    Attributes:
        name: the type in words, for documentation.
        annotation: the Python annotation of a stub's parameter.
        check: whether a Python value fits.
    """

    name: str
    annotation: str
    check: Callable[[object], bool] = attrs.field(eq=False, repr=False)


STR = JsonType("string", "str", _is_str)
OPT_STR = JsonType("string or null", "str | None", _or_none(_is_str))
INT = JsonType("integer", "int", _is_int)
BOOL = JsonType("boolean", "bool", _is_bool)
OBJECT_T = JsonType("object", "Mapping[str, Any]", _is_object)
STR_LIST = JsonType("list of strings", "Sequence[str]", _is_list_of(_is_str))
OBJECT_LIST = JsonType("list of objects", "Sequence[Mapping[str, Any]]", _is_list_of(_is_object))
ANY = JsonType("any JSON value", "Any", _anything)


class _Required:
    """The type of :data:`REQUIRED`."""

    def __repr__(self) -> str:
        return "REQUIRED"


#: Marks a field without a default: the caller must give it.
REQUIRED: Any = _Required()


@attrs.frozen
class Field:
    """One argument: a path segment, a body field, or (GET) a query parameter.

    Attributes:
        name: the argument name, which is also the JSON key / query name.
        type: its JSON type.
        doc: what it is.
        default: the value used when the caller leaves it out, or
            :data:`REQUIRED`.
        choices: the only values Synapse accepts, when it restricts them.
    """

    name: str
    type: JsonType
    doc: str
    default: Any = REQUIRED
    choices: tuple[str, ...] = ()

    @property
    def required(self) -> bool:
        """True when the caller must give this argument."""
        return self.default is REQUIRED


RouteKind = Literal["main", "writer", "event_persister", "edu", "caller"]


@attrs.frozen
class Route:
    """Which instance an endpoint must be sent to, as Synapse's callers pick it.

    Build one with the class methods. :func:`route_instance` applies it to a
    configuration; :meth:`describe` says it in words.
    """

    kind: RouteKind
    writer_key: str | None = None
    room_from: str | None = None
    why: str = ""

    @classmethod
    def main(cls, why: str = "") -> Route:
        """The main process (``master``)."""
        return cls("main", why=why)

    @classmethod
    def writer(cls, key: str, why: str = "") -> Route:
        """The (first) writer of a ``stream_writers`` key."""
        return cls("writer", writer_key=key, why=why)

    @classmethod
    def event_persister(cls, room_from: str) -> Route:
        """The event persister that owns the room named by argument ``room_from``
        (``"events"``: the room of the first event in the ``events`` list)."""
        return cls("event_persister", room_from=room_from)

    @classmethod
    def edu(cls) -> Route:
        """The instance that handles the EDU type (see :data:`EDU_WRITER_KEYS`)."""
        return cls("edu")

    @classmethod
    def caller(cls, why: str) -> Route:
        """No fixed rule: the caller names the instance."""
        return cls("caller", why=why)

    def describe(self) -> str:
        """The rule, in words."""
        if self.kind == "main":
            text = "the main process (`master`)"
        elif self.kind == "writer":
            text = f"the first `stream_writers.{self.writer_key}` writer"
        elif self.kind == "event_persister":
            where = (
                "the room of the first event"
                if self.room_from == "events"
                else f"`{self.room_from}`"
            )
            text = f"the event persister (`stream_writers.events`) that owns {where}"
        elif self.kind == "edu":
            text = (
                "the instance that handles the EDU type: "
                + ", ".join(
                    f"`{edu}` the first `{key}` writer" for edu, key in EDU_WRITER_KEYS.items()
                )
                + "; any other type the main process"
            )
        else:
            text = "the instance the caller names"
        return f"{text} ({self.why})" if self.why else text


#: EDU types that Synapse routes to a stream writer; every other EDU type goes
#: to the main process. Synapse picks a random writer among several; synrepl
#: takes the first.
EDU_WRITER_KEYS: Mapping[str, str] = MappingProxyType(
    {
        "m.presence": "presence",
        "m.typing": "typing",
        "m.receipt": "receipts",
        "m.direct_to_device": "to_device",
        "m.device_list_update": "device_lists",
        "m.signing_key_update": "device_lists",
        "org.matrix.signing_key_update": "device_lists",
    }
)


@attrs.frozen
class Endpoint:
    """One Synapse replication endpoint.

    Attributes:
        name: Synapse's ``NAME``, the first path segment after
            ``/_synapse/replication/``.
        path: the path arguments, in order (``path_args`` has their names).
        method: ``POST``, ``PUT`` or ``GET``.
        cache: Synapse's ``CACHE``: the path ends with a txn_id segment and
            Synapse answers a repeated txn_id from its cache, so retries run
            the request at most once.
        fields: body fields (POST/PUT) or query parameters (GET).
        response: the shape of the answer.
        summary: what Synapse does with the request.
        route: which instance to send it to.
        served_by: which processes register the endpoint.
        notes: anything else a caller must know.
        synapse_class: the Synapse class that defines it (for error messages
            and docs).
        wait_for_streams: Synapse's ``WAIT_FOR_STREAMS``: requests carry the
            caller's stream positions and answers the callee's (only for
            non-GET requests).
        retry_on_timeout: Synapse's ``RETRY_ON_TIMEOUT``.
        retry_on_connect_error: Synapse's ``RETRY_ON_CONNECT_ERROR``.
        stub: the name of the typed stub, or None when it is written by hand.
    """

    name: str
    path: tuple[Field, ...]
    route: Route
    summary: str
    synapse_class: str
    method: str = "POST"
    cache: bool = True
    fields: tuple[Field, ...] = ()
    response: ResponseShape = NOTHING
    served_by: str = "every process"
    notes: tuple[str, ...] = ()
    wait_for_streams: bool = True
    retry_on_timeout: bool = True
    retry_on_connect_error: bool = True
    stub: str | None = attrs.field()

    @stub.default
    def _stub_default(self) -> str | None:
        return self.name

    @property
    def path_args(self) -> tuple[str, ...]:
        """The names of the path arguments, as Synapse's ``PATH_ARGS``."""
        return tuple(field.name for field in self.path)

    @property
    def takes_txn_id(self) -> bool:
        """True when the path ends with a txn_id segment (``cache``)."""
        return self.cache

    @property
    def carries_positions(self) -> bool:
        """True when requests and answers carry ``_INT_STREAM_POS``."""
        return self.method != "GET" and self.wait_for_streams

    @property
    def arguments(self) -> tuple[Field, ...]:
        """Every argument a caller gives: path arguments, then fields."""
        return self.path + self.fields

    @property
    def request_fields(self) -> tuple[str, ...]:
        """The names of the body fields (query parameters for GET)."""
        return tuple(field.name for field in self.fields)

    @property
    def response_fields(self) -> tuple[str, ...]:
        """The fields of the answer the stub reads (empty: none or free-form)."""
        return self.response.fields

    @property
    def send_to(self) -> str:
        """Which instance to send the request to, in words."""
        return self.route.describe()


# --- reusable fields ---------------------------------------------------------

_USER_ID = Field("user_id", STR, "the user's Matrix ID")
_ROOM_ID = Field("room_id", STR, "the room ID")
_CONTENT = Field("content", OBJECT_T, "the content to store")
_REQUESTER = Field(
    "requester",
    OBJECT_T,
    "the requester as Synapse serializes it (`user_id`, `access_token_id`, `is_guest`, "
    "`scope`, `shadow_banned`, `device_id`, `app_server_id`, `authenticated_entity`)",
)
_EVENT_CONTENT = Field("content", OBJECT_T, "the content of the membership event to send")
_CLIENT_TXN_ID = Field(
    "txn_id", OPT_STR, "the client's transaction ID for the request, if it gave one"
)
_MAX_ID_NOTE = "the answer's integer is the writer's `account_data` stream position"

_ACCOUNT_DATA = Route.writer("account_data")
_MSC3391 = "every process, when `experimental_features.msc3391_enabled` is set"
_MAIN_ONLY = "the main process only"
_ROLLOUT = (
    "kept by Synapse for rolling upgrades; no Synapse 1.163.2 code calls it, "
    "so Synapse may remove it in any release"
)


def _endpoints() -> tuple[Endpoint, ...]:
    return (
        # --- account data and tags (account_data.py) ---
        Endpoint(
            "add_user_account_data",
            (_USER_ID, Field("account_data_type", STR, "the account data type")),
            _ACCOUNT_DATA,
            "Stores global account data for a user, on the account data writer.",
            "ReplicationAddUserAccountDataRestServlet",
            cache=False,
            fields=(_CONTENT,),
            response=MAX_STREAM_ID,
            notes=(_MAX_ID_NOTE,),
        ),
        Endpoint(
            "remove_user_account_data",
            (_USER_ID, Field("account_data_type", STR, "the account data type")),
            _ACCOUNT_DATA,
            "Removes a user's global account data of one type (MSC3391).",
            "ReplicationRemoveUserAccountDataRestServlet",
            cache=False,
            response=OPTIONAL_MAX_STREAM_ID,
            served_by=_MSC3391,
        ),
        Endpoint(
            "add_room_account_data",
            (_USER_ID, _ROOM_ID, Field("account_data_type", STR, "the account data type")),
            _ACCOUNT_DATA,
            "Stores a user's account data for one room.",
            "ReplicationAddRoomAccountDataRestServlet",
            cache=False,
            fields=(_CONTENT,),
            response=MAX_STREAM_ID,
            notes=(_MAX_ID_NOTE,),
        ),
        Endpoint(
            "remove_room_account_data",
            (_USER_ID, _ROOM_ID, Field("account_data_type", STR, "the account data type")),
            _ACCOUNT_DATA,
            "Removes a user's account data of one type for one room (MSC3391).",
            "ReplicationRemoveRoomAccountDataRestServlet",
            cache=False,
            response=OPTIONAL_MAX_STREAM_ID,
            served_by=_MSC3391,
            notes=(
                (
                    "Synapse's own client takes a `content` argument but does not send it; "
                    "the stub leaves it out"
                ),
            ),
        ),
        Endpoint(
            "add_tag",
            (_USER_ID, _ROOM_ID, Field("tag", STR, "the tag name (`m.favourite`, ...)")),
            _ACCOUNT_DATA,
            "Tags a room for a user (the tag's content, e.g. its `order`).",
            "ReplicationAddTagRestServlet",
            cache=False,
            fields=(Field("content", OBJECT_T, 'the tag content, e.g. `{"order": 0.5}`'),),
            response=MAX_STREAM_ID,
            notes=(_MAX_ID_NOTE,),
        ),
        Endpoint(
            "remove_tag",
            (_USER_ID, _ROOM_ID, Field("tag", STR, "the tag name")),
            _ACCOUNT_DATA,
            "Removes a tag from a room for a user.",
            "ReplicationRemoveTagRestServlet",
            cache=False,
            response=MAX_STREAM_ID,
            notes=(_MAX_ID_NOTE,),
        ),
        # --- account deactivation (deactivate_account.py) ---
        Endpoint(
            "notify_account_deactivated",
            (Field("user_id", STR, "the deactivated user's Matrix ID"),),
            Route.main(),
            "Tells the main process that a user was deactivated, so that it starts "
            "parting the user from their rooms and tells its modules.",
            "ReplicationNotifyAccountDeactivatedServlet",
            fields=(Field("by_admin", BOOL, "whether a server admin deactivated the account"),),
            served_by=_MAIN_ONLY,
        ),
        # --- delayed events (delayed_events.py) ---
        Endpoint(
            "added_delayed_event",
            (),
            Route.main(),
            "Tells the main process that a delayed event was scheduled, so that it "
            "wakes up in time to send it.",
            "ReplicationAddedDelayedEventRestServlet",
            cache=False,
            fields=(
                Field(
                    "next_send_ts", INT, "when the event is due, in milliseconds since the epoch"
                ),
            ),
            served_by=_MAIN_ONLY,
        ),
        Endpoint(
            "cancel_delayed_events_for_user",
            (Field("user_localpart", STR, "the local user's localpart (not the full ID)"),),
            Route.main(),
            "Cancels every delayed event of a local user.",
            "ReplicationCancelDelayedEventsForUserRestServlet",
            cache=False,
            served_by=_MAIN_ONLY,
        ),
        # --- devices (devices.py) ---
        Endpoint(
            "notify_device_update",
            (_USER_ID,),
            Route.writer("device_lists", why="Synapse picks any device list writer"),
            "Tells a device list writer that some of a user's devices changed, so it "
            "pokes clients and, for local users, remote servers.",
            "ReplicationNotifyDeviceUpdateRestServlet",
            cache=False,
            fields=(Field("device_ids", STR_LIST, "the devices that changed"),),
        ),
        Endpoint(
            "notify_user_signature_update",
            (Field("from_user_id", STR, "the user who signed other users' keys"),),
            Route.writer("device_lists", why="Synapse picks any device list writer"),
            "Tells a device list writer that a user signed other users' keys.",
            "ReplicationNotifyUserSignatureUpdateRestServlet",
            cache=False,
            fields=(Field("user_ids", STR_LIST, "the users whose keys were signed"),),
        ),
        Endpoint(
            "multi_user_device_resync",
            (),
            Route.writer("device_lists"),
            "Fetches the device lists of several users of one remote server over "
            "federation, caches them and answers them.",
            "ReplicationMultiUserDevicesResyncRestServlet",
            fields=(Field("user_ids", STR_LIST, "remote users, all on the same server"),),
            response=OBJECT,
            notes=(
                (
                    "the answer maps each user ID to the federation `user/devices` answer "
                    "for that user, or null when it could not be fetched"
                ),
            ),
        ),
        Endpoint(
            "handle_new_device_update",
            (),
            Route.writer("device_lists", why="only the first, to avoid cross-worker locks"),
            "Wakes the first device list writer to send local device changes to remote servers.",
            "ReplicationHandleNewDeviceUpdateRestServlet",
            cache=False,
        ),
        Endpoint(
            "device_handle_room_un_partial_stated",
            (_ROOM_ID,),
            Route.writer("device_lists", why="Synapse picks any device list writer"),
            "Sends the device list updates owed to a room that just got its full state.",
            "ReplicationDeviceHandleRoomUnPartialStated",
        ),
        # --- federation (federation.py) ---
        Endpoint(
            "fed_send_events",
            (),
            Route.event_persister("room_id"),
            "Persists events received over federation (or backfilled) and notifies listeners.",
            "ReplicationFederationSendEventsRestServlet",
            fields=(
                Field(
                    "events",
                    OBJECT_LIST,
                    "serialized events: `event`, `room_version`, `event_format_version`, "
                    "`internal_metadata`, `outlier`, `rejected_reason`, `context`",
                ),
                Field("backfilled", BOOL, "whether the events were backfilled"),
                Field("room_id", STR, "the room all the events belong to"),
            ),
            response=MAX_STREAM_ID,
            notes=(
                "Synapse sends at most 200 events per request",
                "409 means the room was un-partial-stated meanwhile: recompute the contexts",
            ),
        ),
        Endpoint(
            "fed_send_edu",
            (Field("edu_type", STR, "the EDU type (`m.typing`, `m.receipt`, ...)"),),
            Route.edu(),
            "Hands an EDU received over federation to the instance that handles its type.",
            "ReplicationFederationSendEduRestServlet",
            fields=(
                Field("origin", STR, "the server the EDU came from"),
                Field("content", OBJECT_T, "the EDU content"),
            ),
        ),
        Endpoint(
            "fed_query",
            (Field("query_type", STR, "the federation query type (`profile`, ...)"),),
            Route.main(),
            "Answers a federation query (`/_matrix/federation/v1/query/<type>`).",
            "ReplicationGetQueryRestServlet",
            cache=False,
            fields=(
                Field("args", OBJECT_T, "the query arguments"),
                Field("origin", STR, "the server that asked"),
            ),
            response=OBJECT,
            notes=(
                _ROLLOUT,
                (
                    "Synapse's handler reads `origin` from the body, which its own client "
                    "does not send; the stub sends it, and Synapse 1.163.2 then answers"
                ),
            ),
        ),
        Endpoint(
            "fed_cleanup_room",
            (_ROOM_ID,),
            Route.main(),
            "Deletes what the database holds for a room, ready for the server to join it again.",
            "ReplicationCleanRoomRestServlet",
            notes=(_ROLLOUT,),
        ),
        Endpoint(
            "store_room_on_outlier_membership",
            (_ROOM_ID,),
            Route.main(),
            "Records a room that the server only knows through an out-of-band "
            "membership (an invite or knock).",
            "ReplicationStoreRoomOnOutlierMembershipRestServlet",
            fields=(Field("room_version", STR, 'the room version identifier (`"10"`, ...)'),),
            notes=(_ROLLOUT,),
        ),
        # --- login (login.py) ---
        Endpoint(
            "device_check_registered",
            (_USER_ID,),
            Route.main(),
            "Registers a device for a user (or reuses it) and issues an access token, "
            "during registration and login.",
            "RegisterDeviceReplicationServlet",
            fields=(
                Field("device_id", OPT_STR, "the device ID to use; null for a new one"),
                Field("initial_display_name", OPT_STR, "the device's display name"),
                Field("is_guest", BOOL, "whether the user is a guest"),
                Field("is_appservice_ghost", BOOL, "whether an appservice owns the user"),
                Field("should_issue_refresh_token", BOOL, "whether to issue a refresh token"),
                Field("auth_provider_id", OPT_STR, "the SSO provider used to log in"),
                Field("auth_provider_session_id", OPT_STR, "the SSO session ID"),
            ),
            response=REGISTERED_DEVICE,
            served_by=_MAIN_ONLY,
            notes=("the answer holds credentials: keep it out of logs",),
        ),
        # --- membership (membership.py) ---
        Endpoint(
            "remote_join",
            (_ROOM_ID, _USER_ID),
            Route.main(),
            "Joins a local user to a room this server is not in, over federation.",
            "ReplicationRemoteJoinRestServlet",
            fields=(
                _REQUESTER,
                Field("remote_room_hosts", STR_LIST, "servers to try the join through"),
                _EVENT_CONTENT,
            ),
            response=EVENT_WRITTEN,
        ),
        Endpoint(
            "remote_knock",
            (_ROOM_ID, _USER_ID),
            Route.main(),
            "Knocks on a remote room for a local user, over federation.",
            "ReplicationRemoteKnockRestServlet",
            fields=(
                _REQUESTER,
                Field("remote_room_hosts", STR_LIST, "servers to try the knock through"),
                _EVENT_CONTENT,
            ),
            response=EVENT_WRITTEN,
        ),
        Endpoint(
            "remote_reject_invite",
            (Field("invite_event_id", STR, "the ID of the invite to reject"),),
            Route.main(),
            "Rejects an invite received from a remote server.",
            "ReplicationRemoteRejectInviteRestServlet",
            fields=(_CLIENT_TXN_ID, _REQUESTER, _EVENT_CONTENT),
            response=EVENT_WRITTEN,
        ),
        Endpoint(
            "remote_rescind_knock",
            (Field("knock_event_id", STR, "the ID of the knock to rescind"),),
            Route.main(),
            "Withdraws a local user's knock on a remote room.",
            "ReplicationRemoteRescindKnockRestServlet",
            fields=(_CLIENT_TXN_ID, _REQUESTER, _EVENT_CONTENT),
            response=EVENT_WRITTEN,
        ),
        Endpoint(
            "membership_change",
            (_ROOM_ID, _USER_ID, Field("change", STR, "what happened", choices=("left",))),
            Route.main(),
            "Tells the main process that a local user left a room, so that it runs "
            "its clean-up for that user and room.",
            "ReplicationUserJoinedLeftRoomRestServlet",
            cache=False,
        ),
        # --- presence (presence.py) ---
        Endpoint(
            "bump_presence_active_time",
            (_USER_ID,),
            Route.writer("presence"),
            "Records that a user did something, which keeps them online.",
            "ReplicationBumpPresenceActiveTime",
            cache=False,
            fields=(Field("device_id", OPT_STR, "the device the user used"),),
        ),
        Endpoint(
            "presence_set_state",
            (_USER_ID,),
            Route.writer("presence"),
            "Sets a user's presence state.",
            "ReplicationPresenceSetState",
            cache=False,
            fields=(
                Field("device_id", OPT_STR, "the device that set it"),
                Field("state", OBJECT_T, "the new state: `presence`, optional `status_msg`"),
                Field("force_notify", BOOL, "notify even if nothing changed", default=False),
                Field("is_sync", BOOL, "whether a `/sync` request set it", default=False),
            ),
        ),
        # --- profile (profile.py) ---
        Endpoint(
            "profile_set_field",
            (Field("user_id", STR, "the user whose profile changes"),),
            Route.writer("events", why="profile updates are written by the first event persister"),
            "Sets one field of a user's profile (display name, avatar or a custom field).",
            "ReplicationProfileSetField",
            cache=False,
            fields=(
                Field("requester", STR, "the Matrix ID of the user making the change"),
                Field("field_name", STR, "the field (`displayname`, `avatar_url`, ...)"),
                Field("new_value", ANY, "the new value"),
                Field("by_admin", BOOL, "whether a server admin made the change"),
                Field("propagate", BOOL, "whether to update the user's room memberships"),
            ),
        ),
        Endpoint(
            "profile_delete_field",
            (Field("user_id", STR, "the user whose profile changes"),),
            Route.writer("events", why="profile updates are written by the first event persister"),
            "Deletes one field of a user's profile.",
            "ReplicationProfileDeleteField",
            cache=False,
            fields=(
                Field("requester", STR, "the Matrix ID of the user making the change"),
                Field("field_name", STR, "the field to delete"),
                Field("by_admin", BOOL, "whether a server admin made the change"),
            ),
        ),
        # --- pushers and push rules (push.py) ---
        Endpoint(
            "remove_pusher",
            (_USER_ID,),
            Route.main(),
            "Deletes one of a user's pushers.",
            "ReplicationRemovePusherRestServlet",
            cache=False,
            fields=(
                Field("app_id", STR, "the pusher's app ID"),
                Field("pushkey", STR, "the pusher's push key"),
            ),
        ),
        Endpoint(
            "copy_push_rules",
            (
                _USER_ID,
                Field("old_room_id", STR, "the room the rules are copied from"),
                Field("new_room_id", STR, "the room they are copied to"),
            ),
            Route.writer("push_rules"),
            "Copies a user's room-specific push rules to another room (on room upgrade).",
            "ReplicationCopyPusherRestServlet",
            cache=False,
        ),
        Endpoint(
            "delete_all_pushers_for_user",
            (_USER_ID,),
            Route.main(),
            "Deletes all of a user's pushers.",
            "ReplicationDeleteAllPushersForUserRestServlet",
            cache=False,
        ),
        # --- registration (register.py) ---
        Endpoint(
            "register_user",
            (Field("user_id", STR, "the user ID to register"),),
            Route.main(),
            "Creates a user account (after checking the registration rate limit).",
            "ReplicationRegisterServlet",
            fields=(
                Field("password_hash", OPT_STR, "the password hash, if any"),
                Field("was_guest", BOOL, "whether a guest account is being upgraded"),
                Field("make_guest", BOOL, "whether the new account is a guest"),
                Field("appservice_id", OPT_STR, "the registering appservice, if any"),
                Field(
                    "create_profile_with_displayname",
                    OPT_STR,
                    "create a profile with this display name",
                ),
                Field("admin", BOOL, "whether the user is a server admin"),
                Field("user_type", OPT_STR, "the user type, null for a normal user"),
                Field("address", OPT_STR, "the IP address that registered"),
                Field("shadow_banned", BOOL, "whether to shadow-ban the user"),
                Field("approved", BOOL, "whether the account counts as approved by an admin"),
            ),
            served_by=_MAIN_ONLY,
            notes=(_ROLLOUT,),
        ),
        Endpoint(
            "post_register",
            (Field("user_id", STR, "the newly registered user"),),
            Route.main(),
            "Runs what follows a registration: records the email address or phone "
            "number registered with (an email pusher for the email) and the terms consent.",
            "ReplicationPostRegisterActionsServlet",
            fields=(
                Field("auth_result", OBJECT_T, "the credentials the user registered with"),
                Field("access_token", OPT_STR, "the new device's access token, null when no login"),
            ),
            served_by=_MAIN_ONLY,
        ),
        # --- events (send_events.py, state.py) ---
        Endpoint(
            "send_events",
            (),
            Route.event_persister("events"),
            "Persists a batch of events created on a worker (all in one room) and "
            "notifies listeners; the answer names the last one.",
            "ReplicationSendEventsRestServlet",
            fields=(
                Field(
                    "events",
                    OBJECT_LIST,
                    "serialized events: `event`, `room_version`, `event_format_version`, "
                    "`internal_metadata`, `outlier`, `rejected_reason`, `context`, "
                    "`requester`, `ratelimit`, `extra_users`",
                ),
            ),
            response=EVENT_WRITTEN,
            notes=("409 means the room was un-partial-stated meanwhile: recompute the contexts",),
        ),
        Endpoint(
            "update_current_state",
            (_ROOM_ID,),
            Route.event_persister("room_id"),
            "Recomputes and stores a room's current state.",
            "ReplicationUpdateCurrentStateRestServlet",
            served_by="event persisters only (`stream_writers.events`)",
            notes=("a persister that does not own the room answers 400",),
        ),
        # --- streams (streams.py) ---
        Endpoint(
            "get_repl_stream_updates",
            (Field("stream_name", STR, "the replication stream"),),
            Route.caller("the writer whose rows are wanted"),
            "Answers one page of the rows a writer wrote to a stream, "
            "`from_token < token <= upto_token`: how a process fills a gap.",
            "ReplicationGetStreamUpdates",
            method="GET",
            fields=(
                Field("from_token", INT, "the last token already had"),
                Field("upto_token", INT, "the last token wanted"),
            ),
            response=STREAM_UPDATES,
            wait_for_streams=False,
            stub=None,
            notes=(
                "an unknown stream answers 400",
                "while `limited`, ask again from the answer's `upto_token`",
            ),
        ),
    )


#: Every endpoint of Synapse 1.163.2, by name.
ENDPOINTS: Mapping[str, Endpoint] = MappingProxyType({e.name: e for e in _endpoints()})
