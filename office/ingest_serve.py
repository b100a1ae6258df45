"""Serving the ingest app: uvicorn with worker processes, and a light in-process server.

:func:`serve` is the production server (``cngmrv ingest``): uvicorn, several
worker processes, each listening on its own socket bound to the one address
(``SO_REUSEPORT``, :class:`OwnListener`) and holding its own pool of database
connections (:class:`cngmrv.office.ingest_app.Pool`).  TLS is the reverse
proxy's (deploy/office/nginx.conf).  :class:`IngestServer` runs the same app
and the same limits in a background thread, for the tests and ``cngmrv sim``.

Limits the server enforces before the app sees a request (docs/office.md):

- a whole request, from the connection's first byte (or the end of the
  previous response) to its last body byte, must arrive within
  :data:`REQUEST_DEADLINE_S`, whatever pace the client keeps: a client sending
  one byte every 20 s is cut off at the deadline;
- at most :data:`MAX_CONNECTIONS` open connections per worker; one more is
  answered 503 with ``Retry-After`` and closed;
- request line and headers at most
  :data:`~cngmrv.office.ingest_app.MAX_HEADER_BYTES`: h11 answers 400 when a
  header block still arriving passes it, the app 431 when it came whole;
- the body limit (the app's :data:`~cngmrv.office.ingest_app.MAX_BODY`) is
  checked on ``Content-Length`` before any byte of the body is read.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.supervisors import Multiprocess

from cngmrv.office.ingest import Ingest, IngestDB, open_db
from cngmrv.office.ingest_app import (
    DB_DEADLINE_S,
    ENV_DB,
    ENV_DB_DEADLINE,
    ENV_POOL,
    ENV_READ_TOKEN,
    ENV_RETRY_AFTER,
    MAX_HEADER_BYTES,
    POOL_SIZE,
    RETRY_AFTER_S,
    IngestApp,
)
from cngmrv.signed.keys import ALLOWED_ALGS

log = logging.getLogger("cngmrv.ingest")

REQUEST_DEADLINE_S = 30.0
MAX_CONNECTIONS = 1000  # per worker process
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this
BACKLOG = 2048  # connections each worker's socket holds before accepting them

ENV_REQUEST_DEADLINE = "CNGMRV_INGEST_REQUEST_DEADLINE_S"
ENV_MAX_CONNECTIONS = "CNGMRV_INGEST_MAX_CONNECTIONS"
ENV_RETRY = ENV_RETRY_AFTER

_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b'retry-after: %d\r\nconnection: close\r\ncontent-length: %d\r\n\r\n{"error": "busy"}'
)


class DeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for each whole request and a connection cap.

    uvicorn bounds the header size and the idle keep-alive time, but not the
    time a client may take to send a request: each byte restarts nothing, and
    nothing ends a connection that never completes its request.  This does.
    The class attributes override the environment (``CNGMRV_INGEST_*``), which
    is how the production server configures the protocol in every worker.
    """

    request_deadline_s: float | None = None
    max_connections: int | None = None
    retry_after_s: int | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        env = os.environ
        self._deadline_s = self.request_deadline_s or float(
            env.get(ENV_REQUEST_DEADLINE, REQUEST_DEADLINE_S)
        )
        self._max_conns = self.max_connections or int(env.get(ENV_MAX_CONNECTIONS, MAX_CONNECTIONS))
        self._retry_after = self.retry_after_s or int(env.get(ENV_RETRY, RETRY_AFTER_S))
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self._max_conns:
            body = b'{"error": "busy"}'
            transport.write(_BUSY % (self._retry_after, len(body)))
            log.warning(
                "event=connection_refused reason=max_connections open=%d", len(self.connections)
            )
            transport.close()
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE and self.conn.their_state is not h11.SEND_BODY:
            self._disarm()  # the request is in (or the connection is ending): the app has it

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection gets its own deadline

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self._deadline_s, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        state = self.conn.their_state
        if state is h11.IDLE or state is h11.SEND_BODY:
            log.warning(
                "event=request_deadline client=%s state=%s after_s=%g",
                self.client,
                state.__name__ if hasattr(state, "__name__") else state,
                self._deadline_s,
            )
            self.transport.close()


def _free_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class OwnListener(socket.socket):
    """The address every worker listens on; handed to a worker, its own listening socket.

    uvicorn's supervisor gives each worker the socket it passes them, pickled.
    One socket shared by every worker wakes them all for a new connection, and
    the first awake accepts every connection waiting: a burst of keep-alive
    connections (a reverse proxy's upstream pool, a load test's clients) all
    land on one worker, which then does all the work on one core while the
    others idle.  This socket only reserves the address in the supervisor
    (bound with ``SO_REUSEPORT``, never listening); unpickled in a worker it
    becomes a socket of the worker's own, bound to the same address with
    ``SO_REUSEPORT`` and listening, and the kernel spreads new connections over
    the workers' sockets.  A worker that exits takes its socket with it, so a
    restarted or added worker (SIGHUP, SIGTTIN) simply binds its own.
    """

    backlog = 2048

    @classmethod
    def reserve(cls, host: str, port: int, backlog: int) -> OwnListener:
        """Bind ``host:port`` (port 0: a free one) for the workers; raises OSError if taken."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = cls(family, socket.SOCK_STREAM)
        sock.backlog = backlog
        try:
            _reuse_port(sock)
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        return sock

    def __reduce__(self) -> tuple[Any, ...]:
        return (_listen_own, (self.family, self.getsockname()[:2], self.backlog))


def _reuse_port(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)


def _listen_own(family: int, address: tuple[str, int], backlog: int) -> socket.socket:
    # In a worker: its own socket on the supervisor's address (OwnListener).
    sock = socket.socket(family, socket.SOCK_STREAM)
    _reuse_port(sock)
    sock.bind(address)
    sock.listen(backlog)
    return sock


class IngestServer:
    """The ingest app on uvicorn in a background thread; ``url`` is where to POST batches.

    One process, the same app and the same protocol limits as the production
    server, for the tests and ``cngmrv sim``.  ``db`` and ``ingest`` are a
    separate connection and :class:`Ingest` on the same database, for callers
    that register devices or read back what was stored.
    """

    def __init__(
        self,
        db_target: str | Path,
        host: str = "127.0.0.1",
        port: int = 0,
        allowed_algs: Iterable[str] = ALLOWED_ALGS,
        *,
        request_deadline_s: float = REQUEST_DEADLINE_S,
        max_connections: int = MAX_CONNECTIONS,
        db_deadline_s: float = DB_DEADLINE_S,
        retry_after_s: int = RETRY_AFTER_S,
        pool_size: int = POOL_SIZE,
        read_token: str | None = None,
        migrate: bool = False,
    ) -> None:
        self.db: IngestDB = open_db(db_target, migrate=migrate)
        self.ingest = Ingest(self.db, allowed_algs, read_token)
        try:
            self._sock = _free_socket(host, port)
        except OSError:
            self.db.close()
            raise
        self.app = IngestApp(
            db_target,
            allowed_algs,
            pool_size,
            db_deadline_s,
            retry_after_s,
            shared=self.ingest,
            read_token=read_token,
        )
        protocol = type(
            "DeadlineProtocol",
            (DeadlineProtocol,),
            {
                "request_deadline_s": request_deadline_s,
                "max_connections": max_connections,
                "retry_after_s": retry_after_s,
            },
        )
        config = uvicorn.Config(
            self.app,
            http=protocol,
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_keep_alive=KEEP_ALIVE_S,
            timeout_graceful_shutdown=1,
            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
            server_header=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.serve_forever, name="ingest", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"http://{host!s}:{port}/v1/batches"

    def start(self, timeout: float = 10.0) -> IngestServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the in-process ingest server did not start")
            time.sleep(0.01)
        return self

    def serve_forever(self) -> None:
        self._server.run(sockets=[self._sock])

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(10)
        self._sock.close()
        self.app.close()
        self.db.close()


def _fresh_metrics_dir() -> Path:
    # Counters of an earlier run must not be summed into this one's.
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for f in path.glob("*.db"):
            f.unlink()
        return path
    path = Path(tempfile.mkdtemp(prefix="cngmrv-ingest-metrics-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return path


def serve(
    db_target: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    workers: int = 2,
    *,
    request_deadline_s: float = REQUEST_DEADLINE_S,
    max_connections: int = MAX_CONNECTIONS,
    db_deadline_s: float = DB_DEADLINE_S,
    retry_after_s: int = RETRY_AFTER_S,
    pool_size: int = POOL_SIZE,
    forwarded_allow_ips: str | None = None,
    read_token: str | None = None,
) -> None:
    """Run the production server until SIGTERM or SIGINT (``cngmrv ingest``).

    The database is opened (and its schema brought up to date) once here,
    before any worker starts, so a wrong URL or an unreachable database is one
    clear error at start.  The workers read their configuration from the
    environment this sets (uvicorn starts them as fresh interpreters).
    """
    open_db(db_target).close()
    made_metrics_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    metrics_dir = _fresh_metrics_dir()
    os.environ.update(
        {
            ENV_DB: db_target,
            ENV_POOL: str(pool_size),
            ENV_DB_DEADLINE: str(db_deadline_s),
            ENV_RETRY_AFTER: str(retry_after_s),
            ENV_REQUEST_DEADLINE: str(request_deadline_s),
            ENV_MAX_CONNECTIONS: str(max_connections),
        }
    )
    # The workers are this process's children: the token goes to them, never to a file.
    if read_token:
        os.environ[ENV_READ_TOKEN] = read_token
    else:
        os.environ.pop(ENV_READ_TOKEN, None)
    config = uvicorn.Config(
        "cngmrv.office.ingest_app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        http="cngmrv.office.ingest_serve:DeadlineProtocol",
        loop="auto",  # uvloop (the office install's), else asyncio's own
        timeout_keep_alive=KEEP_ALIVE_S,
        timeout_graceful_shutdown=10,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        backlog=BACKLOG,
        server_header=False,
        access_log=False,
        proxy_headers=forwarded_allow_ips is not None,
        forwarded_allow_ips=forwarded_allow_ips,
    )
    listener: OwnListener | None = None
    try:
        listener = OwnListener.reserve(host, port, BACKLOG)
        log.info(
            "event=ingest_listening address=%s:%d workers=%d",
            host,
            listener.getsockname()[1],
            workers,
        )
        Multiprocess(config, sockets=[listener]).run()
    except KeyboardInterrupt:
        pass
    finally:
        if listener is not None:
            listener.close()
        if made_metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
