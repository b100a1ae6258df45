"""Each signal from the ECU that sends it (cngmrv.drivers.address.SignalSource in the pipeline)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cngmrv.agent.pipeline import Pipeline, PipelineConfig
from cngmrv.agent.replay import replay
from cngmrv.drivers import j1939
from cngmrv.drivers.address import EngineTracker, SignalSource, parse_source_rule

CLAIM = j1939.PGN_ADDRESS_CLAIMED
# A brake system controller (function 9), on-highway, arbitrary-address capable.
BRAKES = 0x0BBB | (99 << 21) | (9 << 40) | (1 << 60) | (1 << 63)


def _lfe(rate: float) -> bytes:
    return j1939.encode(j1939.PGN_LFE, {"fuel_rate_lph": rate})


def _ccvs(kmh: float) -> bytes:
    return j1939.encode(j1939.PGN_CCVS, {"wheel_speed_kmh": kmh})


def _drive(p: Pipeline, speeds: dict[int, float], seconds: float = 20.0) -> list[dict[str, Any]]:
    """Engine fuel rate 10 L/h from SA 0; CCVS from each SA in ``speeds`` at its speed."""
    for i in range(int(seconds * 10) + 1):
        t = 1000.0 + i * 0.1
        p.on_can(t, j1939.make_id(j1939.PGN_LFE, 0), _lfe(10.0))
        for k, (sa, kmh) in enumerate(speeds.items()):
            p.on_can(t + 0.01 * (k + 1), j1939.make_id(j1939.PGN_CCVS, sa), _ccvs(kmh))
    return p.advance() + p.finish()


def _km(readings: list[dict[str, Any]]) -> float:
    return sum(r["distance_km"] for r in readings)


def test_wheel_speed_from_the_only_ecu_that_sends_it() -> None:
    # As in a real truck log: CCVS only from SA 71, the engine at 0.
    p = Pipeline(PipelineConfig())
    readings = _drive(p, {71: 60.0})
    assert _km(readings) == pytest.approx(60.0 / 3600 * 20.0, rel=1e-9)
    assert p.stats.foreign_source == 0
    assert readings[-1]["src"] == {
        "fuel_rate": 0,
        "fuel_total": 0,
        "engine_speed": 0,
        "wheel_speed": 71,
        "odometer": None,
    }
    assert sum(r["diesel_l"] for r in readings) == pytest.approx(10.0 / 3600 * 20.0, rel=1e-9)


def test_a_second_sender_is_reported_and_never_mixed_in() -> None:
    p = Pipeline(PipelineConfig())
    readings = _drive(p, {0: 30.0, 71: 90.0})  # the engine's CCVS is heard first
    assert _km(readings) == pytest.approx(30.0 / 3600 * 20.0, rel=1e-9)
    [event] = [e for e in p.events if e["kind"] == "SIGNAL_SECOND_SENDER"]
    assert (event["signal"], event["sender"], event["source"]) == ("wheel_speed", 71, 0)
    assert p.sources["wheel_speed"].others == {71: 201}
    assert p.stats.foreign_source == 201


def test_a_configured_source_wins_over_the_first_sender() -> None:
    p = Pipeline(PipelineConfig(sources={"wheel_speed": 71}))
    readings = _drive(p, {0: 30.0, 71: 90.0})
    assert _km(readings) == pytest.approx(90.0 / 3600 * 20.0, rel=1e-9)
    assert p.sources["wheel_speed"].others == {0: 201}


def test_engine_signals_stay_with_the_engine_when_another_ecu_sends_them() -> None:
    p = Pipeline(PipelineConfig())
    lfe_other = j1939.make_id(j1939.PGN_LFE, 0x55)
    p.on_can(999.95, lfe_other, _lfe(500.0))  # heard first, but fuel rate is the engine's
    readings = _drive(p, {0: 30.0})
    assert sum(r["diesel_l"] for r in readings) == pytest.approx(10.0 / 3600 * 20.0, rel=1e-9)
    assert p.sources["fuel_rate"].others == {0x55: 1}


def test_a_source_chosen_by_name_function_follows_its_claims() -> None:
    p = Pipeline(PipelineConfig(sources={"wheel_speed": "function:9"}))
    p.on_can(999.0, j1939.make_id(CLAIM, 0x0B), BRAKES.to_bytes(8, "little"))
    for i in range(101):  # 10 s at 36 km/h from the brakes at 0x0B, 72 km/h from SA 0
        t = 1000.0 + i * 0.1
        p.on_can(t, j1939.make_id(j1939.PGN_CCVS, 0x0B), _ccvs(36.0))
        p.on_can(t + 0.01, j1939.make_id(j1939.PGN_CCVS, 0), _ccvs(72.0))
    assert p.sources["wheel_speed"].address == 0x0B
    p.on_can(1010.05, j1939.make_id(CLAIM, 0x0C), BRAKES.to_bytes(8, "little"))
    assert p.sources["wheel_speed"].address == 0x0C
    readings = p.advance() + p.finish()
    assert _km(readings) == pytest.approx(36.0 / 3600 * 10.0, rel=1e-9)


def test_an_auto_source_follows_the_engine_when_the_engine_sends_it() -> None:
    e = EngineTracker(default_address=0)
    src = SignalSource("wheel_speed", "auto", e)
    assert src.address is None and src.accepts(0) is True
    e.address = 5  # as after a move the tracker followed
    assert src.address == 5 and src.accepts(0) == 0 and src.accepts(0) is False
    assert src.settled == "auto: engine"


def test_source_rules_are_checked() -> None:
    assert parse_source_rule("71") == 71 and parse_source_rule("function:9") == "function:9"
    for bad in ("254", "function:x", "brakes", ""):
        with pytest.raises(ValueError):
            parse_source_rule(bad)
    with pytest.raises(ValueError, match="unknown signal"):
        Pipeline(PipelineConfig(sources={"speed": 71}))


def _write_log(path: Path, speeds: dict[int, float]) -> Path:
    lines = []
    for i in range(201):
        t = 1000.0 + i * 0.1
        lines.append(f"({t:.6f}) can0 {j1939.make_id(j1939.PGN_LFE, 0):08X}#{_lfe(10.0).hex()}")
        for k, (sa, kmh) in enumerate(speeds.items()):
            can_id = j1939.make_id(j1939.PGN_CCVS, sa)
            lines.append(f"({t + 0.01 * (k + 1):.6f}) can0 {can_id:08X}#{_ccvs(kmh).hex()}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_replay_names_each_signals_source_and_takes_the_option(
    tmp_path: Path, cli: Callable[..., Any]
) -> None:
    log = _write_log(tmp_path / "two.log", {0: 30.0, 71: 90.0})
    s = replay(log)
    assert s["sources"]["wheel_speed"] == {
        "source": 0,
        "rule": "auto: engine",
        "frames": 201,
        "other_senders": {"71": 201},
    }
    r = cli("replay", str(log), "--json", "--source", "wheel_speed=71")
    assert r.returncode == 0, r.stderr
    s71 = json.loads(r.stdout)
    assert s71["sources"]["wheel_speed"]["source"] == 71
    assert s71["distance_km"] == pytest.approx(90.0 / 3600 * 20.0, rel=1e-9)
    people = cli("replay", str(log)).stdout
    assert "wheel_speed   from SA 0 (auto: engine), 201 frames; also sent by SA 71" in people
    bad = cli("replay", str(log), "--source", "speed=71")
    assert bad.returncode == 2 and "SIGNAL=RULE" in bad.stderr


def _vdhr(km: float) -> bytes:
    return j1939.encode(j1939.PGN_VDHR, {"total_distance_km": km, "trip_distance_km": 0.0})


def _vd(km: float) -> bytes:
    return j1939.encode(j1939.PGN_VD, {"vd_total_distance_km": km, "vd_trip_distance_km": 0.0})


def test_the_odometer_from_the_cluster_names_its_source_and_rides_in_the_readings() -> None:
    # The cluster (SA 23) sends VDHR once a second while the bus drives at 36 km/h
    # (10 m/s): the odometer's difference is the distance, with no clock in it.
    p = Pipeline(PipelineConfig())
    for i in range(21):
        t = 1000.0 + i
        p.on_can(t + 0.5, j1939.make_id(j1939.PGN_VDHR, 23), _vdhr(12345.0 + 0.010 * i))
    readings = _drive(p, {0: 36.0})
    assert readings[-1]["src"]["odometer"] == 23
    odo = [r["odometer_km"] for r in readings if "odometer_km" in r]
    assert odo == sorted(odo) and len(odo) >= 2
    assert p.stats.counters["odometer"] == pytest.approx([12345.0, 12345.2])
    assert _km(readings) == pytest.approx(0.2, rel=1e-9)


def test_vd_is_the_odometer_only_where_no_vdhr_comes() -> None:
    p = Pipeline(PipelineConfig())
    p.on_can(1000.0, j1939.make_id(j1939.PGN_VD, 23), _vd(500.0))
    assert p.stats.counters["odometer"] == [500.0, 500.0]
    # VDHR arrives: VD's 125 m steps are no longer used, and the first value restarts there.
    p.on_can(1001.0, j1939.make_id(j1939.PGN_VDHR, 23), _vdhr(500.06))
    p.on_can(1002.0, j1939.make_id(j1939.PGN_VD, 23), _vd(500.125))
    p.on_can(1003.0, j1939.make_id(j1939.PGN_VDHR, 23), _vdhr(500.07))
    assert p.stats.counters["odometer"] == pytest.approx([500.06, 500.07])


def test_a_second_odometer_is_reported_and_a_rule_picks_the_tachograph() -> None:
    p = Pipeline(PipelineConfig())
    p.on_can(1000.0, j1939.make_id(j1939.PGN_VDHR, 23), _vdhr(100.0))
    p.on_can(1000.5, j1939.make_id(j1939.PGN_VDHR, 238), _vdhr(900.0))
    assert p.stats.counters["odometer"] == [100.0, 100.0]
    assert [e["sender"] for e in p.take_events() if e["kind"] == "SIGNAL_SECOND_SENDER"] == [238]
    pinned = Pipeline(PipelineConfig(sources={"odometer": 238}))
    pinned.on_can(1000.0, j1939.make_id(j1939.PGN_VDHR, 23), _vdhr(100.0))
    pinned.on_can(1000.5, j1939.make_id(j1939.PGN_VDHR, 238), _vdhr(900.0))
    assert pinned.stats.counters["odometer"] == [900.0, 900.0]
