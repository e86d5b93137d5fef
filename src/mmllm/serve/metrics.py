"""Prometheus metrics of the server: requests, latency, time to first token, generated tokens, batch
sizes, queue depth, requests running, the prefix cache (its hit rate is hits / queries)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from mmllm.engine.batcher import Events
from mmllm.engine.rows import Completion


class Metrics(Events):
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("mmllm_requests", "HTTP requests", ["path", "status"], registry=self.registry)
        self.latency = Histogram("mmllm_request_seconds", "Request latency", ["path"], registry=self.registry)
        self.generated_tokens = Counter("mmllm_generated_tokens", "Tokens generated", registry=self.registry)
        self.cancelled = Counter(
            "mmllm_cancelled",
            "Generations stopped early: the client left or timed out",
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "mmllm_batch_size",
            "Requests per decoding step (continuous scheduler) or per generate call (batcher)",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "mmllm_batch_seconds", "Time per decoding step or generate call", registry=self.registry
        )
        self.time_to_first_token = Histogram(
            "mmllm_time_to_first_token_seconds",
            "From a request joining the queue to its first generated token",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.queue_depth = Gauge("mmllm_queue_depth", "Requests waiting for a batch", registry=self.registry)
        self.running = Gauge("mmllm_running_requests", "Requests decoding now", registry=self.registry)
        self.prefix_cache_queries = Counter(
            "mmllm_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache (requests answered while it is on)",
            registry=self.registry,
        )
        self.prefix_cache_hits = Counter(
            "mmllm_prefix_cache_hits", "Prompt tokens found in the prefix cache", registry=self.registry
        )
        self.prefix_cache_bytes = Gauge(
            "mmllm_prefix_cache_bytes", "Memory the prefix cache's entries hold", registry=self.registry
        )
        self.prefix_cache_entries = Gauge(
            "mmllm_prefix_cache_entries", "Finished requests the prefix cache keeps", registry=self.registry
        )

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        self.requests.labels(path, str(status)).inc()
        self.latency.labels(path).observe(seconds)

    def ran(self, rows: int, seconds: float) -> None:
        self.batch_size.observe(rows)
        self.batch_seconds.observe(seconds)

    def first_token(self, seconds: float) -> None:
        self.time_to_first_token.observe(seconds)

    def finished(self, result: Completion | BaseException) -> None:
        if isinstance(result, Completion):
            self.generated_tokens.inc(result.completion_tokens)
            if result.cached_tokens is not None:
                self.prefix_cache_queries.inc(result.prompt_tokens)
                self.prefix_cache_hits.inc(result.cached_tokens)
            if result.finish_reason == "cancelled":
                self.cancelled.inc()

    def render(self) -> str:
        return generate_latest(self.registry).decode()
