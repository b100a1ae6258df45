"""Boot the guest under qemu, follow its console, and stop it: the host's side of one boot.

The guest reports its progress on the serial console as ``VMBENCH stage=<name>``
lines (vmbench/guest/entry.sh).  Each stage has its own time limit; a guest
that passes none is killed, and the error names the stage it was in and shows
the console's last lines, so a hang in the kernel, in systemd, in the install
or in a test reads differently.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vmbench.image import Image

# Seconds each stage may take under TCG on a 2-core host shared with other work
# (a load of 8 makes everything three to four times slower than on a quiet one);
# the first stage ("boot") runs from qemu's start to the bench unit's first line.
STAGE_LIMITS_S = {
    "boot": 600.0,
    "boot-ok": 120.0,
    "install": 1200.0,
    "suite": 1800.0,
    "full-load": 600.0,
    "power-loss-arm": 600.0,
    "power-loss-check": 600.0,
    "smoke-install": 2400.0,
    "smoke": 1800.0,
}
SHUTDOWN_LIMIT_S = 120.0
# systemd's colours and cursor moves on the console, left out of the lines kept.
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1bM|\r")


class VmBenchError(RuntimeError):
    """A stage of the bench failed: ``stage`` is one of image build, boot, install, suite."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"[{stage}] {message}")
        self.stage = stage


# The guest's stage names, mapped to the bench's four.
def bench_stage(guest_stage: str) -> str:
    if guest_stage in ("boot", "boot-ok"):
        return "boot"
    if guest_stage in ("install", "smoke-install"):
        return "install"
    return "suite"


@dataclass
class Boot:
    """What one boot showed: the stages reached, the exit code the guest reported, its console."""

    stages: list[str] = field(default_factory=list)
    guest_rc: int | None = None
    console: Path | None = None
    killed_on: str | None = None
    seconds: float = 0.0


# Per guest arch: qemu's binary and its Debian package, the machine, the serial console.
# arm64 is a Cortex-A72, the CPU of a Raspberry Pi 4.
MACHINES = {
    "amd64": ("qemu-system-x86_64", "qemu-system-x86", [], "ttyS0"),
    "arm64": (
        "qemu-system-aarch64",
        "qemu-system-arm",
        ["-M", "virt", "-cpu", "cortex-a72"],
        "ttyAMA0",
    ),
}
# TCG emulates another architecture more slowly than its own: the stage limits scale.
SLOWDOWN = {"amd64": 1.0, "arm64": 3.0}


def qemu_command(image: Image, share: Path, disk: Path, accel: str = "tcg") -> list[str]:
    binary, package, machine, console = MACHINES[image.arch]
    qemu = shutil.which(binary)
    if qemu is None:
        raise VmBenchError("boot", f"{binary} not found: install the Debian package {package}")
    return [
        qemu,
        *machine,
        "-accel",
        accel,
        "-m",
        "1024",
        "-smp",
        "1",
        "-nographic",
        "-no-reboot",
        "-monitor",
        "none",
        "-serial",
        "stdio",
        "-kernel",
        str(image.kernel),
        "-initrd",
        str(image.initrd),
        "-append",
        f"root=/dev/vda rw console={console} panic=-1 loglevel=4 systemd.show_status=1"
        f" systemd.mask=serial-getty@{console}.service",
        "-drive",
        f"file={disk},if=virtio,format=qcow2",
        "-virtfs",
        f"local,path={share},mount_tag=bench,security_model=none,id=bench",
        "-nic",
        "none",
    ]


def make_disk(image: Image, disk: Path) -> None:
    """A copy-on-write overlay of the cached image: the guest never changes the cache."""
    r = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image.root), "-F", "raw", str(disk)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise VmBenchError("boot", f"qemu-img create failed: {r.stderr.strip()}")


def boot(
    image: Image,
    share: Path,
    disk: Path,
    console: Path,
    kill_on: str | None = None,
    on_line: Callable[[str], None] | None = None,
) -> Boot:
    """Boot once and wait for the guest to power off (or for ``kill_on`` on its console).

    ``kill_on``: a console line at which qemu is killed with SIGKILL, the
    guest's power cut.  Raises :class:`VmBenchError` when a stage overruns.
    """
    result = Boot(console=console)
    tail: deque[str] = deque(maxlen=25)
    stage = "boot"
    slow = SLOWDOWN[image.arch]
    deadline = time.monotonic() + STAGE_LIMITS_S[stage] * slow
    lock = threading.Lock()
    t0 = time.monotonic()
    proc = subprocess.Popen(
        qemu_command(image, share, disk),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    assert proc.stdout is not None

    def read() -> None:
        nonlocal stage, deadline
        assert proc.stdout is not None
        with open(console, "ab") as out:
            for raw in proc.stdout:
                out.write(raw)
                out.flush()
                line = ANSI.sub("", raw.decode(errors="replace")).rstrip("\r\n")
                # journald's copy on the console comes prefixed ("[ 52.6] sh[226]: VMBENCH ...").
                at = line.find("VMBENCH ")
                if at > 0:
                    line = line[at:]
                with lock:
                    tail.append(line)
                    if line.startswith("VMBENCH stage="):
                        name = line.removeprefix("VMBENCH stage=").split()[0]
                        result.stages.append(name)
                        stage = name
                        deadline = time.monotonic() + STAGE_LIMITS_S.get(name, 600.0) * slow
                    elif line.startswith("VMBENCH done rc="):
                        result.guest_rc = int(line.removeprefix("VMBENCH done rc="))
                        stage = "shutdown"
                        deadline = time.monotonic() + SHUTDOWN_LIMIT_S * slow
                if on_line is not None:
                    on_line(line)
                if kill_on is not None and line.strip() == kill_on:
                    result.killed_on = kill_on
                    _kill(proc)

    reader = threading.Thread(target=read, name="qemu-console", daemon=True)
    reader.start()
    try:
        while proc.poll() is None:
            time.sleep(0.5)
            with lock:
                late = time.monotonic() > deadline
                where = stage
            if late:
                _kill(proc)
                reader.join(5.0)
                raise VmBenchError(
                    bench_stage(where) if where != "shutdown" else "suite",
                    f"guest hung in its {where!r} stage (over its limit of "
                    f"{STAGE_LIMITS_S.get(where, SHUTDOWN_LIMIT_S) * slow:.0f} s), killed; "
                    f"console ({console}) ends:\n" + "\n".join(tail),
                )
    finally:
        if proc.poll() is None:
            _kill(proc)
    reader.join(10.0)
    result.seconds = time.monotonic() - t0
    if result.killed_on is None and result.guest_rc is None:
        where = result.stages[-1] if result.stages else "boot"
        raise VmBenchError(
            bench_stage(where),
            f"qemu exited (status {proc.returncode}) in the guest's {where!r} stage "
            f"before it reported; console ({console}) ends:\n" + "\n".join(tail),
        )
    return result


def _kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
