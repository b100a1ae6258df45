"""What the bench tests share (a module of its own: ``conftest`` is a name every test folder uses)."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class CanBench:
    """A SocketCAN interface under test; ``virtual`` when it is a kernel vcan fed by the test."""

    name: str
    virtual: bool

    def counter(self, which: str) -> int:
        """The kernel's per-interface counter (``tx_packets``, ``rx_packets``, ...)."""
        return int(Path(f"/sys/class/net/{self.name}/statistics/{which}").read_text())


class EngineFeed:
    """The simulated engine on a vcan (``virtual``), or the real engine on hardware.

    ``sent`` counts the frames this test process put on the interface, so a
    TX counter can be checked against it; :meth:`paused` holds the feed still
    while counters are read.
    """

    def __init__(self, virtual: bool) -> None:
        self.virtual = virtual
        self.sent = 0
        self.flowing = threading.Event()
        self.lock = threading.Lock()
        if not virtual:
            self.flowing.set()

    def paused(self) -> threading.Lock:
        return self.lock


def ask(text: str) -> None:
    """Tell the person at the bench what to do now (visible with pytest -s)."""
    print(f"\n>>> {text}", flush=True)


def report_figures(name: str, figures: dict[str, Any]) -> None:
    """Leave measured figures for the virtual bench's JSON (``$CNGMRV_HIL_RESULTS``), if set."""
    folder = os.environ.get("CNGMRV_HIL_RESULTS")
    if folder:
        Path(folder, f"figure-{name}.json").write_text(json.dumps(figures))


# The keys docs/deploy-pi.md says to edit, as the virtual bench sets them, plus the
# CAN channel (the guest's bus is vcan0).  Every other key keeps its shipped value.
BENCH_CONFIG_EDITS = {
    ("device", "id"): '"vm-bench"',
    ("can", "channel"): '"vcan0"',
    # The service gets no kit: the kit's serial path is tested on a pty by test_kit_bench.
    ("kit", "port"): '""',
    # No network and no ingest in the guest: batches stay pending in the store.
    ("upload", "url"): '""',
}


def bench_config(example: str, edits: dict[tuple[str, str], str] | None = None) -> str:
    """``deploy/agent.example.toml``'s text with ``BENCH_CONFIG_EDITS`` and ``edits`` applied.

    ``edits`` maps (section, key) to a TOML value as written.  Line-based, so
    the shipped file's comments and order stay (and it runs on a bare python3,
    which reads TOML but cannot write it); every key edited must be in the file.
    """
    want = {**BENCH_CONFIG_EDITS, **(edits or {})}
    out, section, done = [], "", set()
    for line in example.splitlines():
        m = re.match(r"\s*\[([^\]]+)\]", line)
        if m:
            section = m.group(1).strip()
        else:
            k = re.match(r"(\s*)([A-Za-z_]+)(\s*=\s*)", line)
            if k and (section, k.group(2)) in want:
                line = f"{k.group(1)}{k.group(2)}{k.group(3)}{want[(section, k.group(2))]}"
                done.add((section, k.group(2)))
        out.append(line)
    missing = set(want) - done
    if missing:
        raise KeyError(f"keys not in the example config: {sorted(missing)}")
    text = "\n".join(out) + "\n"
    tomllib.loads(text)
    return text


if __name__ == "__main__":
    # python3 hil_support.py EXAMPLE [section.key=value ...]: the bench's config on stdout.
    extra = {}
    for arg in sys.argv[2:]:
        key, value = arg.split("=", 1)
        section, name = key.split(".", 1)
        extra[(section, name)] = value
    sys.stdout.write(bench_config(Path(sys.argv[1]).read_text(), extra))


class InstalledAgent:
    """The agent installed as docs/deploy-pi.md says, run by systemd as ``cngmrv.service``.

    Only for a machine that is the bench (the virtual bench's guest): it
    rewrites ``/etc/cngmrv/agent.toml`` and deletes the store between tests.
    Commands run as root; the agent's own tools run as the ``cngmrv`` user,
    so nothing in ``/var/lib/cngmrv`` comes to belong to root.
    """

    UNIT = "cngmrv.service"
    CONFIG = Path("/etc/cngmrv/agent.toml")
    STATE = Path("/var/lib/cngmrv")
    CLI = "/opt/cngmrv/venv/bin/cngmrv"
    EXAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "agent.example.toml"

    def configure(self, edits: dict[tuple[str, str], str] | None = None) -> None:
        """A fresh start: the unit stopped, the store gone (the key kept), the config written."""
        self.systemctl("stop")
        subprocess.run(["systemctl", "reset-failed", self.UNIT], capture_output=True)
        for f in self.STATE.glob("store.sqlite*"):
            f.unlink()
        self.CONFIG.write_text(bench_config(self.EXAMPLE.read_text(), edits))
        self.CONFIG.chmod(0o644)

    def systemctl(self, verb: str) -> float:
        """``systemctl VERB cngmrv.service``; the seconds it took (start returns after READY=1)."""
        t0 = time.monotonic()
        r = subprocess.run(["systemctl", verb, self.UNIT], capture_output=True, text=True)
        took = time.monotonic() - t0
        if r.returncode != 0:
            raise AssertionError(
                f"systemctl {verb} {self.UNIT} failed ({r.returncode}): {r.stderr.strip()}\n"
                + self.journal_text()
            )
        return took

    def show(self, *props: str) -> dict[str, str]:
        out = subprocess.run(
            ["systemctl", "show", self.UNIT, *(f"--property={p}" for p in props)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def main_pid(self) -> int:
        return int(self.show("MainPID")["MainPID"])

    @staticmethod
    def cursor() -> str:
        """The journal's current position: entries after it are the test's."""
        out = subprocess.run(
            ["journalctl", "--show-cursor", "-n", "0", "-q"], capture_output=True, text=True
        ).stdout
        for line in out.splitlines():
            if line.startswith("-- cursor: "):
                return line.removeprefix("-- cursor: ").strip()
        return ""

    def journal(self, after: str = "", unit: str | None = None) -> list[dict[str, Any]]:
        cmd = ["journalctl", "-u", unit or self.UNIT, "-o", "json", "--no-pager"]
        if after:
            cmd.append(f"--after-cursor={after}")
        out = subprocess.run(cmd, capture_output=True, text=True).stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def journal_text(self, lines: int = 40) -> str:
        return subprocess.run(
            ["journalctl", "-u", self.UNIT, "-n", str(lines), "--no-pager", "-o", "cat"],
            capture_output=True,
            text=True,
        ).stdout

    def messages(self, after: str = "") -> list[str]:
        return [str(e.get("MESSAGE", "")) for e in self.journal(after)]

    def wait_for_message(self, pattern: str, after: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            for m in self.messages(after):
                if rx.search(m):
                    return m
            time.sleep(0.5)
        raise AssertionError(
            f"no journal line matching {pattern!r} within {timeout:.0f} s:\n" + self.journal_text()
        )

    def as_agent(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``cngmrv ARGS`` as the service's user, from the installed venv."""
        cmd = ["setpriv", "--reuid=cngmrv", "--regid=cngmrv", "--init-groups", self.CLI, *args]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if check and r.returncode != 0:
            raise AssertionError(f"cngmrv {' '.join(args)} failed ({r.returncode}):\n{r.stderr}")
        return r

    def batches(self) -> list[bytes]:
        """Every batch in the store, in sequence (the agent must be stopped)."""
        out = Path(tempfile.mkdtemp(prefix="export-", dir="/var/tmp"))
        os.chown(out, pwd.getpwnam("cngmrv").pw_uid, pwd.getpwnam("cngmrv").pw_gid)
        try:
            self.as_agent("export", "--db", str(self.STATE / "store.sqlite"), "--out", str(out))
            files = sorted(out.glob("*.batch"), key=lambda f: int(f.stem))
            return [f.read_bytes() for f in files]
        finally:
            shutil.rmtree(out, ignore_errors=True)

    def verify(self) -> dict[str, Any]:
        """``cngmrv verify --db store --json`` with the device's public key."""
        r = self.as_agent(
            "verify",
            "--db",
            str(self.STATE / "store.sqlite"),
            "--pubkey",
            str(self.STATE / "keys" / "device.pub"),
            "--json",
            check=False,
        )
        if not r.stdout.strip():
            raise AssertionError(f"cngmrv verify printed nothing ({r.returncode}):\n{r.stderr}")
        return json.loads(r.stdout)  # type: ignore[no-any-return]

    def readings(self) -> list[dict[str, Any]]:
        """Every signed reading in the store (the agent must be stopped)."""
        from cngmrv.signed import batch

        out: list[dict[str, Any]] = []
        for raw in self.batches():
            out.extend(batch.parse(raw).payload()["readings"])
        return out

    def events(self) -> list[dict[str, Any]]:
        """Every signed event in the store, oldest first (the agent must be stopped)."""
        from cngmrv.signed import batch

        return [e for raw in self.batches() for e in batch.parse(raw).events()]


def frames_through_the_filters(log: Path) -> int:
    """Frames of a CAN log that the agent's kernel acceptance filters (``can.filters``) pass."""
    import can

    from cngmrv.drivers.can_source import DEFAULT_PGNS, j1939_filters

    filters = j1939_filters(DEFAULT_PGNS)
    n = 0
    with can.LogReader(str(log)) as reader:
        for msg in reader:
            if msg.is_extended_id and any(
                (msg.arbitration_id ^ f["can_id"]) & f["can_mask"] == 0 for f in filters
            ):
                n += 1
    return n


def metrics(port: int = 9108) -> dict[str, float]:
    """The running agent's Prometheus text (``health.port``), as ``name{labels}`` -> value."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def systemd_bench() -> InstalledAgent:
    """The installed agent, or a skip saying what the systemd tests need."""
    import pytest  # here: the module also runs on a bare python3 (``__main__``)

    if os.environ.get("CNGMRV_HIL_SYSTEMD") != "1":
        pytest.skip(
            "needs the agent installed under systemd on a disposable machine: set "
            "CNGMRV_HIL_SYSTEMD=1 (the virtual bench does, make vm-bench)"
        )
    if not Path("/run/systemd/system").is_dir() or os.geteuid() != 0:
        pytest.skip("CNGMRV_HIL_SYSTEMD=1 needs root on a machine whose PID 1 is systemd")
    if (
        not Path(InstalledAgent.CLI).exists()
        or not Path("/etc/systemd/system", InstalledAgent.UNIT).exists()
    ):
        pytest.skip("the agent is not installed as docs/deploy-pi.md says")
    return InstalledAgent()
