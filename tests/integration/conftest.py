"""The integration tier's one trained shop: a synthetic shop run day by day through the real
DAG (``dag.test()`` on a migrated SQLite metadata DB, as ``shoprec run`` does), built once per
session and shared by every test that only reads it. Tests that write (rerun a day, land a
bad partition, post events, move the champion alias, serve from another online store) take a
private copy (``clone_state``): a copy costs a fraction of a second, a build minutes.

Under pytest-xdist the workers share one build (``shops.built_once``): the first builds it,
the others wait and read it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from shops import (
    ADMIN_TOKEN,
    FeastProfile,
    TrainedShop,
    build_trained_shop,
    built_once,
    feast_profile,
    load_trained_shop,
    on_copy,
    point_airflow_at,
    shop_environment,
)


@pytest.fixture(scope="module", params=["local", pytest.param("prod", marks=pytest.mark.prod)])
def feast(request: pytest.FixtureRequest) -> FeastProfile:
    """A Feast test module on the local profile (SQLite) and on the production profile (SQL
    registry in PostgreSQL, Redis online store): its module-scoped shop is built once per
    profile, in a Feast project of its own."""
    return feast_profile(request.param, request.module.__name__.rsplit(".", 1)[-1])


@pytest.fixture(scope="session")
def trained_shop(tmp_path_factory: pytest.TempPathFactory) -> TrainedShop:
    """The session's trained shop (read it only: write to a ``shop_copy``)."""
    folder, manifest = built_once(tmp_path_factory, "trained-shop",
                                  lambda root: build_trained_shop(root / "state"))
    return load_trained_shop(folder / "state", manifest)


@pytest.fixture
def shop(trained_shop: TrainedShop) -> Iterator[tuple]:
    """This test on the shared trained shop, read-only: (settings, shop)."""
    with shop_environment(trained_shop.home, SHOPREC_ADMIN_TOKEN=ADMIN_TOKEN,
                          SHOPREC_SERVING_POLL_SECONDS="0") as settings:
        point_airflow_at(settings)
        yield settings, trained_shop


@pytest.fixture
def shop_copy(trained_shop: TrainedShop, tmp_path: Path) -> Iterator[tuple]:
    """This test on a private copy of the trained shop, free to write: (settings, shop)."""
    with on_copy(trained_shop, tmp_path) as value:
        yield value
