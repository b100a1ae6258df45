"""OBD-II over CAN: the vehicle speed and engine fuel rate of a vehicle without J1939 fuel data.

A plug-in source (agent/source.py), registered as ``obd`` in ``cngmrv.sources``;
its keys are the ``[obd]`` section.  The protocol facts it relies on are in
docs/obd.md with their sources: the tester's functional request goes out on
the 11-bit identifier 0x7DF as one ISO-TP single frame ``02 01 PID`` (service
0x01, current data), the ECUs answer on 0x7E8..0x7EF with ``len 41 PID A B…``;
PID 0x0D is the vehicle speed (``A`` km/h) and PID 0x5E the engine fuel rate
(``(256A + B) / 20`` L/h).

The decoder is pure and only listens: it takes the answers whoever asked
(another tester on the bus, or this agent when ``obd.requests`` is set, which
needs ``can.listen_only = false``).  Each PID is taken from one ECU, the
response identifier ``obd.ecu`` (0x7E8, the engine's, by default); the same
PID from another ECU (a gearbox also answers the speed) is counted as foreign
and never integrated, as for J1939 (docs/can.md).  The fuel rate feeds
``diesel_l`` and the speed ``distance_km``, each only when configured: a
channel fed by OBD-II is no longer fed by J1939.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from cngmrv.agent.pipeline_config import PipelineStats, reject
from cngmrv.agent.source import FrameDecoder, Key, Source
from cngmrv.agent.window import Windower
from cngmrv.drivers.j1939 import STANDARD_ID_FLAG

REQUEST_ID = 0x7DF  # functional (broadcast) request, 11-bit
RESPONSE_IDS = range(0x7E8, 0x7F0)  # ECU #1..#8 physical responses
SERVICE_CURRENT = 0x01
POSITIVE = 0x40  # added to the service in a positive answer
NEGATIVE = 0x7F
PID_SPEED = 0x0D
PID_FUEL_RATE = 0x5E
PAD = 0x55  # unused bytes of the 8-byte frame (docs/obd.md)

# PID -> (data bytes, integrator channel)
PIDS: dict[int, tuple[int, str]] = {PID_SPEED: (1, "distance_km"), PID_FUEL_RATE: (2, "diesel_l")}


class ObdError(ValueError):
    """An answer that cannot be used; the message says why."""


def request(pid: int) -> bytes:
    """The 8-byte payload asking every ECU for ``pid`` of service 0x01 (send on 0x7DF)."""
    return bytes((0x02, SERVICE_CURRENT, pid)) + bytes([PAD] * 5)


def decode(data: bytes) -> tuple[int, float]:
    """``(pid, value)`` of a service-0x01 answer (km/h for 0x0D, L/h for 0x5E).

    Raises :class:`ObdError` for anything else: not a single frame, a length
    the payload does not hold, a negative response, another service, a PID
    this module does not read, or too few data bytes for it.
    """
    if not data:
        raise ObdError("OBD-II answer: empty frame")
    pci = data[0]
    if pci >> 4 != 0:
        raise ObdError(f"OBD-II answer: not an ISO-TP single frame (PCI {pci:#04x})")
    n = pci & 0x0F
    if not 2 <= n <= 7 or len(data) < 1 + n:
        raise ObdError(f"OBD-II answer: length {n} does not fit a {len(data)}-byte frame")
    body = data[1 : 1 + n]
    if body[0] == NEGATIVE:
        nrc = body[2] if len(body) > 2 else None
        raise ObdError(f"OBD-II negative response to service {body[1]:#04x}: NRC {nrc}")
    if body[0] != SERVICE_CURRENT + POSITIVE:
        raise ObdError(f"OBD-II answer: service {body[0]:#04x}, expected 0x41")
    pid = body[1]
    spec = PIDS.get(pid)
    if spec is None:
        raise ObdError(f"OBD-II answer: PID {pid:#04x} not read")
    width = spec[0]
    if len(body) < 2 + width:
        raise ObdError(f"OBD-II PID {pid:#04x}: {len(body) - 2} data bytes, need {width}")
    if pid == PID_SPEED:
        return pid, float(body[2])
    return pid, ((body[2] << 8) | body[3]) / 20.0


class ObdDecoder(FrameDecoder):
    """Answers from the chosen ECU into samples of the configured channels.

    ``pids``: the PIDs taken (each feeds its channel of :data:`PIDS`); ``ecu``:
    the response identifier they are taken from.  A frame that cannot be read
    leaves a gap in the channel of its PID when the PID is known, never a guess.
    """

    def __init__(
        self, window: Windower, stats: PipelineStats, pids: frozenset[int], ecu: int
    ) -> None:
        self._w = window
        self.stats = stats
        self._pids = pids
        self._ecu = ecu | STANDARD_ID_FLAG
        self.channels = tuple(PIDS[p][1] for p in sorted(pids))  # ObdSource.feeds
        self.counters = stats.plugins.setdefault("obd", {"answers": 0, "foreign": 0})

    def on_frame(self, t: float, can_id: int, data: bytes, mono: float) -> None:
        if (can_id & 0x7FF) not in RESPONSE_IDS:
            return  # another tester's request, or any other 11-bit traffic
        try:
            pid, value = decode(data)
        except ObdError as e:
            reject(self.stats, str(e))
            pid = data[2] if len(data) > 2 and data[1:2] == b"\x41" else -1
            if pid in self._pids and can_id == self._ecu:
                self._sample(pid, t, None)
            return
        if pid not in self._pids:
            return
        if can_id != self._ecu:
            # Another ECU's speed must never be mixed into the chosen one's.
            self.stats.foreign_source += 1
            self.counters["foreign"] += 1
            return
        self.counters["answers"] += 1
        self._sample(pid, t, value)

    def _sample(self, pid: int, t: float, value: float | None) -> None:
        self._w.add(PIDS[pid][1], t, value)
        if pid == PID_SPEED:
            # The vehicle's speed: the engine's idle/moving state is taken against it.
            self._w.speed = (t, value)


class ObdRequester:
    """Sends the requests of the configured PIDs on 0x7DF every ``period_s`` (a Talker)."""

    def __init__(self, pids: frozenset[int], period_s: float) -> None:
        self._frames = [(REQUEST_ID, request(p), False) for p in sorted(pids)]
        self._period = period_s
        self._next = 0.0

    def frames(self, now: float, msg: Any) -> list[tuple[int, bytes, bool]]:
        if now < self._next:
            return []
        # On the period's grid, so a late pass does not drift the rate.
        self._next = max(self._next + self._period, now)
        return list(self._frames)


def _ecu(v: Any) -> str | None:
    return None if v in RESPONSE_IDS else "must be a response identifier 0x7E8..0x7EF"


def _period(v: Any) -> str | None:
    return None if 0.02 <= v <= 10.0 else "must be 0.02..10 s"


class ObdSource(Source):
    """The ``[obd]`` section: OBD-II fuel rate and speed from one ECU."""

    KEYS: ClassVar[Mapping[str, Key]] = {
        "enabled": (bool, False, None),  # decode OBD-II answers on the CAN bus
        "fuel_rate": (bool, True, None),  # PID 0x5E feeds diesel_l (instead of J1939 LFE)
        "wheel_speed": (bool, True, None),  # PID 0x0D feeds distance_km (instead of J1939 CCVS)
        "ecu": (int, 0x7E8, _ecu),  # the response identifier the PIDs are taken from
        "requests": (
            bool,
            False,
            None,
        ),  # send the requests on 0x7DF (needs can.listen_only = false)
        "request_period_s": (float, 0.2, _period),
    }
    CHANNELS = ("diesel_l", "distance_km")

    @classmethod
    def check(cls, values: Mapping[str, Any]) -> tuple[str, str] | None:
        if not values["obd.enabled"]:
            return None
        if not values["obd.fuel_rate"] and not values["obd.wheel_speed"]:
            return "obd.enabled", "needs obd.fuel_rate or obd.wheel_speed"
        if values["obd.requests"] and values["can.listen_only"]:
            return "obd.requests", "needs can.listen_only = false (listen-only never sends)"
        gap = values["pipeline.can_max_gap_s"]
        if values["obd.requests"] and values["obd.request_period_s"] >= gap:
            return "obd.request_period_s", f"must be below pipeline.can_max_gap_s ({gap!r})"
        return None

    @property
    def enabled(self) -> bool:
        return bool(self.values.get("enabled", False))

    @property
    def pids(self) -> frozenset[int]:
        v = self.values
        return frozenset(
            pid for pid, key in ((PID_FUEL_RATE, "fuel_rate"), (PID_SPEED, "wheel_speed")) if v[key]
        )

    @property
    def feeds(self) -> tuple[str, ...]:
        return tuple(PIDS[p][1] for p in sorted(self.pids))

    @property
    def standard_ids(self) -> frozenset[int]:
        return frozenset(RESPONSE_IDS)

    def decoder(self, window: Windower, stats: PipelineStats) -> ObdDecoder:
        return ObdDecoder(window, stats, self.pids, self.values["ecu"])

    def talker(self) -> ObdRequester | None:
        if not self.values["requests"]:
            return None
        return ObdRequester(self.pids, self.values["request_period_s"])
