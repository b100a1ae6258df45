"""Pure-Python reference of the integrator: the test oracle for the C core.

Standard library only.  Every floating-point step mirrors ``integrator.c`` in
the same order, so both produce the same bits; when changing one, change the
other and ``docs/integrator.md``.  It is far too slow for production (a few
hundred times slower than the C core) and is meant for tests, documentation
and debugging.

The value types (specs, :class:`ChannelWindow`, :class:`FuelWindow`,
:class:`Window`) live here so this module stays importable without the
compiled extension.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

# Window indices stay within +-2**53 so float(k) is exact (same as the C side).
K_LIMIT = 2.0**53
# Steps allowed to correct floor((t - origin) / period) against the boundaries.
ADJUST_MAX = 4
INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1
# Newton iterations and relative step tolerance for the DAK reduced density.
DAK_MAX_ITER = 50
DAK_TOL = 1e-13
# Below this reduced pressure Z is 1 to better than 1e-9 (and y*y could underflow).
DAK_IDEAL_PR = 1e-9
DAK_MIN_Y = 1e-30
PA_PER_BAR = 1e5
# Dranchuk & Abou-Kassem (1975), J. Can. Pet. Tech. 14(3), doi:10.2118/75-03-03.
A1, A2, A3, A4, A5 = 0.3265, -1.0700, -0.5339, 0.01569, -0.05165
A6, A7, A8, A9, A10, A11 = 0.5475, -0.7361, 0.1844, 0.1056, 0.6134, 0.7210

RATE, STATE, EVENTS, TANK = 0, 1, 2, 3
OTHER_STATE = "other"


# -- specs ---------------------------------------------------------------


@dataclass(frozen=True)
class ChannelSpec:
    """A rate channel: ``v * scale`` integrated over time by the trapezoid rule.

    ``max_gap`` (seconds, finite, >= 0) is the longest span between two
    consecutive valid samples that is still integrated; ``scale`` multiplies
    every value (for example 1/3600 to turn a per-hour rate into an amount).
    """

    name: str
    max_gap: float
    scale: float = 1.0


@dataclass(frozen=True)
class StateSpec:
    """A state channel: seconds in each of ``states`` (code ``i`` is ``states[i]``).

    Codes that are not an index of ``states`` count as ``"other"``.
    """

    name: str
    max_gap: float
    states: tuple[str, ...]


@dataclass(frozen=True)
class EventSpec:
    """Gas-injection events: each adds ``k * max(pulse - dead_time, 0) * P / sqrt(T)``."""

    name: str
    max_gap: float
    k: float
    dead_time: float


@dataclass(frozen=True)
class TankSpec:
    """Tank readings: mass ``P V / (Z R T)`` with the DAK Z, and refuel detection."""

    name: str
    max_gap: float
    volume_m3: float
    r_specific: float
    p_pc_bar: float
    t_pc_k: float
    refuel_kg: float


AnySpec = ChannelSpec | StateSpec | EventSpec | TankSpec


@dataclass(frozen=True)
class FuelSpec:
    """Energy and CO2 of a fuel, from a rate or events channel named ``channel``."""

    name: str
    channel: str
    mj_per_unit: float
    kg_co2_per_mj: float


# -- results ---------------------------------------------------------------


class ChannelWindow(NamedTuple):
    """One channel over one window: see docs/integrator.md section 8."""

    integral: float
    covered_s: float
    gaps: int
    longest_gap_s: float
    events: int = 0
    last: float | None = None
    states: dict[str, float] | None = None


class FuelWindow(NamedTuple):
    energy_mj: float
    co2_kg: float


@dataclass(frozen=True)
class Window:
    """Window ``index`` covers ``[t0, t1)`` with ``t0 = origin + index * period``."""

    index: int
    t0: float
    t1: float
    channels: dict[str, ChannelWindow]
    fuels: dict[str, FuelWindow]


# -- validation, shared with the C-backed class ----------------------------


@dataclass(frozen=True)
class Config:
    """Validated constructor arguments."""

    specs: tuple[AnySpec, ...]
    names: tuple[str, ...]
    kinds: tuple[int, ...]
    fuels: tuple[tuple[str, int, float, float], ...]  # name, channel index, mj, co2
    period: float
    origin: float
    max_windows: int

    @property
    def lateness(self) -> float:
        return max(float(s.max_gap) for s in self.specs)


def kind_of(spec: Any) -> int:
    for cls, kind in (
        (ChannelSpec, RATE),
        (StateSpec, STATE),
        (EventSpec, EVENTS),
        (TankSpec, TANK),
    ):
        if isinstance(spec, cls):
            return kind
    raise ValueError(f"not a channel spec: {spec!r}")


def _float(x: Any, what: str) -> float:
    if isinstance(x, bool):
        raise ValueError(f"{what} must be a number, got {x!r}")
    try:
        return float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {x!r}") from None


def _finite(spec_name: str, field: str, x: Any, lower: float | None, strict: bool) -> None:
    v = _float(x, f"channel {spec_name!r} {field}")
    ok = math.isfinite(v) and (lower is None or (v > lower if strict else v >= lower))
    if not ok:
        bound = "" if lower is None else f" and {'>' if strict else '>='} {lower:g}"
        raise ValueError(f"channel {spec_name!r}: {field} must be finite{bound}, got {x!r}")


def validate(
    channels: Sequence[AnySpec],
    period: float,
    origin: float,
    max_windows: int,
    fuels: Sequence[FuelSpec] = (),
) -> Config:
    """Checks constructor arguments; raises ValueError naming the bad one."""
    specs = list(channels)
    if not specs:
        raise ValueError("at least one channel is required")
    names: list[str] = []
    kinds: list[int] = []
    slots = 0
    for i, spec in enumerate(specs):
        try:
            kind = kind_of(spec)
        except ValueError:
            raise ValueError(f"channels[{i}] is not a channel spec: {spec!r}") from None
        if not isinstance(spec.name, str) or not spec.name:
            raise ValueError(f"channels[{i}]: name must be a non-empty string")
        if spec.name in names:
            raise ValueError(f"duplicate channel name {spec.name!r}")
        names.append(spec.name)
        kinds.append(kind)
        _finite(spec.name, "max_gap", spec.max_gap, 0.0, False)
        if isinstance(spec, ChannelSpec):
            _finite(spec.name, "scale", spec.scale, None, False)
        elif isinstance(spec, StateSpec):
            states = spec.states
            if (
                not isinstance(states, tuple)
                or not states
                or not all(isinstance(s, str) and s for s in states)
            ):
                raise ValueError(f"channel {spec.name!r}: states must be a tuple of names")
            if len(set(states)) != len(states) or OTHER_STATE in states:
                raise ValueError(
                    f"channel {spec.name!r}: states must be distinct and not {OTHER_STATE!r}"
                )
            slots += len(states) + 1
            if slots > INT32_MAX // 2:
                raise ValueError(f"channel {spec.name!r}: too many states")
        elif isinstance(spec, EventSpec):
            _finite(spec.name, "k", spec.k, 0.0, False)
            _finite(spec.name, "dead_time", spec.dead_time, 0.0, False)
        else:
            for field in ("volume_m3", "r_specific", "p_pc_bar", "t_pc_k", "refuel_kg"):
                _finite(spec.name, field, getattr(spec, field), 0.0, True)
    fuel_out: list[tuple[str, int, float, float]] = []
    for i, fuel in enumerate(fuels):
        if not isinstance(fuel, FuelSpec):
            raise ValueError(f"fuels[{i}] is not a FuelSpec: {fuel!r}")
        if not isinstance(fuel.name, str) or not fuel.name or fuel.name in [f[0] for f in fuel_out]:
            raise ValueError(f"fuels[{i}]: name must be a non-empty, distinct string")
        if fuel.channel not in names:
            raise ValueError(f"fuel {fuel.name!r}: unknown channel {fuel.channel!r}")
        ci = names.index(fuel.channel)
        if kinds[ci] not in (RATE, EVENTS):
            raise ValueError(
                f"fuel {fuel.name!r}: channel {fuel.channel!r} is not a rate or events channel"
            )
        factors = []
        for field in ("mj_per_unit", "kg_co2_per_mj"):
            v = _float(getattr(fuel, field), f"fuel {fuel.name!r} {field}")
            if not (math.isfinite(v) and v >= 0.0):
                raise ValueError(f"fuel {fuel.name!r}: {field} must be finite and >= 0, got {v!r}")
            factors.append(v)
        fuel_out.append((fuel.name, ci, factors[0], factors[1]))
    p = _float(period, "period")
    if not (math.isfinite(p) and p > 0.0):
        raise ValueError(f"period must be finite and > 0, got {period!r}")
    o = _float(origin, "origin")
    if not math.isfinite(o):
        raise ValueError(f"origin must be finite, got {origin!r}")
    if isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 0:
        raise ValueError(f"max_windows must be an int >= 0, got {max_windows!r}")
    if max_windows > INT64_MAX:
        raise ValueError(f"max_windows must fit in int64, got {max_windows!r}")
    return Config(
        specs=tuple(specs),
        names=tuple(names),
        kinds=tuple(kinds),
        fuels=tuple(fuel_out),
        period=p,
        origin=o,
        max_windows=max_windows,
    )


def resolve_channel(
    cfg: Config, index: dict[str, int], channel: int | str, kinds: tuple[int, ...]
) -> int:
    """Channel index from an index or a name; ValueError if unknown or of another kind."""
    if isinstance(channel, str):
        try:
            ci = index[channel]
        except KeyError:
            raise ValueError(f"unknown channel {channel!r}; known: {list(cfg.names)}") from None
    elif isinstance(channel, bool) or not isinstance(channel, int):
        raise ValueError(f"channel must be an int index or a name, got {channel!r}")
    elif not 0 <= channel < len(cfg.names):
        raise ValueError(f"channel index {channel} out of range 0..{len(cfg.names) - 1}")
    else:
        ci = channel
    if cfg.kinds[ci] not in kinds:
        want = " or ".join(_KIND_NAMES[k] for k in kinds)
        raise ValueError(
            f"channel {cfg.names[ci]!r} is a {_KIND_NAMES[cfg.kinds[ci]]} channel, not {want}"
        )
    return ci


_KIND_NAMES = {RATE: "rate", STATE: "state", EVENTS: "events", TANK: "tank"}


def check_watermark(watermark: float) -> float:
    w = _float(watermark, "watermark")
    if not math.isfinite(w):
        raise ValueError(f"watermark must be finite, got {watermark!r}")
    return w


def out_of_range_watermark(w: float) -> ValueError:
    return ValueError(f"watermark {w!r} is too far from origin (window index beyond 2**53)")


def fuel_totals(cfg: Config, totals: dict[str, float]) -> dict[str, FuelWindow]:
    """Fuel energy and CO2 of the channel totals (same products as per window)."""
    out = {}
    for name, ci, mj, co2 in cfg.fuels:
        energy = totals[cfg.names[ci]] * mj
        out[name] = FuelWindow(energy, energy * co2)
    return out


# -- real gas ---------------------------------------------------------------


def dak_z(p_pr: float, t_pr: float) -> float:
    """Dranchuk-Abou-Kassem Z; NaN outside 0 <= p_pr <= 30, 1 <= t_pr <= 3 or without convergence."""
    if not (p_pr >= 0.0 and p_pr <= 30.0 and t_pr >= 1.0 and t_pr <= 3.0):
        return math.nan
    if p_pr < DAK_IDEAL_PR:
        return 1.0
    t = 1.0 / t_pr
    t2 = t * t
    t3 = t2 * t
    t4 = t3 * t
    t5 = t4 * t
    r1 = A1 + A2 * t + A3 * t3 + A4 * t4 + A5 * t5
    r2 = 0.27 * p_pr * t
    r3 = A6 + A7 * t + A8 * t2
    r4 = A9 * (A7 * t + A8 * t2)
    r5 = A10 * t3
    y = r2
    for _ in range(DAK_MAX_ITER):
        y2 = y * y
        y4 = y2 * y2
        e = math.exp(-A11 * y2)
        f = r1 * y - r2 / y + r3 * y2 - r4 * (y4 * y) + r5 * y2 * (1.0 + A11 * y2) * e + 1.0
        df = (
            r1
            + r2 / y2
            + 2.0 * r3 * y
            - 5.0 * r4 * y4
            + 2.0 * r5 * y * (1.0 + A11 * y2 - A11 * A11 * y4) * e
        )
        if not (df != 0.0) or not math.isfinite(df):
            return math.nan
        dy = f / df
        y = y - dy
        if not (y > DAK_MIN_Y) or not math.isfinite(y):
            return math.nan
        if abs(dy) <= DAK_TOL * y:
            return r2 / y
    return math.nan


def tank_mass(
    pressure_bar: float,
    temperature_k: float,
    volume_m3: float,
    r_specific: float,
    p_pc_bar: float,
    t_pc_k: float,
) -> float:
    """``P V / (Z R T)`` in kg (P absolute, bar); NaN where not defined."""
    if not (math.isfinite(pressure_bar) and math.isfinite(temperature_k)):
        return math.nan
    if not (pressure_bar >= 0.0) or not (temperature_k > 0.0):
        return math.nan
    z = dak_z(pressure_bar / p_pc_bar, temperature_k / t_pc_k)
    if math.isnan(z) or not (z > 0.0):
        return math.nan
    return pressure_bar * PA_PER_BAR * volume_m3 / (z * r_specific * temperature_k)


# -- the integrator ------------------------------------------------------------


class _NSum:
    """Neumaier (Kahan-Babuska) sum; same operations as nadd() in integrator.c."""

    __slots__ = ("s", "c")

    def __init__(self) -> None:
        self.s = 0.0
        self.c = 0.0

    def add(self, x: float) -> None:
        s = self.s
        t = s + x
        if abs(s) >= abs(x):
            self.c += (s - t) + x
        else:
            self.c += (x - t) + s
        self.s = t

    def value(self) -> float:
        return self.s + self.c


class _Acc:
    __slots__ = ("integral", "covered", "longest", "last", "gaps", "count", "states")

    def __init__(self, n_states: int) -> None:
        self.integral = _NSum()
        self.covered = _NSum()
        self.longest = 0.0
        self.last: float | None = None
        self.gaps = 0
        self.count = 0
        self.states = [_NSum() for _ in range(n_states)]


class _Chan:
    __slots__ = (
        "kind",
        "spec",
        "max_gap",
        "n_states",
        "has_prev",
        "prev_valid",
        "prev_t",
        "prev_v",
        "prev_k",
        "lo",
        "hi",
        "run_open",
        "run_start",
        "tank_seen",
        "filling",
        "low",
        "high",
        "total",
        "rejected",
    )

    def __init__(self, kind: int, spec: AnySpec) -> None:
        self.kind = kind
        self.spec = spec
        self.max_gap = float(spec.max_gap)
        self.n_states = len(spec.states) if isinstance(spec, StateSpec) else 0
        self.has_prev = False
        self.prev_valid = False
        self.prev_t = 0.0
        self.prev_v = 0.0
        self.prev_k = 0
        self.lo = 0.0
        self.hi = 0.0
        self.run_open = False
        self.run_start = 0.0
        self.tank_seen = False
        self.filling = False
        self.low = 0.0
        self.high = 0.0
        self.total = _NSum()
        self.rejected = 0


def _grid_index(bnd: Callable[[int], float], origin: float, period: float, t: float) -> int | None:
    """The window holding ``t`` (None: off the grid), adjusted to the boundaries as in C."""
    q = (t - origin) / period
    if not abs(q) < K_LIMIT:
        return None
    k = math.floor(q)
    i = 0
    while i < ADJUST_MAX and bnd(k + 1) <= t:
        k += 1
        i += 1
    i = 0
    while i < ADJUST_MAX and bnd(k) > t:
        k -= 1
        i += 1
    return k


def _boundaries(
    bnd: Callable[[int], float], t0: float, k0: int, t1: float, k1: int
) -> list[tuple[int, float]]:
    """(window, boundary) for each boundary inside the span, clamped as in C."""
    out = []
    ta = t0
    for j in range(k0 + 1, k1 + 1):
        b = bnd(j)
        # Only a degenerate grid puts a boundary outside the span.
        if b < ta:
            b = ta
        if b > t1:
            b = t1
        out.append((j - 1, b))
        ta = b
    return out


def _totals(cfg: Config, ch: list[_Chan], rec: dict[int, list[_Acc]]) -> dict[str, float]:
    """Per channel, the compensated sum of the window integrals, emitted and pending."""
    out = {}
    pending = sorted(rec.items())
    for i, (name, c) in enumerate(zip(cfg.names, ch, strict=True)):
        total = _NSum()
        total.s, total.c = c.total.s, c.total.c
        for _, acc in pending:
            total.add(acc[i].integral.value())
        out[name] = total.value()
    return out


def _state_of(c: _Chan, v: float) -> int:
    """The state index of value ``v``; anything not a whole state code is "other"."""
    if v >= 0.0 and v < float(c.n_states) and v == math.floor(v):
        return int(v)
    return c.n_states


class ReferenceIntegrator:
    """Pure-Python integrator with exactly the semantics of :class:`cngmrv.native.Integrator`.

    See docs/integrator.md for the contract.  Not thread-safe.
    """

    def __init__(
        self,
        channels: Sequence[AnySpec],
        period: float = 1.0,
        origin: float = 0.0,
        max_windows: int = 86400,
        fuels: Sequence[FuelSpec] = (),
    ) -> None:
        self._cfg = validate(channels, period, origin, max_windows, fuels)
        self._index = {n: i for i, n in enumerate(self._cfg.names)}
        self._period = self._cfg.period
        self._origin = self._cfg.origin
        self._lateness = self._cfg.lateness
        self._ch = [_Chan(k, s) for k, s in zip(self._cfg.kinds, self._cfg.specs, strict=True)]
        # Sparse open windows: index -> per-channel accumulators.
        self._rec: dict[int, list[_Acc]] = {}
        self._frontier: int | None = None
        self._rejected = 0
        self._late_gaps = 0
        self._late_points = 0
        self._skipped = 0
        self._late_s = _NSum()

    # -- configuration ----------------------------------------------------

    @property
    def channel_names(self) -> tuple[str, ...]:
        return self._cfg.names

    @property
    def period(self) -> float:
        return self._period

    @property
    def origin(self) -> float:
        return self._origin

    @property
    def lateness(self) -> float:
        """Seconds a window is held open after its end: max of ``max_gap``."""
        return self._lateness

    # -- input ------------------------------------------------------------

    def push(self, channel: int | str, t: Any, v: Any, valid: Any) -> None:
        """Feeds samples of a rate or state channel; equal lengths required."""
        ci = resolve_channel(self._cfg, self._index, channel, (RATE, STATE))
        ts, vs, oks = _columns(t, v, valid)
        for ti, vi, ok in zip(ts, vs, oks, strict=True):
            self._process(ci, float(ti), float(vi), bool(ok))

    def push_one(self, channel: int | str, t: float, v: float, valid: bool) -> None:
        ci = resolve_channel(self._cfg, self._index, channel, (RATE, STATE))
        self._process(ci, float(t), float(v), bool(valid))

    def push_events(
        self, channel: int | str, t: Any, pulse: Any, pressure: Any, temperature: Any, valid: Any
    ) -> None:
        """Feeds gas-injection events of an events channel."""
        ci = resolve_channel(self._cfg, self._index, channel, (EVENTS,))
        cols = _columns(t, pulse, pressure, temperature, valid)
        for ti, pw, p, temp, ok in zip(*cols, strict=True):
            self._process_event(ci, float(ti), float(pw), float(p), float(temp), bool(ok))

    def push_tank(
        self, channel: int | str, t: Any, pressure: Any, temperature: Any, valid: Any
    ) -> None:
        """Feeds tank readings (absolute pressure in bar, temperature in K)."""
        ci = resolve_channel(self._cfg, self._index, channel, (TANK,))
        cols = _columns(t, pressure, temperature, valid)
        for ti, p, temp, ok in zip(*cols, strict=True):
            self._process_tank(ci, float(ti), float(p), float(temp), bool(ok))

    # -- output -----------------------------------------------------------

    def pop(self, watermark: float) -> list[Window]:
        """Closes and returns windows ending at least ``lateness`` before ``watermark``."""
        w = check_watermark(watermark)
        lat = self._lateness
        q = (w - lat - self._origin) / self._period
        if not abs(q) < K_LIMIT:
            raise out_of_range_watermark(w)
        m = math.floor(q)
        i = 0
        while i < ADJUST_MAX and self._bnd(m + 1) + lat <= w:
            m += 1
            i += 1
        i = 0
        while i < ADJUST_MAX and self._bnd(m) + lat > w:
            m -= 1
            i += 1
        return self._emit(m - 1)

    def flush(self) -> list[Window]:
        """Records open gaps, then closes and returns every window up to the last touched one."""
        for ci, c in enumerate(self._ch):
            if c.run_open:
                k = c.prev_k
                if self._closed(k):
                    assert self._frontier is not None
                    k = self._frontier
                self._record_gap(ci, k, c.prev_t - c.run_start)
                c.run_open = False
        if not self._rec:
            return []
        return self._emit(max(self._rec))

    def totals(self) -> dict[str, float]:
        """Per channel, the compensated sum of the window integrals, emitted and pending."""
        return _totals(self._cfg, self._ch, self._rec)

    def fuel_totals(self) -> dict[str, FuelWindow]:
        return fuel_totals(self._cfg, self.totals())

    @property
    def counters(self) -> dict[str, int | float]:
        return {
            "rejected": self._rejected,
            "late_s": self._late_s.value(),
            "late_gaps": self._late_gaps,
            "late_points": self._late_points,
            "skipped_windows": self._skipped,
        }

    @property
    def rejected_by_channel(self) -> dict[str, int]:
        return {n: c.rejected for n, c in zip(self._cfg.names, self._ch, strict=True)}

    @property
    def pending_windows(self) -> int:
        """Open windows currently held in memory."""
        return len(self._rec)

    # -- internals (mirror integrator.c) ------------------------------------

    def _bnd(self, k: int) -> float:
        return self._origin + k * self._period

    def _closed(self, k: int) -> bool:
        return self._frontier is not None and k < self._frontier

    def _kidx(self, t: float) -> int | None:
        return _grid_index(self._bnd, self._origin, self._period, t)

    def _slot(self, k: int) -> list[_Acc]:
        acc = self._rec.get(k)
        if acc is None:
            acc = self._rec[k] = [_Acc(c.n_states + 1 if c.kind == STATE else 0) for c in self._ch]
        return acc

    def _record_gap(self, ci: int, k: int, length: float) -> None:
        if self._closed(k):
            self._late_gaps = min(self._late_gaps + 1, INT64_MAX)
            return
        a = self._slot(k)[ci]
        a.gaps += 1
        if length > a.longest:
            a.longest = length

    def _accept(self, c: _Chan, t: float) -> int | None:
        k: int | None = None
        if math.isfinite(t) and not (c.has_prev and not t > c.prev_t):
            if c.has_prev and t >= c.lo and t < c.hi:
                return c.prev_k
            k = self._kidx(t)
        if k is None:
            self._rejected = min(self._rejected + 1, INT64_MAX)
            c.rejected = min(c.rejected + 1, INT64_MAX)
        return k

    def _step(self, ci: int, t: float, k1: int, v: float, valid: bool) -> None:
        c = self._ch[ci]
        span = c.has_prev
        dt = t - c.prev_t if span else 0.0
        covered = span and c.prev_valid and valid and dt <= c.max_gap
        if covered:
            if c.run_open:
                self._record_gap(ci, c.prev_k, c.prev_t - c.run_start)
                c.run_open = False
            if c.kind == RATE:
                self._integrate_rate(ci, c.prev_t, c.prev_v, c.prev_k, t, v, k1)
            elif c.kind == STATE:
                self._integrate_state(ci, c.prev_t, int(c.prev_v), c.prev_k, t, int(v), k1)
            else:
                self._integrate_cover(ci, c.prev_t, c.prev_k, t, k1)
        else:
            if span and not c.run_open:
                c.run_open = True
                c.run_start = c.prev_t
            if not self._closed(k1):
                self._slot(k1)
        c.has_prev = True
        c.prev_t = t
        c.prev_v = v
        c.prev_valid = valid
        if c.prev_k != k1 or not span:
            c.prev_k = k1
            c.lo = self._bnd(k1)
            c.hi = self._bnd(k1 + 1)

    def _process(self, ci: int, t: float, v: float, valid: bool) -> None:
        c = self._ch[ci]
        k1 = self._accept(c, t)
        if k1 is None:
            return
        valid = valid and math.isfinite(v)
        if c.kind == STATE:
            v = float(_state_of(c, v)) if valid else 0.0
        self._step(ci, t, k1, v, valid)

    def _process_event(
        self, ci: int, t: float, pulse: float, p: float, temp: float, valid: bool
    ) -> None:
        c = self._ch[ci]
        k1 = self._accept(c, t)
        if k1 is None:
            return
        valid = (
            valid
            and math.isfinite(pulse)
            and math.isfinite(p)
            and math.isfinite(temp)
            and pulse >= 0.0
            and p >= 0.0
            and temp > 0.0
        )
        m = 0.0
        if valid:
            spec = c.spec
            assert isinstance(spec, EventSpec)
            d = pulse - float(spec.dead_time)
            if d < 0.0:
                d = 0.0
            m = float(spec.k) * d * p / math.sqrt(temp)
        self._step(ci, t, k1, 0.0, valid)
        if not valid:
            return
        if self._closed(k1):
            self._late_points = min(self._late_points + 1, INT64_MAX)
            return
        a = self._slot(k1)[ci]
        a.integral.add(m)
        a.count += 1

    def _process_tank(self, ci: int, t: float, p: float, temp: float, valid: bool) -> None:
        c = self._ch[ci]
        k1 = self._accept(c, t)
        if k1 is None:
            return
        spec = c.spec
        assert isinstance(spec, TankSpec)
        m = math.nan
        if valid:
            m = tank_mass(
                p,
                temp,
                float(spec.volume_m3),
                float(spec.r_specific),
                float(spec.p_pc_bar),
                float(spec.t_pc_k),
            )
            valid = not math.isnan(m)
        self._step(ci, t, k1, 0.0, valid)
        if not valid:
            return
        refuel = float(spec.refuel_kg)
        started = False
        added = 0.0
        if not c.tank_seen:
            c.tank_seen = True
            c.low = m
            c.high = m
        elif not c.filling:
            if m < c.low:
                c.low = m
            if m - c.low >= refuel:
                started = True
                added = m - c.low
                c.filling = True
                c.high = m
        elif m > c.high:
            added = m - c.high
            c.high = m
        elif m <= c.high - refuel:
            c.filling = False
            c.low = m
        if self._closed(k1):
            self._late_points = min(self._late_points + 1, INT64_MAX)
            return
        a = self._slot(k1)[ci]
        a.last = m
        if started:
            a.count += 1
        if added > 0.0:
            a.integral.add(added)

    def _boundaries(self, t0: float, k0: int, t1: float, k1: int) -> list[tuple[int, float]]:
        return _boundaries(self._bnd, t0, k0, t1, k1)

    def _integrate_rate(
        self, ci: int, t0: float, v0: float, k0: int, t1: float, v1: float, k1: int
    ) -> None:
        ta, va = t0, v0
        for j, b in self._boundaries(t0, k0, t1, k1):
            vb = v0 + (v1 - v0) * ((b - t0) / (t1 - t0))
            self._rate_piece(ci, j, ta, va, b, vb)
            ta, va = b, vb
        self._rate_piece(ci, k1, ta, va, t1, v1)

    def _rate_piece(self, ci: int, j: int, ta: float, va: float, tb: float, vb: float) -> None:
        dt = tb - ta
        if self._closed(j):
            self._late_s.add(dt)
            return
        c = self._ch[ci]
        spec = c.spec
        assert isinstance(spec, ChannelSpec)
        val = 0.5 * (va + vb) * dt * float(spec.scale)
        a = self._slot(j)[ci]
        a.integral.add(val)
        a.covered.add(dt)

    def _integrate_state(
        self, ci: int, t0: float, s0: int, k0: int, t1: float, s1: int, k1: int
    ) -> None:
        ta, qa = t0, 0.0
        for j, b in self._boundaries(t0, k0, t1, k1):
            qb = (b - t0) / (t1 - t0)
            self._state_piece(ci, j, ta, qa, b, qb, s0, s1)
            ta, qa = b, qb
        self._state_piece(ci, k1, ta, qa, t1, 1.0, s0, s1)

    def _state_piece(
        self, ci: int, j: int, ta: float, qa: float, tb: float, qb: float, s0: int, s1: int
    ) -> None:
        dt = tb - ta
        if self._closed(j):
            self._late_s.add(dt)
            return
        a = self._slot(j)[ci]
        a.covered.add(dt)
        if s0 == s1:
            a.states[s0].add(dt)
        else:
            a.states[s0].add(0.5 * ((1.0 - qa) + (1.0 - qb)) * dt)
            a.states[s1].add(0.5 * (qa + qb) * dt)

    def _integrate_cover(self, ci: int, t0: float, k0: int, t1: float, k1: int) -> None:
        ta = t0
        for j, b in self._boundaries(t0, k0, t1, k1):
            self._cover_piece(ci, j, ta, b)
            ta = b
        self._cover_piece(ci, k1, ta, t1)

    def _cover_piece(self, ci: int, j: int, ta: float, tb: float) -> None:
        dt = tb - ta
        if self._closed(j):
            self._late_s.add(dt)
            return
        self._slot(j)[ci].covered.add(dt)

    def _emit(self, limit: int) -> list[Window]:
        if self._frontier is not None:
            start = self._frontier
        elif self._rec:
            start = min(self._rec)
        else:
            return []
        if limit < start:
            return []
        keys = sorted(k for k in self._rec if k <= limit)
        budget = self._cfg.max_windows
        pos = start
        skipped = 0
        out: list[Window] = []
        for kk in [*keys, limit + 1]:
            run = kk - pos
            if run > 0:
                if run <= budget:
                    budget -= run
                    out.extend(
                        _window(self._cfg, self._ch, self._bnd, j, None) for j in range(pos, kk)
                    )
                else:
                    skipped += run
            if kk <= limit:
                out.append(_window(self._cfg, self._ch, self._bnd, kk, self._rec.pop(kk)))
            pos = kk + 1
        self._frontier = limit + 1
        self._skipped = min(self._skipped + skipped, INT64_MAX)
        return out


def _window(
    cfg: Config, ch: list[_Chan], bnd: Callable[[int], float], k: int, acc: list[_Acc] | None
) -> Window:
    """Window ``k`` from its accumulators (``None``: an empty window); adds to the channels' totals."""
    chans: dict[str, ChannelWindow] = {}
    for i, (name, c) in enumerate(zip(cfg.names, ch, strict=True)):
        states = None
        if acc is None:
            cw = ChannelWindow(0.0, 0.0, 0, 0.0)
            if c.kind == STATE:
                states = [0.0] * (c.n_states + 1)
        else:
            a = acc[i]
            cw = ChannelWindow(
                a.integral.value(), a.covered.value(), a.gaps, a.longest, a.count, a.last
            )
            c.total.add(cw.integral)
            if c.kind == STATE:
                states = [s.value() for s in a.states]
        if states is not None:
            spec = c.spec
            assert isinstance(spec, StateSpec)
            cw = cw._replace(states=dict(zip((*spec.states, OTHER_STATE), states, strict=True)))
        chans[name] = cw
    fuels = {}
    for fname, ci, mj, co2 in cfg.fuels:
        energy = chans[cfg.names[ci]].integral * mj
        fuels[fname] = FuelWindow(energy, energy * co2)
    return Window(k, bnd(k), bnd(k + 1), chans, fuels)


def _seq(x: Any) -> Sequence[Any]:
    tolist = getattr(x, "tolist", None)  # numpy arrays and memoryviews: fast, plain Python values
    if callable(tolist):
        out = tolist()
        if isinstance(out, list):
            return out
    if isinstance(x, Sequence):
        return x
    if isinstance(x, Iterable):
        return list(x)
    raise ValueError(f"expected a sequence or buffer, got {type(x).__name__}")


def _columns(*cols: Any) -> list[Sequence[Any]]:
    seqs = [_seq(c) for c in cols]
    lengths = [len(s) for s in seqs]
    if len(set(lengths)) > 1:
        raise ValueError(f"length mismatch: column lengths {lengths}")
    return seqs
