"""The store and the recorder: buffering, start-up, damaged stores, rollback, the quota, keys."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from cngmrv.agent.recorder import Recorder, RecorderConfig
from cngmrv.agent.store import Store, StoreError, StoreFull, read_head
from cngmrv.signed import batch, keys

DEV = "bus-7"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _recorder(
    tmp_path: Path, signer: keys.FileSigner, clock: FakeClock | None = None, **cfg: Any
) -> Recorder:
    options = {"readings_per_batch": 10, "buffer_s": 5.0, **cfg}
    return Recorder(
        tmp_path / "store.sqlite",
        DEV,
        signer,
        RecorderConfig(**options),
        monotonic=clock or FakeClock(),
    )


def _reading(i: int) -> dict[str, Any]:
    return {"t0": 1000.0 + i, "dur": 1.0, "diesel_l": 0.001 * (i % 7), "cov": {"diesel_l": 1.0}}


def _chain(store_path: Path) -> list[batch.Batch]:
    store = Store(store_path, DEV)
    try:
        return [batch.parse(raw) for _, raw in store.batches()]
    finally:
        store.close()


def _events(batches: list[batch.Batch]) -> list[tuple[int, str, dict[str, Any]]]:
    return [(b.seq, e["kind"], e) for b in batches for e in b.events()]


def _audit(batches: list[batch.Batch], signer: keys.FileSigner) -> batch.AuditReport:
    pub = keys.public_key_from_pem(signer.public_pem())
    return batch.audit([(str(b.seq), b.raw) for b in batches], batch.KeyRing.of([(DEV, pub)]))


# -- the store ----------------------------------------------------------------------------


def test_store_is_wal_full_exclusive_with_small_pages(
    tmp_path: Path, signer: keys.FileSigner, cli
) -> None:
    store = Store(tmp_path / "store.sqlite", DEV)
    q = store._db.execute
    assert q("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert q("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert q("PRAGMA locking_mode").fetchone()[0] == "exclusive"
    assert q("PRAGMA page_size").fetchone()[0] == 1024
    assert q("PRAGMA cache_size").fetchone()[0] == -256  # KiB: filled in minutes, not an hour
    assert not (tmp_path / "store.sqlite-shm").exists()  # the WAL index lives in memory
    # A second agent on the same store is refused at once: two writers would fork the chain.
    with pytest.raises(StoreError, match="in use by another process"):
        Store(tmp_path / "store.sqlite", DEV, busy_timeout=0.1)
    r = cli("export", "--db", str(tmp_path / "store.sqlite"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "in use by a running agent" in r.stderr
    store.close()


def test_readings_are_numbered_and_sealed_contiguously(
    tmp_path: Path, signer: keys.FileSigner
) -> None:
    store = Store(tmp_path / "store.sqlite", DEV)
    sizes = [3, 5, 1, 7, 2, 6]
    firsts = []
    i = 0
    for n in sizes:
        firsts.append(store.add_readings([_reading(i + k) for k in range(n)]))
        i += n
    assert firsts == [0, 3, 8, 9, 16, 18]
    sealed = []
    while (s := store.seal(signer, 4)) is not None:
        sealed.append(s)
    assert [(s.first_reading, s.n_readings) for s in sealed] == [
        (0, 4),
        (4, 4),
        (8, 4),
        (12, 4),
        (16, 4),
        (20, 4),
    ]
    readings = [r for _, raw in store.batches() for r in batch.parse(raw).payload()["readings"]]
    assert readings == [_reading(k) for k in range(24)]
    store.close()


def test_sequences_are_never_reused_after_pruning(tmp_path: Path, signer: keys.FileSigner) -> None:
    store = Store(tmp_path / "store.sqlite", DEV)
    store.add_readings([_reading(k) for k in range(6)])
    store.add_event(5.0, "NOTE", {"x": 1})
    for _ in range(3):
        store.seal(signer, 2)
    for seq in range(3):
        store.mark_uploaded(seq)
    store.flush_acks()
    assert store.drop_sealed_rows() == 6
    assert store.drop_uploaded(10) == 3
    assert store.counts()["batches"] == 0 and store.counts()["readings"] == 0
    store.close()
    again = Store(tmp_path / "store.sqlite", DEV)
    again.add_readings([_reading(6)])
    again.add_event(6.0, "NOTE", {"x": 2})
    s = again.seal(signer, 2)
    assert s is not None and (s.seq, s.first_reading, s.n_events) == (3, 6, 1)
    assert batch.parse(s.raw).events()[0]["x"] == 2  # the first event was not signed again
    again.close()


def test_upload_marks_ride_on_the_next_seal_and_survive_a_restart(
    tmp_path: Path, signer: keys.FileSigner
) -> None:
    store = Store(tmp_path / "store.sqlite", DEV)
    for k in range(3):
        store.add_readings([_reading(k)])
        store.seal(signer, 1)
    store.mark_uploaded(0)
    assert [s for s, _ in store.pending()] == [1, 2]  # held in memory, already honoured
    assert store._db.execute("SELECT uploaded FROM batches WHERE seq=0").fetchone()[0] == 0
    store.add_readings([_reading(3)])
    store.seal(signer, 1)
    assert store._db.execute("SELECT uploaded FROM batches WHERE seq=0").fetchone()[0] == 1
    store.mark_uploaded(1)
    store.close()  # closing writes what is held
    assert [s for s, _ in Store(tmp_path / "store.sqlite", DEV).pending()] == [2, 3]


def test_the_hard_quota_refuses_a_write_and_leaves_the_store_usable(
    tmp_path: Path, signer: keys.FileSigner
) -> None:
    store = Store(tmp_path / "store.sqlite", DEV, quota_bytes=96 * 1024)
    committed = 0
    with pytest.raises(StoreFull):
        for k in range(10_000):
            store.add_readings([{**_reading(k), "pad": os.urandom(200)}])
            committed += 1
    assert store.used_bytes() <= 96 * 1024
    # Nothing half-written, and the numbering did not move for the refused write.
    assert store.counts()["readings"] == committed == store.unsealed()[0]
    assert store.integrity_check() == "ok"
    store.close()
    again = Store(tmp_path / "store.sqlite", DEV, quota_bytes=192 * 1024)  # a bigger quota
    assert again.seal(signer, committed) is not None
    assert again.add_readings([_reading(0)]) == committed
    again.close()


# -- the recorder: buffering ----------------------------------------------------------------


def test_readings_wait_in_memory_for_at_most_the_window(
    tmp_path: Path, signer: keys.FileSigner
) -> None:
    clock = FakeClock()
    rec = _recorder(tmp_path, signer, clock, buffer_s=5.0)
    rec.start()
    for k in range(4):
        rec.add([_reading(k)])
    assert rec.store.unsealed()[0] == 0  # four readings of 1 s: still in memory
    rec.add([_reading(4)])
    assert rec.store.unsealed()[0] == 5  # the fifth fills the 5-second window: one commit
    assert rec.stats["flushes"] == 1
    rec.add([_reading(5)])
    clock.now += 4.9
    rec.tick()
    assert rec.store.unsealed()[0] == 5
    clock.now += 0.1
    rec.tick()  # a slow trickle still reaches the disk within the window of wall time
    assert rec.store.unsealed()[0] == 6
    rec.stop()
    rec.close()


# -- the recorder: start-up -------------------------------------------------------------------


def test_start_up_sequence_clean_and_unclean(tmp_path: Path, signer: keys.FileSigner) -> None:
    rec = _recorder(tmp_path, signer)
    boot = rec.start()
    assert (boot.epoch, boot.clean_stop, boot.store) == (1, True, "new")
    for k in range(25):
        rec.add([_reading(k)])
    rec.stop()
    rec.close()

    rec = _recorder(tmp_path, signer)
    boot = rec.start()
    assert (boot.epoch, boot.clean_stop, boot.store, boot.leftover_readings) == (2, True, "ok", 0)
    for k in range(25, 38):
        rec.add([_reading(k)])
    rec.flush()
    rec.close()  # no stop(): the process died; 10 readings sealed, 3 committed but not sealed

    rec = _recorder(tmp_path, signer)
    boot = rec.start()
    assert (boot.epoch, boot.clean_stop, boot.leftover_readings) == (3, False, 3)
    rec.stop()
    rec.close()

    chain = _chain(tmp_path / "store.sqlite")
    events = _events(chain)
    boots = [(e["epoch"], e["clean_stop"]) for _, k, e in events if k == "BOOT"]
    assert boots == [(1, True), (2, True), (3, False)]
    assert [k for _, k, _ in events].count("STOP") == 2
    # The leftovers are sealed at start-up, in the batch with the BOOT event that reports them.
    leftover_batch = next(b for b in chain if b.first_reading_seq == 35 and b.n_readings)
    boot3 = next(s for s, k, e in events if k == "BOOT" and e["epoch"] == 3)
    assert leftover_batch.seq == boot3 and leftover_batch.n_readings == 3
    assert [b.header["boot_epoch"] for b in chain] == sorted(b.header["boot_epoch"] for b in chain)
    report = _audit(chain, signer)
    assert report.passed, report.findings
    assert report.devices[DEV].readings == 38 and report.devices[DEV].unclean_stops == 1
    head = read_head(tmp_path / "store.sqlite")
    assert head is not None and head.next_seq == len(chain)


def _corrupt_page(path: Path, page: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[(page - 1) * 1024 : (page - 1) * 1024 + 16] = b"\xa5" * 16
    path.write_bytes(bytes(raw))


def _layout_one(path: Path, signer: keys.FileSigner) -> None:
    """A store as the walking skeleton left it: readings rows with batch_seq, no schema mark."""
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value);"
        "CREATE TABLE readings (id INTEGER PRIMARY KEY AUTOINCREMENT, t0 REAL, body BLOB,"
        " batch_seq INTEGER);"
        "CREATE TABLE batches (seq INTEGER PRIMARY KEY, bytes BLOB NOT NULL, sha256 BLOB,"
        " n_readings INTEGER, uploaded_at REAL);"
    )
    db.execute("INSERT INTO meta VALUES ('device_id', ?), ('boot_epoch', 4)", (DEV,))
    prev = batch.ZERO_HASH
    for seq in range(3):
        raw = batch.build(signer, DEV, seq, prev, {"readings": [_reading(seq)]}, version=1)
        db.execute("INSERT INTO batches VALUES (?, ?, ?, 1, NULL)", (seq, raw, batch.sha256(raw)))
        prev = batch.sha256(raw)
    db.commit()
    db.close()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "bad_page", "layout_one", "header"])
def test_a_damaged_store_is_moved_aside_and_the_chain_continues(
    tmp_path: Path, signer: keys.FileSigner, damage: str
) -> None:
    path = tmp_path / "store.sqlite"
    if damage == "layout_one":
        _layout_one(path, signer)
        before: list[batch.Batch] = []
    else:
        rec = _recorder(tmp_path, signer)
        rec.start()
        for k in range(200):
            rec.add([_reading(k)])
        rec.stop()
        rec.close()
        before = _chain(path)
        if damage == "garbage":
            path.write_bytes(os.urandom(4096) * 8)
        elif damage == "header":
            # Only the first 21 bytes: every data page is intact.
            path.write_bytes(os.urandom(21) + path.read_bytes()[21:])
        elif damage == "truncated":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2 + 100])
        else:
            _corrupt_page(path, (path.stat().st_size // 1024) - 2)
    damaged = path.read_bytes()

    rec = _recorder(tmp_path, signer)
    boot = rec.start()  # never wedges
    for k in range(200, 215):
        rec.add([_reading(k)])
    rec.stop()
    rec.close()

    assert boot.store == "replaced" and boot.clean_stop is False
    (moved,) = tmp_path.glob("store.sqlite.corrupt-*[0-9]Z")
    assert moved.read_bytes() == damaged  # kept, untouched, for forensics
    after = _chain(path)
    events = _events(after)
    (replaced,) = [e for _, k, e in events if k == "STORE_REPLACED"]
    assert replaced["moved_to"] == moved.name
    seqs = [b.seq for b in after]
    if damage == "header":
        # Old code declared it all lost; the header is rebuilt and every batch is salvaged.
        assert replaced["salvaged_batches"] == [0, before[-1].seq]
        assert "lost_batches" not in replaced and replaced.get("salvage_stopped") is None
        assert seqs == list(range(len(seqs)))
        assert [b.raw for b in after[: len(before)]] == [b.raw for b in before]
    if damage == "layout_one":
        # Nothing lost: the old store's batches were read back and the chain goes on from them.
        assert seqs == list(range(len(seqs))) and replaced["salvaged_batches"] == [0, 2]
        assert boot.epoch == 5
    else:
        # The new chain continues exactly where the head file says the old one stopped.
        old_seqs = [b.seq for b in before]
        assert seqs[-1] > old_seqs[-1]
        first_new = min(s for s in seqs if s > old_seqs[-1])
        link = next(b for b in after if b.seq == first_new)
        assert link.header["prev_hash"] == before[-1].chain_id
        assert set(seqs) <= set(range(seqs[-1] + 1))
        # The ingest (which holds `before`) plus what the new store holds verify end to end.
        union = {b.seq: b for b in before} | {b.seq: b for b in after}
        report = _audit(list(union.values()), signer)
        assert report.passed, report.findings
        lost = replaced.get("lost_batches")
        held = {b.seq for b in after}
        missing = set(range(seqs[-1] + 1)) - held
        assert missing == (set(range(lost[0], lost[1] + 1)) if lost else set())
        assert _audit(after, signer).devices[DEV].gaps == []  # every hole is explained


def test_a_store_that_goes_bad_while_running_is_replaced_without_a_pause(
    tmp_path: Path, signer: keys.FileSigner
) -> None:
    path = tmp_path / "store.sqlite"
    rec = _recorder(tmp_path, signer)
    rec.start()
    for k in range(300):
        rec.add([_reading(k)])
    sealed_before = list(rec.sealed)
    before = [batch.parse(raw) for _, raw in rec.store.batches()]
    # The disk goes bad under the running agent, and SQLite has to read it again.
    rec.store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    raw = bytearray(path.read_bytes())
    for page in range(3, len(raw) // 1024):
        raw[page * 1024 : page * 1024 + 16] = b"\xa5" * 16
    path.write_bytes(bytes(raw))
    rec.store._db.execute("PRAGMA shrink_memory")
    for k in range(300, 330):
        rec.add([_reading(k)])  # never raises: the store is replaced underneath
    rec.close()  # and then the process dies
    assert rec.stats["store_replaced"] == 1
    assert len(list(tmp_path.glob("store.sqlite.corrupt-*"))) == 1
    rec = _recorder(tmp_path, signer)
    boot = rec.start()
    rec.stop()
    rec.close()
    assert boot.clean_stop is False  # the replacement store knew an agent was running
    after = _chain(path)
    assert after[0].seq == sealed_before[-1] + 1
    assert after[0].header["prev_hash"] == before[-1].chain_id
    assert "STORE_REPLACED" in [k for _, k, _ in _events(after)]
    report = _audit(before + after, signer)
    assert report.passed, report.findings


def test_a_store_rolled_back_to_an_old_copy_never_signs_a_sequence_twice(
    tmp_path: Path, signer: keys.FileSigner
) -> None:
    path = tmp_path / "store.sqlite"
    rec = _recorder(tmp_path, signer)
    rec.start()
    for k in range(30):
        rec.add([_reading(k)])
    rec.stop()
    rec.close()
    backup = tmp_path / "backup.sqlite"
    shutil.copyfile(path, backup)
    rec = _recorder(tmp_path, signer)
    rec.start()
    for k in range(30, 60):
        rec.add([_reading(k)])
    rec.stop()
    rec.close()
    signed = _chain(path)
    shutil.copyfile(backup, path)  # someone restores yesterday's image

    rec = _recorder(tmp_path, signer)
    boot = rec.start()
    rec.stop()
    rec.close()
    assert boot.store == "rolled_back" and boot.epoch == 3
    after = _chain(path)
    new = [b for b in after if b.seq > signed[-1].seq]
    assert new and new[0].seq == signed[-1].seq + 1
    assert new[0].header["prev_hash"] == signed[-1].chain_id
    # Old and new copies never disagree on a sequence: no conflict anywhere.
    by_seq = {b.seq: b.raw for b in signed}
    assert all(by_seq.get(b.seq, b.raw) == b.raw for b in after)
    report = _audit(signed + new, signer)
    assert report.passed, report.findings
    rolled = [e for _, k, e in _events(after) if k == "STORE_ROLLED_BACK"]
    assert rolled and rolled[0]["lost_batches"][1] == signed[-1].seq


# -- the recorder: the quota ---------------------------------------------------------------------


def test_quota_prunes_optional_data_first_then_signs_what_unsent_it_drops(
    tmp_path: Path, signer: keys.FileSigner, caplog: pytest.LogCaptureFixture
) -> None:
    quota = 200 * 1024
    rec = _recorder(tmp_path, signer, quota_bytes=quota, readings_per_batch=20)
    rec.start()
    caplog.set_level(logging.WARNING, logger="cngmrv.recorder")
    k = 0
    acked: list[int] = []
    while rec.stats["dropped_unsent_batches"] == 0:
        rec.add([{**_reading(k), "note": os.urandom(60).hex()}])
        k += 1
        if k == 600:  # the ingest acknowledged the early batches, then the network died
            acked = list(rec.sealed)
            for seq in acked:
                rec.store.mark_uploaded(seq)
        assert k < 20_000, "the quota never bit"
    rec.stop()
    used = rec.store.used_bytes()
    rec.close()
    assert used <= quota
    assert rec.stats["pruned_readings"] > 0 and rec.stats["pruned_batches"] > 0
    assert "event=storage_alarm" in caplog.text and "event=storage_full" in caplog.text
    chain = _chain(tmp_path / "store.sqlite")
    events = _events(chain)
    kinds = [k for _, k, _ in events]
    assert kinds.index("STORAGE_ALARM") < kinds.index("STORAGE_FULL")
    full = next(e for _, k, e in events if k == "STORAGE_FULL")
    lo, hi = full["lost_batches"]
    held = {b.seq for b in chain}
    # Acknowledged batches went before any unsent one did, and nothing unsent went silently.
    assert lo == max(acked) + 1
    assert not held & set(acked) and not held & set(range(lo, hi + 1))
    assert held == set(range(hi + 1, max(held) + 1))
    report = _audit(chain, signer)
    assert report.devices[DEV].explained_gaps == [(lo, hi)]
    assert report.devices[DEV].gaps == [(0, lo - 1)]  # acknowledged: the ingest holds them
    assert not [f for f in report.findings if f.severity == "bad"], report.findings


# -- keys ----------------------------------------------------------------------------------------


def test_the_key_never_reaches_logs_reprs_or_pickles(
    tmp_path: Path, keydir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    signer = keys.load_signer(keydir / keys.KEY_FILE)
    rec = _recorder(tmp_path, signer)
    rec.start()
    for k in range(30):
        rec.add([_reading(k)])
    rec.stop()
    rec.close()
    pem = (keydir / keys.KEY_FILE).read_text()
    secret_lines = [line for line in pem.splitlines() if line and not line.startswith("-----")]
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pem.encode(), None)
    scalar = key.private_numbers().private_value  # type: ignore[attr-defined]
    seen = caplog.text + repr(signer) + str(signer) + repr(rec.__dict__)
    for secret in [*secret_lines, f"{scalar:x}", str(scalar)]:
        assert secret not in seen
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(signer)
    assert "PRIVATE" not in json.dumps(rec.stats)


def test_hitting_the_hard_limit_never_stops_the_recorder(
    tmp_path: Path, signer: keys.FileSigner
) -> None:
    # The soft levels sit at the very top, so SQLite's own limit is what bites first.
    rec = _recorder(
        tmp_path,
        signer,
        quota_bytes=128 * 1024,
        alarm_fraction=0.985,
        drop_fraction=0.99,
        readings_per_batch=20,
    )
    rec.start()
    for k in range(3000):
        rec.add([{**_reading(k), "note": os.urandom(60).hex()}])
        if k % 500 == 0:
            rec.add_event(float(k), "NOTE", {"k": k})
    rec.stop()
    used = rec.store.used_bytes()
    rec.close()
    assert used <= 128 * 1024
    assert rec.stats["dropped_unsent_batches"] > 0
    assert rec.stats["readings_dropped"] == 0 and rec.stats["events_dropped"] == 0
    chain = _chain(tmp_path / "store.sqlite")
    kinds = [k for _, k, _ in _events(chain)]
    assert "STORAGE_FULL" in kinds and kinds[-1] == "STOP"
    report = _audit(chain, signer)
    assert not [f for f in report.findings if f.severity == "bad"], report.findings
    # What is left is one unbroken run up to the STOP, every hole signed for.
    assert report.devices[DEV].gaps in ([], [(0, report.devices[DEV].explained_gaps[0][0] - 1)])


@pytest.mark.may_skip(
    "mounting a small tmpfs needs root with CAP_SYS_ADMIN, which not every CI has"
)
def test_a_full_disk_costs_no_committed_or_buffered_reading(
    tmp_path: Path, signer: keys.FileSigner
) -> None:
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)]).returncode:
        pytest.skip("needs root with CAP_SYS_ADMIN to mount a small tmpfs")
    try:
        rec = Recorder(
            disk / "store.sqlite",
            DEV,
            signer,
            RecorderConfig(readings_per_batch=60, buffer_s=5.0),
            monotonic=FakeClock(),
        )
        rec.start()
        for k in range(100):
            rec.add([_reading(k)])
        # The data partition fills up (logs, a core dump...).
        with open(disk / "filler", "wb") as f:
            try:
                while True:
                    f.write(bytes(64 * 1024))
                    f.flush()
            except OSError:
                pass
        for k in range(100, 1300):
            rec.add([_reading(k)])
        rec.stop()
        rec.close()
        # Old code: about a thousand buffered readings lost at exit, an empty head.tmp left.
        assert not (disk / "store.sqlite.head.tmp").exists()
        after = _chain(disk / "store.sqlite")
        assert sum(b.n_readings or 0 for b in after) == 1300
        assert any(k == "STOP" for _, k, _ in _events(after))
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
