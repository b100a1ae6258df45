"""The OBD-II source: its codec, its decoder in the pipeline, and the agent against a simulated
OBD-II ECU on python-can's virtual bus (a bus without J1939 fuel data)."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import can
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cngmrv.agent import config, obd
from cngmrv.agent.pipeline import Pipeline, PipelineConfig
from cngmrv.agent.runtime import Agent
from cngmrv.agent.source import registered
from cngmrv.drivers import j1939
from cngmrv.drivers.can_source import CanSource
from cngmrv.drivers.j1939 import STANDARD_ID_FLAG
from cngmrv.signed import batch
from cngmrv.signed.archive import read_batches

ECU1 = 0x7E8 | STANDARD_ID_FLAG
ECU2 = 0x7E9 | STANDARD_ID_FLAG


def _answer(pid: int, value: float) -> bytes:
    """What an ECU answers for ``pid`` (docs/obd.md), padded to 8 bytes."""
    if pid == obd.PID_SPEED:
        body = bytes((0x41, pid, round(value)))
    else:
        raw = round(value * 20)
        body = bytes((0x41, pid, raw >> 8, raw & 0xFF))
    return (bytes((len(body),)) + body).ljust(8, b"\x55")


def test_request_is_a_single_frame_of_service_01() -> None:
    assert obd.request(0x0D) == bytes.fromhex("02010d5555555555")
    assert obd.request(0x5E) == bytes.fromhex("02015e5555555555")


def test_the_standard_examples_decode() -> None:
    # Speed: 03 41 0D 12 -> 18 km/h; fuel rate: 04 41 5E 01 90 -> 400 / 20 = 20 L/h.
    assert obd.decode(bytes.fromhex("03410d12aaaaaaaa")) == (0x0D, 18.0)
    assert obd.decode(bytes.fromhex("04415e0190555555")) == (0x5E, 20.0)
    assert obd.decode(bytes.fromhex("04415effff555555")) == (0x5E, 3276.75)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty frame"),
        (bytes.fromhex("1014410d12000000"), "not an ISO-TP single frame"),
        (bytes.fromhex("0841"), "does not fit"),
        (bytes.fromhex("037f0112"), "negative response to service 0x01: NRC 18"),
        (bytes.fromhex("03420d12"), "service 0x42"),
        (bytes.fromhex("03410c12"), "PID 0x0c not read"),
        (bytes.fromhex("03415e01"), "1 data bytes, need 2"),
    ],
)
def test_unusable_answers_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(obd.ObdError, match=reason):
        obd.decode(data)


@given(st.binary(max_size=8))
def test_decode_raises_nothing_but_obd_error(data: bytes) -> None:
    try:
        obd.decode(data)
    except obd.ObdError:
        pass


@given(st.integers(0, 255), st.integers(0, 0xFFFF))
def test_encoded_values_come_back(speed: int, raw: int) -> None:
    assert obd.decode(_answer(0x0D, speed)) == (0x0D, float(speed))
    assert obd.decode(_answer(0x5E, raw / 20)) == (0x5E, raw / 20)


def _pipeline(**values: Any) -> Pipeline:
    source = obd.ObdSource({**{k: d for k, (_, d, _) in obd.ObdSource.KEYS.items()}, **values})
    return Pipeline(PipelineConfig(), decoders=[source.decoder])


def test_answers_feed_fuel_and_distance_and_j1939_no_longer_does() -> None:
    p = _pipeline(enabled=True)
    lfe = j1939.make_id(j1939.PGN_LFE, 0)
    out = []
    for i in range(101):  # 10 s at 10 Hz
        t = 1000.0 + i * 0.1
        p.on_can(t, ECU1, _answer(0x5E, 20.0))
        p.on_can(t + 0.01, ECU1, _answer(0x0D, 36.0))
        # An ECU's J1939 fuel rate on the same bus is not mixed into OBD-II's.
        p.on_can(t + 0.02, lfe, j1939.encode(j1939.PGN_LFE, {"fuel_rate_lph": 500.0}))
        # Nor is a second ECU's answer (a gearbox answers the speed too).
        p.on_can(t + 0.03, ECU2, _answer(0x0D, 200.0))
        out += p.advance()
    out += p.finish()
    full = [r for r in out if r["cov"]["diesel_l"] == pytest.approx(1.0)]
    assert len(full) >= 8
    for r in full:
        assert r["diesel_l"] == pytest.approx(20.0 / 3600)
        assert r["distance_km"] == pytest.approx(36.0 / 3600 * r["cov"]["distance_km"])
    assert p.stats.plugins["obd"]["foreign"] == 101
    assert p.stats.foreign_source == 101


def test_only_the_configured_pids_are_taken() -> None:
    p = _pipeline(enabled=True, wheel_speed=False)
    for i in range(30):
        t = 1000.0 + i * 0.1
        p.on_can(t, ECU1, _answer(0x0D, 36.0))
        p.on_can(
            t,
            j1939.make_id(j1939.PGN_CCVS, 0),
            j1939.encode(j1939.PGN_CCVS, {"wheel_speed_kmh": 18.0}),
        )
    out = p.finish()
    # J1939 keeps the speed: 18 km/h, not OBD-II's 36.
    assert sum(r["distance_km"] for r in out) == pytest.approx(18.0 / 3600 * 2.9)


def test_a_bad_answer_is_a_gap_not_a_guess() -> None:
    p = _pipeline(enabled=True)
    for i in range(40):
        t = 1000.0 + i * 0.1
        data = bytes.fromhex("03415e01") if 10 <= i < 20 else _answer(0x5E, 20.0)
        p.on_can(t, ECU1, data)
    out = p.finish()
    assert sum(r["diesel_l"] for r in out) == pytest.approx(20.0 / 3600 * 2.8)
    assert p.stats.reasons["OBD-II PID 0x5e: 1 data bytes, need 2"] == 10


def test_obd_is_registered_as_a_source() -> None:
    assert registered()["obd"] is obd.ObdSource


def test_11_bit_frames_pass_only_when_a_source_asks_for_them() -> None:
    channel = f"obd-filter-{uuid.uuid4().hex[:8]}"
    sender = can.Bus(interface="virtual", channel=channel)
    plain = CanSource(can.Bus(interface="virtual", channel=channel))
    asking = CanSource(can.Bus(interface="virtual", channel=channel), standard_ids={0x7E8})
    try:
        plain.start()
        asking.start()
        sender.send(can.Message(arbitration_id=0x7E8, data=_answer(0x0D, 5), is_extended_id=False))
        sender.send(can.Message(arbitration_id=0x7E9, data=_answer(0x0D, 5), is_extended_id=False))
        deadline = time.monotonic() + 5
        while (plain.stats["ignored"] < 2 or asking.pending() < 1) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert plain.pending() == 0 and plain.stats["ignored"] == 2
        (frame,) = asking.drain()
        assert frame[1] == ECU1 and asking.stats["ignored"] == 1
    finally:
        plain.stop()
        asking.stop()
        sender.shutdown()


class ObdEcu:
    """A simulated engine ECU that speaks only OBD-II: answers 0x0D and 0x5E on 0x7E8."""

    def __init__(self, channel: str, speed_kmh: float, fuel_lph: float) -> None:
        self.bus = can.Bus(interface="virtual", channel=channel)
        self.values = {obd.PID_SPEED: speed_kmh, obd.PID_FUEL_RATE: fuel_lph}
        self.requests = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            msg = self.bus.recv(0.05)
            if msg is None or msg.is_extended_id or msg.arbitration_id != obd.REQUEST_ID:
                continue
            if msg.data[0] != 2 or msg.data[1] != obd.SERVICE_CURRENT:
                continue
            pid = msg.data[2]
            self.requests += 1
            if pid in self.values:
                data = _answer(pid, self.values[pid])
                self.bus.send(can.Message(arbitration_id=0x7E8, data=data, is_extended_id=False))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.bus.shutdown()


def _config(
    tmp_path: Path, keydir: Path, channel: str, **sections: dict[str, Any]
) -> config.Config:
    return config.from_mapping(
        {
            "device": {"id": "bus-1", "key_file": str(keydir / "device.key")},
            "can": {"interface": "virtual", "channel": channel, "listen_only": False},
            "store": {"path": "s.sqlite"},
            "batch": {"readings_per_batch": 5},
            **sections,
        },
        tmp_path,
    )


def test_agent_on_a_bus_without_j1939_fuel_data_reads_obd(tmp_path: Path, keydir: Path) -> None:
    channel = f"obd-{uuid.uuid4().hex[:8]}"
    ecu = ObdEcu(channel, speed_kmh=36.0, fuel_lph=20.0)
    agent = Agent(_config(tmp_path, keydir, channel, obd={"enabled": True, "requests": True}))
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,))
    try:
        agent.start()
        thread.start()
        time.sleep(4.0)
    finally:
        stop.set()
        thread.join()
        agent.close(upload_timeout=0)
        ecu.close()
    assert agent.can.stats["sent"] >= 20 and ecu.requests >= 20
    assert agent.stats()["sources"]["obd"]["answers"] >= 20
    readings = _stored_readings(tmp_path / "s.sqlite")
    covered = sum(r["cov"]["diesel_l"] for r in readings)
    assert covered > 2.0
    # A constant rate integrates exactly: what each second holds is rate x covered time.
    assert sum(r["diesel_l"] for r in readings) == pytest.approx(20.0 / 3600 * covered)
    moving = sum(r["cov"]["distance_km"] for r in readings)
    assert sum(r["distance_km"] for r in readings) == pytest.approx(36.0 / 3600 * moving)


def test_listen_only_agent_never_asks(tmp_path: Path, keydir: Path) -> None:
    with pytest.raises(config.ConfigError, match="obd.requests: needs can.listen_only = false"):
        config.from_mapping(
            {
                "device": {"id": "bus-1", "key_file": str(keydir / "device.key")},
                "can": {"interface": "virtual", "channel": "x"},
                "store": {"path": "s.sqlite"},
                "obd": {"enabled": True, "requests": True},
            },
            tmp_path,
        )
    channel = f"obd-quiet-{uuid.uuid4().hex[:8]}"
    ecu = ObdEcu(channel, speed_kmh=36.0, fuel_lph=20.0)
    agent = Agent(_config(tmp_path, keydir, channel, obd={"enabled": True}))
    try:
        agent.start()
        for _ in range(20):
            agent.poll(0.05)
    finally:
        agent.close(upload_timeout=0)
        ecu.close()
    assert ecu.requests == 0 and agent.can.stats["sent"] == 0


def test_config_check_names_the_obd_key(tmp_path: Path, keydir: Path) -> None:
    with pytest.raises(config.ConfigError, match=r"obd.ecu: must be a response identifier"):
        _config(tmp_path, keydir, "x", obd={"enabled": True, "ecu": 0x7E0})
    with pytest.raises(config.ConfigError, match=r"obd.request_period_s: must be below"):
        _config(
            tmp_path, keydir, "x", obd={"enabled": True, "requests": True, "request_period_s": 2.0}
        )


def _stored_readings(store: Path) -> list[dict[str, Any]]:
    return [r for _, _, raw in read_batches(store) for r in batch.parse(raw).payload()["readings"]]


@pytest.mark.parametrize(("kmh", "idle"), [(0.0, True), (36.0, False)])
def test_idle_time_is_known_with_the_speed_from_obd(kmh: float, idle: bool) -> None:
    # Old code: the engine's state needed J1939's CCVS, so with OBD-II's speed a running
    # engine's state was unknown: idle_s and engine_on_s stayed 0.
    p = _pipeline(enabled=True)
    eec1 = j1939.make_id(j1939.PGN_EEC1, 0, 3)
    running = j1939.encode(j1939.PGN_EEC1, {"engine_speed_rpm": 800.0})
    for i in range(51):  # 5 s at 10 Hz
        t = 1000.0 + i * 0.1
        p.on_can(t, ECU1, _answer(0x0D, kmh))
        p.on_can(t + 0.01, eec1, running)
    out = p.finish()
    on_s = sum(r["engine_on_s"] for r in out)
    assert on_s == pytest.approx(5.0, abs=0.05)
    assert sum(r["idle_s"] for r in out) == (pytest.approx(on_s) if idle else 0.0)
