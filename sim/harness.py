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
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import tty
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import can

from cngmrv.agent import batch, config, keys
from cngmrv.agent.ingest import IngestServer, register_device, stored_batches
from cngmrv.agent.runtime import Agent
from cngmrv.agent.store import open_readonly
from cngmrv.sim.ecu import TICK_S, EngineEcu
from cngmrv.sim.kit import KitFirmware
from cngmrv.sim.vehicle import Bus, BusParams, DriveCycle

DEVICE_ID = "sim-bus-001"
MAX_LAG_FRAMES = 100  # about 1.4 s of the engine's broadcast


@dataclass(frozen=True)
class SimOptions:
    duration: float = 600.0
    speedup: float = 100.0  # 0 = as fast as the agent keeps up
    seed: int = 1
    workdir: Path | None = None
    readings_per_batch: int = 60
    device_id: str = DEVICE_ID
    # Simulated-time spans [start, end) in which the kit sends nothing (unplugged).
    kit_unplugged: tuple[tuple[float, float], ...] = ()


def _device_config(
    workdir: Path, device_id: str, channel: str, kit_port: str, url: str, per_batch: int
) -> Any:
    return config.from_mapping(
        {
            "device": {"id": device_id, "key_file": "keys/device.key"},
            "can": {"interface": "virtual", "channel": channel, "listen_only": True},
            "kit": {"port": kit_port},
            "store": {"path": "store.sqlite"},
            "batch": {"readings_per_batch": per_batch},
            "upload": {"url": url},
        },
        workdir,
    )


def _drive(
    opts: SimOptions, sim_bus: can.BusABC, kit_fd: int, agent: Agent, epoch0: float
) -> tuple[Bus, EngineEcu, KitFirmware, list[dict[str, float]]]:
    vehicle = Bus(BusParams(), DriveCycle.brt(opts.duration, opts.seed))
    ecu = EngineEcu(sim_bus, vehicle, epoch0)
    kit = KitFirmware(kit_fd)
    steps = int(round(opts.duration / TICK_S))
    # The truth gas burned while the kit was unplugged: what the agent cannot have measured.
    unplugged = [{"from": a, "to": b, "truth_gas_kg": 0.0} for a, b in opts.kit_unplugged]
    wall0 = time.monotonic()
    for i in range(steps + 1):
        gas_before = vehicle.truth_gas_kg
        s = vehicle.step(i * TICK_S)
        ecu.tick(i, s)
        span = (
            next((u for u in unplugged if u["from"] <= i * TICK_S < u["to"]), None)
            if unplugged
            else None
        )
        if span is None:
            kit.tick(i, s)
        else:
            span["truth_gas_kg"] += vehicle.truth_gas_kg - gas_before
        if i % 10:
            continue
        if opts.speedup > 0:
            ahead = i * TICK_S / opts.speedup - (time.monotonic() - wall0)
            if ahead > 0.002:
                time.sleep(ahead)
        # Never let the agent fall more than about a second of bus time behind:
        # unpaced, the simulator would otherwise outrun every queue.
        stats = agent.pipeline.stats
        while (
            ecu.frames_sent - stats.frames > MAX_LAG_FRAMES
            or kit.frames_sent - stats.kit_messages > MAX_LAG_FRAMES // 10
        ):
            time.sleep(0.001)
    return vehicle, ecu, kit, unplugged


def run(opts: SimOptions, progress: bool = False) -> dict[str, Any]:
    """One simulated run; returns the summary (see ``cngmrv sim --json``)."""
    tmp = None
    if opts.workdir is None:
        tmp = tempfile.mkdtemp(prefix="cngmrv-sim-")
        workdir = Path(tmp)
    else:
        workdir = opts.workdir
        workdir.mkdir(parents=True, exist_ok=True)
    try:
        return _run_in(opts, workdir, progress)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_key(workdir: Path) -> bytes:
    """Make the device key in ``workdir/keys`` unless it exists; returns the public key PEM."""
    key_path = workdir / "keys" / keys.KEY_FILE
    if not key_path.exists():
        keys.generate(key_path.parent)
    return (key_path.parent / keys.PUB_FILE).read_bytes()


def _run_in(opts: SimOptions, workdir: Path, progress: bool) -> dict[str, Any]:
    pub = ensure_key(workdir)
    ingest_db = workdir / "ingest.sqlite"
    server = IngestServer(ingest_db).start()
    try:
        register_device(server.db, opts.device_id, pub)
        summary = run_bus(opts, workdir, server.url, ingest_db)
    finally:
        server.stop()
    if progress:
        print(
            f"simulated {opts.duration:.0f} s in {summary['wall_seconds']:.1f} s", file=sys.stderr
        )
    return summary


def run_bus(opts: SimOptions, workdir: Path, url: str, ingest_db: Path) -> dict[str, Any]:
    """One bus (key already in ``workdir/keys``) uploading to the ingest at ``url``.

    The ingest may be shared with other buses (``cngmrv sim --fleet``); its
    database file is read afterwards to verify what arrived.
    """
    channel = f"cngmrv-sim-{uuid.uuid4().hex[:8]}"
    master, slave = os.openpty()
    tty.setraw(slave)  # bytes must pass the line discipline unchanged
    sim_bus = can.Bus(interface="virtual", channel=channel, preserve_timestamps=True)
    cfg = _device_config(
        workdir, opts.device_id, channel, os.ttyname(slave), url, opts.readings_per_batch
    )
    wall_start = time.monotonic()
    agent = Agent(cfg, clock="synchronised")
    stop = threading.Event()
    worker = threading.Thread(target=agent.run, args=(stop,), name="agent", daemon=True)
    try:
        agent.start()
        worker.start()
        _wait_for_kit(agent)
        epoch0 = float(int(time.time()))
        vehicle, ecu, kit, unplugged = _drive(opts, sim_bus, master, agent, epoch0)
        _wait_for_inputs(agent, ecu.frames_sent, kit.frames_sent)
        stop.set()
        worker.join()
        agent.close(upload_timeout=30.0)
    finally:
        stop.set()
        sim_bus.shutdown()
        os.close(master)
        os.close(slave)
    wall = time.monotonic() - wall_start
    db = open_readonly(ingest_db)
    try:
        held = stored_batches(db, opts.device_id)
    finally:
        db.close()
    summary = _summarise(opts, workdir, held, agent, vehicle, ecu, kit, wall)
    summary["kit_unplugged"] = unplugged
    return summary


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
    agent: Agent,
    vehicle: Bus,
    ecu: EngineEcu,
    kit: KitFirmware,
    wall: float,
) -> dict[str, Any]:
    pub = keys.load_public_key(workdir / "keys" / keys.PUB_FILE)
    report = batch.verify_set(((f"ingest:{s}", raw) for s, raw in held), pub)
    uploaded = {s for s, _ in held}
    signed = agent.sealed
    stats = agent.stats()
    return {
        "sim_seconds": opts.duration,
        "wall_seconds": round(wall, 3),
        "seed": opts.seed,
        "device_id": opts.device_id,
        "workdir": str(workdir) if opts.workdir else None,
        "frames": ecu.frames_sent,
        "frames_received": stats["frames"],
        "kit_frames": kit.frames_sent,
        "kit_frames_received": stats["kit_messages"],
        "readings": agent.readings,
        "batches_signed": len(signed),
        "batches_uploaded": sum(1 for s in signed if s in uploaded),
        "batches_verified": sum(1 for s in signed if s in report.ok),
        "verify_problems": {k: v for k, v in report.bad.items()},
        "verify_gaps": report.gaps,
        "diesel_l": agent.totals["diesel_l"],
        "gas_kg": agent.totals["gas_kg"],
        "distance_km": agent.totals["distance_km"],
        "truth": {
            "diesel_l": vehicle.truth_diesel_l,
            "gas_kg": vehicle.truth_gas_kg,
            "distance_km": vehicle.truth_distance_km,
        },
        "agent": stats,
    }


def _relative_errors(summary: dict[str, Any]) -> dict[str, float]:
    t = summary["truth"]
    return {k: (summary[k] - t[k]) / t[k] if t[k] else 0.0 for k in t}


def _print_human(s: dict[str, Any]) -> None:
    err = _relative_errors(s)
    print(
        f"simulated {s['sim_seconds']:.0f} s in {s['wall_seconds']:.1f} s wall (seed {s['seed']})"
    )
    print(f"frames {s['frames']} sent, {s['frames_received']} received; readings {s['readings']}")
    print(
        f"batches: {s['batches_signed']} signed, {s['batches_uploaded']} uploaded, "
        f"{s['batches_verified']} verified"
    )
    for k, unit in (("diesel_l", "L"), ("gas_kg", "kg"), ("distance_km", "km")):
        print(
            f"{k:<12} measured {s[k]:10.3f} {unit:<2}  truth {s['truth'][k]:10.3f} {unit:<2}"
            f"  error {100 * err[k]:+.3f} %"
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
    if args.speedup < 0:
        raise ValueError("--speedup must be >= 0 (0 = unpaced)")
    if args.fleet < 1:
        raise ValueError("--fleet must be >= 1")
    unplug = parse_unplug(args.kit_unplug or [], args.fleet)
    opts = SimOptions(
        duration=args.duration,
        speedup=args.speedup,
        seed=args.seed,
        workdir=Path(args.workdir) if args.workdir else None,
        readings_per_batch=args.batch,
        kit_unplugged=unplug.get(1, ()),
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


def register(sub: Any) -> None:
    """Add the ``sim`` subcommand to the CLI (entry point group ``cngmrv.commands``)."""
    p = sub.add_parser("sim", help="run the simulated bus, kit, agent and ingest locally")
    p.add_argument("--duration", type=float, default=600.0, help="simulated seconds (600)")
    p.add_argument(
        "--speedup", type=float, default=100.0, help="times faster than real time; 0 = unpaced"
    )
    p.add_argument("--seed", type=int, default=1, help="drive-cycle seed (1)")
    p.add_argument("--workdir", help="keep keys, store and ingest database here (continues)")
    p.add_argument("--batch", type=int, default=60, help="readings per batch (60)")
    p.add_argument(
        "--fleet", type=int, default=1, help="buses sharing one ingest, run in parallel (1)"
    )
    p.add_argument(
        "--kit-unplug",
        action="append",
        metavar="BUS:START:END",
        help="bus BUS's kit sends nothing from START to END simulated s (repeatable)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=command)
