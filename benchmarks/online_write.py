"""Online-store rows of user histories: Feast's conversion against ``features.online_write``.

Builds ``--rows`` ``user_recent_products`` rows whose lists hold ``--entries`` entries on
average (geometric, capped at HISTORY_LEN) and times, for each: turning them into Feast's
online rows (``write_to_online_store``'s way: pandas -> Arrow -> Python values -> protobuf,
and ``features.online_write.online_rows``), then writing them to a fresh SQLite online store.

    .venv/bin/python benchmarks/online_write.py --rows 46000 --entries 80   # ~day 180, full size
    .venv/bin/python benchmarks/online_write.py --rows 35000 --entries 5    # ~day 2

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def history_rows(rows: int, entries: float, seed: int = 0) -> pa.Table:
    from features.user_state import HISTORY_LEN

    rng = np.random.default_rng(seed)
    sizes = np.minimum(rng.geometric(1 / entries, rows), HISTORY_LEN)
    offsets = pa.array(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32))
    total = int(sizes.sum())
    products = pa.array(np.char.add("p", rng.integers(0, 100_000, total).astype(str)).tolist())
    kinds = pa.array(rng.choice(["view", "add_to_cart", "purchase"], total,
                                p=[0.8, 0.15, 0.05]).tolist(), pa.string())
    stamp = pa.scalar(1_780_000_000 * 10**6, pa.timestamp("us", tz="UTC"))
    return pa.table({
        "user_id": pa.array([f"u{i:07d}" for i in range(rows)]),
        "recent_product_ids": pa.ListArray.from_arrays(offsets, products),
        "recent_event_types": pa.ListArray.from_arrays(offsets, kinds),
        "recent_timestamps": pa.ListArray.from_arrays(
            offsets, pa.array(rng.integers(1_700_000_000, 1_780_000_000, total))),
        "n_events_total": pa.array(sizes.astype(np.int64)),
        "event_timestamp": pa.array([stamp.as_py()] * rows, stamp.type)})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=46_000)
    parser.add_argument("--entries", type=float, default=80.0, help="mean entries per list")
    args = parser.parse_args(argv)
    home = Path(tempfile.mkdtemp(prefix="shoprec-online-write-"))
    os.environ.update({"SHOPREC_HOME": str(home), "SHOPREC_LANDING_ROOT": str(home / "landing")})
    from feast.utils import _convert_arrow_to_proto

    from core.settings import Settings
    from features.online_write import online_rows
    from features.store import apply_repo, feature_store

    settings = Settings.from_env().prepare()
    apply_repo(settings)
    store = feature_store(settings)
    view = store.get_feature_view("user_recent_products")
    provider = store._get_provider()
    table = history_rows(args.rows, args.entries)
    entries = pa.compute.sum(table["recent_product_ids"].combine_chunks().value_lengths())
    print(f"{args.rows:,} rows, {entries.as_py():,} entries per list column "
          f"({entries.as_py() / args.rows:.1f} a row)")
    keys = {"user_id": view.entity_columns[0].dtype.to_value_type()}
    timings = {}
    t0 = time.perf_counter()
    feast_rows = _convert_arrow_to_proto(pa.Table.from_pandas(table.to_pandas()), view, keys)
    timings["Feast's conversion (write_to_online_store)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    mine = online_rows(table, view)
    timings["features.online_write.online_rows"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    provider.online_write_batch(store.config, view, mine, None)
    timings["SQLite online store write (new rows)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    provider.online_write_batch(store.config, view, feast_rows, None)
    timings["SQLite online store write (same rows again)"] = time.perf_counter() - t0
    for name, seconds in timings.items():
        print(f"  {name:<45} {seconds:7.2f} s")


if __name__ == "__main__":
    main()
