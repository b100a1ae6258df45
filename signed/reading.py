"""The reading: what one window of signed data holds, shared by the agent and the office.

The agent's windowing writes readings (``cngmrv.agent.pipeline``), the
recorder signs them in batches, and the office sums them
(``cngmrv.office.report``, ``cngmrv.office.monitored``).  This module is the
contract between the two sides: the field names and what each means
(:data:`FIELDS`, the table in docs/integrator.md), the channels the report
sums and floors (:data:`CHANNELS`), the kit's modes (:data:`MODES`), and
:func:`problem`, the one check of a reading's shape.

Limits: :func:`problem` checks what the office relies on (the required
fields, their types and signs), not the physics; a reading may carry fields
this version does not know (a newer agent's), which are ignored, never an
error, so an older office still sums a newer bus's batches.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

#: The integrated channels the report sums and whose coverage it floors.
CHANNELS = ("diesel_l", "gas_kg", "distance_km")

#: The kit's modes, as ``mode_s`` names them (the kit codec's codes 0, 1, 2).
MODES = ("diesel", "dual", "fault")

#: ``clock`` of a reading timed by a clock known to be synchronised.
SYNCHRONISED = "synchronised"

#: Every field a reading has or may have, and what it means (docs/integrator.md).
FIELDS: Mapping[str, str] = MappingProxyType(
    {
        "t0": "window start, epoch s",
        "dur": "window length, s",
        "epoch": "boot epoch of the device",
        "clock": "clock quality of the window's times (synchronised or not)",
        "diesel_l": "diesel integrated from the fuel rate, L",
        "gas_kg": "gas integrated from the kit's flow, kg",
        "gas_kg_events": "gas from injection events, kg (cross-check of gas_kg)",
        "distance_km": "distance integrated from wheel speed, km",
        "engine_rev": "engine revolutions",
        "energy_mj": "indicative energy per fuel, MJ (never used by the report)",
        "gas_share": "indicative gas share of the energy",
        "co2_kg": "indicative CO2 per fuel, kg (never used by the report)",
        "cov": "covered seconds per channel",
        "gaps": "per channel [gaps, longest gap s], where any",
        "mode_s": "seconds per kit mode, with other",
        "idle_s": "seconds idling",
        "engine_on_s": "seconds with the engine running",
        "src": "source address of each CAN signal at the window's end",
        "tank_kg": "tank gas mass at the window's last valid tank reading, kg",
        "refuel_kg": "refuelled mass in the window, kg",
        "refuels": "refuels started in the window",
        "lfc_total_l": "the engine's total-fuel counter (LFC), L",
        "odometer_km": "the odometer (VDHR or VD), km",
        "extra": "mean of each DBC signal over the window",
        "kit_down_s": "seconds the kit link was down",
        "kit_faults": "OR of the kit's fault bitmaps",
        "kit_suspect": "sensors the kit's data made suspect",
    }
)

#: The fields every reading carries, numbers unless said otherwise.
REQUIRED = ("t0", "dur", "diesel_l", "gas_kg", "distance_km")


def _number(v: Any) -> bool:
    if type(v) is float:  # the common case, checked for every field of every reading
        return math.isfinite(v)
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def problem(r: Any) -> str | None:
    """Why ``r`` is not a reading the office can sum, or None if it is one."""
    # Run for every reading the office sums: plain dicts and floats (what msgpack gives)
    # are answered without the ABC checks, to the same verdicts.
    if type(r) is not dict and not isinstance(r, Mapping):
        return f"a reading is a map, not {type(r).__name__}"
    for name in REQUIRED:
        if name not in r:
            return f"reading has no {name!r}"
        v = r[name]
        if not (math.isfinite(v) if type(v) is float else _number(v)):
            return f"reading's {name!r} is not a finite number: {v!r}"
    if r["dur"] < 0:
        return f"reading's 'dur' is negative: {r['dur']!r}"
    for name in ("cov", "mode_s", "gaps"):
        v = r.get(name)
        if v is not None and type(v) is not dict and not isinstance(v, Mapping):
            return f"reading's {name!r} is not a map"
    for ch, s in (r.get("cov") or {}).items():
        if not _number(s) or s < 0:
            return f"reading's cov[{ch!r}] is not a number >= 0: {s!r}"
    return None
