"""The DuckDB behind Feast's point-in-time joins runs under the configured memory cap."""

from __future__ import annotations

import dataclasses

import ibis
import pytest

from core.settings import Settings
from features.store import bound_offline_join

pytestmark = pytest.mark.fast


def _setting(name: str) -> str:
    return ibis.get_backend().raw_sql(f"SELECT current_setting('{name}')").fetchone()[0]


def test_the_cap_and_the_spill_folder_are_set(tmp_path) -> None:
    settings = dataclasses.replace(Settings(home=tmp_path), offline_join_memory="3GB")
    bound_offline_join(settings)
    assert _setting("memory_limit") == "2.7 GiB"  # DuckDB shows 3 GB in GiB
    assert _setting("temp_directory") == str(settings.cache_dir / "duckdb")
    assert (settings.cache_dir / "duckdb").is_dir()


@pytest.mark.parametrize("value", ["lots", "6", "6GB; DROP TABLE x", "-1GB"])
def test_a_value_that_is_not_a_size_is_refused(tmp_path, value: str) -> None:
    settings = dataclasses.replace(Settings(home=tmp_path), offline_join_memory=value)
    with pytest.raises(ValueError, match="SHOPREC_OFFLINE_JOIN_MEMORY"):
        bound_offline_join(settings)
