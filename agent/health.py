"""Health: Prometheus text metrics on 127.0.0.1, and the same figures for a person.

The main loop takes a snapshot (:meth:`HealthServer.refresh`, at most once a
second) and the HTTP thread only serves the latest text, so a scrape never
touches the agent's SQLite connection or races its counters, and a hung main
loop shows as a ``cngmrv_snapshot_age_seconds`` that keeps growing.

The server binds 127.0.0.1 only: the figures are for the device's own
exporter or a person on the device, never for the cellular side.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cngmrv.agent.pipeline import GAP_SIGNALS
from cngmrv.drivers.address import SIGNALS

if TYPE_CHECKING:
    from cngmrv.agent.runtime import Agent

HOST = "127.0.0.1"
CLOCK_STATES = ("unknown", "informative", "synchronised")
CAN_QUEUE = 'cngmrv_queue_depth{queue="can"}'

# name -> (type, help); the order here is the order of the exposition.
METRICS: dict[str, tuple[str, str]] = {
    "cngmrv_frames_received_total": ("counter", "Frames received, per source"),
    "cngmrv_frames_dropped_total": (
        "counter",
        "Frames dropped on a full queue (the agent's, or the kernel's socket queue), per source",
    ),
    "cngmrv_decode_errors_total": ("counter", "CAN frames rejected by the decoders"),
    "cngmrv_ecu_error_values_total": (
        "counter",
        "Signal values the ECU sent as error (0xFE..), apart from decode errors",
    ),
    "cngmrv_engine_address_contests_total": (
        "counter",
        "Address claims disputing the engine's address (another NAME, or cannot claim)",
    ),
    "cngmrv_signal_source_address": (
        "gauge",
        "Source address each signal is taken from (-1 = none yet, or its ECU has none)",
    ),
    "cngmrv_signal_foreign_frames_total": (
        "counter",
        "Frames of a signal from other senders than its source, never used",
    ),
    "cngmrv_signal_other_senders": ("gauge", "Other addresses seen sending a signal"),
    "cngmrv_tp_sessions_aborted_total": ("counter", "J1939 TP sessions aborted or timed out"),
    "cngmrv_kit_crc_errors_total": ("counter", "Kit frames rejected for a bad CRC"),
    "cngmrv_readings_total": ("counter", "Readings committed since start"),
    "cngmrv_batches_sealed_total": ("counter", "Batches sealed since start"),
    "cngmrv_batches_uploaded_total": ("counter", "Batches acknowledged by the ingest since start"),
    "cngmrv_batches_pending": ("gauge", "Sealed batches in the store not yet uploaded"),
    "cngmrv_batches_refused_total": (
        "counter",
        "Batches the ingest refused for good since start (parked in the store, not lost)",
    ),
    "cngmrv_queue_depth": ("gauge", "Inputs waiting in a source queue"),
    "cngmrv_source_counter": (
        "untyped",
        "Each source's own counters (its link's and its decoder's), by source and counter;"
        " one kept per key (refusals by reason) carries the key",
    ),
    "cngmrv_store_bytes": ("gauge", "Store size on disk (database, WAL and shared memory)"),
    "cngmrv_store_quota_bytes": ("gauge", "Store quota (0 = none configured)"),
    "cngmrv_disk_free_bytes": ("gauge", "Free space on the store's filesystem"),
    "cngmrv_last_upload_timestamp_seconds": ("gauge", "Wall time of the last upload (0 = none)"),
    "cngmrv_clock_state": ("gauge", "1 for the clock's current state"),
    "cngmrv_clock_steps_total": ("counter", "Wall-clock steps detected"),
    "cngmrv_boot_epoch": ("gauge", "Boot epoch of this run"),
    "cngmrv_snapshot_age_seconds": ("gauge", "Seconds since the main loop took this snapshot"),
}


def collect(agent: Agent) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every metric as ``name -> [(labels, value)]``; call from the agent's own thread."""
    s = agent.pipeline.stats
    can_stats = agent.can.stats
    kit = agent.kit.stats if agent.kit else None
    m: dict[str, list[tuple[dict[str, str], float]]] = {name: [] for name in METRICS}
    m["cngmrv_frames_received_total"].append(({"source": "can"}, can_stats["frames"]))
    m["cngmrv_frames_dropped_total"].append(
        ({"source": "can"}, can_stats["queue_dropped"] + can_stats.get("kernel_dropped", 0))
    )
    if kit is not None:
        m["cngmrv_frames_received_total"].append(({"source": "kit"}, kit["frames_ok"]))
        m["cngmrv_frames_dropped_total"].append(({"source": "kit"}, kit["queue_dropped"]))
        m["cngmrv_kit_crc_errors_total"].append(({}, kit["crc_errors"]))
    else:
        m["cngmrv_kit_crc_errors_total"].append(({}, 0))
    m["cngmrv_decode_errors_total"].append(({}, s.decode_errors))
    m["cngmrv_engine_address_contests_total"].append(({}, s.engine_address_contests))
    for signal, src in agent.pipeline.sources.items():
        address = src.address
        m["cngmrv_signal_source_address"].append(
            ({"signal": signal}, -1 if address is None else address)
        )
        label = {"signal": signal}
        if signal in GAP_SIGNALS:
            m["cngmrv_ecu_error_values_total"].append((label, s.ecu_errors.get(signal, 0)))
        m["cngmrv_signal_foreign_frames_total"].append((label, sum(src.others.values())))
        m["cngmrv_signal_other_senders"].append((label, len(src.others)))
    m["cngmrv_tp_sessions_aborted_total"].append(
        ({}, s.tp.get("aborted", 0) + s.tp.get("timeout", 0))
    )
    m["cngmrv_readings_total"].append(({}, agent.readings))
    m["cngmrv_batches_sealed_total"].append(({}, len(agent.sealed)))
    m["cngmrv_batches_uploaded_total"].append(
        ({}, agent.uploader.uploaded if agent.uploader else 0)
    )
    m["cngmrv_batches_pending"].append(({}, agent.store.counts()["batches_pending"]))
    m["cngmrv_batches_refused_total"].append(({}, agent.uploader.refused if agent.uploader else 0))
    last = agent.uploader.last_upload if agent.uploader else None
    m["cngmrv_last_upload_timestamp_seconds"].append(({}, float(last or 0)))
    m["cngmrv_queue_depth"].append(({"queue": "can"}, agent.can.pending()))
    m["cngmrv_source_counter"] = source_samples(agent.source_counters())
    path = agent.config.store_path
    m["cngmrv_store_bytes"].append(({}, store_bytes(path)))
    quota = getattr(agent.config, "store_quota_bytes", None) or 0
    m["cngmrv_store_quota_bytes"].append(({}, quota))
    m["cngmrv_disk_free_bytes"].append(({}, shutil.disk_usage(path.parent).free))
    state = agent.clock.state
    for name in CLOCK_STATES:
        m["cngmrv_clock_state"].append(({"state": name}, 1 if name == state else 0))
    m["cngmrv_clock_steps_total"].append(({}, agent.clock.steps))
    m["cngmrv_boot_epoch"].append(({}, agent.boot_epoch))
    return m


def source_samples(
    counters: dict[str, dict[str, Any]],
) -> list[tuple[dict[str, str], float]]:
    """The sources' counters (:meth:`Agent.source_counters`) as samples: a number as
    ``{source, counter}``, a table of numbers (refusals by reason) one sample per
    ``key``; text and flags are not figures and are left out."""
    out: list[tuple[dict[str, str], float]] = []

    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    for source, table in sorted(counters.items()):
        for name, value in sorted(table.items()):
            if number(value):
                out.append(({"source": source, "counter": name}, value))
            elif isinstance(value, dict):
                for key, v in sorted(value.items(), key=lambda kv: str(kv[0])):
                    if number(v):
                        out.append(({"source": source, "counter": name, "key": str(key)}, v))
    return out


def store_bytes(path: Path) -> int:
    total = 0
    for suffix in ("", "-wal", "-shm"):
        try:
            total += os.stat(f"{path}{suffix}").st_size
        except FileNotFoundError:
            pass
    return total


def render(metrics: dict[str, list[tuple[dict[str, str], float]]], age_s: float = 0.0) -> str:
    """The Prometheus text exposition format (version 0.0.4)."""
    lines: list[str] = []
    age: list[tuple[dict[str, str], float]] = [({}, age_s)]
    samples = {**metrics, "cngmrv_snapshot_age_seconds": age}
    for name, (kind, help_text) in METRICS.items():
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples.get(name, []):
            lab = ",".join(f'{k}="{escape(v)}"' for k, v in labels.items())
            text = format_number(value)
            lines.append(f"{name}{{{lab}}} {text}" if lab else f"{name} {text}")
    return "\n".join(lines) + "\n"


def escape(label: str) -> str:
    """A label value as the exposition format writes it (backslash, quote and newline escaped)."""
    return label.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def format_number(value: float) -> str:
    """A sample as the exposition writes it: integers exactly, other values by repr."""
    # Counters run past a million frames in hours; "%g" would round them to
    # six digits, and a loss count taken from two rounded counters is noise.
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def parse(text: str) -> dict[str, float]:
    """Samples of an exposition as ``'name{labels}' -> value`` (comments skipped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


class HealthServer:
    """Serves ``GET /metrics`` on 127.0.0.1:``port`` (0 = any free port, see :attr:`url`)."""

    def __init__(self, port: int, refresh_s: float = 1.0) -> None:
        """Bind the port now (so a port in use fails before the agent starts)."""
        self._agent: Agent | None = None
        self._refresh_s = refresh_s
        self._metrics: dict[str, list[tuple[dict[str, str], float]]] = {}
        self._taken = time.monotonic()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics here")
                    return
                body = server.text().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # a scrape every few seconds is not news for the journal

        self._http = ThreadingHTTPServer((HOST, port), Handler)
        self._http.daemon_threads = True
        self._thread = threading.Thread(target=self._http.serve_forever, name="health", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self._http.server_address[1]}/metrics"

    def start(self, agent: Agent) -> HealthServer:
        """Serve ``agent``'s figures, from a first snapshot taken now."""
        self._agent = agent
        self._metrics, self._taken = collect(agent), time.monotonic()
        self._thread.start()
        return self

    def refresh(self) -> None:
        """Take a new snapshot if the last is ``refresh_s`` old; call from the main loop."""
        now = time.monotonic()
        if self._agent is None or now - self._taken < self._refresh_s:
            return
        metrics = collect(self._agent)
        with self._lock:
            self._metrics, self._taken = metrics, now

    def text(self) -> str:
        with self._lock:
            metrics, taken = self._metrics, self._taken
        return render(metrics, time.monotonic() - taken)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._http.shutdown()  # waits for serve_forever, so only once it runs
        self._http.server_close()


def fetch(port: int, timeout: float = 2.0) -> dict[str, float]:
    """The samples the agent on this device serves on ``port``."""
    url = f"http://{HOST}:{port}/metrics"
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return parse(r.read().decode())


def describe(samples: dict[str, float]) -> list[str]:
    """The samples as lines for a person (``cngmrv status``)."""

    def g(key: str) -> float:
        return samples.get(key, 0.0)

    state = next(
        (s for s in CLOCK_STATES if g(f'cngmrv_clock_state{{state="{s}"}}') == 1), "unknown"
    )
    last = g("cngmrv_last_upload_timestamp_seconds")
    quota = g("cngmrv_store_quota_bytes")
    return [
        f"boot epoch      {g('cngmrv_boot_epoch'):.0f}",
        f"clock           {state} ({g('cngmrv_clock_steps_total'):.0f} steps)",
        "frames          can {:.0f} received, {:.0f} dropped; kit {:.0f} received, {:.0f} dropped".format(
            g('cngmrv_frames_received_total{source="can"}'),
            g('cngmrv_frames_dropped_total{source="can"}'),
            g('cngmrv_frames_received_total{source="kit"}'),
            g('cngmrv_frames_dropped_total{source="kit"}'),
        ),
        f"errors          decode {g('cngmrv_decode_errors_total'):.0f}, "
        f"TP aborted {g('cngmrv_tp_sessions_aborted_total'):.0f}, "
        f"engine address contests {g('cngmrv_engine_address_contests_total'):.0f}, "
        f"kit CRC {g('cngmrv_kit_crc_errors_total'):.0f}",
        "sources         " + _sources_line(samples),
        f"readings        {g('cngmrv_readings_total'):.0f}",
        f"batches         {g('cngmrv_batches_sealed_total'):.0f} sealed, "
        f"{g('cngmrv_batches_uploaded_total'):.0f} uploaded, "
        f"{g('cngmrv_batches_pending'):.0f} pending",
        f"queue           can {g(CAN_QUEUE):.0f}",
        f"store           {g('cngmrv_store_bytes') / 1e6:.1f} MB"
        + (f" of {quota / 1e6:.1f} MB quota" if quota else " (no quota)")
        + f", {g('cngmrv_disk_free_bytes') / 1e6:.0f} MB free",
        "last upload     "
        + (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last)) if last else "never"),
        f"snapshot age    {g('cngmrv_snapshot_age_seconds'):.1f} s",
        *_counter_lines(samples),
    ]


_COUNTER = re.compile(r'cngmrv_source_counter\{source="([^"]*)",counter="([^"]*)"\}')


def _counter_lines(samples: dict[str, float]) -> list[str]:
    """Each source's own counters (those kept per key left to the metrics), one line a source."""
    by_source: dict[str, list[str]] = {}
    for key, value in samples.items():
        m = _COUNTER.fullmatch(key)
        if m:
            by_source.setdefault(m[1], []).append(f"{m[2]} {format_number(value)}")
    return [f"{'source ' + name:<15} {', '.join(parts)}" for name, parts in by_source.items()]


def _sources_line(samples: dict[str, float]) -> str:
    """Each signal's source address, and the frames other senders sent of it."""
    parts = []
    for signal in SIGNALS:
        address = samples.get(f'cngmrv_signal_source_address{{signal="{signal}"}}')
        if address is None:
            continue
        where = "none" if address < 0 else f"SA {address:.0f}"
        other = samples.get(f'cngmrv_signal_foreign_frames_total{{signal="{signal}"}}', 0.0)
        parts.append(f"{signal} {where}" + (f" ({other:.0f} from others)" if other else ""))
    return ", ".join(parts) or "unknown"
