"""The day partitions of a table folder (local or an fsspec URL), each with a *stamp*: its
files' names, sizes and modification times, so that a fold over partitions can tell which
of them changed since it last read them (``features.running``, ``features.latest_rows``)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import fsspec


@dataclass(frozen=True)
class Part:
    """One source partition: its day, where it lives and its stamp."""

    day: dt.date
    path: str
    stamp: str


def partitions(table_dir: str, upto: dt.date, *, before: bool = False) -> list[Part]:
    """The ``date=YYYY-MM-DD`` partitions of a folder (local path or fsspec URL) up to
    ``upto`` (or strictly before it), oldest first, stamped from one recursive listing."""
    fs, path = fsspec.core.url_to_fs(table_dir)
    if not fs.exists(path):
        return []
    found = fs.find(path, detail=True)
    by_day: dict[dt.date, list[str]] = {}
    folders: dict[dt.date, str] = {}
    for name, info in found.items():
        folder = name.rstrip("/").rsplit("/", 2)
        if len(folder) < 2 or not folder[-2].startswith("date=") or not name.endswith(".parquet"):
            continue
        try:
            day = dt.date.fromisoformat(folder[-2].removeprefix("date="))
        except ValueError:
            continue
        if day > upto or (before and day == upto):
            continue
        modified = info.get("mtime") or info.get("LastModified") or info.get("ETag") or ""
        by_day.setdefault(day, []).append(f"{folder[-1]}:{info.get('size')}:{modified}")
        folders[day] = name.rsplit("/", 1)[0]
    return [Part(day, folders[day], "|".join(sorted(by_day[day]))) for day in sorted(by_day)]
