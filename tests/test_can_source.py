"""CAN sources on real python-can buses: filters, the bounded queue, the supervisor, requests."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import can
import pytest
from can.interfaces.virtual import VirtualBus

from cngmrv.drivers import j1939
from cngmrv.drivers.can_source import (
    LISTEN_POLL_S,
    CanSource,
    RequestPlan,
    SourceSettings,
    j1939_filters,
    make_source,
    open_bus,
)
from cngmrv.drivers.canlink import parse_ip_link

GEARBOX_NAME = 0x7777 | (512 << 21) | (3 << 40) | (1 << 60) | (1 << 63)


def until(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Wait for ``cond`` (a guard against hanging, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.fixture
def channel() -> str:
    return f"cngmrv-test-{uuid.uuid4().hex[:8]}"


def frame(can_id: int, t: float, data: bytes = bytes(8), extended: bool = True) -> can.Message:
    return can.Message(timestamp=t, arbitration_id=can_id, data=data, is_extended_id=extended)


def test_filters_accept_exactly_the_pgns_asked_for(channel: str) -> None:
    # python-can applies can_filters with the kernel's rule ((id ^ can_id) & mask == 0,
    # extended flag included), so a virtual bus shows what SocketCAN would let through.
    pgns = {j1939.PGN_LFE, j1939.PGN_TP_CM, j1939.PGN_EEC1}
    rx = can.Bus(interface="virtual", channel=channel, can_filters=j1939_filters(pgns))
    tx = can.Bus(interface="virtual", channel=channel)
    wanted = [
        0x18FEF200,  # LFE from SA 0
        0x18FEF255,  # LFE from SA 0x55
        0x1CECFF00,  # TP.CM BAM to everyone
        0x1CEC3D17,  # TP.CM to 0x3D (PDU1: any destination)
        0x0CF00400,  # EEC1
        0x00F00400,  # EEC1 at priority 0
    ]
    unwanted = [
        0x18FEF100,  # CCVS
        0x0DF00400,  # data page set: PGN 0x1F004, not EEC1
        0x1CEBFF00,  # TP.DT (not asked for)
        0x18FEF300,  # the PGN next to LFE
    ]
    for i, can_id in enumerate(wanted + unwanted):
        tx.send(frame(can_id, i))
    tx.send(frame(0x400, 99, extended=False))  # 11-bit, same low bits as EEC1's PS
    got = []
    while (msg := rx.recv(0.1)) is not None:
        got.append(msg.arbitration_id)
    rx.shutdown()
    tx.shutdown()
    assert got == wanted


def test_open_bus_puts_filters_only_on_socketcan() -> None:
    with pytest.raises(OSError):
        # No CAN here (no can0, often no AF_CAN at all): a real OSError, as on a
        # gateway whose USB adapter is unplugged.
        open_bus("socketcan", "cngmrvnope0", pgns={j1939.PGN_LFE})
    with pytest.raises(ValueError, match="out of range"):
        j1939_filters([1 << 18])


def test_frames_carry_bus_time_and_monotonic_receive_time(channel: str) -> None:
    tx = can.Bus(interface="virtual", channel=channel, preserve_timestamps=True)
    src = CanSource(lambda: can.Bus(interface="virtual", channel=channel))
    src.start()
    before = time.monotonic()
    tx.send(frame(0x18FEF200, 1234.5))
    tx.send(frame(0x123, 1234.6, extended=False))
    assert until(lambda: src.stats["frames"] + src.stats["ignored"] == 2)
    after = time.monotonic()
    [(t, can_id, data, mono)] = src.drain()
    src.stop()
    tx.shutdown()
    assert (t, can_id, data) == (1234.5, 0x18FEF200, bytes(8))
    assert before <= mono <= after
    assert src.stats["ignored"] == 1


def test_queue_is_bounded_and_counts_what_it_drops(channel: str) -> None:
    tx = can.Bus(interface="virtual", channel=channel, preserve_timestamps=True)
    src = CanSource(lambda: can.Bus(interface="virtual", channel=channel), queue_size=10)
    src.start()
    for i in range(50):
        tx.send(frame(0x18FEF200, 1000 + i))
    assert until(lambda: src.stats["frames"] + src.stats["queue_dropped"] == 50)
    kept = src.drain()
    src.stop()
    tx.shutdown()
    assert src.stats == {**src.stats, "frames": 10, "queue_dropped": 40}
    assert [f[0] for f in kept] == [1000 + i for i in range(10)]  # the newest are dropped


def test_bus_failure_is_an_outage_and_the_source_reopens(channel: str) -> None:
    opened: list[can.BusABC] = []

    def opener() -> can.BusABC:
        opened.append(can.Bus(interface="virtual", channel=channel))
        return opened[-1]

    tx = can.Bus(interface="virtual", channel=channel, preserve_timestamps=True)
    src = CanSource(opener, backoff_s=0.02, backoff_max_s=0.1)
    src.start()
    for i in range(100):
        tx.send(frame(0x18FEF200, 1000 + i))
    assert until(lambda: src.stats["frames"] == 100)
    # Shut the source's bus down underneath it, as a dying driver would.
    opened[-1].shutdown()
    for i in range(100, 120):  # on the wire while nobody listens: may be lost
        tx.send(frame(0x18FEF200, 1000 + i))
    assert until(lambda: len(opened) == 2 and src.bus is opened[1])
    for i in range(120, 220):
        tx.send(frame(0x18FEF200, 1000 + i))
    assert until(lambda: src.stats["frames"] >= 200)
    src.stop()
    tx.shutdown()
    got = [f[0] for f in src.drain(10**6)]
    events = src.events()
    assert [e["kind"] for e in events] == ["CAN_DOWN", "CAN_UP"]
    assert "closed bus" in events[0]["reason"] and events[0]["frames"] == 100
    assert events[1]["outage_s"] >= 0 and events[1]["attempts"] >= 1
    assert src.stats["outages"] == 1 and src.alive is False
    # Nothing before or after the outage is lost; order is kept.
    assert got[:100] == [1000 + i for i in range(100)]
    assert got[-100:] == [1000 + i for i in range(120, 220)]
    assert got == sorted(got)


def test_an_absent_interface_is_retried_with_backoff_not_fatal() -> None:
    src = CanSource(
        lambda: open_bus("socketcan", "cngmrvnope0"), backoff_s=0.005, backoff_max_s=0.02
    )
    src.start()  # must not raise: the gateway may boot before its adapter is ready
    assert until(lambda: src.stats["reopen_failures"] >= 3)
    assert src.alive and src.bus is None
    src.stop()
    [down] = src.events()
    assert down["kind"] == "CAN_DOWN" and "open failed: OSError" in down["reason"]
    assert src.error is not None


def test_an_unknown_interface_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="unknown CAN interface"):
        make_source(SourceSettings(interface="socketcann"))


def test_kernel_bus_off_is_an_outage_until_the_link_recovers(channel: str, tmp_path: Path) -> None:
    # The kernel's state comes from ``ip`` JSON; here a file we rewrite stands for it.
    state = tmp_path / "ip.json"

    def ip(can_state: str) -> str:
        link = {
            "ifname": "can0",
            "flags": ["NOARP", "UP", "LOWER_UP"],
            "operstate": "UP",
            "linkinfo": {
                "info_kind": "can",
                "info_data": {"state": can_state, "ctrlmode": ["LISTEN-ONLY"]},
                "info_xstats": {"bus_off": 1},
            },
            "stats64": {"rx": {"dropped": 4, "over_errors": 2}},
        }
        return json.dumps([link])

    def set_state(can_state: str) -> None:
        # Atomically, so the monitor never reads a half-written file.
        tmp = tmp_path / "ip.json.tmp"
        tmp.write_text(ip(can_state))
        os.replace(tmp, state)

    set_state("ERROR-ACTIVE")
    opened: list[can.BusABC] = []

    def opener() -> can.BusABC:
        opened.append(can.Bus(interface="virtual", channel=channel))
        return opened[-1]

    src = CanSource(
        opener,
        backoff_s=0.01,
        backoff_max_s=0.02,
        link=lambda: parse_ip_link(state.read_text(), "can0"),
        link_poll_s=0.01,
    )
    src.start()
    # The monitor sets the link state before it copies the kernel's counters.
    assert until(lambda: src.link_state is not None and src.link_state.ok and src.stats["kernel"])
    assert src.stats["kernel"] == {"rx_dropped": 4, "rx_over_errors": 2, "bus_off": 1}
    set_state("BUS-OFF")
    assert until(lambda: src.stats["outages"] == 1)
    assert until(lambda: src.stats["reopen_failures"] >= 2)
    assert len(opened) == 1  # no reopen while the controller is bus-off
    set_state("ERROR-ACTIVE")
    assert until(lambda: len(opened) == 2 and src.bus is not None)
    src.stop()
    events = src.events()
    kinds = [e["kind"] for e in events]
    assert kinds.index("CAN_DOWN") < kinds.index("CAN_UP")
    down = next(e for e in events if e["kind"] == "CAN_DOWN")
    assert "BUS-OFF" in down["reason"]
    states = [e["state"] for e in events if e["kind"] == "CAN_STATE"]
    assert states == ["ERROR-ACTIVE", "BUS-OFF", "ERROR-ACTIVE"]


def test_replay_source_waits_for_room_instead_of_dropping(tmp_path: Path) -> None:
    log = tmp_path / "short.log"
    log.write_text(
        "".join(
            f"({1000 + i * 0.01:.6f}) can0 18FEF200#{i % 256:02X}00FFFFFFFFFFFF\n"
            for i in range(500)
        )
    )
    src = make_source(SourceSettings(interface="replay", channel=str(log), queue_size=8))
    src.start()
    got = []
    while not (src.finished and not src.pending()):
        got.extend(src.wait(0.05))
        time.sleep(0.001)
    src.stop()
    assert len(got) == 500 and src.stats["queue_dropped"] == 0
    assert [f[0] for f in got] == [f[3] for f in got]  # a recording's only clock is its own
    with pytest.raises(can.CanOperationError):
        src_bus = make_source(SourceSettings(interface="replay", channel=str(log)))
        src_bus.start()
        try:
            assert src_bus.bus is not None
            src_bus.bus.send(frame(0x18EA00F9, 0.0, b"\xe9\xfe\x00"))
        finally:
            src_bus.stop()


def test_requests_are_refused_in_listen_only_mode() -> None:
    with pytest.raises(ValueError, match="listen_only"):
        CanSource(
            lambda: can.Bus(interface="virtual", channel="unused"),
            requests=RequestPlan(GEARBOX_NAME, 0x4A),
        )


def test_requests_claim_an_address_first_and_stop_when_it_is_lost(channel: str) -> None:
    observer = can.Bus(interface="virtual", channel=channel)
    src = CanSource(
        lambda: can.Bus(interface="virtual", channel=channel),
        listen_only=False,
        requests=RequestPlan(GEARBOX_NAME, 0x4A, period_s=0.05),
    )
    src.start()
    seen: list[can.Message] = []

    def requests_seen() -> int:
        while (msg := observer.recv(0)) is not None:
            seen.append(msg)
        return sum(1 for m in seen if j1939.parse_id(m.arbitration_id).pgn == j1939.PGN_REQUEST)

    assert until(lambda: requests_seen() >= 4)
    claim = seen[0]
    assert j1939.parse_id(claim.arbitration_id) == j1939.J1939Id(
        6, j1939.PGN_ADDRESS_CLAIMED, 0x4A, 255
    )
    assert bytes(claim.data) == GEARBOX_NAME.to_bytes(8, "little")
    asked = {bytes(m.data) for m in seen[1:]}
    assert asked == {b"\xe5\xfe\x00", b"\xe9\xfe\x00"}  # HOURS 65253, LFC 65257
    assert all(j1939.parse_id(m.arbitration_id).source == 0x4A for m in seen[1:])
    # An ECU with a lower NAME claims 0x4A: the agent yields and goes quiet.
    observer.send(
        frame(j1939.make_id(j1939.PGN_ADDRESS_CLAIMED, 0x4A), 0.0, (1).to_bytes(8, "little"))
    )

    def gave_up() -> bool:
        requests_seen()
        return any(j1939.parse_id(m.arbitration_id).source == 254 for m in seen)

    assert until(gave_up)
    n = requests_seen()
    time.sleep(0.3)  # several request periods
    assert requests_seen() == n
    src.stop()
    observer.shutdown()


def test_paced_replay_holds_a_frame_until_it_is_due(tmp_path: Path) -> None:
    from cngmrv.drivers.can_logs import ReplayBus

    log = tmp_path / "two.log"
    log.write_text("(1000.000000) can0 18FEF200#01\n(1000.100000) can0 18FEF200#02\n")
    bus = ReplayBus(str(log), speed=0.001)  # 0.1 s of recording = 100 s of replay
    try:
        first = bus.recv(0.01)
        assert first is not None and bytes(first.data) == b"\x01"
        assert bus.recv(0.01) is None and not bus.finished  # held back, not lost
    finally:
        bus.shutdown()
    fast = ReplayBus(str(log))
    assert [bytes(m.data) for m in iter(lambda: fast.recv(0.01), None)] == [b"\x01", b"\x02"]
    assert fast.finished
    fast.shutdown()
    with pytest.raises(ValueError, match="speed"):
        ReplayBus(str(log), speed=-1)


def test_udp_multicast_bus_broken_underneath_is_reopened() -> None:
    # Across processes the simulation uses udp_multicast.  A socket closed there
    # surfaces from recv() as ValueError (negative fd) or OSError (EBADF), never as
    # CanError: still an outage, still reopened.
    rnd = uuid.uuid4().int
    group, port = f"239.74.{rnd % 250 + 1}.{(rnd >> 8) % 250 + 1}", 40000 + (rnd >> 16) % 20000
    opened: list[can.BusABC] = []

    def opener() -> can.BusABC:
        opened.append(can.Bus(interface="udp_multicast", channel=group, port=port))
        return opened[-1]

    try:
        tx = can.Bus(interface="udp_multicast", channel=group, port=port)
    except (OSError, can.CanError) as e:
        pytest.skip(f"no IPv4 multicast on this machine: {e}")
    src = CanSource(opener, backoff_s=0.02, backoff_max_s=0.05)
    src.start()
    try:
        for i in range(50):
            tx.send(frame(0x18FEF200, 0.0, bytes([i] * 8)))
        assert until(lambda: src.stats["frames"] == 50)
        opened[-1].shutdown()
        assert until(lambda: len(opened) == 2 and src.bus is opened[1])
        for i in range(50, 100):
            tx.send(frame(0x18FEF200, 0.0, bytes([i] * 8)))
        assert until(lambda: src.stats["frames"] == 100)
    finally:
        src.stop()
        tx.shutdown()
    got = [f[2][0] for f in src.drain()]
    assert got == list(range(100))
    down, up = [e for e in src.events() if e["kind"] in ("CAN_DOWN", "CAN_UP")]
    assert down["kind"] == "CAN_DOWN" and down["reason"].startswith(("ValueError", "OSError"))
    assert up["kind"] == "CAN_UP"


def test_a_device_that_sends_requests_also_hears_them() -> None:
    quiet = SourceSettings()
    assert quiet.filter_pgns is not None and j1939.PGN_REQUEST not in quiet.filter_pgns
    talking = SourceSettings(listen_only=False, requests=RequestPlan(GEARBOX_NAME, 0x4A))
    assert talking.filter_pgns is not None and j1939.PGN_REQUEST in talking.filter_pgns
    assert SourceSettings(pgns=None, requests=RequestPlan(GEARBOX_NAME, 0x4A)).filter_pgns is None


def test_a_waiting_consumer_is_woken_per_batch_not_per_frame(channel: str) -> None:
    tx = can.Bus(interface="virtual", channel=channel)
    src = CanSource(can.Bus(interface="virtual", channel=channel), poll_s=0.01, wake_after=5)
    src.start()
    got: list[list[tuple[float, int, bytes, float]]] = []
    waiter = threading.Thread(target=lambda: got.append(src.wait(60.0)))
    try:
        waiter.start()
        for i in range(4):
            tx.send(frame(0x18FEF200, 1000 + i))
        assert until(lambda: src.stats["frames"] == 4)
        # Four queued, fewer than wake_after: the consumer sleeps on.
        waiter.join(0.3)
        assert waiter.is_alive()
        tx.send(frame(0x18FEF200, 1004))
        # The fifth wakes it, long before its timeout; it takes all five.
        waiter.join(30.0)
        assert not waiter.is_alive()
        assert [len(batch) for batch in got] == [5]
    finally:
        src.stop()
        tx.shutdown()
        waiter.join()


def test_wake_after_must_fit_the_queue(channel: str) -> None:
    bus = can.Bus(interface="virtual", channel=channel)
    try:
        with pytest.raises(ValueError, match="wake_after"):
            CanSource(bus, queue_size=8, wake_after=9)
    finally:
        bus.shutdown()


class CountingBus(VirtualBus):  # type: ignore[misc]
    """A virtual bus that counts the reader's receive calls: its wake-ups."""

    receives = 0

    def _recv_internal(self, timeout: float | None) -> tuple[can.Message | None, bool]:
        self.receives += 1
        return super()._recv_internal(timeout)  # type: ignore[no-any-return]


def test_a_listening_reader_on_a_silent_bus_wakes_a_few_times_a_second(channel: str) -> None:
    bus = CountingBus(channel=channel)
    src = CanSource(bus)
    src.start()
    try:
        time.sleep(2.0)
    finally:
        src.stop()
    # At most one wake-up per LISTEN_POLL_S (and one for the stop): every 0.05 s, as it
    # was, is 40 in these 2 s.
    assert bus.receives <= 2.0 / LISTEN_POLL_S + 2
