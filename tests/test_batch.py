"""The signed batch envelope, the store's sealing, and `cngmrv export` / `verify`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from cngmrv.agent import batch, keys
from cngmrv.agent.store import Store

_SIGNER = keys.FileSigner(ec.generate_private_key(ec.SECP256R1()))


def _reading(t0: float) -> dict[str, object]:
    return {"t0": t0, "dur": 1.0, "diesel_l": 0.004, "gas_kg": 0.002, "distance_km": 0.01}


def _store_with_batches(tmp_path: Path, signer: keys.FileSigner, n: int) -> Store:
    store = Store(tmp_path / "store.sqlite", "bus-7")
    store.add_readings([_reading(1000.0 + i) for i in range(n * 3)])
    for _ in range(n):
        assert store.seal(signer, 3) is not None
    return store


def test_envelope_shape_matches_the_published_contract(signer: keys.FileSigner) -> None:
    raw = batch.build(signer, "bus-7", 0, batch.ZERO_HASH, {"readings": [_reading(1.0)]})
    outer = msgpack.unpackb(raw, raw=False)
    assert outer[0] == "cngmrv-batch" and outer[1] == 1 and len(outer) == 5
    header = msgpack.unpackb(outer[2], raw=False)
    assert header["alg"] == "ES256"
    assert header["kid"] == signer.kid
    assert header["device_id"] == "bus-7" and header["batch_seq"] == 0
    assert header["prev_hash"] == bytes(32)
    assert header["payload_sha256"] == hashlib.sha256(outer[3]).digest()
    # The signature is over the exact header bytes, verifiable with the public key alone.
    pub = keys.public_key_from_pem(signer.public_pem())
    assert keys.verify_signature(pub, outer[4], outer[2])
    assert not keys.verify_signature(pub, outer[4], outer[2] + b"\x00")


def test_seal_chains_batches_and_never_reuses_a_sequence(
    tmp_path: Path, signer: keys.FileSigner
) -> None:
    store = _store_with_batches(tmp_path, signer, 3)
    assert store.seal(signer, 3) is None  # nothing left to seal
    rows = list(store.batches())
    assert [s for s, _ in rows] == [0, 1, 2]
    parsed = [batch.parse(raw) for _, raw in rows]
    assert parsed[1].header["prev_hash"] == hashlib.sha256(rows[0][1]).digest()
    assert parsed[2].header["prev_hash"] == hashlib.sha256(rows[1][1]).digest()
    assert [len(p.payload()["readings"]) for p in parsed] == [3, 3, 3]
    store.close()
    # Reopening continues the sequence.
    again = Store(tmp_path / "store.sqlite", "bus-7")
    again.add_readings([_reading(5000.0)])
    assert again.seal(signer, 3) == 3


def test_store_refuses_another_devices_chain(tmp_path: Path) -> None:
    Store(tmp_path / "s.sqlite", "bus-1").close()
    with pytest.raises(Exception, match="belongs to device 'bus-1'"):
        Store(tmp_path / "s.sqlite", "bus-2")


def test_verify_set_passes_an_intact_chain(tmp_path: Path, signer: keys.FileSigner) -> None:
    store = _store_with_batches(tmp_path, signer, 4)
    pub = keys.public_key_from_pem(signer.public_pem())
    report = batch.verify_set([(str(s), raw) for s, raw in store.batches()], pub)
    assert report.passed and report.ok == [0, 1, 2, 3]


@pytest.mark.parametrize("part", [2, 3])  # 2: header bytes, 3: payload bytes
def test_one_altered_byte_fails_with_a_reason(
    tmp_path: Path, signer: keys.FileSigner, part: int
) -> None:
    store = _store_with_batches(tmp_path, signer, 2)
    rows = list(store.batches())
    outer = msgpack.unpackb(rows[0][1], raw=False)
    altered = bytearray(outer[part])
    altered[len(altered) // 2] ^= 0x01
    outer[part] = bytes(altered)
    tampered = msgpack.packb(outer, use_bin_type=True)
    pub = keys.public_key_from_pem(signer.public_pem())
    report = batch.verify_set([("0.batch", tampered), ("1.batch", rows[1][1])], pub)
    assert not report.passed
    reasons = " ".join(report.bad.get("0.batch", []))
    if part == 3:
        assert "payload SHA-256 does not match" in reasons
    else:
        # A flipped header byte may break msgpack or change a field; either way it is caught.
        assert reasons
    # Its successor's chain link no longer matches the altered file.
    assert any("chain broken" in r for r in report.bad.get("seq 1", [])) or part == 2


_ONE_BATCH = batch.build(_SIGNER, "bus-7", 0, batch.ZERO_HASH, {"readings": [_reading(1.0)]})


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_any_single_bit_flip_of_a_batch_file_is_detected(data: st.DataObject) -> None:
    # Built once: ECDSA signatures vary in length, which would make the draws flaky.
    raw = _ONE_BATCH
    i = data.draw(st.integers(0, len(raw) - 1))
    flipped = bytearray(raw)
    flipped[i] ^= 1 << data.draw(st.integers(0, 7))
    pub = keys.public_key_from_pem(_SIGNER.public_pem())
    assert not batch.verify_set([("x", bytes(flipped))], pub).passed


def test_deleted_batch_shows_as_a_gap(tmp_path: Path, signer: keys.FileSigner) -> None:
    store = _store_with_batches(tmp_path, signer, 4)
    pub = keys.public_key_from_pem(signer.public_pem())
    kept = [(str(s), raw) for s, raw in store.batches() if s != 2]
    report = batch.verify_set(kept, pub)
    assert report.gaps == [(2, 2)]
    assert not report.passed
    head_missing = batch.verify_set(kept[1:], pub)
    assert (0, 0) in head_missing.gaps


def test_parse_rejects_garbage_with_specific_reasons() -> None:
    cases = {
        b"\xc1": "not msgpack",
        msgpack.packb([1, 2, 3]): "5-element",
        msgpack.packb(["other", 1, b"", b"", b""]): "magic",
        msgpack.packb(["cngmrv-batch", 2, b"", b"", b""]): "version",
        msgpack.packb(["cngmrv-batch", 1, "x", b"", b""]): "header is not a byte string",
        msgpack.packb(["cngmrv-batch", 1, msgpack.packb({"alg": "ES256"}), b"", b""]): "lacks",
    }
    for raw, reason in cases.items():
        with pytest.raises(batch.BatchFormatError, match=reason):
            batch.parse(raw)


def test_cli_export_then_verify_and_tamper(tmp_path: Path, signer: keys.FileSigner, cli) -> None:
    store = _store_with_batches(tmp_path, signer, 3)
    store.close()
    out = tmp_path / "out"
    r = cli("export", "--db", str(tmp_path / "store.sqlite"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["0.batch", "1.batch", "2.batch"]
    pub = str(tmp_path / "keys" / keys.PUB_FILE)
    r = cli("verify", str(out), "--pubkey", pub, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["ok"] == 3

    (out / "1.batch").unlink()
    r = cli("verify", str(out), "--pubkey", pub)
    assert r.returncode == 1
    assert "GAP  batch_seq 1 missing" in r.stdout

    raw = bytearray((out / "2.batch").read_bytes())
    raw[-1] ^= 0xFF  # inside the DER signature
    (out / "2.batch").write_bytes(bytes(raw))
    r = cli("verify", str(out), "--pubkey", pub, "--json")
    assert r.returncode == 1
    bad = json.loads(r.stdout)["bad"]
    assert any("2.batch" in name for name in bad), bad


def test_verify_refuses_the_wrong_key(tmp_path: Path, signer: keys.FileSigner, cli) -> None:
    store = _store_with_batches(tmp_path, signer, 1)
    store.close()
    cli("export", "--db", str(tmp_path / "store.sqlite"), "--out", str(tmp_path / "o"))
    other = tmp_path / "other"
    keys.generate(other)
    r = cli("verify", str(tmp_path / "o"), "--pubkey", str(other / keys.PUB_FILE))
    assert r.returncode == 1
    assert "kid does not match the public key" in r.stdout
