"""Kit serial link against a real pseudo-terminal (the kit end is the pty master)."""

from __future__ import annotations

import logging
import os
import time
import tty
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cngmrv.drivers import kit_codec as kc
from cngmrv.drivers.kit_link import KitSerialSource

pytestmark = pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs POSIX ptys")


class Pty:
    """A pty pair; the test writes as the kit on the master side."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        # Raw, so the line discipline passes 0x00, CR and LF through unchanged.
        tty.setraw(self.slave)
        self.name = os.ttyname(self.slave)

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def close(self) -> None:
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def make_pty() -> Iterator[Callable[[], Pty]]:
    ptys: list[Pty] = []

    def make() -> Pty:
        ptys.append(Pty())
        return ptys[-1]

    yield make
    for p in ptys:
        p.close()


def wait_for(cond: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def status(seq: int) -> bytes:
    return kc.encode_status(seq, 100 * seq, kc.MODE_DUAL, 150.0 + seq, 18.5, 9.876)


def fast_source(port: str, queue_size: int = 100, handshake: bool = True) -> KitSerialSource:
    return KitSerialSource(
        port,
        read_timeout=0.05,
        queue_size=queue_size,
        reconnect_backoff=(0.05, 0.2),
        handshake=handshake,
    )


def must_get_any(src: KitSerialSource) -> tuple[float, dict]:
    item = src.get(timeout=2.0)
    assert item is not None, "no message within 2 s"
    return item


def must_get(src: KitSerialSource, markers: list[dict] | None = None) -> tuple[float, dict]:
    """The next kit message; link markers on the way are appended to ``markers``."""
    while True:
        item = must_get_any(src)
        if item[1]["type"] != "link":
            return item
        if markers is not None:
            markers.append(item[1])


def read_master(kit: Pty, timeout: float = 2.0) -> bytes:
    """What the agent wrote to the kit."""
    import select

    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not out.endswith(b"\x00"):
        if select.select([kit.master], [], [], 0.05)[0]:
            out += os.read(kit.master, 4096)
    return out


def stop_quickly(src: KitSerialSource) -> float:
    t0 = time.monotonic()
    src.stop()
    elapsed = time.monotonic() - t0
    assert src._thread is not None and not src._thread.is_alive()
    return elapsed


def test_messages_arrive_from_pty(make_pty: Callable[[], Pty]) -> None:
    kit = make_pty()
    src = fast_source(kit.name)
    src.start()
    try:
        # pyserial flushes the input buffer on open, so wait for the open.
        wait_for(lambda: src.stats["connected"] == 1)
        assert must_get_any(src)[1] == {"type": "link", "state": "up", "port": kit.name}
        # The handshake: the agent's HELLO, role agent, its protocol version.
        hello = kc.FrameDecoder().feed(read_master(kit))
        assert [(m["type"], m["role"], m["max_version"]) for m in hello] == [
            ("hello", kc.ROLE_AGENT, kc.PROTOCOL_VERSION)
        ]
        t_before = time.monotonic()
        kit.write(b"\x00noise\r\n\x00" + status(0) + status(1) + b"\xff\xfe\x00" + status(2))
        got = [must_get(src) for _ in range(3)]
        assert [m["seq"] for _, m in got] == [0, 1, 2]
        assert got[0][1]["tank_bar"] == 150.0
        assert all(t_before <= t <= time.monotonic() for t, _ in got)
        assert src.get(timeout=0.05) is None
        stats = src.stats
        assert stats["frames_ok"] == 3
        assert stats["cobs_errors"] + stats["crc_errors"] == 2
        assert stats["bytes_discarded"] == len(b"noise\r\n") + 2
        assert (stats["outages"], stats["reconnects"], stats["queue_dropped"]) == (0, 0, 0)
        assert [text for _, text in src.events] == [f"connected: {kit.name}"]
    finally:
        assert stop_quickly(src) < 1.0


def test_full_queue_drops_newest(make_pty: Callable[[], Pty]) -> None:
    kit = make_pty()
    src = fast_source(kit.name, queue_size=3, handshake=False)
    with src:
        wait_for(lambda: src.stats["connected"] == 1)
        kit.write(b"".join(status(s) for s in range(5)))
        wait_for(lambda: src.stats["frames_ok"] == 5)
        # The connect marker took the first place in the queue.
        assert [m.get("seq", m["type"]) for _, m in src.drain()] == ["link", 0, 1]
        assert src.stats["queue_dropped"] == 3
        assert any(text.startswith("queue full") for _, text in src.events)
        kit.write(status(5))
        assert must_get(src)[1]["seq"] == 5
        assert any(text.startswith("queue accepting again") for _, text in src.events)


def test_waits_for_port_reconnects_and_survives_unplug(
    tmp_path: Path, make_pty: Callable[[], Pty], caplog: pytest.LogCaptureFixture
) -> None:
    link = tmp_path / "ttyKIT"
    src = KitSerialSource(str(link), read_timeout=0.05, reconnect_backoff=(0.02, 0.1))
    caplog.set_level(logging.DEBUG, logger="cngmrv.kit")
    seen: list[dict] = []
    src.start()
    try:
        # The port does not exist yet: one outage, however many retries.
        wait_for(lambda: src.stats["outages"] == 1)
        time.sleep(0.3)
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "cannot open" in warnings[0].getMessage()
        assert src.stats["outages"] == 1 and src.stats["connected"] == 0

        # The device appears (udev symlink style).
        kit = make_pty()
        link.symlink_to(kit.name)
        wait_for(lambda: src.stats["connected"] == 1)
        kit.write(status(0) + status(1))
        assert [must_get(src, seen)[1]["seq"] for _ in range(2)] == [0, 1]
        assert src.stats["reconnects"] == 1

        # Unplugged: the kit side goes away.
        kit.close()
        # The reader thread counts the outage before it marks the link down.
        wait_for(lambda: src.stats["outages"] == 2 and src.stats["connected"] == 0)

        # Plugged in again, as a different device behind the same name.
        kit2 = make_pty()
        tmp_link = tmp_path / "ttyKIT.new"
        tmp_link.symlink_to(kit2.name)
        tmp_link.replace(link)
        wait_for(lambda: src.stats["connected"] == 1)
        kit2.write(status(5))
        assert must_get(src, seen)[1]["seq"] == 5
        stats = src.stats
        assert (stats["outages"], stats["reconnects"]) == (2, 2)
        assert stats["dropped_frames"] == 3  # seq 2..4 were never received

        seen += [m for _, m in src.drain()]
        markers = [(m["state"], m.get("reason", "")) for m in seen if m["type"] == "link"]
        assert [state for state, _ in markers] == ["down", "up", "down", "up"]
        assert "cannot open" in markers[0][1] and "lost" in markers[2][1]

        texts = [text for _, text in src.events]
        assert texts[0].startswith("outage:") and "cannot open" in texts[0]
        assert texts[1].startswith("reconnected:")
        assert texts[2].startswith("outage:") and "lost" in texts[2]
        assert texts[3].startswith("reconnected:")
        times = [t for t, _ in src.events]
        assert times == sorted(times)
    finally:
        assert stop_quickly(src) < 1.0


def test_stop_is_prompt_during_long_backoff(tmp_path: Path) -> None:
    src = KitSerialSource(str(tmp_path / "absent"), reconnect_backoff=(30.0, 60.0))
    src.start()
    wait_for(lambda: src.stats["outages"] == 1)
    assert stop_quickly(src) < 0.5


def test_stop_is_prompt_while_reading(make_pty: Callable[[], Pty]) -> None:
    kit = make_pty()
    # A long read timeout: stop() must not wait for it to expire.
    src = KitSerialSource(kit.name, read_timeout=5.0)
    src.start()
    wait_for(lambda: src.stats["connected"] == 1)
    time.sleep(0.05)
    assert stop_quickly(src) < 0.5


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        KitSerialSource("/dev/null", reconnect_backoff=(0.0, 1.0))
    with pytest.raises(ValueError):
        KitSerialSource("/dev/null", reconnect_backoff=(2.0, 1.0))
    with pytest.raises(ValueError):
        KitSerialSource("/dev/null", queue_size=0)
