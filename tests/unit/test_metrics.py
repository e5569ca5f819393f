"""The serving metrics: Prometheus text, independent of prometheus_client's global mode."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from serving.metrics import Metrics

pytestmark = pytest.mark.fast


def test_metrics_count_requests_and_bucket_latency(monkeypatch) -> None:
    # Feast points this at a temp folder on import; a stale or missing one must not matter.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/nonexistent/shoprec-test")
    metrics = Metrics()
    metrics.observe("/similar/{product_id}", "GET", 200, 0.004)
    metrics.observe("/similar/{product_id}", "GET", 200, 0.030)
    metrics.observe("/similar/{product_id}", "GET", 404, 0.001)
    metrics.bundle = (7.0, 1234)
    text = generate_latest(metrics.registry).decode()
    assert ('shoprec_requests_total{endpoint="/similar/{product_id}",method="GET",'
            'status="200"} 2.0') in text
    assert 'status="404"} 1.0' in text
    assert 'shoprec_request_seconds_bucket{endpoint="/similar/{product_id}",le="0.005"} 2.0' \
        in text
    assert 'shoprec_request_seconds_bucket{endpoint="/similar/{product_id}",le="+Inf"} 3.0' \
        in text
    assert 'shoprec_request_seconds_count{endpoint="/similar/{product_id}"} 3.0' in text
    assert "shoprec_bundle_version 7.0" in text and "shoprec_bundle_products 1234.0" in text


def test_a_stalled_event_loop_is_logged_with_where_it_was_and_counted(caplog) -> None:
    import asyncio
    import logging
    import time

    from serving.watchdog import LoopWatchdog

    caplog.set_level(logging.WARNING, logger="serving.watchdog")
    watchdog = LoopWatchdog(threshold=0.1, interval=0.01)

    def block_the_loop() -> None:
        time.sleep(0.3)  # a blocking call on the loop, as a bug would make

    async def serve() -> None:
        watchdog.start()
        await asyncio.sleep(0.1)  # beats: no stall
        assert watchdog.stalls == 0
        block_the_loop()
        await asyncio.sleep(0.1)  # the loop runs again
        watchdog.stop()

    asyncio.run(serve())
    assert watchdog.stalls == 1 and 0.2 <= watchdog.longest < 1.0
    assert "[event loop]" in caplog.text and "block_the_loop" in caplog.text
    assert "ran again after a" in caplog.text
    metrics = Metrics()
    metrics.loop_stalls = watchdog.stalls
    assert "shoprec_event_loop_stalls_total 1.0" in generate_latest(metrics.registry).decode()


def test_a_worker_without_logging_gets_the_clis_format(monkeypatch) -> None:
    import logging

    from serving.runtime import LOG_FORMAT, worker_logging

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # a spawned uvicorn worker: nothing configured
    monkeypatch.setattr(root, "level", logging.WARNING)
    assert worker_logging()
    assert root.level == logging.INFO and root.handlers[0].formatter._fmt == LOG_FORMAT
    assert not worker_logging()  # configured once; a configured process is left alone
