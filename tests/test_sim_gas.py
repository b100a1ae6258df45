"""The ground truth's tank shares no code with the agent's, and the tank cross-check can fail.

The simulator's tank follows the Span–Wagner (2003) equation for methane
(``cngmrv.sim.gas``); the agent's follows Dranchuk–Abou-Kassem in C
(``cngmrv.native.tank_mass``).  Both are held against reference values here,
then against each other over the kit's range, then deliberately perturbed.
"""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cngmrv.native import tank_mass
from cngmrv.sim import gas, harness

ROOT = Path(__file__).resolve().parent.parent
# The agent's [gas] defaults: methane's pseudo-critical point and gas constant.
AGENT_GAS = {"r_specific": 518.3, "p_pc_bar": 46.0, "t_pc_k": 190.6}
VOLUME = 0.44
TOL = gas.AGENT_LAW_TOLERANCE
PERTURBATION = 0.05

# Z of methane from the reference equation of Setzmann and Wagner (1991, J.
# Phys. Chem. Ref. Data 20, 1061), as evaluated by CoolProp 8.0.0: (bar, K, Z).
REFERENCE_Z = [
    (1, 273.15, 0.99764),
    (20, 305.15, 0.96879),
    (50, 253.15, 0.84377),
    (100, 263.15, 0.74785),
    (150, 288.15, 0.78972),
    (200, 300.15, 0.82877),
    (200, 273.15, 0.75678),
    (250, 343.15, 0.93560),
    (250, 253.15, 0.77475),
]

# The kit's operating range on a 10 bar x 10 K grid.
GRID = [
    (float(p), t)
    for p in range(0, 251, 10)
    for t in (253.15, 263.15, 273.15, 283.15, 293.15, 303.15, 313.15, 323.15, 333.15, 343.15)
]


def agent_mass(bar: float, temp_k: float, volume: float = VOLUME, z_scale: float = 1.0) -> float:
    # In m = P V / (Z R T), scaling R scales Z: the agent's law with a Z error.
    r = AGENT_GAS["r_specific"] * z_scale
    return tank_mass(bar, temp_k, volume, r, AGENT_GAS["p_pc_bar"], AGENT_GAS["t_pc_k"])


def sim_mass(bar: float, temp_k: float, volume: float = VOLUME, z_scale: float = 1.0) -> float:
    return gas.gas_mass(bar, temp_k, volume) / z_scale


def worst_disagreement(agent: Any = agent_mass, sim: Any = sim_mass) -> float:
    """The tank cross-check over the range: the largest |agent / sim - 1| (0 bar: both 0)."""
    return max(abs(agent(p, t) / sim(p, t) - 1.0) for p, t in GRID if p > 0)


@pytest.mark.parametrize(("bar", "temp_k", "z_ref"), REFERENCE_Z)
def test_the_simulators_law_matches_the_reference_equation(
    bar: float, temp_k: float, z_ref: float
) -> None:
    assert gas.compressibility(bar, temp_k) == pytest.approx(z_ref, rel=0.0015)


@pytest.mark.parametrize(("bar", "temp_k", "z_ref"), REFERENCE_Z)
def test_the_agents_law_is_within_its_stated_accuracy_of_the_reference(
    bar: float, temp_k: float, z_ref: float
) -> None:
    # The agent's Z, recovered from its mass: Z = P V / (m R T).
    m = agent_mass(bar, temp_k)
    z = bar * 1e5 * VOLUME / (m * AGENT_GAS["r_specific"] * temp_k)
    assert z == pytest.approx(z_ref, rel=0.017)


def test_the_two_laws_agree_within_the_stated_tolerance_over_the_kits_range() -> None:
    assert all(agent_mass(0.0, t) == sim_mass(0.0, t) == 0.0 for _, t in GRID)
    assert worst_disagreement() <= TOL


@pytest.mark.parametrize(
    ("side", "what", "factor"),
    [
        (side, what, factor)
        for side in ("agent", "sim")
        for what in ("volume", "z")
        for factor in (1 - PERTURBATION, 1 + PERTURBATION)
    ],
)
def test_a_few_percent_error_in_either_law_fails_the_cross_check(
    side: str, what: str, factor: float
) -> None:
    def perturbed(law: Any) -> Any:
        if what == "volume":
            return lambda p, t: law(p, t, volume=VOLUME * factor)
        return lambda p, t: law(p, t, z_scale=factor)

    agent = perturbed(agent_mass) if side == "agent" else agent_mass
    sim = perturbed(sim_mass) if side == "sim" else sim_mass
    assert worst_disagreement(agent, sim) > TOL


@given(
    st.floats(min_value=0.0, max_value=250.0),
    st.floats(min_value=gas.RANGE_K[0], max_value=gas.RANGE_K[1]),
)
def test_pressure_is_the_inverse_of_mass(bar: float, temp_k: float) -> None:
    m = gas.gas_mass(bar, temp_k, VOLUME)
    assert gas.pressure_bar(m, temp_k, VOLUME) == pytest.approx(bar, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize(
    ("bar", "temp_k"), [(-1.0, 300.0), (math.nan, 300.0), (100.0, 190.0), (100.0, math.inf)]
)
def test_outside_the_gas_phase_is_an_error(bar: float, temp_k: float) -> None:
    with pytest.raises(ValueError):
        gas.compressibility(bar, temp_k)


def _imports(path: Path) -> set[str]:
    """Absolute module names a file imports, relative imports resolved inside cngmrv.sim."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = ["cngmrv", "sim"][: max(0, 3 - node.level)]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value.startswith("cngmrv.native"):
                names.add(node.value)  # importlib.import_module("cngmrv.native...")
    return names


def test_the_simulator_imports_the_agents_native_code_only_in_its_harness() -> None:
    offenders = {
        f"{p.relative_to(ROOT)}: {name}"
        for p in (ROOT / "sim").rglob("*.py")
        if p.name != "harness.py"
        for name in _imports(p)
        if name == "cngmrv.native" or name.startswith("cngmrv.native.")
    }
    assert not offenders, sorted(offenders)


def test_the_ground_truth_loads_none_of_the_agents_code() -> None:
    # A fresh interpreter: what the vehicle model (drive cycle, fuel, tank) pulls in.
    code = (
        "import sys, json\n"
        "import cngmrv.sim.vehicle, cngmrv.sim.gas\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('cngmrv.')"
        " and not m.startswith('cngmrv.sim'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def _run(tmp_path: Path, **kw: Any) -> dict[str, Any]:
    opts = harness.SimOptions(duration=60.0, speedup=0.0, seed=3, workdir=tmp_path, **kw)
    return harness.run(opts)


def test_the_simulated_tank_passes_the_cross_check(tmp_path: Path) -> None:
    s = _run(tmp_path)
    err = harness.tank_error(s)
    assert err is not None and abs(err) <= TOL, (s["tank_kg"], s["truth"]["tank_kg"])


@pytest.mark.parametrize(
    ("what", "options"),
    [
        # The agent's law perturbed: its R (so its Z) 5 % high.
        ("agent z", {"agent_r_j_per_kg_k": AGENT_GAS["r_specific"] * (1 + PERTURBATION)}),
        # The truth perturbed: the bus's tank 5 % smaller than the agent is told.
        ("sim volume", {"tank_volume_m3": VOLUME * (1 - PERTURBATION)}),
    ],
)
def test_a_perturbed_law_fails_the_simulators_tank_cross_check(
    tmp_path: Path, what: str, options: dict[str, float]
) -> None:
    s = _run(tmp_path, agent_tank_volume_m3=VOLUME, **options)
    err = harness.tank_error(s)
    assert err is not None and abs(err) > TOL, (what, err)
    # The flow-based figures do not rest on the tank's law and still hold.
    assert abs(s["gas_kg"] - s["truth"]["gas_kg"]) / s["truth"]["gas_kg"] < 0.01
