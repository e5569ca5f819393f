"""The served ranking: histories as Feast holds them, its sources, learning, persistence."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse
from unit.test_blend import T0, catalog_frame, events_frame

from features.build import USER_RECENT_SCHEMA, build_user_recent_products
from features.contract import Interval
from training.data import temporal_split, train_data, validation_split
from training.evaluation.baselines import Popularity, cosine_similarity
from training.evaluation.models import ServedRecommender
from training.evaluation.protocol import run_protocol
from training.ranking.config import FEATURE_NAMES, ScorerConfig
from training.ranking.histories import Histories, MalformedHistory
from training.ranking.items import cosine_neighbours
from training.ranking.scorer import Scorer

pytestmark = pytest.mark.fast

SMALL = ScorerConfig(neighbours=5, als_factors=4, als_iterations=3, hidden=8, epochs=15)
PRODUCTS = [f"p{i}" for i in range(12)]


def loyal_shop(days: int = 40) -> pd.DataFrame:
    """Each user buys "their" product every 3 days, and views or buys a random one now and
    then."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(12):
        own = PRODUCTS[u % len(PRODUCTS)]
        for day in range(u % 3, days, 3):
            rows.append((f"u{u}", own, day + 0.1 * (u % 5)))
            if rng.random() < 0.3:
                kind = "view" if rng.random() < 0.5 else "purchase"
                rows.append((f"u{u}", PRODUCTS[rng.integers(len(PRODUCTS))], day + 0.5, kind))
    events = events_frame(rows)
    events["ts"] = events["ts"].dt.floor("s")  # whole seconds, as the contract stores them
    return events


def test_histories_match_what_feast_builds_day_by_day() -> None:
    events = loyal_shop(10)
    state = USER_RECENT_SCHEMA.empty_table().to_pandas()
    for offset in range(10):
        day = (T0 + pd.Timedelta(days=offset)).date()
        today = events[events["ts"].dt.date == day]
        table = build_user_recent_products(today, state, Interval.for_day(day),
                                           history_len=4).to_pandas()
        state = pd.concat([state[~state["user_id"].isin(table["user_id"])], table])
    users = sorted(state["user_id"])
    ours = Histories.from_events(events, users + ["nobody"], limit=4)
    feast = Histories.from_feast(state.set_index("user_id").loc[users].reset_index())
    assert ours.products[:-1] == feast.products
    assert ours.event_types[:-1] == feast.event_types
    for a, b in zip(ours.timestamps, feast.timestamps, strict=False):
        np.testing.assert_array_equal(a, b)
    assert ours.products[-1] == [] and len(ours.timestamps[-1]) == 0


def test_feast_rows_without_timestamps_mean_now() -> None:
    frame = pd.DataFrame({"recent_product_ids": [["a", "b"], None],
                          "recent_event_types": [["purchase", "view"], None]})
    hist = Histories.from_feast(frame)
    assert hist.products == [["a", "b"], []]
    assert np.isnan(hist.timestamps[0]).all() and len(hist.timestamps[1]) == 0


def test_cosine_neighbours_is_the_top_of_the_dense_cosine() -> None:
    rng = np.random.default_rng(1)
    matrix = sparse.csr_matrix((rng.random((30, 9)) < 0.3).astype(np.float32))
    dense = cosine_similarity(matrix, None, self_similarity=False).toarray()
    got = cosine_neighbours(matrix, 3, max_entries=20).toarray()
    for row in range(9):
        kept = np.flatnonzero(got[row])
        assert len(kept) <= 3 and row not in kept
        np.testing.assert_allclose(got[row, kept], dense[row, kept], rtol=1e-5)
        if len(kept):  # nothing dropped beats what was kept
            assert dense[row, np.setdiff1d(np.arange(9), [*kept, row])].max(initial=0) \
                <= got[row, kept].min() + 1e-6


def test_als_user_factors_solve_the_weighted_least_squares() -> None:
    data = train_data(loyal_shop(), catalog_frame(PRODUCTS), T0 + pd.Timedelta(days=30))
    scorer = Scorer(SMALL).fit_items(data)
    state = scorer.state
    x = scorer._als_factors(np.array([5, 2, 5, 5])).astype(np.float64)  # 1 x p2, 3 x p5
    y = state.als_items.astype(np.float64)
    confidence = np.ones(len(PRODUCTS))
    confidence[[2, 5]] += SMALL.als_alpha * np.log1p([1.0, 3.0])
    preference = np.zeros(len(PRODUCTS))
    preference[[2, 5]] = 1.0
    gradient = (y.T * confidence) @ (y @ x - preference) + SMALL.als_regularization * x
    np.testing.assert_allclose(gradient, 0.0, atol=1e-4)


def _fitted(days: int = 40, config: ScorerConfig = SMALL) -> tuple[Scorer, pd.Timestamp]:
    events = loyal_shop(days)
    split = temporal_split(events, catalog_frame(PRODUCTS), T0 + pd.Timedelta(days=days - 6),
                           test_days=6)
    tuning = validation_split(split.train, 6)
    scorer = Scorer(config).fit_items(tuning.train)
    scorer.tune(tuning)
    return scorer.fit_items(split.train), split.cut


def test_the_scorer_learns_repeat_buying_and_leaves_purchases_out_when_asked() -> None:
    scorer, cut = _fitted()
    users = [f"u{u}" for u in range(12)]
    data = train_data(loyal_shop(), catalog_frame(PRODUCTS), cut)
    hist = Histories.from_events(data.events, users)
    scores = scorer.scores(hist, cut.timestamp())  # (U, N)
    own = [scorer.state.item_index[PRODUCTS[u % 12]] for u in range(12)]
    assert (scores.argmax(axis=1) == own).mean() >= 0.9
    new = scorer.scores(hist, cut.timestamp(), exclude_purchased=True)
    assert np.isneginf(new[np.arange(12), own]).all()
    assert scorer.validation["all"]["n_users"] > 0
    assert set(scorer.pair_scorers) == {"all", "new"}


def test_cold_users_get_the_facts_alone() -> None:
    scorer, cut = _fitted()
    features, columns = scorer.features(Histories.empty(2), cut.timestamp())
    assert features.shape == (2, len(PRODUCTS), len(FEATURE_NAMES))  # all: under min_candidates
    assert (np.sort(columns, axis=1) == np.arange(len(PRODUCTS))).all()
    own = FEATURE_NAMES.index("own")
    assert not features[..., : own + 1].any()  # no source, nothing owned
    scores = scorer.scores(Histories.empty(2), cut.timestamp())
    np.testing.assert_allclose(scores[0], scores[1])
    assert np.isfinite(scores).all()


@pytest.mark.parametrize("stage", ["mlp", "trees", "blend"])
def test_save_and_load_give_the_same_scores(tmp_path, stage: str) -> None:
    scorer, cut = _fitted(config=replace(SMALL, stage=stage))
    assert scorer.stages == {"all": stage, "new": stage}
    assert set(scorer.tree_rankers) == (set() if stage == "mlp" else {"all", "new"})
    hist = Histories.from_events(loyal_shop(), ["u1", "u2", "stranger"])
    before = scorer.scores(hist, cut.timestamp())
    loaded = Scorer.load(scorer.save(tmp_path / "scorer"))
    np.testing.assert_array_equal(loaded.scores(hist, cut.timestamp()), before)
    assert loaded.state.product_ids == scorer.state.product_ids
    assert loaded.validation == scorer.validation
    assert loaded.stages == scorer.stages and set(loaded.tree_rankers) == set(scorer.tree_rankers)
    # every stage learns the shop's repeat buying
    own = [scorer.state.item_index[PRODUCTS[u]] for u in (1, 2)]
    assert (before[:2].argmax(axis=1) == own).all()


def test_a_small_shop_keeps_the_pair_scorer_and_an_unknown_stage_is_refused() -> None:
    scorer, _ = _fitted(config=replace(SMALL, stage="auto"))
    assert scorer.stages == {"all": "mlp", "new": "mlp"}  # 12 users: too few to choose
    with pytest.raises(ValueError, match="scorer.stage 'forest'"):
        _fitted(config=replace(SMALL, stage="forest"))


def test_the_numpy_pair_scorer_is_the_torch_module() -> None:
    scorer, cut = _fitted()
    hist = Histories.from_events(loyal_shop(), ["u1", "u2", "u7", "stranger"])
    features, columns = scorer.features(hist, cut.timestamp())
    for setting, module in scorer.pair_scorers.items():
        with torch.inference_mode():
            expected = module(torch.from_numpy(features)).numpy()  # (b, C)
        np.testing.assert_allclose(module.as_numpy()(features), expected, rtol=1e-5, atol=1e-5)
        served = scorer._apply(setting, features, columns < 0)
        np.testing.assert_allclose(served[columns >= 0], expected[columns >= 0], rtol=1e-5,
                                   atol=1e-5)
        assert np.isneginf(served[columns < 0]).all()


def test_the_tune_step_refuses_an_item_side_fitted_elsewhere() -> None:
    events = loyal_shop()
    split = temporal_split(events, catalog_frame(PRODUCTS), T0 + pd.Timedelta(days=34),
                           test_days=6)
    scorer = Scorer(SMALL).fit_items(split.train)
    with pytest.raises(ValueError, match="validation split"):
        scorer.tune(validation_split(split.train, 6))


def test_served_ranking_beats_popularity_under_the_protocol() -> None:
    result = run_protocol(loyal_shop(60), catalog_frame(PRODUCTS),
                          [Popularity(), ServedRecommender(SMALL, validation_days=10)],
                          ks=(1, 10), test_days=10)
    assert result.value("served", "all", "ndcg_at_1") > \
        result.value("popularity", "all", "ndcg_at_1") + 0.3
    assert result.params["served"]["scorer.validation"]["all"]["n_users"] > 0
    assert dt.datetime.fromisoformat(result.cut) < dt.datetime.fromisoformat(result.end)


def test_candidates_come_from_the_index_factory_exact_or_hnsw_alike() -> None:
    import copy

    scorer, cut = _fitted()
    users = [f"u{u}" for u in range(12)]
    data = train_data(loyal_shop(), catalog_frame(PRODUCTS), cut)
    hist = Histories.from_events(data.events, users)
    exact = scorer.state.indexes()
    # no two-tower model: ALS and the sequence encoder
    assert {n: i.kind for n, i in exact.items()} == {"als": "exact", "sequence": "exact"}
    approx = copy.copy(scorer)
    approx.state = copy.copy(scorer.state)
    approx.state.__dict__.pop("_indexes", None)  # a copy is made without them
    approx.index_exact_max = 4  # 12 products: above the threshold
    before = approx.state.indexes(4)["als"].searches
    ranked = approx.rank(hist, cut.timestamp(), 5)
    assert approx.state.indexes()["als"].kind == "hnsw"
    assert approx.state.indexes()["als"].searches > before  # HNSW served the candidates
    expected = scorer.rank(hist, cut.timestamp(), 5)
    assert [r.tolist() for r, _ in ranked] == [r.tolist() for r, _ in expected]


def test_candidates_hold_the_history_respect_filters_and_rank_within_them() -> None:
    scorer, cut = _fitted()
    scorer.config = ScorerConfig(**{**SMALL.__dict__, "candidates": 2,
                                    "neighbour_candidates": 2, "popular_candidates": 1,
                                    "min_candidates": 0})
    users = [f"u{u}" for u in range(12)]
    data = train_data(loyal_shop(), catalog_frame(PRODUCTS), cut)
    hist = Histories.from_events(data.events, users)
    index = scorer.state.item_index
    candidates = scorer.candidates(hist)
    assert max(len(c) for c in candidates) < len(PRODUCTS)  # not the whole catalogue
    for row, cols in enumerate(candidates):
        assert {index[p] for p in hist.products[row]} <= set(cols.tolist())
        assert (np.diff(cols) > 0).all()
    allowed = np.zeros(len(PRODUCTS), dtype=bool)
    allowed[[1, 4, 7]] = True
    narrow = scorer.candidates(hist, allowed=allowed,
                               exclude=[np.array([4])] * len(users))
    assert all(set(c.tolist()) <= {1, 7} for c in narrow)
    ranked = scorer.rank(hist, cut.timestamp(), 3)
    dense = scorer.scores(hist, cut.timestamp())
    for row, (cols, vals) in enumerate(ranked):
        assert len(cols) == 3 and (np.diff(vals) <= 0).all()
        np.testing.assert_allclose(dense[row, cols], vals)
        assert np.isneginf(np.delete(dense[row], candidates[row])).all()
    scorer.config = ScorerConfig(**{**scorer.config.__dict__, "min_candidates": 5})
    topped = scorer.candidates(Histories.empty(1), allowed=allowed)[0]
    assert set(topped.tolist()) == {1, 4, 7}  # topped up by popularity, still in the filter


def test_one_online_row_reads_as_its_one_row_frame() -> None:
    from features.user_state import PROFILE_COLUMNS

    profile = {c: (3 if c != "country" else "France") for c in PROFILE_COLUMNS}
    rows = [{"recent_product_ids": ["a", "b"], "recent_event_types": ["purchase", "view"],
             "recent_timestamps": [10, 20], **profile},
            {"recent_product_ids": ["a"], "recent_event_types": ["view"],
             "recent_timestamps": [], **{c: None for c in PROFILE_COLUMNS}},  # times unknown
            {"recent_product_ids": [], "recent_event_types": [], "recent_timestamps": []}]
    for row in rows:
        fast, frame = Histories.from_row(row), Histories.from_feast(pd.DataFrame([row]))
        assert fast.products == frame.products and fast.event_types == frame.event_types
        np.testing.assert_array_equal(fast.timestamps[0], frame.timestamps[0])
        assert fast.profiles is None  # not built by from_row: on first read
        if frame.profiles is None:
            assert fast.profile_frame() is None and fast.profile_value("country") is None
        else:
            assert fast.profile_value("country") == frame.profiles["country"].iat[0]
            pd.testing.assert_frame_equal(fast.profile_frame(), frame.profiles,
                                          check_dtype=False)
    assert np.isnan(Histories.from_row(rows[1]).timestamps[0]).all()


def test_a_stored_online_profile_reads_the_same_from_the_row_and_from_its_frame() -> None:
    from features.user_state import STORED_PROFILE_COLUMNS

    stored = {"active_days": [20450, 20455], "view_by_day": [3, 1],
              "add_to_cart_by_day": [1, 0], "purchase_by_day": [1, 0],
              "search_by_day": [0, 2], "basket_value_by_day": [12.5, 0.0],
              "recent_categories": ["mugs", "toys"], "recent_category_days": [20450, 20455],
              "last_purchase_epoch_s": 20450 * 86400.0, "country": "France"}
    assert set(stored) == set(STORED_PROFILE_COLUMNS)
    row = {"recent_product_ids": ["a"], "recent_event_types": ["view"],
           "recent_timestamps": [20455 * 86400.0], **stored}
    now = 20457 * 86400.0
    from_row = Histories.from_row(row).profile_values_at(now)  # arrays, no frame
    framed = Histories.from_row(row)
    framed.profile_frame()
    from_frame = framed.profile_values_at(now)
    assert set(from_row) == set(from_frame)
    for column, values in from_row.items():
        np.testing.assert_array_equal(values, from_frame[column], err_msg=column)


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("recent_event_types", [], "recent_event_types has 0 entries for 2 products"),
    ("recent_event_types", ["purchase", "teleport"], "holds ['teleport']"),
    ("recent_timestamps", [10], "recent_timestamps has 1 entries for 2 products"),
])
def test_a_malformed_row_is_refused_not_read_as_views(field: str, value: list,
                                                      reason: str) -> None:
    """Lists that disagree are a writer's bug: both readers refuse the row with the reason
    (they used to read every entry as a view, so exclusion and facts silently failed)."""
    row = {"recent_product_ids": ["a", "b"], "recent_event_types": ["purchase", "view"],
           "recent_timestamps": [10, 20], field: value}
    with pytest.raises(MalformedHistory, match=re.escape(reason)):
        Histories.from_row(row)
    with pytest.raises(MalformedHistory, match=re.escape(reason)):
        Histories.from_feast(pd.DataFrame([row]))


def test_served_recommender_ranks_each_user_as_alone_whatever_the_batch() -> None:
    """Histories are computed once for all the users asked about; each user's list is the
    one the scorer gives that user alone (batches of 1, 5 or all users agree)."""
    served = ServedRecommender(SMALL, validation_days=10)
    data = train_data(loyal_shop(60), catalog_frame(PRODUCTS), T0 + pd.Timedelta(days=50))
    served.fit(data)
    users = [f"u{u}" for u in range(12)] + ["nobody"]
    exclude = {"u1": {"p1"}, "u4": {"p4", "p5"}}
    for setting in (None, exclude):
        lists = {b: served.recommend(users, 5, exclude=setting, batch_size=b)
                 for b in (1, 5, 64)}
        assert lists[1] == lists[5] == lists[64]
        alone = [served.recommend([u], 5, exclude=setting)[0] for u in users]
        assert lists[64] == alone
    assert not set(served.recommend(["u4"], 12, exclude=exclude)[0]) & {"p4", "p5"}


def test_a_rows_digest_follows_its_profile_lists() -> None:
    from features.user_state import STORED_PROFILE_COLUMNS

    def row(views: list[float], country: str = "France") -> dict:
        stored = {c: [1.0, 2.0] for c in STORED_PROFILE_COLUMNS}
        stored.update(view_by_day=views, recent_categories=["mugs", "toys"],
                      last_purchase_epoch_s=float("nan"), country=country)
        return {"recent_product_ids": ["a"], "recent_event_types": ["view"],
                "recent_timestamps": [1.0], **stored}

    digest = Histories.from_row(row([3.0, 1.0])).digests[0]
    assert Histories.from_row(row([3.0, 1.0])).digests[0] == digest  # read again: equal
    assert Histories.from_row(row([3.0, 2.0])).digests[0] != digest  # a day's count moved
    assert Histories.from_row(row([3.0, 1.0], "Spain")).digests[0] != digest
    nested = row([3.0, 1.0])
    nested["recent_categories"] = [["mugs"], ["toys"]]  # not a stored shape; still hashable
    assert isinstance(Histories.from_row(nested).digests[0], int)


def test_one_users_co_occurrence_is_the_batch_sparse_product_to_the_bit() -> None:
    from training.ranking.scorer import FEW_USERS

    scorer, cut = _fitted()
    ids = scorer.state.product_ids
    rng = np.random.default_rng(4)
    kinds = ["view", "add_to_cart", "purchase"]
    users = 2 * FEW_USERS
    histories = Histories([list(rng.choice(ids, 7)) for _ in range(users)],
                          [list(rng.choice(kinds, 7)) for _ in range(users)],
                          [np.full(7, cut.timestamp()) for _ in range(users)])
    batch = scorer.views(histories, cut.timestamp())  # one sparse product
    assert sum(len(v.together_cols) for v in batch) > 0
    for i, want in enumerate(batch):
        alone = scorer.views(histories.take([i]), cut.timestamp())[0]  # read row by row
        np.testing.assert_array_equal(alone.together_cols, want.together_cols)
        assert alone.together_vals.tobytes() == want.together_vals.tobytes()


def test_a_rows_stable_digest_is_the_same_in_another_process_and_follows_the_row() -> None:
    """``row_digest`` binds stored vectors to a row: equal in every process (``hash`` is
    salted per process), different when the history or the profile changes."""
    import json
    import subprocess
    import sys

    from features.user_state import STORED_PROFILE_COLUMNS
    from training.ranking.histories import row_digest

    row = {"recent_product_ids": ["a", "b"], "recent_event_types": ["view", "purchase"],
           "recent_timestamps": [1, 2], **{c: [1, 2] for c in STORED_PROFILE_COLUMNS},
           "country": "France", "last_purchase_epoch_s": float("nan")}
    digest = row_digest(row)
    code = ("import json, sys; from training.ranking.histories import row_digest; "
            "row = json.loads(sys.argv[1]); row['last_purchase_epoch_s'] = float('nan'); "
            "print(row_digest(row))")
    other = subprocess.run([sys.executable, "-c", code, json.dumps(
        {k: v for k, v in row.items() if k != "last_purchase_epoch_s"})],
        capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "123",
                                                        "PYTHONPATH": "."}).stdout.strip()
    assert other == digest
    assert row_digest({**row, "recent_timestamps": [1, 3]}) != digest
    assert row_digest({**row, "country": "Spain"}) != digest
    assert row_digest({**row, "user_vectors": {"anything": 1}}) == digest  # not part of it


def test_views_from_stored_vectors_are_the_computed_views() -> None:
    """What ``serving.user_vectors`` stores of a batch's views (through the feature values,
    float32) gives each user the view, candidates and ranking computed for them alone."""
    from training.ranking.histories import StoredVectors

    scorer, cut = _fitted()
    ids = scorer.state.product_ids
    rng = np.random.default_rng(9)
    kinds = ["view", "add_to_cart", "purchase"]
    n = 12
    histories = Histories([list(rng.choice(ids, 6)) for _ in range(n)] + [["unknown"]],
                          [list(rng.choice(kinds, 6)) for _ in range(n)] + [["view"]],
                          [np.full(6, cut.timestamp()) for _ in range(n)]
                          + [np.full(1, cut.timestamp())])
    now = cut.timestamp()
    batch = scorer.views(histories, now)
    scorer.retrieve(batch)
    stored = [StoredVectors.from_values(StoredVectors.of_view(v, "b/1/run", "row").values())
              for v in batch]
    assert stored[-1] is None or not stored[-1].vectors  # no catalogue product: nothing
    assert all(s is not None and s.vectors for s in stored[:n])
    read = scorer.views(histories, now, stored)
    for user in range(n):
        alone = histories.take([user])
        [computed] = scorer.views(alone, now)
        for attribute in ("user_vector", "text_vector", "als_vector"):
            a, b = getattr(computed, attribute), getattr(read[user], attribute)
            assert (a is None) == (b is None), attribute
            if a is not None:
                np.testing.assert_allclose(a, b, atol=1e-5)
        want = scorer.rank(alone, now, 5, views=[computed])[0]
        got = scorer.rank(alone, now, 5, views=[read[user]])[0]
        assert list(want[0]) == list(got[0])
        np.testing.assert_allclose(want[1], got[1], atol=1e-5)
    # another bundle's or an older row's vectors are not used
    for vector in stored[:n]:
        vector.row_now = "row"
    mine = Histories([["x"]], [["view"]], [np.zeros(1)], stored=[stored[0]])
    assert mine.vectors_for("b/1/run") == [stored[0]]
    assert mine.vectors_for("b/2/run") is None
    stored[0].row_now = "changed"
    assert mine.vectors_for("b/1/run") is None
