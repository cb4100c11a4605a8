"""`polytask train`: joint multi-task training on Ray Train (V2), tracked in MLflow, registered
in the Model Registry.

The driver checks data and tokenizes once (bad data fails before Ray starts), owns the one MLflow
run per run name, and after the workers finish (`polytask.training.ray_run`, which runs
`loop.fit`) picks the best checkpoint, registers its bundle and scores it on the held-back test
split when `data.test` is given.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from polytask.config import ExperimentConfig
from polytask.tracking.places import artifact_place, check_paths, describe, shown_path
from polytask.tracking.registry import (
    client,
    log_bundle,
    register_bundle,
    tracking_uri,
    ui_command,
)
from polytask.tracking.runs import find_or_create_run
from polytask.tracking.tags import (
    ADDED_TASKS_TAG,
    ADDED_TO_VERSION_TAG,
    MODEL_ALIASES_TAG,
    MODEL_CHECKPOINT_TAG,
    MODEL_URI_TAG,
    MODEL_VERSION_TAG,
)
from polytask.training.base import BaseModel, resolve_base
from polytask.training.features import Features, tokenize_experiment
from polytask.training.ray_run import fit_on_ray, local_bundle, storage_path

TEST_PREFIX = "test/"  # MLflow metric names of the test split: test/<task>/<metric>


@dataclass
class TrainResult:
    """What a finished run produced and where it lives."""

    run_id: str
    run_name: str
    bundle_path: str | None
    checkpoint_path: str | None
    metrics: dict[str, dict[str, float]]
    objective: float
    model_version: int | None
    aliases: list[str]
    best_epoch: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    tracking_uri: str = ""
    storage_path: str = ""
    model_uri: str | None = None
    test_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    promotion: str | None = None  # why the new version did or did not become champion

    def summary(self) -> dict[str, Any]:
        """JSON-ready digest (the CLI prints it); the full history stays in MLflow."""
        data = asdict(self)
        data.pop("history")
        for key in ("bundle_path", "checkpoint_path", "storage_path"):  # never a job's temp copy
            data[key] = shown_path(data[key])
        data["epochs"] = len(self.history)
        data["mlflow_ui"] = ui_command(self.tracking_uri)
        return json.loads(json.dumps(data, default=str))


# --- driver ------------------------------------------------------------------------------------


def run_training(
    cfg: ExperimentConfig, run_name: str | None = None, console: Console | None = None
) -> TrainResult:
    """Train, checkpoint, log and register; relaunching the same run name resumes it."""
    console = console or Console()
    name = run_name or cfg.run.name or default_run_name(cfg)
    uri, storage = tracking_uri(cfg), storage_path(cfg)
    places = check_paths(uri, f"{storage}/{name}")  # refused in a Ray job's temporary copy
    cfg, base = resolve_base(cfg)  # a polytask model as encoder: pinned, its heads carried over
    features = tokenize_experiment(cfg)  # DataError propagates unchanged, before any Ray worker
    # after the data checks (a bad input prints its error alone), before any state is written
    console.print(f"[bold]state[/] of run {name}\n{describe(places)}", highlight=False, soft_wrap=True)
    run_id = find_or_create_run(cfg, name, uri)
    console.print(
        f"[bold]run[/] {name}: {cfg.scaling.num_workers} worker(s), "
        f"tasks {', '.join(cfg.task_names)}\n{describe([artifact_place(uri, cfg.tracking.experiment)])}"
        f"\n  mlflow run: {run_id}",
        highlight=False,
        soft_wrap=True,
    )
    try:
        with system_metrics(cfg, run_id, uri):
            result = fit_on_ray(cfg, name, run_id, uri, storage, features, console)
        out = _finish(cfg, name, run_id, uri, storage, result, base)
        if features.test and out.bundle_path:
            out.test_metrics = evaluate_test_split(cfg, out, features)
    except BaseException:
        client(uri).set_terminated(run_id, "FAILED")
        raise
    client(uri).set_terminated(run_id, "FINISHED")
    print_report(out, cfg, console)
    return out


@contextlib.contextmanager
def system_metrics(cfg: ExperimentConfig, run_id: str, uri: str) -> Iterator[None]:
    """MLflow's own system-metrics monitor on the run while the workers train, when
    `tracking.system_metrics` (or, when that is unset, MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING)
    asks for it; it samples the driver's machine (`system/...` metrics)."""
    from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING

    wanted = cfg.tracking.system_metrics
    if not (MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.get() if wanted is None else wanted):
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, resume_logging=True, tracking_uri=uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def default_run_name(cfg: ExperimentConfig) -> str:
    return f"{cfg.tracking.experiment}-{datetime.now():%Y%m%d-%H%M%S}"


def _finish(
    cfg: ExperimentConfig,
    name: str,
    run_id: str,
    uri: str,
    storage: str,
    result: Any,
    base: BaseModel | None = None,
) -> TrainResult:
    """Pick the best checkpoint and log + register its bundle, once per distinct checkpoint
    (a relaunch whose best checkpoint did not change reuses the earlier model version)."""
    best = _best(result)
    history = list(result.return_value or [])
    if not history and result.metrics_dataframe is not None:
        history = result.metrics_dataframe.to_dict(orient="records")
    out = TrainResult(
        run_id=run_id,
        run_name=name,
        bundle_path=None,
        checkpoint_path=None,
        metrics={},
        objective=float("nan"),
        model_version=None,
        aliases=[],
        history=history,
        tracking_uri=uri,
        storage_path=f"{storage}/{name}",
    )
    if best is None:
        return out
    checkpoint, metrics = best
    out.checkpoint_path = checkpoint.path
    out.bundle_path = str(local_bundle(checkpoint, f"runs/{name}"))
    out.metrics = task_metrics(metrics, cfg.task_names)
    out.objective = float(metrics["objective"])
    out.best_epoch = int(metrics["epoch"])
    c = client(uri)
    tags = c.get_run(run_id).data.tags
    if tags.get(MODEL_CHECKPOINT_TAG) == checkpoint.path:  # relaunch with nothing new to train
        out.model_version = int(tags[MODEL_VERSION_TAG]) if tags.get(MODEL_VERSION_TAG) else None
        out.aliases = [a for a in tags.get(MODEL_ALIASES_TAG, "").split(",") if a]
        out.model_uri = tags.get(MODEL_URI_TAG)
        return out
    if cfg.tracking.registered_model:
        reg = register_bundle(
            out.bundle_path,
            cfg.tracking.registered_model,
            run_id,
            out.objective,
            cfg.tracking.promote,
            uri=uri,
            extra_tags=added_task_tags(cfg, base),
        )
        out.model_version, out.aliases, out.model_uri, out.promotion = (
            reg["version"],
            reg["aliases"],
            reg["model_uri"],
            reg["promotion"],
        )
    else:
        out.model_uri = log_bundle(out.bundle_path, run_id, uri)
    from mlflow.entities import RunTag

    tags = {
        MODEL_CHECKPOINT_TAG: checkpoint.path,
        MODEL_VERSION_TAG: str(out.model_version or ""),
        MODEL_ALIASES_TAG: ",".join(out.aliases),
        MODEL_URI_TAG: out.model_uri or "",
    }
    c.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    return out


def added_task_tags(cfg: ExperimentConfig, base: BaseModel | None) -> dict[str, str]:
    """Version tags of a model made by adding tasks to `base`: where it came from, what it added."""
    if base is None:
        return {}
    return {
        ADDED_TO_VERSION_TAG: base.ref if base.version is None else str(base.version),
        ADDED_TASKS_TAG: ",".join(sorted(cfg.task_names)),
    }


def _best(result: Any) -> tuple[Any, dict[str, Any]] | None:
    scored = [(ckpt, m) for ckpt, m in (result.best_checkpoints or []) if "objective" in m]
    finite = [(c, m) for c, m in scored if not math.isnan(float(m["objective"]))]
    pool = finite or scored
    return max(pool, key=lambda cm: (float(cm[1]["objective"]), cm[1]["epoch"])) if pool else None


def evaluate_test_split(cfg: ExperimentConfig, out: TrainResult, features: Features) -> dict[str, dict[str, float]]:
    """Score the best checkpoint's bundle once on the held-back test split, on the driver, and log
    it to the run as `test/<task>/<metric>` (step: the best epoch)."""
    from mlflow.entities import Metric

    from polytask.model.bundle import load_bundle
    from polytask.training.loop import evaluate

    model, tokenizer, _ = load_bundle(out.bundle_path)
    metrics = evaluate(model, features.test, cfg.optim.eval_batch_size, tokenizer.pad_token_id)
    now, step = int(time.time() * 1000), out.best_epoch or 0
    batch = [
        Metric(f"{TEST_PREFIX}{task}/{key}", float(value), now, step)
        for task, values in metrics.items()
        for key, value in values.items()
        if isinstance(value, (int, float))
    ]
    client(out.tracking_uri).log_batch(out.run_id, metrics=batch)
    return metrics


def task_metrics(flat: dict[str, Any], tasks: list[str]) -> dict[str, dict[str, float]]:
    """{'ner/f1': .5, 'train_loss/ner': 1.2} → {'ner': {'f1': .5}} (evaluation metrics only)."""
    out: dict[str, dict[str, float]] = {}
    for key, value in flat.items():
        task, _, metric = key.partition("/")
        if task in tasks and metric:
            out.setdefault(task, {})[metric] = float(value)
    return out


def print_report(out: TrainResult, cfg: ExperimentConfig, console: Console) -> None:
    """Per-epoch table of each task's primary metric, then where everything ended up."""
    primary = {t.name: t.metric for t in cfg.tasks}
    table = Table(title=f"run {out.run_name}")
    table.add_column("epoch", justify="right")
    for task, metric in primary.items():
        table.add_column(f"{task}/{metric}", justify="right")
    table.add_column("train loss", justify="right")
    table.add_column("objective", justify="right")
    for row in out.history:
        losses = [v for k, v in row.items() if k.startswith("train_loss/")]
        mark = " ★" if row.get("epoch") == out.best_epoch else ""
        table.add_row(
            str(row.get("epoch")),
            *[_fmt(row.get(f"{t}/{m}")) for t, m in primary.items()],
            _fmt(sum(losses) / len(losses) if losses else None),
            _fmt(row.get("objective")) + mark,
        )
    console.print(table)
    model = (
        f"{cfg.tracking.registered_model} v{out.model_version} "
        f"({', '.join(out.aliases) or 'no alias'})"
        if out.model_version
        else (out.model_uri or "not logged")
    )
    test = "  ".join(
        f"{task}/{metric} {_fmt(out.test_metrics[task].get(metric))}"
        for task, metric in primary.items()
        if task in out.test_metrics
    )
    console.print(
        f"[bold]best epoch[/] {out.best_epoch}  objective {_fmt(out.objective)}\n"
        + (f"[bold]test[/]       {test} (best epoch's model on data.test)\n" if test else "")
        + f"[bold]checkpoint[/] {out.checkpoint_path}\n"
        f"[bold]bundle[/]     {out.bundle_path}\n"
        f"[bold]model[/]      {model}\n"
        f"[bold]mlflow[/]     run {out.run_id}; view with: {ui_command(out.tracking_uri)}",
        highlight=False,
        soft_wrap=True,
    )


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{float(value):.4f}"
