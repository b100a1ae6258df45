"""On the bench: a real recording at real time through the kernel, against ``cngmrv replay``.

can-utils' ``canplayer`` plays ``CNGMRV_HIL_RECORDING`` (a candump ``-L`` log;
the virtual bench converts the shared MF4 recording) into ``CNGMRV_HIL_CAN``
at the recording's own pace, while the agent runs under systemd
(``CNGMRV_HIL_SYSTEMD=1``).  Its signed readings must give the figures the
offline replay of the same file gives, within the window-boundary effects:

* the agent's readings are cut on its own clock's whole seconds, the replay's
  on the recording's, so the first and last partial reading differ: at most
  one reading period at each end, which bounds the diesel difference by
  ``2 * period / duration`` of the total (about 1.6 % for 127 s);
* the replay's engine speed is the mean of the EEC1 frames, the agent's the
  time-weighted mean of its readings (``engine_rev`` over its coverage): equal
  for frames evenly spaced, so within 1 %.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from hil_support import (
    CanBench,
    InstalledAgent,
    frames_through_the_filters,
    report_figures,
    systemd_bench,
)


def test_recording_at_real_time_matches_the_offline_replay(can_bench: CanBench) -> None:
    recording = os.environ.get("CNGMRV_HIL_RECORDING")
    if not recording or not Path(recording).exists():
        pytest.skip(
            "set CNGMRV_HIL_RECORDING to a candump -L log of a real engine (make vm-bench does)"
        )
    if not can_bench.virtual:
        pytest.skip("canplayer would transmit the recording onto a real bus")
    agent: InstalledAgent = systemd_bench()
    agent.configure()
    offline = subprocess.run(
        [agent.CLI, "replay", recording, "--json", "--no-progress"],
        capture_output=True,
        text=True,
        check=True,
    )
    replay = json.loads(offline.stdout)
    played = frames_through_the_filters(Path(recording))
    mark = agent.cursor()
    agent.systemctl("start")
    t0 = time.monotonic()
    subprocess.run(["canplayer", "-I", recording, f"{can_bench.name}=vcan0"], check=True)
    played_s = time.monotonic() - t0
    time.sleep(2.0)  # the last frames through the pipeline before the stop seals them
    agent.systemctl("stop")
    stopped = agent.wait_for_message(r"event=agent_stopped .*can_frames=\d+", mark, 10.0)
    received = int(re.search(r"can_frames=(\d+)", stopped).group(1))  # type: ignore[union-attr]
    readings = agent.readings()
    agent_diesel = sum(r["diesel_l"] for r in readings)
    rev = sum(r["engine_rev"] for r in readings)
    rev_s = sum(r["cov"]["engine_rev"] for r in readings)
    agent_rpm = 60.0 * rev / rev_s if rev_s else None
    figures = {
        "replay_diesel_l": replay["diesel_l"],
        "agent_diesel_l": agent_diesel,
        "replay_rpm_mean": replay["engine_speed_mean_rpm"],
        "agent_rpm_mean": agent_rpm,
        "replay_readings": replay["readings"],
        "agent_readings": len(readings),
        "played_s": played_s,
        "frames_played": played,
        "frames_received": received,
        "recording_s": replay["duration_s"],
    }
    report_figures("replay", figures)
    assert played_s < replay["duration_s"] * 1.05 + 2.0, f"canplayer fell behind: {figures}"
    # Every frame canplayer put on the bus that the kernel filters let through must
    # reach the agent; frames the kernel dropped on a full receive queue would go unseen.
    assert received == played, (
        f"the agent read {received} of the {played} frames played through its filters; "
        f"it reported no loss: {figures}"
    )
    bound = 2.0 * 1.0 / replay["duration_s"]
    assert replay["diesel_l"] > 0
    assert abs(agent_diesel - replay["diesel_l"]) <= bound * replay["diesel_l"], figures
    assert agent_rpm is not None
    assert (
        abs(agent_rpm - replay["engine_speed_mean_rpm"]) <= 0.01 * replay["engine_speed_mean_rpm"]
    ), figures
