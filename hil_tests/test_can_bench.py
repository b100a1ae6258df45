"""On the bench: the agent's CAN side on a real SocketCAN interface (or a kernel vcan0)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from hil_support import CanBench, EngineFeed, ask

from cngmrv.agent import config
from cngmrv.agent.runtime import Agent
from cngmrv.drivers import j1939
from cngmrv.drivers.can_source import CanSource, make_source, open_bus
from cngmrv.signed import keys


def test_receives_and_decodes_engine_speed(can_bench: CanBench, engine_feed: EngineFeed) -> None:
    assert engine_feed.flowing.wait(5.0)
    source = CanSource(open_bus("socketcan", can_bench.name, listen_only=True))
    source.start()
    deadline = time.monotonic() + 5.0
    rpm: list[float | None] = []
    while time.monotonic() < deadline and len(rpm) < 10:
        for _, can_id, data, _mono in source.wait(0.5):
            if j1939.parse_id(can_id).pgn == j1939.PGN_EEC1:
                rpm.append(j1939.decode(j1939.PGN_EEC1, data)["engine_speed_rpm"])
    source.stop()
    assert source.error is None
    assert len(rpm) >= 10, "no EEC1 frames within 5 s: is the engine (or generator) on the bus?"
    assert all(v is None or 0 <= v <= 8031.875 for v in rpm)


def _agent(tmp_path: Path, name: str) -> Agent:
    keys.generate(tmp_path / "keys")
    cfg = config.from_mapping(
        {
            "device": {"id": f"bench-{uuid.uuid4().hex[:6]}", "key_file": "keys/device.key"},
            "can": {"interface": "socketcan", "channel": name, "listen_only": True},
            "store": {"path": "store.sqlite"},
            "batch": {"readings_per_batch": 5},
            "clock": {"source": "none"},
        },
        tmp_path,
    )
    return Agent(cfg)


def test_agent_decodes_real_frames_into_readings_and_sends_nothing(
    tmp_path: Path, can_bench: CanBench, engine_feed: EngineFeed
) -> None:
    """Ten seconds of the agent on the bus: readings with diesel, and a TX counter that stays put.

    On a vcan the test's own engine is the only sender, so the interface's TX
    count must grow by exactly the frames it sent; on hardware, by nothing.
    """
    assert engine_feed.flowing.wait(5.0)
    agent = _agent(tmp_path, can_bench.name)
    with engine_feed.paused():
        tx_before, fed_before = can_bench.counter("tx_packets"), engine_feed.sent
    stop = threading.Event()
    agent.start()
    worker = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    worker.start()
    time.sleep(10.0)
    stop.set()
    worker.join()
    with engine_feed.paused():
        tx_after, fed_after = can_bench.counter("tx_packets"), engine_feed.sent
    agent.close()
    stats = agent.stats()
    assert stats["frames"] > 0, "no frames: is the engine (or generator) on the bus?"
    assert stats["decode_errors"] == 0, stats
    assert agent.readings >= 5 and agent.totals["diesel_l"] > 0
    assert stats["can"]["sent"] == 0
    assert tx_after - tx_before == fed_after - fed_before, "the agent transmitted in listen-only"


def test_listen_only_is_set_on_the_hardware(can_bench: CanBench) -> None:
    if can_bench.virtual:
        pytest.skip("a vcan has no controller and so no listen-only mode")
    out = subprocess.run(
        ["ip", "-details", "link", "show", can_bench.name], capture_output=True, text=True
    ).stdout
    assert "LISTEN-ONLY" in out, f"{can_bench.name} is not in listen-only mode:\n{out}"


def test_adapter_unplug_and_replug_is_survived(
    can_bench: CanBench, engine_feed: EngineFeed, replug: None
) -> None:
    assert engine_feed.flowing.wait(5.0)
    source = make_source(_settings(can_bench.name))
    source.start()
    try:
        _frames_within(source, 5.0)
        ask(f"UNPLUG the CAN adapter of {can_bench.name} now (60 s)")
        _event_within(source, "CAN_DOWN", 60.0)
        ask(f"PLUG the CAN adapter back in (60 s); {can_bench.name} must come up again")
        _event_within(source, "CAN_UP", 60.0)
        _frames_within(source, 10.0)
    finally:
        source.stop()


def test_vcan_down_and_up_is_survived(can_bench: CanBench, engine_feed: EngineFeed) -> None:
    if not can_bench.virtual:
        pytest.skip("on hardware the replug test (CNGMRV_HIL_REPLUG=1) does this by hand")
    if os.geteuid() != 0:
        pytest.skip("taking vcan0 down and up needs root (CAP_NET_ADMIN)")
    assert engine_feed.flowing.wait(5.0)
    source = make_source(_settings(can_bench.name))
    source.start()
    try:
        _frames_within(source, 5.0)
        subprocess.run(["ip", "link", "set", can_bench.name, "down"], check=True)
        _event_within(source, "CAN_DOWN", 10.0)
        subprocess.run(["ip", "link", "set", can_bench.name, "up"], check=True)
        _event_within(source, "CAN_UP", 10.0)
        _frames_within(source, 10.0)
    finally:
        subprocess.run(["ip", "link", "set", can_bench.name, "up"], check=False)
        source.stop()


def test_vcan_deleted_and_recreated_is_survived(
    can_bench: CanBench, engine_feed: EngineFeed
) -> None:
    """The interface vanishing and coming back (a USB adapter replugged, on a vcan)."""
    if not can_bench.virtual:
        pytest.skip("on hardware the replug test (CNGMRV_HIL_REPLUG=1) does this by hand")
    if os.geteuid() != 0:
        pytest.skip("deleting and recreating vcan0 needs root (CAP_NET_ADMIN)")
    assert engine_feed.flowing.wait(5.0)
    source = make_source(_settings(can_bench.name))
    source.start()
    name = can_bench.name
    try:
        _frames_within(source, 5.0)
        subprocess.run(["ip", "link", "delete", name], check=True)
        _event_within(source, "CAN_DOWN", 10.0)
        subprocess.run(["ip", "link", "add", "dev", name, "type", "vcan"], check=True)
        subprocess.run(["ip", "link", "set", name, "up"], check=True)
        _event_within(source, "CAN_UP", 15.0)
        _frames_within(source, 15.0)
        assert source.error is None
    finally:
        if not os.path.exists(f"/sys/class/net/{name}"):
            subprocess.run(["ip", "link", "add", "dev", name, "type", "vcan"], check=False)
        subprocess.run(["ip", "link", "set", name, "up"], check=False)
        source.stop()


def _settings(name: str):  # type: ignore[no-untyped-def]
    from cngmrv.drivers.can_source import SourceSettings

    return SourceSettings(
        interface="socketcan", channel=name, listen_only=True, pgns=None, backoff_max_s=1.0
    )


def _frames_within(source, timeout: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if source.wait(0.2):
            return
    pytest.fail(f"no frames within {timeout} s")


def _event_within(source, kind: str, timeout: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        source.wait(0.2)  # keep draining, as the agent does
        if any(e["kind"] == kind for e in source.events()):
            return
    pytest.fail(f"no {kind} event within {timeout} s")
