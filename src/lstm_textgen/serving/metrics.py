"""`lstm-textgen serve`'s Prometheus metrics, named as vLLM's and TGI's are for the same things, so a
dashboard made for those reads these: rows running and waiting, batch occupancy, time to first
token, inter-token latency, end-to-end latency, tokens, and requests by outcome. One registry per
app (no module globals): two apps in one process keep their own counts."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds; from a step of a small model on a GPU to a long answer on a loaded CPU.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self, running: Callable[[], float], waiting: Callable[[], float], active_rows: int) -> None:
        self.registry = CollectorRegistry()
        gauge = Gauge("lstm_textgen_num_requests_running", "rows generating now", registry=self.registry)
        gauge.set_function(running)
        gauge = Gauge("lstm_textgen_num_requests_waiting", "rows waiting for a place", registry=self.registry)
        gauge.set_function(waiting)
        gauge = Gauge(
            "lstm_textgen_batch_occupancy", "running rows / the batch's places (0..1)", registry=self.registry
        )
        gauge.set_function(lambda: running() / active_rows)
        self.time_to_first_token = Histogram(
            "lstm_textgen_time_to_first_token_seconds",
            "from the request's arrival to its first token",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "lstm_textgen_inter_token_latency_seconds",
            "between two tokens of one row",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.request_latency = Histogram(
            "lstm_textgen_e2e_request_latency_seconds",
            "from the request's arrival to its last byte",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.generated_tokens = Counter(
            "lstm_textgen_generation_tokens", "tokens generated", registry=self.registry
        )
        self.prompt_tokens = Counter(
            "lstm_textgen_prompt_tokens", "prompt tokens read", registry=self.registry
        )
        self.requests = Counter(
            "lstm_textgen_requests",
            "requests answered, by endpoint and HTTP status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "lstm_textgen_rejected_requests",
            "requests refused, by reason (invalid, unauthorized, overloaded, timeout, cancelled)",
            ["reason"],
            registry=self.registry,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
