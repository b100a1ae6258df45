"""The windowing half of the deterministic core: samples in, 1-second readings out.

The decoders (:mod:`cngmrv.agent.decode_j1939`, :mod:`cngmrv.agent.decode_kit`
and any plug-in source's) turn their inputs into samples of named integrator
channels and hand them to :meth:`Windower.add`; this module buffers them,
keeps the per-source watermark, anchors the kit's clock to bus time, and
assembles each closed window into a reading.  No I/O and no wall-clock reads.

Readings are emitted when every *active* source has moved past the window end
plus the integrator's lateness (a per-source watermark, as in stream
processors), so a slow source cannot have its samples land in a window that
was already closed.  A source that falls ``stale_s`` behind the others stops
holding readings back; if it comes back its late samples are counted, not
integrated.

Decoded samples are buffered per channel and handed to the C integrator in
one call per channel just before each pop (and whenever a buffer reaches
``MAX_BUFFERED``), not one call per sample.  The integrator's results do not
depend on how its input is cut into calls, so this changes no reading.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable
from typing import Any

from cngmrv.agent.pipeline_config import (
    ENGINE_STATES,
    KIT_REBOOT_BACKSTEP_MS,
    MODE_STATES,
    PER_HOUR,
    PER_MINUTE,
    FuelFactors,
    PipelineConfig,
    PipelineStats,
)
from cngmrv.native import (
    ChannelSpec,
    EventSpec,
    FuelSpec,
    Integrator,
    StateSpec,
    TankSpec,
    Window,
)

# Samples held per channel before they go to the integrator in one call; a
# bound on memory, and far more than one poll's worth at full bus load.
MAX_BUFFERED = 4096

# Adds a source's own fields to a reading of one closed window (kit flags, LFC, DBC extras).
Annotator = Callable[[dict[str, Any], Window], None]


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


class Windower:
    """Buffers samples per channel, keeps the watermark and builds readings.

    ``latest`` holds each source's newest time (``"can"``, ``"kit"``, …): the
    watermark is the oldest of the active ones.  ``events`` is the core's one
    event list, appended to by every decoder and handed over by
    :meth:`~cngmrv.agent.pipeline.Pipeline.take_events`.  ``annotators`` add a
    source's own fields to each reading, in order; ``src`` gives the source
    address each signal is taken from (the reading's ``"src"``).
    """

    def __init__(self, config: PipelineConfig, boot_epoch: int = 0, clock: str = "unknown"):
        self.config = config
        self.boot_epoch = boot_epoch
        self.clock = clock
        self.integ = Integrator(
            channel_specs(config), period=config.period_s, fuels=fuel_specs(config.fuel)
        )
        # Per channel: its buffer and, for the kinds with several values per
        # sample, the integrator method that takes them (else Integrator.push).
        multi: dict[str, tuple[int, Callable[..., None]]] = {
            "gas_kg_events": (3, self.integ.push_events),  # pulse, P, T
            "tank": (2, self.integ.push_tank),  # P, T
        }
        self._columns: dict[str, tuple[_Column, Callable[..., None] | None]] = {}
        for name in self.integ.channel_names:
            width, push = multi.get(name, (1, None))
            self._columns[name] = (_Column(width), push)
        self.events: list[dict[str, Any]] = []
        self.latest: dict[str, float] = {}
        self.can_latest = -math.inf  # == latest["can"] once a frame came; read per frame
        self.can_latest_mono = -math.inf  # when that frame was received
        self.annotators: list[Annotator] = []
        self.src: Callable[[], dict[str, int | None]] = dict
        # The vehicle's latest speed (bus time, km/h or None), from whichever source feeds
        # distance_km: engine samples are classified off / idle / moving against it.
        self.speed: tuple[float, float | None] | None = None

    def window_index(self, t: float) -> int:
        return math.floor(t / self.config.period_s)

    def bus_time(self, received_at: float, mono: float) -> float:
        """The bus time of an input received at ``mono`` (the CAN frames' receive clock).

        The latest frame's bus time plus the receive-clock time since it came,
        never below that frame's time; ``received_at`` (the receive time on the
        bus's timeline) before any frame came.  While the CAN source is out its
        latest time stands still and the receive clock carries it on.
        """
        can_t = self.latest.get("can")
        if can_t is None:
            return received_at
        return can_t + max(0.0, mono - self.can_latest_mono)

    def saw_can(self, t: float, mono: float) -> None:
        """A CAN frame of bus time ``t`` received at ``mono`` moves the CAN source on."""
        if t > self.can_latest:
            self.can_latest = self.latest["can"] = t
            self.can_latest_mono = mono

    def add(self, channel: str, t: float, *values: float | None) -> None:
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
            self.drain(channel)

    def drain(self, channel: str | None = None) -> None:
        """Hands buffered samples to the integrator, one call per channel."""
        names = self._columns if channel is None else (channel,)
        for name in names:
            col, push = self._columns[name]
            if not len(col):
                continue
            if push is None:
                self.integ.push(name, col.t, col.values[0], col.ok)
            else:
                push(name, col.t, *col.values, col.ok)
            col.clear()

    def watermark(self) -> float | None:
        if not self.latest:
            return None
        newest = max(self.latest.values())
        active = [v for v in self.latest.values() if v >= newest - self.config.stale_s]
        return min(active)

    def advance(self) -> list[dict[str, Any]]:
        """Readings for every window that all active sources have passed."""
        wm = self.watermark()
        if wm is None:
            return []
        self.drain()
        return [self.reading(w) for w in self.integ.pop(wm)]

    def finish(self) -> list[dict[str, Any]]:
        """Readings for every remaining window (end of run or shutdown)."""
        self.drain()
        return [self.reading(w) for w in self.integ.flush()]

    def counters(self, stats: PipelineStats) -> dict[str, Any]:
        return {
            **self.integ.counters,
            "rejected_by_channel": self.integ.rejected_by_channel,
            "frames": stats.frames,
        }

    def reading(self, w: Window) -> dict[str, Any]:
        """One closed window as a reading (its fields: docs/integrator.md)."""
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
            "src": self.src(),
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
        for annotate in self.annotators:
            annotate(reading, w)
        return reading


class KitClock:
    """The kit's millisecond tick on bus time.

    The tick is precise for intervals but has an unknown offset.  The offset is
    anchored to the latest bus time when the first kit message arrives (or to
    the receive time before any CAN frame), and re-anchored, with an event,
    only when the two drift apart by more than ``kit_resync_s``, or when the
    tick goes back (a restart).  "Bus time" for a kit message is the latest
    frame's time plus the receive-clock time since that frame came (both
    sources are stamped on one monotonic clock), so a CAN outage alone never
    drags the kit's time back to the last frame.
    """

    def __init__(self, window: Windower, stats: PipelineStats) -> None:
        self._w = window
        self._stats = stats
        self.offset: float | None = None
        self._last_tick: int | None = None
        self._wraps = 0

    def time(self, tick_ms: int, received_at: float, mono: float) -> float:
        """The bus time of a kit message with tick ``tick_ms``, received at ``received_at``/``mono``."""
        w = self._w
        last_tick, rebooted = self._last_tick, False
        if last_tick is not None and tick_ms < last_tick - (1 << 31):
            self._wraps += 1
        elif last_tick is not None and tick_ms < last_tick - KIT_REBOOT_BACKSTEP_MS:
            # Ticks a little out of order are the kit's own (an injection is
            # sent after its pulse); more than a second back is a restart.  It
            # is re-anchored at once: one soon after the last anchor would
            # otherwise hide inside kit_resync_s, and its samples fall behind.
            self._wraps, rebooted = 0, True
        self._last_tick = tick_ms
        tick_s = (tick_ms + (self._wraps << 32)) / 1000.0
        # A message received just before the latest frame, or from a caller with no
        # receive clock to give, gets that frame's time.
        reference = w.bus_time(received_at, mono)
        if self.offset is None:
            self.offset = reference - tick_s
        elif rebooted or abs(self.offset + tick_s - reference) > w.config.kit_resync_s:
            old = self.offset
            self.offset = reference - tick_s
            self._stats.kit_reanchors += 1
            w.events.append(
                {"t": reference, "kind": "KIT_CLOCK_REANCHORED", "shift_s": self.offset - old}
            )
            # The kit's earlier times are on the old anchor; kept as its latest,
            # a backward shift would hold the kit "ahead" and let it alone close
            # windows the other sources still have samples for.
            w.latest.pop("kit", None)
        return self.offset + tick_s


def channel_specs(config: PipelineConfig) -> list[Any]:
    """The integrator's channels, with the gap rules and calibration of ``config``."""
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


def fuel_specs(f: FuelFactors) -> list[FuelSpec]:
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
