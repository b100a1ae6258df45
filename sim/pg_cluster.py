"""A throwaway PostgreSQL cluster: initdb + pg_ctl in a temporary folder.

The one way the test suite (tests/conftest.py) and the benchmarks (bench/)
start a PostgreSQL server of their own.  The agent never imports it.

The server listens on a unix socket in that folder only (no TCP port), with
trust authentication; fsync off unless ``durable=True`` (a benchmark that
should pay for durable commits as a production server does).  PostgreSQL refuses to run as root, so when
the tests run as root (CI does) the cluster runs as the system user
``cngmrv-pg``, created with ``useradd`` if missing; the binaries are started
with ``subprocess``'s ``user``/``group``, not through a shell.

The binaries are found through ``pg_config --bindir`` or
``/usr/lib/postgresql/*/bin`` (newest first).  Without them (or without
psycopg) :func:`unavailable` says why; the fixture then skips, or fails when
``CNGMRV_REQUIRE_POSTGRES=1`` (CI).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PG_USER = "cngmrv-pg"
PORT = 5432  # only names the socket file in the private folder


def bindir() -> Path | None:
    candidates = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        if out.returncode == 0:
            candidates.append(out.stdout.strip())
    candidates += sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0,
        reverse=True,
    )
    for c in candidates:
        if (Path(c) / "initdb").is_file() and (Path(c) / "pg_ctl").is_file():
            return Path(c)
    return None


def unavailable() -> str | None:
    """Why no cluster can be started here, or None."""
    try:
        import psycopg  # type: ignore[import-not-found]  # noqa: F401
        import psycopg_pool  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return "psycopg and psycopg_pool are not installed (pip install 'cngmrv[office]')"
    if bindir() is None:
        return (
            "no PostgreSQL server binaries (initdb, pg_ctl) in `pg_config --bindir` or "
            "/usr/lib/postgresql/*/bin: apt-get install postgresql"
        )
    if os.geteuid() == 0 and not shutil.which("useradd"):
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            return f"running as root without useradd to create the user {PG_USER}"
    return None


class Cluster:
    """One running cluster; :meth:`new_database` hands out a fresh database's URL.

    ``settings`` are added to its postgresql.conf (e.g. ``{"shared_buffers": "256MB"}``).
    """

    def __init__(self, durable: bool = False, settings: Mapping[str, str] | None = None) -> None:
        self.bin = bindir()
        assert self.bin is not None
        self.root = Path(tempfile.mkdtemp(prefix="cngmrv-pg-"))
        self.data = self.root / "data"
        self.sock = self.root / "sock"
        self.sock.mkdir()
        self._as: dict[str, Any] = {}
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam(PG_USER)
            except KeyError:
                subprocess.run(
                    ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                     "--user-group", PG_USER],
                    check=True, capture_output=True,
                )  # fmt: skip
                pw = pwd.getpwnam(PG_USER)
            for p in (self.root, self.sock):
                os.chown(p, pw.pw_uid, pw.pw_gid)
            self._as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        self._n = 0
        self._pg(
            "initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
            "--locale=C", "--no-sync",
        )  # fmt: skip
        # In the cluster's own config, so a restart (stop/start) keeps the private socket.
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"unix_socket_directories = '{self.sock}'\nlisten_addresses = ''\nport = {PORT}\n"
                "max_connections = 200\n"
            )
            if not durable:
                conf.write("fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")
            for name, value in (settings or {}).items():
                conf.write(f"{name} = '{value}'\n")
        self.start()

    def _pg(self, tool: str, *args: str) -> None:
        assert self.bin is not None
        r = subprocess.run(
            [str(self.bin / tool), *args],
            capture_output=True,
            text=True,
            cwd=self.root,
            timeout=120,
            **self._as,
        )
        if r.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{tool} failed: {r.stdout}{r.stderr}{tail}")

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@/{dbname}?host={self.sock}&port={PORT}"

    def new_database(self) -> str:
        import psycopg

        self._n += 1
        name = f"t{os.getpid()}_{self._n}"
        with psycopg.connect(self.url(), autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        """Stop the server (fast: open sessions are ended); :meth:`start` starts it again."""
        self._pg("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        self.running = False

    def start(self) -> None:
        self._pg(
            "pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-t", "60",
            "start",
        )  # fmt: skip
        self.running = True

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def destroy(self) -> None:
        try:
            if self.running:
                self._pg("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
