"""The generic importer's mapping: read a shop's YAML mapping file and check it, without data.

A mapping (format and examples in ``docs/importing.md``) says where an export's files are and
how each contract column is made from their columns. ``load_mapping`` and ``parse_mapping`` turn
it into an ``ImportMapping`` or raise ``MappingError`` naming the YAML path of the bad key, so
a typo never silently does nothing. User ids read from columns named like direct identifiers
(e-mail, phone, name, address) are refused here unless the mapping hashes them.
"""

from __future__ import annotations

import codecs
import difflib
import re
import string
import zoneinfo
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from features import contract
from features.importers.generic_rules import (
    Condition,
    Expr,
    RuleError,
    SequenceRule,
    parse_expr,
    parse_filter,
    parse_sequence,
)
from features.validation_suites import MAX_PRICE, MAX_QUANTITY

TIME_FORMATS = ("iso", "epoch_s", "epoch_ms")
ID_SALT_ENV = "SHOPREC_ID_SALT"

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
_SEQUENCE_KEYS = ("from_sequence", "per", "start", "step_days", "gap_days_column", "align_end",
                  "anchor", "anchor_format", "hour")
_KIND_OPTIONS: dict[str, tuple[str, ...]] = {
    "id": ("column", "value", "template", "concat", "sep", "default"),
    "text": ("column", "value", "template", "concat", "sep", "default"),
    "event_type": ("column", "value", "map", "default"),
    "quantity": ("column", "value", "expr", "default"),
    "price": ("column", "value", "expr", "default"),
    "time": ("column", "format", "timezone", *_SEQUENCE_KEYS),
    "date": ("column", "format"),
}
_CSV_OPTIONS = ("delimiter", "encoding", "decimal", "thousands", "quotechar", "na_values",
                "skip_rows")
_SOURCE_KEYS = ("path", "format", *_CSV_OPTIONS)
_TOP_KEYS = ("version", "name", "hash_user_id", "id_salt", "events", "products", "users")
# Keys of each section besides source and columns.
_SECTION_KEYS: dict[str, tuple[str, ...]] = {
    "events": ("filter", "require_product_in_catalog"),
    "products": ("filter", "only_with_events"),
    "users": ("filter",),
}
# Kinds whose column may be a list of fallbacks (the first non-empty value wins).
_FALLBACK_KINDS = ("id", "text", "quantity", "price")
ROW_FIELDS = ("_row", "_line")  # template fields that are not source columns
_STRFTIME_CODES = frozenset("aAbBcdfGHIjmMpSuUVwWxXyYzZ%")

# Source-column words that mark a direct identifier (kind -> words). Long words match inside
# a name token ("customerEmail", "e_mail_address"), short ones only as a whole token.
_DIRECT_ID_WORDS = {
    "email": ("mail",),
    "phone number": ("phone", "mobile", "telephone"),
    "name": ("name",),
    "address": ("addr", "street"),
}
_DIRECT_ID_TOKENS = {"tel": "phone number", "fax": "phone number", "cell": "phone number"}


class MappingError(ValueError):
    """A mapping (or an input) that cannot be imported; ``key`` is the YAML path of the bad key."""

    def __init__(self, key: str, problem: str):
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}")


class DirectIdentifierError(MappingError):
    """user_id would carry an email, phone number, name or address; refused without hashing."""


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
    fallback: tuple[str, ...] | None = None  # column: [a, b]: the first non-empty value
    expr: Expr | None = None  # expr: "line_value / quantity"
    optional: frozenset[int] = frozenset()  # template parts whose field may be missing ({x?})

    def source_columns(self) -> list[str]:
        """Source columns this spec reads (``_row``/``_line`` and ``per: user_id`` excluded)."""
        cols = [self.column] if self.column else []
        cols += list(self.fallback or ()) + list(self.expr.columns if self.expr else ())
        cols += [f for _, f in self.template or () if f and f not in ROW_FIELDS]
        if self.sequence:
            rule = self.sequence
            cols += [rule.column, *(c for c in (rule.anchor, rule.hour, rule.gap_column) if c)]
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
    """One table's section: its source (None: derived from events), its columns, and the
    rows it keeps (``filter``; events: ``require_product_in_catalog``, products:
    ``only_with_events``)."""

    table: str
    source: SourceSpec | None
    columns: dict[str, ColumnSpec]
    filter: tuple[Condition, ...] = ()
    require_product_in_catalog: bool = False
    only_with_events: bool = False


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
    if sections["events"].require_product_in_catalog and sections["products"].source is None:
        raise MappingError("mapping.events.require_product_in_catalog", "needs a products file: "
                           "add mapping.products.source (without one, every product of the "
                           "events is in the catalogue)")
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
    _check_keys(node, ("source", "columns", *_SECTION_KEYS[table]), key, "key")
    if table == "events" or "source" in node:
        source: SourceSpec | None = _parse_source(node.get("source"), f"{key}.source")
    else:
        source = None
    flags = {}
    for flag in ("require_product_in_catalog", "only_with_events"):
        flags[flag] = node.get(flag, False)
        if not isinstance(flags[flag], bool):
            raise MappingError(f"{key}.{flag}", f"expected true or false, got {flags[flag]!r}")
    if source is None:
        for k in ("filter", "only_with_events"):
            if k in node:
                raise MappingError(f"{key}.{k}", f"{table} without a source are derived from "
                                   "the kept events; filter the events instead, or add "
                                   f"{key}.source")
    conditions: tuple[Condition, ...] = ()
    if "filter" in node:
        try:
            conditions = parse_filter(node["filter"], f"{key}.filter")
        except RuleError as exc:
            raise MappingError(exc.key, exc.problem) from None
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
    return TableMapping(table, source, columns, conditions, **flags)


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
    forms = ("column", "value", "template", "concat", "expr")
    given = [k for k in forms if k in spec]
    # a price may be only a default: "no such column; use the median event price, else this"
    price_default_only = kind == "price" and not given and "default" in spec
    if len(given) != 1 and not price_default_only:
        allowed = [k for k in forms if k in _KIND_OPTIONS[kind]]
        if kind == "time":
            allowed.append("from_sequence")
        what = "none" if not given else " and ".join(given)
        raise MappingError(key, f"give exactly one of {', '.join(allowed)} (got {what})")
    column, fallback = _parse_column_name(spec.get("column"), kind, f"{key}.column")
    if fallback is not None and "map" in spec:
        raise MappingError(f"{key}.column", "map reads one column; give a single column name")
    expr = None
    if "expr" in spec:
        try:
            expr = parse_expr(spec["expr"], f"{key}.expr")
        except RuleError as exc:
            raise MappingError(exc.key, exc.problem) from None
    template, optional = None, frozenset[int]()
    if "template" in spec:
        template, optional = _parse_template(spec["template"], f"{key}.template")
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
                      default=default, format=fmt, timezone=tz, fallback=fallback, expr=expr,
                      optional=optional)


def _parse_column_name(column: Any, kind: str,
                       key: str) -> tuple[str | None, tuple[str, ...] | None]:
    """A ``column`` option: one source column, or a list of fallbacks (the first non-empty
    value wins); returns (column, None) or (None, fallbacks)."""
    if isinstance(column, list):
        if kind not in _FALLBACK_KINDS:
            raise MappingError(key, "a list of fallback columns is only for ids, text, "
                               "quantities and prices; give one source column name")
        if not column or not all(isinstance(c, str) and c for c in column):
            raise MappingError(key, f"expected source column names, got {column!r}")
        if len(column) > 1:
            return None, tuple(column)
        column = column[0]
    if column is not None and (not isinstance(column, str) or not column):
        raise MappingError(key, f"expected a source column name, got {column!r}")
    return column, None


def _checked_value(value: Any, kind: str, key: str) -> Any:
    """A constant or default, checked against the column's kind."""
    if kind == "event_type":
        if value not in contract.EVENT_TYPES:
            raise MappingError(key, f"{value!r} is not an event type; expected one of "
                               f"{', '.join(contract.EVENT_TYPES)}")
        return value
    # the daily validation's bounds (features.validation_suites), so imports pass it
    if kind == "quantity":
        if (isinstance(value, bool) or not isinstance(value, int)
                or not 1 <= value <= MAX_QUANTITY):
            raise MappingError(key, f"expected a whole number in 1..{MAX_QUANTITY}, got "
                               f"{value!r}")
        return value
    if kind == "price":
        if (isinstance(value, bool) or not isinstance(value, int | float)
                or not 0 < value <= MAX_PRICE):
            raise MappingError(key, f"expected a number > 0 and <= {MAX_PRICE:.0f}, got "
                               f"{value!r}")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, str | int | float) or str(value) == "":
        raise MappingError(key, f"expected a non-empty string, got {value!r}")
    return str(value)


def _parse_template(text: Any,
                    key: str) -> tuple[tuple[tuple[str, str | None], ...], frozenset[int]]:
    """A template's (literal, field) parts, and the positions of optional fields (``{x?}``)."""
    if not isinstance(text, str) or not text:
        raise MappingError(key, "expected a string like '{order_id}-{_line}'")
    parts: list[tuple[str, str | None]] = []
    optional: set[int] = set()
    try:
        for literal, name, spec, conversion in string.Formatter().parse(text):
            if name is not None and name.endswith("?"):
                name = name[:-1]
                optional.add(len(parts))
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
    return tuple(parts), frozenset(optional)


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
    try:
        rule = parse_sequence(spec, key)
    except RuleError as exc:
        raise MappingError(exc.key, exc.problem) from None
    _check_time_format(rule.anchor_format, key, "anchor_format")
    return rule


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
