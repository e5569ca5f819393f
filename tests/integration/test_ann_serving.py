"""One retrieval index per model version, ANN above the exact threshold, on the real app.

On a private copy of the session's trained shop (80 products), the champion's indexes are
rebuilt by the DAG's build_index step with ``SHOPREC_INDEX_EXACT_MAX=10``: every vector space
(two-tower, text, ALS) gets an HNSW index, checked against exact search. The HTTP app then
answers ``/recommend``, ``/search`` and ``/similar`` from those indexes (each request moves
the query counter of the index it should use), and ``/version`` reports each one's kind,
size and recall. The step also stores the lexical side of /search, which the server loads
instead of tokenizing the catalogue.
"""

from __future__ import annotations

import pytest
from shops import known_user

pytestmark = pytest.mark.integration

SPACES = {"two_tower", "text", "als", "sequence"}


@pytest.fixture(scope="module")
def ann_shop(trained_shop, tmp_path_factory: pytest.TempPathFactory):
    from shops import on_copy

    from serving.publish import build_index_for_version
    from training.registry import set_champion

    with on_copy(trained_shop, tmp_path_factory.mktemp("ann"),
                 SHOPREC_INDEX_EXACT_MAX="10") as (settings, built):
        version = built.versions[-1]
        set_champion(settings, version, reason="ANN serving test")
        result = build_index_for_version(settings, version)
        yield settings, version, result


@pytest.fixture(scope="module")
def api(ann_shop):
    from fastapi.testclient import TestClient

    from serving.app import create_app

    settings, _, _ = ann_shop
    with TestClient(create_app(settings)) as client:
        yield client


def _searches(api) -> dict[str, int]:
    return {name: info["searches"] for name, info in api.get("/version").json()["indexes"].items()}


def test_build_index_makes_an_hnsw_index_per_space_and_checks_it(ann_shop) -> None:
    settings, version, result = ann_shop
    assert settings.index_exact_max == 10
    assert result["version"] == str(version) and result["index_kind"] == "hnsw"
    assert set(result["indexes"]) == SPACES
    for info in result["indexes"].values():
        assert info["kind"] == "hnsw" and info["size"] == result["size"] > 10
        assert info["recall_at_50"] >= settings.index_min_recall
    assert result["lexical"] == {"file": "lexical.npz", "rows": result["size"]}


def test_the_server_loads_the_stored_lexical_index(ann_shop, monkeypatch) -> None:
    import serving.search as search
    from serving.publish import load_version_bundle

    settings, version, _ = ann_shop
    monkeypatch.setattr(search, "_lexical", lambda *a: pytest.fail("tokenized at load"))
    bundle = load_version_bundle(settings, version)
    monkeypatch.undo()
    built = search.SearchIndex(bundle.products, None)
    assert bundle.search_index.rows == built.rows == bundle.size
    for query in ("gift", "red heart", str(bundle.products.product_id.iat[3])):
        want = [(h.row, h.matched) for h in built.search(query, 10)]
        assert [(h.row, h.matched) for h in bundle.search_index.search(query, 10)] == want


def test_version_reports_every_index(ann_shop, api) -> None:
    _, version, result = ann_shop
    body = api.get("/version").json()
    assert body["model_version"] == str(version)
    assert (body["index_kind"], body["index_size"]) == ("hnsw", result["size"])
    assert set(body["indexes"]) == SPACES
    for name, info in body["indexes"].items():
        assert info["kind"] == "hnsw" and info["size"] == result["size"]
        assert info["recall_at_50"] == pytest.approx(result["indexes"][name]["recall_at_50"])
        assert info["exact_max"] == 10 and info["dim"] > 0


def test_ann_serves_recommend_search_and_similar(ann_shop, api) -> None:
    settings, _, _ = ann_shop
    user = known_user(settings)

    before = _searches(api)
    body = api.get(f"/recommend/{user}", params={"k": 10}).json()
    assert len(body["items"]) == 10 and body["cold_start"] is False
    after = _searches(api)
    assert all(after[n] > before[n] for n in SPACES)  # every candidate source retrieved

    product = body["items"][0]["product_id"]
    before = after
    similar = api.get(f"/similar/{product}", params={"k": 5}).json()["items"]
    assert len(similar) == 5 and product not in {i["product_id"] for i in similar}
    after = _searches(api)
    assert after["two_tower"] == before["two_tower"] + 1
    assert (after["text"], after["als"]) == (before["text"], before["als"])

    before = after
    hits = api.get("/search", params={"q": "gift for a friend", "k": 5}).json()["items"]
    assert hits
    after = _searches(api)
    assert after["text"] == before["text"] + 1
    assert (after["two_tower"], after["als"]) == (before["two_tower"], before["als"])
