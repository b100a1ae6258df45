"""The kit codec under real MicroPython: the same bytes and counters as under CPython.

MicroPython's WebAssembly port (npm ``@micropython/micropython-webassembly-pyscript``,
installed by ``make setup`` into ``.venv/micropython``) runs
``drivers/kit_codec.py`` unchanged, as a kit's firmware would.  The test is
skipped, saying why, when node or the package is missing; set
``CNGMRV_MICROPYTHON_WASM`` to the package's folder to use another copy.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cngmrv.drivers import kit_codec as kc

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent / "micropython"
PACKAGE = Path(
    os.environ.get(
        "CNGMRV_MICROPYTHON_WASM",
        ROOT / ".venv/micropython/node_modules/@micropython/micropython-webassembly-pyscript",
    )
)
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(
    NODE is None or not (PACKAGE / "micropython.mjs").exists(),
    reason=f"needs node and MicroPython's WebAssembly port in {PACKAGE} (make setup installs it)",
)

BAD: list[dict[str, Any]] = [
    {"type": "status", "seq": 0, "tick_ms": 0, "tank_bar": 700.0},
    {"type": "status", "seq": 0, "tick_ms": 0, "mode": True},
    {"type": "status", "seq": 0, "tick_ms": 0, "rmp": 1.0},
    {"type": "injection", "seq": 0, "tick_ms": 0, "mass_mg": "1"},
    {"type": "fault", "seq": 0, "tick_ms": 0, "faults": None},
]


def damaged_stream(seed: int, n: int = 400) -> bytes:
    """Every message type, then 1 % of the bytes corrupted and some noise: fixed by ``seed``."""
    rng = random.Random(seed)
    out = bytearray(b"\x00")
    for seq in range(n):
        kind = rng.choice(["status", "status", "injection", "injection", "mode", "fault", "hello"])
        msg: dict[str, Any] = {"type": kind, "seq": seq, "tick_ms": 1000 + 10 * seq}
        if kind == "status":
            msg.update(mode=1, tank_bar=rng.uniform(20, 200), gas_flow_kgph=rng.uniform(0, 40),
                       rpm=rng.uniform(600, 2100), gas_total_kg=12000 + seq / 100)  # fmt: skip
        elif kind == "injection":
            msg.update(injector=seq % 6 + 1, pulse_ms=rng.uniform(0.5, 9), mass_mg=52.37)
        if rng.random() < 0.05:
            out += bytes(rng.randrange(256) for _ in range(rng.randint(1, 9)))
        out += kc.encode_message(msg)
    for i in range(len(out)):
        if rng.random() < 0.01:
            out[i] ^= rng.randrange(1, 256)
    return bytes(out)


def run_micropython(tmp_path: Path, payload: dict[str, Any]) -> dict[str, Any]:
    (tmp_path / "input.json").write_text(json.dumps(payload))
    files = [
        f"{Path(kc.__file__)}=/kit_codec.py",
        f"{tmp_path / 'input.json'}=/input.json",
    ]
    assert NODE is not None
    r = subprocess.run(
        [NODE, str(HERE / "run.mjs"), str(PACKAGE), str(HERE / "check_codec.py"), *files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_codec_runs_under_micropython_with_identical_results(tmp_path: Path) -> None:
    doc = (ROOT / "docs" / "kit-protocol.md").read_text(encoding="utf-8")
    frames = re.findall(r"^frame: ([0-9a-f ]+)$", doc, re.M)
    assert len(frames) >= 9
    stream = damaged_stream(seed=4)
    out = run_micropython(tmp_path, {"frames": frames, "stream": stream.hex(), "bad": BAD})
    assert out["implementation"] == "micropython"
    assert out["crc_check"] == 0x29B1
    for frame_hex, got in zip(frames, out["vectors"], strict=True):
        frame = bytes.fromhex(frame_hex)
        assert got["reencoded"] == frame.hex()
        expected = kc.decode_frame(frame[:-1])
        assert got["decoded"].keys() == expected.keys()
        for key, value in expected.items():
            assert got["decoded"][key] == (
                value if not isinstance(value, float) else pytest.approx(value, abs=1e-12)
            )
    dec = kc.FrameDecoder()
    msgs = [m for i in range(0, len(stream), 37) for m in dec.feed(stream[i : i + 37])]
    assert out["stream"]["counters"] == dec.counters()
    assert dec.crc_errors + dec.cobs_errors > 10 and dec.frames_ok > 250
    assert out["stream"]["reencoded"] == [kc.encode_message(m).hex() for m in msgs]
    assert out["errors"] == ["ValueError", "TypeError", "ValueError", "TypeError", "ValueError"]
