"""The kernel's receive-queue drops on a SocketCAN socket, counted (``SO_RXQ_OVFL``).

When the agent falls behind (a stall while a batch is signed, a slow SD card,
a process stopped), the kernel queues the frames its filters pass in the
socket's receive buffer (``net.core.rmem_default``); once that is full it drops
the newest and counts them in the socket's ``sk_drops``.  No reader ever sees
those frames, so without that count they are silently missing.

With ``SO_RXQ_OVFL`` set, the kernel attaches the socket's cumulative drop
count (a ``u32``) as ancillary data to every frame queued after the first drop
(``sock_recv_drops`` in ``net/core/sock.c``; nothing is attached while the count
is 0).  So the count of the frames dropped during a stall arrives with the
first frame queued after it: exactly where the gap is in the frame stream.
Drops after the last frame ever queued are not seen until another frame comes.

Why python-can falls short: ``SocketcanBus`` never sets ``SO_RXQ_OVFL``, and
its ``capture_message`` asks ``recvmsg`` for room for one control message
(``SO_TIMESTAMPNS``) and asserts that exactly one came.  Setting the option on
its socket alone would make the kernel truncate the drop count away
(``MSG_CTRUNC``).  :class:`OverflowCountingBus` therefore sets the option and
overrides ``_recv_internal`` to read through :class:`_OverflowSocket`, which
asks for room for both messages, takes the drop count out and hands
python-can's own ``capture_message`` exactly what it expects; python-can still
decodes the frame and its timestamp.  (``SO_MEMINFO``'s ``SK_MEMINFO_DROPS``
would give the same count by polling, but a poll cannot put the drops in their
place among the frames, and it costs a system call whenever it is read.)

The count is per socket: a reopened bus starts again from 0.  It wraps at
2**32; :class:`DropCounter` takes differences modulo 2**32.
"""

from __future__ import annotations

import select
import socket
import struct
from collections.abc import Callable
from typing import Any

import can
from can.interfaces.socketcan import socketcan as _socketcan

__all__ = [
    "ANCILLARY_BUFFER_SIZE",
    "SO_RXQ_OVFL",
    "DropCounter",
    "OverflowCountingBus",
    "split_rxq_ovfl",
]

#: ``SO_RXQ_OVFL`` from the kernel's asm-generic/socket.h (x86, arm, arm64, riscv);
#: Python's socket module does not define it.
SO_RXQ_OVFL = 40
_U32 = struct.Struct("=I")
#: Room for the frame's ``SO_TIMESTAMPNS`` (a ``struct timespec``) and the drop count.
ANCILLARY_BUFFER_SIZE = socket.CMSG_SPACE(_socketcan.RECEIVED_TIMESTAMP_STRUCT.size) + (
    socket.CMSG_SPACE(_U32.size)
)

Ancillary = list[tuple[int, int, bytes]]
#: ``on_drops(new, total)``: ``new`` frames dropped since the last report, ``total`` on this socket.
DropCallback = Callable[[int, int], None]


def split_rxq_ovfl(ancdata: Ancillary) -> tuple[Ancillary, int | None]:
    """``recvmsg``'s control messages without the ``SO_RXQ_OVFL`` one, and its count.

    The count is ``None`` when the message carried none (no drop on the socket
    yet).  A drop-count message shorter than 4 bytes raises ``ValueError``: the
    kernel never sends one, so it is a bug to hear about, not to skip.
    """
    rest: Ancillary = []
    count: int | None = None
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_RXQ_OVFL:
            if len(data) < _U32.size:
                raise ValueError(f"SO_RXQ_OVFL control message of {len(data)} bytes, expected 4")
            (count,) = _U32.unpack_from(data)
        else:
            rest.append((level, kind, data))
    return rest, count


class DropCounter:
    """Turns the kernel's cumulative ``u32`` drop count into new drops, across its wrap.

    ``update(cumulative)`` returns the drops since the previous update (0 when
    the count did not move).  The socket's count starts at 0, and so does this.
    """

    def __init__(self) -> None:
        self.last = 0
        self.total = 0

    def update(self, cumulative: int) -> int:
        if not 0 <= cumulative <= 0xFFFFFFFF:
            raise ValueError(f"drop count {cumulative} is not a u32")
        new = (cumulative - self.last) & 0xFFFFFFFF
        self.last = cumulative
        self.total += new
        return new


class _OverflowSocket:
    """What python-can's ``capture_message`` reads from: the socket, drop count taken out.

    ``notify(new, total)`` is called when the count moved.
    """

    def __init__(self, sock: socket.socket, counter: DropCounter, notify: DropCallback) -> None:
        self._sock = sock
        self._counter = counter
        self._notify = notify

    def recvmsg(self, bufsize: int, ancbufsize: int = 0, flags: int = 0) -> Any:
        data, ancdata, msg_flags, addr = self._sock.recvmsg(bufsize, ANCILLARY_BUFFER_SIZE, flags)
        rest, cumulative = split_rxq_ovfl(ancdata)
        if cumulative is not None:
            new = self._counter.update(cumulative)
            if new:
                self._notify(new, self._counter.total)
        return data, rest, msg_flags, addr


class OverflowCountingBus(_socketcan.SocketcanBus):  # type: ignore[misc]
    """python-can's ``SocketcanBus`` that also counts the kernel's receive-queue drops.

    Opens like ``can.Bus(interface="socketcan", ...)`` and receives the same
    messages.  :attr:`dropped` is the socket's drop count so far; ``on_drops``
    (settable at any time) is called as ``on_drops(new, total)`` from the
    receiving thread, inside ``recv``, before the frame that carried the count
    is returned, so the drops come before that frame.  Raises ``OSError`` when
    the kernel refuses ``SO_RXQ_OVFL`` (every kernel since 2.6.33 has it).
    """

    def __init__(self, channel: str = "", on_drops: DropCallback | None = None, **kwargs: Any):
        super().__init__(channel=channel, **kwargs)
        self.on_drops = on_drops
        self._drops = DropCounter()
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
        except OSError:
            self.shutdown()
            raise
        self._reader = _OverflowSocket(self.socket, self._drops, self._dropped)

    @property
    def dropped(self) -> int:
        """Frames the kernel dropped on this socket's full receive queue (as reported so far)."""
        return self._drops.total

    def _dropped(self, new: int, total: int) -> None:
        if self.on_drops is not None:
            self.on_drops(new, total)

    def _recv_internal(self, timeout: float | None) -> tuple[can.Message | None, bool]:
        # python-can's own, reading through the drop-counting socket.
        try:
            ready, _, _ = select.select([self.socket], [], [], timeout)
        except OSError as error:
            raise can.CanOperationError(
                f"Failed to receive: {error.strerror}", error.errno
            ) from error
        if not ready:
            return None, self._is_filtered
        msg = _socketcan.capture_message(self._reader, self.channel == "")  # type: ignore[arg-type]
        if msg and not msg.channel and self.channel:
            msg.channel = self.channel
        return msg, self._is_filtered
