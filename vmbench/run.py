"""One run of the virtual bench: image, share, boots, results.

``run_bench()`` builds (or takes from the cache) the guest image, fills the
9p share the guest reads (the project as a wheelhouse, the tests, the shipped
``deploy/`` files, the real recording in candump format), boots the guest to
install the project and run ``hil_tests`` in it, cuts its power in the middle
of acquisition, boots it again to check the store, and gathers the figures the
guest tests left in the share into one result (``bench/vm_bench.py``'s JSON).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable
from email.parser import Parser
from pathlib import Path
from typing import Any, TextIO

from vmbench import guest, image
from vmbench.guest import VmBenchError

ROOT = Path(__file__).resolve().parent.parent
# The shared real recording, found as the tests find it (CNGMRV_SHARED_DATA, or beside the checkout).
RECORDING = Path("css-electronics") / "j1939-idle-127s.MF4"
# The guest's tools beside the agent (vmbench/guest/install.sh).
BENCH_REQUIREMENTS = ["pytest>=8"]
# The guest's pip platform: Debian bookworm's glibc 2.36, x86_64.
GUEST_PLATFORMS = {
    "amd64": [f"manylinux_2_{n}_x86_64" for n in (36, 35, 34, 31, 28, 27, 24, 17, 12, 5)]
    + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"],
    "arm64": [f"manylinux_2_{n}_aarch64" for n in (36, 35, 34, 31, 28, 27, 24, 17)]
    + ["manylinux2014_aarch64", "linux_aarch64"],
}
# The arm64 smoke's guest builds the project from its sdist: its build requirements
# (pyproject.toml's [build-system]) and the smoke's test tools come as wheels.
# cngmrv sim runs the office's ingest beside the agent, so the smoke installs the office too.
SMOKE_EXTRAS = ("office",)
SMOKE_REQUIREMENTS = ["setuptools>=68", "wheel", "cffi>=1.16", "pytest>=8", "hypothesis>=6.100"]
# The C integrator's tests and what they import, run in the arm64 guest.
SMOKE_TESTS = (
    "tests/test_integrator.py",
    "tests/test_integrator_kinds.py",
    "tests/integrator_helpers.py",
    "tests/conftest.py",
    "conftest.py",
    "pyproject.toml",
)
POWER_LOSS_MARK = "VMBENCH power-loss-ready"
# Seconds of the full 500 kbit/s mix played into vcan0 for bench/vm_full_load.py.
FULL_LOAD_S = 20.0

# The contract's keys (docs/hil-runbook.md), each null until a guest test reports it.
RESULT_KEYS = (
    "arch",
    "kernel",
    "hil_passed",
    "hil_failed",
    "hil_skipped",
    "replay_diesel_l",
    "agent_diesel_l",
    "replay_rpm_mean",
    "agent_rpm_mean",
    "agent_tx_frames",
    "watchdog_restarted",
    "power_loss_chain_ok",
    "full_load",
    "seconds",
)
FULL_LOAD_KEYS = (
    "agent_cpu_pct",
    "bare_cpu_pct",
    "candump_cpu_pct",
    "offered",
    "received",
    "dropped",
)


def recording_path() -> Path:
    shared = os.environ.get("CNGMRV_SHARED_DATA")
    return (Path(shared) if shared else ROOT.parent / "shared" / "data") / RECORDING


def run_bench(
    arch: str = "amd64", log: TextIO = sys.stderr, keep: Path | None = None
) -> dict[str, Any]:
    """The whole bench; the result has :data:`RESULT_KEYS` plus ``errors``, ``stage_seconds``.

    Never raises for a failing stage: the failure goes into ``errors`` as
    ``"[stage] message"``, so the caller can print the JSON and still fail.
    """
    result: dict[str, Any] = {k: None for k in RESULT_KEYS}
    result["full_load"] = {k: None for k in FULL_LOAD_KEYS}

    def suite(img: image.Image, work: Path) -> None:
        share = _prepared(work, arch, log, result, prepare_share)
        disk = work / "disk.qcow2"
        guest.make_disk(img, disk)
        (share / "phase").write_text("suite+power-loss\n")
        first = _boot(img, share, disk, work, 1, result, "suite_boot", log, POWER_LOSS_MARK)
        if first.killed_on is None:
            result["errors"].append(
                f"[suite] the guest never armed the power-loss test (exit {first.guest_rc})"
            )
        else:
            (share / "phase").write_text("after-power-loss\n")
            second = _boot(img, share, disk, work, 2, result, "power_loss_boot", log)
            check = _json(share / "results" / "power_loss.json")
            if check:
                result["power_loss_chain_ok"] = bool(check.get("chain_ok"))
                result["power_loss"] = check
            if second.guest_rc != 0:
                result["errors"].append(
                    f"[suite] the power-loss check failed in the guest (exit {second.guest_rc}); "
                    "see power_loss_check.log"
                )
        if result["hil_failed"]:
            result["errors"].append(
                f"[suite] {result['hil_failed']} guest test(s) failed: "
                + ", ".join(result["failed_tests"])
            )
        if first.guest_rc not in (0, None) and not result["hil_failed"]:
            result["errors"].append(f"[suite] the guest suite exited {first.guest_rc}")

    return _guest_run(arch, log, keep, result, suite)


def run_smoke(
    arch: str = "arm64", log: TextIO = sys.stderr, keep: Path | None = None
) -> dict[str, Any]:
    """The arm64 smoke (``make vm-bench-arm64``): one boot of the ``arch`` guest that builds
    the cffi extension natively and runs ``cngmrv sim --duration 60``, ``cngmrv verify``,
    ``cngmrv replay`` of the real recording and the C integrator's tests.

    The result: ``arch``, ``kernel``, ``hil_passed``/``hil_failed``/``hil_skipped`` (the
    integrator's tests), ``sim``, ``verify``, ``replay`` (their JSON), ``extension_machine``,
    ``errors``, ``stage_seconds`` and ``seconds``.
    """
    result: dict[str, Any] = {k: None for k in ("arch", "kernel", "hil_passed", "hil_failed")}
    result["hil_skipped"] = None

    def smoke(img: image.Image, work: Path) -> None:
        share = _prepared(work, arch, log, result, prepare_smoke_share)
        disk = work / "disk.qcow2"
        guest.make_disk(img, disk)
        (share / "phase").write_text("smoke\n")
        boot = _boot(img, share, disk, work, 1, result, "smoke_boot", log)
        results = share / "results"
        for name in ("sim", "verify", "replay"):
            result[name] = _json(results / f"{name}.json")
        machine = results / "extension_machine"
        if machine.exists():
            # e_machine of the extension the guest built: b7 00 is EM_AARCH64.
            result["extension_machine"] = machine.read_text().strip()
        if boot.guest_rc != 0:
            result["errors"].append(
                f"[suite] the smoke failed in the guest (exit {boot.guest_rc}); see smoke.log"
            )

    return _guest_run(arch, log, keep, result, smoke)


def _guest_run(
    arch: str,
    log: TextIO,
    keep: Path | None,
    result: dict[str, Any],
    body: Callable[[image.Image, Path], None],
) -> dict[str, Any]:
    """The frame of every run: the image (built or cached), a work folder, ``body(image, work)``,
    then the run's time and its guest logs kept (``keep``, else ``last-run-<arch>`` in the cache).

    A :class:`VmBenchError` from any stage lands in ``result["errors"]``, never raised.
    """
    result.update(errors=[], failed_tests=[], skipped_tests=[], stage_seconds={}, image_built=None)
    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f"cngmrv-vm-{arch}-", dir=keep))
    try:
        t0 = time.monotonic()
        try:
            img, built = image.ensure(arch, log)
        except image.ImageError as e:
            raise VmBenchError("image build", str(e).removeprefix("image build: ")) from e
        result["image_built"] = built
        result["stage_seconds"]["image"] = round(time.monotonic() - t0, 1)
        body(img, work)
    except VmBenchError as e:
        result["errors"].append(str(e))
    finally:
        # The whole run: with a cached image that is boots, install and suite only.
        result["seconds"] = round(time.monotonic() - t_start, 1)
        results = work / "share" / "results"
        if keep is None and results.exists():
            # The guest's logs outlive the run's folder: the last run's are kept in the cache.
            last = image.cache_root() / f"last-run-{arch}"
            shutil.rmtree(last, ignore_errors=True)
            shutil.copytree(results, last, dirs_exist_ok=True)
            for c in work.glob("console-*.log"):
                shutil.copy2(c, last / c.name)
            result["logs"] = str(last)
        elif keep is not None:
            result["logs"] = str(work)
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return result


def _prepared(
    work: Path,
    arch: str,
    log: TextIO,
    result: dict[str, Any],
    prepare: Callable[[Path, str, TextIO], None],
) -> Path:
    """The run's 9p share, filled by ``prepare`` (timed as the ``prepare`` stage)."""
    t0 = time.monotonic()
    share = work / "share"
    prepare(share, arch, log)
    result["stage_seconds"]["prepare"] = round(time.monotonic() - t0, 1)
    return share


def _boot(
    img: image.Image,
    share: Path,
    disk: Path,
    work: Path,
    n: int,
    result: dict[str, Any],
    stage: str,
    log: TextIO,
    kill_on: str | None = None,
) -> guest.Boot:
    """Boot ``n`` of the run (console ``console-<n>.log``), timed as ``stage``; the guest
    tests' results read into ``result`` after the first."""
    t0 = time.monotonic()
    boot = guest.boot(
        img, share, disk, work / f"console-{n}.log", kill_on=kill_on, on_line=_echo(log)
    )
    result["stage_seconds"][stage] = round(time.monotonic() - t0, 1)
    if n == 1:
        _read_suite(share / "results", result)
    return boot


def prepare_smoke_share(share: Path, arch: str, log: TextIO) -> None:
    """The arm64 smoke's share: guest scripts, the sdist, the tests, the recording, wheels."""
    share.mkdir(parents=True)
    shutil.copytree(Path(__file__).parent / "guest", share / "guest")
    src = share / "src"
    missing = [rel for rel in SMOKE_TESTS if not (ROOT / rel).is_file()]
    if missing:
        raise VmBenchError("install", f"the smoke's test files are missing: {', '.join(missing)}")
    for rel in SMOKE_TESTS:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    try:
        recording_to_candump(recording_path(), src / "recording.log")
    except Exception as e:
        raise VmBenchError(
            "install", f"could not convert the recording {recording_path()}: {e}"
        ) from e
    build = Path(tempfile.mkdtemp(prefix="sdist-", dir=share))
    try:
        r = subprocess.run(
            [sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(build)],
            cwd=source_copy(build / "tree"),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        sdists = list(build.glob("cngmrv-*.tar.gz"))
        if r.returncode != 0 or not sdists:
            raise VmBenchError("install", f"the project's sdist failed (exit {r.returncode})")
        shutil.move(str(sdists[0]), src / sdists[0].name)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    download_wheels(
        share / "wheelhouse",
        arch,
        sdist_requirements(src / sdists[0].name, SMOKE_EXTRAS) + SMOKE_REQUIREMENTS,
        log,
    )


def sdist_requirements(sdist: Path, extras: tuple[str, ...] = ()) -> list[str]:
    """The sdist's install requirements (egg-info ``requires.txt``), with those of ``extras``."""
    import tarfile

    with tarfile.open(sdist) as t:
        member = next(m for m in t.getmembers() if m.name.endswith(".egg-info/requires.txt"))
        f = t.extractfile(member)
        assert f is not None
        text = f.read().decode()
    base, *sections = text.split("\n[")
    out = [line.strip() for line in base.splitlines() if line.strip()]
    for section in sections:
        name, _, body = section.partition("]")
        if name in extras:
            out += [line.strip() for line in body.splitlines() if line.strip()]
    return out


def _echo(log: TextIO):  # type: ignore[no-untyped-def]
    def echo(line: str) -> None:
        if line.startswith("VMBENCH"):
            print(f"[vmbench] {line}", file=log, flush=True)

    return echo


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def _read_suite(results: Path, result: dict[str, Any]) -> None:
    for name in ("arch", "kernel"):
        p = results / name
        if p.exists():
            result[name] = p.read_text().strip()
    junit = results / "hil.xml"
    if junit.exists():
        passed = failed = skipped = 0
        for case in ET.parse(junit).getroot().iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            if case.find("failure") is not None or case.find("error") is not None:
                failed += 1
                result["failed_tests"].append(name)
            elif (skip := case.find("skipped")) is not None:
                skipped += 1
                result["skipped_tests"].append(f"{name}: {skip.get('message', '')}")
            else:
                passed += 1
        result.update(hil_passed=passed, hil_failed=failed, hil_skipped=skipped)
    else:
        result["errors"].append("[suite] the guest left no junit report (hil.xml)")
    # Each guest test that measures something leaves a JSON object of contract keys.
    for f in sorted(results.glob("figure-*.json")):
        figures = _json(f) or {}
        for k, v in figures.items():
            if k == "full_load":
                result["full_load"].update(v)
            else:
                result[k] = v


def prepare_share(share: Path, arch: str, log: TextIO) -> None:
    """The 9p share: guest scripts, the tests, deploy/, the recording, the wheelhouse."""
    share.mkdir(parents=True)
    shutil.copytree(Path(__file__).parent / "guest", share / "guest")
    src = share / "src"
    src.mkdir()
    for folder in ("hil_tests", "deploy"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "pyproject.toml", src / "pyproject.toml")
    try:
        recording_to_candump(recording_path(), src / "recording.log")
    except Exception as e:
        raise VmBenchError(
            "install", f"could not convert the recording {recording_path()}: {e}"
        ) from e
    (src / "bench").mkdir()
    shutil.copy2(ROOT / "bench" / "vm_full_load.py", src / "bench" / "vm_full_load.py")
    try:
        busload_to_candump(src / "busload.log", FULL_LOAD_S)
    except Exception as e:
        raise VmBenchError("install", f"could not make the full-load log: {e}") from e
    build_wheelhouse(share / "wheelhouse", arch, log)
    # For a quick look at a few guest tests (e.g. "-k systemd"); a full run sets nothing.
    if os.environ.get("CNGMRV_VM_PYTEST_ARGS"):
        (share / "pytest-args").write_text(os.environ["CNGMRV_VM_PYTEST_ARGS"])


def recording_to_candump(mf4: Path, out: Path) -> int:
    """The MF4 recording as a candump ``-L`` log for canplayer (channel ``vcan0``); frame count."""
    import can

    n = 0
    with can.LogReader(str(mf4)) as reader, can.Logger(str(out), channel="vcan0") as writer:
        for msg in reader:
            if msg.is_error_frame or msg.is_remote_frame:
                continue
            msg.channel = None
            writer.on_message_received(msg)
            n += 1
    if n == 0:
        raise ValueError("no frames in the recording")
    return n


def busload_to_candump(
    out: Path, seconds: float, bitrate: int = 500_000, load_pct: float = 100.0
) -> int:
    """``seconds`` of sim/busload.py's full J1939 mix (engine and other ECUs) as a candump log.

    The frames carry the wire's end-of-frame times, so canplayer spaces them as
    the bus would; returns the frame count.
    """
    import can

    from cngmrv.sim.busload import BackgroundTraffic, Wire
    from cngmrv.sim.ecu import TICK_S, EngineEcu
    from cngmrv.sim.vehicle import CityBus, CityBusParams, DriveCycle

    t0 = 1_700_000_000.0
    n = 0
    with can.Logger(str(out), channel="vcan0") as writer:

        def send(t: float, can_id: int, data: bytes) -> None:
            nonlocal n
            writer.on_message_received(
                can.Message(timestamp=t, arbitration_id=can_id, is_extended_id=True, data=data)
            )
            n += 1

        wire = Wire(bitrate, t0, send, BackgroundTraffic(t0, 1), load_pct)
        vehicle = CityBus(CityBusParams(), DriveCycle.brt(seconds + 60.0, 1))
        ecu = EngineEcu(None, vehicle, t0)  # type: ignore[arg-type]  # frames_due needs no bus
        for i in range(int(seconds / TICK_S)):
            for t, can_id, data in ecu.frames_due(i, vehicle.step(i * TICK_S)):
                wire.submit(t, can_id, data)
            wire.run_until(t0 + (i + 1) * TICK_S)
    return n


#: What a build from a copy of the checkout leaves out: version control, virtual
#: environments, caches and earlier builds' output.
NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv*",
    ".hypothesis",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    "*.so",
)


def source_copy(dest: Path, root: Path = ROOT) -> Path:
    """A copy of the checkout's source (``root``) in ``dest``, to build a wheel or an sdist from.

    setuptools builds in the source folder (``build/``, ``*.egg-info``): from the
    checkout itself it would leave those behind, where the tree's own checks read them
    as modules, and package whatever an earlier build left in ``build/lib``.
    """
    shutil.copytree(root, dest, ignore=NOT_SOURCE)
    return dest


def build_wheelhouse(out: Path, arch: str, log: TextIO) -> None:
    """The project's wheel (built here, its C extension by the host's compiler) and every
    dependency as a binary wheel for the guest's Python and platform."""
    out.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip"]
    with tempfile.TemporaryDirectory(prefix="wheel-src-") as tmp:
        r = subprocess.run(
            [
                *pip,
                "wheel",
                "--quiet",
                "--no-deps",
                "-w",
                str(out),
                str(source_copy(Path(tmp) / "src")),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    wheels = list(out.glob("cngmrv-*.whl"))
    if r.returncode != 0 or not wheels:
        raise VmBenchError("install", f"pip wheel of the project failed (exit {r.returncode})")
    download_wheels(out, arch, wheel_requirements(wheels[0]) + BENCH_REQUIREMENTS, log)


def download_wheels(out: Path, arch: str, requires: list[str], log: TextIO) -> None:
    """``requires`` and their dependencies as binary wheels for the guest's Python and ``arch``."""
    out.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    platforms: list[str] = []
    for p in GUEST_PLATFORMS[arch]:
        platforms += ["--platform", p]
    r = subprocess.run(
        [
            *pip,
            "download",
            "--quiet",
            "--only-binary=:all:",
            "--python-version",
            image.GUEST_PYTHON,
            "--implementation",
            "cp",
            *platforms,
            "-d",
            str(out),
            *requires,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    if r.returncode != 0:
        raise VmBenchError(
            "install",
            f"pip download of the dependencies for the guest (Python {image.GUEST_PYTHON}, "
            f"{arch}) failed (exit {r.returncode}): {' '.join(requires)}",
        )


def wheel_requirements(wheel: Path) -> list[str]:
    """The wheel's install requirements (its METADATA ``Requires-Dist`` without extras)."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        msg = Parser().parsestr(z.read(meta).decode())
    return [r for r in msg.get_all("Requires-Dist") or [] if "extra ==" not in r]
