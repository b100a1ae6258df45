"""Bench (hardware-in-the-loop) tests: selected by environment variables.

CNGMRV_HIL_CAN      a SocketCAN interface with a live J1939 engine or a CAN
                    generator on it (e.g. can0)
Each test skips, saying which variable it needs, when the hardware is absent.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def hil_can() -> str:
    name = os.environ.get("CNGMRV_HIL_CAN")
    if not name:
        pytest.skip("no CAN hardware: set CNGMRV_HIL_CAN=can0 to run bench CAN tests")
    if not os.path.exists(f"/sys/class/net/{name}"):
        pytest.skip(f"CNGMRV_HIL_CAN={name} but no such network interface on this machine")
    return name
