"""The landing-zone data contract: three tables, one immutable parquet partition per day.

Layout under a root folder (local path or any fsspec URL)::

    products/date=YYYY-MM-DD/part-0.parquet   products added or changed that day
    users/date=YYYY-MM-DD/part-0.parquet      users first seen (signed up) that day
    events/date=YYYY-MM-DD/part-0.parquet     behaviour of that day (ts inside the day, UTC)

The schemas below are the contract; ``conform`` enforces them (exact column set, types,
non-null keys) and raises ``ContractError`` naming every problem it finds.
"""

from __future__ import annotations

import datetime as dt
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

TABLES = ("products", "users", "events")
EVENT_TYPES = ("view", "add_to_cart", "purchase", "search")
UTC_TS = pa.timestamp("us", tz="UTC")

PRODUCTS = pa.schema([
    pa.field("product_id", pa.string(), nullable=False),
    pa.field("title", pa.string(), nullable=False),
    pa.field("description", pa.string()),
    pa.field("category", pa.string(), nullable=False),
    pa.field("brand", pa.string()),
    pa.field("price", pa.float64(), nullable=False),
    pa.field("image_url", pa.string()),
    pa.field("updated_at", UTC_TS, nullable=False),
])

USERS = pa.schema([
    pa.field("user_id", pa.string(), nullable=False),
    pa.field("country", pa.string()),
    pa.field("signup_date", pa.date32()),
])

EVENTS = pa.schema([
    pa.field("event_id", pa.string(), nullable=False),
    pa.field("user_id", pa.string(), nullable=False),
    # null only for search events, which carry `query` instead
    pa.field("product_id", pa.string()),
    pa.field("event_type", pa.string(), nullable=False),
    pa.field("query", pa.string()),
    pa.field("quantity", pa.int64(), nullable=False),
    pa.field("price", pa.float64()),
    pa.field("ts", UTC_TS, nullable=False),
])

SCHEMAS: dict[str, pa.Schema] = {"products": PRODUCTS, "users": USERS, "events": EVENTS}
# Columns that may be absent from an incoming file; they are added as nulls.
OPTIONAL_COLUMNS: dict[str, set[str]] = {
    "products": {"description", "brand", "image_url"},
    "users": {"country", "signup_date"},
    "events": {"query", "price"},
}
# Timestamp column that places each row inside its partition's day.
TIME_COLUMN = {"products": "updated_at", "events": "ts"}

_DATE_DIR = re.compile(r"date=(\d{4}-\d{2}-\d{2})$")


class ContractError(ValueError):
    """A frame that does not match the landing-zone contract; ``problems`` lists why."""

    def __init__(self, table: str, problems: list[str]):
        self.table = table
        self.problems = problems
        super().__init__(f"{table}: " + "; ".join(problems))


@dataclass(frozen=True)
class Interval:
    """One data interval: [start, end), UTC. The day of a daily partition."""

    start: dt.datetime
    end: dt.datetime

    @classmethod
    def for_day(cls, day: dt.date) -> Interval:
        start = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
        return cls(start, start + dt.timedelta(days=1))

    @property
    def day(self) -> dt.date:
        return self.start.date()


def parse_day(value: str | dt.date | dt.datetime) -> dt.date:
    """Accept '2024-01-31', a date or a datetime; return the date."""
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).date() if value.tzinfo else value.date()
    if isinstance(value, dt.date):
        return value
    return dt.date.fromisoformat(str(value)[:10])


def partition_dir(root: str, table: str, day: dt.date) -> str:
    _check_table(table)
    return f"{root.rstrip('/')}/{table}/date={day.isoformat()}"


def conform(df: pd.DataFrame, table: str) -> pa.Table:
    """Cast a frame to the table's contract schema.

    Args:
        df: incoming rows; optional columns may be missing.
        table: one of ``TABLES``.

    Returns:
        An arrow table with exactly the contract's columns, in order.

    Raises:
        ContractError: missing or unexpected columns, uncastable types, null keys.
    """
    _check_table(table)
    schema = SCHEMAS[table]
    problems: list[str] = []
    expected = set(schema.names)
    missing = expected - set(df.columns) - OPTIONAL_COLUMNS[table]
    extra = set(df.columns) - expected
    if missing:
        problems.append(f"missing columns {sorted(missing)}")
    if extra:
        problems.append(f"unexpected columns {sorted(extra)}")
    if problems:
        raise ContractError(table, problems)
    arrays = []
    for f in schema:
        if f.name not in df.columns:
            arrays.append(pa.nulls(len(df), f.type))
            continue
        col = df[f.name]
        try:
            if pa.types.is_timestamp(f.type):
                col = pd.to_datetime(col, utc=True)
            elif pa.types.is_date32(f.type):
                col = pd.to_datetime(col).dt.date
            arr = pa.array(col, type=f.type, from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError, TypeError) as exc:
            problems.append(f"column {f.name!r} is not {f.type}: {str(exc)[:120]}")
            continue
        if not f.nullable and arr.null_count:
            problems.append(f"column {f.name!r} has {arr.null_count} null value(s)")
        arrays.append(arr)
    if problems:
        raise ContractError(table, problems)
    return pa.Table.from_arrays(arrays, schema=schema)


def write_partition(root: str, table: str, day: dt.date, df: pd.DataFrame) -> str:
    """Write one day's partition, replacing whatever was there (reruns are idempotent).

    Rows are written in a stable order and without wall-clock metadata, so the same
    input gives the same bytes.

    Returns:
        The written file's path.
    """
    data = conform(df, table)
    key = {"products": ["product_id"], "users": ["user_id"], "events": ["ts", "event_id"]}[table]
    data = data.sort_by([(k, "ascending") for k in key])
    fs, path = fsspec.core.url_to_fs(partition_dir(root, table, day))
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.makedirs(path, exist_ok=True)
    target = f"{path}/part-0.parquet"
    buf = io.BytesIO()
    pq.write_table(data, buf, compression="zstd", write_statistics=True)
    with fs.open(target, "wb") as fh:
        fh.write(buf.getvalue())
    return target


def read_partition(root: str, table: str, day: dt.date) -> pd.DataFrame:
    """Read one day's partition, cast to the contract (raises ContractError if it isn't).

    A day with no partition folder yields an empty frame with the contract's columns.
    """
    fs, path = fsspec.core.url_to_fs(partition_dir(root, table, day))
    if not fs.exists(path):
        return SCHEMAS[table].empty_table().to_pandas()
    files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".parquet"))
    frames = []
    for f in files:
        with fs.open(f, "rb") as fh:
            frames.append(pq.read_table(fh).to_pandas())
    if not frames:
        return SCHEMAS[table].empty_table().to_pandas()
    raw = pd.concat(frames, ignore_index=True)
    return conform(raw, table).to_pandas()


def list_days(root: str, table: str) -> list[dt.date]:
    """Days that have a partition for ``table``, sorted."""
    _check_table(table)
    fs, path = fsspec.core.url_to_fs(f"{root.rstrip('/')}/{table}")
    if not fs.exists(path):
        return []
    days = []
    for entry in fs.ls(path, detail=False):
        m = _DATE_DIR.search(entry.rstrip("/"))
        if m:
            days.append(dt.date.fromisoformat(m.group(1)))
    return sorted(days)


def read_range(root: str, table: str, days: Iterable[dt.date]) -> pd.DataFrame:
    """Concatenate the partitions of the given days (missing days contribute nothing), cast
    to the contract (raises ContractError if one isn't); read as one Arrow table first
    (``read_range_table``), which costs far less time and memory than a frame per day."""
    return read_range_table(root, table, days).to_pandas()


def read_range_table(root: str, table: str, days: Iterable[dt.date],
                     columns: Sequence[str] | None = None) -> pa.Table:
    """``read_range`` as one Arrow table in the contract's schema, without pandas.

    A file already in the contract's schema (what ``write_partition`` writes) is taken as
    it is; any other is cast by ``conform`` (raising ``ContractError`` if it cannot be). For
    reading many days at once: several times faster than ``read_range``, and the caller
    converts only the rows and columns it needs.

    Args:
        columns: only these contract columns, in this order (None: all); a file in the
            contract's schema is then read for those columns only.
    """
    schema = SCHEMAS[table]
    wanted = pa.schema([schema.field(c) for c in columns]) if columns is not None else schema
    tables = []
    for day in days:
        fs, path = fsspec.core.url_to_fs(partition_dir(root, table, day))
        if not fs.exists(path):
            continue
        for name in sorted(p for p in fs.ls(path, detail=False) if p.endswith(".parquet")):
            with fs.open(name, "rb") as fh:
                file = pq.ParquetFile(fh)
                if file.schema_arrow.equals(schema):
                    data = file.read(columns=wanted.names)
                else:
                    data = conform(file.read().to_pandas(), table).select(wanted.names)
            tables.append(data)
    return pa.concat_tables(tables) if tables else wanted.empty_table()


def partition_rows(root: str, table: str, day: dt.date) -> int:
    """Rows of a day's partition, from its parquet footers (no data read); 0 if missing."""
    fs, path = fsspec.core.url_to_fs(partition_dir(root, table, day))
    if not fs.exists(path):
        return 0
    total = 0
    for name in (p for p in fs.ls(path, detail=False) if p.endswith(".parquet")):
        with fs.open(name, "rb") as fh:
            total += pq.ParquetFile(fh).metadata.num_rows
    return total


def newest_days(root: str, table: str, last_day: dt.date, max_rows: int) -> list[dt.date]:
    """The newest days up to ``last_day`` whose partitions hold at most ``max_rows`` rows
    together (whole days, at least the newest one), oldest first; every day when
    ``max_rows`` is 0."""
    days = [d for d in list_days(root, table) if d <= last_day]
    if max_rows <= 0:
        return days
    kept: list[dt.date] = []
    total = 0
    for day in reversed(days):
        total += partition_rows(root, table, day)
        if kept and total > max_rows:
            break
        kept.append(day)
    return kept[::-1]


def read_upto(root: str, table: str, last_day: dt.date) -> pd.DataFrame:
    """All partitions of ``table`` up to and including ``last_day``."""
    return read_range(root, table, [d for d in list_days(root, table) if d <= last_day])


def catalog_as_of(root: str, last_day: dt.date) -> pd.DataFrame:
    """The product catalogue as it stood at the end of ``last_day``.

    Each product's latest row (by ``updated_at``) across all product partitions so far.
    """
    products = read_upto(root, "products", last_day)
    if products.empty:
        return products
    products = products.sort_values(["product_id", "updated_at"], kind="stable")
    return products.drop_duplicates("product_id", keep="last").reset_index(drop=True)


def _check_table(table: str) -> None:
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; expected one of {TABLES}")


# The text the item tower reads, built from these catalogue columns in this order.
TEXT_COLUMNS = ("title", "category", "brand", "description")


def product_text(products: pd.DataFrame) -> list[str]:
    """The text the item tower reads for each product, in row order.

    The one definition of that rule: the feature build (``product_text`` view) and the
    text encoder both call it, so training and serving read the same text.

    Args:
        products: rows with (some of) title, category, brand, description.

    Returns:
        One "title | category | brand | description" string per row; missing or empty
        parts are left out.
    """
    import numpy as np

    columns = [
        products[c].astype("string").fillna("").str.strip().to_numpy(dtype=object)
        if c in products.columns
        else np.full(len(products), "", dtype=object)
        for c in TEXT_COLUMNS
    ]
    return [" | ".join(p for p in parts if p) for parts in zip(*columns, strict=True)]
