"""Ctrl-C in the middle of a one-go ``licadmin activate`` (issue 13, item 10), all real.

licsim's 300 servers over real tcp:// links; the link becomes slow when step 5
(send) begins, a real SIGINT arrives after a few servers applied their response.
The servers done are confirmed at the licensing server, the others untouched,
and the printed command (the same activate, on the rest, in the same work folder)
finishes them.
"""

from __future__ import annotations

import re
import signal

from tests.admin.test_bad_day import (  # noqa: F401 - fleet300 is a fixture
    INTERRUPTED,
    Fleet,
    _finish,
    _read_until,
    _resume,
    fleet300,
)


def test_sigint_in_step_5_of_activate_confirms_what_was_done_and_the_rest_finishes(
        fleet300: Fleet) -> None:  # noqa: F811
    f = fleet300
    f.assign_all(1)
    slow = f.slowed(0.0)  # fast for steps 1 to 4
    assert f.slow is not None
    proc = f.start("activate", "--servers", slow, "--licensing-server", f.licensing,
                   "--jobs", "4", "--verbose")
    head = _read_until(proc, "== step 5/6")
    f.slow.delay = 0.05
    head += _read_until(proc, "ok      ", 5)
    proc.send_signal(signal.SIGINT)
    code, out, err = _finish(proc)
    out = head + out
    assert code == INTERRUPTED, (out[-3000:], err)
    m = re.search(r"interrupted: (\d+) of 300 server\(s\) done; the other (\d+) are listed in "
                  r"(\S+); finish them with:", out)
    assert m, out[-3000:]
    done, left = int(m.group(1)), int(m.group(2))
    assert done + left == 300 and 5 <= done < 300
    held = f.holdings()
    assert sum(1 for h in held.values() if h == {"bacnet": 1}) == done
    # step 6 ran for the receipts of the servers done: the ledger knows what they hold
    assert "== step 6/6: confirm" in out
    assert len(f.ledger.report()["installed"]) == done
    f.slow.delay = 0
    args = _resume(f, out)
    assert args[0] == "activate" and "--work-dir" in args
    f.run(*args)
    assert all(h == {"bacnet": 1} for h in f.holdings().values())
    assert len(f.ledger.report()["installed"]) == 300
