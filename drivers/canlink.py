"""The kernel's view of a SocketCAN interface: up or down, controller state, drop counters.

python-can's socketcan bus always reports its state as "active", and a
controller in bus-off or an interface taken down just goes quiet.  The kernel
knows better; this module asks it through ``ip -details -statistics -json
link show dev NAME`` (iproute2, any user may run it), and falls back to
``/sys/class/net/NAME`` when ``ip`` is missing or too old for JSON.

:func:`parse_ip_link` is pure and tested on handwritten ``ip`` output;
:func:`read_link` does the I/O.  Neither raises for a missing interface: the
result says ``exists=False``, which is a state like any other (the USB adapter
was unplugged).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["LinkState", "parse_ip_link", "read_link", "read_sysfs"]

BAD_STATES = frozenset({"BUS-OFF", "STOPPED", "SLEEPING"})

# Kernel counters worth carrying into the agent's stats: drops before python-can
# ever sees a frame (socket or controller FIFO overflow) and error-state history.
_RX_COUNTERS = ("dropped", "over_errors", "errors", "fifo_errors", "missed_errors")
_XSTATS = ("restarts", "bus_error", "arbitration_lost", "error_warning", "error_passive", "bus_off")


class LinkState(NamedTuple):
    """One reading of an interface's state.

    ``can_state`` is the controller state (``ERROR-ACTIVE``, ``ERROR-WARNING``,
    ``ERROR-PASSIVE``, ``BUS-OFF``, ``STOPPED``, ``SLEEPING``) or ``None`` when
    the kernel does not report one (virtual ``vcan``, or the ``/sys`` fallback).
    ``listen_only`` is ``None`` when unknown.  ``counters`` holds the kernel's
    receive drop/error counters and error-state transitions, as reported.
    """

    name: str
    exists: bool
    up: bool
    can_state: str | None = None
    listen_only: bool | None = None
    bitrate: int | None = None
    restart_ms: int | None = None
    counters: dict[str, int] = {}
    source: str = "ip"

    @property
    def ok(self) -> bool:
        """True when frames can be received: present, up, and not bus-off/stopped."""
        return self.exists and self.up and self.can_state not in BAD_STATES

    @property
    def reason(self) -> str:
        """Why the link is not :attr:`ok` (empty when it is)."""
        if not self.exists:
            return f"interface {self.name} does not exist"
        if not self.up:
            return f"interface {self.name} is down"
        if self.can_state in BAD_STATES:
            return f"interface {self.name} is {self.can_state}"
        return ""


def parse_ip_link(text: str, name: str) -> LinkState:
    """Parse ``ip -details [-statistics] -json link show dev NAME`` output.

    Empty output (``ip`` prints nothing and fails for a missing device) means
    the interface does not exist.  Raises ``ValueError`` for output that is not
    the JSON ``ip`` prints.
    """
    if not text.strip():
        return LinkState(name, exists=False, up=False)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"ip output is not JSON: {e}") from None
    if not isinstance(doc, list):
        raise ValueError("ip output is not a JSON list")
    entry: dict[str, Any] | None = next(
        (e for e in doc if isinstance(e, dict) and e.get("ifname") == name), None
    )
    if entry is None:
        return LinkState(name, exists=False, up=False)
    flags = entry.get("flags") or []
    operstate = entry.get("operstate", "UNKNOWN")
    # vcan reports operstate UNKNOWN while up; only an explicit DOWN or a missing
    # UP flag means down.
    up = "UP" in flags and operstate != "DOWN"
    linkinfo = entry.get("linkinfo") or {}
    data = linkinfo.get("info_data") or {}
    xstats = linkinfo.get("info_xstats") or {}
    rx = (entry.get("stats64") or entry.get("stats") or {}).get("rx") or {}
    counters = {f"rx_{k}": int(rx[k]) for k in _RX_COUNTERS if isinstance(rx.get(k), int)}
    counters.update({k: int(xstats[k]) for k in _XSTATS if isinstance(xstats.get(k), int)})
    ctrlmode = data.get("ctrlmode")
    bitrate = (data.get("bittiming") or {}).get("bitrate")
    restart = data.get("restart_ms")
    state = data.get("state")
    return LinkState(
        name,
        exists=True,
        up=up,
        can_state=state if isinstance(state, str) else None,
        listen_only=("LISTEN-ONLY" in ctrlmode) if isinstance(ctrlmode, list) else None,
        bitrate=bitrate if isinstance(bitrate, int) else None,
        restart_ms=restart if isinstance(restart, int) else None,
        counters=counters,
        source="ip",
    )


def read_sysfs(name: str, root: Path = Path("/sys/class/net")) -> LinkState:
    """The fallback: presence, up/down and drop counters from ``/sys`` (no controller state)."""
    base = root / name
    if not base.is_dir():
        return LinkState(name, exists=False, up=False, source="sysfs")
    try:
        flags = int((base / "flags").read_text().strip(), 16)
        operstate = (base / "operstate").read_text().strip()
    except (OSError, ValueError):
        return LinkState(name, exists=False, up=False, source="sysfs")
    counters: dict[str, int] = {}
    for k in ("rx_dropped", "rx_over_errors", "rx_errors", "rx_fifo_errors", "rx_missed_errors"):
        try:
            counters[k] = int((base / "statistics" / k).read_text())
        except (OSError, ValueError):
            continue
    return LinkState(
        name,
        exists=True,
        up=bool(flags & 1) and operstate != "down",
        counters=counters,
        source="sysfs",
    )


def read_link(name: str, timeout: float = 2.0) -> LinkState:
    """Ask the kernel for ``name``'s state: ``ip`` if available, else ``/sys``."""
    ip = shutil.which("ip")
    if ip is None:
        return read_sysfs(name)
    try:
        r = subprocess.run(
            [ip, "-details", "-statistics", "-json", "link", "show", "dev", name],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return read_sysfs(name)
    if r.returncode != 0:
        # "Device "can0" does not exist." (exit 1) and an iproute2 without -json look alike
        # here; /sys tells the two apart.
        return read_sysfs(name)
    try:
        return parse_ip_link(r.stdout, name)
    except ValueError:
        return read_sysfs(name)
