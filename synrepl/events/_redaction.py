"""What a redaction leaves of an event's content, per room version.

The Matrix specification's redaction algorithm keeps a few protocol keys of
some event types and drops all other content; the list grew with room
versions 6 (``m.room.aliases`` no longer kept), 8 (join rule ``allow``),
9 (``join_authorised_via_users_server``) and 11 (the whole
``m.room.create`` content, power levels' ``invite``, the signed part of a
member's ``third_party_invite``, a redaction's ``redacts``).

A room version this module does not know (a newer or an unstable one) is
treated like the newest it knows, taking its number from the name when it
ends in one (``org.matrix.msc3757.10`` -> 10).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ("redacted_content",)

_NEWEST = 11
_TRAILING_NUMBER = re.compile(r"(?:^|\.)(\d+)$")

_POWER_LEVELS = (
    "ban",
    "events",
    "events_default",
    "kick",
    "redact",
    "state_default",
    "users",
    "users_default",
)


def _version_number(room_version: str | None) -> int:
    if room_version is None:
        return _NEWEST
    match = _TRAILING_NUMBER.search(room_version)
    if match is None:
        return _NEWEST
    return min(int(match.group(1)), _NEWEST) or 1


def _kept_keys(event_type: str, version: int) -> tuple[str, ...]:
    if event_type == "m.room.member":
        if version >= 9:
            return ("membership", "join_authorised_via_users_server")
        return ("membership",)
    if event_type == "m.room.create":
        return ("creator",)
    if event_type == "m.room.join_rules":
        return ("join_rule", "allow") if version >= 8 else ("join_rule",)
    if event_type == "m.room.power_levels":
        return (*_POWER_LEVELS, "invite") if version >= 11 else _POWER_LEVELS
    if event_type == "m.room.aliases":
        return ("aliases",) if version <= 5 else ()
    if event_type == "m.room.history_visibility":
        return ("history_visibility",)
    if event_type == "m.room.redaction":
        return ("redacts",) if version >= 11 else ()
    return ()


def redacted_content(
    event_type: str, content: Mapping[str, Any], room_version: str | None
) -> dict[str, Any]:
    """The part of ``content`` that survives a redaction in ``room_version``."""
    version = _version_number(room_version)
    if event_type == "m.room.create" and version >= 11:
        return dict(content)
    kept = {key: content[key] for key in _kept_keys(event_type, version) if key in content}
    if event_type == "m.room.member" and version >= 11:
        invite = content.get("third_party_invite")
        if isinstance(invite, Mapping) and "signed" in invite:
            kept["third_party_invite"] = {"signed": invite["signed"]}
    return kept
