"""The job runner of the site steps: one job per server on a bounded thread pool.

A server that fails is listed with its exit class and the others go on
(:func:`each_server`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed

import hw
from agent.errors import LicensingError
from apps.licadmin.console import Console
from apps.licadmin.inventory import ServerRef
from apps.licadmin.outcome import Outcome
from hw.link import ServerClient

__all__ = ["DEFAULT_JOBS", "MAX_JOBS", "Connect", "ServerJob", "connector", "each_server"]

DEFAULT_JOBS = 8
MAX_JOBS = 64

Connect = Callable[[str], ServerClient]
ServerJob = Callable[[ServerClient, Outcome], None]


def connector(timeout: float) -> Connect:
    def connect(url: str) -> ServerClient:
        client: ServerClient = hw.connect(url, timeout=timeout)
        return client
    return connect


def each_server(servers: Sequence[ServerRef], job: ServerJob, connect: Connect,
                console: Console, title: str, jobs: int = DEFAULT_JOBS) -> list[Outcome]:
    """Run ``job`` for every server on at most ``jobs`` threads; outcomes in server order.

    A job reports through the :class:`Outcome` it is given; any exception it
    raises marks that server failed and never stops the others.
    """
    outcomes = [Outcome(s.label, s.url) for s in servers]

    def run(i: int) -> Outcome:
        o, ref = outcomes[i], servers[i]
        try:
            with (ref.via.client(ref.device) if ref.via is not None
                  else connect(ref.url)) as client:
                job(client, o)
        except LicensingError as err:
            o.fail(err)
        except Exception as err:  # a broken backend fails this server only, with its story
            o.fail(LicensingError(f"{type(err).__name__}: {err}"))
        return o

    workers = max(1, min(jobs, len(servers), MAX_JOBS))
    if any(s.via is not None for s in servers):
        # devices of an MQTT site share one broker session: many requests in flight
        # cost no connection each, so they go SITE_WINDOW at a time
        from hw.backends.mqtt import SITE_WINDOW

        workers = max(workers, min(len(servers), SITE_WINDOW))
    with console.progress(title, len(servers)) as done, \
            ThreadPoolExecutor(max_workers=workers,
                               thread_name_prefix="licadmin") as pool:
        futures = [pool.submit(run, i) for i in range(len(servers))]
        for fut in as_completed(futures):
            done(fut.result())
    return outcomes
