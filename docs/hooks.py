"""MkDocs hooks: the reference pages are generated from the code at build time, never typed.

- reference/configuration.md: every field of the experiment YAML (polytask.config) and of the
  Serve application args (polytask.serve.args), with type, default, limits and description;
- reference/cli.md: the typer command tree of polytask.cli, rendered by typer's own docs writer;
- reference/http-api.md: the OpenAPI schema of the FastAPI app that polytask.serve.http builds;
- benchmarks: `<!-- bench:NAME -->` markers in any page become docs/gen_bench.py's tables, and
  the plots under bench_results/ are published beside them;
- values: `{{ NAME }}` in any page becomes a default, limit or shipped setting read from the code
  (docs/values.py), so prose never retypes one.
"""

from __future__ import annotations

import json
import re
import types
import typing
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import gen_bench  # docs/ is on sys.path while MkDocs loads this file
import values
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page
from pydantic import BaseModel
from pydantic.fields import FieldInfo

ROOT = Path(__file__).resolve().parents[1]
# Pages other branches add; until they exist their nav entries are dropped instead of failing.
OPTIONAL_PAGES = ("generation.md", "reliability.md")
BENCH_MARKER = re.compile(r"^<!-- bench:(\w+) -->$", re.MULTILINE)  # a line of its own
PLOTS = ("serve/throughput.png", "serve/latency.png", "autoscale/timeline.png",
         "dashboard/dashboard.png")


# --- hooks --------------------------------------------------------------------------------------


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    docs = Path(config.docs_dir)
    config.nav = _without_missing(config.nav or [], {p for p in OPTIONAL_PAGES
                                                     if not (docs / p).exists()})
    return config


def on_files(files: Files, config: MkDocsConfig) -> Files:
    with warnings.catch_warnings():  # Ray's own pydantic deprecations, raised on import
        warnings.simplefilter("ignore", DeprecationWarning)
        pages = {
            "reference/configuration.md": configuration_page(),
            "reference/cli.md": cli_page(),
            "reference/http-api.md": http_page(),
        }
    for path, text in pages.items():
        files.append(File.generated(config, path, content=text))
    for plot in PLOTS:
        content = (gen_bench.RESULTS / plot).read_bytes()
        files.append(File.generated(config, f"bench/{plot}", content=content))
    return files


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    try:
        markdown = values.fill(markdown, page.file.src_path)
    except values.UnknownValue as exc:
        raise PluginError(str(exc)) from None
    if "<!-- bench:" not in markdown:
        return markdown
    sections = gen_bench.sections()

    def table(match: re.Match[str]) -> str:
        if match[1] not in sections:
            raise PluginError(f"{page.file.src_path}: no benchmark section '{match[1]}'; "
                              f"docs/gen_bench.py has {', '.join(sections)}")
        return sections[match[1]].markdown

    return BENCH_MARKER.sub(table, markdown)


def _without_missing(nav: list[Any], missing: set[str]) -> list[Any]:
    out = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        if isinstance(value, list):
            out.append({next(iter(item)): _without_missing(value, missing)})
        elif value not in missing:
            out.append(item)
    return out


# --- configuration reference ---------------------------------------------------------------------


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value or '""'
    return json.dumps(value)


def _type(tp: Any, anchors: dict[type, str]) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " \\| ".join(f"`{_yaml(a)}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type(a, anchors) for a in args)
    if origin is typing.Annotated:
        return _type(args[0], anchors)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type(a, anchors) for a in args)}]"
    if tp in anchors:
        return f"[{tp.__name__}](#{anchors[tp]})"
    return getattr(tp, "__name__", str(tp))


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "**required**"
    if info.default_factory is not None:
        made = info.default_factory()  # type: ignore[call-arg]
        return "(section defaults)" if isinstance(made, BaseModel) else f"`{_yaml(made)}`"
    return f"`{_yaml(info.default)}`"


def _limits(info: FieldInfo) -> str:
    signs = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "length ≥",
             "max_length": "length ≤", "pattern": "matches"}
    out = []
    for meta in info.metadata:
        for name, sign in signs.items():
            value = getattr(meta, name, None)
            if value is not None:
                out.append(f"{sign} `{value}`")
    return ", ".join(out)


def _cell(text: str | None) -> str:
    return escape_html((text or "").replace("|", "\\|").replace("\n", " "))


def escape_html(text: str) -> str:
    """`<`, `>` and `&` outside code spans as entities, so a placeholder such as <key> shows
    instead of vanishing as an unknown HTML tag (inside backticks Markdown escapes them itself)."""
    parts = re.split(r"(`[^`]*`)", text)
    return "".join(part if part.startswith("`") else
                   part.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
                   for part in parts)


def _models(root: type[BaseModel], prefix: str) -> list[tuple[str, type[BaseModel], str]]:
    """(key path, model, what it is) for `root` and every model nested in it, depth first."""
    found = [(prefix, root, root.__doc__ or "")]
    for name, info in root.model_fields.items():
        for tp in _flatten(info.annotation):
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                is_list = typing.get_origin(info.annotation) is list
                key = f"{prefix}.{name}" if prefix else name
                found += [(k, m, info.description if m is tp else d)
                          for k, m, d in _models(tp, key + ("[]" if is_list else ""))]
    return found


def _flatten(tp: Any) -> list[Any]:
    args = typing.get_args(tp)
    return [x for a in args for x in _flatten(a)] if args else [tp]


def model_reference(root: type[BaseModel], prefix: str, level: str) -> str:
    models = _models(root, prefix)
    anchors = {m: re.sub(r"[^a-z0-9]+", "-", k.lower()).strip("-") or "top" for k, m, _ in models}
    lines = []
    for key, model, what in models:
        lines += [f"{level} `{key or 'top level'}` {{#{anchors[model]}}}", "", _cell(what), "",
                  "| key | type | default | limits | description |", "| --- | --- | --- | --- | --- |"]
        for name, info in model.model_fields.items():
            lines.append(f"| `{name}` | {_type(info.annotation, anchors)} | {_default(info)} | "
                         f"{_limits(info)} | {_cell(info.description)} |")
        lines.append("")
    return "\n".join(lines)


def configuration_page() -> str:
    from polytask.config import ExperimentConfig
    from polytask.serve.args import ServeArgs

    return "\n".join([
        "# Configuration reference", "",
        ("Generated from the pydantic models at build time: `polytask.config.ExperimentConfig` "
        "(the experiment YAML) and `polytask.serve.args.ServeArgs` (the `args:` of a Serve "
        "config). Unknown keys are rejected; `--set a.b=c` overrides any experiment key "
        "(tasks by name: `--set tasks.ner.weight=2`)."), "",
        "## Experiment file", "",
        model_reference(ExperimentConfig, "", "###"),
        "## Serve application args", "",
        model_reference(ServeArgs, "args", "###"),
        deployments_reference(),
    ])


def _first_sentence(text: str | None) -> str:
    text = " ".join((text or "").split())
    return text.split(". ")[0].rstrip(".") + "." if text else ""


def deployments_reference() -> str:
    """The `deployments:` entries of a Serve config: the names polytask builds, Ray Serve's own
    options (its schema's descriptions), what polytask's code sets, and the shipped configs."""
    from ray.serve.schema import DeploymentSchema

    from polytask.serve import app

    by_code = {
        "max_ongoing_requests": ", ".join(f"{k} {v}" for k, v in app.MAX_ONGOING.items()),
        **{k: f"every deployment: {v:g}" for k, v in app.HEALTH_CHECK.items()},
        "backpressure_config": f"Ingress: `{json.dumps(app.SHED)}`",
        **{k: f"Ingress and heads: {v}" for k, v in app.CPU_SURGE.items()},
        "ray_actor_options": f"CPUs per replica: Encoder 1, Ingress and heads {app.LIGHT_CPUS:g}; "
        "the Encoder a GPU with `device: cuda`",
    }
    rows = [f"| `{name}` | {_cell(_first_sentence(info.description))} | {by_code.get(name, '')} |"
            for name, info in DeploymentSchema.model_fields.items() if name != "name"]
    shipped = ["| config | deployment | replicas | `max_ongoing_requests` | `ray_actor_options` |",
               "| --- | --- | --- | --- | --- |"]
    for which in ("local", "cluster"):
        cfg = values.serve_config(which)
        entries = {**cfg["deployments"], "every head (`args.head_options`)": cfg["args"]["head_options"],
                   "generation heads (`args.generation_head_options`)":
                       cfg["args"].get("generation_head_options", {})}
        for name, entry in entries.items():
            scale = entry.get("autoscaling_config")
            replicas = (f"{scale['min_replicas']}–{scale['max_replicas']} (autoscaled)" if scale
                        else str(entry.get("num_replicas", "")))
            actor = json.dumps(entry.get("ray_actor_options", {})).replace('"', "")
            shipped.append(f"| `{which}.yaml` | {name} | {replicas} | "
                           f"{entry.get('max_ongoing_requests', '')} | `{actor}` |")
    example = """```yaml
deployments:
  - name: Encoder
    num_replicas: 2
    ray_actor_options: {num_cpus: 2}
  - name: head_ner
    autoscaling_config: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 1}
```"""
    return "\n".join([
        "## Serve deployments {#serve-deployments}", "",
        ("The `deployments:` list of the polytask application in a Serve config sets Ray Serve's "
         "options per deployment: `Ingress`, `Encoder` and `head_<task>` for each task whose head "
         "is placed `separate`. Options apply in this order, each replacing what came before: "
         "polytask's code, then `args.head_options` (every head), then "
         "`args.generation_head_options` (heads of generation tasks), then the deployment's own "
         "entry; `num_replicas` in an entry replaces an `autoscaling_config` set before it, and "
         "the other way round. Any other name is refused at deploy time, listing the names "
         "there are. How to size them: [Serving → Scale each deployment]"
         "(../serving.md#scale-each-deployment)."), "",
        example, "",
        "| option | what it does (Ray Serve) | set by polytask's code |", "| --- | --- | --- |",
        *rows, "",
        "What the shipped configs (`serve_configs/`) set:", "",
        *shipped, "",
    ])


# --- CLI reference -----------------------------------------------------------------------------


def cli_page() -> str:
    import typer
    import typer.main
    from typer.cli import get_docs_for_click

    from polytask.cli import app

    command = typer.main.get_command(app)
    ctx = typer.Context(command, info_name="polytask")
    text = get_docs_for_click(obj=command, ctx=ctx, name="polytask", title="CLI reference")
    intro = ("Generated from the typer app `polytask.cli` at build time; "
             "`polytask COMMAND --help` prints the same.\n\n")
    head, _, rest = text.partition("\n\n")
    return f"{head}\n\n{intro}{rest}"


# --- HTTP API reference ------------------------------------------------------------------------


class DocsStandIn:
    """Docs-only stand-in for the Ingress replica: create_api reads the serve defaults from it to
    build its routes; nothing here ever answers a request."""

    specs: typing.ClassVar[dict[str, Any]] = {}
    api_key = None
    encoder = None
    metrics = None

    def __init__(self) -> None:
        from polytask.serve.args import ServeArgs

        args = ServeArgs(model="docs-stand-in")
        self.args = args
        self.settings = SimpleNamespace(**{**args.model_dump(), "max_body_bytes": args.body_limit})

    async def run(self, *_: Any) -> Any:
        raise RuntimeError("docs stand-in: no model")

    def model_info(self, *_: Any) -> dict[str, Any]:
        raise RuntimeError("docs stand-in: no model")


def openapi_schema() -> dict[str, Any]:
    from polytask.serve.http import create_api

    return create_api(DocsStandIn()).openapi()


def _schema_type(s: dict[str, Any]) -> str:
    if "$ref" in s:
        name = s["$ref"].rsplit("/", 1)[1]
        return f"[{name}](#{name.lower()})"
    for key in ("anyOf", "oneOf"):
        if key in s:
            return " \\| ".join(_schema_type(x) for x in s[key])
    if s.get("type") == "array":
        return f"list[{_schema_type(s.get('items', {}))}]"
    if s.get("type") == "object":
        extra = s.get("additionalProperties")
        return f"dict[str, {_schema_type(extra)}]" if isinstance(extra, dict) else "object"
    if "enum" in s:
        return " \\| ".join(f"`{v}`" for v in s["enum"])
    return s.get("type", "any")


_MODEL = {"uri": "models:/polytask-demo@champion", "ref": "models:/polytask-demo/1",
          "variant": "fp32", "fingerprint": "3f2a9c0d51e7b846"}
_SENTIMENT = {"label": "positive", "score": 0.93, "probabilities": {"negative": 0.07, "positive": 0.93}}
_NER = {"entities": [{"type": "person", "text": "alice smith", "start": 0, "end": 11, "score": 0.97}]}
# One call and its answer per route, for a model with a `sentiment` and an `ner` task (the
# quickstart's); tests/test_docs_examples.py checks each against the route's models.
ROUTE_EXAMPLES: dict[tuple[str, str], tuple[str, str, Any]] = {
    ("get", "/healthz"): ("curl -s http://127.0.0.1:8000/healthz", "json", {"status": "ok"}),
    ("get", "/v1/tasks"): ("curl -s http://127.0.0.1:8000/v1/tasks", "json", {
        "tasks": [{"name": "sentiment", "kind": "classification", "labels": ["negative", "positive"],
                   "pair": False},
                  {"name": "ner", "kind": "token_classification",
                   "labels": ["O", "B-person", "I-person"], "pair": False}],
        "model": _MODEL}),
    ("post", "/v1/predict"): (
        ("curl -s http://127.0.0.1:8000/v1/predict -H 'content-type: application/json' \\\n"
         "  -d '{\"inputs\": [\"alice smith loved it\"], \"tasks\": [\"sentiment\", \"ner\"]}'"),
        "json", {"results": [{"sentiment": _SENTIMENT, "ner": _NER}], "model": _MODEL}),
    ("post", "/v1/tasks/{task}/predict"): (
        ("curl -s http://127.0.0.1:8000/v1/tasks/ner/predict -H 'content-type: application/json' \\\n"
         "  -d '{\"inputs\": [\"alice smith loved it\"]}'"),
        "json", {"task": "ner", "results": [_NER], "model": _MODEL}),
    ("post", "/v1/tasks/{task}/generate/stream"): (
        ("curl -N http://127.0.0.1:8000/v1/tasks/entities/generate/stream "
         "-H 'content-type: application/json' \\\n  -d '{\"input\": \"alice flew to paris\"}'"),
        "text", ("event: token\ndata: {\"id\": 6584, \"text\": \"alice\"}\n\n"
                 "event: done\ndata: {\"task\": \"entities\", \"result\": {\"text\": \"alice ; paris\"}, "
                 "\"tokens\": 3, \"model\": " + json.dumps(_MODEL) + "}")),
}


def _route_example(method: str, path: str) -> list[str]:
    if (method, path) not in ROUTE_EXAMPLES:
        raise PluginError(f"HTTP API: no example for {method.upper()} {path}; add one to "
                          "docs/hooks.py ROUTE_EXAMPLES")
    call, lang, answer = ROUTE_EXAMPLES[(method, path)]
    shown = answer if isinstance(answer, str) else (
        "{" + ",\n ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in answer.items()) + "}")
    return ["Example:", "", "```bash", call, "```", "", f"```{lang}", shown, "```", ""]


def error_table() -> list[str]:
    """Every error code, its status, when it is answered and the routes that can answer it, from
    the catalogue the routes document their responses with (polytask.serve.errors)."""
    from polytask.serve import errors

    lines = ["## Error codes", "",
             ("Every refusal is an [ErrorResponse](#errorresponse), "
              "`{\"error\": {\"code\": ..., \"message\": ...}}`, whose message says what to "
              "change. The codes, from `polytask.serve.errors`, in the order a request meets "
              "them; each route above lists only its own ([Troubleshooting](../troubleshooting.md) "
              "has the fixes):"), "",
             "| code | status | when | routes |", "| --- | --- | --- | --- |"]
    for step, codes in errors.STEPS.items():
        routes = ", ".join(f"`{m.upper()} {p}`" for (m, p), steps in errors.ROUTE_STEPS.items()
                           if step in steps)
        lines += [f"| `{code}` | {err.status} | {_cell(err.when)} | {routes} |"
                  for code, err in codes.items()]
    lines += [f"| `{code}` | {err.status} | {_cell(err.when)} | any path |"
              for code, err in errors.NO_ROUTE.items()]
    return [*lines, ""]


def http_page() -> str:
    spec = openapi_schema()
    lines = ["# HTTP API reference", "",
             ("Generated at build time from the OpenAPI schema of the FastAPI app that "
             "`polytask.serve.http.create_api` builds (a running app serves the same at `/docs` "
             "and `/openapi.json`). Every error body is an [ErrorResponse](#errorresponse); its codes: "
             "[Error codes](#error-codes)."), "",
             _cell(spec["info"].get("description")), "", "## Routes", ""]
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            lines += [f"### `{method.upper()} {path}`", ""]
            for key in ("summary", "description"):
                lines += [_cell(op[key]), ""] if op.get(key) else []
            for param in op.get("parameters", []):
                lines.append(f"- {param['in']} parameter `{param['name']}`: "
                             f"{_schema_type(param.get('schema', {}))}")
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            if body:
                lines.append(f"- request body: {_schema_type(body['schema'])}")
            lines += [""] + _route_example(method, path)
            lines += ["", "| status | meaning | body |", "| --- | --- | --- |"]
            for status, resp in op["responses"].items():
                schema = resp.get("content", {}).get("application/json", {}).get("schema", {})
                lines.append(f"| {status} | {_cell(resp.get('description'))} | "
                             f"{_schema_type(schema) if schema else ''} |")
            lines.append("")
    lines += error_table()
    lines += ["## Schemas", ""]
    for name, schema in sorted(spec["components"]["schemas"].items()):
        lines += [f"### {name}", "", _cell(schema.get("description")), ""]
        props = schema.get("properties", {})
        if props:
            required = set(schema.get("required", []))
            lines += ["| field | type | required | description |", "| --- | --- | --- | --- |"]
            lines += [f"| `{k}` | {_schema_type(v)} | {'yes' if k in required else ''} | "
                      f"{_cell(v.get('description'))} |" for k, v in props.items()]
            lines.append("")
    return "\n".join(lines)
