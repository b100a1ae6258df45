"""The deterministic core: CAN frames and kit messages in, 1-second readings out.

No I/O and no wall-clock reads: time comes only from the frames and kit
messages fed in, so the simulation can run it faster than real time and a
replay gives the same readings every time.

:class:`Pipeline` joins two halves:

* **decoding**, one small class per source: :class:`~cngmrv.agent.decode_j1939.J1939Decoder`
  (PGN dispatch, transport protocol, DM1, address claims, DBC extras),
  :class:`~cngmrv.agent.decode_kit.KitDecoder` (the kit's messages, over serial
  or, through :class:`~cngmrv.drivers.kit_can.KitCanDecoder`, over CAN), and
  any plug-in source's :class:`~cngmrv.agent.source.Decoder` (OBD-II's frames, GPS fixes);
* **windowing**, :class:`~cngmrv.agent.window.Windower`: sample buffers, the
  per-source watermark, the kit clock's anchoring and reading assembly.

Two sources run on different clocks.  CAN frames carry the bus timestamp; kit
messages carry the kit's millisecond tick, anchored to bus time by
:class:`~cngmrv.agent.window.KitClock`.  That needs the two sources fed in the
order they were received, as the runtime does; a kit message fed after frames
that came later is timed by them.  An outage of the CAN source is an event,
and it cuts the CAN channels with an explicit gap however short it was.

A reading holds diesel (L), gas from the kit's flow (kg) and from injection
events (kg), distance (km), energy and CO2 per fuel with the factors from the
configuration, the gas energy share, seconds per kit mode, idle seconds, the
tank's gas mass and refuels, and per channel the covered seconds and gaps
(docs/integrator.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from cngmrv.agent.decode_j1939 import J1939Decoder
from cngmrv.agent.decode_kit import INJECTION_TYPE, KitDecoder, injection_fields
from cngmrv.agent.pipeline_config import (
    CAN_CHANNELS,
    CHANNEL_SIGNALS,
    ENGINE_STATES,
    GAP_SIGNALS,
    MODE_STATES,
    FuelFactors,
    GasCalibration,
    PipelineConfig,
    PipelineStats,
    period_quantile,
    reject,
)
from cngmrv.agent.source import Decoder, FrameDecoder
from cngmrv.agent.window import Windower
from cngmrv.drivers.address import EngineTracker, SignalSource
from cngmrv.drivers.dbc import DbcSignals
from cngmrv.drivers.dm1 import Dm1
from cngmrv.drivers.j1939 import STANDARD_ID_FLAG, pgn_of
from cngmrv.drivers.kit_can import KitCanDecoder

__all__ = [
    "CAN_CHANNELS",
    "CHANNEL_SIGNALS",
    "ENGINE_STATES",
    "GAP_SIGNALS",
    "MODE_STATES",
    "INJECTION_TYPE",
    "DecoderFactory",
    "FuelFactors",
    "GasCalibration",
    "Pipeline",
    "PipelineConfig",
    "PipelineStats",
    "injection_fields",
    "period_quantile",
]

# Builds a plug-in source's decoder on the pipeline's windowing and counters (None: none).
DecoderFactory = Callable[[Windower, PipelineStats], Decoder | None]
D = TypeVar("D", bound=Decoder)

_MAX_CAN_ID = 0x1FFFFFFF


class Pipeline:
    """Feeds CAN frames and kit messages to their decoders and builds readings.

    ``dbc`` adds a DBC's signals (loaded by the caller: the core does no I/O);
    each reading then carries their per-window means under ``"extra"``.
    ``kit_can``: the kit's PropB frames on this bus, when the kit talks CAN.
    ``decoders``: plug-in sources reading this CAN bus (11-bit frames go only
    to them); a channel one of them feeds is no longer fed by J1939.
    """

    def __init__(
        self,
        config: PipelineConfig,
        boot_epoch: int = 0,
        clock: str = "unknown",
        kit_can: KitCanDecoder | None = None,
        dbc: DbcSignals | None = None,
        decoders: Sequence[DecoderFactory] = (),
    ):
        self.config = config
        self.kit_can = kit_can
        self.stats = PipelineStats()
        self.window = Windower(config, boot_epoch, clock)
        built = (make(self.window, self.stats) for make in decoders)
        self.plugins = [d for d in built if d is not None]
        self._frame_plugins = [d for d in self.plugins if isinstance(d, FrameDecoder)]
        # Channels fed by a source with a link of its own (GPS): a CAN outage does not cut them.
        self._off_can = {
            ch for d in self.plugins if not isinstance(d, FrameDecoder) for ch in d.channels
        }
        taken = [ch for d in self.plugins for ch in d.channels]
        if len(taken) != len(set(taken)):
            raise ValueError(f"two plug-in sources feed one channel: {sorted(taken)}")
        self.j1939 = J1939Decoder(config, self.window, self.stats, dbc, taken)
        self.kit = KitDecoder(config, self.window, self.stats)
        self._handlers = self.j1939.handlers
        self.window.src = self.j1939.signal_sources
        self.window.annotators = [
            self.kit.annotate,
            self.j1939.annotate,
            *(d.annotate for d in self.plugins),
        ]

    # -- state the runtime and the tests read ----------------------------

    @property
    def boot_epoch(self) -> int:
        return self.window.boot_epoch

    @property
    def clock(self) -> str:
        """The clock state stamped on each reading (the runtime updates it)."""
        return self.window.clock

    @clock.setter
    def clock(self, state: str) -> None:
        self.window.clock = state

    @property
    def events(self) -> list[dict[str, Any]]:
        """Events not yet handed over by :meth:`take_events`, oldest first."""
        return self.window.events

    @property
    def engine(self) -> EngineTracker:
        return self.j1939.engine

    @property
    def sources(self) -> dict[str, SignalSource]:
        """Per J1939 signal, where it is taken from."""
        return self.j1939.sources

    def plugin(self, kind: type[D]) -> D | None:
        """The plug-in source's decoder of class ``kind`` (its link feeds it), or None."""
        return next((d for d in self.plugins if isinstance(d, kind)), None)

    def dm1_active(self) -> dict[int, Dm1]:
        """The latest DM1 of each source address."""
        return self.j1939.dm1_active()

    def take_events(self) -> list[dict[str, Any]]:
        """The events since the last call, oldest first, handed over: a running agent
        stores them, and a pipeline that kept them all would grow for as long as it runs."""
        out, self.window.events = self.window.events, []
        return out

    # -- inputs ---------------------------------------------------------

    def on_can(self, t: float, can_id: int, data: bytes, mono: float | None = None) -> None:
        """One CAN frame with its bus timestamp ``t`` and monotonic receive time ``mono``.

        ``can_id`` is a 29-bit identifier, or an 11-bit one with
        :data:`~cngmrv.drivers.j1939.STANDARD_ID_FLAG` set.  ``mono`` defaults
        to ``t`` (right for a replay, whose timestamps are the only clock).
        Never raises: a frame that cannot be used is counted with its reason.
        """
        self.stats.frames += 1
        m = t if mono is None else mono
        if not 0 <= can_id <= _MAX_CAN_ID:
            if can_id & ~0x7FF == STANDARD_ID_FLAG and self._frame_plugins:
                for d in self._frame_plugins:
                    d.on_frame(t, can_id, data, m)
                self.window.saw_can(t, m)
                return
            reject(self.stats, f"CAN id {can_id:#x} is not a 29-bit identifier")
            return
        pgn = pgn_of(can_id)
        if self.kit_can is not None and self.kit_can.wants(pgn):
            for msg in self.kit_can.decode(t, can_id, data):
                self.kit.on_message(t, msg, mono)
        pgns = self.stats.pgns
        pgns[pgn] = pgns.get(pgn, 0) + 1
        handler = self._handlers.get(pgn)
        if handler is not None:
            handler(t, can_id, data, m)
        w = self.window
        if t > w.can_latest:
            w.can_latest = w.latest["can"] = t
            w.can_latest_mono = m

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
        self.kit.on_message(received_at, msg, mono)

    def on_injection(
        self,
        t: float,
        pulse_ms: float | None,
        rail_bar_abs: float | None,
        gas_temp_c: float | None,
    ) -> None:
        """One gas injection at ``t`` (already on the bus time base); see :class:`KitDecoder`."""
        self.kit.on_injection(t, pulse_ms, rail_bar_abs, gas_temp_c)

    def on_source_event(self, event: Mapping[str, Any]) -> None:
        """An event from the CAN source (``CAN_DOWN``, ``CAN_UP``, ``CAN_STATE``); kept with the readings.

        ``event`` must have ``t`` and ``kind``.  The caller passes it after the
        frames received before it and before those received after it.  On
        ``CAN_DOWN`` the CAN channels get an explicit gap from their latest
        sample on, so an outage shorter than ``can_max_gap_s`` is not bridged.
        """
        w = self.window
        w.events.append(dict(event))
        if event.get("kind") != "CAN_DOWN":
            return
        self.stats.can_outages += 1
        t = w.latest.get("can")
        if t is not None:
            # Just after the latest sample: the integrator rejects a repeated
            # timestamp, so a marker at exactly that time would not cut the span.
            cut = math.nextafter(t, math.inf)
            for channel in CAN_CHANNELS:
                if channel not in self._off_can:
                    w.add(channel, cut, None)

    # -- outputs --------------------------------------------------------

    def watermark(self) -> float | None:
        return self.window.watermark()

    def advance(self) -> list[dict[str, Any]]:
        """Readings for every window that all active sources have passed."""
        return self.window.advance()

    def finish(self) -> list[dict[str, Any]]:
        """Readings for every remaining window (end of run or shutdown)."""
        return self.window.finish()

    def counters(self) -> dict[str, Any]:
        return self.window.counters(self.stats)
