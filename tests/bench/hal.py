"""Benchmarks of the link layer: framing efficiency on the wire and the decoder's speed.

``framing_rows()`` returns rows for the README table written by ``tests/bench/run.py``.
Run alone with ``python tests/bench/hal.py``.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.rpc import Op  # noqa: E402
from hw.framing import Frame, FrameDecoder  # noqa: E402
from hw.rpc import RpcClient, RpcServer  # noqa: E402

__all__ = ["framing_rows", "wire_ratio"]

#: the efficiency the link layer is held to: wire bytes per payload byte
GOAL = 1.05


def _frames_for(data: bytes) -> tuple[bytes, bytes]:
    """The real frames of a get-info answer carrying ``data``, and of an apply request carrying it."""

    def handler(op: str, _args: Mapping[str, Any]) -> Any:
        return {} if op == Op.HELLO else {"file": data, "device_id": "0" * 64}

    server, client = RpcServer(handler), RpcClient()
    _rid, hello = client.hello(0.0)
    client.receive(b"".join(server.receive(hello)))
    _rid, request = client.start(Op.GET_INFO, {}, 0.0)
    (answer,) = server.receive(request)
    _rid, upload = client.start(Op.APPLY_RESPONSE, {"file": data}, 0.0)
    return answer, upload


def wire_ratio(size: int, zero_free: bool = False) -> tuple[float, float]:
    """Wire bytes per payload byte for a ``size``-byte file, answer and upload direction.

    Args:
        zero_free: use content without zero bytes (COBS's worst case) instead of random bytes.
    """
    data = os.urandom(size)
    if zero_free:
        data = data.replace(b"\x00", b"\x01")
    answer, upload = _frames_for(data)
    return len(answer) / size, len(upload) / size


def _decode_rate(size: int, chunk: int = 4096, rounds: int = 20) -> float:
    """MB/s of payload through FrameDecoder, a ``size``-byte frame fed in ``chunk``-byte reads."""
    answer, _ = _frames_for(os.urandom(size))
    rates = []
    for _ in range(rounds):
        dec = FrameDecoder()
        t = time.perf_counter()
        events = []
        for i in range(0, len(answer), chunk):
            events += dec.feed(answer[i:i + chunk])
        rates.append(size / (time.perf_counter() - t) / 1e6)
        assert len(events) == 1 and isinstance(events[0], Frame)
    return statistics.median(rates)


def framing_rows() -> list[tuple[str, str, str]]:
    """(measure, result, notes) rows for the README benchmark table."""
    rows: list[tuple[str, str, str]] = []
    for label, size in (("4 KiB response", 4096), ("64 KiB bulk file", 65536)):
        ans, up = wire_ratio(size)
        worst, _ = wire_ratio(size, zero_free=True)
        ok = "meets" if max(ans, up, worst) <= GOAL else "MISSES"
        rows.append((
            f"framing efficiency, {label}",
            f"{ans:.4f} wire B per payload B",
            f"answer {ans:.4f}, upload {up:.4f}, no zero bytes (COBS worst case) {worst:.4f}; "
            f"COBS + CRC-32 + CBOR RPC envelope; {ok} the goal of {GOAL}",
        ))
    ans_4k, _ = wire_ratio(4096)
    rows.append((
        "4 KiB response on a 115200 baud line (8N1)",
        f"{4096 * ans_4k * 10 / 115200 * 1e3:.0f} ms",
        "wire bytes x 10 bits / baud rate, line time only",
    ))
    rows.append((
        "frame decoder throughput (pure Python)",
        f"{_decode_rate(65536):.0f} MB/s",
        "64 KiB frame fed in 4 KiB reads, median of 20",
    ))
    return rows


if __name__ == "__main__":
    for row in framing_rows():
        print(" | ".join(row))
