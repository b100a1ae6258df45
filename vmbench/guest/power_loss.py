"""The power-loss test's two halves, run by entry.sh with the bench venv's python.

``arm``: the installed agent acquires the real recording (canplayer, looped)
under systemd; once some batches are sealed, the agent's count of readings
and the time are noted, and the host is told to cut the power (it kills qemu:
the guest's page cache and anything not yet fsynced are lost).
``check`` (next boot): the store must open, it must hold every reading made
before the cut but at most those of ``store.buffer_s`` plus one period (the
agent's count also holds readings still buffered), the chain must verify with the BOOT event saying the
stop was unclean, and what was lost must be within what docs/deploy-pi.md
promises: readings not yet committed, at most ``store.buffer_s`` plus one
reading period before the cut.  Writes ``results/power_loss.json``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path("/mnt/bench")
sys.path.insert(0, str(BENCH / "src" / "hil_tests"))

from hil_support import InstalledAgent, metrics  # noqa: E402

STATE = BENCH / "results" / "power_loss_state.json"
OUT = BENCH / "results" / "power_loss.json"
BUFFER_S = 10.0  # store.buffer_s, shipped default
PERIOD_S = 1.0
READINGS_PER_BATCH = 5
SEALED_BEFORE_CUT = 3
# docs/deploy-pi.md's promise in readings: those of store.buffer_s plus one period.
MAX_LOST_READINGS = math.ceil((BUFFER_S + PERIOD_S) / PERIOD_S)


def committed() -> int:
    """Readings in the store: read with sqlite3 as the agent's user, the agent stopped."""
    db = str(InstalledAgent.STATE / "store.sqlite")
    q = "SELECT COALESCE(MAX(first_seq + n), 0) FROM readings"
    r = subprocess.run(
        ["setpriv", "--reuid=cngmrv", "--regid=cngmrv", "--init-groups"]
        + ["sqlite3", "-cmd", ".timeout 10000", db, q],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(r.stdout.strip() or 0)


def feed() -> subprocess.Popen[bytes]:
    subprocess.run(["ip", "link", "add", "dev", "vcan0", "type", "vcan"], capture_output=True)
    subprocess.run(["ip", "link", "set", "vcan0", "up"], check=True)
    return subprocess.Popen(
        ["canplayer", "-l", "i", "-I", str(BENCH / "src" / "recording.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def arm() -> None:
    agent = InstalledAgent()
    agent.configure({("batch", "readings_per_batch"): str(READINGS_PER_BATCH)})
    feed()
    agent.systemctl("start")
    # Until a few batches are sealed: the agent is acquiring and committing.
    deadline = time.monotonic() + 300.0
    while True:
        m = metrics()
        sealed = int(m["cngmrv_batches_sealed_total"])
        if sealed >= SEALED_BEFORE_CUT:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"only {sealed} batches sealed in 300 s: the agent is not acquiring")
        time.sleep(1.0)
    # The agent's readings count holds those committed and those still buffered
    # (store.buffer_s), which a power cut may take.
    state = {
        "sealed_before": sealed,
        "produced_before": int(m["cngmrv_readings_total"]),
        "cut_at": time.time(),
    }
    STATE.write_text(json.dumps(state))
    print(f"before the cut: {state}", flush=True)


def check() -> int:
    agent = InstalledAgent()
    armed = json.loads(STATE.read_text())
    result: dict[str, object] = {
        "sealed_before": armed["sealed_before"],
        "produced_before": armed["produced_before"],
    }
    n_after = committed()
    result["committed_after_reboot"] = n_after
    player = feed()
    mark = agent.cursor()
    agent.systemctl("start")
    boot = agent.wait_for_message(r"event=boot epoch=\d+ clean_stop=\w+", mark, 60.0)
    result["boot_line"] = boot
    time.sleep(8.0)
    agent.systemctl("stop")
    player.terminate()
    report = agent.verify()
    (device,) = report["devices"].values() if report.get("devices") else ({},)
    readings = agent.readings()
    before = [r for r in readings if r["t0"] < armed["cut_at"]]
    last_end = max((r["t0"] + r["dur"] for r in before), default=None)
    lost_s = None if last_end is None else armed["cut_at"] - last_end
    result.update(
        chain_passed=report.get("passed"),
        unclean_stops=device.get("unclean_stops"),
        boot_epochs=device.get("boot_epochs"),
        gaps=report.get("gaps"),
        lost_s=lost_s,
        promised_max_lost_s=BUFFER_S + PERIOD_S,
    )
    ok = (
        bool(report.get("passed"))
        and n_after >= armed["produced_before"] - MAX_LOST_READINGS
        and "clean_stop=False" in boot
        and device.get("unclean_stops") == 1
        and lost_s is not None
        and lost_s <= BUFFER_S + PERIOD_S + 2.0
    )
    result["chain_ok"] = ok
    OUT.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    if sys.argv[1] == "arm":
        arm()
    else:
        sys.exit(check())
