"""Every YAML, JSON and curl example in the docs (docs/*.md, README.md) is checked against the
code: experiment YAML through the config loader (`polytask validate`'s), Serve YAML through Ray's
Serve schema and `ServeArgs`, request bodies against the route's request model in the app's
OpenAPI schema, example answers against the response models and the task kinds' own decoders,
and a shown `polytask validate` error against the error the loader gives for the YAML above it.
An example of a shape this file cannot check fails, so a new kind of example gets a checker."""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^( *)```(\w+)\n(.*?)^\1```", re.DOTALL | re.MULTILINE)
SERVE_PORT = 8000  # the examples' polytask endpoint; other hosts (MLflow on 5000) are not ours


@functools.cache
def _docs_module(name: str) -> Any:
    if str(ROOT / "docs") not in sys.path:
        sys.path.insert(0, str(ROOT / "docs"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "docs" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    body: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def _generated_pages() -> dict[Path, str]:
    """The reference pages docs/hooks.py writes at build time: their examples are checked too."""
    hooks = _docs_module("hooks")
    return {ROOT / "docs" / "reference" / "configuration.md": hooks.configuration_page(),
            ROOT / "docs" / "reference" / "http-api.md": hooks.http_page()}


PAGE_TEXT = {**{p: p.read_text() for p in PAGES}, **_generated_pages()}


def _blocks(page: Path, text: str) -> list[Block]:
    out = []
    for m in FENCE.finditer(text):
        body = "\n".join(line[len(m[1]):] for line in m[3].splitlines())
        out.append(Block(page, text[: m.start()].count("\n") + 1, m[2], body))
    return out


BLOCKS = [b for page, text in PAGE_TEXT.items() for b in _blocks(page, text)]


def _examples(kind: str) -> list[Any]:
    picked = {
        "yaml": [b for b in BLOCKS if b.lang == "yaml"],
        "json": [b for b in BLOCKS if b.lang == "json"],
        "curl": [b for b in BLOCKS if b.lang == "bash" and "curl " in b.body],
    }[kind]
    return [pytest.param(b, id=b.where) for b in picked]


def _neighbour(block: Block, step: int) -> Block | None:
    """The code block `step` blocks after (or before) `block` on its page."""
    same = [b for b in BLOCKS if b.page == block.page]
    i = same.index(block) + step if block in same else -1
    return same[i] if 0 <= i < len(same) else None


# --- YAML ----------------------------------------------------------------------------------------


def _check_experiment(block: Block, data: dict[str, Any]) -> None:
    from polytask.config import ConfigError, config_from_dict

    shown = _neighbour(block, 1)
    expects_error = shown is not None and shown.lang == "text" and shown.body.startswith("error: ")
    if not expects_error:
        config_from_dict(data, source=block.where)
        return
    with pytest.raises(ConfigError) as caught:
        config_from_dict(data, source="experiment.yaml")
    assert f"error: {caught.value}" == shown.body.rstrip("\n"), (
        f"{shown.where}: the error shown is not the one `polytask validate` prints for the YAML "
        f"above it; it prints:\nerror: {caught.value}"
    )


def _check_serve_args(args: dict[str, Any]) -> None:
    from polytask.serve.args import parse_args

    parse_args({"model": "models:/m@champion", **args})


def _check_deployments(entries: list[dict[str, Any]], where: str) -> None:
    from ray.serve.schema import DeploymentSchema

    for entry in entries:
        DeploymentSchema.model_validate(entry)
        name = entry["name"]
        assert name in ("Ingress", "Encoder") or re.fullmatch(r"head_[a-z][a-z0-9_]*", name), (
            f"{where}: deployment '{name}' is none of Ingress, Encoder, head_<task>"
        )


def _check_serve_config(block: Block, data: dict[str, Any]) -> None:
    from ray.serve.schema import ServeDeploySchema

    apps = data["applications"]
    if all("import_path" in a for a in apps):
        ServeDeploySchema.model_validate(data)
    for app in apps:
        _check_serve_args(app.get("args", {}))
        _check_deployments(app.get("deployments", []), block.where)
        if "logging_config" in app:
            from ray.serve.schema import LoggingConfig

            LoggingConfig.model_validate(app["logging_config"])


def _k8s_names() -> str:
    return "\n".join(p.read_text() for p in (ROOT / "k8s").rglob("*.yaml"))


def check_yaml(block: Block) -> None:
    data = yaml.safe_load(block.body)
    if isinstance(data, list) and all(isinstance(t, dict) and "kind" in t for t in data):
        _check_experiment(block, {"encoder": {"name_or_path": "x"}, "tasks": data})
    elif isinstance(data, dict) and "tasks" in data and "encoder" in data:
        _check_experiment(block, data)
    elif isinstance(data, dict) and "applications" in data:
        _check_serve_config(block, data)
    elif isinstance(data, dict) and set(data) <= {"args", "deployments"}:
        _check_serve_args(data.get("args", {}))
        _check_deployments(data.get("deployments", []), block.where)
    elif isinstance(data, dict) and "secretGenerator" in data:  # a kustomization patch
        names = _k8s_names()
        for entry in data["secretGenerator"]:
            assert f"name: {entry['name']}" in names, f"{block.where}: no secret {entry['name']} in k8s/"
    elif isinstance(data, dict) and "scrape_configs" in data:  # Prometheus, scraping our port
        ports = set(re.findall(r"--metrics-port (\d+)", PAGE_TEXT[block.page]))
        targets = [t for job in data["scrape_configs"] for sc in job["static_configs"]
                   for t in sc["targets"]]
        assert all(t.rsplit(":", 1)[1] in ports for t in targets), (
            f"{block.where}: scrapes {targets}, but the page starts Ray with --metrics-port {ports}")
    else:
        pytest.fail(f"{block.where}: a YAML example of a shape this test cannot check; "
                    "teach tests/test_docs_examples.py how")


@pytest.mark.parametrize("block", _examples("yaml"))
def test_yaml_example(block: Block) -> None:
    check_yaml(block)


# --- HTTP: the app's OpenAPI schema ----------------------------------------------------------


@pytest.fixture(scope="module")
def openapi() -> dict[str, Any]:
    return _docs_module("hooks").openapi_schema()


def _model(ref_schema: dict[str, Any]) -> Any:
    from polytask.serve import schemas

    return getattr(schemas, ref_schema["$ref"].rsplit("/", 1)[1])


def _route(spec: dict[str, Any], path: str) -> tuple[str, dict[str, Any]]:
    for template, methods in spec["paths"].items():
        if re.fullmatch(re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(template)), path):
            return template, methods
    raise AssertionError(f"no route {path}; routes are {sorted(spec['paths'])}")


@dataclass
class Curl:
    method: str
    path: str
    body: Any


def _curls(block: Block) -> list[Curl]:
    """The curl calls of a shell block (continuation lines joined) that go to the polytask API."""
    text = re.sub(r"\\\n", " ", block.body)
    out = []
    for line in text.splitlines():
        if "curl " not in line:
            continue
        call = line[line.index("curl ") :]
        url = re.search(r"(?:https?://)?(?:localhost|127\.0\.0\.1):(\d+)(/[^\s'\")]*)?", call)
        assert url, f"{block.where}: no URL in {call!r}"
        if int(url[1]) != SERVE_PORT:
            continue  # another service's API (MLflow)
        data = re.search(r"-d '([^']*)'", call)
        method = re.search(r"-X (\w+)", call)
        method_name = method[1] if method else ("POST" if data else "GET")
        out.append(Curl(method_name.lower(), url[2] or "/", data[1] if data else None))
    return out


@pytest.mark.parametrize("block", _examples("curl"))
def test_curl_example(block: Block, openapi: dict[str, Any]) -> None:
    for curl in _curls(block):
        template, methods = _route(openapi, curl.path)
        assert curl.method in methods, f"{block.where}: {template} takes {sorted(methods)}"
        op = methods[curl.method]
        if curl.body is None:
            continue
        if "$" in curl.body:  # a shell-built body: check its shape only
            continue
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        _model(schema).model_validate(json.loads(curl.body))


# --- answers -----------------------------------------------------------------------------------


def _decoded_shapes() -> dict[str, Any]:
    """Each task kind's real answer for a made-up output, from the decoder that serving runs."""
    from polytask.tasks import KINDS, TaskSpec

    labels = {"classification": ["negative", "positive"], "multilabel": ["a", "b"],
              "regression": ["value"], "token_classification": ["O", "B-person", "I-person"]}
    out = {}
    for kind, names in labels.items():
        spec = TaskSpec(name="t", kind=kind, labels=names)
        if kind == "token_classification":
            logits = np.array([[0, 0, 0], [0, 5, 0], [0, 0, 5], [0, 0, 0]], dtype=float)
            out[kind] = KINDS[kind].decode(logits, spec, text="alice smith",
                                          word_ids=[None, 0, 1, None], word_spans=[(0, 5), (6, 11)])
        else:
            out[kind] = KINDS[kind].decode(np.array([0.2, 0.9]), spec)
    out["generation"] = KINDS["generation"].decode("alice ; paris", TaskSpec(name="t", kind="generation", labels=[]))
    return out


def _shape(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(value[0])] if value else []
    return type(value).__name__.replace("int", "float")


def _check_answer(answer: dict[str, Any], text: str | None, where: str) -> None:
    shapes = {kind: _shape(a) for kind, a in _decoded_shapes().items()}
    kinds = [k for k, s in shapes.items() if s == _shape(answer)]
    assert kinds, f"{where}: {answer} has the shape of no task kind's answer: {shapes}"
    if "probabilities" in answer and "label" in answer:
        probs = answer["probabilities"]
        assert answer["label"] == max(probs, key=probs.get) and answer["score"] == max(probs.values())
        assert abs(sum(probs.values()) - 1) < 0.02, f"{where}: probabilities sum to {sum(probs.values())}"
    for ent in answer.get("entities", []):
        if text is not None:
            assert text[ent["start"] : ent["end"]] == ent["text"], (
                f"{where}: entity {ent['text']!r} is {text[ent['start']:ent['end']]!r} at "
                f"{ent['start']}:{ent['end']} of the input {text!r}"
            )


def _no_unknown_keys(model: Any, data: Any, where: str) -> None:
    """Response models ignore unknown keys; an example must not show a field the API lacks."""
    from pydantic import BaseModel

    if not isinstance(data, dict):
        return
    fields = model.model_fields
    unknown = set(data) - set(fields)
    assert not unknown, f"{where}: {model.__name__} has no field(s) {sorted(unknown)}"
    for name, value in data.items():
        ann = fields[name].annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            _no_unknown_keys(ann, value, where)


def check_json(block: Block, spec: dict[str, Any]) -> None:
    from polytask.serve import schemas

    status, body = 200, block.body
    head = re.match(r"HTTP (\d{3})\n", body)
    if head:
        status, body = int(head[1]), body[head.end() :]
    data = json.loads(body)
    before = _neighbour(block, -1)
    curls = _curls(before) if before and before.lang == "bash" and "curl " in before.body else []
    if "error" in data:
        schemas.ErrorResponse.model_validate(data)
        assert status >= 400, f"{block.where}: an error body needs its HTTP status line"
        return
    if "levelname" in data:  # a structured log line: its polytask_* fields exist in the code
        code = "\n".join(p.read_text() for p in (ROOT / "platform" / "polytask").rglob("*.py"))
        missing = [k for k in data if k.startswith("polytask_") and f'"{k}"' not in code]
        assert not missing, f"{block.where}: no log field(s) {missing} in the code"
        return
    if curls:
        _, methods = _route(spec, curls[-1].path)
        ok = methods[curls[-1].method]["responses"]["200"]["content"]["application/json"]["schema"]
        if "$ref" not in ok:  # an untyped answer (the liveness probe): ask the app itself
            assert curls[-1].method == "get", f"{block.where}: no response model to check against"
            assert _stand_in_client().get(curls[-1].path).json() == data
            return
        model = _model(ok)
        body_in = json.loads(curls[-1].body) if curls[-1].body else {}
        inputs = body_in.get("inputs") or [body_in.get("input")]
    else:
        model = {frozenset(m.model_fields): m for m in
                 (schemas.PredictResponse, schemas.TaskPredictResponse, schemas.TasksResponse)}[frozenset(data)]
        inputs = []
    model.model_validate(data)
    _no_unknown_keys(model, data, block.where)
    if model.__name__.endswith("PredictResponse"):
        for i, result in enumerate(data["results"]):
            text = inputs[i] if i < len(inputs) and isinstance(inputs[i], str) else None
            for answer in (result.values() if model is schemas.PredictResponse else [result]):
                _check_answer(answer, text, block.where)


def _stand_in_client() -> Any:
    """The FastAPI app the HTTP reference is generated from, for routes that need no model."""
    from fastapi.testclient import TestClient

    from polytask.serve.http import create_api

    return TestClient(create_api(_docs_module("hooks").DocsStandIn()))


@pytest.mark.parametrize("block", _examples("json"))
def test_json_example(block: Block, openapi: dict[str, Any]) -> None:
    check_json(block, openapi)


# --- streamed answers --------------------------------------------------------------------------

# What each server-sent event of POST /v1/tasks/{task}/generate/stream carries (serve/http.py _sse).
STREAM_EVENTS = {"token": {"id", "text"}, "done": {"task", "result", "tokens", "model"}, "error": {"error"}}


def check_stream(block: Block) -> None:
    """A text block after a curl to the stream route: every event is a known one, its data JSON
    with the fields the route sends, the final answer a generation answer, the model a ModelInfo."""
    from polytask.serve import schemas

    events = re.findall(r"^event: (\w+)\ndata: (.*)$", block.body, re.MULTILINE)
    assert events, f"{block.where}: no `event:`/`data:` pairs"
    generation = _shape(_decoded_shapes()["generation"])
    for name, raw in events:
        assert name in STREAM_EVENTS, f"{block.where}: no event '{name}'"
        data = json.loads(raw)
        assert set(data) == STREAM_EVENTS[name], (block.where, name, sorted(data))
        if name == "done":
            assert _shape(data["result"]) == generation, f"{block.where}: {data['result']}"
            schemas.ModelInfo.model_validate(data["model"])
            _no_unknown_keys(schemas.ModelInfo, data["model"], block.where)
        if name == "error":
            schemas.ErrorResponse.model_validate(data)


def _stream_examples() -> list[Any]:
    picked = []
    for block in BLOCKS:
        before = _neighbour(block, -1)
        if block.lang == "text" and before is not None and before.lang == "bash" and any(
                c.path.endswith("/generate/stream") for c in _curls(before)):
            picked.append(pytest.param(block, id=block.where))
    return picked


@pytest.mark.parametrize("block", _stream_examples())
def test_stream_example(block: Block) -> None:
    check_stream(block)


def test_stream_events_are_the_ones_the_route_sends() -> None:
    """STREAM_EVENTS above is what serve/http.py writes: each event name with its data keys."""
    source = (ROOT / "platform" / "polytask" / "serve" / "http.py").read_text()
    for name, keys in STREAM_EVENTS.items():
        assert re.search(rf'_event\(\s*"{name}"', source), f"serve/http.py sends no '{name}' event"
        for key in keys - {"model"}:
            assert f'"{key}"' in source, (name, key)


# --- the checks themselves ---------------------------------------------------------------------


def test_the_checks_catch_wrong_examples(openapi: dict[str, Any]) -> None:
    """Each checker fails on a wrong example, so a passing page means something."""
    from polytask.config import ConfigError

    page = ROOT / "docs" / "index.md"
    bad_yaml = Block(page, 1, "yaml", "encoder: {name_or_path: x}\ntasks:\n  - {name: a, kind: ner, data: {train: a.csv}}\n")
    with pytest.raises(ConfigError):
        check_yaml(bad_yaml)
    with pytest.raises(Exception, match="max_batch_siz"):
        check_yaml(Block(page, 1, "yaml", "args:\n  max_batch_siz: 8\n"))
    variant = ('{"results": [], "model": {"uri": "u", "ref": "r", "fingerprint": null, '
               '"colour": "blue"}}')
    with pytest.raises(AssertionError, match="colour"):
        check_json(Block(page, 1, "json", variant), openapi)
    offsets = ('{"results": [{"ner": {"entities": [{"type": "person", "text": "bob", "start": 1, '
               '"end": 4, "score": 0.9}]}}], "model": {"uri": "u", "ref": "r"}}')
    BLOCKS.extend([curl := Block(page, 2, "bash", "curl -s http://127.0.0.1:8000/v1/predict -d '{\"inputs\": [\"bob went\"]}'"),
                   answer := Block(page, 3, "json", offsets)])
    try:
        with pytest.raises(AssertionError, match="entity 'bob'"):
            check_json(answer, openapi)
    finally:
        BLOCKS.remove(curl)
        BLOCKS.remove(answer)
    assert _examples("yaml") and _examples("json") and _examples("curl")
