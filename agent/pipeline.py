"""The deterministic core: decoded signals in, 1-second readings out.

No I/O and no wall-clock reads: time comes only from the frames and kit
messages fed in, so the simulation can run it faster than real time and a
replay gives the same readings every time.

Two sources run on different clocks.  CAN frames carry the bus timestamp; kit
messages carry the kit's millisecond tick, which is precise for intervals but
has an unknown offset.  The offset is anchored to the latest bus time when the
first kit message arrives (or to the receive time before any CAN frame), and
re-anchored, with an event, only when the two drift apart by more than
``kit_resync_s``.

Protocol timers (the transport protocol's T1-T4) run on the monotonic time
each CAN frame carries (``mono``), never on the bus timestamp, which is wall
time and may step.  The engine is followed by its NAME through address claims
(:class:`~cngmrv.drivers.address.EngineTracker`): fuel rate, speed and engine
speed from any other ECU are counted as foreign and never integrated.  Each
change of an ECU's active DM1 trouble codes or lamps is an event; so is an
outage of the CAN source, which also cuts the CAN channels with an explicit
gap however short it was.

Readings are emitted when every *active* source has moved past the window end
plus the integrator's lateness (a per-source watermark, as in stream
processors), so a slow source cannot have its samples land in a window that
was already closed.  A source that falls ``stale_s`` behind the others stops
holding readings back; if it comes back its late samples are counted, not
integrated.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cngmrv.drivers import j1939
from cngmrv.drivers.address import EngineTracker
from cngmrv.drivers.dbc import DbcError, DbcSignals
from cngmrv.drivers.dm1 import Dm1, Dm1Error, decode_dm1
from cngmrv.drivers.j1939 import pgn_of
from cngmrv.drivers.kit_codec import MODE_DIESEL, MODE_DUAL, MODE_FAULT
from cngmrv.drivers.tp import TpMessage, TpReassembler
from cngmrv.native import ChannelSpec, Integrator, Window

log = logging.getLogger("cngmrv.pipeline")

PER_HOUR = 1.0 / 3600.0
MODE_NAMES = {MODE_DIESEL: "diesel", MODE_DUAL: "dual", MODE_FAULT: "fault"}


@dataclass(frozen=True)
class PipelineConfig:
    """Tunables of the core; the agent's config file maps onto these."""

    period_s: float = 1.0
    can_max_gap_s: float = 1.0
    kit_max_gap_s: float = 1.0
    engine_source_address: int = 0
    kit_resync_s: float = 10.0
    stale_s: float = 5.0
    engine_name: int | None = None  # pin the engine to this J1939 NAME (None: see EngineTracker)


@dataclass
class PipelineStats:
    frames: int = 0
    decode_errors: int = 0
    foreign_source: int = 0
    kit_messages: int = 0
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
    can_outages: int = 0
    extra: dict[str, list[float]] = field(default_factory=dict)  # DBC signal: [n, sum, min, max]


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
        dbc: DbcSignals | None = None,
    ):
        self.config = config
        self.boot_epoch = boot_epoch
        self.clock = clock
        can_gap, kit_gap = config.can_max_gap_s, config.kit_max_gap_s
        self._channels = (
            ChannelSpec("diesel_l", can_gap, PER_HOUR),
            ChannelSpec("distance_km", can_gap, PER_HOUR),
            ChannelSpec("gas_kg", kit_gap, PER_HOUR),
            # Mode indicators (1 while in that mode) integrate to seconds per mode,
            # with the same gap rules as the gas flow they qualify.
            *(ChannelSpec(f"mode_{name}", kit_gap, 1.0) for name in MODE_NAMES.values()),
        )
        self._integ = Integrator(self._channels, period=config.period_s)
        self.stats = PipelineStats()
        self.events: list[dict[str, Any]] = []
        self._latest: dict[str, float] = {}
        self._can_latest = -math.inf  # == self._latest["can"] once a frame came; read per frame
        self._kit_offset: float | None = None
        self._kit_last_tick: int | None = None
        self._kit_wraps = 0
        self.engine = EngineTracker(config.engine_source_address, config.engine_name)
        self._tp = TpReassembler()
        self.stats.tp = self._tp.counters
        self._tp_swept = -math.inf
        self._dm1: dict[int, Dm1] = {}
        self._dbc = dbc
        self._extra: dict[int, dict[str, list[float]]] = {}  # window index -> name -> [sum, n]
        self._extra_closed = -math.inf  # highest window index already emitted
        self._handlers: dict[int, Handler] = {
            j1939.PGN_LFE: self._on_lfe,
            j1939.PGN_CCVS: self._on_ccvs,
            j1939.PGN_EEC1: self._on_eec1,
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
        pgns = self.stats.pgns
        pgns[pgn] = pgns.get(pgn, 0) + 1
        handler = self._handlers.get(pgn)
        if handler is not None:
            handler(t, can_id, data, t if mono is None else mono)
        if t > self._can_latest:
            self._can_latest = self._latest["can"] = t

    @staticmethod
    def _chain(first: Handler | None, second: Handler) -> Handler:
        if first is None:
            return second

        def both(t: float, can_id: int, data: bytes, mono: float) -> None:
            first(t, can_id, data, mono)
            second(t, can_id, data, mono)

        return both

    def _from_engine(self, can_id: int) -> bool:
        if can_id & 0xFF == self.engine.address:
            return True
        # Another ECU's fuel rate or speed must never be mixed into the engine's.
        self.stats.foreign_source += 1
        return False

    def _on_lfe(self, t: float, can_id: int, data: bytes, mono: float) -> None:
        if self._from_engine(can_id):
            self._decode_into("diesel_l", "fuel_rate_lph", t, j1939.PGN_LFE, data)

    def _on_ccvs(self, t: float, can_id: int, data: bytes, mono: float) -> None:
        if self._from_engine(can_id):
            self._decode_into("distance_km", "wheel_speed_kmh", t, j1939.PGN_CCVS, data)

    def _decode_into(self, channel: str, signal: str, t: float, pgn: int, data: bytes) -> None:
        try:
            sig = j1939.decode_detail(pgn, data)[signal]
        except j1939.DecodeError as e:
            # A frame we cannot read is a moment we know nothing about: a gap, not a guess.
            self._reject(str(e))
            self._integ.push_one(channel, t, 0.0, False)
            return
        self._push_signal(channel, t, sig, pgn)

    def _on_eec1(self, t: float, can_id: int, data: bytes, mono: float) -> None:
        if not self._from_engine(can_id):
            return
        try:
            rpm = j1939.decode(j1939.PGN_EEC1, data)["engine_speed_rpm"]
        except j1939.DecodeError as e:
            self._reject(str(e))
            return
        if rpm is None:
            return
        s = self.stats
        s.rpm_n += 1
        s.rpm_sum += rpm
        if s.rpm_min is None or rpm < s.rpm_min:
            s.rpm_min = rpm
        if s.rpm_max is None or rpm > s.rpm_max:
            s.rpm_max = rpm

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
            for channel in ("diesel_l", "distance_km"):
                self._integ.push_one(channel, t, 0.0, False)

    def _push_signal(self, channel: str, t: float, sig: j1939.Decoded, pgn: int) -> None:
        if sig.value is None:
            self._reject(f"PGN {pgn} {channel}: {sig.status}")
            self._integ.push_one(channel, t, 0.0, False)
        else:
            self._integ.push_one(channel, t, sig.value, True)

    def on_kit(self, received_at: float, msg: Mapping[str, Any]) -> None:
        """One decoded kit message; ``received_at`` is used only before any CAN time exists."""
        if msg.get("type") != "status":
            return
        self.stats.kit_messages += 1
        t = self._kit_time(int(msg["tick_ms"]), received_at)
        flow = msg.get("gas_flow_kgph")
        self._integ.push_one("gas_kg", t, 0.0 if flow is None else float(flow), flow is not None)
        mode = msg.get("mode")
        for code, name in MODE_NAMES.items():
            self._integ.push_one(f"mode_{name}", t, 1.0 if mode == code else 0.0, mode is not None)
        self._latest["kit"] = max(t, self._latest.get("kit", t))

    def _kit_time(self, tick_ms: int, received_at: float) -> float:
        if self._kit_last_tick is not None and tick_ms < self._kit_last_tick - (1 << 31):
            self._kit_wraps += 1
        self._kit_last_tick = tick_ms
        tick_s = (tick_ms + (self._kit_wraps << 32)) / 1000.0
        reference = self._latest.get("can", received_at)
        if self._kit_offset is None:
            self._kit_offset = reference - tick_s
        elif abs(self._kit_offset + tick_s - reference) > self.config.kit_resync_s:
            old = self._kit_offset
            self._kit_offset = reference - tick_s
            self.stats.kit_reanchors += 1
            self.events.append(
                {"t": reference, "kind": "KIT_CLOCK_REANCHORED", "shift_s": self._kit_offset - old}
            )
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
        return [] if wm is None else [self._reading(w) for w in self._integ.pop(wm)]

    def finish(self) -> list[dict[str, Any]]:
        """Readings for every remaining window (end of run or shutdown)."""
        return [self._reading(w) for w in self._integ.flush()]

    def counters(self) -> dict[str, Any]:
        return {**self._integ.counters, "frames": self.stats.frames}

    def _reading(self, w: Window) -> dict[str, Any]:
        ch = w.channels
        gaps = {
            name: [c.gaps, round(c.longest_gap_s, 3)]
            for name, c in ch.items()
            if c.gaps and not name.startswith("mode_")
        }
        reading: dict[str, Any] = {
            "t0": w.t0,
            "dur": w.t1 - w.t0,
            "epoch": self.boot_epoch,
            "clock": self.clock,
            "diesel_l": ch["diesel_l"].integral,
            "gas_kg": ch["gas_kg"].integral,
            "distance_km": ch["distance_km"].integral,
            "cov": {
                "diesel_l": ch["diesel_l"].covered_s,
                "gas_kg": ch["gas_kg"].covered_s,
                "distance_km": ch["distance_km"].covered_s,
            },
            "mode_s": {name: ch[f"mode_{name}"].integral for name in MODE_NAMES.values()},
        }
        if gaps:
            reading["gaps"] = gaps
        if self._dbc is not None:
            reading["extra"] = self._take_extra(w.index)
        return reading

    def _take_extra(self, index: int) -> dict[str, float]:
        self._extra_closed = max(self._extra_closed, index)
        for k in [k for k in self._extra if k < index]:
            del self._extra[k]  # windows skipped by the integrator's guard
        bucket = self._extra.pop(index, {})
        return {name: total / n for name, (total, n) in bucket.items()}
