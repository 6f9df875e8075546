"""Rows of every replication stream other than ``events`` and ``backfill``.

Field names and order follow Synapse 1.163.2; the differential test in
``tests/test_synapse_differential.py`` fails when they drift.
"""

from __future__ import annotations

from typing import Any

from synrepl.streams._row import Row, stream_row

__all__ = (
    "PresenceRow",
    "PresenceFederationRow",
    "TypingRow",
    "ReceiptsRow",
    "PushRulesRow",
    "PushersRow",
    "CachesRow",
    "DeviceListsRow",
    "DeviceListsEntityRow",
    "ToDeviceRow",
    "FederationRow",
    "AccountDataRow",
    "StickyEventsRow",
    "ThreadSubscriptionsRow",
    "UnPartialStatedRoomRow",
    "UnPartialStatedEventRow",
    "QuarantinedMediaRow",
    "ProfileUpdatesRow",
)


@stream_row("presence")
class PresenceRow(Row):
    """A user's presence changed."""

    __slots__ = ()

    user_id: str
    state: str
    last_active_ts: int
    last_federation_update_ts: int
    last_user_sync_ts: int
    status_msg: str | None
    currently_active: bool


@stream_row("presence_federation")
class PresenceFederationRow(Row):
    """A presence update must be sent to one remote server."""

    __slots__ = ()

    destination: str
    user_id: str


@stream_row("typing")
class TypingRow(Row):
    """The full list of users typing in a room (it replaces the previous one)."""

    __slots__ = ()

    room_id: str
    user_ids: tuple[str, ...]


@stream_row("receipts")
class ReceiptsRow(Row):
    """A read receipt was sent; ``data`` is the receipt body (``{"ts": ...}``)."""

    __slots__ = ()

    room_id: str
    receipt_type: str
    user_id: str
    event_id: str
    thread_id: str | None
    data: dict[str, Any]


@stream_row("push_rules")
class PushRulesRow(Row):
    """A user's push rules changed."""

    __slots__ = ()

    user_id: str


@stream_row("pushers")
class PushersRow(Row):
    """A pusher was added, changed or (``deleted``) removed."""

    __slots__ = ()

    user_id: str
    app_id: str
    pushkey: str
    deleted: bool


@stream_row("caches")
class CachesRow(Row):
    """Invalidate a cache entry; ``keys`` None means the whole cache."""

    __slots__ = ()

    cache_func: str
    keys: tuple[Any, ...] | None
    invalidation_ts: int


@stream_row("device_lists")
class DeviceListsRow(Row):
    """A user's devices (or cross-signing signatures) changed."""

    __slots__ = ()

    user_id: str
    is_signature: bool
    hosts_calculated: bool


@stream_row("device_lists")
class DeviceListsEntityRow(Row):
    """A ``device_lists`` row as Synapse wrote it before 1.110: ``entity`` is
    a local user whose devices changed or a remote server to tell about it.

    Its parser picks this shape for two-field rows, so a client following a
    cluster in the middle of an upgrade reads both kinds of writer.
    """

    __slots__ = ()

    entity: str
    is_signature: bool


@stream_row("to_device")
class ToDeviceRow(Row):
    """A to-device message waits for ``entity`` (a local user or a server)."""

    __slots__ = ()

    entity: str


@stream_row("federation")
class FederationRow(Row):
    """Something queued for a federation sender; ``type`` says how to read ``data``."""

    __slots__ = ()

    type: str
    data: dict[str, Any]


@stream_row("account_data")
class AccountDataRow(Row):
    """Global (``room_id`` None) or per-room account data, or tags, changed."""

    __slots__ = ()

    user_id: str
    room_id: str | None
    data_type: str


@stream_row("sticky_events")
class StickyEventsRow(Row):
    """A sticky event (MSC4354) changed in a room."""

    __slots__ = ()

    room_id: str
    event_id: str


@stream_row("thread_subscriptions")
class ThreadSubscriptionsRow(Row):
    """A user's subscription to a thread (by its root event) changed."""

    __slots__ = ()

    user_id: str
    room_id: str
    event_id: str


@stream_row("un_partial_stated_room")
class UnPartialStatedRoomRow(Row):
    """A room joined with partial state now has its full state."""

    __slots__ = ()

    room_id: str


@stream_row("un_partial_stated_event")
class UnPartialStatedEventRow(Row):
    """An event's partial state was completed; its rejection may have changed."""

    __slots__ = ()

    event_id: str
    rejection_status_changed: bool


@stream_row("quarantined_media")
class QuarantinedMediaRow(Row):
    """Media was (un)quarantined; ``origin`` is None for local media."""

    __slots__ = ()

    origin: str | None
    media_id: str
    quarantined: bool


@stream_row("profile_updates")
class ProfileUpdatesRow(Row):
    """A profile changed (``update``) or a user joined/left a room.

    ``affected_fields`` keeps the wire order (Synapse turns it into a set).
    """

    __slots__ = ()

    user_id: str
    action: str
    affected_fields: tuple[str, ...] | None
