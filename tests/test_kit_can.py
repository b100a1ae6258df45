"""The kit over CAN: PropB PGNs from the shipped DBC decode to the same messages as the serial link."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import can
import cantools
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cngmrv.agent import config
from cngmrv.agent.runtime import Agent
from cngmrv.drivers import j1939
from cngmrv.drivers import kit_can as kcan
from cngmrv.drivers import kit_codec as kc

DB = cantools.database.load_file(str(kcan.DEFAULT_DBC))
T = 1_700_000_000.25


def test_dbc_covers_every_serial_field_at_the_same_resolution() -> None:
    dbc_fields: dict[str, float] = {}
    for m in DB.messages:
        pgn = j1939.parse_id(m.frame_id).pgn
        assert 0xFF00 <= pgn <= 0xFFFF and m.is_extended_frame and m.length == 8
        for s in m.signals:
            dbc_fields[s.name] = s.scale
    for code in (kc.MSG_STATUS, kc.MSG_INJECTION, kc.MSG_MODE, kc.MSG_FAULT, kc.MSG_HELLO):
        for name, _fmt, scale, *_ in kc.LAYOUTS[code]:
            if name in ("offset_us", "role") or (code == kc.MSG_INJECTION and name == "gas_temp_c"):
                continue  # from the CAN timestamp / implied / the latest STATUS
            assert name in dbc_fields, name
            assert dbc_fields[name] == pytest.approx(1 / scale if scale else 1), name


def grid(code: int, skip: tuple[str, ...] = ()) -> st.SearchStrategy[dict[str, Any]]:
    """Values on the wire grid of each field, None where the field can be not available."""
    fields = {}
    for name, _fmt, scale, lo, hi, na, _since in kc.LAYOUTS[code]:
        if name in skip:
            continue
        if name in ("sub_set_pct", "sub_act_pct", "rpm"):
            hi = min(hi, 0xFFFD)  # the DBC keeps these in range as documented
        values: st.SearchStrategy[Any] = st.integers(lo, hi).map(
            lambda r, s=scale: r / s if s else r
        )
        if name == "kit_id":
            values = st.integers(0, 0xFFFFFFFE)
        if name == "capabilities":
            values = st.integers(0, 0xFF)  # 8 bits on CAN (docs/kit-protocol.md)
        fields[name] = values if na == kc.NO_NA else st.none() | values
    return st.fixed_dictionaries(fields)


def decode_all(
    dec: kcan.KitCanDecoder, frames: list[tuple[int, bytes]], t: float = T
) -> list[dict]:
    out: list[dict] = []
    for cid, data in frames:
        out += dec.decode(t, cid, data)
    return out


@given(grid(kc.MSG_STATUS))
def test_status_round_trip(fields: dict[str, Any]) -> None:
    dec = kcan.KitCanDecoder()
    (msg,) = decode_all(dec, kcan.encode(DB, {"type": "status", **fields}))
    assert msg["type"] == "status" and msg["version"] == 2
    assert msg["tick_ms"] == int(T * 1000) & 0xFFFFFFFF
    assert {k: v for k, v in msg.items() if k in fields} == fields
    assert dec.counters() == {"frames": 4, "messages": 1, "errors": 0, "foreign": 0,
                              "dropped": 0, "stale_parts": 0}  # fmt: skip


@given(st.sampled_from([kc.MSG_MODE, kc.MSG_FAULT, kc.MSG_HELLO]).flatmap(
    lambda code: st.tuples(st.just(code), grid(code, skip=("role",)))))  # fmt: skip
def test_event_and_hello_round_trip(case: tuple[int, dict[str, Any]]) -> None:
    code, fields = case
    (msg,) = decode_all(
        kcan.KitCanDecoder(), kcan.encode(DB, {"type": kc.TYPE_NAMES[code], **fields})
    )
    assert {k: v for k, v in msg.items() if k in fields} == fields


def test_injection_takes_time_from_the_frame_and_temperature_from_status() -> None:
    dec = kcan.KitCanDecoder()
    decode_all(dec, kcan.encode(DB, {"type": "status", "gas_temp_c": 31.2}))
    inj = {
        "type": "injection",
        "injector": 4,
        "pulse_ms": 6.125,
        "rail_bar": 3.012,
        "mass_mg": 52.37,
    }
    (msg,) = decode_all(dec, kcan.encode(DB, inj), t=T + 0.0123456)
    assert msg["tick_ms"] == int((T + 0.0123456) * 1000) & 0xFFFFFFFF
    assert msg["offset_us"] in (345, 346)
    assert {k: msg[k] for k in inj if k != "type"} == {k: v for k, v in inj.items() if k != "type"}
    assert msg["gas_temp_c"] == 31.2
    (late,) = decode_all(dec, kcan.encode(DB, inj), t=T + 2.0)
    assert late["gas_temp_c"] is None  # the last STATUS is too old to vouch for it


def test_stale_or_missing_parts_are_not_available() -> None:
    dec = kcan.KitCanDecoder()
    frames = kcan.encode(DB, {"type": "status", "mode": 1, "tank_bar": 150.0, "rpm": 800.0})
    *parts, status1 = frames
    decode_all(dec, parts, t=T)
    (msg,) = decode_all(dec, [status1], t=T + 0.5)
    assert msg["mode"] == 1 and msg["tank_bar"] == 150.0
    assert msg["rpm"] is None and msg["faults"] is None and msg["gas_total_kg"] is None
    assert dec.stale_parts == 3


def test_foreign_sources_short_frames_and_counter_gaps_are_counted() -> None:
    dec = kcan.KitCanDecoder()
    frames = kcan.encode(DB, {"type": "mode", "mode": 0, "previous": 1, "reason": 2})
    cid, data = frames[0]
    assert decode_all(dec, [(cid & ~0xFF | 0x33, data)]) == []
    assert decode_all(dec, [(cid, data[:2])]) == []
    assert decode_all(dec, [(j1939.make_id(j1939.PGN_LFE, 0x27), bytes(8))]) == []
    assert (dec.foreign, dec.errors, dec.frames) == (2, 1, 0)
    assert dec.last_error is not None and "KIT_MODE" in dec.last_error
    for counter in (7, 8, 11, 12):
        decode_all(dec, kcan.encode(DB, {"type": "injection", "injector": 1, "counter": counter}))
    assert dec.dropped == 2


def test_rejects_a_dbc_without_the_kit_messages(tmp_path: Path) -> None:
    bad = tmp_path / "bad.dbc"
    bad.write_text(kcan.DEFAULT_DBC.read_text().replace("KIT_FAULT", "OTHER_MSG"))
    with pytest.raises(ValueError, match="KIT_FAULT"):
        kcan.KitCanDecoder(bad)
    with pytest.raises(ValueError, match="source_address"):
        kcan.KitCanDecoder(source_address=254)


def test_agent_integrates_gas_from_a_can_kit(tmp_path: Path, keydir: Path) -> None:
    channel = f"kit-can-{time.monotonic_ns()}"
    cfg = config.from_mapping(
        {
            "device": {"id": "bus-1", "key_file": str(keydir / "device.key")},
            "can": {"interface": "virtual", "channel": channel},
            "kit": {"transport": "can", "can_source_address": 0x27},
            "store": {"path": "s.sqlite"},
        },
        tmp_path,
    )
    engine = can.Bus(interface="virtual", channel=channel, preserve_timestamps=True)
    agent = Agent(cfg)
    assert agent.kit is None and agent.pipeline.kit_can is not None
    stop = threading.Event()
    worker = threading.Thread(target=agent.run, args=(stop,))
    agent.start()
    worker.start()
    lfe = j1939.make_id(j1939.PGN_LFE, 0)
    sent = 0
    for i in range(101):
        t = 1000.0 + i * 0.1
        engine.send(can.Message(timestamp=t, arbitration_id=lfe, data=j1939.encode(
            j1939.PGN_LFE, {"fuel_rate_lph": 20.0})))  # fmt: skip
        status = {"type": "status", "mode": 1, "gas_flow_kgph": 18.0, "counter": i & 0xFF}
        for cid, data in kcan.encode(DB, status):
            engine.send(can.Message(timestamp=t + 0.01, arbitration_id=cid, data=data))
        sent += 1
    deadline = time.monotonic() + 5
    while agent.pipeline.stats.kit_status < sent and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    worker.join()
    agent.close()
    engine.shutdown()
    assert agent.pipeline.stats.kit_status == sent
    assert agent.totals["gas_kg"] == pytest.approx(18.0 / 3600 * 10.0, rel=1e-6)
    assert agent.pipeline.kit_can.counters()["dropped"] == 0
