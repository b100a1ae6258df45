"""Throughput of the fuel-mix integrator: C core vs vectorised numpy vs the Python oracle.

Prints one JSON object.  Every figure is measured in the same run on the same
synthetic data: 4 rate channels (diesel, gas, speed, engine speed) at 100 Hz
with jittered timestamps and 0.1 % invalid samples, 10 million samples in
all, 1-second windows.  Keys ``c_one_call``, ``c_chunks_1000``, ``numpy`` and
``python`` are samples per second; ``samples`` and ``channels`` describe the
data; ``goals`` compares the ratios with the issue's goals.

What each figure times:

* ``c_one_call``: one ``Integrator.push`` per channel with the whole column,
  then the flush of every window inside the C core; windows are read back as
  numpy arrays straight from the C staging buffers.
* ``c_chunks_1000``: the same, with ``push`` called on 1,000 samples at a time
  (per channel, channels interleaved), as a streaming caller would.
* ``numpy``: ``numpy_integrate`` below, the same rules vectorised (rejection,
  validity, max_gap, window boundaries with the C's index correction, splitting
  of spans at boundaries, gaps as runs of uncovered spans, per-window coverage,
  gap count and longest gap), without compensated summation.  The run checks
  that it agrees with the C windows to 1e-9.
* ``python``: the pure-Python reference (native/reference.py) on the first
  ``python_samples`` samples (it is too slow for 10 million), reported per
  sample like the others.

C and numpy are the best of ``--repeat`` interleaved runs (the machine may be
shared);
``c_flush_to_objects_s`` is the extra time to build Python ``Window`` objects
for all windows, which a streaming caller pays one window at a time.

Usage: python bench/integrator.py [--samples N] [--python-samples N] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any

import numpy as np

from cngmrv.native import ChannelSpec, Integrator, ReferenceIntegrator
from cngmrv.native._integrator import ffi, lib

CHANNELS = 4
RATE_HZ = 100.0
PERIOD = 1.0
MAX_GAP = 0.05
CHUNK = 1000
GOALS = {"c_vs_numpy": 5.0, "c_vs_python": 150.0, "chunks_vs_one_call": 0.5}
NAMES = ("diesel_l", "gas_kg", "distance_km", "engine_rev")
SCALES = (1 / 3600, 1 / 3600, 1 / 3600, 1 / 60)
LEVELS = (20.0, 12.0, 30.0, 1200.0)

Column = tuple[Any, Any, Any]  # t, v, valid


def make_data(n_per_channel: int, seed: int = 1) -> list[Column]:
    rng = np.random.default_rng(seed)
    out = []
    for level in LEVELS:
        t = np.arange(n_per_channel) / RATE_HZ + rng.uniform(0.0, 0.002, n_per_channel)
        v = level * (1.0 + 0.25 * np.sin(t / 30.0)) + rng.normal(0.0, 0.02 * level, n_per_channel)
        valid = (rng.random(n_per_channel) > 0.001).astype(np.uint8)
        out.append((t, v, valid))
    return out


def specs() -> list[ChannelSpec]:
    return [ChannelSpec(n, MAX_GAP, s) for n, s in zip(NAMES, SCALES, strict=True)]


# -- C ----------------------------------------------------------------------

CW_DTYPE = np.dtype(
    [
        ("integral", "f8"),
        ("covered_s", "f8"),
        ("longest_gap_s", "f8"),
        ("last", "f8"),
        ("gaps", "i8"),
        ("events", "i8"),
    ]
)


def flush_arrays(it: Integrator) -> tuple[Any, Any]:
    """Flushes inside the C core and views its staged windows as numpy arrays.

    Uses the extension directly (the wrapper would build Window objects): the
    integrator's own work ends when the C staging buffers are filled.
    """
    h = it._h  # noqa: SLF001 - a benchmark of the core, not of the wrapper
    n = lib.integ_flush(h)
    idx = np.frombuffer(ffi.buffer(lib.integ_out_index(h), n * 8), dtype=np.int64).copy()
    raw = ffi.buffer(lib.integ_out_channels(h), n * CHANNELS * CW_DTYPE.itemsize)
    cw = np.frombuffer(raw, dtype=CW_DTYPE).reshape(n, CHANNELS).copy()
    lib.integ_out_release(h)
    return idx, cw


def run_c(data: list[Column], chunk: int | None) -> tuple[float, Any]:
    it = Integrator(specs(), period=PERIOD)
    start = time.perf_counter()
    if chunk is None:
        for i, (t, v, ok) in enumerate(data):
            it.push(i, t, v, ok)
    else:
        n = len(data[0][0])
        push = it.push
        for s in range(0, n, chunk):
            for i, (t, v, ok) in enumerate(data):
                push(i, t[s : s + chunk], v[s : s + chunk], ok[s : s + chunk])
    out = flush_arrays(it)
    return time.perf_counter() - start, out


def time_window_objects(data: list[Column]) -> float:
    it = Integrator(specs(), period=PERIOD)
    for i, (t, v, ok) in enumerate(data):
        it.push(i, t, v, ok)
    start = time.perf_counter()
    it.flush()
    return time.perf_counter() - start


# -- numpy --------------------------------------------------------------------


def numpy_integrate(
    t: Any, v: Any, valid: Any, max_gap: float, scale: float, period: float, origin: float = 0.0
) -> dict[str, Any]:
    """One rate channel under docs/integrator.md, vectorised; plain float sums.

    Returns per-window arrays indexed from ``k0``: integral, covered_s, gaps,
    longest_gap_s.  Gaps still open at the end are recorded at the last
    sample, as flush() does.
    """
    finite = np.isfinite(t)
    tt = np.where(finite, t, -np.inf)
    before = np.maximum.accumulate(np.concatenate(([-np.inf], tt[:-1])))
    q = (t - origin) / period
    accepted = finite & (t > before) & (np.abs(q) < 2.0**53)
    t, v, q = t[accepted], v[accepted], q[accepted]
    ok = (valid[accepted] != 0) & np.isfinite(v)
    k = np.floor(q).astype(np.int64)
    for _ in range(4):  # the C's boundary correction, same float comparisons
        k = np.where(origin + (k + 1) * period <= t, k + 1, k)
    for _ in range(4):
        k = np.where(origin + k * period > t, k - 1, k)
    k_lo = int(k.min())
    nw = int(k.max()) - k_lo + 1
    ta, tb, va, vb, ka, kb = t[:-1], t[1:], v[:-1], v[1:], k[:-1], k[1:]
    dt = tb - ta
    cov = ok[:-1] & ok[1:] & (dt <= max_gap)
    integral = np.zeros(nw)
    covered = np.zeros(nw)
    same = cov & (ka == kb)
    integral += np.bincount(kb[same] - k_lo, 0.5 * (va[same] + vb[same]) * dt[same] * scale, nw)
    covered += np.bincount(kb[same] - k_lo, dt[same], nw)
    # Spans crossing boundaries are split by linear interpolation, one
    # boundary at a time; with max_gap < period there is at most one.
    split = np.nonzero(cov & (kb > ka))[0]
    s_t, s_v, s_k = ta[split], va[split], ka[split]
    while split.size:
        b = origin + (s_k + 1) * period
        b = np.minimum(np.maximum(b, s_t), tb[split])
        vmid = va[split] + (vb[split] - va[split]) * ((b - ta[split]) / dt[split])
        np.add.at(integral, s_k - k_lo, 0.5 * (s_v + vmid) * (b - s_t) * scale)
        np.add.at(covered, s_k - k_lo, b - s_t)
        s_t, s_v, s_k = b, vmid, s_k + 1
        done = s_k == kb[split]
        np.add.at(
            integral,
            s_k[done] - k_lo,
            0.5 * (s_v[done] + vb[split][done]) * (tb[split][done] - s_t[done]) * scale,
        )
        np.add.at(covered, s_k[done] - k_lo, tb[split][done] - s_t[done])
        keep = ~done
        split, s_t, s_v, s_k = split[keep], s_t[keep], s_v[keep], s_k[keep]
    # Gaps: maximal runs of uncovered spans, recorded in the window of their end.
    unc = ~cov
    edges = np.diff(np.concatenate(([0], unc.astype(np.int8), [0])))
    starts, ends = np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]  # span ranges
    lengths = tb[ends - 1] - ta[starts]
    where = kb[ends - 1] - k_lo
    gaps = np.bincount(where, minlength=nw)
    longest = np.zeros(nw)
    np.maximum.at(longest, where, lengths)
    return {
        "k0": k_lo,
        "integral": integral,
        "covered_s": covered,
        "gaps": gaps,
        "longest_gap_s": longest,
    }


def run_numpy(data: list[Column]) -> tuple[float, list[dict[str, Any]]]:
    start = time.perf_counter()
    out = [
        numpy_integrate(t, v, ok, MAX_GAP, s, PERIOD)
        for (t, v, ok), s in zip(data, SCALES, strict=True)
    ]
    return time.perf_counter() - start, out


def check_agreement(c_out: tuple[Any, Any], np_out: list[dict[str, Any]]) -> float:
    """Largest relative difference of window integrals between C and numpy."""
    idx, cw = c_out
    worst = 0.0
    for ch, res in enumerate(np_out):
        pos = idx - res["k0"]
        assert pos.min() >= 0 and pos.max() < len(res["integral"]), "window ranges differ"
        for field in ("integral", "covered_s", "longest_gap_s"):
            a, b = cw[field][:, ch], res[field][pos]
            scale = np.maximum(np.abs(a), 1e-300)
            worst = max(worst, float(np.max(np.abs(a - b) / np.maximum(scale, 1e-12))))
        assert np.array_equal(cw["gaps"][:, ch], res["gaps"][pos]), "gap counts differ"
    assert worst < 1e-9, f"numpy and C disagree by {worst:g}"
    return worst


# -- Python reference -----------------------------------------------------------


def run_python(data: list[Column], n: int) -> float:
    it = ReferenceIntegrator(specs(), period=PERIOD)
    start = time.perf_counter()
    for i, (t, v, ok) in enumerate(data):
        it.push(i, t[:n], v[:n], ok[:n])
    it.flush()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=10_000_000, help="total over the 4 channels")
    ap.add_argument("--python-samples", type=int, default=200_000, help="total, for the reference")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    per_channel = args.samples // CHANNELS
    samples = per_channel * CHANNELS
    py_per_channel = min(per_channel, max(1, args.python_samples // CHANNELS))
    data = make_data(per_channel)

    # Interleaved repetitions, best of each: on a shared machine a burst of
    # load then hits all three alike instead of one of them.
    one = chunks = np_s = float("inf")
    for _ in range(args.repeat):
        one = min(one, run_c(data, None)[0])
        chunks = min(chunks, run_c(data, CHUNK)[0])
        np_s = min(np_s, run_numpy(data)[0])
    py_s = run_python(data, py_per_channel)
    worst = check_agreement(run_c(data, None)[1], run_numpy(data)[1])
    objects_s = time_window_objects(data)
    windows = int(np.ceil(per_channel / RATE_HZ / PERIOD))

    rates = {
        "c_one_call": samples / one,
        "c_chunks_1000": samples / chunks,
        "numpy": samples / np_s,
        "python": py_per_channel * CHANNELS / py_s,
    }
    ratios = {
        "c_vs_numpy": rates["c_one_call"] / rates["numpy"],
        "c_vs_python": rates["c_one_call"] / rates["python"],
        "chunks_vs_one_call": rates["c_chunks_1000"] / rates["c_one_call"],
    }
    print(
        json.dumps(
            {
                "benchmark": "cngmrv.native integrator",
                **{k: round(v) for k, v in rates.items()},
                "samples": samples,
                "channels": CHANNELS,
                "python_samples": py_per_channel * CHANNELS,
                "windows": windows,
                "ratios": {k: round(v, 2) for k, v in ratios.items()},
                "goals": {k: {"goal": g, "met": ratios[k] >= g} for k, g in GOALS.items()},
                "numpy_vs_c_max_rel_diff": worst,
                "c_flush_to_objects_s": round(objects_s, 4),
                "notes": {
                    "data": (
                        f"{CHANNELS} rate channels x {per_channel} samples at {RATE_HZ:g} Hz, "
                        "0-2 ms jitter, 0.1 % invalid; period 1 s, max_gap 0.05 s"
                    ),
                    "units": "c_one_call, c_chunks_1000, numpy, python: samples per second",
                    "c_one_call": "push per channel + flush in C; windows read as numpy arrays",
                    "c_chunks_1000": f"push of {CHUNK} samples per call, channels interleaved",
                    "numpy": "same rules vectorised (bench/integrator.py numpy_integrate), no compensated sums",
                    "python": (
                        f"native/reference.py on the first {py_per_channel} samples of each "
                        "channel, per sample"
                    ),
                    "timing": f"C and numpy: best of {args.repeat}; python: one run",
                },
                "machine": {
                    "machine": platform.machine(),
                    "system": platform.system(),
                    "cpus": os.cpu_count(),
                    "load_avg_1m": round(os.getloadavg()[0], 2),
                    "python": platform.python_version(),
                    "implementation": sys.implementation.name,
                    "numpy": np.__version__,
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
