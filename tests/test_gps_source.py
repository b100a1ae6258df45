"""The GPS source: RMC's speed over ground, its decoder in the pipeline, its config (the older
``clock.gps_port`` included), and the agent reading a receiver on a real pseudo-terminal with
one reader of the port serving both the clock check and the distance."""

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

from cngmrv.agent import config, health
from cngmrv.agent.clock import SYNCHRONISED, GpsSource
from cngmrv.agent.gps_source import Gps, GpsDecoder, GpsLink
from cngmrv.agent.pipeline import Pipeline, PipelineConfig
from cngmrv.agent.runtime import Agent
from cngmrv.agent.source import registered
from cngmrv.drivers import j1939
from cngmrv.drivers.gps import KINDS, KMH_PER_KNOT, Fix, NmeaError, checksum, parse_rmc
from cngmrv.signed import batch
from cngmrv.signed.archive import read_batches


def _sentence(body: str) -> str:
    return f"${body}*{checksum(body):02X}\r\n"


def _rmc(utc: float, knots: str = "", status: str = "A") -> str:
    t = time.gmtime(utc)
    cs = int(utc % 1 * 100)
    hms = f"{time.strftime('%H%M%S', t)}.{cs:02d}"
    return _sentence(f"GPRMC,{hms},{status},,,,,{knots},,{time.strftime('%d%m%y', t)},,")


# -- the parser's speed ---------------------------------------------------


@given(st.integers(0, 99999))
def test_speed_over_ground_comes_back_in_kmh(centiknots: int) -> None:
    knots = f"{centiknots // 100}.{centiknots % 100:02d}"
    fix = parse_rmc(_rmc(1_790_000_000.0, knots))
    assert fix is not None and fix.valid
    assert fix.speed_kmh == pytest.approx(centiknots / 100 * KMH_PER_KNOT)


def test_no_fix_and_an_empty_speed_carry_no_speed() -> None:
    assert parse_rmc(_rmc(1_790_000_000.0, "12.0", status="V")) == Fix(1_790_000_000.0, False)
    assert parse_rmc(_rmc(1_790_000_000.0, "")) == Fix(1_790_000_000.0, True)


@pytest.mark.parametrize("knots", ["-1.0", "nan", "inf", "1e3", "0x10", "1.2.3", " 5"])
def test_a_speed_that_is_not_knots_is_refused(knots: str) -> None:
    with pytest.raises(NmeaError, match="RMC speed") as e:
        parse_rmc(_rmc(1_790_000_000.0, knots))
    assert e.value.kind == "rmc_speed"


@given(st.text(alphabet="GPRMC,0123456789.AVNESW-+nai*$e", max_size=80))
def test_every_refusal_has_a_kind_from_the_fixed_set(body: str) -> None:
    for line in (body, _sentence(body)):
        try:
            parse_rmc(line)
        except NmeaError as e:
            assert e.kind in KINDS


# -- in the pipeline ------------------------------------------------------


def _gps(**values: Any) -> Gps:
    defaults = {k: d for k, (_, d, _) in Gps.KEYS.items()}
    return Gps({**defaults, "port": "unused", **values})


CCVS = j1939.make_id(j1939.PGN_CCVS, 0)


def _ccvs(kmh: float) -> bytes:
    return j1939.encode(j1939.PGN_CCVS, {"wheel_speed_kmh": kmh})


def _drive(p: Pipeline, fixes: list[Fix]) -> list[dict[str, Any]]:
    """CCVS at 18 km/h every 0.1 s for the fixes' 1 s each; the GPS fix lands mid-second."""
    decoder = p.plugin(GpsDecoder)
    out = []
    for i, fix in enumerate(fixes):
        for k in range(10):
            t = 1000.0 + i + k * 0.1
            p.on_can(t, CCVS, _ccvs(18.0), t)
            if k == 3 and decoder is not None:
                decoder.on_fix(t, fix, t + 0.01)
        out += p.advance()
    return out + p.finish()


def test_gps_speed_feeds_distance_only_when_asked() -> None:
    fixes = [Fix(1.0e9 + i, True, 36.0) for i in range(12)]
    # The default: GPS read (for the clock), J1939 keeps the distance.
    p = Pipeline(PipelineConfig(), decoders=[_gps().decoder])
    out = _drive(p, fixes)
    assert sum(r["distance_km"] for r in out) == pytest.approx(18.0 / 3600 * 11.9)
    # Asked: GPS's 36 km/h, and J1939's CCVS no longer feeds the channel.
    source = _gps(wheel_speed=True)
    p = Pipeline(PipelineConfig(max_gap_s=source.max_gap_s), decoders=[source.decoder])
    out = _drive(p, fixes)
    assert sum(r["distance_km"] for r in out) == pytest.approx(36.0 / 3600 * 11.0)
    assert p.stats.plugins["gps"] == {"speed_samples": 12, "speed_gaps": 0}


def test_a_lost_fix_is_a_gap_not_a_guess() -> None:
    source = _gps(wheel_speed=True)
    fixes = [Fix(1.0e9 + i, i not in (4, 5), 36.0 if i not in (4, 5) else None) for i in range(12)]
    p = Pipeline(PipelineConfig(max_gap_s=source.max_gap_s), decoders=[source.decoder])
    out = _drive(p, fixes)
    # Fixes 3 -> 6 span three seconds with no valid speed between: not integrated.
    assert sum(r["distance_km"] for r in out) == pytest.approx(36.0 / 3600 * 8.0)
    assert sum(r["cov"]["distance_km"] for r in out) == pytest.approx(8.0)
    assert p.stats.plugins["gps"]["speed_gaps"] == 2


def test_a_can_outage_does_not_cut_the_gps_distance() -> None:
    source = _gps(wheel_speed=True)
    p = Pipeline(PipelineConfig(max_gap_s=source.max_gap_s), decoders=[source.decoder])
    decoder = p.plugin(GpsDecoder)
    assert decoder is not None
    for i in range(6):
        t = 1000.0 + i
        p.on_can(t, CCVS, _ccvs(18.0), t)
        if i == 3:
            p.on_source_event({"t": t, "kind": "CAN_DOWN"})
        decoder.on_fix(t + 0.3, Fix(1.0e9 + i, True, 36.0), t + 0.3)
    out = p.finish()
    assert sum(r["distance_km"] for r in out) == pytest.approx(36.0 / 3600 * 5.0)


# -- its config -----------------------------------------------------------


def _config(tmp_path: Path, **sections: dict[str, Any]) -> config.Config:
    return config.from_mapping(
        {
            "device": {"id": "bus-g", "key_file": "k"},
            "can": {"interface": "virtual", "channel": "c"},
            "store": {"path": "s.sqlite"},
            **sections,
        },
        tmp_path,
    )


def test_gps_is_registered_as_a_source() -> None:
    assert registered()["gps"] is Gps


def test_no_port_no_gps_and_by_default_never_the_distance(tmp_path: Path) -> None:
    assert _config(tmp_path).source_values["gps"]["port"] == ""
    cfg = _config(tmp_path, gps={"port": "/dev/ttyGPS"})
    assert cfg.source_values["gps"]["wheel_speed"] is False
    assert cfg.pipeline.max_gap_s == {}
    cfg = _config(tmp_path, gps={"port": "/dev/ttyGPS", "wheel_speed": True, "max_gap_s": 0.5})
    assert cfg.pipeline.max_gap_s == {"wheel_speed": 0.5}


def test_an_older_config_naming_the_port_in_clock_still_loads(tmp_path: Path) -> None:
    cfg = _config(
        tmp_path, clock={"source": "gps", "gps_port": "/dev/ttyGPS", "gps_baudrate": 4800}
    )
    assert (cfg.source_values["gps"]["port"], cfg.source_values["gps"]["baudrate"]) == (
        "/dev/ttyGPS",
        4800,
    )


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"clock": {"source": "gps"}}, "gps.port: required when clock.source = 'gps'"),
        (
            {"clock": {"gps_port": "/dev/a"}, "gps": {"port": "/dev/b"}},
            "clock.gps_port: must be empty when gps.port is set",
        ),
        ({"gps": {"wheel_speed": True}}, "gps.wheel_speed: needs gps.port"),
        (
            {"gps": {"port": "/dev/a", "wheel_speed": True}, "obd": {"enabled": True}},
            "obd: feeds distance_km, which gps feeds already",
        ),
        ({"gps": {"port": "/dev/a", "max_gap_s": 0.0}}, "gps.max_gap_s: must be > 0"),
    ],
)
def test_config_check_names_the_gps_key(
    tmp_path: Path, sections: dict[str, Any], message: str
) -> None:
    with pytest.raises(config.ConfigError, match=message):
        _config(tmp_path, **sections)


# -- the agent, on a real pseudo-terminal ---------------------------------


def _stored_readings(store: Path) -> list[dict[str, Any]]:
    return [r for _, _, raw in read_batches(store) for r in batch.parse(raw).payload()["readings"]]


class Vehicle:
    """An engine at 960 rpm on a virtual CAN bus (EEC1, 10 Hz) and a GPS receiver at 5 Hz
    on a pty, reporting ``knots`` (no CCVS: a bus with no J1939 wheel speed)."""

    def __init__(self, channel: str, master: int, knots: str) -> None:
        self.bus = can.Bus(interface="virtual", channel=channel)
        self.master, self.knots = master, knots
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        eec1 = j1939.make_id(j1939.PGN_EEC1, 0, 3)
        rpm = bytes([0xF0, 0x7D, 0x7D, 0x00, 0x1E, 0x00, 0xF0, 0x7D])  # 960 rpm
        k = 0
        while not self._stop.wait(0.1):
            self.bus.send(can.Message(arbitration_id=eec1, data=rpm, timestamp=time.time()))
            if k % 2 == 0:
                os.write(self.master, _rmc(time.time(), self.knots).encode())
            k += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.bus.shutdown()


@pytest.mark.parametrize(("knots", "idle"), [("19.44", False), ("0.00", True)])
def test_agent_takes_distance_and_time_from_one_gps_reader(
    tmp_path: Path, keydir: Path, knots: str, idle: bool
) -> None:
    master, slave = os.openpty()
    tty.setraw(slave)
    channel = f"gps-{uuid.uuid4().hex[:8]}"
    cfg = config.from_mapping(
        {
            "device": {"id": "bus-g", "key_file": str(keydir / "device.key")},
            "can": {"interface": "virtual", "channel": channel},
            "store": {"path": "s.sqlite"},
            "batch": {"readings_per_batch": 2},
            "gps": {
                "port": os.ttyname(slave),
                "wheel_speed": True,
                "max_gap_s": 0.5,
                "reconnect_s": 0.05,
            },
            "clock": {"source": "gps"},
        },
        tmp_path,
    )
    agent = Agent(cfg)
    link = next(link for link in agent.links if isinstance(link, GpsLink))
    # One reader of the port: the clock check's is the source's.
    assert isinstance(agent.clock.source, GpsSource) and agent.clock.source.reader is link.reader
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,))
    vehicle = None
    try:
        agent.start()
        deadline = time.monotonic() + 10
        while link.reader.stats["opens"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        vehicle = Vehicle(channel, master, knots)
        thread.start()
        time.sleep(4.0)
        clock_state = agent.clock.state
        counters = agent.stats()["sources"]["gps"]
        metrics = health.parse(health.render(health.collect(agent)))
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()
        if vehicle is not None:
            vehicle.close()
        agent.close(upload_timeout=0)
        os.close(master)
        os.close(slave)
    assert clock_state == SYNCHRONISED
    assert counters["fixes"] >= 15 and counters["speed_samples"] >= 15
    # Its counters are health metrics with no code of the GPS source's in agent/health.py.
    assert metrics['cngmrv_source_counter{source="gps",counter="fixes"}'] >= 15
    assert metrics['cngmrv_source_counter{source="gps",counter="speed_samples"}'] >= 15
    readings = _stored_readings(tmp_path / "s.sqlite")
    covered = sum(r["cov"]["distance_km"] for r in readings)
    assert covered > 2.0
    kmh = float(knots) * KMH_PER_KNOT
    assert sum(r["distance_km"] for r in readings) == pytest.approx(kmh / 3600 * covered)
    # The engine's state against GPS's speed: idle when stopped, moving when not.
    idle_s = sum(r["idle_s"] for r in readings)
    on_s = sum(r["engine_on_s"] for r in readings)
    assert on_s > 2.0
    assert idle_s == (pytest.approx(on_s) if idle else 0.0)
