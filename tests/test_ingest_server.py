"""The production ingest server (``cngmrv ingest``: uvicorn, worker processes) started as a user would.

Slow clients, huge bodies, connection floods, metrics summed over workers, and
back-pressure: every loop here is bounded and talks to 127.0.0.1 only.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cngmrv.agent.http_transport import post_batch
from cngmrv.agent.store import Store
from cngmrv.agent.upload import Uploader
from cngmrv.office.ingest import open_db, register_device, stored_batches
from cngmrv.office.ingest_app import MAX_BODY
from cngmrv.signed import batch, keys
from cngmrv.sim import pg_cluster
from cngmrv.sim.agent_process import free_tcp_port

DEADLINE_S = 2.0


class IngestProcess:
    """A ``cngmrv ingest`` process; ``url`` is where to POST batches."""

    def __init__(
        self, db: Path | str, *args: str, workers: int = 2, log: Path | None = None
    ) -> None:
        self.port = free_tcp_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.base}/v1/batches"
        self.db = db
        self.log = log or Path(db).with_suffix(".log")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cngmrv.agent.cli",
                "ingest",
                "--db",
                str(db),
                "--port",
                str(self.port),
                "--workers",
                str(workers),
                *args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("wb"),
        )
        deadline = time.monotonic() + 60
        while self.get("/v1/health")[0] != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the ingest did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)
        # Every worker up: each answers health with its pid.
        self.pids: set[int] = set()
        while len(self.pids) < workers:
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"only workers {self.pids} started: {self.log.read_text()[-2000:]}")
            status, body = self.get("/v1/health")
            if status == 200:
                self.pids.add(json.loads(body)["pid"])
            time.sleep(0.05)

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        except OSError:
            return 0, b""
        finally:
            conn.close()

    def health(self) -> dict:
        status, body = self.get("/v1/health")
        assert status == 200, body
        return json.loads(body)

    def metric(self, name: str) -> float:
        status, body = self.get("/metrics")
        assert status == 200
        found = re.search(rb"^" + re.escape(name.encode()) + rb" (\S+)$", body, re.M)
        assert found, body.decode()
        return float(found.group(1))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _proc_status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def _chain(signer: keys.FileSigner, device: str, n: int) -> list[bytes]:
    out, prev = [], batch.ZERO_HASH
    for seq in range(n):
        raw = batch.build(signer, device, seq, prev, {"readings": [{"t0": float(seq)}]})
        out.append(raw)
        prev = batch.chain_id(raw)
    return out


@pytest.fixture
def db(tmp_path: Path, keydir: Path) -> Path:
    path = tmp_path / "ingest.sqlite"
    database = open_db(path)
    register_device(database, "bus-7", (keydir / keys.PUB_FILE).read_bytes())
    database.close()
    return path


@pytest.fixture
def one_worker(db: Path) -> Iterator[IngestProcess]:
    srv = IngestProcess(
        db, "--request-deadline", str(DEADLINE_S), "--max-connections", "200", workers=1
    )
    yield srv
    srv.stop()


def _read_all(sock: socket.socket, limit_s: float) -> bytes:
    sock.settimeout(limit_s)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except OSError:
        pass
    return b"".join(chunks)


def test_a_client_sending_one_byte_at_a_time_is_cut_off_at_the_request_deadline(
    one_worker: IngestProcess, signer: keys.FileSigner
) -> None:
    # Each byte comes well within any per-read timeout; only a deadline on the
    # whole request ends it.  The headers alone would take 0.3 s x 60 = 18 s.
    request = b"POST /v1/batches HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 400\r\n\r\n"
    with socket.create_connection(("127.0.0.1", one_worker.port)) as s:
        start = time.monotonic()
        closed_after = None
        for byte in request:
            try:
                s.sendall(bytes([byte]))
            except OSError:
                closed_after = time.monotonic() - start
                break
            s.settimeout(0.3)
            try:
                if s.recv(1) == b"":
                    closed_after = time.monotonic() - start
                    break
            except TimeoutError:
                pass
        assert closed_after is not None, "the server let a trickling client finish its request"
        assert DEADLINE_S - 0.5 < closed_after < DEADLINE_S + 3
    # The body's bytes count too: headers at once, then a byte every 0.3 s.
    raw = _chain(signer, "bus-7", 1)[0]
    head = b"POST /v1/batches HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(raw)
    with socket.create_connection(("127.0.0.1", one_worker.port)) as s:
        s.sendall(head)
        start = time.monotonic()
        answer = b""
        for byte in raw:
            try:
                s.sendall(bytes([byte]))
            except OSError:
                break
            s.settimeout(0.3)
            try:
                answer = s.recv(100)
                if answer == b"":
                    break
            except TimeoutError:
                pass
        assert answer == b"" and time.monotonic() - start < DEADLINE_S + 3
    assert one_worker.health()["db"] == "ok"
    assert stored_batches(open_db(one_worker.db), "bus-7") == []


def test_a_connection_flood_is_capped_and_costs_no_thread_per_connection(
    one_worker: IngestProcess,
) -> None:
    pid = one_worker.proc.pid  # one worker: uvicorn serves in the process itself
    threads_before = _proc_status(pid, "Threads")
    socks = [socket.create_connection(("127.0.0.1", one_worker.port)) for _ in range(300)]
    try:
        time.sleep(0.5)
        threads_held = _proc_status(pid, "Threads")
        answers = [_read_all(s, DEADLINE_S + 4) for s in socks]
    finally:
        for s in socks:
            s.close()
    busy = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
    # 200 held (each closed at the deadline without an answer), the rest refused at once.
    assert len(busy) >= 95, len(busy)
    assert all(b"retry-after:" in a.lower() for a in busy)
    assert sum(a == b"" for a in answers) >= 195
    assert threads_held <= threads_before + 2, (threads_before, threads_held)
    start = time.monotonic()
    assert one_worker.health()["status"] == "ok"
    assert time.monotonic() - start < 1.0


def test_huge_bodies_are_refused_unread_and_cost_no_memory(one_worker: IngestProcess) -> None:
    pid = one_worker.proc.pid
    rss_before = _proc_status(pid, "VmRSS")
    # Four 16 MB posts at once (an unbounded unpack's memory blow-up: ~1.3 GB each before).
    bomb = b"\xdd" + (16 * 1024 * 1024 // 1).to_bytes(4, "big") + b"\x80" * (16 * 1024 * 1024)
    statuses: list[bytes] = []

    def post() -> None:
        with socket.create_connection(("127.0.0.1", one_worker.port)) as s:
            s.sendall(
                b"POST /v1/batches HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(bomb)
            )
            try:
                s.sendall(bomb)
            except OSError:
                pass  # refused and closed before the body was read: the point
            statuses.append(_read_all(s, 10)[:12])

    threads = [threading.Thread(target=post) for _ in range(4)]
    for t in threads:
        t.start()
    health_s = []
    for _ in range(5):
        start = time.monotonic()
        assert one_worker.health()["status"] == "ok"
        health_s.append(time.monotonic() - start)
    for t in threads:
        t.join(30)
    assert all(s in (b"HTTP/1.1 413", b"") for s in statuses), statuses
    assert max(health_s) < 1.0, health_s
    assert _proc_status(pid, "VmRSS") - rss_before < 30_000  # kB
    # At the limit itself: a body of empty maps is refused as malformed, quickly.
    n = MAX_BODY - 5
    empties = b"\xdd" + n.to_bytes(4, "big") + b"\x80" * n
    start = time.monotonic()
    out = post_batch(one_worker.url, empties)
    assert out.status == 400, out
    assert time.monotonic() - start < 2.0
    over = post_batch(one_worker.url, b"\x00" * (MAX_BODY + 1))
    assert (out.status, over.status, over.detail) == (400, 413, "bad_length")


def test_headers_past_the_limit_are_refused(one_worker: IngestProcess) -> None:
    head = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 9000
    with socket.create_connection(("127.0.0.1", one_worker.port)) as s:
        s.sendall(head + b"\r\n\r\n")  # whole, in one read
        assert _read_all(s, 10).startswith(b"HTTP/1.1 431")
    with socket.create_connection(("127.0.0.1", one_worker.port)) as s:
        for i in range(0, len(head), 1000):  # still arriving when it passes the limit
            s.sendall(head[i : i + 1000])
            time.sleep(0.02)
        assert _read_all(s, 10).startswith(b"HTTP/1.1 400")


def test_metrics_are_summed_over_worker_processes(
    db: Path, signer: keys.FileSigner, tmp_path: Path
) -> None:
    srv = IngestProcess(db, workers=2)
    try:
        assert len(srv.pids) == 2  # both workers answered (each with its own counters)
        chain = _chain(signer, "bus-7", 30)
        sent = [raw for i, raw in enumerate(chain) if i not in (10, 11)]
        for raw in sent:
            assert post_batch(srv.url, raw).status == 201
        for raw in sent[:5]:
            assert post_batch(srv.url, raw).status == 200
        assert post_batch(srv.url, b"garbage").status == 400
        assert srv.metric("cngmrv_ingest_batches_stored_total") == 28
        assert srv.metric("cngmrv_ingest_batches_duplicate_total") == 5
        assert srv.metric('cngmrv_ingest_rejects_total{code="malformed"}') == 1
        assert srv.metric("cngmrv_ingest_open_gaps") == 1
        assert srv.metric("cngmrv_ingest_missing_batches") == 2
        assert srv.metric("cngmrv_ingest_alarms") == 0
        assert (
            srv.metric("cngmrv_ingest_db_seconds_count") == 34
        )  # every post but none refused unread
        assert srv.metric("cngmrv_ingest_db_up") == 1
    finally:
        srv.stop()


def _store(path: Path, signer: keys.FileSigner, n: int) -> Store:
    store = Store(path, "bus-7")
    for i in range(n):
        store.add_readings([{"t0": float(i)}])
        store.seal(signer, 1, {"boot_epoch": 1})
    return store


def test_a_locked_database_gets_503_retry_after_and_every_batch_lands_once(
    db: Path, signer: keys.FileSigner, tmp_path: Path
) -> None:
    srv = IngestProcess(db, "--db-deadline", "0.5", "--retry-after", "1", workers=2)
    store = _store(tmp_path / "dev.sqlite", signer, 40)
    up = Uploader(store, srv.url, base_s=0.01, cap_s=5.0, seed=4)
    blocker = sqlite3.connect(db, isolation_level=None, timeout=30)
    try:
        up.start()
        up.notify()
        deadline = time.monotonic() + 30
        while up.uploaded < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        # The database goes away mid-upload: a writer holds it for 4 s.
        blocker.execute("BEGIN IMMEDIATE")
        uploaded_at_lock = up.uploaded
        # (Health may still answer: in WAL mode a held write lock leaves reads free.)
        time.sleep(4)
        blocker.execute("COMMIT")
        assert up.wait_idle(60), "the uploader never drained"
    finally:
        up.stop()
        blocker.close()
        srv.stop()
    assert uploaded_at_lock < 40  # the outage really came mid-upload
    assert up.failures > 0
    # With a 0.01 s base only a Retry-After makes a wait of a second within a few failures.
    assert any(d >= 1.0 for d in up.delays), up.delays
    held = stored_batches(open_db(db), "bus-7")
    assert held == list(store.batches()) and len(held) == 40
    assert store.counts()["batches_pending"] == 0
    log = srv.log.read_text()
    assert "event=db_unavailable" in log


# -- PostgreSQL ------------------------------------------------------------------------
# The session's throwaway cluster (tests/conftest.py, cngmrv.sim.pg_cluster).


def test_postgresql_stopped_mid_upload_gets_503_and_every_batch_lands_once(
    pg_cluster_session: pg_cluster.Cluster,
    pg_url: str,
    keydir: Path,
    signer: keys.FileSigner,
    tmp_path: Path,
) -> None:
    pg = pg_cluster_session
    database = open_db(pg_url)
    register_device(database, "bus-7", (keydir / keys.PUB_FILE).read_bytes())
    database.close()
    srv = IngestProcess(
        pg_url, "--db-deadline", "0.5", "--retry-after", "1", log=tmp_path / "ingest.log"
    )
    store = _store(tmp_path / "dev.sqlite", signer, 40)
    up = Uploader(store, srv.url, base_s=0.01, cap_s=5.0, seed=4)
    try:
        up.start()
        up.notify()
        deadline = time.monotonic() + 30
        while up.uploaded < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        pg.stop()  # the database goes away mid-upload
        uploaded_at_stop = up.uploaded
        time.sleep(3)
        assert srv.get("/v1/health")[0] == 503
        pg.start()
        assert up.wait_idle(90), "the uploader never drained"
    finally:
        up.stop()
        srv.stop()
    assert uploaded_at_stop < 40
    assert any(d >= 1.0 for d in up.delays), up.delays
    database = open_db(pg_url)
    held = stored_batches(database, "bus-7")
    (rows,) = database.one("SELECT count(*) FROM batches")
    database.close()
    assert held == list(store.batches()) and rows == 40
    assert store.counts()["batches_pending"] == 0
    assert "event=db_unavailable" in srv.log.read_text()
