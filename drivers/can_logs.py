"""Recorded CAN logs: read any format python-can reads, strictly, with positions.

Auditors re-run years of recordings, so a damaged file must never pass as a
shorter clean one.  :class:`LogFile` wraps python-can's readers (candump
``.log``, ``.asc``, ``.blf``, ``.trc``, ``.csv``, ``.db``, ``.mf4`` with
``asammdf``, and any of them gzipped as ``.gz``), adds candump's console
output with timestamps, recognises ``.log``, ``.csv`` and unknown extensions by
their content (with one line on what to do for a layout it cannot read), and
turns what the readers do with a damaged file into a :class:`LogError` that
says where:

* an exception from the reader (a cut-off line, a bad MF4 block);
* a warning the reader logs and then skips over (TRC, ASC and BLF readers skip
  lines or objects they cannot parse);
* a frame whose data is shorter or longer than its DLC (a TRC line cut short
  parses as a frame with a DLC of 8 and fewer bytes);
* a text log whose last line has no line end (a candump line cut inside its
  data bytes would otherwise parse as a shorter, valid frame);
* a BLF file shorter than its header says (the BLF reader stops silently at a
  truncated container).

Everything read before the damage has already been yielded, so the caller
keeps it.  Positions are line numbers for text formats and byte offsets
(rounded to the reader's buffer) for binary ones.

:class:`ReplayBus` puts a log behind python-can's bus interface so that the
agent's :class:`~cngmrv.drivers.can_source.CanSource` can read it like a live
bus, optionally paced in real time.
"""

from __future__ import annotations

import functools
import gzip
import io
import logging
import re
import threading
import time
from collections.abc import Callable, Generator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, cast

import can

__all__ = ["LogError", "LogFile", "ReplayBus"]

# (bus timestamp, 29-bit CAN id, payload, monotonic time)
Frame = tuple[float, int, bytes, float]

_TEXT = {".log", ".asc", ".trc", ".csv"}
_BINARY = {".blf", ".mf4"}
_PATH_ONLY = {".db"}


class LogError(Exception):
    """A log that cannot be read to the end; the message gives the file and the position."""

    def __init__(self, path: Path, where: str, frames: int, reason: str, last_t: float | None):
        self.path = path
        self.where = where
        self.frames = frames
        self.reason = reason
        self.last_t = last_t
        after = f"after {frames} frames" + (f", last timestamp {last_t:.6f}" if last_t else "")
        super().__init__(f"{path}: {reason} at {where} ({after})")


class _LineCounter:
    """A text file seen through its lines, counting them (python-can's text readers iterate lines)."""

    def __init__(self, f: IO[str]) -> None:
        self._f = f
        self.lines = 0
        self.chars = 0
        self.unterminated = False  # the last line read had no line end
        self.last = ""  # the last line read

    def __iter__(self) -> _LineCounter:
        return self

    def __next__(self) -> str:
        line = next(self._f)
        self.lines += 1
        self.chars += len(line)
        self.unterminated = not line.endswith("\n")
        self.last = line
        return line

    def readline(self, size: int = -1) -> str:
        line = self._f.readline(size)
        if line:
            self.lines += 1
            self.chars += len(line)
            self.unterminated = not line.endswith("\n")
        return line

    def __bool__(self) -> bool:
        return True

    def close(self) -> None:
        self._f.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


class _Complaints(logging.Handler):
    """Collects warnings python-can's readers log (and then skip over) in this thread."""

    def __init__(self, where: Callable[[], str]) -> None:
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self._where = where
        self.first: tuple[str, str] | None = None  # (where, message) of the first complaint

    def emit(self, record: logging.LogRecord) -> None:
        # Runs inside the reader, so the position is that of the record it skips.
        if record.thread == self.thread and self.first is None:
            self.first = (self._where(), record.getMessage())


# Record types python-can's TRC reader drops (it logs each at INFO), by the kind
# the replay summary counts them as; other types count as "trc_<type>".
_TRC_KINDS = {
    "ER": "error_frame",  # 2.x error frame
    "Error": "error_frame",  # 1.x
    "EC": "error_counter",  # error counter change
    "ST": "status",  # bus status change
    "Warng": "status",  # 1.x bus warning
    "EV": "event",  # user event
}
_TRC_DROPPED = re.compile(r"TRCReader: Unsupported type '([^']*)'")


class _Dropped(logging.Filter):
    """Counts, by kind, the records python-can's TRC reader drops in this thread.

    A filter on the reader's own logger, so the INFO records it counts go no
    further (a root handler would otherwise print hundreds of them).
    """

    def __init__(self, counts: dict[str, int]) -> None:
        super().__init__()
        self.thread = threading.get_ident()
        self._counts = counts

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread != self.thread or record.levelno != logging.INFO:
            return True
        message = record.getMessage()
        m = _TRC_DROPPED.match(message)
        if m:
            kind = _TRC_KINDS.get(m.group(1), f"trc_{m.group(1)}")
        elif message.startswith("TRCReader: Dropping bus info line"):
            kind = "bus_info"
        else:
            return False  # other INFO chatter of the reader (the file version it assumed)
        self._counts[kind] = self._counts.get(kind, 0) + 1
        return False


class LogFile:
    """One recorded CAN log; iterate :meth:`messages` or :meth:`frames` once.

    ``position``/``size`` give progress in bytes (compressed bytes for ``.gz``;
    an MF4 file is read whole before its first frame).  ``ignored`` counts the
    non-J1939 frames :meth:`frames` skipped; ``skipped`` counts those and the
    records the reader drops, by kind: ``error_frame`` (candump and ASC error
    frames, TRC ``ER``), ``remote_frame``, ``standard_frame`` (11-bit),
    ``error_counter`` (TRC ``EC``), ``status`` (TRC ``ST``), ``event`` (TRC
    ``EV``), ``bus_info`` (TRC 1.0) and ``trc_<type>`` for other TRC types.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        suffixes = [s.lower() for s in self.path.suffixes]
        self.compressed = bool(suffixes) and suffixes[-1] == ".gz"
        fmt = suffixes[-2] if self.compressed and len(suffixes) >= 2 else (suffixes or [""])[-1]
        known = _TEXT | _BINARY | _PATH_ONLY
        if fmt in _SNIFFED or fmt not in known:
            # The name alone is not enough: candump's console output is saved as .log
            # as often as its log format, and other tools' CSV exports as .csv.
            looks, advice = _sniff(self._head(), self.compressed)
            if advice is not None:
                raise ValueError(f"{self.path}: {advice}")
            if looks is not None and (fmt not in known or looks in _CONSOLES):
                fmt = looks
        if fmt not in known | _CONSOLES:
            names = ", ".join(sorted(known))
            raise ValueError(
                f"{self.path}: unknown log format {fmt or '(none)'}, and the content looks "
                f"like none of them (known: {names}, and candump's console output)"
            )
        if fmt in _PATH_ONLY and self.compressed:
            raise ValueError(f"{self.path}: a compressed {fmt} log cannot be read")
        self.format = fmt
        # False for a log with no time in it: its frames all read at t = 0, so nothing
        # integrates over time; counters (LFC, the odometer) and decoded values still do.
        self.timed = fmt != CONSOLE_UNTIMED
        self.size = self.path.stat().st_size  # FileNotFoundError says which file
        self.read = 0
        self.ignored = 0
        self.skipped: dict[str, int] = {}
        self.first_t: float | None = None
        self.last_t: float | None = None
        self._raw: IO[bytes] | None = None
        self._lines: _LineCounter | None = None

    def _head(self) -> bytes:
        """The first bytes of the file's content (decompressed), or b"" if unreadable here."""
        with open(self.path, "rb") as raw:  # FileNotFoundError says which file
            if not self.compressed:
                return raw.read(_SNIFF_BYTES)
            try:
                return gzip.GzipFile(fileobj=raw, mode="rb").read(_SNIFF_BYTES)
            except (OSError, EOFError):
                return b""  # damaged: the reader says where

    @property
    def position(self) -> int:
        """Bytes of the file consumed so far (approximate: readers buffer ahead)."""
        if self._raw is not None and not self._raw.closed:
            return self._raw.tell()
        return self.size if self.read else 0

    def _where(self) -> str:
        if self._lines is not None:
            return f"line {self._lines.lines}"
        return f"byte {self.position}"

    def _open(self) -> Any:
        if self.format in _CONSOLES:
            reader: Any = functools.partial(_ConsoleReader, timed=self.timed)
        else:
            reader = can.io.player.MESSAGE_READERS[self.format]
        if self.format in _PATH_ONLY:
            return reader(file=str(self.path))
        raw: IO[bytes] = open(self.path, "rb")  # noqa: SIM115 - closed by the reader's stop()
        self._raw = raw
        stream = cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb")) if self.compressed else raw
        if self.format in _TEXT or self.format in _CONSOLES:
            text = io.TextIOWrapper(stream, encoding="utf-8", errors="strict", newline=None)
            self._lines = _LineCounter(text)
            return reader(file=self._lines)
        return reader(file=stream)

    def messages(self) -> Generator[can.Message, None, None]:
        """Every message in the file, in file order.

        Raises :class:`LogError` at the first sign of damage, after yielding
        everything before it; ``ValueError`` for an unknown format and ``OSError``
        for a file that cannot be opened.
        """
        complaints = _Complaints(self._where)
        watched = logging.getLogger("can.io")
        watched.addHandler(complaints)
        trc = logging.getLogger("can.io.trc")
        dropped, trc_level = _Dropped(self.skipped), trc.level
        trc.addFilter(dropped)
        if trc.getEffectiveLevel() > logging.INFO:
            trc.setLevel(logging.INFO)  # the reader says what it drops only at INFO
        reader = None
        try:
            try:
                reader = self._open()
                for msg in reader:
                    if complaints.first is not None:
                        break
                    if (
                        len(msg.data) != msg.dlc
                        and not msg.is_remote_frame
                        and not msg.is_error_frame
                    ):
                        raise LogError(
                            self.path,
                            self._where(),
                            self.read,
                            f"frame {msg.arbitration_id:#x} has DLC {msg.dlc} "
                            f"but {len(msg.data)} data bytes",
                            self.last_t,
                        )
                    self.read += 1
                    if self.first_t is None:
                        self.first_t = msg.timestamp
                    self.last_t = msg.timestamp
                    yield msg
            except Exception as e:  # readers raise anything from struct.error to KeyError
                if isinstance(e, LogError):
                    raise
                reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                raise LogError(self.path, self._where(), self.read, reason, self.last_t) from e
            if complaints.first is not None:
                where, complaint = complaints.first
                raise LogError(
                    self.path, where, self.read, f"unreadable record ({complaint})", self.last_t
                )
            if self._lines is not None and self._lines.unterminated:
                raise LogError(
                    self.path,
                    self._where(),
                    self.read,
                    "truncated: the last line has no line end",
                    self.last_t,
                )
            declared = getattr(reader, "file_size", None)
            if self.format == ".blf" and not self.compressed and isinstance(declared, int):
                if self.size < declared:
                    raise LogError(
                        self.path,
                        f"byte {self.size}",
                        self.read,
                        f"truncated: the BLF header says {declared} bytes",
                        self.last_t,
                    )
        finally:
            watched.removeHandler(complaints)
            trc.removeFilter(dropped)
            trc.setLevel(trc_level)
            if reader is not None:
                reader.stop()
            elif self._raw is not None:
                self._raw.close()

    def frames(self) -> Iterator[Frame]:
        """J1939 frames as ``(t, can_id, data, t)``: the log's timestamp doubles as the
        monotonic time, since a recording has no other clock."""
        skipped = self.skipped
        candump = self.format == ".log"
        for msg in self.messages():
            if candump and self._lines is not None and _candump_error(self._lines.last):
                msg.is_error_frame = True
            if msg.is_extended_id and not msg.is_remote_frame and not msg.is_error_frame:
                t = msg.timestamp
                yield (t, msg.arbitration_id, bytes(msg.data), t)
            else:
                self.ignored += 1
                kind = (
                    "error_frame"
                    if msg.is_error_frame
                    else "remote_frame"
                    if msg.is_remote_frame
                    else "standard_frame"
                )
                skipped[kind] = skipped.get(kind, 0) + 1


_SNIFFED = {".log", ".csv"}  # extensions other tools use for other layouts
_SNIFF_BYTES = 8192
CONSOLE = "candump-console"  # LogFile.format of candump's console output
# ... and of plain `candump can0`, which prints no time: every frame is read at t = 0.
CONSOLE_UNTIMED = "candump-console-untimed"
_CONSOLES = {CONSOLE, CONSOLE_UNTIMED}
_PYTHON_CAN_CSV = "timestamp,arbitration_id,extended,remote,error,dlc,data"
_CANDUMP_LOG = re.compile(r"^\(\d+\.\d+\)\s+\S+\s+[0-9A-Fa-f]+#")
# candump's console output: [(time)] iface [RX|TX flags] id [len] data..., e.g.
# "  can0  18FEF100   [8]  00 11 22 33 44 55 66 77" or with -ta "(1600000000.000000)  can0 ...".
_CONSOLE_LINE = re.compile(
    r"^\s*(?:\((?P<time>[^)]*)\)\s+)?(?P<iface>[\w.-]+)\s+(?:[RT]X\s+\S+\s+\S+\s+)?"
    r"(?P<id>[0-9A-Fa-f]{3}|[0-9A-Fa-f]{8})\s+\[(?P<len>\d{1,2})\]\s*(?P<rest>.*?)\s*$"
)
_CONSOLE_DATE = "%Y-%m-%d %H:%M:%S.%f"


def _sniff(head: bytes, compressed: bool) -> tuple[str | None, str | None]:
    """(the format the content looks like, None) or (None, one line on why it cannot be read
    and what to do); (None, None) when it looks like nothing known."""
    if head.startswith(b"MDF     "):
        return ".mf4", None
    if head.startswith(b"LOGG"):
        return ".blf", None
    if head.startswith(b"SQLite format 3\x00"):
        return (
            (None, "a SQLite database (.db) cannot be read compressed")
            if compressed
            else (
                ".db",
                None,
            )
        )
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or head[1:200:2].count(0) > 50:
        return None, (
            "UTF-16 text, as Windows tools write their exports (a Vector CANalyzer/CANoe "
            "CSV, a PCAN-View export): export the log as ASC, BLF or TRC, or save it as UTF-8"
        )
    text = head.decode("utf-8", errors="replace")
    lines = [x for x in text.splitlines()[:50] if x.strip()]
    if not lines:
        return None, None
    first = lines[0].strip()
    if first.lower().replace(" ", "") == _PYTHON_CAN_CSV:
        return ".csv", None
    if first.startswith(";$FILEVERSION") or re.match(r"^\s*\d+\)\s", first):
        return ".trc", None
    if first.startswith(("date ", "base hex", "base dec")):
        return ".asc", None
    if any(_CANDUMP_LOG.match(x) for x in lines):
        return ".log", None
    console = [m for m in map(_CONSOLE_LINE.match, lines) if m]
    if console:
        return (CONSOLE_UNTIMED if console[0].group("time") is None else CONSOLE), None
    if first.count(";") >= 2 or first.count(",") >= 2:
        return None, (
            "a CSV that is not python-can's layout (" + _PYTHON_CAN_CSV + "), such as a "
            "Vector or PCAN export: export the log as ASC, BLF or TRC"
        )
    return None, None


class _ConsoleReader:
    """candump's console output, with timestamps (``candump -ta``, ``-tz`` or ``-tA``),
    or without (plain ``candump can0``, ``timed=False``: every frame at t = 0, and a
    line with a timestamp is an error, as a line without one is in a timed log).

    Error frames (an id with CAN_ERR_FLAG, ``-e``) come out as error frames, and
    the indented lines ``-e`` adds to explain them are skipped.  ``-tA`` dates
    are taken as UTC.  A timestamp that goes back is an error: it is how a
    ``-td`` (delta) log shows, and deltas read as times would be wrong.
    """

    def __init__(self, file: Any, timed: bool = True) -> None:
        self.file = file
        self.timed = timed

    def __iter__(self) -> Iterator[can.Message]:
        last: float | None = None
        for line in self.file:
            if not line.strip() or line.startswith("\t"):
                continue
            m = _CONSOLE_LINE.match(line)
            if m is None:
                raise ValueError(f"not a candump console line: {line.strip()[:60]!r}")
            stamp = m.group("time")
            if not self.timed:
                if stamp is not None:
                    raise ValueError("a timestamped line in candump output that had none")
                yield _console_message(0.0, m)
                continue
            if stamp is None:
                raise ValueError("a candump console line without a timestamp")
            if "-" in stamp:
                when = datetime.strptime(stamp, _CONSOLE_DATE).replace(tzinfo=UTC)
                t = when.timestamp()
            else:
                t = float(stamp)
            if last is not None and t < last:
                raise ValueError(
                    f"timestamp {stamp} goes back: a `candump -td` (delta) log? "
                    "record with -ta or -tz"
                )
            last = t
            yield _console_message(t, m)

    def stop(self) -> None:
        self.file.close()


def _console_message(t: float, m: re.Match[str]) -> can.Message:
    ident, length, rest = m.group("id"), int(m.group("len")), m.group("rest")
    can_id = int(ident, 16)
    if len(ident) == 8 and can_id & 0x20000000:  # CAN_ERR_FLAG
        return can.Message(timestamp=t, is_error_frame=True, channel=m.group("iface"))
    extended = len(ident) == 8
    if rest.startswith("remote request"):
        return can.Message(
            timestamp=t,
            arbitration_id=can_id,
            is_extended_id=extended,
            is_remote_frame=True,
            dlc=length,
            channel=m.group("iface"),
        )
    tokens = rest.split()[:length]
    if len(tokens) < length or any(len(b) != 2 for b in tokens):
        raise ValueError(f"[{length}] but the data is {rest!r}")
    data = bytes(int(b, 16) for b in tokens)
    return can.Message(
        timestamp=t,
        arbitration_id=can_id,
        is_extended_id=extended,
        dlc=length,
        data=data,
        is_fd=length > 8,
        channel=m.group("iface"),
    )


def _candump_error(line: str) -> bool:
    """True for a candump line whose id has CAN_ERR_FLAG: an error frame.

    python-can reads only those with the bus-error class bit as error frames;
    it masks the flag off the others and yields them as data frames of an
    unrelated 29-bit id (``20000004#...`` as id 0x4).
    """
    h = line.find("#")
    # The id is the 8 hex digits before "#"; CAN_ERR_FLAG is bit 1 of the first.
    return h >= 9 and line[h - 9] == " " and line[h - 8] in "2367abefABEF"


class ReplayBus(can.BusABC):
    """A recorded log behind python-can's bus interface (receive only).

    ``speed`` 0 hands frames out as fast as they are asked for; ``speed`` s > 0
    paces them at s times the recorded rate, measured on the monotonic clock.
    After the last frame :attr:`finished` is true and ``recv`` returns ``None``.
    A damaged log raises :class:`LogError` from ``recv``.  ``send`` always fails:
    a recording cannot transmit.
    """

    def __init__(self, channel: str, speed: float = 0.0, **kwargs: Any) -> None:
        if speed < 0:
            raise ValueError("replay speed must be >= 0")
        self.log = LogFile(channel)
        if not self.log.timed and speed > 0:
            raise ValueError(
                f"{channel}: candump output without timestamps cannot be played at a speed; "
                "record with `candump -l can0` or `candump -ta can0`"
            )
        self._messages = self.log.messages()
        self._speed = speed
        self._origin: tuple[float, float] | None = None
        self._held: can.Message | None = None
        self.finished = False
        self.channel_info = f"replay of {channel}"
        super().__init__(channel=channel, **kwargs)

    def _recv_internal(self, timeout: float | None) -> tuple[can.Message | None, bool]:
        if self._held is None:
            if self.finished:
                if timeout:
                    time.sleep(min(timeout, 0.05))
                return None, False
            try:
                msg = next(self._messages)
            except StopIteration:
                self.finished = True
                return None, False
            except LogError:
                self.finished = True
                raise
            if self._speed <= 0:
                return msg, False
            self._held = msg
        msg = self._held
        now = time.monotonic()
        if self._origin is None:
            self._origin = (now, msg.timestamp)
        wait = self._origin[0] + (msg.timestamp - self._origin[1]) / self._speed - now
        if timeout is not None and wait > timeout:
            # Not due yet: keep it, so a caller polling with a timeout stays responsive.
            time.sleep(timeout)
            return None, False
        if wait > 0:
            time.sleep(wait)
        self._held = None
        return msg, False

    def send(self, msg: can.Message, timeout: float | None = None) -> None:
        raise can.CanOperationError("a replayed log cannot transmit")

    def shutdown(self) -> None:
        self._messages.close()
        super().shutdown()
