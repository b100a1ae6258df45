"""Strict skips: in CI, a test that cannot find its part fails instead of skipping.

A test that needs something it cannot find here (PostgreSQL's binaries,
SoftHSM2, chromium, a kernel CAN interface) skips and says why.  That is
right on a developer's laptop and wrong in CI, where a missing install step
would otherwise pass unnoticed.  With ``CNGMRV_STRICT_SKIPS=1`` (``.ci/run``
sets it) every skip fails, except:

- a test marked ``@pytest.mark.may_skip("why")``: its skip is expected
  everywhere (it needs a person's hands, or runs only under the sanitizer);
- a bench test in ``hil_tests/`` on a machine with no bench at all (neither
  ``CNGMRV_HIL_CAN`` nor ``CNGMRV_HIL_KIT`` set).  The virtual bench
  (``make vm-bench``) runs them in a guest with both set, where they are strict.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

STRICT_ENV = "CNGMRV_STRICT_SKIPS"


def _strict() -> bool:
    return os.environ.get(STRICT_ENV) == "1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "may_skip(reason): this test's skip is expected even in a strict (CI) run"
    )


def _skip_allowed(item: pytest.Item) -> bool:
    if item.get_closest_marker("may_skip") is not None:
        return True
    no_bench = not os.environ.get("CNGMRV_HIL_CAN") and not os.environ.get("CNGMRV_HIL_KIT")
    return "hil_tests" in item.path.parts and no_bench


def _reason(longrepr: Any) -> str:
    return str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    rep = outcome.get_result()
    if _strict() and rep.skipped and not hasattr(rep, "wasxfail") and not _skip_allowed(item):
        rep.outcome = "failed"
        rep.longrepr = f"skipped in a strict run ({STRICT_ENV}=1): {_reason(rep.longrepr)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, None]:
    outcome = yield
    rep = outcome.get_result()
    if _strict() and rep.skipped and "hil_tests" not in collector.path.parts:
        rep.outcome = "failed"
        rep.longrepr = f"module skipped in a strict run ({STRICT_ENV}=1): {_reason(rep.longrepr)}"
