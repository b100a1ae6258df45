"""The agent on a real (virtual) bus: an outage mid-run, listen-only, requests, replay by config."""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import can
import pytest

from cngmrv.agent import config
from cngmrv.agent.builtin_sources import CanBus
from cngmrv.agent.replay import replay
from cngmrv.agent.runtime import RUN_WAIT_ALONE_S, Agent
from cngmrv.agent.source import configured
from cngmrv.drivers import j1939
from cngmrv.signed import batch

LFE = j1939.make_id(j1939.PGN_LFE, 0)
NAME = 0x7777 | (512 << 21) | (3 << 40) | (1 << 60) | (1 << 63)


def until(cond: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _lfe(rate: float | None) -> bytes:
    return j1939.encode(j1939.PGN_LFE, {"fuel_rate_lph": rate})


def _config(tmp_path: Path, keydir: Path, can_section: dict[str, Any]) -> config.Config:
    return config.from_mapping(
        {
            "device": {"id": "bus-1", "key_file": str(keydir / "device.key")},
            "can": can_section,
            "store": {"path": "s.sqlite"},
            "batch": {"readings_per_batch": 10},
        },
        tmp_path,
    )


class Running:
    """An agent polling in its own thread, as ``cngmrv run`` runs it."""

    def __init__(self, cfg: config.Config) -> None:
        self.agent = Agent(cfg)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.agent.run, args=(self.stop,))
        self.agent.start()
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.agent.close(upload_timeout=0)


def _signed_events(store: Path, pubkey_dir: Path) -> list[dict[str, Any]]:
    from cngmrv.signed import keys

    pub = keys.load_public_key(pubkey_dir / keys.PUB_FILE)
    db = sqlite3.connect(store)
    rows = [(s, bytes(b)) for s, b in db.execute("SELECT seq, bytes FROM batches ORDER BY seq")]
    db.close()
    report = batch.verify_set(((f"b{s}", raw) for s, raw in rows), pub)
    assert report.passed, report.bad
    events = []
    for _, raw in rows:
        payload = batch.unpackb(batch.unpackb(raw)[3])
        events.extend(payload["events"])
    return events


def test_bus_taken_down_mid_run_recovers_by_itself_and_loses_nothing_around_it(
    tmp_path: Path, keydir: Path
) -> None:
    channel = f"outage-{uuid.uuid4().hex[:8]}"
    engine = can.Bus(interface="virtual", channel=channel, preserve_timestamps=True)
    run = Running(_config(tmp_path, keydir, {"interface": "virtual", "channel": channel}))
    agent = run.agent
    try:
        # 30 s of bus time at 20 L/h.
        for i in range(300):
            engine.send(can.Message(timestamp=1000 + i * 0.1, arbitration_id=LFE, data=_lfe(20.0)))
        assert until(lambda: agent.pipeline.stats.frames == 300)
        bus = agent.can.bus
        assert bus is not None
        bus.shutdown()  # the bus dies underneath the agent
        # 5 s of bus time while the agent has no bus: these may be lost (they are the
        # outage), and they say "not available" so whatever does arrive adds nothing.
        for i in range(300, 350):
            engine.send(can.Message(timestamp=1000 + i * 0.1, arbitration_id=LFE, data=_lfe(None)))
        assert until(lambda: agent.event_counts["CAN_UP"] > 0)
        assert agent.can.bus is not None and agent.can.bus is not bus
        seen_before_c = agent.pipeline.stats.frames
        for i in range(350, 650):
            engine.send(can.Message(timestamp=1000 + i * 0.1, arbitration_id=LFE, data=_lfe(20.0)))
        # >=: a straggler of the outage's frames may reach the new bus after the count.
        assert until(lambda: agent.pipeline.stats.frames >= seen_before_c + 300)
    finally:
        run.close()
        engine.shutdown()
    assert 600 <= agent.pipeline.stats.frames <= 650
    # Every frame before and after the outage was integrated: 29.9 s + 29.9 s at
    # 20 L/h; the outage itself is an explicit gap, never bridged.
    assert agent.totals["diesel_l"] == pytest.approx(20.0 / 3600 * 59.8, rel=1e-9)
    assert agent.event_counts["CAN_DOWN"] == agent.event_counts["CAN_UP"] == 1
    assert agent.stats()["can_outages"] == 1
    # The outage travels in the signed batches, with its reason and length.
    events = _signed_events(tmp_path / "s.sqlite", keydir)
    down = next(e for e in events if e["kind"] == "CAN_DOWN")
    up = next(e for e in events if e["kind"] == "CAN_UP")
    assert "closed bus" in down["reason"] and down["frames"] == 300
    assert up["outage_s"] > 0


def test_listen_only_agent_sends_nothing_even_when_asked(tmp_path: Path, keydir: Path) -> None:
    channel = f"listen-{uuid.uuid4().hex[:8]}"
    observer = can.Bus(interface="virtual", channel=channel)
    engine = can.Bus(interface="virtual", channel=channel, preserve_timestamps=True)
    run = Running(_config(tmp_path, keydir, {"interface": "virtual", "channel": channel}))
    sent = 0
    try:
        dm1 = bytes.fromhex("43ffd403097e900c14026102090161020c03")
        for second in range(5):
            t = 1000.0 + second
            traffic = [
                # A tool asks every node to claim its address (a claiming node would answer)...
                (j1939.make_id(j1939.PGN_REQUEST, 0xF9, 6, 255), j1939.encode_request(60928)),
                # ...and asks the gateway's usual address for HOURS.
                (j1939.make_id(j1939.PGN_REQUEST, 0xF9, 6, 0xF9), j1939.encode_request(65253)),
                (j1939.make_id(j1939.PGN_TP_CM, 0, 7), bytes([32, 18, 0, 3, 0xFF, 0xCA, 0xFE, 0])),
            ]
            traffic += [
                (
                    j1939.make_id(j1939.PGN_TP_DT, 0, 7),
                    bytes([i + 1]) + (dm1[7 * i : 7 * i + 7] + b"\xff" * 7)[:7],
                )
                for i in range(3)
            ]
            traffic += [(LFE, _lfe(20.0))] * 10
            for k, (can_id, data) in enumerate(traffic):
                engine.send(can.Message(timestamp=t + k * 0.05, arbitration_id=can_id, data=data))
                sent += 1
        assert until(lambda: run.agent.pipeline.stats.frames == sent)
        time.sleep(0.3)  # give a misbehaving agent the chance to answer
    finally:
        run.close()
        engine.shutdown()
    seen = []
    while (msg := observer.recv(0.2)) is not None:
        seen.append(msg)
    observer.shutdown()
    assert len(seen) == sent  # only the test's own frames: the agent sent none
    assert run.agent.stats()["can"]["sent"] == 0
    assert run.agent.pipeline.stats.dm1_changes == 1


def test_requests_when_configured(tmp_path: Path, keydir: Path) -> None:
    channel = f"requests-{uuid.uuid4().hex[:8]}"
    observer = can.Bus(interface="virtual", channel=channel)
    cfg = _config(
        tmp_path,
        keydir,
        {
            "interface": "virtual",
            "channel": channel,
            "listen_only": False,
            "requests": True,
            "request_period_s": 1.0,
            "name": f"{NAME:016x}",
            "source_address": 0x4A,
        },
    )
    run = Running(cfg)
    got: list[can.Message] = []

    def requests() -> int:
        while (msg := observer.recv(0)) is not None:
            got.append(msg)
        return sum(1 for m in got if j1939.parse_id(m.arbitration_id).pgn == j1939.PGN_REQUEST)

    try:
        assert until(requests)
    finally:
        run.close()
        observer.shutdown()
    first = j1939.parse_id(got[0].arbitration_id)
    assert first.pgn == j1939.PGN_ADDRESS_CLAIMED and first.source == 0x4A
    asked = {
        bytes(m.data) for m in got if j1939.parse_id(m.arbitration_id).pgn == j1939.PGN_REQUEST
    }
    assert asked <= {j1939.encode_request(j1939.PGN_HOURS), j1939.encode_request(j1939.PGN_LFC)}


def test_replay_by_config_runs_the_log_to_its_end(tmp_path: Path, keydir: Path) -> None:
    log = tmp_path / "trip.log"
    lines = []
    for i in range(600):  # 60 s: LFE at 10 Hz and CCVS at 10 Hz, plus 11-bit chatter
        t = 1000 + i * 0.1
        lines.append(f"({t:.6f}) can0 18FEF200#6801FFFFFFFFFFFF\n")  # 360 x 0.05 = 18 L/h
        lines.append(f"({t + 0.05:.6f}) can0 18FEF100#FF0024FFFFFFFFFF\n")  # 36 km/h
        lines.append(f"({t + 0.07:.6f}) can0 123#0102\n")
    log.write_text("".join(lines))
    run = Running(
        _config(tmp_path, keydir, {"interface": "replay", "channel": "trip.log", "queue_size": 64})
    )
    assert until(lambda: not run.thread.is_alive(), timeout=60)  # stops by itself at the end
    run.close()
    agent = run.agent
    ref = replay(log)
    assert agent.totals["diesel_l"] == pytest.approx(ref["diesel_l"], rel=1e-12)
    assert agent.totals["diesel_l"] == pytest.approx(18.0 / 3600 * 59.9, rel=1e-9)
    assert agent.totals["distance_km"] == pytest.approx(36.0 / 3600 * 59.9, rel=1e-9)
    assert agent.stats()["can"]["queue_dropped"] == 0
    assert agent.stats()["can"]["ignored"] == 600


@pytest.mark.parametrize(
    ("can_section", "message"),
    [
        ({"interface": "socketcann"}, r"^can\.interface: must be one of"),
        ({"requests": True}, r"^can\.requests: needs can\.listen_only = false"),
        ({"requests": True, "listen_only": False}, r"^can\.name: required"),
        ({"name": "xyz"}, r"^can\.name: must be a J1939 NAME"),
        ({"name": "1" * 17}, r"^can\.name: must fit in 64 bits"),
        ({"request_period_s": 0.1}, r"^can\.request_period_s: must be >= 1 s"),
        (
            {"interface": "replay", "channel": "absent.log"},
            r"^can\.channel: replay log .* not found",
        ),
        ({"replay_speed": -1.0}, r"^can\.replay_speed: must be >= 0"),
    ],
)
def test_can_config_errors_name_the_key(
    tmp_path: Path, keydir: Path, can_section: dict[str, Any], message: str
) -> None:
    with pytest.raises(config.ConfigError, match=message):
        _config(tmp_path, keydir, can_section)


def test_engine_name_in_config(tmp_path: Path, keydir: Path) -> None:
    cfg = config.from_mapping(
        {
            "device": {"id": "bus-1", "key_file": "k"},
            "store": {"path": "s"},
            "pipeline": {"engine_name": f"{NAME:016X}"},
        },
        tmp_path,
    )
    assert cfg.pipeline.engine_name == NAME
    sources = configured(cfg)
    settings = next(s for s in sources if isinstance(s, CanBus)).settings(sources)
    assert settings.listen_only and settings.requests is None


def test_a_short_outage_is_an_explicit_gap_not_bridged() -> None:
    from cngmrv.agent.pipeline import Pipeline, PipelineConfig

    def run(outage: bool) -> float:
        p = Pipeline(PipelineConfig(can_max_gap_s=1.0))
        for i in range(20):
            p.on_can(1000 + i * 0.1, LFE, _lfe(36.0))
        if outage:
            p.on_source_event({"t": 1001.95, "kind": "CAN_DOWN", "reason": "test"})
        # 0.4 s later: within the maximum gap, so only the outage event stops bridging.
        for i in range(20):
            p.on_can(1002.3 + i * 0.1, LFE, _lfe(36.0))
        return sum(r["diesel_l"] for r in p.advance() + p.finish())

    assert run(False) == pytest.approx(36.0 / 3600 * (1.9 + 0.4 + 1.9), rel=1e-9)
    assert run(True) == pytest.approx(36.0 / 3600 * (1.9 + 1.9), rel=1e-9)


def test_an_agent_with_one_source_passes_a_few_times_a_second_on_a_silent_bus(
    tmp_path: Path, keydir: Path
) -> None:
    channel = f"quiet-{uuid.uuid4().hex[:8]}"
    agent = Agent(_config(tmp_path, keydir, {"interface": "virtual", "channel": channel}))
    stop = threading.Event()
    passes: list[float] = []
    loop = threading.Thread(target=agent.run, args=(stop, lambda: passes.append(time.monotonic())))
    agent.start()
    loop.start()
    try:
        time.sleep(3.0)
    finally:
        stop.set()
        loop.join()
        agent.close(upload_timeout=0)
    # One pass per RUN_WAIT_ALONE_S: a pass every 0.1 s, as with several sources, is 30.
    assert 0 < len(passes) <= 3.0 / RUN_WAIT_ALONE_S + 2
