"""Pure-Python reference of the integrator: the test oracle for the C core.

Standard library only.  Every floating-point step mirrors ``integrator.c`` in
the same order, so both produce the same bits; when changing one, change the
other and ``docs/integrator.md``.  It is far too slow for production (about a
hundred times slower than the C core) and is meant for tests, documentation
and debugging.

The value types (:class:`ChannelSpec`, :class:`ChannelWindow`, :class:`Window`)
live here so this module stays importable without the compiled extension.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# Window indices stay within +-2**53 so float(k) is exact (same as the C side).
K_LIMIT = 2.0**53
# Steps allowed to correct floor((t - origin) / period) against the boundaries.
ADJUST_MAX = 4
INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class ChannelSpec:
    """One integrated signal.

    ``max_gap`` (seconds, finite, >= 0) is the longest span between two
    consecutive valid samples that is still integrated; ``scale`` multiplies
    every value (for example 1/3600 to turn a per-hour rate into an amount).
    """

    name: str
    max_gap: float
    scale: float = 1.0


@dataclass(frozen=True)
class ChannelWindow:
    """One channel over one window: see docs/integrator.md for exact meanings."""

    integral: float
    covered_s: float
    gaps: int
    longest_gap_s: float


@dataclass(frozen=True)
class Window:
    """Window ``index`` covers ``[t0, t1)`` with ``t0 = origin + index * period``."""

    index: int
    t0: float
    t1: float
    channels: dict[str, ChannelWindow]


@dataclass(frozen=True)
class Config:
    """Validated constructor arguments, shared by the C-backed and reference classes."""

    names: tuple[str, ...]
    max_gaps: tuple[float, ...]
    scales: tuple[float, ...]
    period: float
    origin: float
    max_windows: int

    @property
    def lateness(self) -> float:
        return max(self.max_gaps)


def validate(
    channels: Sequence[ChannelSpec], period: float, origin: float, max_windows: int
) -> Config:
    """Checks constructor arguments; raises ValueError naming the bad one."""
    specs = list(channels)
    if not specs:
        raise ValueError("at least one channel is required")
    names: list[str] = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, ChannelSpec):
            raise ValueError(f"channels[{i}] is not a ChannelSpec: {spec!r}")
        if not isinstance(spec.name, str) or not spec.name:
            raise ValueError(f"channels[{i}]: name must be a non-empty string")
        if spec.name in names:
            raise ValueError(f"duplicate channel name {spec.name!r}")
        names.append(spec.name)
        mg = _float(spec.max_gap, f"channel {spec.name!r} max_gap")
        if not (math.isfinite(mg) and mg >= 0.0):
            raise ValueError(f"channel {spec.name!r}: max_gap must be finite and >= 0, got {mg}")
        sc = _float(spec.scale, f"channel {spec.name!r} scale")
        if not math.isfinite(sc):
            raise ValueError(f"channel {spec.name!r}: scale must be finite, got {sc}")
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
        names=tuple(names),
        max_gaps=tuple(float(s.max_gap) for s in specs),
        scales=tuple(float(s.scale) for s in specs),
        period=p,
        origin=o,
        max_windows=max_windows,
    )


def _float(x: Any, what: str) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {x!r}") from None


def resolve_channel(cfg: Config, index: dict[str, int], channel: int | str) -> int:
    """Channel index from an index or a name; ValueError if unknown."""
    if isinstance(channel, str):
        try:
            return index[channel]
        except KeyError:
            raise ValueError(f"unknown channel {channel!r}; known: {list(cfg.names)}") from None
    if isinstance(channel, bool) or not isinstance(channel, int):
        raise ValueError(f"channel must be an int index or a name, got {channel!r}")
    if not 0 <= channel < len(cfg.names):
        raise ValueError(f"channel index {channel} out of range 0..{len(cfg.names) - 1}")
    return channel


def check_watermark(watermark: float) -> float:
    w = _float(watermark, "watermark")
    if not math.isfinite(w):
        raise ValueError(f"watermark must be finite, got {watermark!r}")
    return w


def out_of_range_watermark(w: float) -> ValueError:
    return ValueError(f"watermark {w!r} is too far from origin (window index beyond 2**53)")


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
    __slots__ = ("integral", "covered", "longest", "gaps")

    def __init__(self) -> None:
        self.integral = _NSum()
        self.covered = _NSum()
        self.longest = 0.0
        self.gaps = 0


class _Chan:
    __slots__ = (
        "max_gap",
        "scale",
        "prev_t",
        "prev_v",
        "prev_k",
        "has_prev",
        "prev_valid",
        "total",
    )

    def __init__(self, max_gap: float, scale: float) -> None:
        self.max_gap = max_gap
        self.scale = scale
        self.prev_t = 0.0
        self.prev_v = 0.0
        self.prev_k = 0
        self.has_prev = False
        self.prev_valid = False
        self.total = _NSum()


class ReferenceIntegrator:
    """Pure-Python integrator with exactly the semantics of :class:`cngmrv.native.Integrator`.

    See docs/integrator.md for the contract.  Not thread-safe.
    """

    def __init__(
        self,
        channels: Sequence[ChannelSpec],
        period: float = 1.0,
        origin: float = 0.0,
        max_windows: int = 86400,
    ) -> None:
        self._cfg = validate(channels, period, origin, max_windows)
        self._index = {n: i for i, n in enumerate(self._cfg.names)}
        self._period = self._cfg.period
        self._origin = self._cfg.origin
        self._lateness = self._cfg.lateness
        self._ch = [_Chan(g, s) for g, s in zip(self._cfg.max_gaps, self._cfg.scales, strict=True)]
        # Sparse open windows: index -> per-channel accumulators.
        self._rec: dict[int, list[_Acc]] = {}
        self._frontier: int | None = None
        self._rejected = 0
        self._late_gaps = 0
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
        """Feeds samples of one channel; ``t``, ``v``, ``valid`` must have equal lengths."""
        ci = resolve_channel(self._cfg, self._index, channel)
        ts, vs, oks = _seq(t), _seq(v), _seq(valid)
        if not len(ts) == len(vs) == len(oks):
            raise ValueError(
                f"length mismatch: t has {len(ts)}, v has {len(vs)}, valid has {len(oks)}"
            )
        for ti, vi, ok in zip(ts, vs, oks, strict=True):
            self._process(ci, float(ti), float(vi), bool(ok))

    def push_one(self, channel: int | str, t: float, v: float, valid: bool) -> None:
        ci = resolve_channel(self._cfg, self._index, channel)
        self._process(ci, float(t), float(v), bool(valid))

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
        """Closes and returns every window up to the last one a sample touched."""
        if not self._rec:
            return []
        return self._emit(max(self._rec))

    def totals(self) -> dict[str, float]:
        """Compensated running integral per channel, emitted plus pending windows."""
        return {n: c.total.value() for n, c in zip(self._cfg.names, self._ch, strict=True)}

    @property
    def counters(self) -> dict[str, int | float]:
        return {
            "rejected": self._rejected,
            "late_s": self._late_s.value(),
            "late_gaps": self._late_gaps,
            "skipped_windows": self._skipped,
        }

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
        q = (t - self._origin) / self._period
        if not abs(q) < K_LIMIT:
            return None
        k = math.floor(q)
        i = 0
        while i < ADJUST_MAX and self._bnd(k + 1) <= t:
            k += 1
            i += 1
        i = 0
        while i < ADJUST_MAX and self._bnd(k) > t:
            k -= 1
            i += 1
        return k

    def _slot(self, k: int) -> list[_Acc]:
        acc = self._rec.get(k)
        if acc is None:
            acc = self._rec[k] = [_Acc() for _ in self._ch]
        return acc

    def _process(self, ci: int, t: float, v: float, valid: bool) -> None:
        c = self._ch[ci]
        k1 = self._kidx(t) if math.isfinite(t) else None
        if k1 is None or (c.has_prev and t < c.prev_t):
            self._rejected = min(self._rejected + 1, INT64_MAX)
            return
        valid = valid and math.isfinite(v)
        span = c.has_prev and t > c.prev_t
        dt = t - c.prev_t if span else 0.0
        covered = span and c.prev_valid and valid and dt <= c.max_gap
        if covered:
            self._integrate(ci, c.prev_t, c.prev_v, c.prev_k, t, v, k1)
        elif not self._closed(k1):
            a = self._slot(k1)[ci]
            if span:
                a.gaps += 1
                if dt > a.longest:
                    a.longest = dt
        elif span:
            self._late_gaps = min(self._late_gaps + 1, INT64_MAX)
        c.has_prev = True
        c.prev_t = t
        c.prev_v = v
        c.prev_valid = valid
        c.prev_k = k1

    def _integrate(
        self, ci: int, t0: float, v0: float, k0: int, t1: float, v1: float, k1: int
    ) -> None:
        ta, va = t0, v0
        for j in range(k0 + 1, k1 + 1):
            b = self._bnd(j)
            if b < ta:
                b = ta
            if b > t1:
                b = t1
            vb = v0 + (v1 - v0) * ((b - t0) / (t1 - t0))
            self._add_piece(ci, j - 1, ta, va, b, vb)
            ta, va = b, vb
        self._add_piece(ci, k1, ta, va, t1, v1)

    def _add_piece(self, ci: int, j: int, ta: float, va: float, tb: float, vb: float) -> None:
        dt = tb - ta
        if self._closed(j):
            self._late_s.add(dt)
            return
        c = self._ch[ci]
        val = 0.5 * (va + vb) * dt * c.scale
        a = self._slot(j)[ci]
        a.integral.add(val)
        a.covered.add(dt)
        c.total.add(val)

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
                    out.extend(self._window(j, None) for j in range(pos, kk))
                else:
                    skipped += run
            if kk <= limit:
                out.append(self._window(kk, self._rec.pop(kk)))
            pos = kk + 1
        self._frontier = limit + 1
        self._skipped = min(self._skipped + skipped, INT64_MAX)
        return out

    def _window(self, k: int, acc: list[_Acc] | None) -> Window:
        if acc is None:
            chans = {n: ChannelWindow(0.0, 0.0, 0, 0.0) for n in self._cfg.names}
        else:
            chans = {
                n: ChannelWindow(a.integral.value(), a.covered.value(), a.gaps, a.longest)
                for n, a in zip(self._cfg.names, acc, strict=True)
            }
        return Window(k, self._bnd(k), self._bnd(k + 1), chans)


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
