"""The Ray Train plumbing `train` and `tune` share: features made once on the driver (train splits
that stream, `data.streaming`, are left to Ray Data: see `ingest`), the MLflow run a run name
maps to, the TorchTrainer, and the per-worker loop (which calls `loop.fit`).

`train` runs one TorchTrainer per run; `tune` runs one per trial. Both use only what this module
exports: `tokenize_experiment`, `storage_path`, `find_run`, `find_or_create_run`,
`make_loop_config`, `make_trainer`, `fit_on_ray`, `local_bundle`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from polytask.config import ExperimentConfig, default_home
from polytask.tasks import TaskSpec
from polytask.tracking.registry import client, ensure_experiment
from polytask.tracking.tags import RUN_NAME_TAG
from polytask.training.data import DataError, TaskData, load_task_data, tokenize_records
from polytask.training.ingest import data_config, train_datasets
from polytask.training.loop import BUNDLE_DIR, STATE_DIR
from polytask.training.progress import (
    Progress,
    ProgressPrinter,
    StepMeter,
    mlflow_metrics,
    queue_sender,
)


@dataclass
class Features:
    """Every task checked on the driver (bad data fails before Ray starts) and tokenized there,
    except the train splits that stream (`data.streaming`): Ray Data reads and tokenizes those
    (`train_datasets`)."""

    specs: list[TaskSpec]
    task_data: dict[str, TaskData]
    tokenizer: Any
    train: dict[str, list[dict[str, Any]]]  # the in-memory tasks' train features
    validation: dict[str, list[dict[str, Any]]]
    test: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def train_rows(self) -> dict[str, int]:
        return {name: td.train_rows for name, td in self.task_data.items()}

    @property
    def streamed_rows(self) -> dict[str, int]:
        """Row counts of the streamed train splits (the worker's task schedule needs them)."""
        return {name: td.train_rows for name, td in self.task_data.items() if td.streamed}

    def train_datasets(self, cfg: ExperimentConfig) -> dict[str, Any]:
        """One lazy, tokenizing Ray Dataset per streamed task (call once Ray is up); {} when
        every task is in memory, so Ray Data never starts."""
        streamed = {name: td for name, td in self.task_data.items() if td.streamed}
        return train_datasets(cfg, streamed, self.tokenizer) if streamed else {}


def tokenize_experiment(cfg: ExperimentConfig) -> Features:
    """Check every task's data and tokenize it, test only where `data.test` is given; a train
    split that streams is left to Ray Data (scanned, not kept, where its format allows)."""
    task_data = load_task_data(cfg, streaming=True)  # DataError: before any Ray worker
    tokenizer = load_tokenizer(cfg)

    def tokenized(split: str, streamed: bool = False) -> dict[str, list[dict[str, Any]]]:
        return {
            name: tokenize_records(td.splits[split], td.spec, tokenizer, cfg.encoder.max_length)
            for name, td in task_data.items()
            if td.splits.get(split) and not (streamed and td.streamed)
        }

    specs = [td.spec for td in task_data.values()]
    return Features(
        specs,
        task_data,
        tokenizer,
        tokenized("train", streamed=True),
        tokenized("validation"),
        tokenized("test"),
    )


def load_tokenizer(cfg: ExperimentConfig) -> Any:
    """Only the tokenizer: the driver tokenizes once and never holds the encoder weights."""
    from transformers import AutoTokenizer

    from polytask.model.network import resolve_encoder_path
    from polytask.training.base import base_bundle

    base = base_bundle(cfg)  # a polytask model: its own tokenizer, saved beside its encoder
    tokenizer = AutoTokenizer.from_pretrained(
        str(base / "encoder") if base else resolve_encoder_path(cfg.encoder.name_or_path),
        revision=None if base else cfg.encoder.revision,
        trust_remote_code=cfg.encoder.trust_remote_code,
        use_fast=True,
    )
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"encoder.name_or_path '{cfg.encoder.name_or_path}' has no fast tokenizer; polytask "
            "aligns NER labels with fast tokenizers' word ids; pick one with tokenizer.json"
        )
    return tokenizer


def storage_path(cfg: ExperimentConfig) -> str:
    """cfg.run.storage_path, else $POLYTASK_STORAGE_PATH, else <home>/ray_results (absolute)."""
    path = cfg.run.storage_path or os.environ.get("POLYTASK_STORAGE_PATH")
    if path and "://" in path:
        return path
    return str(Path(path).expanduser().resolve() if path else default_home() / "ray_results")


# --- the MLflow run ----------------------------------------------------------------------------


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


# --- the TorchTrainer --------------------------------------------------------------------------


def fit_on_ray(
    cfg: ExperimentConfig,
    name: str,
    run_id: str,
    uri: str,
    storage: str,
    features: Features,
    console: Console | None = None,
) -> Any:
    """TorchTrainer.fit over the driver's features (object store refs) and, for tasks that
    stream, Ray Datasets split across the workers; returns Ray's Result. The same name + storage
    path resumes from that run's latest checkpoint. With a `console`, rank 0's progress lines
    are printed there while the workers run."""
    import ray

    if not ray.is_initialized():
        ray.init()  # joins $RAY_ADDRESS when set, else starts a local Ray
    loop_config = make_loop_config(
        cfg,
        features.specs,
        ray.put(features.train),
        ray.put(features.validation),
        run_id,
        uri,
        name,
        streamed_rows=features.streamed_rows,
    )
    if cfg.run.hold_at_epoch is not None and "://" not in storage:
        loop_config["pid_file"] = str(Path(storage) / name / "rank0.pid")
    datasets = features.train_datasets(cfg)
    if console is None:
        return make_trainer(cfg, name, loop_config, storage, datasets=datasets).fit()
    with ProgressPrinter(console, mlflow_progress(uri, run_id)) as printer:
        loop_config["progress"] = printer.queue
        return make_trainer(cfg, name, loop_config, storage, datasets=datasets).fit()


def make_loop_config(
    cfg: ExperimentConfig,
    specs: list[TaskSpec],
    train_ref: Any,
    eval_ref: Any,
    run_id: str,
    uri: str,
    run_name: str,
    streamed_rows: dict[str, int] | None = None,
) -> dict[str, Any]:
    """What `train_loop_per_worker` reads: plain data, object refs to the features, and each
    streamed task's train row count (the task schedule's input)."""
    small = {t: n for t, n in (streamed_rows or {}).items() if n < cfg.scaling.num_workers}
    if small:
        raise DataError(
            f"streamed train splits {small} have fewer rows than scaling.num_workers="
            f"{cfg.scaling.num_workers}; every worker needs rows of every task: add data, "
            "lower scaling.num_workers or set data.streaming: false"
        )
    return {
        "cfg": cfg.model_dump(mode="json"),
        "specs": [s.to_dict() for s in specs],
        "train_ref": train_ref,
        "eval_ref": eval_ref,
        "streamed_rows": dict(streamed_rows or {}),
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
    datasets: dict[str, Any] | None = None,
) -> Any:
    """The TorchTrainer for one run: scaling, the streamed tasks' train datasets (split per
    worker), checkpoints kept by objective, restarts."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        datasets=datasets or None,
        dataset_config=data_config() if datasets else None,
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


def local_bundle(checkpoint: Any, cache: str) -> Path:
    """A checkpoint's bundle on this machine (copied under <home>/<cache>/ when storage is
    remote); `checkpoint` is a ray.train.Checkpoint or its path."""
    if isinstance(checkpoint, str):
        from ray.train import Checkpoint

        checkpoint = Checkpoint(checkpoint)
    if checkpoint.filesystem.type_name == "local":
        return Path(checkpoint.path) / BUNDLE_DIR
    dst = default_home() / cache / Path(checkpoint.path).name
    if not (dst / BUNDLE_DIR).is_dir():
        checkpoint.to_directory(str(dst))
    return dst / BUNDLE_DIR


# --- worker ------------------------------------------------------------------------------------


def train_loop_per_worker(config: dict[str, Any]) -> list[dict[str, Any]] | None:
    """One Ray Train worker: resume from Ray's latest checkpoint, then `loop.fit`, reporting each
    epoch (with rank 0's checkpoint) to Ray."""
    import ray
    import ray.train
    import ray.train.torch

    from polytask.training.loop import TrainState, fit, load_state, save_checkpoint, setup

    cfg = ExperimentConfig.model_validate(config["cfg"])
    specs = [TaskSpec.from_dict(d) for d in config["specs"]]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    sharded = cfg.scaling.parallel_strategy == "fsdp"  # every rank takes part in FSDP's eval
    eval_features = ray.get(config["eval_ref"]) if rank == 0 or sharded else {}
    streamed = config["streamed_rows"]
    state = setup(
        cfg,
        specs,
        ray.get(config["train_ref"]),
        eval_features,
        rank=rank,
        world_size=world,
        device=ray.train.torch.get_device(),
        wrap=_wrapper(cfg),
        train_shards={task: ray.train.get_dataset_shard(task) for task in streamed},
        train_rows=streamed,
    )
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as d:
            load_state(state, Path(d) / STATE_DIR)

    def report(state: TrainState, record: dict[str, Any]) -> None:
        """Every rank reports (it is a barrier); only rank 0 attaches the checkpoint."""
        extra = {
            "run_name": config["run_name"],
            "epoch": record["epoch"],
            "objective": record.get("objective"),
        }
        with tempfile.TemporaryDirectory(prefix="polytask-ckpt-") as tmp:
            written = save_checkpoint(state, tmp, extra)
            checkpoint = ray.train.Checkpoint.from_directory(tmp) if written else None
            ray.train.report(record, checkpoint=checkpoint)
        if rank == 0 and cfg.run.fail_at_epoch == record["epoch"] and resumed is None:
            _fail_once(record["epoch"])

    hooks = [_hold_for_kill(cfg, rank, resumed is not None, config.get("pid_file"))]
    if rank == 0 and config.get("progress") is not None:
        hooks.append(
            StepMeter(
                queue_sender(config["progress"]),
                cfg.run.progress_every_s,
                cfg.optim.epochs,
                cfg.optim.batch_size * world,
            )
        )
    history = fit(state, on_epoch=report, on_step=_each(hooks))
    return history if rank == 0 else None


def _each(hooks: list[Any]) -> Any:
    """One step hook calling every hook given (None entries skipped); None if there are none."""
    live = [h for h in hooks if h is not None]
    if not live:
        return None

    def call(*args: Any) -> None:
        for hook in live:
            hook(*args)

    return call


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

    def hold(epoch: int, step: int, steps: int, losses: dict[str, float]) -> None:
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


def mlflow_progress(uri: str, run_id: str) -> Any:
    """Log each progress record (samples/s, step time, per-task loss) to the run while it trains;
    a tracking outage costs the points, never the run."""
    from mlflow.entities import Metric

    warned = False

    def log(p: Progress) -> None:
        nonlocal warned
        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value, step in mlflow_metrics(p)]
        try:
            client(uri).log_batch(run_id, metrics=batch)
        except Exception as exc:  # noqa: BLE001
            if not warned:
                print(f"warning: MLflow progress logging failed: {exc}")
                warned = True

    return log


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
