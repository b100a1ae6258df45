"""The loaded bus: wire timing and arbitration, the background traffic, and a loaded run.

The wire's properties are checked on random traffic (hypothesis): no two
frames overlap, none starts before it is ready, the lowest identifier wins
among the frames waiting, nothing is lost or duplicated, sequence numbers
are contiguous, and the busy share is the requested load.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cngmrv.agent.pipeline import Pipeline, PipelineConfig
from cngmrv.drivers import j1939
from cngmrv.sim.busload import (
    BACKGROUND,
    DM1_SENDERS,
    BackgroundTraffic,
    Wire,
    capacity_fps,
    frame_bits,
    sequence_of,
)

T0 = 1_700_000_000.0

Sent = list[tuple[float, int, bytes]]


def _wire(bitrate: int, load: float, background: bool = True) -> tuple[Wire, Sent]:
    sent: Sent = []
    bg = BackgroundTraffic(T0, seed=3) if background else None
    return Wire(bitrate, T0, lambda t, i, d: sent.append((t, i, d)), bg, load), sent


def test_capacity_is_the_issue_figure() -> None:
    # 131 bits per 8-byte extended frame: about 1,900 and 3,800 frames/s.
    assert frame_bits(8) == 131
    assert capacity_fps(250_000) == pytest.approx(1908.4, abs=0.1)
    assert capacity_fps(500_000) == pytest.approx(3816.8, abs=0.1)


@pytest.mark.parametrize("bitrate", [250_000, 500_000])
@pytest.mark.parametrize("load", [100.0, 60.0])
def test_full_seconds_carry_the_load(bitrate: int, load: float) -> None:
    wire, sent = _wire(bitrate, load)
    for k in range(1, 301):
        wire.run_until(T0 + k * 0.01)
    bits = sum(frame_bits(len(d)) for _, _, d in sent)
    elapsed = (sent[-1][0] - T0) * bitrate
    assert bits / elapsed == pytest.approx(load / 100, abs=0.005)
    assert wire.busy_share == pytest.approx(load / 100, abs=0.005)
    assert len(sent) == wire.sent == sum(wire.offered.values())
    if load == 100.0:
        assert len(sent) / 3.0 == pytest.approx(capacity_fps(bitrate), rel=0.01)


def test_background_runs_at_its_periods_and_sends_dm1_by_bam() -> None:
    wire, sent = _wire(500_000, 30.0)
    for k in range(1, 1001):
        wire.run_until(T0 + k * 0.01)
    per_id = Counter(i for _, i, _ in sent)
    for m in BACKGROUND:
        n = per_id[j1939.make_id(m.pgn, m.source, m.priority)]
        assert abs(n - 10.0 / m.period_s) <= 1, (m.name, n)
    # Fed to the agent's own pipeline: every ECU's DM1 reassembles and decodes.
    p = Pipeline(PipelineConfig())
    for t, can_id, data in sent:
        p.on_can(t, can_id, data)
    assert p.stats.decode_errors == 0
    changes = [e for e in p.events if e["kind"] == "DM1_CHANGED"]
    assert {e["source"] for e in changes} == {src for src, _ in DM1_SENDERS}
    for src, dtcs in DM1_SENDERS:
        ev = next(e for e in changes if e["source"] == src)
        assert sorted((spn, fmi) for spn, fmi, _ in ev["active"]) == sorted(dtcs)


def test_no_load_means_the_engine_alone() -> None:
    wire, sent = _wire(250_000, 0.0, background=False)
    eec1 = j1939.make_id(j1939.PGN_EEC1, 0, 3)
    wire.submit(T0 + 0.005, eec1, bytes(8))
    wire.run_until(T0 + 0.01)
    # Sent when ready, stamped at the end of its 131 bits.
    [(t, can_id, data)] = sent
    assert (can_id, data) == (eec1, bytes(8))
    assert t == pytest.approx(T0 + 0.005 + 131 / 250_000, abs=1e-6)
    assert wire.seq == 0


frames = st.lists(
    st.tuples(
        st.floats(0.0, 0.05, allow_nan=False),
        st.integers(0, 0x1FFFFFFF),
        st.integers(1, 8),
    ),
    max_size=60,
)


@settings(max_examples=150)
@given(
    submitted=frames,
    load=st.sampled_from([0.0, 35.0, 100.0]),
    bitrate=st.sampled_from([125_000, 250_000, 500_000]),
    step=st.sampled_from([0.001, 0.01, 0.05]),
)
def test_wire_properties(
    submitted: list[tuple[float, int, int]], load: float, bitrate: int, step: float
) -> None:
    wire, sent = _wire(bitrate, load, background=load > 0)
    # The engine's frames, told apart from the background by source address 0.
    # Each one's data is unique (its index first), so it can be followed on the wire.
    ours = [(r, cid & ~0xFF, bytes([n]) * dlc) for n, (r, cid, dlc) in enumerate(submitted)]
    ready = {}
    for r, cid, data in ours:
        wire.submit(T0 + r, cid, data)
        ready.setdefault((cid, data), []).append(T0 + r)
    t = T0
    while t < T0 + 0.2:
        t += step
        wire.run_until(t)
    # Every submitted frame went out once, not before it was ready (to the nearest bit).
    half_bit = 0.5 / bitrate + 1e-6
    got = [(ts, cid, d) for ts, cid, d in sent if cid & 0xFF == 0]
    assert sorted((cid, d) for _, cid, d in got) == sorted((cid, d) for _, cid, d in ours)
    for ts, cid, d in got:
        start = ts - frame_bits(len(d)) / bitrate
        assert start >= min(ready[(cid, d)]) - half_bit
    # Frames never overlap: each starts after the previous one ended.
    for (t1, _, _), (t2, _, d2) in zip(sent, sent[1:], strict=False):
        assert t2 - frame_bits(len(d2)) / bitrate >= t1 - 1e-6
    # Arbitration: no frame went out while a lower identifier was already waiting.
    for ts, cid, d in got:
        start = ts - frame_bits(len(d)) / bitrate
        for ts2, cid2, d2 in got:
            if cid2 < cid and ts2 > ts:
                assert min(ready[(cid2, d2)]) > start - 1e-6
    # Background sequence numbers: contiguous in wire order.
    seqs = [s for _, cid, d in sent if (s := sequence_of(cid, d)) is not None]
    assert seqs == list(range(len(seqs)))
    assert wire.seq == len(seqs)
    # The filler tops the bus up to the load and never pushes it over; the
    # background's own frames may still land after its last top-up.
    one_frame = frame_bits(8) / ((wire.now - T0) * bitrate)
    assert wire.busy_share >= load / 100 - one_frame
    if load > 0 and not submitted:
        assert wire.busy_share <= load / 100 + 3 * one_frame


def test_loaded_run_gives_the_unloaded_totals(cli) -> None:  # type: ignore[no-untyped-def]
    """The same drive cycle with and without a saturated 500 kbit/s bus, in-process."""
    out = {}
    for load in ("0", "100"):
        r = cli(
            "sim", "--json", "--duration", "120", "--speedup", "0", "--seed", "5",
            "--bitrate", "500000", "--bus-load", load, timeout=300,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        out[load] = json.loads(r.stdout)
    quiet, loaded = out["0"], out["100"]
    assert loaded["bus"]["busy_share"] == pytest.approx(1.0, abs=0.001)
    assert loaded["frames"] > 100 * capacity_fps(500_000)
    assert loaded["frames_received"] == loaded["frames"]
    assert loaded["bus"]["lost"]["total"] == 0
    assert loaded["agent"]["decode_errors"] == 0
    assert loaded["readings"] == quiet["readings"]
    for k in ("diesel_l", "gas_kg", "distance_km"):
        assert loaded[k] == pytest.approx(quiet[k], rel=1e-3), k


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bus-load", "101"], "--bus-load must be a percentage"),
        (["--bitrate", "0"], "--bitrate must be > 0"),
        (["--agent-process", "--speedup", "10"], "runs in real time"),
        (["--agent-process", "--kit-unplug-at", "5"], "kit plugged in throughout"),
    ],
)
def test_bad_load_options_say_why(cli, args: list[str], message: str) -> None:  # type: ignore[no-untyped-def]
    r = cli("sim", *args)
    assert r.returncode != 0
    assert message in r.stderr


def test_a_load_without_background_is_refused() -> None:
    with pytest.raises(ValueError, match="background"):
        Wire(250_000, T0, lambda t, i, d: None, None, 50.0)


def test_losses_say_where_each_frame_went() -> None:
    """A source whose queue overflows, and two frames the bus never delivered."""
    import time
    import uuid

    import can

    from cngmrv.drivers.can_source import CanSource
    from cngmrv.sim.harness import frame_losses

    channel = f"loss-{uuid.uuid4().hex[:8]}"
    tx = can.Bus(interface="virtual", channel=channel)
    src = CanSource(can.Bus(interface="virtual", channel=channel), queue_size=4, poll_s=0.01)
    src.start()
    lfe = j1939.make_id(j1939.PGN_LFE, 0, 6)
    try:
        for i in range(10):
            tx.send(can.Message(timestamp=T0 + i, arbitration_id=lfe, data=bytes(8)))
        deadline = time.monotonic() + 10
        while src.stats["frames"] + src.stats["queue_dropped"] < 10:
            assert time.monotonic() < deadline, "the source never read the frames"
            time.sleep(0.005)
        p = Pipeline(PipelineConfig())
        for t, can_id, data, mono in src.drain():
            p.on_can(t, can_id, data, mono)
    finally:
        src.stop()
        tx.shutdown()
    stats = {
        "can": src.stats,
        "can_queue_dropped": src.stats["queue_dropped"],
        "frames": p.stats.frames,
        "decode_errors": p.stats.decode_errors,
    }
    # 12 offered: 2 lost before the socket, 6 on the full queue, 4 decoded.
    assert frame_losses(12, stats) == {"socket": 2, "queue": 6, "decoder": 0, "total": 8}


def test_cli_runs_the_agent_in_its_own_process(cli) -> None:  # type: ignore[no-untyped-def]
    r = cli(
        "sim", "--json", "--agent-process", "--duration", "4", "--bitrate", "125000",
        "--bus-load", "30", timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout)
    assert s["agent_process"] is True
    proc = s["agent"]["process"]
    assert proc["pid"] > 0 and proc["peak_rss_mb"] > 0 and proc["cpu_s"] > 0
    assert s["bus"]["busy_share"] == pytest.approx(0.30, abs=0.02)
    assert s["bus"]["lost"]["total"] == 0 and s["frames_received"] == s["frames"]
    # Real time: the drive took about as long as it simulated.
    assert s["bus"]["drive_wall_s"] >= 4.0
    assert s["batches_signed"] == s["batches_verified"] >= 1
