"""A full J1939 bus on a kernel SocketCAN socket: the agent's CPU beside python-can's and candump's.

Runs inside the virtual bench's guest (vmbench/guest/entry.sh, after the
suite), as root, with the agent installed under systemd.  ``canplayer`` plays
``--log`` (a candump log of the ``sim/busload.py`` mix at 500 kbit/s, made on
the host by vmbench/run.py) into vcan0 at real time, twice.

The first play is the comparison: three receivers, each in its own process,
take the same frames, because each has the agent's kernel acceptance filters
(``j1939_filters(DEFAULT_PGNS)``, about 2 % of the mix):

* the agent, started by systemd with the shipped config;
* a bare python-can ``socketcan`` receive loop;
* ``candump`` writing to /dev/null, the practical floor.

Before it the agent is watched on a silent bus (``agent_idle_cpu_pct``): its
timers, one-second readings, store and metrics cost that much with no frames,
and the bare loop has none of it.  The second play (``whole_bus``) gives the
bare loop and candump every frame, unfiltered: what reading the whole bus
would cost without the kernel's filters.

Each CPU figure is read from ``/proc/<pid>/stat`` over a play, as a percentage
of one (emulated) CPU.  Emulation distorts absolute figures; the ratios from
the same run are the result.  ``offered`` is every frame played; ``received``
and ``dropped`` are the agent's (its metrics against the frames its filters
pass), ``bare_received``/``bare_dropped`` the filtered bare loop's.  A
receiver that drops was starved of the one emulated CPU, so its CPU figure is
a floor, not its cost.
Prints one JSON object: ``{"full_load": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "hil_tests"))

from hil_support import InstalledAgent, frames_through_the_filters, metrics  # noqa: E402

from cngmrv.drivers.can_source import DEFAULT_PGNS, j1939_filters  # noqa: E402

BARE_LOOP = """
import json, signal, sys
import can
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
filters = json.loads(sys.argv[2]) or None
bus = can.Bus(interface="socketcan", channel=sys.argv[1], can_filters=filters)
print("ready", flush=True)
n = 0
while not stop:
    if bus.recv(0.2) is not None:
        n += 1
print(json.dumps({"received": n}), flush=True)
"""
# Seconds the agent is watched on a silent bus: its cost with no frames (timers, readings,
# store, metrics), which the bare loop does not have.
IDLE_S = 8.0


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def candump_filters(filters: list[dict[str, Any]]) -> str:
    """The same acceptance filters in candump's ``<id>:<mask>`` syntax (an 8-digit id is 29-bit)."""
    out = []
    for f in filters:
        if f["extended"]:
            # The EFF flag in the mask too, so an 11-bit frame never matches a 29-bit filter.
            out.append(f"{f['can_id']:08X}:{f['can_mask'] | 0x80000000:08X}")
        else:
            out.append(f"{f['can_id']:03X}:{f['can_mask'] | 0x80000000:08X}")
    return ",".join(out)


class Receivers:
    """A bare python-can loop and a candump on ``channel``, both with ``filters`` (or none)."""

    def __init__(self, channel: str, filters: list[dict[str, Any]] | None) -> None:
        self.bare = subprocess.Popen(
            [sys.executable, "-c", BARE_LOOP, channel, json.dumps(filters)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.bare.stdout is not None
        self.bare.stdout.readline()
        spec = f"{channel},{candump_filters(filters)}" if filters else channel
        self.dump = subprocess.Popen(["candump", spec], stdout=subprocess.DEVNULL)

    def stop(self) -> int:
        """Stops both; the frames the bare loop received."""
        self.bare.send_signal(signal.SIGTERM)
        out = json.loads(self.bare.communicate(timeout=60)[0].strip().splitlines()[-1])
        self.dump.terminate()
        self.dump.wait(timeout=30)
        return int(out["received"])


def play(log: Path, channel: str, pids: dict[str, int]) -> tuple[dict[str, float], float]:
    """Plays ``log`` into ``channel`` at real time: each pid's CPU, % of one CPU, and the wall time."""
    before = {k: cpu_s(v) for k, v in pids.items()}
    t0 = time.monotonic()
    subprocess.run(["canplayer", "-I", str(log), f"{channel}=vcan0"], check=True)
    wall = time.monotonic() - t0
    after = {k: cpu_s(v) for k, v in pids.items()}
    return {k: round(100.0 * (after[k] - before[k]) / wall, 1) for k in pids}, wall


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--log", required=True, type=Path, help="candump -L log of the bus mix")
    p.add_argument("--channel", default="vcan0")
    args = p.parse_args()
    offered = sum(1 for line in args.log.open() if "#" in line)
    to_agent = frames_through_the_filters(args.log)
    filters = j1939_filters(DEFAULT_PGNS)

    agent = InstalledAgent()
    agent.configure()
    agent.systemctl("start")
    time.sleep(2.0)
    pid = agent.main_pid()
    c0 = cpu_s(pid)
    time.sleep(IDLE_S)
    idle_pct = round(100.0 * (cpu_s(pid) - c0) / IDLE_S, 1)

    # The agent's shipped config, beside receivers with the same kernel filters: the same frames.
    same = Receivers(args.channel, filters)
    time.sleep(2.0)
    before_m = metrics()
    pct, wall = play(
        args.log, args.channel, {"agent": pid, "bare": same.bare.pid, "candump": same.dump.pid}
    )
    time.sleep(3.0)  # the queues drained, a metrics snapshot taken since
    after_m = metrics()
    bare_received = same.stop()

    # The whole bus, unfiltered: what reading every frame costs python-can and candump.
    whole = Receivers(args.channel, None)
    time.sleep(2.0)
    whole_pct, _ = play(args.log, args.channel, {"bare": whole.bare.pid, "candump": whole.dump.pid})
    whole_received = whole.stop()
    agent.systemctl("stop")

    rx = 'cngmrv_frames_received_total{source="can"}'
    drop = 'cngmrv_frames_dropped_total{source="can"}'
    received = int(after_m[rx] - before_m[rx])
    out = {
        "agent_cpu_pct": pct["agent"],
        "bare_cpu_pct": pct["bare"],
        "candump_cpu_pct": pct["candump"],
        "offered": offered,
        "received": received,
        "dropped": to_agent - received,
        # What the agent itself counted (its queue's and the kernel's socket drops):
        # equal to "dropped" when nothing went missing unseen.
        "agent_reported_dropped": int(after_m[drop] - before_m[drop]),
        "agent_offered": to_agent,
        "agent_idle_cpu_pct": idle_pct,
        "bare_received": bare_received,
        "bare_dropped": to_agent - bare_received,
        "agent_to_bare": ratio(pct["agent"], pct["bare"]),
        "agent_to_candump": ratio(pct["agent"], pct["candump"]),
        "agent_above_idle_to_bare": ratio(pct["agent"] - idle_pct, pct["bare"]),
        "whole_bus": {
            "bare_cpu_pct": whole_pct["bare"],
            "candump_cpu_pct": whole_pct["candump"],
            "bare_received": whole_received,
            "bare_dropped": offered - whole_received,
        },
        "played_s": round(wall, 1),
    }
    print(json.dumps({"full_load": out}))


if __name__ == "__main__":
    main()
