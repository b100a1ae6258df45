"""The production ingest on PostgreSQL under a national fleet's load (docs/office.md).

Makes a fleet's signed batches with the project's own code (batch.build: 60
one-second readings a batch, each device its own key and chain), starts
``cngmrv ingest`` (uvicorn, worker processes) on a throwaway PostgreSQL
cluster (:mod:`cngmrv.sim.pg_cluster`, the tests' own, here with durable
commits), posts everything over HTTP and prints one JSON object:

- ``devices``, ``batches`` (distinct batches stored), ``posts`` (with duplicates);
- ``stored_per_s``: distinct batches stored per second in the full-speed phase;
- ``p50_ms``, ``p99_ms``: latency at a steady ``--paced-rate`` (167/s: 10,000
  buses at one batch a minute), measured from each post's scheduled time;
- ``verify_ceiling_per_s``: parse and ECDSA-verify of the same batches, in as
  many processes as the server has workers, without HTTP or a database;
- ``db_ceiling_per_s``: the same rows inserted straight into the same
  PostgreSQL, one transaction each, from as many connections as the server
  holds, without HTTP or verification;
- ``duplicates_stored`` (must be 0), ``report_s``: ``cngmrv report --db URL
  --json`` over everything loaded, run as a user runs it (a fresh process,
  imports included); null with ``report_error`` when it fails; ``report_cpu_s``
  the CPU seconds it took (on a busy machine, less than its wall time);
- ``load_avg``: the machine's 1-minute load average at the end of each phase
  (the machine is shared: the figures are only as quiet as it was);
- ``cpu_ms_per_batch``: CPU milliseconds each distinct batch cost in the
  full-speed phase, by process (ingest server, PostgreSQL when it runs on this
  machine, the posting client) and in total: unlike the rates, it hardly
  depends on what else the machine runs, and ``cores / total`` bounds
  ``stored_per_s``.

The load: regular devices post one batch a minute, minute by minute; a share
of them lose a batch's order (a gap, closed by the late batch); some devices
backfill a day they spent offline (1,440 batches in order, interleaved with
the live traffic); a share of posts are repeats of a batch already answered
(a lost acknowledgement).  Generating takes minutes (encoding 60 readings is
most of it), so the batches are cached under ``--cache`` keyed by the
parameters and the batch format's source.

    .venv/bin/python bench/fleet_ingest.py --json [--devices 10000] [--batches 200000]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import inspect
import json
import math
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
from cryptography.hazmat.primitives.asymmetric import ec

from cngmrv.signed import batch, keys
from cngmrv.sim.agent_process import free_tcp_port

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z: the fleet's first reading


# -- the load --------------------------------------------------------------------------


PROFILES = 64  # route profiles: the buses of one profile drive the same minute alike


def _readings(profile: int, minute: int) -> list[dict[str, Any]]:
    """One minute of one-second readings shaped like the pipeline's, by route profile and minute."""
    out = []
    for i in range(60):
        phase = (profile * 7 + minute * 60 + i) / 90.0
        speed = max(0.0, 8.0 + 7.0 * math.sin(phase))  # m/s, a BRT's stop-and-go
        dual = speed > 2.0
        out.append(
            {
                "t0": T0 + minute * 60 + i,
                "dur": 1.0,
                "epoch": 1,
                "clock": "synchronised",
                "diesel_l": round(0.0009 + 0.00008 * speed * (0.4 if dual else 1.0), 7),
                "gas_kg": round(0.00005 * speed if dual else 0.0, 7),
                "distance_km": round(speed / 1000.0, 6),
                "cov": {"diesel_l": 1.0, "gas_kg": 1.0, "distance_km": 1.0},
                "mode_s": {
                    "diesel": 0.0 if dual else 1.0,
                    "dual": 1.0 if dual else 0.0,
                    "fault": 0.0,
                },
            }
        )
    return out


def _chain_id(raw: bytes) -> bytes:
    # What the next batch's prev_hash must hold (the format's rule, signed/batch.py).
    return batch.chain_id(raw)


def _encode_once() -> None:
    """Encode each minute's readings once for all the buses of a profile (generation only).

    Encoding 60 readings is 85 % of building a batch; the buses of one profile
    share a minute's readings, so batch.build's encoding is remembered for the
    readings it saw last (by the identity of their first row, held alive by the
    caller).  The bytes are exactly what batch.build makes for those readings.
    """
    encode = batch.encode_readings
    last: list[Any] = [None, None]

    def remembered(rows: Any) -> dict[str, Any]:
        if not rows or rows[0] is not last[0]:
            last[:] = [rows[0] if rows else None, encode(rows)]
        return last[1]  # type: ignore[no-any-return]

    batch.encode_readings = remembered  # type: ignore[assignment]


def _make_devices(job: tuple[list[tuple[int, int]], int]) -> bytes:
    """Keys and chains of one profile's devices: [(device_id, pubkey_pem, [raw, ...]), ...]."""
    devices, profile = job
    _encode_once()
    signers = [keys.FileSigner(ec.generate_private_key(ec.SECP256R1())) for _ in devices]
    chains: list[list[bytes]] = [[] for _ in devices]
    prevs = [batch.ZERO_HASH] * len(devices)
    for minute in range(max((n for _, n in devices), default=0)):
        rows = _readings(profile, minute)
        for k, (index, n) in enumerate(devices):
            if minute >= n:
                continue
            raw = batch.build(
                signers[k],
                f"bus-{index:05d}",
                minute,
                prevs[k],
                {"readings": rows, "events": []},
                {"first_reading_seq": minute * 60, "boot_epoch": 1},
            )
            chains[k].append(raw)
            prevs[k] = _chain_id(raw)
    out = [
        (f"bus-{index:05d}", signers[k].public_pem(), chains[k])
        for k, (index, _) in enumerate(devices)
    ]
    return msgpack.packb(out, use_bin_type=True)


def _cache_key(args: argparse.Namespace) -> str:
    h = hashlib.sha256()
    for name in ("batch.py", "keys.py"):
        h.update((ROOT / "signed" / name).read_bytes())
    # The code that makes the batches, not this file: editing the rest keeps the cache.
    for fn in (_readings, _encode_once, _make_devices, _plan_lengths):
        h.update(inspect.getsource(fn).encode())
    h.update(repr((args.devices, args.batches, args.backfill_devices, args.backfill)).encode())
    return h.hexdigest()[:16]


def _plan_lengths(args: argparse.Namespace) -> list[int]:
    """Batches per device: regular devices share what the backfilling ones leave, plus one paced."""
    regular = args.devices - args.backfill_devices
    per = -(
        -(args.batches - args.backfill_devices * args.backfill) // regular
    )  # at least --batches
    return [args.backfill] * args.backfill_devices + [per + 1] * regular


def load_fleet(args: argparse.Namespace) -> list[tuple[str, bytes, list[bytes]]]:
    cache = Path(args.cache) / f"fleet-{_cache_key(args)}.msgpack"
    if cache.exists():
        with cache.open("rb") as f:
            return [tuple(d) for d in msgpack.unpackb(f.read(), raw=False)]  # type: ignore[misc]
    lengths = _plan_lengths(args)
    jobs = [
        ([(i, n) for i, n in enumerate(lengths) if i % PROFILES == p], p)
        for p in range(min(PROFILES, len(lengths)))
    ]
    start = time.monotonic()
    fleet: list[Any] = []
    with multiprocessing.Pool(args.gen_procs) as pool:
        for part in pool.imap(_make_devices, jobs):
            fleet.extend(msgpack.unpackb(part, raw=False))
    fleet.sort(key=lambda d: d[0])
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_bytes(msgpack.packb(fleet, use_bin_type=True))
    tmp.replace(cache)
    print(
        f"generated {sum(len(c) for _, _, c in fleet)} batches in {time.monotonic() - start:.0f} s",
        file=sys.stderr,
    )
    return [tuple(d) for d in fleet]  # type: ignore[misc]


# -- the plan --------------------------------------------------------------------------


def plan(
    fleet: list[tuple[str, bytes, list[bytes]]], args: argparse.Namespace
) -> tuple[list[bytes], list[bytes]]:
    """(full-speed posts in order, paced posts): minute by minute, with gaps, backfills, repeats."""
    rng = random.Random(7)
    backfill = fleet[: args.backfill_devices]
    regular = fleet[args.backfill_devices :]
    minutes = len(regular[0][2]) - 1 if regular else 0
    live: list[bytes] = []
    late: dict[int, list[bytes]] = {}
    for m in range(minutes):
        for _, _, chain in regular:
            if m + 1 < minutes and rng.random() < args.reorder_share:
                late.setdefault(m + 1, []).append(chain[m])  # after its successor: a gap, closed
                continue
            live.append(chain[m])
        live.extend(late.pop(m, []))
    # The backfills spread evenly through the live traffic, each in its own order.
    streams = [chain for _, _, chain in backfill]
    total = len(live) + sum(len(s) for s in streams)
    merged: list[bytes] = []
    cursors = [0] * len(streams)
    step = max(1, total // max(1, sum(len(s) for s in streams)))
    for i, raw in enumerate(live):
        merged.append(raw)
        if i % step == 0:
            for k, s in enumerate(streams):
                if cursors[k] < len(s):
                    merged.append(s[cursors[k]])
                    cursors[k] += 1
    for k, s in enumerate(streams):
        merged.extend(s[cursors[k] :])
    # Repeats: a batch already answered comes again (its acknowledgement was lost).
    posts: list[bytes] = []
    for i, raw in enumerate(merged):
        posts.append(raw)
        if i > 500 and rng.random() < args.duplicate_share:
            posts.append(merged[rng.randrange(0, i - 400)])
    paced = [chain[minutes] for _, _, chain in regular]
    return posts, paced


# -- PostgreSQL --------------------------------------------------------------------------


@contextmanager
def throwaway_cluster() -> Iterator[str]:
    """The tests' throwaway cluster (cngmrv.sim.pg_cluster), durable as a production one; its URL.

    Unlike the tests' cluster, commits are flushed to disk (fsync, synchronous
    commit): the database pays what a production server pays.
    """
    from cngmrv.sim import pg_cluster

    why = pg_cluster.unavailable()
    if why is not None:
        sys.exit(why)
    with pg_cluster.Cluster(durable=True, settings={"shared_buffers": "256MB"}) as cluster:
        yield cluster.new_database()


# -- the ceilings ----------------------------------------------------------------------


def _verify_part(job: tuple[list[bytes], dict[str, bytes]]) -> int:
    raws, pems = job
    pubs = {dev: keys.public_key_from_pem(pem) for dev, pem in pems.items()}
    bad = 0
    for raw in raws:
        b = batch.parse(raw)
        bad += bool(batch.check(b, pubs[b.device_id]))
    return bad


def verify_ceiling(sample: list[bytes], pems: dict[str, bytes], procs: int) -> float:
    parts = [sample[i::procs] for i in range(procs)]
    jobs = [
        (p, {batch.parse(r).device_id: pems[batch.parse(r).device_id] for r in p}) for p in parts
    ]
    with multiprocessing.Pool(procs) as pool:
        start = time.perf_counter()
        bad = sum(pool.map(_verify_part, jobs))
        took = time.perf_counter() - start
    assert bad == 0, f"{bad} batches failed to verify"
    return len(sample) / took


def db_ceiling(url: str, sample: list[bytes], connections: int) -> float:
    import psycopg

    with psycopg.connect(url, autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS bench_rows")
        c.execute("CREATE TABLE bench_rows (LIKE batches INCLUDING ALL)")
    rows = []
    for raw in sample:
        b = batch.parse(raw)
        rows.append((b.device_id, b.seq, batch.sha256(raw), b.header["prev_hash"], raw))

    def insert(part: list[tuple[Any, ...]]) -> None:
        with psycopg.connect(url, autocommit=True) as c:
            for row in part:
                c.execute(
                    "INSERT INTO bench_rows(device_id, seq, sha256, prev_hash, bytes, received_at) "
                    "VALUES(%s, %s, %s, %s, %s, %s)",
                    (*row, time.time()),
                )

    parts = [rows[i::connections] for i in range(connections)]
    start = time.perf_counter()
    with ThreadPoolExecutor(connections) as ex:
        list(ex.map(insert, parts))
    took = time.perf_counter() - start
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("DROP TABLE bench_rows")
    return len(rows) / took


# -- posting ---------------------------------------------------------------------------


class Poster:
    """Keep-alive HTTP posts from a thread pool; counts answers, retries 503 and lost connections."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._local = threading.local()
        self.statuses: Counter[int] = Counter()
        self.retries = 0
        self._lock = threading.Lock()

    def post(self, raw: bytes) -> int:
        for _attempt in range(100):
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = http.client.HTTPConnection(
                    "127.0.0.1", self.port, timeout=60
                )
            try:
                conn.request(
                    "POST",
                    "/v1/batches",
                    raw,
                    {"Content-Type": "application/vnd.cngmrv.batch+msgpack"},
                )
                resp = conn.getresponse()
                resp.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                self._local.conn = None
                with self._lock:
                    self.retries += 1
                continue
            if resp.status == 503:
                with self._lock:
                    self.retries += 1
                time.sleep(float(resp.getheader("Retry-After") or 1))
                continue
            with self._lock:
                self.statuses[resp.status] += 1
            return resp.status
        raise RuntimeError("a batch could not be posted in 100 attempts")


def full_speed(poster: Poster, posts: list[bytes], clients: int) -> tuple[float, list[float]]:
    latencies: list[float] = []

    def one(raw: bytes) -> None:
        t = time.perf_counter()
        poster.post(raw)
        latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        for _ in ex.map(one, posts, chunksize=64):
            pass
    return time.perf_counter() - start, latencies


def paced(poster: Poster, posts: list[bytes], rate: float, clients: int) -> list[float]:
    """Post at a steady rate; each latency counts from the post's scheduled time."""
    latencies: list[float] = []
    start = time.perf_counter() + 0.1

    def one(i: int) -> None:
        due = start + i / rate
        time.sleep(max(0.0, due - time.perf_counter()))
        poster.post(posts[i])
        latencies.append(time.perf_counter() - due)

    with ThreadPoolExecutor(clients) as ex:
        list(ex.map(one, range(len(posts))))
    return latencies


def _pct(values: list[float], q: float) -> float:
    return (
        statistics.quantiles(values, n=1000)[int(q * 1000) - 1] * 1000 if len(values) > 1 else 0.0
    )


# -- the run ---------------------------------------------------------------------------


def _tree_cpu_s(root: int | None) -> float | None:
    """CPU seconds (user + system) of a process and its descendants, living or reaped; None
    without /proc."""
    if root is None:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        parent[int(entry.name)] = int(fields[1])
        # Its own time and its exited children's (a database's ended backends).
        cpu[int(entry.name)] = sum(int(f) for f in fields[11:15]) / tick
    if root not in cpu:
        return None
    tree, grew = {root}, True
    while grew:
        kids = {pid for pid, pp in parent.items() if pp in tree} - tree
        tree |= kids
        grew = bool(kids)
    return sum(cpu[p] for p in tree)


def _postmaster(url: str) -> int | None:
    # The server's main process, when it runs on this machine: a backend's parent.
    import psycopg

    with psycopg.connect(url, autocommit=True) as c:
        row = c.execute("SELECT pg_backend_pid()").fetchone()
        if row is None:
            return None
        try:
            stat = Path(f"/proc/{row[0]}/stat").read_text()
        except OSError:
            return None
    return int(stat[stat.rfind(")") + 2 :].split()[1])


def _cpu_of(ingest: int, postmaster: int | None) -> dict[str, float | None]:
    return {
        "ingest": _tree_cpu_s(ingest),
        "postgres": _tree_cpu_s(postmaster),
        "client": time.process_time(),  # this process: the posting threads
    }


def _per_batch_ms(
    before: dict[str, float | None], after: dict[str, float | None], n: int
) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for k, a in after.items():
        b = before[k]
        out[k] = None if a is None or b is None else round((a - b) / n * 1000, 3)
    known = [v for v in out.values() if v is not None]
    out["total"] = round(sum(known), 3) if known else None
    return out


def _load_avg() -> float:
    return round(os.getloadavg()[0], 1)


def fleet_report(url: str) -> tuple[subprocess.CompletedProcess[str], float, float]:
    """``cngmrv report --db URL --json`` over everything loaded, as a user runs it; its
    seconds, wall and CPU (the report's process, user + system)."""
    import resource

    def children_cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    start, cpu = time.perf_counter(), children_cpu()
    rep = subprocess.run(
        [sys.executable, "-m", "cngmrv.agent.cli", "report", "--db", url, "--json"],
        capture_output=True,
        text=True,
    )
    return rep, time.perf_counter() - start, children_cpu() - cpu


def _report_buses(stdout: str) -> int | None:
    # How many buses the report covers: a check that it read the whole fleet.
    try:
        data = json.loads(stdout)
    except ValueError:
        return None
    buses = data.get("buses") if isinstance(data, dict) else None
    return len(buses) if isinstance(buses, list | dict) else None


def start_ingest(url: str, workers: int, pool: int) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = free_tcp_port()
    log = Path(tempfile.mkstemp(prefix="cngmrv-bench-ingest-", suffix=".log")[1])
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cngmrv.agent.cli",
            "ingest",
            "--db",
            url,
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--pool",
            str(pool),
        ],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    deadline = time.monotonic() + 120
    pids: set[int] = set()
    while len(pids) < workers:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            sys.exit(f"the ingest did not start: {log.read_text()[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/v1/health")
            resp = conn.getresponse()
            if resp.status == 200:
                pids.add(json.loads(resp.read())["pid"])
            conn.close()
        except OSError:
            pass
        time.sleep(0.1)
    return proc, port, log


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--batches", type=int, default=200_000, help="full-speed batches (distinct)")
    ap.add_argument("--backfill-devices", type=int, default=10)
    ap.add_argument("--backfill", type=int, default=1440, help="batches a backfilling device sends")
    ap.add_argument("--reorder-share", type=float, default=0.01)
    ap.add_argument("--duplicate-share", type=float, default=0.05)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--pool", type=int, default=4, help="database connections per worker")
    ap.add_argument("--clients", type=int, default=16, help="concurrent client connections")
    ap.add_argument("--paced-rate", type=float, default=167.0)
    ap.add_argument("--paced-s", type=float, default=60.0)
    ap.add_argument("--sample", type=int, default=20_000, help="batches for each ceiling")
    ap.add_argument("--pg-url", help="use this PostgreSQL database instead of a throwaway cluster")
    ap.add_argument(
        "--cache",
        default=str(
            Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cngmrv-bench"
        ),
    )
    ap.add_argument("--gen-procs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--generate-only", action="store_true", help="fill the cache, then exit")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    wall0 = time.monotonic()
    fleet = load_fleet(args)
    if args.generate_only:
        return
    posts, paced_posts = plan(fleet, args)
    paced_posts = paced_posts[: int(args.paced_rate * args.paced_s)]
    distinct = list({batch.sha256(r): r for r in posts}.values())
    pems = {dev: pem for dev, pem, _ in fleet}
    sample = random.Random(3).sample(distinct, min(args.sample, len(distinct)))

    cluster = throwaway_cluster() if args.pg_url is None else _given(args.pg_url)
    with cluster as url:
        from cngmrv.office.ingest import open_db, register_device

        db = open_db(url)
        for dev, pem, _ in fleet:
            register_device(db, dev, pem)
        load: dict[str, float] = {"start": _load_avg()}
        proc, port, log = start_ingest(url, args.workers, args.pool)
        postmaster = _postmaster(url)
        try:
            poster = Poster(port)
            cpu0 = _cpu_of(proc.pid, postmaster)
            took, fast_lat = full_speed(poster, posts, args.clients)
            cpu_ms = _per_batch_ms(cpu0, _cpu_of(proc.pid, postmaster), len(distinct))
            load["full_speed"] = _load_avg()
            fast_201 = poster.statuses[201]
            paced_lat = paced(poster, paced_posts, args.paced_rate, args.clients)
            load["paced"] = _load_avg()
        finally:
            proc.terminate()
            proc.wait(60)
        (rows,) = db.one("SELECT count(*) FROM batches")
        (gaps,) = db.one("SELECT count(*) FROM gaps")
        (alarms,) = db.one("SELECT count(*) FROM alarms")
        db.close()
        rep, report_s, report_cpu_s = fleet_report(url)
        load["report"] = _load_avg()
        verify = verify_ceiling(sample, pems, args.workers)
        db_ceiling_per_s = db_ceiling(url, sample, args.workers * args.pool)
        load["ceilings"] = _load_avg()

    unique = len(distinct) + len(paced_posts)
    out = {
        "devices": len(fleet),
        "batches": unique,
        "posts": len(posts) + len(paced_posts),
        "stored_per_s": round(len(distinct) / took, 1),
        "p50_ms": round(_pct(paced_lat, 0.5), 1),
        "p99_ms": round(_pct(paced_lat, 0.99), 1),
        "verify_ceiling_per_s": round(verify, 1),
        "db_ceiling_per_s": round(db_ceiling_per_s, 1),
        "duplicates_stored": max(0, rows - unique) + max(0, poster.statuses[201] - unique),
        "report_s": round(report_s, 2) if rep.returncode == 0 else None,
        "report_buses": _report_buses(rep.stdout) if rep.returncode == 0 else None,
        "report_cpu_s": round(report_cpu_s, 2),
        "stored_share_of_smaller_ceiling": round(
            len(distinct) / took / min(verify, db_ceiling_per_s), 3
        ),
        "full_speed_s": round(took, 1),
        # CPU milliseconds per distinct batch stored in the full-speed phase, by process:
        # what the machine's cores pay for each batch (the floor of stored_per_s).
        "cpu_ms_per_batch": cpu_ms,
        "full_speed_p50_ms": round(_pct(fast_lat, 0.5), 1),
        "full_speed_p99_ms": round(_pct(fast_lat, 0.99), 1),
        "paced_rate_per_s": args.paced_rate,
        "paced_posts": len(paced_posts),
        "answers": {str(k): v for k, v in sorted(poster.statuses.items())},
        "answers_201_full_speed": fast_201,
        "retries": poster.retries,
        "rows_stored": rows,
        "open_gaps": gaps,
        "alarms": alarms,
        "workers": args.workers,
        "pool": args.pool,
        "clients": args.clients,
        "cpus": os.cpu_count(),
        # The machine's 1-minute load average at the end of each phase (shared with other work).
        "load_avg": load,
        "wall_s": round(time.monotonic() - wall0, 1),
    }
    if rep.returncode != 0:
        out["report_error"] = (rep.stderr.strip().splitlines() or ["?"])[-1][:300]
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>34}: {v}")


@contextmanager
def _given(url: str) -> Iterator[str]:
    yield url


if __name__ == "__main__":
    main()
