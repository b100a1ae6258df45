"""The simulated kit firmware: the far side of a pseudo-terminal.

It speaks exactly the codec in ``cngmrv.drivers.kit_codec`` (the same module
a real kit's MicroPython firmware would run), writing one STATUS frame every
100 ms of simulated time to the pty's master end.  Its tick is its own
millisecond counter since "kit boot", not bus time, as on real hardware.
"""

from __future__ import annotations

import os

from cngmrv.drivers import kit_codec
from cngmrv.sim.vehicle import State

STATUS_PERIOD_TICKS = 10  # of the simulation's 10 ms tick: 100 ms
STATUS_PHASE_TICKS = 3


class KitFirmware:
    """Writes kit frames to ``fd`` (a pty master, or any writable fd)."""

    def __init__(self, fd: int, boot_tick_ms: int = 5000) -> None:
        self._fd = fd
        self._boot_ms = boot_tick_ms  # the kit booted a little before the sim started
        self._seq = 0
        self.frames_sent = 0
        # A leading delimiter tells a receiver holding a stale partial frame to drop it.
        os.write(fd, b"\x00")

    def tick(self, i: int, s: State) -> None:
        if i % STATUS_PERIOD_TICKS != STATUS_PHASE_TICKS:
            return
        frame = kit_codec.encode_status(
            self._seq,
            (self._boot_ms + i * 10) & 0xFFFFFFFF,
            s.mode,
            round(s.tank_bar, 2),
            round(s.gas_temp_c, 1),
            min(s.gas_kgph, 65.534),
        )
        self._write(frame)
        self._seq = (self._seq + 1) & 0xFFFF
        self.frames_sent += 1

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
