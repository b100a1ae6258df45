"""Formats ``cngmrv replay`` recognises by their content: candump's console output, and one clear
line for each format it cannot read, also as JSON."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cngmrv.agent.replay import replay
from cngmrv.drivers import j1939
from cngmrv.drivers.can_logs import CONSOLE, CONSOLE_UNTIMED, LogError, LogFile, ReplayBus

LFE = j1939.make_id(j1939.PGN_LFE, 0)
T0 = 1_600_000_000.0


def _lfe(rate: float) -> bytes:
    return j1939.encode(j1939.PGN_LFE, {"fuel_rate_lph": rate})


def _console(rows: int, stamp: Callable[[int], str] = lambda i: f"({T0 + i * 0.1:.6f})  ") -> str:
    spaced = " ".join(f"{b:02X}" for b in _lfe(36.0))
    return "".join(f" {stamp(i)}can0  {LFE:08X}   [8]  {spaced}\n" for i in range(rows))


def _log(rows: int) -> str:
    return "".join(f"({T0 + i * 0.1:.6f}) can0 {LFE:08X}#{_lfe(36.0).hex()}\n" for i in range(rows))


@pytest.mark.parametrize("name", ["console.log", "console.txt", "console.log.gz"])
def test_candump_console_output_with_timestamps_is_read(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    text = _console(101)
    if name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    console = replay(path)
    reference = tmp_path / "same.log"
    reference.write_text(_log(101))
    log = replay(reference)
    assert console["format"] == CONSOLE and console["error"] is None
    assert console["frames"] == 101
    assert console["diesel_l"] == pytest.approx(36.0 / 3600 * 10.0, rel=1e-6)
    assert console["diesel_l"] == log["diesel_l"]


def test_console_error_frames_remote_frames_and_dates(tmp_path: Path) -> None:
    path = tmp_path / "e.log"
    path.write_text(
        " (2020-09-13 12:26:40.000000)  can0  18FEF200   [8]  64 00 00 00 FF FF FF FF\n"
        " (2020-09-13 12:26:40.050000)  can0  20000004   [8]  00 04 00 00 00 00 00 00   ERRORFRAME\n"
        "\tcontroller-problem{rx-error-warning}\n"
        " (2020-09-13 12:26:40.070000)  can0  123   [2]  remote request\n"
        " (2020-09-13 12:26:40.100000)  can0  18FEF200   [8]  64 00 00 00 FF FF FF FF\n"
    )
    s = replay(path)
    assert s["error"] is None and s["frames"] == 4 and s["j1939_frames"] == 2
    assert s["skipped"] == {"error_frame": 1, "remote_frame": 1}
    assert s["start"] == pytest.approx(1_600_000_000.0)  # taken as UTC
    assert s["diesel_l"] == pytest.approx(5.0 / 3600 * 0.1, rel=1e-6)


def test_console_delta_timestamps_are_refused_where_they_go_back(tmp_path: Path) -> None:
    path = tmp_path / "td.log"
    path.write_text(_console(5, lambda i: f"({(0.1 if i % 2 else 0.0) + 0.003 * i:.6f})  "))
    with pytest.raises(LogError, match="goes back.*-td") as e:
        list(LogFile(path).frames())
    assert e.value.where == "line 3"


def _plain(lines: list[tuple[int, bytes]]) -> str:
    """What plain `candump can0` prints: no time, the id, [len] and spaced bytes."""
    return "".join(
        f"  can0  {can_id:08X}   [{len(data)}]  {' '.join(f'{b:02X}' for b in data)}\n"
        for can_id, data in lines
    )


@pytest.mark.parametrize("name", ["plain.log", "plain.txt"])
def test_plain_candump_output_is_read_without_a_clock(
    tmp_path: Path, cli: Callable[..., Any], name: str
) -> None:
    lfc = j1939.make_id(j1939.PGN_LFC, 0)
    eec1 = j1939.make_id(j1939.PGN_EEC1, 0)
    vdhr = j1939.make_id(j1939.PGN_VDHR, 23)
    rows: list[tuple[int, bytes]] = []
    for i in range(20):
        rows.append((LFE, _lfe(36.0)))
        rows.append((eec1, j1939.encode(j1939.PGN_EEC1, {"engine_speed_rpm": 800.0 + 10 * i})))
        rows.append((lfc, j1939.encode(j1939.PGN_LFC, {"total_fuel_l": 1000.0 + 0.5 * i})))
        rows.append((vdhr, j1939.encode(j1939.PGN_VDHR, {"total_distance_km": 50.0 + 0.005 * i})))
    path = tmp_path / name
    path.write_text(_plain(rows))
    s = replay(path)
    assert s["format"] == CONSOLE_UNTIMED and s["timed"] is False and s["error"] is None
    assert s["frames"] == 80 and s["j1939_frames"] == 80
    # No clock: nothing integrates, and the summary says why rather than showing 0 as a figure.
    assert s["diesel_l"] == 0.0 and s["distance_km"] == 0.0 and s["duration_s"] == 0.0
    assert all("no timestamps" in c["low"] for c in s["coverage"].values())
    # What needs no clock is all there: the counters, the values, the sources.
    assert s["counters"]["fuel_total"]["used"] == pytest.approx(9.5)
    assert s["counters"]["odometer"]["used"] == pytest.approx(0.095)
    assert s["sources"]["odometer"]["source"] == 23
    assert s["engine_speed_mean_rpm"] == pytest.approx(895.0)
    r = cli("replay", str(path))
    assert r.returncode == 0, r.stderr
    assert "no time: the log has no timestamps" in r.stdout
    assert "odometer" in r.stdout and "no clock needed" in r.stdout


def test_plain_candump_output_with_a_timestamped_line_is_damage(tmp_path: Path) -> None:
    path = tmp_path / "mixed.log"
    path.write_text(_plain([(LFE, _lfe(1.0))] * 3) + _console(1))
    with pytest.raises(LogError, match="timestamped line") as e:
        list(LogFile(path).frames())
    assert e.value.where == "line 4"


def test_plain_candump_output_cannot_be_played_at_a_speed(tmp_path: Path) -> None:
    path = tmp_path / "plain.log"
    path.write_text(_plain([(LFE, _lfe(1.0))] * 3))
    with pytest.raises(ValueError, match="without timestamps cannot be played"):
        ReplayBus(str(path), speed=1.0)
    bus = ReplayBus(str(path))
    try:
        assert [bus.recv(0.1) is not None for _ in range(3)] == [True] * 3
    finally:
        bus.shutdown()


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("vector.csv", None, "UTF-16 text"),
        (
            "vector8.csv",
            "Time;Chn;ID;Name;Dir;DLC;Data\n0.1;1;18FEF200x;LFE;Rx;8;64 00\n",
            "Vector",
        ),
        ("notes.txt", "hello\n", "unknown log format .txt"),
    ],
)
def test_each_unreadable_format_gets_one_line_saying_what_to_do(
    tmp_path: Path, cli: Callable[..., Any], name: str, content: str | None, words: str
) -> None:
    path = tmp_path / name
    if content is None:  # as CANalyzer writes a CSV export
        path.write_bytes("Time;Chn;ID;Data\r\n0.1;1;18FEF200x;64 00\r\n".encode("utf-16"))
    else:
        path.write_text(content)
    r = cli("replay", str(path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, r.stderr
    j = cli("replay", str(path), "--json")
    assert j.returncode == 2
    out = json.loads(j.stdout)
    assert words in out["error"]["message"] and out["file"] == str(path)


def test_json_has_an_error_object_for_a_missing_file(
    tmp_path: Path, cli: Callable[..., Any]
) -> None:
    r = cli("replay", str(tmp_path / "no.log"), "--json")
    assert r.returncode == 2 and "No such file" in json.loads(r.stdout)["error"]["message"]


def test_a_candump_log_named_txt_is_read_by_its_content(tmp_path: Path) -> None:
    path = tmp_path / "trip.txt"
    path.write_text(_log(11))
    assert LogFile(path).format == ".log" and replay(path)["frames"] == 11


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_console_reader_fuzz_never_raises_anything_but_a_log_error(text: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.log"
        path.write_text(" (1.000000)  can0  18FEF200   [8]  64 00 00 00 FF FF FF FF\n" + text)
        try:
            log = LogFile(path)
        except ValueError:
            return
        try:
            for _ in log.frames():
                pass
        except LogError:
            pass
