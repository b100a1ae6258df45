"""The bus's install carries no office: what it pulls, and what the agent imports.

Two installs come from one distribution (setup.py): ``pip install cngmrv``
for the bus and ``pip install 'cngmrv[office]'`` for the fleet's back office.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cngmrv.agent import cli

ROOT = Path(__file__).resolve().parent.parent
BUS_FOLDERS = ("agent", "drivers", "native", "signed")
# What only the office needs; none of it may reach a bus.
OFFICE_ONLY = (
    "matplotlib", "psycopg", "psycopg-pool", "psycopg_pool", "uvicorn", "gunicorn", "openpyxl",
    "et-xmlfile", "tomlkit", "prometheus-client", "prometheus_client",
)  # fmt: skip


def _commands(parser: argparse.ArgumentParser) -> set[str]:
    return {
        name
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for name in action.choices
    }


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("folder", BUS_FOLDERS)
def test_bus_code_never_imports_the_office_or_the_simulator(folder: str) -> None:
    offenders = {
        f"{p.relative_to(ROOT)}: {name}"
        for p in (ROOT / folder).rglob("*.py")
        for name in _imports(p)
        if name.startswith(("cngmrv.office", "cngmrv.sim", "matplotlib"))
    }
    assert not offenders, sorted(offenders)


def test_signed_imports_neither_side() -> None:
    offenders = {
        f"{p.name}: {name}"
        for p in (ROOT / "signed").rglob("*.py")
        for name in _imports(p)
        if name.startswith(("cngmrv.agent", "cngmrv.office", "cngmrv.sim", "cngmrv.drivers"))
    }
    assert not offenders, sorted(offenders)


def test_builtin_commands_are_the_parser_without_plugins() -> None:
    parser = cli.build_parser(plugins=False)
    assert _commands(parser) == cli._BUILTIN


def test_the_agents_entry_point_loads_no_office_module() -> None:
    # A fresh interpreter, as `cngmrv run` starts: the CLI as main() builds it for a
    # built-in command, then the service and runtime it runs.
    code = (
        "import sys\n"
        "from cngmrv.agent import cli, service, runtime\n"
        "cli.build_parser(plugins=cli._first_word(['run', '--config', 'x']) not in cli._BUILTIN)\n"
        "print(sorted(m for m in sys.modules if m.startswith(('cngmrv.office', 'cngmrv.sim',"
        " 'matplotlib', 'psycopg', 'uvicorn', 'prometheus_client'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.replace("'", '"')) == []


def test_office_commands_are_still_offered() -> None:
    parser = cli.build_parser()
    assert {"ingest", "report", "sfc-ref", "sim"} <= _commands(parser)


def test_bus_install_resolves_without_office_packages(tmp_path: Path) -> None:
    # pip's own resolver, asked what `pip install .` would bring into an empty
    # environment; nothing is installed.
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--dry-run",
            "--ignore-installed",
            "--report",
            str(report),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0 and "No matching distribution" in proc.stderr:
        pytest.skip(f"pip cannot reach a package index here: {proc.stderr.strip()[-200:]}")
    assert proc.returncode == 0, proc.stderr
    names = {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}
    assert "cngmrv" in names
    assert not names & set(OFFICE_ONLY), sorted(names & set(OFFICE_ONLY))


def test_an_office_command_on_the_bus_install_names_the_missing_package(tmp_path: Path) -> None:
    # sys.modules[name] = None is Python's own way to make that import fail, as on a bus
    # install without the office extra (h11 comes with uvicorn).
    code = (
        "import sys; sys.modules['h11'] = None\n"
        "from cngmrv.agent.cli import main\n"
        f"main(['sim', '--duration', '1', '--workdir', {str(tmp_path)!r}])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert "needs the Python package 'h11'" in out.stderr
    assert "pip install 'cngmrv[office]'" in out.stderr
