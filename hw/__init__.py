"""Links and hardware facts: one interface, backends chosen by URL scheme.

``connect(url)`` gives the administration side a :class:`~hw.link.ServerClient`;
``listen(url, handler)`` gives the agent daemon a :class:`~hw.link.Listener`.
Each scheme maps to a module imported only when used (pyserial's
``serial_for_url`` / python-can's interface table); an unknown scheme or option
is a :class:`~agent.errors.UsageError` naming it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from agent.errors import UsageError

__all__ = ["BACKENDS", "connect", "listen"]

#: scheme -> module implementing ``connect(url, **ctx)`` and ``listen(url, handler, **ctx)``
BACKENDS: Mapping[str, str] = {
    "loop": "hw.backends.loop",
    "sim": "hw.backends.sim",
    "pty": "hw.backends.serialport",
    "serial": "hw.backends.serialport",
    "tcp": "hw.backends.tcp",
    "tls": "hw.backends.tcp",
    "https": "hw.backends.https",
    "usbdrop": "hw.backends.usbdrop",
    "mqtt": "hw.backends.mqtt",
    "mqtts": "hw.backends.mqtt",
    "qemu": "hw.backends.qemu",
}


def _backend(url: str) -> tuple[Any, Any]:
    from hw.link import parse_url

    parsed = parse_url(url)
    name = BACKENDS.get(parsed.scheme)
    if name is None:
        raise UsageError(
            f"unknown link scheme {parsed.scheme!r} in {url} "
            f"(known: {', '.join(sorted(BACKENDS))})"
        )
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            raise UsageError(f"{parsed.scheme}:// links are not available in this build") from exc
        raise
    return module, parsed


def connect(url: str, **ctx: Any) -> Any:
    """Open a client to the server at ``url`` (a :class:`hw.link.ServerClient`)."""
    module, parsed = _backend(url)
    return module.connect(parsed, **ctx)


def listen(url: str, handler: Callable[[str, Mapping[str, Any]], Any], **ctx: Any) -> Any:
    """Create the daemon side of ``url`` (a :class:`hw.link.Listener`), not yet started."""
    module, parsed = _backend(url)
    return module.listen(parsed, handler, **ctx)
