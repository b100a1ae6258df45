"""Upload of sealed batches to the ingest server, in sequence order: the core.

Retry, backoff, the queue and the acknowledgement rule live here; the
transport that carries a batch is a plug-in (:mod:`cngmrv.agent.transport`),
picked by ``upload.url``'s scheme.  The policy below is the HTTP transport's
(:mod:`cngmrv.agent.http_transport`); docs/upload-transports.md says how
another transport maps its receiver's answers onto it.

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

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping

from cngmrv.agent.store import Store, StoreError
from cngmrv.agent.transport import TIMEOUT_S, Outcome, Transport, open_transport
from cngmrv.signed import batch

log = logging.getLogger("cngmrv.upload")

BASE_S = 2.0
CAP_S = 900.0

__all__ = ["Outcome", "Transport", "Uploader", "acknowledgement_problem", "backoff_delay"]


def acknowledgement_problem(answer: object, raw: bytes) -> str | None:
    """Why ``answer`` is not the ingest's acknowledgement of ``raw``, or None when it is.

    An acknowledgement is a JSON object with status ``stored`` or ``duplicate``
    naming this batch's ``device_id``, ``seq`` and ``batch_id`` (hex): a
    captive portal's "OK" or another batch's answer is none.
    """
    if not isinstance(answer, Mapping):
        return f"not a JSON object: {str(answer)[:60]!r}"
    if answer.get("status") not in ("stored", "duplicate"):
        return f"status {answer.get('status')!r}"
    b = batch.parse(raw)
    want = {"device_id": b.device_id, "seq": b.seq, "batch_id": b.batch_id.hex()}
    got = {k: answer.get(k) for k in want}
    return None if got == want else f"names {got!r}, not {want!r}"


def backoff_delay(
    attempt: int, rng: random.Random, base: float = BASE_S, cap: float = CAP_S
) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)]."""
    return rng.uniform(0.0, min(cap, base * (2.0 ** min(attempt, 32))))


class Uploader:
    """Background thread that drains the store's pending batches to ``url``.

    ``store`` is a :class:`Store` or a callable returning the current one.
    ``transport`` carries the batches; by default the one registered for
    ``url``'s scheme (:func:`cngmrv.agent.transport.open_transport`).

    ``wait(seconds)`` is how the thread sleeps between attempts; it returns
    True when the uploader should stop.  Tests pass one that advances a
    simulated clock, so a day of backoff passes in moments while the delays
    themselves stay the real full-jitter ones.
    """

    def __init__(
        self,
        store: Store | Callable[[], Store],
        url: str,
        timeout: float = TIMEOUT_S,
        base_s: float = BASE_S,
        cap_s: float = CAP_S,
        seed: int | None = None,
        wait: Callable[[float], bool] | None = None,
        transport: Transport | None = None,
    ) -> None:
        # A callable is asked for the store each time: the recorder may replace a damaged one.
        self._get_store: Callable[[], Store] = store if callable(store) else lambda: store
        self.url = url
        self.timeout = timeout
        self.transport = transport if transport is not None else open_transport(url, timeout)
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
        if not self._thread.is_alive():
            self.transport.close()

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
                out = self.transport.send(raw)
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
