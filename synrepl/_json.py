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
from typing import Any

import orjson

__all__ = ("loads", "dumps")

# orjson turns integers outside [-2**63, 2**64) into floats; the shortest is
# -9223372036854775809, 19 digits.  To spot a run of 19 digits fast, map every
# digit byte to "9" and every other byte to "x", then search for nineteen
# nines: two C-level passes, no regex engine.
_DIGITS_AS_NINES = bytes(0x39 if 0x30 <= i <= 0x39 else 0x78 for i in range(256))
_LONG_DIGITS = b"9" * 19


def _reject_constant(name: str) -> Any:
    raise ValueError(f"JSON constant {name} is not allowed")


_std_decoder = json.JSONDecoder(parse_constant=_reject_constant)
_std_encoder = json.JSONEncoder(allow_nan=False, separators=(",", ":"))

_orjson_loads = orjson.loads
_OrjsonError = orjson.JSONDecodeError


def loads(text: str) -> Any:
    """Decode JSON text; raise ``ValueError`` on anything Synapse would refuse."""
    try:
        data = text.encode()
    except UnicodeEncodeError:  # lone surrogates: only the stdlib reads them
        return _std_decoder.decode(text)
    if data.translate(_DIGITS_AS_NINES).find(_LONG_DIGITS) < 0:
        try:
            return _orjson_loads(data)
        except _OrjsonError:
            pass  # the standard library decides, with Synapse's rules
    return _std_decoder.decode(text)


def loads_fast(text: str) -> Any:
    """Like :func:`loads`, but an integer beyond 64 bits may come back as a float.

    For callers that check every value's type afterwards: a float where an
    integer belongs fails that check, and they then call :func:`loads`.
    """
    try:
        return _orjson_loads(text)
    except _OrjsonError:
        return _std_decoder.decode(text)


def dumps(value: Any) -> str:
    """Encode ``value`` exactly as Synapse's replication encoder would.

    Raises ``ValueError`` for NaN/Infinity and ``TypeError`` for values JSON
    cannot hold.
    """
    return _std_encoder.encode(value)
