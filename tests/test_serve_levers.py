"""Serve levers and head placement on real Serve over real HTTP (loopback): a lever named in the
args reaches the replica that needs it or is refused, mixed placement answers like the in-process
model with no deployment for a co-located head, and an Ingress past its queue sheds 503 +
Retry-After instead of queueing."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import httpx
import pytest

from conftest import free_port
from test_serve import assert_same_answers

TEXTS = ["the movie was great", "alice flew to paris with bob", "a dreadful hotel in oslo"]


def test_a_lever_whose_env_or_binary_is_missing_is_refused(monkeypatch):
    from polytask.serve import build_app
    from polytask.serve.args import ServeArgsError
    from polytask.serve.levers import LeverError, apply_levers

    monkeypatch.delenv("RAY_SERVE_USE_GRPC_BY_DEFAULT", raising=False)
    with pytest.raises(ServeArgsError, match="grpc.*RAY_SERVE_USE_GRPC_BY_DEFAULT=1"):
        build_app({"model": "models:/never-read@champion", "levers": ["grpc"]})
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", "/nonexistent/haproxy")
    with pytest.raises(LeverError, match="haproxy: RAY_SERVE_HAPROXY_BINARY_PATH=/nonexistent"):
        apply_levers(["haproxy"])


def test_placement_mistakes_name_the_fix(untrained_bundle: Path):
    from polytask.serve import compose
    from polytask.serve.args import ServeArgsError

    args = {"model": str(untrained_bundle), "head_placement": {"sentiment": "with_encoder"}}
    with pytest.raises(ServeArgsError, match="head_sentiment runs inside the Encoder"):
        compose(args, {"head_sentiment": {"num_replicas": 2}})
    with pytest.raises(ServeArgsError, match="head_placement: topics not served"):
        compose({**args, "head_placement": {"topics": "separate"}})


@pytest.fixture(scope="module")
def levered(ray_local, untrained_bundle: Path):
    """sentiment inside the Encoder, ner separate; the Ingress replica started with the grpc
    lever's env and admitting one request plus one queued (the proxy sheds the rest)."""
    from ray import serve

    from polytask.serve import compose
    from polytask.serve.levers import lever_env

    port = free_port()
    serve.shutdown()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    quick = {"graceful_shutdown_wait_loop_s": 0.1, "ray_actor_options": {"num_cpus": 0.1}}
    args = {
        "model": str(untrained_bundle),
        "levers": ["grpc"],
        "head_options": {**quick, "num_replicas": 1},
        "head_placement": {"sentiment": "with_encoder"},
    }
    ingress_env = {"runtime_env": {"env_vars": lever_env(["grpc"])}, "num_cpus": 0.1}
    options = {
        "Encoder": {**quick, "num_replicas": 1},
        "Ingress": {
            **quick,
            "num_replicas": 1,
            "ray_actor_options": ingress_env,
            "max_ongoing_requests": 1,
            "max_queued_requests": 1,
        },
    }
    serve.run(compose(args, options), name="polytask", route_prefix="/")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield client
    serve.shutdown()


def test_mixed_placement_with_a_lever_answers_like_the_model(levered, untrained_bundle):
    from ray import serve

    from polytask.model.inference import Predictor
    from polytask.serve.levers import DEFAULT_LEVERS

    response = levered.post("/v1/predict", json={"inputs": TEXTS})
    assert response.status_code == 200, response.text
    assert_same_answers(
        response.json()["results"], Predictor.from_bundle(str(untrained_bundle)).predict(TEXTS)
    )
    assert set(serve.status().applications["polytask"].deployments) == {
        "Ingress", "Encoder", "head_ner"
    }
    ingress = serve.get_deployment_handle("Ingress", "polytask").stats.remote().result()
    assert {"grpc", *DEFAULT_LEVERS} <= set(ingress["levers"]), ingress["levers"]
    encoder = serve.get_deployment_handle("Encoder", "polytask").stats.remote().result()
    assert encoder["colocated_calls"]["sentiment"] >= 1


def test_an_ingress_past_its_queue_sheds_503_with_retry_after(levered):
    body = {"inputs": TEXTS * 20}

    def post(_: int) -> httpx.Response:
        return levered.post("/v1/predict", json=body)

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(post, range(12)))
    statuses = sorted(r.status_code for r in answers)
    shed = [r for r in answers if r.status_code == 503]
    assert set(statuses) == {200, 503} and len(shed) >= 3, statuses
    assert all(r.headers.get("retry-after") == "1" for r in shed)
    assert all(r.elapsed.total_seconds() < 30 for r in answers)
