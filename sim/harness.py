"""Run everything locally: simulated bus and kit, the real agent, a real ingest server.

The parts are the real ones: a python-can ``virtual`` bus, a pseudo-terminal
for the kit's serial link, the agent's SQLite store, ECDSA keys on disk, and
the reference ingest server on 127.0.0.1.  Only the vehicle is simulated, and
it knows the ground truth the agent's figures are compared against.

The agent is driven only through its public entry points (config, Agent,
ingest server, batch verification), as an operator's own harness would.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import tty
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import can

from cngmrv.agent import config
from cngmrv.agent.runtime import Agent
from cngmrv.office.ingest import IngestServer, open_db, register_device, stored_batches
from cngmrv.signed import batch, keys
from cngmrv.signed.archive import open_readonly
from cngmrv.sim.agent_process import MCAST_GROUP, AgentProcess, free_tcp_port, new_mcast_port
from cngmrv.sim.busload import BackgroundTraffic, Wire, capacity_fps
from cngmrv.sim.drive import TICK_S, drive
from cngmrv.sim.ecu import EngineEcu
from cngmrv.sim.gas import AGENT_LAW_TOLERANCE
from cngmrv.sim.kit import INJ_DEAD_MS, INJ_FLOW, KitFaults, KitFirmware, KitLogic, LinkFaults
from cngmrv.sim.vehicle import CityBus, CityBusParams, DriveCycle

DEVICE_ID = "sim-bus-001"
MAX_LAG_FRAMES = 100  # about 1.4 s of the engine's broadcast, unloaded
MAX_LAG_STATUS = 10  # 1 s of the kit's STATUS stream


@dataclass(frozen=True)
class SimOptions:
    duration: float = 600.0
    speedup: float = 100.0  # 0 = as fast as the agent keeps up
    seed: int = 1
    workdir: Path | None = None
    readings_per_batch: int = 60
    # Kit link damage and kit faults (see cngmrv.sim.kit).
    link: LinkFaults = LinkFaults()
    kit_faults: KitFaults = KitFaults()
    device_id: str = DEVICE_ID
    # Simulated-time spans [start, end) in which the kit's port is unplugged.
    kit_unplugged: tuple[tuple[float, float], ...] = ()
    tank_start_bar: float = 200.0
    # The bus's true tank water volume (the ground truth's), and what the agent's
    # [gas] section is told (None: the same, as a correct calibration would say).
    tank_volume_m3: float = 0.44
    agent_tank_volume_m3: float | None = None
    # The agent's gas constant for the tank's real-gas law (None: its default).
    # In m = P V / (Z R T) a wrong R is a wrong Z: tests use it to perturb the
    # agent's law and see the tank cross-check fail.
    agent_r_j_per_kg_k: float | None = None
    refuel_below_bar: float = 0.0
    dpf_regens: tuple[tuple[float, float], ...] = ()
    # The CAN bus: its bit rate, and the share of its time other ECUs' traffic
    # fills (0: the engine alone; see cngmrv.sim.busload).
    bitrate: int = 250_000
    bus_load_pct: float = 0.0
    # Run the agent as its own process (`cngmrv run`) on a udp_multicast bus,
    # in real time, instead of in this process on a virtual bus.
    agent_process: bool = False
    # The interpreter that runs it (None: this one).  Benchmarks point it at an
    # environment holding only what `pip install cngmrv` installs, as on a bus.
    agent_python: str | None = None
    # The udp_multicast port (None: a random one); another receiver may listen
    # on the same group and port (bench/full_load.py's bare python-can loop).
    mcast_port: int | None = None


@dataclass
class KitRun:
    """What the harness saw of the kit link, for the summary."""

    firmware: KitFirmware
    port: Path
    # (sim time, truth gas kg) at every intact STATUS frame: the truth over intact data.
    intact_status: list[tuple[float, float]] = field(default_factory=list)
    # Per unplugged span: its times and the truth gas burned meanwhile, which
    # the agent cannot have measured.
    unplugged: list[dict[str, float]] = field(default_factory=list)


def _device_settings(
    opts: SimOptions, can_section: dict[str, Any], kit_port: str, url: str
) -> dict[str, dict[str, Any]]:
    """The simulated bus's agent config, as the TOML tables an operator would write."""
    gas: dict[str, Any] = {
        "injector_k": INJ_FLOW * math.sqrt(293.15) * 1e-6,
        "injector_dead_time_ms": INJ_DEAD_MS,
        "tank_volume_m3": (
            opts.tank_volume_m3 if opts.agent_tank_volume_m3 is None else opts.agent_tank_volume_m3
        ),
    }
    if opts.agent_r_j_per_kg_k is not None:
        gas["r_j_per_kg_k"] = opts.agent_r_j_per_kg_k
    device_id, per_batch = opts.device_id, opts.readings_per_batch
    return {
        "device": {"id": device_id, "key_file": "keys/device.key"},
        "can": can_section,
        # A short reconnect backoff: the simulation pauses until the agent is back.
        "kit": {"port": kit_port, "reconnect_min_s": 0.02, "reconnect_max_s": 0.2},
        "store": {"path": "store.sqlite"},
        "batch": {"readings_per_batch": per_batch},
        "upload": {"url": url},
        # The simulated kit's injector model (its HELLO) and tank, as a fleet
        # engineer would enter each kit's calibration: kg = k (pulse - dead) P / sqrt(T).
        "gas": gas,
    }


def _toml(tables: dict[str, dict[str, Any]]) -> str:
    """Tables of scalars as TOML (a JSON string is a valid TOML basic string)."""
    lines = []
    for name, table in tables.items():
        lines.append(f"[{name}]")
        for key, v in table.items():
            if isinstance(v, bool):
                text = "true" if v else "false"
            elif isinstance(v, int | float):
                text = repr(v)
            else:
                text = json.dumps(str(v))
            lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def _open_pty(link: Path) -> tuple[int, int]:
    """A new pty pair with ``link`` pointing at its slave, as udev would name a USB adapter."""
    master, slave = os.openpty()
    tty.setraw(slave)  # bytes must pass the line discipline unchanged
    tmp = link.with_name(link.name + ".new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(os.ttyname(slave))
    tmp.replace(link)
    return master, slave


def _wait(cond: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"sim: timed out waiting for {what}")
        time.sleep(0.001)


@dataclass
class Pacing:
    """How well a real-time drive kept to real time."""

    wall_s: float = 0.0  # the drive's wall time
    late_max_s: float = 0.0  # the most a frame went out after its bus time came round


def _drive(
    opts: SimOptions,
    sim_bus: can.BusABC,
    fds: list[int],
    port: Path,
    agent: Agent | None,
    epoch0: float,
) -> tuple[CityBus, EngineEcu, KitRun, Wire, Pacing]:
    """Run the drive cycle; ``agent`` is the in-process agent (None: in its own process, real time)."""
    logic = KitLogic(opts.kit_faults)
    params = CityBusParams(
        tank_start_bar=opts.tank_start_bar,
        tank_volume_m3=opts.tank_volume_m3,
        tank_low_bar=opts.kit_faults.low_bar,
        refuel_below_bar=opts.refuel_below_bar,
        dpf_regens=opts.dpf_regens,
    )
    vehicle = CityBus(params, DriveCycle.brt(opts.duration, opts.seed), controller=logic)
    ecu = EngineEcu(sim_bus, vehicle, epoch0)
    # In process, bus time runs ahead of the agent's receive clock, and the
    # agent anchors the kit's clock on the frames received around the kit's
    # first message, or on the wall clock before any.  So the kit boots after a
    # frame is in and is heard before more come (below): it is then late by
    # no more than the wait for one of the agent's passes.
    kit = KitFirmware(fds[0], logic, opts.link, boot=agent is None)
    run = KitRun(kit, port)
    counts = kit.counts
    speedup = 1.0 if agent is None else opts.speedup
    wall0 = time.monotonic()
    pacing = Pacing()
    wire = Wire(
        opts.bitrate,
        epoch0,
        _sender(sim_bus, epoch0, pacing, wall0 if agent is None else None),
        BackgroundTraffic(epoch0, opts.seed) if opts.bus_load_pct > 0 else None,
        opts.bus_load_pct,
    )
    # Never let an in-process agent fall more than about a second of bus time
    # behind: unpaced, the simulator would otherwise outrun every queue.
    max_lag = max(MAX_LAG_FRAMES, int(capacity_fps(opts.bitrate) * opts.bus_load_pct / 100))
    # Tick of each unplug -> tick of its replug.
    unplug_ticks: dict[int, int] = {}
    for start, end in opts.kit_unplugged:
        a = int(round(start / TICK_S))
        unplug_ticks[a] = max(a + 1, int(round(end / TICK_S)))
    replug_ticks = set(unplug_ticks.values())
    steps = int(round(opts.duration / TICK_S))
    gas_seen = vehicle.truth_gas_kg
    for i, s in drive(vehicle, steps + 1, speedup=speedup):
        gas_gained, gas_seen = vehicle.truth_gas_kg - gas_seen, vehicle.truth_gas_kg
        span = run.unplugged[-1] if run.unplugged else None
        if i in unplug_ticks:
            assert agent is not None
            _unplug(fds, port, kit, agent)
            span = {"from": i * TICK_S, "to": unplug_ticks[i] * TICK_S, "truth_gas_kg": 0.0}
            run.unplugged.append(span)
        elif i in replug_ticks:
            assert agent is not None
            _replug(fds, port, kit, agent)
        if span is not None and span["from"] <= i * TICK_S < span["to"]:
            span["truth_gas_kg"] += gas_gained
        for t, can_id, data in ecu.frames_due(i, s):
            wire.submit(t, can_id, data)
        if i == 0 and agent is not None:
            wire.run_until(epoch0 + TICK_S)
            _wait(lambda: agent.pipeline.stats.frames > 0, "the agent's first frame")
            kit.boot()
        status_before = counts.intact_by_type.get("status", 0)
        kit.tick(i, s)
        if counts.intact_by_type.get("status", 0) != status_before:
            run.intact_status.append((i * TICK_S, vehicle.truth_gas_kg))
        if i == 0 and agent is not None:
            _wait(lambda: agent.pipeline.stats.kit_messages >= counts.intact, "the kit's boot")
        wire.run_until(epoch0 + (i + 1) * TICK_S)
        if i % 10:
            continue
        if agent is None:
            continue  # a real bus waits for nobody
        # The kit's lag is bounded in time (STATUS frames, 10 per second), since
        # its frame rate varies with the injection rate; a kit further behind
        # than the pipeline's stale_s would have its samples arrive too late.
        stats = agent.pipeline.stats
        while (
            wire.sent - stats.frames > max_lag
            or counts.intact_by_type.get("status", 0) - stats.kit_status > MAX_LAG_STATUS
        ):
            time.sleep(0.001)
    pacing.wall_s = time.monotonic() - wall0
    return vehicle, ecu, run, wire, pacing


def _sender(
    bus: can.BusABC, epoch0: float, pacing: Pacing, wall0: float | None
) -> Callable[[float, int, bytes], None]:
    """Put one frame on ``bus``; with ``wall0``, not before its bus time comes round in real time.

    Receivers on a udp_multicast bus stamp frames when they arrive, so real-time
    pacing is what spaces their timestamps as the wire does.  A simulator that
    falls behind sends late and bunched; ``pacing.late_max_s`` says by how much.
    """
    send = bus.send
    message = can.Message

    def put(t: float, can_id: int, data: bytes) -> None:
        send(message(timestamp=t, arbitration_id=can_id, is_extended_id=True, data=data))

    if wall0 is None:
        return put
    monotonic, sleep = time.monotonic, time.sleep

    def paced(t: float, can_id: int, data: bytes) -> None:
        ahead = (t - epoch0) - (monotonic() - wall0)
        if ahead > 0.0005:
            sleep(ahead)
        elif -ahead > pacing.late_max_s:
            pacing.late_max_s = -ahead
        put(t, can_id, data)

    return paced


def _unplug(fds: list[int], port: Path, kit: KitFirmware, agent: Agent) -> None:
    """Pull the plug between two frames, after the agent has decoded every intact one.

    Waiting for the slave's input queue to be empty is not enough: bytes
    written to a pty master reach the slave through a kernel work queue, so
    some may still be in flight, and closing the master drops them.
    """
    link = agent.kit
    if link is not None:
        _wait(lambda: link.stats["frames_ok"] >= kit.counts.intact, "the agent to read the kit")
    kit.unplug()
    # The device name goes first, as udev removes it: a /dev/pts number freed
    # here may be reused at once by another process's pty.
    port.unlink()
    for fd in fds:
        os.close(fd)
    fds.clear()
    _wait(lambda: link is None or link.stats["connected"] == 0, "the agent to notice")


def _replug(fds: list[int], port: Path, kit: KitFirmware, agent: Agent) -> None:
    """Plug a new pty in behind the same port name, and wait for the agent to open it.

    The agent flushes its input when it opens the port, so the kit waits for
    it: what the agent loses is then exactly what the simulator counted as
    unplugged.
    """
    assert agent.kit is not None
    before = agent.kit.stats["reconnects"]
    fds[:] = _open_pty(port)
    kit.replug(fds[0])
    link = agent.kit
    _wait(
        lambda: link.stats["reconnects"] > before and link.stats["connected"] == 1,
        "the kit link to reconnect",
    )


def _truth_over_intact(points: list[tuple[float, float]], max_gap: float) -> float:
    """Truth gas over the spans the agent can integrate: consecutive intact
    STATUS frames at most ``max_gap`` apart (the pipeline's rule)."""
    total = 0.0
    for (t0, g0), (t1, g1) in zip(points, points[1:], strict=False):
        if t1 - t0 <= max_gap + 1e-9:
            total += g1 - g0
    return total


def run(
    opts: SimOptions,
    progress: bool = False,
    on_agent: Callable[[AgentProcess], None] | None = None,
) -> dict[str, Any]:
    """One simulated run; returns the summary (see ``cngmrv sim --json``).

    ``on_agent``: see :func:`run_bus`.
    """
    with run_folder(opts, "cngmrv-sim-") as workdir:
        return _run_in(opts, workdir, progress, on_agent)


@contextlib.contextmanager
def run_folder(opts: SimOptions, prefix: str) -> Iterator[Path]:
    """``opts.workdir`` (made if missing, kept), or a temporary folder removed afterwards."""
    if opts.workdir is not None:
        opts.workdir.mkdir(parents=True, exist_ok=True)
        yield opts.workdir
        return
    tmp = tempfile.mkdtemp(prefix=prefix)
    try:
        yield Path(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_key(workdir: Path) -> bytes:
    """Make the device key in ``workdir/keys`` unless it exists; returns the public key PEM."""
    key_path = workdir / "keys" / keys.KEY_FILE
    if not key_path.exists():
        keys.generate(key_path.parent)
    return (key_path.parent / keys.PUB_FILE).read_bytes()


def _run_in(
    opts: SimOptions,
    workdir: Path,
    progress: bool,
    on_agent: Callable[[AgentProcess], None] | None = None,
) -> dict[str, Any]:
    pub = ensure_key(workdir)
    ingest_db = workdir / "ingest.sqlite"
    server = IngestServer(ingest_db).start()
    try:
        register_device(server.db, opts.device_id, pub)
        summary = run_bus(opts, workdir, server.url, ingest_db, on_agent)
    finally:
        server.stop()
    if progress:
        print(
            f"simulated {opts.duration:.0f} s in {summary['wall_seconds']:.1f} s", file=sys.stderr
        )
    return summary


def run_bus(
    opts: SimOptions,
    workdir: Path,
    url: str,
    ingest_db: Path,
    on_agent: Callable[[AgentProcess], None] | None = None,
) -> dict[str, Any]:
    """One bus (key already in ``workdir/keys``) uploading to the ingest at ``url``.

    The ingest may be shared with other buses (``cngmrv sim --fleet``); its
    database file is read afterwards to verify what arrived.  With
    ``opts.agent_process``, ``on_agent`` is called with the agent's process
    once it is ready (the soak benchmark samples it from there).
    """
    if opts.agent_process:
        return _run_bus_process(opts, workdir, url, ingest_db, on_agent)
    channel = f"cngmrv-sim-{uuid.uuid4().hex[:8]}"
    port = workdir / "ttyKIT"
    fds = list(_open_pty(port))
    sim_bus = can.Bus(interface="virtual", channel=channel, preserve_timestamps=True)
    can_section = {"interface": "virtual", "channel": channel, "listen_only": True}
    settings = _device_settings(opts, can_section, str(port), url)
    cfg = config.from_mapping(settings, workdir)
    wall_start = time.monotonic()
    agent = Agent(cfg, clock="synchronised")
    stop = threading.Event()
    worker = threading.Thread(target=agent.run, args=(stop,), name="agent", daemon=True)
    try:
        agent.start()
        worker.start()
        _wait_for_kit(agent)
        epoch0 = float(int(time.time()))
        vehicle, ecu, kit, wire, pacing = _drive(opts, sim_bus, fds, port, agent, epoch0)
        _wait_for_inputs(agent, wire.sent, kit.firmware.counts.intact)
        stop.set()
        worker.join()
        agent.close(upload_timeout=30.0)
    finally:
        stop.set()
        sim_bus.shutdown()
        for fd in fds:
            os.close(fd)
        port.unlink(missing_ok=True)
    wall = time.monotonic() - wall_start
    held = _held(ingest_db, opts.device_id)
    stats = agent.stats()
    measured = {**agent.totals, "readings": agent.readings}
    return _summarise(
        opts,
        workdir,
        held,
        agent.sealed,
        stats,
        measured,
        agent.config,
        vehicle,
        kit,
        wire,
        pacing,
        wall,
    )


def _held(ingest_db: Path, device_id: str) -> list[tuple[int, bytes]]:
    db = open_db(ingest_db)
    try:
        return stored_batches(db, device_id)
    finally:
        db.close()


def _process_config(workdir: Path, opts: SimOptions, kit_port: Path, url: str, health: int) -> Path:
    """The agent's TOML for a run in its own process: the in-process settings, over udp_multicast."""
    can_section = {"interface": "udp_multicast", "channel": MCAST_GROUP}
    tables = _device_settings(opts, can_section, str(kit_port), url)
    tables["health"] = {"port": health}
    tables["clock"] = {"source": "none"}
    path = workdir / "agent.toml"
    path.write_text("# Written by `cngmrv sim --agent-process`.\n" + _toml(tables))
    return path


def _wait_opened(agent: AgentProcess, tty: str, timeout: float = 30.0) -> None:
    """Wait until the agent process has ``tty`` open (it flushes the port when it opens it)."""

    def opened() -> bool:
        fd_dir = Path(f"/proc/{agent.pid}/fd")
        for fd in fd_dir.iterdir():
            try:
                if os.readlink(fd) == tty:
                    return True
            except OSError:
                continue
        return False

    _wait(opened, "the agent process to open the kit's port", timeout)


def _run_bus_process(
    opts: SimOptions,
    workdir: Path,
    url: str,
    ingest_db: Path,
    on_agent: Callable[[AgentProcess], None] | None,
) -> dict[str, Any]:
    port = workdir / "ttyKIT"
    mcast_port = opts.mcast_port or new_mcast_port()
    cfg_path = _process_config(workdir, opts, port, url, free_tcp_port())
    cfg = config.load(cfg_path)
    wall_start = time.monotonic()
    fds: list[int] = []
    sim_bus: can.BusABC | None = None
    agent: AgentProcess | None = None
    try:
        fds[:] = _open_pty(port)
        sim_bus = can.Bus(interface="udp_multicast", channel=MCAST_GROUP, port=mcast_port)
        agent = AgentProcess(
            cfg_path,
            cfg.health.port,
            env={"CAN_CONFIG": json.dumps({"port": mcast_port})},
            python=opts.agent_python,
        )
        agent.wait_ready()
        _wait_opened(agent, os.ttyname(fds[1]))
        if on_agent is not None:
            on_agent(agent)
        cpu0, t0 = agent.cpu_seconds(), time.monotonic()
        epoch0 = time.time()
        vehicle, _, kit, wire, pacing = _drive(opts, sim_bus, fds, port, None, epoch0)
        cpu1, t1 = agent.cpu_seconds(), time.monotonic()
        agent.settle(wire.sent)
        memory = agent.memory_mb()
        final = agent.stop()
    finally:
        if agent is not None and agent.returncode is None:
            agent.proc.kill()
            agent.stop()
        if sim_bus is not None:
            sim_bus.shutdown()
        for fd in fds:
            os.close(fd)
        port.unlink(missing_ok=True)
    if agent.returncode != 0 or not final:
        tail = "\n".join(agent.lines[-20:])
        raise RuntimeError(f"sim: the agent process exited {agent.returncode}:\n{tail}")
    wall = time.monotonic() - wall_start
    sealed = _sealed_this_run(cfg.store_path, int(final["batches"]))
    # Only this run's batches: a --workdir that continues holds earlier runs' too.
    this_run = set(sealed)
    held = [(seq, raw) for seq, raw in _held(ingest_db, opts.device_id) if seq in this_run]
    measured = _totals_from_batches(held)
    stats = {
        "frames": int(final["frames"]),
        "kit_messages": int(final["kit_messages"]),
        "decode_errors": int(final["decode_errors"]),
        "can": {"frames": int(final["can_frames"])},
        "can_queue_dropped": int(final["can_queue_dropped"]),
        "process": {
            "pid": agent.pid,
            "cpu_s": cpu1 - cpu0,
            "wall_s": t1 - t0,
            "cpu_pct_one_core": 100 * (cpu1 - cpu0) / (t1 - t0),
            "rss_mb": memory.get("rss", 0.0),
            # The kernel's high-water mark (VmHWM), start-up and shutdown included.
            "peak_rss_mb": agent.peak_rss_mb,
        },
    }
    return _summarise(
        opts, workdir, held, sealed, stats, measured, cfg, vehicle, kit, wire, pacing, wall
    )


def _sealed_this_run(store_path: Path, n: int) -> list[int]:
    """The sequences of the last ``n`` batches in a stopped agent's store (its log says how many)."""
    db = open_readonly(store_path)
    try:
        rows = db.execute("SELECT seq FROM batches ORDER BY seq DESC LIMIT ?", (n,)).fetchall()
    finally:
        db.close()
    return sorted(int(r[0]) for r in rows)


def _totals_from_batches(held: list[tuple[int, bytes]]) -> dict[str, float]:
    """Readings and totals as the ingest holds them: what an auditor would add up."""
    totals = {"diesel_l": 0.0, "gas_kg": 0.0, "distance_km": 0.0, "readings": 0}
    for _, raw in held:
        for r in batch.parse(raw).payload()["readings"]:
            totals["readings"] += 1
            for k in ("diesel_l", "gas_kg", "distance_km"):
                totals[k] += r[k]
    return totals


def _last_tank_kg(held: list[tuple[int, bytes]], signed: list[int]) -> float | None:
    """The tank mass in this run's last reading that carries one, as the ingest holds it."""
    this_run = set(signed)
    last = None
    for seq, raw in sorted(held):
        if seq in this_run:
            for r in batch.parse(raw).payload()["readings"]:
                last = r.get("tank_kg", last)
    return last


def _wait_for_kit(agent: Agent, timeout: float = 5.0) -> None:
    # The reader opens the pty in its own thread; frames written before that
    # would still be buffered by the pty, but we want a clean start anyway.
    deadline = time.monotonic() + timeout
    while agent.kit and not agent.kit.stats["connected"] and time.monotonic() < deadline:
        time.sleep(0.01)


def _wait_for_inputs(agent: Agent, frames: int, kit_frames: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = agent.pipeline.stats
        if s.frames >= frames and s.kit_messages >= kit_frames:
            return
        time.sleep(0.02)


def _summarise(
    opts: SimOptions,
    workdir: Path,
    held: list[tuple[int, bytes]],
    signed: list[int],
    stats: dict[str, Any],
    measured: dict[str, float],
    cfg: Any,
    vehicle: CityBus,
    kit: KitRun,
    wire: Wire,
    pacing: Pacing,
    wall: float,
) -> dict[str, Any]:
    pub = keys.load_public_key(workdir / "keys" / keys.PUB_FILE)
    report = batch.verify_set(((f"ingest:{s}", raw) for s, raw in held), pub)
    uploaded = {s for s, _ in held}
    return {
        "sim_seconds": opts.duration,
        "wall_seconds": round(wall, 3),
        "seed": opts.seed,
        "device_id": opts.device_id,
        "workdir": str(workdir) if opts.workdir else None,
        "agent_process": opts.agent_process,
        "frames": wire.sent,
        "frames_received": stats["frames"],
        "bus": {
            "bitrate": opts.bitrate,
            "load_pct": opts.bus_load_pct,
            "busy_share": round(wire.busy_share, 6),
            "offered": wire.sent,
            "offered_per_id": {f"{k:08X}": v for k, v in sorted(wire.offered.items())},
            "sequenced": wire.seq,
            "lost": frame_losses(wire.sent, stats),
            "drive_wall_s": round(pacing.wall_s, 3),
            "late_max_s": round(pacing.late_max_s, 4),
        },
        "kit_frames": kit.firmware.frames_sent,
        "kit_frames_received": stats["kit_messages"],
        "kit": kit.firmware.counts.as_dict(),
        "kit_unplugged": kit.unplugged,
        "readings": int(measured["readings"]),
        "batches_signed": len(signed),
        "batches_uploaded": sum(1 for s in signed if s in uploaded),
        "batches_verified": sum(1 for s in signed if s in report.ok),
        "verify_problems": {k: v for k, v in report.bad.items()},
        "verify_gaps": report.gaps,
        "diesel_l": measured["diesel_l"],
        "gas_kg": measured["gas_kg"],
        "distance_km": measured["distance_km"],
        # The tank cross-check: the agent's tank mass (its real-gas law on the
        # kit's pressure and temperature) at the end, against the simulator's
        # own law's; they may differ by up to gas.AGENT_LAW_TOLERANCE.
        "tank_kg": _last_tank_kg(held, signed),
        "truth": {
            "diesel_l": vehicle.truth_diesel_l,
            "gas_kg": vehicle.truth_gas_kg,
            "distance_km": vehicle.truth_distance_km,
            "tank_kg": vehicle.tank_kg,
            "gas_kg_over_intact_kit_data": _truth_over_intact(
                kit.intact_status, cfg.pipeline.kit_max_gap_s
            ),
            "refuels": vehicle.refuels,
        },
        "agent": stats,
    }


def frame_losses(offered: int, stats: dict[str, Any]) -> dict[str, int]:
    """CAN frames lost on the way into the pipeline, and where.

    ``socket``: offered but never read off the bus (kernel buffer overrun);
    ``queue``: read, then dropped on the source's full queue (the source
    counts those apart from the frames it queued); ``decoder``: queued but
    never used (decode errors, or still queued at the stop).
    """
    queued = stats["can"]["frames"]
    queue = stats["can_queue_dropped"]
    out = {
        "socket": offered - queued - queue,
        "queue": queue,
        "decoder": stats["decode_errors"] + (queued - stats["frames"]),
    }
    return {**out, "total": sum(out.values())}


def relative_error(measured: float, reference: float) -> float | None:
    """``(measured - reference) / reference``: 0 when both are 0, None when only the reference is."""
    if reference:
        return (measured - reference) / reference
    return 0.0 if measured == reference else None


def _percent(e: float | None) -> str:
    return "n/a (no truth)" if e is None else f"{100 * e:+.3f} %"


def _relative_errors(summary: dict[str, Any]) -> dict[str, float | None]:
    t = summary["truth"]
    return {k: relative_error(summary[k], t[k]) for k in ("diesel_l", "gas_kg", "distance_km")}


def tank_error(summary: dict[str, Any]) -> float | None:
    """The tank cross-check: the agent's last tank mass against the truth's, relative.

    None when no reading carried a tank mass.  Within ``gas.AGENT_LAW_TOLERANCE``
    when both real-gas laws and both tank volumes are right.
    """
    measured = summary["tank_kg"]
    return None if measured is None else relative_error(measured, summary["truth"]["tank_kg"])


def _print_human(s: dict[str, Any]) -> None:
    err = _relative_errors(s)
    print(
        f"simulated {s['sim_seconds']:.0f} s in {s['wall_seconds']:.1f} s wall (seed {s['seed']})"
    )
    bus = s["bus"]
    print(
        f"CAN {bus['bitrate']} bit/s, {100 * bus['busy_share']:.1f} % busy: "
        f"frames {s['frames']} sent, {s['frames_received']} received; readings {s['readings']}"
    )
    if bus["load_pct"] and 100 * bus["busy_share"] > bus["load_pct"] + 0.5:
        print(
            f"note: the other ECUs' own traffic fills more than --bus-load {bus['load_pct']:g} % "
            "of this bus, so no filler was added"
        )
    proc = s["agent"].get("process")
    if proc:
        print(
            f"agent process: {proc['cpu_pct_one_core']:.1f} % of one core, "
            f"peak RSS {proc['peak_rss_mb']:.1f} MB"
        )
    print(
        f"batches: {s['batches_signed']} signed, {s['batches_uploaded']} uploaded, "
        f"{s['batches_verified']} verified"
    )
    for k, unit in (("diesel_l", "L"), ("gas_kg", "kg"), ("distance_km", "km")):
        print(
            f"{k:<12} measured {s[k]:10.3f} {unit:<2}  truth {s['truth'][k]:10.3f} {unit:<2}"
            f"  error {_percent(err[k])}"
        )
    tank = tank_error(s)
    if tank is not None:
        flag = "" if abs(tank) <= AGENT_LAW_TOLERANCE else "  (beyond the laws' tolerance)"
        print(
            f"{'tank_kg':<12} measured {s['tank_kg']:10.3f} kg  truth {s['truth']['tank_kg']:10.3f}"
            f" kg  error {_percent(tank)}{flag}"
        )
    intact = s["truth"]["gas_kg_over_intact_kit_data"]
    if intact and abs(intact - s["truth"]["gas_kg"]) > 1e-9:
        print(
            f"{'':<12} truth over intact kit data {intact:10.3f} kg"
            f"  error {_percent(relative_error(s['gas_kg'], intact))}"
        )
    k, link = s["kit"], s["agent"].get("kit_link", {})
    print(
        f"kit frames: {k['frames']} sent, {k['intact']} intact, {k['corrupted']} corrupted, "
        f"{k['truncated']} truncated, {k['glued']} glued to noise, {k['unplugged']} unplugged"
    )
    if link:
        print(
            f"kit link:   {link['frames_ok']} decoded, {link['dropped_frames']} lost by seq "
            f"(simulator: {k['lost_between_intact']}), {link['crc_errors']} crc / "
            f"{link['cobs_errors']} cobs / {link['length_errors']} length errors, "
            f"{link['outages']} outages"
        )
    if s["workdir"]:
        print(f"store, keys and ingest database kept in {s['workdir']}")


def parse_unplug(specs: list[str], buses: int) -> dict[int, tuple[tuple[float, float], ...]]:
    """``--kit-unplug BUS:START:END`` values (1-based bus, simulated seconds) by bus number."""
    out: dict[int, list[tuple[float, float]]] = {}
    for spec in specs:
        parts = spec.split(":")
        try:
            bus, start, end = int(parts[0]), float(parts[1]), float(parts[2])
            if len(parts) != 3:
                raise IndexError
        except (ValueError, IndexError):
            raise ValueError(f"--kit-unplug takes BUS:START:END, got {spec!r}") from None
        if not 1 <= bus <= buses:
            raise ValueError(f"--kit-unplug {spec}: bus must be 1..{buses}")
        if not 0 <= start < end:
            raise ValueError(f"--kit-unplug {spec}: needs 0 <= START < END")
        out.setdefault(bus, []).append((start, end))
    return {k: tuple(v) for k, v in out.items()}


def command(args: argparse.Namespace) -> int:
    if args.duration <= 0:
        raise ValueError("--duration must be > 0")
    if args.speedup is not None and args.speedup < 0:
        raise ValueError("--speedup must be >= 0 (0 = unpaced)")
    if not 0 <= args.bus_load <= 100:
        raise ValueError("--bus-load must be a percentage 0..100")
    if args.bitrate <= 0:
        raise ValueError("--bitrate must be > 0 bit/s")
    if args.agent_process:
        if args.speedup not in (None, 1.0):
            raise ValueError(
                "--agent-process runs in real time: the agent stamps frames when they arrive"
            )
        if args.fleet > 1 or args.kit_unplug or args.kit_unplug_at is not None:
            raise ValueError("--agent-process runs one bus, with its kit plugged in throughout")
    for name in ("kit_noise", "kit_bursts", "kit_truncate"):
        if not 0 <= getattr(args, name) <= 100:
            raise ValueError(f"--{name.replace('_', '-')} must be a percentage 0..100")
    if args.kit_unplug_for <= 0:
        raise ValueError("--kit-unplug-for must be > 0")
    if args.fleet < 1:
        raise ValueError("--fleet must be >= 1")
    specs = list(args.kit_unplug or [])
    if args.kit_unplug_at is not None:
        specs.append(f"1:{args.kit_unplug_at}:{args.kit_unplug_at + args.kit_unplug_for}")
    unplug = parse_unplug(specs, args.fleet)
    opts = SimOptions(
        duration=args.duration,
        speedup=(1.0 if args.agent_process else 100.0) if args.speedup is None else args.speedup,
        seed=args.seed,
        workdir=Path(args.workdir) if args.workdir else None,
        readings_per_batch=args.batch,
        link=LinkFaults(
            corrupt_rate=args.kit_noise / 100,
            noise_rate=args.kit_bursts / 100,
            truncate_rate=args.kit_truncate / 100,
            seed=args.seed,
        ),
        kit_faults=KitFaults(faults=tuple(args.kit_fault), stuck=tuple(args.kit_stuck)),
        tank_start_bar=args.tank_start,
        refuel_below_bar=args.refuel_below,
        dpf_regens=tuple(args.dpf_regen),
        kit_unplugged=unplug.get(1, ()),
        bitrate=args.bitrate,
        bus_load_pct=args.bus_load,
        agent_process=args.agent_process,
    )
    if args.fleet > 1:
        from cngmrv.sim.fleet import command as fleet_command

        return fleet_command(opts, args.fleet, unplug, args.json)
    summary = run(opts, progress=not args.json and sys.stderr.isatty())
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_human(summary)
    ok = (
        summary["batches_signed"] > 0
        and summary["batches_uploaded"] == summary["batches_signed"]
        and summary["batches_verified"] == summary["batches_signed"]
    )
    if not ok:
        print("cngmrv sim: not every batch was uploaded and verified", file=sys.stderr)
    return 0 if ok else 1
