"""The pure-Python RESP2 reader (:mod:`synrepl._resp`), with txredisapi's errors.

Used instead of txredisapi's own line parser, which pauses and resumes the
transport by itself and so cannot honour ``pause_reading()``.
"""

from __future__ import annotations

import txredisapi  # type: ignore[import-untyped]

from synrepl import _resp

__all__ = ("PythonReader",)


class PythonReader(_resp.PythonReader):
    """:class:`synrepl._resp.PythonReader` making ``txredisapi.ResponseError``
    for error replies and raising ``txredisapi.InvalidData``, as txredisapi's
    hiredis reader does."""

    def __init__(self) -> None:
        super().__init__(protocolError=txredisapi.InvalidData, replyError=txredisapi.ResponseError)
