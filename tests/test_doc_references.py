"""Comments and docstrings cite documents that are in the repository.

A citation of ``docs/NAME.md`` must name a file there; the project's domain
facts are ``docs/domain.md``, never a "DOMAIN.md" outside the repository, and
the project's own issue numbers are not documents (another project's issue,
such as python-can-j1939's, is a public reference and may be cited).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("agent", "drivers", "native", "signed", "office", "sim", "bench", "tests", "hil_tests")
SUFFIXES = {".py", ".c", ".h", ".toml"}
DOC = re.compile(r"docs/([\w.-]+\.md)")
BARE_DOMAIN = re.compile(r"(?<!docs/)\bDOMAIN\.md")
# "issue 4", "(issue #4)": unless another project is named just before it.
OWN_ISSUE = re.compile(r"(?<![\w-] )\bissue #?\d+", re.IGNORECASE)


def _sources() -> list[Path]:
    files = [ROOT / "Makefile", ROOT / "setup.py"]
    for folder in FOLDERS:
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in SUFFIXES]
    return [p for p in files if p.is_file() and p.resolve() != Path(__file__).resolve()]


def test_cited_documents_exist() -> None:
    missing = {
        f"{p.relative_to(ROOT)}: docs/{name}"
        for p in _sources()
        for name in DOC.findall(p.read_text(errors="replace"))
        if not (ROOT / "docs" / name).is_file()
    }
    assert not missing, sorted(missing)


def test_no_citation_of_a_document_outside_the_repository() -> None:
    offenders = []
    for p in _sources():
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            if BARE_DOMAIN.search(line) or OWN_ISSUE.search(line):
                offenders.append(f"{p.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, offenders
