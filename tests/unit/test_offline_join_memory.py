"""The DuckDB behind Feast's point-in-time joins runs under the configured memory cap."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

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


def test_a_second_join_after_a_spill_keeps_working(tmp_path) -> None:
    """Once DuckDB has spilled to its folder it refuses to be pointed at one again: the
    second join of a process (train: the examples, then the validation set) must not fail,
    nor a join for another state folder. In a child process: the spill stays there."""
    code = textwrap.dedent(f"""
        import dataclasses, ibis
        from pathlib import Path
        from core.settings import Settings
        from features.store import bound_offline_join
        def folder():
            return ibis.get_backend().raw_sql(
                "SELECT current_setting('temp_directory')").fetchone()[0]
        first = dataclasses.replace(Settings(home=Path({str(tmp_path / "a")!r})),
                                    offline_join_memory="64MB")
        bound_offline_join(first)
        # DuckDB draws a progress bar on stdout when a query runs past 2 s (a busy machine)
        ibis.get_backend().raw_sql("SET enable_progress_bar = false")
        rows = ibis.get_backend().raw_sql(
            "SELECT count(*) FROM (SELECT random() AS r FROM range(6000000) ORDER BY r)"
        ).fetchone()[0]
        assert rows == 6_000_000
        bound_offline_join(first)  # raised NotImplementedException before
        assert folder() == str(first.cache_dir / "duckdb")
        other = dataclasses.replace(Settings(home=Path({str(tmp_path / "b")!r})),
                                    offline_join_memory="64MB")
        bound_offline_join(other)
        assert folder() == str(first.cache_dir / "duckdb")
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@pytest.mark.parametrize("value", ["lots", "6", "6GB; DROP TABLE x", "-1GB"])
def test_a_value_that_is_not_a_size_is_refused(tmp_path, value: str) -> None:
    settings = dataclasses.replace(Settings(home=tmp_path), offline_join_memory=value)
    with pytest.raises(ValueError, match="SHOPREC_OFFLINE_JOIN_MEMORY"):
        bound_offline_join(settings)
