"""The running agent: sources → pipeline → store → sealed batches → uploader.

This is the I/O shell around the deterministic :class:`Pipeline`.  Its one
loop reads whatever the configured sources' links queued (agent/source.py:
the CAN bus, the kit's serial port, any plug-in's), feeds them to the pipeline
in the order they were received, and hands the readings it returns to the
:class:`Recorder`, which buffers them
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
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable
from typing import Any

from cngmrv.agent.builtin_sources import CanLink, KitLink, LinkContext
from cngmrv.agent.clock import ClockMonitor, FixedClock
from cngmrv.agent.config import Config, open_signer
from cngmrv.agent.pipeline import Pipeline
from cngmrv.agent.recorder import Recorder, RecorderConfig
from cngmrv.agent.source import Link, configured
from cngmrv.agent.store import Sealed, Store
from cngmrv.agent.upload import Uploader

log = logging.getLogger("cngmrv.agent")


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


# How long the service's main loop waits for the first source's frames before a pass
# anyway.  Below ``wake_after`` queued frames (a quiet bus, or the few a kernel filter
# passes) this sets the pass rate, and each pass costs a clock check, a window advance, the
# watchdog and metrics tick and a thread's wake-up, whether frames came or not: at 0.05 s
# that was most of an idle agent's CPU.  With several sources (CAN and a kit, or GPS) not
# longer than RUN_WAIT_S: their inputs are merged by receive time, and when bus time runs
# ahead of the receive clock (the simulator unpaced, a replay) a kit message is anchored up
# to one wait late (tests/test_sim.py::test_the_kits_clock_is_anchored_on_bus_time).  One
# source alone has nothing to merge: its frames carry their own times, readings are one
# second long and committed every few seconds, so it waits RUN_WAIT_ALONE_S (a stop is
# then noticed up to that late, well inside service.stop_timeout_s).
RUN_WAIT_S = 0.1
RUN_WAIT_ALONE_S = 0.5


class Agent:
    """One device's agent, built from a validated :class:`Config`."""

    def __init__(self, config: Config, clock: str | ClockMonitor | None = None) -> None:
        """``clock``: a state to assert (the simulator's), a monitor, or None for the config's."""
        self.config = config
        self.signer = open_signer(config)
        self.sources = configured(config)
        if clock is None:
            utc = next((u for s in self.sources if (u := s.utc_reference()) is not None), None)
            clock = ClockMonitor.from_settings(config.clock, utc)
        self.clock = FixedClock(clock) if isinstance(clock, str) else clock
        self.clock.poll()  # the first poll only sets the state and the step baseline
        clock = self.clock.state
        self.recorder = Recorder(
            config.store_path, config.device_id, self.signer, recorder_config(config), clock=clock
        )
        self.boot = self.recorder.start()
        self.boot_epoch = self.boot.epoch
        # What the sources bring the core (a DBC, the kit's CAN decoder), built from
        # their own values: the runtime knows none of a source's options.
        inputs: dict[str, Any] = {}
        for s in self.sources:
            inputs.update(s.pipeline_inputs())
        self.pipeline = Pipeline(
            config.pipeline,
            self.boot_epoch,
            clock,
            decoders=[s.decoder for s in self.sources],
            **inputs,
        )
        ctx = self._links = LinkContext(config, self.sources, self.clock, self._poll_clock)
        # The first link (the CAN bus's) is waited on; the others are drained after it.
        self._linked = [(s.name, link) for s in self.sources if (link := s.link(ctx)) is not None]
        self.links: list[Link] = [link for _, link in self._linked]
        can = next(link for link in self.links if isinstance(link, CanLink))
        kit = next((link for link in self.links if isinstance(link, KitLink)), None)
        # The readers themselves, for health, the simulator and the tests.
        self.can = can.source
        self.kit = kit.source if kit else None
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
    def rebase_can_time(self) -> bool:
        """Whether CAN frames carry the wall clock and are rebased (the links' setting)."""
        return self._links.rebase_can_time

    @rebase_can_time.setter
    def rebase_can_time(self, value: bool) -> None:
        self._links.rebase_can_time = value

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
        for link in self.links:
            link.start()
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
        first, *rest = self.links
        taken = [(first, first.take(timeout))]
        taken += [(link, link.take(0.0)) for link in rest]
        n = sum(len(items) for _, items in taken)
        self._feed_in_order(taken)
        self._commit(self.pipeline.advance())
        self.recorder.tick()
        return n

    def _feed_in_order(self, taken: list[tuple[Link, list[Any]]]) -> None:
        """Feeds the links' inputs merged by receive time, in runs.

        Each input goes in after the other links' inputs received before it
        and before those received after it: the pipeline times the kit by the
        latest frame, and a pass can hold seconds of bus time (a simulator
        unpaced, a loop that stalled).  On a tie the earlier link goes first.
        """
        for link, items in taken:
            if not items:
                link.feed(self.pipeline, items)  # a link's own events may come without inputs
        heads = [[link, items, 0] for link, items in taken if items]
        while heads:
            if len(heads) == 1:
                link, items, i = heads[0]
                link.feed(self.pipeline, items[i:] if i else items)
                return
            firsts = [h[0].mono(h[1][h[2]]) for h in heads]
            j = min(range(len(heads)), key=lambda k: (firsts[k], k))
            k = min((m for m in range(len(heads)) if m != j), key=lambda m: (firsts[m], m))
            link, items, i = heads[j]
            # Up to the next input of another link; ties go to the earlier link.
            cut = bisect_right if j < k else bisect_left
            upto = cut(items, firsts[k], lo=i, key=link.mono)
            link.feed(self.pipeline, items[i:upto])
            if upto >= len(items):
                del heads[j]
            else:
                heads[j][2] = upto

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
        wait = RUN_WAIT_S if len(self.links) > 1 else RUN_WAIT_ALONE_S
        while not stop.is_set():
            self.poll(wait)
            if tick is not None:
                tick()
            first = self.links[0]
            if first.finished and not first.pending():
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
        for link in self.links:
            link.stop()
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
            "sources": self.source_counters(),
            "store": dict(self.recorder.stats),
        }
        for link in self.links:
            out.setdefault(link.name, link.stats)
        return out

    def source_counters(self) -> dict[str, dict[str, Any]]:
        """Each configured source's own counters, by source name: its link's (lines or
        frames read, refusals by reason, reopens…) and its decoder's
        (``PipelineStats.plugins`` under the source's name), whatever each counts.

        The one path by which a source's counters reach :meth:`stats` and the health
        metrics (agent/health.py), so a new source's show without editing either.
        """
        out: dict[str, dict[str, Any]] = {s.name: {} for s in self.sources}
        for name, link in self._linked:
            out[name].update(link.stats)
        for name, counters in self.pipeline.stats.plugins.items():
            out.setdefault(name, {}).update(counters)
        return out
