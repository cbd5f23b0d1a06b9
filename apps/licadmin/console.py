"""Where a workflow step talks: lines on stdout, a progress bar on a terminal's stderr.

Sized for a site of 10,000 servers: by default a step prints one summary line
per outcome class and a table of what was not done; ``--verbose`` adds one line
per server as it finishes. The progress bar goes to stderr, and only when
stderr is a terminal, so stdout stays the same on a terminal, in a pipe and
under ``--json`` (where stdout is one JSON document).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from apps.licadmin.outcome import Outcome, outcome_line

__all__ = ["Console"]


class Console:
    """Where a step talks.

    Args:
        stream: the lines (usually sys.stdout).
        quiet: --json: the caller prints one JSON document instead of lines.
        verbose: --verbose: one line per server (or file) as each finishes.
        err: where the progress bar goes (usually sys.stderr).
        tty: force the bar on or off (default: ``err.isatty()``).
    """

    BAR = 30

    def __init__(self, stream: TextIO | None = None, quiet: bool = False,
                 tty: bool | None = None, verbose: bool = False,
                 err: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.err = err or sys.stderr
        self.quiet = quiet
        self.verbose = verbose and not quiet
        try:
            self.tty = self.err.isatty() if tty is None else tty
        except (AttributeError, ValueError):
            self.tty = False
        self._lock = threading.Lock()
        self._bar: tuple[str, int, int] | None = None

    def line(self, text: str) -> None:
        if self.quiet:
            return
        with self._lock:
            self._clear()
            print(text, file=self.stream)
            self.stream.flush()
            self._draw()

    def each(self, o: Outcome) -> None:
        """One server's (or file's) line, with --verbose only."""
        if self.verbose:
            self.line(outcome_line(o))

    @contextmanager
    def progress(self, title: str, total: int) -> Iterator[Callable[[Outcome], None]]:
        """A callback to report each finished server; a bar while it runs on a terminal."""
        if self.tty:
            with self._lock:
                self._bar = (title, 0, total)
                self._draw()

        def done(o: Outcome) -> None:
            with self._lock:
                if self._bar is not None:
                    t, n, tot = self._bar
                    self._bar = (t, n + 1, tot)
                if self.verbose:
                    self._clear()
                    print(outcome_line(o), file=self.stream)
                    self.stream.flush()
                self._draw()

        try:
            yield done
        finally:
            with self._lock:
                if self._bar is not None:
                    self._clear()
                    self._bar = None

    def _clear(self) -> None:
        if self._bar is not None:
            self.err.write("\r\x1b[K")
            self.err.flush()

    def _draw(self) -> None:
        if self._bar is None:
            return
        title, n, total = self._bar
        filled = self.BAR * n // max(total, 1)
        self.err.write(f"\r{title} [{'#' * filled}{'.' * (self.BAR - filled)}] {n}/{total}")
        self.err.flush()
