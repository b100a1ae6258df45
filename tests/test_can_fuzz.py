"""Fuzzing the whole CAN frame decoder: ``Pipeline.on_can`` (J1939 codec, TP, DM1, address
claims, DBC signals, integrator) with Hypothesis.

As in test_tp_fuzz.py, one test draws each frame with Hypothesis and a bulk
test expands a drawn seed into many frames; CI feeds at least 101,000 frames
here.  ``CNGMRV_FUZZ_SCALE=N`` multiplies the examples.  ``on_can`` declares
no exception at all: whatever the bus sends, it counts and carries on.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from cngmrv.agent.pipeline import Pipeline, PipelineConfig
from cngmrv.drivers import j1939
from cngmrv.drivers.dbc import DbcSignals

SCALE = int(os.environ.get("CNGMRV_FUZZ_SCALE", "1"))
EXAMPLES, FRAMES_PER_EXAMPLE = 40 * SCALE, 40
BULK_EXAMPLES, BULK_FRAMES = 50 * SCALE, 2000

EVENT_KINDS = {
    "DM1_CHANGED",
    "ENGINE_ADDRESS_CHANGED",
    "ENGINE_ADDRESS_CONTESTED",
    "SIGNAL_SECOND_SENDER",
}
INTERESTING = [
    j1939.PGN_LFE,
    j1939.PGN_CCVS,
    j1939.PGN_EEC1,
    j1939.PGN_TP_CM,
    j1939.PGN_TP_DT,
    j1939.PGN_ADDRESS_CLAIMED,
    j1939.PGN_DM1,
    j1939.PGN_REQUEST,
    *j1939.SIGNALS,
]


def _dbc() -> DbcSignals | None:
    env = os.environ.get("CNGMRV_SHARED_DATA")
    base = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    path = base / "css-electronics" / "CSS-Electronics-SAE-J1939-DEMO.dbc"
    return DbcSignals(path) if path.is_file() else None


DBC = _dbc()


def make_id(rng_pgn: int, sa: int, da: int, prio: int) -> int:
    if (rng_pgn >> 8) & 0xFF < 240:
        return (prio << 26) | ((rng_pgn & 0x3FF00) << 8) | (da << 8) | sa
    return (prio << 26) | (rng_pgn << 8) | sa


def check(p: Pipeline, fed: int) -> None:
    readings = p.advance() + p.finish()
    assert p.stats.frames == fed
    for r in readings:
        for k in ("diesel_l", "distance_km"):
            assert math.isfinite(r[k]) and r[k] >= 0.0, r
            assert -1e-9 <= r["cov"][k] <= r["dur"] + 1e-9
    kinds = {e["kind"] for e in p.events}
    assert kinds <= EVENT_KINDS
    assert sum(e["kind"] == "DM1_CHANGED" for e in p.events) == p.stats.dm1_changes
    assert p.engine.address is None or 0 <= p.engine.address <= 253
    assert p.stats.decode_errors == sum(p.stats.reasons.values())


SETTINGS = settings(
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)

FRAME = st.tuples(
    st.sampled_from([0.0, 0.01, 0.05, 0.1]) | st.floats(-5.0, 5.0),  # bus time step
    st.sampled_from([0.0, 0.01, 0.05, 0.1, 2.0]),  # monotonic step
    st.sampled_from(INTERESTING) | st.integers(0, 0x3FFFF),
    st.sampled_from([0x00, 0x00, 0x05, 0xFE, 0xFF]) | st.integers(0, 255),
    st.integers(0, 255),
    st.binary(max_size=8) | st.binary(max_size=64),
)


def test_fuzz_frame_decoder_drawn_frames() -> None:
    fed = 0

    @settings(SETTINGS, max_examples=EXAMPLES)
    @given(frames=st.lists(FRAME, min_size=FRAMES_PER_EXAMPLE, max_size=FRAMES_PER_EXAMPLE))
    def run(frames: list[tuple[float, float, int, int, int, bytes]]) -> None:
        nonlocal fed
        p = Pipeline(PipelineConfig(), dbc=DBC)
        t, mono = 1000.0, 50.0
        for dt, dmono, pgn, sa, da, data in frames:
            t, mono = t + dt, mono + dmono
            p.on_can(t, make_id(pgn, sa, da, 6), data, mono)
        check(p, len(frames))
        fed += len(frames)

    run()
    assert fed >= EXAMPLES * FRAMES_PER_EXAMPLE


def random_frames(rng: random.Random, n: int) -> list[tuple[float, int, bytes, float]]:
    """Engine-like traffic with damage: good and bad values, claims, DM1s, TP, noise."""
    out: list[tuple[float, int, bytes, float]] = []
    t, mono = 1000.0, 50.0
    engine_sa = 0
    names = [rng.randrange(1 << 64) for _ in range(4)] + [0x1234 | (1 << 60)]
    while len(out) < n:
        r = rng.random()
        t += rng.choice([0.01, 0.02, 0.05, 0.1]) if rng.random() > 0.01 else rng.uniform(-30, 30)
        mono += rng.choice([0.01, 0.02, 0.05, 0.1]) if rng.random() > 0.01 else 2.0
        sa = engine_sa if rng.random() < 0.8 else rng.randrange(256)
        if r < 0.5:
            pgn = rng.choice([j1939.PGN_LFE, j1939.PGN_CCVS, j1939.PGN_EEC1, *j1939.SIGNALS])
            specs = j1939.SIGNALS.get(pgn, ())
            values = {
                s.name: rng.choice(
                    [None, s.min_value, s.max_value, rng.uniform(s.min_value, s.max_value)]
                )
                for s in specs
            }
            data = j1939.encode(pgn, values) if specs else bytes(8)
            if rng.random() < 0.05:
                data = data[: rng.randrange(8)]  # cut short
            elif rng.random() < 0.05:
                data = bytes(rng.randrange(256) for _ in range(8))  # error/reserved ranges
        elif r < 0.6:
            pgn = j1939.PGN_ADDRESS_CLAIMED
            data = rng.choice(names).to_bytes(8, "little")[: rng.choice([8, 8, 8, 3])]
            if rng.random() < 0.3:
                engine_sa = sa
        elif r < 0.7:
            pgn = j1939.PGN_DM1
            k = rng.randrange(3)
            dtcs = b"".join(
                bytes(
                    [rng.randrange(256), rng.randrange(256), rng.randrange(256), rng.randrange(256)]
                )
                for _ in range(k)
            )
            data = (bytes([rng.randrange(256), 0xFF]) + dtcs + b"\xff" * 8)[
                : rng.choice([8, 6, 10])
            ]
        elif r < 0.85:
            pgn = rng.choice([j1939.PGN_TP_CM, j1939.PGN_TP_DT])
            if pgn == j1939.PGN_TP_CM:
                size = rng.choice([10, 18, 34, rng.randrange(1800)])
                data = bytes(
                    [
                        rng.choice([32, 16, 17, 19, 255]),
                        size & 0xFF,
                        size >> 8,
                        ((size + 6) // 7) & 0xFF,
                        0xFF,
                    ]
                )
                data += rng.choice([j1939.PGN_DM1, j1939.PGN_EEC1, 0xFEE3]).to_bytes(3, "little")
            else:
                data = bytes([rng.randint(1, 6)] + [rng.randrange(256) for _ in range(7)])
        else:
            pgn = rng.randrange(1 << 18)
            data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 8)))
        da = 255 if rng.random() < 0.7 else rng.randrange(256)
        out.append((t, make_id(pgn, sa, da, rng.randrange(8)), data, mono))
    return out


def test_fuzz_frame_decoder_bulk() -> None:
    fed = 0

    @settings(SETTINGS, max_examples=BULK_EXAMPLES)
    @given(seed=st.integers(0, 2**64 - 1))
    def run(seed: int) -> None:
        nonlocal fed
        p = Pipeline(PipelineConfig(), dbc=DBC)
        frames = random_frames(random.Random(seed), BULK_FRAMES)
        for t, can_id, data, mono in frames:
            p.on_can(t, can_id, data, mono)
        check(p, len(frames))
        fed += len(frames)

    run()
    assert fed >= BULK_EXAMPLES * BULK_FRAMES >= 100_000


def test_ids_that_are_not_29_bit_are_counted_not_raised() -> None:
    p = Pipeline(PipelineConfig())
    p.on_can(1.0, 1 << 29, b"")
    p.on_can(1.0, -1, b"")
    assert p.stats.decode_errors == 2 and p.stats.frames == 2
    with pytest.raises(ValueError):
        j1939.parse_id(1 << 29)  # the codec itself does raise; the pipeline contains it


@given(st.integers(0, 0x1FFFFFFF))
def test_fast_pgn_agrees_with_parse_id(can_id: int) -> None:
    assert j1939.pgn_of(can_id) == j1939.parse_id(can_id).pgn


@pytest.mark.parametrize("pf", [0, 239, 240, 255])
def test_fast_pgn_at_the_pdu1_pdu2_boundary(pf: int) -> None:
    can_id = (6 << 26) | (1 << 24) | (pf << 16) | (0x42 << 8) | 0x17
    assert j1939.pgn_of(can_id) == j1939.parse_id(can_id).pgn
