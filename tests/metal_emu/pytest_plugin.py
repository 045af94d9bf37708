"""pytest hooks for the Metal coverage gate (tests/test_metal_coverage.py).

Enabled from tests/conftest.py:  pytest_plugins = ["tests.metal_emu.pytest_plugin"]

The gate runs after every other test so that it sees all their launches, and
learns which tests were deselected so that it can tell a partial run.
"""

from __future__ import annotations

import pytest

GATE_FILE = "test_metal_coverage.py"
active_key = pytest.StashKey[bool]()
deselected_key = pytest.StashKey[set]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[active_key] = True
    config.stash[deselected_key] = set()


def pytest_deselected(items: list[pytest.Item]) -> None:
    for item in items:
        item.config.stash[deselected_key].add(item.path.name)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name == GATE_FILE)  # stable: gate last
