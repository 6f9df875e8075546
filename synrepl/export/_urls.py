"""Sinks from URLs: what ``synrepl export --to URL`` understands."""

from __future__ import annotations

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
            options[name] = allowed[name](values[-1])
        except ValueError:
            raise ValueError(f"{name} in {url!r} must be a number, got {values[-1]!r}") from None
    return options


def sink_from_url(url: str, *, secret: bytes | None = None, timeout: float = 10.0) -> Sink:
    """The sink a URL names.

    Args:
        url: ``redis-stream://``, ``rediss-stream://``, ``nats://``,
            ``http://`` or ``https://`` (see :data:`SINK_SCHEMES`).
        secret: the webhook signing secret (webhooks only).
        timeout: seconds to wait for a connection or an acknowledgement.

    Raises:
        ValueError: an unknown scheme, a missing key or subject, a bad
            option; the message names the URL's part that is wrong (never a
            password).
    """
    parts = urlsplit(url)
    scheme = parts.scheme
    shown = url if parts.password is None else url.replace(f":{parts.password}@", ":***@")
    if scheme not in SINK_SCHEMES:
        raise ValueError(
            f"cannot export to {shown!r}: the URL starts with one of "
            + ", ".join(f"{s}://" for s in SINK_SCHEMES)
        )
    if secret is not None and scheme not in ("http", "https"):
        raise ValueError("a signing secret is for webhooks (http:// or https://) only")
    if scheme in ("http", "https"):
        from synrepl.export.webhook import WebhookSink

        return WebhookSink(url, secret=secret, timeout=max(timeout, 30.0))
    name = unquote(parts.path.lstrip("/"))
    if scheme == "nats":
        from synrepl.export.jetstream import JetStreamSink

        if not name:
            raise ValueError(f"say which subject: nats://host:port/SUBJECT, got {shown!r}")
        options = _options(parts.query, {"stream": str, "duplicate_window": float}, shown)
        return JetStreamSink(
            f"nats://{parts.netloc or '127.0.0.1:4222'}",
            name,
            stream=options.get("stream"),  # type: ignore[arg-type]
            duplicate_window=options.get("duplicate_window", 86_400.0),  # type: ignore[arg-type]
            timeout=timeout,
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
        timeout=timeout,
    )
