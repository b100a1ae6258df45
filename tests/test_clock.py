"""Time on a board with no RTC: clock states, signed step events, GPS time.

The acceptance run steps a (test-controlled) wall clock by +1 h and -1 h in
the middle of a simulated run and checks that the readings keep their order
and totals, and that both steps are signed into the batches with their sign.
"""

from __future__ import annotations

import os
import threading
import time
import tty
import uuid
from pathlib import Path
from typing import Any

import can
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cngmrv.agent import config
from cngmrv.agent.clock import (
    INFORMATIVE,
    SYNCHRONISED,
    UNKNOWN,
    ClockMonitor,
    GpsSource,
    NoSource,
    NtpSource,
)
from cngmrv.agent.runtime import Agent
from cngmrv.drivers import j1939
from cngmrv.drivers import kit_codec as kc
from cngmrv.drivers.gps import Fix, GpsReader, NmeaError, checksum, parse_rmc
from cngmrv.signed import batch, keys
from cngmrv.sim.drive import TICK_S, drive
from cngmrv.sim.ecu import EngineEcu
from cngmrv.sim.kit import KitFirmware, KitLogic
from cngmrv.sim.vehicle import CityBus, CityBusParams, DriveCycle

NOW = 1_790_000_000.0  # 2026-09-21


class FakeClock:
    """A wall clock the test can step, over a monotonic clock that only runs forward."""

    def __init__(self, wall0: float = NOW) -> None:
        self.offset = wall0 - time.monotonic()

    def wall(self) -> float:
        return time.monotonic() + self.offset

    def step(self, seconds: float) -> None:
        self.offset += seconds


def _sentence(body: str) -> str:
    return f"${body}*{checksum(body):02X}\r\n"


# -- the monitor on its own ---------------------------------------------


def test_states_follow_the_wall_clock_and_the_source() -> None:
    fake = FakeClock(wall0=86400.0)  # a Pi that booted in 1970

    class Flag:
        ok = True

        def synchronised(self, wall: float, mono: float) -> bool:
            return self.ok

    flag = Flag()
    m = ClockMonitor(flag, wall=fake.wall)
    assert m.state == UNKNOWN
    m.poll()
    assert m.state == UNKNOWN, "a 1970 clock is unknown whatever a source says"
    fake.step(NOW - 86400.0)
    events = m.poll()
    assert m.state == SYNCHRONISED
    assert len(events) == 1 and events[0]["step_s"] > 50 * 365 * 86400
    flag.ok = False
    assert m.poll() == [] and m.state == INFORMATIVE


@pytest.mark.parametrize("step", [3600.0, -3600.0, 2.5, -1.5])
def test_a_step_is_one_event_with_its_sign(step: float) -> None:
    fake = FakeClock()
    m = ClockMonitor(NoSource(), step_threshold_s=1.0, wall=fake.wall)
    m.poll()
    assert m.poll() == []
    fake.step(step)
    (ev,) = m.poll()
    assert ev["kind"] == "CLOCK_STEP"
    assert ev["step_s"] == pytest.approx(step, abs=0.05)
    assert ev["after"] - ev["before"] == pytest.approx(step, abs=0.05)
    assert m.poll() == [] and m.steps == 1


def test_a_change_below_the_threshold_is_not_a_step() -> None:
    fake = FakeClock()
    m = ClockMonitor(NoSource(), step_threshold_s=1.0, wall=fake.wall)
    m.poll()
    fake.step(0.5)
    assert m.poll() == [] and m.steps == 0


def test_ntp_source_reads_the_kernel_without_privilege() -> None:
    # Whatever this machine's NTP state, the call works and gives a bool.
    assert NtpSource().synchronised(time.time(), time.monotonic()) in (True, False)


# -- GPS ------------------------------------------------------------------


def test_rmc_gives_utc_and_validity() -> None:
    fix = parse_rmc(_sentence("GPRMC,123519.50,A,4807.038,N,01131.000,E,022.4,084.4,230394,,"))
    # 1994-03-23T12:35:19.5Z, 22.4 knots
    assert fix == Fix(utc=764426119.5, valid=True, speed_kmh=pytest.approx(22.4 * 1.852))
    fix = parse_rmc(_sentence("GNRMC,000000,V,,,,,,,010125,,,N"))
    assert fix is not None and not fix.valid
    assert parse_rmc(_sentence("GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,,,,")) is None


@pytest.mark.parametrize(
    "line",
    [
        "GPRMC,123519,A,,,,,,,230394,,",  # no checksum
        "$GPRMC,123519,A,,,,,,,230394,,*00",  # wrong checksum
        _sentence("GPRMC,123519,X,,,,,,,230394,,"),
        _sentence("GPRMC,123519,A,,,,,,,300294,,"),  # 30 February
        _sentence("GPRMC,256019,A,,,,,,,230394,,"),
        _sentence("GPRMC,12,A,,,,,,,230394,,"),
        _sentence("GPRMC,123519,A"),
    ],
)
def test_bad_sentences_are_refused_with_a_reason(line: str) -> None:
    with pytest.raises(NmeaError):
        parse_rmc(line)


@given(st.text(max_size=100))
def test_parser_never_raises_anything_else_on_text(text: str) -> None:
    try:
        parse_rmc(text)
    except NmeaError:
        pass


@given(st.lists(st.sampled_from("GPRMC,0123456789.AVNESW*$"), max_size=60))
def test_parser_never_raises_anything_else_on_near_sentences(chars: list[str]) -> None:
    body = "".join(chars)
    for line in (body, _sentence(body)):
        try:
            parse_rmc(line)
        except NmeaError:
            pass


@given(
    st.datetimes(
        min_value=__import__("datetime").datetime(2000, 1, 1),
        max_value=__import__("datetime").datetime(2079, 12, 31),
    )
)
def test_rmc_time_round_trips(dt: Any) -> None:
    import calendar

    dt = dt.replace(microsecond=dt.microsecond // 10000 * 10000)
    body = f"GPRMC,{dt:%H%M%S}.{dt.microsecond // 10000:02d},A,,,,,,,{dt:%d%m%y},,"
    fix = parse_rmc(_sentence(body))
    assert fix is not None
    want = calendar.timegm(dt.timetuple()) + dt.microsecond / 1e6
    assert fix.utc == pytest.approx(want, abs=1e-6)


def test_gps_over_a_serial_port_confirms_or_contradicts_the_clock() -> None:
    master, slave = os.openpty()
    tty.setraw(slave)
    reader = GpsReader(os.ttyname(slave), 9600, reconnect_s=0.05)
    reader.start()
    try:
        fake = FakeClock(wall0=time.time())
        source = GpsSource(reader, max_age_s=5.0, tolerance_s=1.0)
        m = ClockMonitor(source, wall=fake.wall)
        m.poll()
        assert m.state == INFORMATIVE, "no fix yet"
        _wait(lambda: reader.stats["opens"] == 1)
        os.write(master, b"garbage\r\n")
        _send_fix(master, fake.wall())
        _wait(lambda: reader.stats["fixes"] == 1)
        m.poll()
        assert m.state == SYNCHRONISED
        assert reader.stats["errors"] == 1
        fake.step(30.0)  # the wall clock is now 30 s off GPS
        m.poll()
        assert m.state == INFORMATIVE
        assert source.offset_s == pytest.approx(30.0, abs=1.5)
    finally:
        reader.stop()
        os.close(master)
        os.close(slave)


def _send_fix(fd: int, utc: float) -> None:
    t = time.gmtime(utc)
    cs = int(utc % 1 * 100)
    os.write(
        fd,
        _sentence(
            f"GPRMC,{time.strftime('%H%M%S', t)}.{cs:02d},A,,,,,,,{time.strftime('%d%m%y', t)},,"
        ).encode(),
    )


def _wait(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# -- in a simulated run ---------------------------------------------------


def _rig(
    tmp_path: Path, device_id: str, per_batch: int, **sections: dict[str, Any]
) -> tuple[Any, str, int, int]:
    """Key, a fresh virtual-bus channel, a raw pty for the kit, and the agent's config."""
    keydir = tmp_path / "keys"
    if not keydir.exists():
        keys.generate(keydir)
    channel = f"cngmrv-clock-{uuid.uuid4().hex[:8]}"
    master, slave = os.openpty()
    tty.setraw(slave)
    port = tmp_path / "ttyKIT"
    port.symlink_to(os.ttyname(slave))
    cfg = config.from_mapping(
        {
            "device": {"id": device_id, "key_file": "keys/device.key"},
            "can": {"interface": "virtual", "channel": channel},
            "kit": {"port": str(port), "reconnect_min_s": 0.02, "reconnect_max_s": 0.2},
            "store": {"path": "store.sqlite"},
            "batch": {"readings_per_batch": per_batch},
            **sections,
        },
        tmp_path,
    )
    return cfg, channel, master, slave


def _simulated_run(
    tmp_path: Path, monitor: ClockMonitor, steps: dict[int, float], fake: FakeClock
) -> tuple[Agent, Path]:
    """40 s of bus time, as fast as the agent keeps up; ``steps``: tick -> wall-clock step."""
    cfg, channel, master, slave = _rig(tmp_path, "bus-clock", 5)
    sim_bus = can.Bus(interface="virtual", channel=channel, preserve_timestamps=True)
    agent = Agent(cfg, clock=monitor)
    stop = threading.Event()
    worker = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    try:
        agent.start()
        worker.start()
        assert agent.kit is not None
        kit_link = agent.kit
        _wait(lambda: kit_link.stats["connected"] == 1)
        logic = KitLogic()
        vehicle = CityBus(CityBusParams(), DriveCycle.brt(60.0, 7), controller=logic)
        # Bus time is the frames' own and fixed, whatever the wall clock does.
        ecu = EngineEcu(sim_bus, vehicle, NOW)
        stats = agent.pipeline.stats
        kit = KitFirmware(master, logic, boot=False)
        for i, s in drive(vehicle, int(40.0 / TICK_S) + 1, speedup=0):
            if i in steps:
                seen = agent.clock.steps
                fake.step(steps[i])
                _wait(lambda seen=seen: agent.clock.steps > seen)  # type: ignore[misc]
            ecu.tick(i, s)
            if i == 0:
                # The kit speaks only after a frame is in: before any, its time
                # is anchored on the receive (wall) clock, months from this run's
                # fixed bus time, and would close every window on its own.
                _wait(lambda: stats.frames > 0)
                kit.boot()
            kit.tick(i, s)
            while (
                ecu.frames_sent - stats.frames > 100
                or kit.counts.intact_by_type.get("status", 0) - stats.kit_status > 10
            ):
                time.sleep(0.001)
        _wait(lambda: stats.frames >= ecu.frames_sent and stats.kit_messages >= kit.counts.intact)
        stop.set()
        worker.join()
        agent.close()
    finally:
        stop.set()
        sim_bus.shutdown()
        os.close(master)
        os.close(slave)
    return agent, tmp_path / "store.sqlite"


def _signed(tmp_path: Path, store: Path) -> list[dict[str, Any]]:
    from cngmrv.signed.archive import open_readonly

    db = open_readonly(store)
    try:
        raws = [(str(s), bytes(b)) for s, b in db.execute("SELECT seq, bytes FROM batches")]
    finally:
        db.close()
    report = batch.verify_set(raws, keys.load_public_key(tmp_path / "keys" / keys.PUB_FILE))
    assert report.passed and not report.gaps, (report.bad, report.gaps)
    return [batch.parse(raw).payload() for _, raw in raws]


def _same_figures(
    readings: list[dict[str, Any]], start: float, ref: list[dict[str, Any]], ref_start: float
) -> None:
    """Window by window, the same CAN figures; the same gas over the run.

    The windows at either end depend on which last frames made it in before
    the stop, so only those inside the drive are compared.  The kit's clock is
    anchored to the bus time when its first message arrives, which varies by
    a few ms between two runs, so its samples may fall either side of a window
    edge: gas is compared over the run (a step that reached the kit's anchor
    would move it by an hour, and the gas out of the run).
    """
    twins = {round(r["t0"] - ref_start): r for r in ref}
    inner = [r for r in readings if 0 <= r["t0"] - start <= (ref[-1]["t0"] - ref_start) - 2]
    assert len(inner) >= 4
    for r in inner:
        twin = twins[round(r["t0"] - start)]
        for k in ("diesel_l", "distance_km", "engine_rev"):
            # ~1e-7 s: the float rounding of an epoch-sized subtraction in a rebase.
            assert r[k] == pytest.approx(twin[k], rel=1e-6, abs=1e-12), k
    gas = sum(r["gas_kg"] for r in inner)
    assert gas == pytest.approx(
        sum(twins[round(r["t0"] - start)]["gas_kg"] for r in inner), rel=0.05
    )
    assert gas > 0 and sum(r["diesel_l"] for r in inner) > 0


def _contiguous(readings: list[dict[str, Any]]) -> None:
    t0s = [r["t0"] for r in readings]
    assert t0s == pytest.approx([t0s[0] + i for i in range(len(t0s))], abs=1e-6), (
        "readings reordered, repeated or gapped"
    )


def test_clock_steps_during_a_run_are_signed_and_change_no_total(tmp_path: Path) -> None:
    """Frames with the simulator's own bus time: the monitor only flags and signs."""
    fake_ref = FakeClock()
    ref, ref_store = _simulated_run(
        tmp_path / "ref", ClockMonitor(NoSource(), wall=fake_ref.wall), {}, fake_ref
    )
    fake = FakeClock()
    agent, store = _simulated_run(
        tmp_path / "stepped",
        ClockMonitor(NoSource(), wall=fake.wall),
        {1000: 3600.0, 2500: -3600.0},
        fake,
    )
    payloads = _signed(tmp_path / "stepped", store)
    steps = [e for p in payloads for e in p["events"] if e["kind"] == "CLOCK_STEP"]
    assert [round(e["step_s"] / 3600) for e in steps] == [1, -1]
    readings = [r for p in payloads for r in p["readings"]]
    assert len(readings) == agent.readings > 30
    _contiguous(readings)
    ref_readings = [r for p in _signed(tmp_path / "ref", ref_store) for r in p["readings"]]
    _same_figures(readings, NOW, ref_readings, NOW)
    assert {r["clock"] for r in readings} == {INFORMATIVE}
    assert not any("utc_offset_s" in r for r in readings), "no rebase on the simulator's bus time"


def test_a_boot_in_1970_keeps_its_readings_flagged_unknown(tmp_path: Path) -> None:
    fake = FakeClock(wall0=12.0)
    agent, store = _simulated_run(tmp_path, ClockMonitor(NoSource(), wall=fake.wall), {}, fake)
    payloads = _signed(tmp_path, store)
    readings = [r for p in payloads for r in p["readings"]]
    assert len(readings) == agent.readings > 30
    assert {r["clock"] for r in readings} == {UNKNOWN}
    boot = [e for p in payloads for e in p["events"] if e["kind"] == "BOOT"]
    assert boot[0]["clock"] == UNKNOWN


class ShiftingBus:
    """The simulated ECU's bus, stamping frames as a kernel would: with the (fake) wall clock."""

    def __init__(self, bus: can.BusABC) -> None:
        self.bus = bus
        self.shift = 0.0

    def send(self, msg: can.Message, timeout: float | None = None) -> None:
        msg.timestamp += self.shift
        self.bus.send(msg, timeout)


def _real_time_run(
    tmp_path: Path,
    steps: dict[int, float],
    seconds: float = 6.0,
    can_silent: range = range(0),
    **sections: dict[str, Any],
) -> tuple[Agent, list[dict[str, Any]], float]:
    """A run paced in real time with wall-clock frame stamps, as on SocketCAN.

    The engine sends nothing in the ticks ``can_silent``; ``sections`` go into
    the agent's configuration.  Returns the agent, the signed payloads and the
    bus time the drive started at.
    """
    cfg, channel, master, slave = _rig(tmp_path, "bus-step", 2, **sections)
    fake = FakeClock(wall0=float(int(time.time())))
    sim_bus = can.Bus(interface="virtual", channel=channel, preserve_timestamps=True)
    bus = ShiftingBus(sim_bus)
    agent = Agent(cfg, clock=ClockMonitor(NoSource(), wall=fake.wall))
    agent.rebase_can_time = True  # the virtual bus stands in for SocketCAN here
    stop = threading.Event()
    worker = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    try:
        agent.start()
        worker.start()
        kit_link = agent.kit
        assert kit_link is not None
        _wait(lambda: kit_link.stats["connected"] == 1)
        logic = KitLogic()
        vehicle = CityBus(CityBusParams(), DriveCycle.brt(seconds + 5, 11), controller=logic)
        # Start on a whole second of the fake wall clock, so both runs share windows.
        start = float(int(fake.wall())) + 1.0
        while fake.wall() < start:
            time.sleep(0.001)
        ecu = EngineEcu(bus, vehicle, start)  # type: ignore[arg-type]
        kit = KitFirmware(master, logic)
        for i, s in drive(vehicle, int(seconds / TICK_S) + 1):
            if i in steps:
                fake.step(steps[i])  # the kernel's clock steps, then stamps with it
                bus.shift += steps[i]
            if i not in can_silent:
                ecu.tick(i, s)
            kit.tick(i, s)
        stats = agent.pipeline.stats
        _wait(lambda: stats.frames >= ecu.frames_sent and stats.kit_messages >= kit.counts.intact)
        stop.set()
        worker.join()
        agent.close()
    finally:
        stop.set()
        sim_bus.shutdown()
        os.close(master)
        os.close(slave)
    return agent, _signed(tmp_path, tmp_path / "store.sqlite"), start


def test_wall_stamped_frames_are_rebased_across_steps(tmp_path: Path) -> None:
    """On SocketCAN the frames carry the wall clock: a step must not reach the integration."""
    ref, ref_payloads, ref_start = _real_time_run(tmp_path / "ref", {})
    agent, payloads, start = _real_time_run(tmp_path / "stepped", {200: 3600.0, 400: -3600.0})
    steps = [e for p in payloads for e in p["events"] if e["kind"] == "CLOCK_STEP"]
    assert [round(e["step_s"]) for e in steps] == [3600, -3600]
    readings = [r for p in payloads for r in p["readings"]]
    assert len(readings) == agent.readings >= 5
    # Contiguous 1 s readings straight through both steps, on the drive's own
    # timeline: no hour-long gap, no hour of frames refused as late.
    _contiguous(readings)
    assert -1.0 <= readings[0]["t0"] - start <= 0.0
    ref_readings = [r for p in ref_payloads for r in p["readings"]]
    _same_figures(readings, start, ref_readings, ref_start)
    # Readings committed between the steps say how to get UTC from t0.
    assert {round(r.get("utc_offset_s", 0.0)) for r in readings} >= {3600}
    assert agent.pipeline.stats.decode_errors == ref.pipeline.stats.decode_errors == 0


def test_a_can_outage_leaves_the_kits_clock_where_it_is(tmp_path: Path) -> None:
    """3 s without a frame while the kit runs on, with re-anchoring after 1 s of drift.

    The kit's time must go on by the receive clock, not snap back to the last
    frame: no re-anchor, no kit sample rejected, and the kit's mode covers
    every second of the outage.
    """
    silent = range(int(1.5 / TICK_S), int(4.5 / TICK_S))
    agent, payloads, start = _real_time_run(
        tmp_path, {}, 6.0, can_silent=silent, pipeline={"kit_resync_s": 1.0}
    )
    kinds = [e["kind"] for p in payloads for e in p["events"]]
    assert "KIT_CLOCK_REANCHORED" not in kinds and agent.pipeline.stats.kit_reanchors == 0
    assert agent.pipeline.counters()["rejected_by_channel"]["mode"] == 0
    readings = [r for p in payloads for r in p["readings"]]
    inside = [r for r in readings if 2.0 <= r["t0"] - start < 4.0]
    assert len(inside) == 2
    for r in inside:
        assert sum(r["mode_s"].values()) == pytest.approx(1.0, abs=0.15), r["mode_s"]


def test_a_kit_message_is_timed_by_the_frames_received_before_it(tmp_path: Path) -> None:
    """Frames that came after a kit message, though read in the same pass, do not time it.

    One pass of the agent's loop can hold seconds of bus time: an unpaced
    simulator, or a loop that stalled on a slow card.  Timed by the pass's last
    frame, the kit would be anchored that far late.
    """
    cfg, channel, master, slave = _rig(tmp_path, "bus-order", 5)
    sim_bus = can.Bus(interface="virtual", channel=channel, preserve_timestamps=True)
    agent = Agent(cfg, clock="synchronised")

    def send(t: float) -> None:
        eec1 = j1939.make_id(j1939.PGN_EEC1, 0, 3)
        idle = bytes([0xF0, 0x7D, 0x7D, 0x00, 0x1E, 0x00, 0xF0, 0x7D])  # 960 rpm
        sim_bus.send(can.Message(timestamp=t, arbitration_id=eec1, data=idle))

    try:
        agent.start()  # the sources read; the test runs the loop's one pass itself
        kit_link = agent.kit
        assert kit_link is not None
        _wait(lambda: kit_link.stats["connected"] == 1)
        agent.poll(0)  # the link's own "up" marker
        send(NOW)
        _wait(lambda: agent.can.pending() == 1)
        mode = {"type": "mode", "seq": 1, "tick_ms": 7000, "mode": 1, "previous": 0, "reason": 0}
        os.write(master, kc.encode_message(mode))
        _wait(lambda: kit_link.pending() == 1)
        for k in range(1, 51):
            send(NOW + 0.1 * k)
        _wait(lambda: agent.can.pending() == 51)
        assert agent.poll(0) == 52
        agent.close()
    finally:
        sim_bus.shutdown()
        os.close(master)
        os.close(slave)
    events = [e for p in _signed(tmp_path, tmp_path / "store.sqlite") for e in p["events"]]
    [mode_event] = [e for e in events if e["kind"] == "KIT_MODE"]
    # Received a few milliseconds after the frame at NOW, 5 s of bus time before the last.
    assert NOW <= mode_event["t"] < NOW + 0.5
