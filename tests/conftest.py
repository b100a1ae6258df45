"""Shared fixtures: real keys, real stores, the CLI as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from cngmrv.signed import keys
from cngmrv.sim import pg_cluster

# No per-example deadline: the suite shares two cores with real-time runs, where
# a stall is the machine's and not the code's; speed is measured in bench/.
settings.register_profile("cngmrv", deadline=None)
settings.load_profile("cngmrv")


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    d = tmp_path / "keys"
    keys.generate(d)
    return d


@pytest.fixture
def signer(keydir: Path) -> keys.FileSigner:
    return keys.load_signer(keydir / keys.KEY_FILE)


CliResult = subprocess.CompletedProcess[str]


@pytest.fixture
def cli() -> Callable[..., CliResult]:
    """Run ``cngmrv ARGS`` in a subprocess, as a user would."""

    def run(*args: str, timeout: float = 120.0) -> CliResult:
        return subprocess.run(
            [sys.executable, "-m", "cngmrv.agent.cli", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


@pytest.fixture(scope="session")
def pg_cluster_session() -> Iterator[pg_cluster.Cluster]:
    """One throwaway PostgreSQL cluster for the session (cngmrv.sim.pg_cluster).

    Skips when no cluster can start here; with CNGMRV_REQUIRE_POSTGRES=1 (CI) that fails.
    """
    why = pg_cluster.unavailable()
    if why is not None:
        if os.environ.get("CNGMRV_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"CNGMRV_REQUIRE_POSTGRES=1 but {why}")
        pytest.skip(why)
    cluster = pg_cluster.Cluster()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pg_url(pg_cluster_session: pg_cluster.Cluster) -> str:
    """A fresh, empty database on the session's cluster: its postgresql:// URL."""
    if not pg_cluster_session.running:
        pg_cluster_session.start()
    return pg_cluster_session.new_database()
