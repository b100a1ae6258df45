"""Bench (hardware-in-the-loop) tests: selected by environment variables.

CNGMRV_HIL_CAN      a SocketCAN interface with a live J1939 engine or a CAN
                    generator on it (e.g. can0).  Unset, a kernel ``vcan0`` is
                    used when one exists, with the simulated engine feeding it.
CNGMRV_HIL_KIT      the kit's serial port (e.g. /dev/ttyUSB0 or /dev/cngmrv-kit), or
                    "sim": the simulated kit firmware on a pseudo-terminal
CNGMRV_HIL_REPLUG   set to 1 to run the unplug/replug tests: they ask a person
                    to pull and reconnect the adapter (run pytest with -s)

Each test skips, saying which variable it needs, when the hardware is absent.
See docs/hil-runbook.md for the wiring and what a pass looks like.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hil_support import CanBench, EngineFeed


def _is_vcan(name: str) -> bool:
    # A vcan has no device behind it; its link type is ARPHRD_CAN (280) like a real one.
    return not os.path.exists(f"/sys/class/net/{name}/device")


@pytest.fixture
def hil_can() -> str:
    return _can_bench().name


@pytest.fixture
def can_bench() -> CanBench:
    return _can_bench()


def _can_bench() -> CanBench:
    name = os.environ.get("CNGMRV_HIL_CAN")
    if not name:
        if os.path.exists("/sys/class/net/vcan0"):
            return CanBench("vcan0", virtual=True)
        pytest.skip(
            "no CAN hardware: set CNGMRV_HIL_CAN=can0 to run bench CAN tests "
            "(or create a kernel vcan0 to run them on virtual SocketCAN)"
        )
    if not os.path.exists(f"/sys/class/net/{name}"):
        pytest.skip(f"CNGMRV_HIL_CAN={name} but no such network interface on this machine")
    return CanBench(name, virtual=_is_vcan(name))


@pytest.fixture
def engine_feed(can_bench: CanBench) -> Iterator[EngineFeed]:
    """On a vcan, the simulated engine broadcasting in real time; on hardware, the engine itself."""
    feed = EngineFeed(can_bench.virtual)
    if not can_bench.virtual:
        yield feed
        return
    import can

    from cngmrv.sim.drive import drive
    from cngmrv.sim.ecu import EngineEcu
    from cngmrv.sim.vehicle import CityBus, CityBusParams, DriveCycle

    stop = threading.Event()
    bus = _ReopeningBus(can_bench.name)

    def run() -> None:
        vehicle = CityBus(CityBusParams(), DriveCycle.brt(3600.0, 1))
        ecu = EngineEcu(bus, vehicle, time.time())
        for i, s in drive(vehicle, stop=stop):
            with feed.lock:
                try:
                    ecu.tick(i, s)
                except (can.CanError, OSError):
                    # The interface is down or gone (the tests do that on purpose): the
                    # engine goes on talking, and its frames reach the bus once it is back.
                    pass
                feed.sent = ecu.frames_sent
            feed.flowing.set()

    thread = threading.Thread(target=run, name="vcan-engine", daemon=True)
    thread.start()
    try:
        yield feed
    finally:
        stop.set()
        thread.join()
        bus.shutdown()


class _ReopeningBus:
    """The simulated engine's socket: opened again after its interface was deleted and recreated.

    A socket stays bound to the interface index it was opened on, so after
    ``ip link delete`` it can never send again; a new one is opened on the next send.
    """

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.bus: Any = None

    def send(self, msg: Any) -> None:
        import can

        if self.bus is None:
            self.bus = can.Bus(interface="socketcan", channel=self.channel)
        try:
            self.bus.send(msg)
        except (can.CanError, OSError):
            self.shutdown()
            raise

    def shutdown(self) -> None:
        if self.bus is not None:
            self.bus.shutdown()
            self.bus = None


@pytest.fixture
def hil_kit() -> Iterator[str]:
    port = os.environ.get("CNGMRV_HIL_KIT")
    if not port:
        pytest.skip(
            "no kit on the bench: set CNGMRV_HIL_KIT=/dev/ttyUSB0 to run kit tests "
            "(or CNGMRV_HIL_KIT=sim for the simulated kit on a pseudo-terminal)"
        )
    if port == "sim":
        yield from _simulated_kit()
        return
    if not os.path.exists(port):
        pytest.skip(f"CNGMRV_HIL_KIT={port} but no such port (is the adapter plugged in?)")
    yield port


def _simulated_kit() -> Iterator[str]:
    """The simulated kit firmware in real time behind a pty: the port's path.

    It is the same firmware ``cngmrv sim`` runs, answering the agent's HELLO,
    so the kit tests exercise the serial reader on a real tty (the virtual
    bench runs them this way; a pty is what the guest's kernel offers).
    """
    import tty

    from cngmrv.sim.drive import drive
    from cngmrv.sim.kit import KitFirmware
    from cngmrv.sim.vehicle import CityBus, CityBusParams, DriveCycle

    master, slave = os.openpty()
    tty.setraw(slave)  # the kit's bytes must pass the line discipline unchanged
    stop = threading.Event()

    def run() -> None:
        vehicle = CityBus(CityBusParams(), DriveCycle.brt(3600.0, 1))
        firmware = KitFirmware(master)
        for i, s in drive(vehicle, stop=stop):
            firmware.tick(i, s)

    thread = threading.Thread(target=run, name="pty-kit", daemon=True)
    thread.start()
    try:
        yield os.ttyname(slave)
    finally:
        stop.set()
        thread.join(5.0)
        os.close(master)
        os.close(slave)


@pytest.fixture
def replug() -> None:
    if os.environ.get("CNGMRV_HIL_REPLUG") != "1":
        pytest.skip(
            "needs a person at the bench: set CNGMRV_HIL_REPLUG=1 and run pytest -s "
            "to be asked to unplug and replug the adapter"
        )
