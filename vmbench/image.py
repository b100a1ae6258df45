"""The guest's disk image: built from Debian's packages, cached outside the repository.

The image is a raw ext4 root filesystem made by ``mmdebstrap`` (no loop
mount, no root needed beyond what mmdebstrap asks) plus the kernel and
initramfs taken out of it, so qemu boots them directly (``-kernel``): no boot
loader to install or to go wrong.  It is kept in
``${XDG_CACHE_HOME:-~/.cache}/cngmrv/vm/<arch>-<hash>/``, the hash covering
this file and everything under ``vmbench/image/`` (the recipe), so it is
rebuilt only when the recipe changes.  The guest never changes the cached
image: each boot writes to a qcow2 overlay of its own.

The packages come from the mirror the host's apt already uses (read from
``/etc/apt/sources.list`` and ``/etc/apt/sources.list.d/``), so nothing here
names a mirror and a machine behind its own mirror builds the same image.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECIPE_DIR = HERE / "image"
SUITE = "bookworm"
# Debian bookworm's python3: the wheelhouse is downloaded for it (vmbench.install).
GUEST_PYTHON = "3.11"
IMAGE_SIZE = "3G"

# What the suite needs in the guest: systemd as PID 1 (networkd and udev for the
# shipped files), the kernel with can/can_raw/vcan/9p, python3 with venv for the
# install of docs/deploy-pi.md, iproute2 and can-utils for the interface and its peers.
GUEST_PACKAGES = [
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "kmod",
    "procps",
    "iproute2",
    "can-utils",
    "python3",
    "python3-venv",
    "sqlite3",
]
PACKAGES = {
    "amd64": ["linux-image-amd64", *GUEST_PACKAGES],
    # The Pi's architecture: the same guest, plus the C compiler and Python's headers
    # that build the cffi extension in the guest (the arm64 smoke, vmbench/guest/smoke.sh).
    "arm64": ["linux-image-arm64", *GUEST_PACKAGES, "python3-dev", "gcc", "libc6-dev"],
}
# qemu-user's name for each arch, for the image build of a foreign arch (binfmt_misc).
QEMU_USER = {"amd64": "x86_64", "arm64": "aarch64"}


class ImageError(RuntimeError):
    """The image could not be built; the message says which step and why."""


@dataclass(frozen=True)
class Image:
    """A built guest: its root filesystem (raw ext4), kernel and initramfs."""

    arch: str
    root: Path
    kernel: Path
    initrd: Path

    @property
    def folder(self) -> Path:
        return self.root.parent


# Raise when :func:`build` changes what it makes: the recipe's hash includes it.
BUILD_VERSION = 1


def recipe_hash(arch: str) -> str:
    """The cache key: the suite, the packages, the build's version and vmbench/image/'s files."""
    recipe = [BUILD_VERSION, arch, SUITE, IMAGE_SIZE, sorted(PACKAGES[arch])]
    h = hashlib.sha256(repr(recipe).encode())
    for f in sorted(RECIPE_DIR.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(RECIPE_DIR)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cngmrv" / "vm"


def host_mirror(suite: str = SUITE, etc_apt: Path = Path("/etc/apt")) -> str:
    """The Debian mirror the host's apt uses for ``suite`` (its ``main`` component).

    Reads one-line (``deb URI SUITE main``) and deb822 (``URIs:``/``Suites:``)
    sources; the first that carries ``suite`` and ``main`` wins.
    """
    files = [etc_apt / "sources.list"]
    d = etc_apt / "sources.list.d"
    if d.is_dir():
        files += sorted(p for p in d.iterdir() if p.suffix in (".list", ".sources"))
    for f in files:
        if not f.is_file():
            continue
        text = f.read_text(errors="replace")
        if f.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if ":" in line and not line.lstrip().startswith("#"):
                        k, v = line.split(":", 1)
                        fields[k.strip().lower()] = v.strip()
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                if (
                    "deb" in fields.get("types", "").split()
                    and suite in fields.get("suites", "").split()
                    and "main" in fields.get("components", "").split()
                ):
                    return fields["uris"].split()[0]
        else:
            for line in text.splitlines():
                parts = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
                if (
                    len(parts) >= 4
                    and parts[0] == "deb"
                    and parts[2] == suite
                    and "main" in parts[3:]
                ):
                    return parts[1]
    raise ImageError(
        f"image build: the host's apt has no source for Debian {suite} main "
        "(/etc/apt/sources.list, /etc/apt/sources.list.d/): the guest is built from it"
    )


def _need(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        raise ImageError(f"image build: {tool} not found: install the Debian package {package}")


def cached(arch: str = "amd64") -> Image:
    folder = cache_root() / f"{arch}-{recipe_hash(arch)}"
    return Image(arch, folder / "root.img", folder / "vmlinuz", folder / "initrd.img")


def ensure(arch: str = "amd64", log=sys.stderr) -> tuple[Image, bool]:  # type: ignore[no-untyped-def]
    """The cached image for ``arch``, built first if it is missing; and whether it was built.

    Two runs at once take turns on a lock, so the image is built once.
    """
    image = cached(arch)
    image.folder.parent.mkdir(parents=True, exist_ok=True)
    with open(image.folder.parent / f".{image.folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if image.root.exists() and image.kernel.exists() and image.initrd.exists():
            return image, False
        build(image, log)
        # Builds of older recipes are of no more use: one image per arch stays.
        for old in image.folder.parent.glob(f"{arch}-*"):
            if old != image.folder and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
        return image, True


def build(image: Image, log=sys.stderr) -> None:  # type: ignore[no-untyped-def]
    _need("mmdebstrap", "mmdebstrap")
    _need("mkfs.ext4", "e2fsprogs")
    mirror = host_mirror()
    host = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True)
    if host.stdout.strip() != image.arch:
        # mmdebstrap runs the foreign arch's maintainer scripts through qemu-user.
        binfmt = Path("/proc/sys/fs/binfmt_misc") / f"qemu-{QEMU_USER[image.arch]}"
        if not binfmt.exists():
            raise ImageError(
                f"image build: no binfmt_misc entry {binfmt} to run {image.arch} programs: "
                "install the Debian packages qemu-user-static and binfmt-support"
            )
    if os.geteuid() != 0:
        raise ImageError("image build: mmdebstrap makes the guest's root tree as root; run as root")
    tmp = Path(tempfile.mkdtemp(prefix=f"build-{image.arch}-", dir=image.folder.parent))
    try:
        tree = tmp / "tree"
        cmd = [
            "mmdebstrap",
            "--mode=root",
            "--variant=minbase",
            f"--architectures={image.arch}",
            "--include=" + ",".join(PACKAGES[image.arch]),
            f'--customize-hook=sh {RECIPE_DIR / "customize.sh"} "$1"',
            SUITE,
            str(tree),
            f"deb {mirror} {SUITE} main",
        ]
        print(f"[vmbench] image build: {' '.join(cmd[:-1])} 'deb <host mirror> ...'", file=log)
        r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
        if r.returncode != 0:
            raise ImageError(
                f"image build: mmdebstrap failed (exit {r.returncode}), see its output above"
            )
        boot = tree / "boot"
        kernels = sorted(boot.glob("vmlinuz-*"))
        initrds = sorted(boot.glob("initrd.img-*"))
        if not kernels or not initrds:
            raise ImageError("image build: no kernel or initramfs in the guest's /boot")
        out = tmp / "out"
        out.mkdir()
        shutil.copy2(kernels[-1], out / "vmlinuz")
        shutil.copy2(initrds[-1], out / "initrd.img")
        r = subprocess.run(
            ["mkfs.ext4", "-q", "-L", "root", "-d", str(tree), str(out / "root.img"), IMAGE_SIZE],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        if r.returncode != 0:
            raise ImageError(f"image build: mkfs.ext4 -d failed (exit {r.returncode})")
        (out / "kernel-release").write_text(kernels[-1].name.removeprefix("vmlinuz-") + "\n")
        os.replace(out, image.folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    img, built = ensure()
    print(img.folder, "built" if built else "cached")
