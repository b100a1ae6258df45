"""UTC from a GPS receiver: a small NMEA 0183 parser and a supervised serial reader.

Only the RMC sentence is used (any talker: ``GP``, ``GN``, ``GL``…): it carries
the date and the UTC time of the fix, a status (``A`` valid, ``V`` not) and the
speed over ground (knots, NMEA 0183 field 7; 1 knot = 1.852 km/h exactly).
Position is ignored.  The parser never raises anything but :class:`NmeaError`,
with the reason and a short fixed :attr:`NmeaError.kind` (a bounded set, so a
count per kind can be a metric label), on any input.

The reader stamps each fix with ``time.monotonic()`` at the moment its line
arrived, so the age of a fix and the wall clock's offset from GPS UTC can be
judged later without the serial latency growing with the age.  NMEA
time is the start of the second in which the sentence is sent; most
receivers send RMC within a few hundred milliseconds of it, so the offset is
good to about a second (the ``clock.gps_tolerance_s`` default), not to PPS
precision.
"""

from __future__ import annotations

import calendar
import collections
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import serial

log = logging.getLogger("cngmrv.gps")

MAX_LINE = 82  # NMEA 0183's longest sentence, "$" to "\r\n"
KMH_PER_KNOT = 1.852  # the international nautical mile is 1852 m exactly
_SPEED = re.compile(r"\d{1,4}(\.\d{0,4})?")  # knots; NMEA writes no sign and no exponent

# NmeaError.kind: why a line was refused, from a fixed set.
KINDS = ("not_sentence", "checksum", "rmc_fields", "rmc_status", "rmc_time", "rmc_speed")


class NmeaError(ValueError):
    """A sentence that cannot be used; the message says why, :attr:`kind` which of :data:`KINDS`."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Fix:
    """An RMC sentence: ``utc`` (epoch seconds), whether the receiver had a fix, and the
    speed over ground in km/h (None without a fix, or when the receiver left it empty)."""

    utc: float
    valid: bool
    speed_kmh: float | None = None


def checksum(body: str) -> int:
    """XOR of the characters between ``$`` and ``*``."""
    c = 0
    for ch in body.encode("ascii"):
        c ^= ch
    return c


def parse_rmc(line: str) -> Fix | None:
    """The fix in one NMEA line, or None for a well-formed sentence that is not RMC.

    Raises NmeaError for a line that is not a sentence, a bad checksum, or an
    RMC with an impossible date or time, or a speed that is not a number of knots.
    """
    line = line.strip()
    if len(line) > MAX_LINE or not line.startswith("$"):
        raise NmeaError("not_sentence", "not an NMEA sentence")
    body, star, given = line[1:].partition("*")
    if not star:
        raise NmeaError("checksum", "no checksum")
    try:
        want = int(given, 16)
        if len(given) != 2:
            raise ValueError
        got = checksum(body)
    except (ValueError, UnicodeEncodeError):
        raise NmeaError("checksum", f"bad checksum field {given!r}") from None
    if got != want:
        raise NmeaError("checksum", f"checksum {got:02X} != {want:02X}")
    fields = body.split(",")
    if len(fields[0]) != 5 or fields[0][2:] != "RMC":
        return None
    if len(fields) < 10:
        raise NmeaError("rmc_fields", "RMC with too few fields")
    hms, status, knots, dmy = fields[1], fields[2], fields[7], fields[9]
    if status not in ("A", "V"):
        raise NmeaError("rmc_status", f"RMC status {status!r}")
    if not hms and status == "V":
        return None  # a receiver with no time at all yet
    try:
        if len(hms) < 6 or len(dmy) != 6 or not (hms[:6] + dmy).isdigit():
            raise ValueError
        hh, mm, ss = int(hms[0:2]), int(hms[2:4]), float(hms[4:])
        day, month, yy = int(dmy[0:2]), int(dmy[2:4]), int(dmy[4:6])
    except ValueError:
        raise NmeaError("rmc_time", f"RMC time {hms!r} date {dmy!r}") from None
    if not (hh < 24 and mm < 60 and 0 <= ss < 61 and 1 <= month <= 12):
        raise NmeaError("rmc_time", f"RMC time {hms!r} date {dmy!r} out of range")
    year = 2000 + yy if yy < 80 else 1900 + yy  # NMEA's two-digit year
    if not 1 <= day <= calendar.monthrange(year, month)[1]:
        raise NmeaError("rmc_time", f"RMC date {dmy!r} is not a day")
    utc = calendar.timegm((year, month, day, hh, mm, 0, 0, 0, 0)) + ss
    if knots and not _SPEED.fullmatch(knots):
        raise NmeaError("rmc_speed", f"RMC speed {knots!r} is not a number of knots")
    valid = status == "A"
    # Without a fix the receiver's speed field is empty or stale: never a speed.
    speed = float(knots) * KMH_PER_KNOT if valid and knots else None
    return Fix(utc=utc, valid=valid, speed_kmh=speed)


class GpsReader:
    """Reads a GPS receiver's serial port in a thread.

    :attr:`latest` is the last valid fix (the clock check's); every fix, valid
    or not, also goes on a bounded queue for :meth:`drain` as ``(monotonic
    receive time, Fix)``.  When the queue is full the newest fix is dropped and
    counted in ``stats["queue_dropped"]``.  A port that vanishes or fails is
    reopened after ``reconnect_s``; lines that do not parse are counted by
    :attr:`NmeaError.kind` in ``stats["rejected"]`` (and in total in
    ``stats["errors"]``), never raised.
    """

    def __init__(
        self, port: str, baudrate: int = 9600, reconnect_s: float = 2.0, queue_size: int = 1000
    ) -> None:
        self.port = port
        self.baudrate = baudrate
        self._reconnect_s = reconnect_s
        self._lock = threading.Lock()
        self._latest: tuple[Fix, float] | None = None
        self._queue: collections.deque[tuple[float, Fix]] = collections.deque()
        self._queue_size = queue_size
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gps", daemon=True)
        self.stats: dict[str, Any] = {
            "lines": 0,
            "opens": 0,
            "fixes": 0,
            "no_fix": 0,
            "errors": 0,
            "rejected": {},
            "reopens": 0,
            "queue_dropped": 0,
        }

    @property
    def latest(self) -> tuple[Fix, float] | None:
        """The last valid fix and ``time.monotonic()`` when its line arrived."""
        with self._lock:
            return self._latest

    def feed(self, line: str, mono: float) -> None:
        """One received line (public so a test or a replay can feed lines directly)."""
        stats = self.stats
        stats["lines"] += 1
        try:
            fix = parse_rmc(line)
        except NmeaError as e:
            stats["errors"] += 1
            rejected = stats["rejected"]
            rejected[e.kind] = rejected.get(e.kind, 0) + 1
            if stats["errors"] == 1 or stats["errors"] % 1000 == 0:
                log.warning("event=nmea_rejected reason=%r count=%d", str(e), stats["errors"])
            return
        if fix is None:
            return
        if fix.valid:
            stats["fixes"] += 1
        else:
            stats["no_fix"] += 1
        with self._lock:
            if fix.valid:
                self._latest = (fix, mono)
            if len(self._queue) < self._queue_size:
                self._queue.append((mono, fix))
            else:
                stats["queue_dropped"] += 1

    def drain(self) -> list[tuple[float, Fix]]:
        """Every fix queued right now, oldest first, without waiting."""
        with self._lock:
            out = list(self._queue)
            self._queue.clear()
        return out

    def pending(self) -> int:
        """Fixes queued right now."""
        with self._lock:
            return len(self._queue)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stops reading (a reader never started, or already stopped, stops at once)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with serial.serial_for_url(self.port, self.baudrate, timeout=0.5) as port:
                    self.stats["opens"] += 1  # pyserial flushes the input as it opens
                    part = b""
                    while not self._stop.is_set():
                        raw = port.readline()
                        if not raw:
                            continue
                        # readline returns what came by its timeout: a line cut there is
                        # joined with its rest (and a runaway one cut, to fail its checksum).
                        part += raw
                        if raw.endswith(b"\n") or len(part) > 2 * MAX_LINE:
                            self.feed(part.decode("ascii", "replace"), time.monotonic())
                            part = b""
            except (OSError, serial.SerialException) as e:
                self.stats["reopens"] += 1
                log.warning("event=gps_port_failed port=%s error=%r", self.port, str(e))
                self._stop.wait(self._reconnect_s)
