"""What ``cngmrv replay`` skips, counted by kind in every format, and the ECU's own error values
counted apart from decoding faults."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from cngmrv.agent.pipeline import Pipeline, PipelineConfig
from cngmrv.agent.replay import replay
from cngmrv.drivers import j1939
from cngmrv.drivers.can_logs import LogFile

LFE_HEX = "64000000FFFFFFFF"  # fuel rate 100 * 0.05 = 5 L/h

TRC_HEAD = """;$FILEVERSION=2.1
;$STARTTIME=45000.0
;$COLUMNS=N,O,T,B,I,d,R,L,D
;
;---+-- ------+------ +- +- --+----- +- +- +--- +- -- -- -- -- -- -- --
"""


def test_trc_error_counter_and_status_records_are_counted_by_kind(tmp_path: Path) -> None:
    # As PCAN-View writes them: error frames (ER), error counter changes (EC), bus status (ST).
    rows = [
        "      1         0.000 DT  1 18FEF200 Rx -  8    64 00 00 00 FF FF FF FF",
        "      2        50.000 ER  1 -        Rx -  5    04 00 08 00 00",
        "      3        60.000 EC  1 -        Rx -  2    00 80",
        "      4        70.000 ER  1 -        Rx -  5    04 00 08 00 00",
        "      5       100.000 DT  1 18FEF200 Rx -  8    64 00 00 00 FF FF FF FF",
        "      6       110.000 ST  1 -        Rx -  4    00 00 00 08",
        "      7       200.000 DT  1 0123     Rx -  8    00 00 00 00 00 00 00 00",
    ]
    path = tmp_path / "pcan.trc"
    path.write_text(TRC_HEAD + "\n".join(rows) + "\n")
    s = replay(path)
    assert s["error"] is None
    assert s["skipped"] == {
        "error_frame": 2,
        "error_counter": 1,
        "status": 1,
        "standard_frame": 1,
    }
    assert s["frames"] == 3 and s["j1939_frames"] == 2 and s["ignored_frames"] == 1


def test_trc_records_counted_are_not_printed_by_a_root_handler(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "pcan.trc"
    path.write_text(TRC_HEAD + "      1        50.000 ER  1 -        Rx -  5    04 00 08 00 00\n")
    trc = logging.getLogger("can.io.trc")
    before = trc.level
    with caplog.at_level(logging.DEBUG):
        log = LogFile(path)
        assert list(log.frames()) == []
    assert log.skipped == {"error_frame": 1}
    assert not [r for r in caplog.records if "Unsupported type" in r.getMessage()]
    assert trc.level == before and not trc.filters  # the reader's logger is left as it was


def test_candump_and_asc_error_frames_are_counted_by_kind(tmp_path: Path) -> None:
    candump = tmp_path / "err.log"
    candump.write_text(
        f"(1000.000000) can0 18FEF200#{LFE_HEX}\n"
        "(1000.050000) can0 20000004#0000000000000000\n"  # CAN_ERR_FLAG | controller problem
        f"(1000.100000) can0 18FEF200#{LFE_HEX}\n"
        "(1000.120000) can0 20000080#0000000000000000\n"  # CAN_ERR_FLAG | bus error
        "(1000.150000) can0 123#R\n"
    )
    s = replay(candump)
    assert s["skipped"] == {"error_frame": 2, "remote_frame": 1}
    assert s["decode_errors"] == 0 and s["j1939_frames"] == 2
    asc = tmp_path / "err.asc"
    asc.write_text(
        "date Mon Jan 1 10:00:00.000 am 2024\nbase hex  timestamps absolute\n"
        "internal events logged\nBegin Triggerblock Mon Jan 1 10:00:00.000 am 2024\n"
        "   0.000000 1  18FEF200x       Rx   d 8 64 00 00 00 FF FF FF FF\n"
        "   0.050000 1  ErrorFrame\n"
        "   0.100000 1  18FEF200x       Rx   d 8 64 00 00 00 FF FF FF FF\n"
        "End TriggerBlock\n"
    )
    s = replay(asc)
    assert s["error"] is None and s["skipped"] == {"error_frame": 1}


def test_ecu_error_values_are_counted_apart_from_decode_faults() -> None:
    p = Pipeline(PipelineConfig())
    ccvs = j1939.make_id(j1939.PGN_CCVS, 0)
    error_speed = bytes([0xFF, 0x00, 0xFE, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF])  # bytes 2-3: 0xFE00
    for i in range(10):
        p.on_can(1000.0 + i * 0.1, ccvs, error_speed)
    p.on_can(1001.0, ccvs, b"\x01")  # a frame too short to read: a decode fault
    assert p.stats.ecu_errors == {"wheel_speed": 10}
    assert p.stats.decode_errors == 1
    assert not any("error" in reason for reason in p.stats.reasons)


def test_replay_summary_names_ecu_errors(tmp_path: Path) -> None:
    log = tmp_path / "e.log"
    rows = [f"({1000 + i * 0.1:.6f}) can0 18FEF100#FF00FEFFFFFFFFFF" for i in range(30)]
    log.write_text("\n".join(rows) + "\n")
    s = replay(log)
    assert s["ecu_errors"] == {"wheel_speed": 30} and s["decode_errors"] == 0
    assert "30 values sent by the ECU as error" in s["coverage"]["wheel_speed"]["low"]
