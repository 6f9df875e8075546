"""The base of every typed stream row, and the fast row parsers behind it.

A stream row arrives as a JSON array whose positions are the row type's
fields, in Synapse's order.  Each row class declares those fields as attrs
fields with plain type annotations; :func:`stream_row` then compiles one small
parser per class that checks every value's type, turns the 0/1 that some
databases send into booleans and lists into tuples, and keeps any trailing
values that a newer Synapse added as ``extras``.  Generated code is used
because row parsing is the hottest path in the library: one straight-line
function per row type beats a loop over converter objects by a wide margin.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ClassVar, NoReturn, TypeVar

import attrs
from typing_extensions import Self

from synrepl.errors import MalformedRowError

__all__ = ("Row", "RawRow", "stream_row")

_R = TypeVar("_R", bound="Row")


# Rows and commands keep their attributes in a __dict__ rather than slots:
# attrs' frozen __init__ then fills the dict directly, about a third faster
# than going through object.__setattr__ once per slot, on the hottest path.
@attrs.frozen(slots=False)
class Row:
    """A typed, immutable row of one replication stream.

    Attributes:
        extras: values past the fields this version of synrepl knows, kept so
            that a row from a newer Synapse loses nothing when re-encoded.
    """

    #: The replication stream this row type belongs to.
    STREAM: ClassVar[str]
    #: For ``events`` rows, the sub-row kind on the wire (``ev``, ``state``...).
    TYPE_ID: ClassVar[str | None] = None
    #: The JSON positions' field names, in wire order.
    FIELDS: ClassVar[tuple[str, ...]] = ()

    extras: tuple[Any, ...] = attrs.field(default=(), kw_only=True)

    @classmethod
    def from_raw(cls, raw: Any) -> Self:
        """Build the row from its decoded JSON array (replaced per class)."""
        raise NotImplementedError(f"{cls.__name__} is not a registered row type")

    def values(self) -> list[Any]:
        """The known fields' values in wire order (tuples stay tuples)."""
        return [getattr(self, name) for name in self.FIELDS]

    def to_raw(self) -> Any:
        """The row as the JSON value Synapse would put on the wire."""
        values = [_to_json(v) for v in self.values()]
        values.extend(self.extras)
        if self.TYPE_ID is not None:
            return [self.TYPE_ID, values]
        return values

    def as_dict(self) -> dict[str, Any]:
        """Field name -> value, for display and JSON output."""
        out = {name: _to_json(getattr(self, name)) for name in self.FIELDS}
        if self.extras:
            out["extras"] = list(self.extras)
        return out


@attrs.frozen(slots=False)
class RawRow:
    """A row synrepl could not type: an unknown stream or events sub-row kind.

    It keeps the decoded JSON as it came, so nothing is lost and the row
    re-encodes to the same value.
    """

    stream: str
    data: Any

    STREAM: ClassVar[str] = ""
    TYPE_ID: ClassVar[str | None] = None
    FIELDS: ClassVar[tuple[str, ...]] = ()

    def to_raw(self) -> Any:
        return self.data

    def as_dict(self) -> dict[str, Any]:
        return {"raw": self.data}


def _to_json(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _row_repr(self: Row) -> str:
    parts = [f"{name}={getattr(self, name)!r}" for name in self.FIELDS]
    if self.extras:
        parts.append(f"extras={self.extras!r}")
    return f"{type(self).__name__}({', '.join(parts)})"


# Per annotation: the check (and conversion) of one value, as source code.
# ``v`` is the value; ``FAIL(why)`` raises, naming the field.  Unknown annotations fail loudly
# at import time, so a new row type cannot silently skip validation.
_CHECKS: dict[str, str] = {
    "str": "if type(v) is not str: FAIL('expected a string')",
    "str | None": ("if v is not None and type(v) is not str: FAIL('expected a string or null')"),
    "int": "if type(v) is not int: FAIL('expected an integer')",
    "int | None": ("if v is not None and type(v) is not int: FAIL('expected an integer or null')"),
    "bool": (
        "if type(v) is not bool:\n"
        "    if type(v) is int and (v == 0 or v == 1): v = v == 1\n"
        "    else: FAIL('expected a boolean (or 0/1)')"
    ),
    "tuple[str, ...]": (
        "if type(v) is not list or not all(type(x) is str for x in v):"
        " FAIL('expected a list of strings')\n"
        "v = tuple(v)"
    ),
    "tuple[str, ...] | None": (
        "if v is not None:\n"
        "    if type(v) is not list or not all(type(x) is str for x in v):"
        " FAIL('expected a list of strings or null')\n"
        "    v = tuple(v)"
    ),
    "tuple[Any, ...] | None": (
        "if v is not None:\n"
        "    if type(v) is not list: FAIL('expected a list or null')\n"
        "    v = tuple(v)"
    ),
    "dict[str, Any]": "if type(v) is not dict: FAIL('expected a JSON object')",
}


def _indent(code: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in code.splitlines())


def _compile_parser(cls: type[Row], stream: str) -> Callable[[Any], Row]:
    """Generate ``from_raw`` for ``cls``: type checks inline, one pass."""
    names = cls.FIELDS
    n = len(names)
    where = f"{stream}/{cls.TYPE_ID}" if cls.TYPE_ID else stream
    lines = [
        "def from_raw(raw):",
        "    if type(raw) is not list:",
        "        raise MalformedRowError(STREAM, 'expected a JSON array', raw)",
        "    n = len(raw)",
        f"    if n < {n}:",
        "        fail_count(n, raw)",
    ]
    for i, name in enumerate(names):
        annotation = _annotation(cls, name)
        check = _CHECKS.get(annotation)
        if check is None:
            raise TypeError(f"{cls.__name__}.{name}: unsupported type {annotation!r}")
        lines.append(f"    v = raw[{i}]")
        lines.append(_indent(check.replace("FAIL(", f"fail({name!r}, v, raw, "), "    "))
        lines.append(f"    f{i} = v")
    args = ", ".join(f"f{i}" for i in range(n))
    lines.append(f"    if n > {n}:")
    lines.append(f"        return cls({args}{', ' if n else ''}extras=tuple(raw[{n}:]))")
    lines.append(f"    return cls({args})")
    namespace: dict[str, Any] = {
        "cls": cls,
        "STREAM": where,
        "MalformedRowError": MalformedRowError,
        "fail": functools.partial(_fail, where),
        "fail_count": functools.partial(_fail_count, where, names),
    }
    exec("\n".join(lines), namespace)  # noqa: S102 - generated from our own tables
    parser: Callable[[Any], Row] = namespace["from_raw"]
    return parser


def _fail(stream: str, name: str, value: Any, raw: Any, why: str) -> NoReturn:
    raise MalformedRowError(stream, f"field {name!r}: {why}, got {value!r}", raw)


def _fail_count(stream: str, names: tuple[str, ...], got: int, raw: Any) -> NoReturn:
    expected = ", ".join(names)
    raise MalformedRowError(stream, f"expected {len(names)} fields ({expected}), got {got}", raw)


def _annotation(cls: type, name: str) -> str:
    field_type = attrs.fields_dict(cls)[name].type
    return field_type if isinstance(field_type, str) else repr(field_type)


def stream_row(stream: str, type_id: str | None = None) -> Callable[[type[_R]], type[_R]]:
    """Class decorator: give an attrs row class its stream, wire order and parser."""

    def register(cls: type[_R]) -> type[_R]:
        cls.STREAM = stream
        cls.TYPE_ID = type_id
        cls.FIELDS = tuple(a.name for a in attrs.fields(cls) if a.name != "extras")
        cls.__repr__ = _row_repr  # type: ignore[method-assign,assignment]
        cls.from_raw = staticmethod(_compile_parser(cls, stream))  # type: ignore[method-assign,assignment]
        return cls

    return register
