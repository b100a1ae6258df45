"""Prescaled logs in ``cngmrv replay``: per-signal maximum gaps, detected logger periods, and a
per-signal coverage summary that says why coverage is low."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cngmrv.agent.pipeline import Pipeline, PipelineConfig
from cngmrv.agent.replay import replay
from cngmrv.drivers import j1939

LFE = j1939.make_id(j1939.PGN_LFE, 0)
CCVS = j1939.make_id(j1939.PGN_CCVS, 0)
T0 = 1_600_000_000.0


def _line(t: float, can_id: int, data: bytes) -> str:
    return f"({t:.6f}) can0 {can_id:08X}#{data.hex().upper()}"


def _prescaled_log(path: Path, fuel_times: list[float], seconds: float = 186.0) -> Path:
    """Fuel rate 10 L/h at ``fuel_times`` (seconds from the start), speed 50 km/h at 10 Hz."""
    lfe = j1939.encode(j1939.PGN_LFE, {"fuel_rate_lph": 10.0})
    ccvs = j1939.encode(j1939.PGN_CCVS, {"wheel_speed_kmh": 50.0})
    frames = [(T0 + s, LFE, lfe) for s in fuel_times]
    frames += [(T0 + i * 0.1 + 0.003, CCVS, ccvs) for i in range(int(seconds * 10) + 1)]
    frames.sort()
    path.write_text("\n".join(_line(*f) for f in frames) + "\n")
    return path


# As in a real logger file: the fuel rate every 3.2 s over 186 s.
EVERY_3_2 = [round(k * 3.2, 6) for k in range(59)]  # 0 .. 185.6 s


def test_a_prescaled_log_is_almost_uncovered_under_the_strict_rule_and_says_why(
    tmp_path: Path,
) -> None:
    s = replay(_prescaled_log(tmp_path / "p.log", EVERY_3_2))
    c = s["coverage"]["fuel_rate"]
    assert c["covered_s"] == 0.0 and s["diesel_l"] == 0.0
    assert c["median_period_s"] == pytest.approx(3.2)
    assert c["max_gap_s"] == 1.0 and c["max_gap"] == "default"
    assert "median period 3.2 s is longer than the max gap 1 s" in c["low"]
    assert "--max-gap fuel_rate" in c["low"]
    speed = s["coverage"]["wheel_speed"]
    assert speed["low"] is None and speed["median_period_s"] == pytest.approx(0.1)


@pytest.mark.parametrize("option", [{"max_gap_s": {"fuel_rate": 5.0}}, {}])
def test_a_per_signal_gap_or_a_detected_period_covers_a_prescaled_log(
    tmp_path: Path, option: dict[str, Any]
) -> None:
    path = _prescaled_log(tmp_path / "p.log", EVERY_3_2)
    detect = () if option else ("fuel_rate", "wheel_speed", "engine_speed")
    s = replay(path, PipelineConfig(**option), detect=detect)
    span = EVERY_3_2[-1] - EVERY_3_2[0]
    assert s["diesel_l"] == pytest.approx(10.0 / 3600 * span, rel=1e-6)
    c = s["coverage"]["fuel_rate"]
    assert c["covered_s"] == pytest.approx(span, rel=1e-6) and c["low"] is None
    if option:
        assert c["max_gap"] == "option" and c["max_gap_s"] == 5.0
    else:
        assert c["max_gap"] == "detected" and c["max_gap_s"] == pytest.approx(4.8)
        # The speed already came often enough: its rule is untouched.
        assert s["coverage"]["wheel_speed"]["max_gap"] == "default"
    # The strict rule still holds for the signal not widened.
    assert s["distance_km"] == pytest.approx(50.0 / 3600 * 186.0, rel=1e-6)


def test_a_signal_that_comes_and_goes_is_no_steady_period(tmp_path: Path) -> None:
    # 10 Hz with long silences: the median period is short, nothing is widened.
    times = [i * 0.1 for i in range(600)] + [120.0 + i * 0.1 for i in range(600)]
    s = replay(_prescaled_log(tmp_path / "o.log", times), detect=("fuel_rate",))
    c = s["coverage"]["fuel_rate"]
    assert c["max_gap"] == "default" and c["gaps"] == 1
    assert c["covered_s"] == pytest.approx(59.9 + 59.9, rel=1e-6)
    assert c["low"] is not None and "gaps longer than 1 s" in c["low"]
    # Irregular long intervals are not a logger's period either.
    irregular = [0.0, 2.0, 9.0, 11.0, 19.5, 21.0, 30.0, 32.0, 41.0, 43.0, 52.0, 54.5, 63.0]
    s = replay(_prescaled_log(tmp_path / "i.log", irregular, 63.0), detect=("fuel_rate",))
    assert s["coverage"]["fuel_rate"]["max_gap"] == "default"


def test_a_signal_sent_only_by_another_ecu_says_so(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    lfe = j1939.encode(j1939.PGN_LFE, {"fuel_rate_lph": 10.0})
    log.write_text(
        "\n".join(_line(T0 + i * 0.1, j1939.make_id(j1939.PGN_LFE, 0x55), lfe) for i in range(50))
        + "\n"
    )
    low = replay(log)["coverage"]["fuel_rate"]["low"]
    assert "sent only by SA 85" in low and "--source fuel_rate=" in low


def test_the_live_agent_keeps_the_strict_rule() -> None:
    from cngmrv.agent import config

    gap_keys = {f"{s}.{k}" for s, table in config.SCHEMA.items() for k in table if "gap" in k}
    # The GPS's own rule applies only to the distance it feeds when asked (gps.wheel_speed,
    # off by default), for its one fix a second: never to a J1939 signal.
    assert gap_keys == {"pipeline.can_max_gap_s", "pipeline.kit_max_gap_s", "gps.max_gap_s"}
    assert PipelineConfig().max_gap_s == {}
    with pytest.raises(ValueError, match="no gap rule"):
        Pipeline(PipelineConfig(max_gap_s={"fuel_total": 5.0}))


def test_cli_takes_max_gap_options(tmp_path: Path, cli: Callable[..., Any]) -> None:
    path = _prescaled_log(tmp_path / "p.log", EVERY_3_2)
    r = cli("replay", str(path), "--json", "--max-gap", "fuel_rate=auto")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["coverage"]["fuel_rate"]["max_gap"] == "detected"
    people = cli("replay", str(path)).stdout
    assert "fuel_rate     covered 0.0 s; period 3.2 s; max gap 1 s; low: median period" in people
    for option in ("fuel_rate=auto", "auto"):
        people = cli("replay", str(path), "--max-gap", option).stdout
        assert "max gap 4.8 s (detected logger period)" in people
        assert "wheel_speed   covered 186.0 s; period 0.1 s; max gap 1 s\n" in people
    for bad in ("fuel_rate=0", "fuel_rate=x", "fuel_total=5", "5"):
        r = cli("replay", str(path), "--max-gap", bad)
        assert r.returncode == 2 and "--max-gap" in r.stderr, bad
