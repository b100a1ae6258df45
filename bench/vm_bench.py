"""The virtual bench (docs/hil-runbook.md): the x86_64 guest's suite, as one JSON object.

Builds the guest image when its recipe changed (kept in
``${XDG_CACHE_HOME:-~/.cache}/cngmrv/vm/``), boots it under qemu (TCG), installs
the project as docs/deploy-pi.md says, runs ``hil_tests`` on the kernel's vcan0
with systemd as PID 1, cuts the guest's power while the agent acquires and
boots it again (vmbench/run.py).  Prints the contract's keys (docs/hil-runbook.md,
*The virtual bench*); a figure no guest test produced is ``null``.  ``errors``
lists each failure as ``[stage] message``, the stage being image build, boot,
install or suite.  Exit status 0 only when every guest test passed and no stage
failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmbench.run import run_bench, run_smoke  # noqa: E402  (run from the repository)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--keep", type=Path, help="keep the run's folder (share, disk, consoles) here")
    p.add_argument(
        "--arch",
        choices=("amd64", "arm64"),
        default="amd64",
        help="amd64: the bench above; arm64: the smoke (make vm-bench-arm64): the cffi "
        "extension built in an arm64 guest, cngmrv sim/verify/replay and the integrator's tests",
    )
    args = p.parse_args()
    result = run_bench(keep=args.keep) if args.arch == "amd64" else run_smoke(keep=args.keep)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=False))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")
    return 0 if not result["errors"] and result["hil_failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
