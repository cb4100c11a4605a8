"""The tutorial's figures: runs the experiment of docs/tutorial.md exactly as written (Ray Train,
MLflow, registry), with each task's hub data set read from a local copy of the same public data.

    python jobs/bench/tutorial.py --data ../shared/data --out bench_results/tutorial
    python jobs/bench/tutorial.py --data ../shared/data --tiny --out /tmp/tutorial   # smoke run

The local copies are converted to the hub data sets' columns and label names first (SST-2:
`sentence`, `label` as negative/positive; WNUT-17: `tokens`, `ner_tags`), so the records the
run trains on are the ones `data.hub` would give. Budget: 2 CPU cores (shared with other work
here), one Ray Train worker, torch at --threads threads, under an hour; the run's sizes are the
YAML's own (4000 SST-2 rows, 2 epochs x 150 steps), and results.json records its wall time and
the load average.
--tiny cuts the steps and rows to prove the script end to end in a few minutes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "tutorial.md"
SST2_LABELS = ("negative", "positive")  # GLUE's ClassLabel names for 0 and 1
WNUT_FILES = {"train": "wnut17train.conll", "validation": "emerging.dev.conll",
              "test": "emerging.test.annotated"}


def tutorial_experiment(page: Path = PAGE) -> dict[str, Any]:
    """The first YAML block of the tutorial page: the experiment the reader saves."""
    block = re.search(r"```yaml\n(.*?)```", page.read_text(), re.DOTALL)
    if block is None:
        raise SystemExit(f"{page}: no ```yaml block")
    return yaml.safe_load(block[1])


def _write_jsonl(rows: list[dict[str, Any]], path: Path) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def local_sst2(data: Path, out: Path) -> dict[str, str]:
    """GLUE SST-2 train/validation as the hub gives them (dev.tsv is GLUE's validation split)."""
    files = {}
    for split, name in (("train", "train.tsv"), ("validation", "dev.tsv")):
        with (data / "sst2" / name).open(newline="") as f:
            rows = [{"sentence": r["sentence"], "label": SST2_LABELS[int(r["label"])]}
                    for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
        files[split] = _write_jsonl(rows, out / f"sst2_{split}.jsonl")
    return files


def local_wnut17(data: Path, out: Path) -> dict[str, str]:
    """WNUT-17 CoNLL files as the hub's `tokens` / `ner_tags` columns."""
    files = {}
    for split, name in WNUT_FILES.items():
        rows, tokens, tags = [], [], []
        for line in [*(data / "wnut17" / name).read_text(encoding="utf-8").splitlines(), ""]:
            if not line.strip():
                if tokens:
                    rows.append({"tokens": tokens, "ner_tags": tags})
                tokens, tags = [], []
                continue
            word, tag = line.split("\t")[0], line.split("\t")[-1].strip()
            tokens.append(word)
            tags.append(tag)
        files[split] = _write_jsonl(rows, out / f"wnut17_{split}.jsonl")
    return files


def localize(experiment: dict[str, Any], local: dict[str, dict[str, str]]) -> dict[str, Any]:
    """The experiment with each `data.hub` replaced by the local JSONL of the same splits."""
    for task in experiment["tasks"]:
        data = task["data"]
        files = local[data.pop("hub")]
        data.pop("hub_config", None)
        data["format"] = "jsonl"
        for split in ("train", "validation", "test"):
            if split in data:
                data[split] = files[data[split]]
    return experiment


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data", help="directory with sst2/ and wnut17/")
    p.add_argument("--out", default=str(ROOT / "bench_results" / "tutorial"))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    p.add_argument("--tiny", action="store_true", help="a few steps and rows: proves the script")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                      OMP_NUM_THREADS=str(args.threads))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data)
    with tempfile.TemporaryDirectory(prefix="pt_tut_", dir="/tmp") as tmp:
        work = Path(tmp)
        local = {"nyu-mll/glue": local_sst2(data, work), "leondz/wnut_17": local_wnut17(data, work)}
        experiment = localize(tutorial_experiment(), local)
        experiment["run"]["storage_path"] = str(work / "ray_results")
        experiment["tracking"]["tracking_uri"] = f"sqlite:///{work / 'mlflow.db'}"
        if args.tiny:
            experiment["sampling"]["steps_per_epoch"] = 4
            for task in experiment["tasks"]:  # train rows stay: NER's label set is read from them
                task["data"].update(max_eval_samples=100)
        result = run(experiment, work, args.threads)
    result.update(
        date=datetime.now(UTC).isoformat(timespec="seconds"),
        tiny=args.tiny,
        data=args.data if not Path(args.data).is_absolute() else Path(args.data).name,
    )
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("best_epoch", "validation", "test", "wall_s")}))
    return result


def run(experiment: dict[str, Any], work: Path, threads: int) -> dict[str, Any]:
    """Train through `polytask train`'s own entry point on a private local Ray."""
    import ray
    import torch

    from polytask.config import config_from_dict
    from polytask.training.train import run_training

    torch.set_num_threads(threads)
    cfg = config_from_dict(experiment, source=str(PAGE.relative_to(ROOT)))
    load_before = os.getloadavg()[0]
    ray_tmp = tempfile.mkdtemp(prefix="rt_", dir="/tmp")
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=ray_tmp,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads),
                                       "PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
    start = time.perf_counter()
    try:
        result = run_training(cfg, run_name="tutorial")
    finally:
        ray.shutdown()
    primary = {t.name: t.metric for t in cfg.tasks}
    best = next(r for r in result.history if r.get("epoch") == result.best_epoch)
    return {
        "experiment": "docs/tutorial.md",
        "primary_metrics": primary,
        "epochs": [{"epoch": r["epoch"], **{t: r.get(f"{t}/{m}") for t, m in primary.items()},
                    "objective": r.get("objective")} for r in result.history],
        "best_epoch": result.best_epoch,
        "validation": {t: {k: best[k] for k in best if k.startswith(f"{t}/")} for t in primary},
        "objective": result.objective,
        "test": result.test_metrics,
        "registered": {"version": result.model_version, "aliases": result.aliases},
        "wall_s": round(time.perf_counter() - start, 1),
        "load_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "cpu_count": os.cpu_count(),
        "threads": threads,
    }


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
