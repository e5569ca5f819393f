"""Each key's latest row of a partitioned offline table, kept in an index updated in place.

The feature build rolls each active user's ``user_recent_products`` row forward from the
user's previous one: the latest row among all partitions before the day. Re-reading those
partitions, or keeping their fold as a snapshot file that every day reads, sorts and writes
again whole (``features.running``), costs in proportion to every user the shop ever had and
every history entry they hold: at 1,000,000 users the fold was a third of a day's build and
grew with the shop's age. Here the fold lives in a SQLite file (``LatestRows``), one row per
key, so that a day reads the rows of the users it builds and writes the rows of the users it
changed, nothing else:

- ``sync(parts)`` makes the index hold exactly the fold over ``parts`` (the partitions
  before the day, oldest first, each with its stamp: ``features.running.partitions``). It
  compares them with the partitions it already folded: those that match in order are kept,
  later ones are rolled back (newest first: each folded day keeps which keys it changed and
  the day of the row each held before, and that row is read again from its partition), and
  the missing ones are folded in. A partition rewritten or removed (quarantined), or added
  before the end, is therefore noticed, as the snapshots noticed it. Rolling back further
  than ``UNDO_DAYS`` (a backfill of an old day) rebuilds the index from the partitions.
- ``rows(keys)`` reads some keys' rows (or all) as an Arrow table of the table's schema.

Each day's fold runs in one SQLite transaction, so a killed build leaves the index as it
was before that day, never half a day. The index is derived state: deleting the file costs
one rebuild. Rows are encoded exactly (strings as UTF-8 bytes with their lengths, numbers
as fixed-width bytes), so what ``rows`` returns equals what the partitions hold.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from tqdm.auto import tqdm

from features.partitions import Part

log = logging.getLogger(__name__)

FORMAT = 2  # bump when the encoding changes: an index of another format is rebuilt
UNDO_DAYS = 14  # newest folded days whose previous rows are kept (a rerun rolls back)
REBUILD_CHUNK_DAYS = 14  # partitions folded at once when (re)building from scratch


def _is_string_list(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) and pa.types.is_string(kind.value_type)


def _is_number_list(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) and (pa.types.is_integer(kind.value_type)
                                       or pa.types.is_floating(kind.value_type))


def _sql_columns(schema: pa.Schema, key: str) -> list[tuple[str, str]]:
    """(SQL column, SQL type) per encoded column, in schema order, the key excluded; a
    list of strings takes two columns (the bytes and the lengths)."""
    out: list[tuple[str, str]] = []
    for i, field in enumerate(schema):
        if field.name == key:
            continue
        kind = field.type
        if _is_string_list(kind):
            out += [(f"c{i}", "BLOB"), (f"c{i}_len", "BLOB")]
        elif _is_number_list(kind):
            out.append((f"c{i}", "BLOB"))
        elif pa.types.is_string(kind):
            out.append((f"c{i}", "TEXT"))
        elif (pa.types.is_integer(kind) or pa.types.is_timestamp(kind)
              or pa.types.is_date32(kind)):
            out.append((f"c{i}", "INTEGER"))
        elif pa.types.is_floating(kind):
            out.append((f"c{i}", "REAL"))
        else:
            raise TypeError(f"column {field.name}: {kind} cannot be indexed")
    return out


def _string_list_bytes(column: pa.ListArray) -> tuple[list[Any], list[Any]]:
    """Per row: the strings' UTF-8 bytes concatenated, and their lengths (int32 bytes);
    None for a null list."""
    values = column.values  # the whole child; the list offsets point into it
    if values.null_count:
        raise ValueError("a list holds a null string: it cannot be indexed exactly")
    buffers = values.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int32)[values.offset:
                                                        values.offset + len(values) + 1]
    data = memoryview(buffers[2]) if buffers[2] is not None else memoryview(b"")
    starts = column.offsets.to_numpy()  # (n + 1,) into values
    lengths = np.diff(offsets).astype(np.int32)  # (V,)
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    blobs: list[Any] = []
    sizes: list[Any] = []
    for i in range(len(column)):
        if not valid[i]:
            blobs.append(None)
            sizes.append(None)
            continue
        first, last = starts[i], starts[i + 1]
        blobs.append(bytes(data[offsets[first]:offsets[last]]))
        sizes.append(lengths[first:last].tobytes())
    return blobs, sizes


def _number_list_bytes(column: pa.ListArray) -> list[Any]:
    """Per row: the numbers as fixed-width bytes; None for a null list."""
    values = column.values
    if values.null_count:
        raise ValueError("a list holds a null number: it cannot be indexed exactly")
    flat = values.to_numpy(zero_copy_only=False)
    starts = column.offsets.to_numpy()
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    return [flat[starts[i]:starts[i + 1]].tobytes() if valid[i] else None
            for i in range(len(column))]


def _encode(table: pa.Table, schema: pa.Schema, key: str) -> list[tuple]:
    """Rows as SQL tuples: (key, *encoded columns), in ``_sql_columns`` order."""
    columns: list[list[Any]] = [table[key].to_pylist()]
    for field in schema:
        if field.name == key:
            continue
        column = table[field.name].combine_chunks()
        kind = field.type
        if _is_string_list(kind):
            columns.extend(_string_list_bytes(column))
        elif _is_number_list(kind):
            columns.append(_number_list_bytes(column))
        elif pa.types.is_timestamp(kind):
            columns.append(pc.cast(column, pa.int64()).to_pylist())
        elif pa.types.is_date32(kind):
            columns.append(pc.cast(column, pa.int32()).to_pylist())
        else:
            columns.append(column.to_pylist())
    return list(zip(*columns, strict=True))


def _list_array(blobs: Sequence[Any], counts: np.ndarray, values: pa.Array) -> pa.Array:
    """Lists of ``counts`` consecutive ``values`` each; null where the blob is None."""
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    null = np.array([b is None for b in blobs], dtype=bool)
    return pa.ListArray.from_arrays(pa.array(offsets), values,
                                    mask=pa.array(null) if null.any() else None)


def _decode(rows: list[tuple], schema: pa.Schema, key: str) -> pa.Table:
    """SQL tuples (``_encode``'s layout) -> an Arrow table of ``schema``."""
    columns = list(zip(*rows, strict=True)) if rows else \
        [()] * (1 + len(_sql_columns(schema, key)))
    at = 1
    arrays: dict[str, pa.Array] = {key: pa.array(columns[0], pa.string())}
    for field in schema:
        if field.name == key:
            continue
        kind = field.type
        if _is_string_list(kind):
            blobs, sizes = columns[at], columns[at + 1]
            at += 2
            lengths = np.frombuffer(b"".join(s for s in sizes if s is not None),
                                    dtype=np.int32)
            counts = np.array([0 if s is None else len(s) // 4 for s in sizes], np.int64)
            value_offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
            data = b"".join(b for b in blobs if b is not None)
            strings = pa.LargeStringArray.from_buffers(
                len(lengths), pa.py_buffer(value_offsets.astype(np.int64).tobytes()),
                pa.py_buffer(data)).cast(pa.string())
            arrays[field.name] = _list_array(blobs, counts, strings)
        elif _is_number_list(kind):
            blobs = columns[at]
            at += 1
            dtype = np.dtype(kind.value_type.to_pandas_dtype())
            flat = np.frombuffer(b"".join(b for b in blobs if b is not None), dtype=dtype)
            counts = np.array([0 if b is None else len(b) // dtype.itemsize for b in blobs],
                              np.int64)
            arrays[field.name] = _list_array(blobs, counts, pa.array(flat, kind.value_type))
        elif pa.types.is_timestamp(kind):
            arrays[field.name] = pa.array(columns[at], pa.int64()).cast(kind)
            at += 1
        elif pa.types.is_date32(kind):
            arrays[field.name] = pa.array(columns[at], pa.int32()).cast(kind)
            at += 1
        else:
            arrays[field.name] = pa.array(columns[at], kind)
            at += 1
    return pa.Table.from_arrays([arrays[f.name] for f in schema], schema=schema)


class LatestRows:
    """The latest row per key over a table's partitions, in a SQLite file (module docstring).

    Args:
        path: the index file (created with its folder).
        schema: the partitions' Arrow schema (a partition lacking a column reads it as null).
        key: the key column (a string).
        read: reads partitions into one table of ``schema``, rows in partition order
            (default: each partition's ``part-0.parquet``).
        keep_set: a column whose value, once a key has one, a later row without it (null)
            does not replace: the latest row is then the last row with that column set,
            else the last row (None: the last row).
    """

    def __init__(self, path: Path, schema: pa.Schema, key: str, *,
                 read: Callable[[Sequence[Part]], pa.Table] | None = None,
                 keep_set: str | None = None) -> None:
        self.path, self.schema, self.key, self.keep_set = path, schema, key, keep_set
        self._read_parts = read or self._read_files
        self._columns = _sql_columns(schema, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._open()
        except sqlite3.DatabaseError as exc:
            self._discard(exc)
            self._open()

    def _open(self) -> None:
        self._connect()
        if self._layout() not in (None, self._fingerprint()):
            # a new file, not dropped tables: their pages would stay in it
            log.info("%s: another layout, rebuilt from the partitions", self.path.name)
            self._db.close()
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            self._connect()
        self._setup()

    def _connect(self) -> None:
        self._db = sqlite3.connect(self.path, timeout=300, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # Derived state: no fsync (a day writes a few hundred MB). A process killed midway
        # loses nothing (WAL); a file an OS crash left corrupt is noticed and rebuilt.
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("PRAGMA temp_store=MEMORY")
        # a day's fold rewrites rows all over a large file: 256 MB of pages (SQLite's
        # default is 2 MB) measured ~15 % off a fold of 39,000 history rows at day 50
        self._db.execute("PRAGMA cache_size=-262144")

    def _fingerprint(self) -> str:
        return (f"{FORMAT}|{self.key}|{self.keep_set}|"
                f"{self.schema.to_string(show_schema_metadata=False)}")

    def _layout(self) -> str | None:
        """The layout the file was written with (None: a new file)."""
        if self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone() is None:
            return None
        found = self._db.execute("SELECT value FROM meta WHERE name = 'layout'").fetchone()
        return None if found is None else found[0]

    def _discard(self, exc: Exception) -> None:
        """Delete an index SQLite cannot read (it is rebuilt from the partitions)."""
        if type(exc) is not sqlite3.DatabaseError:  # locked, integrity...: not corruption
            raise exc
        log.warning("%s is unreadable (%s): rebuilt from the partitions", self.path, exc)
        with contextlib.suppress(Exception):
            self._db.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> LatestRows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- layout ---------------------------------------------------------------------------

    def _setup(self) -> None:
        cols = ", ".join(f"{name} {kind}" for name, kind in self._columns)
        with self._transaction():
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)")
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('layout', ?)",
                             (self._fingerprint(),))
            self._db.execute(f"CREATE TABLE IF NOT EXISTS latest (k TEXT PRIMARY KEY, day TEXT, "
                             f"{cols})")
            # undo: the keys a folded day changed and the partition day of the row each held
            # before (NULL: none); the rows themselves are in those partitions (copies of
            # them made the file twice as large and every day's fold twice as slow)
            self._db.execute("CREATE TABLE IF NOT EXISTS undo (day TEXT, k TEXT, prev_day TEXT, "
                             "PRIMARY KEY (day, k))")
            self._db.execute("CREATE TABLE IF NOT EXISTS folded (day TEXT PRIMARY KEY, "
                             "stamp TEXT, undo INTEGER)")

    @contextlib.contextmanager
    def _transaction(self, mode: str = "IMMEDIATE") -> Iterator[None]:
        self._db.execute(f"BEGIN {mode}")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # --- sync -----------------------------------------------------------------------------

    def folded(self) -> list[tuple[str, str, bool]]:
        """(day, stamp, undo kept) of the partitions the index holds, oldest first."""
        return [(d, s, bool(u)) for d, s, u in
                self._db.execute("SELECT day, stamp, undo FROM folded ORDER BY day")]

    def sync(self, parts: Sequence[Part]) -> dict[str, int]:
        """Make the index the fold over ``parts`` (oldest first).

        Returns:
            How many folded days were kept, rolled back and folded in, and whether the
            index was rebuilt (1) or not (0).
        """
        try:
            return self._sync(parts)
        except sqlite3.DatabaseError as exc:
            self._discard(exc)
            self._open()
            return self._sync(parts)

    def _sync(self, parts: Sequence[Part]) -> dict[str, int]:
        wanted = [(p.day.isoformat(), p.stamp) for p in parts]
        held = self.folded()
        same = 0
        while same < min(len(held), len(wanted)) and held[same][:2] == wanted[same]:
            same += 1
        extra = held[same:]  # folded days to roll back, oldest first
        rebuilt = any(not undo for _, _, undo in extra)
        if rebuilt:
            with self._transaction():
                for table in ("latest", "undo", "folded"):
                    self._db.execute(f"DELETE FROM {table}")
            same = 0
        else:
            kept = {p.day.isoformat(): p for p in parts[:same]}
            rolling = {day for day, _, _ in extra}
            for day, _, _ in reversed(extra):
                self._roll_back(day, kept, rolling)
        todo = list(parts[same:])
        bulk = todo[:max(0, len(todo) - UNDO_DAYS)]  # too old to be rolled back to
        chunks = [bulk[i:i + REBUILD_CHUNK_DAYS] for i in range(0, len(bulk), REBUILD_CHUNK_DAYS)]
        steps = [(chunk, False) for chunk in chunks] + [([p], True) for p in todo[len(bulk):]]
        for chunk, keep_undo in tqdm(steps, desc=f"index {self.path.stem}", unit="step",
                                     disable=len(steps) < 3):
            self._fold(chunk, keep_undo)
        self._prune_undo()
        figures = {"kept": same, "rolled_back": 0 if rebuilt else len(extra),
                   "folded": len(todo), "rebuilt": int(rebuilt)}
        log.info("%s: %s", self.path.name, figures)
        return figures

    def _read_files(self, parts: Sequence[Part]) -> pa.Table:
        files = [f"{p.path}/part-0.parquet" for p in parts]
        return pads.dataset(files, schema=self.schema, format="parquet").to_table()

    def _read(self, parts: Sequence[Part]) -> tuple[pa.Table, list[str]]:
        """The row of each key that folding ``parts`` one by one keeps (the last; with
        ``keep_set``: the last with it set, else the last), and the day of its partition."""
        tables = [self._read_parts([p]) for p in parts]
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        days = np.repeat(np.array([p.day.isoformat() for p in parts], dtype=object),
                         [t.num_rows for t in tables])
        order = pd.DataFrame({
            "k": table[self.key].to_numpy(zero_copy_only=False),
            "set": (table[self.keep_set].is_valid().to_numpy(zero_copy_only=False)
                    if self.keep_set else True)})
        last = np.sort(order.sort_values("set", kind="stable")
                       .drop_duplicates("k", keep="last").index.to_numpy())
        return table.take(pa.array(last)), days[last].tolist()

    def _fold(self, parts: Sequence[Part], keep_undo: bool) -> None:
        table, days = self._read(parts)
        rows = _encode(table, self.schema, self.key)
        names = ", ".join(name for name, _ in self._columns)
        marks = ", ".join("?" for _ in range(len(self._columns) + 2))
        with self._transaction():
            if keep_undo:
                self._db.execute("CREATE TEMP TABLE IF NOT EXISTS touched (k TEXT PRIMARY KEY)")
                self._db.execute("DELETE FROM touched")
                self._db.executemany("INSERT OR IGNORE INTO touched VALUES (?)",
                                     ((r[0],) for r in rows))
                self._db.execute("INSERT INTO undo SELECT ?, t.k, l.day FROM touched t "
                                 "LEFT JOIN latest l ON l.k = t.k", (parts[-1].day.isoformat(),))
            self._db.executemany(self._upsert(names, marks),
                                 ((r[0], d, *r[1:]) for r, d in zip(rows, days, strict=True)))
            self._db.executemany("INSERT INTO folded VALUES (?, ?, ?)",
                                 ((p.day.isoformat(), p.stamp, int(keep_undo)) for p in parts))

    def _upsert(self, names: str, marks: str) -> str:
        """The statement that folds one row into ``latest`` (``keep_set``'s rule)."""
        update = ", ".join(f"{n} = excluded.{n}" for n in ["day", *names.split(", ")])
        sql = f"INSERT INTO latest (k, day, {names}) VALUES ({marks}) ON CONFLICT (k) " \
              f"DO UPDATE SET {update}"
        if self.keep_set is None:
            return sql
        column = f"c{self.schema.get_field_index(self.keep_set)}"  # _sql_columns' name
        return f"{sql} WHERE excluded.{column} IS NOT NULL OR latest.{column} IS NULL"

    def _roll_back(self, day: str, kept: dict[str, Part], rolling: set[str]) -> None:
        """Undo the fold of ``day``: its keys get back the row they held before, read again
        from that row's partition (``kept``: the folded partitions that stay). A key whose
        row before came from a day also being rolled back (``rolling``) is left out here:
        that day's own roll-back, later, restores it."""
        before = self._db.execute("SELECT k, prev_day FROM undo WHERE day = ?",
                                  (day,)).fetchall()
        wanted: dict[str, list[str]] = {}
        for key, prev in before:
            if prev is not None and prev not in rolling:
                wanted.setdefault(prev, []).append(key)
        missing = sorted(set(wanted) - set(kept))
        if missing:  # cannot happen unless the file was edited: start again
            raise sqlite3.DatabaseError(f"rows of {missing} to roll {day} back to are gone")
        restored = []
        for prev, keys in sorted(wanted.items()):
            table, _ = self._read([kept[prev]])
            table = table.filter(pc.is_in(table[self.key], value_set=pa.array(keys, pa.string())))
            restored += [(r[0], prev, *r[1:]) for r in _encode(table, self.schema, self.key)]
        names = ", ".join(name for name, _ in self._columns)
        marks = ", ".join("?" for _ in range(len(self._columns) + 2))
        with self._transaction():
            self._db.execute("DELETE FROM latest WHERE k IN (SELECT k FROM undo WHERE day = ?)",
                             (day,))
            self._db.executemany(f"INSERT INTO latest (k, day, {names}) VALUES ({marks})",
                                 restored)
            self._db.execute("DELETE FROM undo WHERE day = ?", (day,))
            self._db.execute("DELETE FROM folded WHERE day = ?", (day,))

    def _prune_undo(self) -> None:
        """Keep the previous rows of the newest ``UNDO_DAYS`` folded days only."""
        days = [d for d, _, undo in self.folded() if undo]
        if len(days) <= UNDO_DAYS:
            return
        cut = days[-UNDO_DAYS]
        with self._transaction():
            self._db.execute("DELETE FROM undo WHERE day < ?", (cut,))
            self._db.execute("UPDATE folded SET undo = 0 WHERE day < ?", (cut,))

    # --- reads ----------------------------------------------------------------------------

    def rows(self, keys: Sequence[str] | None = None) -> pa.Table:
        """The latest rows of ``keys`` (None: every key), sorted by key; keys the index
        does not hold are left out."""
        names = ", ".join("l." + name for name, _ in self._columns)
        if keys is None:
            found = self._db.execute(f"SELECT l.k, {names} FROM latest l ORDER BY l.k").fetchall()
        else:  # a temporary table only: no lock on the index while reading
            with self._transaction("DEFERRED"):
                self._db.execute("CREATE TEMP TABLE IF NOT EXISTS wanted (k TEXT PRIMARY KEY)")
                self._db.execute("DELETE FROM wanted")
                self._db.executemany("INSERT OR IGNORE INTO wanted VALUES (?)",
                                     ((k,) for k in keys))
                found = self._db.execute(f"SELECT l.k, {names} FROM wanted w "
                                         f"JOIN latest l ON l.k = w.k ORDER BY l.k").fetchall()
        return _decode(found, self.schema, self.key)
