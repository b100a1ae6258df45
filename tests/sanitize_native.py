"""Sanitizer run of the integrator core: ``python tests/sanitize_native.py`` (``make sanitize``).

1. Builds ``cngmrv.native._integrator`` with AddressSanitizer and
   UndefinedBehaviorSanitizer (``CNGMRV_SANITIZE=1`` in build_integrator.py)
   into a temporary folder (or ``--out``) next to a copy of the package's
   Python files, so the normal extension in the checkout is never replaced.
2. Runs the integrator's property and closed-form tests against that build:
   ``PYTHONPATH`` puts the copy first, and the ASan runtime is preloaded into
   the Python process, which is not itself instrumented.  Leak detection is
   off there (the interpreter keeps memory until exit by design).  A test in
   the suite checks that the sanitized module really is the one loaded.
3. Builds ``tests/selftest_integrator.c`` with the same sanitizers as a standalone
   program and runs it with leak detection on.

Any sanitizer report aborts the process, so the exit status is non-zero.
Needs gcc (or CC) with libasan and libubsan.  A test program: it lives with
the tests and is not installed with the package.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
ROOT = TESTS_DIR.parent
NATIVE = ROOT / "native"
TESTS = ["tests/test_integrator.py", "tests/test_integrator_kinds.py"]


def _runtime(cc: str, lib: str) -> str:
    out = subprocess.run(
        [cc, f"-print-file-name={lib}"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if not os.path.isabs(out) or not os.path.exists(out):
        raise SystemExit(f"sanitize: {cc} has no {lib} (install the compiler's sanitizer runtime)")
    return out


def build_extension(out: Path) -> Path:
    sys.path.insert(0, str(NATIVE))
    import build_integrator  # the same declarations and flags as the real build

    pkg = out / "cngmrv" / "native"
    if out.exists():
        shutil.rmtree(out)
    pkg.mkdir(parents=True)
    for py in NATIVE.glob("*.py"):
        if py.name != "build_integrator.py":
            shutil.copy2(py, pkg / py.name)
    builder = build_integrator.make_builder(lambda name: str(NATIVE / name), sanitize=True)
    so = builder.compile(tmpdir=str(out / "tmp"), verbose=False)
    target = pkg / Path(so).name
    shutil.move(so, target)
    return target


def run_tests(out: Path, cc: str, pytest_args: list[str]) -> int:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(out), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["LD_PRELOAD"] = _runtime(cc, "libasan.so")
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=1:halt_on_error=1"
    env["UBSAN_OPTIONS"] = "halt_on_error=1:print_stacktrace=1"
    env["CNGMRV_EXPECT_SANITIZED"] = "1"
    env["CNGMRV_SANITIZED_BUILD"] = str(out)
    # --capture=sys: leave fd 2 alone, so a sanitizer report is printed, not
    # swallowed by pytest's capture file when the process aborts.
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--capture=sys"]
    cmd += [*TESTS, *pytest_args]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def run_selftest(out: Path, cc: str, iterations: int) -> int:
    exe = out / "selftest"
    flags = ["-O1", "-std=c99", "-Wall", "-Wextra", "-ffp-contract=off"]
    import build_integrator

    subprocess.run(
        [
            cc,
            *flags,
            *build_integrator.SANITIZE_FLAGS,
            "-I",
            str(NATIVE),
            str(TESTS_DIR / "selftest_integrator.c"),
            str(NATIVE / "integrator.c"),
            "-lm",
            "-o",
            str(exe),
        ],
        check=True,
    )
    env = dict(os.environ)
    env["ASAN_OPTIONS"] = "detect_leaks=1:abort_on_error=1:halt_on_error=1"
    env["UBSAN_OPTIONS"] = "halt_on_error=1:print_stacktrace=1"
    env.pop("LD_PRELOAD", None)
    return subprocess.run([str(exe), str(iterations)], env=env).returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="build folder to keep (default: a temporary one)")
    ap.add_argument("--selftest-iterations", type=int, default=3000)
    ap.add_argument("pytest_args", nargs="*", help="extra arguments for pytest")
    args = ap.parse_args()
    cc = os.environ.get("CC", "gcc")
    with tempfile.TemporaryDirectory(prefix="cngmrv-sanitize-") as tmp:
        out = args.out.resolve() if args.out else Path(tmp)
        so = build_extension(out)
        print(f"sanitize: built {so}")
        rc = run_tests(out, cc, args.pytest_args)
        if rc != 0:
            print(f"sanitize: tests failed under ASan/UBSan (exit {rc})", file=sys.stderr)
            return rc
        rc = run_selftest(out, cc, args.selftest_iterations)
        if rc != 0:
            print(f"sanitize: selftest failed under ASan/UBSan/LSan (exit {rc})", file=sys.stderr)
        return rc


if __name__ == "__main__":
    sys.exit(main())
