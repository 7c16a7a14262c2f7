"""Suite-wide hooks: each test's call report is kept on its item (``item.rep_call``), so fixtures
can add diagnostics (an operator's log tail) to the report of a test that failed."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report: Any = yield
    setattr(item, f"rep_{report.when}", report)
    return report
