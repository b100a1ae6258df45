"""Where the chain stands, and its mirror beside the store (``<store>.head``).

The chain position (next batch sequence, previous hash, next reading and
event to seal) lives in the store's ``meta``.  After every seal it is also
written, atomically, into a small side file: if the database is lost,
corrupted or rolled back to an old copy, the next start continues the chain
from there instead of re-signing sequences the ingest already holds.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("cngmrv.store")


@dataclass(frozen=True)
class ChainState:
    """Where the chain stands: what the next seal will be."""

    device_id: str
    boot_epoch: int
    next_seq: int
    prev_hash: bytes
    next_reading: int  # the first reading the next batch will hold
    next_event: int  # the first event the next batch will hold

    def to_json(self) -> str:
        d = asdict(self)
        d["prev_hash"] = self.prev_hash.hex()
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ChainState:
        d = json.loads(text)
        state = cls(
            device_id=str(d["device_id"]),
            boot_epoch=int(d["boot_epoch"]),
            next_seq=int(d["next_seq"]),
            prev_hash=bytes.fromhex(d["prev_hash"]),
            next_reading=int(d["next_reading"]),
            next_event=int(d["next_event"]),
        )
        if len(state.prev_hash) != 32 or min(state.boot_epoch, state.next_seq) < 0:
            raise ValueError("head values out of range")
        return state


def head_path(store_path: Path) -> Path:
    return store_path.with_name(store_path.name + ".head")


def read_head(store_path: Path) -> ChainState | None:
    """The chain position mirrored beside the store, or None if absent or unreadable."""
    p = head_path(store_path)
    try:
        return ChainState.from_json(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("event=head_unreadable path=%s reason=%r", p, str(e))
        return None


def write_head(store_path: Path, state: ChainState) -> None:
    """Replace the head file atomically (write, fsync, rename, fsync the folder)."""
    p = head_path(store_path)
    tmp = p.with_name(p.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            os.write(fd, state.to_json().encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, p)
    except OSError:
        # A full disk: leave the old head as it was, and no empty .tmp beside it.
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(p.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
