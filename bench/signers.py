"""Signer benchmark: sealing rate and signing latency of each signer on the same real batches.

Usage: python bench/signers.py [--batches 120] [--readings 60]

Makes a simulated bus's 1 Hz readings with the real pipeline on the vehicle
model (``cngmrv.sim.feed``), cuts them into batches of ``--readings``, and
for each signer prints, as one JSON object:

- ``batches_per_s``: ``batch.build`` (encode, hash, sign) of the whole chain;
- ``sign_ms``: latency of one ``sign`` over those batches' exact header bytes
  (p50, p99, max), one call at a time as the agent makes them.

Signers: ``file`` (the key file, ``keys.FileSigner``); ``softhsm`` and
``swtpm`` (a ``hsm.Pkcs11Signer`` on a SoftHSM2 token, and on a software TPM
2.0 through tpm2-pkcs11, each made in a temporary folder by
``cngmrv.sim.tokens``; ``skipped`` with the reason when a part is missing);
and ``floor``: the bare ``cryptography`` ECDSA sign of the same headers, what
no signer can beat.
A 60-reading batch is sealed once a minute: ``budget_share`` is the p99
latency as a share of that minute.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from cngmrv.agent.pipeline import Pipeline, PipelineConfig
from cngmrv.signed import batch, hsm, keys
from cngmrv.sim import feed, tokens

PIN = "246810"


def _chunks(rows: list[dict[str, Any]], n: int) -> list[list[dict[str, Any]]]:
    return [rows[i : i + n] for i in range(0, len(rows) - n + 1, n)]


def _seal_all(signer: keys.Signer, chunks: list[list[dict[str, Any]]]) -> tuple[float, list[bytes]]:
    prev, raws = batch.ZERO_HASH, []
    t0 = time.perf_counter()
    for seq, rows in enumerate(chunks):
        raw = batch.build(signer, "bench-bus", seq, prev, {"readings": rows})
        prev = batch.sha256(raw)
        raws.append(raw)
    return time.perf_counter() - t0, raws


def _latency(sign: Callable[[bytes], bytes], headers: list[bytes]) -> dict[str, float]:
    times = []
    for h in headers:
        t0 = time.perf_counter()
        sign(h)
        times.append((time.perf_counter() - t0) * 1000.0)
    times.sort()
    return {
        "p50": round(statistics.median(times), 3),
        "p99": round(times[min(len(times) - 1, int(len(times) * 0.99))], 3),
        "max": round(times[-1], 3),
    }


def _measure(signer: keys.Signer, chunks: list[list[dict[str, Any]]]) -> dict[str, Any]:
    wall, raws = _seal_all(signer, chunks)
    headers = [batch.parse(r).header_bytes for r in raws]
    pub = keys.public_key_from_pem(signer.public_pem())
    # The figures are for signatures that verify, or they mean nothing.
    assert batch.verify_set(((f"{i}.batch", r) for i, r in enumerate(raws)), pub).passed
    lat = _latency(signer.sign, headers)
    return {
        "batches": len(raws),
        "batches_per_s": round(len(raws) / wall, 1),
        "sign_ms": lat,
        "budget_share": round(lat["p99"] / 60_000.0, 7),
    }


def _on_token(
    make: Callable[[Path, str, str], Any], folder: Path, chunks: list[list[dict[str, Any]]]
) -> dict[str, Any]:
    """Measure a fresh key on a token ``make`` sets up; ``skipped`` says why it could not."""
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        return {"skipped": "python-pkcs11 is not installed (pip install 'cngmrv[pkcs11]')"}
    try:
        with make(folder, "bench", PIN) as module:
            ref = hsm.TokenKey(module, "bench", "device", PIN)
            hsm.generate_on_token(ref)
            signer = hsm.Pkcs11Signer(ref)
            try:
                return _measure(signer, chunks)
            finally:
                signer.close()
    except tokens.TokenUnavailable as e:
        return {"skipped": str(e)}


def run(n_batches: int, per_batch: int) -> dict[str, Any]:
    pipeline = Pipeline(PipelineConfig(), 1, "synchronised")
    rows = list(feed.readings(pipeline, float(n_batches * per_batch), seed=1))
    chunks = _chunks(rows, per_batch)[:n_batches]
    out: dict[str, Any] = {
        "batches": len(chunks),
        "readings_per_batch": per_batch,
        "python": sys.version.split()[0],
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        keys.generate(folder / "keys")
        file_signer = keys.load_signer(folder / "keys" / keys.KEY_FILE)
        out["file"] = _measure(file_signer, chunks)
        bare = ec.generate_private_key(ec.SECP256R1())
        _, raws = _seal_all(file_signer, chunks)
        headers = [batch.parse(r).header_bytes for r in raws]
        out["floor"] = {
            "what": "cryptography ECDSA P-256 sign of the same headers, random nonce, no DER work",
            "sign_ms": _latency(lambda h: bare.sign(h, ec.ECDSA(hashes.SHA256())), headers),
        }
        out["softhsm"] = _on_token(tokens.softhsm_token, folder / "softhsm", chunks)
        out["swtpm"] = _on_token(tokens.swtpm_token, folder / "swtpm", chunks)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=120)
    p.add_argument("--readings", type=int, default=60)
    args = p.parse_args()
    print(json.dumps(run(args.batches, args.readings), indent=2))


if __name__ == "__main__":
    main()
