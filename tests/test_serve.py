"""Ray Serve end to end: real Serve on a local Ray, real HTTP, the tiny encoder.

One Serve instance per module. Tests run in file order: the demo bundle (v1) is served first,
then `v2` redeploys the same app with an all-kinds bundle under continuous traffic.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
LOCAL_CONFIG = ROOT / "serve_configs" / "local.yaml"
API_KEY_ENV = "POLYTASK_TEST_API_KEY"
API_KEY = "test-key-123"
TEXTS = [
    "the movie was great",
    "alice flew to paris last week with bob smith from acme",
    "honestly the hotel in oslo felt dreadful to me",
    "i saw grace at the globex office",
]
PAIRS = [
    {"text": "the meal was lovely", "text_pair": "we enjoyed the food"},
    {"text": "dana works for initech near lima", "text_pair": "dana has a job"},
    {"text": "what a boring game", "text_pair": "the game was exciting and fun to watch"},
]


def assert_same_answers(got: Any, want: Any, where: str = "") -> None:
    """Same labels, spans and keys; floats (probabilities, scores, values) within 1e-5."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{where}: {got} != {want}"
        for key in want:
            assert_same_answers(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: {got} != {want}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same_answers(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-5), f"{where}: {got} != {want}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def _stats(deployment: str) -> dict[str, Any]:
    from ray import serve

    return serve.get_deployment_handle(deployment, "polytask").stats.remote().result()


def _replicas(client: httpx.Client, deployments: list[str]) -> dict[str, str]:
    return {name: _stats(name)["actor_id"] for name in ["Ingress", *deployments]}


@pytest.fixture(scope="module")
def serving(ray_local):
    from ray import serve

    yield free_port()
    serve.shutdown()


@pytest.fixture(scope="module")
def v1(serving, trained_bundle):
    """The demo bundle served through `run_server` with serve_configs/local.yaml, JSON logs and
    the per-request log line on (`polytask serve --log-format json --access-log`)."""
    from polytask.model.inference import Predictor
    from polytask.serve import run_server

    url = run_server(
        str(trained_bundle),
        config_path=LOCAL_CONFIG,
        port=serving,
        blocking=False,
        log_format="json",
        access_log=True,
    )
    assert url == f"http://127.0.0.1:{serving}"
    with httpx.Client(base_url=url, timeout=120) as client:
        yield client, Predictor.from_bundle(str(trained_bundle))


@pytest.fixture(scope="module")
def all_kinds_bundle(tiny_encoder, tmp_path_factory) -> Path:
    """Untrained encoder + random heads of every kind: no training needed to compare answers."""
    import torch

    from polytask.model.bundle import save_bundle
    from polytask.model.network import build_model, load_encoder
    from polytask.tasks import TaskSpec

    torch.manual_seed(7)
    encoder, tokenizer = load_encoder(str(tiny_encoder))
    specs = [
        TaskSpec("sentiment", "classification", ["negative", "positive"]),
        TaskSpec(
            "ner", "token_classification", ["O", "B-person", "I-person", "B-location", "I-location"]
        ),
        TaskSpec("topics", "multilabel", ["food", "travel", "work"], threshold=0.5),
        TaskSpec("nli", "pair_classification", ["entailment", "neutral", "contradiction"]),
        TaskSpec("score", "regression", []),
    ]
    model = build_model(encoder, specs, pooling="mean")
    path = tmp_path_factory.mktemp("allkinds") / "bundle"
    save_bundle(model, tokenizer, path, max_length=48)
    return path


def test_predictions_equal_in_process_predictor(v1):
    client, predictor = v1
    response = client.post("/v1/predict", json={"inputs": TEXTS})
    assert response.status_code == 200, response.text
    body = response.json()
    assert_same_answers(body["results"], predictor.predict(TEXTS))
    assert body["model"]["fingerprint"] and body["model"]["ref"]
    one = client.post("/v1/tasks/ner/predict", json={"inputs": TEXTS[1:3]})
    assert one.status_code == 200, one.text
    assert one.json()["task"] == "ner"
    assert_same_answers(
        one.json()["results"], [r["ner"] for r in predictor.predict(TEXTS[1:3], ["ner"])]
    )
    assert any(r["ner"]["entities"] for r in body["results"])


def test_tasks_health_and_docs(v1):
    client, predictor = v1
    tasks = client.get("/v1/tasks").json()
    assert [(t["name"], t["kind"]) for t in tasks["tasks"]] == [
        (name, predictor.model.specs[name].kind) for name in predictor.tasks
    ]
    assert tasks["tasks"][0]["labels"] == list(
        predictor.model.specs[tasks["tasks"][0]["name"]].labels
    )
    assert tasks["model"]["fingerprint"]
    assert tasks["model"]["variant"] == "fp32"  # ModelInfo carries it, so /v1/tasks shows it
    assert client.get("/healthz").json()["status"] == "ok"
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200


def test_request_for_one_task_runs_only_that_head(v1):
    client, _ = v1
    before = {name: _stats(name) for name in ("Encoder", "head_sentiment", "head_ner")}
    response = client.post("/v1/predict", json={"inputs": TEXTS[:2], "tasks": ["sentiment"]})
    assert response.status_code == 200, response.text
    assert set(response.json()["results"][0]) == {"sentiment"}
    after = {name: _stats(name) for name in ("Encoder", "head_sentiment", "head_ner")}
    assert after["head_sentiment"]["calls"] == before["head_sentiment"]["calls"] + 1
    assert after["head_ner"]["calls"] == before["head_ner"]["calls"]
    assert after["Encoder"]["calls"] == before["Encoder"]["calls"] + 1

    both = client.post("/v1/predict", json={"inputs": TEXTS, "tasks": ["sentiment", "ner"]})
    assert both.status_code == 200
    final = {name: _stats(name) for name in ("Encoder", "head_sentiment", "head_ner")}
    assert final["Encoder"]["calls"] == after["Encoder"]["calls"] + 1, (
        "one encoder call per request"
    )
    assert final["head_ner"]["calls"] == after["head_ner"]["calls"] + 1
    assert final["Encoder"]["batch_sizes"][-1] == len(TEXTS), "a request's inputs share one batch"


def test_encoder_returns_only_what_the_heads_need(v1):
    from ray import serve

    encoder = serve.get_deployment_handle("Encoder", "polytask")
    pooled = encoder.encode.remote(TEXTS[:2], None, True, False).result()
    assert pooled["items"][0].pooled.shape == (32,) and pooled["items"][0].tokens is None
    tokens = encoder.encode.remote(TEXTS[:2], None, False, True).result()
    item = tokens["items"][1]
    assert item.pooled is None and item.tokens.shape[0] == len(item.word_ids)
    assert TEXTS[1][slice(*item.word_spans[0])] == "alice"
    assert pooled["fingerprint"] == encoder.fingerprint.remote().result()


def _concurrently(url: str, requests: list[tuple[str, dict[str, Any]]]) -> list[httpx.Response]:
    """Send every (path, body) at once on its own keep-alive connection."""
    import asyncio

    async def send_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=len(requests))
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(client.post(path, json=body) for path, body in requests))

    return asyncio.run(send_all())


def _delta(before: dict[str, Any], after: dict[str, Any], key: str) -> int:
    return after[key] - before[key]


def test_concurrent_requests_share_encoder_and_head_calls(v1):
    """32 single-input requests at once: the Ingress batches them, so the Encoder and the head
    see fewer calls than requests, and every answer is the in-process Predictor's for its input."""
    client, predictor = v1
    texts = [f"{TEXTS[i % len(TEXTS)]} number {i}" for i in range(32)]
    names = ("Ingress", "Encoder", "head_sentiment", "head_ner")
    before = {name: _stats(name) for name in names}
    responses = _concurrently(
        str(client.base_url),
        [("/v1/predict", {"inputs": [t], "tasks": ["sentiment"]}) for t in texts],
    )
    after = {name: _stats(name) for name in names}
    for text, response in zip(texts, responses):
        assert response.status_code == 200, response.text
        (result,) = response.json()["results"]
        assert set(result) == {"sentiment"}
        assert_same_answers(result, predictor.predict([text], ["sentiment"])[0], text)
    assert _delta(before["Ingress"], after["Ingress"], "jobs") == 32
    sizes = after["Ingress"]["batch_sizes"][-_delta(before["Ingress"], after["Ingress"], "batches"):]
    assert sum(sizes) == 32 and max(sizes) > 1, sizes
    assert _delta(before["Encoder"], after["Encoder"], "inputs") == 32
    assert _delta(before["Encoder"], after["Encoder"], "calls") < 32
    assert _delta(before["head_sentiment"], after["head_sentiment"], "calls") < 32
    assert _delta(before["head_sentiment"], after["head_sentiment"], "inputs") == 32
    assert after["head_ner"]["calls"] == before["head_ner"]["calls"], "ner was not requested"


def test_batched_requests_get_exactly_their_tasks(v1):
    """Requests for different task sets, sent at once, share batches: each gets exactly its tasks
    (right answers), and a head decodes only the inputs of the requests that asked for it."""
    client, predictor = v1
    requests: list[tuple[str, dict[str, Any]]] = []
    for i in range(24):
        inputs = [TEXTS[(i + k) % len(TEXTS)] for k in range(1 + i % 3)]
        if i % 4 == 0:
            requests.append(("/v1/predict", {"inputs": inputs, "tasks": ["sentiment"]}))
        elif i % 4 == 1:
            requests.append(("/v1/predict", {"inputs": inputs, "tasks": ["ner", "sentiment"]}))
        elif i % 4 == 2:
            requests.append(("/v1/tasks/ner/predict", {"inputs": inputs}))
        else:
            requests.append(("/v1/predict", {"inputs": inputs}))
    names = ("Ingress", "head_sentiment", "head_ner")
    before = {name: _stats(name) for name in names}
    responses = _concurrently(str(client.base_url), requests)
    after = {name: _stats(name) for name in names}
    wanted = {"sentiment": 0, "ner": 0}
    for (path, body), response in zip(requests, responses):
        assert response.status_code == 200, response.text
        if path.startswith("/v1/tasks/"):
            want = [r["ner"] for r in predictor.predict(body["inputs"], ["ner"])]
            assert_same_answers(response.json()["results"], want, path)
            wanted["ner"] += len(body["inputs"])
            continue
        tasks = body.get("tasks") or predictor.tasks
        assert_same_answers(response.json()["results"], predictor.predict(body["inputs"], tasks))
        for task in tasks:
            wanted[task] += len(body["inputs"])
    for task, n in wanted.items():
        assert _delta(before[f"head_{task}"], after[f"head_{task}"], "inputs") == n, task
    assert _delta(before["Ingress"], after["Ingress"], "batches") < len(requests)


JSON = {"content-type": "application/json"}
BAD_INPUTS = [
    # (case, method, path, body bytes or JSON, headers, status, code, message fragment)
    ("malformed json", "/v1/predict", b'{"inputs": [', JSON, 400, "invalid_json", "not valid JSON"),
    (
        "wrong content type",
        "/v1/predict",
        b'{"inputs": ["x"]}',
        {"content-type": "text/plain"},
        415,
        "unsupported_media_type",
        "application/json",
    ),
    (
        "no content type",
        "/v1/predict",
        b'{"inputs": ["x"]}',
        {},
        415,
        "unsupported_media_type",
        "(none)",
    ),
    ("missing field", "/v1/predict", {}, None, 422, "invalid_request", "inputs: is required"),
    (
        "extra field",
        "/v1/predict",
        {"inputs": ["x"], "input": 1},
        None,
        422,
        "invalid_request",
        "input: is not a known field",
    ),
    (
        "extra field in input",
        "/v1/predict",
        {"inputs": [{"text": "x", "pair": "y"}]},
        None,
        422,
        "invalid_request",
        "inputs[0].pair: is not a known field",
    ),
    ("body not an object", "/v1/predict", ["x"], None, 422, "invalid_request", "JSON object"),
    ("inputs not a list", "/v1/predict", {"inputs": "x"}, None, 422, "invalid_request", "inputs:"),
    (
        "input of wrong type",
        "/v1/predict",
        {"inputs": [3]},
        None,
        422,
        "invalid_request",
        "inputs[0]: must be a string or an object",
    ),
    (
        "null text",
        "/v1/predict",
        {"inputs": [{"text": None}]},
        None,
        422,
        "invalid_request",
        "inputs[0].text",
    ),
    (
        "tasks not a list",
        "/v1/predict",
        {"inputs": ["x"], "tasks": "ner"},
        None,
        422,
        "invalid_request",
        "tasks:",
    ),
    (
        "empty input list",
        "/v1/predict",
        {"inputs": []},
        None,
        422,
        "invalid_request",
        "inputs: must not be empty",
    ),
    (
        "empty text",
        "/v1/predict",
        {"inputs": [""]},
        None,
        422,
        "invalid_request",
        "empty or whitespace",
    ),
    (
        "whitespace text",
        "/v1/predict",
        {"inputs": ["ok", " \n\t"]},
        None,
        422,
        "invalid_request",
        "inputs[1]: text must not be empty",
    ),
    (
        "non-utf8 bytes",
        "/v1/predict",
        b'{"inputs": ["caf\xe9"]}',
        JSON,
        400,
        "invalid_encoding",
        "UTF-8",
    ),
    (
        "oversized body",
        "/v1/predict",
        b'{"inputs": ["' + b"a" * 600_000 + b'"]}',
        JSON,
        413,
        "body_too_large",
        "bytes",
    ),
    (
        "too many inputs",
        "/v1/predict",
        {"inputs": ["x"] * 33},
        None,
        413,
        "too_many_inputs",
        "the limit is 32",
    ),
    (
        "text too long",
        "/v1/predict",
        {"inputs": ["ok", "a" * 1001]},
        None,
        413,
        "input_too_long",
        "inputs[1] has 1001 characters; the limit is 1000",
    ),
    (
        "unknown task",
        "/v1/predict",
        {"inputs": ["x"], "tasks": ["sentiment", "nope"]},
        None,
        404,
        "unknown_task",
        "this model serves: sentiment, ner",
    ),
    (
        "unknown task route",
        "/v1/tasks/nope/predict",
        {"inputs": ["x"]},
        None,
        404,
        "unknown_task",
        "'nope'",
    ),
    (
        "tasks field on task route",
        "/v1/tasks/ner/predict",
        {"inputs": ["x"], "tasks": ["ner"]},
        None,
        422,
        "invalid_request",
        "tasks: is not a known field",
    ),
    ("unknown route", "/v1/nothing", {"inputs": ["x"]}, None, 404, "not_found", "/docs"),
]


def test_bad_input_is_a_4xx_json_error_and_never_restarts_a_replica(v1):
    client, _ = v1
    before = _replicas(client, ["Encoder", "head_sentiment", "head_ner"])
    for case, path, body, headers, status, code, fragment in BAD_INPUTS:
        if isinstance(body, bytes):
            response = client.post(path, content=body, headers=headers)
        else:
            response = client.post(path, json=body)
        assert response.status_code == status, f"{case}: {response.status_code} {response.text}"
        error = response.json()["error"]
        assert set(response.json()) == {"error"} and set(error) == {"code", "message"}, case
        assert error["code"] == code, f"{case}: {error}"
        assert fragment in error["message"], f"{case}: {error['message']!r} lacks {fragment!r}"
    wrong_method = client.get("/v1/predict")
    assert (
        wrong_method.status_code == 405
        and wrong_method.json()["error"]["code"] == "method_not_allowed"
    )

    ok = client.post("/v1/predict", json={"inputs": TEXTS[:1]})
    assert ok.status_code == 200, ok.text
    assert _replicas(client, ["Encoder", "head_sentiment", "head_ner"]) == before


def _scrape(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def test_dashboard_metrics_are_exported_by_the_running_app(v1, trained_bundle):
    """Every metric the Grafana dashboard queries is on Ray's /metrics endpoint of this node, with
    polytask's tags (deployment, model, task, status code, rejection reason). Ray's agent gets
    metrics from the replicas every few seconds, so the scrape is retried until it has them."""
    import json
    import sys

    import ray

    sys.path.insert(0, str(ROOT / "jobs" / "bench"))
    try:
        from dashboard_snapshot import DASHBOARD, parse_scrape, queried_metrics
    finally:
        sys.path.pop(0)
    client, _ = v1
    assert client.post("/v1/predict", json={"inputs": TEXTS[:2], "tasks": ["sentiment"]}).is_success
    assert client.post("/v1/predict", json={"inputs": ["a"], "tasks": ["nope"]}).status_code == 404
    wanted = queried_metrics(json.loads(DASHBOARD.read_text()))
    assert len(wanted) >= 7
    node = ray.get_runtime_context().get_node_id()
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["NodeID"] == node)
    deadline = time.monotonic() + 40
    while True:
        scrape = parse_scrape(_scrape(port))
        found = {name for name in wanted if name in scrape}
        answered = [  # this app's model: the session's Ray still exports earlier apps' series
            labels
            for labels, value in scrape.get("ray_polytask_requests_total", [])
            if labels.get("task") == "sentiment" and labels.get("code") == "200" and value >= 1
            and labels.get("model") == str(trained_bundle)
        ]
        rejected = [
            labels
            for labels, _ in scrape.get("ray_polytask_rejected_total", [])
            if labels.get("reason") == "unknown_task" and labels.get("code") == "404"
        ]
        if (found == wanted and answered and rejected) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert found == wanted, f"not exported: {sorted(wanted - found)}"
    assert answered and rejected
    assert {a["deployment"] for a in answered} == {"Ingress"}
    stages = {labels["stage"] for labels, _ in scrape["ray_polytask_stage_latency_s_count"]}
    assert stages >= {"ingress_queue", "encoder_queue", "tokenize", "encoder_forward", "head"}


def test_each_request_writes_one_json_log_line_with_its_fields(v1, ray_cluster):
    """With JSON logs and the request log on, the Ingress writes one JSON line per prediction
    request to its Serve log file: Serve's request id, and polytask's tasks, status and latency."""
    import json
    import uuid

    client, _ = v1
    rid = f"polytask-test-{uuid.uuid4()}"
    answer = client.post(
        "/v1/predict",
        json={"inputs": TEXTS[:3], "tasks": ["ner", "sentiment"]},
        headers={"x-request-id": rid},
    )
    assert answer.status_code == 200 and answer.headers["x-request-id"] == rid
    logs = Path(ray_cluster.head_node.get_logs_dir_path()) / "serve"
    deadline, mine = time.monotonic() + 10, []
    while not mine and time.monotonic() < deadline:
        for path in logs.glob("replica_polytask_Ingress_*.log"):
            for line in path.read_text().splitlines():
                if rid in line and "polytask_tasks" in line:
                    mine.append(json.loads(line))
        time.sleep(0.2)
    assert len(mine) == 1, mine
    (line,) = mine
    assert line["request_id"] == rid
    assert line["polytask_tasks"] == ["ner", "sentiment"] and line["polytask_inputs"] == 3
    assert line["polytask_status"] == 200 and line["polytask_error"] is None
    assert 0 < line["polytask_latency_ms"] < 120_000
    assert line["route"] == "/v1/predict" and line["deployment"].endswith("Ingress")


def test_metrics_port_of_a_joined_cluster_is_the_clusters(ray_local):
    """`--metrics-port` cannot move a running cluster's port: joining one says so, and the URL
    it prints instead is this node's real metrics endpoint."""
    from polytask.serve.server import start_ray

    said: list[str] = []
    start_ray(free_port(), said.append)
    (line,) = said
    url = line.rsplit(" ", 1)[1]
    assert line.startswith("joined a running Ray cluster") and url.endswith("/metrics")
    assert "ray_" in httpx.get(url, timeout=10).text


def test_head_refuses_states_of_another_encoder(trained_bundle, all_kinds_bundle, tmp_path):
    """A head never decodes states of an encoder it was not trained with (the fingerprint check)."""
    from polytask.model.bundle import BundleError
    from polytask.serve.head import Head

    head = Head.func_or_class(str(all_kinds_bundle), "sentiment")
    foreign = {"fingerprint": "0123456789abcdef", "model": str(trained_bundle), "items": []}
    with pytest.raises(BundleError, match="trained against encoder"):
        head.predict(foreign, [])

    mixed = tmp_path / "mixed"
    shutil.copytree(all_kinds_bundle, mixed)
    shutil.rmtree(mixed / "heads" / "sentiment")
    shutil.copytree(trained_bundle / "heads" / "sentiment", mixed / "heads" / "sentiment")
    with pytest.raises(BundleError, match="serve heads from the same bundle"):
        Head.func_or_class(str(mixed), "sentiment")


def test_head_reconfigure_keeps_answering_both_versions(trained_bundle, all_kinds_bundle):
    """A head moved to a new model still decodes the old encoder's states with the old head."""
    from polytask.model.bundle import read_manifest
    from polytask.serve.head import Head

    head = Head.func_or_class(str(trained_bundle), "sentiment")
    head.reconfigure({"model": str(all_kinds_bundle)})
    old, new = (read_manifest(b).fingerprint for b in (trained_bundle, all_kinds_bundle))
    assert list(head.versions) == [old, new]
    assert head.ref == str(all_kinds_bundle.resolve())


@pytest.fixture(scope="module")
def v2(v1, serving, all_kinds_bundle):
    """Redeploy the running app (same name) with another bundle while two clients keep sending
    requests; returns what they saw, then the client and a Predictor of the new bundle."""
    from ray import serve

    from polytask.model.inference import Predictor
    from polytask.serve import compose, load_serve_config

    client, _ = v1
    seen: list[tuple[int, str]] = []
    stop = threading.Event()
    headers = {"x-api-key": API_KEY}

    def traffic() -> None:
        with httpx.Client(base_url=str(client.base_url), timeout=120) as c:
            while not stop.is_set():
                r = c.post(
                    "/v1/predict",
                    json={"inputs": TEXTS, "tasks": ["sentiment", "ner"]},
                    headers=headers,
                )
                seen.append((r.status_code, r.json().get("model", {}).get("ref", r.text)))

    app_cfg = load_serve_config(LOCAL_CONFIG).applications[0]
    options = {
        d.name: d.model_dump(exclude_unset=True, exclude={"name"}) for d in app_cfg.deployments
    }
    options["Ingress"]["ray_actor_options"]["runtime_env"] = {"env_vars": {API_KEY_ENV: API_KEY}}
    for option in options.values():  # the new replicas' teardown waits 0.1 s, not 2 s, to stop
        option["graceful_shutdown_wait_loop_s"] = 0.1
    args = {
        **app_cfg.args,
        "model": str(all_kinds_bundle),
        "api_key_env": API_KEY_ENV,
        "overflow": "truncate",
        "max_chars_per_input": 40,
        "head_options": {**app_cfg.args.get("head_options", {}), "graceful_shutdown_wait_loop_s": 0.1},
    }
    threads = [threading.Thread(target=traffic) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        serve.run(compose(args, options), name="polytask", route_prefix="/")
        done = len(seen)
        while len(seen) < done + 6 and all(t.is_alive() for t in threads):
            threads[0].join(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    return seen, client, Predictor.from_bundle(str(all_kinds_bundle))


def test_redeploy_under_traffic_fails_no_request(v2, trained_bundle, all_kinds_bundle):
    seen, _, _ = v2
    statuses = [status for status, _ in seen]
    assert statuses and all(s == 200 for s in statuses), [x for x in seen if x[0] != 200][:5]
    refs = [ref for _, ref in seen]
    assert str(trained_bundle.resolve()) in refs, "no request was answered before the switch"
    assert refs[-1] == str(all_kinds_bundle.resolve()), "the new version never answered"


def test_every_task_kind_equals_in_process_predictor(v2):
    _, client, predictor = v2
    headers = {"authorization": f"Bearer {API_KEY}"}
    kinds = {t["kind"] for t in client.get("/v1/tasks", headers=headers).json()["tasks"]}
    assert kinds == {
        "classification",
        "token_classification",
        "multilabel",
        "pair_classification",
        "regression",
    }
    response = client.post("/v1/predict", json={"inputs": PAIRS}, headers=headers)
    assert response.status_code == 200, response.text
    assert_same_answers(response.json()["results"], predictor.predict(PAIRS))
    assert set(response.json()["results"][0]) == set(predictor.tasks)

    strings = client.post("/v1/predict", json={"inputs": TEXTS[:2]}, headers=headers)
    assert strings.status_code == 200, strings.text
    assert "nli" not in strings.json()["results"][0], "pair tasks need text_pair on every input"
    cut = [text[:40] for text in TEXTS[:2]]  # this deployment truncates inputs to 40 characters
    want = predictor.predict(cut, ["sentiment", "ner", "topics", "score"])
    assert_same_answers(strings.json()["results"], want)


def test_truncate_policy_cuts_long_inputs(v2):
    _, client, predictor = v2
    long = "alice flew to paris and then to tokyo and lima with bob and grace"
    assert len(long) > 40
    response = client.post(
        "/v1/tasks/ner/predict", json={"inputs": [long]}, headers={"x-api-key": API_KEY}
    )
    assert response.status_code == 200, response.text
    assert_same_answers(
        response.json()["results"], [predictor.predict([long[:40]], ["ner"])[0]["ner"]]
    )


def test_api_key_and_pair_errors(v2):
    _, client, _ = v2
    body = {"inputs": ["x"], "tasks": ["nli"]}
    for headers in ({}, {"x-api-key": "wrong"}, {"authorization": "Bearer wrong"}):
        response = client.post("/v1/predict", json=body, headers=headers)
        assert response.status_code == 401, response.text
        assert response.json()["error"]["code"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"
    probe = client.get("/healthz")
    assert probe.status_code == 200, "probes need no key"
    assert probe.json() == {"status": "ok"}, "and tell nothing else without one"
    for path in ("/docs", "/openapi.json"):  # the API's shape is behind the key too
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers={"x-api-key": API_KEY}).status_code == 200, path
    response = client.post("/v1/predict", json=body, headers={"x-api-key": API_KEY})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "missing_text_pair"
    assert "nli" in response.json()["error"]["message"]


def test_encoder_reconfigure_switches_model_and_heads_follow(v2, trained_bundle):
    """What `user_config: {model: ...}` does on each replica: the encoder swaps weights in place
    (same replica), and heads decode its states with the matching version, loaded on demand."""
    from ray import serve

    from polytask.model.inference import Predictor

    _, client, _ = v2
    encoder = serve.get_deployment_handle("Encoder", "polytask")
    replica = encoder.stats.remote().result()["actor_id"]
    encoder.reconfigure.remote({"model": str(trained_bundle)}).result()
    response = client.post(
        "/v1/predict",
        json={"inputs": TEXTS, "tasks": ["sentiment", "ner"]},
        headers={"x-api-key": API_KEY},
    )
    assert response.status_code == 200, response.text
    assert response.json()["model"]["ref"] == str(trained_bundle.resolve())
    want = Predictor.from_bundle(str(trained_bundle)).predict([t[:40] for t in TEXTS])
    assert_same_answers(response.json()["results"], want)
    assert encoder.stats.remote().result()["actor_id"] == replica
