"""Soak: the whole pipeline at full bus load for an hour, watching the agent for leaks.

``cngmrv run`` runs in its own process (in the agent-only environment of
``bench/agent_env.py``) on a simulated J1939 bus filled to ``--load`` percent,
with the kit, the store, signing and upload to a real ingest server, as in
``cngmrv sim --agent-process``.  Every ``--sample-s`` seconds the agent is
sampled from outside, as an operator would: its RSS, open file descriptors and
CPU time from ``/proc``, and its store size, CAN queue depth, batches pending
and frame counters from its health endpoint.

Writes ``soak.csv`` (one row per sample) and ``soak.png`` (one panel per
quantity) into ``--out`` and prints one JSON object.  A line is fitted to the
RSS, the open fds, the CAN queue depth, the batches pending and the store
size, over the samples taken while the bus was driven (not the final seal and
upload): by least squares over all of them, and by Theil-Sen (the median of
the pairwise slopes) over those after the first 10 % of the run.  The first
10 % is warm-up: SQLite's page cache and Python's allocator keep growing for
a while after start, which is not a leak.  Theil-Sen judges, because one
sample caught in a pause (a commit holding the loop while 1,000 frames
queue) must not tip a line fitted to sixty.  A quantity is "flat" when that
slope per hour is within its bound (RSS 0.5 MB/h, fds 0.5/h, queue 100
frames/h, batches pending 2/h), "rising" when it is more, and "too short"
with fewer than 3 samples after warm-up.  The store grows by design (it keeps
what it uploaded until its quota prunes it); its slope is reported, not
judged.

Exits 1 if any quantity is rising or too short, or any batch signed in the
run did not arrive at the ingest and verify.  ``--analyse CSV`` recomputes
the trends and the plot from an earlier run's samples.

Usage: python bench/soak.py [--minutes 60] [--bitrate 500000] [--load 100]
       [--sample-s 60] [--out DIR] [--seed 1] [--agent-python PY | --same-python]
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import agent_env  # noqa: E402  (bench/ is not a package)

if TYPE_CHECKING:
    from cngmrv.sim.agent_process import AgentProcess

COLUMNS = (
    "elapsed_s",
    "rss_mb",
    "open_fds",
    "store_bytes",
    "can_queue_depth",
    "batches_pending",
    "frames_received",
    "frames_dropped",
    "cpu_s",
)
# The steepest slope per hour, after warm-up, that still counts as flat.  At
# 0.5 MB/h an agent would take a week to grow by the 80 MB it is allowed in all.
BOUNDS_PER_HOUR = {
    "rss_mb": 0.5,
    "open_fds": 0.5,
    "can_queue_depth": 100.0,
    "batches_pending": 2.0,
}
REPORTED_ONLY = ("store_bytes",)
WARMUP_SHARE = 0.1
MIN_SAMPLES_AFTER_WARMUP = 3
# Long enough for a tank at 200 bar to run low on a long soak, so the kit keeps
# reporting gas burned rather than an empty tank.
REFUEL_BELOW_BAR = 30.0

_METRICS = {
    "store_bytes": "cngmrv_store_bytes",
    "can_queue_depth": 'cngmrv_queue_depth{queue="can"}',
    "batches_pending": "cngmrv_batches_pending",
    "frames_received": 'cngmrv_frames_received_total{source="can"}',
    "frames_dropped": 'cngmrv_frames_dropped_total{source="can"}',
}


def slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """The least-squares slope of ``ys`` over ``xs``; None without two distinct ``xs``."""
    n = len(xs)
    if n < 2 or n != len(ys):
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def theil_sen(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """The median of the slopes between every pair of samples; None without two distinct ``xs``."""
    pairs = [
        (ys[j] - ys[i]) / (xs[j] - xs[i])
        for i in range(len(xs))
        for j in range(i + 1, len(xs))
        if xs[j] != xs[i]
    ]
    return statistics.median(pairs) if pairs else None


def trend(
    elapsed_s: Sequence[float], values: Sequence[float], bound_per_hour: float | None, run_s: float
) -> dict[str, Any]:
    """Slopes per hour of ``values`` sampled at ``elapsed_s`` (seconds into a run of ``run_s``).

    Only samples taken within the run count.  The verdict comes from the
    Theil-Sen slope after the first 10 % of the run (see the module's
    docstring); ``bound_per_hour`` None reports without judging.
    """
    inside = [(x, y) for x, y in zip(elapsed_s, values, strict=True) if x <= run_s]
    later = [(x, y) for x, y in inside if x >= WARMUP_SHARE * run_s]
    whole = slope([x for x, _ in inside], [y for _, y in inside])
    after = theil_sen([x for x, _ in later], [y for _, y in later])
    out: dict[str, Any] = {
        "slope_per_hour": None if whole is None else whole * 3600,
        "slope_per_hour_after_warmup": None,
        "bound_per_hour": bound_per_hour,
        "max": max((y for _, y in inside), default=None),
        "verdict": "too short",
    }
    if len(later) < MIN_SAMPLES_AFTER_WARMUP or after is None:
        return out
    out["slope_per_hour_after_warmup"] = after * 3600
    if bound_per_hour is None:
        out["verdict"] = "reported"
    else:
        out["verdict"] = "flat" if after * 3600 <= bound_per_hour else "rising"
    return out


def trends(samples: Sequence[Mapping[str, float]], run_s: float) -> dict[str, dict[str, Any]]:
    xs = [s["elapsed_s"] for s in samples]
    judged: dict[str, float | None] = {**BOUNDS_PER_HOUR, **dict.fromkeys(REPORTED_ONLY)}
    return {q: trend(xs, [s[q] for s in samples], b, run_s) for q, b in judged.items()}


class Sampler:
    """Samples the agent process every ``every_s`` seconds from a thread of its own.

    :meth:`start` is the harness's ``on_agent`` hook.  The process goes away
    inside ``run()`` (the harness stops it before returning), so a sample that
    fails because it is gone ends the thread quietly; one that fails while it
    still runs (a slow health endpoint under load) is counted in ``missed``.
    """

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.samples: list[dict[str, float]] = []
        self.missed = 0
        self._agent: AgentProcess | None = None
        self._t0 = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="soak-sampler", daemon=True)

    def start(self, agent: AgentProcess) -> None:
        self._agent, self._t0 = agent, time.monotonic()
        # The first sample in the caller's thread: an agent that cannot be
        # sampled then fails the run now, not after an hour of driving.
        self.samples.append(self._sample())
        self._thread.start()

    def stop(self) -> None:
        """End the thread (the harness has stopped the agent by the time run() returns)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        k = 1
        while not self._stop.wait(max(0.0, self._t0 + k * self.every_s - time.monotonic())):
            # Keep to the schedule: a slow sample skips slots instead of bunching up.
            k = max(k, int((time.monotonic() - self._t0) / self.every_s)) + 1
            try:
                self.samples.append(self._sample())
            except Exception:  # a missed sample is counted; only a gone agent ends the thread
                assert self._agent is not None
                if not self._agent.alive():
                    return
                self.missed += 1

    def _sample(self) -> dict[str, float]:
        agent = self._agent
        assert agent is not None
        # After stop() has reaped it, its pid may belong to another process.
        if not agent.alive():
            raise ProcessLookupError(f"the agent process {agent.pid} has exited")
        elapsed = time.monotonic() - self._t0
        memory = agent.memory_mb()
        fds = agent.open_fds()
        cpu = agent.cpu_seconds()
        metrics = agent.metrics()
        missing = [m for m in _METRICS.values() if m not in metrics]
        if missing:
            raise RuntimeError(
                f"the agent serves no {', '.join(missing)}; if it runs in an old "
                "agent-only environment, remake it: python bench/agent_env.py --refresh"
            )
        return {
            "elapsed_s": round(elapsed, 3),
            "rss_mb": round(memory["rss"], 3),
            "open_fds": fds,
            **{k: metrics[m] for k, m in _METRICS.items()},
            "cpu_s": round(cpu, 3),
        }


def write_csv(path: Path, samples: Sequence[Mapping[str, float]]) -> None:
    from cngmrv.agent.health import format_number

    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for s in samples:
            w.writerow({k: format_number(s[k]) for k in COLUMNS})


def read_csv(path: Path) -> list[dict[str, float]]:
    with path.open(newline="") as f:
        return [{k: float(row[k]) for k in COLUMNS} for row in csv.DictReader(f)]


def plot(
    path: Path,
    samples: Sequence[Mapping[str, float]],
    trend_of: Mapping[str, Mapping[str, Any]],
    run_s: float,
) -> None:
    """One panel per quantity against minutes, with the post-warm-up line where there is one."""
    # Imported here: the trend functions are usable (and tested) without it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = (
        ("rss_mb", "RSS (MB)", 1.0, "MB"),
        ("open_fds", "open fds", 1.0, "fds"),
        ("store_bytes", "store (MB)", 1e-6, "MB"),
        ("can_queue_depth", "CAN queue (frames)", 1.0, "frames"),
        ("batches_pending", "batches pending", 1.0, "batches"),
    )
    fig = Figure(figsize=(9, 2.0 * len(panels)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True)
    minutes = [s["elapsed_s"] / 60 for s in samples]
    for ax, (key, label, scale, unit) in zip(axes, panels, strict=True):
        ax.plot(minutes, [s[key] * scale for s in samples], marker=".", linewidth=1)
        t = trend_of.get(key)
        if t and t["slope_per_hour_after_warmup"] is not None:
            later = [s for s in samples if WARMUP_SHARE * run_s <= s["elapsed_s"] <= run_s]
            per_s = t["slope_per_hour_after_warmup"] / 3600
            # Theil-Sen's intercept: the median of what each sample says it is.
            b = statistics.median(s[key] - per_s * s["elapsed_s"] for s in later)
            ends = (later[0]["elapsed_s"], later[-1]["elapsed_s"])
            ax.plot(
                [x / 60 for x in ends],
                [(b + per_s * x) * scale for x in ends],
                linestyle="--",
                color="tab:red",
                label=f"{t['verdict']}: {per_s * 3600 * scale:+.3g} {unit}/h",
            )
            ax.legend(loc="upper left", fontsize="small")
        ax.axvline(WARMUP_SHARE * run_s / 60, color="grey", linewidth=0.8, linestyle=":")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_title("Agent process during the soak (dotted: end of warm-up)")
    axes[-1].set_xlabel("minutes")
    fig.savefig(path, dpi=100)


def _rounded(t: Mapping[str, Any]) -> dict[str, Any]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in t.items()}


def _verdict(trend_of: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What fails the soak, one line each (empty: it passed)."""
    return [
        f"{q} is {t['verdict']}"
        for q, t in trend_of.items()
        if t["verdict"] in ("rising", "too short")
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--minutes", type=float, default=60.0, help="real-time minutes (60)")
    p.add_argument("--bitrate", type=int, default=500_000, help="bus bit rate (500000)")
    p.add_argument("--load", type=float, default=100.0, help="bus load, percent (100)")
    p.add_argument("--sample-s", type=float, default=60.0, help="seconds between samples (60)")
    p.add_argument("--out", help="folder for soak.csv, soak.png and the run (default: new, temp)")
    p.add_argument("--seed", type=int, default=1, help="drive-cycle seed (1)")
    p.add_argument(
        "--analyse",
        metavar="CSV",
        help="recompute trends and plot from an earlier soak.csv (--minutes: its run length)",
    )
    agent_env.add_arguments(p)
    args = p.parse_args()
    if args.minutes <= 0 or args.sample_s <= 0 or args.bitrate <= 0:
        p.error("--minutes, --sample-s and --bitrate must be > 0")
    if not 0 <= args.load <= 100:
        p.error("--load must be a percentage 0..100")
    run_s = args.minutes * 60
    if args.analyse:
        csv_path = Path(args.analyse)
        samples = read_csv(csv_path)
        trend_of = trends(samples, run_s)
        png_path = csv_path.with_suffix(".png")
        plot(png_path, samples, trend_of, run_s)
        failed = _verdict(trend_of)
        report = {
            "minutes": args.minutes,
            "samples": len(samples),
            "csv": str(csv_path),
            "png": str(png_path),
            "trend": {q: _rounded(t) for q, t in trend_of.items()},
            "failed": failed,
        }
        print(json.dumps(report, indent=2))
        return 1 if failed else 0
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="cngmrv-soak-"))
    out.mkdir(parents=True, exist_ok=True)
    workdir = out / "run"
    # The harness would carry on an old store and ingest, and their size and
    # backlog would then be part of what the trends measure.
    if workdir.exists() and any(workdir.iterdir()):
        p.error(f"{workdir} is not empty; give a new --out")
    print(f"bench/soak.py: writing to {out}", file=sys.stderr)

    from cngmrv.sim.harness import SimOptions, run

    python = agent_env.chosen_python(args)
    opts = SimOptions(
        duration=run_s,
        seed=args.seed,
        workdir=workdir,
        bitrate=args.bitrate,
        bus_load_pct=args.load,
        agent_process=True,
        agent_python=python,
        refuel_below_bar=REFUEL_BELOW_BAR,
    )
    sampler = Sampler(args.sample_s)
    try:
        summary = run(opts, on_agent=sampler.start)
    finally:
        sampler.stop()
    samples = sampler.samples
    trend_of = trends(samples, run_s)
    csv_path, png_path = out / "soak.csv", out / "soak.png"
    write_csv(csv_path, samples)
    plot(png_path, samples, trend_of, run_s)

    agent = summary["agent"]
    proc = agent["process"]
    bus = summary["bus"]
    lost = bus["lost"]
    batches = {
        "signed": summary["batches_signed"],
        "uploaded": summary["batches_uploaded"],
        "verified": summary["batches_verified"],
    }
    failed = _verdict(trend_of)
    if batches["verified"] != batches["signed"]:
        failed.append("not every batch signed was uploaded and verified")
    report = {
        "minutes": args.minutes,
        "bitrate": args.bitrate,
        "load_pct": args.load,
        "samples": len(samples),
        "samples_missed": sampler.missed,
        "csv": str(csv_path),
        "png": str(png_path),
        "trend": {q: _rounded(t) for q, t in trend_of.items()},
        "peak_rss_mb": round(proc["peak_rss_mb"], 1),
        "frames": {
            "offered": bus["offered"],
            "received": agent["can"]["frames"],
            "dropped": lost["total"],
            "dropped_where": lost,
        },
        "pacing": {"drive_wall_s": bus["drive_wall_s"], "late_max_s": bus["late_max_s"]},
        "cpu_pct_one_core": round(proc["cpu_pct_one_core"], 2),
        "readings": summary["readings"],
        "batches": batches,
        "agent_python": python,
        "failed": failed,
    }
    print(json.dumps(report, indent=2))
    for line in failed:
        print(f"bench/soak.py: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
