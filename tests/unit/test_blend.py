"""The blend: examples from events, normalisation, weight search on validation only."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pytest

from training.config import TrainConfig
from training.data import TrainData, temporal_split
from training.evaluation.baselines import Popularity, Repeat
from training.evaluation.blends import (
    Blend,
    PurchaseContext,
    normalise_scores,
    search_weights,
    validation_fits,
)
from training.evaluation.models import TwoTowerRecommender
from training.evaluation.protocol import run_protocol
from training.event_examples import examples_from_events
from training.metrics import ndcg_at_k, recall_at_k, tuning_metrics
from training.recommender import ScoredRecommender

pytestmark = pytest.mark.fast

T0 = pd.Timestamp("2026-01-01", tz="UTC")


def events_frame(rows: Sequence[tuple]) -> pd.DataFrame:
    """(user, product, day[, event_type]) rows as contract events."""
    return pd.DataFrame([{
        "event_id": f"e{i:05d}", "user_id": row[0], "product_id": row[1],
        "event_type": row[3] if len(row) > 3 else "purchase", "query": None, "quantity": 1,
        "price": 1.0, "ts": T0 + pd.Timedelta(days=row[2]),
    } for i, row in enumerate(rows)])


def catalog_frame(products: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame([{"product_id": p, "title": f"product {p}", "description": None,
                          "category": "c", "brand": None, "price": 1.0, "image_url": None,
                          "updated_at": T0} for p in products])


# -- examples ---------------------------------------------------------------------------


def test_examples_take_strictly_earlier_products_most_recent_last() -> None:
    events = events_frame([
        ("u", "a", 1, "view"), ("u", "b", 2), ("u", "c", 3), ("u", "d", 3, "add_to_cart"),
        ("u", "e", 4, "view"), ("v", "a", 1),
    ])
    ex = examples_from_events(events)
    got = {(r.product_id): (list(r.recent_product_ids), list(r.recent_event_types))
           for r in ex.itertuples()}
    # targets: purchases and add-to-carts with at least one earlier event; views are history
    assert set(got) == {"b", "c", "d"}
    assert got["b"] == (["a"], ["view"])
    # c and d share a timestamp (one basket): neither is in the other's history
    assert got["c"] == (["a", "b"], ["view", "purchase"])
    assert got["d"] == (["a", "b"], ["view", "purchase"])
    assert ex["event_timestamp"].dt.tz is not None


def test_examples_carry_the_profile_of_the_end_of_the_day_before() -> None:
    from features.user_state import PROFILE_COLUMNS, profiles_as_of

    events = events_frame([
        ("u", "a", 0, "view"), ("u", "b", 1), ("u", "c", 1, "add_to_cart"), ("u", "d", 3),
        ("v", "a", 2, "view"), ("v", "b", 2.5),
    ])
    users = pd.DataFrame({"user_id": ["u", "v"], "country": ["France", None]})
    catalog = catalog_frame("abcd")
    ex = examples_from_events(events, catalog=catalog, users=users)
    assert list(ex.columns[:5]) == ["user_id", "product_id", "event_timestamp",
                                    "recent_product_ids", "recent_event_types"]
    assert list(ex.columns[5:]) == list(PROFILE_COLUMNS)
    rows = {r["product_id"] if r["user_id"] == "u" else "v-" + r["product_id"]: r
            for r in ex.to_dict("records")}
    assert set(rows) == {"b", "c", "d", "v-b"}
    # b (day 1): the day-0 snapshot, one view, no purchase yet
    b = rows["b"]
    assert (b["view_count_7d"], b["purchase_count_30d"], b["days_since_last_purchase"],
            b["distinct_categories_30d"], b["country"]) == (1, 0, -1, 1, "France")
    assert rows["c"] == {**b, "product_id": "c"}  # the same day: the same snapshot
    # d (day 3): the day-2 snapshot, the purchase of day 1 (price 1) and the cart
    d = rows["d"]
    assert (d["purchase_count_30d"], d["add_to_cart_count_7d"], d["days_since_last_purchase"],
            d["mean_basket_value_30d"]) == (1, 1, 2, 1.0)
    # v had no event before day 2: no snapshot, every profile column null
    assert all(pd.isna(rows["v-b"][c]) for c in PROFILE_COLUMNS)
    pd.testing.assert_frame_equal(
        ex[list(PROFILE_COLUMNS)],
        profiles_as_of(events, catalog, users, ex["user_id"], ex["event_timestamp"]))
    # No catalogue, no profile.
    assert list(examples_from_events(events).columns) == list(ex.columns[:5])


def test_examples_truncate_history_and_filter_products() -> None:
    events = events_frame([("u", p, i) for i, p in enumerate("abcdef")])
    ex = examples_from_events(events, history_len=2)
    last = ex[ex["product_id"] == "f"].iloc[0]
    assert list(last["recent_product_ids"]) == ["d", "e"]
    ex = examples_from_events(events, products={"a", "c", "f"}, min_history=0)
    assert ex["product_id"].tolist() == ["a", "c", "f"]
    assert list(ex.iloc[2]["recent_product_ids"]) == ["a", "c"]


# -- normalisation and metrics ----------------------------------------------------------


def test_minmax_normalisation_per_user_keeps_exclusions() -> None:
    scores = np.array([[1.0, 3.0, -np.inf, 2.0], [5.0, 5.0, 5.0, 5.0]])
    out = normalise_scores(scores, "minmax")
    assert out[0].tolist() == [0.0, 1.0, -np.inf, 0.5]
    assert np.isfinite(out[1]).all() and out[1].max() == out[1].min()


def test_rank_normalisation_is_reciprocal_rank() -> None:
    out = normalise_scores(np.array([[0.1, 0.9, 0.5]]), "rank")
    assert out[0] == pytest.approx([1 / 12, 1 / 10, 1 / 11])
    with pytest.raises(ValueError):
        normalise_scores(np.zeros((1, 2)), "zscore")


def test_tuning_metrics_agree_with_the_protocol_metrics() -> None:
    rng = np.random.default_rng(0)
    scores = rng.random((20, 30))
    truth = rng.random((20, 30)) < 0.15
    truth[:, 0] = True
    sizes = truth.sum(axis=1) + rng.integers(0, 2, 20)  # some truth outside the candidates
    ranked = [list(np.argsort(-row)) for row in scores]
    sets = [set(np.flatnonzero(t)) | {1000 + i for i in range(s - t.sum())}
            for t, s in zip(truth, sizes, strict=True)]
    fast = tuning_metrics(scores, truth, sizes, ks=(5, 10))
    assert fast["recall_at_5"] == pytest.approx(recall_at_k(ranked, sets, [5])["recall_at_5"])
    assert fast["ndcg_at_10"] == pytest.approx(ndcg_at_k(ranked, sets, [10])["ndcg_at_10"])


def test_search_weights_picks_the_informative_source() -> None:
    rng = np.random.default_rng(1)
    truth = rng.random((40, 50)) < 0.1
    truth[:, 0] = True
    useful = truth + 0.3 * rng.random((40, 50))
    noise = rng.random((40, 50))
    weights, metrics = search_weights([normalise_scores(noise), normalise_scores(useful)],
                                      truth, truth.sum(axis=1))
    assert weights[1] > 0 and weights[0] < weights[1]
    assert metrics["recall_at_10"] > 0.9


# -- tuning on validation only ----------------------------------------------------------


class Spy(ScoredRecommender):
    """Wraps a source; records the cut and latest event of every fit."""

    def __init__(self, inner: ScoredRecommender):
        self.inner = inner
        self.name = inner.name
        self.fits: list[tuple[pd.Timestamp, pd.Timestamp]] = []

    def _fit(self, data: TrainData) -> None:
        self.fits.append((data.cut, data.events["ts"].max()))
        self.inner = type(self.inner).__new__(type(self.inner))
        self.inner.__dict__.update(self.template)
        self.inner.fit(data)

    def fit(self, data: TrainData):
        if not hasattr(self, "template"):
            self.template = dict(self.inner.__dict__)
        return super().fit(data)

    def scores(self, user_ids):
        return self.inner.scores(user_ids)


def shifting_shop(test_buys: str) -> pd.DataFrame:
    """Ten users each with an own product o<i>. Validation window (days 30-60): they buy
    their own product again. Test window (days 60-90): they buy ``test_buys``."""
    rows = []
    for i in range(10):
        rows += [(f"u{i}", f"o{i}", 5 + i), (f"u{i}", f"o{i}", 40 + i),
                 (f"u{i}", test_buys if test_buys != "own" else f"o{i}", 70 + i)]
    for j in range(8):  # fans keep "hit" popular in every window
        rows += [(f"f{j}", "hit", 2 + j), (f"f{j}", "hit", 35 + j), (f"f{j}", "hit", 65 + j)]
    rows.append(("late", "hit", 90))
    return events_frame(rows)


PRODUCTS = [*(f"o{i}" for i in range(10)), "hit", "z"]


def test_blend_weights_are_chosen_on_validation_never_on_the_test_period() -> None:
    split = temporal_split(shifting_shop("hit"), catalog_frame(PRODUCTS))
    assert split.cut == T0 + pd.Timedelta(days=60)
    repeat, popularity = Spy(Repeat()), Spy(Popularity())
    blend = Blend([popularity, repeat], learner="weights").fit(split.train)
    # every fit saw only events before the test cut; one of them before the validation cut
    for source in (repeat, popularity):
        assert all(latest < split.cut for _, latest in source.fits)
        assert sorted(cut for cut, _ in source.fits) == [T0 + pd.Timedelta(days=30), split.cut]
    # validation rewarded repeat buying: repeat gets the weight, popularity none...
    assert blend.weights["all"]["repeat"] > 0 and blend.weights["all"]["popularity"] == 0
    assert blend.recommend(["u3"], 1) == [["o3"]]
    # ...although tuning on the test period would have chosen popularity
    probe = Blend([Popularity(), Repeat()], learner="weights")
    probe.tune(split, [Popularity().fit(split.train), Repeat().fit(split.train)])
    assert probe.weights["all"]["popularity"] > 0 and probe.weights["all"]["repeat"] == 0


def test_blend_ignores_what_happens_after_the_cut() -> None:
    catalog = catalog_frame(PRODUCTS)
    weights = []
    for after in ("hit", "own"):
        split = temporal_split(shifting_shop(after), catalog)
        blend = Blend([Popularity(), Repeat()], learner="weights").fit(split.train)
        weights.append(blend.params()["weights"])
    assert weights[0] == weights[1]


def test_two_blends_share_one_validation_fit_per_source() -> None:
    split = temporal_split(shifting_shop("hit"), catalog_frame(PRODUCTS))
    repeat, popularity = Spy(Repeat()), Spy(Popularity())
    first = Blend([repeat, popularity], learner="weights", name="w")
    second = Blend([repeat, popularity], learner="mlp", epochs=2, name="m")
    run_protocol(shifting_shop("hit"), catalog_frame(PRODUCTS),
                 [repeat, popularity, first, second], ks=(1, 5))
    assert len(repeat.fits) == 2 and len(popularity.fits) == 2  # test data + validation
    assert validation_fits([repeat], split.train, 30)[0].cut == split.cut - pd.Timedelta(days=30)


def test_mlp_blend_is_reproducible_and_prefers_the_validated_signal() -> None:
    split = temporal_split(shifting_shop("hit"), catalog_frame(PRODUCTS))
    runs = []
    for _ in range(2):
        blend = Blend([Popularity(), Repeat()], learner="mlp", epochs=30).fit(split.train)
        runs.append(blend.scores(["u1", "u2"]))
    np.testing.assert_array_equal(runs[0], runs[1])
    assert blend.recommend(["u1"], 1) == [["o1"]]
    assert set(blend.params()["features"]) >= {"popularity", "repeat", *PurchaseContext.NAMES}
    assert blend.recommend(["u1"], 3, exclude={"u1": {"o1"}})[0][0] != "o1"


def test_blend_refuses_bad_configuration() -> None:
    with pytest.raises(ValueError, match="unique"):
        Blend([Repeat(), Repeat()])
    with pytest.raises(ValueError, match="learner"):
        Blend([Repeat()], learner="forest")


def test_purchase_context_facts() -> None:
    one_offs = events_frame([(f"f{j}", "z", 50 + j) for j in range(4)])
    events = pd.concat([shifting_shop("hit"), one_offs.assign(event_id="z" + one_offs.event_id)],
                       ignore_index=True)
    split = temporal_split(events, catalog_frame(PRODUCTS))
    context = PurchaseContext().fit(split.train)
    feats = context.features(["u1", "f0", "nobody"])
    names = PurchaseContext.NAMES
    col = split.train.item_index
    assert feats.shape == (3, len(PRODUCTS), len(names))
    own = feats[..., names.index("own")]
    assert own[0, col["o1"]] == 1 and own[0].sum() == 1 and own[2].sum() == 0
    assert feats[0, col["o1"], names.index("log_count")] == pytest.approx(np.log1p(2))
    # every buyer of o<i> bought it twice, nobody bought z twice
    rate = feats[0, :, names.index("repurchase_rate")]
    assert rate[col["o1"]] > rate[col["z"]]


# -- the two-tower model as a protocol method -------------------------------------------


@pytest.fixture(scope="module")
def synthetic_shop(tmp_path_factory) -> str:
    from features.synth import generate_shop

    root = str(tmp_path_factory.mktemp("shop"))
    generate_shop(root, days=21, users=120, products=50, seed=5)
    return root


@pytest.fixture(scope="module")
def synthetic_split(synthetic_shop):
    from features.contract import list_days, read_upto

    events = read_upto(synthetic_shop, "events", list_days(synthetic_shop, "events")[-1])
    catalog = read_upto(synthetic_shop, "products", list_days(synthetic_shop, "products")[-1])
    return temporal_split(events, catalog, test_days=7)


@pytest.fixture(scope="module")
def synthetic_users(synthetic_shop) -> pd.DataFrame:
    from features.contract import list_days, read_upto

    return read_upto(synthetic_shop, "users", list_days(synthetic_shop, "users")[-1])


def test_two_tower_recommender_trains_and_scores(synthetic_split, tmp_path) -> None:
    config = TrainConfig(text_encoder="tiny", epochs=1, device="cpu", min_examples=10)
    rec = TwoTowerRecommender(config, tmp_path).fit(synthetic_split.train)
    users = synthetic_split.users("all")[:5]
    scores = rec.scores(users)
    assert scores.shape == (5, len(synthetic_split.train.product_ids))
    assert np.isfinite(scores).all() and rec.params()["examples"] > 10
    lists = rec.recommend(users, 3, exclude={users[0]: set(synthetic_split.train.product_ids[:3])})
    assert all(len(x) == 3 for x in lists)
    assert not set(lists[0]) & set(synthetic_split.train.product_ids[:3])


def test_two_tower_without_enough_data_ranks_by_popularity(synthetic_split, tmp_path) -> None:
    config = TrainConfig(text_encoder="tiny", epochs=1, device="cpu", min_examples=10**9)
    rec = TwoTowerRecommender(config, tmp_path).fit(synthetic_split.train)
    assert "need" in rec.params()["skipped"]
    users = synthetic_split.users("all")[:2]
    assert rec.recommend(users, 5) == Popularity().fit(synthetic_split.train).recommend(users, 5)


def test_two_tower_recommender_scores_with_the_profile_at_the_cut(
    synthetic_split, synthetic_users, tmp_path
) -> None:
    from features.user_state import profiles_as_of
    from training.embeddings import encode_users

    train = synthetic_split.train
    config = TrainConfig(text_encoder="tiny", epochs=1, device="cpu", min_examples=10)
    rec = TwoTowerRecommender(config, tmp_path, users=synthetic_users).fit(train)
    countries = set(synthetic_users["country"].dropna())
    assert rec.result.model.countries and set(rec.result.model.countries) <= countries
    users = synthetic_split.users("all")[:6]
    at_cut = profiles_as_of(train.events, train.catalog, synthetic_users, users,
                            [train.cut] * len(users))
    assert at_cut["country"].notna().all()
    histories, types = train.histories(users)
    expected = encode_users(rec.result.model, histories, types, train.item_index,
                            rec.item_embeddings, user_features=at_cut) @ rec.item_embeddings.T
    np.testing.assert_allclose(rec.scores(users), expected, atol=1e-6)
    blind = encode_users(rec.result.model, histories, types, train.item_index,
                         rec.item_embeddings) @ rec.item_embeddings.T
    assert not np.allclose(rec.scores(users), blind, atol=1e-4)  # the profile counts

    history_only = TwoTowerRecommender(config.replace(user_features=False), tmp_path)
    history_only.fit(train)
    assert history_only.profiles is None and not history_only.result.model.user_features
    assert np.isfinite(history_only.scores(users)).all()
