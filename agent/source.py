"""Sources: the one seam through which samples and events enter the agent.

A source is a plug-in, the way python-can's interfaces are: a subclass of
:class:`Source` registered under the ``cngmrv.sources`` entry-point group of
an installed package (``setup.py``).  Its entry-point name is its config
section, and the class declares in one place what it brings:

* :attr:`Source.KEYS`, the keys of its ``[section]`` with their type, default
  and check: ``cngmrv config check`` validates them with every other key, and
  an unknown key or a bad value is reported with its full name;
* :attr:`Source.CHANNELS`, the integrator channels it feeds (the reading's
  fields: docs/integrator.md);
* for a source on the vehicle's CAN bus, a pure :class:`FrameDecoder` (built
  on the pipeline's windowing), the 11-bit identifiers it wants to receive
  (:attr:`Source.standard_ids`) and, only when its config enables sending, a
  :class:`~cngmrv.drivers.can_source.Talker`;
* for a source with a link of its own (a serial port), a :class:`Link`: the
  I/O half, a supervised reader thread and its bounded queue, and a pure
  :class:`Decoder` its link feeds;
* :meth:`Source.settle`: how its section becomes the values it is built
  with (paths resolved, the files they name loaded and checked at
  ``cngmrv config check``), and what it builds from them for the others: the
  pipeline's inputs (:meth:`Source.pipeline_inputs`), the 29-bit PGNs the CAN
  link must pass (:meth:`Source.extended_pgns`), the channels it takes over
  from J1939 (:attr:`Source.feeds`) and their gap rule, the clock check's UTC
  (:meth:`Source.utc_reference`);
* its counters, in its link's ``stats`` and its decoder's
  ``PipelineStats.plugins[name]``, which reach the agent's stats and health
  metrics with no code of its own there.

The runtime (:mod:`cngmrv.agent.runtime`) loops over the configured sources'
links and knows nothing of their inputs' layout or their options.  Adding a
source is one module, its tests and one line of registration;
``agent/obd.py`` (on the CAN bus) and ``agent/gps_source.py`` (a link of its
own) are the examples.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from cngmrv.native import Window

if TYPE_CHECKING:
    from cngmrv.agent.builtin_sources import LinkContext
    from cngmrv.agent.clock import UtcReference
    from cngmrv.agent.config import Config
    from cngmrv.agent.pipeline import Pipeline
    from cngmrv.agent.pipeline_config import PipelineStats
    from cngmrv.agent.window import Windower
    from cngmrv.drivers.can_source import Talker

GROUP = "cngmrv.sources"

# Returns the reason a config value is bad, or None.
Check = Callable[[Any], str | None]
# A config key: (type, default, check); a default of None means required.
Key = tuple[type, Any, Check | None]


def path_of(value: str, base: Path) -> Path:
    """A config's path ``value``, ``~`` expanded, a relative one taken from ``base`` (its folder)."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


class ConfigProblem(ValueError):
    """A source's config problem found while it settles its values; the message starts with
    the offending key (the config reports it as a ``ConfigError``)."""


class Decoder:
    """The pure half of a source: its inputs in, samples and events out.

    Built by :meth:`Source.decoder` on the pipeline's
    :class:`~cngmrv.agent.window.Windower` (``add`` a sample, append to
    ``events``) and its counters.  No I/O and no wall-clock reads: its only
    clocks are the times its inputs carry.  A source with a link of its own
    takes its inputs from that link (:meth:`Link.feed`, through
    :meth:`~cngmrv.agent.pipeline.Pipeline.plugin`).
    """

    #: The integrator channels it feeds; J1939 then no longer feeds them, so two
    #: senders are never mixed in one channel.
    channels: tuple[str, ...] = ()

    def annotate(self, reading: dict[str, Any], w: Window) -> None:
        """Adds the source's own fields to the reading of window ``w`` (none by default)."""
        return None


class FrameDecoder(Decoder, ABC):
    """The decoder of a source on the vehicle's CAN bus: frames in, samples and events out.

    Its clocks are each frame's bus time ``t`` and receive time ``mono``.  It
    gets every 11-bit frame (identifier with
    :data:`~cngmrv.drivers.j1939.STANDARD_ID_FLAG` set) the CAN link passes on.
    """

    @abstractmethod
    def on_frame(self, t: float, can_id: int, data: bytes, mono: float) -> None:
        """One frame.  Must not raise: a frame it cannot use is counted with its reason
        (:func:`~cngmrv.agent.pipeline_config.reject`) and, where it stood for a
        sample, leaves a gap (an invalid sample), never a guess."""


class Link(ABC):
    """The I/O half of a source: a supervised reader thread filling a bounded queue.

    Contract: :meth:`start` returns at once; a link that fails (port gone,
    bus down) records an outage and reopens with backoff, it never raises
    into the runtime.  Each input is stamped with ``time.monotonic()`` when it
    was received (:meth:`mono`), so the runtime can feed the links' inputs in
    the order they arrived.  When the queue is full the newest input is
    dropped and counted in ``stats["queue_dropped"]`` (a replay waits for room
    instead).  :meth:`take` never blocks longer than its timeout.
    """

    #: The key of its counters in the agent's stats and health (``"can"``, ``"kit_link"``).
    name: ClassVar[str]

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def stop(self) -> None:
        """Stops reading; inputs already queued stay takeable."""

    @abstractmethod
    def take(self, timeout: float) -> list[Any]:
        """Queued inputs, oldest first, waiting up to ``timeout`` for some."""

    @abstractmethod
    def mono(self, item: Any) -> float:
        """When ``item`` was received, on ``time.monotonic()``."""

    @abstractmethod
    def feed(self, pipeline: Pipeline, items: list[Any]) -> None:
        """Hands ``items`` (a run of :meth:`take`'s, in order) to the pipeline.

        Called once per pass with an empty list when nothing came, so a link's
        own events (an outage) reach the pipeline without waiting for inputs."""

    def pending(self) -> int:
        """Inputs queued and not yet taken."""
        return 0

    @property
    def finished(self) -> bool:
        """True when no input will ever come again (a replayed log at its end)."""
        return False

    @property
    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """Its own counters: numbers, or tables of numbers by key (refusals by reason).

        With its decoder's (``PipelineStats.plugins[source name]``), they are the
        source's figures in the agent's stats and health metrics
        (:meth:`~cngmrv.agent.runtime.Agent.source_counters`) with no code of its own
        there.
        """


class Source:
    """A plug-in source of samples and events (see the module docstring).

    Built with the validated values of its config section, ``values``
    (every key of :attr:`KEYS`, defaults filled in).  The base class's hooks
    return "nothing": a source overrides those it needs.
    """

    #: Its config keys, in its own ``[section]`` (the entry-point name).
    KEYS: ClassVar[Mapping[str, Key]] = {}
    #: The integrator channels it feeds.
    CHANNELS: ClassVar[tuple[str, ...]] = ()

    #: Its entry-point name (its config section), set when it is built for a config.
    name: str = ""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self.values = values

    @classmethod
    def check(cls, values: Mapping[str, Any]) -> tuple[str, str] | None:
        """A problem spanning several keys, as (key, reason), or None.

        ``values`` holds every validated key of the config as ``section.key``,
        so a source may depend on another section's (``can.listen_only``).
        """
        return None

    @classmethod
    def settle(cls, name: str, values: Mapping[str, Any], base: Path) -> dict[str, Any]:
        """The values the source is built with, from the validated config.

        ``values`` as for :meth:`check`; ``base`` is the config file's folder,
        against which a relative path is resolved.  The default is the
        source's own section as validated; a source overrides it to resolve
        paths, load and check the files its keys name, or read an older
        config's key.  Raises :class:`ConfigProblem` naming the key.
        """
        return {k: values[f"{name}.{k}"] for k in cls.KEYS}

    @property
    def enabled(self) -> bool:
        """Whether this config runs the source."""
        return True

    @property
    def feeds(self) -> tuple[str, ...]:
        """The integrator channels this configured source takes over from J1939.

        Two configured sources never feed one channel (``cngmrv config check``
        refuses it); its decoder's ``channels`` are these.
        """
        return ()

    @property
    def max_gap_s(self) -> Mapping[str, float]:
        """Per integrated signal it feeds (``wheel_speed``…), the longest interval bridged
        between two of its samples, where its sample rate needs another than
        ``pipeline.can_max_gap_s`` (none by default)."""
        return {}

    def pipeline_inputs(self) -> Mapping[str, Any]:
        """Keyword arguments of :class:`~cngmrv.agent.pipeline.Pipeline` it provides
        (the J1939 decoder's DBC, the kit's CAN decoder), loaded from its values."""
        return {}

    @property
    def extended_pgns(self) -> frozenset[int]:
        """PGNs of 29-bit frames its decoding needs, beyond J1939's own, that the CAN
        link's acceptance filters must pass."""
        return frozenset()

    def utc_reference(self) -> UtcReference | None:
        """What it offers the clock check (``clock.source``, agent/clock.py), or None."""
        return None

    @property
    def standard_ids(self) -> frozenset[int]:
        """The 11-bit CAN identifiers its decoder wants (all others are ignored)."""
        return frozenset()

    def decoder(self, window: Windower, stats: PipelineStats) -> Decoder | None:
        """Its decoder (a :class:`FrameDecoder` for frames of the CAN bus), or None."""
        return None

    def talker(self) -> Talker | None:
        """What it sends on the CAN bus, or None (the default, and listen-only mode)."""
        return None

    def link(self, ctx: LinkContext) -> Link | None:
        """Its own link (opened by :meth:`Link.start`), or None for a source that
        only decodes frames of the CAN bus's link."""
        return None


def registered() -> dict[str, type[Source]]:
    """The installed sources, by name (their config sections, sorted).

    Raises TypeError for an entry point that is not a :class:`Source`.
    """
    out: dict[str, type[Source]] = {}
    for ep in sorted(entry_points(group=GROUP), key=lambda ep: ep.name):
        cls = ep.load()
        if not (isinstance(cls, type) and issubclass(cls, Source)):
            raise TypeError(f"entry point {GROUP}:{ep.name} is not a Source subclass")
        out[ep.name] = cls
    return out


def configured(config: Config) -> list[Source]:
    """The sources ``config`` runs, built from their settled values, in :func:`registered` order."""
    return built(registered(), config.source_values)


def built(
    sources: Mapping[str, type[Source]], values: Mapping[str, Mapping[str, Any]]
) -> list[Source]:
    """The enabled ones of ``sources``, each built from its entry of ``values``."""
    out = []
    for name, cls in sources.items():
        source = cls(values.get(name, {}))
        if source.enabled:
            source.name = name
            out.append(source)
    return out
