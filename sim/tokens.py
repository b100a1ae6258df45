"""Software PKCS#11 tokens for tests and benchmarks: SoftHSM2, and a software TPM 2.0.

Each is a context manager that makes an initialised token with a user PIN in
a folder of its own and yields its PKCS#11 module, or raises
:class:`TokenUnavailable` saying which Debian package is missing.  The
token's settings reach the module through environment variables, which the
module reads once, when it is first loaded into a process: make the token
before anything in the process opens that module.

- SoftHSM2 (``softhsm2``): ``SOFTHSM2_CONF`` names a config whose token folder is ours.
- A software TPM (``swtpm``, ``tpm2-abrmd``, ``libtss2-tcti-tabrmd0``,
  ``libtpm2-pkcs11-1``, ``libtpm2-pkcs11-tools``, ``dbus``): swtpm on two
  free loopback ports, the tpm2-abrmd resource manager on a private D-Bus
  session bus (tpm2-pkcs11 alone runs the TPM out of object contexts), and a
  tpm2-pkcs11 store made by ``tpm2_ptool``.  Every process started here is
  stopped on exit.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SOFTHSM_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
TPM2_MODULES = (
    Path("/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so"),
    Path("/usr/lib/aarch64-linux-gnu/pkcs11/libtpm2_pkcs11.so"),
    Path("/usr/lib/arm-linux-gnueabihf/pkcs11/libtpm2_pkcs11.so"),
)
_SO_PIN = "13579024"


class TokenUnavailable(Exception):
    """A part the token needs is not installed; the message names the Debian package."""


@contextmanager
def softhsm_token(folder: Path, label: str, pin: str) -> Iterator[Path]:
    """A SoftHSM2 token ``label`` in ``folder``; yields the module. Sets ``SOFTHSM2_CONF``."""
    util = shutil.which("softhsm2-util")
    if util is None or not SOFTHSM_MODULE.is_file():
        raise TokenUnavailable("SoftHSM2 is not installed (Debian package softhsm2)")
    (folder / "tokens").mkdir(parents=True)
    conf = folder / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {folder / 'tokens'}\nobjectstore.backend = file\n"
        "log.level = ERROR\n"
    )
    before = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    try:
        subprocess.run(
            [util, "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", _SO_PIN],
            check=True,
            capture_output=True,
        )
        yield SOFTHSM_MODULE
    finally:
        _restore("SOFTHSM2_CONF", before)


def _restore(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _free_port_pair() -> int:
    """A loopback port p with p + 1 free too: the swtpm TCTI finds the control port at p + 1."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return int(port)
    raise TokenUnavailable("no two adjacent free loopback ports for swtpm")


def _wait_for_port(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TokenUnavailable(f"swtpm did not listen on 127.0.0.1:{port}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def swtpm_token(folder: Path, label: str, pin: str) -> Iterator[Path]:
    """A tpm2-pkcs11 token ``label`` on a software TPM in ``folder``; yields the module.

    Sets ``TPM2_PKCS11_TCTI``, ``TPM2_PKCS11_STORE`` and ``TPM2TOOLS_TCTI`` while open.
    """
    module = next((m for m in TPM2_MODULES if m.is_file()), None)
    tools = {n: shutil.which(n) for n in ("swtpm", "tpm2-abrmd", "dbus-daemon", "tpm2_ptool")}
    missing = [n for n, p in tools.items() if p is None]
    if module is None:
        missing.append("libtpm2-pkcs11-1")
    if not list(Path("/usr/lib").glob("*/libtss2-tcti-tabrmd.so.0")):
        missing.append("libtss2-tcti-tabrmd0")
    if missing or module is None:
        raise TokenUnavailable(
            "a software TPM needs Debian packages swtpm, tpm2-abrmd, libtss2-tcti-tabrmd0, "
            f"libtpm2-pkcs11-1, libtpm2-pkcs11-tools and dbus (missing: {', '.join(missing)})"
        )
    state, store = folder / "state", folder / "store"
    state.mkdir(parents=True)
    store.mkdir()
    server = _free_port_pair()
    ctrl = server + 1
    procs: list[subprocess.Popen[bytes]] = []
    env_names = (
        "TPM2_PKCS11_TCTI",
        "TPM2_PKCS11_STORE",
        "TPM2TOOLS_TCTI",
        "DBUS_SESSION_BUS_ADDRESS",
    )
    before = {n: os.environ.get(n) for n in env_names}
    dbus_pid = None
    log = (folder / "tpm2-abrmd.log").open("wb")  # why the resource manager died, if it did
    try:
        procs.append(
            subprocess.Popen(
                [
                    str(tools["swtpm"]),
                    "socket",
                    "--tpm2",
                    "--tpmstate",
                    f"dir={state}",
                    "--server",
                    f"type=tcp,port={server},bindaddr=127.0.0.1",
                    "--ctrl",
                    f"type=tcp,port={ctrl},bindaddr=127.0.0.1",
                    "--flags",
                    "not-need-init,startup-clear",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        _wait_for_port(server, time.monotonic() + 10)
        bus = subprocess.run(
            [
                str(tools["dbus-daemon"]),
                "--session",
                "--fork",
                "--print-address=1",
                "--print-pid=1",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        address, dbus_pid = bus[0], int(bus[1])
        env = {**os.environ, "DBUS_SESSION_BUS_ADDRESS": address}
        os.environ["DBUS_SESSION_BUS_ADDRESS"] = address
        abrmd = [
            str(tools["tpm2-abrmd"]),
            "--session",
            f"--tcti=swtpm:host=127.0.0.1,port={server}",
        ]
        if os.geteuid() == 0:
            abrmd.append("--allow-root")
        procs.append(subprocess.Popen(abrmd, env=env, stdout=subprocess.DEVNULL, stderr=log))
        os.environ["TPM2_PKCS11_TCTI"] = os.environ["TPM2TOOLS_TCTI"] = "tabrmd:bus_type=session"
        os.environ["TPM2_PKCS11_STORE"] = str(store)
        ptool = str(tools["tpm2_ptool"])
        deadline = time.monotonic() + 20
        while True:  # tpm2-abrmd takes a moment to claim its bus name
            init = subprocess.run(
                [ptool, "init", f"--path={store}"], capture_output=True, text=True, env=os.environ
            )
            if init.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise TokenUnavailable(f"tpm2_ptool init failed: {init.stderr.strip()[-300:]}")
            time.sleep(0.2)
        subprocess.run(
            [
                ptool,
                "addtoken",
                "--pid=1",
                f"--label={label}",
                f"--userpin={pin}",
                f"--sopin={_SO_PIN}",
                f"--path={store}",
            ],
            check=True,
            capture_output=True,
            env=os.environ,
        )
        yield module
    finally:
        for proc in reversed(procs):
            _stop(proc)
        if dbus_pid is not None:
            try:
                os.kill(dbus_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        log.close()
        for n, v in before.items():
            _restore(n, v)
