"""What each Synapse release has on the replication wire.

synrepl's stream registry, command set, HTTP endpoint table and
``stream_writers`` keys describe the newest release it is tested against
(:data:`NEWEST`).  Older releases lack some of it, one stream's rows had
another shape and one endpoint another path.  This module records the
differences, release by release, so that a client told (or finding out)
which release it talks to can tell what that release has.

Every fact here was read from the releases' own wheels (their stream,
command and endpoint classes and their writer configuration, as data) by
``tests/synapse_releases.py``, which also checks this module against
them: run it with the wheels' directory to see the table again.  Facts
start at :data:`OLDEST_KNOWN`; nothing older was read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

import attrs

__all__ = (
    "SynapseRelease",
    "ReleaseFacts",
    "facts_for",
    "NEWEST",
    "OLDEST_KNOWN",
    "STREAMS_SINCE",
    "COMMANDS_SINCE",
    "ENDPOINTS_SINCE",
    "ENDPOINTS_UNTIL",
    "DEVICE_LISTS_FIELDS",
    "ENDPOINT_PATH_NAMES_UNTIL",
    "WRITER_KEYS_SINCE",
    "UnknownReleaseError",
    "INTEROP_TESTED",
    "Support",
    "support_of",
    "release_in_server_header",
    "ADMIN_FETCH_EVENT_SINCE",
)


class UnknownReleaseError(ValueError):
    """A version string that names no Synapse release synrepl can read."""


_VERSION = re.compile(r"(?:Synapse/)?v?(\d+)\.(\d+)(?:\.(\d+))?(?:[.-]?(?:rc|a|b|dev)\d*)?")


@attrs.frozen(order=True)
class SynapseRelease:
    """A Synapse release, ``major.minor.patch`` (ordered as releases are).

    Attributes:
        major: always 1 so far.
        minor: the release series (``135`` for 1.135.x).
        patch: the bug-fix release within it.
    """

    major: int
    minor: int
    patch: int = 0

    @classmethod
    def parse(cls, text: str) -> SynapseRelease:
        """``1.135.0``, ``v1.135.0rc1`` or a ``Server: Synapse/1.135.0`` header's
        value; a release candidate counts as its release.

        Raises:
            UnknownReleaseError: no version in ``text``.
        """
        match = _VERSION.fullmatch(text.strip().split(" ")[0])
        if match is None:
            raise UnknownReleaseError(f"not a Synapse version: {text[:80]!r}")
        major, minor, patch = match.groups()
        return cls(int(major), int(minor), int(patch or 0))

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


def release_in_server_header(value: str | None) -> SynapseRelease | None:
    """The release an HTTP ``Server`` header names: Synapse answers every
    request with ``Synapse/1.98.0`` (a git checkout appends its branch,
    which is ignored).  None: no header, or not Synapse's."""
    if not value or not value.startswith("Synapse/"):
        return None
    try:
        return SynapseRelease.parse(value)
    except UnknownReleaseError:
        return None


def _r(text: str) -> SynapseRelease:
    return SynapseRelease.parse(text)


#: The newest release synrepl's tables describe (and its tests run against).
NEWEST = _r("1.163.2")

#: The oldest release whose facts were read.
OLDEST_KNOWN = _r("1.98.0")

#: The version matrix: the releases the interop suite runs real processes
#: of (``tests/interop/matrix.py``; docs/tested-against.md says why each).
INTEROP_TESTED: tuple[SynapseRelease, ...] = (
    NEWEST,
    _r("1.162.0"),
    _r("1.141.0"),
    _r("1.110.0"),
    OLDEST_KNOWN,
)

#: Streams that appeared after :data:`OLDEST_KNOWN`: the first release with each.
STREAMS_SINCE: Mapping[str, SynapseRelease] = MappingProxyType(
    {
        "thread_subscriptions": _r("1.135.0"),
        "sticky_events": _r("1.148.0"),
        "quarantined_media": _r("1.152.0"),
        "profile_updates": _r("1.159.0"),
    }
)

#: Commands that appeared after :data:`OLDEST_KNOWN`: the first release with each.
COMMANDS_SINCE: Mapping[str, SynapseRelease] = MappingProxyType({"CANCEL_TASK": _r("1.146.0")})

#: HTTP replication endpoints that appeared after :data:`OLDEST_KNOWN`.
ENDPOINTS_SINCE: Mapping[str, SynapseRelease] = MappingProxyType(
    {
        "copy_push_rules": _r("1.105.0"),
        "added_delayed_event": _r("1.116.0"),
        "remove_pusher": _r("1.117.0"),
        "delete_all_pushers_for_user": _r("1.135.0"),
        "device_handle_room_un_partial_stated": _r("1.135.0"),
        "handle_new_device_update": _r("1.135.0"),
        "notify_account_deactivated": _r("1.135.0"),
        "notify_device_update": _r("1.135.0"),
        "notify_user_signature_update": _r("1.135.0"),
        "profile_delete_field": _r("1.159.0"),
        "profile_set_field": _r("1.159.0"),
        "cancel_delayed_events_for_user": _r("1.163.0"),
    }
)

#: The first release whose admin API fetches one event by ID
#: (``GET /_synapse/admin/v1/fetch_event/{event_id}``), which
#: :class:`synrepl.events.AdminApiEventSource` reads.
ADMIN_FETCH_EVENT_SINCE = _r("1.140.0")

#: HTTP replication endpoints that were removed: the first release without each.
ENDPOINTS_UNTIL: Mapping[str, SynapseRelease] = MappingProxyType(
    {"send_event": _r("1.136.0"), "upload_keys_for_user": _r("1.140.0")}
)

#: The ``device_lists`` row's fields, from the release where each shape began.
DEVICE_LISTS_FIELDS: tuple[tuple[SynapseRelease, tuple[str, ...]], ...] = (
    (OLDEST_KNOWN, ("entity", "is_signature")),
    (_r("1.110.0"), ("user_id", "is_signature", "hosts_calculated")),
)

#: HTTP replication endpoints that older releases served under another
#: endpoint's name: synrepl's name -> (the name those releases' class
#: declared, which is the first segment of its path; the first release to
#: use synrepl's name).  Only the path differs: same arguments, method and
#: body.
#:
#: Until 1.117 the pusher-removal class declared the account-data
#: endpoint's name, so Synapse routed it at
#: ``/_synapse/replication/add_user_account_data/{user_id}`` (one path
#: argument, where storing account data takes two), and a request to
#: ``remove_pusher/{user_id}`` found no route.
ENDPOINT_PATH_NAMES_UNTIL: Mapping[str, tuple[str, SynapseRelease]] = MappingProxyType(
    {"remove_pusher": ("add_user_account_data", _r("1.117.0"))}
)

#: ``stream_writers`` keys (:data:`synrepl.sharding.STREAM_WRITER_KEYS`)
#: that appeared after :data:`OLDEST_KNOWN`: the first release accepting
#: each.  An older release fails to load a configuration naming the key.
WRITER_KEYS_SINCE: Mapping[str, SynapseRelease] = MappingProxyType(
    {
        "push_rules": _r("1.105.0"),
        "device_lists": _r("1.135.0"),
        "thread_subscriptions": _r("1.135.0"),
        "quarantined_media_changes": _r("1.152.0"),
    }
)


@attrs.frozen
class ReleaseFacts:
    """What one release has (see :func:`facts_for`).

    Attributes:
        release: the release.
        streams: the streams it writes, of those synrepl knows.
        commands: the replication commands it speaks.
        endpoints: the HTTP replication endpoints it serves.
        device_lists_fields: its ``device_lists`` row's fields, in wire order.
        writer_keys: the ``stream_writers`` keys it accepts, in Synapse's order.
        known: False for a release older than :data:`OLDEST_KNOWN` (the facts
            are then those of the oldest known one, and may be wrong) or newer
            than :data:`NEWEST` (it may have more than listed).
    """

    release: SynapseRelease
    streams: frozenset[str]
    commands: frozenset[str]
    endpoints: frozenset[str]
    device_lists_fields: tuple[str, ...]
    writer_keys: tuple[str, ...]
    known: bool

    def lacks_endpoint(self, name: str) -> str | None:
        """Why this release has no endpoint ``name`` (None: it has it)."""
        if name in self.endpoints:
            return None
        if name in ENDPOINTS_SINCE:
            return (
                f"{name} is served from Synapse {ENDPOINTS_SINCE[name]} on, not by {self.release}"
            )
        if name in ENDPOINTS_UNTIL:
            return f"{name} was removed in Synapse {ENDPOINTS_UNTIL[name]}; {self.release} is newer"
        return f"Synapse {self.release} serves no {name} endpoint"

    def path_name(self, name: str) -> str:
        """The first segment of endpoint ``name``'s path in this release
        (``/_synapse/replication/<it>/...``): ``name`` itself, unless the
        release served it under another name (:data:`ENDPOINT_PATH_NAMES_UNTIL`)."""
        older = ENDPOINT_PATH_NAMES_UNTIL.get(name)
        if older is not None and self.release < older[1]:
            return older[0]
        return name


def facts_for(
    release: SynapseRelease,
    *,
    streams: frozenset[str] | None = None,
    commands: frozenset[str] | None = None,
    endpoints: frozenset[str] | None = None,
    writer_keys: tuple[str, ...] | None = None,
) -> ReleaseFacts:
    """What ``release`` has, from what :data:`NEWEST` has.

    Args:
        release: the release asked about.
        streams: the streams of :data:`NEWEST` (default: synrepl's registry).
        commands: the commands of :data:`NEWEST` (default: synrepl's).
        endpoints: the HTTP endpoints of :data:`NEWEST` (default: synrepl's
            table); those removed before it (:data:`ENDPOINTS_UNTIL`) are added.
        writer_keys: the ``stream_writers`` keys of :data:`NEWEST` (default:
            :data:`synrepl.sharding.STREAM_WRITER_KEYS`).
    """
    if streams is None:
        from synrepl.streams import STREAM_NAMES

        streams = frozenset(STREAM_NAMES)
    if commands is None:
        from synrepl.commands import COMMAND_TYPES

        commands = frozenset(COMMAND_TYPES)
    if endpoints is None:
        from synrepl.http import ENDPOINTS

        endpoints = frozenset(ENDPOINTS)
    if writer_keys is None:
        from synrepl.sharding import STREAM_WRITER_KEYS

        writer_keys = STREAM_WRITER_KEYS

    def present(since: Mapping[str, SynapseRelease], names: frozenset[str]) -> frozenset[str]:
        return frozenset(n for n in names if n not in since or since[n] <= release)

    served = present(ENDPOINTS_SINCE, endpoints | frozenset(ENDPOINTS_UNTIL))
    served = frozenset(
        n for n in served if n not in ENDPOINTS_UNTIL or release < ENDPOINTS_UNTIL[n]
    )
    shape = DEVICE_LISTS_FIELDS[0][1]
    for since, fields in DEVICE_LISTS_FIELDS:
        if since <= release:
            shape = fields
    return ReleaseFacts(
        release=release,
        streams=present(STREAMS_SINCE, streams),
        commands=present(COMMANDS_SINCE, commands),
        endpoints=served,
        device_lists_fields=shape,
        writer_keys=tuple(
            k for k in writer_keys if k not in WRITER_KEYS_SINCE or WRITER_KEYS_SINCE[k] <= release
        ),
        known=OLDEST_KNOWN <= release <= NEWEST,
    )


@attrs.frozen
class Support:
    """How far synrepl vouches for a release (see :func:`support_of`).

    Attributes:
        level: ``"tested"`` (the interop suite runs this series), ``"known"``
            (its wire facts are read and checked, not run end to end),
            ``"older"`` or ``"newer"`` than anything read.
        text: one line saying so, with what the release lacks.
    """

    level: str
    text: str


def support_of(release: SynapseRelease) -> Support:
    """What synrepl can say about a cluster running ``release``."""
    series = {(t.major, t.minor) for t in INTEROP_TESTED}
    if (release.major, release.minor) in series:
        return Support("tested", f"Synapse {release}: supported, the interop suite runs it")
    if release > NEWEST:
        return Support(
            "newer",
            f"Synapse {release} is newer than synrepl's tables ({NEWEST}): streams, "
            "commands or endpoints it added are not known",
        )
    if release < OLDEST_KNOWN:
        return Support(
            "older",
            f"Synapse {release} is older than any release synrepl has read ({OLDEST_KNOWN})",
        )
    facts = facts_for(release)
    newest = facts_for(NEWEST)
    lacking = sorted(newest.streams - facts.streams)
    missing_endpoints = len(newest.endpoints - facts.endpoints)
    lacks = []
    if lacking:
        lacks.append(f"no {', '.join(lacking)} stream{'s' if len(lacking) > 1 else ''}")
    if missing_endpoints:
        lacks.append(f"{missing_endpoints} endpoint{'s' if missing_endpoints > 1 else ''} missing")
    if facts.device_lists_fields != newest.device_lists_fields:
        lacks.append("the older device_lists row")
    tested = ", ".join(str(t) for t in INTEROP_TESTED)
    return Support(
        "known",
        f"Synapse {release}: its wire is known ({'; '.join(lacks) or 'as ' + str(NEWEST)}), "
        f"but end to end synrepl is tested with {tested} only",
    )
