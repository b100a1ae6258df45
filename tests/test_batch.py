"""The signed batch envelope, its column payload, the format document, `export` / `verify`."""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st
from reencode import REENCODINGS

from cngmrv.agent.pipeline import Pipeline, PipelineConfig
from cngmrv.agent.store import Store
from cngmrv.signed import batch, keys
from cngmrv.sim import feed

_SIGNER = keys.FileSigner(ec.generate_private_key(ec.SECP256R1()))
DOC = Path(__file__).resolve().parents[1] / "docs" / "batch-format.md"


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
    assert outer[0] == "cngmrv-batch" and outer[1] == batch.VERSION == 2 and len(outer) == 5
    header = msgpack.unpackb(outer[2], raw=False)
    assert header["alg"] == "ES256"
    assert header["kid"] == signer.kid
    assert header["device_id"] == "bus-7" and header["batch_seq"] == 0
    assert header["prev_hash"] == bytes(32)
    assert header["payload_sha256"] == hashlib.sha256(outer[3]).digest()
    assert header["payload_format"] == "cols-1" and header["n_readings"] == 1
    # The signature is over the exact header bytes, verifiable with the public key alone.
    pub = keys.public_key_from_pem(signer.public_pem())
    assert keys.verify_signature(pub, outer[4], outer[2])
    assert not keys.verify_signature(pub, outer[4], outer[2] + b"\x00")


def test_extra_header_cannot_override_signed_or_derived_fields(signer: keys.FileSigner) -> None:
    for field in ("batch_seq", "alg", "n_readings", "payload_format"):
        with pytest.raises(ValueError, match="may not set"):
            batch.build(signer, "bus-7", 0, batch.ZERO_HASH, {}, {field: 1})


# -- the column table ------------------------------------------------------------------

_scalars = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**63), 2**64 - 1),
    st.booleans(),
    st.none(),
    st.text(max_size=5),
    st.binary(max_size=5),
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["a", "b", "c"]), inner, max_size=3)
    ),
    max_leaves=6,
)
_rows = st.lists(
    st.dictionaries(st.sampled_from(["t0", "x", "y", "cov", "gaps"]), _values, max_size=5),
    max_size=8,
)


def _canon(obj: Any) -> Any:
    # Key order is not part of the contract; types and bits are (NaN, -0.0, int vs float).
    if isinstance(obj, dict):
        return sorted((k, _canon(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_canon(v) for v in obj]
    return batch.packb(obj)


@settings(max_examples=150)
@given(rows=_rows)
def test_column_table_round_trips_exactly(rows: list[dict[str, Any]]) -> None:
    table = batch.encode_readings(rows)
    back = batch.decode_readings(batch.unpackb(batch.packb(table)))
    assert [_canon(r) for r in back] == [_canon(r) for r in rows]


def test_column_table_keeps_float_types_and_signs() -> None:
    rows = [{"x": -0.0, "y": 1.0, "z": 1}, {"x": 2.0, "y": math.nan, "z": 1}]
    back = batch.decode_readings(batch.encode_readings(rows))
    assert math.copysign(1.0, back[0]["x"]) == -1.0
    assert type(back[1]["x"]) is float and back[1]["x"] == 2.0
    assert type(back[0]["y"]) is float and math.isnan(back[1]["y"])
    assert type(back[0]["z"]) is int


@settings(max_examples=150)
@given(obj=st.recursive(_scalars, lambda i: st.lists(i) | st.dictionaries(_scalars, i)))
def test_column_table_decoder_refuses_garbage_with_a_reason(obj: Any) -> None:
    for candidate in (obj, {"n": 2, "cols": obj}, {"n": 1, "cols": {"x": obj}}):
        try:
            batch.decode_readings(candidate)
        except batch.BatchFormatError:
            pass


def _real_readings(n: int) -> list[dict[str, Any]]:
    pipeline = Pipeline(PipelineConfig(), 3, "synchronised")
    out = []
    for r in feed.readings(pipeline, n + 5, seed=4):
        out.append(r)
    return out[:n]


def test_a_minute_of_real_readings_is_small_on_the_wire(signer: keys.FileSigner) -> None:
    rows = _real_readings(60)
    raw = batch.build(signer, "bus-7", 5, bytes(32), {"readings": rows, "events": []})
    assert len(raw) < 8192  # the goal; the row layout would take about 13 KB
    assert len(raw) < len(batch.packb(rows)) / 3
    assert batch.parse(raw).payload()["readings"] == rows


def test_batches_in_the_old_row_layout_still_decode(signer: keys.FileSigner) -> None:
    payload = batch.packb({"readings": [_reading(1.0)], "events": []})
    header = {
        "alg": "ES256",
        "kid": signer.kid,
        "device_id": "bus-7",
        "batch_seq": 0,
        "prev_hash": bytes(32),
        "payload_sha256": batch.sha256(payload),
    }
    hb = batch.packb(header)
    raw = batch.packb(["cngmrv-batch", 1, hb, payload, signer.sign(hb)])
    b = batch.parse(raw)
    assert b.payload()["readings"] == [_reading(1.0)]
    assert batch.check(b, keys.public_key_from_pem(signer.public_pem())) == []


# -- sealing and verifying ---------------------------------------------------------------


def test_seal_chains_batches_and_never_reuses_a_sequence(
    tmp_path: Path, signer: keys.FileSigner
) -> None:
    store = _store_with_batches(tmp_path, signer, 3)
    assert store.seal(signer, 3) is None  # nothing left to seal
    rows = list(store.batches())
    assert [s for s, _ in rows] == [0, 1, 2]
    parsed = [batch.parse(raw) for _, raw in rows]
    # Version 2 chains over batch ids: SHA-256 of the previous header bytes.
    assert parsed[1].header["prev_hash"] == hashlib.sha256(parsed[0].header_bytes).digest()
    assert parsed[2].header["prev_hash"] == hashlib.sha256(parsed[1].header_bytes).digest()
    assert [p.payload()["readings"] for p in parsed] == [
        [_reading(1000.0 + 3 * b + i) for i in range(3)] for b in range(3)
    ]
    assert [p.first_reading_seq for p in parsed] == [0, 3, 6]
    store.close()
    # Reopening continues the sequence.
    again = Store(tmp_path / "store.sqlite", "bus-7")
    again.add_readings([_reading(5000.0)])
    sealed = again.seal(signer, 3)
    assert sealed is not None and (sealed.seq, sealed.first_reading) == (3, 9)


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
    assert 0 not in report.ok


_ONE_BATCH = batch.build(_SIGNER, "bus-7", 0, batch.ZERO_HASH, {"readings": [_reading(1.0)]})


@settings(max_examples=200)
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


def test_parse_rejects_garbage_with_specific_reasons(signer: keys.FileSigner) -> None:
    good = batch.parse(_ONE_BATCH).header

    def env(**fields: object) -> bytes:
        return msgpack.packb(["cngmrv-batch", 2, msgpack.packb({**good, **fields}), b"", b""])

    cases = {
        b"\xc1": "not msgpack",
        _ONE_BATCH[:-7]: "truncated",
        _ONE_BATCH + b"\x00": "trailing bytes after the batch",
        msgpack.packb([1, 2, 3]): "5-element",
        msgpack.packb(["other", 1, b"", b"", b""]): "magic",
        msgpack.packb(["cngmrv-batch", 3, b"", b"", b""]): "version",
        msgpack.packb(["cngmrv-batch", 1, "x", b"", b""]): "header is not a byte string",
        msgpack.packb(["cngmrv-batch", 1, msgpack.packb({"alg": "ES256"}), b"", b""]): "lacks",
        env(batch_seq=-1): "batch_seq",
        env(batch_seq=2**63): "batch_seq",
        env(batch_seq=True): "batch_seq",
        env(kid="ABC"): "kid",
        env(device_id=""): "device_id",
        env(device_id="x" * 200): "device_id",
        env(device_id="x" * 129): "device_id",
        env(device_id="../x"): "device_id",
        env(device_id="bus\nevent=tamper_alarm"): "device_id",
        env(alg=["ES256"]): "alg",
        env(prev_hash=b"\x00" * 31): "prev_hash",
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
    summary = json.loads(r.stdout)
    assert summary["passed"] and summary["devices"]["bus-7"]["batches"] == 3
    assert summary["devices"]["bus-7"]["readings"] == 9

    (out / "1.batch").unlink()
    r = cli("verify", str(out), "--pubkey", pub)
    assert r.returncode == 1
    assert "batches 1..1 missing" in r.stdout and "FAILED" in r.stdout

    raw = bytearray((out / "2.batch").read_bytes())
    raw[-1] ^= 0xFF  # inside the DER signature
    (out / "2.batch").write_bytes(bytes(raw))
    r = cli("verify", str(out), "--pubkey", pub, "--json")
    assert r.returncode == 1
    bad = [f for f in json.loads(r.stdout)["findings"] if f["severity"] == "bad"]
    assert any("2.batch" in f.get("where", "") for f in bad), bad


def test_verify_refuses_the_wrong_key(tmp_path: Path, signer: keys.FileSigner, cli) -> None:
    store = _store_with_batches(tmp_path, signer, 1)
    store.close()
    cli("export", "--db", str(tmp_path / "store.sqlite"), "--out", str(tmp_path / "o"))
    other = tmp_path / "other"
    keys.generate(other)
    r = cli("verify", str(tmp_path / "o"), "--pubkey", str(other / keys.PUB_FILE))
    assert r.returncode == 1
    assert "no trusted public key has kid" in r.stdout


def test_verify_reads_a_store_directly(tmp_path: Path, signer: keys.FileSigner, cli) -> None:
    _store_with_batches(tmp_path, signer, 2).close()
    pub = str(tmp_path / "keys" / keys.PUB_FILE)
    r = cli("verify", "--db", str(tmp_path / "store.sqlite"), "--pubkey", f"bus-7={pub}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"bus-7\s+2\s+0\s+0\.\.1", r.stdout), r.stdout


# -- the format document ---------------------------------------------------------------


def _doc_blocks() -> dict[str, str]:
    """Fenced blocks of docs/batch-format.md preceded by ``<!-- vector: X -->`` or ``recipe``."""
    text = DOC.read_text(encoding="utf-8")
    found = re.findall(r"<!-- (?:vector|recipe): (\S+) -->\n```[a-z]*\n(.*?)```", text, re.S)
    return dict(found)


def test_format_document_vectors_are_the_exact_bytes() -> None:
    blocks = _doc_blocks()
    key = serialization.load_pem_private_key(blocks["test.key"].encode(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    signer = keys.FileSigner(key)
    assert signer.public_pem().decode() == blocks["device.pub"]
    extra = {"first_reading_seq": 0, "boot_epoch": 1}
    boot = json.loads(blocks["boot-event.json"])
    b0 = batch.build(signer, "bus-test-001", 0, batch.ZERO_HASH, {"events": [boot]}, extra)
    readings = json.loads(blocks["readings.json"])
    b1 = batch.build(signer, "bus-test-001", 1, batch.chain_id(b0), {"readings": readings}, extra)
    assert b0 == bytes.fromhex("".join(blocks["0.batch"].split()))
    assert b1 == bytes.fromhex("".join(blocks["1.batch"].split()))
    assert batch.parse(b1).payload()["readings"] == readings
    report = batch.verify_set([("0", b0), ("1", b1)], key.public_key())
    assert report.passed and report.ok == [0, 1]


def test_format_document_legacy_v1_vectors_still_verify() -> None:
    """Stored version-1 data stays valid: high s accepted, chained by the whole file's hash."""
    blocks = _doc_blocks()
    key = serialization.load_pem_private_key(blocks["test.key"].encode(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    v0 = bytes.fromhex("".join(blocks["v1-0.batch"].split()))
    v1 = bytes.fromhex("".join(blocks["v1-1.batch"].split()))
    p0, p1 = batch.parse(v0), batch.parse(v1)
    assert (p0.version, p1.version) == (1, 1)
    _, s0 = decode_dss_signature(p0.signature)
    assert s0 > keys.P256_ORDER // 2  # the legacy vector carries a high s
    assert p1.header["prev_hash"] == hashlib.sha256(v0).digest() == p0.chain_id
    report = batch.audit(
        [("0.batch", v0), ("1.batch", v1)], batch.KeyRing.of([(None, key.public_key())])
    )
    assert report.passed and report.devices["bus-test-001"].legacy_v1 == 2


def _run_recipe(tmp_path: Path, files: dict[str, bytes]) -> subprocess.CompletedProcess[str]:
    blocks = _doc_blocks()
    recipe = blocks["split.py"]
    # Generic msgpack only: an outside verifier has no cngmrv.
    assert not re.search(r"^\s*(import|from)\s+cngmrv", recipe, re.M)
    (tmp_path / "split.py").write_text(recipe)
    (tmp_path / "device.pub").write_text(blocks["device.pub"])
    for name, raw in files.items():
        (tmp_path / name).write_bytes(raw)
    # The recipe says python3; run it with this interpreter (it has msgpack).
    script = blocks["verify.sh"].replace("python3 ", f"{sys.executable} -I ")
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command line")
def test_format_document_openssl_recipe_verifies_the_vector(tmp_path: Path) -> None:
    blocks = _doc_blocks()
    vectors = {n: bytes.fromhex("".join(blocks[n].split())) for n in ("0.batch", "1.batch")}
    r = _run_recipe(tmp_path, vectors)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    fields = {line.split(" ")[1]: line.split(" ", 2)[2] for line in lines[4:8]}
    hashes = [line.split()[0] for line in lines[10:]]
    assert lines[8:10] == ["Verified OK", "low s OK"]
    assert hashes == [fields["payload_sha256"], fields["kid"], fields["prev_hash"]]
    doc_expected = DOC.read_text().split("Expected output:\n\n```\n", 1)[1].split("```")[0]
    assert r.stdout == doc_expected
    # And the same recipe catches a forgery.
    header = bytearray((tmp_path / "1.batch.header").read_bytes())
    header[20] ^= 1
    (tmp_path / "1.batch.header").write_bytes(bytes(header))
    r = subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", "device.pub", "-signature", "1.batch.sig"]
        + ["1.batch.header"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "Verification failure" in r.stdout + r.stderr


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command line")
@pytest.mark.parametrize("kind", ["high_s", "array16", "bin32", "trailing"])
def test_format_document_openssl_recipe_refuses_re_encodings(tmp_path: Path, kind: str) -> None:
    blocks = _doc_blocks()
    vectors = {n: bytes.fromhex("".join(blocks[n].split())) for n in ("0.batch", "1.batch")}
    vectors["1.batch"] = REENCODINGS[kind](vectors["1.batch"])
    r = _run_recipe(tmp_path, vectors)
    assert r.returncode != 0
    if kind == "high_s":  # openssl alone would accept it: the low-S line refuses
        assert "Verified OK" in r.stdout and "refuse: high s" in r.stdout
    else:
        assert "refuse: envelope is not canonical" in r.stderr or "ExtraData" in r.stderr
