"""Checks of single config values, shared by the core's sections and the sources' own.

Each takes a value of the key's declared type and returns the reason it is
bad, or None; :func:`cngmrv.agent.config.from_mapping` puts the key's full
name in front of the reason.
"""

from __future__ import annotations

from typing import Any

from cngmrv.agent.source import Check


def positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def nonnegative(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


def address(v: Any) -> str | None:
    return None if 0 <= v <= 253 else "must be a J1939 source address 0..253"


def nonempty(v: Any) -> str | None:
    return None if v.strip() else "must not be empty"


def j1939_name(v: Any) -> str | None:
    # TOML integers are signed 64-bit and a NAME may use all 64 bits, so it is hex text.
    if v == "":
        return None
    try:
        n = int(v, 16)
    except ValueError:
        return "must be a J1939 NAME in hex (up to 16 digits)"
    return None if 0 <= n < 1 << 64 and len(v.removeprefix("0x")) <= 16 else "must fit in 64 bits"


def one_of(*allowed: str) -> Check:
    def check(v: Any) -> str | None:
        return None if v in allowed else "must be one of " + ", ".join(repr(a) for a in allowed)

    return check
