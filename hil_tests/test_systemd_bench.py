"""On the bench: the agent as a bus runs it, started by systemd from deploy/cngmrv.service.

These need the install of docs/deploy-pi.md on a disposable machine whose PID 1
is systemd (``CNGMRV_HIL_SYSTEMD=1``: the virtual bench's guest, make vm-bench),
and a J1939 feed on ``CNGMRV_HIL_CAN`` (the simulated engine on a vcan).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hil_support import (
    CanBench,
    EngineFeed,
    InstalledAgent,
    metrics,
    report_figures,
    systemd_bench,
)

# ts, level and logger, then the message's own pairs (a value may be quoted, with spaces).
KV_LINE = re.compile(r"^ts=\S+ level=\w+ logger=[\w.]+( \w+=(\"[^\"]*\"|'[^']*'|\S+))+$")


@pytest.fixture
def agent() -> Iterator[InstalledAgent]:
    installed = systemd_bench()
    installed.configure({("batch", "readings_per_batch"): "10"})
    yield installed
    installed.systemctl("stop")


def _wall_mono_us(entry: dict[str, object]) -> int:
    return int(str(entry["__MONOTONIC_TIMESTAMP"]))


def test_start_reports_active_only_after_ready(
    agent: InstalledAgent, can_bench: CanBench, engine_feed: EngineFeed
) -> None:
    """``Type=notify``: the unit turns active after the agent's READY=1, not at exec."""
    assert engine_feed.flowing.wait(5.0)
    mark = agent.cursor()
    agent.systemctl("start")
    props = agent.show(
        "ActiveState",
        "SubState",
        "ExecMainStartTimestampMonotonic",
        "ActiveEnterTimestampMonotonic",
    )
    assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
    ready = [e for e in agent.journal(mark) if "event=ready" in str(e.get("MESSAGE", ""))]
    assert ready, "active, but the agent never logged event=ready:\n" + agent.journal_text()
    exec_us = int(props["ExecMainStartTimestampMonotonic"])
    active_us = int(props["ActiveEnterTimestampMonotonic"])
    # The agent's own line saying READY went out comes before systemd's "active".
    assert exec_us < _wall_mono_us(ready[0]) <= active_us + 500_000, (exec_us, ready[0], active_us)
    assert active_us - exec_us > 0
    # Ready means the store is open and the sources started: the health endpoint answers.
    status = agent.as_agent("status", "--config", str(agent.CONFIG), "--json", check=False)
    assert status.returncode == 0, status.stderr


def test_journald_holds_key_value_logs(
    agent: InstalledAgent, can_bench: CanBench, engine_feed: EngineFeed
) -> None:
    assert engine_feed.flowing.wait(5.0)
    mark = agent.cursor()
    agent.systemctl("start")
    pid = str(agent.main_pid())
    time.sleep(3.0)
    agent.systemctl("stop")
    # The agent's own lines (ExecStartPre's `config check` prints a sentence for a person).
    entries = [e for e in agent.journal(mark) if e.get("_PID") == pid]
    assert entries, "nothing from the agent in the journal"
    lines = [str(e["MESSAGE"]) for e in entries]
    bad = [line for line in lines if not KV_LINE.match(line)]
    assert not bad, "lines in the journal that are not key=value:\n" + "\n".join(bad[:10])
    events = {m.group(1) for line in lines if (m := re.search(r" event=(\w+)", line))}
    assert {"ready", "stopped"} <= events, events


def test_stop_seals_and_exits_within_5_s(
    agent: InstalledAgent, can_bench: CanBench, engine_feed: EngineFeed
) -> None:
    assert engine_feed.flowing.wait(5.0)
    mark = agent.cursor()
    agent.systemctl("start")
    time.sleep(15.0)  # readings accumulate, some of them not yet in a batch
    took = agent.systemctl("stop")
    props = agent.show("Result", "ExecMainStatus", "ExecMainCode")
    entries = agent.journal(mark)
    timeline = [f"{_wall_mono_us(e) / 1e6:10.3f} {e.get('MESSAGE', '')}" for e in entries[-12:]]

    def logged_at(pattern: str) -> float:
        rx = re.compile(pattern)
        hits = [_wall_mono_us(e) / 1e6 for e in entries if rx.match(str(e.get("MESSAGE", "")))]
        assert hits, f"no {pattern!r} in the journal:\n" + "\n".join(timeline)
        return hits[-1]

    # systemd's own account, from sending SIGTERM to the unit inactive: the
    # systemctl client's wall time also holds its own start, which under
    # emulation on a busy host costs seconds that are not the agent's.
    stop_s = logged_at(r"Stopped cngmrv\.service\b") - logged_at(r"Stopping cngmrv\.service\b")
    report_figures("stop", {"stop_s": stop_s, "systemctl_stop_s": took})
    assert stop_s < 5.0, (
        f"the unit took {stop_s:.2f} s to stop (service.stop_timeout_s is 5; systemctl "
        f"returned after {took:.2f} s):\n" + "\n".join(timeline)
    )
    assert props["Result"] == "success" and props["ExecMainStatus"] == "0", props
    agent.wait_for_message(r"event=stopped clean=true", mark, 5.0)
    report = agent.verify()
    assert report["passed"], report
    readings = agent.readings()
    assert len(readings) >= 10, f"{len(readings)} readings sealed after 15 s on the bus"
    assert sum(r["diesel_l"] for r in readings) > 0


def test_watchdog_restarts_a_hung_agent_and_the_chain_goes_on(
    agent: InstalledAgent, can_bench: CanBench, engine_feed: EngineFeed
) -> None:
    """SIGSTOP past WatchdogSec: systemd kills and restarts it; the new BOOT says unclean."""
    assert engine_feed.flowing.wait(5.0)
    mark = agent.cursor()
    agent.systemctl("start")
    time.sleep(12.0)  # a batch or so sealed before the hang
    props = agent.show("WatchdogUSec", "NRestarts", "TimeoutAbortUSec")
    watchdog_s = int(props["WatchdogUSec"]) / 1e6 if props["WatchdogUSec"].isdigit() else 30.0
    restarts0 = int(props["NRestarts"])
    hung = agent.main_pid()
    os.kill(hung, signal.SIGSTOP)
    # The watchdog's SIGABRT waits on a stopped process; TimeoutAbortSec then SIGKILLs it.
    deadline = time.monotonic() + watchdog_s + 20.0 + 5.0 + 60.0
    restarted = False
    while time.monotonic() < deadline:
        p = agent.show("NRestarts", "MainPID", "ActiveState")
        if int(p["NRestarts"]) > restarts0 and p["ActiveState"] == "active":
            restarted = int(p["MainPID"]) not in (0, hung)
            if restarted:
                break
        time.sleep(1.0)
    report_figures("watchdog", {"watchdog_restarted": restarted})
    assert restarted, "not restarted after the watchdog:\n" + agent.journal_text()
    log = "\n".join(agent.messages(mark))
    assert "Watchdog timeout" in log or "watchdog" in log.lower(), log[-3000:]
    agent.wait_for_message(r"event=boot epoch=\d+ clean_stop=False", mark, 60.0)
    time.sleep(5.0)
    agent.systemctl("stop")
    report = agent.verify()
    assert report["passed"], report
    (device,) = report["devices"].values()
    assert len(device["boot_epochs"]) == 2 and device["unclean_stops"] == 1, device
    assert not device["gaps"], device


def test_shipped_unit_verifies() -> None:
    installed = systemd_bench()
    r = subprocess.run(
        ["systemd-analyze", "verify", f"/etc/systemd/system/{installed.UNIT}"],
        capture_output=True,
        text=True,
    )
    about_unit = [line for line in r.stderr.splitlines() if "cngmrv.service" in line]
    assert r.returncode == 0 and not about_unit, r.stderr


def _networkd_complaints(files: dict[str, str]) -> list[str]:
    folder = Path("/etc/systemd/network")
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    mark = InstalledAgent.cursor()
    try:
        subprocess.run(["systemctl", "restart", "systemd-networkd"], check=True)
        time.sleep(2.0)
        entries = InstalledAgent().journal(mark, unit="systemd-networkd.service")
    finally:
        for name in files:
            (folder / name).unlink()
        subprocess.run(["systemctl", "stop", "systemd-networkd"], check=False)
    return [
        str(e.get("MESSAGE", ""))
        for e in entries
        if any(n in str(e.get("MESSAGE", "")) for n in files)
    ]


def test_shipped_network_file_parses() -> None:
    """systemd-networkd loads deploy/80-can0.network without a complaint (a vcan has no
    bitrate, so the [CAN] settings are parsed here, not applied)."""
    installed = systemd_bench()
    shipped = (installed.EXAMPLE.parent / "80-can0.network").read_text()
    # The check can fail: a misspelt key in the same section is reported.
    broken = _networkd_complaints({"81-broken.network": shipped.replace("BitRate=", "BitRat=")})
    assert any("BitRat" in m for m in broken), broken
    assert _networkd_complaints({"80-can0.network": shipped}) == []


def test_shipped_udev_rules_parse() -> None:
    installed = systemd_bench()
    shipped = (installed.EXAMPLE.parent / "99-cngmrv.rules").read_text()
    folder = Path(tempfile.mkdtemp())
    try:

        def complaints(text: str) -> list[str]:
            rules = folder / "99-cngmrv.rules"
            rules.write_text(text)
            if shutil.which("udevadm") and _has_udevadm_verify():
                r = subprocess.run(
                    ["udevadm", "verify", str(rules)], capture_output=True, text=True
                )
                return [] if r.returncode == 0 else (r.stdout + r.stderr).splitlines()
            # systemd < 253: udevadm test loads every rules file and reports what it cannot parse.
            dest = Path("/etc/udev/rules.d/99-cngmrv.rules")
            shutil.copy2(rules, dest)
            try:
                r = subprocess.run(
                    ["udevadm", "test", "--action=add", "/sys/class/tty/ttyS0"],
                    capture_output=True,
                    text=True,
                )
            finally:
                dest.unlink()
            out = r.stdout + r.stderr
            return [
                line
                for line in out.splitlines()
                if "99-cngmrv.rules" in line and "Reading" not in line
            ]

        assert complaints(shipped.replace("ATTRS{idVendor}==", "ATTRS{idVendor}=!", 1))
        assert complaints(shipped) == []
    finally:
        shutil.rmtree(folder)


def _has_udevadm_verify() -> bool:
    r = subprocess.run(["udevadm", "verify", "--help"], capture_output=True, text=True)
    return r.returncode == 0


def test_agent_sends_no_frame_with_the_default_config(
    agent: InstalledAgent, can_bench: CanBench, engine_feed: EngineFeed
) -> None:
    """Listen-only under systemd: vcan0's TX counter grows by the feed's frames only."""
    assert engine_feed.flowing.wait(5.0)
    with engine_feed.paused():
        tx0, fed0 = can_bench.counter("tx_packets"), engine_feed.sent
    agent.systemctl("start")
    time.sleep(10.0)
    agent.systemctl("stop")
    with engine_feed.paused():
        tx1, fed1 = can_bench.counter("tx_packets"), engine_feed.sent
    agent_tx = (tx1 - tx0) - (fed1 - fed0)
    report_figures("listen_only", {"agent_tx_frames": agent_tx})
    assert agent_tx == 0, f"the agent sent {agent_tx} frames in listen-only"


def test_receive_queue_overflow_is_counted(agent: InstalledAgent, can_bench: CanBench) -> None:
    """The agent stalled (SIGSTOP) while a generator fills the bus: the kernel's drops are
    counted in the metric and recorded as a signed ``CAN_RX_OVERFLOW`` event.

    The kernel hands the socket's drop count over with the first frame queued
    after the drops (drivers/socketcan_drops.py), so a few frames follow the stall,
    as on a bus that keeps talking.
    """
    stalled, after_stall = 3000, 5
    # Debian's default socket buffer for the agent's socket (the bench may have raised it).
    rmem = Path("/proc/sys/net/core/rmem_default")
    saved = rmem.read_text()
    rmem.write_text("212992\n")
    try:
        agent.systemctl("start")
    finally:
        rmem.write_text(saved)
    before = metrics()
    pid = agent.main_pid()

    def offer(n: int) -> None:
        # LFE (PGN 65266) from address 0: a frame the agent's kernel filters let through.
        subprocess.run(
            ["cangen", can_bench.name, "-e", "-I", "18FEF200", "-L", "8", "-D", "i", "-g", "1"]
            + ["-n", str(n)],
            check=True,
        )

    os.kill(pid, signal.SIGSTOP)
    try:
        offer(stalled)
    finally:
        os.kill(pid, signal.SIGCONT)
    offer(after_stall)
    offered = stalled + after_stall
    key_rx = 'cngmrv_frames_received_total{source="can"}'
    key_drop = 'cngmrv_frames_dropped_total{source="can"}'
    deadline = time.monotonic() + 60.0
    while True:
        # Until every offered frame is either read or counted dropped (the metrics
        # snapshot follows the agent's loop by up to a second).
        after = metrics()
        received = int(after[key_rx] - before[key_rx])
        reported = int(after[key_drop] - before[key_drop])
        if received + reported >= offered or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    agent.systemctl("stop")
    report_figures(
        "overflow", {"overflow": {"offered": offered, "received": received, "dropped": reported}}
    )
    assert received < offered, f"no overflow: all {offered} frames read; offer more to test this"
    assert reported == offered - received, (
        f"{offered} frames offered, {received} read: the kernel dropped {offered - received}, "
        f"the agent's metric says {reported}"
    )
    signed = [e for e in agent.events() if e.get("kind") == "CAN_RX_OVERFLOW"]
    assert signed, "no CAN_RX_OVERFLOW event in the signed batches"
    assert sum(int(e["dropped"]) for e in signed) == reported, signed
    assert agent.verify().get("passed"), "the batches holding the event do not verify"


def test_with_requests_on_it_sends_exactly_the_planned_requests(
    agent: InstalledAgent, can_bench: CanBench, engine_feed: EngineFeed
) -> None:
    """``can.requests``: an address claim, then Request (PGN 59904) for HOURS and LFC every 10 s."""
    assert engine_feed.flowing.wait(5.0)
    agent.configure(
        {
            ("can", "listen_only"): "false",
            ("can", "requests"): "true",
            ("can", "name"): '"A00C81045A20021B"',
            ("batch", "readings_per_batch"): "10",
        }
    )
    dump = subprocess.Popen(
        ["candump", "-L", f"{can_bench.name},18EA00F9:03FF00FF,18EE00F9:03FF00FF"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        agent.systemctl("start")
        t0 = time.monotonic()
        time.sleep(35.0)
        agent.systemctl("stop")
        window = time.monotonic() - t0
    finally:
        dump.terminate()
    out, _ = dump.communicate(timeout=10)
    frames = [line.split()[2] for line in out.splitlines() if "#" in line]
    ids = [int(f.split("#")[0], 16) for f in frames]
    from_agent = [(i, f) for i, f in zip(ids, frames, strict=True) if i & 0xFF == 249]
    claims = [f for i, f in from_agent if (i >> 8) & 0xFF00 == 0xEE00]
    requests = [f for i, f in from_agent if (i >> 8) & 0xFF00 == 0xEA00]
    asked = [int.from_bytes(bytes.fromhex(f.split("#")[1])[:3], "little") for f in requests]
    periods = window / 10.0
    report_figures("requests", {"requests_sent": len(requests), "claims_sent": len(claims)})
    assert claims, f"no address claim from 249: {frames[:10]}"
    assert set(asked) == {65253, 65257}, asked
    for pgn in (65253, 65257):
        n = asked.count(pgn)
        assert int(periods) - 1 <= n <= int(periods) + 1, (pgn, n, window)
    assert len(from_agent) == len(claims) + len(requests), from_agent
