"""The running agent: sources → pipeline → store → sealed batches → uploader.

This is the I/O shell around the deterministic :class:`Pipeline`.  Its one
loop reads whatever the CAN and kit sources queued, feeds the pipeline and
hands the readings it returns to the :class:`Recorder`, which buffers them
for a few seconds, commits, seals a batch every ``readings_per_batch``
readings and wakes the uploader thread.  Building an Agent runs the store's
start-up sequence (boot epoch, ``quick_check``, leftovers, signed BOOT).
:meth:`Agent.close` flushes the partial window, seals what is left with a
signed STOP and gives the uploader a bounded time to drain; nothing committed
is lost if it runs out, the batches simply stay pending for the next start.
"""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_right
from collections import Counter, deque
from collections.abc import Callable
from operator import itemgetter
from typing import Any

from cngmrv.agent.clock import ClockMonitor, FixedClock
from cngmrv.agent.config import Config, open_signer
from cngmrv.agent.pipeline import Pipeline
from cngmrv.agent.recorder import Recorder, RecorderConfig
from cngmrv.agent.store import Sealed, Store
from cngmrv.agent.upload import Uploader
from cngmrv.drivers.can_source import Frame, make_source
from cngmrv.drivers.dbc import DbcSignals
from cngmrv.drivers.kit_can import DEFAULT_DBC, KitCanDecoder
from cngmrv.drivers.kit_link import KitSerialSource

log = logging.getLogger("cngmrv.agent")

WALL_STAMPED = frozenset({"socketcan", "udp_multicast"})  # kernel receive time = wall clock


def recorder_config(config: Config) -> RecorderConfig:
    """The recorder's settings from the agent's config."""
    return RecorderConfig(
        readings_per_batch=config.readings_per_batch,
        buffer_s=config.store_buffer_s,
        period_s=config.pipeline.period_s,
        quota_bytes=config.store_quota_bytes,
        alarm_fraction=config.store_alarm_fraction,
        drop_fraction=config.store_drop_fraction,
    )


class Agent:
    """One device's agent, built from a validated :class:`Config`."""

    def __init__(self, config: Config, clock: str | ClockMonitor | None = None) -> None:
        """``clock``: a state to assert (the simulator's), a monitor, or None for the config's."""
        self.config = config
        self.signer = open_signer(config)
        if clock is None:
            clock = ClockMonitor.from_settings(config.clock)
        self.clock = FixedClock(clock) if isinstance(clock, str) else clock
        self.clock.poll()  # the first poll only sets the state and the step baseline
        clock = self.clock.state
        self.recorder = Recorder(
            config.store_path, config.device_id, self.signer, recorder_config(config), clock=clock
        )
        self.boot = self.recorder.start()
        self.boot_epoch = self.boot.epoch
        kit_can = None
        if config.kit_transport == "can":
            kit_can = KitCanDecoder(config.kit_dbc or DEFAULT_DBC, config.kit_can_source_address)
        dbc = DbcSignals(config.can_dbc) if config.can_dbc else None
        self.pipeline = Pipeline(config.pipeline, self.boot_epoch, clock, kit_can=kit_can, dbc=dbc)
        self.can = make_source(config.can_source)
        # True when the bus stamps frames with the kernel's wall clock, which
        # steps (see ClockMonitor.rebase); a replay or the simulator's
        # preserved timestamps are their own timeline.
        self.rebase_can_time = config.can_interface in WALL_STAMPED
        self._can_seen = 0  # frames handed to the pipeline, to place source events among them
        self._can_events: deque[dict[str, Any]] = deque()
        self.kit = (
            KitSerialSource(
                config.kit_port,
                config.kit_baudrate,
                read_timeout=config.kit_read_timeout_s,
                queue_size=config.kit_queue_size,
                reconnect_backoff=config.kit_reconnect_s,
                handshake=config.kit_handshake,
            )
            if config.kit_port
            else None
        )
        self.uploader = (
            Uploader(
                lambda: self.recorder.store,
                config.upload_url,
                timeout=config.upload_timeout_s,
                base_s=config.upload_backoff_base_s,
                cap_s=config.upload_backoff_cap_s,
            )
            if config.upload_url
            else None
        )
        self.recorder.on_sealed = self._sealed
        self.readings = 0
        # Events stored this run, by kind (the events themselves go to the store).
        self.event_counts: Counter[str] = Counter()
        self.totals = {"diesel_l": 0.0, "gas_kg": 0.0, "distance_km": 0.0}

    @property
    def store(self) -> Store:
        """The store in use (the recorder replaces a damaged one)."""
        return self.recorder.store

    def _sealed(self, _: Sealed) -> None:
        if self.uploader:
            self.uploader.notify()

    @property
    def sealed(self) -> list[int]:
        """Sequences of the batches this run sealed (the boot batch included)."""
        return self.recorder.sealed

    def start(self) -> None:
        self.can.start()
        if self.kit:
            self.kit.start()
        if self.uploader:
            self.uploader.start()
        log.info(
            "event=agent_started device=%s epoch=%d kid=%s",
            self.config.device_id,
            self.boot_epoch,
            self.signer.kid[:16],
        )

    def poll(self, timeout: float = 0.05) -> int:
        """Process what the sources queued (waiting up to ``timeout``); returns inputs handled."""
        self._poll_clock()
        frames = self.can.wait(timeout)
        if self.rebase_can_time and frames:
            frames = self.clock.rebase(frames, self._poll_clock)
        n = len(frames)
        done = 0
        if self.kit:
            # The kit source stamps with the monotonic clock, as the CAN source
            # does (the pipeline ties the two clocks through it); the pipeline
            # also wants epoch seconds for its pre-CAN anchor, on the step-free
            # timeline when the CAN time is rebased.
            to_wall = self.clock.base if self.rebase_can_time else time.time() - time.monotonic()
            for received, msg in self.kit.drain():
                # Each kit message goes in after the frames received before it
                # and before those received after it: the pipeline times the
                # kit by the latest frame, and a pass can hold seconds of bus
                # time (a simulator unpaced, a loop that stalled).
                upto = bisect_right(frames, received, lo=done, key=itemgetter(3))
                self._feed_can(frames[done:upto])
                done = upto
                self.pipeline.on_kit(received + to_wall, msg, received)
                n += 1
        self._feed_can(frames[done:] if done else frames)
        self._commit(self.pipeline.advance())
        self.recorder.tick()
        return n

    def _feed_can(self, frames: list[Frame]) -> None:
        on_can = self.pipeline.on_can
        pending = self._can_events
        pending.extend(self.can.events())
        start = 0
        # An outage event goes between the frames received before it and after it.
        while pending and pending[0]["frames"] - self._can_seen <= len(frames) - start:
            upto = start + max(pending[0]["frames"] - self._can_seen, 0)
            for t, can_id, data, mono in frames[start:upto]:
                on_can(t, can_id, data, mono)
            self._can_seen += upto - start
            start = upto
            self.pipeline.on_source_event(pending.popleft())
        for t, can_id, data, mono in frames[start:] if start else frames:
            on_can(t, can_id, data, mono)
        self._can_seen += len(frames) - start

    def _poll_clock(self) -> None:
        # A step is stored as an event (signed with the next batch); readings
        # only take the state, so the integration never sees the wall clock.
        for ev in self.clock.poll():
            self.recorder.add_event(float(ev["t"]), str(ev["kind"]), ev)
        self.pipeline.clock = self.clock.state

    def run(self, stop: threading.Event, tick: Callable[[], None] | None = None) -> None:
        """Poll until ``stop`` is set, or until a replayed log has been read to its end.

        ``tick`` is called after every pass (the service's watchdog ping and
        metrics snapshot), so it stops when the loop hangs.
        """
        while not stop.is_set():
            self.poll()
            if tick is not None:
                tick()
            if self.can.finished and not self.can.pending():
                break

    def _commit(self, readings: list[dict[str, Any]]) -> None:
        for ev in self.pipeline.take_events():
            self.recorder.add_event(float(ev["t"]), str(ev["kind"]), ev)
            self.event_counts[str(ev["kind"])] += 1
        if not readings:
            return
        if self.rebase_can_time and self.clock.level:
            # t0 is on this run's step-free timeline; UTC is t0 plus the steps
            # since (as of this commit, a second or two after the window).
            for r in readings:
                r["utc_offset_s"] = self.clock.level
        self.recorder.add(readings)
        self.readings += len(readings)
        for r in readings:
            for k in self.totals:
                self.totals[k] += r[k]

    def close(self, upload_timeout: float = 10.0) -> None:
        """Stop sources, flush and seal everything, let the uploader drain for a bounded time."""
        self.can.stop()
        if self.kit:
            self.kit.stop()
        self.poll(0.0)
        self._commit(self.pipeline.finish())
        self.recorder.stop()
        if self.uploader:
            self.uploader.notify()
            self.uploader.wait_idle(upload_timeout)
            self.uploader.stop()
        self.clock.close()
        self.recorder.close()
        self.signer.close()
        s = self.pipeline.stats
        log.info(
            "event=agent_stopped readings=%d batches=%d can_frames=%d can_queue_dropped=%d"
            " frames=%d decode_errors=%d kit_messages=%d",
            self.readings,
            len(self.sealed),
            self.can.stats["frames"],
            self.can.stats["queue_dropped"],
            s.frames,
            s.decode_errors,
            s.kit_messages,
        )

    def stats(self) -> dict[str, Any]:
        s = self.pipeline.stats
        out: dict[str, Any] = {
            "frames": s.frames,
            "kit_messages": s.kit_messages,
            "decode_errors": s.decode_errors,
            "foreign_source": s.foreign_source,
            "can_queue_dropped": self.can.stats["queue_dropped"],
            "can": self.can.stats,
            "tp": dict(s.tp),
            "dm1_changes": s.dm1_changes,
            "engine_address": self.pipeline.engine.address,
            "can_outages": s.can_outages,
            "integrator": self.pipeline.counters(),
            "store": dict(self.recorder.stats),
        }
        if self.kit:
            out["kit_link"] = self.kit.stats
        return out
