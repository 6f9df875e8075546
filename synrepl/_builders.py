"""Cheaper construction of slotted frozen attrs instances from checked values.

A frozen class's ``__setattr__`` raises, so attrs' ``__init__`` stores each
field through ``object.__setattr__``: about three times the cost of an
ordinary slot store.  Code that has already checked every value (the
parser, the delivery core on its hot path) builds a *builder* instead: a
class with the same single base and the same own slots but an ordinary
``__setattr__``, so each store is the interpreter's specialised one.  The
filled instance then becomes the real class by ``__class__`` assignment,
which Python allows between classes of one layout; what comes out is an
ordinary, immutable instance of the real class.  Only for classes without
validators or converters (there is nothing to bypass).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import attrs

from synrepl.streams._row import generated_function

_T = TypeVar("_T")


def field_names(cls: type) -> list[str]:
    return [a.name for a in attrs.fields(cls)]


def builder(cls: type) -> Callable[[], Any]:
    """A mutable twin of ``cls``: same single base, same own slots, plain
    ``__setattr__`` and no-op ``__init__``.  Fill its instance's fields, then
    set its ``__class__`` to ``cls``.

    Raises:
        TypeError: at once, for a class whose layout the twin would miss.
    """
    (base,) = cls.__bases__
    namespace = {
        "__slots__": cls.__dict__.get("__slots__", ()),
        "__setattr__": object.__setattr__,
        "__delattr__": object.__delattr__,
        "__init__": object.__init__,
        "__module__": cls.__module__,
    }
    twin = type(f"_{cls.__name__}Builder", (base,), namespace)
    names = field_names(cls)
    probe = twin()
    for name in names:
        setattr(probe, name, name)
    probe.__class__ = cls
    if type(probe) is not cls or [getattr(probe, name) for name in names] != names:
        raise TypeError(f"cannot build {cls.__name__} through a builder")  # pragma: no cover
    return twin


def fast_constructor(cls: type[_T], module: str) -> Callable[..., _T]:
    """``cls(*fields)`` for values already checked, through a :func:`builder`;
    generated under ``<module generated: Class fast constructor>``."""
    names = field_names(cls)
    source = [f"def f({', '.join(names)}):", "    self = builder()"]
    source += [f"    self.{name} = {name}" for name in names]
    source += ["    self.__class__ = cls", "    return self"]
    namespace = {"builder": builder(cls), "cls": cls}
    filename = f"<{module} generated: {cls.__name__} fast constructor>"
    constructor: Callable[..., _T] = generated_function(source, namespace, filename, "f")
    return constructor
