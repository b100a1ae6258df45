"""Methodology files for tests that check the report's mechanics, not the shipped defaults."""

from __future__ import annotations

import tempfile
from pathlib import Path

from cngmrv.office import mrv

# The defaults before methodology 2.0.0 (fossil diesel, CO2 only), so the mechanics tests keep
# their hand computations: 1 kg of CNG = 48 MJ x (74.1 - 56.1) g/MJ = 0.864 kg CO2.
FOSSIL_CO2 = (
    '[methodology]\nbase = "jcm-id-dual-fuel-bus"\nversion = "2.0.0+fossil-co2"\n'
    "include_ch4_n2o = false\n{methodology}"
    '[[blend]]\nname = "B0"\nfrom = 2000-01-01\nfame_share_vol = 0.0\n'
    'source = "test: fossil diesel only"\n{tail}'
)
_DIR = Path(tempfile.mkdtemp(prefix="cngmrv-mrv-"))


def fossil_co2_file(methodology: str = "", tail: str = "", name: str = "fossil.toml") -> Path:
    """A project file over the shipped base: B0 throughout, no CH4/N2O; ``methodology``
    adds keys to ``[methodology]``, ``tail`` more tables."""
    p = _DIR / name
    p.write_text(FOSSIL_CO2.format(methodology=methodology, tail=tail))
    return p


def fossil_co2(methodology: str = "", tail: str = "") -> mrv.Methodology:
    return mrv.load(
        fossil_co2_file(methodology, tail, name=f"f{abs(hash((methodology, tail)))}.toml")
    )
