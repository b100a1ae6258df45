"""What the built wheel installs: the package, and none of the test programs.

The crash harness (tests/crash_harness.py), the sanitizer driver
(tests/sanitize_native.py) and its C driver (tests/selftest_integrator.c) live
with the tests, which (like bench/) use them from the source tree.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from vmbench.run import source_copy

ROOT = Path(__file__).resolve().parent.parent
TEST_PROGRAMS = ("crash_harness", "sanitize_native", "selftest_integrator")
# What an earlier layout installed as test-only programs.
OLD_TEST_MODULES = ("cngmrv/sim/crash.py", "cngmrv/native/sanitize.py", "cngmrv/native/selftest.c")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    # From a copy: setuptools builds in the source folder, and this checkout may be in use.
    src = source_copy(out / "src")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0 and "No matching distribution" in proc.stderr:
        pytest.skip(f"pip cannot reach a package index here: {proc.stderr.strip()[-200:]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = out.glob("cngmrv-*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_installs_no_test_program(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    assert "cngmrv/sim/harness.py" in names and "cngmrv/native/integrator.c" in names
    offenders = [n for n in names if n in OLD_TEST_MODULES or any(t in n for t in TEST_PROGRAMS)]
    assert not offenders, offenders


def test_the_wheels_entry_points_are_the_cli_and_its_commands(wheel: zipfile.ZipFile) -> None:
    (ep,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    text = wheel.read(ep).decode()
    assert "crash" not in text and "sanitize" not in text and "selftest" not in text
