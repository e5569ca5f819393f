"""The HTTP API on a real trained shop: every endpoint, bad input, the new-product cold
start, events, metrics, and model swaps under load (a real uvicorn server).

The shop is the session's trained shop (tests/integration/conftest.py: every day through the
DAG, with a product added to the catalogue on the last day that nobody has bought). The API
tests share one private copy of it (they post events: a write), with the last version as
champion; each swap test starts its servers on a copy of its own (they move the alias).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pandas as pd
import pytest
from shops import ADMIN_TOKEN as TOKEN
from shops import LAST, NEW_ID, known_user, on_copy

HTTP = httpx.Client(timeout=60)  # generous: CI shares 2 cores with the server under test

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def shop(trained_shop, tmp_path_factory: pytest.TempPathFactory):
    """A copy of the trained shop for this module: (settings, versions, twin)."""
    from training.registry import set_champion

    with on_copy(trained_shop, tmp_path_factory.mktemp("serving")) as (settings, built):
        set_champion(settings, built.versions[-1], reason="serving tests")
        yield settings, built.versions, built.twin


@pytest.fixture(scope="module")
def api(shop):
    from fastapi.testclient import TestClient

    from serving.app import create_app

    settings, _, _ = shop
    with TestClient(create_app(settings)) as client:
        yield client


# -- endpoints --------------------------------------------------------------------------


def test_recommend_filters_and_explains(shop, api) -> None:
    settings, _, _ = shop
    user = known_user(settings)
    body = api.get(f"/recommend/{user}", params={"k": 8}).json()
    assert body["cold_start"] is False and len(body["items"]) == 8
    assert all(i["reason"] and i["title"] for i in body["items"])
    bought = [i["product_id"] for i in body["items"] if i["reason"] == "you bought it before"]
    fresh = api.get(f"/recommend/{user}", params={"k": 50, "exclude_purchased": True}).json()
    assert not set(bought) & {i["product_id"] for i in fresh["items"]}
    category = body["items"][0]["product_id"]
    cat_name = api.get(f"/similar/{category}").json()  # a known product
    assert cat_name["items"]
    from serving.publish import load_version_bundle

    bundle = load_version_bundle(settings)
    some_category = sorted(bundle.categories)[0]
    only = api.get(f"/recommend/{user}", params={"k": 5, "category": some_category}).json()
    cats = dict(zip(bundle.products["product_id"], bundle.products["category"], strict=True))
    assert only["items"] and {cats[i["product_id"]] for i in only["items"]} == {some_category}
    assert api.get(f"/recommend/{user}", params={"category": "no-such"}).status_code == 404


def test_cold_users_get_country_popularity_when_the_country_is_known(shop, api) -> None:
    settings, _, _ = shop
    from features.contract import read_upto

    users = read_upto(settings.landing_root, "users", LAST)
    country = users["country"].dropna().value_counts().index[0]
    body = api.get("/recommend/nobody-knows-me", params={"k": 4, "country": country}).json()
    assert body["cold_start"] is True
    assert [i["reason"] for i in body["items"]] == [f"popular in {country} this month"] * 4
    plain = api.get("/recommend/nobody-knows-me", params={"k": 4}).json()
    assert plain["cold_start"] is True and len(plain["items"]) == 4
    assert all(i["reason"] in {"trending this week", "popular with shoppers this month"}
               for i in plain["items"])


def test_search_finds_codes_words_and_personalises(shop, api) -> None:
    settings, _, twin = shop
    by_code = api.get("/search", params={"q": twin["product_id"], "k": 3}).json()
    assert by_code["items"][0]["product_id"] == twin["product_id"]
    words = " ".join(twin["title"].split()[:2])
    hits = api.get("/search", params={"q": words, "k": 5}).json()["items"]
    assert twin["product_id"] in {h["product_id"] for h in hits}
    assert all(h["reason"].startswith(("matches '", "related to '")) for h in hits)
    user = known_user(settings)
    mine = api.get("/search", params={"q": words, "k": 5, "user_id": user}).json()
    assert mine["user_id"] == user and len(mine["items"]) == 5


def test_a_new_product_is_found_by_search_and_similar(shop, api) -> None:
    """Catalogue partition with a product nobody bought -> pipeline -> /search, /similar."""
    _, _, twin = shop
    hits = api.get("/search", params={"q": "Deluxe", "k": 3}).json()["items"]
    assert hits[0]["product_id"] == NEW_ID and hits[0]["reason"] == "matches 'deluxe'"
    similar = api.get(f"/similar/{twin['product_id']}", params={"k": 5}).json()["items"]
    assert NEW_ID in [i["product_id"] for i in similar]
    assert twin["product_id"] not in [i["product_id"] for i in similar]
    assert all(i["reason"] == f"similar to {twin['title']}" for i in similar)


def test_complementary_comes_from_co_occurrence(shop, api) -> None:
    from serving.publish import load_version_bundle

    settings, _, _ = shop
    bundle = load_version_bundle(settings)
    neighbours = bundle.scorer.state.neighbours
    row = int(neighbours.getnnz(axis=1).argmax())
    product = bundle.products["product_id"].iat[row]
    body = api.get(f"/complementary/{product}", params={"k": 3}).json()
    together = {bundle.products["product_id"].iat[c] for c in neighbours[row].indices}
    assert body["items"][0]["product_id"] in together
    assert body["items"][0]["reason"].startswith("often bought with")
    lonely = api.get(f"/complementary/{NEW_ID}", params={"k": 3}).json()
    assert lonely["fallback"] is True and len(lonely["items"]) == 3


def test_bad_input_gets_a_4xx_with_a_reason(api) -> None:
    cases = [
        ("get", "/similar/NO-SUCH", {}, 404),
        ("get", "/complementary/NO-SUCH", {}, 404),
        ("get", "/recommend/u1", {"k": 0}, 422),
        ("get", "/recommend/u1", {"k": 1001}, 422),
        ("get", "/search", {"q": ""}, 422),
        ("get", "/search", {"q": "   "}, 422),
        ("get", "/search", {"q": "x" * 201}, 422),
        ("get", "/search", {}, 422),
    ]
    for method, path, params, status in cases:
        response = getattr(api, method)(path, params=params)
        assert response.status_code == status, (path, params, response.text)
        body = response.json()
        assert body.get("detail"), body
    broken = api.post("/events", content=b'{"event_id": ', headers={
        "content-type": "application/json"})
    assert broken.status_code == 422 and "reason" in broken.json()


def test_events_reach_the_next_recommendation(shop, api) -> None:
    from serving.publish import load_version_bundle

    settings, _, _ = shop
    bundle = load_version_bundle(settings)
    product = bundle.products["product_id"].iat[5]
    user = "fresh-visitor"
    assert api.get(f"/recommend/{user}").json()["cold_start"] is True
    now = pd.Timestamp.now(tz="UTC").isoformat()
    event = {"event_id": "rt-1", "user_id": user, "event_type": "purchase",
             "product_id": product, "quantity": 1, "price": 2.5, "ts": now}
    response = api.post("/events", json=event)
    assert response.status_code == 200, response.text
    assert response.json() == {"events": 1, "users": [user]}
    after = api.get(f"/recommend/{user}", params={"k": 60}).json()
    assert after["cold_start"] is False
    reasons = {i["product_id"]: i["reason"] for i in after["items"]}
    assert reasons[product] == "you bought it before"
    batch = [{**event, "event_id": f"rt-{i}", "event_type": "view"} for i in (2, 3)]
    assert api.post("/events", json=batch).json()["events"] == 2
    bad = api.post("/events", json={**event, "event_id": "rt-9", "event_type": "teleport"})
    assert bad.status_code == 422 and "event_type" in bad.json()["reason"]
    future = api.post("/events", json={**event, "event_id": "rt-8", "ts": "2999-01-01T00:00:00Z"})
    assert future.status_code == 422 and "ts" in future.json()["detail"]  # the contract's rule
    missing = api.post("/events", json={"user_id": user})
    assert missing.status_code == 422


def test_exclude_purchased_leaves_out_every_purchase_however_long_ago(shop, api) -> None:
    """300 purchases, then 200 views: the purchases have left the 200-event history, but
    ``exclude_purchased`` still leaves every product bought out (the purchased list the
    real-time path keeps); without the flag they can come back."""
    from serving.publish import load_version_bundle

    settings, _, _ = shop
    catalog = load_version_bundle(settings).products["product_id"].tolist()
    bought, viewed = catalog[:-40], catalog[-40:]
    start = pd.Timestamp.now(tz="UTC") - pd.Timedelta(days=300)
    user = "u-heavy-buyer"
    purchases = [{"event_id": f"hb-p{i}", "user_id": user, "event_type": "purchase",
                  "product_id": bought[i % len(bought)], "quantity": 1, "price": 3.0,
                  "ts": (start + pd.Timedelta(hours=i)).isoformat()} for i in range(300)]
    views = [{"event_id": f"hb-v{i}", "user_id": user, "event_type": "view",
              "product_id": viewed[i % len(viewed)],
              "ts": (start + pd.Timedelta(days=200, minutes=i)).isoformat()} for i in range(200)]
    for batch in (purchases, views):
        response = api.post("/events", json=batch)
        assert response.status_code == 200, response.text
    history = api.get(f"/recommend/{user}", params={"k": 60}).json()
    assert history["cold_start"] is False and history["degraded"] is None
    k = len(viewed) + 20  # more than the products never bought: some bought ones must come
    again = {i["product_id"] for i in api.get(f"/recommend/{user}", params={"k": k}).json()
             ["items"]}
    assert again & set(bought)
    fresh = api.get(f"/recommend/{user}", params={"k": k, "exclude_purchased": True}).json()
    assert fresh["items"] and not {i["product_id"] for i in fresh["items"]} & set(bought)


def test_a_malformed_online_row_is_an_error_not_a_view_history(shop, api, caplog) -> None:
    """A history row whose event types are not one per product (a writer's bug) is logged,
    counted in /metrics and answered without history, flagged degraded with the reason;
    it is never read as a history of views, and the store is not marked down for it."""
    from feast.data_source import PushMode

    from features.realtime import PUSH_SOURCES, RECENT_VIEW
    from features.store import feature_store
    from serving.publish import load_version_bundle

    settings, _, _ = shop
    products = load_version_bundle(settings).products["product_id"].iloc[:3].tolist()
    user = "u-malformed"
    row = {"user_id": user, "recent_product_ids": [products],
           "recent_event_types": [["purchase", "view"]],  # two types for three products
           "recent_timestamps": [[1_700_000_000, 1_700_000_100, 1_700_000_200]],
           "purchased_product_ids": [products[:1]], "n_events_total": [3],
           "event_timestamp": [pd.Timestamp.now(tz="UTC")]}
    feature_store(settings).push(PUSH_SOURCES[RECENT_VIEW], pd.DataFrame(row),
                                 to=PushMode.ONLINE)
    before = api.get("/metrics").text
    assert "shoprec_malformed_online_rows_total 0.0" in before
    with caplog.at_level("ERROR", logger="shoprec.serving"):
        body = api.get(f"/recommend/{user}", params={"k": 5}).json()
    assert body["degraded"].startswith("malformed online row: recent_event_types has 2 "
                                       "entries for 3 products"), body["degraded"]
    assert body["cold_start"] is True  # served without the row, not as three views
    assert any("malformed online row for user 'u-malformed'" in r.getMessage()
               for r in caplog.records)
    assert "shoprec_malformed_online_rows_total 1.0" in api.get("/metrics").text
    healthy = api.get(f"/recommend/{known_user(settings)}").json()
    assert healthy["degraded"] is None  # the store itself is fine
    assert "degraded" not in api.get("/readyz").json()["detail"]


def test_version_and_metrics(shop, api) -> None:
    settings, versions, _ = shop
    info = api.get("/version").json()
    assert info["model_version"] == versions[-1] and info["alias"] == "champion"
    assert info["index_kind"] == "exact" and info["index_size"] > 0
    assert {n: (i["kind"], i["size"], i["recall_at_50"]) for n, i in info["indexes"].items()} \
        == {n: ("exact", info["index_size"], 1.0) for n in ("two_tower", "text", "als", "sequence")}
    assert info["cuts"]["test_cut"] < info["cuts"]["end"]
    api.get("/recommend/u-metrics")
    text = api.get("/metrics").text
    assert 'shoprec_requests_total{endpoint="/recommend/{user_id}",method="GET",status="200"}' \
        in text
    assert "shoprec_request_seconds_bucket" in text
    assert f"shoprec_bundle_version {float(versions[-1])}" in text


def test_the_openapi_schema_holds_under_generated_requests(api) -> None:
    """schemathesis against the app's own schema: no server error, responses match it."""
    import schemathesis
    from hypothesis import HealthCheck, given
    from hypothesis import settings as hsettings
    from schemathesis.checks import positive_data_acceptance

    def check(op, excluded):
        @hsettings(max_examples=25, deadline=None, derandomize=True,
                   suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def run(case):
            response = case.call()
            assert response.status_code < 500, (case.path, case.query, response.text)
            case.validate_response(response, excluded_checks=excluded)

        return run

    schema = schemathesis.openapi.from_asgi("/openapi.json", api.app)
    failures = []
    for operation in schema.get_all_operations():
        op = operation.ok()
        if op.path.startswith("/admin"):
            continue  # reload swaps models: covered by the swap tests below
        # /events: the schema cannot say every contract rule (product_id unless search, no
        # future timestamps), so a schema-valid event may rightly get a 422.
        excluded = [positive_data_acceptance] if op.path == "/events" else []
        try:
            check(op, excluded)()
        except Exception as exc:  # noqa: BLE001 - collect: one run names every failure
            failures.append(f"{op.method.upper()} {op.path}: {exc}")
    assert not failures, "\n".join(failures)


# -- model swaps under load -------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def serve(shop_copy):
    """Start real uvicorn servers on a copy of the trained shop (champion = the first
    version); stops them."""
    from training.registry import set_champion

    settings, built = shop_copy
    versions = built.versions
    set_champion(settings, versions[0], reason="swap test: start on the old version")
    procs = []

    def start(poll_seconds: float = 0) -> str:
        port = _free_port()
        env = {**os.environ, "SHOPREC_SERVING_POLL_SECONDS": str(poll_seconds)}
        log = settings.home / "logs" / f"serving-{port}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--factory", "serving.app:create_app",
                 "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2])
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                break
            time.sleep(0.3)
        raise RuntimeError(f"server not ready: {log.read_text()[-2000:]}")

    yield start, settings, versions
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def _hammer(url: str, users: list[str], total: int, seen: list[str], errors: list[str],
            swap_at: int, swap) -> None:
    """``total`` requests from 8 threads; ``swap()`` runs once ``swap_at`` have finished."""
    done = 0
    lock = threading.Lock()
    swapped = threading.Event()

    def one(i: int) -> None:
        nonlocal done
        with httpx.Client(base_url=url, timeout=30) as client:
            for j in range(i, total, 8):
                try:
                    r = client.get(f"/recommend/{users[j % len(users)]}", params={"k": 10})
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {r.text[:200]}")
                    else:
                        seen.append(r.json()["model_version"])
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))
                with lock:
                    done += 1
                    go = done >= swap_at and not swapped.is_set()
                    if go:
                        swapped.set()
                if go:
                    threading.Thread(target=swap).start()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(8)))


def test_a_champion_swap_under_load_drops_no_request(serve) -> None:
    from training.registry import set_champion

    start, settings, versions = serve
    url = start()
    users = [known_user(settings), "cold-1", "cold-2", "u00001"]
    seen: list[str] = []
    errors: list[str] = []
    reloads: list[dict] = []

    def swap() -> None:
        set_champion(settings, versions[-1], reason="swap test")
        reloads.append(HTTP.post(f"{url}/admin/reload", timeout=120,
                                  headers={"Authorization": f"Bearer {TOKEN}"}).json())

    _hammer(url, users, 2400, seen, errors, swap_at=600, swap=swap)
    assert errors == []
    assert len(seen) == 2400
    assert reloads and reloads[0]["reloaded"] is True, reloads
    assert seen[0] == versions[0] and versions[-1] in seen  # /recommend moved mid-way
    assert HTTP.get(f"{url}/version").json()["model_version"] == versions[-1]
    assert HTTP.post(f"{url}/admin/reload").status_code == 401
    assert HTTP.post(f"{url}/admin/reload",
                      headers={"Authorization": "Bearer nope"}).status_code == 403


def test_a_bundle_that_fails_to_load_leaves_the_old_one_serving(serve) -> None:
    from serving.bundle import EMBEDDINGS
    from serving.publish import download_model_bundle
    from training.registry import mlflow_client, set_champion

    start, settings, versions = serve
    url = start()
    run_id = mlflow_client(settings).get_model_version(settings.model_name,
                                                       versions[-1]).run_id
    path = download_model_bundle(settings, run_id=run_id) / EMBEDDINGS
    original = path.read_bytes()
    path.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    try:
        set_champion(settings, versions[-1], reason="broken bundle test")
        result = HTTP.post(f"{url}/admin/reload", timeout=120,
                            headers={"Authorization": f"Bearer {TOKEN}"}).json()
        assert result["reloaded"] is False and "checksum mismatch" in result["detail"]
        ready = HTTP.get(f"{url}/readyz").json()
        assert ready["ready"] is True and "last reload failed" in ready["detail"]
        assert HTTP.get(f"{url}/version").json()["model_version"] == versions[0]
        assert HTTP.get(f"{url}/recommend/u00001").status_code == 200
    finally:
        path.write_bytes(original)


def test_the_server_follows_the_champion_alias(serve) -> None:
    from training.registry import set_champion

    start, settings, versions = serve
    url = start(poll_seconds=0.5)
    assert HTTP.get(f"{url}/version").json()["model_version"] == versions[0]
    set_champion(settings, versions[-1], reason="poll test")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if HTTP.get(f"{url}/version").json()["model_version"] == versions[-1]:
            break
        time.sleep(0.3)
    assert HTTP.get(f"{url}/version").json()["model_version"] == versions[-1]
