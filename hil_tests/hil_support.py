"""What the bench tests share (a module of its own: ``conftest`` is a name every test folder uses)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path


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
