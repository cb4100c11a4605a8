r"""Values the hand-written pages state, read from the code at build time: `{{ NAME }}` in a page
becomes the value, so a default, a limit or a shipped setting is never retyped (and never stale).

Names:
- `config.SECTION.FIELD`: default of an experiment-file field (`config.optim.lr`,
  `config.tasks.head.dropout`: list sections by their key);
- `serve.FIELD`, `serve.head_options.FIELD`: default of a Serve application arg;
- `const.MODULE.NAME`: a module constant of polytask (`const.serve.ingress.RETRY_JITTER_S`);
- `local.PATH`, `cluster.PATH`: a value of serve_configs/local.yaml or cluster.yaml, the path
  inside its one application (`cluster.args.max_batch_size`,
  `cluster.deployments.Ingress.max_ongoing_requests`);
- a few derived values, in DERIVED.

`\{{ NAME }}` shows the braces as written. `python docs/values.py NAME ...` prints values; tests/test_docs.py checks every `{{ NAME }}` in
the pages resolves.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDER = re.compile(r"(?<!\\)\{\{ ?([\w.]+) ?\}\}")
ESCAPED = re.compile(r"\\(\{\{ ?[\w.]+ ?\}\})")  # \{{ NAME }}: shown as written, not filled


class UnknownValue(KeyError):
    """A `{{ NAME }}` that names nothing in the code."""


def _serve_args() -> type[BaseModel]:
    from polytask.serve.args import ServeArgs

    return ServeArgs


def _experiment() -> type[BaseModel]:
    from polytask.config import ExperimentConfig

    return ExperimentConfig


def _field_default(model: type[BaseModel], path: list[str], name: str) -> Any:
    """Default of the field at `path` inside `model`, following nested models (and list items)."""
    for i, key in enumerate(path):
        if key not in model.model_fields:
            raise UnknownValue(f"{name}: {model.__name__} has no field '{key}'")
        info = model.model_fields[key]
        if i == len(path) - 1:
            if info.is_required():
                raise UnknownValue(f"{name}: '{key}' is required, it has no default")
            return info.get_default(call_default_factory=True)
        nested = [t for t in _flatten(info.annotation)
                  if isinstance(t, type) and issubclass(t, BaseModel)]
        if not nested:
            raise UnknownValue(f"{name}: '{key}' of {model.__name__} is not a section")
        model = nested[0]
    raise UnknownValue(f"{name}: no field named")


def _flatten(tp: Any) -> list[Any]:
    import typing

    args = typing.get_args(tp)
    return [x for a in args for x in _flatten(a)] if args else [tp]


def _const(name: str, parts: list[str]) -> Any:
    """A module attribute; names past it index into a dict constant (`const.serve.app.X.key`)."""
    for cut in range(len(parts) - 1, 0, -1):
        try:
            node = importlib.import_module("polytask." + ".".join(parts[:cut]))
        except ImportError:
            continue
        for key in parts[cut:]:
            node = node.get(key) if isinstance(node, dict) else getattr(node, key, None)
            if node is None:
                raise UnknownValue(f"{name}: polytask.{'.'.join(parts[:cut])} has no '{key}'")
        return node
    raise UnknownValue(f"{name}: no polytask module in it")


def serve_config(which: str) -> dict[str, Any]:
    """The polytask application of a shipped Serve config, `deployments` keyed by name."""
    raw = yaml.safe_load((ROOT / "serve_configs" / f"{which}.yaml").read_text())
    app = dict(raw["applications"][0])
    app["deployments"] = {d["name"]: d for d in app.get("deployments", [])}
    return app


def _config_value(name: str, which: str, parts: list[str]) -> Any:
    node: Any = serve_config(which)
    for key in parts:
        if not isinstance(node, dict) or key not in node:
            raise UnknownValue(f"{name}: serve_configs/{which}.yaml has no '{key}' there")
        node = node[key]
    return node


def _stuck_after() -> float:
    from polytask.serve.health import stuck_after

    return stuck_after(_serve_args().model_fields["request_timeout_s"].default)


def _mlflow_auth(key: str) -> str:
    """A setting of the shipped MLflow auth config (k8s/base/mlflow-auth.yaml's basic_auth.ini)."""
    import configparser

    docs = yaml.safe_load_all((ROOT / "k8s" / "base" / "mlflow-auth.yaml").read_text())
    ini = next(d for d in docs if d and d["kind"] == "ConfigMap")["data"]["basic_auth.ini"]
    parser = configparser.ConfigParser()
    parser.read_string(ini)
    return parser["mlflow"][key]


DERIVED: dict[str, Callable[[], Any]] = {
    # how long the shipped MLflow server trusts a checked password before hashing it again
    "derived.mlflow_auth_cache_s": lambda: int(_mlflow_auth("auth_cache_ttl_seconds")),
    # a call running this long marks its replica stuck, at the default request deadline
    "derived.stuck_after_s": _stuck_after,
    # the request body limit of the default input limits
    "derived.body_limit": lambda: _serve_args()(model="m").body_limit,
    # how much of an over-limit body the Ingress reads and drops before it answers 413
    "derived.drain_mib": lambda: _const("drain", ["serve", "http", "DRAIN_BYTES"]) // 2**20,
    # Ray Serve's own max_ongoing_requests, which polytask's deployments raise
    "derived.serve_default_max_ongoing": lambda: importlib.import_module(
        "ray.serve._private.constants").DEFAULT_MAX_ONGOING_REQUESTS,
    # failed health checks in a row after which Ray Serve replaces a replica
    "derived.serve_unhealthy_after": lambda: importlib.import_module(
        "ray.serve._private.constants").REPLICA_HEALTH_CHECK_UNHEALTHY_THRESHOLD,
    "version": lambda: importlib.import_module("tomllib").loads(
        (ROOT / "pyproject.toml").read_text())["project"]["version"],
}


def value(name: str) -> Any:
    """The value a `{{ name }}` stands for."""
    if name in DERIVED:
        return DERIVED[name]()
    head, *parts = name.split(".")
    if not parts:
        raise UnknownValue(f"{name}: expected NAMESPACE.PATH (config, serve, const, local, cluster)")
    if head == "config":
        return _field_default(_experiment(), parts, name)
    if head == "serve":
        return _field_default(_serve_args(), parts, name)
    if head == "const":
        return _const(name, parts)
    if head in ("local", "cluster"):
        return _config_value(name, head, parts)
    raise UnknownValue(f"{name}: unknown namespace '{head}'")


def text(name: str) -> str:
    """How a value reads in prose: numbers without trailing zeros, YAML spelling otherwise."""
    v = value(name)
    if isinstance(v, bool) or v is None:
        return {True: "true", False: "false", None: "null"}[v]
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return v
    return yaml.safe_dump(v, default_flow_style=True).strip()


def fill(markdown: str, where: str = "page") -> str:
    """`markdown` with every `{{ NAME }}` replaced by its value; an unknown name raises."""

    def one(match: re.Match[str]) -> str:
        try:
            return text(match[1])
        except UnknownValue as exc:
            raise UnknownValue(f"{where}: {{{{ {match[1]} }}}}: {exc.args[0]}") from None

    return ESCAPED.sub(r"\1", PLACEHOLDER.sub(one, markdown))


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(f"{arg} = {text(arg)}")
