"""Recorded CAN logs: read any format python-can reads, strictly, with positions.

Auditors re-run years of recordings, so a damaged file must never pass as a
shorter clean one.  :class:`LogFile` wraps python-can's readers (candump
``.log``, ``.asc``, ``.blf``, ``.trc``, ``.csv``, ``.db``, ``.mf4`` with
``asammdf``, and any of them gzipped as ``.gz``) and turns what they do with a
damaged file into a :class:`LogError` that says where:

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

import gzip
import io
import logging
import re
import threading
import time
from collections.abc import Callable, Generator, Iterator
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
        if fmt not in _TEXT | _BINARY | _PATH_ONLY:
            known = ", ".join(sorted(_TEXT | _BINARY | _PATH_ONLY))
            raise ValueError(f"{self.path}: unknown log format {fmt or '(none)'} (known: {known})")
        if fmt in _PATH_ONLY and self.compressed:
            raise ValueError(f"{self.path}: a compressed {fmt} log cannot be read")
        self.format = fmt
        self.size = self.path.stat().st_size  # FileNotFoundError says which file
        self.read = 0
        self.ignored = 0
        self.skipped: dict[str, int] = {}
        self.first_t: float | None = None
        self.last_t: float | None = None
        self._raw: IO[bytes] | None = None
        self._lines: _LineCounter | None = None

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
        reader: Any = can.io.player.MESSAGE_READERS[self.format]
        if self.format in _PATH_ONLY:
            return reader(file=str(self.path))
        raw: IO[bytes] = open(self.path, "rb")  # noqa: SIM115 - closed by the reader's stop()
        self._raw = raw
        stream = cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb")) if self.compressed else raw
        if self.format in _TEXT:
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
