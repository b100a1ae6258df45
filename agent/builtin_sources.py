"""The sources shipped with the agent: the vehicle's CAN bus (J1939) and the CNG kit.

Registered in ``setup.py`` under ``cngmrv.sources`` like any plug-in.  Their
keys are the ``[can]`` and ``[kit]`` sections (deploy/agent.example.toml,
docs/can.md), which each settles and builds itself from (a replayed log's path,
the DBCs loaded and checked, the acceptance filters' PGNs); their decoding is
the core's own
(:class:`~cngmrv.agent.decode_j1939.J1939Decoder`,
:class:`~cngmrv.agent.decode_kit.KitDecoder`).  Their links wrap the
supervised readers of :mod:`cngmrv.drivers`: :class:`CanLink` (which also
carries the frames of every plug-in source on the same bus, and sends their
requests) and :class:`KitLink` (the kit's serial port).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from cngmrv.agent.checks import address, j1939_name, nonempty, nonnegative, positive
from cngmrv.agent.decode_j1939 import J1939_CHANNELS
from cngmrv.agent.decode_kit import KIT_CHANNELS
from cngmrv.agent.source import ConfigProblem, Key, Link, Source, path_of
from cngmrv.drivers.can_source import (
    DEFAULT_PGNS,
    INTERFACES,
    REPLAY,
    CanSource,
    Frame,
    RequestPlan,
    SourceSettings,
    make_source,
)
from cngmrv.drivers.dbc import DbcError, DbcSignals
from cngmrv.drivers.kit_can import DEFAULT_DBC as DEFAULT_KIT_DBC
from cngmrv.drivers.kit_can import KitCanDecoder
from cngmrv.drivers.kit_link import KitSerialSource

if TYPE_CHECKING:
    from cngmrv.agent.clock import ClockMonitor, FixedClock
    from cngmrv.agent.config import Config
    from cngmrv.agent.pipeline import Pipeline

#: Interfaces whose frames carry the kernel's receive time, i.e. the wall clock.
WALL_STAMPED = frozenset({"socketcan", "udp_multicast"})


def _interface(v: Any) -> str | None:
    return None if v in INTERFACES else f"must be one of {', '.join(sorted(INTERFACES))}"


def _request_period(v: Any) -> str | None:
    return None if v >= 1.0 else "must be >= 1 s (requests are sent at a low rate)"


def _transport(v: Any) -> str | None:
    return None if v in ("serial", "can") else "must be 'serial' or 'can'"


class LinkContext:
    """What a source's link may need of the running agent.

    ``config`` is the whole validated config, ``sources`` every configured
    source (the CAN link collects their 11-bit identifiers and talkers),
    ``clock`` the agent's clock monitor and ``poll_clock`` its poll, for a
    link that rebases wall-clock stamps (docs/can.md).
    """

    def __init__(
        self,
        config: Config,
        sources: list[Source],
        clock: ClockMonitor | FixedClock,
        poll_clock: Callable[[], None],
    ) -> None:
        self.config = config
        self.sources = sources
        self.clock = clock
        self.poll_clock = poll_clock
        # True when the bus stamps frames with the kernel's wall clock, which steps
        # (see ClockMonitor.rebase); a replay or the simulator's preserved timestamps are
        # their own timeline.
        self.rebase_can_time = any(
            s.values["interface"] in WALL_STAMPED for s in sources if isinstance(s, CanBus)
        )

    def to_wall(self) -> float:
        """Add to a ``time.monotonic()`` stamp to place it on the bus's timeline: the
        step-free one when CAN time is rebased, else the wall clock now."""
        return self.clock.base if self.rebase_can_time else time.time() - time.monotonic()


class CanBus(Source):
    """J1939 on the vehicle's CAN bus (python-can, or a recorded log replayed)."""

    KEYS: ClassVar[Mapping[str, Key]] = {
        # A python-can interface, or "replay" with channel = a log file to play back.
        "interface": (str, "socketcan", _interface),
        "channel": (str, "can0", nonempty),
        "listen_only": (bool, True, None),
        "queue_size": (int, 65536, positive),
        "filters": (bool, True, None),  # kernel acceptance filters for the PGNs read (SocketCAN)
        "dbc": (str, "", None),  # extra signals from this DBC ("" = none)
        "replay_speed": (float, 0.0, nonnegative),  # 0 = as fast as the agent takes frames
        "backoff_max_s": (float, 5.0, positive),  # longest wait between reopen attempts
        "requests": (bool, False, None),  # send Request PGN 59904 for HOURS and LFC
        "request_period_s": (float, 10.0, _request_period),
        "source_address": (int, 249, address),  # claimed for requests only
        "name": (str, "", j1939_name),  # this device's J1939 NAME, hex; required for requests
    }
    CHANNELS = J1939_CHANNELS

    @classmethod
    def settle(cls, name: str, values: Mapping[str, Any], base: Path) -> dict[str, Any]:
        """Its section, with a replayed log's path and the DBC's resolved and checked: the
        DBC is loaded (``dbc`` a path or None, ``dbc_pgns`` its PGNs)."""
        own = super().settle(name, values, base)
        if own["interface"] == REPLAY:
            path = path_of(own["channel"], base)
            if not path.is_file():
                raise ConfigProblem(f"{name}.channel: replay log {path} not found")
            own["channel"] = str(path)
        if own["requests"]:
            if own["listen_only"]:
                raise ConfigProblem(
                    f"{name}.requests: needs {name}.listen_only = false (listen-only never sends)"
                )
            if not own["name"]:
                raise ConfigProblem(
                    f"{name}.name: required when {name}.requests = true (the NAME to claim with)"
                )
        own["dbc_pgns"] = frozenset()
        if own["dbc"]:
            own["dbc"] = path_of(own["dbc"], base)
            try:
                own["dbc_pgns"] = DbcSignals(own["dbc"]).pgns
            except DbcError as e:
                raise ConfigProblem(f"{name}.dbc: {e}") from None
        else:
            own["dbc"] = None
        return own

    @property
    def extended_pgns(self) -> frozenset[int]:
        return frozenset(self.values.get("dbc_pgns", ()))

    def pipeline_inputs(self) -> Mapping[str, Any]:
        dbc = self.values.get("dbc")
        return {"dbc": DbcSignals(dbc)} if dbc else {}

    def settings(self, sources: list[Source]) -> SourceSettings:
        """How its reader is built: its keys, with every configured source's 11-bit
        identifiers, talkers and extra PGNs (``sources``, this one included)."""
        v = self.values
        requests = None
        if v["requests"]:
            requests = RequestPlan(
                name=int(v["name"], 16),
                address=v["source_address"],
                period_s=v["request_period_s"],
            )
        standard: set[int] = set()
        pgns: set[int] = set()
        talkers = []
        for src in sources:
            standard |= src.standard_ids
            pgns |= src.extended_pgns
            talker = src.talker()
            if talker is not None:
                talkers.append(talker)
        return SourceSettings(
            interface=v["interface"],
            channel=v["channel"],
            listen_only=v["listen_only"],
            pgns=DEFAULT_PGNS | pgns if v["filters"] else None,
            queue_size=v["queue_size"],
            replay_speed=v["replay_speed"],
            backoff_max_s=v["backoff_max_s"],
            requests=requests,
            standard_ids=frozenset(standard),
            talkers=tuple(talkers),
        )

    def link(self, ctx: LinkContext) -> Link | None:
        return CanLink(make_source(self.settings(ctx.sources)), ctx)


class CanLink(Link):
    """The CAN bus's frames, with the source's outage events placed among them."""

    name: ClassVar[str] = "can"

    def __init__(self, source: CanSource, ctx: LinkContext) -> None:
        self.source = source
        self._ctx = ctx
        self._seen = 0  # frames handed to the pipeline, to place source events among them
        self._events: deque[dict[str, Any]] = deque()

    def start(self) -> None:
        self.source.start()

    def stop(self) -> None:
        self.source.stop()

    def take(self, timeout: float) -> list[Frame]:
        frames = self.source.wait(timeout)
        if frames and self._ctx.rebase_can_time:
            frames = self._ctx.clock.rebase(frames, self._ctx.poll_clock)
        return frames

    def mono(self, item: Frame) -> float:
        return item[3]

    def feed(self, pipeline: Pipeline, items: list[Frame]) -> None:
        on_can = pipeline.on_can
        pending = self._events
        pending.extend(self.source.events())
        start = 0
        # An outage event goes between the frames received before it and after it.
        while pending and pending[0]["frames"] - self._seen <= len(items) - start:
            upto = start + max(pending[0]["frames"] - self._seen, 0)
            for t, can_id, data, mono in items[start:upto]:
                on_can(t, can_id, data, mono)
            self._seen += upto - start
            start = upto
            pipeline.on_source_event(pending.popleft())
        for t, can_id, data, mono in items[start:] if start else items:
            on_can(t, can_id, data, mono)
        self._seen += len(items) - start

    def pending(self) -> int:
        return self.source.pending()

    @property
    def finished(self) -> bool:
        return self.source.finished

    @property
    def stats(self) -> dict[str, Any]:
        return self.source.stats


class Kit(Source):
    """The CNG converter kit: over its serial link, or as PropB frames on the CAN bus."""

    KEYS: ClassVar[Mapping[str, Key]] = {
        "port": (str, "", None),
        "baudrate": (int, 115200, positive),
        "read_timeout_s": (float, 0.1, positive),
        "reconnect_min_s": (float, 0.5, positive),
        "reconnect_max_s": (float, 30.0, positive),
        "queue_size": (int, 10000, positive),
        # Send a HELLO after connecting, so the kit announces itself at once.
        "handshake": (bool, True, None),
        # "can": the kit's PropB PGNs on the vehicle CAN bus, described by a DBC.
        "transport": (str, "serial", _transport),
        "can_source_address": (int, 0x27, address),
        "dbc": (str, "", None),  # empty: the DBC shipped with cngmrv.drivers
    }
    CHANNELS = KIT_CHANNELS

    @classmethod
    def check(cls, values: Mapping[str, Any]) -> tuple[str, str] | None:
        if values["kit.transport"] == "can" and values["kit.port"]:
            return "kit.port", "must be empty when kit.transport is 'can'"
        if values["kit.reconnect_max_s"] < values["kit.reconnect_min_s"]:
            return (
                "kit.reconnect_max_s",
                f"must be >= kit.reconnect_min_s ({values['kit.reconnect_min_s']!r})"
                f" (got {values['kit.reconnect_max_s']!r})",
            )
        return None

    @classmethod
    def settle(cls, name: str, values: Mapping[str, Any], base: Path) -> dict[str, Any]:
        """Its section, with ``dbc`` resolved (None: the DBC shipped with cngmrv.drivers);
        over CAN the DBC is loaded and its PGNs kept (``pgns``)."""
        own = super().settle(name, values, base)
        own["dbc"] = path_of(own["dbc"], base) if own["dbc"] else None
        own["pgns"] = frozenset()
        if own["transport"] == "can":
            dbc = own["dbc"] or DEFAULT_KIT_DBC
            try:
                own["pgns"] = KitCanDecoder(dbc, own["can_source_address"]).pgns
            except Exception as e:  # cantools raises several unrelated types on a bad file
                raise ConfigProblem(f"{name}.dbc: cannot load {dbc}: {e}") from None
        return own

    @property
    def extended_pgns(self) -> frozenset[int]:
        # The kit's PropB frames must pass the kernel's acceptance filters too.
        return frozenset(self.values.get("pgns", ()))

    def pipeline_inputs(self) -> Mapping[str, Any]:
        v = self.values
        if v.get("transport") != "can":
            return {}
        return {"kit_can": KitCanDecoder(v["dbc"] or DEFAULT_KIT_DBC, v["can_source_address"])}

    def link(self, ctx: LinkContext) -> Link | None:
        v = self.values
        if not v["port"]:
            return None  # no kit, or a kit on the CAN bus (the core decodes its frames)
        source = KitSerialSource(
            v["port"],
            v["baudrate"],
            read_timeout=v["read_timeout_s"],
            queue_size=v["queue_size"],
            reconnect_backoff=(v["reconnect_min_s"], v["reconnect_max_s"]),
            handshake=v["handshake"],
        )
        return KitLink(source, ctx)


class KitLink(Link):
    """The kit's serial link: decoded messages and link markers, stamped on the monotonic clock."""

    name: ClassVar[str] = "kit_link"

    def __init__(self, source: KitSerialSource, ctx: LinkContext) -> None:
        self.source = source
        self._ctx = ctx

    def start(self) -> None:
        self.source.start()

    def stop(self) -> None:
        self.source.stop()

    def take(self, timeout: float) -> list[tuple[float, dict[str, Any]]]:
        return self.source.drain()

    def mono(self, item: tuple[float, dict[str, Any]]) -> float:
        return item[0]

    def feed(self, pipeline: Pipeline, items: list[tuple[float, dict[str, Any]]]) -> None:
        # The kit source stamps with the monotonic clock, as the CAN source
        # does (the pipeline ties the two clocks through it); the pipeline
        # also wants epoch seconds for its pre-CAN anchor, on the step-free
        # timeline when the CAN time is rebased.
        to_wall = self._ctx.to_wall()
        for received, msg in items:
            pipeline.on_kit(received + to_wall, msg, received)

    def pending(self) -> int:
        return self.source.pending()

    @property
    def stats(self) -> dict[str, Any]:
        return self.source.stats
