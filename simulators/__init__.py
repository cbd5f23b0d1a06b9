"""Everything that stands in for the outside world: the licensing server and the fleet simulator.

``simulators.Fleet`` (the fleet simulator's Python API) is imported on first use,
so ``licserver`` does not pay for it.
"""

from typing import Any

__all__ = ["Fleet"]


def __getattr__(name: str) -> Any:
    if name == "Fleet":
        from simulators.fleet import Fleet

        return Fleet
    raise AttributeError(f"module 'simulators' has no attribute {name!r}")
