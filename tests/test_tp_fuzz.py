"""Fuzzing the transport-protocol reassembler with Hypothesis.

Two tests: one where Hypothesis draws every frame (slow to generate, but it
explores structure and shrinks), and a bulk one where Hypothesis draws a seed
and the test expands it into thousands of frames with :class:`random.Random`
(a failure prints the seed).  CI feeds at least 102,000 frames here, and
test_can_fuzz.py at least 101,000 more through the whole frame decoder.
``CNGMRV_FUZZ_SCALE=N`` multiplies the examples for a longer run.

Frames are biased towards what breaks reassemblers: a few sources and
destinations, real control bytes with small sizes, sequence numbers near the
expected ones, time that sometimes stalls, jumps or runs backwards.  Besides
"never raises", every delivered BAM message is checked against the raw
traffic: it must be exactly the data of an unbroken run of packets 1..n that
followed its own announcement, with no other announcement in between.
"""

from __future__ import annotations

import os
import random
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from cngmrv.drivers import j1939
from cngmrv.drivers.tp import MAX_SIZE, TpReassembler

SCALE = int(os.environ.get("CNGMRV_FUZZ_SCALE", "1"))
FRAMES_PER_EXAMPLE = 40
EXAMPLES = 60 * SCALE
BULK_FRAMES = 2000
BULK_EXAMPLES = 50 * SCALE

CM, DT = j1939.PGN_TP_CM, j1939.PGN_TP_DT
ADDRESSES = st.sampled_from([0x00, 0x03, 0x17, 0xF9, 0xFF]) | st.integers(0, 255)
PGNS = st.sampled_from([j1939.PGN_DM1, 0xFEE3, 0xFE00]) | st.integers(0, 0x3FFFF)


@st.composite
def cm_payload(draw: Any) -> bytes:
    control = draw(st.sampled_from([32, 32, 16, 17, 19, 255]) | st.integers(0, 255))
    size = draw(st.integers(1, 40) | st.integers(0, 0xFFFF))
    packets = draw(st.just((size + 6) // 7) | st.integers(0, 255))
    if control == 17:  # CTS: count, next packet
        a, b = draw(st.integers(0, 6)), draw(st.integers(0, 7))
        head = bytes([control, a, b, 0xFF, 0xFF])
    else:
        head = bytes([control, size & 0xFF, (size >> 8) & 0xFF, packets & 0xFF, 0xFF])
    pgn = draw(PGNS)
    payload = head + pgn.to_bytes(3, "little")
    return payload[: draw(st.integers(0, 8) | st.just(8))]


@st.composite
def dt_payload(draw: Any) -> bytes:
    seq = draw(st.integers(1, 7) | st.integers(0, 255))
    body = draw(st.binary(min_size=0, max_size=7))
    return bytes([seq]) + body if draw(st.booleans()) or body else b""


FRAME = st.tuples(
    st.sampled_from([0.0, 0.02, 0.05, 0.1, 0.3]) | st.floats(-2.0, 2.0),  # time step
    st.sampled_from([CM, DT]) | st.integers(0, 0x3FFFF),  # mostly TP
    ADDRESSES,
    ADDRESSES,
    st.one_of(cm_payload(), dt_payload(), st.binary(max_size=8)),
)


def check_bam(history: list[tuple[Any, ...]], msg: Any) -> None:
    """``msg`` must be the data of the last n packets, numbered 1..n, right after its BAM."""
    n = (len(msg.data) + 6) // 7
    tail = history[-(n + 1) :]
    assert len(tail) == n + 1, (history, msg)
    kind, pgn, size = tail[0]
    assert kind == "bam" and pgn == msg.pgn and size == len(msg.data)
    assert [e[1] for e in tail[1:]] == list(range(1, n + 1))
    assert b"".join(e[2][:7] for e in tail[1:])[:size] == msg.data


class Checked:
    """Feeds a reassembler and checks every delivered message against the raw traffic."""

    def __init__(self) -> None:
        self.tp = TpReassembler(max_sessions=8)
        self.now = self.latest = 100.0
        self.history: dict[tuple[int, int], list[tuple[Any, ...]]] = {}
        self.fed = 0
        self.delivered = 0

    def feed(self, step: float, pgn: int, sa: int, da: int, data: bytes) -> None:
        self.now += step
        self.latest = max(self.latest, self.now)
        if pgn == CM and da == 255 and len(data) >= 8 and data[0] == 32:
            # A BAM announcement J1939-21 allows (others are ignored, not boundaries).
            size, announced = data[1] | data[2] << 8, int.from_bytes(data[5:8], "little")
            if 1 <= size <= MAX_SIZE and data[3] == (size + 6) // 7 and announced <= 0x3FFFF:
                self.history.setdefault((sa, da), []).append(("bam", announced, size))
        elif pgn == DT and data:
            self.history.setdefault((sa, da), []).append(("dt", data[0], data[1:]))
        msg = self.tp.feed(self.now, pgn, sa, da, data)
        self.fed += 1
        if msg is not None:
            self.delivered += 1
            assert 1 <= len(msg.data) <= MAX_SIZE and msg.source == sa and msg.destination == da
            if da == 255:
                check_bam(self.history[(sa, da)], msg)
        assert len(self.tp.open_sessions) <= 8

    def finish(self) -> None:
        self.tp.expire(self.latest + 10.0)  # time that ran backwards counts as none
        assert self.tp.open_sessions == {}
        assert all(v >= 0 for v in self.tp.counters.values())


SETTINGS = settings(
    # Shrinking big inputs can take many minutes; a failure prints the input or seed.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


def test_fuzz_reassembler_drawn_frames() -> None:
    fed = 0

    @settings(SETTINGS, max_examples=EXAMPLES)
    @given(frames=st.lists(FRAME, min_size=FRAMES_PER_EXAMPLE, max_size=FRAMES_PER_EXAMPLE))
    def run(frames: list[tuple[float, int, int, int, bytes]]) -> None:
        nonlocal fed
        c = Checked()
        for f in frames:
            c.feed(*f)
        c.finish()
        fed += c.fed

    run()
    assert fed >= EXAMPLES * FRAMES_PER_EXAMPLE


def random_frames(rng: random.Random, n: int) -> list[tuple[float, int, int, int, bytes]]:
    """Traffic with the same biases as FRAME, made fast: mostly well-formed BAMs and RTS/CTS
    with losses, repeats, swaps, cut frames and noise mixed in."""
    out: list[tuple[float, int, int, int, bytes]] = []
    sources = [0x00, 0x03, 0x17, rng.randrange(256)]
    while len(out) < n:
        sa = rng.choice(sources)
        r = rng.random()
        if r < 0.6:  # a BAM, or an RTS/CTS transfer, damaged now and then
            size = rng.choice([rng.randint(1, 40), rng.randint(1, MAX_SIZE)])
            pgn = rng.choice([j1939.PGN_DM1, 0xFEE3, rng.randrange(1 << 18)])
            count = (size + 6) // 7
            bam = rng.random() < 0.7
            da = 255 if bam else rng.choice([0xF9, 0x00, rng.randrange(255)])
            control = 32 if bam else 16
            cm = bytes([control, size & 0xFF, size >> 8, count, 0xFF]) + pgn.to_bytes(3, "little")
            out.append((rng.choice([0.0, 0.01, 0.05]), CM, sa, da, cm))
            if not bam:
                cts = bytes([17, count, 1, 0xFF, 0xFF]) + pgn.to_bytes(3, "little")
                out.append((0.01, CM, da, sa, cts))
            body = bytes(rng.randrange(256) for _ in range(size))
            packets = [
                bytes([i + 1]) + (body[7 * i : 7 * i + 7] + b"\xff" * 7)[:7] for i in range(count)
            ]
            damaged = rng.random() < 0.5
            for p in packets:
                if not damaged:
                    out.append((rng.choice([0.02, 0.05, 0.1, 0.2]), DT, sa, da, p))
                    continue
                fault = rng.random()
                step = rng.choice([0.05, 0.05, 0.1, 0.2, 0.8, -1.0, 3600.0])
                if fault < 0.02:
                    continue  # lost
                if fault < 0.04:
                    out.append((step, DT, sa, da, p))  # repeated
                if fault < 0.05:
                    p = p[: rng.randrange(8)]  # cut short
                out.append((step, DT, sa, da, p))
            if rng.random() < 0.05 and len(out) > 2:
                i = rng.randrange(len(out) - 1)
                out[i], out[i + 1] = out[i + 1], out[i]  # transposed
        elif r < 0.8:  # noise on the TP PGNs
            data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 8)))
            out.append(
                (rng.uniform(-1, 2), rng.choice([CM, DT]), sa, rng.choice([255, 0, 0xF9]), data)
            )
        else:  # abort, EoM ack or a stray CTS
            pgn = rng.choice([j1939.PGN_DM1, 0xFEE3])
            control = rng.choice([255, 19, 17])
            out.append(
                (
                    0.01,
                    CM,
                    sa,
                    rng.choice([255, 0, 0xF9]),
                    bytes([control, 1, 1, 0xFF, 0xFF]) + pgn.to_bytes(3, "little"),
                )
            )
    return out[:n]


def test_fuzz_reassembler_bulk() -> None:
    fed = delivered = 0

    @settings(SETTINGS, max_examples=BULK_EXAMPLES)
    @given(seed=st.integers(0, 2**64 - 1))
    def run(seed: int) -> None:
        nonlocal fed, delivered
        c = Checked()
        for f in random_frames(random.Random(seed), BULK_FRAMES):
            c.feed(*f)
        c.finish()
        fed += c.fed
        delivered += c.delivered

    run()
    assert fed >= BULK_EXAMPLES * BULK_FRAMES >= 100_000
    assert delivered > BULK_EXAMPLES * 10  # the traffic is not all noise: messages get through
