"""Words for what is wrong with a file, shared by the readers of config files,
checkpoints and dead letters, so that each says it the same way."""

from __future__ import annotations

import stat

__all__ = ("file_kind", "os_reason")


def file_kind(mode: int) -> str | None:
    """None for a regular file, else what it is, in words."""
    if stat.S_ISREG(mode):
        return None
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "a special file"


def os_reason(error: OSError) -> str:
    """The operating system's words for a failure (never the path: callers name it)."""
    return error.strerror or type(error).__name__
