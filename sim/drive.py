"""The one drive loop: the vehicle model stepped tick by tick, in real time or faster.

Every simulated run (the harness, the in-process feed, the benches, the tests
and the HIL fixtures) walks the vehicle through :func:`drive` and sends what
its ECU and kit say at each tick in the loop's body; only what is sent, and
where, differs.  Imports nothing that talks to hardware (no python-can), so a
process that only feeds a pipeline starts fast.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from cngmrv.sim.vehicle import CityBus, State

TICK_S = 0.01  # the simulation's step; every broadcast period is a multiple of it
# Sleeping for less than this costs more in scheduling than it keeps the pace.
SLACK_S = 0.001


def drive(
    vehicle: CityBus,
    ticks: int | None = None,
    *,
    speedup: float = 1.0,
    stop: threading.Event | None = None,
) -> Iterator[tuple[int, State]]:
    """Yield ``(i, state)`` for ticks 0, 1, …: the vehicle stepped to ``i * TICK_S``.

    With ``speedup`` > 0, tick ``i`` is not yielded before ``i * TICK_S /
    speedup`` seconds of wall time (monotonic) have passed since the first: real
    time at 1.  With 0 it runs as fast as the body does.  A body slower than
    real time is never made up for by skipping ticks: the run falls behind.
    Ends after ``ticks`` ticks (None: never), or once ``stop`` is set.
    """
    monotonic, sleep = time.monotonic, time.sleep
    wall0 = monotonic()
    i = 0
    while ticks is None or i < ticks:
        if stop is not None and stop.is_set():
            return
        if speedup > 0:
            ahead = i * TICK_S / speedup - (monotonic() - wall0)
            if ahead > SLACK_S:
                sleep(ahead)
        yield i, vehicle.step(i * TICK_S)
        i += 1
