"""GPS: a receiver's RMC sentences, its UTC for the clock check and its speed for distance.

A plug-in source (agent/source.py), registered as ``gps`` in ``cngmrv.sources``;
its keys are the ``[gps]`` section.  One reader of the port
(:class:`~cngmrv.drivers.gps.GpsReader`) serves both uses: the clock check
(``clock.source = "gps"``, :mod:`cngmrv.agent.clock`) takes its latest valid
fix, and the pipeline takes every fix in the order it was received.

Speed over ground feeds ``distance_km`` only with ``wheel_speed = true`` (off
by default, so the engine's own speed is never silently replaced): for a bus
whose CAN bus carries no wheel speed.  J1939's CCVS (and OBD-II's speed) then
no longer feed that channel, as for OBD-II (docs/obd.md).  A fix is stamped on
the bus's timeline at the moment its line arrived
(:meth:`~cngmrv.agent.window.Windower.bus_time`), not at the fix's own UTC, so
the speed lags by the receiver's latency (a few hundred ms, nearly constant);
a sentence without a valid fix is a gap, never a guess.  At the usual 1 Hz a
fix is due every second, so ``max_gap_s`` (1.5 s) bridges the jitter of
arrival but not a lost fix.  The facts relied on: docs/gps.md.

Older configs named the port in the ``[clock]`` section (``clock.gps_port``,
``clock.gps_baudrate``); they are read as ``gps.port`` and ``gps.baudrate``
when ``[gps]`` names no port.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from cngmrv.agent.builtin_sources import LinkContext
from cngmrv.agent.checks import positive
from cngmrv.agent.pipeline import Pipeline
from cngmrv.agent.pipeline_config import PipelineStats
from cngmrv.agent.source import ConfigProblem, Decoder, Key, Link, Source
from cngmrv.agent.window import Windower
from cngmrv.drivers.gps import Fix, GpsReader

# The older config's keys read in place of this section's (gps key -> clock key).
OLDER_KEYS = {"port": "clock.gps_port", "baudrate": "clock.gps_baudrate"}


class GpsDecoder(Decoder):
    """Fixes into speed samples of ``distance_km`` (when ``feeds_speed``), and their counts."""

    def __init__(self, window: Windower, stats: PipelineStats, feeds_speed: bool) -> None:
        self._w = window
        self.channels = ("distance_km",) if feeds_speed else ()
        self.counters = stats.plugins.setdefault("gps", {"speed_samples": 0, "speed_gaps": 0})
        self._last = -math.inf

    def on_fix(self, received_at: float, fix: Fix, mono: float) -> None:
        """One fix received at ``mono`` (``received_at`` on the bus's timeline, see
        :meth:`~cngmrv.agent.window.Windower.bus_time`)."""
        if not self.channels:
            return
        # Two fixes fed before the next frame would share a time; the integrator takes
        # each sample at a later time than the one before.
        t = max(self._w.bus_time(received_at, mono), math.nextafter(self._last, math.inf))
        self._last = t
        kmh = fix.speed_kmh if fix.valid else None
        self.counters["speed_samples" if kmh is not None else "speed_gaps"] += 1
        self._w.add("distance_km", t, kmh)
        self._w.speed = (t, kmh)


class GpsLink(Link):
    """The receiver's serial port: fixes stamped on the monotonic clock, for the decoder."""

    name: ClassVar[str] = "gps"

    def __init__(self, reader: GpsReader, ctx: LinkContext) -> None:
        self.reader = reader
        self._ctx = ctx

    def start(self) -> None:
        self.reader.start()

    def stop(self) -> None:
        self.reader.stop()

    def take(self, timeout: float) -> list[tuple[float, Fix]]:
        return self.reader.drain()

    def mono(self, item: tuple[float, Fix]) -> float:
        return item[0]

    def feed(self, pipeline: Pipeline, items: list[tuple[float, Fix]]) -> None:
        decoder = pipeline.plugin(GpsDecoder)
        if decoder is None or not items:
            return
        to_wall = self._ctx.to_wall()
        for mono, fix in items:
            decoder.on_fix(mono + to_wall, fix, mono)

    def pending(self) -> int:
        return self.reader.pending()

    @property
    def stats(self) -> dict[str, Any]:
        stats = self.reader.stats
        return {**stats, "rejected": dict(stats["rejected"])}


def _max_gap(v: Any) -> str | None:
    return None if 0 < v <= 10.0 else "must be > 0 and at most 10 s"


class Gps(Source):
    """The ``[gps]`` section: a GPS receiver on a serial port."""

    KEYS: ClassVar[Mapping[str, Key]] = {
        "port": (str, "", None),  # "" = no receiver (unless the older clock.gps_port names one)
        "baudrate": (int, 9600, positive),
        "reconnect_s": (float, 2.0, positive),  # wait before reopening a failed port
        "queue_size": (int, 1000, positive),
        # RMC's speed over ground feeds distance_km instead of J1939's CCVS: off by default.
        "wheel_speed": (bool, False, None),
        "max_gap_s": (float, 1.5, _max_gap),  # longest interval between fixes bridged
    }
    CHANNELS = ("distance_km",)

    def __init__(self, values: Mapping[str, Any]) -> None:
        super().__init__(values)
        self._reader: GpsReader | None = None

    @classmethod
    def settle(cls, name: str, values: Mapping[str, Any], base: Path) -> dict[str, Any]:
        own = super().settle(name, values, base)
        if values[OLDER_KEYS["port"]]:
            if own["port"]:
                raise ConfigProblem(
                    f"{OLDER_KEYS['port']}: must be empty when {name}.port is set"
                    " (one reader of the GPS port; name it once, as gps.port)"
                )
            own.update({key: values[old] for key, old in OLDER_KEYS.items()})
        if values["clock.source"] == "gps" and not own["port"]:
            raise ConfigProblem(
                f"{name}.port: required when clock.source = 'gps'"
                f" (or {OLDER_KEYS['port']}, its older name)"
            )
        if own["wheel_speed"] and not own["port"]:
            raise ConfigProblem(f"{name}.wheel_speed: needs {name}.port (the receiver)")
        return own

    @property
    def enabled(self) -> bool:
        return bool(self.values.get("port"))

    @property
    def feeds(self) -> tuple[str, ...]:
        return self.CHANNELS if self.values["wheel_speed"] else ()

    @property
    def max_gap_s(self) -> Mapping[str, float]:
        return {"wheel_speed": self.values["max_gap_s"]} if self.values["wheel_speed"] else {}

    @property
    def reader(self) -> GpsReader:
        """The one reader of the port (the link starts and stops it)."""
        if self._reader is None:
            v = self.values
            self._reader = GpsReader(v["port"], v["baudrate"], v["reconnect_s"], v["queue_size"])
        return self._reader

    def decoder(self, window: Windower, stats: PipelineStats) -> GpsDecoder:
        return GpsDecoder(window, stats, bool(self.values["wheel_speed"]))

    def link(self, ctx: LinkContext) -> GpsLink:
        return GpsLink(self.reader, ctx)

    def utc_reference(self) -> GpsReader:
        return self.reader
