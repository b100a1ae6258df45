"""Decode throughput: CAN frames through source -> J1939 decode -> integrator.

Prints one JSON object.  All figures come from the same run on the same
frames (the shared real recording, 29-bit and 11-bit mixed):

* ``replay_fps``: ``cngmrv replay`` on a candump ``.log`` written from the
  recording (file read, python-can parse, pipeline, readings); ``mf4_replay_fps``
  is the same for the original MF4 file.
* ``live_fps``: the agent's live path on a python-can ``virtual`` bus:
  :class:`~cngmrv.drivers.can_source.CanSource` reader thread, bounded queue,
  ``Pipeline.on_can``, readings popped after every batch.
* ``bare_receive_fps``: python-can alone, ``bus.recv()`` in a loop on the same
  kind of bus, as the baseline the live path is compared with.

Both bus figures drain a receive queue the sender filled beforehand, so the
sender's cost is not in either.  Each figure is the median of ``--repeat`` runs.
Usage: python bench/decode.py [--frames N] [--repeat R]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import can

from cngmrv.agent.pipeline import Pipeline, PipelineConfig
from cngmrv.agent.replay import replay
from cngmrv.drivers.can_source import CanSource

GOAL_REPLAY_FPS = 100_000
GOAL_LIVE_OVERHEAD = 2.0


def shared_data() -> Path:
    env = os.environ.get("CNGMRV_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


RECORDING = shared_data() / "css-electronics" / "j1939-idle-127s.MF4"


def bench_replay(path: Path) -> tuple[float, int]:
    start = time.perf_counter()
    summary = replay(path)
    elapsed = time.perf_counter() - start
    assert summary["error"] is None, summary["error"]
    return summary["frames"] / elapsed, summary["frames"]


def bus_frames(messages: list[can.Message], n: int) -> list[can.Message]:
    """``n`` frames for the bus runs: the recording's, repeated with time moving on."""
    span = messages[-1].timestamp - messages[0].timestamp + 0.01
    out = []
    k = 0
    while len(out) < n:
        for m in messages:
            out.append(
                can.Message(
                    timestamp=m.timestamp + k * span,
                    arbitration_id=m.arbitration_id,
                    is_extended_id=m.is_extended_id,
                    data=m.data,
                )
            )
            if len(out) == n:
                break
        k += 1
    return out


def preload(frames: list[can.Message]) -> tuple[can.BusABC, can.BusABC]:
    channel = f"bench-{uuid.uuid4().hex[:8]}"
    rx = can.Bus(interface="virtual", channel=channel)
    tx = can.Bus(interface="virtual", channel=channel, preserve_timestamps=True)
    for m in frames:
        tx.send(m)
    return rx, tx


def bench_bare(frames: list[can.Message]) -> float:
    rx, tx = preload(frames)
    n = len(frames)
    recv = rx.recv
    got = 0
    start = time.perf_counter()
    while got < n:
        if recv(1.0) is not None:
            got += 1
    elapsed = time.perf_counter() - start
    rx.shutdown()
    tx.shutdown()
    return n / elapsed


def bench_live(frames: list[can.Message]) -> tuple[float, int]:
    rx, tx = preload(frames)
    j1939_frames = sum(1 for m in frames if m.is_extended_id)
    source = CanSource(rx, queue_size=len(frames) + 1)
    pipeline = Pipeline(PipelineConfig())
    on_can = pipeline.on_can
    start = time.perf_counter()
    source.start()
    while pipeline.stats.frames < j1939_frames:
        for t, can_id, data, mono in source.wait(1.0):
            on_can(t, can_id, data, mono)
        pipeline.advance()
    elapsed = time.perf_counter() - start
    source.stop()
    tx.shutdown()
    assert source.stats["queue_dropped"] == 0
    # Frames in = what the bus delivered (11-bit ones are read and skipped too).
    return len(frames) / elapsed, j1939_frames


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=200_000, help="frames per bus run")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if not RECORDING.is_file():
        sys.exit(f"recording not found at {RECORDING} (set CNGMRV_SHARED_DATA)")
    messages = list(can.LogReader(str(RECORDING)))
    with tempfile.TemporaryDirectory(prefix="cngmrv-bench-") as tmp:
        log = Path(tmp) / "recording.log"
        with can.Logger(str(log)) as w:
            for m in messages:
                w.on_message_received(m)
        replay_runs = [bench_replay(log)[0] for _ in range(args.repeat)]
        mf4_runs = [bench_replay(RECORDING)[0] for _ in range(args.repeat)]
    frames = bus_frames(messages, args.frames)
    bare_runs, live_runs = [], []
    for _ in range(args.repeat):  # interleaved, so both see the same machine load
        bare_runs.append(bench_bare(frames))
        live_runs.append(bench_live(frames)[0])
    replay_fps = statistics.median(replay_runs)
    live_fps = statistics.median(live_runs)
    bare_fps = statistics.median(bare_runs)
    out: dict[str, Any] = {
        "benchmark": "cngmrv CAN decode: source -> J1939 decode -> integrator",
        "replay_fps": round(replay_fps),
        "live_fps": round(live_fps),
        "bare_receive_fps": round(bare_fps),
        "mf4_replay_fps": round(statistics.median(mf4_runs)),
        "live_overhead": round(bare_fps / live_fps, 3),
        "goals": {
            "replay_fps_at_least": GOAL_REPLAY_FPS,
            "replay_met": replay_fps >= GOAL_REPLAY_FPS,
            "live_overhead_at_most": GOAL_LIVE_OVERHEAD,
            "live_met": bare_fps / live_fps <= GOAL_LIVE_OVERHEAD,
        },
        "runs": {
            "replay_fps": [round(x) for x in replay_runs],
            "mf4_replay_fps": [round(x) for x in mf4_runs],
            "live_fps": [round(x) for x in live_runs],
            "bare_receive_fps": [round(x) for x in bare_runs],
        },
        "notes": {
            "replay_fps": f"candump .log of the recording, {len(messages)} frames, cngmrv replay",
            "mf4_replay_fps": "the original MF4 through python-can's MF4Reader (asammdf)",
            "live_fps": f"{args.frames} frames on a virtual bus, CanSource + Pipeline.on_can",
            "bare_receive_fps": f"{args.frames} frames, python-can recv() loop only",
            "live_overhead": "bare_receive_fps / live_fps",
        },
        "machine": {
            "machine": platform.machine(),
            "processor": platform.processor(),
            "system": platform.system(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "python_can": can.__version__,
            "load_average": os.getloadavg(),
        },
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
