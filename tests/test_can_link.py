"""The kernel's view of a CAN interface (cngmrv.drivers.canlink).

This machine has no CAN interface, so the parser is tested on ``ip`` output
written by hand in the format iproute2 prints (``ip -details -statistics -json
link show dev can0``), and the I/O on the interfaces that do exist here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cngmrv.drivers.canlink import parse_ip_link, read_link, read_sysfs


def ip_json(
    state: str | None = "ERROR-ACTIVE",
    flags: tuple[str, ...] = ("NOARP", "UP", "LOWER_UP", "ECHO"),
    operstate: str = "UP",
    ctrlmode: list[str] | None = None,
    kind: str = "can",
    rx_dropped: int = 0,
    over: int = 0,
    bus_off: int = 0,
) -> str:
    info_data: dict = {}
    if kind == "can":
        info_data = {
            "berr_counter": {"tx": 0, "rx": 0},
            "restart_ms": 100,
            "bittiming": {"bitrate": 250000, "sample_point": "0.875", "tq": 250, "sjw": 1},
            "clock": 16000000,
        }
        if state is not None:
            info_data["state"] = state
        if ctrlmode is not None:
            info_data["ctrlmode"] = ctrlmode
    entry = {
        "ifindex": 4,
        "ifname": "can0",
        "flags": list(flags),
        "mtu": 16,
        "qdisc": "pfifo_fast",
        "operstate": operstate,
        "linkmode": "DEFAULT",
        "group": "default",
        "txqlen": 10,
        "link_type": "can" if kind == "can" else "none",
        "linkinfo": {"info_kind": kind, "info_data": info_data},
        "stats64": {
            "rx": {
                "bytes": 81920,
                "packets": 10240,
                "errors": 3,
                "dropped": rx_dropped,
                "over_errors": over,
                "multicast": 0,
            },
            "tx": {"bytes": 0, "packets": 0, "errors": 0, "dropped": 0},
        },
    }
    if kind == "can":
        entry["linkinfo"]["info_xstats"] = {  # type: ignore[index]
            "restarts": bus_off,
            "bus_error": 7,
            "arbitration_lost": 0,
            "error_warning": 2,
            "error_passive": 1,
            "bus_off": bus_off,
        }
    return json.dumps([entry])


def test_healthy_listen_only_interface() -> None:
    st = parse_ip_link(ip_json(ctrlmode=["LISTEN-ONLY"], rx_dropped=12, over=3), "can0")
    assert st.ok and st.reason == ""
    assert st.can_state == "ERROR-ACTIVE" and st.listen_only is True
    assert st.bitrate == 250000 and st.restart_ms == 100
    assert st.counters["rx_dropped"] == 12 and st.counters["rx_over_errors"] == 3
    assert st.counters["error_passive"] == 1 and st.counters["bus_off"] == 0


def test_ctrlmode_without_listen_only_is_reported() -> None:
    assert parse_ip_link(ip_json(ctrlmode=[]), "can0").listen_only is False
    assert parse_ip_link(ip_json(ctrlmode=None), "can0").listen_only is None


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"state": "BUS-OFF", "bus_off": 1}, "can0 is BUS-OFF"),
        ({"state": "STOPPED", "flags": ("NOARP", "ECHO"), "operstate": "DOWN"}, "down"),
        ({"flags": ("NOARP", "UP", "ECHO"), "operstate": "DOWN"}, "down"),
    ],
)
def test_states_that_stop_reception(kwargs: dict, reason: str) -> None:
    st = parse_ip_link(ip_json(**kwargs), "can0")
    assert not st.ok and reason in st.reason


def test_error_passive_still_receives() -> None:
    st = parse_ip_link(ip_json(state="ERROR-PASSIVE"), "can0")
    assert st.ok and st.can_state == "ERROR-PASSIVE"


def test_vcan_has_no_controller_state() -> None:
    st = parse_ip_link(ip_json(kind="vcan", operstate="UNKNOWN", flags=("NOARP", "UP")), "can0")
    assert st.ok and st.can_state is None and st.listen_only is None


def test_missing_interface_and_bad_output() -> None:
    assert not parse_ip_link("", "can0").exists
    assert not parse_ip_link(ip_json(), "can1").exists
    assert "does not exist" in parse_ip_link("", "can0").reason
    with pytest.raises(ValueError, match="not JSON"):
        parse_ip_link("Device can0 does not exist", "can0")
    with pytest.raises(ValueError, match="list"):
        parse_ip_link("{}", "can0")


def test_read_link_on_this_machine() -> None:
    lo = read_link("lo")
    assert lo.exists and lo.up and lo.can_state is None
    absent = read_link("cngmrvnope0")
    assert not absent.exists and not absent.ok


def test_sysfs_fallback(tmp_path: Path) -> None:
    dev = tmp_path / "can0"
    (dev / "statistics").mkdir(parents=True)
    (dev / "flags").write_text("0x40081\n")  # IFF_UP | IFF_NOARP | IFF_ECHO
    (dev / "operstate").write_text("up\n")
    (dev / "statistics" / "rx_dropped").write_text("5\n")
    st = read_sysfs("can0", tmp_path)
    assert st.ok and st.source == "sysfs" and st.counters == {"rx_dropped": 5}
    (dev / "flags").write_text("0x40080\n")
    assert "down" in read_sysfs("can0", tmp_path).reason
    assert not read_sysfs("can1", tmp_path).exists
    assert read_sysfs("lo").exists
