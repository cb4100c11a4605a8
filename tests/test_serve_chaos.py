"""Chaos over real HTTP: hostile inputs and killed replica processes while good clients keep
sending. One Serve app for the module (the untrained demo bundle: no training needed).

Each test prints a `chaos:` line with its figures (docs/reliability.md); run with `-s` to see them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx
import pytest

from conftest import free_port

GOOD = {"inputs": ["alice flew to paris", "the movie was great"], "tasks": ["sentiment", "ner"]}
READ_TIMEOUT_S = 2.0
BODY_LIMIT = 64 * 1024
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def app(ray_local, untrained_bundle) -> Iterator[str]:
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    _deploy(untrained_bundle)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _deploy(bundle: Path, more_options: dict[str, Any] | None = None, **extra_args: Any) -> None:
    """The chaos app (small limits, one replica each) as `polytask`, with `extra_args` on top
    and `more_options` ({deployment: Serve options}) added to its deployments' options."""
    from ray import serve

    from polytask.serve import compose

    args = {
        "model": str(bundle),
        "max_inputs_per_request": 16,
        "max_chars_per_input": 500,
        "max_body_bytes": BODY_LIMIT,
        "read_timeout_s": READ_TIMEOUT_S,
        **extra_args,
    }
    # A replacing or stopping replica checks for drained requests after 0.1 s, not Serve's 2 s:
    # these tests' redeploys and teardown come after their load has ended.
    quick = {"num_replicas": 1, "graceful_shutdown_wait_loop_s": 0.1}
    one = {**quick, "ray_actor_options": {"num_cpus": 0.1}}
    options = {name: one for name in ("Ingress", "head_sentiment", "head_ner")}
    options["Encoder"] = {**quick, "ray_actor_options": {"num_cpus": 0.5}}
    for name, more in (more_options or {}).items():
        options[name] = {**options[name], **more}
    serve.run(compose(args, options), name="polytask", route_prefix="/")


def _stats(deployment: str) -> dict[str, Any]:
    from ray import serve

    return serve.get_deployment_handle(deployment, "polytask").stats.remote().result()


def _actor_ids(url: str) -> dict[str, str]:
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    return {
        name: _stats(name)["actor_id"]
        for name in ("Ingress", "Encoder", "head_sentiment", "head_ner")
    }


@dataclass
class Load:
    """Good clients in threads, each sending GOOD in a loop; every request's times and status."""

    url: str
    clients: int = 4
    done: list[tuple[float, float, int, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Self:
        self.threads = [threading.Thread(target=self._client) for _ in range(self.clients)]
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def _client(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self.stop.is_set():
                start = time.monotonic()
                try:
                    r = client.post("/v1/predict", json=GOOD)
                    ok = r.status_code == 200 and len(r.json()["results"]) == 2
                    status, text = (r.status_code if ok else -r.status_code), r.text[:200]
                except httpx.HTTPError as exc:
                    status, text = 0, repr(exc)
                self.done.append((start, time.monotonic(), status, text))

    def wait_for(self, n: int, timeout_s: float = 60) -> None:
        """Until n more requests have finished."""
        want, deadline = len(self.done) + n, time.monotonic() + timeout_s
        while len(self.done) < want and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.done) >= want, f"only {len(self.done)} of {want} requests finished"

    def failures(self) -> list[tuple[float, float, int, str]]:
        return [d for d in self.done if d[2] != 200]


def _raw(port: int, request: bytes) -> bytes:
    """Send raw bytes on one connection, then read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def _chunked(body: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    """A body httpx sends without Content-Length (chunked transfer encoding)."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


HUGE = b'{"inputs": ["' + b"a" * 10_000_000 + b'"]}'
DEEP = b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}"
# (case, body as bytes/JSON/chunks, status, code, message fragment); raw JSON escapes below are
# what a client sends: "\ud800" is valid JSON that decodes to a lone surrogate.
HOSTILE: list[tuple[str, Any, int, str, str]] = [
    ("lone surrogate", b'{"inputs": ["\\ud800 hello"]}', 422, "invalid_text", "inputs[0] holds"),
    (
        "lone surrogate, 4th input",
        b'{"inputs": ["a", "b", "c", "x \\udc00"]}',
        422,
        "invalid_text",
        "inputs[3]",
    ),
    (
        "surrogate in text_pair",
        b'{"inputs": [{"text": "a", "text_pair": "\\udbff"}]}',
        422,
        "invalid_text",
        "inputs[0].text_pair",
    ),
    ("NUL only", b'{"inputs": ["\\u0000\\u0000"]}', 422, "empty_text", "inputs[0]"),
    ("zero-width only", {"inputs": ["ok", "\u200b\u200c\u2060"]}, 422, "empty_text", "inputs[1]"),
    ("control characters in text", {"inputs": ["alice\x00met\x1bbob\x7f in oslo"]}, 200, "", ""),
    ("input too long", {"inputs": ["a" * 501]}, 413, "input_too_long", "inputs[0] has 501"),
    ("too many inputs", {"inputs": ["a"] * 17}, 413, "too_many_inputs", "the limit is 16"),
    ("10 MB body with Content-Length", HUGE, 413, "body_too_large", f"{BODY_LIMIT} bytes"),
    ("10 MB body, chunked", _chunked, 413, "body_too_large", f"{BODY_LIMIT} bytes"),
    ("wrong types", {"inputs": [1, {"text": 2}]}, 422, "invalid_request", "inputs[0]"),
    ("deep JSON", DEEP, 400, "invalid_json", "could not be parsed"),
    ("not UTF-8", b'{"inputs": ["caf\xe9"]}', 400, "invalid_encoding", "UTF-8"),
]


def _send_hostile(url: str, case: tuple[str, Any, int, str, str]) -> tuple[str, int, Any]:
    name, body, *_ = case
    with httpx.Client(base_url=url, timeout=60) as client:
        if body is _chunked:
            r = client.post("/v1/predict", content=_chunked(HUGE), headers=JSON)
        elif isinstance(body, bytes):
            r = client.post("/v1/predict", content=body, headers=JSON)
        else:
            r = client.post("/v1/predict", json=body)
    return name, r.status_code, r.json()


def test_hostile_inputs_fail_alone_and_never_harm_good_traffic(app):
    """Every hostile request gets its own 4xx JSON (control characters are fixed, not refused);
    good requests sent at the same time all succeed, and no replica restarts."""
    from ray import serve

    from polytask.serve.validation import InputRejected

    port = int(app.rsplit(":", 1)[1])
    before = _actor_ids(app)
    encoder = serve.get_deployment_handle("Encoder", "polytask")
    with Load(app) as load, ThreadPoolExecutor(8) as pool:
        load.wait_for(4)
        answers = list(pool.map(lambda c: _send_hostile(app, c), HOSTILE * 2))
        slow = pool.submit(
            _raw,
            port,
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 200\r\n\r\n{"inputs": [',
        )
        # past the Ingress checks, the Encoder still blames the input, never its batch-mates
        with pytest.raises(InputRejected) as direct:
            encoder.encode.remote(["fine", "\ud800"], None, True, False).result()
        started = time.monotonic()
        slow_answer = slow.result()
        slow_s = time.monotonic() - started
        load.wait_for(8)
    for (name, status, body), (_, _, want_status, code, fragment) in zip(answers, HOSTILE * 2):
        assert status == want_status, f"{name}: {status} {body}"
        if status == 200:
            assert len(body["results"]) == 1, name
            continue
        assert body["error"]["code"] == code, f"{name}: {body}"
        assert fragment in body["error"]["message"], f"{name}: {body}"
    assert direct.value.index == 1
    assert slow_answer.startswith(b"HTTP/1.1 408"), slow_answer[:300]
    assert b'"request_timeout"' in slow_answer
    assert slow_s < READ_TIMEOUT_S + 5
    assert not load.failures(), load.failures()[:3]
    assert _actor_ids(app) == before
    print(
        f"\nchaos: hostile requests {len(answers) + 2} ({len(HOSTILE) + 2} kinds), "
        f"good requests {len(load.done)}, good lost {len(load.failures())}, replicas restarted 0 "
        f"(load average {os.getloadavg()[0]:.2f})"
    )


@pytest.mark.parametrize("deployment", ["Encoder", "head_ner"])
def test_sigkill_a_replica_under_load_costs_at_most_the_requests_in_flight(app, deployment):
    """SIGKILL the replica's process while 4 clients send: only requests in flight at the kill
    may fail, and a new replica (new actor id) answers."""
    victim = _stats(deployment)
    assert victim["pid"] != os.getpid()
    with Load(app) as load:
        load.wait_for(8)
        killed_at = time.monotonic()
        os.kill(victim["pid"], signal.SIGKILL)
        after = _stats(deployment)  # queued by Serve until a replica answers
        assert after["actor_id"] != victim["actor_id"] and after["pid"] != victim["pid"]
        replaced_s = time.monotonic() - killed_at
        load.wait_for(8)
    in_flight = sum(1 for start, end, _, _ in load.done if start <= killed_at < end)
    failed = load.failures()
    assert len(failed) <= in_flight, (in_flight, failed[:3])
    recovered = min(end for start, end, s, _ in load.done if start > killed_at and s == 200)
    print(
        f"\nchaos: SIGKILL {deployment}: in flight {in_flight}, failed {len(failed)}, "
        f"new replica answered after {replaced_s:.1f} s, first good request after "
        f"{recovered - killed_at:.1f} s; {len(load.done)} requests "
        f"(load average {os.getloadavg()[0]:.2f}) {[f[2:] for f in failed[:2]]}"
    )


# A request that keeps the Encoder busy for a while: 16 inputs of about 400 characters.
HEAVY = {"inputs": [f"alice flew to paris on day {i} " * 14 for i in range(16)], "tasks": ["ner"]}


def test_sigkill_the_encoder_under_64_clients_bounds_retries_and_answers_503(app):
    """64 clients send at once; the Encoder's process is SIGKILLed while it encodes their first
    batches: a failed batch is neither split per request nor retried more than once per request,
    so the Ingress makes at most 2 batch calls per request (the old policy made several per
    request), and a request no replica could answer gets 503 with Retry-After, never 500."""
    victim = _stats("Encoder")
    assert httpx.post(f"{app}/v1/predict", json=GOOD, timeout=60).status_code == 200
    before = _stats("Ingress")
    barrier = threading.Barrier(65)

    def client(_: int) -> httpx.Response:
        with httpx.Client(base_url=app, timeout=60) as http:
            barrier.wait()
            return http.post("/v1/predict", json=HEAVY)

    with ThreadPoolExecutor(64) as pool:
        pending = [pool.submit(client, i) for i in range(64)]
        barrier.wait()
        deadline = time.monotonic() + 30
        while _stats("Encoder")["calls"] < victim["calls"] + 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(victim["pid"], signal.SIGKILL)  # with Ingress batches accepted and encoding
        killed = time.monotonic()
        answers = [f.result() for f in pending]
    took = time.monotonic() - killed
    after = _stats("Ingress")
    calls, retried = after["calls"] - before["calls"], after["retried"] - before["retried"]
    failed = [r for r in answers if r.status_code != 200]
    for r in failed:
        assert r.status_code == 503, (r.status_code, r.text)
        assert r.json()["error"]["code"] == "unavailable" and int(r.headers["retry-after"]) > 0
    assert calls <= 2 * len(answers), calls
    assert _stats("Encoder")["actor_id"] != victim["actor_id"]  # waits for the replacement
    assert httpx.post(f"{app}/v1/predict", json=GOOD, timeout=60).status_code == 200
    print(
        f"\nchaos: SIGKILL Encoder under 64 clients: {calls} downstream batch calls for "
        f"{len(answers)} requests ({retried} resent once), {len(failed)} answered 503, all "
        f"answered {took:.1f} s after the kill (load average {os.getloadavg()[0]:.2f})"
    )


def test_a_hung_encoder_answers_504_by_the_deadline(app, untrained_bundle):
    """A stopped (SIGSTOP) Encoder process: requests get 504 JSON at request_timeout_s instead of
    hanging, and the service answers again once it runs."""
    _deploy(untrained_bundle, request_timeout_s=1.5)
    encoder = _stats("Encoder")
    os.kill(encoder["pid"], signal.SIGSTOP)
    try:
        started = time.monotonic()
        with ThreadPoolExecutor(3) as pool:
            answers = list(
                pool.map(lambda _: httpx.post(f"{app}/v1/predict", json=GOOD, timeout=30), range(3))
            )
        waited = time.monotonic() - started
    finally:
        os.kill(encoder["pid"], signal.SIGCONT)
    for r in answers:
        assert r.status_code == 504, r.text
        assert r.json()["error"]["code"] == "timeout"
        assert "request_timeout_s" in r.json()["error"]["message"]
    assert 1.5 <= waited < 10, waited
    assert httpx.post(f"{app}/v1/predict", json=GOOD, timeout=30).status_code == 200
    print(
        f"\nchaos: hung Encoder: 3 requests answered 504 after {waited:.1f} s (deadline 1.5 s) "
        f"(load average {os.getloadavg()[0]:.2f})"
    )


def test_error_bodies_are_json_even_for_raw_clients(app):
    """A raw HTTP/1.1 client sending JSON with a lone surrogate gets a parseable JSON 422."""
    port = int(app.rsplit(":", 1)[1])
    body = b'{"inputs": ["\\ud800"]}'
    answer = _raw(
        port,
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body,
    )
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 422"), head
    assert json.loads(payload)["error"]["code"] == "invalid_text"


def test_a_hung_head_call_gets_its_replica_replaced(app, untrained_bundle, tmp_path):
    """One call of head_ner never returns (test hook polytask.serve.faults), while the replica's
    other calls and its health probe go on: the request waiting on it gets 504 at its deadline,
    the Ingress's batch slot comes free, head_ner's check_health sees a call running past twice
    the deadline and Serve replaces the replica; later requests succeed."""
    from polytask.serve.faults import ENV

    hung = tmp_path / "hung"
    fault = {ENV: json.dumps({"hang_head": "ner", "once": str(hung)})}
    head_ner = {
        "ray_actor_options": {"num_cpus": 0.1, "runtime_env": {"env_vars": fault}},
        "health_check_period_s": 0.5,
    }
    # the hung-Encoder test's deadline: the Ingress's args are unchanged, so it is not restarted
    _deploy(untrained_bundle, {"head_ner": head_ner}, request_timeout_s=1.5)
    before = _actor_ids(app)
    first = httpx.post(f"{app}/v1/predict", json=GOOD, timeout=30)
    assert hung.exists(), "the hook did not hang the first head_ner call"
    assert first.status_code == 504, first.text
    started = time.monotonic()
    answers = []
    while _stats("head_ner")["actor_id"] == before["head_ner"] and time.monotonic() - started < 40:
        answers.append(httpx.post(f"{app}/v1/predict", json=GOOD, timeout=30).status_code)
    replaced_s = time.monotonic() - started
    after = _actor_ids(app)
    assert after["head_ner"] != before["head_ner"], f"not replaced in {replaced_s:.0f} s"
    assert after["Ingress"] == before["Ingress"]  # its slots came free at the deadline
    # the hung call held no one else up; the only failures allowed are the gap while Serve
    # swaps the app's one head_ner replica (the old one stopped, the new one loading)
    lost = [(i, s) for i, s in enumerate(answers) if s != 200]
    assert len(lost) <= 2 and all(s in (503, 504) for _, s in lost), lost
    for _ in range(3):
        assert httpx.post(f"{app}/v1/predict", json=GOOD, timeout=30).status_code == 200
    print(
        f"\nchaos: hung head_ner call: 504 at the 1.5 s deadline, replica replaced "
        f"{replaced_s:.1f} s later, {len(answers)} requests meanwhile, {len(lost)} lost in the swap "
        f"(load average {os.getloadavg()[0]:.2f})"
    )
