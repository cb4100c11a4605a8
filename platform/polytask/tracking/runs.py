"""The MLflow run of a training run: one per run name (a relaunch reopens it), the resolved
config as its params, and the metric logging the training driver does into it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any

from polytask.config import ExperimentConfig
from polytask.tracking.registry import client, ensure_experiment
from polytask.tracking.tags import RUN_NAME_TAG


def flatten_config(cfg: ExperimentConfig) -> dict[str, str]:
    """The resolved config as MLflow params: `optim.lr`, `tasks.ner.weight`, … (tasks by name)."""
    data = cfg.model_dump(mode="json")
    data["tasks"] = {t.pop("name"): t for t in data["tasks"]}
    out: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            text = json.dumps(node) if isinstance(node, (list, dict)) else str(node)
            out[prefix] = text[:500]

    walk("", data)
    return out


def find_run(cfg: ExperimentConfig, name: str, uri: str) -> Any:
    """The MLflow run tagged with this run name in the experiment, or None."""
    c = client(uri)
    experiment_id = ensure_experiment(c, cfg.tracking.experiment, uri)
    quoted = name.replace("'", "\\'")
    found = c.search_runs([experiment_id], f"tags.`{RUN_NAME_TAG}` = '{quoted}'", max_results=1)
    return found[0] if found else None


def find_or_create_run(cfg: ExperimentConfig, name: str, uri: str) -> str:
    """The MLflow run tagged with this run name (reopened), or a new one; params logged once.

    Params are immutable in MLflow, so values changed on a relaunch are kept as tags."""
    from mlflow.entities import Param, RunTag

    c = client(uri)
    found = find_run(cfg, name, uri)
    if found is not None:
        run_id = found.info.run_id
        c.update_run(run_id, status="RUNNING")
        existing = found.data.params
    else:
        experiment_id = ensure_experiment(c, cfg.tracking.experiment, uri)
        run = c.create_run(experiment_id, run_name=name, tags={RUN_NAME_TAG: name})
        run_id, existing = run.info.run_id, {}
    params = flatten_config(cfg)
    new = [Param(k, v) for k, v in params.items() if k not in existing]
    changed = [
        RunTag(f"relaunch.{k}", v) for k, v in params.items() if k in existing and existing[k] != v
    ]
    for start in range(0, max(len(new), len(changed)), 100):
        c.log_batch(run_id, params=new[start : start + 100], tags=changed[start : start + 100])
    return run_id


def log_metrics(uri: str, run_id: str, points: Iterable[tuple[str, float, int]]) -> None:
    """(key, value, step) triples logged to the run in one call, stamped now."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(key, float(value), now, step) for key, value, step in points]
    client(uri).log_batch(run_id, metrics=batch)


def metrics_logger(uri: str, run_id: str) -> Callable[[Iterable[tuple[str, float, int]]], None]:
    """`log_metrics` for points that come while the run trains (progress): a tracking outage
    costs the points, never the run, and is reported once."""
    warned = False

    def log(points: Iterable[tuple[str, float, int]]) -> None:
        nonlocal warned
        try:
            log_metrics(uri, run_id, points)
        except Exception as exc:  # noqa: BLE001
            if not warned:
                print(f"warning: MLflow progress logging failed: {exc}")
                warned = True

    return log


def epoch_metrics(record: dict[str, Any]) -> list[tuple[str, float, int]]:
    """An epoch's reported record as metric points at step `epoch` (numbers only)."""
    step = int(record["epoch"])
    return [
        (key, value, step)
        for key, value in record.items()
        if key != "epoch" and isinstance(value, (int, float))
    ]
