"""Shared helpers for the integrator tests: feeding any channel kind, comparing results."""

from __future__ import annotations

import math
from typing import Any

import pytest

from cngmrv.native import (
    ChannelSpec,
    ChannelWindow,
    EventSpec,
    Integrator,
    ReferenceIntegrator,
    StateSpec,
    TankSpec,
    Window,
)

BOTH = pytest.mark.parametrize("cls", [Integrator, ReferenceIntegrator], ids=["c", "ref"])

REL, ABS = 1e-9, 1e-12

# (t, values, valid): values is (v,) for rate/state, (pulse, P, T) for events, (P, T) for tank.
Sample = tuple[float, tuple[float, ...], bool]


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL, abs_tol=ABS)


def cw(
    integral: float = 0.0,
    covered: float = 0.0,
    gaps: int = 0,
    longest: float = 0.0,
    events: int = 0,
    last: float | None = None,
    states: dict[str, float] | None = None,
) -> ChannelWindow:
    return ChannelWindow(integral, covered, gaps, longest, events, last, states)


def feed(it: Any, ch: int | str, samples: list[Sample], spec: Any = None) -> None:
    """Pushes samples with the push method of the channel's kind (rate if ``spec`` is None)."""
    ts = [s[0] for s in samples]
    ok = [s[2] for s in samples]
    cols = list(zip(*[s[1] for s in samples], strict=True)) if samples else []
    if isinstance(spec, EventSpec):
        pw, p, temp = cols or ([], [], [])
        it.push_events(ch, ts, pw, p, temp, ok)
    elif isinstance(spec, TankSpec):
        p, temp = cols or ([], [])
        it.push_tank(ch, ts, p, temp, ok)
    else:
        (v,) = cols or ([],)
        it.push(ch, ts, v, ok)


def feed_rate(it: Any, ch: int | str, samples: list[tuple[float, float, bool]]) -> None:
    feed(it, ch, [(t, (v,), ok) for t, v, ok in samples])


def by_index(windows: list[Window], name: str = "x") -> dict[int, ChannelWindow]:
    return {w.index: w.channels[name] for w in windows}


def channel_match(g: ChannelWindow, w: ChannelWindow) -> bool:
    if (g.gaps, g.events) != (w.gaps, w.events):
        return False
    if not all(close(a, b) for a, b in zip(g[:2], w[:2], strict=True)):
        return False
    if not close(g.longest_gap_s, w.longest_gap_s):
        return False
    if (g.last is None) != (w.last is None) or (g.last is not None and not close(g.last, w.last)):  # type: ignore[arg-type]
        return False
    if (g.states is None) != (w.states is None):
        return False
    if g.states is not None and w.states is not None:
        if g.states.keys() != w.states.keys():
            return False
        return all(close(g.states[k], w.states[k]) for k in g.states)
    return True


def assert_windows_match(got: list[Window], want: list[Window]) -> None:
    assert [w.index for w in got] == [w.index for w in want]
    for g, w in zip(got, want, strict=True):
        assert (g.t0, g.t1) == (w.t0, w.t1)
        assert g.channels.keys() == w.channels.keys()
        for name in w.channels:
            assert channel_match(g.channels[name], w.channels[name]), (
                g.index,
                name,
                g.channels[name],
                w.channels[name],
            )
        assert g.fuels.keys() == w.fuels.keys()
        for name in w.fuels:
            assert all(close(a, b) for a, b in zip(g.fuels[name], w.fuels[name], strict=True)), (
                g.index,
                name,
                g.fuels[name],
                w.fuels[name],
            )


def assert_state_match(a: Any, b: Any) -> None:
    ca, cb = a.counters, b.counters
    assert ca.keys() == cb.keys()
    for key in ca:
        assert close(ca[key], cb[key]), (key, ca, cb)
    assert a.rejected_by_channel == b.rejected_by_channel
    ta, tb = a.totals(), b.totals()
    assert ta.keys() == tb.keys()
    for key in ta:
        assert close(ta[key], tb[key]), (key, ta, tb)
    fa, fb = a.fuel_totals(), b.fuel_totals()
    assert fa.keys() == fb.keys()
    for key in fa:
        assert all(close(x, y) for x, y in zip(fa[key], fb[key], strict=True))


__all__ = [
    "ABS",
    "BOTH",
    "REL",
    "ChannelSpec",
    "Sample",
    "StateSpec",
    "assert_state_match",
    "assert_windows_match",
    "by_index",
    "close",
    "cw",
    "feed",
    "feed_rate",
]
