"""The reference ingest server over real HTTP on 127.0.0.1, and the uploader against it."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from cngmrv.agent import batch, keys
from cngmrv.agent.ingest import IngestServer, register_device, stored_batches
from cngmrv.agent.store import Store
from cngmrv.agent.upload import Uploader, backoff_delay, post_batch


@pytest.fixture
def server(tmp_path: Path, keydir: Path) -> Iterator[IngestServer]:
    srv = IngestServer(tmp_path / "ingest.sqlite").start()
    register_device(srv.db, "bus-7", (keydir / keys.PUB_FILE).read_bytes())
    yield srv
    srv.stop()


def _batches(signer: keys.FileSigner, n: int) -> list[bytes]:
    out, prev = [], batch.ZERO_HASH
    for seq in range(n):
        raw = batch.build(signer, "bus-7", seq, prev, {"readings": [{"t0": float(seq)}]})
        out.append(raw)
        prev = batch.sha256(raw)
    return out


def test_stores_in_order_and_is_idempotent(server: IngestServer, signer: keys.FileSigner) -> None:
    b0, b1 = _batches(signer, 2)
    first = post_batch(server.url, b0)
    assert (first.acknowledged, first.status, first.detail) == (True, 201, "stored")
    again = post_batch(server.url, b0)
    assert (again.acknowledged, again.status, again.detail) == (True, 200, "duplicate")
    assert post_batch(server.url, b1).status == 201
    assert [s for s, _ in stored_batches(server.db, "bus-7")] == [0, 1]


def test_refuses_out_of_order_and_conflicting_batches(
    server: IngestServer, signer: keys.FileSigner
) -> None:
    b0, b1, b2 = _batches(signer, 3)
    skipped = post_batch(server.url, b2)
    assert (skipped.acknowledged, skipped.retry, skipped.status) == (False, False, 409)
    assert post_batch(server.url, b0).status == 201
    # Same sequence 0, other content: refused and kept aside for the auditor.
    other = batch.build(signer, "bus-7", 0, batch.ZERO_HASH, {"readings": []})
    conflict = post_batch(server.url, other)
    assert (conflict.status, conflict.detail) == (409, "conflict")
    assert server.db.execute("SELECT count(*) FROM conflicts").fetchone()[0] == 1
    assert post_batch(server.url, b1).status == 201


def test_refuses_tampered_unknown_and_malformed(
    server: IngestServer, signer: keys.FileSigner, tmp_path: Path
) -> None:
    (b0,) = _batches(signer, 1)
    outer = msgpack.unpackb(b0, raw=False)
    outer[3] = outer[3] + b"\x00"
    tampered = post_batch(server.url, msgpack.packb(outer, use_bin_type=True))
    assert (tampered.status, tampered.retry) == (422, False)

    stranger_dir = tmp_path / "stranger"
    keys.generate(stranger_dir)
    stranger = keys.load_signer(stranger_dir / keys.KEY_FILE)
    forged = batch.build(stranger, "bus-7", 0, batch.ZERO_HASH, {"readings": []})
    assert post_batch(server.url, forged).status == 403
    unknown = batch.build(stranger, "bus-99", 0, batch.ZERO_HASH, {"readings": []})
    assert post_batch(server.url, unknown).status == 403
    assert post_batch(server.url, b"garbage").status == 400
    assert stored_batches(server.db, "bus-7") == []


def test_registering_another_key_for_a_device_is_refused(
    server: IngestServer, tmp_path: Path
) -> None:
    keys.generate(tmp_path / "k2")
    with pytest.raises(ValueError, match="already registered"):
        register_device(server.db, "bus-7", (tmp_path / "k2" / keys.PUB_FILE).read_bytes())


def test_unreachable_ingest_is_a_retryable_failure() -> None:
    out = post_batch("http://127.0.0.1:9/v1/batches", b"x", timeout=2.0)
    assert (out.acknowledged, out.retry, out.status) == (False, True, 0)


def test_backoff_is_full_jitter_and_capped() -> None:
    rng = random.Random(3)
    delays = [backoff_delay(a, rng) for a in range(40)]
    assert all(0.0 <= d <= min(900.0, 2.0 * 2**a) for a, d in enumerate(delays))
    assert max(delays[20:]) > 100  # it does grow towards the cap


def test_uploader_drains_the_store_in_order(
    server: IngestServer, signer: keys.FileSigner, tmp_path: Path
) -> None:
    store = Store(tmp_path / "dev.sqlite", "bus-7")
    store.add_readings([{"t0": float(i)} for i in range(10)])
    for _ in range(5):
        store.seal(signer, 2)
    up = Uploader(tmp_path / "dev.sqlite", "bus-7", server.url, seed=1)
    up.start()
    up.notify()
    assert up.wait_idle(10.0)
    up.stop()
    assert store.counts()["batches_pending"] == 0
    held = stored_batches(server.db, "bus-7")
    assert [s for s, _ in held] == [0, 1, 2, 3, 4]
    assert [raw for _, raw in held] == [raw for _, raw in store.batches()]
