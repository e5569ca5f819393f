"""The generic importer's rules: row filters, arithmetic expressions, the sequence rule.

Pure helpers that know nothing of mapping files or exports. ``parse_filter``, ``parse_expr``
and ``parse_sequence`` check what a mapping says and raise ``RuleError`` with the YAML path of
the bad key (which ``generic_mapping`` turns into a ``MappingError``); ``condition_holds`` and
``evaluate_expr`` apply them to columns already read (``generic_reading``, which also applies
the sequence rule); ``RowFilter`` records which source rows a mapping removed on purpose, and
why, so that the report lists them apart from the contract's drops and the drop guard does
not count them as loss.

Expressions are parsed by a small recursive-descent parser, never by ``eval``::

    expr   := term (("+" | "-") term)*
    term   := factor (("*" | "/") factor)*
    factor := ("+" | "-") factor | NUMBER | NAME | `any column name` | "(" expr ")"
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

# Filter operators: text comparisons on the trimmed source value, and numeric comparisons.
TEXT_OPS = ("in", "not_in", "equals", "not_equals", "not_null")
NUMERIC_OPS = ("gt", "ge", "lt", "le")
FILTER_OPS = TEXT_OPS + NUMERIC_OPS
DEFAULT_FILTER_REASON = "filtered_out"
_REASON_NAME = re.compile(r"[a-z][a-z0-9_]*")
_TOKEN = re.compile(r"\s*(?:(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
                    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|`(?P<quoted>[^`]+)`|(?P<op>[-+*/()]))")


class RuleError(ValueError):
    """A filter or expression that cannot be used; ``key`` is the YAML path of the bad key."""

    def __init__(self, key: str, problem: str):
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}")


# --- filters ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    """One filter condition on a source column: rows that do not meet it are filtered out."""

    key: str  # YAML path of the condition
    column: str
    op: str  # one of FILTER_OPS
    values: tuple[str, ...] = ()  # in, not_in, equals, not_equals (as text)
    number: float | None = None  # gt, ge, lt, le
    reason: str = DEFAULT_FILTER_REASON

    def source_columns(self) -> list[str]:
        """The source column the condition reads."""
        return [self.column]


def parse_filter(node: Any, key: str) -> tuple[Condition, ...]:
    """Check a section's ``filter``: a list of conditions that every kept row meets.

    Args:
        node: the YAML value, a list of mappings like ``{column: dept, not_in: [SERVICE]}``.
        key: its YAML path (``mapping.events.filter``).

    Returns:
        The conditions, in order (a row filtered out counts under the first it fails).

    Raises:
        RuleError: not a list, an unknown or missing operator, a bad value or reason.
    """
    if not isinstance(node, list) or not node:
        raise RuleError(key, "expected a list of conditions like {column: dept, not_in: [X]}")
    return tuple(_parse_condition(c, f"{key}[{i}]") for i, c in enumerate(node))


def _parse_condition(node: Any, key: str) -> Condition:
    if not isinstance(node, dict):
        raise RuleError(key, f"expected a mapping with column and one of {', '.join(FILTER_OPS)}")
    allowed = ("column", *FILTER_OPS, "reason")
    for k in node:
        if k not in allowed:
            raise RuleError(f"{key}.{k}", f"unknown condition key; expected one of "
                            f"{', '.join(allowed)}")
    column = node.get("column")
    if not isinstance(column, str) or not column:
        raise RuleError(f"{key}.column", f"expected a source column name, got {column!r}")
    ops = [k for k in FILTER_OPS if k in node]
    if len(ops) != 1:
        raise RuleError(key, f"give exactly one of {', '.join(FILTER_OPS)} "
                        f"(got {' and '.join(ops) or 'none'})")
    op = ops[0]
    value = node[op]
    okey = f"{key}.{op}"
    reason = node.get("reason", DEFAULT_FILTER_REASON)
    if not isinstance(reason, str) or not _REASON_NAME.fullmatch(reason):
        raise RuleError(f"{key}.reason", f"expected a snake_case name like "
                        f"'non_product_department', got {reason!r}")
    if op == "not_null":
        if value is not True:
            raise RuleError(okey, f"expected true, got {value!r}")
        return Condition(key, column, op, reason=reason)
    if op in NUMERIC_OPS:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RuleError(okey, f"expected a number, got {value!r}")
        return Condition(key, column, op, number=float(value), reason=reason)
    values = value if op in ("in", "not_in") else [value]
    if op in ("in", "not_in") and (not isinstance(value, list) or not value):
        raise RuleError(okey, f"expected a non-empty list of values, got {value!r}")
    return Condition(key, column, op, tuple(_as_text_value(v, okey) for v in values),
                     reason=reason)


def _as_text_value(value: Any, key: str) -> str:
    """A YAML scalar as the text a source value is compared with (1.0 -> '1', as ids read)."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise RuleError(key, f"expected text or a number, got {value!r} (quote yes/no/on/off)")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def condition_holds(cond: Condition, text: pd.Series, numbers: pd.Series) -> np.ndarray:
    """Which rows meet a condition.

    Args:
        cond: the condition.
        text: the column's trimmed text per row (NA where missing).
        numbers: the column's values as numbers (NaN where missing or not a number).

    Returns:
        A boolean array. A missing value meets ``not_in`` and ``not_equals`` (it is not one of
        the values) and fails every other operator.
    """
    if cond.op == "not_null":
        held = text.notna()
    elif cond.op in ("in", "equals"):
        held = text.isin(cond.values)
    elif cond.op in ("not_in", "not_equals"):
        held = ~text.isin(cond.values) | text.isna()
    else:
        compare = {"gt": np.greater, "ge": np.greater_equal, "lt": np.less,
                   "le": np.less_equal}[cond.op]
        nums = numbers.to_numpy(dtype="float64")
        with np.errstate(invalid="ignore"):
            held = pd.Series(compare(nums, cond.number) & ~np.isnan(nums))
    return np.asarray(pd.Series(held).fillna(False), dtype=bool)


@dataclass(frozen=True)
class RowFilter:
    """Source rows a mapping removes on purpose (its filters and joins), with their reasons.

    ``index`` holds, per source row, the index into ``names`` of the reason it was filtered
    out under (the first that applied), -1 where it stays. Every reason the mapping names is
    in ``names``, so the report lists it, zero or not.
    """

    names: tuple[str, ...]
    index: np.ndarray

    @classmethod
    def keep_all(cls, n: int) -> RowFilter:
        """No row filtered out (yet)."""
        return cls((), np.full(n, -1, dtype=np.int64))

    @property
    def out(self) -> np.ndarray:
        """Which rows are filtered out."""
        return self.index >= 0

    def add(self, name: str, mask: Any) -> RowFilter:
        """Filter out, as ``name``, the rows in ``mask`` that no earlier reason took."""
        names = self.names if name in self.names else (*self.names, name)
        index = self.index.copy()
        hit = np.asarray(pd.Series(mask).fillna(False), dtype=bool)
        index[(index < 0) & hit] = names.index(name)
        return RowFilter(names, index)

    def counts(self) -> dict[str, int]:
        """Rows filtered out per reason, in the order the reasons were first named."""
        return {r: int((self.index == i).sum()) for i, r in enumerate(self.names)}

    def by_id(self, ids: pd.Series) -> dict[str, str]:
        """The ids whose every row was filtered out, each with its first row's reason."""
        frame = pd.DataFrame({"id": ids.to_numpy(), "i": self.index}).dropna(subset=["id"])
        kept = set(frame.loc[frame["i"] < 0, "id"])
        out = frame[(frame["i"] >= 0) & ~frame["id"].isin(kept)].drop_duplicates("id")
        return {str(k): self.names[int(i)] for k, i in zip(out["id"], out["i"], strict=True)}


# --- arithmetic -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expr:
    """A parsed arithmetic expression over source columns (``tree``: nested tuples)."""

    text: str
    tree: tuple
    columns: tuple[str, ...]  # source columns it reads, in order of first use


def parse_expr(text: Any, key: str) -> Expr:
    """Parse ``+ - * /`` and parentheses over source column names and numbers.

    Args:
        text: the YAML value, e.g. ``"line_value / quantity"``; a column name that is not an
            identifier goes in backticks (`` `Line Value` / qty ``).
        key: its YAML path, for errors.

    Returns:
        The expression.

    Raises:
        RuleError: not a string, an unknown character, unbalanced parentheses, a missing
            operand, or no column at all.
    """
    if not isinstance(text, str) or not text.strip():
        raise RuleError(key, "expected an arithmetic expression like 'line_value / quantity'")
    tokens = _tokens(text, key)
    parser = _Parser(tokens, text, key)
    tree = parser.expr()
    if parser.pos < len(tokens):
        raise RuleError(key, f"unexpected {tokens[parser.pos][1]!r} in {text!r}")
    columns = tuple(dict.fromkeys(_columns(tree)))
    if not columns:
        raise RuleError(key, "the expression uses no column; use value: for a constant")
    return Expr(text, tree, columns)


def _tokens(text: str, key: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        if not text[pos:].strip():
            break
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise RuleError(key, f"cannot read {text[pos:].strip()[:20]!r} in {text!r}: use "
                            "+ - * /, parentheses, numbers and column names (`odd name`)")
        kind = m.lastgroup or ""
        value = m.group(kind)
        tokens.append(("name" if kind == "quoted" else kind, value))
        pos = m.end()
    return tokens


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]], text: str, key: str):
        self.tokens, self.text, self.key, self.pos = tokens, text, key, 0

    def _peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def expr(self) -> tuple:
        node = self.term()
        while (tok := self._peek()) is not None and tok[1] in ("+", "-"):
            self.pos += 1
            node = (tok[1], node, self.term())
        return node

    def term(self) -> tuple:
        node = self.factor()
        while (tok := self._peek()) is not None and tok[1] in ("*", "/"):
            self.pos += 1
            node = (tok[1], node, self.factor())
        return node

    def factor(self) -> tuple:
        tok = self._peek()
        if tok is None:
            raise RuleError(self.key, f"{self.text!r} ends where a number or column is needed")
        self.pos += 1
        kind, value = tok
        if value in ("+", "-"):
            return ("neg", self.factor()) if value == "-" else self.factor()
        if kind == "num":
            return ("num", float(value))
        if kind == "name":
            return ("col", value)
        if value == "(":
            node = self.expr()
            if self._peek() != ("op", ")"):
                raise RuleError(self.key, f"unbalanced parentheses in {self.text!r}")
            self.pos += 1
            return node
        raise RuleError(self.key, f"unexpected {value!r} in {self.text!r}")


def _columns(tree: tuple) -> list[str]:
    if tree[0] == "col":
        return [tree[1]]
    if tree[0] == "num":
        return []
    return [c for child in tree[1:] for c in _columns(child)]


def evaluate_expr(expr: Expr, column: Callable[[str], pd.Series] | Mapping[str, pd.Series],
                  n: int) -> pd.Series:
    """The expression's value per row: NaN where a column is missing or the result is not a
    finite number (a division by zero, say).

    Args:
        expr: the parsed expression.
        column: each source column's values as floats (a mapping or a function of the name).
        n: rows.
    """
    get = column.__getitem__ if isinstance(column, Mapping) else column

    def run(node: tuple) -> np.ndarray:
        if node[0] == "num":
            return np.full(n, node[1], dtype="float64")
        if node[0] == "col":
            return pd.Series(get(node[1])).to_numpy(dtype="float64")
        if node[0] == "neg":
            return -run(node[1])
        left, right = run(node[1]), run(node[2])
        op = {"+": np.add, "-": np.subtract, "*": np.multiply, "/": np.divide}[node[0]]
        return op(left, right)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        out = run(expr.tree)
    out[~np.isfinite(out)] = np.nan
    return pd.Series(out, index=range(n))


# --- the sequence rule ------------------------------------------------------------------------


@dataclass(frozen=True)
class SequenceRule:
    """Synthetic timestamps from an order sequence number (see ``docs/importing.md``)."""

    column: str
    per: str
    start: dt.date | None
    step_days: int | None  # None: only with gap_column, whose missing gaps then drop the order
    anchor: str | None
    anchor_format: str
    hour: str | None
    gap_column: str | None = None  # days since the group's previous order
    align_end: dt.date | None = None  # the date of every group's last order


def parse_sequence(spec: dict, key: str) -> SequenceRule:
    """Check the options of ``ts: {from_sequence: ...}`` (see ``docs/importing.md``).

    Args:
        spec: the ``ts`` mapping (its keys already checked against the rule's options).
        key: its YAML path.

    Returns:
        The rule (``anchor_format`` not yet checked: the caller knows the time formats).

    Raises:
        RuleError: a bad column name, date or step, or a missing or conflicting start.
    """
    names = {}
    for k in ("from_sequence", "per", "anchor", "hour", "gap_days_column"):
        v = spec.get(k)
        if v is not None and (not isinstance(v, str) or not v):
            raise RuleError(f"{key}.{k}", f"expected a source column name, got {v!r}")
        names[k] = v
    start = _parse_date(spec.get("start"), f"{key}.start")
    align_end = _parse_date(spec.get("align_end"), f"{key}.align_end")
    if align_end is not None:
        for k in ("start", "anchor"):
            if spec.get(k) is not None:
                raise RuleError(f"{key}.align_end", f"not with {k}: align_end fixes the date "
                                "of each user's last order, start and anchor that of their "
                                "first; give one")
    step = spec.get("step_days")
    if step is None and names["gap_days_column"] is None:
        raise RuleError(f"{key}.step_days", "missing: days between a user's consecutive "
                        "orders (or gap_days_column, a column with them)")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 1):
        raise RuleError(f"{key}.step_days", f"expected a whole number >= 1, got {step!r}")
    if start is None and names["anchor"] is None and align_end is None:
        raise RuleError(f"{key}.start", "missing: the rule needs start (a date) or anchor "
                        "(a signup-date column), or both; or else align_end (the date of "
                        "every user's last order)")
    return SequenceRule(
        column=names["from_sequence"], per=names["per"] or "user_id", start=start, step_days=step,
        anchor=names["anchor"], anchor_format=spec.get("anchor_format", "iso"),
        hour=names["hour"], gap_column=names["gap_days_column"], align_end=align_end,
    )


def _parse_date(value: Any, key: str) -> dt.date | None:
    """A YAML date (``2024-06-30``, read as a date or a string); None stays None."""
    if value is None or (isinstance(value, dt.date) and not isinstance(value, dt.datetime)):
        return value
    if isinstance(value, dt.datetime):
        return value.date()
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError:
        raise RuleError(key, f"{value!r} is not a date (YYYY-MM-DD)") from None
