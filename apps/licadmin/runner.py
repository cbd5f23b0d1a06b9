"""The job runner of the site steps: one job per server on a bounded set of threads.

A server that fails is listed with its exit class and the others go on
(:func:`each_server`). Each server has a total time (``--timeout``): every
operation on it, retries included, must fit in it. Ctrl-C (SIGINT or SIGTERM,
:class:`Stop`) starts no new server; the operations in flight finish (a second
signal stops waiting for them) and the servers not done are listed as
``interrupted``, so the caller can write the rest down and say how to finish it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import hw
from agent.errors import LicensingError
from agent.rpc import TransportError
from apps.licadmin.console import Console
from apps.licadmin.inventory import ServerRef
from apps.licadmin.outcome import Outcome
from hw.link import ServerClient, StreamClient

__all__ = ["DEFAULT_JOBS", "DEFAULT_TIMEOUT", "MAX_JOBS", "TRIES", "Connect", "ServerJob",
           "Stop", "connector", "each_server", "open_client"]

DEFAULT_JOBS = 8
MAX_JOBS = 64
#: seconds allowed per server, everything included (connecting, every operation, retries)
DEFAULT_TIMEOUT = 15.0
#: how many times a request is sent within that time on links that retry
TRIES = 4

Connect = Callable[[str], ServerClient]
ServerJob = Callable[[ServerClient, Outcome], None]


class Stop:
    """Ctrl-C during a step: the first SIGINT/SIGTERM starts no new server, the second
    stops waiting for the ones in flight. Set from a signal handler, read by the runner."""

    def __init__(self, stream: Any = None) -> None:
        self.requested = False
        self.hard = False
        self.signal = ""
        self._fd = 2 if stream is None else stream

    def request(self, name: str = "SIGINT") -> None:
        if self.requested:
            self.hard = True
            self._say(f"\n{name} again: not waiting for the servers in flight\n")
            # a third Ctrl-C interrupts whatever still waits (a licensing server, say)
            try:
                signal.signal(signal.SIGINT, signal.default_int_handler)
            except ValueError:  # not the main thread: nothing installed there
                pass
            return
        self.requested, self.signal = True, name
        self._say(f"\n{name}: interrupted: no new server will be started; waiting for the "
                  f"operations in flight (send the signal again to stop waiting)\n")

    def _say(self, text: str) -> None:
        # os.write: a signal handler must not take the console's lock
        try:
            os.write(self._fd, text.encode())
        except OSError:
            pass

    @contextmanager
    def installed(self) -> Iterator[Stop]:
        """Catch SIGINT and SIGTERM for the duration (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum: int, _frame: Any) -> None:
            self.request(signal.Signals(signum).name)

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


class _Bounded(ServerClient):
    """A client whose every call fits in one server's total time (``--timeout``)."""

    def __init__(self, inner: ServerClient, deadline: float, total: float) -> None:
        self.inner, self.deadline, self.total = inner, deadline, total
        self.routed_device = inner.routed_device
        if isinstance(inner, StreamClient):
            inner.deadline = deadline  # stops waiting mid-operation too

    def call(self, op: str, args: Mapping[str, Any] | None = None) -> Any:
        if time.monotonic() >= self.deadline:
            raise TransportError(f"{op}: not started: the {self.total:g} s allowed per server "
                                 f"(--timeout) ran out")
        try:
            return self.inner.call(op, args)
        except TransportError as err:
            if time.monotonic() >= self.deadline - 0.05:
                raise TransportError(f"{err} (the {self.total:g} s allowed per server, "
                                     f"--timeout, ran out)") from err
            raise

    def close(self) -> None:
        self.inner.close()


#: the links whose clients send a request again after each try's timeout; the others
#: (https, usbdrop) make one try, which gets the whole time
RETRYING = frozenset({"tcp", "tls", "serial", "pty", "loop", "sim", "mqtt", "mqtts"})


def connector(timeout: float) -> Connect:
    """Clients whose every try is a share of ``timeout`` (the total per server)."""

    def connect(url: str) -> ServerClient:
        scheme = url.partition("://")[0].lower()
        per_try = max(timeout / TRIES, min(timeout, 0.5)) if scheme in RETRYING else timeout
        # presence_timeout: an MQTT device away (its broker restarting) is waited for
        # up to the whole time, then reported
        client: ServerClient = hw.connect(url, timeout=per_try, tries=TRIES,
                                          presence_timeout=timeout)
        return client
    return connect


def open_client(url: str, timeout: float) -> ServerClient:
    """One server for the single-server commands, with ``timeout`` as its total time."""
    return _Bounded(connector(timeout)(url), time.monotonic() + timeout, timeout)


def each_server(servers: Sequence[ServerRef], job: ServerJob, connect: Connect,
                console: Console, title: str, jobs: int = DEFAULT_JOBS,
                stop: Stop | None = None, timeout: float = DEFAULT_TIMEOUT) -> list[Outcome]:
    """Run ``job`` for every server on at most ``jobs`` threads; outcomes in server order.

    A job reports through the :class:`Outcome` it is given; any exception it
    raises marks that server failed and never stops the others. Each server has
    ``timeout`` seconds in all. Once ``stop`` is requested no server is started;
    those never started are ``interrupted``; once it is hard, the ones in flight
    are not waited for and are ``interrupted`` too (they may have run).
    """
    n = len(servers)
    work = [Outcome(s.label, s.url) for s in servers]
    started, finished = [False] * n, [False] * n
    lock = threading.Condition()
    state = {"next": 0, "running": 0}
    stop = stop or Stop()

    def run(i: int) -> None:
        o, ref = work[i], servers[i]
        deadline = time.monotonic() + timeout
        try:
            inner = ref.via.client(ref.device) if ref.via is not None else connect(ref.url)
            with _Bounded(inner, deadline, timeout) as client:
                job(client, o)
        except LicensingError as err:
            o.fail(err)
        except Exception as err:  # a broken backend fails this server only, with its story
            o.fail(LicensingError(f"{type(err).__name__}: {err}"))

    def worker(done: Callable[[Outcome], None]) -> None:
        while True:
            with lock:
                if stop.requested or state["next"] >= n:
                    state["running"] -= 1
                    lock.notify_all()
                    return
                i = state["next"]
                state["next"] += 1
                started[i] = True
            run(i)
            with lock:
                finished[i] = True
                lock.notify_all()
            done(work[i])

    workers = max(1, min(jobs, n, MAX_JOBS))
    if any(s.via is not None for s in servers):
        # devices of an MQTT site share one broker session: many requests in flight
        # cost no connection each, so they go SITE_WINDOW at a time
        from hw.backends.mqtt import SITE_WINDOW

        workers = max(workers, min(n, SITE_WINDOW))
    with console.progress(title, n) as done:
        state["running"] = workers if n else 0
        threads = [threading.Thread(target=worker, args=(done,), daemon=True,
                                    name=f"licadmin-{k}") for k in range(workers if n else 0)]
        for t in threads:
            t.start()
        with lock:
            # short waits: the signal handler runs on this thread between them
            while state["running"] > 0 and not stop.hard:
                lock.wait(0.1)
            snapshot = list(finished)
    outcomes: list[Outcome] = []
    for i, ref in enumerate(servers):
        if snapshot[i]:
            outcomes.append(work[i])
            continue
        o = Outcome(ref.label, ref.url)  # a thread may still write to work[i]
        if started[i]:
            o.interrupt("still running when interrupted: it may have run there; "
                        "running it again is safe")
        else:
            o.interrupt("not started: interrupted")
        outcomes.append(o)
    return outcomes
