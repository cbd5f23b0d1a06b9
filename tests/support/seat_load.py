"""One client process of the seat load test (tests/agent/test_seat_load.py).

``python -m tests.support.seat_load URL NAME LOG GO ROUNDS``: connect to the agent at URL,
wait until the file GO exists (so that every client runs at once), then ROUNDS times: check
out a seat of ``editor`` (trying again while none is free), note ``+ SEAT_ID NAME`` in LOG,
renew it, note ``- SEAT_ID NAME`` and return it. Notes are single O_APPEND writes, each
after the server granted and before it freed, so the log's holders are never more than the
server's.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

import hw
from agent.rpc import RemoteError
from agent.seats import read_token


def main(url: str, name: str, log: str, go: str, rounds: int) -> int:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    rng = random.Random(name)
    with hw.connect(url, timeout=60, tries=1) as c:
        c.seat_list()  # connected and said hello
        print("ready", flush=True)
        while not Path(go).exists():
            time.sleep(0.01)
        for _ in range(rounds):
            while True:
                try:
                    res = c.seat_checkout("editor", name)
                    break
                except RemoteError as err:
                    if err.exit_code != 9:
                        raise
                    time.sleep(rng.uniform(0.005, 0.05))
            sid = read_token(res.token).seat.id.hex()
            os.write(fd, f"+ {sid} {name}\n".encode())
            c.seat_renew(res.token)
            time.sleep(rng.uniform(0, 0.02))
            os.write(fd, f"- {sid} {name}\n".encode())
            c.seat_return(res.token)
    return 0


if __name__ == "__main__":
    u, n, lg, g, r = sys.argv[1:6]
    sys.exit(main(u, n, lg, g, int(r)))
