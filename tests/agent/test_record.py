"""agent.record behaves like dataclasses for every feature the agent uses.

Each check builds the same class twice, once with ``dataclasses`` and once with
``agent.record``, and compares what they do.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import record as rec


def both(frozen: bool = False, order: bool = False) -> list[Any]:
    out = []
    for deco, fld in ((dataclasses.dataclass, dataclasses.field), (rec.record, rec.field)):
        @deco(frozen=frozen, order=order)
        class Point:
            KIND: ClassVar[str] = "point"
            x: int
            y: int = 0
            tags: list[str] = fld(default_factory=list)
            cache: dict[str, int] = fld(init=False, default_factory=dict)

            def __post_init__(self) -> None:
                if self.x < 0:
                    raise ValueError("x must not be negative")

        out.append(Point)
    return out


@pytest.mark.parametrize("frozen", [False, True])
def test_init_repr_eq_like_dataclasses(frozen: bool) -> None:
    dc, rc = both(frozen=frozen)
    for args, kwargs in (((1,), {}), ((1, 2), {}), ((), {"x": 3, "tags": ["a"]}),
                         ((4,), {"y": 5}), ((), {"y": 6, "x": 7}),
                         ((), {"x": 8, "y": 9, "tags": ["b"]})):
        a, b = dc(*args, **kwargs), rc(*args, **kwargs)
        assert repr(a) == repr(b)
        assert (a.x, a.y, a.tags, a.cache) == (b.x, b.y, b.tags, b.cache)
        assert b == rc(*args, **kwargs) and not (b != rc(*args, **kwargs))
        assert b != rc(99)
        assert b.__eq__(a) is NotImplemented  # another class is never equal
    assert rc(1).tags is not rc(1).tags  # a fresh default each time
    assert rc.__match_args__ == dc.__match_args__
    assert rc.KIND == "point" and "KIND" not in [f.name for f in rec.fields(rc)]


@pytest.mark.parametrize("call", [
    lambda c: c(),                      # a required field missing
    lambda c: c(1, 2, [], 4),           # too many positionals
    lambda c: c(1, z=3),                # unknown keyword
    lambda c: c(1, x=2),                # twice
    lambda c: c(1, cache={}),           # init=False field
    lambda c: c(-1),                    # __post_init__ refuses
    lambda c: c(y=2),                   # by keyword, a required field missing
    lambda c: c(x=1, z=3),              # by keyword, one unknown
    lambda c: c(x=1, cache={}),         # by keyword, an init=False field
    lambda c: c(x=-1),                  # by keyword, __post_init__ refuses
])
def test_bad_calls_fail_like_dataclasses(call: Any) -> None:
    dc, rc = both()
    with pytest.raises(Exception) as want:
        call(dc)
    with pytest.raises(want.type):
        call(rc)


def test_frozen_and_hash() -> None:
    dc, rc = both(frozen=True)
    p = rc(1, 2, ("a",))
    with pytest.raises(rec.FrozenInstanceError):
        p.x = 5
    with pytest.raises(AttributeError):
        del p.y
    for cls in (dc, rc):  # every field counts, the dict one too: unhashable in both
        with pytest.raises(TypeError):
            hash(cls(1))

    @rec.record(frozen=True)
    class Key:
        a: int
        b: tuple[str, ...] = ()

    assert hash(Key(1, ("x",))) == hash(Key(1, ("x",)))
    assert len({Key(1), Key(1), Key(2)}) == 2
    mutable = both()[1](1)
    mutable.x = 7  # a mutable record can be assigned ...
    with pytest.raises(TypeError):
        hash(mutable)  # ... and, like a dataclass with eq, is not hashable


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(-2, 2)), min_size=1, max_size=8))
def test_order_like_dataclasses(values: list[tuple[int, int]]) -> None:
    dc, rc = both(frozen=True, order=True)
    want = [(p.x, p.y) for p in sorted(dc(x, y) for x, y in values)]
    got = [(p.x, p.y) for p in sorted(rc(x, y) for x, y in values)]
    assert got == want
    a, b = rc(*values[0]), rc(*values[-1])
    assert (a < b, a <= b, a > b, a >= b) == (values[0] < values[-1], values[0] <= values[-1],
                                              values[0] > values[-1], values[0] >= values[-1])


def test_replace_runs_init_checks_again() -> None:
    _dc, rc = both(frozen=True)
    p = rc(1, 2)
    q = rec.replace(p, y=9)
    assert (q.x, q.y) == (1, 9) and (p.x, p.y) == (1, 2)
    with pytest.raises(ValueError):
        rec.replace(p, x=-1)  # __post_init__ again
    with pytest.raises(ValueError):
        rec.replace(p, cache={})  # not set by __init__
    with pytest.raises(TypeError):
        rec.replace(p, nope=1)
    with pytest.raises(TypeError):
        rec.replace(object())


def test_inheritance_and_class_checks() -> None:
    @rec.record(frozen=True)
    class Base:
        a: int
        b: int = 1

    @rec.record(frozen=True)
    class Child(Base):
        c: int = 2

    assert [f.name for f in rec.fields(Child)] == ["a", "b", "c"]
    assert Child(0) == Child(0, 1, 2) and Child(0) != Base(0)
    with pytest.raises(TypeError):
        @rec.record
        class Bad:
            a: int = 0
            b: int
    with pytest.raises(ValueError):
        @rec.record
        class Shared:
            a: list[int] = []  # noqa: RUF012 - the mistake being tested


def test_encoded_array_is_the_canonical_array_at_every_length() -> None:
    """Issue 17: arrays of pre-encoded items are spliced (their head, then the items' bytes)."""
    from agent.cose import Encoded, canonical, encoded_array

    for n in (0, 1, 23, 24, 255, 256, 300):
        items = [["x" * (i % 7), i, bytes(i % 5)] for i in range(n)]
        assert encoded_array(Encoded(canonical(x)) for x in items).data == canonical(items)


def test_slot_encoded_with_its_copy_spliced_is_the_canonical_slot() -> None:
    import os

    from agent.cose import canonical
    from agent.journal import JournalHead
    from agent.store import SLOT_MAGIC, SLOT_VERSION, _mac, encode_slot

    key = os.urandom(32)
    for gen in (0, 23, 24, 70_000):
        for state in (b"", os.urandom(40), os.urandom(70_000)):
            for head in (JournalHead(3, 10, 20, bytes(32)),
                         JournalHead(3, 10, 20, bytes(32), (1, 2, 3))):
                copy = [SLOT_MAGIC, SLOT_VERSION, gen, state, head.to_cbor(),
                        _mac(key, gen, state, head)]
                assert encode_slot(key, gen, state, head) == canonical([copy, copy])
