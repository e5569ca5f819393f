"""Import any shop's CSV or parquet export into the landing-zone contract, through a YAML mapping.

The mapping (format and examples in ``docs/importing.md``) says where the export's files are
and how each contract column is made from their columns. ``load_mapping`` checks it without
reading any data and raises ``MappingError`` naming the YAML path of the bad key;
``import_generic`` reads the files, drops the rows that break the contract and writes each UTC
day that has events as ``events``, ``products`` and ``users`` partitions (all three, empty
frames allowed) through ``contract.write_partition``: same files and mapping, same bytes.

Event rows are checked in this order; a dropped row counts under the FIRST reason that applies
(``DROP_REASONS``):

1. ``missing_event_id``        the id (or a column its template uses) is empty.
2. ``missing_user_id``         the user id (or a column its template uses) is empty.
3. ``unmapped_event_type``     the type is not a key of the mapping's ``map`` (without a
                               map: not one of ``contract.EVENT_TYPES``).
4. ``missing_product_id``      a non-search event without a product.
5. ``missing_query``           a search event without a query.
6. ``unparsable_timestamp``    ts missing or not in the mapped format; for the sequence rule,
                               no usable sequence number, anchor date or hour.
7. ``non_positive_quantity``   a purchase whose quantity is not a whole number >= 1.
8. ``non_positive_price``      a purchase whose price is given but not a number > 0.
9. ``duplicate_event_id``      an id already taken by an earlier kept row (file order).
10. ``product_not_in_catalog`` its product could not be written to the catalogue (no title
                               or price from the products file, the events or a default).

Other event types keep their row: a bad quantity becomes 1, a bad price becomes null (on a
view or a cart add they are informational; the contract needs quantity >= 1).

Products and users come from their own source files when the mapping has one, else they are
derived from the kept events (one row per product or user, on the day of its first event).
Only days with events are written (a shop day without events is not a valid partition): a
product enters the catalogue on the day of its first event or of its earliest ``updated_at``,
whichever is first, and a user on the day of their first event or sign-up, whichever is first;
a date without events moves to the next day that has some (``updated_at`` then 00:00 UTC).
"""

from __future__ import annotations

import codecs
import datetime as dt
import difflib
import glob
import hashlib
import hmac
import os
import re
import string
import zoneinfo
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from tqdm.auto import tqdm

from features import contract

DROP_REASONS = (
    "missing_event_id",
    "missing_user_id",
    "unmapped_event_type",
    "missing_product_id",
    "missing_query",
    "unparsable_timestamp",
    "non_positive_quantity",
    "non_positive_price",
    "duplicate_event_id",
    "product_not_in_catalog",
)
PRODUCT_DROP_REASONS = (
    "missing_product_id",
    "missing_title",
    "unparsable_timestamp",
    "missing_price",
    "no_event_day",
    "duplicate_product_id",
)
DERIVED_PRODUCT_DROP_REASONS = ("missing_price",)
USER_DROP_REASONS = ("missing_user_id", "duplicate_user_id", "no_event_day")

TIME_FORMATS = ("iso", "epoch_s", "epoch_ms")
ID_SALT_ENV = "SHOPREC_ID_SALT"
DEFAULT_CATEGORY = "unknown"
DEFAULT_NA_VALUES = ("", "NULL", "null", "NaN", "nan", "None")

# What each contract column is, which decides the options it takes.
COLUMN_KINDS: dict[str, dict[str, str]] = {
    "events": {
        "event_id": "id", "user_id": "id", "product_id": "id", "event_type": "event_type",
        "query": "text", "quantity": "quantity", "price": "price", "ts": "time",
    },
    "products": {
        "product_id": "id", "title": "text", "description": "text", "category": "text",
        "brand": "text", "price": "price", "image_url": "text", "updated_at": "time",
    },
    "users": {"user_id": "id", "country": "text", "signup_date": "date"},
}
# Needed whenever the section reads its own source (events always do).
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "events": ("event_id", "user_id", "product_id", "event_type", "ts"),
    "products": ("product_id", "title"),
    "users": ("user_id",),
}
# Without a source, products and users are made from events, which give these.
_FROM_EVENTS = {"products": ("product_id", "updated_at"), "users": ("user_id",)}
_SEQUENCE_KEYS = ("from_sequence", "per", "start", "step_days", "anchor", "anchor_format", "hour")
_KIND_OPTIONS: dict[str, tuple[str, ...]] = {
    "id": ("column", "value", "template", "concat", "sep", "default"),
    "text": ("column", "value", "template", "concat", "sep", "default"),
    "event_type": ("column", "value", "map", "default"),
    "quantity": ("column", "value", "default"),
    "price": ("column", "value", "default"),
    "time": ("column", "format", "timezone", *_SEQUENCE_KEYS),
    "date": ("column", "format"),
}
_CSV_OPTIONS = ("delimiter", "encoding", "decimal", "thousands", "quotechar", "na_values",
                "skip_rows")
_SOURCE_KEYS = ("path", "format", *_CSV_OPTIONS)
_TOP_KEYS = ("version", "name", "hash_user_id", "id_salt", "events", "products", "users")
_ROW_FIELDS = ("_row", "_line")  # template fields that are not source columns
_STRFTIME_CODES = frozenset("aAbBcdfGHIjmMpSuUVwWxXyYzZ%")
_COMPRESSION = (".gz", ".bz2", ".zip", ".xz", ".zst")
# An ISO string that ends in a UTC offset ("Z", "+02:00", "-0500") after its time of day.
_ISO_OFFSET = r"\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?\s*(?:[Zz]|[+-]\d{2}(?::?\d{2})?)$"
# pandas holds nanoseconds: epochs outside about 1678..2261 cannot be represented.
_EPOCH_S_LIMIT = 9.2e9

# Source-column words that mark a direct identifier (kind -> words). Long words match inside
# a name token ("customerEmail", "e_mail_address"), short ones only as a whole token.
_DIRECT_ID_WORDS = {
    "email": ("mail",),
    "phone number": ("phone", "mobile", "telephone"),
    "name": ("name",),
    "address": ("addr", "street"),
}
_DIRECT_ID_TOKENS = {"tel": "phone number", "fax": "phone number", "cell": "phone number"}
_EMAIL_VALUE = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_PHONE_VALUE = re.compile(r"\+\d[\d\s().\-/]{5,}\d")


class MappingError(ValueError):
    """A mapping (or an input) that cannot be imported; ``key`` is the YAML path of the bad key."""

    def __init__(self, key: str, problem: str):
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}")


class DirectIdentifierError(MappingError):
    """user_id would carry an email, phone number, name or address; refused without hashing."""


@dataclass(frozen=True)
class SequenceRule:
    """Synthetic timestamps from an order sequence number (see ``docs/importing.md``)."""

    column: str
    per: str
    start: dt.date | None
    step_days: int
    anchor: str | None
    anchor_format: str
    hour: str | None


@dataclass(frozen=True)
class ColumnSpec:
    """How one contract column is made from source columns; ``key`` is its YAML path."""

    key: str
    column: str | None = None
    value: Any = None
    template: tuple[tuple[str, str | None], ...] | None = None  # (literal, field) pairs
    map: dict[str, str] | None = None
    default: Any = None
    format: str = "iso"
    timezone: str = "UTC"
    sequence: SequenceRule | None = None

    def source_columns(self) -> list[str]:
        """Source columns this spec reads (``_row``/``_line`` and ``per: user_id`` excluded)."""
        cols = [self.column] if self.column else []
        cols += [f for _, f in self.template or () if f and f not in _ROW_FIELDS]
        if self.sequence:
            rule = self.sequence
            cols += [rule.column, *(c for c in (rule.anchor, rule.hour) if c)]
            if rule.per != "user_id":
                cols.append(rule.per)
        return list(dict.fromkeys(cols))


@dataclass(frozen=True)
class SourceSpec:
    """Where a section's rows come from: a path or glob and how to read it."""

    key: str
    path: str | None
    format: str | None
    csv: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TableMapping:
    """One table's section: its source (None: derived from events) and its columns."""

    table: str
    source: SourceSpec | None
    columns: dict[str, ColumnSpec]


@dataclass(frozen=True)
class ImportMapping:
    """A checked mapping file."""

    name: str
    base_dir: Path
    events: TableMapping
    products: TableMapping
    users: TableMapping
    hash_user_id: bool
    id_salt: str | None


@dataclass(frozen=True)
class SourceReport:
    """Rows one source (or a derivation from events) offered, kept and dropped by reason."""

    label: str
    rows_in: int
    rows_kept: int
    dropped: dict[str, int]  # reason -> rows, every reason of the source kind, in order


@dataclass(frozen=True)
class ImportReport:
    """What ``import_generic`` read, kept, dropped and wrote."""

    name: str
    root: str
    sources: tuple[SourceReport, ...]  # events first
    days: int
    first_day: dt.date | None
    last_day: dt.date | None
    users: int
    products: int
    events: int

    @property
    def rows_in(self) -> int:
        return self.sources[0].rows_in

    @property
    def rows_kept(self) -> int:
        return self.sources[0].rows_kept

    @property
    def dropped(self) -> dict[str, int]:
        return self.sources[0].dropped

    def source(self, label: str) -> SourceReport | None:
        """The report of one source by label ("events", "products", "users from events"...)."""
        return next((s for s in self.sources if s.label == label), None)

    def __str__(self) -> str:
        lines = [f"Generic import {self.name!r}:"]
        for s in self.sources:
            share = s.rows_kept / s.rows_in if s.rows_in else 0.0
            lines.append(f"  {s.label}: {s.rows_in:,} rows in, {s.rows_kept:,} kept ({share:.1%}), "
                         f"{s.rows_in - s.rows_kept:,} dropped")
            width = max((len(r) for r in s.dropped), default=0)
            lines += [f"    dropped {r:<{width}}  {n:>9,}" for r, n in s.dropped.items()]
        span = f" ({self.first_day}..{self.last_day})" if self.first_day else ""
        lines.append(f"wrote {self.days:,} days{span}: {self.events:,} events, {self.users:,} "
                     f"users, {self.products:,} products under {self.root}")
        return "\n".join(lines)


# --- the mapping -------------------------------------------------------------------------------


def load_mapping(path: str | Path) -> ImportMapping:
    """Read and check a mapping file (no data is read).

    Args:
        path: the YAML mapping; relative source paths in it are relative to its folder.

    Returns:
        The checked mapping.

    Raises:
        MappingError: the file is unreadable, not YAML, or a key is wrong (named by its path).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise MappingError("mapping", f"cannot read {p}: {exc.strerror or exc}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MappingError("mapping", f"{p} is not valid YAML: {exc}") from None
    return parse_mapping(doc, base_dir=p.resolve().parent, default_name=p.stem)


def parse_mapping(doc: Any, base_dir: Path, default_name: str = "mapping") -> ImportMapping:
    """Check a mapping already parsed from YAML.

    Args:
        doc: the YAML document.
        base_dir: folder that relative source paths are relative to.
        default_name: the import's name when the mapping has no ``name``.

    Returns:
        The checked mapping.

    Raises:
        MappingError: a key is unknown, missing or has a bad value (named by its YAML path).
    """
    if not isinstance(doc, dict):
        raise MappingError("mapping", "expected a YAML mapping with at least an 'events' section")
    _check_keys(doc, _TOP_KEYS, "mapping", "key")
    if doc.get("version", 1) != 1:
        raise MappingError("mapping.version", f"unsupported version {doc['version']!r}; "
                           "this importer reads version 1")
    name = doc.get("name", default_name)
    if not isinstance(name, str) or not name.strip():
        raise MappingError("mapping.name", "expected a non-empty string")
    hash_user_id = doc.get("hash_user_id", False)
    if not isinstance(hash_user_id, bool):
        raise MappingError("mapping.hash_user_id", f"expected true or false, got {hash_user_id!r}")
    salt = doc.get("id_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise MappingError("mapping.id_salt", "expected a non-empty string")
    if doc.get("events") is None:
        raise MappingError("mapping.events", "missing: every import needs an events section")
    sections = {t: _parse_section(doc.get(t), t) for t in contract.TABLES}
    if not hash_user_id:
        for table in ("events", "users"):
            spec = sections[table].columns.get("user_id")
            if spec is not None:
                _refuse_direct_identifier_columns(spec)
    if "price" not in sections["events"].columns and "price" not in sections["products"].columns:
        raise MappingError("mapping.products.columns.price", "missing: the events carry no price "
                           "and every product needs one; map a price column or give "
                           "{default: PRICE}")
    return ImportMapping(
        name=name.strip(), base_dir=base_dir, events=sections["events"],
        products=sections["products"], users=sections["users"], hash_user_id=hash_user_id,
        id_salt=salt,
    )


def _check_keys(node: dict, allowed: Iterable[str], key: str, what: str) -> None:
    allowed = tuple(allowed)
    for k in node:
        if k not in allowed:
            close = difflib.get_close_matches(str(k), allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise MappingError(f"{key}.{k}", f"unknown {what}; {hint}expected one of "
                               f"{', '.join(allowed)}")


def _parse_section(node: Any, table: str) -> TableMapping:
    key = f"mapping.{table}"
    node = {} if node is None else node
    if not isinstance(node, dict):
        raise MappingError(key, "expected a mapping with 'source' and 'columns'")
    _check_keys(node, ("source", "columns"), key, "key")
    if table == "events" or "source" in node:
        source: SourceSpec | None = _parse_source(node.get("source"), f"{key}.source")
    else:
        source = None
    cols_node = node.get("columns") or {}
    if not isinstance(cols_node, dict):
        raise MappingError(f"{key}.columns", "expected a mapping of contract column -> source")
    kinds = COLUMN_KINDS[table]
    columns: dict[str, ColumnSpec] = {}
    for name, spec in cols_node.items():
        ckey = f"{key}.columns.{name}"
        if name not in kinds:
            close = difflib.get_close_matches(str(name), list(kinds), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise MappingError(ckey, f"unknown contract column for {table}; {hint}"
                               f"{table} has {', '.join(kinds)}")
        if source is None and name in _FROM_EVENTS.get(table, ()):
            raise MappingError(ckey, f"{table} without a source are derived from events, which "
                               f"give {name}; remove it or add {key}.source")
        if kinds[name] == "time" and not (table == "events" and name == "ts"):
            spec = _no_sequence(spec, ckey)
        columns[name] = _parse_column(spec, kinds[name], ckey)
    if source is not None:
        for name in REQUIRED_COLUMNS[table]:
            if name not in columns:
                raise MappingError(f"{key}.columns.{name}", f"missing: {table} need a mapping "
                                   f"for {name!r} (a source column, or value/template/concat)")
    return TableMapping(table, source, columns)


def _no_sequence(spec: Any, key: str) -> Any:
    if isinstance(spec, dict):
        for k in _SEQUENCE_KEYS:
            if k in spec:
                raise MappingError(f"{key}.{k}", "the sequence rule only makes events.ts")
    return spec


def _parse_source(node: Any, key: str) -> SourceSpec:
    if node is None:
        node = {}
    if isinstance(node, str):
        node = {"path": node}
    if not isinstance(node, dict):
        raise MappingError(key, "expected a path or a mapping with path, format and CSV options")
    _check_keys(node, _SOURCE_KEYS, key, "source option")
    path = node.get("path")
    if path is not None and (not isinstance(path, str) or not path.strip()):
        raise MappingError(f"{key}.path", "expected a file path or glob")
    fmt = node.get("format")
    if fmt is not None and fmt not in ("csv", "parquet"):
        raise MappingError(f"{key}.format", f"unknown format {fmt!r}; expected csv or parquet")
    csv = {k: node[k] for k in _CSV_OPTIONS if k in node}
    if fmt == "parquet" and csv:
        raise MappingError(f"{key}.{next(iter(csv))}", "a CSV option, but format is parquet")
    for k in ("delimiter", "decimal", "thousands", "quotechar", "encoding"):
        if k in csv and (not isinstance(csv[k], str) or not csv[k]):
            raise MappingError(f"{key}.{k}", f"expected a non-empty string, got {csv[k]!r}")
    for k in ("decimal", "thousands", "quotechar"):
        if k in csv and len(csv[k]) != 1:
            raise MappingError(f"{key}.{k}", f"expected one character, got {csv[k]!r}")
    if "encoding" in csv:
        try:
            codecs.lookup(csv["encoding"])
        except LookupError:
            raise MappingError(f"{key}.encoding", f"unknown encoding {csv['encoding']!r}") from None
    if "na_values" in csv and (not isinstance(csv["na_values"], list)
                               or not all(isinstance(v, str) for v in csv["na_values"])):
        raise MappingError(f"{key}.na_values", "expected a list of strings")
    skip = csv.get("skip_rows", 0)
    if not isinstance(skip, int) or isinstance(skip, bool) or skip < 0:
        raise MappingError(f"{key}.skip_rows", f"expected a whole number >= 0, got {skip!r}")
    return SourceSpec(key, path.strip() if path else None, fmt, csv)


def _parse_column(spec: Any, kind: str, key: str) -> ColumnSpec:
    if isinstance(spec, str):
        spec = {"column": spec}
    if not isinstance(spec, dict):
        raise MappingError(key, f"expected a source column name or a mapping of options "
                           f"({', '.join(_KIND_OPTIONS[kind])}), got {spec!r}")
    _check_keys(spec, _KIND_OPTIONS[kind], key, "option")
    if kind == "time" and "from_sequence" in spec:
        return ColumnSpec(key, sequence=_parse_sequence(spec, key))
    if kind == "time" and any(k in spec for k in _SEQUENCE_KEYS):
        k = next(k for k in _SEQUENCE_KEYS if k in spec)
        raise MappingError(f"{key}.{k}", "only with from_sequence (the sequence-number rule)")
    given = [k for k in ("column", "value", "template", "concat") if k in spec]
    # a price may be only a default: "no such column; use the median event price, else this"
    price_default_only = kind == "price" and not given and "default" in spec
    if len(given) != 1 and not price_default_only:
        allowed = [k for k in ("column", "value", "template", "concat") if k in _KIND_OPTIONS[kind]]
        if kind == "time":
            allowed.append("from_sequence")
        what = "none" if not given else " and ".join(given)
        raise MappingError(key, f"give exactly one of {', '.join(allowed)} (got {what})")
    column = spec.get("column")
    if column is not None and (not isinstance(column, str) or not column):
        raise MappingError(f"{key}.column", f"expected a source column name, got {column!r}")
    template = None
    if "template" in spec:
        template = _parse_template(spec["template"], f"{key}.template")
    elif "concat" in spec:
        template = _parse_concat(spec["concat"], spec.get("sep", "-"), key)
    elif "sep" in spec:
        raise MappingError(f"{key}.sep", "only with concat")
    value = _checked_value(spec["value"], kind, f"{key}.value") if "value" in spec else None
    default = (_checked_value(spec["default"], kind, f"{key}.default")
               if spec.get("default") is not None else None)
    mapping = None
    if "map" in spec:
        mapping = _parse_event_map(spec["map"], column, f"{key}.map")
    fmt = spec.get("format", "iso")
    if kind in ("time", "date"):
        _check_time_format(fmt, key, "format")
    tz = spec.get("timezone", "UTC")
    if kind == "time":
        _check_timezone(tz, key)
        if "timezone" in spec and fmt in ("epoch_s", "epoch_ms"):
            raise MappingError(f"{key}.timezone", "epoch times are UTC by definition; remove it")
    return ColumnSpec(key, column=column, value=value, template=template, map=mapping,
                      default=default, format=fmt, timezone=tz)


def _checked_value(value: Any, kind: str, key: str) -> Any:
    """A constant or default, checked against the column's kind."""
    if kind == "event_type":
        if value not in contract.EVENT_TYPES:
            raise MappingError(key, f"{value!r} is not an event type; expected one of "
                               f"{', '.join(contract.EVENT_TYPES)}")
        return value
    if kind == "quantity":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MappingError(key, f"expected a whole number >= 1, got {value!r}")
        return value
    if kind == "price":
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise MappingError(key, f"expected a number > 0, got {value!r}")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, str | int | float) or str(value) == "":
        raise MappingError(key, f"expected a non-empty string, got {value!r}")
    return str(value)


def _parse_template(text: Any, key: str) -> tuple[tuple[str, str | None], ...]:
    if not isinstance(text, str) or not text:
        raise MappingError(key, "expected a string like '{order_id}-{_line}'")
    parts: list[tuple[str, str | None]] = []
    try:
        for literal, name, spec, conversion in string.Formatter().parse(text):
            if name is not None and not name:
                raise MappingError(key, "empty {} in template; name a source column in the braces")
            if spec or conversion:
                raise MappingError(key, f"format specs are not supported ({{{name}:{spec}}}); "
                                   "use {column} as it is")
            parts.append((literal, name))
    except ValueError as exc:
        if isinstance(exc, MappingError):
            raise
        raise MappingError(key, f"bad template {text!r}: {exc}") from None
    if not any(name for _, name in parts):
        raise MappingError(key, "the template uses no column; use value: for a constant")
    return tuple(parts)


def _parse_concat(cols: Any, sep: Any, key: str) -> tuple[tuple[str, str | None], ...]:
    if (not isinstance(cols, list) or not cols
            or not all(isinstance(c, str) and c for c in cols)):
        raise MappingError(f"{key}.concat", "expected a list of source column names")
    if not isinstance(sep, str):
        raise MappingError(f"{key}.sep", f"expected a string, got {sep!r}")
    return tuple(("" if i == 0 else sep, c) for i, c in enumerate(cols))


def _parse_event_map(node: Any, column: str | None, key: str) -> dict[str, str]:
    if column is None:
        raise MappingError(key, "map needs column: (the source column whose values it maps)")
    if not isinstance(node, dict) or not node:
        raise MappingError(key, "expected a mapping of source value -> event type")
    out = {}
    for src, target in node.items():
        if target not in contract.EVENT_TYPES:
            raise MappingError(f"{key}.{src}", f"{target!r} is not an event type; expected one "
                               f"of {', '.join(contract.EVENT_TYPES)}")
        out[str(src).strip()] = target
    return out


def _check_time_format(fmt: Any, key: str, option: str) -> None:
    # reported on the column's key: "mapping.events.columns.ts: unknown format 'dd/mm'"
    if not isinstance(fmt, str):
        raise MappingError(key, f"unknown {option} {fmt!r}")
    if fmt in TIME_FORMATS:
        return
    codes = re.findall(r"%(.)", fmt)
    if not codes:
        raise MappingError(key, f"unknown {option} {fmt!r}; expected iso, epoch_s, epoch_ms or "
                           "a strftime format like '%d/%m/%Y %H:%M'")
    bad = [c for c in codes if c not in _STRFTIME_CODES]
    if bad:
        raise MappingError(key, f"unknown {option} {fmt!r}: no directive %{bad[0]}")


def _check_timezone(tz: Any, key: str) -> None:
    try:
        if not isinstance(tz, str) or not tz:
            raise ValueError
        zoneinfo.ZoneInfo(tz)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise MappingError(key, f"unknown timezone {tz!r}; expected an IANA name like "
                           "'Europe/Berlin' or 'UTC'") from None


def _parse_sequence(spec: dict, key: str) -> SequenceRule:
    for k in ("column", "format", "timezone"):
        if k in spec:
            raise MappingError(f"{key}.{k}", "not with from_sequence: the rule makes the times")
    names = {}
    for k in ("from_sequence", "per", "anchor", "hour"):
        v = spec.get(k)
        if v is not None and (not isinstance(v, str) or not v):
            raise MappingError(f"{key}.{k}", f"expected a source column name, got {v!r}")
        names[k] = v
    start = spec.get("start")
    if start is not None:
        if isinstance(start, dt.datetime):
            start = start.date()
        elif not isinstance(start, dt.date):
            try:
                start = dt.date.fromisoformat(str(start))
            except ValueError:
                raise MappingError(f"{key}.start", f"{start!r} is not a date (YYYY-MM-DD)") from None
    step = spec.get("step_days")
    if step is None:
        raise MappingError(f"{key}.step_days", "missing: days between a user's consecutive orders")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise MappingError(f"{key}.step_days", f"expected a whole number >= 1, got {step!r}")
    anchor_format = spec.get("anchor_format", "iso")
    _check_time_format(anchor_format, key, "anchor_format")
    if start is None and names["anchor"] is None:
        raise MappingError(f"{key}.start", "missing: the rule needs start (a date) or anchor "
                           "(a signup-date column), or both")
    return SequenceRule(
        column=names["from_sequence"], per=names["per"] or "user_id", start=start, step_days=step,
        anchor=names["anchor"], anchor_format=anchor_format, hour=names["hour"],
    )


def _direct_identifier_kind(column: str) -> str | None:
    """What kind of direct identifier a source column's name suggests, if any."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", column)
    tokens = [t for t in re.split(r"[^a-z0-9]+", spaced.lower()) if t]
    for token in tokens:
        if token in _DIRECT_ID_TOKENS:
            return _DIRECT_ID_TOKENS[token]
        for kind, words in _DIRECT_ID_WORDS.items():
            if any(w in token for w in words):
                return kind
    return None


def _refuse_direct_identifier_columns(spec: ColumnSpec) -> None:
    for col in spec.source_columns():
        kind = _direct_identifier_kind(col)
        if kind:
            raise DirectIdentifierError(
                spec.key, f"source column {col!r} looks like a direct identifier ({kind}); "
                "user ids must not carry it. Set hash_user_id: true (salt in "
                f"${ID_SALT_ENV} or id_salt) to import salted SHA-256 hashes instead")


# --- reading -----------------------------------------------------------------------------------


def _input_files(m: ImportMapping, inputs: Sequence[str]) -> dict[str, list[Path]]:
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


def _read_source(files: list[Path], source: SourceSpec, specs: list[ColumnSpec],
                 what: str) -> pd.DataFrame:
    """Read the columns ``specs`` use from every file, in file order, checking they exist."""
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


def _text_values(raw: pd.DataFrame, spec: ColumnSpec) -> pd.Series:
    """One string per row (NA where a used column is empty), the default filling the gaps."""
    n = len(raw)
    if spec.value is not None:
        out = pd.Series([spec.value] * n, dtype="string")
    elif spec.column is not None:
        out = _as_text(raw[spec.column])
    else:
        fields = list(dict.fromkeys(f for _, f in spec.template or ()
                                    if f and f not in _ROW_FIELDS))
        pieces = {f: _as_text(raw[f]) for f in fields}
        row = pd.Series(np.arange(n), dtype="int64")
        if fields:
            # position of the row among the rows sharing the template's columns (file order)
            line = pd.DataFrame(pieces).groupby(fields, dropna=False, sort=False).cumcount()
        else:
            line = row
        pieces["_row"] = row.astype("string")
        pieces["_line"] = pd.Series(line.to_numpy(), dtype="int64").astype("string")
        out = pd.Series([""] * n, dtype="string")
        for literal, name in spec.template or ():
            if literal:
                out = out + literal
            if name is not None:
                out = out + pieces[name]
    if spec.default is not None:
        out = out.fillna(spec.default)
    return out.reset_index(drop=True)


def _number_values(raw: pd.DataFrame, spec: ColumnSpec, source: SourceSpec | None,
                   *, use_default: bool = True) -> tuple[pd.Series, pd.Series]:
    """Floats per row (NaN where missing) and a mask of values given but not numbers."""
    n = len(raw)
    if spec.value is not None:
        return pd.Series(float(spec.value), index=range(n)), pd.Series(False, index=range(n))
    if spec.column is None:  # only a default
        fill = float(spec.default) if use_default else np.nan
        return pd.Series(fill, index=range(n)), pd.Series(False, index=range(n))
    col = raw[spec.column].reset_index(drop=True)
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
    vals = vals.where(np.isfinite(vals))
    bad = given & vals.isna()
    if use_default and spec.default is not None:
        vals = vals.where(given, float(spec.default))
    return vals, bad.astype(bool)


def _time_values(values: pd.Series, fmt: str, tz: str, key: str, column: str) -> pd.Series:
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


def _sequence_times(raw: pd.DataFrame, rule: SequenceRule, user_ids: pd.Series,
                    key: str) -> pd.Series:
    """The sequence rule: the n-th order of a group happens on base + (n - 1) * step_days.

    n is the dense rank of the sequence number inside its ``per`` group (1 for the smallest),
    base the group's earliest anchor date or else ``start``; ``hour`` adds hours of the day.
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
    if rule.start is not None:
        base = pd.Series(pd.Timestamp(rule.start, tz="UTC"), index=range(n))
    else:
        base = pd.Series(pd.NaT, index=range(n), dtype="datetime64[ns, UTC]")
    if rule.anchor is not None:
        anchor = _time_values(raw[rule.anchor], rule.anchor_format, "UTC", key, rule.anchor)
        anchor = anchor.dt.floor("D")
        earliest = anchor.groupby(group.to_numpy()).transform("min")
        base = earliest.where(earliest.notna(), base)
    ts = base + pd.to_timedelta((rank - 1) * rule.step_days, unit="D")
    if rule.hour is not None:
        hour = pd.to_numeric(_as_text(raw[rule.hour]), errors="coerce")
        good = hour.between(0, 23) & (hour == hour.round())
        ts = ts + pd.to_timedelta(hour.where(good), unit="h")
    return ts


def _event_types(raw: pd.DataFrame, spec: ColumnSpec) -> pd.Series:
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


def _pseudonymize(ids: pd.Series, salt: str) -> pd.Series:
    """HMAC-SHA256 of each stripped, lower-cased id, keyed with the salt (hex digest)."""
    key = salt.encode("utf-8")
    uniq = ids.dropna().unique()
    digest = {
        v: hmac.new(key, str(v).strip().casefold().encode("utf-8"), hashlib.sha256).hexdigest()
        for v in uniq
    }
    return ids.map(digest).astype("string")


def pseudonymous_id(value: str, salt: str) -> str:
    """The user id that ``hash_user_id: true`` makes of one source value.

    Args:
        value: the direct identifier (an email, say).
        salt: the salt ($SHOPREC_ID_SALT or the mapping's id_salt).

    Returns:
        64 hex characters: HMAC-SHA256 of the stripped, lower-cased value, keyed with the salt.
    """
    return str(_pseudonymize(pd.Series([value], dtype="string"), salt).iloc[0])


def _refuse_direct_identifier_values(ids: pd.Series, spec: ColumnSpec) -> None:
    """Refuse user ids whose values are emails or phone numbers, whatever the column's name."""
    for kind, pattern in (("email", _EMAIL_VALUE), ("phone number", _PHONE_VALUE)):
        hits = ids.dropna().str.fullmatch(pattern.pattern)
        if bool(hits.any()):
            row = int(hits.idxmax())
            # the value itself is not repeated: it is the personal data being refused
            raise DirectIdentifierError(
                spec.key, f"values look like {kind}s ({int(hits.sum())} rows, first at data row "
                f"{row}); set hash_user_id: true (salt in ${ID_SALT_ENV} or id_salt) to import "
                "salted SHA-256 hashes instead")


def _most_frequent(keys: pd.Series, values: pd.Series) -> pd.Series:
    """Per key, its most frequent non-null value; ties go to the smallest value."""
    pairs = pd.DataFrame({"k": keys.to_numpy(), "v": values.to_numpy()}).dropna()
    if pairs.empty:
        return pd.Series(dtype="object")
    counts = pairs.groupby(["k", "v"], sort=False).size().reset_index(name="n")
    counts = counts.sort_values(["k", "n", "v"], ascending=[True, False, True], kind="stable")
    return counts.drop_duplicates("k").set_index("k")["v"]


def _first_reason(checks: dict[str, pd.Series], reasons: tuple[str, ...], n: int) -> np.ndarray:
    """Index into ``reasons`` of the first check each row fails, -1 where it passes all."""
    reason = np.full(n, -1, dtype=np.int64)
    for name, failed in checks.items():
        mask = np.asarray(pd.Series(failed).fillna(False), dtype=bool)
        reason[(reason < 0) & mask] = reasons.index(name)
    return reason


def _counts(reason: np.ndarray, reasons: tuple[str, ...]) -> dict[str, int]:
    return {r: int((reason == i).sum()) for i, r in enumerate(reasons)}


# --- the tables --------------------------------------------------------------------------------


def _build_events(raw: pd.DataFrame, m: ImportMapping,
                  salt: str | None) -> tuple[pd.DataFrame, np.ndarray]:
    """Events that pass the row checks (``_pos``: source row, ``day``: UTC date) and each
    source row's drop reason (index into ``DROP_REASONS``, -1 where it passes)."""
    cols = m.events.columns
    n = len(raw)
    event_id = _text_values(raw, cols["event_id"])
    user_id = _text_values(raw, cols["user_id"])
    if salt is None:
        _refuse_direct_identifier_values(user_id, cols["user_id"])
    product_id = _text_values(raw, cols["product_id"])
    event_type = _event_types(raw, cols["event_type"])
    ts_spec = cols["ts"]
    if ts_spec.sequence is not None:
        ts = _sequence_times(raw, ts_spec.sequence, user_id, ts_spec.key)
    else:
        ts = _time_values(raw[ts_spec.column], ts_spec.format, ts_spec.timezone, ts_spec.key,
                          ts_spec.column)
    source = m.events.source
    if "quantity" in cols:
        quantity, quantity_bad = _number_values(raw, cols["quantity"], source)
    else:
        quantity, quantity_bad = pd.Series(1.0, index=range(n)), pd.Series(False, index=range(n))
    if "price" in cols:
        price, price_bad = _number_values(raw, cols["price"], source)
    else:
        price, price_bad = pd.Series(np.nan, index=range(n)), pd.Series(False, index=range(n))
    query = (_text_values(raw, cols["query"]) if "query" in cols
             else pd.Series(pd.NA, index=range(n), dtype="string"))

    purchase = (event_type == "purchase").fillna(False).astype(bool)
    quantity_ok = (quantity >= 1) & (quantity == np.floor(quantity)) & ~quantity_bad
    price_ok = ~price_bad & (price.isna() | (price > 0))
    checks = {
        "missing_event_id": event_id.isna(),
        "missing_user_id": user_id.isna(),
        "unmapped_event_type": event_type.isna(),
        "missing_product_id": product_id.isna() & (event_type != "search"),
        "missing_query": query.isna() & (event_type == "search"),
        "unparsable_timestamp": ts.isna(),
        "non_positive_quantity": purchase & ~quantity_ok,
        "non_positive_price": purchase & ~price_ok,
    }
    reason = _first_reason(checks, DROP_REASONS, n)
    passing = np.flatnonzero(reason < 0)
    duplicate = event_id.iloc[passing].duplicated(keep="first").to_numpy()
    reason[passing[duplicate]] = DROP_REASONS.index("duplicate_event_id")
    keep = reason < 0

    if salt is not None:
        user_id = _pseudonymize(user_id, salt)
    events = pd.DataFrame({
        "event_id": event_id[keep].astype(object),
        "user_id": user_id[keep].astype(object),
        "product_id": product_id[keep].astype(object),
        "event_type": event_type[keep].astype(object),
        "query": query[keep].astype(object),
        # other event types keep their row: quantity 1, no price where the source's was bad
        "quantity": quantity.where(quantity_ok, 1.0)[keep].astype("int64"),
        "price": price.where(price_ok)[keep].astype("float64"),
        "ts": ts[keep],
        "_pos": np.flatnonzero(keep),
    })
    events = events.sort_values(["ts", "event_id"], kind="stable").reset_index(drop=True)
    events["day"] = events["ts"].dt.date
    return events, reason


def _snap(dates: pd.Series, event_days: np.ndarray) -> pd.Series:
    """Each date moved to the first day of events on or after it (None past the last one).

    Every written day has events (a shop day without any is not a valid partition), so
    catalogue and customer rows dated on other days land with the next day of events.
    """
    out = pd.Series([None] * len(dates), index=dates.index, dtype=object)
    if not len(event_days):
        return out
    days = pd.to_datetime(pd.Series(dates, dtype=object), errors="coerce").to_numpy("datetime64[D]")
    known = ~np.isnat(days)
    idx = np.searchsorted(event_days, days[known], side="left")
    snapped = np.full(len(idx), None, dtype=object)
    inside = idx < len(event_days)
    snapped[inside] = [d.item() for d in event_days[idx[inside]]]
    out[known] = snapped
    return out


def _day_start(day: dt.date) -> pd.Timestamp:
    return pd.Timestamp(day, tz="UTC")


def _products_from_events(events: pd.DataFrame, raw: pd.DataFrame, section: TableMapping | None,
                          only: set[str] | None, label: str,
                          price_default: float | None) -> tuple[pd.DataFrame, SourceReport]:
    """One product per product_id of the events, on the day of its first event.

    ``section`` (a products section without a source) names events-file columns for the
    attributes, each product taking its most frequent value; else the title is the product id.
    The price is the median of the mapped price column (else of the event prices), else
    ``price_default`` (the mapping's ``products.columns.price.default``, which also prices the
    products a products source lacks); a product without any price is dropped.
    """
    ev = events[events["product_id"].notna()]
    if only is not None:
        ev = ev[ev["product_id"].isin(only)]
    first = ev.drop_duplicates("product_id").reset_index(drop=True)  # time order: first event
    products = pd.DataFrame({
        "product_id": first["product_id"],
        "updated_at": first["ts"],
        "day": first["day"],
    })
    cols = section.columns if section is not None else {}
    rows = raw.iloc[ev["_pos"].to_numpy()].reset_index(drop=True)
    keys = ev["product_id"].reset_index(drop=True)
    for name in ("title", "description", "category", "brand", "image_url"):
        if name in cols:
            values = _text_values(rows, cols[name])
            products[name] = products["product_id"].map(_most_frequent(keys, values))
        else:
            products[name] = None
    products["title"] = products["title"].fillna(products["product_id"])
    products["category"] = products["category"].fillna(DEFAULT_CATEGORY)
    price_spec = cols.get("price")
    if price_spec is not None and (price_spec.column or price_spec.value is not None):
        values, _ = _number_values(rows, price_spec, None, use_default=False)
        values = values.where(values > 0)
    else:
        values = ev["price"].reset_index(drop=True)
    median = pd.Series(values.to_numpy(), index=keys.to_numpy()).groupby(level=0).median()
    products["price"] = products["product_id"].map(median)
    if price_default is not None:
        products["price"] = products["price"].fillna(price_default)
    reason = _first_reason({"missing_price": products["price"].isna()},
                           DERIVED_PRODUCT_DROP_REASONS, len(products))
    kept = products[reason < 0].reset_index(drop=True)
    report = SourceReport(label, len(products), len(kept),
                          _counts(reason, DERIVED_PRODUCT_DROP_REASONS))
    return kept, report


def _product_rows(praw: pd.DataFrame, section: TableMapping,
                  events: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """The products file's rows as contract columns (``updated_at`` as in the file, NaT when
    unmapped) and each row's drop reason so far (-1 where it passes)."""
    cols = section.columns
    n = len(praw)
    product_id = _text_values(praw, cols["product_id"])
    frame = pd.DataFrame({"product_id": product_id.astype(object)})
    for name in ("title", "description", "category", "brand", "image_url"):
        frame[name] = (_text_values(praw, cols[name]).astype(object) if name in cols
                       else pd.Series([None] * n, dtype=object))
    frame["category"] = frame["category"].fillna(DEFAULT_CATEGORY)
    if "price" in cols and (cols["price"].column or cols["price"].value is not None):
        price, bad = _number_values(praw, cols["price"], section.source, use_default=False)
        price = price.where(~bad & (price > 0))
    else:
        price = pd.Series(np.nan, index=range(n))
    # missing or bad source price: the median event price, then the mapping's default
    price = price.fillna(product_id.map(events.groupby("product_id")["price"].median()))
    if "price" in cols and cols["price"].default is not None:
        price = price.fillna(cols["price"].default)
    frame["price"] = price.astype("float64")
    if "updated_at" in cols:
        spec = cols["updated_at"]
        updated = _time_values(praw[spec.column], spec.format, spec.timezone, spec.key,
                               spec.column)
        unparsable = updated.isna()
    else:
        updated = pd.Series(pd.NaT, index=range(n), dtype="datetime64[ns, UTC]")
        unparsable = pd.Series(False, index=range(n))
    frame["updated_at"] = updated
    frame["_pos"] = np.arange(n)
    checks = {
        "missing_product_id": frame["product_id"].isna(),
        "missing_title": frame["title"].isna(),
        "unparsable_timestamp": unparsable,
        "missing_price": frame["price"].isna(),
    }
    return frame, _first_reason(checks, PRODUCT_DROP_REASONS, n)


def _place_products(frame: pd.DataFrame, reason: np.ndarray, events: pd.DataFrame,
                    event_days: np.ndarray) -> tuple[pd.DataFrame, SourceReport]:
    """Put the products file's passing rows on days of events.

    A product is in the catalogue from its first event or its earliest ``updated_at``,
    whichever comes first (exports are often snapshots dated after the sales); without either,
    from the import's first day. Rows dated on a day without events land, stamped 00:00 UTC,
    on the next day with events; one row per product and day, the latest one winning.
    """
    reason = reason.copy()
    first_ts = events[events["product_id"].notna()].drop_duplicates("product_id")
    first_ts = frame["product_id"].map(first_ts.set_index("product_id")["ts"])
    fallback = _day_start(event_days[0].item()) if len(event_days) else pd.NaT
    when = frame["updated_at"].fillna(first_ts).fillna(fallback)
    passing = frame[reason < 0].assign(_when=when[reason < 0])
    earliest = passing.sort_values(["_when", "_pos"], kind="stable").drop_duplicates("product_id")
    pulled = earliest["_when"].where(~(first_ts[earliest.index] < earliest["_when"]),
                                     first_ts[earliest.index])
    when[earliest.index] = pulled
    day = _snap(when.dt.date, event_days)
    on_own_day = day == when.dt.date
    frame = frame.assign(
        updated_at=when.where(on_own_day, pd.to_datetime(day.map(_day_start_or_nat), utc=True)),
        day=day,
    )
    reason[(reason < 0) & day.isna().to_numpy()] = PRODUCT_DROP_REASONS.index("no_event_day")
    passing = frame[reason < 0].sort_values(["updated_at", "_pos"], kind="stable")
    superseded = passing["_pos"][passing.duplicated(["product_id", "day"], keep="last")]
    reason[superseded.to_numpy()] = PRODUCT_DROP_REASONS.index("duplicate_product_id")
    kept = frame[reason < 0].drop(columns="_pos").reset_index(drop=True)
    return kept, SourceReport("products", len(frame), len(kept),
                              _counts(reason, PRODUCT_DROP_REASONS))


def _day_start_or_nat(day: dt.date | None) -> pd.Timestamp:
    return _day_start(day) if day is not None else pd.NaT


def _users_from_events(events: pd.DataFrame, raw: pd.DataFrame, section: TableMapping | None,
                       only: set[str] | None, event_days: np.ndarray,
                       label: str) -> tuple[pd.DataFrame, SourceReport]:
    """One user per user_id of the events, first seen on the day of their first event (or
    on the first day of events on or after a mapped earlier sign-up date)."""
    ev = events if only is None else events[events["user_id"].isin(only)]
    first = ev.drop_duplicates("user_id").reset_index(drop=True)
    users = pd.DataFrame({"user_id": first["user_id"]})
    cols = section.columns if section is not None else {}
    rows = raw.iloc[ev["_pos"].to_numpy()].reset_index(drop=True)
    keys = ev["user_id"].reset_index(drop=True)
    if "country" in cols:
        country = _most_frequent(keys, _text_values(rows, cols["country"]))
        users["country"] = users["user_id"].map(country)
    else:
        users["country"] = None
    signup = first["day"]
    if "signup_date" in cols:
        spec = cols["signup_date"]
        dates = _time_values(rows[spec.column], spec.format, "UTC", spec.key, spec.column)
        earliest = dates.groupby(keys.to_numpy()).min().dt.date
        signup = users["user_id"].map(earliest).where(lambda s: s.notna(), first["day"])
    users["signup_date"] = signup
    users["day"] = _snap(pd.Series([min(a, b) for a, b in zip(signup, first["day"], strict=True)],
                                   dtype=object), event_days)
    return users, SourceReport(label, len(users), len(users), {})


def _users_from_source(uraw: pd.DataFrame, section: TableMapping, events: pd.DataFrame,
                       event_days: np.ndarray,
                       salt: str | None) -> tuple[pd.DataFrame, SourceReport]:
    """The users file's rows, first seen on the first day of events on or after the earlier
    of their sign-up date and first event (neither: the import's first day)."""
    cols = section.columns
    n = len(uraw)
    user_id = _text_values(uraw, cols["user_id"])
    if salt is None:
        _refuse_direct_identifier_values(user_id, cols["user_id"])
    else:
        user_id = _pseudonymize(user_id, salt)
    frame = pd.DataFrame({"user_id": user_id.astype(object)})
    frame["country"] = (_text_values(uraw, cols["country"]).astype(object) if "country" in cols
                        else None)
    if "signup_date" in cols:
        spec = cols["signup_date"]
        # an unreadable sign-up date is an optional attribute lost, not a reason to drop
        signup = _time_values(uraw[spec.column], spec.format, "UTC", spec.key, spec.column)
        signup = signup.dt.date.where(signup.notna(), None)
    else:
        signup = pd.Series([None] * n, dtype=object)
    frame["signup_date"] = signup
    first_day = user_id.map(events.drop_duplicates("user_id").set_index("user_id")["day"])
    fallback = event_days[0].item() if len(event_days) else None
    seen = [min((d for d in (a, b) if isinstance(d, dt.date)), default=fallback)
            for a, b in zip(signup, first_day, strict=True)]
    frame["day"] = _snap(pd.Series(seen, dtype=object), event_days)
    checks = {
        "missing_user_id": frame["user_id"].isna(),
        "duplicate_user_id": pd.Series(False, index=range(n)),
        "no_event_day": frame["day"].isna(),
    }
    reason = _first_reason(checks, USER_DROP_REASONS, n)
    passing = np.flatnonzero(reason < 0)
    duplicate = frame["user_id"].iloc[passing].duplicated(keep="first").to_numpy()
    reason[passing[duplicate]] = USER_DROP_REASONS.index("duplicate_user_id")
    kept = frame[reason < 0].reset_index(drop=True)
    return kept, SourceReport("users", n, len(kept), _counts(reason, USER_DROP_REASONS))


def _salt(m: ImportMapping) -> str | None:
    if not m.hash_user_id:
        return None
    salt = os.environ.get(ID_SALT_ENV) or m.id_salt
    if not salt:
        raise MappingError("mapping.hash_user_id", f"needs a salt: set ${ID_SALT_ENV} "
                           "(preferred: keeps it out of the file) or id_salt in the mapping")
    return salt


def _by_day(frame: pd.DataFrame) -> dict[dt.date, pd.DataFrame]:
    if frame.empty:
        return {}
    return {day: g.drop(columns="day") for day, g in frame.groupby("day", sort=True)}


def import_generic(mapping: str | Path | ImportMapping, root: str, *, inputs: Sequence[str] = (),
                   progress: bool = False) -> ImportReport:
    """Import a shop's export through a mapping and write daily contract partitions.

    Args:
        mapping: the YAML mapping file (or an already loaded one).
        root: landing-zone root to write ``events``, ``products`` and ``users`` under.
        inputs: files that replace the mapping's source paths: plain paths are events files,
            ``products=PATH`` and ``users=PATH`` those of the other sources.
        progress: show a progress bar over the days written.

    Returns:
        Rows read, kept and dropped (by reason) per source, and what was written.

    Raises:
        MappingError: a bad mapping, a missing file or column, or user ids that are direct
            identifiers without ``hash_user_id`` (``DirectIdentifierError``).
    """
    m = mapping if isinstance(mapping, ImportMapping) else load_mapping(mapping)
    files = _input_files(m, inputs)
    salt = _salt(m)
    # sections without a source read their columns from the events file
    event_specs = list(m.events.columns.values())
    for section in (m.products, m.users):
        if section.source is None:
            event_specs += list(section.columns.values())
    raw = _read_source(files["events"], m.events.source, event_specs, "events")
    events, ev_reason = _build_events(raw, m, salt)
    reports: list[SourceReport] = []

    # the catalogue first: events whose product cannot enter it are dropped
    price_spec = m.products.columns.get("price")
    price_default = price_spec.default if price_spec is not None else None
    if m.products.source is not None:
        praw = _read_source(files["products"], m.products.source,
                            list(m.products.columns.values()), "products")
        prows, p_reason = _product_rows(praw, m.products, events)
        listed = set(prows["product_id"][p_reason < 0])
        unlisted = set(events["product_id"].dropna()) - listed
        extra, extra_report = _products_from_events(events, raw, None, unlisted,
                                                    "products from events", price_default)
        catalogue = listed | set(extra["product_id"])
    else:
        extra, extra_report = _products_from_events(events, raw, m.products, None,
                                                    "products from events", price_default)
        catalogue = set(extra["product_id"])
    orphan = (events["product_id"].notna() & ~events["product_id"].isin(catalogue)).to_numpy()
    ev_reason[events["_pos"].to_numpy()[orphan]] = DROP_REASONS.index("product_not_in_catalog")
    events = events[~orphan].reset_index(drop=True)
    reports.append(SourceReport("events", len(raw), len(events), _counts(ev_reason, DROP_REASONS)))
    event_days = np.array(sorted(set(events["day"])), dtype="datetime64[D]")

    if m.products.source is not None:
        products, report = _place_products(prows, p_reason, events, event_days)
        reports.append(report)
        products = pd.concat([products, extra], ignore_index=True)
        if extra_report.rows_in:
            reports.append(extra_report)
    else:
        products = extra
        reports.append(extra_report)

    if m.users.source is not None:
        uraw = _read_source(files["users"], m.users.source, list(m.users.columns.values()),
                            "users")
        users, report = _users_from_source(uraw, m.users, events, event_days, salt)
        reports.append(report)
        unlisted = set(events["user_id"]) - set(users["user_id"])
        extra, report = _users_from_events(events, raw, None, unlisted, event_days,
                                           "users from events")
        users = pd.concat([users, extra], ignore_index=True)
        if report.rows_in:
            reports.append(report)
    else:
        users, report = _users_from_events(events, raw, m.users, None, event_days,
                                           "users from events")
        reports.append(report)

    ev_days = _by_day(events.drop(columns="_pos"))
    pr_days = _by_day(products)
    us_days = _by_day(users)
    days = sorted(ev_days)  # products and users were placed on days of events
    empty = {t: pd.DataFrame(columns=list(contract.SCHEMAS[t].names)) for t in contract.TABLES}
    for day in tqdm(days, desc=f"import {m.name}", unit="day", disable=not progress):
        contract.write_partition(root, "events", day, ev_days[day])
        contract.write_partition(root, "products", day, pr_days.get(day, empty["products"]))
        contract.write_partition(root, "users", day, us_days.get(day, empty["users"]))
    return ImportReport(
        name=m.name, root=root, sources=tuple(reports), days=len(days),
        first_day=days[0] if days else None, last_day=days[-1] if days else None,
        users=len(users), products=len(products), events=len(events),
    )
