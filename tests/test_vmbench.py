"""The virtual bench's host-side helpers that run without qemu (the bench itself: vmbench/)."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

from vmbench import image, run
from vmbench.run import _read_suite

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "hil_tests"))

from hil_support import bench_config  # noqa: E402


def test_the_mirror_comes_from_the_hosts_deb822_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "other.sources").write_text(
        "Types: deb\nURIs: http://example.invalid/node\nSuites: nodistro\nComponents: main\n"
    )
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\n# a comment: with a colon\nURIs: http://mirror.invalid/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n\n"
        "Types: deb\nURIs: http://mirror.invalid/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n"
    )
    assert image.host_mirror("bookworm", tmp_path) == "http://mirror.invalid/debian"


def test_the_mirror_comes_from_a_one_line_sources_list(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text(
        "# deb http://old.invalid/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://mirror.invalid/debian bookworm main contrib\n"
    )
    assert image.host_mirror("bookworm", tmp_path) == "http://mirror.invalid/debian"


def test_no_mirror_for_the_suite_is_an_image_build_error(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text("deb http://mirror.invalid/debian trixie main\n")
    with pytest.raises(image.ImageError, match="image build: .*bookworm"):
        image.host_mirror("bookworm", tmp_path)


def test_the_cache_key_follows_the_recipe() -> None:
    assert image.recipe_hash("amd64") == image.recipe_hash("amd64")
    before = image.recipe_hash("amd64")
    image.PACKAGES["amd64"].append("strace")
    try:
        assert image.recipe_hash("amd64") != before
    finally:
        image.PACKAGES["amd64"].remove("strace")
    assert image.recipe_hash("amd64") == before


def test_the_guest_config_is_the_shipped_one_with_the_bench_edits() -> None:
    example = (ROOT / "deploy" / "agent.example.toml").read_text()
    cfg = tomllib.loads(bench_config(example, {("batch", "readings_per_batch"): "5"}))
    shipped = tomllib.loads(example)
    assert cfg["can"]["channel"] == "vcan0" and cfg["kit"]["port"] == ""
    assert cfg["batch"]["readings_per_batch"] == 5
    assert cfg["store"] == shipped["store"] and cfg["service"] == shipped["service"]
    with pytest.raises(KeyError, match="no_such"):
        bench_config(example, {("can", "no_such"): "1"})


def test_guest_results_count_failures_and_skips(tmp_path: Path) -> None:
    (tmp_path / "hil.xml").write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="hil_tests.a" name="ok"/>'
        '<testcase classname="hil_tests.a" name="bad"><failure message="x"/></testcase>'
        '<testcase classname="hil_tests.a" name="err"><error message="y"/></testcase>'
        '<testcase classname="hil_tests.b" name="hands"><skipped message="needs a person"/>'
        "</testcase></testsuite></testsuites>"
    )
    (tmp_path / "figure-replay.json").write_text('{"agent_diesel_l": 0.5}')
    (tmp_path / "figure-load.json").write_text('{"full_load": {"dropped": 0}}')
    result: dict = {"full_load": {"dropped": None, "offered": None}}
    result.update(errors=[], failed_tests=[], skipped_tests=[])
    _read_suite(tmp_path, result)
    assert (result["hil_passed"], result["hil_failed"], result["hil_skipped"]) == (1, 2, 1)
    assert result["failed_tests"] == ["hil_tests.a::bad", "hil_tests.a::err"]
    assert result["skipped_tests"] == ["hil_tests.b::hands: needs a person"]
    assert result["agent_diesel_l"] == 0.5
    assert result["full_load"] == {"dropped": 0, "offered": None}


def test_the_sdist_requirements_are_the_base_ones_and_the_extras_asked_for(tmp_path: Path) -> None:
    import io
    import tarfile

    from vmbench.run import sdist_requirements

    requires = b"python-can>=4.4\ncffi>=1.16\n\n[office]\nmatplotlib>=3.8\n\n[test]\npytest>=8\n"
    sdist = tmp_path / "cngmrv-0.1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as t:
        info = tarfile.TarInfo("cngmrv-0.1.0/cngmrv.egg-info/requires.txt")
        info.size = len(requires)
        t.addfile(info, io.BytesIO(requires))
    assert sdist_requirements(sdist) == ["python-can>=4.4", "cffi>=1.16"]
    assert sdist_requirements(sdist, ("office",)) == [
        "python-can>=4.4",
        "cffi>=1.16",
        "matplotlib>=3.8",
    ]


def test_the_arm64_smokes_test_files_exist() -> None:
    # A moved test file broke the arm64 smoke once; the smoke runs rarely, so this checks it.
    missing = [rel for rel in run.SMOKE_TESTS if not (run.ROOT / rel).is_file()]
    assert missing == []


def test_the_wheel_and_sdist_are_built_from_a_copy_without_earlier_builds(tmp_path: Path) -> None:
    root = tmp_path / "checkout"
    for rel in ("agent/runtime.py", "build/lib/cngmrv/agent/gone.py", "cngmrv.egg-info/PKG-INFO"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x = 1\n")
    (root / ".git").mkdir()
    (root / "agent" / "__pycache__").mkdir()
    copy = run.source_copy(tmp_path / "copy", root)
    got = sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*"))
    assert got == ["agent", "agent/runtime.py"]
