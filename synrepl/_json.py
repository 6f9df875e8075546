"""JSON the way Synapse writes and reads it, but fast.

Synapse encodes with compact separators, ASCII-only escapes and no NaN or
Infinity, and its decoder rejects the NaN/Infinity literals.  We decode with
orjson where that gives the same answer and fall back to the standard library
where orjson would differ: integers beyond 64 bits (orjson turns them into
floats), lone surrogate escapes and out-of-range floats (orjson rejects them,
Synapse accepts them).  Encoding uses the standard library's C encoder, which
already produces Synapse's exact bytes; orjson cannot escape non-ASCII.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

__all__ = ("loads", "dumps")

# A run of 19+ digits may be an integer outside orjson's 64-bit range.
_MAYBE_BIG_INT = re.compile(r"\d{19}")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"JSON constant {name} is not allowed")


_std_decoder = json.JSONDecoder(parse_constant=_reject_constant)
_std_encoder = json.JSONEncoder(allow_nan=False, separators=(",", ":"))

_orjson_loads = orjson.loads
_OrjsonError = orjson.JSONDecodeError
_search_big_int = _MAYBE_BIG_INT.search


def loads(text: str) -> Any:
    """Decode JSON text; raise ``ValueError`` on anything Synapse would refuse."""
    if _search_big_int(text) is None:
        try:
            return _orjson_loads(text)
        except _OrjsonError:
            pass  # the standard library decides, with Synapse's rules
    return _std_decoder.decode(text)


def dumps(value: Any) -> str:
    """Encode ``value`` exactly as Synapse's replication encoder would.

    Raises ``ValueError`` for NaN/Infinity and ``TypeError`` for values JSON
    cannot hold.
    """
    return _std_encoder.encode(value)
