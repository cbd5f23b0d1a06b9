"""Where a workflow step talks: a progress bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from apps.licadmin.outcome import FAILED, Outcome, outcome_line

__all__ = ["Console"]


class Console:
    """Where a step talks: a progress bar on a terminal, plain lines otherwise, nothing in --json.

    Args:
        stream: usually sys.stdout.
        quiet: --json: the caller prints one JSON document instead.
        tty: force the terminal mode (default: ``stream.isatty()``).
    """

    BAR = 30

    def __init__(self, stream: TextIO | None = None, quiet: bool = False,
                 tty: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.quiet = quiet
        self.tty = self.stream.isatty() if tty is None else tty
        self._lock = threading.Lock()
        self._bar: tuple[str, int, int] | None = None

    def line(self, text: str) -> None:
        if self.quiet:
            return
        with self._lock:
            self._clear()
            print(text, file=self.stream)
            self._draw()
            self.stream.flush()

    @contextmanager
    def progress(self, title: str, total: int) -> Iterator[Callable[[Outcome], None]]:
        """A callback to report each finished server; a bar while it runs on a terminal."""
        if self.tty and not self.quiet:
            with self._lock:
                self._bar = (title, 0, total)
                self._draw()
                self.stream.flush()

        def done(o: Outcome) -> None:
            if self.quiet:
                return
            with self._lock:
                if self._bar is not None:
                    t, n, tot = self._bar
                    self._bar = (t, n + 1, tot)
                if not self.tty or o.status == FAILED:
                    self._clear()
                    print(outcome_line(o), file=self.stream)
                self._draw()
                self.stream.flush()

        try:
            yield done
        finally:
            with self._lock:
                if self._bar is not None:
                    self._bar = None
                    print(file=self.stream)
                    self.stream.flush()

    def _clear(self) -> None:
        if self._bar is not None:
            self.stream.write("\r\x1b[K")

    def _draw(self) -> None:
        if self._bar is None:
            return
        title, n, total = self._bar
        filled = self.BAR * n // max(total, 1)
        self.stream.write(f"\r{title} [{'#' * filled}{'.' * (self.BAR - filled)}] {n}/{total}")
