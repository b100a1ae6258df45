"""On the bench: a real kit ECU on a serial port."""

from __future__ import annotations

import time
from typing import Any

from hil_support import ask

from cngmrv.drivers.kit_link import KitSerialSource


def _messages(link: KitSerialSource, seconds: float) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        out.extend(msg for _, msg in link.drain())
        time.sleep(0.05)
    return out


def test_kit_answers_the_handshake_and_streams_status(hil_kit: str) -> None:
    link = KitSerialSource(hil_kit, handshake=True, reconnect_backoff=(0.2, 1.0))
    link.start()
    try:
        msgs = _messages(link, 5.0)
    finally:
        link.stop()
    kinds = [m.get("type") for m in msgs]
    assert "hello" in kinds, (
        f"no HELLO within 5 s of the handshake (got {sorted(set(map(str, kinds)))})"
    )
    hello = next(m for m in msgs if m.get("type") == "hello")
    assert hello.get("kit_id") is not None
    assert kinds.count("status") >= 10, "the kit should send STATUS every 100 ms"
    stats = link.stats
    assert stats["crc_errors"] == 0 and stats["cobs_errors"] == 0, stats


def test_kit_unplug_and_replug_is_survived(hil_kit: str, replug: None) -> None:
    link = KitSerialSource(hil_kit, handshake=True, reconnect_backoff=(0.2, 1.0))
    link.start()
    try:
        assert any(m.get("type") == "status" for m in _messages(link, 3.0))
        ask(f"UNPLUG the kit's adapter ({hil_kit}) now (60 s)")
        _until(lambda: link.stats["connected"] == 0, 60.0, "the link to notice the unplug")
        ask("PLUG the kit's adapter back in (60 s)")
        _until(lambda: link.stats["connected"] == 1, 60.0, "the link to reopen the port")
        msgs = _messages(link, 3.0)
        assert any(m.get("type") == "status" for m in msgs), "no STATUS after the replug"
        assert link.stats["reconnects"] >= 1
    finally:
        link.stop()


def _until(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
