"""The serving API's Prometheus metrics (``/metrics``)."""

from __future__ import annotations

import threading


class Metrics:
    """Prometheus metrics of one app: request counts and latency histograms per endpoint,
    the bundle served.

    Kept in plain counters behind a lock and exposed through a custom collector on the app's
    own registry, so they never depend on process-global prometheus_client state (Feast
    switches prometheus_client to multiprocess file storage when it is imported).
    """

    BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry

        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = {}
        self.latency: dict[str, list[float]] = {}  # endpoint -> bucket counts, then sum
        self.bundle: tuple[float, int] | None = None  # (version, products)
        self.malformed_rows = 0  # online rows refused as malformed (UserHistory.malformed)
        self.loop_stalls = 0  # event-loop stalls (serving.watchdog.LoopWatchdog)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def observe(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (endpoint, method, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1
            row = self.latency.setdefault(endpoint, [0.0] * (len(self.BUCKETS) + 2))
            for i, bound in enumerate(self.BUCKETS):
                if seconds <= bound:
                    row[i] += 1
            row[-2] += 1  # +Inf
            row[-1] += seconds

    def collect(self):
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        with self._lock:
            requests = dict(self.requests)
            latency = {k: list(v) for k, v in self.latency.items()}
            bundle = self.bundle
        counter = CounterMetricFamily("shoprec_requests", "HTTP requests",
                                      labels=["endpoint", "method", "status"])
        for labels, value in sorted(requests.items()):
            counter.add_metric(list(labels), value)
        yield counter
        histogram = HistogramMetricFamily("shoprec_request_seconds", "HTTP request latency",
                                          labels=["endpoint"])
        for endpoint, row in sorted(latency.items()):
            buckets = [(repr(b), row[i]) for i, b in enumerate(self.BUCKETS)]
            histogram.add_metric([endpoint], buckets + [("+Inf", row[-2])], sum_value=row[-1])
        yield histogram
        yield CounterMetricFamily("shoprec_malformed_online_rows",
                                  "online history rows refused as malformed (served without "
                                  "history, flagged degraded)", value=self.malformed_rows)
        from serving.bundle import VIEW_SOURCES

        views = CounterMetricFamily("shoprec_user_views",
                                    "users' views by where a request found them: kept by this "
                                    "worker, stored with the row, or computed on the request",
                                    labels=["source"])
        for source in ("kept", "stored", "computed"):
            views.add_metric([source], VIEW_SOURCES.get(source, 0))
        yield views
        yield CounterMetricFamily("shoprec_event_loop_stalls",
                                  "times this process's event loop did not run for 250 ms or "
                                  "more (the log says where)", value=self.loop_stalls)
        if bundle is not None:
            yield GaugeMetricFamily("shoprec_bundle_version", "model version being served",
                                    value=bundle[0])
            yield GaugeMetricFamily("shoprec_bundle_products",
                                    "products in the served catalogue", value=bundle[1])
