"""Decoding J1939: the engine's frames into fuel, distance and engine samples, and events.

Pure: no I/O and no wall-clock reads.  Protocol timers (the transport
protocol's T1-T4) run on the monotonic time each CAN frame carries (``mono``),
never on the bus timestamp, which is wall time and may step.  The engine is
followed by its NAME through address claims
(:class:`~cngmrv.drivers.address.EngineTracker`); each signal (fuel rate, fuel
counter, engine speed, wheel speed) is taken from one source address by its
rule (:class:`~cngmrv.drivers.address.SignalSource`: the engine for the
engine's signals unless configured), and the same signal from any other ECU
is counted as foreign, reported once per sender, and never integrated.  Each
change of an ECU's active DM1 trouble codes or lamps is an event.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection
from typing import Any

from cngmrv.agent.pipeline_config import (
    CAN_CHANNELS,
    CHANNEL_SIGNALS,
    ENGINE_IDLE,
    ENGINE_MOVING,
    ENGINE_OFF,
    GAP_SIGNALS,
    PipelineConfig,
    PipelineStats,
    reject,
)
from cngmrv.agent.window import Windower
from cngmrv.drivers import j1939
from cngmrv.drivers.address import SIGNALS, Contest, EngineTracker, SignalSource
from cngmrv.drivers.dbc import DbcError, DbcSignals
from cngmrv.drivers.dm1 import Dm1, Dm1Error, decode_dm1
from cngmrv.drivers.j1939 import pgn_of
from cngmrv.drivers.tp import TpMessage, TpReassembler
from cngmrv.native import Window

log = logging.getLogger("cngmrv.pipeline")

# (bus time, 29-bit CAN id, payload, monotonic time)
Handler = Callable[[float, int, bytes, float], None]

# The integrator channels J1939 feeds (cut on a CAN outage).
J1939_CHANNELS = CAN_CHANNELS


class J1939Decoder:
    """J1939 frames into samples of :data:`J1939_CHANNELS`, events and per-window fields.

    ``dbc`` adds a DBC's signals (loaded by the caller: the core does no I/O);
    each reading then carries their per-window means under ``"extra"``, and
    the LFC total-fuel counter of its window as ``"lfc_total_l"``
    (:meth:`annotate`).  ``taken``: channels another source feeds (an OBD-II
    source's fuel rate, say); J1939 frames of their signals are then ignored,
    so two senders are never mixed in one channel.
    """

    def __init__(
        self,
        config: PipelineConfig,
        window: Windower,
        stats: PipelineStats,
        dbc: DbcSignals | None = None,
        taken: Collection[str] = (),
    ) -> None:
        self.config = config
        self._w = window
        self.stats = stats
        self._taken = frozenset(CHANNEL_SIGNALS[ch] for ch in taken if ch in CHANNEL_SIGNALS)
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
        self.handlers: dict[int, Handler] = {
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
            self.handlers[pgn] = self._chain(self.handlers.get(pgn), self._on_dbc)

    def signal_sources(self) -> dict[str, int | None]:
        """The source address each signal is taken from right now (None: none)."""
        return {sig: src.address for sig, src in self.sources.items()}

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
        if signal in self._taken:
            return False  # another source feeds its channel
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
            self._w.events.append(
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
            self._w.speed = (t, speed)

    def _decode_into(
        self, channel: str, signal: str, t: float, pgn: int, data: bytes
    ) -> float | None:
        """Decode one signal into ``channel``; returns its value (None when not usable)."""
        try:
            sig = j1939.decode_detail(pgn, data)[signal]
        except j1939.DecodeError as e:
            # A frame we cannot read is a moment we know nothing about: a gap, not a guess.
            reject(self.stats, str(e))
            self._w.add(channel, t, None)
            return None
        self._push_signal(channel, t, sig, pgn)
        return sig.value

    def _on_eec1(self, t: float, can_id: int, data: bytes, mono: float) -> None:
        if not self._from_source(t, "engine_speed", can_id):
            return
        try:
            rpm = j1939.decode_detail(j1939.PGN_EEC1, data)["engine_speed_rpm"]
        except j1939.DecodeError as e:
            reject(self.stats, str(e))
            self._w.add("engine_rev", t, None)
            self._w.add("engine", t, None)
            return
        self._push_signal("engine_rev", t, rpm, j1939.PGN_EEC1)
        self._w.add("engine", t, self._engine_state(t, rpm.value))
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
            reject(self.stats, str(e))
            return
        if total is not None:
            self._lfc[self._w.window_index(t)] = total
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
            reject(self.stats, str(e))
            return
        if km is None:
            return
        if pgn == j1939.PGN_VDHR and not self._odo_hr:
            # A VD value taken before would step by up to 125 m against VDHR's.
            self._odo_hr = True
            self.stats.counters.pop("odometer", None)
        self._odo[self._w.window_index(t)] = km
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
            reject(self.stats, f"AddressClaimed: need 8 bytes, got {len(data)}")
            return
        change = self.engine.on_claim(can_id & 0xFF, data)
        contest = self.engine.last_contest
        if contest is not None:
            self._on_contest(t, contest)
        if change is None:
            return
        self.stats.engine_address_changes += 1
        name = self.engine.name
        self._w.events.append(
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
        self._w.events.append(
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
            reject(self.stats, str(e))
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
        self._w.events.append(
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
            reject(self.stats, str(e))
            return
        k = self._w.window_index(t)
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

    def _push_signal(self, channel: str, t: float, sig: j1939.Decoded, pgn: int) -> None:
        if sig.value is None:
            if sig.status == "error":
                # The ECU's own "error" value (0xFE..): its sensor's fault, not a frame we
                # could not read; a gap all the same.
                signal = CHANNEL_SIGNALS[channel]
                errors = self.stats.ecu_errors
                errors[signal] = errors.get(signal, 0) + 1
            else:
                reject(self.stats, f"PGN {pgn} {channel}: {sig.status}")
        self._w.add(channel, t, sig.value)

    def _engine_state(self, t: float, rpm: float | None) -> float | None:
        """Engine off / idle (running, vehicle stationary) / moving, or None if unknown.

        Idle needs a vehicle speed (J1939's CCVS, or the plug-in source feeding
        distance) no further than the wheel speed's gap rule from ``t``; without
        one a running engine's state is unknown, not guessed.
        """
        if rpm is None:
            return None
        if rpm < self.config.engine_running_rpm:
            return float(ENGINE_OFF)
        speed = self._w.speed  # from whichever source feeds distance_km
        if speed is None:
            return None
        ts, kmh = speed
        if kmh is None or abs(t - ts) > self.config.gap_of("wheel_speed"):
            return None
        return float(ENGINE_IDLE if kmh <= self.config.idle_max_kmh else ENGINE_MOVING)

    def annotate(self, reading: dict[str, Any], w: Window) -> None:
        """The window's LFC total-fuel counter, its odometer and, with a DBC, its extra
        signals' means."""
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

    def _take_extra(self, index: int) -> dict[str, float]:
        self._extra_closed = max(self._extra_closed, index)
        for k in [k for k in self._extra if k < index]:
            del self._extra[k]  # windows skipped by the integrator's guard
        bucket = self._extra.pop(index, {})
        return {name: total / n for name, (total, n) in bucket.items()}
