"""``cngmrv replay``: a recorded CAN log through the live agent's decoders and integrator.

The same :class:`~cngmrv.agent.pipeline.Pipeline` the agent runs, fed from
:class:`~cngmrv.drivers.can_logs.LogFile` instead of a bus, so a year of
recordings can be re-run and compared with what the agent signed.  Time comes
from the recording only; the totals are the same on every run.

A damaged log does not lose what was read before the damage: the totals
cover everything up to it, and the summary says where and why it stopped.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from cngmrv.agent.pipeline import GAP_SIGNALS, Pipeline, PipelineConfig, period_quantile
from cngmrv.drivers import j1939
from cngmrv.drivers.can_logs import LogError, LogFile
from cngmrv.drivers.dbc import DbcSignals

ADVANCE_EVERY = 4096  # frames between pops of finished readings (bounds memory on long logs)
# A detected logger period P bridges gaps up to this times P: a frame's jitter
# is covered, one missing frame (a gap of 2 P) is not.
DETECT_FACTOR = 1.5
MIN_INTERVALS = 10  # fewer intervals than this are no steady period
LOW_COVERAGE = 0.9  # a signal covering less of the log than this says why
UNTIMED = (
    "the log has no timestamps (plain `candump can0`): nothing is integrated over time; "
    "the counters need no clock; record with `candump -l can0` or `candump -ta can0`"
)
_COUNTER_UNITS = {"fuel_total": "L", "odometer": "km"}


class Progress:
    """A one-line progress bar on a terminal (stderr), redrawn at most 5 times a second."""

    def __init__(self, log: LogFile, stream: TextIO, width: int = 30) -> None:
        self._log = log
        self._stream = stream
        self._width = width
        self._next = 0.0

    def update(self, frames: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next:
            return
        self._next = now + 0.2
        size = self._log.size or 1
        frac = min(self._log.position / size, 1.0)
        done = int(frac * self._width)
        bar = "#" * done + "-" * (self._width - done)
        self._stream.write(f"\rreplay [{bar}] {100 * frac:5.1f} %  {frames} frames")
        self._stream.flush()

    def close(self, frames: int) -> None:
        self.update(frames, force=True)
        self._stream.write("\n")
        self._stream.flush()


def replay(
    path: Path,
    config: PipelineConfig | None = None,
    dbc: DbcSignals | None = None,
    progress: TextIO | None = None,
    detect: Collection[str] = (),
) -> dict[str, Any]:
    """Replay ``path`` and return the summary ``cngmrv replay --json`` prints.

    ``detect`` names integrated signals (:data:`~cngmrv.agent.pipeline.GAP_SIGNALS`)
    whose logger period is to be detected: when such a signal's frames come at
    a steady period longer than its maximum gap (a prescaled log), the log is
    replayed again with that signal's maximum gap at :data:`DETECT_FACTOR`
    times its median period, and ``summary["coverage"]`` says so.

    Raises ``ValueError`` (unknown format) or ``OSError`` (cannot open) before
    anything is read; damage found while reading ends up in ``summary["error"]``.
    """
    config = config or PipelineConfig()
    unknown = set(detect) - set(GAP_SIGNALS)
    if unknown:
        raise ValueError(
            f"no gap rule for {sorted(unknown)} (integrated: {', '.join(GAP_SIGNALS)})"
        )
    summary = _run(path, config, dbc, progress, {})
    detected: dict[str, float] = {}
    for signal in detect:
        hist = summary["_periods"].get(signal, {})
        median = period_quantile(hist, 0.5)
        if median is None or median <= config.gap_of(signal):
            continue
        if _steady(hist, median):
            detected[signal] = round(DETECT_FACTOR * median, 3)
    if detected:
        gaps = {**config.max_gap_s, **detected}
        summary = _run(path, replace(config, max_gap_s=gaps), dbc, progress, detected)
    del summary["_periods"]
    return summary


def _steady(hist: dict[int, int], median: float) -> bool:
    """Enough intervals, nine in ten of them within the detected gap: a logger's period,
    not a signal that comes and goes."""
    high = period_quantile(hist, 0.9)
    return (
        sum(hist.values()) >= MIN_INTERVALS and high is not None and high <= DETECT_FACTOR * median
    )


def _run(
    path: Path,
    config: PipelineConfig,
    dbc: DbcSignals | None,
    progress: TextIO | None,
    detected: dict[str, float],
) -> dict[str, Any]:
    log = LogFile(path)
    pipeline = Pipeline(config, clock="unknown", dbc=dbc)
    bar = Progress(log, progress) if progress is not None else None
    totals = {"diesel_l": 0.0, "distance_km": 0.0, "diesel_covered_s": 0.0}
    covered = dict.fromkeys(GAP_SIGNALS, 0.0)
    gaps = dict.fromkeys(GAP_SIGNALS, 0)
    readings = 0

    def collect(rs: list[dict[str, Any]]) -> None:
        nonlocal readings
        readings += len(rs)
        for r in rs:
            totals["diesel_l"] += r["diesel_l"]
            totals["distance_km"] += r["distance_km"]
            totals["diesel_covered_s"] += r["cov"]["diesel_l"]
            for signal, channels in GAP_SIGNALS.items():
                covered[signal] += r["cov"][channels[0]]
                gaps[signal] += r.get("gaps", {}).get(channels[0], (0,))[0]

    on_can = pipeline.on_can
    error: LogError | None = None
    n = 0
    try:
        for t, can_id, data, mono in log.frames():
            on_can(t, can_id, data, mono)
            n += 1
            if n % ADVANCE_EVERY == 0:
                collect(pipeline.advance())
                if bar is not None:
                    bar.update(log.read)
    except LogError as e:
        error = e
    collect(pipeline.advance())
    collect(pipeline.finish())
    if bar is not None:
        bar.close(log.read)
    out = _summary(log, pipeline, totals, readings, error)
    out["coverage"] = _coverage(out, pipeline, covered, gaps, detected)
    out["_periods"] = pipeline.stats.periods
    return out


def _coverage(
    summary: dict[str, Any],
    pipeline: Pipeline,
    covered: dict[str, float],
    gaps: dict[str, int],
    detected: dict[str, float],
) -> dict[str, dict[str, Any]]:
    """Per integrated signal: covered seconds, median period, the gap rule, and why
    coverage is low when it is."""
    config = pipeline.config
    out: dict[str, dict[str, Any]] = {}
    for signal in GAP_SIGNALS:
        median = period_quantile(pipeline.stats.periods.get(signal, {}), 0.5)
        gap = config.gap_of(signal)
        how = (
            "detected"
            if signal in detected
            else "option"
            if signal in config.max_gap_s
            else "default"
        )
        entry: dict[str, Any] = {
            "covered_s": covered[signal],
            "median_period_s": median,
            "max_gap_s": gap,
            "max_gap": how,
            "gaps": gaps[signal],
            "low": None,
        }
        if not summary["timed"]:
            entry["low"] = UNTIMED
        elif covered[signal] < LOW_COVERAGE * summary["duration_s"]:
            entry["low"] = _why_low(signal, pipeline, median, gap, gaps[signal])
        out[signal] = entry
    return out


def _why_low(signal: str, pipeline: Pipeline, median: float | None, gap: float, gaps: int) -> str:
    src = pipeline.sources[signal]
    if not src.accepted:
        if src.others:
            senders = ", ".join(str(sa) for sa in sorted(src.others))
            return (
                f"sent only by SA {senders}, not by its source; "
                f"--source {signal}=ADDRESS takes it from one of them"
            )
        return "no frames of this signal in the log"
    flagged = pipeline.stats.ecu_errors.get(signal, 0)
    if median is not None and median > gap:
        return (
            f"median period {median:g} s is longer than the max gap {gap:g} s "
            f"(a prescaled log?): --max-gap {signal}=SECONDS, or --max-gap {signal}=auto "
            "to detect the logger's period"
        )
    if flagged:
        return f"{flagged} values sent by the ECU as error (0xFE..), a gap each"
    return f"{gaps} gaps longer than {gap:g} s, or the signal is sent in part of the log only"


def _summary(
    log: LogFile,
    pipeline: Pipeline,
    totals: dict[str, float],
    readings: int,
    error: LogError | None,
) -> dict[str, Any]:
    s = pipeline.stats
    first = log.first_t
    duration = (log.last_t - first) if first is not None and log.last_t is not None else 0.0
    events = Counter(str(e["kind"]) for e in pipeline.events)
    out: dict[str, Any] = {
        "file": str(log.path),
        "format": log.format,
        "timed": log.timed,
        "frames": log.read,
        "j1939_frames": s.frames,
        "ignored_frames": log.ignored,
        "start": first,
        "duration_s": duration,
        "diesel_l": totals["diesel_l"],
        "diesel_covered_s": totals["diesel_covered_s"],
        "distance_km": totals["distance_km"],
        "readings": readings,
        "engine_speed_mean_rpm": s.rpm_sum / s.rpm_n if s.rpm_n else None,
        "engine_speed_min_rpm": s.rpm_min,
        "engine_speed_max_rpm": s.rpm_max,
        "engine_address": pipeline.engine.address,
        "sources": {
            sig: {
                "source": src.address,
                "rule": src.settled,
                "frames": src.accepted,
                "other_senders": {str(sa): n for sa, n in sorted(src.others.items())},
            }
            for sig, src in pipeline.sources.items()
        },
        "counters": {
            sig: {"first": a, "last": b, "used": b - a, "unit": _COUNTER_UNITS[sig]}
            for sig, (a, b) in sorted(s.counters.items())
        },
        "decode_errors": s.decode_errors,
        "ecu_errors": dict(sorted(s.ecu_errors.items())),
        "skipped": dict(sorted(log.skipped.items())),
        "reasons": dict(s.reasons),
        "foreign_source": s.foreign_source,
        "pgns": {str(pgn): n for pgn, n in sorted(s.pgns.items())},
        "tp": dict(s.tp),
        "tp_messages": {str(pgn): n for pgn, n in sorted(s.tp_messages.items())},
        "dm1": {
            str(sa): {
                "lamps": dm1.lamps,
                "dtcs": [[d.spn, d.fmi, d.occurrences] for d in dm1.dtcs],
            }
            for sa, dm1 in sorted(pipeline.dm1_active().items())
        },
        "events": dict(sorted(events.items())),
        "integrator": pipeline.counters(),
        "error": None,
    }
    if s.extra:
        out["extra"] = {
            name: {"n": int(n), "mean": total / n, "min": lo, "max": hi}
            for name, (n, total, lo, hi) in sorted(s.extra.items())
        }
    if error is not None:
        out["error"] = {"where": error.where, "reason": error.reason, "message": str(error)}
    return out


def print_summary(s: dict[str, Any], out: TextIO = sys.stdout) -> None:
    """The human-readable form of a :func:`replay` summary."""
    w = out.write
    w(
        f"replayed {s['file']}: {s['frames']} frames ({s['j1939_frames']} J1939, "
        f"{s['ignored_frames']} other) over {s['duration_s']:.1f} s\n"
    )
    if not s["timed"]:
        w(f"no time: {UNTIMED}\n")
    w(f"diesel      {s['diesel_l']:12.4f} L   (covered {s['diesel_covered_s']:.1f} s)\n")
    w(f"distance    {s['distance_km']:12.4f} km\n")
    for sig, c in s["counters"].items():
        w(
            f"{sig:<11} {c['used']:12.4f} {c['unit']:<3} (counter {c['first']:g} .. "
            f"{c['last']:g} {c['unit']}, no clock needed)\n"
        )
    if s["engine_speed_mean_rpm"] is not None:
        w(
            f"engine speed mean {s['engine_speed_mean_rpm']:.1f} rpm "
            f"(range {s['engine_speed_min_rpm']:.1f} .. {s['engine_speed_max_rpm']:.1f})\n"
        )
    else:
        w("engine speed: no valid EEC1 from the engine\n")
    w(
        f"readings {s['readings']}; decode errors {s['decode_errors']}; "
        f"frames from other ECUs {s['foreign_source']}\n"
    )
    if s["ecu_errors"]:
        flagged = ", ".join(f"{sig} {n}" for sig, n in s["ecu_errors"].items())
        w(f"values the ECU sent as error (0xFE..): {flagged}\n")
    if s["skipped"]:
        kinds = ", ".join(f"{kind} {n}" for kind, n in s["skipped"].items())
        w(f"records not read as J1939 frames: {kinds}\n")
    for sig, src in s["sources"].items():
        if not src["frames"] and not src["other_senders"]:
            continue
        where = "no address" if src["source"] is None else f"SA {src['source']}"
        line = f"{sig:<13} from {where} ({src['rule']}), {src['frames']} frames"
        others = ", ".join(f"SA {sa} ({n})" for sa, n in src["other_senders"].items())
        w(line + (f"; also sent by {others}, not used" if others else "") + "\n")
    for reason, n in sorted(s["reasons"].items(), key=lambda kv: -kv[1])[:5]:
        w(f"  {n:8d}  {reason}\n")
    for sa, dm1 in s["dm1"].items():
        lamps = ", ".join(f"{k} {v}" for k, v in dm1["lamps"].items() if v == "on") or "no lamp on"
        codes = ", ".join(f"SPN {spn} FMI {fmi}" for spn, fmi, _ in dm1["dtcs"]) or "none"
        w(f"DM1 from SA {sa}: {lamps}; active: {codes}\n")
    top = sorted(s["pgns"].items(), key=lambda kv: -kv[1])[:8]
    w("PGNs: " + ", ".join(f"{_pgn_label(int(p))} {n}" for p, n in top) + "\n")
    for sig, c in s["coverage"].items() if s["timed"] else ():
        period = (
            "no period" if c["median_period_s"] is None else f"period {c['median_period_s']:g} s"
        )
        line = f"{sig:<13} covered {c['covered_s']:.1f} s; {period}; max gap {c['max_gap_s']:g} s"
        line += " (detected logger period)" if c["max_gap"] == "detected" else ""
        w(line + (f"; low: {c['low']}" if c["low"] else "") + "\n")
    if s["error"]:
        w(f"stopped early: {s['error']['message']}\n")
        w("(the totals above cover everything read before that point)\n")


def _pgn_label(pgn: int) -> str:
    return j1939.PGN_NAMES.get(pgn, str(pgn))
