"""Test shops: state folders built, copied and switched between; the shoprec CLI on one; the
session's trained shop. Imported by the conftest files and the tests (a plain module, since
two conftest.py files cannot import each other by name)."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest

# --- Services of the production profile ---------------------------------------------------------

def postgres_database(name: str) -> str | None:
    """Create (once) and return the URL of a test database, or None if PostgreSQL is down."""
    try:
        import psycopg

        with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres",
                             autocommit=True, connect_timeout=3) as conn:
            exists = conn.execute("select 1 from pg_database where datname = %s",
                                  (name,)).fetchone()
            if not exists:
                conn.execute(f'create database "{name}"')
    except Exception:  # noqa: BLE001 - any failure means "not available here"
        return None
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def redis_up(db: int) -> bool:
    try:
        import redis

        return bool(redis.Redis(host="127.0.0.1", port=6379, db=db, socket_timeout=3).ping())
    except Exception:  # noqa: BLE001
        return False


def service_missing(what: str) -> None:
    if os.environ.get("SHOPREC_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{what} is required (SHOPREC_REQUIRE_SERVICES=1) but not reachable")
    pytest.skip(f"{what} not reachable on 127.0.0.1")


# --- One state folder's environment -----------------------------------------------------------

# Variables that belong to one state folder; a test that switches folders drops them all, so
# nothing of another shop wins through Settings.prepare()'s setdefault.
_STATE_VARIABLES = ("SHOPREC_", "MLFLOW_", "AIRFLOW_HOME", "AIRFLOW__DATABASE__")


# The test shops have a few dozen test users: every bootstrap interval reaches zero, and the
# gate at its default confidence would keep the first champion for ever. These tests are about
# the chain (each day's model promoted and served), so their gate compares point estimates;
# the confidence rule is tested in tests/unit/test_gate.py and
# tests/integration/test_gate_noise.py. For the same reason they have no minimum of test
# users (some days have 18 or 19, under the default 20; that rule is tested in
# tests/unit/test_protocol.py). ``extra`` can set either back.
TEST_SHOP_GATE = {"SHOPREC_PROMOTION_CONFIDENCE": "0", "SHOPREC_MIN_TEST_USERS": "0"}


def shop_env(home: Path, **extra: str) -> dict[str, str]:
    """A clean environment for a subprocess on one state folder: nothing inherited from
    other tests (``extra`` is added as it is)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIRFLOW", "SHOPREC_", "MLFLOW_"))}
    env.update({"SHOPREC_HOME": str(home), "SHOPREC_LANDING_ROOT": str(home / "landing"),
                "SHOPREC_TEXT_ENCODER": "tiny", "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "GX_ANALYTICS_ENABLED": "False",
                **TEST_SHOP_GATE, **extra})
    return env


@contextlib.contextmanager
def shop_environment(home: Path, **extra: str) -> Iterator:
    """This process on the state folder ``home`` (tiny text encoder, embedded profile unless
    ``extra`` says otherwise); the environment is restored afterwards, whatever happened.

    Yields:
        The prepared ``Settings``, with Airflow's variables exported too.
    """
    from core.settings import Settings

    forget_artifact_locations()
    saved = dict(os.environ)
    for key in [k for k in os.environ if k.startswith(_STATE_VARIABLES)]:
        del os.environ[key]
    os.environ.update({"SHOPREC_HOME": str(home), "SHOPREC_LANDING_ROOT": str(home / "landing"),
                       "SHOPREC_TEXT_ENCODER": "tiny", **TEST_SHOP_GATE, **extra})
    try:
        settings = Settings.from_env().prepare()
        os.environ.update(settings.airflow_env())
        yield settings
    finally:
        os.environ.clear()
        os.environ.update(saved)
        forget_artifact_locations()


def forget_artifact_locations() -> None:
    """Drop MLflow's process-wide cache of where each run's artifacts live. It is keyed by
    run id alone, and a copied shop has the same run ids as its original: without this, a
    test on a copy logs artifacts into the original (found when an index rebuilt on a copy
    landed in the session's shared trained shop)."""
    from mlflow.tracking._tracking_service import utils

    utils._artifact_repos_cache.clear()


def point_airflow_at(settings) -> None:
    """Make this process's (already imported) Airflow use ``settings``' metadata DB: Airflow
    reads its configuration once, on first import, and tests switch state folders."""
    from airflow import settings as airflow_settings
    from airflow.configuration import conf

    url = settings.airflow_env()["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    conf.set("database", "sql_alchemy_conn", url)
    airflow_settings.SQL_ALCHEMY_CONN = url
    airflow_settings.configure_orm()


# --- Copies of a built state folder -----------------------------------------------------------

_SQLITE_MAGIC = b"SQLite format 3\x00"


def clone_state(source: Path, target: Path) -> Path:
    """Copy a built state folder to ``target`` and make the copy its own.

    The SQLite databases (MLflow's store, Airflow's metadata, Feast's online store) hold
    absolute paths of the source (artifact locations, log folders): every text value that
    contains the source path is rewritten to the target's. The Feast registry holds the
    offline sources' paths: whoever reads the copy's offline store re-applies the repo
    (``features.store.apply_repo``) under the copy's settings. Building a state folder takes
    minutes; copying one takes a fraction of a second.

    Returns:
        ``target``.
    """
    shutil.copytree(source, target, symlinks=True)
    old, new = str(source), str(target)
    for path in target.rglob("*.db"):
        with path.open("rb") as head:
            if head.read(16) != _SQLITE_MAGIC:
                continue
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            tables = [r[0] for r in db.execute(
                "select name from sqlite_master where type = 'table'")]
            for table in tables:
                columns = [r[1] for r in db.execute(f'pragma table_info("{table}")')
                           if not r[2] or any(t in r[2].upper() for t in ("CHAR", "TEXT",
                                                                          "CLOB", "JSON"))]
                for column in columns:
                    db.execute(f'update "{table}" set "{column}" = replace("{column}", ?, ?) '
                               f'where instr("{column}", ?) > 0', (old, new, old))
    return target


# --- The shoprec CLI in a subprocess, on one state folder --------------------------------------

SHOPREC = str(Path(sys.executable).with_name("shoprec"))


def shoprec(home: Path, *args: str, timeout: float = 1500,
            extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``shoprec ARGS`` on the state folder ``home``; the result carries ``.seconds``."""
    started = time.monotonic()
    done = subprocess.run([SHOPREC, *args], env=shop_env(home, **(extra_env or {})),
                          capture_output=True, text=True, timeout=timeout)
    done.seconds = time.monotonic() - started  # type: ignore[attr-defined]
    return done


def synth(home: Path, days: int, users: int = 250, products: int = 80, seed: int = 11,
          start: str = "2026-01-01") -> None:
    """A synthetic shop's landing zone under ``home``, through ``shoprec data synth``."""
    done = shoprec(home, "data", "synth", "--days", str(days), "--users", str(users),
                   "--products", str(products), "--seed", str(seed), "--start", start)
    assert done.returncode == 0, done.stderr[-3000:]


# --- A shop's data ----------------------------------------------------------------------------

def known_user(settings) -> str:
    """The user with the most purchases in the shop's landing zone (all days)."""
    from features.contract import list_days, read_upto

    events = read_upto(settings.landing_root, "events",
                       max(list_days(settings.landing_root, "events")))
    buyers = events[events["event_type"] == "purchase"]["user_id"].value_counts()
    return str(buyers.index[0])


# --- Built once per session, across pytest-xdist workers ----------------------------------------

def built_once(tmp_path_factory: pytest.TempPathFactory, name: str,
               build: Callable[[Path], dict]) -> tuple[Path, dict]:
    """Run ``build(folder)`` once per test session and return (folder, what it returned).

    Under pytest-xdist the workers share one build: the first to ask builds under a file
    lock, the others wait and read its result (JSON). A build that failed is not tried
    again on the same folder: the others fail with its error.
    """
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        folder = tmp_path_factory.mktemp(name)
        return folder, build(folder)
    from filelock import FileLock

    folder = tmp_path_factory.getbasetemp().parent / name  # the session's, not the worker's
    folder.mkdir(exist_ok=True)
    done, failed = folder / "built.json", folder / "build-failed.txt"
    with FileLock(str(folder / ".lock")):
        if failed.exists():
            raise RuntimeError(f"building {name} failed in another worker:\n{failed.read_text()}")
        if not done.exists():
            try:
                done.write_text(json.dumps(build(folder)))
            except BaseException as exc:
                failed.write_text(f"{type(exc).__name__}: {exc}")
                raise
    return folder, json.loads(done.read_text())


# --- Feast on both profiles ----------------------------------------------------------------------

# Redis databases of the tests: a Feast shop per module and one for the copy of a writer,
# a pair per pytest-xdist worker (1-2 for the first, 3-4 for the second, ... up to 5
# workers); the production stack of the operations tier uses 11, the benchmarks 14.
_FEAST_DB, _COPY_DB = 1, 2
MAX_WORKERS = 5


def _worker_offset() -> int:
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    if worker >= MAX_WORKERS:
        raise RuntimeError(f"at most {MAX_WORKERS} pytest-xdist workers: Redis databases "
                           "1-10 are theirs")
    return 2 * worker


@dataclasses.dataclass(frozen=True)
class FeastProfile:
    """A Feast profile for a test shop: ``local`` (SQLite registry and online store) or
    ``prod`` (SQL registry in PostgreSQL, Redis online store), as environment variables."""

    name: str
    env: dict[str, str]

    @property
    def redis_db(self) -> int | None:
        url = self.env.get("SHOPREC_REDIS_URL", "")
        return int(url.rsplit("db=", 1)[1]) if "db=" in url else None


def feast_profile(name: str, project: str, redis_db: int | None = None) -> FeastProfile:
    """The profile ``name`` for a new shop: for prod, a Feast project of its own in the test
    database and an emptied Redis database (fails or skips when a service is missing)."""
    if name == "local":
        return FeastProfile("local", {})
    url = postgres_database("shoprec_test")
    if url is None:
        service_missing("PostgreSQL")
    db = (_FEAST_DB if redis_db is None else redis_db) + _worker_offset()
    if not redis_up(db):
        service_missing("Redis")
    import redis

    redis.Redis(host="127.0.0.1", port=6379, db=db).flushdb()
    return FeastProfile("prod", {"SHOPREC_PROFILE": "prod", "SHOPREC_FEAST_REGISTRY_URL": url,
                                 "SHOPREC_REDIS_URL": f"127.0.0.1:6379,db={db}",
                                 "SHOPREC_FEAST_PROJECT": f"{project}_{os.getpid()}"})


def _copy_online_rows(source: FeastProfile, target: FeastProfile) -> int:
    """Copy every online row of ``source``'s Feast project into ``target``'s (Redis keys
    end with the project's name; the values do not hold it). Returns the rows copied."""
    import redis

    old = source.env["SHOPREC_FEAST_PROJECT"].encode()
    new = target.env["SHOPREC_FEAST_PROJECT"].encode()
    src = redis.Redis(host="127.0.0.1", port=6379, db=source.redis_db)
    dst = redis.Redis(host="127.0.0.1", port=6379, db=target.redis_db)
    copied = 0
    for key in src.scan_iter(count=1000):
        if key.endswith(old):
            dst.restore(key[: -len(old)] + new, src.pttl(key) if src.pttl(key) > 0 else 0,
                        src.dump(key), replace=True)
            copied += 1
    return copied


def materialized_shop(home: Path, profile: FeastProfile, *, start: dt.date, days: int,
                      users: int, products: int, seed: int) -> Path:
    """A synthetic shop in ``home`` on ``profile``, built and materialized day by day in date
    order, as the DAG's data stages do. Returns ``home``."""
    from features.build import build_interval
    from features.store import materialize_day
    from features.synth import generate_shop

    with shop_environment(home, **profile.env) as settings:
        generate_shop(settings.landing_root, days=days, users=users, products=products,
                      seed=seed, start=start)
        for i in range(days):
            build_interval(settings, start + dt.timedelta(days=i))
            materialize_day(settings, start + dt.timedelta(days=i))
    return home


@contextlib.contextmanager
def feast_copy(home: Path, profile: FeastProfile, folder: Path) -> Iterator:
    """This process on a private copy of a built Feast shop (``home`` on ``profile``): the
    state folder copied (``clone_state``), the repo applied under the copy's settings and,
    on prod, the online rows copied into a Feast project and Redis database of the copy's.

    Yields:
        The copy's prepared ``Settings``.
    """
    target = clone_state(home, folder / "state")
    copy = profile if profile.name == "local" else feast_profile(
        "prod", f"copy_{profile.env['SHOPREC_FEAST_PROJECT']}", redis_db=_COPY_DB)
    with shop_environment(target, **copy.env) as settings:
        from features.store import apply_repo

        apply_repo(settings)
        if profile.name == "prod":
            assert _copy_online_rows(profile, copy) > 0, "the built shop has no online rows"
        yield settings


# --- The integration tier's trained shop --------------------------------------------------------

START = dt.date(2026, 1, 1)
DAYS = 8  # training needs 5 days of history: the last days train, each warm from the champion
LAST = START + dt.timedelta(days=DAYS - 1)
USERS, PRODUCTS, SEED = 250, 80, 11
NEW_ID = "NEW-0001"  # a product that lands on the last day and nobody has bought
ADMIN_TOKEN = "test-admin-token"


@dataclasses.dataclass(frozen=True)
class TrainedShop:
    """A built state folder and what building it reported."""

    home: Path
    days: list[dt.date]
    results: list  # shoprec.runs.DayResult, one per day, in date order
    versions: list[str]  # registered model versions, oldest first
    twin: pd.Series  # the catalogue row NEW_ID is a near twin of

    @property
    def last(self) -> dt.date:
        return self.days[-1]


def add_new_product(root: str, day: dt.date) -> pd.Series:
    """A near twin of an existing product, added on ``day``, never bought.

    Returns:
        The twin's catalogue row.
    """
    from features.contract import read_partition, read_upto, write_partition

    catalog = read_upto(root, "products", day)
    twin = catalog.sort_values("product_id").iloc[3].copy()
    new = twin.copy()
    new["product_id"] = NEW_ID
    new["title"] = f"{twin['title']} Deluxe"
    new["updated_at"] = pd.Timestamp(day, tz="UTC") + pd.Timedelta(hours=9)
    today = read_partition(root, "products", day)
    write_partition(root, "products", day, pd.concat([today, new.to_frame().T],
                                                     ignore_index=True))
    return twin


def build_trained_shop(home: Path) -> dict:
    """Synthetic shop -> a new product on the last day -> shoprec_daily for every day."""
    from features.synth import generate_shop
    from serving.publish import load_version_bundle
    from shoprec.runs import load_dag, migrate_metadata_db, run_day
    from training.registry import TAG_INTERVAL, mlflow_client

    days = [START + dt.timedelta(days=i) for i in range(DAYS)]
    assert days[-1] == LAST
    with shop_environment(home) as settings:
        generate_shop(settings.landing_root, days=DAYS, users=USERS, products=PRODUCTS,
                      seed=SEED, start=START)
        twin = add_new_product(settings.landing_root, days[-1])
        migrate_metadata_db(settings)
        point_airflow_at(settings)
        dag = load_dag(settings)
        results = [run_day(dag, day, settings.home / "logs") for day in days]
        versions = mlflow_client(settings).search_model_versions(
            f"name = '{settings.model_name}'")
        versions = [v.version for v in sorted(versions, key=lambda v: v.tags[TAG_INTERVAL])]
        for version in versions:  # the bundle cache filled now: readers never write to it
            load_version_bundle(settings, version)
    return {"days": [d.isoformat() for d in days],
            "results": [{**dataclasses.asdict(r), "day": r.day.isoformat()} for r in results],
            "versions": [str(v) for v in versions],
            "twin": json.loads(twin.to_json(date_format="iso"))}


def load_trained_shop(home: Path, manifest: dict) -> TrainedShop:
    from shoprec.runs import DayResult

    results = [DayResult(**{**r, "day": dt.date.fromisoformat(r["day"])})
               for r in manifest["results"]]
    return TrainedShop(home=home, days=[dt.date.fromisoformat(d) for d in manifest["days"]],
                       results=results, versions=manifest["versions"],
                       twin=pd.Series(manifest["twin"]))


@contextlib.contextmanager
def on_copy(trained_shop: TrainedShop, folder: Path, **extra: str) -> Iterator[tuple]:
    """This process on a private copy of the trained shop in ``folder``: (settings, shop).

    ``extra`` variables are set on top (another profile, say); the Feast repo is applied
    under the copy's settings, so its offline sources point into the copy.
    """
    home = clone_state(trained_shop.home, folder / "state")
    with shop_environment(home, SHOPREC_ADMIN_TOKEN=ADMIN_TOKEN,
                          SHOPREC_SERVING_POLL_SECONDS="0", **extra) as settings:
        from features.store import apply_repo

        apply_repo(settings)
        if settings.profile == "local":  # the copy's own Airflow metadata DB
            point_airflow_at(settings)
        yield settings, dataclasses.replace(trained_shop, home=home)


