"""Redis stops while the server answers: /recommend keeps answering (degraded, flagged in the
response and in /readyz), never a 5xx, and recovers when Redis is back.

A copy of the session's trained shop switched to the production profile (Feast SQL registry
in PostgreSQL, Redis online store), its offline features materialized into a private
redis-server started by this test on a free port, so stopping it disturbs nothing else; it
keeps an append-only file, so what was materialized is there again after the restart.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from shops import known_user, on_copy

pytestmark = [pytest.mark.integration, pytest.mark.prod]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrivateRedis:
    """A redis-server of this test's own, with an append-only file in ``folder``."""

    def __init__(self, folder: Path):
        self.folder, self.port, self.proc = folder, _free_port(), None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(self.folder), "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("private redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
        self.proc = None


@pytest.fixture(scope="module")
def shop(trained_shop, tmp_path_factory: pytest.TempPathFactory):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    from shops import postgres_database, service_missing

    url = postgres_database("shoprec_test")
    if url is None:
        service_missing("PostgreSQL")
    root = tmp_path_factory.mktemp("degraded")
    redis = PrivateRedis(root)
    redis.start()
    prod = {"SHOPREC_PROFILE": "prod", "SHOPREC_FEAST_REGISTRY_URL": url,
            "SHOPREC_REDIS_URL": f"127.0.0.1:{redis.port},db=0",
            "SHOPREC_FEAST_PROJECT": f"degraded_{os.getpid()}"}
    try:
        with on_copy(trained_shop, root, **prod) as (settings, built):
            from features.store import materialize_day

            for day in built.days:  # the copy's offline features into the private Redis
                materialize_day(settings, day)
            yield settings, redis
    finally:
        redis.stop()


def test_recommend_survives_redis_going_away_and_recovers(shop) -> None:
    from fastapi.testclient import TestClient

    from serving.app import create_app

    settings, redis = shop
    user = known_user(settings)
    with TestClient(create_app(settings)) as api:
        healthy = api.get(f"/recommend/{user}", params={"k": 5}).json()
        assert healthy["degraded"] is None and healthy["cold_start"] is False
        assert "degraded" not in api.get("/readyz").json()["detail"]

        redis.stop()
        during = [api.get(f"/recommend/{who}", params={"k": 5})
                  for who in (user, "somebody-never-seen", user)]
        assert [r.status_code for r in during] == [200, 200, 200]
        known, stranger = during[0].json(), during[1].json()
        assert "online store unavailable" in known["degraded"]
        assert "last-known features" in known["degraded"]
        assert [i["product_id"] for i in known["items"]] == \
            [i["product_id"] for i in healthy["items"]]  # the same answer from memory
        assert "without history" in stranger["degraded"] and stranger["cold_start"] is True
        assert stranger["items"]  # popularity
        ready = api.get("/readyz")
        assert ready.status_code == 200 and "degraded" in ready.json()["detail"]
        search = api.get("/search", params={"q": "gift", "user_id": user})
        assert search.status_code == 200 and search.json()["degraded"]
        event = {"event_id": "e-degraded-1", "user_id": user, "event_type": "view",
                 "product_id": healthy["items"][0]["product_id"],
                 "ts": dt.datetime.now(dt.UTC).isoformat()}
        refused = api.post("/events", json=event)
        assert refused.status_code == 503 and "online store" in refused.json()["detail"]

        redis.start()  # the same port and append-only file: the features are back
        deadline = time.monotonic() + 30
        while True:
            after = api.get(f"/recommend/{user}", params={"k": 5}).json()
            if after["degraded"] is None or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert after["degraded"] is None
        assert [i["product_id"] for i in after["items"]] == \
            [i["product_id"] for i in healthy["items"]]
        assert "degraded" not in api.get("/readyz").json()["detail"]
