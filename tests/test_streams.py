"""Row parsers: the fast path (orjson's answer as it comes) never disagrees with
the exact one, and every generated parser can be told apart in a profile."""

from __future__ import annotations

import linecache
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from synrepl import _json
from synrepl.streams import EVENTS_ROW_TYPES, ROW_TYPES, STREAM_NAMES, Row, _registry
from synrepl.streams._registry import FAST_ROW_PARSERS, ROW_PARSERS
from synrepl.streams._row import stream_row
from synrepl.testing import strategies as rs


def _same(a: Any, b: Any) -> bool:
    """Equal, with equal types all the way down (``1`` is not ``True``)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def _fast_agrees_with_exact(stream: str, text: str) -> None:
    """Wherever the fast parser vouches for a row, the exact decode and parse
    give the very same row; it may decline (None), never differ."""
    try:
        fast = FAST_ROW_PARSERS[stream](orjson.loads(text))
    except orjson.JSONDecodeError:
        return  # orjson refuses: the exact path decides alone
    if fast is None:
        return
    exact = ROW_PARSERS[stream](_json.loads(text))
    assert _same(fast, exact), (stream, text, fast, exact)


@given(rs.any_rows(extras=True))
def test_fast_rows_match_exact_rows(pair: tuple[str, Any]) -> None:
    """Generated rows of every stream: the fast path's row is the exact one."""
    stream, row = pair
    if stream in FAST_ROW_PARSERS:
        _fast_agrees_with_exact(stream, _json.dumps(row.to_raw()))


# Values that orjson reads differently from Synapse's decoder, or that only
# look alike: a big integer comes back from orjson as a float.
_TRICKY = ("18446744073709551616", "-9223372036854775809", "1.5", "1e2", "0.0", "-0", "1", "0")


@pytest.mark.parametrize("value", _TRICKY)
@pytest.mark.parametrize(
    ("stream", "template"),
    [
        ("caches", '["get_user",["@a:x",{v}],1]'),
        ("caches", '["get_user",["@a:x",[{v}]],1]'),
        ("caches", '["get_user",null,{v}]'),
        ("receipts", '["!r:x","m.read","@a:x","$e",null,{{"ts":{v}}}]'),
        ("receipts", '["!r:x","m.read","@a:x","$e",null,{{"ts":{{"n":{v}}}}}]'),
        ("federation", '["t",{{"a":[{v}],"b":{v}}}]'),
        ("presence", '["@a:x","online",{v},2,3,null,true]'),
        ("presence", '["@a:x","online",1,2,3,null,{v}]'),
        ("events", '["ev",["$e","!r","t",null,null,null,null,{v},0]]'),
        ("events", '["state",["!r","t","k",null],{v}]'),
        ("pushers", '["@a:x","app","key",{v}]'),
    ],
)
def test_fast_path_declines_what_it_cannot_vouch_for(
    stream: str, template: str, value: str
) -> None:
    """Big integers, floats and nested values in free-form JSON, and 0/1 in
    booleans: the fast row equals the exact one, or the fast path declines."""
    _fast_agrees_with_exact(stream, template.format(v=value))


def test_free_form_floats_take_the_exact_path() -> None:
    """A big integer that orjson reads as a float inside free-form JSON is not
    taken from the fast path: the exact path keeps the integer."""
    text = '["get_user",["@a:x",18446744073709551616],1]'
    assert FAST_ROW_PARSERS["caches"](orjson.loads(text)) is None
    row = ROW_PARSERS["caches"](_json.loads(text))
    assert row.keys == ("@a:x", 18446744073709551616)  # type: ignore[union-attr]


@given(st.sampled_from(STREAM_NAMES), rs.json_values())
def test_fast_parsers_decline_or_agree_on_any_json(stream: str, value: Any) -> None:
    """Arbitrary JSON where a row belongs: the fast parser declines or agrees."""
    _fast_agrees_with_exact(stream, _json.dumps(value))


def _parsers() -> dict[str, Any]:
    named: dict[str, Any] = {}
    for cls in (*ROW_TYPES.values(), *EVENTS_ROW_TYPES.values()):
        what = f"{cls.STREAM} {cls.TYPE_ID}" if cls.TYPE_ID else cls.STREAM
        named[f"{what} parser"] = cls.from_raw
        named[f"{what} fast parser"] = cls.from_fast_raw  # type: ignore[attr-defined]
        named[f"{what} constructor"] = cls.__new__
    named["events kinds parser"] = _registry._parse_events_kind
    named["events kinds fast parser"] = FAST_ROW_PARSERS["events"]
    return named


def test_generated_parsers_have_distinct_file_names() -> None:
    """Every generated function has its own ``<synrepl.streams generated: ...>``
    file name (profiles tell them apart) and its source in linecache."""
    names = {}
    for what, function in _parsers().items():
        filename = function.__code__.co_filename
        assert filename == f"<synrepl.streams generated: {what}>"
        assert linecache.getline(filename, 1).startswith("def ")
        names[what] = filename
    assert len(set(names.values())) == len(names)


def test_rows_are_still_immutable_tuples() -> None:
    """The parsers build plain Row tuples: typed, immutable, equal by value,
    with no instance dict (nothing can be added to a row either)."""
    row = FAST_ROW_PARSERS["typing"](["!r:x", ["@a:x"]])
    assert isinstance(row, Row) and isinstance(row, tuple)
    assert row == ROW_TYPES["typing"]("!r:x", ("@a:x",))
    assert not hasattr(row, "__dict__")
    with pytest.raises(AttributeError):
        row.room_id = "!other:x"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        row.note = "mine"  # type: ignore[attr-defined]


def test_row_types_must_be_slotted() -> None:
    """stream_row refuses a row class that would give each row a dict."""
    with pytest.raises(TypeError, match="__slots__"):

        @stream_row("made_up")
        class _Unslotted(Row):
            room_id: str
