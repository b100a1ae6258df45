"""The ingest as an ASGI application: the one place where HTTP meets :class:`Ingest`.

Routes:

- ``POST /v1/batches``: one batch's exact bytes, ``Content-Length`` required
  (no chunked bodies), at most :data:`MAX_BODY` bytes; the answer is
  :meth:`Ingest.accept`'s status and JSON.
- ``GET /v1/health``: 200 when the database answers within the deadline,
  else 503 with ``Retry-After``; the outcome counts only for the operator.
- ``GET /v1/devices/<id>``: the device's batches, gaps, alarms and keys, for
  the operator only (``Authorization: Bearer <read token>``; without a read
  token configured, off): anyone else gets 401, whether the device exists or not.
- ``GET /metrics``: Prometheus text format (:class:`Metrics`).

Back-pressure: every database call runs in a thread of this process's pool
(one :class:`Ingest`, so one database connection, per thread) under a
deadline.  A database that is down, locked or slower than the deadline gets a
503 ``unavailable`` with ``Retry-After``, never a 500, so an uploader keeps the
batch and sends it again; a batch whose transaction committed after its
deadline passed comes back as a ``duplicate`` and is stored once.

The server around this app (uvicorn, :mod:`cngmrv.office.ingest_serve`)
enforces what must be enforced before the app sees a request: header size,
the whole-request deadline and the connection cap.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from cngmrv.office.fleetdb import SchemaMismatch
from cngmrv.office.ingest import Ingest, IngestError, may_read, open_db, read_auth
from cngmrv.signed import batch
from cngmrv.signed.keys import ALLOWED_ALGS

log = logging.getLogger("cngmrv.ingest")

T = TypeVar("T")
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

# One rule for the largest batch, the batch format's (signed/batch.py): real
# batches are 0.4-8 KB, and parsing a body is bounded by the same limit.
MAX_BODY = batch.MAX_BATCH_BYTES
# Request line and headers.  h11 enforces it on a header block still arriving;
# the app on one that came in a single read (h11 parses those whole).
MAX_HEADER_BYTES = 8 * 1024
DB_DEADLINE_S = 5.0  # a request's whole wait for the database, queue included
RETRY_AFTER_S = 10  # what a 503 asks the client to wait, at least
POOL_SIZE = 4  # database connections (and threads) per worker process


def _unavailable_errors() -> tuple[type[BaseException], ...]:
    # The database's own trouble (down, locked, restarting, a lost race): the
    # client should send the same batch again later.  A programming error is not
    # in this list and stays a 500.
    errors: list[type[BaseException]] = [
        # Includes SchemaMismatch: a newer cngmrv migrated the database under this server.
        IngestError,
        sqlite3.OperationalError,
        sqlite3.IntegrityError,
        sqlite3.InterfaceError,
    ]
    try:
        import psycopg  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        errors += [psycopg.OperationalError, psycopg.InterfaceError, psycopg.IntegrityError]
    return tuple(errors)


UNAVAILABLE = _unavailable_errors()


def _is_unavailable(exc: BaseException) -> bool:
    # sqlite3.DatabaseError itself (not its subclasses) is "file is not a database".
    return isinstance(exc, UNAVAILABLE) or type(exc) is sqlite3.DatabaseError


class DatabaseUnavailable(Exception):
    """The database did not answer in time, or answered that it cannot serve.

    ``public`` is what the 503 tells the client (never the database's address).
    """

    public = "the database is not answering; send it again later"


class Pool:
    """This process's database connections: one :class:`Ingest` per pool thread.

    A connection that fails with a database-unavailable error is closed and
    reopened on the thread's next call, so a database that restarts is used
    again without restarting the ingest.  With ``shared``, every thread uses
    that one :class:`Ingest` (its connection serialises them) and the pool
    never closes it: the in-process server's light mode.
    """

    def __init__(
        self,
        db_target: str | Path,
        allowed_algs: Iterable[str] = ALLOWED_ALGS,
        size: int = POOL_SIZE,
        deadline_s: float = DB_DEADLINE_S,
        shared: Ingest | None = None,
    ) -> None:
        self.db_target = db_target
        self.shared = shared
        self.allowed_algs = frozenset(allowed_algs)
        self.deadline_s = deadline_s
        self._executor = ThreadPoolExecutor(size, thread_name_prefix="ingest-db")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: set[Ingest] = set()

    def _ingest(self) -> Ingest:
        if self.shared is not None:
            return self.shared
        ingest: Ingest | None = getattr(self._local, "ingest", None)
        if ingest is None:
            # One connection per pool thread: a connection pool inside each would only idle.
            ingest = Ingest(open_db(self.db_target, pool_size=1), self.allowed_algs)
            self._local.ingest = ingest
            with self._lock:
                self._open.add(ingest)
        return ingest

    def _drop(self) -> None:
        ingest: Ingest | None = getattr(self._local, "ingest", None)
        self._local.ingest = None
        if ingest is not None:
            with self._lock:
                self._open.discard(ingest)
            try:
                ingest.db.close()
            except Exception:  # a dead connection may fail to close too
                pass

    def _call(self, fn: Callable[[Ingest], T]) -> T:
        ingest = self._ingest()
        try:
            return fn(ingest)
        except Exception as e:
            if _is_unavailable(e):
                self._drop()
                raise
            if ingest.db.is_unavailable(e):
                # The database's own verdict (e.g. a PostgreSQL error class the list above lacks).
                self._drop()
                raise DatabaseUnavailable(f"{type(e).__name__}: {e}") from e
            raise

    async def run(self, fn: Callable[[Ingest], T]) -> T:
        """Run ``fn`` with a pooled :class:`Ingest`; :class:`DatabaseUnavailable` past the deadline.

        A call still queued at the deadline is dropped; one already running
        finishes in its thread (its transaction commits or rolls back whole).
        """
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(
                loop.run_in_executor(self._executor, self._call, fn), self.deadline_s
            )
        except TimeoutError:
            raise DatabaseUnavailable(f"no answer within {self.deadline_s:g} s") from None
        except Exception as e:
            if _is_unavailable(e):
                err = DatabaseUnavailable(f"{type(e).__name__}: {e}")
                if isinstance(e, SchemaMismatch):
                    err.public = f"{e.public}; send it again later"
                raise err from e
            raise

    def counts(self) -> dict[str, int]:
        """This process's answers by status or error, summed over the pool."""
        total: dict[str, int] = {}
        with self._lock:
            for ingest in self._open | ({self.shared} if self.shared else set()):
                for k, v in ingest.counts.items():
                    total[k] = total.get(k, 0) + v
        return total

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for ingest in self._open:
                try:
                    ingest.db.close()
                except Exception:
                    pass
            self._open.clear()


class Metrics:
    """Prometheus metrics, correct across worker processes.

    Events (stored, duplicates, rejects by code, database latency) are counted
    in the process that saw them; with ``PROMETHEUS_MULTIPROC_DIR`` set (the
    production server sets it) prometheus_client's multiprocess mode sums them
    over every worker at each scrape.  State (open gaps, missing batches,
    alarms, devices) is read from the database at each scrape, so it is the
    same whichever worker answers, and true across several servers.
    """

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.stored = Counter(
            "cngmrv_ingest_batches_stored",
            "Batches verified and stored (rate() is batches stored per second)",
            registry=self.registry,
        )
        self.duplicates = Counter(
            "cngmrv_ingest_batches_duplicate",
            "Batches already held, acknowledged again and not stored",
            registry=self.registry,
        )
        self.rejects = Counter(
            "cngmrv_ingest_rejects",
            "Requests refused, by stable code (malformed, conflict, bad_signature, unavailable, ...)",
            ["code"],
            registry=self.registry,
        )
        self.db_seconds = Histogram(
            "cngmrv_ingest_db_seconds",
            "Time a batch's database work took (verify and store in one transaction)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )

    def count(self, status: int, body: dict[str, Any]) -> None:
        if body.get("status") == "stored":
            self.stored.inc()
        elif body.get("status") == "duplicate":
            self.duplicates.inc()
        else:
            codes = body.get("codes") or [body.get("error", f"http_{status}")]
            for code in codes:
                self.rejects.labels(code=str(code)).inc()

    def exposition(self, state: dict[str, float] | None) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.core import GaugeMetricFamily
        from prometheus_client.multiprocess import MultiProcessCollector

        if self.multiprocess:
            events = CollectorRegistry()
            MultiProcessCollector(events)
        else:
            events = self.registry

        class _State:
            def collect(self) -> Iterable[GaugeMetricFamily]:
                up = GaugeMetricFamily("cngmrv_ingest_db_up", "1 when the database answered")
                up.add_metric([], 0.0 if state is None else 1.0)
                yield up
                for name, text in STATE_METRICS.items():
                    if state is not None:
                        g = GaugeMetricFamily(name, text)
                        g.add_metric([], state[name])
                        yield g

        states = CollectorRegistry()
        states.register(_State())  # type: ignore[arg-type]
        return bytes(generate_latest(events)) + bytes(generate_latest(states))


STATE_METRICS = {
    "cngmrv_ingest_devices": "Devices registered",
    "cngmrv_ingest_open_gaps": "Gaps recorded and not yet closed",
    "cngmrv_ingest_missing_batches": "Batches inside open gaps",
    "cngmrv_ingest_alarms": "Tamper alarms recorded",
}


def read_state(ingest: Ingest) -> dict[str, float]:
    """The gauges :class:`Metrics` reads from the database, in one round of queries."""
    db = ingest.db
    (devices,) = db.one("SELECT count(*) FROM devices")
    gaps, missing = db.one("SELECT count(*), coalesce(sum(last_seq - first_seq + 1), 0) FROM gaps")
    (alarms,) = db.one("SELECT count(*) FROM alarms")
    return {
        "cngmrv_ingest_devices": float(devices),
        "cngmrv_ingest_open_gaps": float(gaps),
        "cngmrv_ingest_missing_batches": float(missing),
        "cngmrv_ingest_alarms": float(alarms),
    }


def _timed_accept(raw: bytes) -> Callable[[Ingest], tuple[int, dict[str, Any], float]]:
    def run(ingest: Ingest) -> tuple[int, dict[str, Any], float]:
        start = time.perf_counter()
        status, body = ingest.accept(raw)
        return status, body, time.perf_counter() - start

    return run


class IngestApp:
    """The ASGI application; one per worker process."""

    def __init__(
        self,
        db_target: str | Path,
        allowed_algs: Iterable[str] = ALLOWED_ALGS,
        pool_size: int = POOL_SIZE,
        db_deadline_s: float = DB_DEADLINE_S,
        retry_after_s: int = RETRY_AFTER_S,
        max_body: int = MAX_BODY,
        shared: Ingest | None = None,
        read_token: str | None = None,
    ) -> None:
        self.pool = Pool(db_target, allowed_algs, pool_size, db_deadline_s, shared)
        self.metrics = Metrics()
        self.retry_after_s = retry_after_s
        self.max_body = max_body
        self._read_auth = read_auth(read_token)

    def _operator(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization")
        return may_read(self._read_auth, None if header is None else header.decode("latin-1"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if sum(len(k) + len(v) + 4 for k, v in scope["headers"]) > MAX_HEADER_BYTES:
            await self._reply(
                send, 431, {"error": "headers_too_large", "max": MAX_HEADER_BYTES}, close=True
            )
        elif path == "/v1/batches":
            if method == "POST":
                await self._post_batch(scope, receive, send)
            else:
                await self._reply(send, 405, {"error": "method_not_allowed"})
        elif method != "GET":
            await self._reply(send, 405 if _known(path) else 404, _error_for(path))
        elif path == "/v1/health":
            await self._health(send, self._operator(scope))
        elif path == "/metrics":
            await self._metrics(send)
        elif path.startswith("/v1/devices/") and not self._operator(scope):
            await self._reply(
                send, 401, {"error": "unauthorized", "reason": "needs the read token"}
            )
        elif path.startswith("/v1/devices/"):
            await self._device(send, path.removeprefix("/v1/devices/"))
        else:
            await self._reply(send, 404, {"error": "not_found"})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.pool.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _reply(
        self,
        send: Send,
        status: int,
        obj: dict[str, Any],
        close: bool = False,
        retry_after: bool = False,
    ) -> None:
        body = json.dumps(obj).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        if retry_after:
            headers.append((b"retry-after", str(self.retry_after_s).encode()))
        if close:
            # The body was not read: the connection cannot carry another request.
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _unavailable(self, send: Send, e: DatabaseUnavailable) -> None:
        self.metrics.rejects.labels(code="unavailable").inc()
        log.warning("event=db_unavailable reason=%r", str(e))
        await self._reply(
            send,
            503,
            {"error": "unavailable", "reason": e.public},
            retry_after=True,
        )

    async def _post_batch(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"])
        if b"transfer-encoding" in headers:
            await self._reply(
                send, 411, {"error": "length_required", "reason": "send Content-Length"}, close=True
            )
            return
        try:
            length = int(headers.get(b"content-length", b""))
        except ValueError:
            await self._reply(send, 411, {"error": "length_required"}, close=True)
            return
        if length <= 0 or length > self.max_body:
            self.metrics.rejects.labels(code="bad_length").inc()
            await self._reply(send, 413, {"error": "bad_length", "max": self.max_body}, close=True)
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away (or missed the request deadline): nobody to answer
            body += message.get("body", b"")
            more = message.get("more_body", False)
        try:
            status, obj, took = await self.pool.run(_timed_accept(bytes(body)))
        except DatabaseUnavailable as e:
            await self._unavailable(send, e)
            return
        except Exception:
            log.exception("event=ingest_internal_error")
            await self._reply(send, 500, {"error": "internal"})
            return
        self.metrics.db_seconds.observe(took)
        self.metrics.count(status, obj)
        await self._reply(send, status, obj)

    async def _health(self, send: Send, operator: bool) -> None:
        try:
            await self.pool.run(lambda ingest: ingest.db.one("SELECT 1"))
        except DatabaseUnavailable as e:
            await self._reply(send, 503, {"status": "unavailable", "db": str(e)}, retry_after=True)
            return
        body: dict[str, Any] = {"status": "ok", "db": "ok", "pid": os.getpid()}
        if operator:
            body["counts"] = self.pool.counts()
        await self._reply(send, 200, body)

    async def _metrics(self, send: Send) -> None:
        state: dict[str, float] | None
        try:
            state = await self.pool.run(read_state)
        except DatabaseUnavailable:
            state = None
        body = self.metrics.exposition(state)
        from prometheus_client import CONTENT_TYPE_LATEST

        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", CONTENT_TYPE_LATEST.encode()),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _device(self, send: Send, device_id: str) -> None:
        try:
            found = await self.pool.run(lambda ingest: ingest.report(device_id))
        except DatabaseUnavailable as e:
            await self._unavailable(send, e)
            return
        if found:
            await self._reply(send, 200, found[0])
        else:
            await self._reply(send, 404, {"error": "not_found"})

    def close(self) -> None:
        self.pool.close()


def _known(path: str) -> bool:
    return path in ("/v1/health", "/metrics") or path.startswith("/v1/devices/")


def _error_for(path: str) -> dict[str, Any]:
    return {"error": "method_not_allowed" if _known(path) else "not_found"}


ENV_DB = "CNGMRV_INGEST_DB"
ENV_POOL = "CNGMRV_INGEST_POOL"
ENV_DB_DEADLINE = "CNGMRV_INGEST_DB_DEADLINE_S"
ENV_RETRY_AFTER = "CNGMRV_INGEST_RETRY_AFTER_S"
ENV_READ_TOKEN = "CNGMRV_INGEST_READ_TOKEN"


def app_from_env() -> IngestApp:
    """The app for one worker process, configured by the environment the server set.

    uvicorn starts each worker in a fresh interpreter and calls this factory
    there: ``CNGMRV_INGEST_DB`` (required), ``CNGMRV_INGEST_POOL``,
    ``CNGMRV_INGEST_DB_DEADLINE_S``, ``CNGMRV_INGEST_RETRY_AFTER_S``,
    ``CNGMRV_INGEST_READ_TOKEN`` (the operator's read token; unset: reading is off).
    """
    return IngestApp(
        os.environ[ENV_DB],
        pool_size=int(os.environ.get(ENV_POOL, POOL_SIZE)),
        db_deadline_s=float(os.environ.get(ENV_DB_DEADLINE, DB_DEADLINE_S)),
        retry_after_s=int(os.environ.get(ENV_RETRY_AFTER, RETRY_AFTER_S)),
        read_token=os.environ.get(ENV_READ_TOKEN) or None,
    )
