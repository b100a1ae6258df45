"""Decoding the CNG kit's messages: STATUS into gas, mode and tank samples, the rest into events.

Pure: no I/O and no wall-clock reads.  The messages are the kit codec's
(:mod:`cngmrv.drivers.kit_codec`, docs/kit-protocol.md), whether they came
over the serial link or as PropB frames on the CAN bus
(:class:`~cngmrv.drivers.kit_can.KitCanDecoder`), plus the serial reader's
link markers.  Kit time is put on bus time by :class:`~cngmrv.agent.window.KitClock`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from cngmrv.agent.pipeline_config import (
    ATMOSPHERE_BAR,
    KELVIN,
    PipelineConfig,
    PipelineStats,
    reject,
)
from cngmrv.agent.window import KitClock, Windower
from cngmrv.native import Window

log = logging.getLogger("cngmrv.pipeline")

# The kit protocol's injection-event message (docs/kit-protocol.md, INJECTION).  Only this constant and
# injection_fields() know its layout; everything after works on plain numbers.
INJECTION_TYPE = "injection"

# The integrator channels the kit feeds.
KIT_CHANNELS = ("gas_kg", "gas_kg_events", "mode", "tank")


def injection_fields(msg: Mapping[str, Any]) -> tuple[float | None, float | None, float | None]:
    """(pulse width ms, absolute rail pressure bar, gas temperature °C) of a kit
    injection message; None where the kit reported the field as not available."""

    def num(key: str) -> float | None:
        v = msg.get(key)
        return None if v is None else float(v)

    return num("pulse_ms"), num("rail_bar"), num("gas_temp_c")


def _pick(msg: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: msg.get(k) for k in keys}


class KitDecoder:
    """Kit messages and link markers into samples, events and per-window kit flags.

    STATUS feeds the gas and mode channels and the tank; MODE, FAULT and a
    changed kit HELLO become events; INJECTION events feed the event-based
    gas channel; link markers open and close outages, which readings report
    as ``kit_down_s`` (:meth:`annotate`, with ``kit_faults`` and ``kit_suspect``).
    A tank pressure that stays bit-identical while the kit's gas counter rises
    by ``kit_stuck_gas_kg`` is a stuck sensor (``KIT_SENSOR_STUCK``).
    """

    def __init__(self, config: PipelineConfig, window: Windower, stats: PipelineStats) -> None:
        self.config = config
        self._w = window
        self.stats = stats
        self.clock = KitClock(window, stats)
        # Kit link outages in pipeline time: the open one starts at the last
        # kit message before it and ends at the first one after the link is up.
        self._down: float | None = None
        self._up_pending = False
        self._outages: list[tuple[float, float]] = []
        self._hello: tuple[Any, ...] | None = None
        # Per window index: OR of the kit's fault bitmaps, and suspect sensors.
        self._win_faults: dict[int, int] = {}
        self._win_suspect: dict[int, set[str]] = {}
        self._tank_watch: tuple[float, float, float] | None = None  # value, gas total, since
        self._tank_stuck = False

    def on_message(
        self, received_at: float, msg: Mapping[str, Any], mono: float | None = None
    ) -> None:
        """One decoded kit message or link marker (see :meth:`Pipeline.on_kit`)."""
        kind = msg.get("type")
        if kind == "link":
            self._on_link(received_at, msg)
            return
        w = self._w
        self.stats.kit_messages += 1
        tick = msg.get("tick_ms")
        if not isinstance(tick, int):
            reject(self.stats, f"kit {kind} message without tick_ms")
            return
        t = self.clock.time(tick, received_at, received_at if mono is None else mono)
        if self._up_pending and self._down is not None:
            self._outages.append((self._down, t))
            w.events.append({"t": t, "kind": "KIT_LINK_UP", "down_s": t - self._down})
            self._down, self._up_pending = None, False
        if kind == "status":
            self._on_status(t, msg)
        elif kind == INJECTION_TYPE:
            self.stats.kit_injections += 1
            self.on_injection(t, *injection_fields(msg))
        elif kind == "mode":
            w.events.append(
                {"t": t, "kind": "KIT_MODE", **_pick(msg, ("mode", "previous", "reason"))}
            )
        elif kind == "fault":
            w.events.append(
                {"t": t, "kind": "KIT_FAULT", **_pick(msg, ("code", "active", "faults"))}
            )
        elif kind == "hello":
            self._on_hello(t, msg)
        else:
            self.stats.kit_unknown += 1
        w.latest["kit"] = max(t, w.latest.get("kit", t))

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
        self._w.add("gas_kg_events", t, pulse_ms, rail_bar_abs, temp_k)

    def _on_status(self, t: float, msg: Mapping[str, Any]) -> None:
        self.stats.kit_status += 1
        self._status_samples(t, msg)
        k = self._w.window_index(t)
        faults = msg.get("faults")
        if faults:
            self._win_faults[k] = self._win_faults.get(k, 0) | int(faults)
        self._watch_tank(t, msg.get("tank_bar"), msg.get("gas_total_kg"))
        if self._tank_stuck:
            self._win_suspect.setdefault(k, set()).add("tank_bar")

    def _status_samples(self, t: float, msg: Mapping[str, Any]) -> None:
        add = self._w.add
        flow = msg.get("gas_flow_kgph")
        add("gas_kg", t, None if flow is None else float(flow))
        mode = msg.get("mode")
        add("mode", t, None if mode is None else float(mode))
        bar, temp_c = msg.get("tank_bar"), msg.get("gas_temp_c")
        if bar is not None and self.config.gas.tank_pressure_gauge:
            bar = float(bar) + ATMOSPHERE_BAR
        add(
            "tank",
            t,
            None if bar is None else float(bar),
            None if temp_c is None else float(temp_c) + KELVIN,
        )

    def _watch_tank(self, t: float, tank: Any, total: Any) -> None:
        """Flag a tank pressure reading that stays bit-identical while gas is used."""
        if tank is None or total is None:
            return
        watch = self._tank_watch
        events = self._w.events
        if watch is None or tank != watch[0] or total < watch[1]:
            if self._tank_stuck:
                self._tank_stuck = False
                events.append({"t": t, "kind": "KIT_SENSOR_RECOVERED", "sensor": "tank_bar"})
            self._tank_watch = (tank, total, t)
        elif not self._tank_stuck and total - watch[1] >= self.config.kit_stuck_gas_kg:
            self._tank_stuck = True
            events.append(
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

    def _on_hello(self, t: float, msg: Mapping[str, Any]) -> None:
        fields = ("role", "max_version", "kit_id", "fw_major", "fw_minor", "fw_patch",
                  "status_period_ms", "injectors", "inj_flow", "inj_dead_ms", "capabilities")  # fmt: skip
        hello = _pick(msg, fields)
        identity = (msg.get("version"), *hello.values())
        # A kit repeats HELLO every 10 s; only a new or changed one is news.
        if identity != self._hello:
            self._hello = identity
            self._w.events.append(
                {"t": t, "kind": "KIT_HELLO", "version": msg.get("version"), **hello}
            )

    def _on_link(self, received_at: float, msg: Mapping[str, Any]) -> None:
        latest = self._w.latest
        state = msg.get("state")
        if state == "down" and self._down is None:
            since = latest.get("kit", latest.get("can", received_at))
            self._down, self._up_pending = since, False
            self.stats.kit_outages += 1
            self._w.events.append(
                {"t": since, "kind": "KIT_LINK_DOWN", "reason": str(msg.get("reason", ""))}
            )
        elif state == "up" and self._down is not None:
            self._up_pending = True
            # The kit is back: count it as an active source again at once, so
            # the other sources cannot close the windows its first samples
            # after the outage belong to before they arrive.
            newest = max(latest.values())
            latest["kit"] = max(latest.get("kit", newest), newest - self.config.stale_s)

    def annotate(self, reading: dict[str, Any], w: Window) -> None:
        """Outage seconds, fault bits and suspect sensors of the kit in one window."""
        t0, t1 = w.t0, w.t1
        down = 0.0
        for a, b in self._outages:
            down += max(0.0, min(b, t1) - max(a, t0))
        if self._down is not None:
            down += max(0.0, t1 - max(self._down, t0))
        # Readings come out in time order, so outages that ended are done with.
        self._outages = [o for o in self._outages if o[1] > t1]
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
