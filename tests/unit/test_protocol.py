"""The evaluation protocol: split rules, both settings, metrics, segments, the result table."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import pytest

from training.data import TrainData, catalog_at, default_cut, temporal_split, validation_split
from training.evaluation.metrics import exposure_gini_at_k, gini
from training.evaluation.protocol import run_protocol
from training.evaluation.report import ProtocolResult
from training.metrics import top_k
from training.recommender import Recommender, ScoredRecommender

pytestmark = pytest.mark.fast

T0 = pd.Timestamp("2026-01-01", tz="UTC")


def day(d: float) -> pd.Timestamp:
    return T0 + pd.Timedelta(days=d)


def events_frame(rows: Sequence[tuple]) -> pd.DataFrame:
    """(user, product, event_type, day[, quantity]) rows as contract events."""
    out = []
    for i, row in enumerate(rows):
        user, product, kind, d = row[:4]
        out.append({"event_id": f"e{i:04d}", "user_id": user, "product_id": product,
                    "event_type": kind, "query": None,
                    "quantity": row[4] if len(row) > 4 else 1, "price": 1.0, "ts": day(d)})
    return pd.DataFrame(out)


def catalog_frame(first_seen: Mapping[str, float]) -> pd.DataFrame:
    return pd.DataFrame([{"product_id": p, "title": f"product {p}", "description": None,
                          "category": "c", "brand": None, "price": 1.0, "image_url": None,
                          "updated_at": day(d)} for p, d in first_seen.items()])


# cut at day 40 (the last event, day 70, minus 30)
SHOP_EVENTS = events_frame([
    ("u1", "a", "purchase", 1), ("u1", "b", "purchase", 2), ("u1", "c", "view", 3),
    ("u1", "a", "purchase", 45), ("u1", "c", "purchase", 46), ("u1", "d", "view", 47),
    ("u2", "a", "purchase", 5),
    ("u2", "a", "purchase", 50),  # only a repeat: gone in setting "new"
    ("u3", "b", "view", 10),
    ("u3", "b", "add_to_cart", 55),  # no purchase after the cut: not a test user
    ("u4", "e", "purchase", 60),  # nothing before the cut: not a test user
    ("u5", "a", "purchase", 20), ("u5", "b", "purchase", 21), ("u5", "c", "purchase", 22),
    ("u5", "d", "purchase", 23),  # 4 past events: not a cold user
    ("u5", "e", "purchase", 70),  # e is first seen after the cut: in truth, not a candidate
])
SHOP_CATALOG = catalog_frame({"a": 0, "b": 0, "c": 0, "d": 15, "e": 60})


@pytest.fixture
def split():
    return temporal_split(SHOP_EVENTS, SHOP_CATALOG)


def test_default_cut_is_the_last_event_minus_the_test_window() -> None:
    assert default_cut(SHOP_EVENTS) == day(40)
    assert default_cut(SHOP_EVENTS, test_days=10) == day(60)


def test_test_users_had_an_event_before_and_a_purchase_after(split) -> None:
    assert split.cut == day(40)
    assert split.users("all") == ["u1", "u2", "u5"]
    assert split.truth["all"] == {"u1": {"a", "c"}, "u2": {"a"}, "u5": {"e"}}


def test_setting_new_drops_past_purchases_from_truth_and_candidates(split) -> None:
    # u1 bought a before (removed); c was only viewed before (stays); u2's truth empties
    assert split.truth["new"] == {"u1": {"c"}, "u5": {"e"}}
    assert split.exclude["u1"] == {"a", "b"}  # purchases only, not the view of c
    assert split.exclusions("all") is None
    assert split.exclusions("new")["u5"] == {"a", "b", "c", "d"}


def test_train_data_holds_only_what_was_known_before_the_cut(split) -> None:
    train = split.train
    assert train.events["ts"].max() < split.cut
    assert len(train.events) == 9
    assert train.product_ids == ["a", "b", "c", "d"]  # e appears after the cut
    assert train.users == ["u1", "u2", "u3", "u5"]


def test_explicit_cut_and_window_ignore_later_events() -> None:
    split = temporal_split(SHOP_EVENTS, SHOP_CATALOG, cut="2026-02-10", test_days=12)
    assert split.cut == day(40) and split.end == day(52)
    # u1's purchases on days 45/46 and u2's on day 50 are inside; u5's on day 70 is not
    assert split.truth["all"] == {"u1": {"a", "c"}, "u2": {"a"}}


def test_catalog_at_takes_the_latest_row_before_the_cut() -> None:
    rows = pd.concat([catalog_frame({"a": 0, "b": 5}),
                      catalog_frame({"a": 10}).assign(price=2.0),
                      catalog_frame({"a": 50}).assign(price=3.0)], ignore_index=True)
    at = catalog_at(rows, day(20))
    assert at["product_id"].tolist() == ["a", "b"]
    assert at.set_index("product_id").loc["a", "price"] == 2.0
    assert catalog_at(rows, day(3))["product_id"].tolist() == ["a"]


def test_catalog_snapshot_keeps_products_sold_before_the_cut() -> None:
    snapshot = catalog_frame({"a": 30})  # updated after the cut, but sold before it
    sold = events_frame([("u", "a", "purchase", 5)])
    assert catalog_at(snapshot, day(10), sold)["product_id"].tolist() == ["a"]
    assert catalog_at(snapshot, day(10)).empty


def test_validation_split_lies_strictly_before_the_test_cut(split) -> None:
    val = validation_split(split.train, days=30)
    assert val.cut == day(10) and val.end == split.cut
    assert val.train.events["ts"].max() < val.cut
    # u5 bought a..d in days 20-23, inside the window, but had no event before day 10
    assert val.truth["all"] == {}


def test_validation_split_truth() -> None:
    events = events_frame([
        ("u1", "a", "purchase", 1), ("u1", "b", "purchase", 12),
        ("u2", "c", "view", 2), ("u2", "c", "purchase", 14),
        ("u1", "z", "purchase", 45),  # test period: never in the validation split
    ])
    split = temporal_split(events, catalog_frame({"a": 0, "b": 0, "c": 0, "z": 0}))
    val = validation_split(split.train, days=10)
    assert split.cut == day(15) and val.cut == day(5)
    assert val.truth["all"] == {"u1": {"b"}, "u2": {"c"}}
    assert "z" not in set(val.train.events["product_id"])


@pytest.mark.parametrize(("counts", "expected"), [
    ([1, 1, 1, 1], 0.0),
    ([0, 0, 0, 4], 0.75),  # one of n takes all: (n - 1) / n
    ([1, 2, 3], ((-2) * 1 + 0 * 2 + 2 * 3) / (3 * 6)),
    ([0, 0], 0.0),
])
def test_gini(counts, expected) -> None:
    assert gini(counts) == pytest.approx(expected)


def test_exposure_gini_counts_unrecommended_products() -> None:
    ranked = [["a", "b"], ["a", "c"]]
    # exposure at 1: a twice, b, c, d never -> [0, 0, 0, 2]
    assert exposure_gini_at_k(ranked, ["a", "b", "c", "d"], [1])["gini_at_1"] == pytest.approx(0.75)
    # at 2: [2, 1, 1, 0] sorted [0, 1, 1, 2]: (-3*0 - 1*1 + 1*1 + 3*2) / (4 * 4)
    assert exposure_gini_at_k(ranked, ["a", "b", "c", "d"], [2])["gini_at_2"] == pytest.approx(6 / 16)


def test_top_k_breaks_ties_by_column() -> None:
    scores = np.array([[0.5, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert top_k(scores, 3).tolist() == [[1, 2, 0], [0, 1, 2]]


class Fixed:
    """A recommender with fixed lists per user (and a record of what it was asked)."""

    def __init__(self, lists: Mapping[str, list[str]], name: str = "fixed"):
        self.lists = lists
        self.name = name
        self.asked: list[tuple[list[str], int, Mapping | None]] = []
        self.fitted_on: TrainData | None = None

    def fit(self, data: TrainData) -> Fixed:
        self.fitted_on = data
        return self

    def recommend(self, user_ids, k, *, exclude=None):
        self.asked.append((list(user_ids), k, exclude))
        return [[p for p in self.lists[u] if p not in (exclude or {}).get(u, set())][:k]
                for u in user_ids]


def _dcg(ranks: Sequence[int]) -> float:
    return sum(1 / math.log2(r + 1) for r in ranks)


def test_run_protocol_metrics_on_a_hand_computed_case() -> None:
    method = Fixed({"u1": ["c", "b", "a"], "u2": ["b", "a"], "u5": ["a", "b"]})
    assert isinstance(method, Recommender)
    result = run_protocol(SHOP_EVENTS, SHOP_CATALOG, [method], ks=(1, 2))
    assert method.fitted_on is not None and method.fitted_on.cut == day(40)
    a = result.metrics["fixed"]["all"]["all"]
    # u1 truth {a, c}: [c, b] -> recall@1 .5, @2 .5; u2 {a}: [b, a] -> 0, 1; u5 {e}: 0, 0
    assert a["recall_at_1"] == pytest.approx((0.5 + 0 + 0) / 3)
    assert a["recall_at_2"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert a["hit_rate_at_2"] == pytest.approx(2 / 3)
    assert a["ndcg_at_2"] == pytest.approx((1 / _dcg([1, 2]) + _dcg([2]) / 1 + 0) / 3)
    assert a["coverage_at_1"] == pytest.approx(3 / 4)  # c, b, a of a..d
    assert a["n_users"] == 3
    # setting "new": u1 {c} with a, b excluded -> [c]; u5 {e} with a..d excluded -> []
    b = result.metrics["fixed"]["new"]["all"]
    assert b["recall_at_1"] == pytest.approx(0.5) and b["n_users"] == 2
    new_call = method.asked[1]
    assert new_call[0] == ["u1", "u5"] and new_call[1] == 2
    assert new_call[2]["u1"] == {"a", "b"}
    assert result.n_users == {"all": 3, "new": 2}
    assert result.n_products == 4


def test_segments() -> None:
    method = Fixed({"u1": ["a", "c"], "u2": ["a"], "u5": ["d", "a"]})
    result = run_protocol(SHOP_EVENTS, SHOP_CATALOG, [method], ks=(2,))
    cold = result.metrics["fixed"]["all"]["cold_users"]
    # u1 (3 past events) and u2 (1) are cold, u5 (4) is not
    assert cold["n_users"] == 2 and cold["recall_at_2"] == pytest.approx(1.0)
    new = result.metrics["fixed"]["all"]["new_products"]
    # d is the only product first seen in the 30 days before the cut; nobody bought it after
    assert new["n_users"] == 0


def test_new_products_segment_restricts_the_truth() -> None:
    events = pd.concat([SHOP_EVENTS, events_frame([("u1", "d", "purchase", 48)])],
                       ignore_index=True)
    events["event_id"] = [f"x{i:04d}" for i in range(len(events))]
    method = Fixed({"u1": ["d", "a"], "u2": ["a"], "u5": ["a"]})
    result = run_protocol(events, SHOP_CATALOG, [method], ks=(1,))
    seg = result.metrics["fixed"]["all"]["new_products"]
    assert seg["n_users"] == 1 and seg["recall_at_1"] == pytest.approx(1.0)


class Scores(ScoredRecommender):
    """Fixed scores for every user: a[i] for product i."""

    name = "scores"

    def __init__(self, row: Sequence[float]):
        self.row = np.asarray(row, dtype=np.float32)

    def _fit(self, data: TrainData) -> None:
        assert len(data.product_ids) == len(self.row)

    def scores(self, user_ids):
        return np.tile(self.row, (len(user_ids), 1))


def test_scored_recommender_leaves_out_excluded_products(split) -> None:
    rec = Scores([0.1, 0.9, 0.5, 0.3]).fit(split.train)
    assert rec.recommend(["u1", "u2"], 3) == [["b", "c", "d"], ["b", "c", "d"]]
    got = rec.recommend(["u1", "u2"], 3, exclude={"u1": {"b", "c", "d"}})
    assert got == [["a"], ["b", "c", "d"]]


def test_result_round_trips_through_json_and_renders_markdown(tmp_path) -> None:
    result = run_protocol(SHOP_EVENTS, SHOP_CATALOG,
                          [Fixed({"u1": ["c"], "u2": ["a"], "u5": ["a"]}),
                           Scores([0.1, 0.9, 0.5, 0.3])])
    path = tmp_path / "r.json"
    result.to_json(path)
    back = ProtocolResult.from_dict(json.loads(path.read_text()))
    assert back == result
    text = result.to_markdown(reference={"all": {"issue popularity": {"recall_at_50": 0.166}}})
    assert "(a) all products" in text and "(b) new products only" in text
    assert "| fixed |" in text and "| scores |" in text and "| issue popularity |" in text
    assert "R@50" in text and "Gini@10" in text and "cold_users" in text
    assert result.table("all").loc["fixed", "recall_at_10"] == pytest.approx(
        result.value("fixed", "all", "recall_at_10"))


def test_run_protocol_refuses_duplicate_names_and_no_test_users() -> None:
    with pytest.raises(ValueError, match="unique"):
        run_protocol(SHOP_EVENTS, SHOP_CATALOG, [Fixed({}), Fixed({})])
    with pytest.raises(ValueError, match="no test users"):
        run_protocol(SHOP_EVENTS, SHOP_CATALOG, [Fixed({})], cut="2026-01-02", test_days=1)


# -- the command line -------------------------------------------------------------------


def test_cli_model_evaluate_writes_json_and_markdown(shop_home, tmp_path) -> None:
    from typer.testing import CliRunner

    from features.synth import generate_shop
    from shoprec.cli import app

    root = tmp_path / "landing"
    generate_shop(str(root), days=21, users=120, products=50, seed=5)
    out = tmp_path / "report" / "quality.json"
    result = CliRunner().invoke(app, [
        "model", "evaluate", "--root", str(root), "--cut", "2026-01-15", "--test-days", "7",
        "--epochs", "1", "--out", str(out), "--blends",
    ])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    methods = ["popularity", "repeat", "item_knn", "als", "text_cosine", "two_tower",
               "blend_weights", "blend", "served"]
    assert list(data["metrics"]) == methods
    assert data["cut"].startswith("2026-01-15") and data["test_days"] == 7
    for method in methods:
        for setting in ("all", "new"):
            assert 0.0 <= data["metrics"][method][setting]["all"]["recall_at_50"] <= 1.0
    assert data["params"]["blend_weights"]["validation_cut"].startswith("2026-01-08")
    assert data["params"]["served"]["two_tower"] is True
    markdown = out.with_suffix(".md").read_text()
    assert "| blend |" in markdown and "(b) new products only" in markdown
    assert markdown in result.output and "wrote" in result.output


def test_cli_model_evaluate_explains_an_empty_test_window(shop_home, tmp_path) -> None:
    from typer.testing import CliRunner

    from features.synth import generate_shop
    from shoprec.cli import app

    root = tmp_path / "landing"
    generate_shop(str(root), days=5, users=30, products=20, seed=5)
    result = CliRunner().invoke(app, ["model", "evaluate", "--root", str(root),
                                      "--cut", "2027-01-01", "--no-two-tower"])
    assert result.exit_code == 2
    assert "no test users" in result.output


def test_train_data_builds_each_matrix_once_and_hands_out_copies(split) -> None:
    data = split.train
    first = data.interactions(event_types=("purchase",), weight="count")
    first.data[:] = 99.0  # a caller writing into its matrix changes nobody else's
    again = data.interactions(event_types=("purchase",), weight="count")
    fresh = data._interactions(("purchase",), "count", None, None)
    assert (again != fresh).nnz == 0 and again.sum() == fresh.sum() < 99
    assert sum(k[0] == "interactions" for k in data.memo if isinstance(k, tuple)) == 1
    products, types = data.histories(["u1", "nobody"])
    products[0].append("x")  # the same for the grouped histories
    assert data.histories(["u1", "nobody"]) == ([["a", "b", "c"], []],
                                                [["purchase", "purchase", "view"], []])


def test_a_tiny_evaluation_warns_prints_na_and_sums_up_its_stages(shop_home, tmp_path) -> None:
    """Issue 16: a 7-user evaluation says so (and the gate refuses it); empty segments are
    n/a, never 0.000; the run ends with each stage's time and peak memory."""
    from typer.testing import CliRunner

    from features.synth import generate_shop
    from shoprec.cli import app
    from training.registry import PromotionPolicy, gate_decision

    root = tmp_path / "landing"
    generate_shop(str(root), days=21, users=40, products=30, seed=5)
    out = tmp_path / "tiny.json"
    result = CliRunner().invoke(app, [
        "model", "evaluate", "--root", str(root), "--cut", "2026-01-18", "--test-days", "3",
        "--no-two-tower", "--min-test-users", "1000", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    n = data["n_users"]["all"]
    assert 0 < n < 1000 and data["min_users"] == 1000
    assert f"WARNING: only {n} test users in (a) all products" in result.output
    assert "| stage | s | peak RSS MB |" in result.output and "| total |" in result.output
    assert all(data["peak_rss_mb"][m] > 0 for m in data["metrics"])
    # the gate refuses a version measured on so few users, whatever its figures
    promote, reason = gate_decision(PromotionPolicy(min_test_users=20, confidence=0),
                                    {"recall_at_50": 0.9, "best_baseline_recall_at_50": 0.1,
                                     "holdout_users": 7.0}, "2026-01-18", None, "1")
    assert not promote and "only 7 test users" in reason
    assert gate_decision(PromotionPolicy(min_test_users=0, confidence=0),
                         {"recall_at_50": 0.9, "best_baseline_recall_at_50": 0.1,
                          "holdout_users": 7.0}, "2026-01-18", None, "1")[0]
    # a segment without users prints n/a
    report = ProtocolResult.from_dict(data)
    for method in report.methods:  # as a split without cold users measures it
        segment = report.metrics[method]["all"]["cold_users"]
        segment.update({k: 0.0 for k in segment}, n_users=0.0)
    cold = report.to_markdown().split("segment cold_users (0 users)")[1].split("####")[0]
    rows = [line for line in cold.splitlines() if line.startswith("| ") and "R@" not in line]
    assert len(rows) == len(report.methods)
    assert all(line.count("n/a") == 6 and "0.000" not in line for line in rows)


def test_min_test_users_setting(monkeypatch) -> None:
    from core.settings import DEFAULT_MIN_TEST_USERS, min_test_users

    monkeypatch.delenv("SHOPREC_MIN_TEST_USERS", raising=False)
    assert min_test_users() == DEFAULT_MIN_TEST_USERS
    monkeypatch.setenv("SHOPREC_MIN_TEST_USERS", "0")
    assert min_test_users() == 0
    monkeypatch.setenv("SHOPREC_MIN_TEST_USERS", "few")
    with pytest.raises(ValueError, match="whole number"):
        min_test_users()
