"""Crash harness: SIGKILL the agent's store path at random moments, restart, check nothing is lost.

Two halves:

- ``python tests/crash_harness.py child --workdir W --url U`` is the child:
  a small process that runs the real recorder (buffer, store,
  sealing, start-up sequence) and the real uploader on readings from the
  deterministic in-process feed (:mod:`cngmrv.sim.feed`), so it starts in a
  fraction of a second.  It writes one line per reading it hands to the
  recorder (``R``) and markers around sealing (``s``/``S``) and uploading
  (``u``/``U``), so the parent knows what was produced and what it interrupted.
  With ``--drain`` it only starts up, uploads everything, stops cleanly.
- :func:`run` is the parent: it keeps a reference ingest server up, starts the
  child again and again on the same work folder, kills it with SIGKILL after a
  random delay, and finally drains and checks: the store passes
  ``integrity_check``; batch and reading sequences are contiguous; every
  start is a signed BOOT event; the chain verifies end to end; the ingest's
  copies are byte-identical to the store's; and no kill lost more readings
  than the buffer window holds.

``tests/test_crash.py`` runs 200 kills; ``bench/crash.py`` runs a long one.
Both import this file from the source tree: it is a test program, so the
package does not install it.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

DEVICE_ID = "crash-bus-001"


# -- the child ------------------------------------------------------------------------


def _emit(line: str) -> None:
    # One write(2) per line, unbuffered: whatever was written before the kill reaches the parent.
    os.write(1, (line + "\n").encode())


def child(args: argparse.Namespace) -> int:
    from cngmrv.agent.pipeline import Pipeline, PipelineConfig
    from cngmrv.agent.recorder import Recorder, RecorderConfig
    from cngmrv.agent.upload import Uploader
    from cngmrv.signed import keys
    from cngmrv.sim import feed

    work = Path(args.workdir)
    signer = keys.load_signer(work / "keys" / keys.KEY_FILE)
    rec = Recorder(
        work / "store.sqlite",
        DEVICE_ID,
        signer,
        RecorderConfig(readings_per_batch=args.per_batch, buffer_s=args.buffer_s, period_s=1.0),
        clock="synchronised",
    )
    boot = rec.start()
    _emit(f"E {boot.epoch}")
    store = rec.store
    real_seal = store.seal

    def seal(*a: Any, **k: Any) -> Any:
        _emit("s")
        out = real_seal(*a, **k)
        _emit("S")
        return out

    uploader = Uploader(
        lambda: rec.store, args.url, timeout=5.0, base_s=0.01, cap_s=0.2, seed=boot.epoch
    )
    real_send = uploader.transport.send

    def send(raw: bytes) -> Any:
        _emit("u")
        out = real_send(raw)
        _emit("U")
        return out

    # Markers only: the calls underneath are the real ones.
    store.seal = seal  # type: ignore[method-assign]
    uploader.transport.send = send  # type: ignore[method-assign]
    rec.on_sealed = lambda _: uploader.notify()
    uploader.start()
    uploader.notify()
    if args.drain:
        _drain(uploader, store)
        rec.stop()
        _drain(uploader, store)
        uploader.stop()
        rec.close()
        _emit("D")
        return 0
    pipeline = Pipeline(PipelineConfig(), boot.epoch, "synchronised")
    for i, reading in enumerate(
        feed.readings(pipeline, 3600.0, seed=boot.epoch, t0=boot.epoch * 1e5)
    ):
        _emit(f"R {i}")
        rec.add([reading])
        rec.tick()
    rec.stop()
    uploader.stop()
    rec.close()
    return 0


def _drain(uploader: Any, store: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    uploader.notify()
    while store.counts()["batches_pending"] and time.monotonic() < deadline:
        time.sleep(0.02)
        uploader.notify()


# -- the parent -----------------------------------------------------------------------


class _Run:
    """One child process and what it told us before it died."""

    def __init__(self, cmd: list[str]) -> None:
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.epoch: int | None = None
        self.emitted = 0
        self.sealing = self.uploading = False
        self.done = False
        self.booted = threading.Event()
        self.stderr = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode().strip()
            tag = line[:1]
            if tag == "R":
                self.emitted = int(line[2:]) + 1
            elif tag == "E":
                self.epoch = int(line[2:])
                self.booted.set()
            elif tag in "sS":
                self.sealing = tag == "s"
            elif tag in "uU":
                self.uploading = tag == "u"
            elif tag == "D":
                self.done = True

    def phase(self) -> str:
        if self.epoch is None:
            return "startup"
        if self.sealing:
            return "sealing"
        if self.uploading:
            return "upload"
        return "acquisition"

    def kill(self) -> str:
        phase = self.phase()  # what it was doing as far as we knew, just before the kill
        self.proc.send_signal(signal.SIGKILL)
        self.wait()
        return phase

    def wait(self, timeout: float = 120.0) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(timeout)
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()
        return rc


def run(
    workdir: Path,
    kills: int = 200,
    seed: int = 1,
    max_delay: float = 0.2,
    startup_share: float = 0.25,
    per_batch: int = 5,
    buffer_s: float = 3.0,
    progress: bool = False,
) -> dict[str, Any]:
    """Kill and restart the child ``kills`` times on ``workdir``, drain, and check everything."""
    from cngmrv.agent.store import Store
    from cngmrv.office.ingest import IngestServer, register_device, stored_batches
    from cngmrv.signed import batch, keys

    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "keys" / keys.KEY_FILE).exists():
        keys.generate(workdir / "keys")
    server = IngestServer(workdir / "ingest.sqlite").start()
    register_device(server.db, DEVICE_ID, (workdir / "keys" / keys.PUB_FILE).read_bytes())
    base = [sys.executable, str(Path(__file__).resolve()), "child", "--workdir", str(workdir)]
    base += ["--url", server.url, "--per-batch", str(per_batch), "--buffer-s", str(buffer_s)]
    emitted: dict[int, int] = {}
    phases: Counter[str] = Counter()
    started = time.monotonic()
    try:
        for k in range(kills):
            child_run = _Run(base)
            # A quarter of the kills land anywhere in start-up; the rest after it, so a
            # busy machine's slow start-up cannot crowd out sealing and upload.
            if rng.random() < startup_share:
                time.sleep(rng.uniform(0.0, 0.4))
            else:
                child_run.booted.wait(30.0)
                time.sleep(rng.uniform(0.0, max_delay))
            phases[child_run.kill()] += 1
            if child_run.epoch is not None:
                emitted[child_run.epoch] = child_run.emitted
            if progress and (k + 1) % 50 == 0:
                print(f"{k + 1} kills, {time.monotonic() - started:.0f} s", file=sys.stderr)
        final = _Run([*base, "--drain"])
        rc = final.wait()
        if rc != 0 or not final.done:
            raise RuntimeError(f"drain run failed ({rc}): {final.stderr.decode()[-2000:]}")
        held = stored_batches(server.db, DEVICE_ID)
    finally:
        server.stop()

    store = Store(workdir / "store.sqlite", DEVICE_ID)
    try:
        integrity = store.integrity_check()
        local = list(store.batches())
        unsealed = store.unsealed()
    finally:
        store.close()
    pub = keys.load_public_key(workdir / "keys" / keys.PUB_FILE)
    report = batch.audit(
        ((f"seq {s}", raw) for s, raw in local), batch.KeyRing.of([(DEVICE_ID, pub)])
    )
    parsed = [batch.parse(raw) for _, raw in local]
    per_epoch: Counter[int] = Counter()
    boots: list[int] = []
    reading_seqs: list[int] = []
    for b in parsed:
        body = b.payload()
        first = b.first_reading_seq or 0
        reading_seqs.extend(range(first, first + len(body["readings"])))
        per_epoch.update(int(r["epoch"]) for r in body["readings"])
        boots.extend(int(e["epoch"]) for e in body["events"] if e.get("kind") == "BOOT")
    lost = {e: emitted[e] - per_epoch.get(e, 0) for e in emitted}
    dev = report.devices.get(DEVICE_ID)
    return {
        "kills": kills,
        "wall_seconds": round(time.monotonic() - started, 1),
        "phases": dict(phases),
        "integrity_check": integrity,
        "batches": len(local),
        "batch_seqs_contiguous": [s for s, _ in local] == list(range(len(local))),
        "readings": len(reading_seqs),
        "reading_seqs_contiguous": reading_seqs == list(range(len(reading_seqs))),
        "unsealed_after_drain": list(unsealed),
        "boot_epochs": boots,
        "booted_runs": sorted(emitted),
        "chain_verified": report.passed and len(report.verified) == len(local),
        "findings": [f.as_dict() for f in report.findings if f.severity != "note"][:20],
        "unclean_stops": dev.unclean_stops if dev else None,
        "ingest_identical": held == local,
        "ingest_batches": len(held),
        "readings_emitted": sum(emitted.values()),
        "lost_per_kill_max": max(lost.values(), default=0),
        "lost_per_kill_min": min(lost.values(), default=0),
        "lost_total": sum(lost.values()),
        "buffer_readings": max(1, int(buffer_s)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tests/crash_harness.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("child", help="the process the harness kills")
    c.add_argument("--workdir", required=True)
    c.add_argument("--url", required=True)
    c.add_argument("--per-batch", type=int, default=5)
    c.add_argument("--buffer-s", type=float, default=3.0)
    c.add_argument("--drain", action="store_true")
    args = p.parse_args(argv)
    return child(args)


if __name__ == "__main__":
    sys.exit(main())
