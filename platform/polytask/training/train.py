"""Joint multi-task training on Ray Train (V2), tracked in MLflow, registered in the Model Registry.

The driver checks data and tokenizes once (bad data fails before Ray starts), hands features to
the workers through the object store, and owns the one MLflow run per run name. Workers run
`polytask.training.loop`; rank 0 evaluates, checkpoints (training state + a servable bundle) and logs.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from polytask.config import ExperimentConfig, default_home
from polytask.tasks import TaskSpec
from polytask.tracking.registry import (
    client,
    ensure_experiment,
    log_bundle,
    register_bundle,
    tracking_uri,
    ui_command,
)
from polytask.training.data import load_task_data

RUN_NAME_TAG = "polytask.run_name"
MODEL_CHECKPOINT_TAG = "polytask.model_checkpoint"
MODEL_VERSION_TAG = "polytask.model_version"
MODEL_ALIASES_TAG = "polytask.model_aliases"
MODEL_URI_TAG = "polytask.model_uri"
STATE_DIR, BUNDLE_DIR = "state", "bundle"


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

    def summary(self) -> dict[str, Any]:
        """JSON-ready digest (the CLI prints it); the full history stays in MLflow."""
        data = asdict(self)
        data.pop("history")
        data["epochs"] = len(self.history)
        data["mlflow_ui"] = ui_command(self.tracking_uri)
        return json.loads(json.dumps(data, default=str))


# --- driver ------------------------------------------------------------------------------------


def run_training(
    cfg: ExperimentConfig, run_name: str | None = None, console: Console | None = None
) -> TrainResult:
    """Train, checkpoint, log and register; relaunching the same run name resumes it."""
    console = console or Console()
    task_data = load_task_data(cfg)  # DataError propagates unchanged, before any Ray worker
    tokenizer = load_tokenizer(cfg)
    from polytask.training.loop import build_features

    train_features, eval_features = build_features(cfg, task_data, tokenizer)
    specs = [td.spec for td in task_data.values()]
    name = run_name or cfg.run.name or default_run_name(cfg)
    uri = tracking_uri(cfg)
    run_id = find_or_create_run(cfg, name, uri)
    storage = storage_path(cfg)
    console.print(
        f"[bold]run[/] {name}: {cfg.scaling.num_workers} worker(s), "
        f"tasks {', '.join(cfg.task_names)}"
        f"\n  checkpoints: {storage}/{name}\n  mlflow run:  {run_id} ({uri})",
        highlight=False,
        soft_wrap=True,
    )
    try:
        result = fit_on_ray(cfg, name, run_id, uri, storage, specs, train_features, eval_features)
        out = _finish(cfg, name, run_id, uri, storage, result)
    except BaseException:
        client(uri).set_terminated(run_id, "FAILED")
        raise
    client(uri).set_terminated(run_id, "FINISHED")
    print_report(out, cfg, console)
    return out


def load_tokenizer(cfg: ExperimentConfig) -> Any:
    """Only the tokenizer: the driver tokenizes once and never holds the encoder weights."""
    from transformers import AutoTokenizer

    from polytask.model.network import resolve_encoder_path

    tokenizer = AutoTokenizer.from_pretrained(
        resolve_encoder_path(cfg.encoder.name_or_path),
        revision=cfg.encoder.revision,
        trust_remote_code=cfg.encoder.trust_remote_code,
        use_fast=True,
    )
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"encoder.name_or_path '{cfg.encoder.name_or_path}' has no fast tokenizer; polytask "
            "aligns NER labels with fast tokenizers' word ids; pick one with tokenizer.json"
        )
    return tokenizer


def default_run_name(cfg: ExperimentConfig) -> str:
    return f"{cfg.tracking.experiment}-{datetime.now():%Y%m%d-%H%M%S}"


def storage_path(cfg: ExperimentConfig) -> str:
    """cfg.run.storage_path, else $POLYTASK_STORAGE_PATH, else <home>/ray_results (absolute)."""
    path = cfg.run.storage_path or os.environ.get("POLYTASK_STORAGE_PATH")
    if path and "://" in path:
        return path
    return str(Path(path).expanduser().resolve() if path else default_home() / "ray_results")


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


def find_or_create_run(cfg: ExperimentConfig, name: str, uri: str) -> str:
    """The MLflow run tagged with this run name (reopened), or a new one; params logged once.

    Params are immutable in MLflow, so values changed on a relaunch are kept as tags."""
    from mlflow.entities import Param, RunTag

    c = client(uri)
    experiment_id = ensure_experiment(c, cfg.tracking.experiment, uri)
    quoted = name.replace("'", "\\'")
    found = c.search_runs([experiment_id], f"tags.`{RUN_NAME_TAG}` = '{quoted}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        c.update_run(run_id, status="RUNNING")
        existing = found[0].data.params
    else:
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


def fit_on_ray(
    cfg: ExperimentConfig,
    name: str,
    run_id: str,
    uri: str,
    storage: str,
    specs: list[TaskSpec],
    train_features: dict[str, list],
    eval_features: dict[str, list],
) -> Any:
    """TorchTrainer.fit over pre-tokenized features (object store refs); returns Ray's Result.
    The same name + storage path resumes from that run's latest checkpoint."""
    import ray

    if not ray.is_initialized():
        ray.init()  # joins $RAY_ADDRESS when set, else starts a local Ray
    loop_config = make_loop_config(
        cfg, specs, ray.put(train_features), ray.put(eval_features), run_id, uri, name
    )
    if cfg.run.hold_at_epoch is not None and "://" not in storage:
        loop_config["pid_file"] = str(Path(storage) / name / "rank0.pid")
    return make_trainer(cfg, name, loop_config, storage).fit()


def make_loop_config(
    cfg: ExperimentConfig,
    specs: list[TaskSpec],
    train_ref: Any,
    eval_ref: Any,
    run_id: str,
    uri: str,
    run_name: str,
) -> dict[str, Any]:
    """What `train_loop_per_worker` reads: plain data plus object refs to the features."""
    return {
        "cfg": cfg.model_dump(mode="json"),
        "specs": [s.to_dict() for s in specs],
        "train_ref": train_ref,
        "eval_ref": eval_ref,
        "run_id": run_id,
        "tracking_uri": uri,
        "run_name": run_name,
    }


def make_trainer(
    cfg: ExperimentConfig,
    name: str,
    loop_config: dict[str, Any],
    storage: str,
    callbacks: list[Any] | None = None,
) -> Any:
    """The TorchTrainer for one run: scaling, checkpoints kept by objective, restarts."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=cfg.scaling.resources_per_worker or None,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.run.checkpoints_to_keep,
                checkpoint_score_attribute="objective",
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            callbacks=[
                mlflow_callback(loop_config["tracking_uri"], loop_config["run_id"]),
                *(callbacks or []),
            ],
        ),
    )


def _finish(
    cfg: ExperimentConfig, name: str, run_id: str, uri: str, storage: str, result: Any
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
    out.bundle_path = str(_local_bundle(checkpoint, name))
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
        )
        out.model_version, out.aliases, out.model_uri = (
            reg["version"],
            reg["aliases"],
            reg["model_uri"],
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


def _best(result: Any) -> tuple[Any, dict[str, Any]] | None:
    scored = [(ckpt, m) for ckpt, m in (result.best_checkpoints or []) if "objective" in m]
    finite = [(c, m) for c, m in scored if not math.isnan(float(m["objective"]))]
    pool = finite or scored
    return max(pool, key=lambda cm: (float(cm[1]["objective"]), cm[1]["epoch"])) if pool else None


def _local_bundle(checkpoint: Any, name: str) -> Path:
    """The best checkpoint's bundle on this machine (copied down when storage is remote)."""
    if checkpoint.filesystem.type_name == "local":
        return Path(checkpoint.path) / BUNDLE_DIR
    dst = default_home() / "runs" / name / Path(checkpoint.path).name
    if not (dst / BUNDLE_DIR).is_dir():
        checkpoint.to_directory(str(dst))
    return dst / BUNDLE_DIR


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
    console.print(
        f"[bold]best epoch[/] {out.best_epoch}  objective {_fmt(out.objective)}\n"
        f"[bold]checkpoint[/] {out.checkpoint_path}\n"
        f"[bold]bundle[/]     {out.bundle_path}\n"
        f"[bold]model[/]      {model}\n"
        f"[bold]mlflow[/]     run {out.run_id}; view with: {ui_command(out.tracking_uri)}",
        highlight=False,
        soft_wrap=True,
    )


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{float(value):.4f}"


# --- worker ------------------------------------------------------------------------------------


def train_loop_per_worker(config: dict[str, Any]) -> list[dict[str, Any]] | None:
    """One Ray Train worker: resume, then per epoch train, (rank 0) evaluate, report, log."""
    import ray
    import ray.train
    import ray.train.torch

    from polytask.training.loop import load_state, setup

    cfg = ExperimentConfig.model_validate(config["cfg"])
    specs = [TaskSpec.from_dict(d) for d in config["specs"]]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    train_features = ray.get(config["train_ref"])
    sharded = cfg.scaling.parallel_strategy == "fsdp"  # every rank takes part in FSDP's eval
    eval_features = ray.get(config["eval_ref"]) if rank == 0 or sharded else {}
    tr = setup(
        cfg,
        specs,
        train_features,
        eval_features,
        rank=rank,
        world_size=world,
        device=ray.train.torch.get_device(),
        wrap=_wrapper(cfg),
    )
    start = ray.train.get_checkpoint()
    if start is not None:
        with start.as_directory() as d:
            load_state(tr, Path(d) / STATE_DIR)
    start_epoch = tr.epoch
    hold = _hold_for_kill(cfg, rank, start is not None, config.get("pid_file"))
    while tr.epoch < cfg.optim.epochs:
        record = _run_epoch(tr, cfg, rank, world, hold)
        record["start_epoch"] = start_epoch  # where this attempt began: > 0 means it resumed
        _report(tr, cfg, record, rank, config["run_name"])
        if rank == 0 and cfg.run.fail_at_epoch == record["epoch"] and start is None:
            _fail_once(record["epoch"])
    return tr.history if rank == 0 else None


def _wrapper(cfg: ExperimentConfig) -> Any:
    """prepare_model with DDP that tolerates idle heads (each step trains one task's head only);
    FSDP is wrapped by polytask.training.sharding (one unit per layer; Ray's own FSDP needs a GPU)."""
    import ray.train.torch

    if cfg.scaling.parallel_strategy == "fsdp":
        from polytask.training import sharding

        return lambda model: sharding.wrap(model, ray.train.torch.get_device())
    return lambda model: ray.train.torch.prepare_model(
        model, parallel_strategy="ddp", parallel_strategy_kwargs={"find_unused_parameters": True}
    )


def _run_epoch(
    tr: Any, cfg: ExperimentConfig, rank: int, world: int, hold: Any = None
) -> dict[str, Any]:
    from polytask.training.loop import evaluate, flat_metrics, objective, train_epoch

    epoch = tr.epoch
    began = time.perf_counter()
    on_step = (lambda step, steps: hold(epoch, step, steps)) if hold else None
    losses = _global_means(tr, train_epoch(tr, on_step), world)
    seconds = time.perf_counter() - began
    tr.sampler.next_epoch()
    tr.epoch += 1
    record: dict[str, Any] = {"epoch": epoch}
    if rank != 0 and not tr.sharded:
        return record
    metrics = evaluate(
        tr.model if tr.sharded else tr.core,
        tr.eval_features,
        cfg.optim.eval_batch_size,
        tr.tokenizer.pad_token_id,
        tr.device,
    )
    weights = _loss_weights(tr)
    if rank != 0:
        return record
    record["objective"] = objective(metrics, tr.specs)
    record.update(flat_metrics(metrics))
    record.update({f"train_loss/{t}": v for t, v in losses.items()})
    record.update({f"loss_weight/{t}": w for t, w in weights.items()})
    samples = tr.sampler.steps_per_epoch * cfg.optim.batch_size * world
    record.update({"epoch_time_s": seconds, "samples_per_s": samples / max(seconds, 1e-9)})
    tr.history.append(record)  # the same dict: fields added before the report land in history
    return record


def _loss_weights(tr: Any) -> dict[str, float]:
    if tr.sharded:
        from polytask.training import sharding

        return sharding.loss_weights(tr.model)
    return tr.core.weighting.weights()


def _global_means(tr: Any, losses: dict[str, float], world: int) -> dict[str, float]:
    """Average each task's epoch loss over ranks, so DWA and the logged losses are global.
    Every rank trains the same task sequence, so the key sets agree."""
    if world == 1:
        return losses
    import torch
    import torch.distributed as dist

    names = sorted(losses)
    values = torch.tensor([losses[t] for t in names], dtype=torch.float64, device=tr.device)
    dist.all_reduce(values)
    means = {t: float(v) / world for t, v in zip(names, values.tolist())}
    tr.core.weighting.history.pop()  # replace this rank's local entry with the global one
    tr.core.weighting.end_epoch(means)
    return means


def _report(
    tr: Any, cfg: ExperimentConfig, record: dict[str, Any], rank: int, run_name: str
) -> None:
    """Every rank reports (it is a barrier); only rank 0 attaches the checkpoint."""
    import ray.train

    from polytask.model.bundle import save_bundle
    from polytask.training.loop import gather_state, plain_model, save_state

    with tempfile.TemporaryDirectory(prefix="polytask-ckpt-") as tmp:
        checkpoint = None
        gathered = gather_state(tr) if rank == 0 or tr.sharded else None
        if rank == 0:
            save_state(tr, Path(tmp) / STATE_DIR, gathered)
            save_bundle(
                plain_model(tr, gathered[0]),
                tr.tokenizer,
                Path(tmp) / BUNDLE_DIR,
                cfg.encoder.max_length,
                source=cfg.encoder.name_or_path,
                extra={
                    "run_name": run_name,
                    "epoch": record["epoch"],
                    "objective": record["objective"],
                },
            )
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(record, checkpoint=checkpoint)


HOLD_S = 120.0  # a chaos test that never kills the held worker fails instead of hanging


def _hold_for_kill(
    cfg: ExperimentConfig, rank: int, resumed: bool, pid_file: str | None
) -> Any:
    """run.hold_at_epoch: in the first attempt, rank 0 writes its pid halfway through that epoch
    and waits there, so a test can SIGKILL a real worker mid-epoch; a restarted attempt (it
    starts from a checkpoint) never holds."""
    target = cfg.run.hold_at_epoch
    if target is None or rank != 0 or resumed or not pid_file:
        return None

    def hold(epoch: int, step: int, steps: int) -> None:
        if epoch != target or step != max(1, steps // 2):
            return
        import ray.train

        ray.train.get_all_reported_checkpoints(  # the kill lands after the last checkpoint
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED
        )
        path = Path(pid_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(str(os.getpid()))
        tmp.replace(path)  # the reader never sees a half-written pid
        time.sleep(HOLD_S)
        raise RuntimeError(f"run.hold_at_epoch={target}: nobody killed pid {os.getpid()}")

    return hold


def _fail_once(epoch: int) -> None:
    """run.fail_at_epoch: crash only after Ray committed this epoch's checkpoint, so the
    restarted attempt resumes past it (and, having a checkpoint, never fails again)."""
    import ray.train

    ray.train.get_all_reported_checkpoints(
        consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED
    )
    raise RuntimeError(
        f"run.fail_at_epoch={epoch}: injected failure after epoch {epoch}'s checkpoint"
    )


def mlflow_callback(uri: str, run_id: str) -> Any:
    """A Ray Train callback that logs rank 0's epoch metrics from the controller, right after
    the epoch's checkpoint is committed: an epoch is never logged twice after a restart, and
    it is logged before Tune (a later callback) can stop the trial."""
    from ray.train.v2.api.callback import UserCallback

    class MlflowEpochLogger(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            from mlflow.entities import Metric

            record = metrics[0] if metrics else {}
            if "epoch" not in record:
                return
            step, now = int(record["epoch"]), int(time.time() * 1000)
            batch = [
                Metric(k, float(v), now, step)
                for k, v in record.items()
                if k != "epoch" and isinstance(v, (int, float))
            ]
            try:
                client(uri).log_batch(run_id, metrics=batch)
            except Exception as exc:  # noqa: BLE001 - a tracking outage must not cost the run
                print(f"warning: MLflow logging failed for epoch {step}: {exc}")

    return MlflowEpochLogger()
