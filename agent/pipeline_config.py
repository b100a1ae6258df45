"""What the deterministic core is configured with and counts: its tunables, its
counters, and the names of the integrator channels the sources feed.

Shared by the decoders (:mod:`cngmrv.agent.decode_j1939`, :mod:`cngmrv.agent.decode_kit`),
the windowing (:mod:`cngmrv.agent.window`) and the :class:`~cngmrv.agent.pipeline.Pipeline`
that joins them; no I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from cngmrv.drivers.address import SourceRule
from cngmrv.drivers.kit_codec import MODE_DIESEL, MODE_DUAL, MODE_FAULT

log = logging.getLogger("cngmrv.pipeline")

PER_HOUR = 1.0 / 3600.0
PER_MINUTE = 1.0 / 60.0
KELVIN = 273.15
ATMOSPHERE_BAR = 1.01325
MODE_NAMES = {MODE_DIESEL: "diesel", MODE_DUAL: "dual", MODE_FAULT: "fault"}
# The integrator's state codes are indices into these names; kit codes are used as-is.
MODE_STATES = tuple(MODE_NAMES[code] for code in sorted(MODE_NAMES))
assert sorted(MODE_NAMES) == list(range(len(MODE_NAMES))), "kit mode codes must be 0..n-1"
ENGINE_STATES = ("off", "idle", "moving")
ENGINE_OFF, ENGINE_IDLE, ENGINE_MOVING = 0, 1, 2
# A kit tick this far behind the last one is a restart, not reordering.
KIT_REBOOT_BACKSTEP_MS = 1000


@dataclass(frozen=True)
class FuelFactors:
    """Energy and CO2 factors, passed to the integrator (never built into it).

    Defaults are IPCC 2006 Vol. 2 (docs/domain.md section 2). Indonesian diesel is
    a biodiesel blend (B40 since 2025), so a project sets its own diesel values.
    """

    diesel_density_kg_per_l: float = 0.844
    diesel_ncv_mj_per_kg: float = 43.0
    diesel_co2_kg_per_tj: float = 74100.0
    gas_ncv_mj_per_kg: float = 48.0
    gas_co2_kg_per_tj: float = 56100.0


@dataclass(frozen=True)
class GasCalibration:
    """Per-kit constants for the event-based and tank-based gas figures.

    The defaults are assumptions, not measurements: ``injector_k`` and
    ``injector_dead_time_ms`` must be calibrated per injector model (mass per
    event is ``k * (pulse - dead_time) * P / sqrt(T)``, in kg with pulse in
    ms, P in bar absolute and T in K); the tank's water volume is per bus.
    The pseudo-critical properties are methane's (docs/integrator.md 5.2).
    """

    injector_k: float = 7.4e-6
    injector_dead_time_ms: float = 1.1
    tank_volume_m3: float = 0.44
    tank_pressure_gauge: bool = False
    r_j_per_kg_k: float = 518.3
    p_pc_bar: float = 46.0
    t_pc_k: float = 190.6
    refuel_min_kg: float = 5.0


@dataclass(frozen=True)
class PipelineConfig:
    """Tunables of the core; the agent's config file maps onto these."""

    period_s: float = 1.0
    can_max_gap_s: float = 1.0
    kit_max_gap_s: float = 1.0
    engine_source_address: int = 0
    kit_resync_s: float = 10.0
    stale_s: float = 5.0
    # Tank pressure bit-identical while the kit's gas counter rose this much
    # (about 0.15 bar of a city bus's tank at any fill level) is a stuck sensor.
    kit_stuck_gas_kg: float = 0.05
    idle_max_kmh: float = 2.0
    engine_running_rpm: float = 300.0
    fuel: FuelFactors = field(default_factory=FuelFactors)
    gas: GasCalibration = field(default_factory=GasCalibration)
    engine_name: int | None = None  # pin the engine to this J1939 NAME (None: see EngineTracker)
    # Per signal (drivers.address.SIGNALS), where it is taken from; absent: "auto" (SignalSource).
    sources: Mapping[str, SourceRule] = field(default_factory=dict)
    # Per integrated signal (GAP_SIGNALS), a longer maximum gap than can_max_gap_s, for
    # replaying a logger that thins messages out; the live agent keeps the strict rule.
    max_gap_s: Mapping[str, float] = field(default_factory=dict)

    def gap_of(self, signal: str) -> float:
        """The longest interval bridged between two samples of ``signal``."""
        return self.max_gap_s.get(signal, self.can_max_gap_s)


@dataclass
class PipelineStats:
    frames: int = 0
    decode_errors: int = 0
    foreign_source: int = 0
    kit_messages: int = 0  # every decoded kit message, link markers not included
    kit_status: int = 0
    kit_injections: int = 0
    kit_unknown: int = 0
    kit_outages: int = 0
    kit_reanchors: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    pgns: dict[int, int] = field(default_factory=dict)  # frames per PGN
    tp_messages: dict[int, int] = field(default_factory=dict)  # reassembled messages per PGN
    tp: dict[str, int] = field(default_factory=dict)  # the reassembler's counters
    rpm_n: int = 0  # valid engine speeds from the engine (EEC1)
    rpm_sum: float = 0.0
    rpm_min: float | None = None
    rpm_max: float | None = None
    dm1_changes: int = 0
    engine_address_changes: int = 0
    engine_address_contests: int = 0  # claims disputing the engine's address (see EngineTracker)
    can_outages: int = 0
    extra: dict[str, list[float]] = field(default_factory=dict)  # DBC signal: [n, sum, min, max]
    # Per signal: values the ECU sent as "error" (0xFE..), apart from decode_errors.
    ecu_errors: dict[str, int] = field(default_factory=dict)
    # Per signal: intervals between frames from its source, ms -> count (period_quantile).
    periods: dict[str, dict[int, int]] = field(default_factory=dict)
    # Per counter signal (fuel_total in L, odometer in km): [first, last] value from its
    # source.  Their difference needs no clock: the one figure of a log without timestamps.
    counters: dict[str, list[float]] = field(default_factory=dict)
    # Per plug-in source (agent/source.py), its own counters.
    plugins: dict[str, dict[str, int]] = field(default_factory=dict)


# The integrator channels fed from the engine's CAN frames (cut on a CAN outage).
CAN_CHANNELS = ("diesel_l", "distance_km", "engine_rev", "engine")
# The integrated CAN signals and the channels each one feeds.
GAP_SIGNALS = {
    "fuel_rate": ("diesel_l",),
    "wheel_speed": ("distance_km",),
    "engine_speed": ("engine_rev", "engine"),
}

# The signal each of those channels is fed by.
CHANNEL_SIGNALS = {ch: signal for signal, chs in GAP_SIGNALS.items() for ch in chs}


def period_quantile(intervals: Mapping[int, int], q: float) -> float | None:
    """The ``q`` quantile (0..1) of a histogram of intervals in milliseconds, in seconds."""
    n = sum(intervals.values())
    if not n:
        return None
    seen = 0
    for ms in sorted(intervals):
        seen += intervals[ms]
        if seen >= q * n:
            return ms / 1000.0
    return max(intervals) / 1000.0


def reject(stats: PipelineStats, reason: str) -> None:
    """Counts one input the core could not use, under its reason, and logs it.

    Each distinct reason is logged once, then every 1000th time, so a babbling
    ECU cannot flood the journal but the reason is never hidden.
    """
    stats.decode_errors += 1
    n = stats.reasons.get(reason, 0) + 1
    stats.reasons[reason] = n
    if n == 1 or n % 1000 == 0:
        log.warning("event=decode_rejected reason=%r count=%d", reason, n)
