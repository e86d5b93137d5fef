"""Prometheus metrics of the server: requests, latency, generated tokens, batch sizes, queue depth."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from mmllm.generation import Completion


class Metrics:
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
            "Requests per generate call",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "mmllm_batch_seconds", "Time per generate call", registry=self.registry
        )
        self.queue_depth = Gauge("mmllm_queue_depth", "Requests waiting for a batch", registry=self.registry)

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        self.requests.labels(path, str(status)).inc()
        self.latency.labels(path).observe(seconds)

    def observe_batch(self, results: list[Completion | BaseException], seconds: float) -> None:
        self.batch_size.observe(len(results))
        self.batch_seconds.observe(seconds)
        for result in results:
            if isinstance(result, Completion):
                self.generated_tokens.inc(result.completion_tokens)
                if result.finish_reason == "cancelled":
                    self.cancelled.inc()

    def render(self) -> str:
        return generate_latest(self.registry).decode()
