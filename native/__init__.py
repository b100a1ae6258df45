"""cngmrv.native: the fuel-mix integrator (C core via cffi) and its Python oracle.

:class:`Integrator` integrates sampled signals (flows, speeds, mode flags) by
the trapezoid rule into fixed time windows, with explicit coverage and gaps;
:class:`ReferenceIntegrator` is a pure-Python implementation of the same
semantics used as the test oracle.  The contract is in ``docs/integrator.md``.

Both take time only from the samples (no clock, no I/O) and are deterministic:
the same samples give the same bits, however they are split into calls.
"""

from __future__ import annotations

import struct
import sys
import threading
from array import array
from collections.abc import Sequence
from typing import Any

from ._integrator import ffi, lib
from .reference import (
    EVENTS,
    OTHER_STATE,
    RATE,
    STATE,
    TANK,
    AnySpec,
    ChannelSpec,
    ChannelWindow,
    EventSpec,
    FuelSpec,
    FuelWindow,
    ReferenceIntegrator,
    StateSpec,
    TankSpec,
    Window,
    check_watermark,
    fuel_totals,
    out_of_range_watermark,
    resolve_channel,
    validate,
)

__all__ = [
    "ChannelSpec",
    "ChannelWindow",
    "EventSpec",
    "FuelSpec",
    "FuelWindow",
    "Integrator",
    "ReferenceIntegrator",
    "StateSpec",
    "TankSpec",
    "Window",
    "dak_z",
    "tank_mass",
]

_NATIVE_F64 = {"d", "@d", "=d", "<d" if sys.byteorder == "little" else ">d"}
_BYTE_FORMATS = {"B", "b", "?", "@B", "=B", "@b", "=b", "@?", "=?", "<?", ">?"}
# integ_cw_t: integral, covered_s, longest_gap_s, last, gaps, events; no padding
_CW = struct.Struct("=ddddqq")
if ffi.sizeof("integ_cw_t") != _CW.size:  # pragma: no cover - guards an exotic ABI
    raise ImportError("integ_cw_t layout differs from the expected 4 doubles + 2 int64")


def dak_z(p_pr: float, t_pr: float) -> float:
    """Dranchuk-Abou-Kassem compressibility factor (C core); NaN outside its range.

    Valid for ``0 <= p_pr <= 30`` and ``1 <= t_pr <= 3`` (docs/integrator.md 5.2).
    """
    return float(lib.integ_dak_z(p_pr, t_pr))


def tank_mass(
    pressure_bar: float,
    temperature_k: float,
    volume_m3: float,
    r_specific: float,
    p_pc_bar: float,
    t_pc_k: float,
) -> float:
    """Gas mass ``P V / (Z R T)`` in kg (absolute pressure in bar); NaN where undefined."""
    return float(
        lib.integ_tank_mass(pressure_bar, temperature_k, volume_m3, r_specific, p_pc_bar, t_pc_k)
    )


def _c_spec(spec: AnySpec, out: Any) -> None:
    out.max_gap = float(spec.max_gap)
    if isinstance(spec, ChannelSpec):
        out.kind = RATE
        out.scale = float(spec.scale)
    elif isinstance(spec, StateSpec):
        out.kind = STATE
        out.n_states = len(spec.states)
    elif isinstance(spec, EventSpec):
        out.kind = EVENTS
        out.k = float(spec.k)
        out.dead_time = float(spec.dead_time)
    else:
        out.kind = TANK
        out.volume_m3 = float(spec.volume_m3)
        out.r_specific = float(spec.r_specific)
        out.p_pc = float(spec.p_pc_bar)
        out.t_pc = float(spec.t_pc_k)
        out.refuel_kg = float(spec.refuel_kg)


class Integrator:
    """Windowed integrator of rates, states, injection events and tank readings (C core).

    Contract (details in docs/integrator.md):

    * ``push``/``push_one`` feed samples ``(t, v, valid)`` of a rate or state
      channel, ``push_events`` gas injections, ``push_tank`` tank readings, each
      in increasing ``t``; an earlier or equal ``t`` is rejected and counted.
      A non-finite value makes a sample invalid.
    * ``pop(watermark)`` returns, in index order, every window whose end plus
      :attr:`lateness` is ``<= watermark``; the caller promises that no sample
      with ``t < watermark`` is still to come.  ``flush()`` records open gaps
      and returns the rest.
    * Emitted windows are immutable: data that would land in one later is
      counted in ``counters`` (``late_s``, ``late_gaps``, ``late_points``),
      not integrated.
    * One pop/flush emits at most ``max_windows`` empty windows: a run of empty
      windows that does not fit in what is left of that budget is skipped whole
      (closed, not built) and counted in ``counters['skipped_windows']``.

    Calls are serialised by an internal lock: cffi releases the GIL around C
    calls and the C state is not re-entrant, so unsynchronised use from two
    threads must not be able to corrupt memory.  Ordering between threads is
    still the caller's business.
    """

    def __init__(
        self,
        channels: Sequence[AnySpec],
        period: float = 1.0,
        origin: float = 0.0,
        max_windows: int = 86400,
        fuels: Sequence[FuelSpec] = (),
    ) -> None:
        cfg = validate(channels, period, origin, max_windows, fuels)
        self._cfg = cfg
        self._names = cfg.names
        self._index = {n: i for i, n in enumerate(cfg.names)}
        self._lookup: dict[int | str, int] = {}
        for i, n in enumerate(cfg.names):
            self._lookup[n] = self._lookup[i] = i
        self._rate_or_state = {
            k: i for k, i in self._lookup.items() if cfg.kinds[i] in (RATE, STATE)
        }
        self._nch = len(cfg.names)
        self._lock = threading.Lock()
        specs = ffi.new("integ_spec_t[]", self._nch)
        for i, spec in enumerate(cfg.specs):
            _c_spec(spec, specs[i])
        cfuels = ffi.new("integ_fuel_t[]", max(1, len(cfg.fuels)))
        for i, (_, ci, mj, co2) in enumerate(cfg.fuels):
            cfuels[i].channel = ci
            cfuels[i].mj_per_unit = mj
            cfuels[i].kg_co2_per_mj = co2
        err = ffi.new("int *")
        h = lib.integ_new(
            self._nch,
            specs,
            len(cfg.fuels),
            cfuels,
            cfg.period,
            cfg.origin,
            cfg.max_windows,
            err,
        )
        if h == ffi.NULL:
            if err[0] == lib.INTEG_ENOMEM:
                raise MemoryError("integrator: out of memory")
            raise ValueError("integrator: invalid configuration")  # validate() should catch it
        self._h = ffi.gc(h, lib.integ_free)
        self._nslots = int(lib.integ_state_slots(h))
        self._done = ffi.new("int64_t *")
        self._counters = ffi.new("integ_counters_t *")
        self._totals = ffi.new("double[]", self._nch)
        self._rejected = ffi.new("int64_t[]", self._nch)
        # Per channel: (name, state names or None, state slot offset).
        layout: list[tuple[str, tuple[str, ...] | None, int]] = []
        off = 0
        for name, spec in zip(cfg.names, cfg.specs, strict=True):
            if isinstance(spec, StateSpec):
                names = (*spec.states, OTHER_STATE)
                layout.append((name, names, off))
                off += len(names)
            else:
                layout.append((name, None, 0))
        self._layout = tuple(layout)
        self._fuel_layout = tuple((name, ci) for name, ci, _, _ in cfg.fuels)

    # -- configuration ----------------------------------------------------

    @property
    def channel_names(self) -> tuple[str, ...]:
        return self._names

    @property
    def period(self) -> float:
        return self._cfg.period

    @property
    def origin(self) -> float:
        return self._cfg.origin

    @property
    def lateness(self) -> float:
        """Seconds a window is held open after its end: max of ``max_gap``."""
        return self._cfg.lateness

    # -- input ------------------------------------------------------------

    def push(self, channel: int | str, t: Any, v: Any, valid: Any) -> None:
        """Feeds samples of one rate or state channel.

        ``t`` and ``v`` are float64 buffers (numpy array, ``array('d')``,
        memoryview) or sequences of numbers; ``valid`` is a uint8/bool buffer
        or a sequence of truthy values.  C-contiguous float64 / 1-byte buffers
        are passed to C without copying; anything else is converted first.
        Lengths must match (ValueError).  The C side reads the buffers only
        during this call.
        """
        # The streaming caller's case (native buffers, a known rate or state
        # channel) is inlined: per call, this costs as much as ~5 samples in C.
        ci = self._rate_or_state.get(channel)
        if ci is None or type(channel) is bool:
            ci = self._channel(channel, (RATE, STATE))
        try:
            mt, mv, mo = memoryview(t), memoryview(v), memoryview(valid)
            native = (
                mt.format in _NATIVE_F64
                and mv.format in _NATIVE_F64
                and mo.format in _BYTE_FORMATS
                and mt.ndim == mv.ndim == mo.ndim == 1
                and mt.c_contiguous
                and mv.c_contiguous
                and mo.c_contiguous
            )
        except TypeError:
            native = False
        if native:
            tb, vb, ob = t, v, valid
            n = len(mt)
            if len(mv) != n or len(mo) != n:
                _same_length(mt, mv, mo)
        else:
            tb, vb, ob = _f64(t, "t"), _f64(v, "v"), _u8(valid)
            n = _same_length(tb, vb, ob)
        if n == 0:
            return
        pt = ffi.from_buffer("double[]", tb)
        pv = ffi.from_buffer("double[]", vb)
        po = ffi.from_buffer("uint8_t[]", ob)
        with self._lock:
            rc = lib.integ_push(self._h, ci, pt, pv, po, n, self._done)
        if rc != lib.INTEG_OK:
            _raise(rc, f"push stopped after {self._done[0]} of {n} samples")

    def push_one(self, channel: int | str, t: float, v: float, valid: bool) -> None:
        """Feeds one sample of a rate or state channel; same rules as :meth:`push`."""
        ci = self._channel(channel, (RATE, STATE))
        with self._lock:
            rc = lib.integ_push_one(self._h, ci, t, v, bool(valid))
        if rc != lib.INTEG_OK:
            _raise(rc, "push_one")

    def push_events(
        self, channel: int | str, t: Any, pulse: Any, pressure: Any, temperature: Any, valid: Any
    ) -> None:
        """Feeds gas-injection events: pulse width (unit of the spec's ``dead_time``),
        absolute rail pressure (bar) and gas temperature (K); buffers as in :meth:`push`."""
        ci = self._channel(channel, (EVENTS,))
        cols = [_f64(x, w) for x, w in ((t, "t"), (pulse, "pulse"), (pressure, "pressure"))]
        cols.append(_f64(temperature, "temperature"))
        ob = _u8(valid)
        n = _same_length(*cols, ob)
        if n == 0:
            return
        pt, pw, pp, pk = (ffi.from_buffer("double[]", c) for c in cols)
        po = ffi.from_buffer("uint8_t[]", ob)
        with self._lock:
            rc = lib.integ_push_events(self._h, ci, pt, pw, pp, pk, po, n, self._done)
            done = self._done[0]
        if rc != lib.INTEG_OK:
            _raise(rc, f"push_events stopped after {done} of {n} events")

    def push_tank(
        self, channel: int | str, t: Any, pressure: Any, temperature: Any, valid: Any
    ) -> None:
        """Feeds tank readings: absolute pressure (bar) and gas temperature (K)."""
        ci = self._channel(channel, (TANK,))
        cols = [_f64(t, "t"), _f64(pressure, "pressure"), _f64(temperature, "temperature")]
        ob = _u8(valid)
        n = _same_length(*cols, ob)
        if n == 0:
            return
        pt, pp, pk = (ffi.from_buffer("double[]", c) for c in cols)
        po = ffi.from_buffer("uint8_t[]", ob)
        with self._lock:
            rc = lib.integ_push_tank(self._h, ci, pt, pp, pk, po, n, self._done)
            done = self._done[0]
        if rc != lib.INTEG_OK:
            _raise(rc, f"push_tank stopped after {done} of {n} readings")

    def _channel(self, channel: int | str, kinds: tuple[int, ...]) -> int:
        # Fast lookup by name or index; resolve_channel explains any failure.
        ci = self._lookup.get(channel)
        if ci is not None and type(channel) is not bool and self._cfg.kinds[ci] in kinds:
            return ci
        return resolve_channel(self._cfg, self._index, channel, kinds)

    # -- output -----------------------------------------------------------

    def pop(self, watermark: float) -> list[Window]:
        """Closes and returns every window with ``t1 + lateness <= watermark``.

        ValueError if ``watermark`` is not finite or its window index is
        beyond 2**53 from ``origin``.
        """
        w = check_watermark(watermark)
        with self._lock:
            n = lib.integ_pop(self._h, w)
            if n == lib.INTEG_EINVAL:
                raise out_of_range_watermark(w)
            return self._collect(n, "pop")

    def flush(self) -> list[Window]:
        """Records open gaps, then closes and returns every window up to the last touched one."""
        with self._lock:
            return self._collect(lib.integ_flush(self._h), "flush")

    def _collect(self, n: int, what: str) -> list[Window]:
        if n < 0:
            _raise(n, what)
        if n == 0:
            return []
        nch, nslots, nfuel = self._nch, self._nslots, len(self._fuel_layout)
        try:
            ks = ffi.unpack(lib.integ_out_index(self._h), n)
            raw = ffi.buffer(lib.integ_out_channels(self._h), n * nch * _CW.size)
            cws = list(_CW.iter_unpack(raw))
            states = ffi.unpack(lib.integ_out_states(self._h), n * nslots) if nslots else []
            fuels = ffi.unpack(lib.integ_out_fuels(self._h), n * nfuel) if nfuel else []
        finally:
            lib.integ_out_release(self._h)
        layout, fuel_layout = self._layout, self._fuel_layout
        origin, period = self._cfg.origin, self._cfg.period
        out = []
        for w, k in enumerate(ks):
            row = cws[w * nch : (w + 1) * nch]
            chans = {}
            for (name, snames, off), (integral, cov, longest, last, gaps, events) in zip(
                layout, row, strict=True
            ):
                st = None
                if snames is not None:
                    base = w * nslots + off
                    st = dict(zip(snames, states[base : base + len(snames)], strict=True))
                chans[name] = ChannelWindow(
                    integral, cov, gaps, longest, events, None if last != last else last, st
                )
            fw = {}
            for f, (fname, _) in enumerate(fuel_layout):
                c = fuels[w * nfuel + f]
                fw[fname] = FuelWindow(c.energy_mj, c.co2_kg)
            out.append(Window(k, origin + k * period, origin + (k + 1) * period, chans, fw))
        return out

    def totals(self) -> dict[str, float]:
        """Compensated running integral per channel, emitted plus pending windows.

        Late data (see ``counters``) is not included.
        """
        with self._lock:
            lib.integ_totals(self._h, self._totals)
            vals = list(self._totals)
        return dict(zip(self._names, vals, strict=True))

    def fuel_totals(self) -> dict[str, FuelWindow]:
        """Energy and CO2 per fuel of :meth:`totals` (the same products as per window)."""
        return fuel_totals(self._cfg, self.totals())

    @property
    def counters(self) -> dict[str, int | float]:
        """``rejected`` samples; ``late_s`` seconds, ``late_gaps`` gaps and
        ``late_points`` events/tank samples lost to closed windows; and
        ``skipped_windows`` (empty windows not emitted)."""
        with self._lock:
            lib.integ_counters(self._h, self._counters)
            c = self._counters
            return {
                "rejected": int(c.rejected),
                "late_s": float(c.late_s),
                "late_gaps": int(c.late_gaps),
                "late_points": int(c.late_points),
                "skipped_windows": int(c.skipped_windows),
            }

    @property
    def rejected_by_channel(self) -> dict[str, int]:
        """Rejected samples per channel (their sum is ``counters['rejected']``)."""
        with self._lock:
            lib.integ_rejected(self._h, self._rejected)
            vals = [int(x) for x in self._rejected]
        return dict(zip(self._names, vals, strict=True))

    @property
    def pending_windows(self) -> int:
        """Open windows currently held in memory (bounded by calling ``pop``)."""
        with self._lock:
            return int(lib.integ_pending_windows(self._h))


def _same_length(*cols: Any) -> int:
    n = len(cols[0])
    for c in cols:
        if len(c) != n:
            raise ValueError(f"length mismatch: column lengths {[len(c) for c in cols]}")
    return n


def _raise(rc: int, what: str) -> None:
    if rc == lib.INTEG_ENOMEM:
        raise MemoryError(f"integrator {what}: out of memory")
    raise ValueError(f"integrator {what}: invalid argument (code {rc})")


def _flat_numpy(x: Any, dtype: str) -> Any:
    # numpy is optional: use it only when the caller already imported it.
    np = sys.modules.get("numpy")
    if np is None or not isinstance(x, np.ndarray):
        return None
    if x.ndim != 1:
        raise ValueError(f"expected a 1-D array, got shape {x.shape}")
    if dtype == "u1":
        return np.ascontiguousarray(x != 0, dtype=np.uint8)
    return np.ascontiguousarray(x, dtype=np.float64)


def _buffer(x: Any, formats: set[str], itemsize: int) -> memoryview | None:
    try:
        mv = memoryview(x)
    except TypeError:
        return None
    if mv.ndim == 1 and mv.c_contiguous and mv.itemsize == itemsize and mv.format in formats:
        return mv
    return None


def _f64(x: Any, what: str) -> Any:
    if isinstance(x, str | bytes | bytearray):
        # array("d", bytes) would reinterpret raw bytes as doubles: refuse rather than guess.
        raise ValueError(f"{what}: expected float64 values, got {type(x).__name__}")
    mv = _buffer(x, _NATIVE_F64, 8)
    if mv is not None:
        return mv
    arr = _flat_numpy(x, "f8")
    if arr is not None:
        return arr
    try:
        return array("d", x)
    except TypeError:
        try:
            return array("d", [float(e) for e in x])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{what}: expected a float64 buffer or a sequence of numbers") from e


def _u8(x: Any) -> Any:
    mv = _buffer(x, _BYTE_FORMATS, 1)
    if mv is not None:
        return mv
    arr = _flat_numpy(x, "u1")
    if arr is not None:
        return arr
    try:
        return bytes(1 if e else 0 for e in x)
    except TypeError as e:
        raise ValueError("valid: expected a uint8/bool buffer or a sequence of bools") from e
