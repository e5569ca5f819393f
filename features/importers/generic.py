"""Import any shop's CSV or parquet export into the landing-zone contract, through a YAML mapping.

``import_generic`` is what callers use: it checks the mapping (``generic_mapping``), reads the
export's files (``generic_reading``), filters out the rows the mapping's filters remove
(``generic_rules``), builds the contract tables and drops the rows that break the contract,
by reason (``generic_tables``), and writes each UTC day that has events as
``events``, ``products`` and ``users`` partitions (all three, empty frames allowed) through
``contract.write_partition``: same files and mapping, same bytes.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from features import contract
from features.importers.generic_mapping import (
    ID_SALT_ENV,
    ColumnSpec,
    ImportMapping,
    MappingError,
    load_mapping,
)
from features.importers.generic_reading import filter_rows, input_files, read_source, text_values
from features.importers.generic_rules import Condition
from features.importers.generic_tables import (
    EventJoins,
    SourceReport,
    build_events,
    drop_uncatalogued,
    place_products,
    product_rows,
    products_from_events,
    pseudonymize,
    users_from_events,
    users_from_source,
)


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

    @property
    def filtered(self) -> dict[str, int]:
        return self.sources[0].filtered

    def source(self, label: str) -> SourceReport | None:
        """The report of one source by label ("events", "products", "users from events"...)."""
        return next((s for s in self.sources if s.label == label), None)

    def __str__(self) -> str:
        lines = [f"Generic import {self.name!r}:"]
        for s in self.sources:
            share = s.rows_kept / s.rows_in if s.rows_in else 0.0
            filtered = f"{s.rows_filtered:,} filtered out, " if s.filtered else ""
            lines.append(f"  {s.label}: {s.rows_in:,} rows in, {s.rows_kept:,} kept ({share:.1%}), "
                         f"{filtered}{s.rows_dropped:,} dropped")
            width = max((len(r) for r in (*s.filtered, *s.dropped)), default=0)
            lines += [f"    filtered {r:<{width}} {n:>9,}" for r, n in s.filtered.items()]
            lines += [f"    dropped {r:<{width}}  {n:>9,}" for r, n in s.dropped.items()]
        span = f" ({self.first_day}..{self.last_day})" if self.first_day else ""
        lines.append(f"wrote {self.days:,} days{span}: {self.events:,} events, {self.users:,} "
                     f"users, {self.products:,} products under {self.root}")
        return "\n".join(lines)


DEFAULT_MAX_DROP_SHARE = 0.01


class TooManyDrops(ValueError):
    """An import would drop more than its allowed share of a source's rows; nothing was written.

    ``report`` is what the import would have kept and dropped; ``over`` names each source above
    the share with its dropped share and its reasons (most rows first).
    """

    def __init__(self, report: ImportReport, max_share: float):
        self.report = report
        self.max_share = max_share
        self.over = [s for s in report.sources if _dropped_share(s) > max_share]
        lines = [f"the import would drop more than {max_share:.1%} of the rows of "
                 f"{len(self.over)} source(s); nothing was written:"]
        for s in self.over:
            reasons = sorted((-n, r) for r, n in s.dropped.items() if n)
            named = ", ".join(f"{r} {-n:,}" for n, r in reasons)
            lines.append(f"  {s.label}: {s.rows_dropped:,} of {s.rows_in - s.rows_filtered:,} rows "
                         f"({_dropped_share(s):.1%}): {named}")
        lines.append("fix the mapping or the export (docs/importing.md lists each reason), or "
                     "accept the loss with --allow-drops (or a higher --max-drop-share)")
        super().__init__("\n".join(lines))


def _dropped_share(source: SourceReport) -> float:
    """The share of the rows the mapping meant to keep (not filtered out) that were dropped."""
    meant = source.rows_in - source.rows_filtered
    return source.rows_dropped / meant if meant else 0.0


def _salt(m: ImportMapping) -> str | None:
    """The salt that hashes user ids (``$SHOPREC_ID_SALT``, else the mapping's ``id_salt``);
    None when the mapping keeps them as they are."""
    if not m.hash_user_id:
        return None
    salt = os.environ.get(ID_SALT_ENV) or m.id_salt
    if not salt:
        raise MappingError("mapping.hash_user_id", f"needs a salt: set ${ID_SALT_ENV} "
                           "(preferred: keeps it out of the file) or id_salt in the mapping")
    return salt


def _by_day(frame: pd.DataFrame) -> dict[dt.date, pd.DataFrame]:
    """A table's rows split by their ``day`` column (dropped), in day order."""
    if frame.empty:
        return {}
    return {day: g.drop(columns="day") for day, g in frame.groupby("day", sort=True)}


def import_generic(mapping: str | Path | ImportMapping, root: str, *, inputs: Sequence[str] = (),
                   progress: bool = False,
                   max_drop_share: float | None = DEFAULT_MAX_DROP_SHARE) -> ImportReport:
    """Import a shop's export through a mapping and write daily contract partitions.

    Args:
        mapping: the YAML mapping file (or an already loaded one).
        root: landing-zone root to write ``events``, ``products`` and ``users`` under.
        inputs: files that replace the mapping's source paths: plain paths are events files,
            ``products=PATH`` and ``users=PATH`` those of the other sources.
        progress: show a progress bar over the days written.
        max_drop_share: the largest share of any source's rows (events, products, users, and
            what is derived from the events) that may be dropped; above it nothing is written
            and ``TooManyDrops`` names the sources and reasons. None accepts any loss. Rows
            the mapping filters out on purpose are not counted, neither as dropped nor in
            the rows the share is of.

    Returns:
        Rows read, kept, filtered out and dropped (by reason) per source, and what was
        written.

    Raises:
        TooManyDrops: a source lost more than ``max_drop_share`` of its rows.
        MappingError: a bad mapping, a missing file or column, or user ids that are direct
            identifiers without ``hash_user_id`` (``DirectIdentifierError``).
    """
    m = mapping if isinstance(mapping, ImportMapping) else load_mapping(mapping)
    files = input_files(m, inputs)
    salt = _salt(m)
    # sections without a source read their columns from the events file
    event_specs: list[ColumnSpec | Condition] = [*m.events.columns.values(), *m.events.filter]
    for section in (m.products, m.users):
        if section.source is None:
            event_specs += list(section.columns.values())
    raw = read_source(files["events"], m.events.source, event_specs, "events")
    reports: list[SourceReport] = []

    # the products and users files first: what their filters remove takes its events along
    joins = EventJoins()
    if m.products.source is not None:
        praw = read_source(files["products"], m.products.source,
                           [*m.products.columns.values(), *m.products.filter], "products")
        p_filtered = filter_rows(praw, m.products)
        pids = text_values(praw, m.products.columns["product_id"])
        in_file = None
        if m.events.require_product_in_catalog:
            in_file = set(pids[~p_filtered.out].dropna())
        joins = replace(joins, products=p_filtered.by_id(pids), product_names=p_filtered.names,
                        listed_products=in_file)
    if m.users.source is not None:
        uraw = read_source(files["users"], m.users.source,
                           [*m.users.columns.values(), *m.users.filter], "users")
        u_filtered = filter_rows(uraw, m.users)
        uids = text_values(uraw, m.users.columns["user_id"])
        uids = pseudonymize(uids, salt) if salt is not None else uids
        joins = replace(joins, users=u_filtered.by_id(uids), user_names=u_filtered.names)
    events, ev_reason, ev_filtered = build_events(raw, m, salt, filter_rows(raw, m.events),
                                                  joins)

    # the catalogue next: events whose product cannot enter it are dropped
    price_spec = m.products.columns.get("price")
    price_default = price_spec.default if price_spec is not None else None
    if m.products.source is not None:
        prows, p_reason = product_rows(praw, m.products, events, p_filtered)
        listed = set(prows["product_id"][p_reason < 0])
        unlisted = set(events["product_id"].dropna()) - listed
        extra, extra_report = products_from_events(events, raw, None, unlisted,
                                                   "products from events", price_default)
        catalogue = listed | set(extra["product_id"])
    else:
        extra, extra_report = products_from_events(events, raw, m.products, None,
                                                   "products from events", price_default,
                                                   m.events.source)
        catalogue = set(extra["product_id"])
    events, report = drop_uncatalogued(events, ev_reason, catalogue, ev_filtered)
    reports.append(report)
    event_days = np.array(sorted(set(events["day"])), dtype="datetime64[D]")

    if m.products.source is not None:
        products, report = place_products(prows, p_reason, events, event_days, p_filtered,
                                          m.products.only_with_events)
        reports.append(report)
        products = pd.concat([products, extra], ignore_index=True)
        if extra_report.rows_in:
            reports.append(extra_report)
    else:
        products = extra
        reports.append(extra_report)

    if m.users.source is not None:
        users, report = users_from_source(uraw, m.users, events, event_days, salt, u_filtered)
        reports.append(report)
        unlisted = set(events["user_id"]) - set(users["user_id"])
        extra, report = users_from_events(events, raw, None, unlisted, event_days,
                                          "users from events")
        users = pd.concat([users, extra], ignore_index=True)
        if report.rows_in:
            reports.append(report)
    else:
        users, report = users_from_events(events, raw, m.users, None, event_days,
                                          "users from events")
        reports.append(report)

    ev_days = _by_day(events.drop(columns="_pos"))
    pr_days = _by_day(products)
    us_days = _by_day(users)
    days = sorted(ev_days)  # products and users were placed on days of events
    result = ImportReport(
        name=m.name, root=root, sources=tuple(reports), days=len(days),
        first_day=days[0] if days else None, last_day=days[-1] if days else None,
        users=len(users), products=len(products), events=len(events),
    )
    if max_drop_share is not None and any(_dropped_share(s) > max_drop_share for s in reports):
        raise TooManyDrops(result, max_drop_share)
    empty = {t: pd.DataFrame(columns=list(contract.SCHEMAS[t].names)) for t in contract.TABLES}
    for day in tqdm(days, desc=f"import {m.name}", unit="day", disable=not progress):
        contract.write_partition(root, "events", day, ev_days[day])
        contract.write_partition(root, "products", day, pr_days.get(day, empty["products"]))
        contract.write_partition(root, "users", day, us_days.get(day, empty["users"]))
    return result
