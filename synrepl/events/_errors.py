"""Why a source could not answer: down or refused (retry), or anything else (a bug).

The split decides what the client does: :class:`EventSourceUnavailable` is
retried with backoff for ever, because positions must not move past events
that were never delivered; any other :class:`EventSourceError` is a mistake
(a wrong schema, a broken answer) that retrying will not fix.
"""

from __future__ import annotations

from collections.abc import Iterable

from synrepl.errors import SynreplError, excerpt

__all__ = ("EventSourceError", "EventSourceUnavailable", "describe_error")

#: Longest description of an underlying error that a message carries.
REASON_LIMIT = 300


class EventSourceError(SynreplError):
    """An event source failed in a way that retrying will not cure."""


class EventSourceUnavailable(EventSourceError, ConnectionError):
    """The source is down, unreachable, timed out or refused us: try again later.

    The message names the source and the reason, bounded in length and
    without any password or access token.
    """


def describe_error(error: BaseException, secrets: Iterable[str | None] = ()) -> str:
    """``"<type>: <message>"`` for ``error``, one line, secrets replaced by ``***``."""
    text = " ".join(str(error).split()) or "(no message)"
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return excerpt(f"{type(error).__name__}: {text}", REASON_LIMIT)
