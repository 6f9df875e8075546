"""One exception hierarchy for everything synrepl raises on purpose.

Callers that read from the wire catch :class:`ProtocolError` and skip the
line; callers that load configuration catch :class:`ConfigError` and stop.
Both derive from :class:`SynreplError` so that one ``except`` covers all.
"""

from __future__ import annotations

import reprlib

__all__ = (
    "SynreplError",
    "ProtocolError",
    "MalformedCommandError",
    "UnknownCommandError",
    "MalformedRowError",
    "EncodeError",
    "ConfigError",
)

#: Longest excerpt of an offending line or row that an error message carries.
EXCERPT_LIMIT = 200


def excerpt(text: str, limit: int = EXCERPT_LIMIT) -> str:
    """Shorten ``text`` for an error message so a huge line cannot flood logs."""
    if len(text) <= limit:
        return text
    return text[:limit] + f"... ({len(text) - limit} more chars)"


_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxtuple = _REPR.maxlist = _REPR.maxset = _REPR.maxfrozenset = _REPR.maxdict = 6
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlong = 40

#: The longest repr of a user's value that an error message shows.
SHOWN_LIMIT = 120


def shown(value: object) -> str:
    """A short repr of a user's value for an error message.

    reprlib stops after a few items and levels, so even a structure built of
    shared references (a YAML alias bomb) costs next to nothing.
    """
    return excerpt(_REPR.repr(value), SHOWN_LIMIT)


class SynreplError(Exception):
    """Base of every error that synrepl raises deliberately."""


class ProtocolError(SynreplError, ValueError):
    """Something on (or destined for) the replication wire is not valid."""


class MalformedCommandError(ProtocolError):
    """A line names a known command but its arguments do not parse.

    Attributes:
        command: the command name taken from the line (``"RDATA"``, ...).
        reason: what was wrong, in words.
        line: the offending line, truncated to a readable length.
    """

    def __init__(self, command: str, reason: str, line: str) -> None:
        self.command = command
        self.reason = reason
        self.line = excerpt(line)
        super().__init__(f"malformed {command} command: {reason}: {self.line!r}")


class UnknownCommandError(ProtocolError):
    """A line's command name is not one synrepl knows.

    A newer Synapse may have added it; callers usually count and skip these.

    Attributes:
        name: the unknown command name.
        line: the offending line, truncated.
    """

    def __init__(self, name: str, line: str) -> None:
        self.name = excerpt(name, 60)
        self.line = excerpt(line)
        super().__init__(f"unknown command {self.name!r}: {self.line!r}")


class MalformedRowError(ProtocolError):
    """A stream row does not fit the row type of its stream.

    Attributes:
        stream: the stream name.
        reason: what was wrong (missing field, wrong type, ...).
        row: a truncated rendering of the raw row.
    """

    def __init__(self, stream: str, reason: str, row: object) -> None:
        self.stream = stream
        self.reason = reason
        self.row = excerpt(repr(row))
        super().__init__(f"malformed {stream} row: {reason}: {self.row}")


class EncodeError(ProtocolError):
    """A command cannot be put on the wire (for example it contains a newline)."""


class ConfigError(SynreplError, ValueError):
    """Synapse configuration is missing, wrong or inconsistent.

    Attributes:
        path: the key path in the configuration, e.g. ``("redis", "port")``.
        message: what is wrong and what to do about it.
    """

    def __init__(self, message: str, path: tuple[str, ...] = ()) -> None:
        self.path = path
        self.message = message
        where = ".".join(path)
        super().__init__(f"{where}: {message}" if where else message)
