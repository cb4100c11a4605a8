"""Ray Tune sweeps over task weights and hyperparameters; the best trial's bundle is registered.

Train V2 pattern: each trial is a function that builds and fits its own TorchTrainer (from
`ray_run`, the same workers and `loop.fit` as `polytask train`); the workers' `ray.train.report`
reaches Tune through `TuneReportCallback`, so ASHA sees every epoch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from polytask.config import ExperimentConfig, default_home
from polytask.tasks import LOWER_IS_BETTER, TaskSpec
from polytask.tracking.places import artifact_place, check_paths, describe, shown_path
from polytask.tracking.registry import client, register_bundle, tracking_uri
from polytask.tracking.runs import find_or_create_run, find_run
from polytask.tracking.tags import BEST_TRIAL_TAG, PARENT_TAG, SWEEP_TAG, TRIAL_PARAM_PREFIX
from polytask.training import ray_run
from polytask.training.features import tokenize_experiment
from polytask.training.searchspace import apply_trial, parse_search_space, to_tune


@dataclass
class SweepResult:
    """Trials best first, the Pareto set, and what was registered."""

    name: str
    parent_run_id: str
    trials: list[dict[str, Any]]
    pareto: list[str]
    best: dict[str, Any] | None
    model_version: int | None = None
    aliases: list[str] = field(default_factory=list)
    plot: str | None = None


def run_sweep(cfg: ExperimentConfig, console: Console | None = None) -> SweepResult:
    """Validate the space and data, run (or resume) the sweep, register the best trial."""
    import ray
    from ray import tune

    console = console or Console()
    assert cfg.tune is not None, "run_sweep needs a `tune` section"
    dims = parse_search_space(cfg)  # a bad space fails here, before Ray starts
    name = cfg.tune.name or f"{cfg.tracking.experiment}-sweep"
    uri, storage = tracking_uri(cfg), ray_run.storage_path(cfg)
    places = check_paths(uri, os.path.join(storage, name))  # refused in a Ray job's temporary copy
    console.print(f"[bold]state[/] of sweep {name}\n{describe(places)}", highlight=False, soft_wrap=True)
    features = tokenize_experiment(cfg)
    parent = find_or_create_run(cfg, name, uri)
    client(uri).set_tag(parent, SWEEP_TAG, name)
    console.print(
        f"{describe([artifact_place(uri, cfg.tracking.experiment)])}\n  mlflow run: {parent}",
        highlight=False,
        soft_wrap=True,
    )
    if not ray.is_initialized():
        ray.init()
    trainable = partial(  # object refs ride along as-is; every trial shares one tokenized copy
        _trial,
        base=cfg.model_dump(mode="json"),
        specs=[s.to_dict() for s in features.specs],
        parent_run_id=parent,
        uri=uri,
        sweep=name,
        storage=storage,
        refs=[ray.put(features.train), ray.put(features.validation)],
        streamed_rows=features.streamed_rows,
        datasets=features.train_datasets(cfg),  # lazy; each trial's TorchTrainer streams its own
    )
    trainable = tune.with_resources(trainable, {"CPU": 0.01})
    path = os.path.join(storage, name)
    if tune.Tuner.can_restore(path):
        console.print(f"[bold]resuming sweep[/] {name} from {path}")
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=to_tune(dims),
            tune_config=_tune_config(cfg),
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1),
        )
    grid = tuner.fit()
    result = _summarize(cfg, name, parent, uri, features.specs, grid)
    _register_best(cfg, result, uri)
    result.plot = _plot(result, cfg, uri)
    client(uri).set_terminated(parent, "FINISHED")
    print_sweep(result, cfg, console)
    return result


def _tune_config(cfg: ExperimentConfig) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    t = cfg.tune
    search_alg = None
    if t.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=cfg.optim.seed)
    scheduler = None
    if t.scheduler == "asha":
        scheduler = ASHAScheduler(  # max_t past the last epoch: finished trials end by returning
            time_attr="training_iteration",  # (a Tune stop kills the trial's Train controller)
            max_t=cfg.optim.epochs + 1,
            grace_period=min(t.grace_period, cfg.optim.epochs),
            reduction_factor=t.reduction_factor,
        )
    return tune.TuneConfig(
        metric="objective",
        mode="max",
        num_samples=1 if t.search_alg == "grid" else t.num_samples,
        max_concurrent_trials=t.max_concurrent_trials,
        search_alg=search_alg,
        scheduler=scheduler,
    )


def _trial(params: dict[str, Any], *, base: dict[str, Any], specs: list[dict[str, Any]],
           parent_run_id: str, uri: str, sweep: str, storage: str, refs: list[Any],
           streamed_rows: dict[str, int], datasets: dict[str, Any]) -> None:
    """One trial = one TorchTrainer run with its own config, scaling and nested MLflow run."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = apply_trial(ExperimentConfig.model_validate(base), params)
    trial_id = tune.get_context().get_trial_id()
    run_name = f"{sweep}-{trial_id}"
    run_id = find_or_create_run(cfg, run_name, uri)
    c = client(uri)
    c.set_tag(run_id, PARENT_TAG, parent_run_id)
    c.set_tag(run_id, SWEEP_TAG, sweep)
    for key, value in params.items():
        c.set_tag(run_id, f"{TRIAL_PARAM_PREFIX}{key}", str(value))
    loop_config = ray_run.make_loop_config(
        cfg, [TaskSpec.from_dict(s) for s in specs], refs[0], refs[1], run_id, uri, run_name,
        streamed_rows=streamed_rows,
    )
    trainer = ray_run.make_trainer(
        cfg, f"{sweep}-trials/{trial_id}", loop_config, storage, callbacks=[TuneReportCallback()],
        datasets=datasets,
    )
    try:
        trainer.fit()
    finally:
        c.set_terminated(run_id, "FINISHED")


def _summarize(cfg: ExperimentConfig, name: str, parent: str, uri: str, specs: list[TaskSpec], grid: Any) -> SweepResult:
    trials = []
    for res in grid:
        df = res.metrics_dataframe
        rows = df.to_dict(orient="records") if df is not None and len(df) else []
        scored = [r for r in rows if _finite(r.get("objective"))]
        best_row = max(scored, key=lambda r: r["objective"]) if scored else {}
        trial_id = (res.metrics or {}).get("trial_id") or Path(res.path).name
        trials.append(
            {
                "trial": trial_id,
                "status": "ERROR" if res.error else ("STOPPED" if len(rows) < cfg.optim.epochs else "DONE"),
                "epochs": len(rows),
                "objective": best_row.get("objective", float("nan")),
                "params": {k.removeprefix("config/"): v for k, v in (res.config or {}).items()},
                "metrics": {s.name: {k.split("/", 1)[1]: v for k, v in best_row.items()
                                     if k.startswith(f"{s.name}/")} for s in specs},
                "checkpoint": best_row.get("checkpoint_path"),
                "run_name": f"{name}-{trial_id}",
            }
        )
    trials.sort(key=lambda t: -t["objective"] if _finite(t["objective"]) else math.inf)
    best = trials[0] if trials and _finite(trials[0]["objective"]) else None
    return SweepResult(name, parent, trials, _pareto(trials, specs), best)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _pareto(trials: list[dict[str, Any]], specs: list[TaskSpec]) -> list[str]:
    """Trials no other trial beats on every task's primary metric at once."""

    def score(t: dict[str, Any]) -> list[float]:
        out = []
        for s in specs:
            metric = s.metric or s.task_kind.primary_metric
            v = t["metrics"].get(s.name, {}).get(metric, float("nan"))
            out.append(-v if metric in LOWER_IS_BETTER else v)
        return out

    scored = [(t["trial"], score(t)) for t in trials if all(_finite(v) for v in score(t))]
    front = []
    for tid, s in scored:
        dominated = any(
            all(o >= m for o, m in zip(other, s)) and any(o > m for o, m in zip(other, s))
            for _, other in scored
        )
        if not dominated:
            front.append(tid)
    return front


def _register_best(cfg: ExperimentConfig, result: SweepResult, uri: str) -> None:
    """Best trial's best checkpoint → a model version with alias `candidate` (maybe `champion`)."""
    best = result.best
    if best is None or not best["checkpoint"] or not cfg.tracking.registered_model:
        return
    run = find_run(cfg, best["run_name"], uri)
    bundle = ray_run.local_bundle(best["checkpoint"], f"sweeps/{result.name}")
    reg = register_bundle(
        str(bundle),
        cfg.tracking.registered_model,
        run.info.run_id if run is not None else result.parent_run_id,
        float(best["objective"]),
        cfg.tracking.promote,
        uri=uri,
    )
    result.model_version, result.aliases = reg["version"], reg["aliases"]
    client(uri).set_tag(result.parent_run_id, BEST_TRIAL_TAG, best["trial"])


def _plot(result: SweepResult, cfg: ExperimentConfig, uri: str) -> str | None:
    """PNG on the parent run: objective vs each swept numeric param, and per-task metrics per trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [t for t in result.trials if _finite(t["objective"])]
    if not done:
        return None
    keys = sorted({k for t in done for k, v in t["params"].items() if isinstance(v, (int, float))})
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(4 * (len(keys) + 1), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.scatter([t["params"][key] for t in done], [t["objective"] for t in done])
        ax.set_xlabel(key)
        ax.set_ylabel("objective")
        if "lr" in key or "weight" in key:
            ax.set_xscale("log")
    ax = axes[0][-1]
    for task in cfg.task_names:
        metric = cfg.task(task).metric
        ax.plot(range(len(done)), [t["metrics"].get(task, {}).get(metric, float("nan")) for t in done],
                marker="o", label=f"{task}/{metric}")
    ax.set_xlabel("trial (best first)")
    ax.legend()
    fig.tight_layout()
    out = default_home() / "sweeps" / result.name / "sweep_summary.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    client(uri).log_artifact(result.parent_run_id, str(out))
    return str(out)


def print_sweep(result: SweepResult, cfg: ExperimentConfig, console: Console) -> None:
    keys = sorted({k for t in result.trials for k in t["params"]})
    table = Table(title=f"sweep {result.name} (best first; ◆ = Pareto-optimal)")
    for col in ["trial", "status", *keys, *[f"{t}/{cfg.task(t).metric}" for t in cfg.task_names], "objective"]:
        table.add_column(col)
    for t in result.trials:
        mark = " ◆" if t["trial"] in result.pareto else ""
        table.add_row(
            t["trial"] + mark,
            t["status"],
            *[_short(t["params"].get(k)) for k in keys],
            *[_short(t["metrics"].get(task, {}).get(cfg.task(task).metric)) for task in cfg.task_names],
            _short(t["objective"]),
        )
    console.print(table)
    if result.model_version:
        console.print(f"registered {cfg.tracking.registered_model} v{result.model_version} {result.aliases}")
    if result.plot:
        console.print(f"plot: {shown_path(result.plot) or 'on the sweep run (MLflow artifacts)'}")


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)
