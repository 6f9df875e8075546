"""Full events over Synapse's admin API, when no database access is possible.

``GET /_synapse/admin/v1/fetch_event/{event_id}`` with a server admin's
access token answers ``{"event": {...}}`` (the event as stored, with
``unsigned``), or 404 ``M_NOT_FOUND`` for an event the server does not
have.  The room version comes from ``GET /_synapse/admin/v1/rooms/{room_id}``
(its ``version``),
asked once per room and remembered.

What this source cannot know, and so reports as False: whether an event was
rejected (Synapse answers 404 for rejected events, which therefore end up
"missing"), whether it is an outlier, and whether it was redacted (the
answer carries the content as stored, unredacted until Synapse censors it
after ``redaction_retention_period``; follow the ``redacts`` of the events
stream to honour redactions).

There is one request per event, sent one after the other over one
keep-alive connection: the batch takes as long as its events together, and
the homeserver never sees more than one request from this source at a time.
"""

from __future__ import annotations

import http.client
import ssl
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Self
from urllib.parse import quote, urlsplit

from synrepl import _json
from synrepl.config import Secret
from synrepl.events._database import event_from_pdu
from synrepl.events._errors import EventSourceError, EventSourceUnavailable, describe_error
from synrepl.events._model import FullEvent
from synrepl.releases import ADMIN_FETCH_EVENT_SINCE, release_in_server_header

__all__ = ("AdminApiEventSource",)

#: Rooms whose version is remembered (the least recently used are forgotten).
ROOM_VERSION_CACHE = 4096

#: The largest answer read (Synapse caps events at 64 KiB; unsigned adds some).
MAX_ANSWER = 1 << 20


class _Answer:
    __slots__ = ("body", "server", "status")

    def __init__(self, status: int, body: Any, server: str | None = None) -> None:
        self.status = status
        self.body = body
        #: the ``Server`` header: which Synapse release answered
        self.server = server

    @property
    def errcode(self) -> object:
        return self.body.get("errcode") if isinstance(self.body, dict) else None


class AdminApiEventSource:
    """Events from Synapse's admin API, one request at a time.

    Args:
        base_url: where the main process serves the client API with the
            admin resource (``http://127.0.0.1:8008``).
        access_token: a server admin's access token (a ``str`` or a
            :class:`~synrepl.config.Secret`); never logged.
        timeout: seconds for connecting and for each answer.

    Raises:
        ValueError: the URL is not ``http(s)://host[:port][/prefix]``, the
            token is empty, or the timeout is not positive.
    """

    def __init__(self, base_url: str, access_token: str | Secret, *, timeout: float = 10.0) -> None:
        token = access_token.reveal() if isinstance(access_token, Secret) else access_token
        if not isinstance(token, str) or not token:
            raise ValueError("AdminApiEventSource needs a server admin's access token")
        if not timeout > 0:
            raise ValueError(f"timeout must be more than 0, got {timeout!r}")
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"admin API base URL must be http(s)://host[:port], got {base_url!r}")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("admin API base URL must not carry a query, fragment or credentials")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")
        self._token = token
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self._versions: OrderedDict[str, str | None] = OrderedDict()
        self._closed = False

    def __repr__(self) -> str:
        return f"AdminApiEventSource({self.base_url!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- HTTP

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._https:
                self._conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=self.timeout,
                    context=ssl.create_default_context(),
                )  # fmt: skip
            else:
                self._conn = http.client.HTTPConnection(
                    self._host, self._port, timeout=self.timeout
                )
        return self._conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _unavailable(self, what: str, reason: str) -> EventSourceUnavailable:
        return EventSourceUnavailable(f"{self!r}: {what}: {reason}")

    def _get(self, path: str) -> _Answer:
        """One GET; a connection the server closed while idle is re-made once."""
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        for attempt in (1, 2):
            conn = self._connection()
            try:
                conn.request("GET", self._prefix + path, headers=headers)
                response = conn.getresponse()
                raw = response.read(MAX_ANSWER + 1)
                if response.will_close:
                    self._drop()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                self._drop()
                if attempt == 1:
                    continue
                raise self._unavailable(path, describe_error(e, [self._token])) from None
            except (OSError, http.client.HTTPException) as e:  # refused, timed out, TLS, ...
                self._drop()
                raise self._unavailable(path, describe_error(e, [self._token])) from None
            break
        if len(raw) > MAX_ANSWER:
            self._drop()
            raise EventSourceError(f"{self!r}: {path}: answer larger than {MAX_ANSWER} bytes")
        try:
            body = _json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            body = None
        return _Answer(response.status, body, response.getheader("Server"))

    def _check(self, path: str, answer: _Answer) -> None:
        """Raise for any answer other than 200 or a plain "not found"."""
        status = answer.status
        if status == 200 and isinstance(answer.body, dict):
            return
        if status == 404 and answer.errcode == "M_NOT_FOUND":
            return
        detail = f"HTTP {status}" + (f" {answer.errcode}" if answer.errcode else "")
        if status in (401, 403):
            raise self._unavailable(path, f"{detail}: the access token is not a server admin's")
        if status == 404:
            release = release_in_server_header(answer.server)
            if release is not None and release < ADMIN_FETCH_EVENT_SINCE:
                raise EventSourceError(
                    f"{self!r}: Synapse {release} has no admin API to fetch an event "
                    f"(it came in {ADMIN_FETCH_EVENT_SINCE}): read events from the database instead"
                )
            raise self._unavailable(path, f"{detail}: is the admin API served at {self.base_url}?")
        if status == 429 or status >= 500:
            raise self._unavailable(path, detail)
        raise EventSourceError(f"{self!r}: {path}: unexpected answer {detail}")

    # --- the source

    def _room_version(self, room_id: str) -> str | None:
        if room_id in self._versions:
            self._versions.move_to_end(room_id)
            return self._versions[room_id]
        path = "/_synapse/admin/v1/rooms/" + quote(room_id, safe="")
        answer = self._get(path)
        self._check(path, answer)
        version = answer.body.get("version") if answer.status == 200 else None
        version = version if isinstance(version, str) else None
        self._versions[room_id] = version
        if len(self._versions) > ROOM_VERSION_CACHE:
            self._versions.popitem(last=False)
        return version

    def _fetch_one(self, event_id: str) -> FullEvent | None:
        path = "/_synapse/admin/v1/fetch_event/" + quote(event_id, safe="")
        answer = self._get(path)
        self._check(path, answer)
        if answer.status == 404:
            return None
        pdu = answer.body.get("event")
        if not isinstance(pdu, dict) or not isinstance(pdu.get("room_id"), str):
            raise EventSourceError(f"{self!r}: {path}: the answer holds no event")
        unsigned = pdu.get("unsigned")
        redacted_by = unsigned.get("redacted_by") if isinstance(unsigned, dict) else None
        redacted = isinstance(unsigned, dict) and "redacted_because" in unsigned
        return event_from_pdu(
            pdu,
            event_id=event_id,
            room_version=self._room_version(pdu["room_id"]),
            redacted=redacted,
            redacted_by=redacted_by if isinstance(redacted_by, str) else None,
        )

    def fetch(self, event_ids: Sequence[str]) -> dict[str, FullEvent]:
        """The events found, asked for one by one; unknown events are left out."""
        with self._lock:
            if self._closed:
                raise EventSourceError(f"{self!r} is closed")
            found: dict[str, FullEvent] = {}
            for event_id in dict.fromkeys(event_ids):
                event = self._fetch_one(event_id)
                if event is not None:
                    found[event_id] = event
            return found

    def positions(self) -> dict[str, dict[str, int]]:
        """Always ``{}``: the admin API does not tell stream positions."""
        return {}

    def close(self) -> None:
        """Close the keep-alive connection; later fetches raise EventSourceError."""
        with self._lock:
            self._closed = True
            self._drop()
