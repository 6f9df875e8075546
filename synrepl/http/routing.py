"""Pick the instance to call for an endpoint, the way Synapse's callers do.

Pure: a function of the endpoint's :class:`~synrepl.http.endpoints.Route`,
the configuration (``stream_writers``) and the call's arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from synrepl.config import SynapseConfig
from synrepl.http.endpoints import EDU_WRITER_KEYS, Endpoint
from synrepl.http.errors import RequestArgumentError
from synrepl.sharding import MAIN_INSTANCE_NAME

__all__ = ("route_instance",)


def route_instance(endpoint: Endpoint, config: SynapseConfig, args: Mapping[str, Any]) -> str:
    """The instance that must receive ``endpoint`` called with ``args``.

    Where Synapse picks at random among several writers, this takes the
    first, which Synapse accepts too.

    Raises:
        RequestArgumentError: the endpoint has no fixed rule (the caller must
            name the instance), or the arguments that decide are missing.
    """
    route = endpoint.route
    if route.kind == "main":
        return MAIN_INSTANCE_NAME
    if route.kind == "writer":
        assert route.writer_key is not None
        return config.stream_writers.for_key(route.writer_key)[0]
    if route.kind == "event_persister":
        room_id = _room_of(endpoint, route.room_from, args)
        return config.stream_writers.event_persister_for_room(room_id)
    if route.kind == "edu":
        edu_type = args.get("edu_type")
        if not isinstance(edu_type, str):
            raise RequestArgumentError(endpoint.name, "must be a string", "edu_type")
        key = EDU_WRITER_KEYS.get(edu_type)
        return MAIN_INSTANCE_NAME if key is None else config.stream_writers.for_key(key)[0]
    raise RequestArgumentError(
        endpoint.name, f"no fixed instance for this endpoint; name {route.why}"
    )


def _room_of(endpoint: Endpoint, room_from: str | None, args: Mapping[str, Any]) -> str:
    if room_from == "events":
        events = args.get("events")
        try:
            room_id = events[0]["event"]["room_id"]  # type: ignore[index]
        except (TypeError, KeyError, IndexError):
            room_id = None
        if not isinstance(room_id, str):
            raise RequestArgumentError(
                endpoint.name,
                "cannot tell the room: the first event has no event.room_id; name the instance",
                "events",
            ) from None
        return room_id
    assert room_from is not None
    room_id = args.get(room_from)
    if not isinstance(room_id, str):
        raise RequestArgumentError(endpoint.name, "must be a string", room_from)
    return room_id
