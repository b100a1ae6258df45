"""The environment the benchmarks run the agent process in: cngmrv as a bus gets it.

``pip install .`` into a virtual environment of its own, with nothing from
the ``test`` extra: the agent's memory then counts only what it imports on a
bus.  (In the development environment python-can finds asammdf, installed for
the MF4 replay tests, and imports it with pandas and numpy on ``import can``:
some 60 MB no bus carries.)

It is a copy, not an editable install, so it is made again whenever the
sources it was made from change (a hash of them is kept beside it).
``python bench/agent_env.py`` makes or refreshes it and prints its interpreter.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / ".venv-agent"


# The folders setup.py installs: the ones that are packages.
SOURCES = tuple(sorted(d.name for d in ROOT.iterdir() if (d / "__init__.py").is_file()))


def sources_hash() -> str:
    h = hashlib.sha256((ROOT / "setup.py").read_bytes())
    for folder in SOURCES:
        for f in sorted((ROOT / folder).rglob("*")):
            if f.suffix in (".py", ".c", ".h", ".dbc", ".toml") and f.is_file():
                h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def agent_python(refresh: bool = False) -> str:
    """The interpreter of the agent-only environment, made first if missing or stale.

    Two benchmarks started together (the soak beside the full-load run) take
    turns here, so both find the environment made, and made once.  The lock
    covers the check and the remake, not the runs: a benchmark started after
    the sources changed still remakes it under one that is running.
    """
    python = DEFAULT / "bin" / "python"
    stamp = DEFAULT / "cngmrv-sources.sha256"
    want = sources_hash()
    with open(ROOT / ".venv-agent.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if refresh or not python.exists() or not stamp.exists() or stamp.read_text() != want:
            venv.EnvBuilder(with_pip=True, clear=True).create(DEFAULT)
            subprocess.run(
                [str(python), "-m", "pip", "install", "--quiet", str(ROOT)],
                check=True,
                stdout=sys.stderr,
            )
            stamp.write_text(want)
    return str(python)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark that runs the agent takes to choose its interpreter."""
    who = parser.add_mutually_exclusive_group()
    who.add_argument("--agent-python", help="interpreter for the agent (default: agent-only venv)")
    who.add_argument(
        "--same-python",
        action="store_true",
        help="run the agent with this interpreter, not the agent-only environment",
    )


def chosen_python(args: argparse.Namespace) -> str:
    """The interpreter :func:`add_arguments`' options name (making the venv if needed)."""
    if args.same_python:
        return sys.executable
    return args.agent_python or agent_python()


if __name__ == "__main__":
    print(agent_python(refresh="--refresh" in sys.argv))
