"""The client library for editors and clients: hold one floating seat while a program runs.

::

    from apps.seat_client import SeatClient

    with SeatClient("tcp://10.1.4.20:7700", "editor", client="ws-anna") as seat:
        run_the_editor()            # seat.lost is set if a renewal was refused

On entry one seat is checked out (:class:`agent.errors.NoSeatError`, exit 9, when none is
free, raised from ``with``); a background thread renews it every third of the lease; on
exit it is returned. A program that dies without returning its seat frees it when the
lease lapses (default 5 minutes). If the server refuses a renewal (the seat lapsed, say
after a long network cut, or its license was reclaimed), :attr:`SeatClient.lost` is set
and the program should stop using the feature (or check out again). A link failure during
a renewal is tried again at the next tick, until the lease's end.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import Any

import hw
from agent.errors import LicensingError, SeatNotOutError
from agent.rpc import RemoteError, SeatResult
from agent.seats import DEFAULT_LEASE

__all__ = ["SeatClient"]


class SeatClient:
    """One seat of ``feature`` at the agent ``url``, held for the ``with`` block.

    Args:
        url: the serving agent's link URL (``tcp://``, ``tls://``, ``https://``, ``mqtt://``...).
        feature: the floating license's feature.
        client: this client's name, shown by ``licadmin seat list``.
        lease: seconds the seat lasts without renewal (10 to 86400; default 300).
        renew_every: seconds between renewals (default a third of ``lease``).
        timeout: seconds for each call to the server.
    """

    def __init__(self, url: str, feature: str, *, client: str, lease: int = DEFAULT_LEASE,
                 renew_every: float | None = None, timeout: float = 10.0) -> None:
        self.url, self.feature, self.client, self.lease = url, feature, client, lease
        self.renew_every = renew_every if renew_every is not None else lease / 3
        self.timeout = timeout
        #: set when the seat is no longer held (a renewal refused, or returned)
        self.lost = threading.Event()
        #: the last seat the server confirmed (token, until, ...)
        self.seat: SeatResult | None = None
        #: the error that cost the seat, if any
        self.error: LicensingError | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conn: Any = None
        self._thread: threading.Thread | None = None

    # -- the server, one connection at a time (the renewer and the caller share it)

    def _call(self, fn: str, *args: Any) -> Any:
        with self._lock:
            if self._conn is None:
                self._conn = hw.connect(self.url, timeout=self.timeout)
            try:
                return getattr(self._conn, fn)(*args)
            except RemoteError:
                raise
            except LicensingError:
                self._close()  # a link failure: a fresh connection next time
                raise

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    # -- the seat

    def checkout(self) -> SeatResult:
        """Check out the seat (``__enter__`` does); NoSeatError (exit 9) when none is free."""
        self.seat = self._call("seat_checkout", self.feature, self.client, None, self.lease)
        self.lost.clear()
        return self.seat

    def renew(self) -> SeatResult:
        """Renew now (the background thread does this on its own)."""
        if self.seat is None:
            raise SeatNotOutError(f"no seat of {self.feature} is held")
        self.seat = self._call("seat_renew", self.seat.token, self.lease)
        return self.seat

    def release(self) -> None:
        """Return the seat (``__exit__`` does); a seat already gone is not an error."""
        seat, self.seat = self.seat, None
        if seat is None:
            return
        try:
            self._call("seat_return", seat.token)
        except RemoteError as err:
            if err.reason != SeatNotOutError.reason:
                raise
        finally:
            self.lost.set()

    def _renewer(self) -> None:
        while not self._stop.wait(self.renew_every):
            seat = self.seat
            if seat is None:
                return
            try:
                self.renew()
            except RemoteError as err:  # refused: the seat is gone (lapsed or reclaimed)
                self.error = err
                self.lost.set()
                return
            except LicensingError as err:  # the link: try again next tick, until the end
                self.error = err
                if time.time() >= seat.until:
                    self.lost.set()
                    return

    def __enter__(self) -> SeatClient:
        self.checkout()
        self._stop.clear()
        self._thread = threading.Thread(target=self._renewer, name=f"seat-{self.feature}",
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, _t: type[BaseException] | None, _e: BaseException | None,
                 _tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            self.release()
        except LicensingError as err:  # unreachable: the seat lapses at its lease's end
            self.error = err
        finally:
            with self._lock:
                self._close()
