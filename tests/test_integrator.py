"""Tests for cngmrv.native: the C integrator against its Python oracle and closed forms.

Channel kinds other than rates (states, injection events, the tank, fuels)
have their own closed-form tests in test_integrator_kinds.py; the property
tests here cover every kind at once.
"""

from __future__ import annotations

import math
import os
import time
from array import array
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from integrator_helpers import (
    BOTH,
    Sample,
    assert_state_match,
    assert_windows_match,
    by_index,
    close,
    cw,
    feed,
    feed_rate,
)

from cngmrv.native import (
    ChannelSpec,
    EventSpec,
    FuelSpec,
    Integrator,
    ReferenceIntegrator,
    StateSpec,
    TankSpec,
    Window,
)

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy is in the dev venv, not a runtime dependency
    np = None  # type: ignore[assignment]

needs_numpy = pytest.mark.skipif(
    np is None, reason="numpy not installed (optional test dependency)"
)

# Set by tests/sanitize_native.py (make sanitize), which runs these tests against an
# ASan/UBSan build of the core.  CNGMRV_EXAMPLES raises the property tests'
# example count for a longer local run (3,000 passes in about a minute).
SANITIZED = os.environ.get("CNGMRV_EXPECT_SANITIZED") == "1"
EXAMPLES = int(os.environ.get("CNGMRV_EXAMPLES", "400"))


@pytest.mark.may_skip("it checks the sanitizer run itself, which make sanitize starts")
@pytest.mark.skipif(not SANITIZED, reason="only in the sanitizer run (make sanitize)")
def test_the_sanitized_build_is_the_one_under_test() -> None:
    # Guards the sanitizer run itself: without this, a PYTHONPATH mistake
    # would silently test the normal build and report "clean".
    from pathlib import Path

    import cngmrv.native._integrator as ext

    build = Path(os.environ["CNGMRV_SANITIZED_BUILD"]).resolve()
    assert Path(ext.__file__).resolve().is_relative_to(build)
    maps = Path("/proc/self/maps").read_text()
    assert "libasan" in maps and "libubsan" in maps


# --------------------------------------------------------------------------
# Hypothesis: random streams of every kind, chunking and pops; C must equal the oracle.

STEP_KIND = st.sampled_from(["small"] * 6 + ["zero", "long", "back"])
ODD = st.sampled_from([math.nan, math.inf, -math.inf])
VALID = st.sampled_from([True, True, True, True, False])
RATE_VALUE = st.one_of(st.floats(-1e3, 1e3, allow_nan=False), st.sampled_from([0.0, 1.0]), ODD)
STATE_VALUE = st.one_of(st.sampled_from([0.0, 1.0, 2.0, 2.0, 3.0, 0.5, -1.0, 1e300]), ODD)
PULSE = st.one_of(st.floats(0.0, 12.0), st.sampled_from([0.5, -1.0]), ODD)
RAIL_BAR = st.one_of(st.floats(0.0, 12.0), st.sampled_from([-1.0]), ODD)
TANK_BAR = st.one_of(st.floats(0.0, 300.0), st.sampled_from([0.0, 1500.0, -1.0]), ODD)
TEMP_K = st.one_of(st.floats(150.0, 420.0), st.sampled_from([0.0, 600.0]), ODD)


@st.composite
def channel_spec(draw: Any, i: int) -> Any:
    name, gap = f"c{i}", draw(st.sampled_from([0.0, 0.05, 0.3, 1.0, 2.5]))
    kind = draw(st.sampled_from(["rate", "rate", "state", "events", "tank"]))
    if kind == "rate":
        return ChannelSpec(name, gap, draw(st.sampled_from([1.0, -0.5, 1.0 / 3600.0, 3.0])))
    if kind == "state":
        return StateSpec(name, gap, ("a", "b", "c")[: draw(st.integers(1, 3))])
    if kind == "events":
        return EventSpec(
            name, gap, draw(st.sampled_from([1e-5, 0.3])), draw(st.sampled_from([0.0, 1.2]))
        )
    return TankSpec(name, gap, 0.05, 518.3, 46.0, 190.6, draw(st.sampled_from([0.05, 1.0])))


def sample_values(draw: Any, spec: Any) -> tuple[float, ...]:
    if isinstance(spec, ChannelSpec):
        return (draw(RATE_VALUE),)
    if isinstance(spec, StateSpec):
        return (draw(STATE_VALUE),)
    if isinstance(spec, EventSpec):
        return (draw(PULSE), draw(RAIL_BAR), draw(TEMP_K))
    return (draw(TANK_BAR), draw(TEMP_K))


Scenario = tuple[dict[str, Any], list[list[Sample]]]


@st.composite
def streams(draw: Any, allow_back: bool = True) -> Scenario:
    nch = draw(st.integers(1, 4))
    specs = [draw(channel_spec(i)) for i in range(nch)]
    fuels = [
        FuelSpec(
            f"f{i}",
            s.name,
            draw(st.sampled_from([36.3, 1.0])),
            draw(st.sampled_from([0.0741, 0.0])),
        )
        for i, s in enumerate(specs)
        if isinstance(s, ChannelSpec | EventSpec) and draw(st.booleans())
    ]
    kwargs = {
        "channels": specs,
        # Reading boundaries anywhere: round grids and arbitrary ones.
        "period": draw(st.one_of(st.sampled_from([0.1, 0.25, 1.0, 3.0]), st.floats(0.05, 4.0))),
        "origin": draw(st.one_of(st.sampled_from([0.0, -0.3, 7.1]), st.floats(-10.0, 10.0))),
        "max_windows": draw(st.sampled_from([0, 2, 5, 86400])),
        "fuels": fuels,
    }
    base = draw(st.sampled_from([0.0, 1.7e9]))
    out: list[list[Sample]] = []
    for spec in specs:
        t = base + draw(st.floats(-3.0, 3.0))
        samples: list[Sample] = []
        for _ in range(draw(st.integers(0, 30))):
            kind = draw(STEP_KIND)
            if kind == "small":
                t += draw(st.floats(0.0, 0.6))
            elif kind == "long":
                t += draw(st.floats(0.5, 8.0))
            elif kind == "back" and allow_back:
                t -= draw(st.floats(0.0, 1.0))  # out of order: must be rejected
            # "zero" keeps t: a duplicate timestamp, also rejected
            samples.append((t, sample_values(draw, spec), draw(VALID)))
        if draw(st.integers(0, 9)) == 0 and samples:
            bad_t = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
            samples.append((bad_t, samples[-1][1], True))  # non-finite t: rejected
        out.append(samples)
    return kwargs, out


def push_chunk(it: Any, i: int, spec: Any, chunk: list[Sample], one: bool) -> None:
    if one and isinstance(spec, ChannelSpec | StateSpec):
        for t, (v,), ok in chunk:
            it.push_one(f"c{i}", t, v, ok)
    else:
        feed(it, i, chunk, spec)


@settings(max_examples=EXAMPLES, suppress_health_check=[HealthCheck.too_slow])
@given(scen=streams(), data=st.data())
def test_c_matches_reference(scen: Scenario, data: Any) -> None:
    kwargs, chans = scen
    specs = kwargs["channels"]
    c, ref = Integrator(**kwargs), ReferenceIntegrator(**kwargs)
    pos = [0] * len(chans)
    last = {i: s[0][0] for i, s in enumerate(chans) if s}  # channels that have data
    while True:
        left = [i for i, s in enumerate(chans) if pos[i] < len(s)]
        if data.draw(st.integers(0, 3)) == 0 or not left:
            # Watermarks around the data, deliberately sometimes ahead of it,
            # so late data, skipped runs and empty windows are all exercised.
            wm = min((t for t in last.values() if math.isfinite(t)), default=0.0)
            wm += data.draw(st.floats(-2.0, 6.0))
            assert_windows_match(c.pop(wm), ref.pop(wm))
            if not left:
                break
            continue
        i = data.draw(st.sampled_from(left))
        n = data.draw(st.integers(1, len(chans[i]) - pos[i]))
        chunk = chans[i][pos[i] : pos[i] + n]
        push_chunk(c, i, specs[i], chunk, data.draw(st.booleans()))
        feed(ref, f"c{i}", chunk, specs[i])
        pos[i] += n
        last[i] = chunk[-1][0]
        assert c.pending_windows == ref.pending_windows
    assert_state_match(c, ref)
    assert_windows_match(c.flush(), ref.flush())
    assert_state_match(c, ref)
    for key, value in ref.counters.items():
        event(f"{key} > 0" if value else f"{key} == 0")


def honest_run(
    kwargs: dict[str, Any], chans: list[list[Sample]], watermarks: list[float], data: Any | None
) -> tuple[list[list[Window]], dict[str, float], dict[str, int | float]]:
    """Pushes exactly the samples before each watermark, then pops it, so the
    watermark contract is never broken.  With ``data``, in random chunks, channel
    order and input forms; without, one push per channel and watermark."""
    specs = kwargs["channels"]
    it = Integrator(**kwargs)
    pos = [0] * len(chans)
    popped = []
    for wm in [*watermarks, math.inf]:
        ends = [next((j for j, s in enumerate(ch) if s[0] >= wm), len(ch)) for ch in chans]
        if data is None:
            for i, ch in enumerate(chans):
                if ends[i] > pos[i]:
                    feed(it, i, ch[pos[i] : ends[i]], specs[i])
                    pos[i] = ends[i]
        while any(pos[i] < ends[i] for i in range(len(chans))):
            assert data is not None
            i = data.draw(st.sampled_from([i for i in range(len(chans)) if pos[i] < ends[i]]))
            n = data.draw(st.integers(1, ends[i] - pos[i]))
            chunk = chans[i][pos[i] : pos[i] + n]
            if np is not None and data.draw(st.booleans()):
                # numpy buffers go to C without a copy: same bits as lists.
                arrays = [np.array([s[0] for s in chunk])]
                arrays += [np.array(col) for col in zip(*[s[1] for s in chunk], strict=True)]
                arrays.append(np.array([s[2] for s in chunk]))
                if isinstance(specs[i], EventSpec):
                    it.push_events(i, *arrays)
                elif isinstance(specs[i], TankSpec):
                    it.push_tank(i, *arrays)
                else:
                    it.push(i, *arrays)
            else:
                push_chunk(it, i, specs[i], chunk, data.draw(st.booleans()))
            pos[i] += n
        popped.append(it.pop(wm) if math.isfinite(wm) else it.flush())
    return popped, it.totals(), it.counters


@settings(max_examples=EXAMPLES // 3, suppress_health_check=[HealthCheck.too_slow])
@given(scen=streams(allow_back=False), data=st.data())
def test_chunk_independence(scen: Scenario, data: Any) -> None:
    kwargs, chans = scen
    chans = [[s for s in ch if math.isfinite(s[0])] for ch in chans]
    times = [s[0] for ch in chans for s in ch] or [0.0]
    lo, hi = min(times), max(times)
    marks = sorted(data.draw(st.lists(st.floats(lo - 1.0, hi + 4.0), max_size=6)))
    first = honest_run(kwargs, chans, marks, None)
    second = honest_run(kwargs, chans, marks, data)
    # Identical, not merely close: each accumulator sees its additions in the same order.
    assert first == second
    assert first[2]["late_s"] == 0.0 and first[2]["late_gaps"] == 0
    assert first[2]["late_points"] == 0


@settings(max_examples=EXAMPLES // 4)
@given(
    values=st.lists(st.floats(-1e3, 1e3), min_size=2, max_size=40),
    steps=st.lists(st.floats(0.001, 0.5), min_size=40, max_size=40),
    period=st.sampled_from([0.1, 0.3, 1.0]),
    origin=st.floats(-1.0, 1.0),
)
def test_readings_sum_to_the_whole(
    values: list[float], steps: list[float], period: float, origin: float
) -> None:
    # Boundaries anywhere: whatever the grid, the windows add up to one
    # unsplit trapezoid sum over the same samples.
    times = [0.0]
    for s in steps[: len(values) - 1]:
        times.append(times[-1] + s)
    it = Integrator([ChannelSpec("x", 1.0)], period=period, origin=origin)
    feed_rate(it, "x", [(t, v, True) for t, v in zip(times, values, strict=True)])
    windows = it.flush()
    whole = math.fsum(
        0.5 * (values[i] + values[i + 1]) * (times[i + 1] - times[i]) for i in range(len(times) - 1)
    )
    scale = math.fsum(abs(v) for v in values) * times[-1] + 1.0
    assert abs(math.fsum(w.channels["x"].integral for w in windows) - whole) <= 1e-12 * scale
    assert close(math.fsum(w.channels["x"].covered_s for w in windows), times[-1])


# --------------------------------------------------------------------------
# Closed forms: a constant, a ramp, a sine over whole periods.


@BOTH
def test_constant_flow_is_exact_in_every_window(cls: Any) -> None:
    # 36 L/h sampled irregularly, windows of 1 s: 0.01 L in every full window.
    times = [0.0]
    while times[-1] < 20.0:
        times.append(min(20.0, times[-1] + 0.02 + 0.07 * ((len(times) * 0.618) % 1.0)))
    it = cls([ChannelSpec("x", 0.2, 1.0 / 3600.0)], period=1.0)
    feed_rate(it, "x", [(t, 36.0, True) for t in times])
    windows = it.flush()
    assert [w.index for w in windows] == list(range(21))
    for w in windows[:20]:
        assert close(w.channels["x"].integral, 0.01) and close(w.channels["x"].covered_s, 1.0)
    assert windows[20].channels["x"] == cw()
    assert close(it.totals()["x"], 0.2)


@BOTH
def test_linear_signal_windows_match_closed_form(cls: Any) -> None:
    a, b, scale = 2.0, 0.75, 1.0 / 3600.0
    t0, t1 = 0.13, 41.9
    times = [t0]
    while times[-1] < t1:  # irregular steps, all under max_gap
        times.append(min(t1, times[-1] + 0.05 + 0.61 * ((len(times) * 0.618) % 1.0)))
    it = cls([ChannelSpec("x", 0.7, scale)], period=2.5, origin=0.37)
    feed_rate(it, "x", [(t, a + b * t, True) for t in times])
    windows = it.flush()

    def exact(lo: float, hi: float) -> float:
        return scale * (a * (hi - lo) + b / 2 * (hi * hi - lo * lo))

    for w in windows:
        lo, hi = max(t0, w.t0), min(t1, w.t1)
        got = w.channels["x"]
        assert close(got.integral, exact(lo, hi)), (w.index, got.integral, exact(lo, hi))
        assert close(got.covered_s, hi - lo)
    total = math.fsum(w.channels["x"].integral for w in windows)
    assert close(total, exact(t0, t1))
    assert close(it.totals()["x"], exact(t0, t1))


@BOTH
def test_sine_over_whole_periods(cls: Any) -> None:
    # v = 3 + 2 sin(2 pi t / 2 s), 256 samples per period (exact binary steps).
    # The trapezoid rule is exact for a sine over whole periods, so every 2 s
    # window holds exactly 3 * 2 s, and the sine part cancels.
    step = 2.0 / 256
    times = [i * step for i in range(256 * 5 + 1)]
    it = cls([ChannelSpec("x", 0.05)], period=2.0)
    feed_rate(it, "x", [(t, 3.0 + 2.0 * math.sin(math.pi * t), True) for t in times])
    windows = it.flush()
    assert [w.index for w in windows] == [0, 1, 2, 3, 4, 5]
    for w in windows[:5]:
        assert abs(w.channels["x"].integral - 6.0) < 1e-12, w
        assert w.channels["x"].covered_s == 2.0
    # Half-period windows see the sine's area 4/pi on top: a discrete check
    # that the split is not merely symmetric.
    it = cls([ChannelSpec("x", 0.05)], period=1.0)
    feed_rate(it, "x", [(t, 3.0 + 2.0 * math.sin(math.pi * t), True) for t in times])
    first = it.flush()[0].channels["x"].integral
    # Trapezoid of sin(pi t) over [0, 1] with N steps: (1/N) cot(pi / (2N)).
    assert abs(first - (3.0 + 2.0 * step / math.tan(math.pi * step / 2))) < 1e-12


@BOTH
def test_piecewise_linear_signal(cls: Any) -> None:
    knots = [(0.0, 5.0), (3.2, -1.0), (3.9, 4.0), (8.0, 4.0), (9.1, 0.0)]

    def value(t: float) -> float:
        for (ta, va), (tb, vb) in zip(knots, knots[1:], strict=False):
            if ta <= t <= tb:
                return va + (vb - va) * (t - ta) / (tb - ta)
        raise AssertionError(t)

    def exact(lo: float, hi: float) -> float:
        total = 0.0
        for (ta, _), (tb, _) in zip(knots, knots[1:], strict=False):
            a, b = max(lo, ta), min(hi, tb)
            if b > a:
                total += (value(a) + value(b)) / 2 * (b - a)
        return total

    times = sorted({k[0] for k in knots} | {0.45 * i for i in range(21)})
    it = cls([ChannelSpec("x", 0.5)], period=1.0)
    feed_rate(it, "x", [(t, value(t), True) for t in times])
    for w in it.flush():
        assert close(w.channels["x"].integral, exact(w.t0, min(w.t1, 9.1))), w


@BOTH
def test_span_split_exactly_at_boundaries(cls: Any) -> None:
    # v = t - 0.5 from t = 0.5 to 3.5 in one span crossing three boundaries.
    it = cls([ChannelSpec("x", 5.0)], period=1.0)
    feed_rate(it, "x", [(0.5, 0.0, True), (3.5, 3.0, True)])
    got = by_index(it.flush())
    assert got == {
        0: cw(0.125, 0.5),
        1: cw(1.0, 1.0),
        2: cw(2.0, 1.0),
        3: cw(1.375, 0.5),
    }


# --------------------------------------------------------------------------
# Gap rules.


@BOTH
def test_long_gap_is_not_filled(cls: Any) -> None:
    it = cls([ChannelSpec("x", 2.0)], period=1.0)
    feed_rate(it, "x", [(0.0, 1.0, True), (1.0, 1.0, True), (5.5, 1.0, True), (6.5, 1.0, True)])
    got = by_index(it.flush())
    assert sorted(got) == list(range(7))  # empty windows between samples are explicit
    assert got[0] == cw(1.0, 1.0)
    assert got[1] == got[2] == got[3] == got[4] == cw()
    assert got[5] == cw(0.5, 0.5, gaps=1, longest=4.5)
    assert got[6] == cw(0.5, 0.5)
    assert it.totals()["x"] == 2.0


@BOTH
def test_a_run_of_invalid_samples_is_one_gap(cls: Any) -> None:
    # valid 0.0, invalid 1.5, 2.0, 2.2, valid 2.5, 3.5: coverage stops at 0.0
    # and resumes at 2.5, so one gap of 2.5 s, recorded where it ends.
    it = cls([ChannelSpec("x", 2.0)], period=1.0)
    samples = [
        (0.0, 1.0, True),
        (1.5, 9.0, False),
        (2.0, 9.0, False),
        (2.2, math.nan, True),
        (2.5, 2.0, True),
        (3.5, 2.0, True),
    ]
    feed_rate(it, "x", samples)
    got = by_index(it.flush())
    assert got[0] == cw() and got[1] == cw()
    assert got[2] == cw(1.0, 0.5, gaps=1, longest=2.5)
    assert got[3] == cw(1.0, 0.5)


@BOTH
def test_two_outages_are_two_gaps(cls: Any) -> None:
    it = cls([ChannelSpec("x", 0.5)], period=10.0)
    t = [0.0, 0.25, 0.5, 2.0, 2.25, 2.5, 2.75, 5.0, 5.25]
    feed_rate(it, "x", [(ti, 1.0, ti != 2.5) for ti in t])
    (w,) = it.flush()
    # 0.5 -> 2.0 too long; 2.25 -> 2.5 -> 2.75 invalid and 2.75 -> 5.0 too long: one run.
    assert w.channels["x"] == cw(1.0, 1.0, gaps=2, longest=2.75)


@BOTH
def test_gap_still_open_at_flush_is_recorded_there(cls: Any) -> None:
    it = cls([ChannelSpec("x", 1.0)], period=1.0)
    feed_rate(it, "x", [(0.0, 1.0, True), (0.5, 1.0, True), (0.9, 1.0, False), (3.2, 0.0, False)])
    assert [w.index for w in it.pop(3.0)] == [0, 1]
    got = by_index(it.flush())
    assert got == {2: cw(), 3: cw(gaps=1, longest=2.7)}


@BOTH
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_value_is_invalid(cls: Any, bad: float) -> None:
    it = cls([ChannelSpec("x", 2.0)], period=10.0)
    feed_rate(it, "x", [(0.0, 1.0, True), (1.0, bad, True), (2.0, 1.0, True), (3.0, 1.0, True)])
    (w,) = it.flush()
    assert w.channels["x"] == cw(1.0, 1.0, gaps=1, longest=2.0)


@BOTH
def test_gap_ending_on_boundary_counts_in_the_window_that_starts_there(cls: Any) -> None:
    it = cls([ChannelSpec("x", 1.0)], period=1.0)
    feed_rate(it, "x", [(0.5, 1.0, True), (3.0, 1.0, True), (3.5, 1.0, True)])
    got = by_index(it.flush())
    assert got[2] == cw() and got[3] == cw(0.5, 0.5, gaps=1, longest=2.5)


@BOTH
def test_duplicate_timestamps_are_rejected_and_counted(cls: Any) -> None:
    it = cls([ChannelSpec("x", 2.0), ChannelSpec("y", 2.0)], period=10.0)
    feed_rate(it, "x", [(1.0, 5.0, True), (1.0, 7.0, True), (2.0, 7.0, True)])
    feed_rate(it, "x", [(2.0, 100.0, False), (3.0, 7.0, True)])
    (w,) = it.flush()
    assert w.channels["x"] == cw(13.0, 2.0)  # 5 -> 7 over 1 s, then 7 for 1 s
    assert it.counters["rejected"] == 2
    assert it.rejected_by_channel == {"x": 2, "y": 0}


@BOTH
def test_out_of_order_and_bad_times_are_rejected(cls: Any) -> None:
    it = cls([ChannelSpec("x", 2.0)], period=1.0)
    feed_rate(it, "x", [(1.0, 1.0, True), (0.5, 100.0, True), (math.nan, 1.0, True)])
    feed_rate(it, "x", [(math.inf, 1.0, True), (1e300, 1.0, True), (2.0, 1.0, True)])
    assert it.counters["rejected"] == 4
    assert it.totals()["x"] == 1.0


@BOTH
def test_zero_max_gap_integrates_nothing(cls: Any) -> None:
    it = cls([ChannelSpec("x", 0.0)], period=1.0)
    feed_rate(it, "x", [(0.0, 1.0, True), (0.1, 1.0, True), (0.2, 2.0, True)])
    (w,) = it.flush()
    assert w.channels["x"] == cw(gaps=1, longest=0.2)


# --------------------------------------------------------------------------
# Emission, lateness, bounded memory.


@BOTH
def test_pop_waits_for_lateness_and_never_emits_twice(cls: Any) -> None:
    it = cls([ChannelSpec("x", 0.5), ChannelSpec("y", 1.5)], period=1.0, origin=0.25)
    assert it.lateness == 1.5
    feed_rate(it, "x", [(0.3, 1.0, True), (0.7, 1.0, True), (1.2, 1.0, True), (4.0, 1.0, True)])
    assert it.pop(2.74) == []  # window 0 = [0.25, 1.25) needs 1.25 + 1.5 <= watermark
    first = it.pop(2.75)
    assert [(w.index, w.t0, w.t1) for w in first] == [(0, 0.25, 1.25)]
    assert it.pop(2.75) == []
    assert [w.index for w in it.pop(5.0)] == [1, 2]
    assert [w.index for w in it.flush()] == [3]
    assert it.flush() == []


@BOTH
def test_late_data_is_counted_not_integrated(cls: Any) -> None:
    it = cls([ChannelSpec("x", 1.0), ChannelSpec("y", 1.0)], period=1.0)
    feed_rate(it, "x", [(0.0, 1.0, True), (5.0, 1.0, True)])
    assert [w.index for w in it.pop(4.0)] == [0, 1, 2]  # closes windows 0..2
    # y broke the watermark promise: 1.5..3.0 lands in closed windows 1 and 2.
    feed_rate(it, "y", [(1.5, 2.0, True), (2.5, 2.0, True), (3.5, 2.0, True), (6.0, 2.0, True)])
    c = it.counters
    assert c["late_s"] == 1.5 and c["late_gaps"] == 0
    got = by_index(it.flush(), "y")
    assert got[3] == cw(1.0, 0.5)  # the part of 2.5 -> 3.5 after the frontier still counts
    assert got[6] == cw(gaps=1, longest=2.5)
    assert it.totals()["y"] == 1.0
    feed_rate(it, "x", [(6.5, 1.0, True), (7.5, 1.0, True)])
    # flush recorded x's open gap 0.0 -> 5.0; the next, 5.0 -> 6.5, ends in closed window 6.
    assert it.counters["late_gaps"] == 1


@BOTH
def test_first_window_is_the_earliest_touched_across_channels(cls: Any) -> None:
    it = cls([ChannelSpec("x", 1.0), ChannelSpec("y", 1.0)], period=1.0)
    feed_rate(it, "x", [(5.5, 1.0, True)])
    feed_rate(it, "y", [(2.5, 1.0, True)])
    assert [w.index for w in it.flush()] == [2, 3, 4, 5]


@BOTH
def test_max_windows_skips_long_empty_runs_whole(cls: Any) -> None:
    samples = [(0.5, 1.0, True), (5.5, 1.0, True), (7.5, 1.0, True)]
    it = cls([ChannelSpec("x", 1.0)], period=1.0, max_windows=3)
    feed_rate(it, "x", samples)
    assert [w.index for w in it.flush()] == [0, 5, 6, 7]  # run 1..4 (4 > 3) skipped
    assert it.counters["skipped_windows"] == 4
    it = cls([ChannelSpec("x", 1.0)], period=1.0, max_windows=4)
    feed_rate(it, "x", samples)
    # 1..4 uses the whole budget, so the next run (6) no longer fits.
    assert [w.index for w in it.flush()] == [0, 1, 2, 3, 4, 5, 7]
    assert it.counters["skipped_windows"] == 1


@BOTH
def test_huge_time_jump_costs_no_memory(cls: Any) -> None:
    it = cls([ChannelSpec("x", 1.0)], period=1.0)
    start = time.perf_counter()
    feed_rate(
        it, "x", [(0.0, 1.0, True), (0.5, 1.0, True), (1e12, 1.0, True), (1e12 + 0.5, 1.0, True)]
    )
    assert it.pending_windows == 2
    got = it.flush()
    assert [w.index for w in got] == [0, 10**12]
    assert got[1].channels["x"] == cw(0.5, 0.5, gaps=1, longest=1e12 - 0.5)
    assert it.counters["skipped_windows"] == 10**12 - 1
    assert it.pop(2e12) == []  # watermark far ahead: trailing empties skipped, not built
    assert it.counters["skipped_windows"] > 10**12
    assert time.perf_counter() - start < 1.0


@BOTH
def test_window_sum_equals_totals_and_compensation(cls: Any) -> None:
    # 1e16 + 1 - 1e16: naive summation loses the 1 entirely.  The jumps
    # between levels are gaps, so only the three level spans are integrated.
    it = cls([ChannelSpec("x", 1.5)], period=100.0)
    feed_rate(it, "x", [(0.0, 1e16, True), (1.0, 1e16, True), (3.0, 1.0, True), (4.0, 1.0, True)])
    feed_rate(it, "x", [(6.0, -1e16, True), (7.0, -1e16, True)])
    assert it.totals()["x"] == 1.0
    (w,) = it.flush()
    assert w.channels["x"] == cw(1.0, 3.0, gaps=2, longest=2.0)


@needs_numpy
def test_precision_ten_million_samples() -> None:
    # 1e7 samples at 100 Hz of a constant; every window accumulator and the
    # running total must stay within 1e-9 (contract).  A naive running sum is
    # off by ~9e-13 here, so the 1e-13 bound below also proves compensation.
    n, chunk, v = 10_000_000, 1_000_000, 0.1
    it = Integrator([ChannelSpec("x", 0.02)], period=1e6)
    for start in range(0, n, chunk):
        t = np.arange(start, start + chunk) * 0.01
        it.push(0, t, np.full(chunk, v), np.ones(chunk, dtype=np.uint8))
    last = (n - 1) * 0.01
    exact = v * last
    total = it.totals()["x"]
    (w,) = it.flush()
    for got in (total, w.channels["x"].integral):
        assert abs(got - exact) / exact < 1e-9
        assert abs(got - exact) / exact < 1e-13
    assert abs(w.channels["x"].covered_s - last) / last < 1e-13


# --------------------------------------------------------------------------
# Input forms and errors.


@needs_numpy
def test_input_forms_give_identical_results() -> None:
    # Exact in float32 too, so the float32 form must give the same bits.
    t = [0.0, 0.25, 0.875, 1.5, 2.0, 4.5, 5.0]
    v = [1.0, 2.0, -1.0, 0.5, 3.0, 3.0, 1.0]
    ok = [True, True, True, False, True, True, True]
    forms: list[tuple[Any, Any, Any]] = [
        (t, v, ok),
        (tuple(t), tuple(v), tuple(ok)),
        (array("d", t), array("d", v), bytes(ok)),
        (memoryview(array("d", t)), memoryview(array("d", v)), bytearray(ok)),
        (np.array(t), np.array(v), np.array(ok)),
        (np.array(t, dtype=np.float32), np.array(v), np.array(ok, np.uint8)),
        (np.repeat(np.array(t), 2)[::2], np.array(v, dtype=">f8"), np.array(ok, dtype=np.int64)),
    ]
    results = []
    for ft, fv, fo in forms:
        it = Integrator([ChannelSpec("x", 1.0)], period=1.0)
        it.push("x", ft, fv, fo)
        results.append((it.flush(), it.counters, it.totals()))
    assert all(r == results[0] for r in results[1:])
    ref = ReferenceIntegrator([ChannelSpec("x", 1.0)], period=1.0)
    ref.push("x", np.array(t), np.array(v), np.array(ok))
    assert_windows_match(results[0][0], ref.flush())


@needs_numpy
def test_caller_buffer_is_not_retained() -> None:
    t, v, ok = np.array([0.0, 1.0]), np.array([1.0, 1.0]), np.ones(2, np.uint8)
    it = Integrator([ChannelSpec("x", 2.0)], period=10.0)
    it.push(0, t, v, ok)
    t[:], v[:], ok[:] = 50.0, 1e9, 0
    it.push(0, [2.0], [1.0], [True])
    (w,) = it.flush()
    assert w.channels["x"] == cw(2.0, 2.0)


@BOTH
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"channels": []}, "at least one channel"),
        ({"channels": [ChannelSpec("a", 1.0), ChannelSpec("a", 2.0)]}, "duplicate"),
        ({"channels": [ChannelSpec("a", -1.0)]}, "max_gap"),
        ({"channels": [ChannelSpec("a", math.nan)]}, "max_gap"),
        ({"channels": [ChannelSpec("a", math.inf)]}, "max_gap"),
        ({"channels": [ChannelSpec("a", 1.0, math.nan)]}, "scale"),
        ({"channels": [ChannelSpec("", 1.0)]}, "name"),
        ({"channels": [ChannelSpec("a", 1.0)], "period": 0.0}, "period"),
        ({"channels": [ChannelSpec("a", 1.0)], "period": -1.0}, "period"),
        ({"channels": [ChannelSpec("a", 1.0)], "period": math.nan}, "period"),
        ({"channels": [ChannelSpec("a", 1.0)], "origin": math.inf}, "origin"),
        ({"channels": [ChannelSpec("a", 1.0)], "max_windows": -1}, "max_windows"),
        ({"channels": [ChannelSpec("a", 1.0)], "max_windows": 1.5}, "max_windows"),
    ],
)
def test_bad_construction(cls: Any, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


@BOTH
def test_bad_push_and_pop(cls: Any) -> None:
    it = cls([ChannelSpec("a", 1.0)])
    with pytest.raises(ValueError, match="unknown channel"):
        it.push("b", [0.0], [1.0], [True])
    with pytest.raises(ValueError, match="unknown channel"):
        it.push_one("b", 0.0, 1.0, True)
    with pytest.raises(ValueError, match="out of range"):
        it.push(1, [0.0], [1.0], [True])
    with pytest.raises(ValueError, match="out of range"):
        it.push_one(-1, 0.0, 1.0, True)
    with pytest.raises(ValueError, match="length mismatch"):
        it.push(0, [0.0, 1.0], [1.0], [True, True])
    with pytest.raises(ValueError, match="length mismatch"):
        it.push(0, [0.0], [1.0], [True, True])
    with pytest.raises(ValueError, match="watermark"):
        it.pop(math.nan)
    with pytest.raises(ValueError, match="watermark"):
        it.pop(1e300)
    assert it.counters["rejected"] == 0 and it.flush() == []


def test_bad_buffers_c() -> None:
    it = Integrator([ChannelSpec("a", 1.0)])
    with pytest.raises(ValueError, match="float64"):
        it.push(0, b"\x00" * 8, [1.0], [True])
    with pytest.raises(ValueError, match="t:"):
        it.push(0, ["x"], [1.0], [True])
    if np is not None:
        with pytest.raises(ValueError, match="1-D"):
            it.push(0, np.zeros((2, 2)), np.zeros(4), np.ones(4, np.uint8))
