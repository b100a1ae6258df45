"""The deterministic core fed directly, and the agent's listen-only promise on a real bus."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import can
import pytest

from cngmrv.agent import config, window
from cngmrv.agent.pipeline import FuelFactors, GasCalibration, Pipeline, PipelineConfig
from cngmrv.agent.runtime import Agent
from cngmrv.drivers import j1939
from cngmrv.native import tank_mass

LFE = j1939.make_id(j1939.PGN_LFE, 0)
CCVS = j1939.make_id(j1939.PGN_CCVS, 0)


def _lfe(rate: float | None) -> bytes:
    return j1939.encode(j1939.PGN_LFE, {"fuel_rate_lph": rate})


def _feed_constant(p: Pipeline, seconds: float, rate: float, t0: float = 1000.0) -> None:
    for i in range(int(seconds * 10) + 1):
        t = t0 + i * 0.1
        p.on_can(t, LFE, _lfe(rate))
        p.on_can(t + 0.05, CCVS, j1939.encode(j1939.PGN_CCVS, {"wheel_speed_kmh": 36.0}))


def test_constant_rates_integrate_exactly() -> None:
    p = Pipeline(PipelineConfig())
    _feed_constant(p, 10.0, 36.0)
    readings = p.advance() + p.finish()
    assert sum(r["diesel_l"] for r in readings) == pytest.approx(36.0 / 3600 * 10.0, rel=1e-9)
    assert sum(r["distance_km"] for r in readings) == pytest.approx(36.0 / 3600 * 10.0, rel=1e-9)
    full = [r for r in readings if r["cov"]["diesel_l"] == pytest.approx(1.0)]
    assert len(full) >= 8
    assert all(r["dur"] == 1.0 and r["t0"] == int(r["t0"]) for r in readings)


def test_not_available_fuel_rate_leaves_a_gap_not_a_guess() -> None:
    p = Pipeline(PipelineConfig())
    for i in range(51):
        t = 1000.0 + i * 0.1
        # Two seconds of "not available" in the middle.
        p.on_can(t, LFE, _lfe(None if 20 <= i < 40 else 36.0))
    readings = p.advance() + p.finish()
    total = sum(r["diesel_l"] for r in readings)
    covered = sum(r["cov"]["diesel_l"] for r in readings)
    assert covered == pytest.approx(2.9, abs=1e-9)  # 0.0-1.9 and 4.0-5.0
    assert total == pytest.approx(36.0 / 3600 * covered, rel=1e-9)
    assert p.stats.decode_errors == 20
    assert any("gaps" in r for r in readings)


def test_another_ecus_fuel_rate_is_never_mixed_in() -> None:
    p = Pipeline(PipelineConfig(engine_source_address=0))
    other = j1939.make_id(j1939.PGN_LFE, 0x55)
    for i in range(21):
        t = 1000.0 + i * 0.1
        p.on_can(t, LFE, _lfe(10.0))
        p.on_can(t + 0.01, other, _lfe(500.0))
    total = sum(r["diesel_l"] for r in p.advance() + p.finish())
    assert total == pytest.approx(10.0 / 3600 * 2.0, rel=1e-9)
    assert p.stats.foreign_source == 21


def test_short_frame_is_rejected_with_its_reason() -> None:
    p = Pipeline(PipelineConfig())
    p.on_can(1000.0, LFE, b"\x01")
    assert p.stats.decode_errors == 1
    assert any("LFE" in reason for reason in p.stats.reasons)


def test_kit_ticks_are_anchored_to_bus_time_and_integrate_gas() -> None:
    p = Pipeline(PipelineConfig())
    p.on_can(5000.0, LFE, _lfe(10.0))
    for i in range(31):
        msg = {"type": "status", "tick_ms": 123_000 + i * 100, "mode": 1, "gas_flow_kgph": 18.0}
        p.on_kit(0.0, msg)
        p.on_can(5000.0 + (i + 1) * 0.1, LFE, _lfe(10.0))
    readings = p.advance() + p.finish()
    assert sum(r["gas_kg"] for r in readings) == pytest.approx(18.0 / 3600 * 3.0, rel=1e-9)
    assert sum(r["mode_s"]["dual"] for r in readings) == pytest.approx(3.0, rel=1e-9)
    assert readings[0]["t0"] == 5000.0


def test_agent_never_transmits_on_the_bus(tmp_path: Path, keydir: Path) -> None:
    channel = f"listen-only-{time.monotonic_ns()}"
    cfg = config.from_mapping(
        {
            "device": {"id": "bus-1", "key_file": str(keydir / "device.key")},
            "can": {"interface": "virtual", "channel": channel},
            "store": {"path": "s.sqlite"},
        },
        tmp_path,
    )
    observer = can.Bus(interface="virtual", channel=channel)
    engine = can.Bus(interface="virtual", channel=channel, preserve_timestamps=True)
    agent = Agent(cfg)
    stop = threading.Event()
    worker = threading.Thread(target=agent.run, args=(stop,))
    agent.start()
    worker.start()
    for i in range(200):
        engine.send(can.Message(timestamp=1000 + i * 0.1, arbitration_id=LFE, data=_lfe(20.0)))
    deadline = time.monotonic() + 5
    while agent.pipeline.stats.frames < 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    worker.join()
    agent.close()
    seen = []
    while (msg := observer.recv(0.2)) is not None:
        seen.append(msg)
    observer.shutdown()
    engine.shutdown()
    assert agent.pipeline.stats.frames == 200
    assert len(seen) == 200  # only the engine's frames; the agent sent none
    assert agent.readings >= 18


# --------------------------------------------------------------------------
# The integrator's outputs in readings: energy, CO2, idle, gas events, tank.

EEC1 = j1939.make_id(j1939.PGN_EEC1, 0)


def _eec1(rpm: float | None) -> bytes:
    return j1939.encode(j1939.PGN_EEC1, {"engine_speed_rpm": rpm, "actual_torque_pct": 20})


def _ccvs(kmh: float | None) -> bytes:
    return j1939.encode(j1939.PGN_CCVS, {"wheel_speed_kmh": kmh})


def _status(tick_ms: int, **fields: object) -> dict[str, object]:
    msg: dict[str, object] = {"type": "status", "tick_ms": tick_ms, "mode": 1}
    msg.update({"gas_flow_kgph": 18.0, "tank_bar": 150.0, "gas_temp_c": 27.0})
    msg.update(fields)
    return msg


def _drive(p: Pipeline, seconds: float, t0: float = 1000.0, rpm: float = 650.0) -> None:
    """10 Hz LFE and CCVS, 50 Hz EEC1, 10 Hz kit status, all constant."""
    for i in range(int(seconds * 50) + 1):
        t = t0 + i * 0.02
        p.on_can(t, EEC1, _eec1(rpm))
        if i % 5 == 0:
            p.on_can(t + 0.001, LFE, _lfe(36.0))
            p.on_can(t + 0.002, CCVS, _ccvs(0.0))
            p.on_kit(0.0, _status(10_000 + i * 20))


def test_energy_co2_and_gas_share_use_the_configured_factors() -> None:
    fuel = FuelFactors(diesel_density_kg_per_l=0.84, diesel_ncv_mj_per_kg=42.0)
    p = Pipeline(PipelineConfig(fuel=fuel))
    _drive(p, 10.0)
    readings = p.advance() + p.finish()
    diesel_l = sum(r["diesel_l"] for r in readings)
    gas_kg = sum(r["gas_kg"] for r in readings)
    assert diesel_l == pytest.approx(0.1, rel=1e-9) and gas_kg == pytest.approx(0.05, rel=1e-6)
    e_diesel = sum(r["energy_mj"]["diesel"] for r in readings)
    e_gas = sum(r["energy_mj"]["gas"] for r in readings)
    assert e_diesel == pytest.approx(diesel_l * 0.84 * 42.0, rel=1e-12)
    assert e_gas == pytest.approx(gas_kg * 48.0, rel=1e-12)
    assert sum(r["co2_kg"]["diesel"] for r in readings) == pytest.approx(e_diesel * 0.0741)
    assert sum(r["co2_kg"]["gas"] for r in readings) == pytest.approx(e_gas * 0.0561)
    full = [r for r in readings if r["cov"]["gas_kg"] == pytest.approx(1.0)]
    assert full and all(
        r["gas_share"] == pytest.approx(r["energy_mj"]["gas"] / (e := sum(r["energy_mj"].values())))
        and 0.0 < e
        for r in full
    )
    empty = Pipeline(PipelineConfig())
    empty.on_can(1000.0, LFE, _lfe(0.0))
    empty.on_can(1000.5, LFE, _lfe(0.0))
    assert all(r["gas_share"] is None for r in empty.finish())


def test_idle_and_mode_seconds() -> None:
    p = Pipeline(PipelineConfig())
    _drive(p, 4.0)  # idling at a stop, dual-fuel
    for i in range(1, 201):  # then 4 s moving at 30 km/h
        t = 1004.0 + i * 0.02
        p.on_can(t, EEC1, _eec1(1200.0))
        if i % 5 == 0:
            p.on_can(t + 0.002, CCVS, _ccvs(30.0))
    for i in range(1, 101):  # then 2 s with the engine off
        p.on_can(1008.0 + i * 0.02, EEC1, _eec1(0.0))
    readings = p.advance() + p.finish()
    idle = sum(r["idle_s"] for r in readings)
    on = sum(r["engine_on_s"] for r in readings)
    # The speed is known every 0.1 s, so each change lands within one CCVS period.
    assert idle == pytest.approx(4.0, abs=0.15)
    assert on == pytest.approx(8.0, abs=0.15)
    assert sum(r["mode_s"]["dual"] for r in readings) == pytest.approx(4.0, rel=1e-9)
    assert set(readings[0]["mode_s"]) == {"diesel", "dual", "fault", "other"}
    # The first engine sample comes before any wheel speed: unknown, so not covered.
    assert sum(r["cov"]["engine"] for r in readings) == pytest.approx(10.0 - 0.02, abs=1e-9)
    assert readings[0]["gaps"]["engine"] == [1, 0.02]


def test_engine_state_without_a_recent_speed_is_unknown() -> None:
    p = Pipeline(PipelineConfig())
    for i in range(101):
        p.on_can(1000.0 + i * 0.02, EEC1, _eec1(700.0))  # no CCVS at all
    readings = p.finish()
    assert sum(r["cov"]["engine"] for r in readings) == 0.0
    assert sum(r["cov"]["engine_rev"] for r in readings) == pytest.approx(2.0)
    revs = sum(r["engine_rev"] for r in readings)
    assert revs == pytest.approx(700.0 / 60.0 * 2.0)  # mean rpm = 60 * revs / covered s


def test_gas_from_injection_events_cross_checks_the_flow() -> None:
    gas = GasCalibration(injector_k=1e-5, injector_dead_time_ms=1.0)
    p = Pipeline(PipelineConfig(gas=gas))
    _drive(p, 2.0)
    # 25 injections per second for 2 s, 5 ms pulses at 9 bar and 51.85 °C (325 K).
    for i in range(51):
        p.on_injection(1000.0 + i * 0.04, 5.0, 9.0, 51.85)
    p.on_injection(1002.05, None, 9.0, 51.85)  # a field not available: invalid
    readings = p.advance() + p.finish()
    per_event = 1e-5 * 4.0 * 9.0 / 325.0**0.5
    assert sum(r["gas_kg_events"] for r in readings) == pytest.approx(51 * per_event, rel=1e-9)
    assert sum(r["cov"]["gas_kg_events"] for r in readings) == pytest.approx(2.0, rel=1e-9)
    # The same through the kit link, on the kit's clock.
    q = Pipeline(PipelineConfig(gas=gas))
    q.on_can(5000.0, LFE, _lfe(10.0))
    msg = {"type": "injection", "tick_ms": 0, "pulse_ms": 5.0, "rail_bar": 9.0, "gas_temp_c": 51.85}
    for i in range(11):
        q.on_kit(0.0, {**msg, "tick_ms": 77_000 + i * 40})
    assert sum(r["gas_kg_events"] for r in q.finish()) == pytest.approx(11 * per_event)
    assert q.stats.kit_messages == 11


def test_tank_mass_and_a_refuel_event() -> None:
    p = Pipeline(PipelineConfig())
    p.on_can(1000.0, LFE, _lfe(10.0))
    bars = [100.0] * 20 + [100.0 + 5.0 * i for i in range(1, 21)] + [200.0] * 20
    for i, bar in enumerate(bars):
        p.on_kit(0.0, _status(5_000 + i * 100, tank_bar=bar))
        p.on_can(1000.0 + (i + 1) * 0.1, LFE, _lfe(10.0))
    readings = p.advance() + p.finish()
    last = [r["tank_kg"] for r in readings if "tank_kg" in r][-1]
    assert last == pytest.approx(tank_mass(200.0, 300.15, 0.44, 518.3, 46.0, 190.6))
    refuelled = sum(r.get("refuel_kg", 0.0) for r in readings)
    assert refuelled == pytest.approx(last - tank_mass(100.0, 300.15, 0.44, 518.3, 46.0, 190.6))
    assert sum(r.get("refuels", 0) for r in readings) == 1
    assert [e["kind"] for e in p.events] == ["REFUEL_DETECTED"]


def test_batching_changes_no_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    def run(advance_every: int) -> list[dict[str, object]]:
        p = Pipeline(PipelineConfig())
        out: list[dict[str, object]] = []
        for i in range(1501):
            t = 1000.0 + i * 0.02
            p.on_can(t, EEC1, _eec1(650.0 + (i % 97)))
            if i % 5 == 0:
                p.on_can(t + 0.001, LFE, _lfe(None if 300 <= i < 340 else 20.0 + (i % 13)))
                p.on_can(t + 0.002, CCVS, _ccvs(float(i % 40)))
                p.on_kit(0.0, _status(10_000 + i * 20, gas_flow_kgph=10.0 + (i % 7)))
            if i % advance_every == 0:
                out += p.advance()
        return out + p.finish()

    per_frame = run(1)
    assert run(100) == per_frame  # identical, not merely close
    monkeypatch.setattr(window, "MAX_BUFFERED", 7)
    assert run(10**6) == per_frame


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("[fuel]\ngas_ncv_mj_per_kg = -48.0\n", "fuel.gas_ncv_mj_per_kg: must be > 0"),
        ("[fuel]\ndiesel_co2_kg_per_tj = nan\n", "fuel.diesel_co2_kg_per_tj: must be a finite"),
        ("[gas]\ntank_volume_m3 = inf\n", "gas.tank_volume_m3: must be a finite"),
        ("[gas]\ninjector_dead_time_ms = -1\n", "gas.injector_dead_time_ms: must be >= 0"),
        ("[gas]\ninjektor_k = 1e-5\n", "gas.injektor_k: unknown key"),
        ("[pipeline]\nidle_max_kmh = -1.0\n", "pipeline.idle_max_kmh: must be >= 0"),
    ],
)
def test_calibration_config_is_validated(tmp_path: Path, extra: str, message: str) -> None:
    p = tmp_path / "agent.toml"
    p.write_text('[device]\nid = "b"\nkey_file = "k"\n[store]\npath = "s"\n' + extra)
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        config.load(p)


def test_calibration_config_reaches_the_pipeline(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_text(
        '[device]\nid = "b"\nkey_file = "k"\n[store]\npath = "s"\n'
        "[fuel]\ndiesel_co2_kg_per_tj = 70000\n[gas]\ninjector_k = 2e-6\ntank_pressure_gauge = true\n"
        "[pipeline]\nidle_max_kmh = 3\n"
    )
    cfg = config.load(p).pipeline
    assert cfg.fuel == FuelFactors(diesel_co2_kg_per_tj=70000.0)
    assert cfg.gas == GasCalibration(injector_k=2e-6, tank_pressure_gauge=True)
    assert cfg.idle_max_kmh == 3.0


def test_events_are_handed_over_once_and_not_kept() -> None:
    # A running agent takes the events every pass; a pipeline that kept them
    # would grow for as long as the bus runs.
    p = Pipeline(PipelineConfig())
    dm1 = j1939.make_id(j1939.PGN_DM1, 0x03, 6)
    p.on_can(1000.0, dm1, b"\x04\xff\x64\x00\x01\x01\xff\xff")  # SPN 100 FMI 1
    taken = p.take_events()
    assert [e["kind"] for e in taken] == ["DM1_CHANGED"]
    assert p.take_events() == [] and p.events == []
    p.on_can(1001.0, dm1, b"\x00\xff\x00\x00\x00\x00\xff\xff")  # cleared
    assert [e["kind"] for e in p.take_events()] == ["DM1_CHANGED"]
