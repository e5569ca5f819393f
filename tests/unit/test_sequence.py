"""The sequence encoder: it learns an order no count-based method sees, is causal, and
survives the item side's pickling."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from training.ranking.config import ScorerConfig
from training.ranking.sequence import SequenceModel, entries, fit_sequence, gap_buckets

pytestmark = pytest.mark.fast

N = 40
CONFIG = dataclasses.replace(ScorerConfig(), sequence_dim=32, sequence_len=12,
                             sequence_epochs=60, sequence_negatives=16)


def chain_events(users: int = 150, steps: int = 10, seed: int = 0) -> pd.DataFrame:
    """Each user buys products k, k+1, k+2, ... (mod N) from a random start, one a day, with
    a view of a random product between: the next purchase follows from the last one only."""
    rng = np.random.default_rng(seed)
    rows = []
    base = pd.Timestamp("2026-01-01", tz="UTC")
    for u in range(users):
        start = int(rng.integers(N))
        for s in range(steps):
            day = base + pd.Timedelta(days=s)
            rows.append((f"u{u}", f"p{int(rng.integers(N))}", "view", day))
            rows.append((f"u{u}", f"p{(start + s) % N}", "purchase",
                         day + pd.Timedelta(hours=1)))
    frame = pd.DataFrame(rows, columns=["user_id", "product_id", "event_type", "ts"])
    frame["event_id"] = [f"e{i}" for i in range(len(frame))]
    return frame


def test_gap_buckets() -> None:
    hour = 3600.0
    stamps = np.array([0.0, 0.0, hour, 4 * hour, 1e9])
    assert gap_buckets(stamps).tolist() == [1, 2, 3, 4, 15]  # first 1; log2(1 + h) + 2, capped
    assert gap_buckets(np.array([np.nan, 5.0])).tolist() == [1, 1]  # unknown times


def test_learns_the_next_purchase_that_counts_cannot_see() -> None:
    products = [f"p{i}" for i in range(N)]
    index = {p: i for i, p in enumerate(products)}
    state = fit_sequence(chain_events(), products, None, CONFIG)
    assert state is not None and state.report["windows"] >= 150
    assert state.report["losses"][-1] < 0.5 * state.report["losses"][0]
    test = chain_events(users=40, steps=6, seed=1)
    hits = 0
    for _user, rows in test.groupby("user_id", sort=False):
        vector = state.encode([rows["product_id"].tolist()], [rows["event_type"].tolist()],
                              [rows["ts"].astype("int64").to_numpy() / 1e9], index)[0]
        last = index[rows.loc[rows["event_type"] == "purchase", "product_id"].iloc[-1]]
        scores = state.items_matrix() @ vector
        hits += (last + 1) % N in np.argsort(-scores)[:3]
    assert hits >= 32  # of 40; chance is 3 in 40


def test_causal_and_unknown_products_ignored() -> None:
    torch.manual_seed(0)
    model = SequenceModel(N, 16, 8, layers=2, heads=2).eval()
    items = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8]])
    types = torch.tensor([[0, 0, 1, 1, 3, 1, 3, 1]])
    gaps = torch.tensor([[0, 0, 1, 2, 2, 3, 2, 2]])
    with torch.inference_mode():
        out = model(items, types, gaps)
        changed = items.clone()
        changed[0, -1] = 9
        later = model(changed, types, gaps)
    assert torch.isfinite(out).all()  # padding slots read themselves: no NaN
    torch.testing.assert_close(out[0, :-1], later[0, :-1])  # slot t reads slots <= t only
    assert not torch.allclose(out[0, -1], later[0, -1])
    index = {"a": 0, "b": 1}
    got = entries(["a", "zz", "b"], ["view", "view", "purchase"], np.array([0.0, 5.0, 7200.0]),
                  index)
    assert [g.tolist() for g in got] == [[1, 2], [1, 3], [1, 3]]


def test_pickled_state_encodes_the_same() -> None:
    products = [f"p{i}" for i in range(N)]
    index = {p: i for i, p in enumerate(products)}
    config = dataclasses.replace(CONFIG, sequence_epochs=1)
    state = fit_sequence(chain_events(users=30), products, None, config)
    history = (["p1", "p2", "p3"], ["purchase", "view", "purchase"], np.array([0.0, 60, 120]))
    before = state.encode(*([h] for h in history), index)
    again = pickle.loads(pickle.dumps(state))
    assert "_module" not in again.__dict__
    np.testing.assert_array_equal(again.encode(*([h] for h in history), index)[0], before[0])
    assert before[0][-1] == 1.0 and again.items_matrix().shape == (N, config.sequence_dim + 1)
    assert state.encode([["nope"]], [["view"]], [np.array([0.0])], index) == [None]
    assert fit_sequence(chain_events(users=3).assign(event_type="view"), products, None,
                        config) is None  # no purchase to predict


def test_the_scorer_reads_it_as_a_source_and_its_ablation_leaves_it_out() -> None:
    from unit.test_scorer import SMALL, _fitted, loyal_shop

    from training.ranking.config import FEATURE_NAMES
    from training.ranking.histories import Histories, StoredVectors

    users = [f"u{u}" for u in range(12)]
    column, rank = FEATURE_NAMES.index("sequence"), FEATURE_NAMES.index("sequence_rank")
    for on in (True, False):
        scorer, cut = _fitted(config=dataclasses.replace(SMALL, sequence=on))
        hist = Histories.from_events(loyal_shop(), users)
        views = scorer.views(hist, cut.timestamp())
        features, columns = scorer.features(hist, cut.timestamp(), views=views)
        real = columns >= 0
        assert ("sequence" in scorer.state.indexes()) is on
        assert (scorer.state.sequence is not None) is on
        if on:
            assert all(v.sequence_vector is not None for v in views)
            assert all("sequence" in v.retrieved for v in views)
            assert np.ptp(features[..., column][real]) > 0
            assert np.ptp(features[..., rank][real]) > 0
            stored = StoredVectors.from_values(StoredVectors.of_view(views[0], "b", "r").values())
            np.testing.assert_array_equal(stored.vectors["sequence_vector"],
                                          views[0].sequence_vector)
            assert stored.retrieved["sequence"].tolist() == views[0].retrieved["sequence"].tolist()
        else:
            assert all(v.sequence_vector is None for v in views)
            assert not features[..., column].any() and not features[..., rank].any()
