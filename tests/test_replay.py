"""``cngmrv replay``: a real recording through the agent's decoders, every log format, damaged logs."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import can
import pytest

from cngmrv.agent.pipeline import PipelineConfig
from cngmrv.agent.replay import replay
from cngmrv.drivers.can_logs import LogError, LogFile
from cngmrv.drivers.dbc import DbcSignals


def _shared_data() -> Path:
    env = os.environ.get("CNGMRV_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


RECORDING = _shared_data() / "css-electronics" / "j1939-idle-127s.MF4"
DBC = _shared_data() / "css-electronics" / "CSS-Electronics-SAE-J1939-DEMO.dbc"


def _need_recording() -> None:
    pytest.importorskip("asammdf", reason="asammdf is needed to read MF4 recordings")
    if not RECORDING.is_file():
        pytest.skip(f"recording not found at {RECORDING} (set CNGMRV_SHARED_DATA)")


@pytest.fixture(scope="module")
def messages() -> list[can.Message]:
    _need_recording()
    return list(can.LogReader(str(RECORDING)))


@pytest.fixture(scope="module")
def cli_summary() -> dict[str, Any]:
    _need_recording()
    r = subprocess.run(
        [sys.executable, "-m", "cngmrv.agent.cli", "replay", str(RECORDING), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def excerpt(messages: list[can.Message]) -> list[can.Message]:
    return messages[:9000]  # about 20 s: enough traffic, fast to write in every format


def _write(path: Path, msgs: list[can.Message]) -> Path:
    with can.Logger(str(path)) as w:
        for m in msgs:
            w.on_message_received(m)
    return path


def independent_totals(msgs: list[can.Message]) -> dict[str, float]:
    """A tiny decoder sharing nothing with cngmrv: ids, offsets and scales written out here."""
    diesel_l = 0.0
    prev: tuple[float, float] | None = None
    rpm: list[float] = []
    lfe = 0
    for m in msgs:
        if not m.is_extended_id or m.arbitration_id & 0xFF != 0x00:
            continue
        pgn = (m.arbitration_id >> 8) & 0x3FFFF
        d = bytes(m.data)
        if pgn == 0xFEF2:  # LFE: fuel rate, bytes 1-2, 0.05 L/h per bit
            lfe += 1
            raw = d[0] | d[1] << 8
            if raw > 0xFAFF:
                prev = None
                continue
            rate = raw * 0.05
            if prev is not None and m.timestamp - prev[0] <= 1.0:
                diesel_l += (prev[1] + rate) / 2 * (m.timestamp - prev[0]) / 3600
            prev = (m.timestamp, rate)
        elif pgn == 0xF004:  # EEC1: engine speed, bytes 4-5, 0.125 rpm per bit
            raw = d[3] | d[4] << 8
            if raw <= 0xFAFF:
                rpm.append(raw * 0.125)
    return {"diesel_l": diesel_l, "rpm_mean": sum(rpm) / len(rpm), "lfe": lfe}


def test_real_idle_recording_matches_an_independent_decoder(
    cli_summary: dict[str, Any], messages: list[can.Message]
) -> None:
    s = cli_summary
    ref = independent_totals(messages)
    assert ref["diesel_l"] > 0.05  # an idling heavy-duty engine burns litres per hour
    assert s["diesel_l"] == pytest.approx(ref["diesel_l"], rel=0.005)
    assert s["distance_km"] == 0.0  # standing still
    assert (
        500
        <= s["engine_speed_min_rpm"]
        <= s["engine_speed_mean_rpm"]
        <= s["engine_speed_max_rpm"]
        <= 1000
    )
    assert s["engine_speed_mean_rpm"] == pytest.approx(ref["rpm_mean"], rel=1e-9)
    assert s["frames"] == len(messages) and s["duration_s"] == pytest.approx(127, abs=1)
    assert s["pgns"]["65266"] == ref["lfe"]
    assert s["j1939_frames"] + s["ignored_frames"] == s["frames"]
    assert s["decode_errors"] == 0 and s["error"] is None
    # The engine's DM1 comes by BAM every second; its 4 codes are one change.
    assert s["tp"]["completed"] == s["tp"]["bam"] == sum(s["tp_messages"].values())
    assert s["tp"]["sequence_gap"] == s["tp"]["duplicate"] == s["tp"]["timeout"] == 0
    assert s["events"] == {"DM1_CHANGED": 1}
    assert len(s["dm1"]["0"]["dtcs"]) == 4 and s["dm1"]["0"]["lamps"]["mil"] == "on"
    assert {
        "frames",
        "duration_s",
        "diesel_l",
        "distance_km",
        "engine_speed_mean_rpm",
        "pgns",
    } <= set(s)


@pytest.fixture(scope="module")
def excerpt_log(excerpt: list[can.Message], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(tmp_path_factory.mktemp("replay") / "excerpt.log", excerpt)


def test_replay_prints_totals_for_people(cli: Callable[..., Any], excerpt_log: Path) -> None:
    r = cli("replay", str(excerpt_log))
    assert r.returncode == 0, r.stderr
    assert "diesel" in r.stdout and "engine speed mean" in r.stdout and "SPN 980 FMI 9" in r.stdout
    assert "\r" not in r.stderr  # no progress bar when stderr is not a terminal


def test_progress_bar_on_a_terminal(excerpt_log: Path) -> None:
    master, slave = os.openpty()
    try:
        r = subprocess.run(
            [sys.executable, "-m", "cngmrv.agent.cli", "replay", str(excerpt_log), "--json"],
            stdout=subprocess.PIPE,
            stderr=slave,
            timeout=120,
        )
        os.close(slave)
        slave = -1
        tty = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO once the other end is closed and drained
                break
            if not chunk:
                break
            tty += chunk
    finally:
        if slave != -1:
            os.close(slave)
        os.close(master)
    assert r.returncode == 0
    assert b"\rreplay [" in tty and b"100.0 %" in tty
    json.loads(r.stdout)  # stdout stays clean JSON


@pytest.mark.parametrize("suffix", [".log", ".asc", ".blf", ".trc", ".csv", ".log.gz", ".asc.gz"])
def test_every_format_gives_the_same_totals(
    tmp_path: Path, excerpt: list[can.Message], suffix: str
) -> None:
    ref = independent_totals(excerpt)
    s = replay(_write(tmp_path / f"x{suffix}", excerpt))
    assert s["error"] is None and s["frames"] == len(excerpt)
    assert s["diesel_l"] == pytest.approx(ref["diesel_l"], rel=1e-6)
    assert s["pgns"]["65266"] == ref["lfe"]


@pytest.mark.parametrize("suffix", [".log", ".asc", ".trc", ".csv", ".blf"])
def test_a_truncated_log_says_where_and_keeps_what_was_read(
    tmp_path: Path, excerpt: list[can.Message], suffix: str
) -> None:
    full = _write(tmp_path / f"full{suffix}", excerpt)
    cut = tmp_path / f"cut{suffix}"
    raw = full.read_bytes()
    cut.write_bytes(raw[: len(raw) // 2 + 7])  # mid-record, whatever the format
    s = replay(cut)
    assert s["error"] is not None, s
    assert s["error"]["where"].startswith(("line ", "byte "))
    assert str(cut) in s["error"]["message"]
    assert 0.3 * len(excerpt) < s["frames"] < 0.7 * len(excerpt)
    whole = replay(full)["diesel_l"]
    assert 0.3 * whole < s["diesel_l"] < 0.7 * whole


def test_a_truncated_mf4_says_where(tmp_path: Path) -> None:
    _need_recording()
    cut = tmp_path / "cut.mf4"
    cut.write_bytes(RECORDING.read_bytes()[:1_000_000])
    s = replay(cut)
    assert s["error"] is not None and s["error"]["where"].startswith("byte ")
    assert s["frames"] > 0 and s["diesel_l"] > 0


def test_a_corrupt_line_is_reported_with_its_number(tmp_path: Path) -> None:
    lines = [f"({1000 + i * 0.1:.6f}) can0 18FEF200#6400FFFFFFFFFFFF\n" for i in range(50)]
    lines[30] = "(1003.000000) can0 18FEF200#64ZZFFFFFFFFFFFF\n"
    log = tmp_path / "bad.log"
    log.write_text("".join(lines))
    s = replay(log)
    assert s["error"]["where"] == "line 31" and s["frames"] == 30
    # 30 frames at 5 L/h (raw 100 x 0.05), 0.1 s apart: 2.9 s.
    assert s["diesel_l"] == pytest.approx(5.0 / 3600 * 2.9, rel=1e-9)


def test_a_candump_line_cut_inside_its_data_is_not_taken_for_a_short_frame(tmp_path: Path) -> None:
    log = tmp_path / "cut.log"
    log.write_text("(1000.000000) can0 18FEF200#6400FFFFFFFFFFFF\n(1000.100000) can0 18FEF200#6400")
    with pytest.raises(LogError, match="no line end") as err:
        list(LogFile(log).frames())
    assert err.value.frames == 2 and err.value.where == "line 2"


def test_cli_errors_are_one_line(tmp_path: Path, cli: Callable[..., Any]) -> None:
    (tmp_path / "x.txt").write_text("hello")
    for path, words in (
        (tmp_path / "x.txt", "unknown log format"),
        (tmp_path / "no.log", "No such file"),
    ):
        r = cli("replay", str(path))
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and words in r.stderr


def test_damaged_log_exits_non_zero_with_the_totals(
    tmp_path: Path, cli: Callable[..., Any]
) -> None:
    log = tmp_path / "bad.log"
    log.write_text(
        "(1000.0) can0 18FEF200#6400FFFFFFFFFFFF\n(1000.1) can0 18FEF200#6400FFFFFFFFFFFF\nnonsense\n"
    )
    r = cli("replay", str(log), "--json")
    assert r.returncode == 1
    s = json.loads(r.stdout)
    assert s["frames"] == 2 and s["error"]["where"] == "line 3"
    assert "line 3" in r.stderr


def test_dbc_signals_in_the_replay(tmp_path: Path, excerpt: list[can.Message]) -> None:
    if not DBC.is_file():
        pytest.skip(f"DBC not found at {DBC}")
    s = replay(_write(tmp_path / "x.log", excerpt), dbc=DbcSignals(DBC))
    speed = s["extra"]["EEC1.EngineSpeed"]
    assert speed["mean"] == pytest.approx(s["engine_speed_mean_rpm"], rel=1e-12)
    assert speed["n"] == s["pgns"]["61444"]
    assert s["extra"]["CCVS1.WheelBasedVehicleSpeed"]["max"] < 1.0


def test_gzip_of_a_damaged_file_is_still_positioned(tmp_path: Path) -> None:
    text = "(1000.0) can0 18FEF200#6400FFFFFFFFFFFF\n" * 3 + "garbage\n"
    p = tmp_path / "bad.log.gz"
    p.write_bytes(gzip.compress(text.encode()))
    s = replay(p)
    assert s["frames"] == 3 and s["error"]["where"] == "line 4"


def test_a_pinned_engine_name_holds_on_a_real_log_with_a_service_tool_claim(
    tmp_path: Path, messages: list[can.Message]
) -> None:
    # The recording has no address claims (the engine claimed before it began);
    # a service tool's claim half-way must not make the pinned engine foreign.
    engine_name = 0x1234 | (341 << 21) | (1 << 60) | (1 << 63)
    tool_name = 0x0099 | (77 << 21) | (129 << 40) | (1 << 63)
    half = len(messages) // 2
    claim = can.Message(
        timestamp=messages[half].timestamp,
        arbitration_id=0x18EEFFF9,
        data=tool_name.to_bytes(8, "little"),
        is_extended_id=True,
    )
    path = _write(tmp_path / "with-claim.log", [*messages[:half], claim, *messages[half:]])
    pinned = replay(path, PipelineConfig(engine_name=engine_name))
    ref = independent_totals(messages)
    assert pinned["diesel_l"] == pytest.approx(ref["diesel_l"], rel=0.005)
    assert pinned["foreign_source"] == 0 and pinned["engine_address"] == 0
    assert pinned["events"].get("ENGINE_ADDRESS_CHANGED", 0) == 0
