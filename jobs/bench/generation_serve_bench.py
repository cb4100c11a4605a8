"""Generation serving benchmark: decoding throughput (new tokens/s) through Ray Serve over loopback
HTTP against the same bundle's in-process decode on the same inputs, in one run.

    python jobs/bench/generation_serve_bench.py --out bench_results/generation_serve  # MiniLM, ~3 min
    python jobs/bench/generation_serve_bench.py --tiny --out /tmp/g                   # smoke test

The bundle is the packaged MiniLM-L6 encoder with a new, untrained decoder head (speed, not
quality). Every input decodes exactly `--new-tokens` tokens on both sides (min_new_tokens =
max_new_tokens: no early end-of-text), so tokens/s compare the same work. In-process: encode and
`generate` in batches of the served concurrency in one process, with 1 torch thread and with one
per core (the better counts). Served: `loadgen.py` clients, one input per request to
POST /v1/tasks/<task>/predict, each level bounded by `--duration`; the head replica has 1 CPU. Writes results.json and results.md under --out, with the load average before and
after each measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import loadgen
from common import (
    DEFAULT_ENCODER,
    FAST_TEARDOWN,
    BenchError,
    CpuWatch,
    free_port,
    ints,
    is_busy,
    load_texts,
    machine_info,
    machine_markdown,
    quiet_transformers,
    usable_cores,
    wait_ready,
)

TASK = "summary"
TARGET = 0.6  # served tokens/s over in-process at c=32


@dataclass
class Settings:
    """Everything that shapes the numbers; written into the results so a run can be repeated."""

    concurrency: list[int] = field(default_factory=lambda: [8, 32])
    new_tokens: int = 32
    decoder_layers: int = 2
    duration_s: float = 20.0
    max_requests: int = 100_000
    warmup_requests: int = 32
    inprocess_seconds: float = 10.0
    max_length: int = 128
    texts: int = 256
    # An Ingress batch waits for its decode, so the default 2 batches in flight leave the next
    # decode only the one batch that waited; more let every client's request join it.
    ingress_batches_in_flight: int = 8
    decode_wait_s: float = 0.1  # the clients a decode answered come back through the Encoder
    decoder_cpus: float = 1.0  # the head replica's num_cpus (Ray gives it as many torch threads)


def tiny_settings() -> Settings:
    return Settings(
        concurrency=[4],
        new_tokens=8,
        decoder_layers=1,
        duration_s=1.5,
        max_requests=40,
        warmup_requests=2,
        inprocess_seconds=0.5,
        max_length=32,
        texts=32,
    )


def build_bundle(path: Path, encoder: str, settings: Settings) -> Path:
    """`encoder` with an untrained decoder head (`TASK`) that may decode `new_tokens`."""
    import torch

    from polytask.model.bundle import save_bundle
    from polytask.model.generation import build_generation_head, resolve_decoder
    from polytask.model.network import build_model, load_encoder
    from polytask.tasks import GenerationSpec, TaskSpec

    quiet_transformers()
    torch.manual_seed(0)
    enc, tokenizer = load_encoder(encoder)
    generation = GenerationSpec(
        decoder_layers=settings.decoder_layers, max_new_tokens=settings.new_tokens
    )
    spec = resolve_decoder(TaskSpec(TASK, "generation", [], generation=generation), enc.config)
    head = build_generation_head(spec, tokenizer, enc)
    model = build_model(enc, [spec], "cls", heads={TASK: head})
    save_bundle(model, tokenizer, path, settings.max_length, source=encoder)
    return path


def in_process(bundle: Path, texts: list[str], batch: int, settings: Settings) -> dict[str, Any]:
    """Tokens/s of encode + generate in batches of `batch`, each for `inprocess_seconds`, with one
    torch thread and with one per usable core; the better is the reference (on a shared machine
    more threads than free cores can be ten times slower)."""
    import torch

    from polytask.model.bundle import load_bundle
    from polytask.model.inference import encode_batch, generate_answers

    model, tokenizer, manifest = load_bundle(bundle)
    head, spec = model.heads[TASK], model.specs[TASK]
    n = settings.new_tokens

    def one_pass(chunk: list[str]) -> None:
        items = encode_batch(
            model.encoder,
            tokenizer,
            chunk,
            None,
            max_length=manifest.max_length,
            pooling=model.pooling,
            need_pooled=False,
            need_tokens=True,
        )
        generate_answers(head, spec, items, max_new_tokens=n, min_new_tokens=n)

    threads_before = torch.get_num_threads()
    by_threads: dict[str, float] = {}
    watch = CpuWatch()
    try:
        for threads in sorted({1, usable_cores()}):
            torch.set_num_threads(threads)
            one_pass(texts[:batch])  # warm-up
            inputs, start, i = 0, time.perf_counter(), 0
            while time.perf_counter() - start < settings.inprocess_seconds or inputs == 0:
                one_pass([texts[(i + k) % len(texts)] for k in range(batch)])
                i += batch
                inputs += batch
            by_threads[str(threads)] = inputs * n / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads_before)
    best = max(by_threads, key=by_threads.__getitem__)
    return {
        "batch": batch,
        "tokens_per_s": by_threads[best],
        "torch_threads": int(best),
        "tokens_per_s_by_threads": by_threads,
        **watch.stop(),
    }


def served(
    bundle: Path, texts: list[str], settings: Settings, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Each concurrency level against one deployed app: tokens/s, latency, decode batch sizes."""
    from ray import serve

    from polytask.serve import compose

    cores = usable_cores()
    one = {"num_replicas": 1, **FAST_TEARDOWN}
    options = {
        "Ingress": {**one, "ray_actor_options": {"num_cpus": 0.5}},
        "Encoder": {**one, "ray_actor_options": {"num_cpus": 1}},
        f"head_{TASK}": {
            **one,
            "ray_actor_options": {"num_cpus": settings.decoder_cpus},
        },
    }
    n = settings.new_tokens
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {
        "model": str(bundle),
        "ingress_batches_in_flight": settings.ingress_batches_in_flight,
        "decode_wait_s": settings.decode_wait_s,
    }
    serve.run(compose(args, options), name="polytask", route_prefix="/")
    body = {"max_new_tokens": n, "min_new_tokens": n}
    path = f"/v1/tasks/{TASK}/predict"
    asyncio.run(wait_ready(f"http://127.0.0.1:{port}{path}", {"inputs": texts[:1], **body}))
    head = serve.get_deployment_handle(f"head_{TASK}", "polytask")
    runs = []
    for conc in settings.concurrency:
        before = head.stats.remote().result()
        watch = CpuWatch()
        result = loadgen.level(
            {
                "host": "127.0.0.1",
                "port": port,
                "paths": [path],
                "tasks": None,
                "texts": texts,
                "concurrency": conc,
                "inputs_per_request": 1,
                "duration_s": settings.duration_s,
                "max_requests": settings.max_requests,
                "warmup_requests": min(settings.warmup_requests, conc),
                "body": body,
            }
        )
        result.update(watch.stop())
        after = head.stats.remote().result()
        decodes = after["batches"] - before["batches"]
        result.update(
            tokens_per_s=result["throughput_inputs_per_s"] * n,
            busy=is_busy(result, cores),
            decodes=decodes,
            inputs_per_decode=(after["inputs"] - before["inputs"]) / decodes if decodes else None,
        )
        runs.append(result)
        log(
            f"  served c={conc:<3d} {result['tokens_per_s']:8.1f} tokens/s  "
            f"p50={result['latency_ms']['p50'] or 0:.0f} ms  errors={result['errors']}  "
            f"inputs/decode {result['inputs_per_decode'] or 0:.1f}  load "
            f"{result['load_before']}→{result['load_after']}{'  BUSY' if result['busy'] else ''}"
        )
    return runs


def run_bench(
    settings: Settings,
    out: Path,
    texts_file: str | None = None,
    tiny: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    import os
    import tempfile

    import ray

    started = time.perf_counter()
    for key, value in (("TOKENIZERS_PARALLELISM", "false"), ("HF_HUB_OFFLINE", "1")):
        os.environ.setdefault(key, value)
    texts, source = load_texts(texts_file, tiny)
    texts = texts[: settings.texts]
    cores = usable_cores()
    with tempfile.TemporaryDirectory(prefix="polytask-genbench-") as tmp:
        encoder = DEFAULT_ENCODER
        if tiny:
            from polytask.demo import write_tiny_encoder

            encoder = str(write_tiny_encoder(Path(tmp) / "tiny-encoder", vocab_size=150))
        bundle = build_bundle(Path(tmp) / "bundle", encoder, settings)
        log(f"bundle: {encoder} + untrained {settings.decoder_layers}-layer decoder")
        local = {c: in_process(bundle, texts, c, settings) for c in settings.concurrency}
        for c, m in local.items():
            log(f"  in-process batch={c:<3d} {m['tokens_per_s']:8.1f} tokens/s")
        ray.init(num_cpus=cores + 2, include_dashboard=False, log_to_driver=False)
        try:
            runs = served(bundle, texts, settings, log)
        finally:
            ray.shutdown()
        local_after = in_process(bundle, texts, max(settings.concurrency), settings)
    best_local = {c: m["tokens_per_s"] for c, m in local.items()}
    best_local[max(settings.concurrency)] = max(
        best_local[max(settings.concurrency)], local_after["tokens_per_s"]
    )
    ratios = {
        str(r["concurrency"]): r["tokens_per_s"] / best_local[r["concurrency"]] for r in runs
    }
    top = str(max(settings.concurrency))
    result = {
        "name": out.name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - started,
        "machine": machine_info(),
        "settings": asdict(settings),
        "texts": {"source": source, "count": len(texts)},
        "model": {"encoder": encoder, "decoder": "new, untrained", "task": TASK},
        "in_process": [*local.values(), local_after],
        "served": runs,
        "reference_tokens_per_s": {str(c): v for c, v in best_local.items()},
        "served_over_in_process": ratios,
        "target": {
            "name": f"served >= {TARGET:.0%} of in-process tokens/s at c={top}",
            "value": ratios[top],
            "met": ratios[top] >= TARGET,
            "usable": not any(r["busy"] for r in runs),
        },
    }
    write_results(result, out)
    log(f"results written to {out}/")
    return result


def write_results(result: dict[str, Any], out: Path) -> None:
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(markdown(result))


def markdown(result: dict[str, Any]) -> str:
    """The results table (results.md, and the docs' benchmarks page through docs/gen_bench.py)."""
    n = result["settings"]["new_tokens"]
    lines = [
        "# Generation serving: tokens/s served vs in-process",
        "",
        (f"Every input decodes exactly {n} new tokens; served = POST /v1/tasks/{TASK}/predict, "
        "one input per request, closed-loop clients over loopback HTTP; in-process = encode + "
        "generate in batches of the same size in one process."),
        "",
        ("| c / batch | in-process tokens/s | served tokens/s | served / in-process | p50 ms "
        "| inputs per decode | errors | load before → after |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    local = result["reference_tokens_per_s"]
    for r in result["served"]:
        c = r["concurrency"]
        lines.append(
            f"| {c} | {local[str(c)]:.1f} | {r['tokens_per_s']:.1f} | "
            f"{result['served_over_in_process'][str(c)]:.2f} | {r['latency_ms']['p50'] or 0:.0f} | "
            f"{r['inputs_per_decode'] or 0:.1f} | {r['errors']} | "
            f"{r['load_before']} → {r['load_after']}{' (busy)' if r['busy'] else ''} |"
        )
    target = result["target"]
    again = result["in_process"][-1]
    threads = "; ".join(
        f"batch {m['batch']}: "
        + ", ".join(f"{t} thread(s) {v:.1f}" for t, v in m["tokens_per_s_by_threads"].items())
        for m in result["in_process"]
    )
    lines += [
        "",
        f"In-process tokens/s by torch threads: {threads}.",
        "",
        (f"In-process again after the served run: {again['tokens_per_s']:.1f} tokens/s "
        f"(load {again['load_before']} → {again['load_after']}); the better of the two is the reference at c={max(local, key=int)}."),
        "",
        (f"Target: {target['name']}: {target['value']:.2f} "
        f"({'met' if target['met'] else 'missed'}{'' if target['usable'] else ', machine busy'})."),
        "",
        machine_markdown(result["machine"]),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="results directory (default bench_results/generation_serve)")
    parser.add_argument("--texts", help="one text per line, or a TSV/CSV with a 'sentence' column")
    parser.add_argument("--tiny", action="store_true", help="smoke run: tiny random encoder, one short level")
    parser.add_argument("--concurrency", type=ints, help="comma-separated, default 8,32")
    parser.add_argument("--new-tokens", type=int, help="tokens every input decodes (32)")
    parser.add_argument("--duration", type=float, help="seconds per served level (20)")
    args = parser.parse_args(argv)
    settings = tiny_settings() if args.tiny else Settings()
    if args.concurrency:
        settings.concurrency = args.concurrency
    if args.new_tokens:
        settings.new_tokens = args.new_tokens
    if args.duration:
        settings.duration_s = args.duration
    default = "generation_serve_tiny" if args.tiny else "generation_serve"
    out = Path(args.out or Path("bench_results") / default)
    try:
        result = run_bench(settings, out, args.texts, args.tiny)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    target = result["target"]
    print(f"{'met' if target['met'] else 'MISSED':7s} {target['name']}: {target['value']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
