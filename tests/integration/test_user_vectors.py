"""User-side vectors written when a row changes (serving/user_vectors.py), on the session's
trained shop: the DAG wrote them, a request reads them and answers exactly as if it had
computed them, a changed row or another bundle computes again, and POST /events writes
them for the users it changed."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from shops import known_user, on_copy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def shop(trained_shop, tmp_path_factory: pytest.TempPathFactory):
    """A private copy (the tests write vectors and events), the last version champion."""
    from training.registry import set_champion

    with on_copy(trained_shop, tmp_path_factory.mktemp("vectors")) as (settings, built):
        set_champion(settings, built.versions[-1], reason="user vector tests")
        yield settings, built


@pytest.fixture(scope="module")
def bundle(shop):
    from serving.publish import load_version_bundle

    return load_version_bundle(shop[0])


def _reader(settings):
    from features.store import OnlineUserReader, feature_store

    store = feature_store(settings)
    return store, OnlineUserReader(store)


def _users(settings, bundle, n: int = 12) -> list[str]:
    """Users whose online rows name catalogue products (they have views)."""
    from serving.user_vectors import changed_users

    store, reader = _reader(settings)
    days = _days(settings)
    users = changed_users(settings, days[0], days[-1])
    rows = reader.read(users)
    return [u for u in users
            if any(p in bundle.item_row for p in rows[u]["recent_product_ids"])][:n]


def _days(settings):
    from features.contract import list_days

    return list_days(settings.landing_root, "events")


def _without_vectors(row: dict) -> dict:
    from features.user_state import VECTORS

    return {**row, VECTORS: None}


def test_the_daily_run_wrote_the_champions_vectors(trained_shop) -> None:
    """Building the shop through the DAG (user_vectors after materialize, and promote
    before the alias moved) left vectors of the champion it ended with for the last day's
    users."""
    from shops import shop_environment

    from serving.publish import load_version_bundle
    from serving.user_vectors import changed_users
    from training.ranking.histories import Histories

    with shop_environment(trained_shop.home) as settings:
        bundle = load_version_bundle(settings)
        _, reader = _reader(settings)
        users = changed_users(settings, trained_shop.last, trained_shop.last)
        rows = reader.read(users)
    usable = [u for u in users if Histories.from_row(rows[u]).vectors_for(bundle.identity)]
    with_products = [u for u in users
                     if any(p in bundle.item_row for p in rows[u]["recent_product_ids"])]
    assert with_products and set(usable) == set(with_products)


def test_stored_vectors_give_the_computed_answers(shop, bundle) -> None:
    """For every user: the stored vectors equal what a request computes (float32 rounding
    of a batch against one user), the retrieval answers are the same, and the ranking
    served from them is the computed one."""
    from serving.user_vectors import write_user_vectors
    from training.ranking.histories import VECTOR_FEATURES, Histories

    settings, _ = shop
    store, reader = _reader(settings)
    users = _users(settings, bundle)
    assert len(users) >= 5
    result = write_user_vectors(store, reader, bundle, users)
    assert result["written"] == len(users)
    rows = reader.read(users)
    scorer = bundle.scorer
    for user in users:
        stored = Histories.from_row(rows[user])
        fresh = Histories.from_row(_without_vectors(rows[user]))
        kept = stored.vectors_for(bundle.identity)
        assert kept is not None, user
        now = bundle.view_time(fresh)
        [computed] = scorer.views(fresh, now)
        scorer.retrieve([computed])
        [read] = scorer.views(stored, now, kept)
        for attribute in VECTOR_FEATURES:
            a, b = getattr(computed, attribute), getattr(read, attribute)
            assert (a is None) == (b is None), (user, attribute)
            if a is not None:
                np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"{user} {attribute}")
        assert computed.retrieved.keys() == read.retrieved.keys()
        for space, found in computed.retrieved.items():
            assert set(found.tolist()) == set(read.retrieved[space].tolist()), (user, space)
        np.testing.assert_array_equal(computed.together_cols, read.together_cols)
        [(rows_a, scores_a)] = scorer.rank(fresh, now, 10, views=[computed])
        [(rows_b, scores_b)] = scorer.rank(stored, now, 10, views=[read])
        assert list(rows_a) == list(rows_b), user
        np.testing.assert_allclose(scores_a, scores_b, atol=1e-4)


def test_a_changed_row_or_another_bundle_computes_again(shop, bundle) -> None:
    from features.realtime import ingest_events
    from serving.user_vectors import write_user_vectors
    from training.ranking.histories import Histories

    settings, _ = shop
    store, reader = _reader(settings)
    [user] = _users(settings, bundle, n=1)
    write_user_vectors(store, reader, bundle, [user])
    before = Histories.from_row(reader.read([user])[user])
    assert before.vectors_for(bundle.identity) is not None
    assert before.vectors_for(bundle.identity + "-another") is None
    product = next(p for p in bundle.products["product_id"])
    ingest_events(store, [{"event_id": "vectors-test-1", "user_id": user,
                           "product_id": str(product), "event_type": "view", "quantity": 1,
                           "ts": pd.Timestamp.now(tz="UTC").isoformat()}])
    after = Histories.from_row(reader.read([user])[user])
    assert after.stored and after.stored[0] is not None  # still there, but of the old row
    assert after.vectors_for(bundle.identity) is None


def test_the_api_reads_them_and_events_write_them(shop, bundle) -> None:
    """A request for a user with stored vectors uses them (/metrics counts it); POST
    /events writes new ones for the row it changed, and the next request uses those."""
    from fastapi.testclient import TestClient

    from serving.app import create_app
    from serving.user_vectors import write_user_vectors
    from training.ranking.histories import Histories

    settings, _ = shop
    store, reader = _reader(settings)
    user = known_user(settings)
    write_user_vectors(store, reader, bundle, [user])

    def views(client) -> dict[str, float]:
        text = client.get("/metrics").text
        return {source: float(line.rsplit(" ", 1)[1]) for source in ("stored", "computed")
                for line in text.splitlines()
                if line.startswith(f'shoprec_user_views_total{{source="{source}"}}')}

    with TestClient(create_app(settings)) as client:
        start = views(client)
        assert client.get(f"/recommend/{user}").status_code == 200
        middle = views(client)
        assert middle["stored"] == start["stored"] + 1, (start, middle)
        product = str(bundle.products["product_id"].iloc[3])
        posted = client.post("/events", json={
            "event_id": "vectors-test-2", "user_id": user, "product_id": product,
            "event_type": "add_to_cart", "quantity": 1, "ts": pd.Timestamp.now(tz="UTC").isoformat()})
        assert posted.status_code == 200, posted.text
        row = Histories.from_row(reader.read([user])[user])
        assert row.vectors_for(client.app.state.slot.bundle.identity) is not None
        assert client.get(f"/recommend/{user}").status_code == 200
        end = views(client)
        assert end["stored"] == middle["stored"] + 1 and end["computed"] == middle["computed"]
