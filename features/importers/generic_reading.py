"""The generic importer's reading: a mapping's export files, and contract values from their columns.

``input_files`` resolves each source's files (command-line INPUTs first, else the mapping's path
or glob), ``read_source`` reads the source columns a section uses from every file, in sorted
file order, and names the mapping key of a column the file lacks. The ``*_values`` functions
turn source columns into one contract value per row (text, numbers, UTC timestamps, event
types), NA where a value is missing or unreadable, so the table builders can drop or repair
those rows by rule.
"""

from __future__ import annotations

import difflib
import glob
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from features import contract
from features.importers.generic_mapping import (
    ROW_FIELDS,
    ColumnSpec,
    ImportMapping,
    MappingError,
    SourceSpec,
    TableMapping,
)
from features.importers.generic_rules import (
    Condition,
    RowFilter,
    SequenceRule,
    condition_holds,
    evaluate_expr,
)

# CSV strings that mean "missing" unless a source's na_values replaces the list.
DEFAULT_NA_VALUES = ("", "NULL", "null", "NaN", "nan", "None")
_COMPRESSION = (".gz", ".bz2", ".zip", ".xz", ".zst")
# An ISO string that ends in a UTC offset ("Z", "+02:00", "-0500") after its time of day.
_ISO_OFFSET = r"\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?\s*(?:[Zz]|[+-]\d{2}(?::?\d{2})?)$"
# pandas holds nanoseconds: epochs outside about 1678..2261 cannot be represented.
_EPOCH_S_LIMIT = 9.2e9


def input_files(m: ImportMapping, inputs: Sequence[str]) -> dict[str, list[Path]]:
    """Files of each table that has a source: INPUT arguments first, else the mapping's path."""
    given: dict[str, list[str]] = {}
    for item in inputs:
        table, sep, rest = str(item).partition("=")
        if sep and table in contract.TABLES:
            given.setdefault(table, []).append(rest)
        else:
            given.setdefault("events", []).append(str(item))
    files: dict[str, list[Path]] = {}
    for table in contract.TABLES:
        section: TableMapping = getattr(m, table)
        if section.source is None:
            if table in given:
                raise MappingError("inputs", f"{table}= files given, but mapping.{table} has no "
                                   f"source; add mapping.{table}.source and its columns")
            continue
        if table in given:
            paths = [Path(p) for p in given[table]]
            for p in paths:
                if not p.is_file():
                    raise MappingError("inputs", f"no such file: {p}")
            files[table] = paths
            continue
        pattern = section.source.path
        if pattern is None:
            hint = "or give INPUT files on the command line" if table == "events" else \
                f"or give {table}=FILE on the command line"
            raise MappingError(f"{section.source.key}.path", f"missing: the export's path {hint}")
        full = pattern if Path(pattern).is_absolute() else str(m.base_dir / pattern)
        matches = sorted(Path(p) for p in glob.glob(full, recursive=True) if Path(p).is_file())
        if not matches:
            raise MappingError(f"{section.source.key}.path", f"no file matches {pattern!r} "
                               f"(relative to {m.base_dir})")
        files[table] = matches
    return files


def _file_format(path: Path, source: SourceSpec) -> str:
    if source.format:
        return source.format
    name = path.name.lower()
    for ext in _COMPRESSION:
        name = name.removesuffix(ext)
    if name.endswith((".csv", ".tsv", ".txt")):
        return "csv"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    raise MappingError(f"{source.key}.format", f"cannot tell the format of {path.name}; "
                       "set format: csv or parquet")


def _header(path: Path, fmt: str, source: SourceSpec) -> list[str]:
    try:
        if fmt == "parquet":
            return list(pq.read_schema(path).names)
        return list(pd.read_csv(path, nrows=0, **_csv_kwargs(path, source)).columns)
    except UnicodeDecodeError as exc:
        raise MappingError(f"{source.key}.encoding", f"{path.name} is not "
                           f"{source.csv.get('encoding', 'utf-8')}: {exc.reason}") from None
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise MappingError(source.key, f"cannot read {path.name} as {fmt}: {exc}") from None


def _csv_kwargs(path: Path, source: SourceSpec) -> dict[str, Any]:
    csv = source.csv
    tsv = path.name.lower().split(".")[-1] == "tsv" or ".tsv." in path.name.lower()
    return {
        "sep": csv.get("delimiter", "\t" if tsv else ","),
        "encoding": csv.get("encoding", "utf-8-sig"),
        "quotechar": csv.get("quotechar", '"'),
        "skiprows": csv.get("skip_rows", 0),
        "engine": "python" if len(csv.get("delimiter", ",")) > 1 else "c",
    }


def read_source(files: list[Path], source: SourceSpec, specs: Sequence[ColumnSpec | Condition],
                what: str) -> pd.DataFrame:
    """Read the columns ``specs`` (column specs and filter conditions) use from every file, in
    file order, checking they exist."""
    needed = list(dict.fromkeys(c for s in specs for c in s.source_columns()))
    frames = []
    for path in files:
        fmt = _file_format(path, source)
        header = _header(path, fmt, source)
        for spec in specs:
            for col in spec.source_columns():
                if col not in header:
                    raise MappingError(spec.key, _missing_column_message(col, path, header, what))
        try:
            if fmt == "parquet":
                frame = pd.read_parquet(path, columns=needed)
            else:
                na = list(source.csv.get("na_values", DEFAULT_NA_VALUES))
                frame = pd.read_csv(path, usecols=needed, dtype=str, keep_default_na=False,
                                    na_values=na, **_csv_kwargs(path, source))
        except UnicodeDecodeError as exc:
            raise MappingError(f"{source.key}.encoding", f"{path.name} is not "
                               f"{source.csv.get('encoding', 'utf-8')}: {exc.reason}") from None
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise MappingError(source.key, f"cannot read {path.name} as {fmt}: {exc}") from None
        frames.append(frame[needed])
    if not frames:
        return pd.DataFrame(columns=needed)
    return pd.concat(frames, ignore_index=True)


def _missing_column_message(col: str, path: Path, header: list[str], what: str) -> str:
    same_but_case = [h for h in map(str, header) if h.casefold() == col.casefold()]
    close = same_but_case or difflib.get_close_matches(col, list(map(str, header)), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    msg = (f"source column {col!r} is not in the {what} file {path.name}{hint}; "
           f"the file has: {', '.join(map(str, header))}")
    if len(header) == 1 and re.search(r"[;,\t|]", str(header[0])):
        msg += " (one column only: is the delimiter right?)"
    return msg


# --- column values -----------------------------------------------------------------------------


def _as_text(col: pd.Series) -> pd.Series:
    """Source values as stripped strings; empty becomes NA; whole floats lose their '.0'."""
    if pd.api.types.is_float_dtype(col):
        vals = col.astype("Float64")
        if bool((vals.isna() | (vals == vals.round())).all()):
            return vals.astype("Int64").astype("string")
        return vals.astype("string")
    s = col.astype("string").str.strip()
    return s.mask(s == "")


def text_values(raw: pd.DataFrame, spec: ColumnSpec) -> pd.Series:
    """One string per row (NA where a used column is empty), the default filling the gaps."""
    n = len(raw)
    if spec.value is not None:
        out = pd.Series([spec.value] * n, dtype="string")
    elif spec.column is not None:
        out = _as_text(raw[spec.column])
    elif spec.fallback is not None:
        out = pd.Series(pd.NA, index=range(n), dtype="string")
        for col in spec.fallback:  # the first non-empty value
            out = out.fillna(_as_text(raw[col]).reset_index(drop=True))
    else:
        fields = list(dict.fromkeys(f for _, f in spec.template or ()
                                    if f and f not in ROW_FIELDS))
        pieces = {f: _as_text(raw[f]) for f in fields}
        row = pd.Series(np.arange(n), dtype="int64")
        if fields:
            # position of the row among the rows sharing the template's columns (file order)
            line = pd.DataFrame(pieces).groupby(fields, dropna=False, sort=False).cumcount()
        else:
            line = row
        pieces["_row"] = row.astype("string")
        pieces["_line"] = pd.Series(line.to_numpy(), dtype="int64").astype("string")
        pieces = {k: v.reset_index(drop=True) for k, v in pieces.items()}
        out = _fill_template(spec, pieces, n)
    if spec.default is not None:
        out = out.fillna(spec.default)
    return out.reset_index(drop=True)


def _fill_template(spec: ColumnSpec, pieces: dict[str, pd.Series], n: int) -> pd.Series:
    """A template's text per row: NA where a required field is missing.

    A missing optional field (``{x?}``) is left out with the literal text just before it (when
    no field before it has a value in that row, with the text just after it instead) and, if
    it is the last field, with the text after it: ``"{brand?} {name}"`` gives ``"Acme Mug"``
    or ``"Mug"``, ``"{name} ({size?})"`` ``"Mug (large)"`` or ``"Mug"``. All missing: NA.
    """
    parts = spec.template or ()
    out = pd.Series([""] * n, dtype="string")
    if not spec.optional:  # the plain rule, and the fast path
        for literal, name in parts:
            if literal:
                out = out + literal
            if name is not None:
                out = out + pieces[name]
        return out
    missing = {i: pieces[name].isna() for i, (_, name) in enumerate(parts)
               if name is not None and i in spec.optional}
    no_value = pd.Series(False, index=range(n))
    seen = no_value.copy()  # some field before this part has a value in the row
    cut_after = no_value.copy()  # the previous field was missing with nothing before it
    prev_gone = no_value.copy()  # the previous field was missing
    for i, (literal, name) in enumerate(parts):
        gone = missing.get(i, no_value)
        if literal:
            keep = ~((gone & seen) | cut_after) if name is not None else ~prev_gone
            out = out + pd.Series(np.where(keep, literal, ""), dtype="string")
        if name is None:
            continue
        value = pieces[name].fillna("") if i in missing else pieces[name]
        out = out + value
        cut_after = gone & ~seen
        prev_gone = gone
        seen = seen | ~gone
    return out.str.strip().mask(lambda s: s == "")


def _numbers(col: pd.Series, source: SourceSpec | None) -> tuple[pd.Series, pd.Series]:
    """A source column as floats (NaN where missing or not a finite number), and which rows
    have a value at all; text is read with the source's decimal mark and thousands sign."""
    col = col.reset_index(drop=True)
    if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
        vals = col.astype("float64")
        given = col.notna()
    else:
        s = _as_text(col)
        given = s.notna()
        csv = source.csv if source else {}
        if csv.get("thousands"):
            s = s.str.replace(csv["thousands"], "", regex=False)
        if csv.get("decimal", ".") != ".":
            s = s.str.replace(csv["decimal"], ".", regex=False)
        vals = pd.to_numeric(s, errors="coerce").astype("float64")
    return vals.where(np.isfinite(vals)), given.astype(bool)


def number_values(raw: pd.DataFrame, spec: ColumnSpec, source: SourceSpec | None,
                  *, use_default: bool = True) -> tuple[pd.Series, pd.Series]:
    """Floats per row (NaN where missing) and a mask of values given but not numbers.

    A list of fallback columns takes the first that is a number; an ``expr`` is computed
    where all its columns have a value, and is bad where one is not a number or the result
    is not finite (a division by zero).
    """
    n = len(raw)
    if spec.value is not None:
        return pd.Series(float(spec.value), index=range(n)), pd.Series(False, index=range(n))
    if spec.expr is not None:
        read = {c: _numbers(raw[c], source) for c in spec.expr.columns}
        vals = evaluate_expr(spec.expr, {c: v for c, (v, _) in read.items()}, n)
        given = np.logical_and.reduce([g.to_numpy() for _, g in read.values()])
        given = pd.Series(given, index=range(n))
    elif spec.column is not None or spec.fallback is not None:
        vals = pd.Series(np.nan, index=range(n))
        given = pd.Series(False, index=range(n))
        for col in spec.fallback or (spec.column,):
            v, g = _numbers(raw[col], source)
            vals, given = vals.fillna(v), given | g
    else:  # only a default
        fill = float(spec.default) if use_default else np.nan
        return pd.Series(fill, index=range(n)), pd.Series(False, index=range(n))
    bad = given & vals.isna()
    if use_default and spec.default is not None:
        vals = vals.where(given, float(spec.default))
    return vals, bad.astype(bool)


def time_values(values: pd.Series, fmt: str, tz: str, key: str, column: str) -> pd.Series:
    """Timestamps in UTC (NaT where missing or unparsable), local times read in ``tz``."""
    values = values.reset_index(drop=True)
    if pd.api.types.is_datetime64_any_dtype(values):
        if getattr(values.dt, "tz", None) is None:
            return _localize(values, tz)
        return values.dt.tz_convert("UTC")
    numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
    if fmt in ("epoch_s", "epoch_ms"):
        nums = values.astype("float64") if numeric else pd.to_numeric(_as_text(values),
                                                                      errors="coerce")
        seconds = nums / 1000.0 if fmt == "epoch_ms" else nums
        seconds = seconds.where(seconds.abs() < _EPOCH_S_LIMIT)
        return pd.to_datetime(seconds, unit="s", utc=True, errors="coerce")
    if numeric:
        raise MappingError(key, f"source column {column!r} holds numbers; set format: epoch_s "
                           "or epoch_ms")
    text = _as_text(values)
    if fmt == "iso":
        offset = text.str.contains(_ISO_OFFSET, regex=True, na=False).astype(bool)
        aware = pd.to_datetime(text.where(offset), format="ISO8601", utc=True, errors="coerce")
        naive = pd.to_datetime(text.where(~offset), format="ISO8601", errors="coerce")
        return aware.where(offset, _localize(naive, tz))
    if "%z" in fmt:
        return pd.to_datetime(text, format=fmt, utc=True, errors="coerce")
    return _localize(pd.to_datetime(text, format=fmt, errors="coerce"), tz)


def _localize(naive: pd.Series, tz: str) -> pd.Series:
    """Read wall-clock times in ``tz`` and convert them to UTC.

    A time that a DST change skips moves forward; one that it repeats is the first (summer)
    occurrence, so every row gets one deterministic instant.
    """
    naive = pd.to_datetime(naive, errors="coerce")
    local = naive.dt.tz_localize(tz, ambiguous=np.ones(len(naive), dtype=bool),
                                 nonexistent="shift_forward")
    return local.dt.tz_convert("UTC")


def sequence_times(raw: pd.DataFrame, rule: SequenceRule, user_ids: pd.Series, key: str,
                   source: SourceSpec | None = None) -> pd.Series:
    """The sequence rule: each group's orders, in sequence order, on a synthetic calendar.

    n is the dense rank of the sequence number inside its ``per`` group (1 for the smallest).
    The n-th order lies ``offset`` days after the group's first: (n - 1) * step_days, or with
    ``gap_column`` the sum of the gaps of orders 2..n (a missing or negative gap counts as
    step_days; without step_days that order's rows get no time). The first order is on the
    group's earliest anchor date, else ``start``; with ``align_end`` the group's last order
    is on that date instead. ``hour`` adds hours of the day.
    """
    n = len(raw)
    seq = raw[rule.column].reset_index(drop=True)
    if not pd.api.types.is_numeric_dtype(seq) or pd.api.types.is_bool_dtype(seq):
        seq = pd.to_numeric(_as_text(seq), errors="coerce")
    seq = seq.astype("float64")
    group = user_ids if rule.per == "user_id" else _as_text(raw[rule.per])
    group = group.reset_index(drop=True)
    ok = seq.notna() & group.notna()
    rank = pd.Series(np.nan, index=range(n))
    rank[ok] = seq[ok].groupby(group[ok].to_numpy()).rank(method="dense").to_numpy()
    if rule.gap_column is not None:
        offset = _gap_offsets(raw, rule, group, rank, ok, source)
    else:
        offset = (rank - 1) * rule.step_days
    if rule.align_end is not None:
        last = offset.groupby(group.to_numpy()).transform("max")
        base = pd.Timestamp(rule.align_end, tz="UTC") - pd.to_timedelta(last, unit="D")
    elif rule.start is not None:
        base = pd.Series(pd.Timestamp(rule.start, tz="UTC"), index=range(n))
    else:
        base = pd.Series(pd.NaT, index=range(n), dtype="datetime64[ns, UTC]")
    if rule.anchor is not None:
        anchor = time_values(raw[rule.anchor], rule.anchor_format, "UTC", key, rule.anchor)
        anchor = anchor.dt.floor("D")
        earliest = anchor.groupby(group.to_numpy()).transform("min")
        base = earliest.where(earliest.notna(), base)
    ts = base + pd.to_timedelta(offset, unit="D")
    if rule.hour is not None:
        hour = pd.to_numeric(_as_text(raw[rule.hour]), errors="coerce")
        good = hour.between(0, 23) & (hour == hour.round())
        ts = ts + pd.to_timedelta(hour.where(good), unit="h")
    return ts


def _gap_offsets(raw: pd.DataFrame, rule: SequenceRule, group: pd.Series, rank: pd.Series,
                 ok: pd.Series, source: SourceSpec | None) -> pd.Series:
    """Days from each row's group's first order to the row's order, summing the gap column
    (whole days, rounded) over the group's orders 2..n; NaN where the order's gap is unusable
    and there is no step_days to use instead."""
    gap, _ = _numbers(raw[rule.gap_column], source)
    gap = gap.where(gap >= 0).round()
    orders = pd.DataFrame({"g": group[ok].to_numpy(), "r": rank[ok].to_numpy(),
                           "gap": gap[ok].to_numpy()})
    # one gap per order: the first its rows give
    orders = orders.groupby(["g", "r"], sort=True)["gap"].first().reset_index()
    orders.loc[orders["r"] == 1, "gap"] = 0.0
    if rule.step_days is not None:
        orders["gap"] = orders["gap"].fillna(float(rule.step_days))
    unusable = orders["gap"].isna()
    orders["offset"] = orders["gap"].fillna(0.0).groupby(orders["g"]).cumsum()
    orders.loc[unusable, "offset"] = np.nan
    rows = pd.DataFrame({"g": group.to_numpy(), "r": rank.to_numpy()})
    merged = rows.merge(orders[["g", "r", "offset"]], on=["g", "r"], how="left")
    return pd.Series(merged["offset"].to_numpy(), index=range(len(raw)))


def filter_rows(raw: pd.DataFrame, section: TableMapping) -> RowFilter:
    """Which rows a section's ``filter`` removes, and under which condition's reason.

    Every condition's reason is reported, zero or not; a row counts under the first
    condition it fails. Numbers are read with the source's decimal mark and thousands sign.
    """
    rows = RowFilter.keep_all(len(raw))
    for cond in section.filter:
        text = _as_text(raw[cond.column]).reset_index(drop=True)
        numbers, _ = _numbers(raw[cond.column], section.source)
        rows = rows.add(cond.reason, ~condition_holds(cond, text, numbers))
    return rows


def event_types(raw: pd.DataFrame, spec: ColumnSpec) -> pd.Series:
    """Contract event types per row: the constant, or the source value through the ``map``
    (without one, the value if it already is a type); NA where it is neither."""
    n = len(raw)
    if spec.value is not None:
        return pd.Series([spec.value] * n, dtype="string")
    src = _as_text(raw[spec.column])
    if spec.map is not None:
        mapped = src.map(spec.map).astype("string")
    else:
        mapped = src.where(src.isin(contract.EVENT_TYPES))
    if spec.default is not None:
        mapped = mapped.where(src.notna(), spec.default)
    return mapped.reset_index(drop=True)
