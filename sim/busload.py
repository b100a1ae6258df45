"""A loaded J1939 bus: the other ECUs' traffic, and the wire that spaces every frame.

:class:`Wire` puts frames on one CAN bus as its controllers would: one at a
time, the lowest identifier winning arbitration among the frames waiting, each
taking its length in bits at the bus's bit rate.  A frame's timestamp is the
end of its transmission, which is when a receiver's kernel stamps it.  Time is
counted in whole bit times, so the bus share is exact however long the run.

:class:`BackgroundTraffic` is the rest of a city bus's J1939 backbone
(transmission, brakes, retarder, aftertreatment, tachograph, dashboard, body
controller, DM1 by BAM from three ECUs with active faults) at their J1939-71
rates, plus proprietary-B frames from OEM body nodes that take whatever bus
time is idle, up to the requested load.  The engine's own broadcasts come from
:class:`cngmrv.sim.ecu.EngineEcu` through the same wire.

Every background frame except the transport protocol's carries a sequence
number, stamped when the wire transmits it: ``uint32`` little-endian in bytes
0-3 (bytes 4-7 are 0xFF, "not available").  A receiver that sees them in
order has lost exactly the frames whose numbers it never saw.  The engine's
frames carry its signals, so they are counted per identifier instead
(:attr:`Wire.offered`).

Limits: frame lengths leave out stuff bits (up to about 20 % more on the wire),
so a "100 %" bus here carries a few more frames per second than a real one,
which is the harder case for a receiver.  Error frames and retransmissions are
not modelled.
"""

from __future__ import annotations

import heapq
import math
import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from cngmrv.drivers import j1939

__all__ = [
    "BACKGROUND",
    "DM1_SENDERS",
    "BackgroundTraffic",
    "Periodic",
    "Wire",
    "capacity_fps",
    "frame_bits",
    "sequence_of",
]

# A 29-bit data frame: SOF, 11+18 identifier bits, SRR, IDE, RTR, two reserved
# bits and the 4-bit DLC (39), the data, then CRC 15, its delimiter, ACK slot
# and delimiter, 7 EOF bits (25), and the 3-bit intermission before the next.
_OVERHEAD_BITS = 67

SEQ = struct.Struct("<I")
_SEQ_TAIL = b"\xff" * 4


def frame_bits(dlc: int) -> int:
    """Bits one 29-bit data frame with ``dlc`` data bytes takes on the wire (stuff bits left out)."""
    return _OVERHEAD_BITS + 8 * dlc


def capacity_fps(bitrate: int) -> float:
    """Frames per second a saturated bus carries, all 8-byte frames."""
    return bitrate / frame_bits(8)


@dataclass(frozen=True)
class Periodic:
    """One periodic broadcast: ``pgn`` from ``source`` every ``period_s``."""

    name: str
    source: int
    pgn: int
    priority: int
    period_s: float


# The other ECUs on a city bus's backbone, at their J1939-71 default rates.
BACKGROUND: tuple[Periodic, ...] = (
    Periodic("ETC1", 0x03, 61442, 3, 0.010),  # transmission
    Periodic("ETC2", 0x03, 61445, 6, 0.100),
    Periodic("EBC1", 0x0B, 61441, 6, 0.100),  # brakes (EBS/ABS)
    Periodic("EBC2", 0x0B, 65215, 6, 0.100),
    Periodic("ERC1", 0x10, 61440, 6, 0.100),  # retarder
    Periodic("AT1IG1", 0x3D, 61454, 6, 0.050),  # aftertreatment
    Periodic("AT1OG1", 0x3D, 61455, 6, 0.050),
    Periodic("TCO1", 0xEE, 65132, 3, 0.050),  # tachograph
    Periodic("DD", 0x17, 65276, 6, 1.0),  # instrument cluster
    Periodic("VEP1", 0x17, 65271, 6, 1.0),
    Periodic("AMB", 0x21, 65269, 6, 1.0),  # body controller
    Periodic("CM1", 0x21, 57344, 6, 1.0),
    Periodic("DOORS", 0x21, 0xFF10, 6, 0.100),  # proprietary B: door states
)

# (source, active DTCs as (SPN, FMI)): each repeats its DM1 by BAM every second.
DM1_SENDERS: tuple[tuple[int, tuple[tuple[int, int], ...]], ...] = (
    (0x03, ((177, 0), (4816, 2))),  # transmission oil temperature; ...
    (0x0B, ((789, 7), (790, 7), (1057, 3))),  # brake pressure sensors
    (0x3D, ((3226, 2), (4364, 18), (5246, 0), (3251, 0))),  # NOx, SCR, DPF
)
DM1_PERIOD_S = 1.0
BAM_PACKET_GAP_S = 0.05  # J1939-21: 50 to 200 ms between a BAM's data packets

# The load filler: proprietary-B frames from OEM body nodes, lowest priority.
FILLER_SOURCES = (0x80, 0x81, 0x82, 0x83)
FILLER_PGNS = tuple(range(0xFF80, 0xFF90))
FILLER_PRIORITY = 7


def sequence_of(can_id: int, data: bytes) -> int | None:
    """The sequence number a background frame carries, or None for frames without one."""
    if can_id & 0xFF == 0x00 or len(data) != 8:
        return None  # the engine's frames carry its signals
    pf = (can_id >> 16) & 0xFF
    if pf in (j1939.PGN_TP_CM >> 8 & 0xFF, j1939.PGN_TP_DT >> 8 & 0xFF):
        return None
    return int(SEQ.unpack_from(data)[0])


def _dm1_payload(dtcs: tuple[tuple[int, int], ...]) -> bytes:
    out = bytearray(b"\x04\xff")  # amber warning lamp on, flash codes not available
    for spn, fmi in dtcs:
        out += bytes([spn & 0xFF, (spn >> 8) & 0xFF, ((spn >> 16) & 0x7) << 5 | fmi, 1])
    return bytes(out)


def _bam(source: int, pgn: int, payload: bytes) -> list[tuple[float, int, bytes]]:
    """A BAM as (offset from its start, can_id, data): TP.CM then the TP.DT packets."""
    n = (len(payload) + 6) // 7
    cm = j1939.make_id(j1939.PGN_TP_CM, source, 7)
    dt = j1939.make_id(j1939.PGN_TP_DT, source, 7)
    size = len(payload)
    frames = [(0.0, cm, bytes([32, size & 0xFF, size >> 8, n, 0xFF]) + pgn.to_bytes(3, "little"))]
    for i in range(n):
        chunk = payload[7 * i : 7 * i + 7]
        data = bytes([i + 1]) + chunk + b"\xff" * (7 - len(chunk))
        frames.append((BAM_PACKET_GAP_S * (i + 1), dt, data))
    return frames


# A frame waiting for the bus: (ready time, can_id, data, stamp a sequence number).
Pending = tuple[float, int, bytes, bool]


@dataclass
class _Repeating:
    """Frames sent as a group every ``period`` (one frame, or a BAM's CM and DTs)."""

    first: float
    period: float
    frames: tuple[tuple[float, int, bytes, bool], ...]  # (offset, can_id, data, stamp)
    count: int = 0  # groups handed out; the next starts at first + count * period

    @property
    def next(self) -> float:
        # Multiplied, not summed: a sum drifts by its rounding over millions of periods.
        return self.first + self.count * self.period


class BackgroundTraffic:
    """Every frame the other ECUs make ready in a span of bus time, deterministic for a seed.

    Phases are drawn from ``seed``, as ECUs powered up at slightly different
    moments would have them.
    """

    def __init__(self, t0: float, seed: int = 1) -> None:
        rng = random.Random(seed)
        self._groups = [
            _Repeating(
                t0 + rng.uniform(0, m.period_s),
                m.period_s,
                ((0.0, j1939.make_id(m.pgn, m.source, m.priority), _SEQ_TAIL, True),),
            )
            for m in BACKGROUND
        ] + [
            _Repeating(
                t0 + rng.uniform(0, DM1_PERIOD_S),
                DM1_PERIOD_S,
                tuple((o, i, d, False) for o, i, d in _bam(src, j1939.PGN_DM1, _dm1_payload(dtcs))),
            )
            for src, dtcs in DM1_SENDERS
        ]
        self._filler_ids = [
            j1939.make_id(pgn, FILLER_SOURCES[i % len(FILLER_SOURCES)], FILLER_PRIORITY)
            for i, pgn in enumerate(FILLER_PGNS)
        ]
        self._next_filler = 0

    def due(self, t_end: float) -> Iterator[Pending]:
        """Every periodic and BAM frame of a group starting before ``t_end``, not yet handed out."""
        for g in self._groups:
            while g.next < t_end:
                for offset, can_id, data, stamp in g.frames:
                    yield (g.next + offset, can_id, data, stamp)
                g.count += 1

    def filler(self) -> int:
        """The identifier of the next filler frame (its data is a sequence number)."""
        can_id = self._filler_ids[self._next_filler]
        self._next_filler = (self._next_filler + 1) % len(self._filler_ids)
        return can_id


Send = Callable[[float, int, bytes], None]


class Wire:
    """One CAN bus's arbitration and timing; ``send(t, can_id, data)`` gets each frame at its end time.

    Frames come from :meth:`submit` (the engine) and from ``background``; with
    ``load_pct`` > 0 filler frames take idle bus time until the frames on the
    wire fill that share of it.  :meth:`run_until` transmits, in order, every
    frame that starts before a given time.  Frames waiting when the bus is
    saturated by higher-priority traffic stay queued, as in a controller's
    transmit buffer; nothing is dropped.
    """

    def __init__(
        self,
        bitrate: int,
        t0: float,
        send: Send,
        background: BackgroundTraffic | None = None,
        load_pct: float = 0.0,
    ) -> None:
        if bitrate <= 0:
            raise ValueError("bitrate must be > 0")
        if not 0 <= load_pct <= 100:
            raise ValueError("load_pct must be 0..100")
        if load_pct > 0 and background is None:
            raise ValueError("a load needs the background traffic that fills it")
        self.bitrate = bitrate
        self.t0 = t0
        self.load_pct = load_pct
        self._send = send
        self._bg = background
        self._now = 0  # bit times since t0
        self._busy = 0  # bit times spent transmitting
        self._waiting: list[tuple[int, int, int, bytes, bool]] = []  # by ready bit, then order
        self._arbitrating: list[tuple[int, int, bytes, bool]] = []  # by can_id, then order
        self._order = 0
        self.seq = 0  # the next sequence number
        self.sent = 0
        self.offered: dict[int, int] = {}  # frames sent per can_id

    @property
    def busy_share(self) -> float:
        """The share of bus time spent transmitting so far (0..1)."""
        return self._busy / self._now if self._now else 0.0

    @property
    def now(self) -> float:
        """Bus time at the end of the last frame sent (or of the last idle span)."""
        return self.t0 + self._now / self.bitrate

    def submit(self, ready: float, can_id: int, data: bytes) -> None:
        """Queue a frame that becomes ready for transmission at bus time ``ready``."""
        self._queue((ready, can_id, data, False))

    def _queue(self, p: Pending) -> None:
        # Rounded, not ceiled: bus times near 1.7e9 s carry float noise of a
        # fraction of a bit, which must not cost a whole bit time.
        bit = max(0, round((p[0] - self.t0) * self.bitrate))
        self._order += 1
        heapq.heappush(self._waiting, (bit, self._order, p[1], p[2], p[3]))

    def run_until(self, t_end: float) -> None:
        """Transmit every frame that starts before bus time ``t_end``."""
        if self._bg is not None:
            for p in self._bg.due(t_end):
                self._queue(p)
        end = round((t_end - self.t0) * self.bitrate)
        waiting, arb = self._waiting, self._arbitrating
        push, pop = heapq.heappush, heapq.heappop
        fill = self.load_pct > 0 and self._bg is not None
        filler_bits = frame_bits(8)
        send, offered, rate, t0 = self._send, self.offered, self.bitrate, self.t0
        now, busy, seq = self._now, self._busy, self.seq
        while now < end:
            while waiting and waiting[0][0] <= now:
                _, order, can_id, data, stamp = pop(waiting)
                push(arb, (can_id, order, data, stamp))
            if not arb:
                nxt = waiting[0][0] if waiting else end
                if fill:
                    # The earliest bit at which one more filler frame keeps the
                    # busy share at or under the load.
                    ok_at = math.ceil((busy + filler_bits) * 100 / self.load_pct - filler_bits)
                    if ok_at <= now:
                        assert self._bg is not None
                        self._order += 1
                        push(arb, (self._bg.filler(), self._order, _SEQ_TAIL, True))
                        continue
                    nxt = min(nxt, ok_at)
                now = min(max(nxt, now + 1), end)
                continue
            can_id, _, data, stamp = pop(arb)
            if stamp:
                data = SEQ.pack(seq) + data
                seq += 1
            bits = _OVERHEAD_BITS + 8 * len(data)
            now += bits
            busy += bits
            offered[can_id] = offered.get(can_id, 0) + 1
            self.sent += 1
            send(t0 + now / rate, can_id, data)
        self._now, self._busy, self.seq = now, busy, seq
