"""The ranking stage's richer features, by hand, and bundles trained before them."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from unit.test_blend import T0, catalog_frame, events_frame
from unit.test_scorer import PRODUCTS, _fitted, loyal_shop

from training.data import train_data
from training.ranking.config import CONTEXT_NAMES, FEATURE_NAMES, LEGACY_FEATURE_NAMES
from training.ranking.histories import Histories
from training.ranking.items import repurchase_cycles
from training.ranking.pair import PairScorer
from training.ranking.scorer import Scorer

pytestmark = pytest.mark.fast


def test_repurchase_cycles_are_the_median_gap_between_a_buyers_occasions() -> None:
    day = pd.Timedelta(days=1)
    occasions = pd.DataFrame({
        "user_id": ["u", "u", "u", "v", "v", "w"],
        "product_id": ["a", "a", "a", "a", "a", "b"],
        "ts": [T0, T0 + 4 * day, T0 + 10 * day, T0, T0 + 8 * day, T0],
    })
    # a's gaps: 4, 6 (u) and 8 (v): median 6; b and c never bought twice: the shop's median
    np.testing.assert_allclose(repurchase_cycles(occasions, ["a", "b", "c"]), [6.0, 6.0, 6.0])
    occasions.loc[4, "ts"] = T0 + 2 * day  # v's gap 2: a's gaps 4, 6, 2 -> 4
    np.testing.assert_allclose(repurchase_cycles(occasions, ["a"]), [4.0])


def test_context_features_by_hand() -> None:
    rows = [("me", "p0", 1, "view"), ("me", "p0", 2, "view"), ("me", "p1", 3, "add_to_cart"),
            ("me", "p1", 10), ("me", "p2", 10), ("me", "p1", 20), ("me", "p3", 25),
            ("me", "p4", 25)]
    rows += [(f"x{i}", p, 5, "purchase") for i in range(4) for p in ("p3", "p5")]
    events = events_frame(rows)
    catalog = catalog_frame(PRODUCTS)
    catalog["category"] = ["c0", "c0", "c1"] + ["c2"] * (len(PRODUCTS) - 3)
    catalog["price"] = [1.0, 3.0, 7.0] + [1.0] * (len(PRODUCTS) - 3)
    data = train_data(events, catalog, T0 + pd.Timedelta(days=30))
    scorer = Scorer(_fitted()[0].config).fit_items(data)
    features, columns = scorer.features(Histories.from_events(events, ["me"]),
                                        (T0 + pd.Timedelta(days=30)).timestamp())
    col = {scorer.state.product_ids[c]: i for i, c in enumerate(columns[0]) if c >= 0}
    f = {name: features[0, :, FEATURE_NAMES.index(name)] for name in CONTEXT_NAMES}
    assert f["log_seen"][col["p0"]] == pytest.approx(np.log1p(2))  # two views
    assert f["log_interacted"][col["p0"]] == 0.0
    assert f["log_interacted"][col["p1"]] == pytest.approx(np.log1p(3))  # a cart, two buys
    # 8 history entries, 5 of them in c0 (p0 twice, p1 three times), 1 in c1 (p2)
    assert f["category_share"][col["p0"]] == pytest.approx(5 / 8)
    assert f["category_share"][col["p2"]] == pytest.approx(1 / 8)
    # the user's purchases p1, p2, p1, p3, p4: median log price log1p(3)
    assert f["price_vs_user"][col["p2"]] == pytest.approx(np.log1p(7) - np.log1p(3))
    # the last basket (day 25) is p3 and p4; p5 was bought with p3 by everyone else
    assert f["last_basket"][col["p5"]] > 0 and f["last_basket"][col["p0"]] == 0
    # p1 bought on days 10 and 20: the shop's only repeat, a 10-day cycle; last bought 10
    # days ago: due
    assert f["due"][col["p1"]] == pytest.approx(1.0)
    assert f["due"][col["p0"]] == 0.0  # never bought
    ranks = features[0, :, FEATURE_NAMES.index("co_occurrence_rank")][columns[0] >= 0]
    assert ranks.max() == pytest.approx(1.0) and (ranks >= 0).all()


def test_a_bundle_trained_before_the_richer_features_scores_as_it_did(tmp_path) -> None:
    scorer, cut = _fitted()
    torch.manual_seed(0)
    legacy = {s: PairScorer(len(LEGACY_FEATURE_NAMES), scorer.config.hidden).eval()
              for s in ("all", "new")}
    scorer.pair_scorers, scorer.stages, scorer.tree_rankers = dict(legacy), {}, {}
    folder = scorer.save(tmp_path / "scorer")
    saved = pickle.loads((folder / "scorer.pkl").read_bytes())
    for key in ("features", "stages", "stage_choice"):  # what an older bundle lacks
        del saved[key]
    (folder / "scorer.pkl").write_bytes(pickle.dumps(saved))
    loaded = Scorer.load(folder)
    assert loaded.feature_names == LEGACY_FEATURE_NAMES
    hist = Histories.from_events(loyal_shop(), ["u1", "u2"])
    features, columns = loaded.features(hist, cut.timestamp())
    with torch.inference_mode():
        expected = legacy["all"](torch.from_numpy(features[..., [
                FEATURE_NAMES.index(n) for n in LEGACY_FEATURE_NAMES]])).numpy()
    got = loaded._apply("all", features, columns < 0)
    np.testing.assert_allclose(got[columns >= 0], expected[columns >= 0], rtol=1e-5, atol=1e-5)
    saved["features"] = [*LEGACY_FEATURE_NAMES, "mood"]  # a feature this code lacks
    (folder / "scorer.pkl").write_bytes(pickle.dumps(saved))
    with pytest.raises(ValueError, match=r"does not compute \(mood\)"):
        Scorer.load(folder)


def test_without_context_the_stage_reads_the_17_and_saves_that(tmp_path) -> None:
    from dataclasses import replace

    from unit.test_scorer import SMALL

    scorer, cut = _fitted(config=replace(SMALL, context=False))
    assert scorer.feature_names == LEGACY_FEATURE_NAMES
    assert next(iter(scorer.pair_scorers["all"].parameters())).shape[-1] == 17
    hist = Histories.from_events(loyal_shop(), ["u1", "u2"])
    loaded = Scorer.load(scorer.save(tmp_path / "scorer"))
    assert loaded.feature_names == LEGACY_FEATURE_NAMES
    np.testing.assert_array_equal(loaded.scores(hist, cut.timestamp()),
                                  scorer.scores(hist, cut.timestamp()))
