"""Salvage: what can still be read back from a damaged device store.

The recorder moves a damaged store aside and starts a new one; this module
reads the aside copy (never changing it) and gives back the batches that
verify and chain, and the unsealed readings that follow them, for
:meth:`cngmrv.agent.store.Store.import_batch` and
:meth:`~cngmrv.agent.store.Store.import_readings` to take over.  The chain
itself is walked by :func:`cngmrv.signed.chain.walk`.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from cngmrv.agent.store_file import PAGE_SIZE
from cngmrv.signed import batch, chain

log = logging.getLogger("cngmrv.store")

_SQLITE_MAGIC = b"SQLite format 3\x00"


def _open_for_salvage(copy: Path) -> sqlite3.Connection:
    """Open the scratch copy; if its 100-byte header is damaged, rebuild the header first.

    SQLite refuses the whole file ("not a database") when the first bytes are
    wrong, even with every data page intact.  Those bytes hold little that
    cannot be known: the magic string, the page size (tried from 512 to
    65536, keeping the one whose schema reads), the WAL/rollback versions
    (from whether a ``-wal`` file is there) and three fixed payload fractions.
    Only the copy is changed; what reads back is verified batch by batch.
    """
    db = sqlite3.connect(copy, isolation_level=None)
    try:
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return db
    except sqlite3.DatabaseError:
        db.close()
    raw = bytearray(copy.read_bytes()[:100])
    if len(raw) < 100:
        raise sqlite3.DatabaseError("too short to hold a database header")
    wal = Path(f"{copy}-wal").exists()
    for size in (PAGE_SIZE, 4096, 512, 2048, 8192, 16384, 32768, 65536):
        raw[0:16] = _SQLITE_MAGIC
        raw[16:18] = (1 if size == 65536 else size).to_bytes(2, "big")
        raw[18:20] = b"\x02\x02" if wal else b"\x01\x01"
        raw[20:24] = bytes([0, 64, 32, 32])
        with open(copy, "r+b") as f:
            f.write(raw)
        db = sqlite3.connect(copy, isolation_level=None)
        try:
            db.execute("SELECT count(*) FROM batches").fetchone()
            log.warning("event=store_header_rebuilt page_size=%d", size)
            return db
        except sqlite3.DatabaseError:
            db.close()
    raise sqlite3.DatabaseError("the header could not be rebuilt for any page size")


@dataclass(frozen=True)
class Salvage:
    """What could be read back from a damaged store."""

    batches: list[tuple[int, bytes, bool]]  # seq, bytes, uploaded
    readings: list[tuple[int, dict[str, Any]]]  # unsealed, numbered
    boot_epoch: int
    problem: str | None  # why reading stopped early, if it did


def salvage(path: Path, device_id: str, public_key: ec.EllipticCurvePublicKey) -> Salvage:
    """Read what is still readable from a (moved-aside) damaged store.

    Works on a scratch copy so the forensic copy stays byte for byte as it
    was found.  Only batches of this device that verify with its key and
    chain to each other from the lowest one read are kept (a rotted batch
    taken over would block the upload forever); reading stops at the first
    error.
    """
    scratch = path.with_name(path.name + ".salvage")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    out_b: list[tuple[int, bytes, bool]] = []
    out_r: list[tuple[int, dict[str, Any]]] = []
    epoch = 0
    problem: str | None = None
    try:
        for suffix in ("", "-wal"):
            src = Path(str(path) + suffix)
            if src.exists():
                shutil.copyfile(src, scratch / ("db" + suffix))
        db = _open_for_salvage(scratch / "db")
        try:
            try:
                epoch = int(
                    db.execute("SELECT value FROM meta WHERE key='boot_epoch'").fetchone()[0]
                )
            except (sqlite3.Error, TypeError, ValueError):
                pass
            columns = {r[1] for r in db.execute("PRAGMA table_info(batches)")}
            # Layout 1 stores had an upload time instead of a flag.
            flag = "uploaded = 1" if "uploaded" in columns else "uploaded_at IS NOT NULL"
            uploaded: dict[int, bool] = {}

            def verified() -> Iterator[batch.Batch]:
                nonlocal problem
                for seq, raw, up in db.execute(
                    f"SELECT seq, bytes, {flag} FROM batches ORDER BY seq"
                ):
                    try:
                        b = batch.parse(bytes(raw))
                    except batch.BatchFormatError as e:
                        problem = f"batch {seq}: {e}"
                        return
                    if b.seq != seq or b.device_id != device_id:
                        problem = f"batch {seq} is not this device's"
                        return
                    bad = batch.check(b, public_key)
                    if bad:
                        problem = f"batch {seq}: {bad[0]}"
                        return
                    uploaded[seq] = bool(up)
                    yield b

            # From the lowest batch read on: a hole or a broken link ends what is taken over.
            for step in chain.walk(verified(), start=None):
                seq = step.batch.seq
                if out_b and (step.gap is not None or not step.linked):
                    problem = f"batch {seq} does not chain to the one before"
                    break
                out_b.append((seq, step.batch.raw, uploaded[seq]))
            boundary = out_b[-1] if out_b else None
            start = 0
            if boundary is not None:
                bb = batch.parse(boundary[1])
                start = (bb.first_reading_seq or 0) + (bb.n_readings or 0)
            for first, body in db.execute(
                "SELECT first_seq, body FROM readings WHERE first_seq + n > ? ORDER BY first_seq",
                (start,),
            ):
                try:
                    rows = batch.decode_readings(batch.unpackb(bytes(body)))
                except (ValueError, TypeError) as e:
                    problem = f"readings from {first}: {e}"
                    break
                out_r.extend((first + i, r) for i, r in enumerate(rows) if first + i >= start)
        except sqlite3.Error as e:
            problem = problem or f"read stopped: {e}"
        finally:
            db.close()
    except (sqlite3.Error, OSError) as e:
        problem = problem or f"cannot open the damaged copy: {e}"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    # Unsealed readings must continue straight from the last salvaged batch.
    kept: list[tuple[int, dict[str, Any]]] = []
    for seq, body in out_r:
        if kept and seq != kept[-1][0] + 1:
            break
        kept.append((seq, body))
    return Salvage(out_b, kept, epoch, problem)
