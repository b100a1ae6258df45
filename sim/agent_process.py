"""The agent as its own process (``cngmrv run``), watched from outside as an operator would.

Its CPU time and memory come from ``/proc``, so they are the agent's alone,
not shared with the simulator; its counters come from its health endpoint
and, after it stops, from its ``event=agent_stopped`` log line.  Linux only
(``/proc``).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from cngmrv.agent import health

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1
# Looked up here, not in the forked child: only the call itself runs there.
_prctl = ctypes.CDLL(None, use_errno=True).prctl

#: The multicast group a simulated bus uses across processes.
MCAST_GROUP = "239.74.163.9"


def new_mcast_port() -> int:
    """A port for one simulated bus of its own.

    ``udp_multicast`` binds 0.0.0.0:port, so every receiver on the host that
    joined any group on the same port would hear this bus's frames; a random
    port in 40000-59999 keeps concurrent runs apart.
    """
    return 40000 + uuid.uuid4().int % 20000


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for a child to bind.

    Another process may take it in between; a child that then fails to bind
    says so and exits, and the run fails loudly rather than quietly.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def die_with_parent() -> None:
    """``preexec_fn`` for a child that must not outlive this process (SIGTERM when it dies).

    A killed benchmark would otherwise leave its agent, or its bare receiver,
    reading an empty bus for ever.
    """
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def parse_kv(line: str) -> dict[str, str]:
    """The ``key=value`` pairs of one of the agent's log lines (values never hold spaces)."""
    out = {}
    for part in line.split():
        k, sep, v = part.partition("=")
        if sep:
            out[k] = v.strip("'\"")
    return out


class AgentProcess:
    """``cngmrv run --config CONFIG`` in a child process, with its stdout collected.

    ``env`` is added to this process's environment (python-can reads bus
    options such as a ``udp_multicast`` port from ``CAN_CONFIG``); ``python``
    is the interpreter (default: this one), whose environment must have
    cngmrv installed.
    """

    def __init__(
        self,
        config: Path,
        health_port: int | None = None,
        env: Mapping[str, str] | None = None,
        python: str | None = None,
    ) -> None:
        self.health_port = health_port
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.proc = subprocess.Popen(
            [python or sys.executable, "-m", "cngmrv.agent.cli", "run", "--config", str(config)],
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=die_with_parent,
        )
        self._reader = threading.Thread(target=self._read, name="agent-stdout", daemon=True)
        self._reader.start()
        self.returncode: int | None = None
        # VmHWM as last read while it ran.  Not the rusage of wait4: Linux
        # starts a child's ru_maxrss at its parent's peak, and exec keeps it.
        self.peak_rss_mb = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        """True until the process has exited (safe from any thread: Popen reaps it once)."""
        return self.proc.poll() is None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if "event=ready" in line:
                self._ready.set()
        self._ready.set()  # it exited: wait_ready reports how

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait for the agent's ``event=ready`` line; raises with its output if it never comes."""
        if not self._ready.wait(timeout) or self.proc.poll() is not None:
            self.proc.kill()
            tail = "\n".join(self.lines[-20:])
            raise RuntimeError(f"sim: the agent process did not start:\n{tail}")

    def cpu_seconds(self) -> float:
        """User plus system CPU time the agent has used so far, all its threads."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK

    def memory_mb(self) -> dict[str, float]:
        """Resident set now (``rss``) and at its peak so far (``peak``), in MB (10^6 bytes).

        Raises ``ProcessLookupError`` once the process has exited (a zombie has
        no memory lines).
        """
        out = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out["rss" if key == "VmRSS" else "peak"] = int(value.split()[0]) * 1024 / 1e6
        if "rss" not in out:
            raise ProcessLookupError(f"process {self.pid} has exited")
        self.peak_rss_mb = max(self.peak_rss_mb, out.get("peak", 0.0))
        return out

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def metrics(self) -> dict[str, float]:
        """The health endpoint's samples (see :mod:`cngmrv.agent.health`)."""
        if self.health_port is None:
            raise ValueError("this agent was started without a health port")
        return health.fetch(self.health_port)

    def settle(self, frames: int, timeout: float = 30.0) -> dict[str, float]:
        """Wait until the agent has read ``frames`` CAN frames or its count stops moving.

        Returns the last metrics sample.  The health snapshot is refreshed by
        the agent's main loop about once a second, so a count that has not
        moved for three seconds is final.
        """
        deadline = time.monotonic() + timeout
        last, still_since = -1.0, time.monotonic()
        m: dict[str, float] = {}
        while True:
            try:
                m = self.metrics()
            except OSError:  # one slow answer under load must not end the run
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
                continue
            got = m.get('cngmrv_frames_received_total{source="can"}', 0.0)
            if got >= frames:
                return m
            if got != last:
                last, still_since = got, time.monotonic()
            if time.monotonic() - still_since > 3.0 or time.monotonic() > deadline:
                return m
            time.sleep(0.2)

    def stop(self, timeout: float = 60.0) -> dict[str, str]:
        """SIGTERM, wait, and return the fields of its ``event=agent_stopped`` line."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        killed = False
        while self.proc.poll() is None:
            try:
                self.memory_mb()  # the shutdown's peak too, up to its last 10 ms
            except (OSError, ValueError):
                pass  # exiting: /proc/PID/status is gone or half-written
            if time.monotonic() > deadline:
                if killed:
                    raise RuntimeError(f"the agent process {self.pid} survives SIGKILL")
                self.proc.kill()
                killed, deadline = True, time.monotonic() + 5.0
            time.sleep(0.01)
        self.returncode = self.proc.returncode
        self._reader.join(5.0)
        for line in reversed(self.lines):
            if "event=agent_stopped" in line:
                return parse_kv(line)
        return {}
