"""synrepl._json reads and writes JSON exactly as Synapse's encoder/decoder do."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given

from synrepl import _json
from synrepl.testing import strategies as rs


@pytest.mark.parametrize(
    "text",
    [
        "123456789012345678901234567890",  # beyond 64 bits: orjson would give a float
        "[18446744073709551616, -18446744073709551617]",
        "-9223372036854775809",  # 19 digits, just below int64: orjson gives a float
        '{"_INT_STREAM_POS": {"events": -9223372036854775809}}',
        '{"big": 99999999999999999999}',
        '"\\ud800"',  # lone surrogate escape: orjson refuses, Synapse accepts
        "1e400",  # overflows to inf in the stdlib, as in Synapse
        '["x\\u00e9\\ud83d\\ude00"]',
    ],
)
def test_decodes_like_the_standard_library(text: str) -> None:
    """Where orjson would differ, the standard library's answer is used."""
    expected = json.loads(text)
    got = _json.loads(text)
    assert got == expected or (isinstance(got, float) and math.isinf(got))
    assert type(got) is type(expected)


@pytest.mark.parametrize("text", ["NaN", "[Infinity]", "-Infinity", "[1,", ""])
def test_refuses_what_synapse_refuses(text: str) -> None:
    """NaN/Infinity literals and broken JSON raise ValueError."""
    with pytest.raises(ValueError):
        _json.loads(text)


def test_encodes_synapse_bytes() -> None:
    """Compact separators, ASCII escapes (surrogate pairs for emoji), no NaN."""
    assert _json.dumps({"a": [1, "é😀"]}) == '{"a":[1,"\\u00e9\\ud83d\\ude00"]}'
    with pytest.raises(ValueError):
        _json.dumps([float("nan")])


@given(rs.json_values())
def test_round_trip(value: object) -> None:
    """dumps then loads gives the value back, and matches the stdlib encoder."""
    text = _json.dumps(value)
    assert text == json.dumps(value, separators=(",", ":"), allow_nan=False)
    assert _json.loads(text) == value
