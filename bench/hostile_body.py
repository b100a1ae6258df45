"""What refusing a hostile batch body costs the ingest's parser (docs/batch-format.md).

Prints one JSON object.  Each case runs ``batch.parse`` in a fresh child
process on one body and reports the child's wall time and its peak resident
memory growth (``ru_maxrss`` after less before, in MB):

* ``empty_maps_<size>``: ``[{}, {}, ...]`` as one msgpack array32 of that
  many bytes, the body the issue's probe sent (16 MiB there; the ingest now
  refuses anything above ``MAX_BATCH_BYTES`` from its headers alone, so the
  largest body that reaches the parser is 256 KiB);
* ``real_batch``: a genuine 60-reading batch, for comparison.

Usage: python bench/hostile_body.py
"""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import resource, sys, time
from cngmrv.signed import batch
kind, n = sys.argv[1], int(sys.argv[2])
if kind == "maps":
    body = b"\xdd" + n.to_bytes(4, "big") + b"\x80" * n
else:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cngmrv.signed import keys
    signer = keys.FileSigner(ec.generate_private_key(ec.SECP256R1()))
    rows = [{"t0": 1.0e9 + i, "dur": 1.0, "diesel_l": 0.001 * i, "gas_kg": 0.002} for i in range(60)]
    body = batch.build(signer, "bus-1", 1, batch.ZERO_HASH, {"readings": rows})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
try:
    batch.parse(body)
    outcome = "parsed"
except batch.BatchFormatError as e:
    outcome = e.code
dt = time.perf_counter() - t
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(len(body), dt, (after - before) / 1024, outcome)
"""


def run(kind: str, n: int) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, kind, str(n)], capture_output=True, text=True, check=True
    ).stdout.split()
    return {
        "bytes": int(out[0]),
        "seconds": round(float(out[1]), 6),
        "peak_rss_growth_mb": round(float(out[2]), 2),
        "outcome": out[3],
    }


def main() -> None:
    result = {
        "empty_maps_256KiB": run("maps", 256 * 1024 - 5),
        "empty_maps_16MiB": run("maps", 16 * 1024 * 1024 - 5),
        "real_batch": run("real", 0),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
