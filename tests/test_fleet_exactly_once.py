"""Exactly once across ingest servers: three `cngmrv ingest` processes on one PostgreSQL.

Every batch goes to every server at once, twice (duplicates racing each
other), in shuffled order; a gap is left, then backfilled out of order; a
forged batch races too.  The same posts, one at a time into one ingest on
SQLite, give the reference the servers must match.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_report import DAY0, STEP, reading

from cngmrv.office.fleetdb import IngestDB
from cngmrv.office.ingest import Ingest, register_device
from cngmrv.signed import batch, keys

DEVICES = 4
BATCHES = 30
GAP = range(10, 15)  # held back, then backfilled newest first
SERVERS = 3


def _chains(tmp: Path) -> tuple[dict[str, bytes], dict[str, list[bytes]], list[bytes]]:
    pubs, chains, forged = {}, {}, []
    for d in range(DEVICES):
        dev = f"bus-{d:02d}"
        kdir = tmp / dev
        keys.generate(kdir)
        signer = keys.load_signer(kdir / keys.KEY_FILE)
        pubs[dev] = (kdir / keys.PUB_FILE).read_bytes()
        prev, chain = batch.ZERO_HASH, []
        for seq in range(BATCHES):
            rs = [reading(DAY0 + (seq * 10 + i) * STEP, gas_kg=0.05 + d * 0.01) for i in range(10)]
            raw = batch.build(signer, dev, seq, prev, {"readings": rs})
            chain.append(raw)
            prev = batch.chain_id(raw)
            if seq == 5 and d == 0:
                # The device's own key, another content for a stored sequence: a tamper alarm.
                forged.append(
                    batch.build(signer, dev, seq, batch.chain_id(chain[-2]), {"readings": rs[:3]})
                )
        chains[dev] = chain
    return pubs, chains, forged


def _post(url: str, raw: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=raw, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def servers(pg_url: str, tmp_path: Path) -> Iterator[list[str]]:
    procs, urls, logs = [], [], []
    try:
        for i in range(SERVERS):
            port = _free_port()
            log = (tmp_path / f"ingest-{i}.log").open("w")
            logs.append(log)
            p = subprocess.Popen(
                [sys.executable, "-m", "cngmrv.agent.cli", "ingest", "--db", pg_url]
                + ["--port", str(port), "--workers", "1"],
                stderr=log,
                text=True,
            )
            procs.append(p)
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(base + "/v1/health", timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                assert p.poll() is None, (tmp_path / f"ingest-{i}.log").read_text()
                assert time.monotonic() < deadline, "the ingest server did not start in 60 s"
                time.sleep(0.1)
            urls.append(base + "/v1/batches")
        yield urls
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
        for log in logs:
            log.close()


def _phases(chains: dict[str, list[bytes]], forged: list[bytes]) -> list[list[bytes]]:
    rng = random.Random(14)
    first = [raw for ch in chains.values() for s, raw in enumerate(ch) if s not in GAP]
    rng.shuffle(first)
    backfill = [ch[s] for ch in chains.values() for s in reversed(GAP)]
    return [first, forged, backfill]


def test_every_batch_once_gaps_closed_alarms_as_on_one_server(
    tmp_path: Path, pg_url: str, servers: list[str]
) -> None:
    pubs, chains, forged = _chains(tmp_path)
    db = IngestDB(pg_url)
    for dev, pem in pubs.items():
        register_device(db, dev, pem)
    phases = _phases(chains, forged)
    statuses: Counter[int] = Counter()
    codes: Counter[str] = Counter()
    gaps_after: list[list[tuple]] = []
    with ThreadPoolExecutor(max_workers=24) as pool:
        for posts in phases:
            # Each batch to every server, twice: six copies racing one another.
            jobs = [(url, raw) for raw in posts for url in servers for _ in range(2)]
            for status, body in pool.map(lambda j: _post(*j), jobs):
                statuses[status] += 1
                codes[str(body.get("status") or body.get("error"))] += 1
            gaps_after.append(
                [tuple(r) for r in db.all("SELECT device_id, first_seq, last_seq FROM gaps")]
            )
    n = DEVICES * BATCHES
    assert statuses[500] == 0 and set(statuses) <= {200, 201, 409}, statuses
    assert codes["stored"] == n, (codes, statuses)  # one 201 per batch, whichever server won
    assert codes["duplicate"] == n * SERVERS * 2 - n
    stored = db.all("SELECT device_id, seq, sha256 FROM batches")
    assert len(stored) == n and len({(d, s) for d, s, _ in stored}) == n
    held = {(d, int(s)): bytes(h) for d, s, h in stored}
    for dev, chain in chains.items():
        assert [held[(dev, s)] for s in range(BATCHES)] == [batch.sha256(r) for r in chain]
    # The gap is recorded, exactly, once every later batch is in; the backfill closes it.
    assert sorted(gaps_after[0]) == [(dev, GAP[0], GAP[-1]) for dev in sorted(chains)]
    assert gaps_after[-1] == []
    # Every batch's per-batch sums are stored once, with it.
    assert db.one("SELECT count(DISTINCT device_id || ':' || seq) FROM batch_runs")[0] == n
    alarms = Counter(
        (d, int(s), k) for d, s, k in db.all("SELECT device_id, seq, kind FROM alarms")
    )
    db.close()

    # The reference: the same posts, one at a time, into one ingest on SQLite.
    ref_db = IngestDB(tmp_path / "reference.sqlite")
    for dev, pem in pubs.items():
        register_device(ref_db, dev, pem)
    ref = Ingest(ref_db)
    ref_codes: Counter[str] = Counter()
    for posts in phases:
        for raw in posts:
            for _ in range(SERVERS * 2):
                status, body = ref.accept(raw)
                ref_codes[str(body.get("status") or body.get("error"))] += 1
    ref_alarms = Counter(
        (d, int(s), k) for d, s, k in ref_db.all("SELECT device_id, seq, kind FROM alarms")
    )
    ref_db.close()
    assert alarms == ref_alarms and alarms
    assert codes == ref_codes
    print(f"exactly-once counts: {dict(codes)}, alarms {sum(alarms.values())}")
