"""Kit messages in the deterministic core: outages, faults, modes, HELLO, stuck sensors; [kit] config."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cngmrv.agent import config
from cngmrv.agent.pipeline import Pipeline, PipelineConfig
from cngmrv.drivers import j1939
from cngmrv.drivers import kit_codec as kc

LFE = j1939.make_id(j1939.PGN_LFE, 0)
T0 = 5000.0
TICK0 = 100_000


def status(tick: int, **kw: Any) -> dict[str, Any]:
    msg = {"type": "status", "version": 2, "seq": 0, "tick_ms": tick, "mode": 1,
           "gas_flow_kgph": 36.0, "faults": 0, "tank_bar": 150.0, "gas_total_kg": 100.0}  # fmt: skip
    msg.update(kw)
    return msg


def drive(p: Pipeline, seconds: float, kit: Any = None, skip: tuple[float, float] = (0, 0)) -> None:
    """CAN at 10 Hz from T0; kit STATUS at 10 Hz except inside ``skip`` (seconds from T0)."""
    for i in range(int(seconds * 10) + 1):
        s = i / 10
        p.on_can(T0 + s, LFE, j1939.encode(j1939.PGN_LFE, {"fuel_rate_lph": 10.0}))
        if kit is not None:
            kit(p, s)
        elif not skip[0] <= s < skip[1]:
            p.on_kit(0.0, status(TICK0 + i * 100))


def readings(p: Pipeline) -> list[dict[str, Any]]:
    return p.advance() + p.finish()


def test_outage_markers_show_up_in_readings_and_events() -> None:
    p = Pipeline(PipelineConfig())

    def kit(p: Pipeline, s: float) -> None:
        i = round(s * 10)
        if s == 3.0:
            p.on_kit(0.0, {"type": "link", "state": "down", "reason": "lost: EIO"})
        elif s == 8.0:
            p.on_kit(0.0, {"type": "link", "state": "up", "port": "/dev/ttyKIT"})
        if not 3.0 <= s < 8.0:
            p.on_kit(0.0, status(TICK0 + i * 100))

    drive(p, 12.0, kit)
    out = readings(p)
    down = {r["t0"] - T0: r["kit_down_s"] for r in out if "kit_down_s" in r}
    # Last STATUS before the outage at 2.9 s, first after at 8.0 s.
    assert down == pytest.approx({2.0: 0.1, 3.0: 1.0, 4.0: 1.0, 5.0: 1.0, 6.0: 1.0, 7.0: 1.0})
    assert sum(r["gas_kg"] for r in out) == pytest.approx(36.0 / 3600 * (12.0 - 5.1), rel=1e-9)
    kinds = [(e["kind"], round(e["t"] - T0, 3)) for e in p.events]
    assert kinds == [("KIT_LINK_DOWN", 2.9), ("KIT_LINK_UP", 8.0)]
    assert p.events[0]["reason"] == "lost: EIO"
    assert p.events[1]["down_s"] == pytest.approx(5.1)
    assert p.stats.kit_outages == 1
    assert p.stats.kit_messages == p.stats.kit_status == 121 - 50  # markers are not messages


def test_an_open_outage_marks_every_reading_until_the_kit_is_back() -> None:
    p = Pipeline(PipelineConfig())
    drive(p, 2.0)
    p.on_kit(0.0, {"type": "link", "state": "down", "reason": "cannot open"})
    p.on_kit(0.0, {"type": "link", "state": "down", "reason": "again"})  # same outage
    for i in range(21, 101):
        p.on_can(T0 + i / 10, LFE, j1939.encode(j1939.PGN_LFE, {"fuel_rate_lph": 10.0}))
    out = readings(p)
    assert [r["t0"] - T0 for r in out if r.get("kit_down_s") == pytest.approx(1.0)] == [
        float(k)
        for k in range(2, 11)  # the last STATUS at 2.0 s, the last CAN at 10.0 s
    ]
    assert [e["kind"] for e in p.events] == ["KIT_LINK_DOWN"]


def test_faults_modes_hello_injection_and_unknown_messages() -> None:
    p = Pipeline(PipelineConfig())
    hello = {"type": "hello", "version": 2, "seq": 0, "tick_ms": TICK0, "role": 0,
             "max_version": 2, "kit_id": 7, "fw_major": 1, "fw_minor": 0, "fw_patch": 0,
             "status_period_ms": 100, "injectors": 6, "inj_flow": 2.5, "inj_dead_ms": 0.35,
             "capabilities": 7}  # fmt: skip

    def kit(p: Pipeline, s: float) -> None:
        i = round(s * 10)
        tick = TICK0 + i * 100
        if i % 20 == 0:
            p.on_kit(0.0, {**hello, "tick_ms": tick, "fw_patch": 1 if s >= 4 else 0})
        if s == 2.0:
            p.on_kit(0.0, {"type": "fault", "tick_ms": tick, "code": 3, "active": 1, "faults": 4})
            p.on_kit(0.0, {"type": "mode", "tick_ms": tick, "mode": 2, "previous": 1, "reason": 3})
        p.on_kit(0.0, {"type": "injection", "tick_ms": tick, "offset_us": 5, "mass_mg": 9.0})
        p.on_kit(0.0, {"type": "unknown", "tick_ms": tick, "msg_type": 99, "payload": b""})
        faulty = 2.0 <= s < 4.0
        p.on_kit(0.0, status(tick, mode=2 if faulty else 1, faults=4 if faulty else 0))

    drive(p, 6.0, kit)
    out = readings(p)
    assert [r["t0"] - T0 for r in out if "kit_faults" in r] == [2.0, 3.0]
    assert all(r["kit_faults"] == 4 for r in out if "kit_faults" in r)
    assert sum(r["mode_s"]["fault"] for r in out) == pytest.approx(2.0)
    events = [(e["kind"], e["t"] - T0) for e in p.events]
    # HELLO every 2 s, but only the first and the changed one are events.
    assert events == [("KIT_HELLO", 0.0), ("KIT_FAULT", 2.0), ("KIT_MODE", 2.0), ("KIT_HELLO", 4.0)]
    assert p.events[1] | {"t": 0} == {
        "t": 0,
        "kind": "KIT_FAULT",
        "code": 3,
        "active": 1,
        "faults": 4,
    }
    assert p.events[3]["fw_patch"] == 1 and p.events[3]["kit_id"] == 7
    assert (p.stats.kit_injections, p.stats.kit_unknown, p.stats.kit_status) == (61, 61, 61)


def test_kit_message_without_tick_is_rejected_with_its_reason() -> None:
    p = Pipeline(PipelineConfig())
    p.on_kit(0.0, {"type": "status", "mode": 1})
    assert p.stats.decode_errors == 1 and "without tick_ms" in next(iter(p.stats.reasons))


def test_stuck_tank_sensor_is_flagged_and_recovers() -> None:
    p = Pipeline(PipelineConfig(kit_stuck_gas_kg=0.05))

    def kit(p: Pipeline, s: float) -> None:
        i = round(s * 10)
        gas = 100.0 + 0.01 * i  # 0.1 kg/s of kit counter
        tank = 150.0 if 10 <= i < 30 else 150.0 - 0.03 * i
        p.on_kit(0.0, status(TICK0 + i * 100, tank_bar=tank, gas_total_kg=gas))

    drive(p, 5.0, kit)
    out = readings(p)
    flagged = [r["t0"] - T0 for r in out if r.get("kit_suspect") == ["tank_bar"]]
    # The value froze at 1.0 s; 0.05 kg later (1.5 s) it is flagged, until 3.0 s.
    assert flagged == [1.0, 2.0]
    stuck = next(e for e in p.events if e["kind"] == "KIT_SENSOR_STUCK")
    assert stuck["since"] - T0 == pytest.approx(1.0) and stuck["t"] - T0 == pytest.approx(1.5)
    assert [e["kind"] for e in p.events] == ["KIT_SENSOR_STUCK", "KIT_SENSOR_RECOVERED"]


def test_refuel_is_not_a_stuck_sensor() -> None:
    p = Pipeline(PipelineConfig())
    for i, tank in enumerate([20.0] * 5 + [200.0] * 5):
        p.on_kit(0.0, status(TICK0 + i * 100, tank_bar=tank, gas_total_kg=100.0 + 0.001 * i))
    assert not p.events


@pytest.mark.parametrize(
    "kit, error",
    [
        (
            {"port": "/dev/ttyUSB0", "reconnect_min_s": 5.0, "reconnect_max_s": 1.0},
            "reconnect_max_s",
        ),
        ({"read_timeout_s": 0}, "kit.read_timeout_s"),
        ({"queue_size": 0}, "kit.queue_size"),
        ({"handshake": 1}, "kit.handshake"),
        ({"parity": "N"}, "kit.parity: unknown key"),
    ],
)
def test_kit_config_keys_are_validated(tmp_path: Path, kit: dict[str, Any], error: str) -> None:
    data = {"device": {"id": "b", "key_file": "k"}, "store": {"path": "s"}, "kit": kit}
    with pytest.raises(config.ConfigError, match=error):
        config.from_mapping(data, tmp_path)


def test_kit_config_defaults_and_values(tmp_path: Path) -> None:
    base = {"device": {"id": "b", "key_file": "k"}, "store": {"path": "s"}}
    kit = config.from_mapping(base, tmp_path).source_values["kit"]
    assert (kit["port"], kit["baudrate"], kit["reconnect_min_s"], kit["reconnect_max_s"]) == (
        "",
        115200,
        0.5,
        30.0,
    )
    assert kit["handshake"] is True
    kit = {"port": "/dev/ttyUSB0", "baudrate": 230400, "read_timeout_s": 0.2,
           "reconnect_min_s": 1, "reconnect_max_s": 10, "handshake": False}  # fmt: skip
    got = config.from_mapping({**base, "kit": kit}, tmp_path).source_values["kit"]
    assert (got["baudrate"], got["read_timeout_s"], got["reconnect_min_s"]) == (230400, 0.2, 1.0)
    assert got["reconnect_max_s"] == 10.0
    assert got["handshake"] is False and kc.PROTOCOL_VERSION == 2


def _gas_and_diesel(out: list[dict[str, Any]]) -> tuple[float, float]:
    return sum(r["gas_kg"] for r in out), sum(r["diesel_l"] for r in out)


Span = tuple[int, int]  # (first step, steps long), at 10 steps a second


def _inside(i: int, spans: Sequence[Span]) -> bool:
    return any(a <= i < a + n for a, n in spans)


def _run(
    steps: int,
    can_out: Sequence[Span] = (),
    kit_out: Sequence[Span] = (),
    reboots: Sequence[int] = (),
    first_tick: int = TICK0,
) -> tuple[Pipeline, list[dict[str, Any]]]:
    """LFE (10 L/h) and kit STATUS (36 kg/h) at 10 Hz from T0, each silent inside its spans.

    The kit restarts at the steps in ``reboots``, its tick going back to 0.
    Kit messages are received at once, on the bus's own timeline.
    """
    p = Pipeline(PipelineConfig())
    out: list[dict[str, Any]] = []
    boot, base = 0, first_tick
    for i in range(steps):
        if i in reboots:
            boot, base = i, 0
        if not _inside(i, can_out):
            p.on_can(T0 + i / 10, LFE, j1939.encode(j1939.PGN_LFE, {"fuel_rate_lph": 10.0}))
        if not _inside(i, kit_out):
            p.on_kit(T0 + i / 10, status(base + (i - boot) * 100))
        out += p.advance()
    return p, out + p.finish()


def test_a_can_outage_does_not_drag_the_kit_clock_back() -> None:
    """The kit keeps counting while no frame comes: its time must not snap to the last one."""
    p, out = _run(451, can_out=[(50, 300)])  # 30 s without CAN, three times kit_resync_s
    assert [e["kind"] for e in p.events] == []
    assert p.stats.kit_reanchors == 0 and p.counters()["rejected"] == 0
    gas, _ = _gas_and_diesel(out)
    assert gas == pytest.approx(36.0 / 3600 * 45.0, rel=1e-9)
    # The gas of the outage lands in the outage's own seconds.
    assert all(r["gas_kg"] == pytest.approx(0.01) for r in out if 5.0 <= r["t0"] - T0 < 35.0)


def test_a_kit_reboot_reanchors_to_bus_time() -> None:
    p, out = _run(201, reboots=[100])
    [event] = p.events
    assert event["kind"] == "KIT_CLOCK_REANCHORED" and event["t"] == pytest.approx(T0 + 10.0)
    assert event["shift_s"] == pytest.approx(TICK0 / 1000 + 10.0)
    assert p.counters()["rejected"] == 0
    gas, _ = _gas_and_diesel(out)
    # Re-anchored to the frame it came with, the kit's time runs on without a hole.
    assert gas == pytest.approx(36.0 / 3600 * 20.0, rel=1e-9)


def test_a_restart_soon_after_the_kit_booted_is_still_a_restart() -> None:
    """Its tick goes back 7.9 s, inside kit_resync_s: only the step back tells a restart."""
    p, out = _run(101, reboots=[30], first_tick=5000)
    assert [(e["kind"], e["shift_s"]) for e in p.events] == [
        ("KIT_CLOCK_REANCHORED", pytest.approx(8.0))
    ]
    assert p.counters()["rejected"] == 0
    assert _gas_and_diesel(out)[0] == pytest.approx(36.0 / 3600 * 10.0, rel=1e-9)


def test_a_backward_reanchor_keeps_the_bus_samples() -> None:
    """A kit anchored ahead of bus time (on its receive time, before any frame) is pulled back.

    The bus's samples must all be integrated: the kit's old, later times must
    not stand as its latest and close windows on their own.
    """
    p = Pipeline(PipelineConfig())
    out = []
    lfe = j1939.encode(j1939.PGN_LFE, {"fuel_rate_lph": 36.0})
    for i in range(201):
        mono = i / 10  # the receive clock both sources are stamped with
        if i >= 3:
            p.on_can(T0 + mono, LFE, lfe, mono)
        # Received on a wall clock 1000 s from the frames' own timeline.
        p.on_kit(T0 + 1000.0 + mono, status(TICK0 + i * 100), mono)
        out += p.advance()
    out += p.finish()
    assert [(e["kind"], e["shift_s"]) for e in p.events] == [
        ("KIT_CLOCK_REANCHORED", pytest.approx(-1000.0))
    ]
    _, diesel = _gas_and_diesel(out)
    assert diesel == pytest.approx(36.0 / 3600 * (20.0 - 0.3), rel=1e-9)
    assert p.counters()["late_s"] == 0


def test_a_kit_restart_in_a_can_outage_is_placed_by_the_receive_clock() -> None:
    p, out = _run(451, can_out=[(50, 300)], reboots=[200])
    [event] = p.events
    # Not pulled back to the last frame (4.9 s), nor left where its tick says.
    assert event["kind"] == "KIT_CLOCK_REANCHORED" and event["t"] == pytest.approx(T0 + 20.0)
    assert p.counters()["rejected"] == 0
    gas, _ = _gas_and_diesel(out)
    assert gas == pytest.approx(36.0 / 3600 * 45.0, rel=1e-9)


spans = st.lists(st.tuples(st.integers(0, 300), st.integers(1, 200)), max_size=3)


@settings(max_examples=200)
@given(can_out=spans, kit_out=spans, reboots=st.lists(st.integers(1, 300), max_size=2))
def test_one_sources_outages_never_change_the_others_figures(
    can_out: list[Span], kit_out: list[Span], reboots: list[int]
) -> None:
    """Silence on CAN, silence on the kit, kit restarts: each source keeps its own figures.

    Restarts fall only where the bus is live (one in a CAN outage has its own
    test): the kit is then re-anchored to a frame of the same instant.  Each
    comes after more than a second of ticks, the least step back that tells a
    restart from ticks out of order.
    """
    reboots = [i for i in reboots if not _inside(i, can_out) and not _inside(i, kit_out)]
    reboots = [i for i in sorted(reboots) if all(i - j > 11 for j in reboots if j < i)]
    p, out = _run(301, can_out, kit_out, reboots)
    _, kit_alone = _run(301, kit_out=kit_out, reboots=reboots)
    _, can_alone = _run(301, can_out=can_out)
    gas, diesel = _gas_and_diesel(out)
    assert gas == pytest.approx(_gas_and_diesel(kit_alone)[0], rel=1e-9, abs=1e-12)
    assert diesel == pytest.approx(_gas_and_diesel(can_alone)[1], rel=1e-9, abs=1e-12)
    assert p.counters()["rejected"] == 0
