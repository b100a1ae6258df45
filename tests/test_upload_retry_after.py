"""The uploader honours a 503's Retry-After: never sooner, jitter on top, the cap still holds."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cngmrv.agent.http_transport import post_batch
from cngmrv.agent.store import Store
from cngmrv.agent.upload import Uploader
from cngmrv.signed import keys


class _Busy(ThreadingHTTPServer):
    daemon_threads = True
    retry_after = "7"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        body = b'{"error": "unavailable"}'
        self.send_response(503)
        self.send_header("Retry-After", self.server.retry_after)  # type: ignore[attr-defined]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def busy() -> Iterator[_Busy]:
    srv = _Busy(("127.0.0.1", 0), _Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _delays(busy: _Busy, tmp_path: Path, signer: keys.FileSigner, cap_s: float) -> list[float]:
    store = Store(tmp_path / "dev.sqlite", "bus-7")
    store.add_readings([{"t0": 0.0}])
    store.seal(signer, 1)
    delays: list[float] = []
    done = threading.Event()

    def wait(seconds: float) -> bool:
        delays.append(seconds)
        if len(delays) >= 8:
            done.set()
            return True  # stop: enough attempts seen
        return False

    url = f"http://127.0.0.1:{busy.server_address[1]}/v1/batches"
    up = Uploader(store, url, base_s=0.01, cap_s=cap_s, seed=1, wait=wait)
    up.start()
    up.notify()
    assert done.wait(30)
    up.stop()
    assert store.counts()["batches_pending"] == 1  # nothing was given up
    return delays


@pytest.mark.parametrize(
    ("header", "low", "high"),
    [
        ("7", 7.0, 7.0 + 0.01 * 2**8),  # never sooner; the jitter on top stays small
        ("1e12", 60.0, 60.0),  # a portal's absurd wait cannot park the bus: the cap holds
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0, 0.01 * 2**8),  # a date: ignored, jitter only
        ("-5", 0.0, 0.01 * 2**8),
    ],
)
def test_retry_after_sets_the_least_wait_up_to_the_cap(
    busy: _Busy, tmp_path: Path, signer: keys.FileSigner, header: str, low: float, high: float
) -> None:
    busy.retry_after = header
    delays = _delays(busy, tmp_path, signer, cap_s=60.0)
    assert all(low <= d <= high for d in delays), delays


def test_post_batch_reads_retry_after(busy: _Busy) -> None:
    busy.retry_after = "3"
    out = post_batch(f"http://127.0.0.1:{busy.server_address[1]}/v1/batches", b"x")
    assert (out.status, out.retry, out.retry_after) == (503, True, 3.0)
