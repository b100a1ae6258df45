"""Upload of sealed batches to the ingest server, in sequence order.

The uploader runs in its own thread and touches the store only between
network calls, for a few milliseconds at a time, so a dead cellular link never
slows the reading loop.  It sends only committed batches, oldest first, and
marks a batch uploaded only when the ingest acknowledges it, so after a
restart it resumes with the first unacknowledged batch.

An acknowledgement is the ingest's JSON answer naming this batch: status
``stored`` (201) or ``duplicate`` (200) with the batch's ``device_id``,
``seq`` and ``batch_id``.  Any other 2xx (a captive portal's login page, a
proxy's "OK") and any redirect (followed by nobody) is *not* one: the batch
stays pending and is retried as a transient failure.

What the agent does on each answer (docs/deploy-pi.md, "Uploads"):

- transient: no connection, a dropped or garbled response, 5xx, 408, 429, a
  redirect, a 2xx that is no acknowledgement, and any refusal that is not the
  ingest's own JSON (a proxy's 4xx page): back off with full jitter (the n-th
  consecutive failure waits a uniform random time in ``[0, min(cap, base *
  2**n)]``, base 2 s, cap 15 min) and retry the same batch.  An answer with
  ``Retry-After`` (in seconds; the ingest sends it with a 503 when its
  database does not answer) is honoured: the wait is never shorter than it (up
  to the cap), and the jitter comes on top so a fleet told the same time does
  not return at once.
- the device is refused (403 ``unknown_device``, ``kid_mismatch``): every
  batch would be; retried in order on the same schedule, never skipped, and
  reported in :attr:`Uploader.blocked` (the operator registers the device).
- this batch is refused (400 ``malformed``/``truncated``/``noncanonical``,
  422 ``rejected``, 409 ``conflict``/``chain_broken``, 413): retrying it will
  not help and must not hold the queue.  The batch is *parked*: kept in the
  store, never deleted but by the quota's own rule, and skipped; a signed
  ``UPLOAD_REFUSED`` event (seq, status, code) goes into the next batch and
  ``cngmrv_batches_refused_total`` counts it.  Parked batches are offered again
  at the next start (the ingest may have been fixed), and ``cngmrv export``
  still has them.
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
from typing import Any

from cngmrv.agent.store import Store, StoreError
from cngmrv.signed import batch

log = logging.getLogger("cngmrv.upload")

CONTENT_TYPE = "application/vnd.cngmrv.batch+msgpack"
BASE_S = 2.0
CAP_S = 900.0


# The ingest's refusals of one batch: retrying the same bytes cannot succeed.
BATCH_REFUSALS = frozenset(
    {"malformed", "truncated", "noncanonical", "rejected", "conflict", "chain_broken", "bad_length"}
)
# The ingest's refusals of the device: every batch would get the same answer.
DEVICE_REFUSALS = frozenset({"unknown_device", "kid_mismatch"})


@dataclass(frozen=True)
class Outcome:
    """The ingest's answer to one batch."""

    acknowledged: bool  # stored or duplicate, naming this batch: safe to mark uploaded
    retry: bool  # a transient failure: try again later
    status: int
    detail: str
    refused: bool = False  # the ingest refused this batch for good: park it, go on
    retry_after: float | None = None  # seconds the server asked us to wait, if it did


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A redirect is a captive portal or a misconfigured URL, never the ingest's answer.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def post_batch(url: str, raw: bytes, timeout: float = 10.0) -> Outcome:
    """POST one batch's exact bytes; classify the answer (see the module's policy)."""
    req = urllib.request.Request(
        url, data=raw, method="POST", headers={"Content-Type": CONTENT_TYPE}
    )
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            body = resp.read(64 * 1024)
            problem = _not_an_ack(body, raw)
            if problem:
                return Outcome(False, True, resp.status, f"not an acknowledgement: {problem}")
            return Outcome(True, False, resp.status, _detail(body))
    except urllib.error.HTTPError as e:
        try:
            body = e.read(64 * 1024)
        except OSError:
            body = b""
        code = _ingest_error(body)
        if code in BATCH_REFUSALS and e.code in (400, 409, 413, 422):
            return Outcome(False, False, e.code, code, refused=True)
        if code in DEVICE_REFUSALS and e.code == 403:
            return Outcome(False, False, e.code, code)
        # 5xx, 408, 429, 3xx and anything not in the ingest's words: transient.
        return Outcome(
            False,
            True,
            e.code,
            code or _detail(body),
            retry_after=_retry_after(e.headers.get("Retry-After")),
        )
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
        # A dropped connection, a garbled status line (HTTPException) or a response
        # http.client refuses (ValueError): all transient, as far as we can tell.
        return Outcome(False, True, 0, f"connection failed: {getattr(e, 'reason', e)!r}")


def _json(body: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def _ingest_error(body: bytes) -> str | None:
    obj = _json(body)
    err = None if obj is None else obj.get("error")
    return err if isinstance(err, str) else None


def _not_an_ack(body: bytes, raw: bytes) -> str | None:
    """Why ``body`` is not the ingest's acknowledgement of ``raw``, or None when it is."""
    obj = _json(body)
    if obj is None:
        return f"not JSON: {body[:60]!r}"
    if obj.get("status") not in ("stored", "duplicate"):
        return f"status {obj.get('status')!r}"
    b = batch.parse(raw)
    want = {"device_id": b.device_id, "seq": b.seq, "batch_id": b.batch_id.hex()}
    got = {k: obj.get(k) for k in want}
    return None if got == want else f"names {got!r}, not {want!r}"


def _detail(body: bytes) -> str:
    obj = _json(body)
    if obj is not None:
        return str(obj.get("status") or obj.get("error") or obj)
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
        self.refused = 0  # batches the ingest refused for good, parked (since start)

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
        try:
            # The ingest may have been fixed since: offer last run's parked batches again.
            self._get_store().requeue_refused()
        except StoreError as e:
            log.error("event=upload_store_error reason=%r", str(e))
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
                if out.refused and self._park(seq, out):
                    after = seq
                    attempt = 0
                    continue
                if not out.retry:
                    self.blocked = f"batch {seq} refused ({out.status}): {out.detail}"
                    self._idle.set()
                if self._backoff(attempt, out.retry_after):
                    return
                attempt += 1
                break

    def _park(self, seq: int, out: Outcome) -> bool:
        """Set a refused batch aside with a signed event; False if the store would not."""
        try:
            store = self._get_store()
            store.park_refused(seq)
            store.add_event(
                time.time(),
                "UPLOAD_REFUSED",
                {"seq": seq, "status": out.status, "code": out.detail},
            )
        except StoreError as e:
            log.error("event=upload_park_failed seq=%d reason=%r", seq, str(e))
            return False
        self.refused += 1
        log.error(
            "event=upload_refused seq=%d status=%d code=%r action=parked",
            seq,
            out.status,
            out.detail,
        )
        return True
