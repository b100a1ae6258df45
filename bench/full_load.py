"""The agent in its own process on a saturated J1939 bus: loss, CPU and memory.

For each bit rate (250 and 500 kbit/s by default) at ``--load`` percent of the
bus (100 by default), ``cngmrv sim --agent-process`` runs for ``--seconds`` of
real time: the simulator puts the engine's, the kit's and the other ECUs'
traffic on a python-can ``udp_multicast`` bus, spaced as the wire spaces it,
and the agent (``cngmrv run``, in the agent-only environment of
``bench/agent_env.py``) reads, integrates, stores, signs and uploads it.  In
the same run a bare python-can receive loop listens on the same bus in a
third process: the floor any python-can reader pays.

Per case: frames offered (the simulator's count), received (read off the bus
by the agent), dropped and where (``socket``: offered but never read;
``queue``: read but dropped on a full queue; ``decoder``: queued but never
used), the agent's CPU as a percentage of one core over the drive, its peak
RSS, readings and batches, the bare loop's CPU and its sequence-number check,
how well the simulator kept to real time (a case it fell behind in is not
``ok``), and the integrated totals beside those of the same drive cycle on a
bus with the engine alone (``--reference process``: run the same way, in
real time; ``fast``: in-process, unpaced).

Prints ``{"cases": [...], ...}``.  Ten minutes per case by default, and ten
for the reference, one after the other: about 33 minutes in all.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import agent_env  # noqa: E402  (bench/ is not a package)

# The acceptance bounds (docs/performance.md, figures): the agent's CPU, % of one core, at 100 % load.
CPU_LIMIT_PCT = {250_000: 15.0, 500_000: 25.0}
RSS_LIMIT_MB = 80.0
TOTALS_TOLERANCE = 0.001  # relative, against the unloaded run
# How far the simulator may fall behind real time before a case is invalid.
MAX_OVERRUN = 0.02
MAX_LATE_S = 0.5


def bare_loop(group: str, port: int) -> None:
    """python-can's receive loop and nothing else, until SIGTERM; prints its counts as JSON.

    Per frame it only reads the background frames' sequence numbers (one
    struct unpack), so the frames it saw are known exactly.  Its CPU time is
    read at its first frame and at the end, not per frame.
    """
    import can

    from cngmrv.sim.busload import sequence_of

    stop = False

    def on_term(*_: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    bus = can.Bus(interface="udp_multicast", channel=group, port=port)
    print("ready", flush=True)
    n = seen = backwards = last_seq = 0
    first_wall = last_wall = first_cpu = 0.0
    recv, monotonic = bus.recv, time.monotonic
    while not stop:
        msg = recv(0.2)
        if msg is None:
            continue
        last_wall = monotonic()
        if not n:
            first_wall, first_cpu = last_wall, time.process_time()
        n += 1
        seq = sequence_of(msg.arbitration_id, msg.data)
        if seq is not None:
            seen += 1
            if seq < last_seq:
                backwards += 1
            last_seq = seq
    # CPU runs on to SIGTERM, past the last frame, while the loop idles in
    # recv (the agent's settle and stop): a few timeouts' polling, next to
    # nothing beside the drive's.  The wall time ends at the last frame.
    cpu = time.process_time() - first_cpu if n else 0.0
    bus.shutdown()
    wall = last_wall - first_wall
    print(
        json.dumps(
            {
                "received": n,
                "seq_seen": seen,
                "seq_backwards": backwards,
                "cpu_s": cpu,
                "wall_s": wall,
                "cpu_pct_one_core": 100 * cpu / wall if wall else 0.0,
            }
        ),
        flush=True,
    )


def _start_bare(python: str, group: str, port: int) -> subprocess.Popen[str]:
    from cngmrv.sim.agent_process import die_with_parent

    proc = subprocess.Popen(
        [python, __file__, "--bare", group, str(port)],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=die_with_parent,
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError("the bare receive loop did not start")
    return proc


def _stop_bare(proc: subprocess.Popen[str]) -> dict[str, Any]:
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError("the bare receive loop did not stop") from None
    return dict(json.loads(out.strip().splitlines()[-1]))


def case(base: Any, bitrate: int, load: float, reference: dict[str, Any]) -> dict[str, Any]:
    from cngmrv.sim.agent_process import MCAST_GROUP, new_mcast_port
    from cngmrv.sim.harness import relative_error, run

    port = new_mcast_port()
    opts = replace(base, bitrate=bitrate, bus_load_pct=load, mcast_port=port)
    bare = _start_bare(base.agent_python, MCAST_GROUP, port)
    try:
        s = run(opts)
    finally:
        bare_out = _stop_bare(bare)
    a = s["agent"]
    proc = a["process"]
    bus = s["bus"]
    lost = bus["lost"]
    totals = {k: s[k] for k in ("diesel_l", "gas_kg", "distance_km")}
    vs = {k: relative_error(totals[k], reference[k]) for k in totals}
    limit = CPU_LIMIT_PCT.get(bitrate)
    # A simulator that fell behind real time sent fewer frames per second,
    # bunched: the agent's figures would flatter it.
    overrun = bus["drive_wall_s"] / s["sim_seconds"] - 1
    paced = overrun <= MAX_OVERRUN and bus["late_max_s"] <= MAX_LATE_S
    bare_out["seq_missing"] = bus["sequenced"] - bare_out["seq_seen"]
    return {
        "bitrate": bitrate,
        "load_pct": load,
        "busy_share": bus["busy_share"],
        "seconds": s["sim_seconds"],
        "offered": bus["offered"],
        "offered_fps": round(bus["offered"] / bus["drive_wall_s"], 1),
        "received": a["can"]["frames"],
        "dropped": lost["total"],
        "dropped_where": lost,
        "cpu_pct_one_core": round(proc["cpu_pct_one_core"], 2),
        "cpu_limit_pct": limit,
        "peak_rss_mb": round(proc["peak_rss_mb"], 1),
        "readings": s["readings"],
        "batches": {
            "signed": s["batches_signed"],
            "uploaded": s["batches_uploaded"],
            "verified": s["batches_verified"],
        },
        "kit": {"sent": s["kit_frames"], "received": s["kit_frames_received"]},
        "bare_cpu_pct_one_core": round(bare_out["cpu_pct_one_core"], 2),
        "bare": bare_out,
        "pacing": {"drive_overrun": round(overrun, 5), "late_max_s": bus["late_max_s"]},
        "totals": totals,
        "totals_vs_no_load": vs,
        "ok": (
            paced
            and lost["total"] == 0
            and (limit is None or proc["cpu_pct_one_core"] <= limit)
            and proc["peak_rss_mb"] <= RSS_LIMIT_MB
            and all(v is not None and abs(v) <= TOTALS_TOLERANCE for v in vs.values())
            and s["batches_verified"] == s["batches_signed"]
        ),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=600.0, help="per case, real time (600)")
    ap.add_argument("--bitrates", default="250000,500000", help="comma-separated bit/s")
    ap.add_argument("--load", type=float, default=100.0, help="bus load, percent (100)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--reference",
        choices=("process", "fast"),
        default="process",
        help="the unloaded run: like the cases (agent process, real time) or in-process, unpaced",
    )
    ap.add_argument("--bare", nargs=2, metavar=("GROUP", "PORT"), help=argparse.SUPPRESS)
    agent_env.add_arguments(ap)
    args = ap.parse_args()
    if args.bare:
        bare_loop(args.bare[0], int(args.bare[1]))
        return 0
    try:
        bitrates = [int(b) for b in args.bitrates.split(",") if b]
    except ValueError:
        ap.error(f"--bitrates takes comma-separated integers, got {args.bitrates!r}")
    if args.seconds <= 0 or not bitrates or min(bitrates) <= 0:
        ap.error("--seconds and every bit rate must be > 0")
    if not 0 < args.load <= 100:
        ap.error("--load must be a percentage 0 < load <= 100")

    from cngmrv.sim.harness import SimOptions, relative_error, run

    python = agent_env.chosen_python(args)
    base = SimOptions(
        duration=args.seconds, seed=args.seed, agent_process=True, agent_python=python
    )
    # The same drive cycle with the engine alone on the bus.
    if args.reference == "process":
        ref = run(replace(base, bus_load_pct=0.0))
    else:
        ref = run(replace(base, agent_process=False, speedup=0.0, agent_python=None))
    reference = {k: ref[k] for k in ("diesel_l", "gas_kg", "distance_km")}
    cases = [case(base, b, args.load, reference) for b in bitrates]
    out = {
        "cases": cases,
        "no_load": {
            **reference,
            "readings": ref["readings"],
            "frames": ref["frames"],
            "how": args.reference,
            "vs_truth": {k: relative_error(ref[k], ref["truth"][k]) for k in reference},
        },
        "agent_python": python,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }
    print(json.dumps(out, indent=2))
    return 0 if all(c["ok"] for c in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
