"""Soak: the whole pipeline at full bus load for an hour, watching the agent for leaks.

``cngmrv run`` runs in its own process (in the agent-only environment of
``bench/agent_env.py``) on a simulated J1939 bus filled to ``--load`` percent,
with the kit, the store, signing and upload to a real ingest server, as in
``cngmrv sim --agent-process``.  Every ``--sample-s`` seconds the agent is
sampled from outside, as an operator would: its RSS, open file descriptors and
CPU time from ``/proc``, and its store size, CAN queue depth, batches pending
and frame counters from its health endpoint.

Writes ``soak.csv`` (one row per sample) and ``soak.png`` (one panel per
quantity) into ``--out`` and prints one JSON object.  A least-squares line is
fitted to the RSS, the open fds, the CAN queue depth and the batches pending,
over all samples and over the samples after the first 10 % of the run.  The
first 10 % is warm-up: SQLite's page cache and Python's allocator keep growing
for a while after start, which is not a leak, so the verdict uses the later
fit only.  A quantity is "flat" when that fit's rise over the whole run
(slope times run length) is within its tolerance (RSS 2 MB, fds 1, queue 100
frames, batches pending 2), "rising" when it is more, and "too short" with
fewer than 3 samples after warm-up.  A falling line counts as flat: the check
is for growth.

Exits 1 if any quantity is rising or any batch signed in the run did not
arrive at the ingest and verify.

Usage: python bench/soak.py [--minutes 60] [--bitrate 500000] [--load 100]
       [--sample-s 60] [--out DIR] [--seed 1] [--agent-python PY | --same-python]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
# Largest rise over the run, after warm-up, that still counts as flat.
TOLERANCES = {"rss_mb": 2.0, "open_fds": 1.0, "can_queue_depth": 100.0, "batches_pending": 2.0}
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


def trend(
    elapsed_s: Sequence[float], values: Sequence[float], tolerance: float, run_s: float
) -> dict[str, Any]:
    """Slopes per hour of ``values`` sampled at ``elapsed_s`` (seconds into a run of ``run_s``).

    The verdict comes from the fit after the first 10 % of the run only (see
    the module's docstring for why).
    """
    later = [(x, y) for x, y in zip(elapsed_s, values, strict=True) if x >= WARMUP_SHARE * run_s]
    whole = slope(elapsed_s, values)
    after = slope([x for x, _ in later], [y for _, y in later])
    out: dict[str, Any] = {
        "slope_per_hour": None if whole is None else whole * 3600,
        "slope_per_hour_after_warmup": None,
        "rise_after_warmup": None,
        "tolerance": tolerance,
        "verdict": "too short",
    }
    if len(later) < MIN_SAMPLES_AFTER_WARMUP or after is None:
        return out
    rise = after * run_s
    out["slope_per_hour_after_warmup"] = after * 3600
    out["rise_after_warmup"] = rise
    out["verdict"] = "flat" if rise <= tolerance else "rising"
    return out


def trends(samples: Sequence[Mapping[str, float]], run_s: float) -> dict[str, dict[str, Any]]:
    xs = [s["elapsed_s"] for s in samples]
    return {q: trend(xs, [s[q] for s in samples], tol, run_s) for q, tol in TOLERANCES.items()}


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
        """End the thread, then take a last sample if the process is still there."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._agent is None:
            return
        try:
            self.samples.append(self._sample())
        except OSError:
            pass

    def _loop(self) -> None:
        k = 1
        while not self._stop.wait(max(0.0, self._t0 + k * self.every_s - time.monotonic())):
            # Keep to the schedule: a slow sample skips slots instead of bunching up.
            k = max(k, int((time.monotonic() - self._t0) / self.every_s)) + 1
            try:
                self.samples.append(self._sample())
            except OSError:
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
        if "rss" not in memory:
            raise ProcessLookupError(f"the agent process {agent.pid} has exited")
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
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for s in samples:
            w.writerow({k: _plain(s[k]) for k in COLUMNS})


def _plain(v: float) -> float | int:
    # Counters come from the health endpoint as floats; "1234.0" reads as a measurement.
    return int(v) if float(v).is_integer() else v


def plot(
    path: Path,
    samples: Sequence[Mapping[str, float]],
    trend_of: Mapping[str, Mapping[str, Any]],
    run_s: float,
) -> None:
    """One panel per quantity against minutes, with the post-warm-up fit where there is one."""
    # Imported here: the trend functions are usable (and tested) without it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = (
        ("rss_mb", "RSS (MB)", 1.0),
        ("open_fds", "open fds", 1.0),
        ("store_bytes", "store (MB)", 1e-6),
        ("can_queue_depth", "CAN queue (frames)", 1.0),
        ("batches_pending", "batches pending", 1.0),
    )
    fig = Figure(figsize=(9, 2.0 * len(panels)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True)
    minutes = [s["elapsed_s"] / 60 for s in samples]
    for ax, (key, label, scale) in zip(axes, panels, strict=True):
        ax.plot(minutes, [s[key] * scale for s in samples], marker=".", linewidth=1)
        t = trend_of.get(key)
        if t and t["slope_per_hour_after_warmup"] is not None:
            later = [s for s in samples if s["elapsed_s"] >= WARMUP_SHARE * run_s]
            xs = [s["elapsed_s"] for s in later]
            ys = [s[key] for s in later]
            per_s = t["slope_per_hour_after_warmup"] / 3600
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            ends = (xs[0], xs[-1])
            ax.plot(
                [x / 60 for x in ends],
                [(my + per_s * (x - mx)) * scale for x in ends],
                linestyle="--",
                color="tab:red",
                label=f"{t['verdict']}: {t['rise_after_warmup']:+.3g} over the run",
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


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--minutes", type=float, default=60.0, help="real-time minutes (60)")
    p.add_argument("--bitrate", type=int, default=500_000, help="bus bit rate (500000)")
    p.add_argument("--load", type=float, default=100.0, help="bus load, percent (100)")
    p.add_argument("--sample-s", type=float, default=60.0, help="seconds between samples (60)")
    p.add_argument("--out", help="folder for soak.csv, soak.png and the run (default: new, temp)")
    p.add_argument("--seed", type=int, default=1, help="drive-cycle seed (1)")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--agent-python", help="interpreter for the agent (default: agent-only venv)")
    who.add_argument(
        "--same-python",
        action="store_true",
        help="run the agent with this interpreter, not the agent-only environment",
    )
    args = p.parse_args()
    if args.minutes <= 0 or args.sample_s <= 0 or args.bitrate <= 0:
        p.error("--minutes, --sample-s and --bitrate must be > 0")
    if not 0 <= args.load <= 100:
        p.error("--load must be a percentage 0..100")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="cngmrv-soak-"))
    out.mkdir(parents=True, exist_ok=True)
    workdir = out / "run"
    # The harness would carry on an old store and ingest, and their size and
    # backlog would then be part of what the trends measure.
    if workdir.exists() and any(workdir.iterdir()):
        p.error(f"{workdir} is not empty; give a new --out")
    print(f"bench/soak.py: writing to {out}", file=sys.stderr)

    from cngmrv.sim.harness import SimOptions, run

    if args.same_python:
        python = sys.executable
    elif args.agent_python:
        python = args.agent_python
    else:
        from agent_env import agent_python  # bench/ is on sys.path when run as a script

        python = agent_python()
    run_s = args.minutes * 60
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
    offered = summary["bus"]["offered"]
    lost = summary["bus"]["lost"]
    batches = {
        "signed": summary["batches_signed"],
        "uploaded": summary["batches_uploaded"],
        "verified": summary["batches_verified"],
    }
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
            "offered": offered,
            "received": agent["can"]["frames"],
            "dropped": lost["total"],
            "dropped_where": {k: lost[k] for k in ("socket", "queue", "decoder")},
        },
        "cpu_pct_one_core": round(proc["cpu_pct_one_core"], 2),
        "batches": batches,
        "agent_python": "this interpreter" if python == sys.executable else "agent-only venv",
    }
    print(json.dumps(report, indent=2))
    rising = any(t["verdict"] == "rising" for t in trend_of.values())
    unverified = batches["verified"] != batches["signed"]
    if rising:
        print("bench/soak.py: a quantity kept rising after warm-up", file=sys.stderr)
    if unverified:
        print("bench/soak.py: not every batch signed was uploaded and verified", file=sys.stderr)
    return 1 if rising or unverified else 0


if __name__ == "__main__":
    sys.exit(main())
