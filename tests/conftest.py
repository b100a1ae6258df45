"""Shared fixtures: real keys, real stores, the CLI as a subprocess."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import settings

from cngmrv.signed import keys

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
