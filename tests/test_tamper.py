"""Tampering: each attack is refused or flagged by the ingest AND by `cngmrv verify`, with its reason.

The chain comes from the real recorder (readings, a BOOT and a STOP event),
the ingest is the real server over HTTP on 127.0.0.1, and the offline
verifier is the real command line (run in-process for speed).
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from cngmrv.agent import cli
from cngmrv.agent.http_transport import post_batch
from cngmrv.agent.recorder import Recorder, RecorderConfig
from cngmrv.agent.store import Store
from cngmrv.office.ingest import IngestServer, register_device, stored_batches
from cngmrv.signed import batch, keys

A, B = "bus-A", "bus-B"


def _chain(folder: Path, device: str, n_readings: int) -> list[bytes]:
    keys.generate(folder / "keys")
    signer = keys.load_signer(folder / "keys" / keys.KEY_FILE)
    rec = Recorder(folder / "store.sqlite", device, signer, RecorderConfig(readings_per_batch=5))
    rec.start()
    for i in range(n_readings):
        rec.add([{"t0": 1000.0 + i, "dur": 1.0, "diesel_l": 0.001 * i}])
    rec.stop()
    rec.close()
    store = Store(folder / "store.sqlite", device)
    out = [raw for _, raw in store.batches()]
    store.close()
    return out


@pytest.fixture(scope="module")
def devices(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[bytes]]]:
    root = tmp_path_factory.mktemp("devices")
    return {d: (root / d, _chain(root / d, d, n)) for d, n in ((A, 22), (B, 8))}


@pytest.fixture
def ingest(tmp_path: Path, devices: dict[str, tuple[Path, list[bytes]]]) -> Iterator[IngestServer]:
    srv = IngestServer(tmp_path / "ingest.sqlite").start()
    for dev, (folder, _) in devices.items():
        register_device(srv.db, dev, (folder / "keys" / keys.PUB_FILE).read_bytes())
    yield srv
    srv.stop()


def _verify(
    capsys: pytest.CaptureFixture[str],
    files: dict[str, bytes],
    folder: Path,
    devices: dict[str, tuple[Path, list[bytes]]],
) -> tuple[int, dict]:
    """Write ``files`` into ``folder`` and run ``cngmrv verify --json`` on it."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for name, raw in files.items():
        (folder / name).write_bytes(raw)
    args = ["verify", str(folder), "--json"]
    for dev, (d, _) in devices.items():
        args += ["--pubkey", f"{dev}={d / 'keys' / keys.PUB_FILE}"]
    with pytest.raises(SystemExit) as done:
        cli.main(args)
    return int(done.value.code or 0), json.loads(capsys.readouterr().out)


def _codes(report: dict, severity: str = "bad") -> set[str]:
    return {f["code"] for f in report["findings"] if f["severity"] == severity}


def _files(chain: list[bytes]) -> dict[str, bytes]:
    return {f"{i}.batch": raw for i, raw in enumerate(chain)}


def _resign(raw: bytes, signer: keys.FileSigner, **fields: object) -> bytes:
    """The same batch with header fields changed and a valid signature by ``signer``."""
    outer = msgpack.unpackb(raw, raw=False)
    header = msgpack.unpackb(outer[2], raw=False)
    header.update(fields)
    outer[2] = msgpack.packb(header, use_bin_type=True)
    outer[4] = signer.sign(outer[2])
    return msgpack.packb(outer, use_bin_type=True)


def _signer(devices: dict[str, tuple[Path, list[bytes]]], dev: str) -> keys.FileSigner:
    return keys.load_signer(devices[dev][0] / "keys" / keys.KEY_FILE)


def test_the_untouched_chain_passes_both(ingest, devices, capsys, tmp_path) -> None:
    chain = devices[A][1]
    assert all(post_batch(ingest.url, raw).status == 201 for raw in chain)
    code, report = _verify(capsys, _files(chain), tmp_path / "v", devices)
    assert code == 0 and report["passed"] and report["ok"] == len(chain)
    assert report["devices"][A]["readings"] == 22 and report["devices"][A]["boot_epochs"] == [1]


@pytest.mark.parametrize("seed", range(6))
def test_a_bit_flipped_anywhere(ingest, devices, capsys, tmp_path, seed: int) -> None:
    chain = devices[A][1]
    rng = random.Random(seed)
    victim = rng.randrange(len(chain))
    flips = []
    for _ in range(8):
        raw = bytearray(chain[victim])
        raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        flips.append(bytes(raw))
    for i, raw in enumerate(chain[:victim]):
        assert post_batch(ingest.url, raw).status == 201, i
    for forged in flips:
        out = post_batch(ingest.url, forged)
        assert out.status in (400, 403, 422), out
        files = _files(chain)
        files[f"{victim}.batch"] = forged
        code, report = _verify(capsys, files, tmp_path / "v", devices)
        assert code == 1
        bad = [f for f in report["findings"] if f["severity"] == "bad"]
        assert any(f.get("where", "").endswith(f"{victim}.batch") for f in bad), bad
    assert [s for s, _ in stored_batches(ingest.db, A)] == list(range(victim))


def test_a_reordered_pair(ingest, devices, capsys, tmp_path) -> None:
    chain = devices[A][1]
    order = [0, 1, 3, 2, *range(4, len(chain))]
    answers = [ingest.ingest.accept(chain[i])[1] for i in order]
    assert {k: answers[2][k] for k in ("status", "seq", "gap")} == {
        "status": "stored",
        "seq": 3,
        "gap": [2, 2],
    }
    assert answers[3]["out_of_order"] is True  # flagged when it arrives late
    files = _files(chain)
    files["2.batch"], files["3.batch"] = chain[3], chain[2]
    code, report = _verify(capsys, files, tmp_path / "v", devices)
    assert code == 1 and _codes(report) == {"misplaced"}


def test_a_deleted_batch(ingest, devices, capsys, tmp_path) -> None:
    chain = devices[A][1]
    for i, raw in enumerate(chain):
        if i != 2:
            assert post_batch(ingest.url, raw).status == 201
    assert ingest.ingest.report(A)[0]["gaps"] == [[2, 2]]  # recorded and reported
    files = _files(chain)
    del files["2.batch"]
    code, report = _verify(capsys, files, tmp_path / "v", devices)
    assert code == 1 and _codes(report, "gap") == {"gap"}
    assert report["devices"][A]["gaps"] == [[2, 2]]


def test_a_batch_spliced_in_from_another_device(ingest, devices, capsys, tmp_path) -> None:
    chain, other = devices[A][1], devices[B][1]
    for raw in chain[:3]:
        post_batch(ingest.url, raw)
    # B's own batch 3, relabelled as A's and signed with B's key (the only key B has).
    spliced = _resign(
        other[3], _signer(devices, B), device_id=A, prev_hash=batch.chain_id(chain[2])
    )
    status, answer = ingest.ingest.accept(spliced)
    assert (status, answer["error"]) == (403, "kid_mismatch")
    files = _files(chain)
    files["3.batch"] = spliced
    code, report = _verify(capsys, files, tmp_path / "v", devices)
    assert code == 1 and "device_mismatch" in _codes(report)
    # Unrelabelled, it is simply B's batch: B's chain then shows the hole it was cut from.
    files = _files(chain) | {"b3.batch": other[3]}
    code, report = _verify(capsys, files, tmp_path / "v", devices)
    assert code == 1 and report["devices"][B]["gaps"] == [[0, 2]]


def test_a_replayed_batch(ingest, devices, capsys, tmp_path) -> None:
    chain = devices[A][1]
    for raw in chain[:5]:
        post_batch(ingest.url, raw)
    again = post_batch(ingest.url, chain[1])
    assert (again.status, again.detail) == (200, "duplicate")
    assert [s for s, _ in stored_batches(ingest.db, A)] == [0, 1, 2, 3, 4]
    files = _files(chain) | {"copy-of-1.batch": chain[1]}
    code, report = _verify(capsys, files, tmp_path / "v", devices)
    assert code == 1 and _codes(report) == {"replayed"}
    assert report["devices"][A]["duplicates"] == 1
    assert report["devices"][A]["batches"] == len(chain)  # counted once


@pytest.mark.parametrize("alg", ["ES384", "none", "HS256"])
def test_a_header_naming_another_algorithm(ingest, devices, capsys, tmp_path, alg: str) -> None:
    chain = devices[A][1]
    post_batch(ingest.url, chain[0])
    forged = _resign(chain[1], _signer(devices, A), alg=alg)  # validly signed, all the same
    status, answer = ingest.ingest.accept(forged)
    assert (status, answer["codes"]) == (422, ["alg_not_allowed"])
    files = _files(chain)
    files["1.batch"] = forged
    code, report = _verify(capsys, files, tmp_path / "v", devices)
    assert code == 1 and "alg_not_allowed" in _codes(report)


def test_a_truncated_body(ingest, devices, capsys, tmp_path) -> None:
    chain = devices[A][1]
    cut = chain[1][: len(chain[1]) - 30]
    out = post_batch(ingest.url, cut)
    assert (out.status, out.detail) == (400, "truncated")
    files = _files(chain)
    files["1.batch"] = cut
    code, report = _verify(capsys, files, tmp_path / "v", devices)
    assert code == 1 and _codes(report) == {"truncated"}
