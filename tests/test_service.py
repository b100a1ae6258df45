"""`cngmrv run` as systemd runs it: READY, watchdog pings, metrics, SIGTERM → sealed, exit 0.

The agent runs in its own process, fed across the process boundary by a
python-can ``udp_multicast`` bus (the ``virtual`` bus is in-process only) and
a real pseudo-terminal carrying the simulated kit firmware's bytes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tty
from collections.abc import Iterator
from pathlib import Path

import can
import pytest

from cngmrv.agent import health, service
from cngmrv.signed import batch, keys
from cngmrv.sim.agent_process import free_tcp_port, new_mcast_port
from cngmrv.sim.drive import TICK_S, drive
from cngmrv.sim.ecu import EngineEcu
from cngmrv.sim.kit import KitFirmware, KitLogic
from cngmrv.sim.vehicle import CityBus, CityBusParams, DriveCycle

GROUP = "239.74.163.2"
# A port of its own per run (see new_mcast_port); the agent gets it through
# python-can's own environment config (CAN_CONFIG).
MCAST_PORT = new_mcast_port()


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    # AF_UNIX paths are limited to 108 bytes: pytest's tmp_path can be longer.
    d = tempfile.mkdtemp(prefix="cngmrv-n")
    path = os.path.join(d, "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(0.1)
    try:
        yield s, path
    finally:
        s.close()
        shutil.rmtree(d, ignore_errors=True)


class Notifications:
    """Collects the datagrams systemd would get, in a thread."""

    def __init__(self, sock: socket.socket) -> None:
        self.messages: list[str] = []
        self._sock = sock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self._sock.recv(4096).decode())
            except TimeoutError:
                continue
            except OSError:
                return

    def count(self, prefix: str) -> int:
        return sum(1 for m in list(self.messages) for line in m.split("\n") if line == prefix)

    def wait_for(self, prefix: str, n: int = 1, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.count(prefix) < n:
            assert time.monotonic() < deadline, f"no {prefix} within {timeout} s: {self.messages}"
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _config(tmp_path: Path, kit_port: Path, health_port: int) -> Path:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f"""
[device]
id = "bus-svc"
key_file = "keys/device.key"
[can]
interface = "udp_multicast"
channel = "{GROUP}"
[kit]
port = "{kit_port}"
reconnect_min_s = 0.05
reconnect_max_s = 0.2
[store]
path = "store.sqlite"
[batch]
readings_per_batch = 2
[health]
port = {health_port}
[clock]
source = "none"
[service]
stop_timeout_s = 3.0
"""
    )
    return cfg


def _drive(bus: can.BusABC, kit_fd: int, seconds: float) -> tuple[int, int]:
    """The simulated engine and kit, in real time; returns (CAN frames, kit frames) sent."""
    logic = KitLogic()
    vehicle = CityBus(CityBusParams(), DriveCycle.brt(seconds + 5, 3), controller=logic)
    ecu = EngineEcu(bus, vehicle, time.time())
    kit = KitFirmware(kit_fd, logic)
    for i, s in drive(vehicle, int(seconds / TICK_S)):
        ecu.tick(i, s)
        kit.tick(i, s)
    return ecu.frames_sent, kit.frames_sent


def _metrics(port: int) -> dict[str, float]:
    return health.fetch(port)


def test_run_as_a_service_end_to_end(
    tmp_path: Path, keydir: Path, notify_socket: tuple[socket.socket, str], cli
) -> None:
    sock, sock_path = notify_socket
    notes = Notifications(sock)
    master, slave = os.openpty()
    tty.setraw(slave)
    kit_port = tmp_path / "ttyKIT"
    kit_port.symlink_to(os.ttyname(slave))
    port = free_tcp_port()
    cfg = _config(tmp_path, kit_port, port)
    env = {
        **os.environ,
        "NOTIFY_SOCKET": sock_path,
        "WATCHDOG_USEC": "200000",
        "CAN_CONFIG": json.dumps({"port": MCAST_PORT}),
    }
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cngmrv.agent.cli", "run", "--config", str(cfg)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sim_bus = can.Bus(interface="udp_multicast", channel=GROUP, port=MCAST_PORT)
    try:
        notes.wait_for("READY=1")
        # A window closes once every source is a lateness (1 s) past its end, and
        # windows are aligned to whole seconds: 3 s of data closes only one of
        # them when the drive starts just after a second boundary.  4 s always
        # closes at least two, whatever the phase.
        can_sent, kit_sent = _drive(sim_bus, master, 4.0)
        # The loop pings at half the watchdog interval (0.1 s): several by now.
        notes.wait_for("WATCHDOG=1", 3)

        deadline = time.monotonic() + 30.0
        while True:
            m = _metrics(port)
            if m["cngmrv_readings_total"] >= 2 and m["cngmrv_batches_sealed_total"] >= 1:
                break
            assert time.monotonic() < deadline, m
            time.sleep(0.2)
        assert 0 < m['cngmrv_frames_received_total{source="can"}'] <= can_sent
        assert 0 < m['cngmrv_frames_received_total{source="kit"}'] <= kit_sent
        assert m['cngmrv_frames_dropped_total{source="can"}'] == 0
        assert m["cngmrv_kit_crc_errors_total"] == 0
        assert m["cngmrv_boot_epoch"] == 1
        assert m['cngmrv_clock_state{state="informative"}'] == 1  # no source confirms it
        assert m["cngmrv_batches_pending"] == m["cngmrv_batches_sealed_total"]  # no upload URL
        assert m["cngmrv_store_bytes"] > 0 and m["cngmrv_disk_free_bytes"] > 0

        status = cli("status", "--config", str(cfg))
        assert status.returncode == 0, status.stderr
        assert (
            "boot epoch      1" in status.stdout and "clock           informative" in status.stdout
        )

        proc.send_signal(signal.SIGTERM)
        # The acceptance bound: sealed and gone within 5 s of SIGTERM.
        code = proc.wait(timeout=5.0)
    finally:
        if proc.poll() is None:
            proc.kill()
        out, err = proc.communicate()
        sim_bus.shutdown()
        os.close(master)
        os.close(slave)
        notes.stop()
    assert code == 0, err
    assert notes.count("STOPPING=1") == 1
    # Structured lines on stdout for journald, nothing on stderr.
    lines = out.splitlines()
    assert lines and all(x.startswith("ts=") and " level=" in x for x in lines), out
    assert any("event=stopped clean=true" in x for x in lines)
    assert err == ""

    from cngmrv.agent.store import Store

    store = Store(tmp_path / "store.sqlite", "bus-svc")
    try:
        counts = store.counts()
        raws = [(str(seq), raw) for seq, raw in store.batches()]
    finally:
        store.close()
    assert counts["readings_unsealed"] == counts["events_unsealed"] == 0, counts
    stops = [
        e for _, raw in raws for e in batch.parse(raw).payload()["events"] if e["kind"] == "STOP"
    ]
    assert len(stops) == 1, "the clean STOP event is sealed"
    report = batch.verify_set(raws, keys.load_public_key(keydir / keys.PUB_FILE))
    assert report.passed, report.bad
    with pytest.raises(OSError):
        _metrics(port)  # the endpoint went with the process


def test_status_of_a_stopped_agent_reads_the_store(tmp_path: Path, keydir: Path, cli) -> None:
    cfg = _config(tmp_path, tmp_path / "none", free_tcp_port())
    from cngmrv.agent.store import Store

    Store(tmp_path / "store.sqlite", "bus-svc").close()
    r = cli("status", "--json", "--config", str(cfg))
    assert r.returncode == 1
    assert json.loads(r.stdout) == {
        "running": False,
        "readings": 0,
        "batches": 0,
        "pending": 0,
        "refused": 0,
    }


def test_notify_reaches_a_socket_in_the_abstract_namespace() -> None:
    name = f"cngmrv-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        assert service.notify("READY=1", {"NOTIFY_SOCKET": "@" + name})
        assert s.recv(100) == b"READY=1"


def test_notify_without_systemd_is_a_no_op_and_a_dead_socket_never_raises(
    tmp_path: Path,
) -> None:
    assert service.notify("READY=1", {}) is False
    assert service.notify("WATCHDOG=1", {"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False


def test_watchdog_period_is_half_the_interval_and_only_for_this_process() -> None:
    assert service.watchdog_period({"WATCHDOG_USEC": "10000000"}) == 5.0
    assert service.watchdog_period({}) is None
    assert service.watchdog_period({"WATCHDOG_USEC": "junk"}) is None
    mine = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert service.watchdog_period(mine) == 1.0
    assert service.watchdog_period({**mine, "WATCHDOG_PID": "1"}) is None


def test_tick_pings_at_most_once_per_period(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    svc = service.Service({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": str(3600 * 10**6)})
    for _ in range(5):
        svc.tick()
    assert svc.pings == 1
    assert sock.recv(100) == b"WATCHDOG=1"


def test_json_log_lines_carry_the_message_fields() -> None:
    rec = logging.LogRecord(
        "cngmrv.x", logging.WARNING, __file__, 1, "event=can_up outage_s=%.3f", (1.5,), None
    )
    out = json.loads(service.JsonFormatter().format(rec))
    assert out["event"] == "can_up" and out["outage_s"] == "1.500" and out["level"] == "warning"
    kv = service.KeyValueFormatter().format(rec)
    assert kv.startswith("ts=") and kv.endswith(
        "level=warning logger=cngmrv.x event=can_up outage_s=1.500"
    )


def test_a_library_sentence_stays_one_key_value_pair() -> None:
    """python-can logs "Created a socket": under systemd that line reached journald bare."""
    rec = logging.LogRecord(
        "can.interfaces.socketcan.socketcan",
        logging.INFO,
        __file__,
        1,
        "Created a socket",
        (),
        None,
    )
    kv = service.KeyValueFormatter().format(rec)
    assert kv.endswith('logger=can.interfaces.socketcan.socketcan msg="Created a socket"')
    pairs = re.findall(r"(\w+)=(\"[^\"]*\"|\S+)", kv)
    assert " ".join(f"{k}={v}" for k, v in pairs) == kv


def test_systemd_unit_runs_the_agent_as_a_watched_notify_service() -> None:
    import configparser

    from cngmrv.agent.config import ServiceSettings

    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(Path(__file__).resolve().parents[1] / "deploy" / "cngmrv.service")
    svc = unit["Service"]
    assert svc["Type"] == "notify" and svc["NotifyAccess"] == "main"
    assert int(svc["WatchdogSec"]) > 0 and svc["Restart"] == "always"
    assert svc["ExecStart"].split()[1:] == ["run", "--config", "/etc/cngmrv/agent.toml"]
    assert svc["ExecStartPre"].split()[1:] == ["config", "check", "/etc/cngmrv/agent.toml"]
    # systemd must not SIGKILL an agent still sealing within its own bound.
    assert int(svc["TimeoutStopSec"]) > ServiceSettings().stop_timeout_s
    assert svc["KillSignal"] == "SIGTERM"


def test_a_health_port_in_use_is_refused_naming_the_key(tmp_path: Path, keydir: Path, cli) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cfg = _config(tmp_path, tmp_path / "none", taken.getsockname()[1])
        r = cli("run", "--config", str(cfg))
    assert r.returncode == 2
    assert "health.port: cannot listen on 127.0.0.1:" in r.stderr, r.stderr
    assert not (tmp_path / "store.sqlite").exists(), "refused before the store was opened"
