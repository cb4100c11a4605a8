"""Generation tasks on Ray Serve: real Serve, real HTTP, the tiny BERT with a classification head
and a (random, untrained) generation head. One app for the module."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import free_port

TEXTS = ["alice flew to paris last week", "the movie was great", "bob met carol in oslo"]
LIMIT = 500  # the app's max_new_tokens; the task's own default is 6


@pytest.fixture(scope="module")
def app(ray_local, generation_bundle: Path) -> Iterator[httpx.Client]:
    from ray import serve

    from polytask.serve import compose

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    one = {"num_replicas": 1, "graceful_shutdown_wait_loop_s": 0.1}
    options = {
        "Ingress": {**one, "ray_actor_options": {"num_cpus": 0.1}},
        "head_sentiment": {**one, "ray_actor_options": {"num_cpus": 0.1}},
        "head_entities": {**one, "ray_actor_options": {"num_cpus": 0.5}},
        "Encoder": {**one, "ray_actor_options": {"num_cpus": 0.5}},
    }
    args = {"model": str(generation_bundle), "max_new_tokens": LIMIT}
    serve.run(compose(args, options), name="polytask", route_prefix="/")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield client
    serve.shutdown()


def _stats(deployment: str) -> dict[str, Any]:
    from ray import serve

    return serve.get_deployment_handle(deployment, "polytask").stats.remote().result()


def _events(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event name, data) of each server-sent event."""
    name = None
    for line in lines:
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            yield name or "message", json.loads(line[len("data: ") :])


def test_one_request_answers_a_label_and_text_equal_to_the_predictor(app, generation_bundle):
    from polytask.model.inference import Predictor

    encoder_calls = _stats("Encoder")["calls"]
    r = app.post("/v1/predict", json={"inputs": TEXTS})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    want = Predictor.from_bundle(str(generation_bundle)).predict(TEXTS)
    for got, expected in zip(results, want):
        assert got["sentiment"]["label"] == expected["sentiment"]["label"]
        assert got["entities"] == expected["entities"]  # {"text": ...}
        assert isinstance(got["entities"]["text"], str)
    # one Encoder call for the batched classification, one for the generation rows, which go
    # straight to the Decoder (no classification request waits behind a decode)
    assert _stats("Encoder")["calls"] == encoder_calls + 2


def test_rows_decode_together_and_a_short_answer_leaves_before_long_ones(app):
    """Eight long requests decode as rows of one step loop; a 2-token request sent while they
    decode joins at the next step and answers while they still decode."""
    body = {"inputs": ["bob met carol in oslo"], "max_new_tokens": LIMIT, "min_new_tokens": LIMIT}
    short = {"inputs": ["oslo"], "max_new_tokens": 2, "min_new_tokens": 2}
    before = _stats("head_entities")
    with ThreadPoolExecutor(9) as pool:
        longs = [pool.submit(app.post, "/v1/tasks/entities/predict", json=body) for _ in range(8)]
        time.sleep(0.5)
        quick = app.post("/v1/tasks/entities/predict", json=short)
        still_decoding = _stats("head_entities")["in_flight"]
        answers = [f.result() for f in longs]
    assert quick.status_code == 200 and [r.status_code for r in answers] == [200] * 8, answers[0].text
    texts = {r.json()["results"][0]["text"] for r in answers}
    assert len(texts) == 1  # the same input decodes the same whatever rows it decodes beside
    after = _stats("head_entities")
    assert after["loop"]["admitted"] - before["loop"]["admitted"] == 9
    assert after["tokens"] - before["tokens"] <= 8 * LIMIT + 2  # no row decoded past its end
    assert after["loop"]["rows_per_step"] > 1
    assert still_decoding == 8  # the short one came and went while the long ones decoded


def test_the_stream_gives_the_tokens_of_the_plain_answer(app):
    body = {"input": TEXTS[0], "max_new_tokens": 12, "min_new_tokens": 12}
    with app.stream("POST", "/v1/tasks/entities/generate/stream", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(_events(r.iter_lines()))
    plain = app.post(
        "/v1/tasks/entities/predict",
        json={"inputs": [TEXTS[0]], "max_new_tokens": 12, "min_new_tokens": 12},
    ).json()["results"][0]["text"]
    names = [name for name, _ in events]
    assert names[-1] == "done" and set(names[:-1]) == {"token"}, names
    done = events[-1][1]
    assert done["result"]["text"] == plain
    assert done["tokens"] == len(events) - 1
    assert events[-2][1]["text"] == plain  # the last token event holds the whole text
    assert done["model"]["fingerprint"]


def test_a_client_that_disconnects_mid_stream_stops_the_decode(app):
    before = _stats("head_entities")
    body = {"input": TEXTS[1], "max_new_tokens": LIMIT, "min_new_tokens": LIMIT}
    with app.stream("POST", "/v1/tasks/entities/generate/stream", json=body) as r:
        assert r.status_code == 200
        first = next(_events(r.iter_lines()))
        assert first[0] == "token"
    # leaving the block closed the connection; the row ends at the decode's next step
    deadline = time.monotonic() + 20
    while True:
        after = _stats("head_entities")
        cancelled = after["streams"]["cancelled"] > before["streams"]["cancelled"]
        if (cancelled and after["in_flight"] == 0) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    seen = (before, after)
    assert after["streams"]["cancelled"] == before["streams"]["cancelled"] + 1, seen
    assert after["streams"]["open"] == 0 and after["in_flight"] == 0, seen
    assert after["steps"] - before["steps"] < LIMIT, seen  # the decode stopped early


def test_a_row_past_its_deadline_leaves_at_the_next_step(app):
    from ray import serve

    encoder = serve.get_deployment_handle("Encoder", "polytask")
    head = serve.get_deployment_handle("head_entities", "polytask")
    encoded = encoder.encode.remote(TEXTS[:1], None, False, True).result()
    before = _stats("head_entities")
    with pytest.raises(Exception, match="deadline"):
        head.predict.remote(encoded, TEXTS[:1], None, LIMIT, LIMIT, None, 0.3).result()
    after = _stats("head_entities")
    assert after["in_flight"] == 0
    assert after["loop"]["ended"]["deadline"] == before["loop"]["ended"].get("deadline", 0) + 1
    assert after["tokens"] - before["tokens"] < LIMIT


def test_clients_that_hang_up_stop_their_rows_and_a_short_request_answers_fast(app):
    """16 clients ask for long decodes (4 inputs each) on the predict route and hang up: Serve
    cancels their requests, the Ingress its Decoder calls, and their rows leave at the next step."""
    body = {"inputs": [TEXTS[2]] * 4, "max_new_tokens": LIMIT, "min_new_tokens": LIMIT}
    before = _stats("head_entities")

    def hang_up(_: int) -> None:
        with pytest.raises(httpx.TimeoutException):  # 64 rows of 500 steps: never this fast
            app.post("/v1/tasks/entities/predict", json=body, timeout=0.5)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(hang_up, range(16)))
    gone = time.monotonic()
    while _stats("head_entities")["in_flight"] and time.monotonic() - gone < 5:
        time.sleep(0.05)
    drained_s = time.monotonic() - gone
    after = _stats("head_entities")
    assert after["in_flight"] == 0 and drained_s < 1.0, (drained_s, after["loop"])
    # Every row that reached the Decoder left as cancelled, none by its cap (on a loaded machine
    # some requests are cancelled before their Decoder call is made: their rows never start).
    ended = {k: v - before["loop"]["ended"].get(k, 0) for k, v in after["loop"]["ended"].items()}
    ended = {k: v for k, v in ended.items() if v}
    assert set(ended) == {"cancelled"} and 0 < ended["cancelled"] <= 64, ended
    assert after["tokens"] - before["tokens"] < 64 * LIMIT  # none decoded to its end
    sent = time.monotonic()
    r = app.post("/v1/tasks/entities/predict", json={"inputs": ["oslo"], "max_new_tokens": 4})
    assert r.status_code == 200 and time.monotonic() - sent < 1.0


def test_a_classification_request_never_waits_for_a_decode(app):
    long = {"inputs": [TEXTS[0]] * 8, "max_new_tokens": LIMIT, "min_new_tokens": LIMIT}
    with ThreadPoolExecutor(4) as pool:
        decoding = [pool.submit(app.post, "/v1/tasks/entities/predict", json=long) for _ in range(4)]
        began = time.monotonic()
        while not _stats("head_entities")["in_flight"] and time.monotonic() - began < 10:
            time.sleep(0.02)
        sent = time.monotonic()
        r = app.post("/v1/tasks/sentiment/predict", json={"inputs": TEXTS})
        took = time.monotonic() - sent
        still_decoding = _stats("head_entities")["in_flight"]
        results = [f.result() for f in decoding]
    assert r.status_code == 200 and still_decoding > 0, (took, still_decoding)
    assert all(x.status_code == 200 for x in results)
    assert took < 2.0, took


def test_max_new_tokens_over_the_limit_is_refused_naming_the_field(app):
    for path, body in [
        ("/v1/predict", {"inputs": ["a b c"], "max_new_tokens": LIMIT + 1}),
        ("/v1/tasks/entities/generate/stream", {"input": "a b c", "max_new_tokens": LIMIT + 1}),
    ]:
        r = app.post(path, json=body)
        assert r.status_code == 422, (path, r.text)
        error = r.json()["error"]
        assert error["code"] == "max_new_tokens_too_large"
        assert "body.max_new_tokens" in error["message"] and str(LIMIT) in error["message"]
    r = app.post("/v1/tasks/sentiment/generate/stream", json={"input": "a b c"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "not_generation"


def test_a_bad_input_fails_alone(app):
    """Over HTTP, a refused text fails only its request; inside the head, an input whose states
    cannot be decoded fails only its own call, not the rows decoding beside it."""
    import numpy as np
    from ray import serve

    good = json.dumps({"inputs": ["bob met carol", "oslo"], "max_new_tokens": 30}).encode()
    bad = b'{"inputs": ["\\ud800 broken"]}'  # a lone surrogate
    headers = {"Content-Type": "application/json"}
    with ThreadPoolExecutor(6) as pool:
        sent = [
            pool.submit(app.post, "/v1/predict", content=body, headers=headers)
            for body in [good, bad, good, good]
        ]
        answers = [f.result() for f in sent]
    assert [r.status_code for r in answers] == [200, 422, 200, 200]
    assert "inputs[0]" in answers[1].json()["error"]["message"]

    encoder = serve.get_deployment_handle("Encoder", "polytask")
    head = serve.get_deployment_handle("head_entities", "polytask")
    encoded = encoder.encode.remote(TEXTS[:2], None, False, True).result()
    broken = {**encoded, "items": [encoded["items"][0]]}
    broken["items"][0] = type(encoded["items"][0])(tokens=np.zeros((3, 5), dtype=np.float32))
    before = _stats("head_entities")
    busy = head.predict.remote(encoded, TEXTS[:2], None, 200, 200)  # the decode the next joins
    time.sleep(0.2)
    ok = head.predict.remote(encoded, TEXTS[:1], [0], 8, 8)
    fails = head.predict.remote(broken, TEXTS[:1], None, 8, 8)
    assert len(ok.result()["answers"]) == 1
    with pytest.raises(Exception, match="size|shape|dimension"):
        fails.result()
    assert len(busy.result()["answers"]) == 2
    assert _stats("head_entities")["loop"]["ended"]["failed"] == before["loop"]["ended"].get("failed", 0) + 1


def test_generate_ends_single_rows_and_holds_the_minimum(generation_bundle):
    """In process: the streaming hooks the head uses. A row `on_step` ends stops at its next
    step while its batch-mate decodes on to exactly its minimum (= its cap)."""
    import torch

    from polytask.model.bundle import load_bundle
    from polytask.model.generation import generate

    model, _, _ = load_bundle(str(generation_bundle))
    head = model.heads["entities"]
    states, mask = torch.randn(2, 5, head.decoder.config.hidden_size), torch.ones(2, 5)
    seen: list[list[int | None]] = []

    def on_step(step: int, tokens: list[int | None], finished: list[bool]) -> set[int]:
        seen.append(tokens)
        return {0} if step == 1 else set()

    ids = generate(head, states, mask, max_new_tokens=10, min_new_tokens=10, on_step=on_step)
    assert len(seen) == 11  # row 1: 10 tokens, then its EOS
    assert seen[2][0] == head.eos_id and all(t[0] is None for t in seen[3:])
    assert len(ids[0]) <= 2 and head.eos_id not in seen[9][1:]
    with pytest.raises(ValueError, match="min_new_tokens"):
        generate(head, states, mask, max_new_tokens=4, min_new_tokens=5)


def test_sampling_with_a_seed_draws_the_same_text(app):
    body = {"inputs": [TEXTS[0]], "max_new_tokens": 12, "min_new_tokens": 12, "temperature": 1.5}
    texts = [
        app.post("/v1/tasks/entities/predict", json={**body, "seed": seed}).json()["results"][0]["text"]
        for seed in (7, 7, 8)
    ]
    assert texts[0] == texts[1] and texts[0] != texts[2], texts


def test_a_server_limit_over_the_decoders_positions_is_refused(generation_bundle):
    from polytask.serve import compose
    from polytask.serve.args import ServeArgsError

    with pytest.raises(ServeArgsError, match=r"max_new_tokens: 600 is over the 511 new tokens task 'entities'"):
        compose({"model": str(generation_bundle), "max_new_tokens": 600}, {})
