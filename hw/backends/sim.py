"""``sim://NAME``: an in-process serial line with a seeded fault injector.

The simulated line of pymodbus's ``NullModem`` with its manipulator hook, or
python-can's ``virtual`` bus: a listener registers NAME in a :class:`SimFabric`
passed in by the caller (no global registry), and each ``connect`` opens a
line whose two directions pass through their own :class:`FaultInjector`::

    sim://NAME?ber=1e-4&drop=0&dup=0&noise=0&split=0&delay=0&seed=1

``ber``
    probability that each bit is flipped
``drop``
    probability that a chunk (a write, or a piece of one after ``split``) is lost
``dup``
    probability that a write arrives twice (each copy then meets the other faults)
``noise``
    probability that a burst of 1-16 random bytes is inserted into a chunk
``split``
    probability, repeated, that a write is cut at a random point (re-chunking)
``delay``
    seconds each chunk spends on the line
``seed``
    makes the faults reproducible (each line and direction derives its own stream)

Options on the listener's URL describe the line for every client; options on
the client's URL override them, and ``timeout`` and ``tries`` set the client's
retry policy. Every fault injected is counted on its injector, and the fabric
sums them over all its lines.
"""

from __future__ import annotations

import collections
import itertools
import math
import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from agent.errors import UsageError
from agent.record import fields, record, replace
from agent.rpc import Handler, TransportError
from hw.backends.loop import InProcessListener, link_name
from hw.link import Link, LinkURL, StreamClient

__all__ = [
    "FAULT_KINDS",
    "FaultInjector",
    "LineFaults",
    "SimEnd",
    "SimFabric",
    "SimLine",
    "SimListener",
    "connect",
    "listen",
]


#: the counters of an injector that count faults which damage or lose data; the others
#: describe the traffic (writes, bytes), harmless re-chunking (splits) and fault sizes
FAULT_KINDS = ("bit_flips", "drops", "dups", "noise_bursts")
_COUNTERS = ("writes", "bytes", "splits", *FAULT_KINDS, "dropped_bytes", "noise_bytes")
_CLIENT_OPTIONS = ("timeout", "tries")
_MAX_DELAY = 10.0


@record(frozen=True)
class LineFaults:
    """What the line does to bytes; probabilities are in [0, 1]."""

    ber: float = 0.0
    drop: float = 0.0
    dup: float = 0.0
    noise: float = 0.0
    split: float = 0.0
    delay: float = 0.0
    seed: int = 1

    def __post_init__(self) -> None:
        for name in ("ber", "drop", "dup", "noise", "split"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and 0.0 <= v <= 1.0):
                raise UsageError(f"sim:// option {name}={v!r} must be a probability "
                                 "between 0 and 1")
        if not 0.0 <= self.delay <= _MAX_DELAY:
            raise UsageError(f"sim:// option delay={self.delay!r} must be 0 to "
                             f"{_MAX_DELAY:g} seconds")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def with_options(self, options: Mapping[str, str]) -> LineFaults:
        """These faults, overridden by URL options (other options are ignored here)."""
        changes: dict[str, Any] = {}
        for name in self.names():
            text = options.get(name)
            if text is None:
                continue
            try:
                changes[name] = int(text) if name == "seed" else float(text)
            except ValueError as exc:
                raise UsageError(f"sim:// option {name}={text!r} is not a number") from exc
            if name != "seed" and not math.isfinite(changes[name]):
                raise UsageError(f"sim:// option {name}={text!r} is not a finite number")
        return replace(self, **changes)


class FaultInjector:
    """One direction of a line: turns each write into the chunks that arrive, counting every fault.

    Args:
        faults: the fault rates.
        rng: the random stream (seeded by the caller, for reproducible runs).
    """

    def __init__(self, faults: LineFaults, rng: random.Random) -> None:
        self.faults = faults
        self.rng = rng
        self.counts: dict[str, int] = dict.fromkeys(_COUNTERS, 0)

    @property
    def injected(self) -> int:
        """Faults that damaged or lost data (bit flips, drops, duplicates, noise bursts)."""
        return sum(self.counts[k] for k in FAULT_KINDS)

    def apply(self, data: bytes) -> list[bytes]:
        """The chunks that arrive at the other end for one write of ``data``."""
        f, rng, c = self.faults, self.rng, self.counts
        c["writes"] += 1
        c["bytes"] += len(data)
        copies = 1
        if f.dup and rng.random() < f.dup:
            c["dups"] += 1  # the whole write again, as a retransmitting layer below would
            copies = 2
        out: list[bytes] = []
        for _ in range(copies):
            for piece in self._split(data):
                if f.drop and rng.random() < f.drop:
                    c["drops"] += 1
                    c["dropped_bytes"] += len(piece)
                    continue
                piece = self._flip(piece)
                if f.noise and rng.random() < f.noise:
                    burst = rng.randbytes(rng.randint(1, 16))
                    at = rng.randint(0, len(piece))
                    piece = piece[:at] + burst + piece[at:]
                    c["noise_bursts"] += 1
                    c["noise_bytes"] += len(burst)
                out.append(piece)
        return out

    def _split(self, data: bytes) -> list[bytes]:
        p = self.faults.split
        if not p or len(data) < 2:
            return [data]
        cuts: set[int] = set()
        while len(cuts) < len(data) - 1 and self.rng.random() < p:
            cuts.add(self.rng.randint(1, len(data) - 1))
        self.counts["splits"] += len(cuts)
        bounds = [0, *sorted(cuts), len(data)]
        return [data[a:b] for a, b in itertools.pairwise(bounds)]

    def _flip(self, piece: bytes) -> bytes:
        ber = self.faults.ber
        if not ber or not piece:
            return piece
        buf = bytearray(piece)
        nbits = 8 * len(buf)
        pos = self._gap(ber)
        while pos < nbits:
            buf[pos >> 3] ^= 0x80 >> (pos & 7)
            self.counts["bit_flips"] += 1
            pos += 1 + self._gap(ber)
        return bytes(buf)

    def _gap(self, ber: float) -> int:
        """Bits left intact before the next flip: geometric, so cost follows the flips, not the bits."""
        if ber >= 1.0:
            return 0
        return int(math.log1p(-self.rng.random()) / math.log1p(-ber))


class _Direction:
    """Chunks in flight one way, each with the time it arrives."""

    def __init__(self, limit: int = 1 << 20) -> None:
        self.chunks: collections.deque[tuple[float, bytes]] = collections.deque()
        self.size = 0
        self.limit = limit
        self.cond = threading.Condition()
        self.closed = False


@record
class SimLine:
    """One connection: ``up`` injects faults client to server, ``down`` server to client."""

    name: str
    up: FaultInjector
    down: FaultInjector

    def counts(self) -> dict[str, int]:
        return {k: self.up.counts[k] + self.down.counts[k] for k in _COUNTERS}


class SimEnd(Link):
    """One end of a simulated line; what it writes passes through ``injector``."""

    def __init__(self, rx: _Direction, tx: _Direction, injector: FaultInjector, line: SimLine,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rx, self.tx = rx, tx
        self.injector = injector
        self.line = line
        self.clock = clock

    def _write(self, data: bytes) -> None:
        chunks = self.injector.apply(data)
        due = self.clock() + self.injector.faults.delay
        with self.tx.cond:
            if self.tx.closed:
                raise TransportError("the other end closed the simulated line")
            n = sum(len(c) for c in chunks)
            if self.tx.size + n > self.tx.limit:
                raise TransportError("simulated line buffer full: the other end does not read")
            for c in chunks:
                self.tx.chunks.append((due, c))
            self.tx.size += n
            self.tx.cond.notify_all()

    def _read(self, timeout: float) -> bytes:
        rx = self.rx
        deadline = self.clock() + timeout
        with rx.cond:
            while True:
                now = self.clock()
                if rx.chunks and rx.chunks[0][0] <= now:
                    # one chunk per read, so re-chunking reaches the decoder as it happened
                    _due, data = rx.chunks.popleft()
                    rx.size -= len(data)
                    return data
                if rx.closed and not rx.chunks:
                    raise TransportError("the other end closed the simulated line")
                left = deadline - now
                if left <= 0:
                    return b""
                if rx.chunks:
                    left = min(left, rx.chunks[0][0] - now)
                rx.cond.wait(left)

    def _close(self) -> None:
        for d in (self.rx, self.tx):
            with d.cond:
                d.closed = True
                d.cond.notify_all()


class SimFabric:
    """Where sim:// listeners are found by name; keeps the lines opened on it to total their faults."""

    def __init__(self) -> None:
        self.listeners: dict[str, SimListener] = {}
        self.lines: list[SimLine] = []
        self.lock = threading.Lock()

    def counts(self) -> dict[str, int]:
        """Every counter summed over every line and direction opened on this fabric."""
        with self.lock:
            lines = list(self.lines)
        total = dict.fromkeys(_COUNTERS, 0)
        for line in lines:
            for k, v in line.counts().items():
                total[k] += v
        return total


class SimListener(InProcessListener):
    """The server end of ``sim://NAME``: serves each line in its own thread."""

    scheme = "sim"

    def __init__(self, name: str, handler: Handler, fabric: SimFabric,
                 faults: LineFaults) -> None:
        super().__init__(name, handler, fabric)
        self.faults = faults

    def accept(self, faults: LineFaults) -> SimEnd:
        """Open a line with ``faults``; returns the client's end."""
        if self.stop_event.is_set():
            raise TransportError(f"sim://{self.name} is stopped")
        with self.fabric.lock:
            n = len(self.fabric.lines)
            line = SimLine(
                self.name,
                up=FaultInjector(faults, random.Random(f"{faults.seed}/{self.name}/{n}/up")),
                down=FaultInjector(faults, random.Random(f"{faults.seed}/{self.name}/{n}/down")),
            )
            self.fabric.lines.append(line)
        up, down = _Direction(), _Direction()
        client = SimEnd(rx=down, tx=up, injector=line.up, line=line)
        server = SimEnd(rx=up, tx=down, injector=line.down, line=line)
        self._serve(server, n, on_corrupt=self._count_corrupt)
        return client


def _need_fabric(fabric: SimFabric | None) -> SimFabric:
    if fabric is None:
        raise UsageError("sim:// is in-process only: pass a SimFabric (fabric=...)")
    return fabric


def listen(url: LinkURL, handler: Handler, fabric: SimFabric | None = None,
           **_ctx: Any) -> SimListener:
    url.check_options(LineFaults.names())
    return SimListener(link_name(url), handler, _need_fabric(fabric),
                       LineFaults().with_options(url.options))


def connect(url: LinkURL, fabric: SimFabric | None = None, timeout: float = 2.0,
            tries: int = 4, **_ctx: Any) -> StreamClient:
    url.check_options((*LineFaults.names(), *_CLIENT_OPTIONS))
    fab = _need_fabric(fabric)
    with fab.lock:
        lst = fab.listeners.get(link_name(url))
    if lst is None:
        raise TransportError(f"nothing is listening on {url.text}")
    try:
        timeout = float(url.options.get("timeout", timeout))
        tries = int(url.options.get("tries", tries))
    except ValueError as exc:
        raise UsageError(f"{url.text}: timeout and tries must be numbers") from exc
    if not (math.isfinite(timeout) and timeout > 0 and tries >= 1):
        raise UsageError(f"{url.text}: timeout must be > 0 seconds and tries >= 1")
    return StreamClient(lst.accept(lst.faults.with_options(url.options)),
                        timeout=timeout, tries=tries)
