"""Ray Data ingestion: does the driver's memory stay flat when the corpus grows 20×?

    python jobs/bench/ingest_bench.py                        # SST-2 train ×1 and ×20, tiny BERT
    python jobs/bench/ingest_bench.py --scales 1,20 --steps 40 --out bench_results/ingest/r.json

Each scale is `polytask train`'s driver path (tokenize_experiment: scan + count, then fit_on_ray:
Ray Data reads and tokenizes on the workers) in a fresh process with its own local Ray, so its
peak RSS (ru_maxrss, plus /proc samples every 50 ms) is that scale's alone. The train file is
SST-2's train.tsv (../shared/data, or --sst2) written `scale` times into one TSV, streamed at
both scales (`data.streaming: true`). Steps per epoch are fixed, so samples/s compares the same
work at both scales.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

REPO_ROOT = Path(__file__).resolve().parents[2]
TARGET_RSS, TARGET_SPS = 1.2, 0.9


class PeakRss:
    """The driver's resident memory, sampled in a thread (ru_maxrss gives the exact peak too)."""

    def __init__(self, every_s: float = 0.05) -> None:
        self.every_s, self.peak = every_s, 0
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            resident = int(Path("/proc/self/statm").read_text().split()[1]) * self._page
            self.peak = max(self.peak, resident)
            time.sleep(self.every_s)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def write_corpus(args_sst2: str, work: Path, scale: int) -> Path:
    """SST-2 train.tsv, its rows written `scale` times (one header)."""
    header, _, body = (Path(args_sst2) / "train.tsv").read_text(encoding="utf-8").partition("\n")
    path = work / f"train_x{scale}.tsv"
    with path.open("w", encoding="utf-8") as f:
        f.write(header + "\n")
        for _ in range(scale):
            f.write(body if body.endswith("\n") else body + "\n")
    return path


def run_scale(args: argparse.Namespace) -> dict[str, Any]:
    """One scale, in this (fresh) process: the driver path of `polytask train`."""
    import ray

    from polytask.config import config_from_dict
    from polytask.tracking.registry import client, ensure_experiment, tracking_uri
    from polytask.training.features import tokenize_experiment
    from polytask.training.ray_run import fit_on_ray, storage_path

    work = Path(args.work)
    os.environ["POLYTASK_HOME"] = str(work / f"home-{args.scale}")
    train = write_corpus(args.sst2, work, args.scale)
    encoder = work / "tiny-bert"  # written by the parent, so no scale pays for building it
    cfg = config_from_dict(
        {
            "encoder": {"name_or_path": str(encoder), "max_length": 64},
            "tasks": [
                {
                    "name": "sst2",
                    "kind": "classification",
                    "data": {
                        "train": str(train),
                        "validation": str(Path(args.sst2) / "dev.tsv"),
                        "text_field": "sentence",
                        "max_eval_samples": 200,
                        "streaming": True,  # both scales through Ray Data, so only size differs
                    },
                }
            ],
            "sampling": {"steps_per_epoch": args.steps},
            "optim": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": 1e-4},
            "scaling": {"num_workers": args.workers},
            "run": {"checkpoints_to_keep": 1, "max_failures": 0},
            "tracking": {"experiment": "polytask-bench-ingest", "registered_model": None},
        }
    )
    ray.init(  # a new local Ray of its own, never one another process left running
        address="local", num_cpus=max(2, args.workers + 1), include_dashboard=False, log_to_driver=False
    )
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    began = time.perf_counter()
    with PeakRss() as rss:
        features = tokenize_experiment(cfg)
        scanned = time.perf_counter() - began
        uri = tracking_uri(cfg)
        c = client(uri)
        run_id = c.create_run(ensure_experiment(c, cfg.tracking.experiment, uri)).info.run_id
        result = fit_on_ray(cfg, f"ingest-x{args.scale}", run_id, uri, storage_path(cfg), features)
    wall = time.perf_counter() - began
    ray.shutdown()
    history = result.return_value
    steady = [row["samples_per_s"] for row in history[1:]] or [history[0]["samples_per_s"]]
    return {
        "scale": args.scale,
        "train_rows": features.train_rows["sst2"],
        "train_file_mb": round(train.stat().st_size / 2**20, 1),
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "driver_peak_rss_sampled_mb": round(rss.peak / 2**20, 1),
        "samples_per_s": round(sum(steady) / len(steady), 2),
        "samples_per_s_per_epoch": [round(row["samples_per_s"], 2) for row in history],
        "scan_s": round(scanned, 2),
        "wall_s": round(wall, 2),
        "load_average_at_start": load_at_start,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_results/ingest/results.json", help="JSON file")
    parser.add_argument("--scales", default="1,20", help="corpus multiples, the first is the base")
    parser.add_argument("--steps", type=int, default=40, help="steps per epoch")
    parser.add_argument("--epochs", type=int, default=5, help="epochs (the first is not timed)")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per step per worker")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers")
    parser.add_argument("--sst2", help="folder with SST-2 train.tsv and dev.tsv (default: "
                        "../shared/data/sst2 from the cwd or the checkout)")
    parser.add_argument("--scale", type=int, help=argparse.SUPPRESS)  # one scale, in a child
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.scale is not None:
        print(json.dumps(run_scale(args)))
        return 0
    found = [p for p in (Path.cwd(), REPO_ROOT) if (p / "../shared/data/sst2/train.tsv").is_file()]
    args.sst2 = args.sst2 or (str((found[0] / "../shared/data/sst2").resolve()) if found else None)
    if not args.sst2 or not (Path(args.sst2) / "train.tsv").is_file():
        print("SST-2 train.tsv not found: pass --sst2 DIR (../shared/data/sst2)", file=sys.stderr)
        return 2

    scales = [int(s) for s in args.scales.split(",")]
    runs = []
    from polytask.demo import write_tiny_encoder

    with tempfile.TemporaryDirectory(prefix="polytask-ingest-") as work:
        write_tiny_encoder(Path(work) / "tiny-bert", vocab_size=150)
        for scale in scales:
            child = [sys.executable, __file__, "--scale", str(scale), "--work", work]
            child += ["--sst2", args.sst2]
            child += ["--steps", str(args.steps), "--epochs", str(args.epochs)]
            child += ["--batch-size", str(args.batch_size), "--workers", str(args.workers)]
            done = subprocess.run(child, check=True, stdout=subprocess.PIPE, text=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]))
    base, big = runs[0], runs[-1]
    ratios = {
        "driver_rss": round(big["driver_peak_rss_mb"] / base["driver_peak_rss_mb"], 3),
        "samples_per_s": round(big["samples_per_s"] / base["samples_per_s"], 3),
    }
    report = {
        "benchmark": "ingest",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "scale", "work", "sst2")}
        | {"encoder": "tiny-random-bert", "data": "SST-2 train.tsv ×scale"},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "results": runs,
        "ratios": ratios,
        "targets": {"driver_rss_at_most": TARGET_RSS, "samples_per_s_at_least": TARGET_SPS},
        "met": {
            "driver_rss": ratios["driver_rss"] <= TARGET_RSS,
            "samples_per_s": ratios["samples_per_s"] >= TARGET_SPS,
        },
        "notes": "driver_peak_rss_mb: ru_maxrss of the driver process (a fresh process per "
        "scale); samples_per_s: fit's epoch throughput averaged over the epochs after the "
        "first; wall_s includes the driver's scan, Ray Train startup and checkpoints.",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({"ratios": ratios, "met": report["met"], "out": str(out)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
