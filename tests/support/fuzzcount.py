"""How many generated inputs a fuzz test fed its decoders: ``make fuzz`` sums them.

Each fuzz test adds its count as one line to ``$FUZZ_COUNT_FILE`` when it is set.
"""

from __future__ import annotations

import os

__all__ = ["record_inputs"]


def record_inputs(n: int) -> None:
    path = os.environ.get("FUZZ_COUNT_FILE")
    if path:
        with open(path, "a") as f:
            f.write(f"{n}\n")
