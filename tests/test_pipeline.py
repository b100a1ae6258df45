"""The deterministic core fed directly, and the agent's listen-only promise on a real bus."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import can
import pytest

from cngmrv.agent import config
from cngmrv.agent.pipeline import Pipeline, PipelineConfig
from cngmrv.agent.runtime import Agent
from cngmrv.drivers import j1939

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
