"""Throughput of the fuel-mix integrator: C core vs numpy vs the Python oracle.

Prints one JSON object.  All four figures come from the same run on the same
synthetic 100 Hz stream (jittered timestamps, 0.1 % invalid samples).
Usage: python bench/integrator.py [--samples N]
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

PERIOD = 1.0
MAX_GAP = 0.05
CHUNK = 100_000


def stream(n: int, seed: int = 1) -> tuple[Any, Any, Any]:
    rng = np.random.default_rng(seed)
    t = np.arange(n) * 0.01 + rng.uniform(0.0, 0.002, n)
    v = 20.0 + 5.0 * np.sin(t / 30.0) + rng.normal(0.0, 0.5, n)
    valid = (rng.random(n) > 0.001).astype(np.uint8)
    return t, v, valid


def integrator() -> Integrator:
    return Integrator([ChannelSpec("fuel", MAX_GAP, 1.0 / 3600.0)], period=PERIOD)


def bench_c_buffers(t: Any, v: Any, valid: Any) -> tuple[float, float, int]:
    # Chunks with a pop after each, as the agent would run it.  Push and pop are
    # timed apart: pop cost is dominated by building Window objects in Python.
    it = integrator()
    windows = 0
    push_s = pop_s = 0.0
    for i in range(0, len(t), CHUNK):
        a = time.perf_counter()
        it.push(0, t[i : i + CHUNK], v[i : i + CHUNK], valid[i : i + CHUNK])
        b = time.perf_counter()
        windows += len(it.pop(float(t[min(i + CHUNK, len(t)) - 1])))
        pop_s += time.perf_counter() - b
        push_s += b - a
    b = time.perf_counter()
    windows += len(it.flush())
    pop_s += time.perf_counter() - b
    return push_s, pop_s, windows


def bench_c_push_one(t: Any, v: Any, valid: Any) -> float:
    ts, vs, oks = t.tolist(), v.tolist(), valid.tolist()
    it = integrator()
    push_one = it.push_one
    start = time.perf_counter()
    for i in range(len(ts)):
        push_one(0, ts[i], vs[i], oks[i])
    it.flush()
    return time.perf_counter() - start


def bench_numpy(t: Any, v: Any, valid: Any) -> float:
    start = time.perf_counter()
    dt = np.diff(t)
    ok = (valid[1:] != 0) & (valid[:-1] != 0) & (dt <= MAX_GAP)
    total = float(np.sum(np.where(ok, 0.5 * (v[1:] + v[:-1]) * dt, 0.0))) / 3600.0
    elapsed = time.perf_counter() - start
    assert total > 0.0
    return elapsed


def bench_reference(t: Any, v: Any, valid: Any) -> float:
    it = ReferenceIntegrator([ChannelSpec("fuel", MAX_GAP, 1.0 / 3600.0)], period=PERIOD)
    start = time.perf_counter()
    it.push(0, t, v, valid)
    it.flush()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=10_000_000)
    args = ap.parse_args()
    n = args.samples
    n_one = max(1, n // 10)
    n_ref = max(1, n // 100)
    t, v, valid = stream(n)

    push_s, pop_s, windows = bench_c_buffers(t, v, valid)
    one_s = bench_c_push_one(t[:n_one], v[:n_one], valid[:n_one])
    np_s = bench_numpy(t, v, valid)
    ref_s = bench_reference(t[:n_ref], v[:n_ref], valid[:n_ref])

    print(
        json.dumps(
            {
                "benchmark": "cngmrv.native integrator",
                "stream": "1 channel, 100 Hz jittered, 0.1% invalid, period 1 s, max_gap 0.05 s",
                "samples_per_s": {
                    "c_numpy_buffers": round(n / push_s),
                    "c_numpy_buffers_with_pop": round(n / (push_s + pop_s)),
                    "c_push_one": round(n_one / one_s),
                    "numpy_trapezoid": round(n / np_s),
                    "python_reference": round(n_ref / ref_s),
                },
                "samples": {
                    "c_numpy_buffers": n,
                    "c_numpy_buffers_with_pop": n,
                    "c_push_one": n_one,
                    "numpy_trapezoid": n,
                    "python_reference": n_ref,
                },
                "notes": {
                    "c_numpy_buffers": f"integ_push time only, chunks of {CHUNK} samples",
                    "c_numpy_buffers_with_pop": (
                        f"push + a pop after each chunk, including building {windows} "
                        f"Window objects ({pop_s / windows * 1e6:.2f} us each)"
                    ),
                    "c_push_one": "one Python call per sample (the agent's per-frame path)",
                    "numpy_trapezoid": (
                        "total only: masked trapezoid (both ends valid, dt <= max_gap); no "
                        "windows, boundary splitting, gap counts, lateness or compensated sum"
                    ),
                    "python_reference": "native/reference.py, same semantics as the C core",
                },
                "machine": {
                    "machine": platform.machine(),
                    "processor": platform.processor(),
                    "system": platform.system(),
                    "cpus": os.cpu_count(),
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
