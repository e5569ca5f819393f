"""Offline partitions written by an older release, brought to the current schema once.

A column added to an offline table (``user_recent_products.purchased_product_ids``) is
missing from every partition written before: Feast's point-in-time join reads the table's
partitions as one (DuckDB) and fails on the column it cannot find. ``upgrade_partitions``
adds each missing column to those partitions as nulls (a value nobody knew then; readers
treat it as unknown), rewritten atomically, and leaves a marker with the schema it brought
them to, so later calls cost one small file read.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

_MARKERS = ".schemas"  # under the offline root: one JSON file per table


def _fingerprint(schema: pa.Schema) -> str:
    return json.dumps([[f.name, str(f.type)] for f in schema])


def upgrade_partitions(offline_root: Path, schemas: dict[str, pa.Schema]) -> dict[str, int]:
    """Add the columns of ``schemas`` that a table's partitions lack, as nulls.

    Args:
        offline_root: the offline store's root (``<table>/date=YYYY-MM-DD/*.parquet``).
        schemas: table -> the schema its partitions must have.

    Returns:
        table -> partitions rewritten (0 for a table already checked against this schema).
    """
    done: dict[str, int] = {}
    for table, schema in schemas.items():
        marker = offline_root / _MARKERS / f"{table}.json"
        if marker.is_file() and marker.read_text() == _fingerprint(schema):
            done[table] = 0
            continue
        rewritten = 0
        for path in sorted((offline_root / table).glob("date=*/*.parquet")):
            names = pq.read_schema(path).names
            missing = [field for field in schema if field.name not in names]
            if not missing:
                continue
            data = pq.read_table(path)
            for field in missing:
                data = data.append_column(field, pa.nulls(data.num_rows, field.type))
            extra = [n for n in data.column_names if n not in schema.names]
            data = data.select([*schema.names, *extra])
            tmp = path.with_suffix(".upgrade.tmp")
            pq.write_table(data.replace_schema_metadata(None), tmp, compression="zstd")
            tmp.replace(path)
            rewritten += 1
        if rewritten:
            log.warning("%s: %d partition(s) from an older release given the new column(s) "
                        "as nulls", table, rewritten)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(_fingerprint(schema))
        done[table] = rewritten
    return done
