"""Agent side of the kit link: read the kit ECU's serial port in the background.

The wire format is defined in :mod:`cngmrv.drivers.kit_codec`. This module only
moves bytes from the port into a :class:`~cngmrv.drivers.kit_codec.FrameDecoder`
and the decoded messages into a bounded queue, and keeps the port open through
unplugging, kit reboots and missing devices.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from typing import Any

import serial

from .kit_codec import PROTOCOL_VERSION, ROLE_AGENT, FrameDecoder, encode_message

log = logging.getLogger("cngmrv.kit")

Message = tuple[float, dict[str, Any]]


class KitSerialSource:
    """Reads the kit over pyserial in a background thread.

    Each decoded message is put on a bounded queue as
    ``(receive_monotonic_time, message_dict)``; the time is ``time.monotonic()``
    when the read that completed the frame returned, so all messages from one
    read share it.

    When the queue is full the *newest* message is dropped and counted in
    ``stats["queue_dropped"]``: the messages already queued stay contiguous,
    the gap is at the end where the counter and ``events`` report it, and the
    reader never has to take items away from under the consumer.

    If the port cannot be opened or goes away (``SerialException``/``OSError``,
    or anything unexpected), the thread logs once per outage to the
    ``cngmrv.kit`` logger, records an event, retries with exponential backoff
    between ``reconnect_backoff[0]`` and ``reconnect_backoff[1]`` seconds, and
    keeps running until :meth:`stop`.

    The queue also carries link markers, in order with the messages, so a
    consumer can place an outage between the last message before it and the
    first after: ``{"type": "link", "state": "down", "reason": text}`` once
    per outage (the port could not be opened, or was lost), and
    ``{"type": "link", "state": "up", "port": port}`` on every (re)connect.

    With ``handshake`` (the default) the source sends a HELLO (role agent,
    its protocol version) right after opening the port, so a kit that
    implements the handshake announces itself at once instead of within its
    10 s HELLO period (docs/kit-protocol.md, section 6).  That write is the
    only thing ever sent to the kit.

    ``port`` is a device path or any pyserial URL (``loop://``,
    ``socket://host:port``, ...), opened with ``serial.serial_for_url``.
    """

    def __init__(
        self,
        port: str,
        baudrate: int = 115200,
        read_timeout: float = 0.1,
        queue_size: int = 10000,
        reconnect_backoff: tuple[float, float] = (0.5, 30.0),
        max_events: int = 256,
        handshake: bool = True,
    ) -> None:
        lo, hi = reconnect_backoff
        if not 0 < lo <= hi:
            raise ValueError(f"reconnect_backoff must satisfy 0 < min <= max, got {lo!r}, {hi!r}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size!r}")
        self.port = port
        self.baudrate = baudrate
        self.read_timeout = read_timeout
        self.reconnect_backoff = (float(lo), float(hi))
        self.handshake = handshake
        self._tx_seq = 0
        self._t0 = time.monotonic()
        self._queue: queue.Queue[Message] = queue.Queue(maxsize=queue_size)
        self._decoder = FrameDecoder()
        # Guards the decoder and the counters below, which the reader thread
        # writes and `stats` reads from other threads.
        self._lock = threading.Lock()
        self._events: collections.deque[tuple[float, str]] = collections.deque(maxlen=max_events)
        self._queue_dropped = 0
        self._reconnects = 0
        self._outages = 0
        self._connected = False
        self._overflowing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._serial: Any = None

    # -- public interface -------------------------------------------------

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("KitSerialSource already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="cngmrv-kit-reader", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        port = self._serial
        if port is not None:
            # Wakes a read blocked in select() at once instead of after
            # read_timeout; harmless if the port is closing concurrently.
            try:
                port.cancel_read()
            except Exception:
                pass
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("kit reader thread did not stop within %.1f s", timeout)

    def get(self, timeout: float | None = None) -> Message | None:
        """Next message, or None if none arrived within ``timeout`` seconds."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def drain(self) -> list[Message]:
        """All messages queued right now, oldest first, without waiting."""
        out: list[Message] = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def pending(self) -> int:
        """Messages queued right now, for :meth:`drain` to take."""
        return self._queue.qsize()

    @property
    def stats(self) -> dict[str, int]:
        with self._lock:
            out = self._decoder.counters()
            out["queue_dropped"] = self._queue_dropped
            out["reconnects"] = self._reconnects
            out["outages"] = self._outages
            out["connected"] = int(self._connected)
        return out

    @property
    def events(self) -> list[tuple[float, str]]:
        """Outage, reconnect and overflow events as ``(monotonic time, text)``, oldest first.

        Only the most recent ``max_events`` are kept.
        """
        with self._lock:
            return list(self._events)

    @property
    def last_error(self) -> str | None:
        """Why the decoder rejected its most recent bad frame."""
        with self._lock:
            return self._decoder.last_error

    def __enter__(self) -> KitSerialSource:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- reader thread ----------------------------------------------------

    def _event(self, text: str) -> None:
        with self._lock:
            self._events.append((time.monotonic(), text))

    def _run(self) -> None:
        lo, hi = self.reconnect_backoff
        delay = lo
        outage_since: float | None = None
        while not self._stop.is_set():
            try:
                port = serial.serial_for_url(
                    self.port, baudrate=self.baudrate, timeout=self.read_timeout
                )
            except Exception as exc:
                outage_since = self._outage(outage_since, "cannot open", exc)
                self._stop.wait(delay)
                delay = min(delay * 2, hi)
                continue

            opened = time.monotonic()
            if outage_since is None:
                log.info("kit link connected on %s", self.port)
                self._event(f"connected: {self.port}")
            else:
                down = opened - outage_since
                log.info("kit link reconnected on %s after %.1f s", self.port, down)
                self._event(f"reconnected: {self.port} after {down:.1f} s")
            outage_since = None
            self._offer((opened, {"type": "link", "state": "up", "port": self.port}))
            with self._lock:
                # A frame cut off by the previous connection would otherwise
                # be glued to the first bytes of this one.
                self._decoder.resync()
                if self._outages > 0:
                    self._reconnects += 1
                self._connected = True
            self._serial = port
            frames_before = self._decoder.frames_ok
            try:
                if self.handshake:
                    self._send_hello(port)
                self._read_until_stopped(port)
            except Exception as exc:
                outage_since = self._outage(None, "lost", exc)
            finally:
                self._serial = None
                with self._lock:
                    self._connected = False
                try:
                    port.close()
                except Exception:
                    pass
            if self._stop.is_set():
                break
            # Only a connection that worked resets the backoff, so a port that
            # opens and fails at once is not hammered every `lo` seconds.
            if self._decoder.frames_ok > frames_before or time.monotonic() - opened >= hi:
                delay = lo
            self._stop.wait(delay)
            delay = min(delay * 2, hi)

    def _outage(self, since: float | None, what: str, exc: BaseException) -> float:
        """Record a failure; only the first one of an outage is logged and counted."""
        if since is not None:
            log.debug("kit link on %s still down: %s", self.port, exc)
            return since
        with self._lock:
            self._outages += 1
        expected = isinstance(exc, (serial.SerialException, OSError))
        log.log(
            logging.WARNING if expected else logging.ERROR,
            "kit link on %s %s: %s; retrying with backoff",
            self.port,
            what,
            exc,
            exc_info=not expected,
        )
        self._event(f"outage: {self.port} {what}: {exc}")
        now = time.monotonic()
        self._offer((now, {"type": "link", "state": "down", "reason": f"{what}: {exc}"}))
        return now

    def _send_hello(self, port: Any) -> None:
        tick_ms = int((time.monotonic() - self._t0) * 1000) & 0xFFFFFFFF
        hello = {"type": "hello", "role": ROLE_AGENT, "max_version": PROTOCOL_VERSION}
        port.write(encode_message({**hello, "seq": self._tx_seq, "tick_ms": tick_ms}))
        self._tx_seq = (self._tx_seq + 1) & 0xFFFF

    def _read_until_stopped(self, port: Any) -> None:
        while not self._stop.is_set():
            data = port.read(port.in_waiting or 1)
            if not data:
                continue
            now = time.monotonic()
            with self._lock:
                messages = self._decoder.feed(data)
            for message in messages:
                self._offer((now, message))

    def _offer(self, item: Message) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            with self._lock:
                self._queue_dropped += 1
                first = not self._overflowing
                self._overflowing = True
            if first:
                log.warning("kit message queue full (%d); dropping newest", self._queue.maxsize)
                self._event(f"queue full: dropping newest messages (size {self._queue.maxsize})")
            return
        if self._overflowing:
            with self._lock:
                self._overflowing = False
                dropped = self._queue_dropped
            self._event(f"queue accepting again; {dropped} messages dropped so far")
