"""Health metrics: Prometheus text on 127.0.0.1 only, snapshots from the main loop."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import can
import pytest

from cngmrv.agent import config, health
from cngmrv.agent.clock import FixedClock
from cngmrv.agent.runtime import Agent
from cngmrv.drivers import j1939


@pytest.fixture
def agent(tmp_path: Path, keydir: Path) -> Iterator[Agent]:
    cfg = config.from_mapping(
        {
            "device": {"id": "bus-h", "key_file": str(keydir / "device.key")},
            "can": {"interface": "virtual", "channel": f"cngmrv-h-{uuid.uuid4().hex[:8]}"},
            "store": {"path": "store.sqlite"},
            "batch": {"readings_per_batch": 1},
        },
        tmp_path,
    )
    a = Agent(cfg, clock=FixedClock("synchronised"))
    a.start()
    try:
        yield a
    finally:
        a.close()


def test_every_metric_is_exposed_with_help_and_type(agent: Agent) -> None:
    text = health.render(health.collect(agent))
    for name, (kind, _) in health.METRICS.items():
        assert f"# TYPE {name} {kind}\n" in text
        assert any(line.startswith(name) for line in text.splitlines()), name
    samples = health.parse(text)
    assert samples["cngmrv_boot_epoch"] == 1
    assert samples['cngmrv_clock_state{state="synchronised"}'] == 1
    assert samples['cngmrv_clock_state{state="unknown"}'] == 0
    assert samples['cngmrv_frames_received_total{source="can"}'] == 0
    assert 'cngmrv_frames_received_total{source="kit"}' not in samples  # no kit configured


def test_served_on_loopback_only_and_only_metrics(agent: Agent) -> None:
    server = health.HealthServer(0).start(agent)
    try:
        host, port = server._http.server_address[:2]
        assert host == "127.0.0.1"
        addrs = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
        for addr in addrs - {"127.0.0.1"} - {a for a in addrs if a.startswith("127.")}:
            with pytest.raises(OSError):
                socket.create_connection((addr, port), timeout=1).close()
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(server.url.replace("/metrics", "/"), timeout=5)
        assert e.value.code == 404
        assert health.fetch(port)["cngmrv_readings_total"] == 0
    finally:
        server.stop()


def test_scrapes_see_the_main_loops_snapshot(agent: Agent) -> None:
    server = health.HealthServer(0, refresh_s=0.0).start(agent)
    port = server._http.server_address[1]
    bus = can.Bus(interface="virtual", channel=agent.config.source_values["can"]["channel"])
    try:
        before = health.fetch(port)['cngmrv_frames_received_total{source="can"}']
        for i in range(30):
            bus.send(
                can.Message(
                    arbitration_id=j1939.make_id(j1939.PGN_EEC1, 0, 3),
                    data=bytes(8),
                    timestamp=1e9 + i * 0.1,
                )
            )
        seen = 0.0
        for _ in range(200):
            agent.poll(0.01)
            server.refresh()
            seen = health.fetch(port)['cngmrv_frames_received_total{source="can"}']
            if seen == 30:
                break
        assert before == 0 and seen == 30
        assert health.fetch(port)["cngmrv_snapshot_age_seconds"] >= 0
    finally:
        bus.shutdown()
        server.stop()


def test_status_lines_for_a_person() -> None:
    text = health.render(
        {
            "cngmrv_boot_epoch": [({}, 7)],
            "cngmrv_clock_state": [({"state": "informative"}, 1)],
            "cngmrv_batches_pending": [({}, 3)],
            "cngmrv_last_upload_timestamp_seconds": [({}, 0)],
            "cngmrv_signal_source_address": [
                ({"signal": "fuel_rate"}, 0),
                ({"signal": "wheel_speed"}, 71),
                ({"signal": "engine_speed"}, -1),
            ],
            "cngmrv_signal_foreign_frames_total": [({"signal": "wheel_speed"}, 12)],
        }
    )
    lines = health.describe(health.parse(text))
    assert "boot epoch      7" in lines
    assert (
        "sources         fuel_rate SA 0, engine_speed none, wheel_speed SA 71 (12 from others)"
        in lines
    )
    assert any(x.startswith("clock           informative") for x in lines)
    assert any("3 pending" in x for x in lines)
    assert "last upload     never" in lines


def test_counters_past_a_million_keep_every_digit() -> None:
    # A loss count is a difference of two counters; "%g" would round both to six digits.
    text = health.render({"cngmrv_frames_received_total": [({"source": "can"}, 2_280_001)]})
    assert health.parse(text)['cngmrv_frames_received_total{source="can"}'] == 2_280_001
    assert 'cngmrv_frames_received_total{source="can"} 2280001\n' in text
    text = health.render({"cngmrv_disk_free_bytes": [({}, 0.1)]})
    assert health.parse(text)["cngmrv_disk_free_bytes"] == 0.1


def test_a_sources_own_counters_are_metrics_with_no_code_of_its_own(agent: Agent) -> None:
    # A source the health module has never heard of: its link's and decoder's counters
    # reach the exposition through Agent.source_counters alone.
    agent.pipeline.stats.plugins["newsource"] = {"lines": 7, "rejected": {'bad "crc"\n': 2}}
    samples = health.parse(health.render(health.collect(agent)))
    assert samples['cngmrv_source_counter{source="newsource",counter="lines"}'] == 7
    key = 'cngmrv_source_counter{source="newsource",counter="rejected",key="bad \\"crc\\"\\n"}'
    assert samples[key] == 2
    # The CAN link's own counters come the same way.
    assert samples['cngmrv_source_counter{source="can",counter="frames"}'] == 0
    assert "source newsource lines 7" in health.describe(samples)


def test_source_samples_leave_out_text_and_flags() -> None:
    samples = health.source_samples(
        {"gps": {"fixes": 3, "connected": True, "port": "/dev/x", "rejected": {"checksum": 1}}}
    )
    assert samples == [
        ({"source": "gps", "counter": "fixes"}, 3),
        ({"source": "gps", "counter": "rejected", "key": "checksum"}, 1),
    ]
