"""The Ray Train plumbing `train` and `tune` share: the TorchTrainer over the driver's features
(`training.features`), and the per-worker loop (which calls `loop.fit`). The MLflow run itself
is `tracking.runs`'s.

`train` runs one TorchTrainer per run; `tune` runs one per trial. Both use only what this module
exports: `storage_path`, `make_loop_config`, `make_trainer`, `fit_on_ray`, `local_bundle`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console

from polytask.config import ExperimentConfig, default_home
from polytask.durable import prepare_dir, swap_dir
from polytask.tasks import TaskSpec
from polytask.tracking.runs import epoch_metrics, log_metrics, metrics_logger
from polytask.training import faults
from polytask.training.data import DataError
from polytask.training.features import Features
from polytask.training.ingest import data_config
from polytask.training.loop import BUNDLE_DIR, STATE_DIR
from polytask.training.progress import ProgressPrinter, StepMeter, mlflow_metrics, queue_sender


def storage_path(cfg: ExperimentConfig) -> str:
    """cfg.run.storage_path, else $POLYTASK_STORAGE_PATH, else <home>/ray_results (absolute)."""
    path = cfg.run.storage_path or os.environ.get("POLYTASK_STORAGE_PATH")
    if path and "://" in path:
        return path
    return str(Path(path).expanduser().resolve() if path else default_home() / "ray_results")


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
    loop_config["pid_file"] = faults.pid_file(storage, name)
    datasets = features.train_datasets(cfg)
    if console is None:
        return make_trainer(cfg, name, loop_config, storage, datasets=datasets).fit()
    log = metrics_logger(uri, run_id)
    with ProgressPrinter(console, lambda progress: log(mlflow_metrics(progress))) as printer:
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
    """What `train_loop_per_worker` reads: plain data, object refs to the features, each
    streamed task's train row count (the task schedule's input), and the injected faults of a
    fault-tolerance test (`training.faults`, from the driver's environment)."""
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
        "_faults": faults.from_env(),
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
                epoch_logger(loop_config["tracking_uri"], loop_config["run_id"]),
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
    if not (dst / BUNDLE_DIR).is_dir():  # copied whole, then renamed: a killed copy is never reused
        partial = prepare_dir(dst)
        checkpoint.to_directory(str(partial))
        swap_dir(partial, dst)
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
    plan = config.get("_faults") or {}

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
        faults.fail_after_checkpoint(plan, rank, resumed is not None, record["epoch"])

    hooks = [faults.hold_for_kill(plan, rank, resumed is not None, config.get("pid_file"))]
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


def epoch_logger(uri: str, run_id: str) -> Any:
    """A Ray Train callback that logs rank 0's epoch metrics from the controller, right after
    the epoch's checkpoint is committed: an epoch is never logged twice after a restart, and
    it is logged before Tune (a later callback) can stop the trial."""
    from ray.train.v2.api.callback import UserCallback

    class MlflowEpochLogger(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            record = metrics[0] if metrics else {}
            if "epoch" not in record:
                return
            try:
                log_metrics(uri, run_id, epoch_metrics(record))
            except Exception as exc:  # noqa: BLE001 - a tracking outage must not cost the run
                print(f"warning: MLflow logging failed for epoch {int(record['epoch'])}: {exc}")

    return MlflowEpochLogger()
