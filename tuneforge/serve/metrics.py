"""Prometheus metrics of a server, in their own registry (several apps may live in one process,
as in the tests). ``GET /metrics`` serves :meth:`Metrics.render` in the text format.

Labels are kept to a bounded set: endpoint (the known routes, else "other"), status code, and
model id (only ids the server serves). API keys never appear.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    """Requests by status, latency, tokens, queue depth and batch sizes."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("tuneforge_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("tuneforge_request_latency_seconds",
                                 "Time from request to last byte, by endpoint", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.time_to_first_token = Histogram(
            "tuneforge_time_to_first_token_seconds",
            "Time from a choice's submission to its first generated token",
            buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("tuneforge_prompt_tokens", "Prompt tokens of answered "
                                     "requests", ["model"], registry=r)
        self.generated_tokens = Counter("tuneforge_generated_tokens", "Tokens generated",
                                        ["model"], registry=r)
        self.queue_depth = Gauge("tuneforge_queue_depth", "Choices waiting for a batch",
                                 registry=r)
        self.running = Gauge("tuneforge_running_rows", "Rows of the batch being generated",
                             registry=r)
        self.batch_size = Histogram("tuneforge_batch_size", "Rows per generation batch",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.rate_limited = Counter("tuneforge_rate_limited", "Requests refused with 429",
                                    registry=r)

    def watch(self, batcher) -> None:
        """Read queue depth and running rows from ``batcher`` at each scrape."""
        self.queue_depth.set_function(lambda: batcher.queue_depth)
        self.running.set_function(lambda: batcher.running)

    def render(self) -> bytes:
        return generate_latest(self.registry)
