"""On the bench: the agent's CAN source on a real SocketCAN interface."""

from __future__ import annotations

import time

from cngmrv.drivers import j1939
from cngmrv.drivers.can_source import CanSource, open_bus


def test_receives_and_decodes_engine_speed(hil_can: str) -> None:
    source = CanSource(open_bus("socketcan", hil_can, listen_only=True))
    source.start()
    deadline = time.monotonic() + 5.0
    rpm: list[float | None] = []
    while time.monotonic() < deadline and len(rpm) < 10:
        for _, can_id, data, _mono in source.wait(0.5):
            if j1939.parse_id(can_id).pgn == j1939.PGN_EEC1:
                rpm.append(j1939.decode(j1939.PGN_EEC1, data)["engine_speed_rpm"])
    source.stop()
    assert source.error is None
    assert len(rpm) >= 10, "no EEC1 frames within 5 s: is the engine (or generator) on the bus?"
    assert all(v is None or 0 <= v <= 8031.875 for v in rpm)
