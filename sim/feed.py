"""A deterministic in-process feed: the vehicle model straight into a Pipeline, no bus.

For the store benchmark and the crash harness, which need many realistic
readings quickly, in a process that starts in a fraction of a second
(importing python-can alone takes longer).  The frames are the ones the
simulated engine ECU and kit send (J1939 LFE and CCVS encoded with the real
codec, kit STATUS frames through the real kit codec), at the same rates,
handed to :meth:`Pipeline.on_can` and :meth:`Pipeline.on_kit` in time order.
Only the transport (virtual CAN bus, pseudo-terminal) is skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from cngmrv.agent.pipeline import Pipeline
from cngmrv.drivers import j1939, kit_codec
from cngmrv.sim.drive import TICK_S, drive
from cngmrv.sim.kit import STATUS_PERIOD_TICKS, STATUS_PHASE_TICKS
from cngmrv.sim.vehicle import CityBus, CityBusParams, DriveCycle

# The entries of cngmrv.sim.ecu.SCHEDULE the pipeline integrates (pgn, priority,
# period and phase in ticks).  Copied, because that module imports python-can;
# tests/test_crash.py checks they still agree.
SCHEDULE = ((j1939.PGN_LFE, 6, 10, 1), (j1939.PGN_CCVS, 6, 10, 5))


def readings(
    pipeline: Pipeline, duration_s: float, seed: int = 1, t0: float = 1.7e9
) -> Iterator[dict[str, Any]]:
    """Drive ``duration_s`` of a BRT cycle through ``pipeline``; yield each reading as it closes.

    Deterministic for a given seed and ``t0`` (the bus time of the first tick).
    """
    vehicle = CityBus(CityBusParams(), DriveCycle.brt(duration_s, seed))
    ids = {pgn: j1939.make_id(pgn, 0, prio) for pgn, prio, _, _ in SCHEDULE}
    timing = [(pgn, period, phase) for pgn, _, period, phase in SCHEDULE]
    boot_ms = 5000
    for i, s in drive(vehicle, int(round(duration_s / TICK_S)) + 1, speedup=0):
        t = t0 + i * TICK_S
        for pgn, period, phase in timing:
            if i % period == phase % period:
                values = (
                    {"fuel_rate_lph": s.diesel_lph, "instant_economy_kmpl": None}
                    if pgn == j1939.PGN_LFE
                    else {"wheel_speed_kmh": s.speed_kmh}
                )
                pipeline.on_can(t, ids[pgn], j1939.encode(pgn, values))
        if i % STATUS_PERIOD_TICKS == STATUS_PHASE_TICKS:
            frame = kit_codec.encode_status(
                i % 0xFFFF,
                (boot_ms + i * 10) & 0xFFFFFFFF,
                s.mode,
                round(s.tank_bar, 2),
                round(s.gas_temp_c, 1),
                min(s.gas_kgph, 65.534),
            )
            pipeline.on_kit(t, kit_codec.decode_frame(frame[:-1]))
        if i % 10 == 0:
            yield from pipeline.advance()
    yield from pipeline.finish()
