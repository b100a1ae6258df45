"""The kernel's receive-queue drop count (SO_RXQ_OVFL), from recvmsg's bytes up to the CAN source.

This host's kernel has no AF_CAN, so these tests give python-can's socketcan
bus a socket that returns what the kernel's ``raw_recvmsg`` returns (a CAN
frame, its ``SO_TIMESTAMPNS`` and, after a drop, the ``SO_RXQ_OVFL`` count);
everything above the socket is the real code.  The kernel's side (the option
accepted, the count sent after a real overflow) runs in the virtual bench:
hil_tests/test_systemd_bench.py::test_receive_queue_overflow_is_counted.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import can
import pytest
from can.interfaces.socketcan import constants
from can.interfaces.socketcan import socketcan as pycan_socketcan
from hypothesis import given
from hypothesis import strategies as st

from cngmrv.drivers import socketcan_drops
from cngmrv.drivers.can_source import CanSource
from cngmrv.drivers.socketcan_drops import (
    SO_RXQ_OVFL,
    DropCounter,
    OverflowCountingBus,
    split_rxq_ovfl,
)

LFE_ID = 0x18FEF200  # PGN 65266 from address 0


def timestamp_cmsg(t: float) -> tuple[int, int, bytes]:
    sec = int(t)
    return (
        socket.SOL_SOCKET,
        constants.SO_TIMESTAMPNS,
        struct.pack("@ll", sec, int((t - sec) * 1e9)),
    )


def drops_cmsg(n: int) -> tuple[int, int, bytes]:
    return (socket.SOL_SOCKET, SO_RXQ_OVFL, struct.pack("=I", n))


def frame(i: int) -> bytes:
    msg = can.Message(arbitration_id=LFE_ID, is_extended_id=True, data=i.to_bytes(8, "little"))
    return bytes(pycan_socketcan.build_can_frame(msg))


def test_the_drop_count_is_taken_out_and_the_timestamp_left() -> None:
    ts = timestamp_cmsg(1700000000.5)
    assert split_rxq_ovfl([ts, drops_cmsg(1234)]) == ([ts], 1234)
    assert split_rxq_ovfl([drops_cmsg(0xFFFFFFFF), ts]) == ([ts], 0xFFFFFFFF)
    assert split_rxq_ovfl([ts]) == ([ts], None)
    assert split_rxq_ovfl([]) == ([], None)


def test_a_short_drop_count_is_an_error() -> None:
    with pytest.raises(ValueError, match="SO_RXQ_OVFL control message of 2 bytes"):
        split_rxq_ovfl([(socket.SOL_SOCKET, SO_RXQ_OVFL, b"\x01\x00")])


@given(
    st.lists(
        st.tuples(
            st.sampled_from([socket.SOL_SOCKET, 0, 101, 263]),
            st.sampled_from([SO_RXQ_OVFL, constants.SO_TIMESTAMPNS, 0, 41]),
            st.binary(max_size=24),
        ),
        max_size=4,
    )
)
def test_any_control_messages_split_cleanly_or_fail_clearly(anc: list[Any]) -> None:
    try:
        rest, count = split_rxq_ovfl(anc)
    except ValueError as e:
        assert "SO_RXQ_OVFL" in str(e)
        return
    ours = [a for a in anc if a[0] == socket.SOL_SOCKET and a[1] == SO_RXQ_OVFL]
    assert rest == [a for a in anc if a not in ours]
    assert (count is None) == (not ours)
    if ours:
        assert count == struct.unpack_from("=I", ours[-1][2])[0]


@given(st.integers(0, 0xFFFFFFFF), st.lists(st.integers(0, 1_000_000), max_size=30))
def test_new_drops_add_up_across_the_u32_wrap(start: int, increments: list[int]) -> None:
    counter = DropCounter()
    assert counter.update(start) == start
    cumulative = start
    for inc in increments:
        cumulative = (cumulative + inc) & 0xFFFFFFFF
        assert counter.update(cumulative) == inc
    assert counter.total == start + sum(increments)


def test_a_count_that_is_not_a_u32_is_refused() -> None:
    with pytest.raises(ValueError, match="not a u32"):
        DropCounter().update(1 << 32)


class KernelCanSocket:
    """What the kernel's CAN_RAW socket hands ``recvmsg``, from a script.

    Readable (for ``select``) while the script has frames left; records the
    options set on it; refuses a control buffer too small for what the kernel
    would attach (the kernel would truncate it and set MSG_CTRUNC).
    """

    def __init__(self, script: list[tuple[bytes, list[tuple[int, int, bytes]]]]) -> None:
        self.script = list(script)
        self.options: dict[tuple[int, int], int] = {}
        self._r, self._w = socket.socketpair()
        self._w.send(b"x" * len(script))

    def fileno(self) -> int:
        return self._r.fileno()

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.options[(level, option)] = value

    def recvmsg(self, bufsize: int, ancbufsize: int = 0, flags: int = 0) -> Any:
        self._r.recv(1)
        data, anc = self.script.pop(0)
        needed = sum(socket.CMSG_SPACE(len(d)) for _, _, d in anc)
        assert ancbufsize >= needed, f"control buffer {ancbufsize} < {needed}: count truncated"
        return data[:bufsize], anc, 0, ("vcan0", 0)

    def close(self) -> None:
        self._r.close()
        self._w.close()


class Kernel:
    """The sockets python-can's socketcan bus opens: each the next script's :class:`KernelCanSocket`."""

    def __init__(self) -> None:
        self.scripts: list[list[tuple[bytes, list[tuple[int, int, bytes]]]]] = []
        self.made: list[KernelCanSocket] = []

    def create_socket(self) -> KernelCanSocket:
        self.made.append(KernelCanSocket(self.scripts.pop(0)))
        return self.made[-1]


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Iterator[Kernel]:
    """python-can's socketcan bus gets a :class:`KernelCanSocket` instead of an AF_CAN socket."""
    k = Kernel()
    monkeypatch.setattr(pycan_socketcan, "create_socket", k.create_socket)
    monkeypatch.setattr(pycan_socketcan, "bind_socket", lambda sock, channel: None)
    yield k
    for s in k.made:
        s.close()


def overflow_script(t0: float = 1700000000.0) -> list[tuple[bytes, list[tuple[int, int, bytes]]]]:
    """Frames 0 and 1, then 40 dropped (count 40 with frame 2), frame 3, 5 more dropped (45)."""
    return [
        (frame(0), [timestamp_cmsg(t0)]),
        (frame(1), [timestamp_cmsg(t0 + 0.1)]),
        (frame(2), [timestamp_cmsg(t0 + 2.0), drops_cmsg(40)]),
        (frame(3), [timestamp_cmsg(t0 + 2.1), drops_cmsg(40)]),
        (frame(4), [timestamp_cmsg(t0 + 2.2), drops_cmsg(45)]),
    ]


def test_the_bus_sets_the_option_and_reports_drops_before_their_frame(
    kernel: Kernel,
) -> None:
    kernel.scripts.append(overflow_script())
    seen: list[tuple[str, int, int]] = []
    bus = OverflowCountingBus(
        "vcan0", on_drops=lambda new, total: seen.append(("drops", new, total))
    )
    try:
        assert kernel.made[0].options[(socket.SOL_SOCKET, SO_RXQ_OVFL)] == 1
        for i in range(5):
            msg = bus.recv(1.0)
            assert msg is not None
            assert msg.arbitration_id == LFE_ID and msg.is_extended_id
            assert msg.data == bytearray(i.to_bytes(8, "little"))
            assert msg.channel == "vcan0"
            seen.append(("frame", i, 0))
        assert bus.recv(0.0) is None
    finally:
        bus.shutdown()
    assert seen == [
        ("frame", 0, 0),
        ("frame", 1, 0),
        ("drops", 40, 40),
        ("frame", 2, 0),
        ("frame", 3, 0),
        ("drops", 5, 45),
        ("frame", 4, 0),
    ]
    assert bus.dropped == 45


def test_python_can_still_decodes_the_timestamp() -> None:
    sock = KernelCanSocket([(frame(7), [timestamp_cmsg(1700000123.25), drops_cmsg(3)])])
    counter = DropCounter()
    reported: list[tuple[int, int]] = []
    reader = socketcan_drops._OverflowSocket(sock, counter, lambda *d: reported.append(d))
    msg = pycan_socketcan.capture_message(reader)  # type: ignore[arg-type]
    sock.close()
    assert msg is not None
    assert msg.timestamp == pytest.approx(1700000123.25)
    assert counter.total == 3
    assert reported == [(3, 3)]


def test_the_can_source_counts_kernel_drops_and_records_an_event_in_place(
    kernel: Kernel,
) -> None:
    kernel.scripts.append(overflow_script())
    source = CanSource(lambda: OverflowCountingBus("vcan0"), listen_only=True)
    source.start()
    try:
        deadline = time.monotonic() + 10.0
        while source.stats["frames"] < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        source.stop()
    assert source.stats["frames"] == 5
    assert source.stats["kernel_dropped"] == 45
    assert source.stats["queue_dropped"] == 0
    overflows = [e for e in source.events() if e["kind"] == "CAN_RX_OVERFLOW"]
    assert [(e["frames"], e["dropped"], e["socket_dropped"]) for e in overflows] == [
        (2, 40, 40),
        (4, 5, 45),
    ]
