"""Every error code the HTTP API answers, by the step of a request that raises it, so each route
documents exactly the errors it can return (its OpenAPI `responses`, and so the HTTP reference).

A route lists the steps it goes through (ROUTE_STEPS); tests/unit/test_api_errors.py checks the
catalogue against every code the serve code raises, with the same status.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ErrorCode:
    """One `error.code` of an error body, its HTTP status and when it is answered."""

    status: int
    when: str


STEPS: dict[str, dict[str, ErrorCode]] = {
    # RequestGuard, before any route: only when the app has an API key (`api_key_env`)
    "key": {"unauthorized": ErrorCode(401, "no API key, or a wrong one")},
    # RequestGuard and FastAPI, for a body: before anything reads it
    "body": {
        "unsupported_media_type": ErrorCode(415, "the content type is not application/json"),
        "body_too_large": ErrorCode(413, "the body is over the body limit (`max_body_bytes`)"),
        "request_timeout": ErrorCode(408, "the body did not arrive within `read_timeout_s`"),
        "invalid_encoding": ErrorCode(400, "the body is not UTF-8"),
        "invalid_json": ErrorCode(400, "the body is not valid JSON"),
        "client_disconnected": ErrorCode(400, "the client went away before its body arrived"),
        "invalid_request": ErrorCode(422, "a field is missing, unknown, of the wrong type or empty"),
    },
    # serve.validation, each input on its own before it joins a batch
    "inputs": {
        "unknown_task": ErrorCode(404, "a task the model does not serve"),
        "too_many_inputs": ErrorCode(413, "more inputs than `max_inputs_per_request`"),
        "input_too_long": ErrorCode(413, "a text over `max_chars_per_input` (with `overflow: reject`)"),
        "missing_text_pair": ErrorCode(422, "an input without `text_pair` for a pair task"),
        "invalid_text": ErrorCode(422, "a text that is not valid Unicode, or that the tokenizer refuses"),
        "empty_text": ErrorCode(422, "a text with nothing visible in it"),
    },
    # serve.validation.decode_lengths: generation tasks' lengths asked in the body
    "lengths": {
        "max_new_tokens_too_large": ErrorCode(422, "`max_new_tokens` over the task's limit"),
        "min_new_tokens_too_large": ErrorCode(422, "`min_new_tokens` over `max_new_tokens`"),
        "sampling_with_beams": ErrorCode(422, "`temperature` for a task that decodes with beam search"),
    },
    # the stream route: only a generation task that decodes token by token streams
    "stream": {
        "not_generation": ErrorCode(422, "the task is not a generation task"),
        "not_streamable": ErrorCode(422, "the task decodes with beam search"),
    },
    # a batch through the model deployments
    "batch": {
        "overloaded": ErrorCode(503, "the deployments' queues are full (retry after `Retry-After` seconds)"),
        "unavailable": ErrorCode(503, "a model replica died under the request and its retry failed or had no time (retry after `Retry-After` seconds)"),
        "model_mismatch": ErrorCode(500, "the served model's files are inconsistent"),
    },
    # any model call: the request deadline, and a server fault
    "call": {
        "timeout": ErrorCode(504, "no answer within `request_timeout_s`"),
        "internal": ErrorCode(500, "a server fault (retry, and report it if it persists)"),
    },
}

# Answered for a path or method that no route has, whatever the route table says.
NO_ROUTE: dict[str, ErrorCode] = {
    "not_found": ErrorCode(404, "no route has this path"),
    "method_not_allowed": ErrorCode(405, "the route does not take this method"),
}

ROUTE_STEPS: dict[tuple[str, str], tuple[str, ...]] = {
    ("get", "/healthz"): (),
    ("get", "/v1/tasks"): ("key", "call"),
    ("post", "/v1/predict"): ("key", "body", "inputs", "lengths", "batch", "call"),
    ("post", "/v1/tasks/{task}/predict"): ("key", "body", "inputs", "lengths", "batch", "call"),
    ("post", "/v1/tasks/{task}/generate/stream"): (
        "key", "body", "inputs", "stream", "lengths", "batch", "call"
    ),
}


def route_errors(method: str, path: str) -> dict[str, ErrorCode]:
    """The error codes one route can answer, in the order a request meets them."""
    return {code: err for step in ROUTE_STEPS[(method, path)] for code, err in STEPS[step].items()}


def all_codes() -> dict[str, ErrorCode]:
    """Every code the API answers."""
    return {**{c: e for step in STEPS.values() for c, e in step.items()}, **NO_ROUTE}


def responses(method: str, path: str, model: Any) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses` for a route: one entry per status, naming each code it stands for."""
    by_status: dict[int, list[str]] = {}
    for code, err in route_errors(method, path).items():
        by_status.setdefault(err.status, []).append(f"`{code}`: {err.when}")
    return {status: {"model": model, "description": "; ".join(lines) + "."}
            for status, lines in sorted(by_status.items())}
