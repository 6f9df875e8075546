"""The base of every typed stream row, and the fast row parsers behind it.

A stream row arrives as a JSON array whose positions are the row type's
fields, in Synapse's order.  A row class declares those fields as plain
annotations; :func:`stream_row` turns it into an immutable tuple subclass
(the tuple *is* the wire array, normalised: field values in wire order, then
any values a newer Synapse added, which :attr:`Row.extras` returns) and
compiles its parsers, which check each value's type, turn the 0/1 that some
databases send into booleans and JSON lists into tuples:

* ``from_raw``, exact: a quick check for the common case (the right number
  of values, each of the right type: one unpacking, one condition), then
  field-by-field checks that keep extra values and name what is wrong;
* ``from_fast_raw``, the quick check alone, for orjson's answer taken as it
  comes: None wherever it cannot vouch for the row (the caller then decodes
  exactly and calls ``from_raw``).

Each generated function has a file name of its own (``<synrepl.streams
generated: events ev parser>``), so profiles tell them apart.

Why tuples and generated code: row parsing is the library's hottest path.
Building a tuple costs one C call whatever the number of fields, where a
frozen attrs or dataclass instance pays one ``object.__setattr__`` per field;
and one straight-line function per row type beats a loop over converter
objects.  Named access still works (``row.room_id``), rows compare equal only
to rows of the same type, and they cannot be mutated.
"""

from __future__ import annotations

import functools
import inspect
import linecache
import operator
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NoReturn, Self, TypeVar, dataclass_transform

import attrs

from synrepl.errors import MalformedRowError

__all__ = ("RawRow", "Row", "stream_row")

_R = TypeVar("_R", bound="Row")

try:  # CPython's C accessor behind namedtuple fields: the fastest getter
    from collections import _tuplegetter  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - other Pythons

    def _tuplegetter(index: int, doc: str) -> property:
        return property(operator.itemgetter(index), doc=doc)


class Row(tuple[Any, ...]):
    """A typed, immutable row of one replication stream.

    Subclasses are declared with :func:`stream_row`; their fields are the
    annotations, in wire order.
    """

    __slots__ = ()

    #: The replication stream this row type belongs to.
    STREAM: ClassVar[str] = ""
    #: For ``events`` rows, the sub-row kind on the wire (``ev``, ``state``...).
    TYPE_ID: ClassVar[str | None] = None
    #: The field names, in wire order.
    FIELDS: ClassVar[tuple[str, ...]] = ()
    #: Each field's annotation (``"str | None"``, ...), in wire order.
    FIELD_TYPES: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_raw(cls, raw: Any) -> Self:
        """Build the row from its decoded JSON array, checking every field.

        Raises:
            MalformedRowError: too few values, or a value of the wrong type.
        """
        raise NotImplementedError(f"{cls.__name__} is not a registered row type")

    @classmethod
    def from_values(cls, values: Any, extras: Any = ()) -> Self:
        """Build the row from already-normalised field values (no checks)."""
        return tuple.__new__(cls, (*values, *extras))

    @property
    def extras(self) -> tuple[Any, ...]:
        """Values past the known fields, kept so that a row from a newer Synapse
        loses nothing when re-encoded."""
        return tuple(self[len(self.FIELDS) :])

    def values(self) -> tuple[Any, ...]:
        """The known fields' values, in wire order."""
        return tuple(self[: len(self.FIELDS)])

    def to_raw(self) -> Any:
        """The row as the JSON value Synapse would put on the wire."""
        values = [_to_json(v) for v in self]
        if self.TYPE_ID is not None:
            return [self.TYPE_ID, values]
        return values

    def as_dict(self) -> dict[str, Any]:
        """Field name -> value, for display and JSON output."""
        out = {name: _to_json(value) for name, value in zip(self.FIELDS, self, strict=False)}
        if len(self) > len(self.FIELDS):
            out["extras"] = list(self.extras)
        return out

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and tuple.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = tuple.__hash__

    def __repr__(self) -> str:
        parts = [f"{name}={value!r}" for name, value in zip(self.FIELDS, self, strict=False)]
        if len(self) > len(self.FIELDS):
            parts.append(f"extras={self.extras!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (tuple.__new__, (type(self), tuple(self)))


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


# Per annotation: the check (and conversion) of one value, as source code.
# ``v`` is the value; ``FAIL(why)`` raises, naming the field.  Unknown
# annotations fail loudly at import time, so a new row type cannot silently
# skip validation.  These are the checks of the exact path, which explains
# what is wrong; ``_QUICK`` below is the fast path's yes-or-no version.
_CHECKS: dict[str, str] = {
    "str": "if type(v) is not str: FAIL('expected a string')",
    "str | None": "if v is not None and type(v) is not str: FAIL('expected a string or null')",
    "int": "if type(v) is not int: FAIL('expected an integer')",
    "int | None": "if v is not None and type(v) is not int: FAIL('expected an integer or null')",
    "bool": (
        "if type(v) is not bool:\n"
        "    if type(v) is int and (v == 0 or v == 1): v = v == 1\n"
        "    else: FAIL('expected a boolean (or 0/1)')"
    ),
    "tuple[str, ...]": (
        "if type(v) is not list: FAIL('expected a list of strings')\n"
        "for x in v:\n"
        "    if type(x) is not str: FAIL('expected a list of strings')\n"
        "v = tuple(v)"
    ),
    "tuple[str, ...] | None": (
        "if v is not None:\n"
        "    if type(v) is not list: FAIL('expected a list of strings or null')\n"
        "    for x in v:\n"
        "        if type(x) is not str: FAIL('expected a list of strings or null')\n"
        "    v = tuple(v)"
    ),
    "tuple[Any, ...] | None": (
        "if v is not None:\n"
        "    if type(v) is not list: FAIL('expected a list or null')\n"
        "    v = tuple(v)"
    ),
    "dict[str, Any]": "if type(v) is not dict: FAIL('expected a JSON object')",
}

#: Annotations whose values are free-form JSON: a big integer inside could not
#: be told apart after a fast (orjson) decode, see ``synrepl.commands``.
OPEN_TYPES = frozenset({"tuple[Any, ...] | None", "dict[str, Any]"})

# Per annotation, the quick check of value ``$``: a condition; for lists and
# objects, what to iterate and the test that rejects an item (a loop sets
# ``ok = False``); and the value to store.  A row that fails any of them is
# not refused by the quick check: the exact checks then decide, and explain.
# For free-form JSON after a fast decode only flat strings, integers,
# booleans and nulls pass: a float there may be orjson's stand-in for a big
# integer.  (After an exact decode free-form JSON is not iterated.)
_QUICK: dict[str, tuple[str, str, str, str]] = {
    "str": ("type($) is str", "", "", "$"),
    "str | None": ("($ is None or type($) is str)", "", "", "$"),
    "int": ("type($) is int", "", "", "$"),
    "int | None": ("($ is None or type($) is int)", "", "", "$"),
    "bool": ("(type($) is bool or (type($) is int and ($ == 0 or $ == 1)))", "", "", "$ == 1"),
    "tuple[str, ...]": ("type($) is list", "$", "type(x) is not str", "tuple($)"),
    "tuple[str, ...] | None": (
        "($ is None or type($) is list)",
        "$",
        "type(x) is not str",
        "None if $ is None else tuple($)",
    ),
    "tuple[Any, ...] | None": (
        "($ is None or type($) is list)",
        "$",
        "type(x) not in scalars",
        "None if $ is None else tuple($)",
    ),
    "dict[str, Any]": ("type($) is dict", "$.values()", "type(x) not in scalars", "$"),
}

#: Value types that orjson and the exact decoder always read alike.
_SCALARS = frozenset({str, int, bool, type(None)})


def _indent(code: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in code.splitlines())


def _quick_block(cls: type[Row], key: str, *, fast: bool) -> list[str]:
    """Statements (indented one level) that return a ``cls`` row from ``raw``
    when it has exactly the known fields, each of the right type: one
    unpacking and one condition for the common case.  Otherwise the fast
    path's statements return None, the exact path's fall through.

    The fast path reads orjson's answer as it comes, so its free-form JSON
    fields must hold only values that orjson and the exact decoder always
    read alike; after the exact decode, whatever JSON holds is what it says.
    """
    n = len(cls.FIELDS)
    for field, annotation in zip(cls.FIELDS, cls.FIELD_TYPES, strict=True):
        if annotation not in _CHECKS:
            raise TypeError(f"{cls.__name__}.{field}: unsupported type {annotation!r}")
    names = [f"f{i}" for i in range(n)]
    conditions, loops, values = [], [], []
    for name, annotation in zip(names, cls.FIELD_TYPES, strict=True):
        condition, items, reject, value = _QUICK[annotation]
        conditions.append(condition.replace("$", name))
        values.append(value.replace("$", name))
        if not items or (not fast and annotation in OPEN_TYPES):
            continue
        statements = [
            f"for x in {items.replace('$', name)}:",
            f"    if {reject}:",
            "        ok = False",
            "        break",
        ]
        if annotation.endswith(" | None"):
            statements = [f"if {name} is not None:", *(f"    {s}" for s in statements)]
        loops.append("\n".join(statements))
    unpack = "".join(f"{name}, " for name in names)
    row = f"new(cls{key}, ({''.join(f'{value}, ' for value in values)}))"
    if fast:  # a wrong length fails the unpacking, cheaper than a len() call
        lines = [
            "    if type(raw) is not list:",
            "        return None",
            "    try:",
            f"        {unpack}= raw",
            "    except ValueError:",
            "        return None",
        ]
    else:
        lines = [f"    if type(raw) is list and len(raw) == {n}:", f"        {unpack}= raw"]
    indent = "    " if fast else "        "
    condition = " and ".join(conditions) if conditions else "True"
    if not loops:
        return [*lines, f"{indent}if {condition}:", f"{indent}    return {row}"]
    lines.append(f"{indent}ok = {condition}")
    for loop in loops:
        lines += [f"{indent}if ok:", _indent(loop, indent + "    ")]
    return [*lines, f"{indent}if ok:", f"{indent}    return {row}"]


def _parser_body(
    cls: type[Row], key: str, *, strict_length: bool
) -> tuple[list[str], dict[str, Any]]:
    """The statements (indented one level) that check ``raw`` and return a
    ``cls`` row, and the names they need.  ``key`` keeps names apart when
    several bodies share one function.

    With ``strict_length`` (the fast path, after orjson) the statements
    return None wherever the quick checks do not vouch for the row; without
    it they are exact: quick checks first, then the field-by-field checks
    that keep extra values and raise ``MalformedRowError`` naming the field.
    """
    names: dict[str, Any] = {f"cls{key}": cls, "new": tuple.__new__, "scalars": _SCALARS}
    lines = _quick_block(cls, key, fast=strict_length)
    if strict_length:
        return [*lines, "    return None"], names
    where = f"{cls.STREAM}/{cls.TYPE_ID}" if cls.TYPE_ID else cls.STREAM
    n = len(cls.FIELDS)
    lines += [
        "    if type(raw) is not list:",
        f"        fail_shape{key}(raw)",
        "    n = len(raw)",
        f"    if n < {n}:",
        f"        fail_count{key}(n, raw)",
    ]
    for i, (name, annotation) in enumerate(zip(cls.FIELDS, cls.FIELD_TYPES, strict=True)):
        check = _CHECKS[annotation]
        lines.append(f"    v = raw[{i}]")
        lines.append(_indent(check.replace("FAIL(", f"fail{key}({name!r}, v, raw, "), "    "))
        lines.append(f"    f{i} = v")
    values = "".join(f"f{i}, " for i in range(n))
    lines.append(f"    if n > {n}:")
    lines.append(f"        return new(cls{key}, ({values}*raw[{n}:]))")
    lines.append(f"    return new(cls{key}, ({values}))")
    names.update(
        {
            f"fail{key}": functools.partial(_fail, where),
            f"fail_count{key}": functools.partial(_fail_count, where, cls.FIELDS),
            f"fail_shape{key}": functools.partial(_fail_shape, where),
        }
    )
    return lines, names


def generated_function(
    source: list[str], namespace: dict[str, Any], filename: str, name: str
) -> Callable[..., Any]:
    """Compile ``source``, which defines ``name``, under its own file name.

    Every generated function gets a file name of its own (``<synrepl.streams
    generated: events ev>``) and its source in :mod:`linecache`, so profiles
    and tracebacks tell the generated parsers apart and can show their lines.
    """
    text = "\n".join(source) + "\n"
    exec(compile(text, filename, "exec"), namespace)  # noqa: S102 - from our own tables
    linecache.cache[filename] = (len(text), None, text.splitlines(keepends=True), filename)
    function: Callable[..., Any] = namespace[name]
    return function


def _where(cls: type[Row]) -> str:
    return f"{cls.STREAM} {cls.TYPE_ID}" if cls.TYPE_ID else cls.STREAM


def _compile(cls: type[Row], *, strict_length: bool) -> Callable[[Any], Any]:
    """Generate a parser for ``cls``: type checks inline, one pass.

    With ``strict_length`` the parser returns None for a row its quick checks
    cannot vouch for (extra values, a wrong type, free-form JSON holding
    floats or containers) instead of deciding: the caller then decodes
    exactly and calls the exact parser.
    """
    body, namespace = _parser_body(cls, "", strict_length=strict_length)
    what = "fast parser" if strict_length else "parser"
    filename = f"<synrepl.streams generated: {_where(cls)} {what}>"
    return generated_function(["def parse(raw):", *body], namespace, filename, "parse")


def compile_kind_dispatch(
    kinds: Mapping[str, type[Row]], *, strict_length: bool
) -> Callable[[Any], Row | None]:
    """A parser for ``[kind, [fields...]]`` rows (the events stream): the
    kinds' checks inlined in one function, so one call parses a row.

    Returns None for an unknown kind or shape, and with ``strict_length``
    also wherever the quick checks do not vouch for the row (the fast path
    then decodes exactly); without it extra values are kept.
    """
    source = [
        "def parse(wrapped):",
        "    if type(wrapped) is not list:",
        "        return None",
        "    try:",
        "        kind, raw = wrapped",
        "    except ValueError:",
        "        return None",
    ]
    namespace: dict[str, Any] = {}
    streams = set()
    for index, (kind, cls) in enumerate(kinds.items()):
        body, names = _parser_body(cls, f"_{index}", strict_length=strict_length)
        source.append(f"    {'if' if index == 0 else 'elif'} kind == {kind!r}:")
        source.extend(_indent(line, "    ") for line in body)
        namespace.update(names)
        streams.add(cls.STREAM)
    source.append("    return None")
    what = "fast parser" if strict_length else "parser"
    filename = f"<synrepl.streams generated: {'/'.join(sorted(streams))} kinds {what}>"
    return generated_function(source, namespace, filename, "parse")


def _compile_constructor(cls: type[Row]) -> Callable[..., Any]:
    """``__new__(cls, field, ..., *, extras=())``: the typed constructor."""
    params = "".join(f"{name}, " for name in cls.FIELDS)
    source = [f"def __new__(cls, {params}*, extras=()):", f"    return new(cls, ({params}*extras))"]
    filename = f"<synrepl.streams generated: {_where(cls)} constructor>"
    return generated_function(source, {"new": tuple.__new__}, filename, "__new__")


def _fail(stream: str, name: str, value: Any, raw: Any, why: str) -> NoReturn:
    raise MalformedRowError(stream, f"field {name!r}: {why}, got {value!r}", raw)


def _fail_count(stream: str, names: tuple[str, ...], got: int, raw: Any) -> NoReturn:
    expected = ", ".join(names)
    raise MalformedRowError(stream, f"expected {len(names)} fields ({expected}), got {got}", raw)


def _fail_shape(stream: str, raw: Any) -> NoReturn:
    raise MalformedRowError(stream, "expected a JSON array", raw)


@dataclass_transform(frozen_default=True)
def stream_row(stream: str, type_id: str | None = None) -> Callable[[type[_R]], type[_R]]:
    """Class decorator: make ``cls`` the row type of ``stream``.

    Gives it its wire order (from the annotations), named field access, a
    typed constructor and its compiled parsers.  The class must declare
    ``__slots__ = ()``: a row is its tuple and nothing more.
    """

    def register(cls: type[_R]) -> type[_R]:
        if cls.__dict__.get("__slots__") != ():
            # Without it every row would carry an instance dict: 8 bytes more,
            # and room for attributes the wire never sent.
            raise TypeError(f"{cls.__name__} must declare __slots__ = ()")
        annotations = inspect.get_annotations(cls)
        cls.STREAM = stream
        cls.TYPE_ID = type_id
        cls.FIELDS = tuple(annotations)
        cls.FIELD_TYPES = tuple(str(t) for t in annotations.values())
        for index, name in enumerate(cls.FIELDS):
            setattr(cls, name, _tuplegetter(index, f"Field {index} of the wire row."))
        cls.__new__ = _compile_constructor(cls)  # type: ignore[method-assign]
        cls.from_raw = staticmethod(_compile(cls, strict_length=False))  # type: ignore[method-assign,assignment]
        #: Parser for rows decoded by the fast JSON path: None = decode again exactly.
        cls.from_fast_raw = staticmethod(_compile(cls, strict_length=True))  # type: ignore[attr-defined]
        cls.IS_OPEN = any(t in OPEN_TYPES for t in cls.FIELD_TYPES)  # type: ignore[attr-defined]
        return cls

    return register
