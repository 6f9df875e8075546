"""Sinks from URLs: what ``synrepl export --to URL`` understands."""

from __future__ import annotations

import math
from urllib.parse import parse_qs, quote, unquote, urlsplit

from synrepl.export._sink import Sink

__all__ = ("sink_from_url", "SINK_SCHEMES")

#: The URL schemes ``sink_from_url`` knows, with what each means.
SINK_SCHEMES = {
    "redis-stream": "redis-stream://[[user]:password@]host[:port]/KEY[?db=N&maxlen=N]: XADD to KEY",
    "rediss-stream": "the same over TLS",
    "nats": "nats://host[:port]/SUBJECT[?stream=NAME&duplicate_window=SECONDS]: JetStream",
    "http": "http(s)://host[:port]/path: POST batches (a webhook)",
    "https": "the same over TLS",
}


def _options(query: str, allowed: dict[str, type], url: str) -> dict[str, object]:
    options: dict[str, object] = {}
    for name, values in parse_qs(query, keep_blank_values=True).items():
        if name not in allowed:
            raise ValueError(f"unknown option {name!r} in {url!r} (known: {', '.join(allowed)})")
        try:
            value = allowed[name](values[-1])
        except ValueError:
            raise ValueError(f"{name} in {url!r} must be a number, got {values[-1]!r}") from None
        if isinstance(value, int | float) and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} in {url!r} must be a number >= 0, got {values[-1]!r}")
        options[name] = value
    return options


def _shown(url: str) -> str:
    """``url`` as error messages may show it: a password (or a lone user
    part, which is a token in a NATS URL) as ``***``."""
    parts = urlsplit(url)
    userinfo, at, _ = parts.netloc.rpartition("@")
    if not at or not userinfo:
        return url
    user, colon, _ = userinfo.partition(":")
    hidden = f"{user}:***" if colon else "***"
    return url.replace(f"//{userinfo}@", f"//{hidden}@", 1)


def sink_from_url(url: str, *, secret: bytes | None = None, timeout: float | None = None) -> Sink:
    """The sink a URL names.

    Args:
        url: ``redis-stream://``, ``rediss-stream://``, ``nats://``,
            ``http://`` or ``https://`` (see :data:`SINK_SCHEMES`).
        secret: the webhook signing secret (webhooks only).
        timeout: seconds to wait for a connection or an acknowledgement
            (None: the sink's default, 10 s, or 30 s for a webhook).

    Raises:
        ValueError: an unknown scheme, a missing key or subject, a bad port
            or option; the message names the URL's part that is wrong (never
            a password).
    """
    parts = urlsplit(url)
    scheme = parts.scheme
    shown = _shown(url)
    if scheme not in SINK_SCHEMES:
        raise ValueError(
            f"cannot export to {shown!r}: the URL starts with one of "
            + ", ".join(f"{s}://" for s in SINK_SCHEMES)
        )
    if secret is not None and scheme not in ("http", "https"):
        raise ValueError("a signing secret is for webhooks (http:// or https://) only")
    try:
        parts.port  # noqa: B018 - it raises on a port that is not a number
    except ValueError:
        raise ValueError(f"the port in {shown!r} must be a number 0..65535") from None
    if scheme in ("http", "https"):
        import aiohttp  # noqa: F401 - the export extra, checked now rather than at the first batch

        from synrepl.export.webhook import WebhookSink

        if timeout is None:
            return WebhookSink(url, secret=secret)
        return WebhookSink(url, secret=secret, timeout=timeout)
    timeouts = {} if timeout is None else {"timeout": timeout}
    name = unquote(parts.path.lstrip("/"))
    if scheme == "nats":
        import nats  # noqa: F401 - the export extra, checked now rather than at the first batch

        from synrepl.export.jetstream import DEFAULT_DUPLICATE_WINDOW, JetStreamSink

        if not name:
            raise ValueError(f"say which subject: nats://host:port/SUBJECT, got {shown!r}")
        options = _options(parts.query, {"stream": str, "duplicate_window": float}, shown)
        return JetStreamSink(
            f"nats://{parts.netloc or '127.0.0.1:4222'}",
            name,
            stream=options.get("stream"),  # type: ignore[arg-type]
            duplicate_window=options.get("duplicate_window", DEFAULT_DUPLICATE_WINDOW),  # type: ignore[arg-type]
            **timeouts,
        )
    from synrepl.export.redis_stream import DEFAULT_MAXLEN, RedisStreamSink

    if not name:
        raise ValueError(f"say which key: redis-stream://host:port/KEY, got {shown!r}")
    options = _options(parts.query, {"db": int, "maxlen": int}, shown)
    redis_scheme = "rediss" if scheme == "rediss-stream" else "redis"
    db = options.get("db", 0)
    redis_url = f"{redis_scheme}://{parts.netloc or '127.0.0.1:6379'}/{quote(str(db))}"
    return RedisStreamSink(
        redis_url,
        name,
        maxlen=options.get("maxlen", DEFAULT_MAXLEN),  # type: ignore[arg-type]
        **timeouts,
    )
