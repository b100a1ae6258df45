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
    ChannelSpec,
    ChannelWindow,
    ReferenceIntegrator,
    Window,
    check_watermark,
    out_of_range_watermark,
    resolve_channel,
    validate,
)

__all__ = [
    "ChannelSpec",
    "ChannelWindow",
    "Integrator",
    "ReferenceIntegrator",
    "Window",
]

_NATIVE_F64 = {"d", "@d", "=d", "<d" if sys.byteorder == "little" else ">d"}
_BYTE_FORMATS = {"B", "b", "?", "@B", "=B", "@b", "=b", "@?", "=?", "<?", ">?"}
_CW = struct.Struct("=dddq")  # integ_cw_t: three doubles then int64, no padding
if ffi.sizeof("integ_cw_t") != _CW.size:  # pragma: no cover - guards an exotic ABI
    raise ImportError("integ_cw_t layout differs from the expected 3 doubles + int64")


class Integrator:
    """Windowed trapezoid integrator backed by the C core (``integrator.c``).

    Contract (details in docs/integrator.md):

    * ``push``/``push_one`` feed samples ``(t, v, valid)`` of one channel in
      non-decreasing ``t``; an earlier ``t`` is rejected and counted.  A NaN or
      infinite ``v`` is an invalid sample.
    * ``pop(watermark)`` returns, in index order, every window whose end plus
      :attr:`lateness` is ``<= watermark``; the caller promises that no sample
      with ``t < watermark`` is still to come.  ``flush()`` returns the rest.
    * Emitted windows are immutable: data that would land in one later is
      counted in ``counters['late_s']`` / ``['late_gaps']``, not integrated.
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
        channels: Sequence[ChannelSpec],
        period: float = 1.0,
        origin: float = 0.0,
        max_windows: int = 86400,
    ) -> None:
        cfg = validate(channels, period, origin, max_windows)
        self._cfg = cfg
        self._names = cfg.names
        self._index = {n: i for i, n in enumerate(cfg.names)}
        self._nch = len(cfg.names)
        self._lock = threading.Lock()
        err = ffi.new("int *")
        h = lib.integ_new(
            self._nch,
            ffi.new("double[]", list(cfg.max_gaps)),
            ffi.new("double[]", list(cfg.scales)),
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
        self._done = ffi.new("int64_t *")
        self._counters = ffi.new("integ_counters_t *")
        self._totals = ffi.new("double[]", self._nch)

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
        """Feeds samples of one channel.

        ``t`` and ``v`` are float64 buffers (numpy array, ``array('d')``,
        memoryview) or sequences of numbers; ``valid`` is a uint8/bool buffer
        or a sequence of truthy values.  C-contiguous float64 / 1-byte buffers
        are passed to C without copying; anything else is converted first.
        Lengths must match (ValueError).  The C side reads the buffers only
        during this call.
        """
        ci = resolve_channel(self._cfg, self._index, channel)
        tb = _f64(t, "t")
        vb = _f64(v, "v")
        ob = _u8(valid)
        n = len(tb)
        if not n == len(vb) == len(ob):
            raise ValueError(f"length mismatch: t has {n}, v has {len(vb)}, valid has {len(ob)}")
        if n == 0:
            return
        pt = ffi.from_buffer("double[]", tb)
        pv = ffi.from_buffer("double[]", vb)
        po = ffi.from_buffer("uint8_t[]", ob)
        with self._lock:
            rc = lib.integ_push(self._h, ci, pt, pv, po, n, self._done)
            done = self._done[0]
        if rc != lib.INTEG_OK:
            _raise(rc, f"push stopped after {done} of {n} samples")

    def push_one(self, channel: int | str, t: float, v: float, valid: bool) -> None:
        """Feeds one sample; same rules as :meth:`push`."""
        ci = self._index.get(channel) if isinstance(channel, str) else None
        if ci is None:
            ci = resolve_channel(self._cfg, self._index, channel)
        with self._lock:
            rc = lib.integ_push_one(self._h, ci, t, v, bool(valid))
        if rc != lib.INTEG_OK:
            _raise(rc, "push_one")

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
        """Closes and returns every window up to the last one any sample touched."""
        with self._lock:
            return self._collect(lib.integ_flush(self._h), "flush")

    def _collect(self, n: int, what: str) -> list[Window]:
        if n < 0:
            _raise(n, what)
        if n == 0:
            return []
        try:
            ks = ffi.unpack(lib.integ_out_index(self._h), n)
            raw = ffi.buffer(lib.integ_out_channels(self._h), n * self._nch * _CW.size)
            vals = [ChannelWindow(i, c, g, lg) for i, c, lg, g in _CW.iter_unpack(raw)]
        finally:
            lib.integ_out_release(self._h)
        names, nch = self._names, self._nch
        origin, period = self._cfg.origin, self._cfg.period
        out = []
        for w, k in enumerate(ks):
            row = vals[w * nch : (w + 1) * nch]
            out.append(
                Window(
                    k,
                    origin + k * period,
                    origin + (k + 1) * period,
                    dict(zip(names, row, strict=True)),
                )
            )
        return out

    def totals(self) -> dict[str, float]:
        """Compensated running integral per channel, emitted plus pending windows.

        Late data (see ``counters``) is not included.
        """
        with self._lock:
            lib.integ_totals(self._h, self._totals)
            vals = list(self._totals)
        return dict(zip(self._names, vals, strict=True))

    @property
    def counters(self) -> dict[str, int | float]:
        """``rejected`` samples, ``late_s`` seconds and ``late_gaps`` spans lost to
        closed windows, and ``skipped_windows`` (empty windows not emitted)."""
        with self._lock:
            lib.integ_counters(self._h, self._counters)
            c = self._counters
            return {
                "rejected": int(c.rejected),
                "late_s": float(c.late_s),
                "late_gaps": int(c.late_gaps),
                "skipped_windows": int(c.skipped_windows),
            }

    @property
    def pending_windows(self) -> int:
        """Open windows currently held in memory (bounded by calling ``pop``)."""
        with self._lock:
            return int(lib.integ_pending_windows(self._h))


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
