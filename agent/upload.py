"""Upload of sealed batches to the ingest server, in sequence order.

The uploader runs in its own thread and touches the store only between
network calls, for a few milliseconds at a time, so a dead cellular link never
slows the reading loop.  It sends only committed batches, oldest first, and
marks a batch uploaded only when the ingest acknowledges it (stored, or
already held with the same bytes), so after a restart it resumes with the
first unacknowledged batch.

Transient failures (no connection, a dropped response, 5xx, 429) back off with
full jitter: the n-th consecutive failure waits a uniform random time in
``[0, min(cap, base * 2**n)]``, base 2 s, cap 15 min.  An answer with
``Retry-After`` (in seconds; the ingest sends it with a 503 when its database
does not answer) is honoured: the wait is never shorter than it (up to the
cap), and the jitter comes on top so a fleet told the same time does not
return at once.  A refusal that retrying cannot fix (a conflict, a bad
signature, an unknown device) is reported in :attr:`Uploader.blocked` and
retried on the same schedule, never skipped: the operator may register the
device, and skipping would only hide the problem.
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from cngmrv.agent.store import Store, StoreError

log = logging.getLogger("cngmrv.upload")

CONTENT_TYPE = "application/vnd.cngmrv.batch+msgpack"
BASE_S = 2.0
CAP_S = 900.0


@dataclass(frozen=True)
class Outcome:
    """The ingest's answer to one batch."""

    acknowledged: bool  # stored or duplicate: safe to mark uploaded
    retry: bool  # a transient failure: try again later
    status: int
    detail: str
    retry_after: float | None = None  # seconds the server asked us to wait, if it did


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
        return Outcome(False, retry, e.code, detail, _retry_after(e.headers.get("Retry-After")))
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
        # A dropped connection, a garbled status line (HTTPException) or a response
        # http.client refuses (ValueError): all transient, as far as we can tell.
        return Outcome(False, True, 0, f"connection failed: {getattr(e, 'reason', e)!r}")


def _detail(body: bytes) -> str:
    try:
        obj = json.loads(body)
        return str(obj.get("status") or obj.get("error") or obj)
    except (ValueError, AttributeError):
        return body[:200].decode("utf-8", "replace")


def _retry_after(value: str | None) -> float | None:
    # Only the delay-seconds form: an HTTP date would need the server's clock to agree with ours.
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and 0 <= seconds < float("inf") else None


def backoff_delay(
    attempt: int, rng: random.Random, base: float = BASE_S, cap: float = CAP_S
) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)]."""
    return rng.uniform(0.0, min(cap, base * (2.0 ** min(attempt, 32))))


class Uploader:
    """Background thread that drains the store's pending batches to ``url``.

    ``store`` is a :class:`Store` or a callable returning the current one.

    ``wait(seconds)`` is how the thread sleeps between attempts; it returns
    True when the uploader should stop.  Tests pass one that advances a
    simulated clock, so a day of backoff passes in moments while the delays
    themselves stay the real full-jitter ones.
    """

    def __init__(
        self,
        store: Store | Callable[[], Store],
        url: str,
        timeout: float = 10.0,
        base_s: float = BASE_S,
        cap_s: float = CAP_S,
        seed: int | None = None,
        wait: Callable[[float], bool] | None = None,
    ) -> None:
        # A callable is asked for the store each time: the recorder may replace a damaged one.
        self._get_store: Callable[[], Store] = store if callable(store) else lambda: store
        self.url = url
        self.timeout = timeout
        self.base_s = base_s
        self.cap_s = cap_s
        self._rng = random.Random(seed)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._wait = wait or self._stop.wait
        self._thread = threading.Thread(target=self._run, name="uploader", daemon=True)
        self.uploaded = 0
        self.last_upload: float | None = None  # wall time of the latest acknowledgement
        self.duplicates = 0
        self.failures = 0
        self.delays: list[float] = []  # every backoff wait, in order (the last 1000)
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

    def _backoff(self, attempt: int, at_least: float | None = None) -> bool:
        delay = backoff_delay(attempt, self._rng, self.base_s, self.cap_s)
        if at_least is not None:
            # A captive portal's Retry-After must not park the bus for days: the cap holds.
            delay = min(self.cap_s, at_least + delay)
        self.delays.append(delay)
        del self.delays[:-1000]
        return self._wait(delay)

    def _run(self) -> None:
        # The thread must outlive any surprise: a dead uploader would strand every batch.
        while not self._stop.is_set():
            try:
                self._loop()
                return
            except Exception:
                log.exception("event=uploader_error")
                if self._backoff(5):
                    return

    def _loop(self) -> None:
        attempt = 0
        after = -1  # the last acknowledged sequence: later ones are what is left
        while not self._stop.is_set():
            self._wake.clear()
            try:
                pending = self._get_store().pending(after=after, limit=50)
            except StoreError as e:
                log.error("event=upload_store_error reason=%r", str(e))
                if self._backoff(attempt):
                    return
                attempt += 1
                continue
            if not pending:
                self._idle.set()
                self._wake.wait(5.0)
                continue
            for seq, raw in pending:
                if self._stop.is_set():
                    return
                out = post_batch(self.url, raw, self.timeout)
                if out.acknowledged:
                    try:
                        self._get_store().mark_uploaded(seq)
                    except StoreError as e:
                        log.error("event=upload_mark_failed seq=%d reason=%r", seq, str(e))
                    after = seq
                    self.uploaded += 1
                    self.last_upload = time.time()
                    self.duplicates += out.status == 200
                    self.blocked = None
                    attempt = 0
                    continue
                self.failures += 1
                log.warning(
                    "event=upload_failed seq=%d status=%d detail=%r retry=%s attempt=%d",
                    seq,
                    out.status,
                    out.detail,
                    out.retry,
                    attempt,
                )
                if not out.retry:
                    self.blocked = f"batch {seq} refused ({out.status}): {out.detail}"
                    self._idle.set()
                if self._backoff(attempt, out.retry_after):
                    return
                attempt += 1
                break
