"""The wall clock's quality on a board with no RTC, and its steps.

A Pi boots with whatever time ``fake-hwclock`` saved, or 1970, and NTP or a
GPS sets it later, often with a step.  :class:`ClockMonitor` says, at each
poll, which of three states the wall clock is in:

* ``unknown``: before ``clock.min_year`` (a board that booted without time),
  or no poll yet;
* ``informative``: plausible, but nothing confirms it (no NTP sync, no recent
  GPS fix, or a GPS fix that disagrees);
* ``synchronised``: the kernel says NTP has it (``adjtimex``, the flag
  ``timedatectl``'s ``NTPSynchronized`` reads too), or a GPS fix no older than
  ``gps_max_age_s`` agrees within ``gps_tolerance_s``.

It also detects steps: ``wall - monotonic`` is constant while the clock runs
(slewing moves it by well under a millisecond a second), so a change larger
than ``step_threshold_s`` between two polls is a step, reported with its sign
as a ``CLOCK_STEP`` event that the agent stores and so signs into the next
batch.  Nothing is reordered or dropped: readings keep their sequence and
their ``clock`` field follows the state.

The integration takes time from the frames.  Where those are stamped with
the wall clock (SocketCAN, ``udp_multicast``), :meth:`ClockMonitor.rebase`
subtracts the steps seen since start, so the bus time the pipeline runs on
never jumps; readings then carry ``utc_offset_s`` (UTC = ``t0`` + it) once
the clock has stepped.  Replayed logs and the simulator's bus time are their
own timeline and are left alone.
"""

from __future__ import annotations

import calendar
import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from cngmrv.agent.config import ClockSettings
from cngmrv.drivers.can_source import Frame
from cngmrv.drivers.gps import Fix

log = logging.getLogger("cngmrv.clock")

UNKNOWN, INFORMATIVE, SYNCHRONISED = "unknown", "informative", "synchronised"
TIME_ERROR = 5  # adjtimex's return value when the clock is not synchronised


class TimeSource(Protocol):
    def synchronised(self, wall: float, mono: float) -> bool:
        """Whether this source confirms the wall clock ``wall`` read at ``mono``."""
        ...


class NoSource:
    """Nothing confirms the clock: a plausible clock stays informative."""

    def synchronised(self, wall: float, mono: float) -> bool:
        return False


class NtpSource:
    """The kernel's NTP flag via ``adjtimex(2)`` (read-only, no privilege needed)."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("c")
        self._libc = ctypes.CDLL(name, use_errno=True) if name else None
        # struct timex is 208 bytes on 64-bit Linux; mode 0 (the first int) only reads.
        self._buf = ctypes.create_string_buffer(256)

    def synchronised(self, wall: float, mono: float) -> bool:
        if self._libc is None or not hasattr(self._libc, "adjtimex"):
            return False
        ctypes.memset(self._buf, 0, len(self._buf))
        state = self._libc.adjtimex(self._buf)
        return bool(0 <= state != TIME_ERROR)


class UtcReference(Protocol):
    """A receiver of UTC (the ``gps`` source's reader, :class:`~cngmrv.drivers.gps.GpsReader`)."""

    @property
    def latest(self) -> tuple[Fix, float] | None:
        """The last valid fix and ``time.monotonic()`` when it arrived."""
        ...


class GpsSource:
    """A GPS receiver's recent valid fix, compared with the wall clock."""

    def __init__(self, reader: UtcReference, max_age_s: float, tolerance_s: float) -> None:
        self.reader = reader
        self.max_age_s = max_age_s
        self.tolerance_s = tolerance_s
        self.offset_s: float | None = None  # wall clock minus GPS UTC, at the last fix

    def synchronised(self, wall: float, mono: float) -> bool:
        latest = self.reader.latest
        if latest is None:
            return False
        fix, at = latest
        age = mono - at
        self.offset_s = (wall - age) - fix.utc
        return age <= self.max_age_s and abs(self.offset_s) <= self.tolerance_s


class ClockMonitor:
    """The wall clock's state and its steps; ``wall`` and ``mono`` are injectable for tests."""

    def __init__(
        self,
        source: TimeSource | None = None,
        step_threshold_s: float = 1.0,
        min_year: int = 2024,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source: TimeSource = source or NoSource()
        self.step_threshold_s = step_threshold_s
        self._min_wall = float(calendar.timegm((min_year, 1, 1, 0, 0, 0, 0, 0, 0)))
        self._wall = wall
        self._mono = mono
        self._offset: float | None = None
        self.state = UNKNOWN
        self.steps = 0
        # wall - monotonic at the first poll, and the steps since, summed: a
        # wall-clock stamp t taken at monotonic m is ``m + base + level`` then.
        self.base = 0.0
        self.level = 0.0
        self._levels = [0.0]  # the latest few levels, for stamps taken before a step was seen

    @classmethod
    def from_settings(cls, s: ClockSettings, utc: UtcReference | None = None) -> ClockMonitor:
        """The monitor ``s`` describes; ``utc`` is the ``gps`` source's reader, which the
        ``gps`` clock source needs (the source owns the port: one reader of it)."""
        source: TimeSource
        if s.source == "ntp":
            source = NtpSource()
        elif s.source == "gps":
            if utc is None:
                raise ValueError("clock.source = 'gps' needs the gps source (gps.port)")
            source = GpsSource(utc, s.gps_max_age_s, s.gps_tolerance_s)
        else:
            source = NoSource()
        return cls(source, s.step_threshold_s, s.min_year)

    def close(self) -> None:
        """Nothing to release: a receiver it reads belongs to its source's link."""

    def poll(self) -> list[dict[str, Any]]:
        """Update :attr:`state`; returns a ``CLOCK_STEP`` event for a step since the last poll."""
        mono = self._mono()
        wall = self._wall()
        offset = wall - mono
        events: list[dict[str, Any]] = []
        if self._offset is not None and abs(offset - self._offset) > self.step_threshold_s:
            step = offset - self._offset
            self.steps += 1
            events.append(
                {
                    "t": wall,
                    "kind": "CLOCK_STEP",
                    "step_s": round(step, 6),
                    "before": round(self._offset + mono, 6),
                    "after": round(wall, 6),
                    "mono": round(mono, 6),
                }
            )
            log.warning("event=clock_step step_s=%+.3f wall=%.3f", step, wall)
            self.level += step
            self._levels = [*self._levels[-7:], self.level]
        elif self._offset is None:
            self.base = offset
        self._offset = offset
        previous = self.state
        if wall < self._min_wall:
            self.state = UNKNOWN
        elif self.source.synchronised(wall, mono):
            self.state = SYNCHRONISED
        else:
            self.state = INFORMATIVE
        if events:
            events[0]["state"] = self.state
        if self.state != previous:
            log.info("event=clock_state state=%s was=%s", self.state, previous)
        return events

    def level_for(self, t: float, mono: float) -> float:
        """The step level a wall-clock stamp ``t`` taken near monotonic ``mono`` was made at.

        The nearest of the last few levels: a frame stamped just before a step
        and read just after it still gets the level it was stamped at.
        """
        apparent = t - mono - self.base
        return min(self._levels, key=lambda lv: abs(apparent - lv))

    def rebase(self, frames: list[Frame], poll: Callable[[], None]) -> list[Frame]:
        """Frames stamped with the wall clock, moved onto this run's step-free timeline.

        SocketCAN (and ``udp_multicast``) stamp frames with the kernel's wall
        clock, so a step would move the bus time the integration runs on: an
        hour's gap for +1 h, an hour of "late" frames for -1 h.  Subtracting
        the step level undoes that and keeps readings contiguous; the step
        itself is the signed event.  ``poll`` is called (it must poll this
        monitor and store the events) when a frame shows a step not seen yet.
        A frame that waited longer than ``step_threshold_s`` in a queue only
        costs an extra poll.
        """
        level, base, limit = self.level, self.base, self.step_threshold_s
        out: list[Frame] = []
        for frame in frames:
            t, can_id, data, mono = frame
            d = t - mono - base - level
            if -limit <= d <= limit:
                lv = level
            else:
                poll()
                level = self.level
                lv = self.level_for(t, mono)
            out.append((t - lv, can_id, data, mono) if lv else frame)
        return out


class FixedClock(ClockMonitor):
    """A clock whose state the caller asserts (the simulator's, or a replay's)."""

    def __init__(self, state: str) -> None:
        super().__init__()
        self.state = state
        self.base = time.time() - time.monotonic()

    def poll(self) -> list[dict[str, Any]]:
        return []
