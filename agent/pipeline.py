"""The deterministic core: decoded signals in, 1-second readings out.

No I/O and no wall-clock reads: time comes only from the frames and kit
messages fed in, so the simulation can run it faster than real time and a
replay gives the same readings every time.

Two sources run on different clocks.  CAN frames carry the bus timestamp; kit
messages carry the kit's millisecond tick, which is precise for intervals but
has an unknown offset.  The offset is anchored to the latest bus time when the
first kit message arrives (or to the receive time before any CAN frame), and
re-anchored, with an event, only when the two drift apart by more than
``kit_resync_s``, or when its tick goes back (a restart).  "Bus time" for a
kit message is the latest frame's time plus the receive-clock time since that
frame came (both sources are stamped on one monotonic clock), so a CAN outage
alone never drags the kit's time back to the last frame.  That needs the two
sources fed in the order they were received, as the runtime does; a kit
message fed after frames that came later is timed by them.

Protocol timers (the transport protocol's T1-T4) run on the monotonic time
each CAN frame carries (``mono``), never on the bus timestamp, which is wall
time and may step.  The engine is followed by its NAME through address claims
(:class:`~cngmrv.drivers.address.EngineTracker`); each signal (fuel rate, fuel
counter, engine speed, wheel speed) is taken from one source address by its
rule (:class:`~cngmrv.drivers.address.SignalSource`: the engine for the
engine's signals unless configured), and the same signal from any other ECU
is counted as foreign, reported once per sender, and never integrated.  Each
change of an ECU's active DM1 trouble codes or lamps is an event; so is an
outage of the CAN source, which also cuts the CAN channels with an explicit
gap however short it was.

Readings are emitted when every *active* source has moved past the window end
plus the integrator's lateness (a per-source watermark, as in stream
processors), so a slow source cannot have its samples land in a window that
was already closed.  A source that falls ``stale_s`` behind the others stops
holding readings back; if it comes back its late samples are counted, not
integrated.

Decoded samples are buffered per channel and handed to the C integrator in
one call per channel just before each pop (and whenever a buffer reaches
``MAX_BUFFERED``), not one call per frame.  The integrator's results do not
depend on how its input is cut into calls, so this changes no reading.

A reading holds diesel (L), gas from the kit's flow (kg) and from injection
events (kg), distance (km), energy and CO2 per fuel with the factors from the
configuration, the gas energy share, seconds per kit mode, idle seconds, the
tank's gas mass and refuels, and per channel the covered seconds and gaps
(docs/integrator.md).
"""

from __future__ import annotations

import logging
import math
from array import array
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cngmrv.drivers import j1939
from cngmrv.drivers.address import SIGNALS, Contest, EngineTracker, SignalSource, SourceRule
from cngmrv.drivers.dbc import DbcError, DbcSignals
from cngmrv.drivers.dm1 import Dm1, Dm1Error, decode_dm1
from cngmrv.drivers.j1939 import pgn_of
from cngmrv.drivers.kit_can import KitCanDecoder
from cngmrv.drivers.kit_codec import MODE_DIESEL, MODE_DUAL, MODE_FAULT
from cngmrv.drivers.tp import TpMessage, TpReassembler
from cngmrv.native import (
    ChannelSpec,
    EventSpec,
    FuelSpec,
    Integrator,
    StateSpec,
    TankSpec,
    Window,
)

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
# Samples held per channel before they go to the integrator in one call; a
# bound on memory, and far more than one poll's worth at full bus load.
MAX_BUFFERED = 4096
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


class _Column:
    """Samples of one channel waiting for one integrator call (no copy in the push)."""

    __slots__ = ("t", "values", "ok")

    def __init__(self, width: int) -> None:
        self.t = array("d")
        self.values = tuple(array("d") for _ in range(width))
        self.ok = bytearray()

    def __len__(self) -> int:
        return len(self.t)

    def clear(self) -> None:
        del self.t[:]
        for v in self.values:
            del v[:]
        del self.ok[:]


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


# (bus time, 29-bit CAN id, payload, monotonic time)
Handler = Callable[[float, int, bytes, float], None]


class Pipeline:
    """Feeds J1939 frames and kit messages into the native integrator and builds readings.

    ``dbc`` adds a DBC's signals (loaded by the caller: the core does no I/O);
    each reading then carries their per-window means under ``"extra"``.
    """

    def __init__(
        self,
        config: PipelineConfig,
        boot_epoch: int = 0,
        clock: str = "unknown",
        kit_can: KitCanDecoder | None = None,
        dbc: DbcSignals | None = None,
    ):
        self.config = config
        # The kit's PropB frames on this bus, when the kit talks CAN, not serial.
        self.kit_can = kit_can
        self.boot_epoch = boot_epoch
        self.clock = clock
        self._integ = Integrator(
            _channels(config), period=config.period_s, fuels=_fuels(config.fuel)
        )
        # Per channel: its buffer and, for the kinds with several values per
        # sample, the integrator method that takes them (else Integrator.push).
        multi: dict[str, tuple[int, Callable[..., None]]] = {
            "gas_kg_events": (3, self._integ.push_events),  # pulse, P, T
            "tank": (2, self._integ.push_tank),  # P, T
        }
        self._columns: dict[str, tuple[_Column, Callable[..., None] | None]] = {}
        for name in self._integ.channel_names:
            width, push = multi.get(name, (1, None))
            self._columns[name] = (_Column(width), push)
        # Latest wheel speed (t, km/h or None): engine samples are classified
        # off / idle / moving against it.
        self._speed: tuple[float, float | None] | None = None
        self.stats = PipelineStats()
        self.events: list[dict[str, Any]] = []
        self._latest: dict[str, float] = {}
        self._can_latest = -math.inf  # == self._latest["can"] once a frame came; read per frame
        self._can_latest_mono = -math.inf  # when that frame was received
        self._kit_offset: float | None = None
        self._kit_last_tick: int | None = None
        self._kit_wraps = 0
        # Kit link outages in pipeline time: the open one starts at the last
        # kit message before it and ends at the first one after the link is up.
        self._kit_down: float | None = None
        self._kit_up_pending = False
        self._kit_outages: list[tuple[float, float]] = []
        self._kit_hello: tuple[Any, ...] | None = None
        # Per window index: OR of the kit's fault bitmaps, and suspect sensors.
        self._win_faults: dict[int, int] = {}
        self._win_suspect: dict[int, set[str]] = {}
        self._tank_watch: tuple[float, float, float] | None = None  # value, gas total, since
        self._tank_stuck = False
        self.engine = EngineTracker(config.engine_source_address, config.engine_name)
        unknown = set(config.sources) - set(SIGNALS)
        if unknown:
            raise ValueError(f"unknown signal(s) {sorted(unknown)} (known: {', '.join(SIGNALS)})")
        self.sources = {
            sig: SignalSource(sig, config.sources.get(sig, "auto"), self.engine) for sig in SIGNALS
        }
        unknown = set(config.max_gap_s) - set(GAP_SIGNALS)
        if unknown:
            raise ValueError(
                f"no gap rule for {sorted(unknown)} (integrated: {', '.join(GAP_SIGNALS)})"
            )
        self._signal_t: dict[str, float] = {}  # latest frame time of each signal from its source
        self._tp = TpReassembler()
        self.stats.tp = self._tp.counters
        self._tp_swept = -math.inf
        self._dm1: dict[int, Dm1] = {}
        self._dbc = dbc
        self._lfc: dict[int, float] = {}  # window index -> latest LFC total fuel (L)
        self._odo: dict[int, float] = {}  # window index -> latest odometer (km)
        self._odo_hr = False  # VDHR seen from the odometer's source: VD's coarser value unused
        self._extra: dict[int, dict[str, list[float]]] = {}  # window index -> name -> [sum, n]
        self._extra_closed = -math.inf  # highest window index already emitted
        self._handlers: dict[int, Handler] = {
            j1939.PGN_LFE: self._on_lfe,
            j1939.PGN_CCVS: self._on_ccvs,
            j1939.PGN_EEC1: self._on_eec1,
            j1939.PGN_LFC: self._on_lfc,
            j1939.PGN_VDHR: self._on_distance,
            j1939.PGN_VD: self._on_distance,
            j1939.PGN_TP_CM: self._on_tp,
            j1939.PGN_TP_DT: self._on_tp,
            j1939.PGN_ADDRESS_CLAIMED: self._on_claim,
            j1939.PGN_DM1: self._on_dm1,
        }
        for pgn in dbc.pgns if dbc else ():
            self._handlers[pgn] = self._chain(self._handlers.get(pgn), self._on_dbc)

    # -- inputs ---------------------------------------------------------

    def _reject(self, reason: str) -> None:
        self.stats.decode_errors += 1
        n = self.stats.reasons.get(reason, 0) + 1
        self.stats.reasons[reason] = n
        # Log each distinct reason once, then every 1000th time, so a babbling
        # ECU cannot flood the journal but the reason is never hidden.
        if n == 1 or n % 1000 == 0:
            log.warning("event=decode_rejected reason=%r count=%d", reason, n)

    def take_events(self) -> list[dict[str, Any]]:
        """The events since the last call, oldest first, handed over: a running agent
        stores them, and a pipeline that kept them all would grow for as long as it runs."""
        out, self.events = self.events, []
        return out

    def on_can(self, t: float, can_id: int, data: bytes, mono: float | None = None) -> None:
        """One CAN frame with its bus timestamp ``t`` and monotonic receive time ``mono``.

        ``mono`` defaults to ``t`` (right for a replay, whose timestamps are the
        only clock).  Never raises: a frame that cannot be used is counted with
        its reason.
        """
        self.stats.frames += 1
        if not 0 <= can_id <= 0x1FFFFFFF:
            self._reject(f"CAN id {can_id:#x} is not a 29-bit identifier")
            return
        pgn = pgn_of(can_id)
        if self.kit_can is not None and self.kit_can.wants(pgn):
            for msg in self.kit_can.decode(t, can_id, data):
                self.on_kit(t, msg, mono)
        pgns = self.stats.pgns
        pgns[pgn] = pgns.get(pgn, 0) + 1
        handler = self._handlers.get(pgn)
        if handler is not None:
            handler(t, can_id, data, t if mono is None else mono)
        if t > self._can_latest:
            self._can_latest = self._latest["can"] = t
            self._can_latest_mono = t if mono is None else mono

    @staticmethod
    def _chain(first: Handler | None, second: Handler) -> Handler:
        if first is None:
            return second

        def both(t: float, can_id: int, data: bytes, mono: float) -> None:
            first(t, can_id, data, mono)
            second(t, can_id, data, mono)

        return both

    def _from_source(self, t: float, signal: str, can_id: int) -> bool:
        """True if the frame comes from the signal's source (:class:`SignalSource`)."""
        src = self.sources[signal]
        verdict = src.accepts(can_id & 0xFF)
        if verdict is True:
            last = self._signal_t.get(signal)
            self._signal_t[signal] = t
            if last is not None and t > last:
                hist = self.stats.periods.setdefault(signal, {})
                ms = round((t - last) * 1000.0)
                hist[ms] = hist.get(ms, 0) + 1
            return True
        # Another ECU's fuel rate or speed must never be mixed into the source's.
        self.stats.foreign_source += 1
        if verdict is not False:
            self.events.append(
                {
                    "t": t,
                    "kind": "SIGNAL_SECOND_SENDER",
                    "signal": signal,
                    "sender": verdict,
                    "source": src.address,
                }
            )
            log.warning(
                "event=signal_second_sender signal=%s sender=%d source=%s",
                signal,
                verdict,
                src.address,
            )
        return False

    def _on_lfe(self, t: float, can_id: int, data: bytes, mono: float) -> None:
        if self._from_source(t, "fuel_rate", can_id):
            self._decode_into("diesel_l", "fuel_rate_lph", t, j1939.PGN_LFE, data)

    def _on_ccvs(self, t: float, can_id: int, data: bytes, mono: float) -> None:
        if self._from_source(t, "wheel_speed", can_id):
            speed = self._decode_into("distance_km", "wheel_speed_kmh", t, j1939.PGN_CCVS, data)
            self._speed = (t, speed)

    def _decode_into(
        self, channel: str, signal: str, t: float, pgn: int, data: bytes
    ) -> float | None:
        """Decode one signal into ``channel``; returns its value (None when not usable)."""
        try:
            sig = j1939.decode_detail(pgn, data)[signal]
        except j1939.DecodeError as e:
            # A frame we cannot read is a moment we know nothing about: a gap, not a guess.
            self._reject(str(e))
            self._add(channel, t, None)
            return None
        self._push_signal(channel, t, sig, pgn)
        return sig.value

    def _on_eec1(self, t: float, can_id: int, data: bytes, mono: float) -> None:
        if not self._from_source(t, "engine_speed", can_id):
            return
        try:
            rpm = j1939.decode_detail(j1939.PGN_EEC1, data)["engine_speed_rpm"]
        except j1939.DecodeError as e:
            self._reject(str(e))
            self._add("engine_rev", t, None)
            self._add("engine", t, None)
            return
        self._push_signal("engine_rev", t, rpm, j1939.PGN_EEC1)
        self._add("engine", t, self._engine_state(t, rpm.value))
        if rpm.value is None:
            return
        value = rpm.value
        s = self.stats
        s.rpm_n += 1
        s.rpm_sum += value
        if s.rpm_min is None or value < s.rpm_min:
            s.rpm_min = value
        if s.rpm_max is None or value > s.rpm_max:
            s.rpm_max = value

    def _on_lfc(self, t: float, can_id: int, data: bytes, mono: float) -> None:
        """The engine's total-fuel counter: the cross-check of the integrated LFE rate."""
        if not self._from_source(t, "fuel_total", can_id):
            return
        try:
            total = j1939.decode(j1939.PGN_LFC, data)["total_fuel_l"]
        except j1939.DecodeError as e:
            self._reject(str(e))
            return
        if total is not None:
            self._lfc[math.floor(t / self.config.period_s)] = total
            self._count("fuel_total", total)

    def _on_distance(self, t: float, can_id: int, data: bytes, mono: float) -> None:
        """The odometer (VDHR, 5 m; VD, 125 m, where no VDHR comes): the cross-check of
        the distance integrated from wheel speed."""
        if not self._from_source(t, "odometer", can_id):
            return
        pgn = pgn_of(can_id)
        if pgn == j1939.PGN_VD and self._odo_hr:
            return
        name = "total_distance_km" if pgn == j1939.PGN_VDHR else "vd_total_distance_km"
        try:
            km = j1939.decode(pgn, data)[name]
        except j1939.DecodeError as e:
            self._reject(str(e))
            return
        if km is None:
            return
        if pgn == j1939.PGN_VDHR and not self._odo_hr:
            # A VD value taken before would step by up to 125 m against VDHR's.
            self._odo_hr = True
            self.stats.counters.pop("odometer", None)
        self._odo[math.floor(t / self.config.period_s)] = km
        self._count("odometer", km)

    def _count(self, signal: str, value: float) -> None:
        seen = self.stats.counters.get(signal)
        if seen is None:
            self.stats.counters[signal] = [value, value]
        else:
            seen[1] = value

    def _on_tp(self, t: float, can_id: int, data: bytes, mono: float) -> None:
        if mono - self._tp_swept >= 0.25:
            self._tp.expire(mono)
            self._tp_swept = mono
        jid = j1939.parse_id(can_id)
        msg = self._tp.feed(mono, jid.pgn, jid.source, jid.destination, data)
        if msg is not None:
            self._on_tp_message(t, msg)

    def _on_tp_message(self, t: float, msg: TpMessage) -> None:
        counts = self.stats.tp_messages
        counts[msg.pgn] = counts.get(msg.pgn, 0) + 1
        if msg.pgn == j1939.PGN_DM1:
            self._dm1_payload(t, msg.source, msg.data)
        if self._dbc is not None and msg.pgn in self._dbc.messages:
            self._dbc_payload(t, msg.source, msg.pgn, msg.data)

    def _on_claim(self, t: float, can_id: int, data: bytes, mono: float) -> None:
        if len(data) < 8:
            self._reject(f"AddressClaimed: need 8 bytes, got {len(data)}")
            return
        change = self.engine.on_claim(can_id & 0xFF, data)
        contest = self.engine.last_contest
        if contest is not None:
            self._on_contest(t, contest)
        if change is None:
            return
        self.stats.engine_address_changes += 1
        name = self.engine.name
        self.events.append(
            {
                "t": t,
                "kind": "ENGINE_ADDRESS_CHANGED",
                "name": None if name is None else f"{name:016x}",
                "old": change[0],
                "new": change[1],
            }
        )
        log.warning("event=engine_address_changed old=%s new=%s", change[0], change[1])

    def _on_contest(self, t: float, contest: Contest) -> None:
        self.stats.engine_address_contests += 1
        self.events.append(
            {
                "t": t,
                "kind": "ENGINE_ADDRESS_CONTESTED",
                "contest": contest.kind,
                "address": contest.address,
                "claimer": f"{contest.claimer:016x}",
                "name": None if contest.engine_name is None else f"{contest.engine_name:016x}",
                "engine_kept": contest.engine_kept,
            }
        )
        log.warning(
            "event=engine_address_contested contest=%s address=%s claimer=%016x engine_kept=%s",
            contest.kind,
            contest.address,
            contest.claimer,
            contest.engine_kept,
        )

    def _on_dm1(self, t: float, can_id: int, data: bytes, mono: float) -> None:
        self._dm1_payload(t, can_id & 0xFF, data)

    def _dm1_payload(self, t: float, source: int, data: bytes) -> None:
        try:
            dm1 = decode_dm1(data)
        except Dm1Error as e:
            self._reject(str(e))
            return
        prev = self._dm1.get(source)
        self._dm1[source] = dm1
        before = prev.active if prev is not None else frozenset()
        if prev is None:
            if not dm1.active:
                return  # nothing was known and nothing is active: no change to report
        elif dm1.active == before and dm1.lamps == prev.lamps:
            return
        self.stats.dm1_changes += 1
        name = self.engine.table.name_at(source)
        self.events.append(
            {
                "t": t,
                "kind": "DM1_CHANGED",
                "source": source,
                "name": None if name is None else f"{name:016x}",
                "lamps": dm1.lamps,
                "active": [[d.spn, d.fmi, d.occurrences] for d in dm1.dtcs],
                "added": sorted([spn, fmi] for spn, fmi in dm1.active - before),
                "removed": sorted([spn, fmi] for spn, fmi in before - dm1.active),
            }
        )

    def dm1_active(self) -> dict[int, Dm1]:
        """The latest DM1 of each source address."""
        return dict(self._dm1)

    def _on_dbc(self, t: float, can_id: int, data: bytes, mono: float) -> None:
        self._dbc_payload(t, can_id & 0xFF, pgn_of(can_id), data)

    def _dbc_payload(self, t: float, source: int, pgn: int, data: bytes) -> None:
        assert self._dbc is not None
        expected = self._dbc.messages[pgn].source
        if source != (self.engine.address if expected is None else expected):
            return
        try:
            values = self._dbc.decode(pgn, data)
        except DbcError as e:
            self._reject(str(e))
            return
        k = math.floor(t / self.config.period_s)
        if k <= self._extra_closed:
            return  # its reading is already out; the summary in stats still counts it
        bucket = self._extra.setdefault(k, {})
        totals = self.stats.extra
        for name, v in values.items():
            if v is None:
                continue
            acc = bucket.get(name)
            if acc is None:
                bucket[name] = [v, 1]
            else:
                acc[0] += v
                acc[1] += 1
            tot = totals.get(name)
            if tot is None:
                totals[name] = [1, v, v, v]
            else:
                tot[0] += 1
                tot[1] += v
                tot[2] = min(tot[2], v)
                tot[3] = max(tot[3], v)

    def on_source_event(self, event: Mapping[str, Any]) -> None:
        """An event from the CAN source (``CAN_DOWN``, ``CAN_UP``, ``CAN_STATE``); kept with the readings.

        ``event`` must have ``t`` and ``kind``.  The caller passes it after the
        frames received before it and before those received after it.  On
        ``CAN_DOWN`` the CAN channels get an explicit gap from their latest
        sample on, so an outage shorter than ``can_max_gap_s`` is not bridged.
        """
        self.events.append(dict(event))
        if event.get("kind") != "CAN_DOWN":
            return
        self.stats.can_outages += 1
        t = self._latest.get("can")
        if t is not None:
            # Just after the latest sample: the integrator rejects a repeated
            # timestamp, so a marker at exactly that time would not cut the span.
            cut = math.nextafter(t, math.inf)
            for channel in CAN_CHANNELS:
                self._add(channel, cut, None)

    def _push_signal(self, channel: str, t: float, sig: j1939.Decoded, pgn: int) -> None:
        if sig.value is None:
            if sig.status == "error":
                # The ECU's own "error" value (0xFE..): its sensor's fault, not a frame we
                # could not read; a gap all the same.
                signal = CHANNEL_SIGNALS[channel]
                errors = self.stats.ecu_errors
                errors[signal] = errors.get(signal, 0) + 1
            else:
                self._reject(f"PGN {pgn} {channel}: {sig.status}")
        self._add(channel, t, sig.value)

    def _engine_state(self, t: float, rpm: float | None) -> float | None:
        """Engine off / idle (running, vehicle stationary) / moving, or None if unknown.

        Idle needs a wheel speed no older than ``can_max_gap_s``; without one a
        running engine's state is unknown, not guessed.
        """
        if rpm is None:
            return None
        if rpm < self.config.engine_running_rpm:
            return float(ENGINE_OFF)
        if self._speed is None:
            return None
        ts, kmh = self._speed
        if kmh is None or abs(t - ts) > self.config.gap_of("wheel_speed"):
            return None
        return float(ENGINE_IDLE if kmh <= self.config.idle_max_kmh else ENGINE_MOVING)

    def _add(self, channel: str, t: float, *values: float | None) -> None:
        """Buffers one sample; any None value makes it invalid (never integrated)."""
        col, _ = self._columns[channel]
        ok = True
        col.t.append(t)
        for arr, v in zip(col.values, values, strict=True):
            if v is None:
                ok = False
                v = 0.0
            arr.append(v)
        col.ok.append(ok)
        if len(col) >= MAX_BUFFERED:
            self._drain(channel)

    def _drain(self, channel: str | None = None) -> None:
        """Hands buffered samples to the integrator, one call per channel."""
        names = self._columns if channel is None else (channel,)
        for name in names:
            col, push = self._columns[name]
            if not len(col):
                continue
            if push is None:
                self._integ.push(name, col.t, col.values[0], col.ok)
            else:
                push(name, col.t, *col.values, col.ok)
            col.clear()

    def on_kit(self, received_at: float, msg: Mapping[str, Any], mono: float | None = None) -> None:
        """One decoded kit message or link marker (``cngmrv.drivers.kit_link``).

        ``received_at`` is the receive time on the bus's timeline, used only
        before any CAN time exists; ``mono`` is the receive time on the clock
        of :meth:`on_can`'s ``mono`` (default ``received_at``), which ties the
        kit's clock to bus time while no frame comes.  STATUS feeds the gas
        and mode channels; MODE, FAULT and a changed kit HELLO become events;
        INJECTION events feed the event-based gas channel; link markers open
        and close outages, which readings report as ``kit_down_s``.
        """
        kind = msg.get("type")
        if kind == "link":
            self._on_kit_link(received_at, msg)
            return
        self.stats.kit_messages += 1
        tick = msg.get("tick_ms")
        if not isinstance(tick, int):
            self._reject(f"kit {kind} message without tick_ms")
            return
        t = self._kit_time(tick, received_at, received_at if mono is None else mono)
        if self._kit_up_pending and self._kit_down is not None:
            self._kit_outages.append((self._kit_down, t))
            self.events.append({"t": t, "kind": "KIT_LINK_UP", "down_s": t - self._kit_down})
            self._kit_down, self._kit_up_pending = None, False
        if kind == "status":
            self._on_kit_status(t, msg)
        elif kind == INJECTION_TYPE:
            self.stats.kit_injections += 1
            self.on_injection(t, *injection_fields(msg))
        elif kind == "mode":
            self.events.append(
                {"t": t, "kind": "KIT_MODE", **_pick(msg, ("mode", "previous", "reason"))}
            )
        elif kind == "fault":
            self.events.append(
                {"t": t, "kind": "KIT_FAULT", **_pick(msg, ("code", "active", "faults"))}
            )
        elif kind == "hello":
            self._on_kit_hello(t, msg)
        else:
            self.stats.kit_unknown += 1
        self._latest["kit"] = max(t, self._latest.get("kit", t))

    def _on_kit_status(self, t: float, msg: Mapping[str, Any]) -> None:
        self.stats.kit_status += 1
        self._push_status_samples(t, msg)
        k = self._window_index(t)
        faults = msg.get("faults")
        if faults:
            self._win_faults[k] = self._win_faults.get(k, 0) | int(faults)
        self._watch_tank(t, msg.get("tank_bar"), msg.get("gas_total_kg"))
        if self._tank_stuck:
            self._win_suspect.setdefault(k, set()).add("tank_bar")

    def _watch_tank(self, t: float, tank: Any, total: Any) -> None:
        """Flag a tank pressure reading that stays bit-identical while gas is used."""
        if tank is None or total is None:
            return
        watch = self._tank_watch
        if watch is None or tank != watch[0] or total < watch[1]:
            if self._tank_stuck:
                self._tank_stuck = False
                self.events.append({"t": t, "kind": "KIT_SENSOR_RECOVERED", "sensor": "tank_bar"})
            self._tank_watch = (tank, total, t)
        elif not self._tank_stuck and total - watch[1] >= self.config.kit_stuck_gas_kg:
            self._tank_stuck = True
            self.events.append(
                {
                    "t": t,
                    "kind": "KIT_SENSOR_STUCK",
                    "sensor": "tank_bar",
                    "value": tank,
                    "since": watch[2],
                    "gas_kg": total - watch[1],
                }
            )
            log.warning(
                "event=kit_sensor_stuck sensor=tank_bar value=%s since=%.1f", tank, watch[2]
            )

    def _on_kit_hello(self, t: float, msg: Mapping[str, Any]) -> None:
        fields = ("role", "max_version", "kit_id", "fw_major", "fw_minor", "fw_patch",
                  "status_period_ms", "injectors", "inj_flow", "inj_dead_ms", "capabilities")  # fmt: skip
        hello = _pick(msg, fields)
        identity = (msg.get("version"), *hello.values())
        # A kit repeats HELLO every 10 s; only a new or changed one is news.
        if identity != self._kit_hello:
            self._kit_hello = identity
            self.events.append(
                {"t": t, "kind": "KIT_HELLO", "version": msg.get("version"), **hello}
            )

    def _on_kit_link(self, received_at: float, msg: Mapping[str, Any]) -> None:
        state = msg.get("state")
        if state == "down" and self._kit_down is None:
            since = self._latest.get("kit", self._latest.get("can", received_at))
            self._kit_down, self._kit_up_pending = since, False
            self.stats.kit_outages += 1
            self.events.append(
                {"t": since, "kind": "KIT_LINK_DOWN", "reason": str(msg.get("reason", ""))}
            )
        elif state == "up" and self._kit_down is not None:
            self._kit_up_pending = True
            # The kit is back: count it as an active source again at once, so
            # the other sources cannot close the windows its first samples
            # after the outage belong to before they arrive.
            newest = max(self._latest.values())
            self._latest["kit"] = max(self._latest.get("kit", newest), newest - self.config.stale_s)

    def _window_index(self, t: float) -> int:
        return math.floor(t / self.config.period_s)

    def _push_status_samples(self, t: float, msg: Mapping[str, Any]) -> None:
        flow = msg.get("gas_flow_kgph")
        self._add("gas_kg", t, None if flow is None else float(flow))
        mode = msg.get("mode")
        self._add("mode", t, None if mode is None else float(mode))
        bar, temp_c = msg.get("tank_bar"), msg.get("gas_temp_c")
        if bar is not None and self.config.gas.tank_pressure_gauge:
            bar = float(bar) + ATMOSPHERE_BAR
        self._add(
            "tank",
            t,
            None if bar is None else float(bar),
            None if temp_c is None else float(temp_c) + KELVIN,
        )

    def on_injection(
        self,
        t: float,
        pulse_ms: float | None,
        rail_bar_abs: float | None,
        gas_temp_c: float | None,
    ) -> None:
        """One gas injection at ``t`` (already on the bus time base).

        Its mass is ``k * (pulse - dead_time) * P / sqrt(T)`` with the kit's
        calibration (``config.gas``); a None field makes the event invalid, so
        it breaks the event coverage instead of adding a guess.
        """
        temp_k = None if gas_temp_c is None else gas_temp_c + KELVIN
        self._add("gas_kg_events", t, pulse_ms, rail_bar_abs, temp_k)

    def _kit_time(self, tick_ms: int, received_at: float, mono: float) -> float:
        last_tick, rebooted = self._kit_last_tick, False
        if last_tick is not None and tick_ms < last_tick - (1 << 31):
            self._kit_wraps += 1
        elif last_tick is not None and tick_ms < last_tick - KIT_REBOOT_BACKSTEP_MS:
            # Ticks a little out of order are the kit's own (an injection is
            # sent after its pulse); more than a second back is a restart.  It
            # is re-anchored at once: one soon after the last anchor would
            # otherwise hide inside kit_resync_s, and its samples fall behind.
            self._kit_wraps, rebooted = 0, True
        self._kit_last_tick = tick_ms
        tick_s = (tick_ms + (self._kit_wraps << 32)) / 1000.0
        can_t = self._latest.get("can")
        if can_t is None:
            reference = received_at
        else:
            # While the CAN source is out its latest time stands still; the
            # receive clock carries it on.  Never below the latest frame's time,
            # so a message received just before that frame, or a caller with no
            # receive clock to give, gets that time.
            reference = can_t + max(0.0, mono - self._can_latest_mono)
        if self._kit_offset is None:
            self._kit_offset = reference - tick_s
        elif rebooted or abs(self._kit_offset + tick_s - reference) > self.config.kit_resync_s:
            old = self._kit_offset
            self._kit_offset = reference - tick_s
            self.stats.kit_reanchors += 1
            self.events.append(
                {"t": reference, "kind": "KIT_CLOCK_REANCHORED", "shift_s": self._kit_offset - old}
            )
            # The kit's earlier times are on the old anchor; kept as its latest,
            # a backward shift would hold the kit "ahead" and let it alone close
            # windows the other sources still have samples for.
            self._latest.pop("kit", None)
        return self._kit_offset + tick_s

    # -- outputs --------------------------------------------------------

    def watermark(self) -> float | None:
        if not self._latest:
            return None
        newest = max(self._latest.values())
        active = [v for v in self._latest.values() if v >= newest - self.config.stale_s]
        return min(active)

    def advance(self) -> list[dict[str, Any]]:
        """Readings for every window that all active sources have passed."""
        wm = self.watermark()
        if wm is None:
            return []
        self._drain()
        return [self._reading(w) for w in self._integ.pop(wm)]

    def finish(self) -> list[dict[str, Any]]:
        """Readings for every remaining window (end of run or shutdown)."""
        self._drain()
        return [self._reading(w) for w in self._integ.flush()]

    def counters(self) -> dict[str, Any]:
        return {
            **self._integ.counters,
            "rejected_by_channel": self._integ.rejected_by_channel,
            "frames": self.stats.frames,
        }

    def _reading(self, w: Window) -> dict[str, Any]:
        ch = w.channels
        energy = {name: f.energy_mj for name, f in w.fuels.items()}
        total_mj = energy["diesel"] + energy["gas"]
        engine = ch["engine"].states or {}
        reading: dict[str, Any] = {
            "t0": w.t0,
            "dur": w.t1 - w.t0,
            "epoch": self.boot_epoch,
            "clock": self.clock,
            "diesel_l": ch["diesel_l"].integral,
            "gas_kg": ch["gas_kg"].integral,
            "gas_kg_events": ch["gas_kg_events"].integral,
            "distance_km": ch["distance_km"].integral,
            # Mean engine speed over a reading: 60 * engine_rev / cov["engine_rev"].
            "engine_rev": ch["engine_rev"].integral,
            "energy_mj": energy,
            "gas_share": energy["gas"] / total_mj if total_mj > 0.0 else None,
            "co2_kg": {name: f.co2_kg for name, f in w.fuels.items()},
            "cov": {name: c.covered_s for name, c in ch.items()},
            "mode_s": dict(ch["mode"].states or {}),
            "idle_s": engine.get("idle", 0.0),
            "engine_on_s": engine.get("idle", 0.0) + engine.get("moving", 0.0),
            # The source address each signal is taken from at the window's end (None: none).
            "src": {sig: src.address for sig, src in self.sources.items()},
        }
        gaps = {name: [c.gaps, round(c.longest_gap_s, 3)] for name, c in ch.items() if c.gaps}
        if gaps:
            reading["gaps"] = gaps
        tank = ch["tank"]
        if tank.last is not None:
            reading["tank_kg"] = tank.last
        if tank.integral > 0.0 or tank.events:
            reading["refuel_kg"] = tank.integral
            reading["refuels"] = tank.events
        if tank.events:
            self.events.append(
                {"t": w.t0, "kind": "REFUEL_DETECTED", "tank_kg": tank.last, "refuels": tank.events}
            )
        self._kit_flags(reading, w.t0, w.t1)
        lfc = None
        for k in [k for k in self._lfc if k <= w.index]:
            value = self._lfc.pop(k)
            lfc = value if k == w.index else lfc
        if lfc is not None:
            reading["lfc_total_l"] = lfc
        odo = None
        for k in [k for k in self._odo if k <= w.index]:
            value = self._odo.pop(k)
            odo = value if k == w.index else odo
        if odo is not None:
            reading["odometer_km"] = odo
        if self._dbc is not None:
            reading["extra"] = self._take_extra(w.index)
        return reading

    def _take_extra(self, index: int) -> dict[str, float]:
        self._extra_closed = max(self._extra_closed, index)
        for k in [k for k in self._extra if k < index]:
            del self._extra[k]  # windows skipped by the integrator's guard
        bucket = self._extra.pop(index, {})
        return {name: total / n for name, (total, n) in bucket.items()}

    def _kit_flags(self, reading: dict[str, Any], t0: float, t1: float) -> None:
        """Outage seconds, fault bits and suspect sensors of the kit in one window."""
        down = 0.0
        for a, b in self._kit_outages:
            down += max(0.0, min(b, t1) - max(a, t0))
        if self._kit_down is not None:
            down += max(0.0, t1 - max(self._kit_down, t0))
        # Readings come out in time order, so outages that ended are done with.
        self._kit_outages = [o for o in self._kit_outages if o[1] > t1]
        if down > 0:
            reading["kit_down_s"] = round(down, 6)
        k = round(t0 / self.config.period_s)
        # Entries of windows before this one belong to windows never emitted.
        faults = 0
        for i in [i for i in self._win_faults if i <= k]:
            bits = self._win_faults.pop(i)
            faults |= bits if i == k else 0
        if faults:
            reading["kit_faults"] = faults
        suspect: set[str] = set()
        for i in [i for i in self._win_suspect if i <= k]:
            names = self._win_suspect.pop(i)
            suspect |= names if i == k else set()
        if suspect:
            reading["kit_suspect"] = sorted(suspect)


def _pick(msg: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: msg.get(k) for k in keys}


# The kit protocol's injection-event message (docs/kit-protocol.md, INJECTION).  Only this constant and
# injection_fields() know its layout; everything after works on plain numbers.
INJECTION_TYPE = "injection"


def injection_fields(msg: Mapping[str, Any]) -> tuple[float | None, float | None, float | None]:
    """(pulse width ms, absolute rail pressure bar, gas temperature °C) of a kit
    injection message; None where the kit reported the field as not available."""

    def num(key: str) -> float | None:
        v = msg.get(key)
        return None if v is None else float(v)

    return num("pulse_ms"), num("rail_bar"), num("gas_temp_c")


def _channels(config: PipelineConfig) -> list[Any]:
    kit_gap, gas = config.kit_max_gap_s, config.gas
    return [
        ChannelSpec("diesel_l", config.gap_of("fuel_rate"), PER_HOUR),
        ChannelSpec("distance_km", config.gap_of("wheel_speed"), PER_HOUR),
        # Revolutions: mean rpm of a reading is 60 * integral / covered seconds.
        ChannelSpec("engine_rev", config.gap_of("engine_speed"), PER_MINUTE),
        StateSpec("engine", config.gap_of("engine_speed"), ENGINE_STATES),
        ChannelSpec("gas_kg", kit_gap, PER_HOUR),
        EventSpec("gas_kg_events", kit_gap, gas.injector_k, gas.injector_dead_time_ms),
        # Seconds per kit mode, with the same gap rules as the gas flow they qualify.
        StateSpec("mode", kit_gap, MODE_STATES),
        TankSpec(
            "tank",
            kit_gap,
            gas.tank_volume_m3,
            gas.r_j_per_kg_k,
            gas.p_pc_bar,
            gas.t_pc_k,
            gas.refuel_min_kg,
        ),
    ]


def _fuels(f: FuelFactors) -> list[FuelSpec]:
    # Emission factors are per TJ in the IPCC tables: 1 TJ = 1e6 MJ.
    return [
        FuelSpec(
            "diesel",
            "diesel_l",
            f.diesel_density_kg_per_l * f.diesel_ncv_mj_per_kg,
            f.diesel_co2_kg_per_tj / 1e6,
        ),
        FuelSpec("gas", "gas_kg", f.gas_ncv_mj_per_kg, f.gas_co2_kg_per_tj / 1e6),
    ]
