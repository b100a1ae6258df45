"""What the uploader tests share, whatever the transport: a device store with sealed batches."""

from __future__ import annotations

from pathlib import Path

from cngmrv.agent.store import Store
from cngmrv.signed import keys


def sealed_store(folder: Path, signer: keys.FileSigner, n: int) -> Store:
    """A store of device ``bus-7`` in ``folder`` holding ``n`` sealed batches of one reading."""
    store = Store(folder / "dev.sqlite", "bus-7")
    for i in range(n):
        store.add_readings([{"t0": float(i)}])
        store.seal(signer, 1, {"boot_epoch": 1})
    return store
