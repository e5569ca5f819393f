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
