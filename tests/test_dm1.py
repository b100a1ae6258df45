"""DM1 active trouble codes: decoding (cngmrv.drivers.dm1) and change events in the pipeline."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cngmrv.agent.pipeline import Pipeline, PipelineConfig
from cngmrv.drivers import j1939
from cngmrv.drivers.dm1 import Dm1Error, Dtc, decode_dm1

# The DM1 the engine in the shared CSS Electronics recording sends by BAM every
# second (18 bytes), decoded by hand below.
REAL_DM1 = bytes.fromhex("43ffd403097e900c14026102090161020c03")


def test_real_multi_dtc_dm1() -> None:
    d = decode_dm1(REAL_DM1)
    # 0x43 = 01 00 00 11: MIL on, red stop off, amber off, protect not available.
    assert d.lamps == {
        "mil": "on",
        "red_stop": "off",
        "amber_warning": "off",
        "protect": "not_available",
    }
    assert d.flash == dict.fromkeys(d.flash, "off")
    assert d.dtcs == (
        Dtc(spn=0x03D4, fmi=9, occurrences=0x7E),  # 980, 126 times
        Dtc(spn=0x0C90, fmi=20, occurrences=2),  # 3216
        Dtc(spn=0x0261, fmi=9, occurrences=1),  # 609
        Dtc(spn=0x0261, fmi=12, occurrences=3),
    )
    assert d.active == {(980, 9), (3216, 20), (609, 9), (609, 12)}


def test_single_frame_dm1() -> None:
    # Amber lamp on (bits 4-3 = 01), SPN 100 FMI 1 seen twice, two bytes of padding.
    d = decode_dm1(bytes([0x04, 0xFF, 0x64, 0x00, 0x01, 0x02, 0xFF, 0xFF]))
    assert d.lamps["amber_warning"] == "on" and d.lamps["mil"] == "off"
    assert d.dtcs == (Dtc(100, 1, 2),)


def test_spn_high_bits_and_unknown_occurrence_count() -> None:
    # SPN 0x7FFFE: low 16 bits FE FF, bits 17-19 = 7 in the top of byte 3; FMI 3.
    d = decode_dm1(bytes([0x00, 0xFF, 0xFE, 0xFF, 0xE3, 0x7F, 0xFF, 0xFF]))
    assert d.dtcs == (Dtc(0x7FFFE, 3, None),)


@pytest.mark.parametrize(
    "payload",
    [
        bytes([0x00, 0xFF, 0, 0, 0, 0, 0xFF, 0xFF]),  # the usual "no DTC" filler
        bytes([0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]),
    ],
)
def test_no_active_dtc(payload: bytes) -> None:
    d = decode_dm1(payload)
    assert d.dtcs == () and d.active == frozenset()
    assert d.lamps == dict.fromkeys(d.lamps, "off")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (bytes([0x00, 0xFF, 0x64, 0x00, 0x01]), "at least 6 bytes"),
        (bytes([0x00, 0xFF, 0x64, 0x00, 0x01, 0x82, 0xFF, 0xFF]), "conversion method"),
        (bytes([0x00, 0xFF, 0x64, 0x00, 0x01, 0x02, 0x00, 0xFF]), "not 0xFF"),
    ],
)
def test_undecodable_dm1_says_why(payload: bytes, reason: str) -> None:
    with pytest.raises(Dm1Error, match=reason):
        decode_dm1(payload)


def _encode(lamps: int, dtcs: list[tuple[int, int, int]]) -> bytes:
    # An independent encoder, straight from the docs/domain.md layout (section 3).
    out = bytearray([lamps, 0xFF])
    for spn, fmi, oc in dtcs:
        out += bytes([spn & 0xFF, (spn >> 8) & 0xFF, ((spn >> 16) << 5) | fmi, oc])
    return bytes(out)


DTC = st.tuples(st.integers(0, 0x7FFFF), st.integers(0, 31), st.integers(0, 126)).filter(
    lambda d: d != (0, 0, 0) and not (d[0] == 0x7FFFF and d[1] == 31)
)


@given(lamps=st.integers(0, 255), dtcs=st.lists(DTC, max_size=40))
def test_decode_inverts_an_independent_encoder(
    lamps: int, dtcs: list[tuple[int, int, int]]
) -> None:
    payload = _encode(lamps, dtcs)
    if len(payload) < 6:
        payload += b"\xff" * (6 - len(payload))
    d = decode_dm1(payload)
    assert [(x.spn, x.fmi, x.occurrences) for x in d.dtcs] == dtcs


@given(st.binary(max_size=300))
def test_decode_fuzz(data: bytes) -> None:
    try:
        d = decode_dm1(data)
    except Dm1Error:
        return
    assert len(d.dtcs) <= (len(data) - 2) // 4


# --------------------------------------------------------------------------- in the pipeline

CM = j1939.make_id(j1939.PGN_TP_CM, 0x00, 7, 255)
DT = j1939.make_id(j1939.PGN_TP_DT, 0x00, 7, 255)


def _send_bam(p: Pipeline, t: float, payload: bytes, cm: int = CM, dt: int = DT) -> None:
    size = len(payload)
    n = (size + 6) // 7
    p.on_can(t, cm, bytes([32, size, 0, n, 0xFF, 0xCA, 0xFE, 0x00]))
    for i in range(n):
        chunk = payload[7 * i : 7 * i + 7]
        p.on_can(t + 0.05 * (i + 1), dt, bytes([i + 1]) + chunk + b"\xff" * (7 - len(chunk)))


def test_multi_dtc_dm1_by_bam_becomes_one_event_per_change() -> None:
    p = Pipeline(PipelineConfig())
    for second in range(3):
        _send_bam(p, 1000.0 + second, REAL_DM1)
    changes = [e for e in p.events if e["kind"] == "DM1_CHANGED"]
    assert len(changes) == 1  # the same set every second is not a change
    ev = changes[0]
    assert ev["source"] == 0 and ev["t"] == pytest.approx(1000.15)
    assert ev["lamps"]["mil"] == "on"
    assert ev["active"] == [[980, 9, 126], [3216, 20, 2], [609, 9, 1], [609, 12, 3]]
    assert ev["added"] == [[609, 9], [609, 12], [980, 9], [3216, 20]] and ev["removed"] == []

    # One code clears (a 3-DTC DM1, 14 bytes), then everything clears (single frame).
    _send_bam(p, 1003.0, REAL_DM1[:14])
    p.on_can(1004.0, j1939.make_id(j1939.PGN_DM1, 0x00), bytes([0, 0xFF, 0, 0, 0, 0, 0xFF, 0xFF]))
    changes = [e for e in p.events if e["kind"] == "DM1_CHANGED"]
    assert [(e["added"], e["removed"]) for e in changes[1:]] == [
        ([], [[609, 12]]),
        ([], [[609, 9], [980, 9], [3216, 20]]),
    ]
    assert changes[-1]["lamps"]["mil"] == "off" and p.stats.dm1_changes == 3


def test_lamp_change_alone_is_an_event_and_sources_are_kept_apart() -> None:
    p = Pipeline(PipelineConfig())
    one = bytes([0x00, 0xFF, 0x64, 0x00, 0x01, 0x02, 0xFF, 0xFF])
    amber = bytes([0x04, 0xFF, 0x64, 0x00, 0x01, 0x02, 0xFF, 0xFF])
    dm1_from = {sa: j1939.make_id(j1939.PGN_DM1, sa) for sa in (0x00, 0x03)}
    p.on_can(1.0, dm1_from[0x00], one)
    p.on_can(1.1, dm1_from[0x03], one)
    p.on_can(2.0, dm1_from[0x00], one)
    p.on_can(2.1, dm1_from[0x03], amber)
    kinds = [(e["source"], e["lamps"]["amber_warning"]) for e in p.events]
    assert kinds == [(0x00, "off"), (0x03, "off"), (0x03, "on")]
    assert set(p.dm1_active()) == {0x00, 0x03}


def test_bad_dm1_is_a_decode_error_not_an_event() -> None:
    p = Pipeline(PipelineConfig())
    p.on_can(1.0, j1939.make_id(j1939.PGN_DM1, 0x00), bytes([0, 0xFF, 1, 0, 1, 0x81, 0xFF, 0xFF]))
    assert p.events == [] and p.stats.decode_errors == 1
    assert any("conversion method" in r for r in p.stats.reasons)
