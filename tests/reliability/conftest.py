"""The reliability suite's result rows (``case``, ``surface``, ``outcome``, ``error``), written
to the JSON file named by ``SLIMKIT_RELIABILITY_JSON`` at the end of the session:

    SLIMKIT_RELIABILITY_JSON=benchmarks/results/reliability.json .venv/bin/python -m pytest \\
        tests/reliability
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

ROWS: list[dict[str, Any]] = []
OUTCOMES = ("named", "traceback", "executed", "partial", "ok")


@pytest.fixture
def reliability_rows() -> list[dict[str, Any]]:
    return ROWS


@pytest.fixture(scope="session", autouse=True)
def _write_rows() -> Iterator[None]:
    yield
    dest = os.environ.get("SLIMKIT_RELIABILITY_JSON")
    if dest and ROWS:
        from slimkit.core.io import write_json
        from slimkit.core.machine import machine_info, versions

        counts = {o: sum(r["outcome"] == o for r in ROWS) for o in OUTCOMES}
        write_json(dest, {"benchmark": "reliability", "machine": machine_info(),
                          "versions": versions(), "summary": counts, "rows": ROWS})  # fmt: skip
