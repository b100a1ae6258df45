"""The simulator's own real-gas law for the CNG tank: the ground truth's, never the agent's.

The agent turns the kit's tank pressure and temperature into a gas mass with
the Dranchuk–Abou-Kassem correlation of the Standing–Katz chart, in C
(docs/integrator.md section 5.2).  If the simulator used that same code to
decide how much gas is in its tank, an error in it would cancel out of every
cross-check.  So the simulator's tank follows a different formulation, written
here from its paper and sharing no code with ``cngmrv.native``:

    R. Span and W. Wagner, "Equations of State for Technical Applications.
    II. Results for Nonpolar Fluids", International Journal of Thermophysics
    24 (1), 41–109 (2003), doi:10.1023/A:1022310214958: the 12-term
    Helmholtz-energy equation for methane (its table of coefficients and
    reducing parameters).

Only the residual part of the Helmholtz energy is needed for the pressure:
``Z = 1 + delta * d(alpha_r)/d(delta)``, with ``delta = rho / rho_c`` and
``tau = T_c / T``.  Over the kit's range (0–250 bar, 253–343 K) it stays
within 0.15 % in Z of the reference equation for methane of Setzmann and
Wagner (1991), as computed by CoolProp 8.0.0 (tests/test_sim_gas.py holds
reference values).

The gas is pure methane, as the agent's ``[gas]`` defaults assume
(docs/domain.md section 4).  How far the two laws may differ, and why, is
:data:`AGENT_LAW_TOLERANCE`.
"""

from __future__ import annotations

import math

R_MOLAR = 8.31451  # J/(mol K), the value Span and Wagner (2003) use
M_METHANE = 0.016043  # kg/mol
R_METHANE = R_MOLAR / M_METHANE  # J/(kg K), 518.26
T_C = 190.564  # K, methane's critical temperature (the equation's reducing temperature)
RHO_C = 10.139128 * M_METHANE * 1000.0  # kg/m^3, 162.66: the reducing density

# Span and Wagner (2003), methane: (n, d, t) for the polynomial terms, then
# (n, d, t, c) for the terms with exp(-delta^c).
_POLY = (
    (0.89269676, 1, 0.25),
    (-2.5438282, 1, 1.125),
    (0.64980978, 1, 1.5),
    (0.020793471, 2, 1.375),
    (0.070189104, 3, 0.25),
    (0.00023700378, 7, 0.875),
)
_EXP = (
    (0.16653334, 2, 0.625, 1),
    (-0.043855669, 5, 1.75, 1),
    (-0.1572678, 1, 3.625, 2),
    (-0.035311675, 4, 3.625, 2),
    (-0.029570024, 3, 14.5, 3),
    (0.014019842, 4, 12.0, 3),
)

# The kit's operating range, where the law is checked: an empty to an
# overfilled 200 bar tank, and gas from a cold morning to a hot engine bay.
RANGE_BAR = (0.0, 250.0)
RANGE_K = (253.15, 343.15)

# How far the agent's tank mass (Dranchuk–Abou-Kassem with methane's
# pseudo-critical point, 46.0 bar and 190.6 K, and R = 518.3) may lie from
# this law's at the same pressure and temperature, as a fraction of the mass.
# Source: DAK reproduces the Standing–Katz chart to about 1 % (Dranchuk and
# Abou-Kassem 1975), the chart itself describes natural gases by corresponding
# states, not pure methane.  Against the Setzmann–Wagner reference, in Z, the
# agent's law is measured at 0 to -1.6 % over the range (the largest near
# 100 bar at 253 K) and this one within 0.15 %; the agent's mass is 0 to 1.63 %
# above this one's (measured on a 5 bar x 5 K grid; tests/test_sim_gas.py checks
# a 10 bar x 10 K grid against this tolerance).
AGENT_LAW_TOLERANCE = 0.02


def _delta_dalpha(delta: float, tau: float) -> tuple[float, float]:
    """``delta * d(alpha_r)/d(delta)`` and its derivative with respect to ``delta``."""
    f = 0.0
    df = 0.0
    for n, d, t in _POLY:
        term = n * d * delta**d * tau**t
        f += term
        df += term * d / delta
    for n, d, t, c in _EXP:
        dc = delta**c
        e = n * delta**d * tau**t * math.exp(-dc)
        inner = d - c * dc
        f += e * inner
        # d/d(delta) of delta^d exp(-delta^c) (d - c delta^c)
        df += e * (inner * inner / delta - c * c * dc / delta)
    return f, df


def compressibility_at_density(density_kg_m3: float, temperature_k: float) -> float:
    """Methane's Z at a density (kg/m^3) and temperature (K): explicit, no iteration."""
    if not (math.isfinite(temperature_k) and temperature_k > T_C):
        raise ValueError(f"temperature must be above {T_C} K (gas only), got {temperature_k!r}")
    if density_kg_m3 < 1e-9:
        return 1.0
    return 1.0 + _delta_dalpha(density_kg_m3 / RHO_C, T_C / temperature_k)[0]


def compressibility(pressure_bar: float, temperature_k: float) -> float:
    """Methane's compressibility factor Z at an absolute pressure (bar) and temperature (K).

    Solves ``p = rho R T (1 + delta d(alpha_r)/d(delta))`` for the density by
    Newton's method from the ideal gas, to 1e-14 relative in pressure.  Valid for the gas
    above the critical temperature; checked over the kit's range
    (:data:`RANGE_BAR`, :data:`RANGE_K`).  Raises ValueError for a negative
    pressure or a temperature at or below the critical one.
    """
    if not (math.isfinite(pressure_bar) and pressure_bar >= 0.0):
        raise ValueError(f"pressure must be finite and >= 0 bar, got {pressure_bar!r}")
    if not (math.isfinite(temperature_k) and temperature_k > T_C):
        raise ValueError(f"temperature must be above {T_C} K (gas only), got {temperature_k!r}")
    if pressure_bar < 1e-9:
        return 1.0  # Z - 1 is below 1e-11 there, and the density would underflow
    tau = T_C / temperature_k
    p = pressure_bar * 1e5
    rt = R_METHANE * temperature_k
    delta = p / (rt * RHO_C)  # the ideal gas
    for _ in range(100):
        f, df = _delta_dalpha(delta, tau)
        # g(delta) = rho_c delta R T (1 + f) / p - 1
        g = RHO_C * delta * rt * (1.0 + f) / p - 1.0
        if abs(g) <= 1e-14:  # the pressure's relative residual, so tiny pressures converge too
            return 1.0 + f
        delta -= g / (RHO_C * rt * (1.0 + f + delta * df) / p)
    raise ArithmeticError(f"no density found at {pressure_bar} bar, {temperature_k} K")


def gas_mass(pressure_bar: float, temperature_k: float, volume_m3: float) -> float:
    """Methane in a tank of ``volume_m3`` at an absolute pressure and a temperature, kg."""
    z = compressibility(pressure_bar, temperature_k)
    return pressure_bar * 1e5 * volume_m3 / (z * R_METHANE * temperature_k)


def pressure_bar(mass_kg: float, temperature_k: float, volume_m3: float) -> float:
    """The absolute pressure (bar) of ``mass_kg`` of methane in the tank: the inverse of gas_mass.

    Explicit (the equation gives pressure from density), so cheap enough for
    every tick of the simulation.
    """
    if mass_kg <= 0.0:
        return 0.0
    rho = mass_kg / volume_m3
    z = compressibility_at_density(rho, temperature_k)
    return rho * z * R_METHANE * temperature_k / 1e5
