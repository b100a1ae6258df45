"""``cngmrv sim`` on the command line: its options, and the hand-off to the harness.

Registered through the ``cngmrv.commands`` entry-point group.  The harness (the
simulator, the agent, the office's ingest) is imported only when ``sim`` runs,
so that building the CLI for ``cngmrv run`` in a bus loads none of it.
"""

from __future__ import annotations

import argparse
from typing import Any


def _command(args: argparse.Namespace) -> int:
    from cngmrv.sim.harness import command

    return command(args)


def register(sub: Any) -> None:
    """Add the ``sim`` subcommand to the CLI (entry point group ``cngmrv.commands``)."""
    p = sub.add_parser("sim", help="run the simulated bus, kit, agent and ingest locally")
    p.add_argument("--duration", type=float, default=600.0, help="simulated seconds (600)")
    p.add_argument(
        "--speedup",
        type=float,
        help="times faster than real time; 0 = unpaced (100; 1 with --agent-process)",
    )
    p.add_argument("--seed", type=int, default=1, help="drive-cycle seed (1)")
    p.add_argument("--workdir", help="keep keys, store and ingest database here (continues)")
    p.add_argument("--batch", type=int, default=60, help="readings per batch (60)")
    p.add_argument(
        "--fleet", type=int, default=1, help="buses sharing one ingest, run in parallel (1)"
    )
    p.add_argument(
        "--kit-unplug",
        action="append",
        metavar="BUS:START:END",
        help="bus BUS's kit sends nothing from START to END simulated s (repeatable)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    b = p.add_argument_group("CAN bus")
    b.add_argument(
        "--bitrate", type=int, default=250_000, metavar="BPS", help="bus bit rate (250000)"
    )
    b.add_argument(
        "--bus-load",
        type=float,
        default=0.0,
        metavar="PERCENT",
        help="fill this share of the bus with other ECUs' traffic (0: the engine alone)",
    )
    b.add_argument(
        "--agent-process",
        action="store_true",
        help="run the agent as its own process on a udp_multicast bus, in real time",
    )
    k = p.add_argument_group("kit faults")
    k.add_argument(
        "--kit-noise",
        type=float,
        default=0.0,
        metavar="PCT",
        help="corrupt this percentage of the kit's bytes (0)",
    )
    k.add_argument(
        "--kit-bursts",
        type=float,
        default=0.0,
        metavar="PCT",
        help="precede this percentage of frames with a noise burst (0)",
    )
    k.add_argument(
        "--kit-truncate",
        type=float,
        default=0.0,
        metavar="PCT",
        help="cut this percentage of frames short (0)",
    )
    k.add_argument(
        "--kit-unplug-at",
        type=float,
        metavar="S",
        help="unplug the kit's port at this simulated second",
    )
    k.add_argument(
        "--kit-unplug-for",
        type=float,
        default=5.0,
        metavar="S",
        help="for this many simulated seconds (5)",
    )
    k.add_argument(
        "--kit-fault",
        type=_fault_arg,
        action="append",
        default=[],
        metavar="CODE:AT:FOR",
        help="a kit fault code active from AT for FOR seconds",
    )
    k.add_argument(
        "--kit-stuck",
        type=_stuck_arg,
        action="append",
        default=[],
        metavar="SENSOR:AT:FOR",
        help="freeze tank_bar or gas_temp_c from AT for FOR s",
    )
    k.add_argument(
        "--dpf-regen",
        type=_window_arg,
        action="append",
        default=[],
        metavar="AT:FOR",
        help="a DPF regeneration (diesel only) from AT for FOR s",
    )
    k.add_argument(
        "--tank-start",
        type=float,
        default=200.0,
        metavar="BAR",
        help="tank pressure at the start (200)",
    )
    k.add_argument(
        "--refuel-below",
        type=float,
        default=0.0,
        metavar="BAR",
        help="refuel at the next stop below this pressure (0: never)",
    )
    p.set_defaults(func=_command)


def _window_arg(text: str) -> tuple[float, float]:
    try:
        at, length = (float(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected AT:FOR seconds, got {text!r}") from None
    if at < 0 or length <= 0:
        raise argparse.ArgumentTypeError(f"need AT >= 0 and FOR > 0, got {text!r}")
    return at, length


def _fault_arg(text: str) -> tuple[float, float, int]:
    code, _, rest = text.partition(":")
    if not code.isdigit() or not 1 <= int(code) <= 32:
        raise argparse.ArgumentTypeError(f"fault code must be 1..32, got {code!r}")
    at, length = _window_arg(rest)
    return at, length, int(code)


def _stuck_arg(text: str) -> tuple[float, float, str]:
    sensor, _, rest = text.partition(":")
    if sensor not in ("tank_bar", "gas_temp_c"):
        raise argparse.ArgumentTypeError(f"sensor must be tank_bar or gas_temp_c, got {sensor!r}")
    at, length = _window_arg(rest)
    return at, length, sensor
