"""features.online_write: the online rows Feast would build, byte for byte, and the rows a
real SQLite online store then holds."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest

pytestmark = pytest.mark.fast

WORDS = ["", "a", "café", "日本語の商品", "x" * 127, "y" * 128, "z" * 20_000, "p123|blue"]


def _views() -> dict:
    from feast import FeatureView

    from features.store import _declarations

    return {v.name: v for v in _declarations() if isinstance(v, FeatureView)}


def _column(kind: str, rows: int, rng: np.random.Generator, edge: bool) -> pa.Array:
    """Random values of a Feast dtype's name; with ``edge``, nulls, empty lists and extremes."""
    def one_list(make):  # a row's list, null or empty now and then
        roll = rng.random()
        if edge and roll < 0.1:
            return None
        if edge and roll < 0.2:
            return []
        return [make() for _ in range(int(rng.integers(1, 40)))]

    if kind == "Array(String)":
        return pa.array([one_list(lambda: str(rng.choice(WORDS)) + str(rng.integers(1e6)))
                         for _ in range(rows)], pa.list_(pa.string()))
    if kind == "Array(Int64)":
        extremes = [0, -1, 127, 128, 2**31, -(2**63), 2**63 - 1, 1_780_000_000]
        return pa.array([one_list(lambda: int(rng.choice(extremes)) if edge and rng.random()
                                  < 0.3 else int(rng.integers(-10**6, 10**12)))
                         for _ in range(rows)], pa.list_(pa.int64()))
    if kind in ("Array(Float64)", "Array(Float32)"):
        extremes = [0.0, -0.0, float("inf"), float("-inf"), float("nan"),
                    1e-300 if kind == "Array(Float64)" else 1e-30]
        kind_type = pa.float64() if kind == "Array(Float64)" else pa.float32()
        return pa.array([one_list(lambda: float(rng.choice(extremes)) if edge and rng.random()
                                  < 0.3 else float(rng.normal() * 100))
                         for _ in range(rows)], pa.list_(kind_type))
    if kind == "String":
        return pa.array([None if edge and rng.random() < 0.1 else f"v{rng.integers(1e6)}é"
                         for _ in range(rows)], pa.string())
    if kind == "Int64":
        return pa.array(rng.integers(-10**9, 10**12, rows), pa.int64())
    if kind == "Float64":  # a NaN (edge cases) leaves the column to Feast
        values = rng.normal(size=rows)
        if edge:
            values[rng.random(rows) < 0.05] = np.nan
        return pa.array(values, pa.float64())
    raise AssertionError(f"no generator for {kind}")


def _table(view, rows: int, seed: int, edge: bool) -> pa.Table:
    rng = np.random.default_rng(seed)
    [key] = [e.name for e in view.entity_columns]
    columns = {key: pa.array([f"id-{i:06d}" for i in range(rows)], pa.string())}
    for field in view.features:
        columns[field.name] = _column(str(field.dtype), rows, rng, edge)
    start = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
    columns[view.batch_source.timestamp_field] = pa.array(
        [start + dt.timedelta(seconds=int(s)) for s in rng.integers(0, 86_400, rows)],
        pa.timestamp("us", tz="UTC"))
    return pa.table(columns)


def _serialized(rows: list) -> list:
    return [(key.SerializeToString(), {k: v.SerializeToString() for k, v in values.items()},
             stamp, created) for key, values, stamp, created in rows]


def _feast_rows(table: pa.Table, view) -> list:
    """What ``write_to_online_store`` builds from the same rows as pandas (``ingest_df``)."""
    from feast.utils import _convert_arrow_to_proto

    keys = {e.name: e.dtype.to_value_type() for e in view.entity_columns}
    return _convert_arrow_to_proto(pa.Table.from_pandas(table.to_pandas()), view, keys)


@pytest.mark.parametrize("edge", [False, True], ids=["plain", "edge-cases"])
@pytest.mark.parametrize("name", ["user_recent_products", "user_profile", "product_stats",
                                  "product_catalog", "user_vectors"])
def test_rows_equal_feasts_byte_for_byte(name, edge):
    from features.online_write import online_rows

    view = _views()[name]
    table = _table(view, 300, seed=len(name), edge=edge)
    mine = _serialized(online_rows(table, view))
    assert mine == _serialized(_feast_rows(table, view))
    # a slice (non-zero offsets in every buffer) encodes the same rows
    assert _serialized(online_rows(table.slice(17, 120), view)) == mine[17:137]


def test_list_columns_are_encoded_here_not_by_feast():
    """The fast path is taken for every list type the repo declares (a change of dtype that
    fell back to Feast would silently bring the per-entry cost back)."""
    from features.online_write import _fast_column

    kinds = {str(f.dtype): f for v in _views().values() for f in v.features
             if str(f.dtype).startswith("Array")}
    assert set(kinds) == {"Array(String)", "Array(Int64)", "Array(Float64)", "Array(Float32)"}
    rng = np.random.default_rng(0)
    for kind, field in kinds.items():
        assert _fast_column(pa.chunked_array([_column(kind, 20, rng, True)]),
                            field.dtype.to_value_type()) is not None, kind
    # a null entry inside a list: Feast's own conversion (it substitutes a default)
    with_null = pa.chunked_array([pa.array([["a", None]], pa.list_(pa.string()))])
    assert _fast_column(with_null, kinds["Array(String)"].dtype.to_value_type()) is None


def test_written_rows_read_back_from_a_real_online_store(tmp_path, monkeypatch):
    """Through ``write_online`` into Feast's SQLite online store, read back with
    ``get_online_features``: the lists come back as written."""
    from core.settings import Settings
    from features.online_write import write_online
    from features.store import apply_repo, feature_store

    monkeypatch.setenv("SHOPREC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SHOPREC_LANDING_ROOT", str(tmp_path / "landing"))
    settings = Settings.from_env().prepare()
    apply_repo(settings)
    store = feature_store(settings)
    view = store.get_feature_view("user_recent_products")
    table = _table(view, 50, seed=3, edge=True)
    assert write_online(store, "user_recent_products", table, chunk_rows=7) == 50
    got = store.get_online_features(
        features=[f"user_recent_products:{f.name}" for f in view.features],
        entity_rows=[{"user_id": u} for u in table["user_id"].to_pylist()]).to_dict()
    for field in view.features:
        expected = table[field.name].to_pylist()
        assert got[field.name] == expected, field.name
