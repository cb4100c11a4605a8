"""Prometheus metrics of the serving path, through `ray.serve.metrics` (Ray's metrics agent exports
them on each node's metrics port, with the `ray_` prefix and Serve's deployment/replica tags).

One `ServeMetrics` per replica: metric objects are created once and the model version is a
default tag, so a hot-path record is one call with at most a task or stage tag.
"""

from __future__ import annotations

from collections.abc import Iterable

# Seconds: from sub-millisecond stages (a head on a few inputs) to the 30 s request deadline.
LATENCY_BUCKETS_S = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
]
# Inputs: powers of two up to the largest Ingress batch (batch_max_inputs, default 256).
SIZE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]

# name (without Ray's `ray_` prefix) → one line for docs/observability.md and the dashboard test.
METRICS = {
    "polytask_requests": "prediction requests (POST) answered by the Ingress, by task and status "
    "code; a request for two tasks counts once for each, task=none if rejected before its tasks "
    "were read",
    "polytask_inputs": "inputs in those requests, by task and status code",
    "polytask_rejected": "requests answered 4xx/5xx, by the error code in the JSON body (reason)",
    "polytask_request_latency_s": "end-to-end seconds in the Ingress of answered (200) requests, "
    "by task",
    "polytask_stage_latency_s": "seconds per stage: ingress_queue, encoder_queue and decoder_queue "
    "(micro-batcher wait, per request), tokenize and encoder_forward (per Encoder batch and text "
    "view), head (per head call; head_<task> for a head placed with_encoder)",
    "polytask_batch_inputs": "inputs per micro-batch, by batcher (ingress, encoder, decoder)",
    "polytask_encoder_pass_inputs": "inputs per encoder forward pass (after length-sorting and "
    "cutting where padding costs more than a pass)",
    "polytask_failures_in_a_row": "gauge: failed calls in a row no input explains, per replica "
    "(3 makes check_health fail)",
    "polytask_generated_tokens": "new tokens a generation head decoded (EOS excluded; greedy tasks), "
    "by task",
    "polytask_decode_seconds": "seconds per decode (one batch of inputs, all its steps), by task",
    "polytask_streams": "streamed generations (POST /v1/tasks/{task}/generate/stream) as they "
    "ended, by task and outcome (completed, cancelled: the client went away, failed)",
}


class ServeMetrics:
    """The metrics one replica records; `model` (the pinned reference) is a default tag."""

    def __init__(self, model: str) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        def counter(name: str, keys: tuple[str, ...]) -> Counter:
            return Counter(name, METRICS[name], tag_keys=("model", *keys))

        def histogram(name: str, buckets: list[float], keys: tuple[str, ...]) -> Histogram:
            return Histogram(name, METRICS[name], boundaries=buckets, tag_keys=("model", *keys))

        self.requests = counter("polytask_requests", ("task", "code"))
        self.inputs = counter("polytask_inputs", ("task", "code"))
        self.rejected = counter("polytask_rejected", ("reason", "code"))
        self.latency = histogram("polytask_request_latency_s", LATENCY_BUCKETS_S, ("task",))
        self.stage = histogram("polytask_stage_latency_s", LATENCY_BUCKETS_S, ("stage",))
        self.batch = histogram("polytask_batch_inputs", SIZE_BUCKETS, ("batcher",))
        self.passes = histogram("polytask_encoder_pass_inputs", SIZE_BUCKETS, ())
        self.failures = Gauge(
            "polytask_failures_in_a_row", METRICS["polytask_failures_in_a_row"], ("model",)
        )
        self.tokens = counter("polytask_generated_tokens", ("task",))
        self.decode = histogram("polytask_decode_seconds", LATENCY_BUCKETS_S, ("task",))
        self.streams = counter("polytask_streams", ("task", "outcome"))
        self.all = (
            self.requests, self.inputs, self.rejected, self.latency, self.stage, self.batch,
            self.passes, self.failures, self.tokens, self.decode, self.streams,
        )  # fmt: skip
        self.set_model(model)

    def set_model(self, model: str) -> None:
        """After a reconfigure: later records carry the new model version."""
        for metric in self.all:
            metric.set_default_tags({"model": model})

    def request(
        self, tasks: Iterable[str], inputs: int, status: int, seconds: float, reason: str | None
    ) -> None:
        """One answered HTTP request (the Ingress's middleware calls this once per request)."""
        code = str(status)
        for task in tasks or ("none",):
            self.requests.inc(1, {"task": task, "code": code})
            if inputs:
                self.inputs.inc(inputs, {"task": task, "code": code})
            if status == 200:
                self.latency.observe(seconds, {"task": task})
        if reason is not None:
            self.rejected.inc(1, {"reason": reason, "code": code})

    def batch_formed(self, batcher: str, size: int, waits_s: list[float]) -> None:
        """A micro-batch left its queue: its size, and how long each of its jobs waited."""
        self.batch.observe(size, {"batcher": batcher})
        stage = {"stage": f"{batcher}_queue"}
        for wait in waits_s:
            self.stage.observe(wait, stage)

    def decoded(self, task: str, seconds: float, tokens: int) -> None:
        """A generation head finished one decode of `tokens` new tokens."""
        self.decode.observe(seconds, {"task": task})
        if tokens:
            self.tokens.inc(tokens, {"task": task})

    def stages(self, seconds: dict[str, float]) -> None:
        for stage, value in seconds.items():
            self.stage.observe(value, {"stage": stage})
