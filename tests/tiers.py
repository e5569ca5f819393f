"""The suite's tiers: every test belongs to exactly one, through a marker.

- ``fast``: unit, contract, DAG integrity, data suites, model behaviour on tiny tensors,
  static deployment checks. No Airflow run, no server, no PostgreSQL. ``make test-fast``.
- ``integration``: the real chain on the embedded profile and Feast on both profiles: one
  trained shop built through the DAG and shared read-only, Feast stores, the HTTP app.
- ``operations``: backfills, killed tasks, the production stack and its faults.

``make test`` (``tests/run_tiers.py``) runs them in that order and stops at the first tier
that fails. A test in no tier, or in two, fails collection: a new test cannot slip out of CI.
Loaded from ``tests/conftest.py`` as a plugin, so other pytest runs can load it too.
"""

from __future__ import annotations

import pytest

TIERS = ("fast", "integration", "operations")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fast: tier 1, a few minutes in all: no Airflow run, "
                                       "no server, no PostgreSQL")
    config.addinivalue_line("markers", "integration: tier 2, the real chain (Airflow, Feast, "
                                       "MLflow, FAISS, HTTP) on a shared trained shop")
    config.addinivalue_line("markers", "operations: tier 3, backfills, killed tasks, the "
                                       "production stack and its faults")


def tiers_of(item: pytest.Item) -> list[str]:
    """The tier markers on a test (its own, its class's and its module's)."""
    return sorted({mark.name for mark in item.iter_markers() if mark.name in TIERS})


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wrong = [f"  {item.nodeid}: {', '.join(tiers) or 'no tier'}"
             for item in items if len(tiers := tiers_of(item)) != 1]
    if wrong:
        raise pytest.UsageError(
            f"every test belongs to exactly one tier ({', '.join(TIERS)}), through a marker "
            "(usually the module's pytestmark); these do not:\n" + "\n".join(wrong))
