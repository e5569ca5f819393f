"""Bootstrap intervals, paired differences, per-user metrics and the test-user sample."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from training.data import temporal_split
from training.evaluation.protocol import evaluate_split
from training.evaluation.report import ProtocolResult
from training.evaluation.uncertainty import interval, paired_difference, per_user_accuracy
from training.metrics import ndcg_at_k, recall_at_k

pytestmark = pytest.mark.fast

T0 = pd.Timestamp("2026-01-01", tz="UTC")


def test_per_user_values_average_to_the_protocol_metrics() -> None:
    rng = np.random.default_rng(3)
    products = [f"p{i}" for i in range(30)]
    ranked = [list(rng.choice(products, size=12)) for _ in range(200)]  # repeats included
    truth = [set(rng.choice(products, size=rng.integers(0, 5))) for _ in range(200)]
    values = per_user_accuracy(ranked, truth, (1, 5, 10))
    with_truth = sum(1 for t in truth if t)
    for k in (1, 5, 10):
        assert len(values[f"recall_at_{k}"]) == with_truth
        assert values[f"recall_at_{k}"].mean() == pytest.approx(
            recall_at_k(ranked, truth, (k,))[f"recall_at_{k}"], abs=1e-12)
        assert values[f"ndcg_at_{k}"].mean() == pytest.approx(
            ndcg_at_k(ranked, truth, (k,))[f"ndcg_at_{k}"], abs=1e-12)


def test_interval_holds_the_mean_narrows_with_users_and_repeats_itself() -> None:
    rng = np.random.default_rng(0)
    small, large = rng.binomial(1, 0.3, 200), rng.binomial(1, 0.3, 20_000)
    lo, hi = interval(small)
    assert lo < small.mean() < hi
    lo2, hi2 = interval(large)
    assert lo2 < large.mean() < hi2 and (hi2 - lo2) < (hi - lo) / 5
    assert interval(small) == (lo, hi)  # seeded: a rerun gives the same interval
    assert all(np.isnan(interval([])))  # no user: no interval
    assert interval([0.4], n_boot=100) == (0.4, 0.4)


def test_pairing_sees_a_small_steady_gain_that_two_separate_intervals_miss() -> None:
    rng = np.random.default_rng(1)
    base = rng.binomial(1, 0.3, 3000).astype(float)  # which users happen to be easy
    better = np.where(rng.random(3000) < 0.04, 1.0, base)  # +~0.03, same users
    separate = interval(base), interval(better)
    assert separate[0][1] > separate[1][0]  # the separate intervals overlap
    paired = paired_difference(better, base)
    assert paired.holds and paired.low > 0 and paired.n == 3000
    assert "95% CI" in paired.describe()


def test_same_quality_with_other_noise_does_not_hold() -> None:
    rng = np.random.default_rng(2)
    a = rng.binomial(1, 0.3, 2000).astype(float)
    b = rng.binomial(1, 0.3, 2000).astype(float)
    same = paired_difference(a, a)
    assert same.diff == 0 and not same.holds
    assert not paired_difference(a, b).holds
    with pytest.raises(ValueError, match="one shape"):
        paired_difference(a, b[:10])


def _shop(users: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows = []
    for u in range(users):
        rows.append((f"u{u:04d}", f"p{u % 7}", "purchase", 1))
        rows.append((f"u{u:04d}", f"p{(u * 3) % 7}", "purchase", 45))
    events = pd.DataFrame([{"event_id": f"e{i}", "user_id": u, "product_id": p,
                            "event_type": k, "query": None, "quantity": 1, "price": 1.0,
                            "ts": T0 + pd.Timedelta(days=d)}
                           for i, (u, p, k, d) in enumerate(rows)])
    catalog = pd.DataFrame([{"product_id": f"p{i}", "title": f"t{i}", "description": None,
                             "category": "c", "brand": None, "price": 1.0, "image_url": None,
                             "updated_at": T0} for i in range(7)])
    return events, catalog


def test_sample_draws_one_seeded_set_of_users_for_both_settings() -> None:
    events, catalog = _shop(300)
    split = temporal_split(events, catalog)
    assert len(split.truth["all"]) == 300
    sample = split.sample(50)
    assert len(sample.truth["all"]) == 50
    assert set(sample.truth["new"]) <= set(sample.truth["all"])
    assert set(sample.exclude) <= set(sample.truth["all"])
    assert sample.users("all") == split.sample(50).users("all")  # a rerun draws the same
    assert split.sample(None) is split and split.sample(300) is split


class Repeat:
    """Recommends each user's past purchases (the products of their training events)."""

    name = "repeat_items"

    def fit(self, data):
        self.past = data.events.groupby("user_id")["product_id"].agg(list).to_dict()
        return self

    def recommend(self, user_ids, k, *, exclude=None):
        return [[p for p in self.past.get(u, []) if p not in (exclude or {}).get(u, set())][:k]
                for u in user_ids]


def test_evaluate_split_samples_bootstraps_and_reports() -> None:
    events, catalog = _shop(400)
    split = temporal_split(events, catalog)
    result = evaluate_split(split, [Repeat()], ks=(1, 5), max_users=100, bootstrap=200)
    assert result.n_users["all"] == 100 and result.sampled_from["all"] == 400
    lo, hi = result.intervals["repeat_items"]["all"]["recall_at_5"]
    assert lo <= result.value("repeat_items", "all", "recall_at_5") <= hi
    assert len(result.per_user["repeat_items"]["all"]["recall_at_5"]) == 100
    text = result.to_markdown()
    assert "a uniform sample of 400 test users" in text and "95% bootstrap intervals" in text
    again = ProtocolResult.from_dict(result.to_dict())  # per-user values are not serialized
    assert again.intervals == result.intervals and again.per_user == {}
    assert result.paired("repeat_items", "repeat_items", "recall_at_5").diff == 0
