"""A small Matrix client-API client for driving Synapse in the interop suite.

It runs on the reactor (treq), so that the synrepl client under test keeps
receiving while a request is in flight.  Requests are routed as a reverse
proxy in front of a worker deployment would route them (Synapse's worker
documentation): typing to the typing writer; to-device, account data, tags,
receipts and presence to their stream writer; everything else to the main
process.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

import attrs
import treq
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.web.client import Agent, HTTPConnectionPool

_txn = itertools.count()

Route = Callable[[str], str]


def q(value: str) -> str:
    return quote(value, safe="")


class MatrixError(AssertionError):
    def __init__(self, method: str, path: str, code: int, body: Any) -> None:
        super().__init__(f"{method} {path} -> {code}: {body}")
        self.code = code
        self.body = body


def main_only_route(urls: Mapping[str, str]) -> Route:
    return lambda path: urls["master"]


# (pattern, instance) in the order a reverse proxy would try them.
_CLUSTER_ROUTES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), instance)
    for p, instance in [
        (r"^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/typing", "typing1"),
        (r"^/_matrix/client/(r0|v3|unstable)/sendToDevice/", "writer1"),
        (r"^/_matrix/client/(r0|v3|unstable)/.*/tags", "writer1"),
        (r"^/_matrix/client/(r0|v3|unstable)/.*/account_data", "writer1"),
        (r"^/_matrix/client/(r0|v3|unstable)/rooms/.*/receipt", "writer1"),
        (r"^/_matrix/client/(r0|v3|unstable)/rooms/.*/read_markers", "writer1"),
        (r"^/_matrix/client/(api/v1|r0|v3|unstable)/presence/", "writer1"),
    ]
]


def cluster_route(urls: Mapping[str, str]) -> Route:
    def route(path: str) -> str:
        for pattern, instance in _CLUSTER_ROUTES:
            if pattern.match(path):
                return urls[instance]
        return urls["master"]

    return route


class Api:
    """Unauthenticated access to one deployment's client API."""

    def __init__(self, route: Route) -> None:
        self.route = route
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 8
        self._pool = pool
        self._http = HTTPClient(Agent(reactor, pool=pool))  # type: ignore[arg-type]

    async def close(self) -> None:
        await self._pool.closeCachedConnections()

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        params: Mapping[str, str] | None = None,
        ok: tuple[int, ...] = (200,),
    ) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        kwargs: dict[str, Any] = {"headers": headers, "timeout": 60}
        if body is not None:
            kwargs["json"] = body
        if params:
            kwargs["params"] = dict(params)
        response = await self._http.request(method, self.route(path) + path, **kwargs)
        content = await treq.json_content(response) if response.code != 204 else {}
        if response.code not in ok:
            raise MatrixError(method, path, response.code, content)
        return content

    async def register(self, localpart: str, password: str = "interop-password") -> User:
        path = "/_matrix/client/v3/register"
        body: dict[str, Any] = {
            "username": localpart,
            "password": password,
            "initial_device_display_name": f"{localpart} first device",
        }
        first = await self.request("POST", path, body, ok=(200, 401))
        if "access_token" not in first:
            body["auth"] = {"type": "m.login.dummy", "session": first["session"]}
            first = await self.request("POST", path, body)
        return User(self, first["user_id"], first["device_id"], first["access_token"], password)

    async def login(self, user_id: str, password: str) -> User:
        answer = await self.request(
            "POST",
            "/_matrix/client/v3/login",
            {
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": user_id},
                "password": password,
            },
        )
        return User(self, answer["user_id"], answer["device_id"], answer["access_token"], password)


@attrs.define
class User:
    """A logged-in device of one user."""

    api: Api
    user_id: str
    device_id: str
    access_token: str = attrs.field(repr=False)
    password: str = attrs.field(repr=False)

    async def call(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        return await self.api.request(method, path, body, token=self.access_token, **kwargs)

    # --- rooms and events

    async def create_room(self, **options: Any) -> str:
        answer = await self.call("POST", "/_matrix/client/v3/createRoom", options)
        return str(answer["room_id"])

    async def join(self, room_id: str) -> str:
        answer = await self.call("POST", f"/_matrix/client/v3/join/{q(room_id)}", {})
        return str(answer["room_id"])

    async def send(
        self, room_id: str, content: Mapping[str, Any], type: str = "m.room.message"
    ) -> str:
        path = f"/_matrix/client/v3/rooms/{q(room_id)}/send/{q(type)}/interop{next(_txn)}"
        answer = await self.call("PUT", path, dict(content))
        return str(answer["event_id"])

    async def message(self, room_id: str, text: str) -> str:
        return await self.send(room_id, {"msgtype": "m.text", "body": text})

    async def edit(self, room_id: str, original: str, text: str) -> str:
        return await self.send(
            room_id,
            {
                "msgtype": "m.text",
                "body": f"* {text}",
                "m.new_content": {"msgtype": "m.text", "body": text},
                "m.relates_to": {"rel_type": "m.replace", "event_id": original},
            },
        )

    async def redact(self, room_id: str, event_id: str, reason: str = "interop") -> str:
        path = f"/_matrix/client/v3/rooms/{q(room_id)}/redact/{q(event_id)}/interop{next(_txn)}"
        answer = await self.call("PUT", path, {"reason": reason})
        return str(answer["event_id"])

    async def set_state(
        self, room_id: str, type: str, content: Mapping[str, Any], state_key: str = ""
    ) -> str:
        path = f"/_matrix/client/v3/rooms/{q(room_id)}/state/{q(type)}/{q(state_key)}"
        answer = await self.call("PUT", path, dict(content))
        return str(answer["event_id"])

    async def state(self, room_id: str) -> list[dict[str, Any]]:
        return list(await self.call("GET", f"/_matrix/client/v3/rooms/{q(room_id)}/state"))

    async def messages(self, room_id: str) -> list[dict[str, Any]]:
        """Every event of the room's timeline, oldest first (all pages)."""
        events: list[dict[str, Any]] = []
        params = {"dir": "b", "limit": "1000"}
        while True:
            page = await self.call(
                "GET", f"/_matrix/client/v3/rooms/{q(room_id)}/messages", params=params
            )
            events.extend(page.get("chunk", []))
            if not page.get("end") or not page.get("chunk"):
                break
            params = {"dir": "b", "limit": "1000", "from": page["end"]}
        return list(reversed(events))

    # --- ephemeral and per-user data

    async def typing(self, room_id: str, typing: bool) -> None:
        path = f"/_matrix/client/v3/rooms/{q(room_id)}/typing/{q(self.user_id)}"
        body: dict[str, Any] = {"typing": typing}
        if typing:
            body["timeout"] = 30_000
        await self.call("PUT", path, body)

    async def receipt(self, room_id: str, event_id: str, type: str = "m.read") -> None:
        path = f"/_matrix/client/v3/rooms/{q(room_id)}/receipt/{q(type)}/{q(event_id)}"
        await self.call("POST", path, {})

    async def set_presence(self, presence: str, status_msg: str | None = None) -> None:
        body: dict[str, Any] = {"presence": presence}
        if status_msg is not None:
            body["status_msg"] = status_msg
        await self.call("PUT", f"/_matrix/client/v3/presence/{q(self.user_id)}/status", body)

    async def presence_of(self, user_id: str) -> dict[str, Any]:
        return dict(await self.call("GET", f"/_matrix/client/v3/presence/{q(user_id)}/status"))

    async def set_account_data(self, type: str, content: Mapping[str, Any]) -> None:
        path = f"/_matrix/client/v3/user/{q(self.user_id)}/account_data/{q(type)}"
        await self.call("PUT", path, dict(content))

    async def get_account_data(self, type: str) -> dict[str, Any]:
        path = f"/_matrix/client/v3/user/{q(self.user_id)}/account_data/{q(type)}"
        return dict(await self.call("GET", path))

    async def set_room_account_data(
        self, room_id: str, type: str, content: Mapping[str, Any]
    ) -> None:
        path = (
            f"/_matrix/client/v3/user/{q(self.user_id)}/rooms/{q(room_id)}/account_data/{q(type)}"
        )
        await self.call("PUT", path, dict(content))

    async def add_tag(self, room_id: str, tag: str, order: float) -> None:
        path = f"/_matrix/client/v3/user/{q(self.user_id)}/rooms/{q(room_id)}/tags/{q(tag)}"
        await self.call("PUT", path, {"order": order})

    async def tags(self, room_id: str) -> dict[str, Any]:
        path = f"/_matrix/client/v3/user/{q(self.user_id)}/rooms/{q(room_id)}/tags"
        return dict((await self.call("GET", path))["tags"])

    async def send_to_device(self, type: str, messages: Mapping[str, Mapping[str, Any]]) -> None:
        path = f"/_matrix/client/v3/sendToDevice/{q(type)}/interop{next(_txn)}"
        await self.call("PUT", path, {"messages": dict(messages)})

    async def set_push_rule(self, rule_id: str, pattern: str) -> None:
        path = f"/_matrix/client/v3/pushrules/global/content/{q(rule_id)}"
        await self.call("PUT", path, {"pattern": pattern, "actions": ["notify"]})

    async def set_displayname(self, name: str) -> None:
        path = f"/_matrix/client/v3/profile/{q(self.user_id)}/displayname"
        await self.call("PUT", path, {"displayname": name})
