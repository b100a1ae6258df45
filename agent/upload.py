"""Upload of sealed batches to the ingest server, in sequence order.

The uploader owns its own store connection and runs in its own thread, so a
slow cellular link never stalls the reading loop.  A batch is marked uploaded
only when the ingest acknowledges it (stored, or already held with the same
bytes).  Transient failures back off with full jitter (base 2 s, cap 15 min);
a refusal that retrying cannot fix (conflict, bad signature) stops the
uploader for that batch and is reported, never skipped: later batches would
only be refused as out of order.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cngmrv.agent.store import Store

log = logging.getLogger("cngmrv.upload")

CONTENT_TYPE = "application/vnd.cngmrv.batch+msgpack"


@dataclass(frozen=True)
class Outcome:
    """The ingest's answer to one batch."""

    acknowledged: bool  # stored or duplicate: safe to mark uploaded
    retry: bool  # a transient failure: try again later
    status: int
    detail: str


def post_batch(url: str, raw: bytes, timeout: float = 10.0) -> Outcome:
    """POST one batch's exact bytes; classify the answer."""
    req = urllib.request.Request(
        url, data=raw, method="POST", headers={"Content-Type": CONTENT_TYPE}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
            return Outcome(True, False, resp.status, _detail(body))
    except urllib.error.HTTPError as e:
        detail = _detail(e.read())
        # 5xx and 429 are the server's trouble; 4xx is ours and retrying won't help.
        retry = e.code >= 500 or e.code == 429
        return Outcome(False, retry, e.code, detail)
    except (urllib.error.URLError, OSError) as e:
        return Outcome(False, True, 0, f"connection failed: {getattr(e, 'reason', e)}")


def _detail(body: bytes) -> str:
    try:
        obj = json.loads(body)
        return str(obj.get("status") or obj.get("error") or obj)
    except ValueError:
        return body[:200].decode("utf-8", "replace")


def backoff_delay(attempt: int, rng: random.Random, base: float = 2.0, cap: float = 900.0) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)]."""
    return rng.uniform(0.0, min(cap, base * (2.0 ** min(attempt, 32))))


class Uploader:
    """Background thread that drains the store's pending batches to ``url``."""

    def __init__(self, store_path: Path, device_id: str, url: str, seed: int | None = None) -> None:
        self._store_path = store_path
        self._device_id = device_id
        self.url = url
        self._rng = random.Random(seed)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._thread = threading.Thread(target=self._run, name="uploader", daemon=True)
        self.uploaded = 0
        self.failures = 0
        self.blocked: str | None = None  # why the head batch cannot go, if it cannot

    def start(self) -> None:
        self._thread.start()

    def notify(self) -> None:
        """A batch was sealed: try now rather than at the next backoff tick."""
        self._idle.clear()
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is pending (or the head batch is refused for good)."""
        return self._idle.wait(timeout)

    def _run(self) -> None:
        store = Store(self._store_path, self._device_id)
        attempt = 0
        try:
            while not self._stop.is_set():
                self._wake.clear()
                pending = store.pending(limit=50)
                if not pending:
                    self._idle.set()
                    self._wake.wait(5.0)
                    continue
                for seq, raw in pending:
                    out = post_batch(self.url, raw)
                    if out.acknowledged:
                        store.mark_uploaded(seq)
                        self.uploaded += 1
                        attempt = 0
                        continue
                    self.failures += 1
                    log.warning(
                        "event=upload_failed seq=%d status=%d detail=%r retry=%s",
                        seq,
                        out.status,
                        out.detail,
                        out.retry,
                    )
                    if not out.retry:
                        self.blocked = f"batch {seq} refused ({out.status}): {out.detail}"
                        self._idle.set()
                    delay = backoff_delay(attempt, self._rng)
                    attempt += 1
                    self._stop.wait(delay)
                    break
        finally:
            store.close()
