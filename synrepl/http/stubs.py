"""The hand-written part of the typed stubs.

:class:`StubBase` is what every adapter implements (one method,
:meth:`StubBase._send_call`); the generated
:class:`~synrepl.http.ReplicationStubs` adds one typed method per endpoint on
top of it, and :meth:`StubBase.get_repl_stream_updates` is the one stub with a
signature of its own (positional, ``stream`` for Synapse's ``stream_name``),
which the position bookkeeping calls to fill gaps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from synrepl.http.endpoints import ENDPOINTS, Endpoint
from synrepl.http.requests import ReplicationResponse, parse_result
from synrepl.http.results import StreamUpdates, parse_stream_updates

__all__ = ("StubBase",)

_T = TypeVar("_T")


class StubBase:
    """Typed calls over one abstract primitive, :meth:`_send_call`."""

    async def _send_call(
        self, endpoint: Endpoint, instance: str | None, args: Mapping[str, Any]
    ) -> ReplicationResponse:
        """Send one call and return its answer, after read-after-write.

        ``instance`` None means: route it by the endpoint's rule.
        """
        raise NotImplementedError

    async def _typed_call(
        self,
        name: str,
        instance: str | None,
        args: Mapping[str, Any],
        parser: Callable[[Mapping[str, Any]], _T],
    ) -> _T:
        response = await self._send_call(ENDPOINTS[name], instance, args)
        return parse_result(response, parser)

    async def get_repl_stream_updates(
        self, instance: str, stream: str, from_token: int, upto_token: int
    ) -> StreamUpdates:
        """One page of the rows ``instance`` wrote to ``stream``,
        ``from_token < token <= upto_token``.

        ``GET /_synapse/replication/get_repl_stream_updates/<stream>/<txn_id>``
        with ``from_token`` and ``upto_token`` as query parameters. Send it to
        the writer whose rows are wanted. The answer does not wait for stream
        positions (Synapse's ``WAIT_FOR_STREAMS`` is off: this call is how a
        process catches up).

        Returns:
            The page; while its ``limited`` is true, call again from its
            ``upto_token``.

        Raises:
            HttpReplicationError: 400 for a stream the writer does not know.
        """
        args = {"stream_name": stream, "from_token": from_token, "upto_token": upto_token}
        return await self._typed_call(
            "get_repl_stream_updates", instance, args, parse_stream_updates
        )
