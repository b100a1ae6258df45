"""The virtual bench from the host: one guest run, its outcome as ordinary pytest results.

``pytest vmbench`` (or ``make vm-bench``'s JSON) boots the guest once for the
session (vmbench.run.run_bench: about 15 minutes under TCG, more when the
image must be built) and fails when any stage failed or any guest test did.
Not in the default test run: it needs qemu and root (docs/hil-runbook.md).
"""

from __future__ import annotations

import sys
from typing import Any

import pytest

from vmbench.run import run_bench

# The only guest skips allowed: a person at the bench (replug), and the listen-only flag
# of a CAN controller, which a vcan has not (the TX counter is the proof there).
ALLOWED_SKIPS = ("test_adapter_unplug_and_replug", "test_kit_unplug_and_replug", "no controller")


@pytest.fixture(scope="session")
def bench() -> dict[str, Any]:
    return run_bench(log=sys.stderr)


def test_every_stage_ran(bench: dict[str, Any]) -> None:
    assert not bench["errors"], "\n".join(bench["errors"]) + f"\nlogs: {bench.get('logs')}"


def test_no_guest_test_failed(bench: dict[str, Any]) -> None:
    assert bench["hil_passed"], f"no guest test passed; logs: {bench.get('logs')}"
    assert bench["hil_failed"] == 0, bench["failed_tests"]


def test_nothing_skips_that_the_guest_provides(bench: dict[str, Any]) -> None:
    skipped = [s for s in bench["skipped_tests"] if not any(w in s for w in ALLOWED_SKIPS)]
    assert not skipped, skipped


def test_the_real_recording_gives_the_offline_replay_figures(bench: dict[str, Any]) -> None:
    for key in ("replay_diesel_l", "agent_diesel_l", "replay_rpm_mean", "agent_rpm_mean"):
        assert bench[key] is not None, f"{key} missing: the replay test did not run"


def test_the_agent_sent_nothing_with_the_default_config(bench: dict[str, Any]) -> None:
    assert bench["agent_tx_frames"] == 0


def test_systemd_restarted_the_hung_agent(bench: dict[str, Any]) -> None:
    assert bench["watchdog_restarted"] is True


def test_the_store_survived_the_power_cut(bench: dict[str, Any]) -> None:
    assert bench["power_loss_chain_ok"] is True, bench.get("power_loss")
