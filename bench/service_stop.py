"""Service figures: SIGTERM to exit of ``cngmrv run``, and the cost of rebasing wall-stamped frames.

Prints one JSON object:

* ``stop_s``: seconds from SIGTERM to process exit (the median and the worst of
  ``--repeat`` runs) for ``cngmrv run`` fed by the simulated engine over
  ``udp_multicast`` and the simulated kit over a pty for ``--seconds``; the
  acceptance bound is 5 s.
* ``rebase_ns_per_frame``: :meth:`ClockMonitor.rebase` on frames without a
  step (the steady state on SocketCAN), per frame, against a plain list copy.

Usage: python bench/service_stop.py [--repeat R] [--seconds S]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import tty
from pathlib import Path
from typing import Any

import can

from cngmrv.agent.clock import ClockMonitor
from cngmrv.signed import keys
from cngmrv.sim.agent_process import MCAST_GROUP, AgentProcess, new_mcast_port
from cngmrv.sim.drive import TICK_S, drive
from cngmrv.sim.ecu import EngineEcu
from cngmrv.sim.kit import KitFirmware, KitLogic
from cngmrv.sim.vehicle import CityBus, CityBusParams, DriveCycle


def stop_time(seconds: float) -> float:
    with tempfile.TemporaryDirectory(prefix="cngmrv-bench-") as tmp:
        d = Path(tmp)
        keys.generate(d / "keys")
        master, slave = os.openpty()
        tty.setraw(slave)
        (d / "ttyKIT").symlink_to(os.ttyname(slave))
        port = new_mcast_port()
        (d / "agent.toml").write_text(
            '[device]\nid = "bench"\nkey_file = "keys/device.key"\n'
            f'[can]\ninterface = "udp_multicast"\nchannel = "{MCAST_GROUP}"\n'
            f'[kit]\nport = "{d / "ttyKIT"}"\n[store]\npath = "store.sqlite"\n'
            '[health]\nenabled = false\n[clock]\nsource = "none"\n'
        )
        agent = AgentProcess(d / "agent.toml", env={"CAN_CONFIG": json.dumps({"port": port})})
        agent.wait_ready()
        bus = can.Bus(interface="udp_multicast", channel=MCAST_GROUP, port=port)
        logic = KitLogic()
        vehicle = CityBus(CityBusParams(), DriveCycle.brt(seconds + 5, 1), controller=logic)
        ecu = EngineEcu(bus, vehicle, time.time())
        kit = KitFirmware(master, logic)
        for i, s in drive(vehicle, int(seconds / TICK_S)):
            ecu.tick(i, s)
            kit.tick(i, s)
        sent = time.monotonic()
        agent.stop(timeout=30)
        took = time.monotonic() - sent
        bus.shutdown()
        os.close(master)
        os.close(slave)
        assert agent.returncode == 0, agent.returncode
        return took


def rebase_cost(n: int = 200_000) -> dict[str, float]:
    m = ClockMonitor()
    m.poll()
    now_mono = time.monotonic()
    base = m.base
    frames = [
        (base + now_mono + i * 1e-4, 0x0CF00400, b"\0" * 8, now_mono + i * 1e-4) for i in range(n)
    ]

    def poll() -> None:
        m.poll()

    t = time.perf_counter()
    m.rebase(frames, poll)
    rebase = time.perf_counter() - t
    t = time.perf_counter()
    _ = list(frames)
    copy = time.perf_counter() - t
    return {"rebase_ns_per_frame": rebase / n * 1e9, "list_copy_ns_per_frame": copy / n * 1e9}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    stops = [stop_time(args.seconds) for _ in range(args.repeat)]
    out: dict[str, Any] = {
        "stop_s": {"median": statistics.median(stops), "max": max(stops), "runs": len(stops)},
        "stop_bound_s": 5.0,
        **rebase_cost(),
        "python": sys.version.split()[0],
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
