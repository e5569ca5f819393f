"""Quarantine never loses a file, refuses reruns until release, and the CLI drives it."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from core.settings import Settings
from features.contract import TABLES
from features.quarantine import (
    QuarantineError,
    is_quarantined,
    list_quarantined,
    quarantine_day,
    quarantine_dir,
    quarantine_status,
    release_day,
)
from features.synth import generate_shop
from features.validation import (
    PartitionInvalid,
    PartitionQuarantined,
    check_partition,
    validate_day,
)
from features.validation_report import ValidationReport
from shoprec.cli import app

pytestmark = pytest.mark.fast

START = dt.date(2026, 1, 1)
DAY = START + dt.timedelta(days=2)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pristine") / "landing"
    generate_shop(str(root), days=3, users=40, products=30, seed=3, start=START)
    return root


@pytest.fixture
def shop(pristine: Path, tmp_path: Path) -> Settings:
    landing = tmp_path / "landing"
    shutil.copytree(pristine, landing)
    return Settings(home=tmp_path / "state", landing_root=str(landing))


def _events_file(root: str | Path) -> Path:
    return Path(root) / "events" / f"date={DAY}" / "part-0.parquet"


def _land_bad_events(root: str | Path, quantity: int = 0) -> bytes:
    """Overwrite the day's events with a bad quantity; returns the bytes landed."""
    path = _events_file(root)
    pd.read_parquet(path).assign(quantity=quantity).to_parquet(path, index=False)
    return path.read_bytes()


def _landing_bytes(settings: Settings) -> dict[str, bytes]:
    root = Path(settings.landing_root)
    return {str(p.relative_to(root)): p.read_bytes()
            for t in TABLES for p in (root / t / f"date={DAY}").glob("*")}


def test_validating_a_good_partition_twice_changes_nothing(shop: Settings) -> None:
    before = _landing_bytes(shop)
    first = check_partition(shop, DAY)
    second = check_partition(shop, DAY)
    assert first["rows"] == second["rows"] and first["summary"] == second["summary"]
    assert _landing_bytes(shop) == before
    assert quarantine_status(shop.home, DAY) is None


def test_quarantining_twice_loses_no_file(shop: Settings) -> None:
    first = _land_bad_events(shop.landing_root, quantity=0)
    with pytest.raises(PartitionInvalid):
        check_partition(shop, DAY)
    # The shop re-delivers, still broken and different, before anyone released the day.
    events_dir = _events_file(shop.landing_root).parent
    events_dir.mkdir(parents=True)
    shutil.copyfile(quarantine_dir(shop.home, "events", DAY) / "part-0.parquet",
                    events_dir / "part-0.parquet")
    second = _land_bad_events(shop.landing_root, quantity=-3)
    report = validate_day(shop.landing_root, DAY, shop.home / "validation")
    record = quarantine_day(shop.home, shop.landing_root, DAY, report)

    folder = quarantine_dir(shop.home, "events", DAY)
    assert sorted(p.read_bytes() for p in folder.iterdir()) == sorted([first, second])
    assert [h["event"] for h in record.history] == ["quarantined", "quarantined"]
    # and the same bytes a third time add nothing
    events_dir.mkdir(parents=True)
    (events_dir / "part-0.parquet").write_bytes(second)
    quarantine_day(shop.home, shop.landing_root, DAY, report)
    assert len(list(folder.iterdir())) == 2
    assert not events_dir.exists()


def test_rerun_before_release_is_refused_with_what_to_do(shop: Settings) -> None:
    _land_bad_events(shop.landing_root)
    with pytest.raises(PartitionInvalid) as first:
        check_partition(shop, DAY)
    since = first.value.quarantine.since
    with pytest.raises(PartitionQuarantined) as again:
        check_partition(shop, DAY)
    message = str(again.value)
    assert f"partition {DAY} is quarantined since {since}" in message
    assert f"`shoprec data release {DAY} --reason ...`" in message
    assert "quantity_at_least_1" in message
    assert [r.day for r in list_quarantined(shop.home)] == [DAY]


def test_events_not_yet_arrived_fail_without_quarantine(shop: Settings) -> None:
    shutil.rmtree(_events_file(shop.landing_root).parent)
    with pytest.raises(PartitionInvalid) as err:
        check_partition(shop, DAY)
    assert "shoprec_partition_exists" in str(err.value)
    assert err.value.quarantine is None and not is_quarantined(shop.home, DAY)
    # missing data is not bad data: the day's other tables stay where they landed
    assert (Path(shop.landing_root) / "products" / f"date={DAY}").exists()


def test_release_needs_a_quarantined_day_and_a_reason(shop: Settings) -> None:
    with pytest.raises(QuarantineError, match="not quarantined"):
        release_day(shop.home, shop.landing_root, DAY, reason="nothing to do")
    _land_bad_events(shop.landing_root)
    with pytest.raises(PartitionInvalid):
        check_partition(shop, DAY)
    with pytest.raises(QuarantineError, match="reason"):
        release_day(shop.home, shop.landing_root, DAY, reason="  ")
    assert is_quarantined(shop.home, DAY)


def test_release_moves_nothing_when_the_landing_zone_has_other_files(shop: Settings) -> None:
    _land_bad_events(shop.landing_root)
    with pytest.raises(PartitionInvalid):
        check_partition(shop, DAY)
    in_the_way = _events_file(shop.landing_root)
    in_the_way.parent.mkdir(parents=True)
    in_the_way.write_bytes(b"somebody else's file")
    quarantined = sorted(p for t in TABLES for p in quarantine_dir(shop.home, t, DAY).iterdir())

    with pytest.raises(QuarantineError, match="already holds"):
        release_day(shop.home, shop.landing_root, DAY, reason="fixed")

    assert in_the_way.read_bytes() == b"somebody else's file"
    assert all(p.exists() for p in quarantined) and is_quarantined(shop.home, DAY)
    assert not (Path(shop.landing_root) / "products" / f"date={DAY}").exists()


def test_report_falls_back_to_a_plain_html_table_when_data_docs_fail(
        shop: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: ValidationReport, target: Path) -> Path:
        raise RuntimeError("renderer exploded")

    monkeypatch.setattr(ValidationReport, "build_data_docs", broken)
    _land_bad_events(shop.landing_root)
    with pytest.raises(PartitionInvalid) as err:
        check_partition(shop, DAY)
    record = err.value.quarantine
    assert record.data_docs is None
    page = record.report_html.read_text(encoding="utf-8")
    assert "could not be built" in page and "renderer exploded" in page
    assert "quantity_at_least_1" in page and "expect_column_values_to_be_between" in page


def test_data_docs_are_gx_pages_of_the_failing_table(shop: Settings) -> None:
    _land_bad_events(shop.landing_root)
    with pytest.raises(PartitionInvalid) as err:
        check_partition(shop, DAY)
    docs = err.value.quarantine.data_docs
    pages = [p.relative_to(docs.parent).parts[:2] for p in docs.parent.rglob("*.html")]
    assert ("validations", "landing_events") in pages
    assert ("validations", "landing_products") not in pages  # it passed
    assert "data_docs/index.html" in err.value.quarantine.report_html.read_text()


# --- the command line -------------------------------------------------------------------------


@pytest.fixture
def cli_shop(pristine: Path, shop_home: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """A shop under SHOPREC_HOME; the variables `prepare()` exports are restored afterwards."""
    shutil.copytree(pristine, shop_home / "landing")
    settings = Settings.from_env()
    for key in settings.service_env():
        monkeypatch.setenv(key, settings.service_env()[key])
    return settings


def test_cli_validate_reports_without_moving_unless_asked_then_release(
        cli_shop: Settings) -> None:
    runner = CliRunner()
    root = cli_shop.landing_root
    _land_bad_events(root)

    plain = runner.invoke(app, ["data", "validate", "--root", root, "--date", str(DAY)])
    assert plain.exit_code == 1, plain.output
    assert "expect_column_values_to_be_between column=quantity" in plain.output
    assert _events_file(root).exists() and not is_quarantined(cli_shop.home, DAY)

    moved = runner.invoke(app, ["data", "validate", "--root", root, "--date", str(DAY),
                                "--quarantine"])
    assert moved.exit_code == 1 and "report:" in moved.output
    assert is_quarantined(cli_shop.home, DAY) and not _events_file(root).exists()

    again = runner.invoke(app, ["data", "validate", "--root", root, "--date", str(DAY)])
    assert again.exit_code == 1 and "is quarantined since" in again.output

    bad = quarantine_dir(cli_shop.home, "events", DAY) / "part-0.parquet"
    pd.read_parquet(bad).assign(quantity=1).to_parquet(bad, index=False)
    released = runner.invoke(app, ["data", "release", str(DAY), "--root", root,
                                   "--reason", "quantities corrected by the shop"])
    assert released.exit_code == 0, released.output
    assert "released" in released.output
    assert quarantine_status(cli_shop.home, DAY).history[-1]["reason"] == (
        "quantities corrected by the shop")

    good = runner.invoke(app, ["data", "validate", "--root", root, "--date", str(DAY)])
    assert good.exit_code == 0, good.output
    assert f"partition {DAY} is valid" in good.output


def test_cli_release_of_a_day_that_is_not_quarantined_fails(cli_shop: Settings) -> None:
    result = CliRunner().invoke(app, ["data", "release", str(DAY), "--reason", "why not"])
    assert result.exit_code == 1
    assert "not quarantined" in result.output
