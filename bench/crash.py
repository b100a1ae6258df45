"""Long crash run: the harness of tests/test_crash.py with many more kills.

Usage: python bench/crash.py [--kills 2000] [--dir DIR] [--seed 1]

Prints one JSON object: the kill count, what each kill interrupted, and every
check (integrity_check, contiguous sequences, BOOT per start, chain verified
end to end, ingest copies byte-identical, readings lost per kill against the
buffer window).  Exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

# The crash harness is a test program, kept with the tests rather than installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import crash_harness as crash  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=2000)
    p.add_argument("--dir", help="work folder (default: a temporary one)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="cngmrv-crash-") as tmp:
        r = crash.run(Path(tmp), kills=args.kills, seed=args.seed, progress=True)
    epochs = r.pop("boot_epochs")
    booted = r.pop("booted_runs")
    r["boot_events"] = len(epochs)
    r["boot_epochs_contiguous"] = epochs == list(range(1, len(epochs) + 1))
    r["every_booted_run_signed"] = set(booted) <= set(epochs)
    ok = (
        r["integrity_check"] == "ok"
        and r["batch_seqs_contiguous"]
        and r["reading_seqs_contiguous"]
        and r["boot_epochs_contiguous"]
        and r["every_booted_run_signed"]
        and r["chain_verified"]
        and r["ingest_identical"]
        and r["lost_per_kill_max"] <= r["buffer_readings"]
    )
    r["passed"] = ok
    print(json.dumps(r, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
