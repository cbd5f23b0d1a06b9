"""Records: the part of :mod:`dataclasses` the agent uses, at a fraction of its memory.

``dataclasses`` imports :mod:`inspect` (and with it ``ast``, ``dis``,
``tokenize``, ``linecache``...) and compiles generated source for every class:
about 1.5 MB of the daemon's resident memory on an embedded controller, for
classes that only need an ``__init__``, equality and immutability. A record
here behaves like the corresponding dataclass for what the agent relies on,
and mypy checks it as one (PEP 681 ``dataclass_transform``):

- fields are the class's annotations in order (``ClassVar[...]`` excluded),
  including those of record base classes; a plain default or
  :func:`field` (``default``, ``default_factory``, ``init=False``);
- ``__init__`` (positional or keyword), then ``__post_init__`` when defined;
- ``__repr__``, ``__eq__`` (same class, equal fields), ``__match_args__``;
- ``frozen=True``: assigning or deleting an attribute raises
  :class:`FrozenInstanceError`, and instances hash by their fields; a mutable
  record with equality is unhashable, as with dataclasses;
- ``order=True``: ``<``, ``<=``, ``>``, ``>=`` compare the fields as a tuple;
- :func:`replace` and :func:`fields`.

No code is generated: the methods are closures over the field list.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, ClassVar, TypeVar, dataclass_transform, overload

__all__ = ["Field", "FrozenInstanceError", "WireView", "field", "fields", "record", "replace"]

T = TypeVar("T")


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class FrozenInstanceError(AttributeError):
    """An attribute of a frozen record was assigned or deleted."""


class Field:
    """One field of a record: its name, default or default factory, and whether ``__init__`` takes it."""

    __slots__ = ("default", "default_factory", "init", "name")

    def __init__(self, default: Any = MISSING, default_factory: Any = MISSING,
                 init: bool = True) -> None:
        if default is not MISSING and default_factory is not MISSING:
            raise ValueError("cannot specify both default and default_factory")
        self.name = ""
        self.default = default
        self.default_factory = default_factory
        self.init = init

    def __repr__(self) -> str:
        return (f"Field(name={self.name!r}, default={self.default!r}, "
                f"default_factory={self.default_factory!r}, init={self.init})")

    def value(self, owner: str) -> Any:
        """The value a field not given to ``__init__`` takes."""
        if self.default is not MISSING:
            return self.default
        if self.default_factory is not MISSING:
            return self.default_factory()
        raise TypeError(f"{owner}.__init__() missing required argument: {self.name!r}")


def field(*, default: Any = MISSING, default_factory: Callable[[], Any] | Any = MISSING,
          init: bool = True) -> Any:
    """A field with a default, a default factory, or left out of ``__init__`` (``init=False``)."""
    return Field(default, default_factory, init)


def _is_classvar(annotation: Any) -> bool:
    text = annotation if isinstance(annotation, str) else repr(annotation)
    text = text.removeprefix("typing.")
    return text == "ClassVar" or text.startswith("ClassVar[")


def _collect(cls: type) -> tuple[Field, ...]:
    found: dict[str, Field] = {}
    for base in reversed(cls.__mro__[1:]):
        for f in base.__dict__.get("__record_fields__", ()):
            found[f.name] = f
    # the class's own annotations (inspect.get_annotations would import inspect)
    own = cls.__dict__.get("__annotations__", {})  # noqa: RUF063
    for name, annotation in own.items():
        if _is_classvar(annotation):
            continue
        value = cls.__dict__.get(name, MISSING)
        if isinstance(value, Field):
            f = value
            if f.default is MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, f.default)
        else:
            if isinstance(value, (list, dict, set)):
                raise ValueError(f"mutable default {type(value).__name__} for field {name} "
                                 f"of {cls.__qualname__}: use field(default_factory=...)")
            f = Field(value)
        f.name = name
        found.pop(name, None)
        found[name] = f
    seen_default = False
    for f in found.values():
        if not f.init:
            continue
        if f.default is not MISSING or f.default_factory is not MISSING:
            seen_default = True
        elif seen_default:
            raise TypeError(f"non-default argument {f.name!r} follows default argument "
                            f"in {cls.__qualname__}")
    return tuple(found.values())


def _values(self: Any) -> tuple[Any, ...]:
    return tuple(getattr(self, f.name) for f in self.__record_fields__)


def _make_init(cls: type, all_fields: tuple[Field, ...]) -> Callable[..., None]:
    init_fields = tuple(f for f in all_fields if f.init)
    later = tuple(f for f in all_fields if not f.init
                  and (f.default is not MISSING or f.default_factory is not MISSING))
    names = {f.name: i for i, f in enumerate(init_fields)}
    owner = cls.__qualname__
    post_init = getattr(cls, "__post_init__", None) is not None
    set_ = object.__setattr__

    n = len(init_fields)
    slots = any("__slots__" in vars(k) for k in cls.__mro__[:-1])
    #: the field names in order: keywords naming each field once, in this order, are the
    #: instance dict as it is (one update; the decoders and the pure core call so)
    in_order = tuple(f.name for f in init_fields)

    def _by_name(self: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Fill the instance dict from ``args`` then ``kwargs`` if every keyword names a field
        after the positional ones and every required field is given (True); else nothing
        is kept (False: the general path below fills it, or raises its error)."""
        d = self.__dict__
        for f, v in zip(init_fields, args, strict=False):
            d[f.name] = v
        used = 0
        for f in init_fields[len(args):]:
            name = f.name
            if name in kwargs:
                d[name] = kwargs[name]
                used += 1
            elif f.default is not MISSING:
                d[name] = f.default
            elif f.default_factory is not MISSING:
                d[name] = f.default_factory()
            else:
                d.clear()
                return False  # a required field missing: the general path names it
        if used != len(kwargs):  # a keyword naming no field, or a positional one again
            d.clear()
            return False
        return True

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if not slots:
            # the common calls go straight into the instance dict, which is what
            # object.__setattr__ does for a field (no descriptors), at a third the cost
            d = self.__dict__
            if len(args) == n and not kwargs:  # every field positionally (as replace() calls)
                d.update(zip(in_order, args, strict=True))
            elif not args and len(kwargs) == n and tuple(kwargs) == in_order:
                d.update(kwargs)  # every field by keyword, in order (the decoders)
            elif len(args) <= n and not kwargs:  # the first fields; the rest their defaults
                for f, v in zip(init_fields, args, strict=False):
                    d[f.name] = v
                for f in init_fields[len(args):]:
                    d[f.name] = f.value(owner)
            elif len(args) > n or not _by_name(self, args, kwargs):
                d = None  # the general path below fills it, or raises its error
            if d is not None:
                for f in later:
                    d[f.name] = f.value(owner)
                if post_init:
                    self.__post_init__()
                return
        if len(args) > len(init_fields):
            raise TypeError(f"{owner}.__init__() takes {len(init_fields)} arguments "
                            f"but {len(args)} were given")
        given: list[Any] = list(args)
        given.extend([MISSING] * (len(init_fields) - len(args)))
        for k, v in kwargs.items():
            i = names.get(k)
            if i is None:
                raise TypeError(f"{owner}.__init__() got an unexpected keyword argument {k!r}")
            if given[i] is not MISSING:
                raise TypeError(f"{owner}.__init__() got multiple values for argument {k!r}")
            given[i] = v
        for f, v in zip(init_fields, given, strict=True):
            set_(self, f.name, f.value(owner) if v is MISSING else v)
        for f in later:  # init=False fields with a default; others are left to __post_init__
            set_(self, f.name, f.value(owner))
        if post_init:
            self.__post_init__()

    return __init__


def _repr(self: Any) -> str:
    inner = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in self.__record_fields__)
    return f"{type(self).__qualname__}({inner})"


def _eq(self: Any, other: Any) -> Any:
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _values(self) == _values(other)


def _hash(self: Any) -> int:
    return hash(_values(self))


def _frozen_setattr(self: Any, name: str, _value: Any) -> None:
    raise FrozenInstanceError(f"cannot assign to field {name!r} of a frozen {type(self).__qualname__}")


def _frozen_delattr(self: Any, name: str) -> None:
    raise FrozenInstanceError(f"cannot delete field {name!r} of a frozen {type(self).__qualname__}")


def _compare(op: Callable[[tuple[Any, ...], tuple[Any, ...]], bool]) -> Callable[[Any, Any], Any]:
    def method(self: Any, other: Any) -> Any:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return op(_values(self), _values(other))

    return method


def _process(cls: type[T], frozen: bool, order: bool) -> type[T]:
    all_fields = _collect(cls)
    own = cls.__dict__
    c: Any = cls
    c.__record_fields__ = all_fields
    c.__init__ = _make_init(cls, all_fields)
    setattr(c, "__match_args__", tuple(f.name for f in all_fields if f.init))  # noqa: B010
    if "__repr__" not in own:
        c.__repr__ = _repr
    if "__eq__" not in own:
        c.__eq__ = _eq
    if "__hash__" not in own or own["__hash__"] is None:
        c.__hash__ = _hash if frozen else None
    if frozen:
        c.__setattr__ = _frozen_setattr
        c.__delattr__ = _frozen_delattr
    if order:
        c.__lt__ = _compare(lambda a, b: a < b)
        c.__le__ = _compare(lambda a, b: a <= b)
        c.__gt__ = _compare(lambda a, b: a > b)
        c.__ge__ = _compare(lambda a, b: a >= b)
    return cls


@overload
def record(cls: type[T], /) -> type[T]: ...


@overload
def record(*, frozen: bool = False, order: bool = False) -> Callable[[type[T]], type[T]]: ...


@dataclass_transform(field_specifiers=(field, Field))
def record(cls: type[T] | None = None, /, *, frozen: bool = False,
           order: bool = False) -> type[T] | Callable[[type[T]], type[T]]:
    """Make ``cls`` a record (``@record`` or ``@record(frozen=True, order=True)``)."""
    if cls is None:
        return lambda c: _process(c, frozen, order)
    return _process(cls, frozen, order)


def fields(obj: Any) -> tuple[Field, ...]:
    """The fields of a record class or instance, in order."""
    try:
        return obj.__record_fields__  # type: ignore[no-any-return]
    except AttributeError:
        raise TypeError(f"{obj!r} is not a record") from None


def replace(obj: T, /, **changes: Any) -> T:
    """A copy of the record ``obj`` with ``changes``; runs ``__init__`` (and its checks) again."""
    args: list[Any] = []  # every init field in order: __init__'s positional (fast) path
    for f in fields(obj):
        if not f.init:
            if f.name in changes:
                raise ValueError(f"field {f.name} is not set by __init__ and cannot be replaced")
            continue
        args.append(changes.pop(f.name) if f.name in changes else getattr(obj, f.name))
    if changes:
        raise TypeError(f"{type(obj).__qualname__} has no field(s) {', '.join(sorted(changes))}")
    return obj.__class__(*args)


class WireView:
    """A typed record that also reads as its wire map (``result["sequence"]``).

    For records whose map form is itself a contract (``licagent status --json``
    prints a status map as is; the licensing server's API bodies are documented
    maps): the attributes are the typed view, ``to_wire`` and item access the map.
    Subclasses list their wire keys, which are their attribute names, in ``KEYS``.
    """

    KEYS: ClassVar[tuple[str, ...]]

    def to_wire(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.KEYS}

    def __getitem__(self, key: str) -> Any:
        if key not in self.KEYS:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self.KEYS else default

    def __iter__(self) -> Iterator[str]:
        return iter(self.KEYS)

    def __len__(self) -> int:
        return len(self.KEYS)

    def keys(self) -> tuple[str, ...]:
        return self.KEYS
