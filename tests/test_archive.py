"""Read-only opens of stores and ingest databases (signed/archive.py), as an auditor has them."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cngmrv.agent.store import Store
from cngmrv.signed import archive, keys


def _store(path: Path, signer: keys.FileSigner, device: str, n: int = 3) -> Store:
    store = Store(path, device)
    for i in range(n):
        store.add_readings([{"t0": float(i)}])
        store.seal(signer, 1, {"boot_epoch": 1})
    return store


def _files(root: Path) -> set[Path]:
    # SQLite's own -wal/-shm side files of a WAL database may appear beside it when its
    # folder is writable; a new database file (what a cut URI creates) may not.
    return {p for p in root.rglob("*") if not p.name.endswith(("-wal", "-shm"))}


def test_hash_and_percent_in_the_path_open_the_right_file_read_only(
    tmp_path: Path, signer: keys.FileSigner
) -> None:
    for folder, device in (("a#b", "bus-1"), ("x%41", "bus-2"), ("xA", "bus-3")):
        (tmp_path / folder).mkdir()
        _store(tmp_path / folder / "store.sqlite", signer, device).close()
    before = _files(tmp_path)
    # '#' would cut "?mode=ro" off the URI (and create a new file); '%41' would open xA's.
    assert {d for d, _, _ in archive.read_batches(tmp_path / "a#b" / "store.sqlite")} == {"bus-1"}
    assert {d for d, _, _ in archive.read_batches(tmp_path / "x%41" / "store.sqlite")} == {"bus-2"}
    assert _files(tmp_path) == before


@pytest.fixture
def readonly_media(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs that the test fills, then remounts read-only (an SD card on an auditor's desk)."""
    mnt = tmp_path / "media"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], check=False)
    if r.returncode != 0:
        pytest.skip("needs root with CAP_SYS_ADMIN to mount a read-only tmpfs")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.may_skip("mounting a tmpfs needs root with CAP_SYS_ADMIN, which not every CI has")
@pytest.mark.parametrize("state", ["clean_stop", "crashed"])
def test_a_wal_store_on_read_only_media_is_readable(
    tmp_path: Path, signer: keys.FileSigner, readonly_media: Path, state: str, cli
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    store = _store(src / "store.sqlite", signer, "bus-1", 4)
    if state == "crashed":
        # The files as a power cut leaves them: the last seals are only in the WAL.
        assert Path(f"{src}/store.sqlite-wal").stat().st_size > 0
        for name in ("store.sqlite", "store.sqlite-wal"):
            shutil.copyfile(src / name, readonly_media / name)
        store.close()
    else:
        store.close()
        assert not Path(f"{src}/store.sqlite-wal").exists()
        shutil.copyfile(src / "store.sqlite", readonly_media / "store.sqlite")
    subprocess.run(["mount", "-o", "remount,ro", str(readonly_media)], check=True)
    # Old code: "unable to open database file".
    rows = archive.read_batches(readonly_media / "store.sqlite")
    assert [s for _, s, _ in rows] == [0, 1, 2, 3]
    r = cli(
        "verify", "--db", str(readonly_media / "store.sqlite"), "--pubkey", _pub(tmp_path, signer)
    )
    assert r.returncode == 0, r.stdout + r.stderr
    r = cli("export", "--db", str(readonly_media / "store.sqlite"), "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "o").iterdir())) == 4


def _pub(tmp_path: Path, signer: keys.FileSigner) -> str:
    p = tmp_path / "device.pub"
    p.write_bytes(signer.public_pem())
    return str(p)
