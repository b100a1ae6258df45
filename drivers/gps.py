"""UTC from a GPS receiver: a small NMEA 0183 parser and a supervised serial reader.

Only the RMC sentence is used (any talker: ``GP``, ``GN``, ``GL``…): it carries
the date and the UTC time of the fix and a status (``A`` valid, ``V`` not).
Position is ignored; the agent wants time.  The parser never raises anything
but :class:`NmeaError`, with the reason, on any input.

The reader stamps each valid fix with ``time.monotonic()`` at the moment its
line arrived, so the age of a fix and the wall clock's offset from GPS UTC
can be judged later without the serial latency growing with the age.  NMEA
time is the start of the second in which the sentence is sent; most
receivers send RMC within a few hundred milliseconds of it, so the offset is
good to about a second (the ``clock.gps_tolerance_s`` default), not to PPS
precision.
"""

from __future__ import annotations

import calendar
import logging
import threading
import time
from dataclasses import dataclass

import serial

log = logging.getLogger("cngmrv.gps")

MAX_LINE = 82  # NMEA 0183's longest sentence, "$" to "\r\n"


class NmeaError(ValueError):
    """A sentence that cannot be used; the message says why."""


@dataclass(frozen=True)
class Fix:
    """An RMC sentence's time: ``utc`` (epoch seconds) and whether the receiver had a fix."""

    utc: float
    valid: bool


def checksum(body: str) -> int:
    """XOR of the characters between ``$`` and ``*``."""
    c = 0
    for ch in body.encode("ascii"):
        c ^= ch
    return c


def parse_rmc(line: str) -> Fix | None:
    """The fix in one NMEA line, or None for a well-formed sentence that is not RMC.

    Raises NmeaError for a line that is not a sentence, a bad checksum, or an
    RMC with an impossible date or time.
    """
    line = line.strip()
    if len(line) > MAX_LINE or not line.startswith("$"):
        raise NmeaError("not an NMEA sentence")
    body, star, given = line[1:].partition("*")
    if not star:
        raise NmeaError("no checksum")
    try:
        want = int(given, 16)
        if len(given) != 2:
            raise ValueError
        got = checksum(body)
    except (ValueError, UnicodeEncodeError):
        raise NmeaError(f"bad checksum field {given!r}") from None
    if got != want:
        raise NmeaError(f"checksum {got:02X} != {want:02X}")
    fields = body.split(",")
    if len(fields[0]) != 5 or fields[0][2:] != "RMC":
        return None
    if len(fields) < 10:
        raise NmeaError("RMC with too few fields")
    hms, status, dmy = fields[1], fields[2], fields[9]
    if status not in ("A", "V"):
        raise NmeaError(f"RMC status {status!r}")
    if not hms and status == "V":
        return None  # a receiver with no time at all yet
    try:
        if len(hms) < 6 or len(dmy) != 6 or not (hms[:6] + dmy).isdigit():
            raise ValueError
        hh, mm, ss = int(hms[0:2]), int(hms[2:4]), float(hms[4:])
        day, month, yy = int(dmy[0:2]), int(dmy[2:4]), int(dmy[4:6])
    except ValueError:
        raise NmeaError(f"RMC time {hms!r} date {dmy!r}") from None
    if not (hh < 24 and mm < 60 and 0 <= ss < 61 and 1 <= month <= 12):
        raise NmeaError(f"RMC time {hms!r} date {dmy!r} out of range")
    year = 2000 + yy if yy < 80 else 1900 + yy  # NMEA's two-digit year
    if not 1 <= day <= calendar.monthrange(year, month)[1]:
        raise NmeaError(f"RMC date {dmy!r} is not a day")
    utc = calendar.timegm((year, month, day, hh, mm, 0, 0, 0, 0)) + ss
    return Fix(utc=utc, valid=status == "A")


class GpsReader:
    """Reads a GPS receiver's serial port in a thread; :attr:`latest` is the last valid fix.

    A port that vanishes or fails is reopened with backoff; lines that do not
    parse are counted by reason in :attr:`stats`, never raised.
    """

    def __init__(self, port: str, baudrate: int = 9600, reconnect_s: float = 2.0) -> None:
        self.port = port
        self.baudrate = baudrate
        self._reconnect_s = reconnect_s
        self._lock = threading.Lock()
        self._latest: tuple[Fix, float] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gps", daemon=True)
        self.stats: dict[str, int] = {
            "opens": 0,
            "fixes": 0,
            "no_fix": 0,
            "errors": 0,
            "reopens": 0,
        }

    @property
    def latest(self) -> tuple[Fix, float] | None:
        """The last valid fix and ``time.monotonic()`` when its line arrived."""
        with self._lock:
            return self._latest

    def feed(self, line: str, mono: float) -> None:
        """One received line (public so a test or a replay can feed lines directly)."""
        try:
            fix = parse_rmc(line)
        except NmeaError as e:
            self.stats["errors"] += 1
            if self.stats["errors"] == 1 or self.stats["errors"] % 1000 == 0:
                log.warning("event=nmea_rejected reason=%r count=%d", str(e), self.stats["errors"])
            return
        if fix is None:
            return
        if not fix.valid:
            self.stats["no_fix"] += 1
            return
        self.stats["fixes"] += 1
        with self._lock:
            self._latest = (fix, mono)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with serial.serial_for_url(self.port, self.baudrate, timeout=0.5) as port:
                    self.stats["opens"] += 1  # pyserial flushes the input as it opens
                    while not self._stop.is_set():
                        raw = port.readline()
                        if raw:
                            self.feed(raw.decode("ascii", "replace"), time.monotonic())
            except (OSError, serial.SerialException) as e:
                self.stats["reopens"] += 1
                log.warning("event=gps_port_failed port=%s error=%r", self.port, str(e))
                self._stop.wait(self._reconnect_s)
