"""Where and how to connect on asyncio: TCP, TLS (from
:func:`synrepl.connection.tls_settings`) or a unix socket."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from synrepl.config import RedisConfig
from synrepl.connection import TransportOptions, tls_settings

__all__ = ("Opener", "make_opener")

#: Opens one connection for a protocol factory, on the running loop.
Opener = Callable[[Callable[[], asyncio.Protocol]], Awaitable[object]]


def make_opener(redis: RedisConfig, options: TransportOptions) -> Opener:
    """How to open a connection to ``redis``; TLS files are read here, once,
    so a bad one fails at once.

    Raises:
        ConfigError: a TLS file cannot be read or holds no certificate/key.
    """
    tls = tls_settings(redis, options.tls_verify)
    path = redis.path
    if path:

        async def open_unix(factory: Callable[[], asyncio.Protocol]) -> object:
            return await asyncio.get_running_loop().create_unix_connection(factory, path)

        return open_unix
    host, port = redis.host, redis.port
    if tls is None:

        async def open_tcp(factory: Callable[[], asyncio.Protocol]) -> object:
            return await asyncio.get_running_loop().create_connection(factory, host, port)

        return open_tcp
    context = tls.ssl_context()
    server_name = tls.server_name

    async def open_tls(factory: Callable[[], asyncio.Protocol]) -> object:
        return await asyncio.get_running_loop().create_connection(
            factory,
            host,
            port,
            ssl=context,
            server_hostname=server_name,
            ssl_handshake_timeout=options.connect_timeout,
            ssl_shutdown_timeout=options.connect_timeout,
        )

    return open_tls
