"""Upload under network faults: a real proxy on 127.0.0.1 between the uploader and the ingest.

The proxy forwards each request to the real ingest server and reads its whole
answer (so the batch is stored), then either passes the answer on or closes
the connection without one.  When "down" it resets every connection.  The
uploader's sleep is replaced by a simulated clock, so a day of real
full-jitter backoff passes in about a second.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from upload_helpers import sealed_store

from cngmrv.agent.http_transport import post_batch
from cngmrv.agent.store import Store
from cngmrv.agent.upload import Uploader, backoff_delay
from cngmrv.office.ingest import IngestServer, register_device, stored_batches
from cngmrv.signed import batch, keys

DAY = 86400.0


class Proxy:
    """A TCP proxy for one HTTP request per connection, with injectable faults."""

    def __init__(self, upstream: str, drop: float = 0.0, seed: int = 1) -> None:
        host, port = urlsplit(upstream).netloc.split(":")
        self._upstream = (host, int(port))
        self.drop = drop
        self.down = False
        self._rng = random.Random(seed)
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}/v1/batches"
        self.forwarded = self.dropped = self.refused = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._sock.close()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        with client:
            client.settimeout(10)
            if self.down:
                # RST, as a dead route or a stopped server would give.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                with self._lock:
                    self.refused += 1
                return
            request = self._read_request(client)
            with socket.create_connection(self._upstream, timeout=10) as up:
                up.sendall(request)
                answer = b"".join(iter(lambda: up.recv(65536), b""))
            with self._lock:
                dropped = self._rng.random() < self.drop
                self.forwarded += 1
                self.dropped += dropped
            if not dropped:
                client.sendall(answer)

    @staticmethod
    def _read_request(client: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            data += client.recv(65536)
        head, body = data.split(b"\r\n\r\n", 1)
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        while len(body) < length:
            body += client.recv(65536)
        return head + b"\r\n\r\n" + body


class SimClock:
    """The uploader's sleep on a simulated clock; records every delay."""

    def __init__(self, on_tick: object = None) -> None:
        self.now = 0.0
        self.delays: list[float] = []
        self._on_tick = on_tick

    def wait(self, seconds: float) -> bool:
        self.delays.append(seconds)
        self.now += seconds
        if callable(self._on_tick):
            self._on_tick(self.now)
        return False


@pytest.fixture
def server(tmp_path: Path, keydir: Path) -> Iterator[IngestServer]:
    srv = IngestServer(tmp_path / "ingest.sqlite").start()
    register_device(srv.db, "bus-7", (keydir / keys.PUB_FILE).read_bytes())
    yield srv
    srv.stop()


def _run_until_idle(up: Uploader, timeout: float = 60.0) -> None:
    up.start()
    up.notify()
    assert up.wait_idle(timeout), "uploader never drained"
    up.stop()


def test_a_day_without_ingest_then_everything_arrives_once(
    server: IngestServer, signer: keys.FileSigner, tmp_path: Path
) -> None:
    store = sealed_store(tmp_path, signer, 5)
    proxy = Proxy(server.url)
    proxy.down = True

    def tick(now: float) -> None:
        if now >= DAY:
            proxy.down = False
        elif proxy.refused == 10:
            # The bus keeps sealing while the network is dead: the store is never held up.
            store.add_readings([{"t0": 99.0}])
            store.seal(signer, 1, {"boot_epoch": 1})

    clock = SimClock(tick)
    up = Uploader(store, proxy.url, seed=11, wait=clock.wait)
    _run_until_idle(up)
    proxy.close()
    # Every wait was a real full-jitter draw: uniform in [0, min(15 min, 2 s * 2**n)].
    for attempt, d in enumerate(clock.delays):
        assert 0.0 <= d <= min(900.0, 2.0 * 2**attempt)
    assert sum(clock.delays) >= DAY
    assert max(clock.delays) > 600  # it reached the cap's range
    # About one attempt per 7.5 minutes once capped (mean delay 450 s).
    assert 100 <= proxy.refused <= 400
    held = stored_batches(server.db, "bus-7")
    assert held == list(store.batches()) and len(held) == 6
    assert store.counts()["batches_pending"] == 0


def test_dropped_answers_after_storing_are_retried_and_stored_once(
    server: IngestServer, signer: keys.FileSigner, tmp_path: Path
) -> None:
    store = sealed_store(tmp_path, signer, 40)
    proxy = Proxy(server.url, drop=0.3, seed=5)
    up = Uploader(store, proxy.url, seed=3, wait=SimClock().wait)
    _run_until_idle(up)
    proxy.close()
    assert proxy.dropped >= 5  # the fault really happened (30 % of about 57 answers)
    # Every dropped answer came after the batch was stored: each one cost exactly one
    # re-post, which the ingest answered as a duplicate, storing nothing twice.
    assert proxy.forwarded == 40 + proxy.dropped
    assert server.ingest.counts["duplicate"] == proxy.dropped
    assert server.ingest.counts["stored"] == 40
    assert up.duplicates > 0
    held = stored_batches(server.db, "bus-7")
    assert held == list(store.batches())
    assert server.db.one("SELECT count(*) FROM batches")[0] == 40


def test_the_same_batch_posted_twenty_times_at_once_is_stored_once(
    server: IngestServer, signer: keys.FileSigner
) -> None:
    raw = batch.build(signer, "bus-7", 0, batch.ZERO_HASH, {"readings": [{"t0": 1.0}]})
    start = threading.Barrier(20)
    statuses: list[int] = []

    def post() -> None:
        start.wait()
        statuses.append(post_batch(server.url, raw).status)

    threads = [threading.Thread(target=post) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [200] * 19 + [201]
    assert stored_batches(server.db, "bus-7") == [(0, raw)]


def test_upload_resumes_after_a_restart_with_the_first_unacknowledged(
    server: IngestServer, signer: keys.FileSigner, tmp_path: Path
) -> None:
    store = sealed_store(tmp_path, signer, 3)
    _run_until_idle(Uploader(store, server.url, seed=1))
    for i in range(3, 6):
        store.add_readings([{"t0": float(i)}])
        store.seal(signer, 1)
    store.close()  # the agent stops (or dies) with 3 batches unsent
    again = Store(tmp_path / "dev.sqlite", "bus-7")
    assert [s for s, _ in again.pending()] == [3, 4, 5]
    _run_until_idle(Uploader(again, server.url, seed=1))
    assert stored_batches(server.db, "bus-7") == list(again.batches())
    assert server.ingest.counts.get("duplicate", 0) == 0  # nothing was sent twice


def test_a_refused_batch_blocks_in_order_until_fixed(
    tmp_path: Path, signer: keys.FileSigner, keydir: Path
) -> None:
    srv = IngestServer(tmp_path / "ingest.sqlite").start()
    store = sealed_store(tmp_path, signer, 3)

    def register_after_a_while(now: float) -> None:
        if now > 3600 and srv.db.one("SELECT count(*) FROM devices")[0] == 0:
            register_device(srv.db, "bus-7", (keydir / keys.PUB_FILE).read_bytes())

    clock = SimClock(register_after_a_while)
    up = Uploader(store, srv.url, seed=2, wait=clock.wait)
    up.start()
    up.notify()
    deadline = time.monotonic() + 30
    while store.counts()["batches_pending"] and time.monotonic() < deadline:
        time.sleep(0.01)
    up.stop()
    assert clock.now > 3600 and up.failures >= 5
    # Only batch 0 was ever refused: nothing behind it was tried before it went through.
    assert srv.ingest.counts["unknown_device"] == up.failures
    assert srv.ingest.counts["stored"] == 3 and "duplicate" not in srv.ingest.counts
    assert stored_batches(srv.db, "bus-7") == list(store.batches())
    srv.stop()


def test_backoff_is_full_jitter_and_capped() -> None:
    rng = random.Random(3)
    delays = [backoff_delay(a, rng) for a in range(40)]
    assert all(0.0 <= d <= min(900.0, 2.0 * 2**a) for a, d in enumerate(delays))
    capped = [backoff_delay(30, rng) for _ in range(2000)]
    # Full jitter: the whole [0, cap] range, not "cap plus a little noise".
    assert min(capped) < 20 and max(capped) > 880
    assert 400 < sum(capped) / len(capped) < 500


def test_unreachable_ingest_is_a_retryable_failure() -> None:
    out = post_batch("http://127.0.0.1:9/v1/batches", b"x", timeout=2.0)
    assert (out.acknowledged, out.retry, out.status) == (False, True, 0)


def test_the_uploader_follows_a_replaced_store(
    server: IngestServer, signer: keys.FileSigner, tmp_path: Path
) -> None:
    first = sealed_store(tmp_path, signer, 3)
    current = [first]
    up = Uploader(lambda: current[0], server.url, seed=1)
    up.start()
    up.notify()
    assert up.wait_idle(10.0)
    # The recorder moved a damaged store aside; its successor holds the chain's next batches.
    second = Store(tmp_path / "next.sqlite", "bus-7")
    for seq, raw in first.batches():
        second.import_batch(seq, raw, uploaded=True)
    for i in range(2):
        second.add_readings([{"t0": 10.0 + i}])
        second.seal(signer, 1)
    current[0] = second
    first.close()
    up.notify()
    deadline = time.monotonic() + 10
    while second.counts()["batches_pending"] and time.monotonic() < deadline:
        time.sleep(0.01)
    up.stop()
    assert stored_batches(server.db, "bus-7") == list(second.batches())
    assert [s for s, _ in stored_batches(server.db, "bus-7")] == [0, 1, 2, 3, 4]


# -- refusals and false acknowledgements ---------------------- --------------------------------


def _drain(up: Uploader, store: Store, clock: SimClock, until: float = DAY) -> None:
    """Run the uploader until nothing is pending or the simulated clock passes ``until``."""
    up.start()
    up.notify()
    deadline = time.monotonic() + 30
    while store.counts()["batches_pending"] and clock.now < until and time.monotonic() < deadline:
        time.sleep(0.01)
    up.stop()


def test_a_refused_batch_is_parked_with_a_signed_event_and_the_rest_goes_on(
    server: IngestServer, signer: keys.FileSigner, tmp_path: Path
) -> None:
    store = sealed_store(tmp_path, signer, 5)
    # The ingest already holds another batch 2 of this device (a restored old store
    # signed it twice): the device's own batch 2 is a conflict, and 3 cannot link.
    rows = list(store.batches())
    other = batch.build(signer, "bus-7", 2, batch.chain_id(rows[1][1]), {"readings": []})
    assert server.ingest.accept(other)[0] == 201
    clock = SimClock()
    up = Uploader(store, server.url, seed=4, wait=clock.wait)
    _drain(up, store, clock)
    # Old code retried batch 2 for ever, in order: 3 and 4 never went.
    assert [s for s, _ in stored_batches(server.db, "bus-7")] == [0, 1, 2, 4]
    assert store.counts()["batches_pending"] == 0
    assert store.counts()["batches_refused"] == 2 and up.refused == 2
    assert list(store.batches()) == rows  # nothing lost
    # Each refusal is a signed event in the next batch.
    assert store.unsealed()[1] == 2
    sealed = store.seal(signer, 1, {"boot_epoch": 1})
    assert sealed is not None
    events = batch.parse(sealed.raw).events()
    assert [(e["kind"], e["seq"], e["code"]) for e in events] == [
        ("UPLOAD_REFUSED", 2, "conflict"),
        ("UPLOAD_REFUSED", 3, "chain_broken"),
    ]
    # At the next start the parked batches are offered again (and refused again).
    again = Uploader(store, server.url, seed=5, wait=SimClock().wait)
    _run_until_idle(again)
    assert again.refused == 2 and store.counts()["batches_refused"] == 2
    assert [s for s, _ in stored_batches(server.db, "bus-7")] == [0, 1, 2, 4, 5]


class _Portal:
    """A captive portal on 127.0.0.1: 200 HTML to everything, or a 302 to its login page."""

    def __init__(self, redirect: bool) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        portal = self
        self.posts = 0

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _page(self) -> None:
                body = b"<html><body>Welcome! Please log in.</body></html>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._page()

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                portal.posts += 1
                if redirect:
                    self.send_response(302)
                    self.send_header("Location", "/login")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self._page()

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1/batches"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.mark.parametrize("redirect", [False, True], ids=["200_html", "302_login"])
def test_a_captive_portal_answer_is_not_an_acknowledgement(
    signer: keys.FileSigner, tmp_path: Path, redirect: bool
) -> None:
    store = sealed_store(tmp_path, signer, 4)
    portal = _Portal(redirect)
    out = post_batch(portal.url, next(iter(store.batches()))[1])
    assert (out.acknowledged, out.retry) == (False, True), out
    clock = SimClock()
    up = Uploader(store, portal.url, seed=6, wait=clock.wait)
    _drain(up, store, clock, until=3600)
    portal.close()
    # Old code: pending went from 4 to 0 with nothing delivered.
    assert portal.posts >= 3 and up.uploaded == 0
    assert store.counts()["batches_pending"] == 4


def test_an_ack_naming_another_batch_is_not_one(
    server: IngestServer, signer: keys.FileSigner, tmp_path: Path
) -> None:
    store = sealed_store(tmp_path, signer, 2)
    (_, b0), (_, b1) = store.batches()
    assert post_batch(server.url, b0).acknowledged
    # A proxy that replays the ingest's answer for batch 0 to every request.
    status, answer = server.ingest.accept(b0)
    from cngmrv.agent.upload import acknowledgement_problem

    assert acknowledgement_problem(answer, b0) is None
    assert "names" in (acknowledgement_problem(answer, b1) or "")
