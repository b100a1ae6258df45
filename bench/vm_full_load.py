"""A full J1939 bus on a kernel SocketCAN socket: the agent's CPU beside python-can's and candump's.

Runs inside the virtual bench's guest (vmbench/guest/entry.sh, after the
suite), as root, with the agent installed under systemd.  ``canplayer`` plays
``--log`` (a candump log of the ``sim/busload.py`` mix at 500 kbit/s, made on
the host by vmbench/run.py) into vcan0 at real time while three receivers
listen, each in its own process:

* the agent, started by systemd with the shipped config (kernel filters on);
* a bare python-can ``socketcan`` receive loop (no filters: every frame);
* ``candump`` writing to /dev/null, the practical floor.

Each one's CPU is read from ``/proc/<pid>/stat`` over the play, as a
percentage of one (emulated) CPU.  Emulation distorts absolute figures; the
ratios from the same run are the result.  Frames: ``offered`` is every frame
played; the agent's ``received`` and ``dropped`` count the frames its kernel
filters let through (its metrics against the log), the bare loop's every frame;
a receiver that drops was starved of the one emulated CPU, so its CPU figure is
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "hil_tests"))

from hil_support import InstalledAgent, frames_through_the_filters, metrics  # noqa: E402

BARE_LOOP = """
import json, signal, sys
import can
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
bus = can.Bus(interface="socketcan", channel=sys.argv[1])
print("ready", flush=True)
n = 0
while not stop:
    if bus.recv(0.2) is not None:
        n += 1
print(json.dumps({"received": n}), flush=True)
"""


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--log", required=True, type=Path, help="candump -L log of the bus mix")
    p.add_argument("--channel", default="vcan0")
    args = p.parse_args()
    offered = sum(1 for line in args.log.open() if "#" in line)
    to_agent = frames_through_the_filters(args.log)

    agent = InstalledAgent()
    agent.configure()
    agent.systemctl("start")
    bare = subprocess.Popen(
        [sys.executable, "-c", BARE_LOOP, args.channel], stdout=subprocess.PIPE, text=True
    )
    assert bare.stdout is not None
    bare.stdout.readline()
    dump = subprocess.Popen(["candump", args.channel], stdout=subprocess.DEVNULL)
    time.sleep(2.0)
    pids = {"agent": agent.main_pid(), "bare": bare.pid, "candump": dump.pid}
    before_m = metrics()
    before = {k: cpu_s(v) for k, v in pids.items()}
    t0 = time.monotonic()
    subprocess.run(["canplayer", "-I", str(args.log), f"{args.channel}=vcan0"], check=True)
    wall = time.monotonic() - t0
    after = {k: cpu_s(v) for k, v in pids.items()}
    time.sleep(3.0)  # the queues drained, a metrics snapshot taken since
    after_m = metrics()
    bare.send_signal(signal.SIGTERM)
    bare_out = json.loads(bare.communicate(timeout=60)[0].strip().splitlines()[-1])
    dump.terminate()
    dump.wait(timeout=30)
    agent.systemctl("stop")
    rx = 'cngmrv_frames_received_total{source="can"}'
    drop = 'cngmrv_frames_dropped_total{source="can"}'
    received = int(after_m[rx] - before_m[rx])
    pct = {k: round(100.0 * (after[k] - before[k]) / wall, 1) for k in pids}
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
        "bare_received": bare_out["received"],
        "bare_dropped": offered - bare_out["received"],
        "agent_to_bare": round(pct["agent"] / pct["bare"], 2) if pct["bare"] else None,
        "agent_to_candump": round(pct["agent"] / pct["candump"], 2) if pct["candump"] else None,
        "played_s": round(wall, 1),
    }
    print(json.dumps({"full_load": out}))


if __name__ == "__main__":
    main()
