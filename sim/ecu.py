"""The simulated engine ECU: broadcasts J1939 at the real rates onto a python-can bus.

Frames are stamped with simulated time (``epoch0 + t``) and sent on a bus
opened with ``preserve_timestamps=True``, so the receiving agent sees the same
timestamps a kernel would have given them on a real bus, however fast the
simulation runs.
"""

from __future__ import annotations

import can

from cngmrv.drivers import j1939
from cngmrv.sim.drive import TICK_S
from cngmrv.sim.vehicle import CityBus, State

# (pgn, priority, period in ticks, phase in ticks).  The phases spread the
# 1 s messages so they do not all land in the same tick, as on a real bus.
SCHEDULE = (
    (j1939.PGN_EEC1, 3, 2, 0),
    (j1939.PGN_LFE, 6, 10, 1),
    (j1939.PGN_CCVS, 6, 10, 5),
    (j1939.PGN_LFC, 6, 100, 20),
    (j1939.PGN_VDHR, 6, 100, 40),
    (j1939.PGN_ET1, 6, 100, 60),
)


class EngineEcu:
    """Sends the engine's broadcast messages for one simulation tick at a time."""

    def __init__(
        self,
        bus: can.BusABC,
        vehicle: CityBus,
        epoch0: float,
        source: int = 0,
        fuel_counter_l: float = 123456.0,
        odometer_km: float = 250000.0,
    ) -> None:
        self._bus = bus
        self._vehicle = vehicle
        self._epoch0 = epoch0
        self._fuel0 = fuel_counter_l
        self._odo0 = odometer_km
        self._ids = {pgn: j1939.make_id(pgn, source, prio) for pgn, prio, _, _ in SCHEDULE}
        self.frames_sent = 0

    def _values(self, pgn: int, s: State) -> dict[str, float | None]:
        v = self._vehicle
        if pgn == j1939.PGN_EEC1:
            return {"engine_speed_rpm": s.rpm, "actual_torque_pct": round(100 * s.load)}
        if pgn == j1939.PGN_LFE:
            return {"fuel_rate_lph": s.diesel_lph, "instant_economy_kmpl": None}
        if pgn == j1939.PGN_CCVS:
            return {"wheel_speed_kmh": s.speed_kmh}
        if pgn == j1939.PGN_LFC:
            return {"trip_fuel_l": v.truth_diesel_l, "total_fuel_l": self._fuel0 + v.truth_diesel_l}
        if pgn == j1939.PGN_VDHR:
            return {
                "total_distance_km": self._odo0 + v.truth_distance_km,
                "trip_distance_km": v.truth_distance_km,
            }
        return {"coolant_temp_c": 85.0}

    def frames_due(self, i: int, s: State) -> list[tuple[float, int, bytes]]:
        """Every message due at tick ``i`` (time ``i * TICK_S``) as ``(t, can_id, data)``."""
        t = self._epoch0 + i * TICK_S
        out = [
            (t, self._ids[pgn], j1939.encode(pgn, self._values(pgn, s)))
            for pgn, _, period, phase in SCHEDULE
            if i % period == phase % period
        ]
        self.frames_sent += len(out)
        return out

    def tick(self, i: int, s: State) -> None:
        """Send every message due at tick ``i`` straight onto the bus, stamped with its tick time."""
        for t, can_id, data in self.frames_due(i, s):
            self._bus.send(
                can.Message(timestamp=t, arbitration_id=can_id, is_extended_id=True, data=data)
            )
