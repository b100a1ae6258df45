"""Sources own their config: each settles its section (paths, DBCs) and builds what it brings
the runtime from it; the runtime and the config module hold none of a source's options."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from cngmrv.agent import config
from cngmrv.agent.builtin_sources import CanBus, Kit
from cngmrv.agent.source import configured
from cngmrv.drivers.can_source import DEFAULT_PGNS
from cngmrv.drivers.kit_can import DEFAULT_DBC, KitCanDecoder

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp_path: Path, **sections: dict) -> config.Config:
    return config.from_mapping(
        {"device": {"id": "b", "key_file": "k"}, "store": {"path": "s"}, **sections}, tmp_path
    )


def test_the_kit_on_can_brings_its_decoder_and_its_pgns_through_the_seam(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, kit={"transport": "can"})
    sources = configured(cfg)
    kit = next(s for s in sources if isinstance(s, Kit))
    can_bus = next(s for s in sources if isinstance(s, CanBus))
    decoder = kit.pipeline_inputs()["kit_can"]
    assert isinstance(decoder, KitCanDecoder)
    pgns = KitCanDecoder(DEFAULT_DBC, 0x27).pgns
    assert kit.extended_pgns == pgns
    assert can_bus.settings(sources).pgns == DEFAULT_PGNS | pgns
    assert _cfg(tmp_path).source_values["kit"]["pgns"] == frozenset()


def test_a_kit_dbc_is_resolved_against_the_config_folder_and_checked(tmp_path: Path) -> None:
    (tmp_path / "bad.dbc").write_text("BO_ nonsense")
    with pytest.raises(config.ConfigError, match=r"^kit\.dbc: cannot load .*bad\.dbc"):
        _cfg(tmp_path, kit={"transport": "can", "dbc": "bad.dbc"})


@pytest.mark.parametrize("module", ["agent/runtime.py", "agent/config.py"])
def test_no_source_option_is_read_outside_its_source(module: str) -> None:
    # The old runtime built the kit's CAN decoder from config.kit_dbc and the DBC from
    # config.can_dbc; the old config read "can.dbc", "kit.transport"... to assemble them.
    tree = ast.parse((ROOT / module).read_text())
    on_config = {
        n.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute)
        and (
            (isinstance(n.value, ast.Name) and n.value.id in ("config", "cfg", "c"))
            or (isinstance(n.value, ast.Attribute) and n.value.attr == "config")
        )
    }
    keys = {
        n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }
    assert {a for a in on_config if a.startswith(("can_", "kit_"))} == set()
    assert {k for k in keys if k.startswith(("can.", "kit.", "obd.", "gps."))} == set()
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert names & {"KitCanDecoder", "DbcSignals", "SourceSettings"} == set()
