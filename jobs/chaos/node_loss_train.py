"""A worker node lost during training: remove the node that runs rank 0 mid-epoch (its raylet and
every process on it killed, no warning), and time the run's resumption on the node that is left.

    python jobs/chaos/node_loss_train.py [--out bench_results/chaos/node_loss_train.json]

A local multi-node cluster (ray.cluster_utils.Cluster, its own temp dir): a head with no CPUs
that runs only this driver and Ray Train's controller (attached to the driver's node), and two
worker nodes. `polytask`'s training (`run_training`, as `polytask train` calls it) runs the demo
tasks with two workers (`--workers`); rank 0 is parked halfway through epoch 1 after epoch 0's checkpoint
(POLYTASK_FAULTS=hold_at_epoch=1), and its node is removed. Ray Train restarts the worker group
on the node that is left, from epoch 0's checkpoint, in the same MLflow run.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chaos import (  # after the path insert, as when run directly
    ChaosError,
    head_and_workers,
    machine,
    node_loss_args,
    short_tmp,
    write_result,
)


def main(argv: list[str] | None = None) -> dict:
    parser = node_loss_args(__doc__, "node_loss_train.json")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (1 CPU each)")
    args = parser.parse_args(argv)

    root = short_tmp("pt-trainnode-")
    os.environ["POLYTASK_HOME"] = str(root / "home")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["POLYTASK_FAULTS"] = "hold_at_epoch=1"
    import ray

    from polytask.config import config_from_dict
    from polytask.demo import demo_experiment, write_demo_data, write_tiny_encoder
    from polytask.training.train import run_training

    data = write_demo_data(root / "data", n_train=240, n_eval=60)
    encoder = write_tiny_encoder(root / "encoder", vocab_size=150)
    cfg = config_from_dict(
        demo_experiment(
            data, encoder, epochs=args.epochs, num_workers=args.workers, registered_model="node-loss",
            run={"max_failures": 2, "progress_every_s": 0},
        )
    )
    cluster, workers = head_and_workers(root, args.worker_cpus)
    removal: dict[str, object] = {}
    try:
        env = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "POLYTASK_HOME", "POLYTASK_FAULTS")}
        ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": env})
        if ray.get_runtime_context().get_node_id() != cluster.head_node.node_id:
            raise ChaosError("the driver is not on the head node: Train's controller would be lost")
        pid_file = root / "home" / "ray_results" / "node-loss" / "rank0.pid"
        remover = threading.Thread(
            target=_remove_rank0_node, args=(cluster, workers, pid_file, removal), daemon=True
        )
        remover.start()
        started = time.monotonic()
        result = run_training(cfg, run_name="node-loss")
        finished = time.monotonic()
        remover.join(timeout=5)
    finally:
        ray.shutdown()
        cluster.shutdown()
    if "at" not in removal:
        raise ChaosError(f"rank 0 never reached its hold point: {removal.get('error', '')}")
    removed_at = float(removal["at"])  # type: ignore[arg-type]
    history = [(row["epoch"], row["start_epoch"]) for row in result.history]
    out = {
        "what": "remove the worker node running rank 0 halfway through epoch 1 of a training run",
        "workers": args.workers,
        "nodes": "head (driver + Train controller, no CPUs) and 2 workers",
        "worker_cpus": args.worker_cpus,
        "epochs": args.epochs,
        "max_failures": cfg.run.max_failures,
        "workers_on_removed_node": removal["workers_on_node"],
        "epochs_and_start_epochs": history,
        "resumed_from_checkpoint": history[1] == (1, 1) if len(history) > 1 else False,
        "mlflow_run_id": result.run_id,
        "registered_version": result.model_version,
        "objective": result.objective,
        "run_s": round(finished - started, 2),
        "removal_to_finish_s": round(finished - removed_at, 2),
        "machine": machine(),
    }
    write_result(Path(args.out), out)
    print(f"node_loss_train: epochs/start epochs {history}; finished {out['removal_to_finish_s']} s "
          f"after the node was removed -> {args.out}")
    return out


def _remove_rank0_node(cluster, workers, pid_file: Path, removal: dict) -> None:
    """When rank 0 is held, remove the worker node it runs on (found by its raylet ancestor)."""
    import psutil
    from ray._private import ray_constants

    deadline = time.monotonic() + 600
    while not pid_file.is_file():
        if time.monotonic() > deadline:
            removal["error"] = "no pid file within 600 s"
            return
        time.sleep(0.05)
    pid = int(pid_file.read_text())
    ancestors = {p.pid for p in psutil.Process(pid).parents()}
    raylet = ray_constants.PROCESS_TYPE_RAYLET
    victim = next(
        (w for w in workers if w.all_processes[raylet][0].process.pid in ancestors), None
    )
    if victim is None:
        removal["error"] = f"rank 0 (pid {pid}) runs on no worker node"
        return
    train_workers = [
        p for p in psutil.Process(victim.all_processes[raylet][0].process.pid).children(recursive=True)
        if "RayTrainWorker" in " ".join(p.cmdline())
    ]
    removal["workers_on_node"] = len(train_workers)
    removal["at"] = time.monotonic()
    cluster.remove_node(victim, allow_graceful=False)


if __name__ == "__main__":
    main()
