"""Generation serving benchmark: continuous vs static decoding through Ray Serve over loopback
HTTP, beside in-process `generate` on the same inputs and torch threads, in one run.

    python jobs/bench/generation_serve_bench.py --out bench_results/generation_serve  # MiniLM, ~15 min
    python jobs/bench/generation_serve_bench.py --tiny --out /tmp/g                   # smoke test

The bundle is the packaged MiniLM-L6 encoder with a new, untrained decoder head and a random
classification head (speed, not quality). Output lengths are drawn from a log-normal (most
answers short, a long tail); each request asks exactly its drawn length, on every path. For each
decode mode (generation_head_options.decode: static, continuous) and concurrency: new tokens/s,
time to first token and time per output token (p50/p95) from streaming clients. Then, on the
continuous app: classification latency alone and beside streaming decoders, and a short decode
right after many clients hung up on long ones (on both apps). The Decoder's per-step time
breakdown (forward, token choice, cache bookkeeping) explains where a step goes. Writes
results.json and results.md under --out, with the load average and other processes' CPU use
for every measurement.
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
from generation_clients import (
    after_abandoned,
    beside_decoders,
    draw_lengths,
    predict_latencies,
    stream_level,
)

TASK, CLASSIFY = "summary", "intent"
TARGETS = {
    "continuous_over_static": 2.0,  # tokens/s at the top concurrency
    "served_over_in_process": 1.0,  # continuous served over in-process static generate
    "classify_beside_decoders": 2.0,  # classification p50 beside decoders over alone, at most
    "short_after_abandoned_ms": 1000.0,  # at most
}


@dataclass
class Settings:
    """Everything that shapes the numbers; written into the results so a run can be repeated."""

    concurrency: list[int] = field(default_factory=lambda: [1, 8, 32, 64])
    modes: list[str] = field(default_factory=lambda: ["static", "continuous"])
    length_median: float = 24.0
    length_sigma: float = 0.7
    length_min: int = 4
    length_max: int = 96
    decoder_layers: int = 2
    duration_s: float = 20.0
    max_requests: int = 100_000
    inprocess_seconds: float = 10.0
    max_length: int = 128
    texts: int = 256
    decoder_threads: int = 1  # torch threads of the Decoder replica, and of the in-process run
    decoder_cpus: float = 1.0
    classify_clients: int = 4
    classify_seconds: float = 10.0
    decoding_clients: int = 16
    decoding_length: int = 48
    abandon_clients: int = 32
    abandon_length: int = 64
    hang_up_s: float = 0.3
    short_tokens: int = 8


def tiny_settings() -> Settings:
    return Settings(
        concurrency=[1, 4], length_median=6, length_max=12, decoder_layers=1, duration_s=2.0,
        max_requests=40, inprocess_seconds=0.5, max_length=32, texts=32, classify_seconds=1.5,
        decoding_clients=4, decoding_length=12, abandon_clients=4, abandon_length=40,
    )


def build_bundle(path: Path, encoder: str, settings: Settings) -> Path:
    """`encoder` with an untrained decoder head (`TASK`) and a random classifier (`CLASSIFY`)."""
    import torch

    from polytask.model.bundle import save_bundle
    from polytask.model.generation import build_generation_head, resolve_decoder
    from polytask.model.network import build_model, load_encoder
    from polytask.tasks import GenerationSpec, TaskSpec

    quiet_transformers()
    torch.manual_seed(0)
    enc, tokenizer = load_encoder(encoder)
    generation = GenerationSpec(decoder_layers=settings.decoder_layers, max_new_tokens=settings.length_max)
    spec = resolve_decoder(TaskSpec(TASK, "generation", [], generation=generation), enc.config)
    head = build_generation_head(spec, tokenizer, enc)
    classify = TaskSpec(CLASSIFY, "classification", [f"class{i}" for i in range(6)])
    model = build_model(enc, [classify, spec], "cls", heads={TASK: head})
    save_bundle(model, tokenizer, path, settings.max_length, source=encoder)
    return path


def in_process(bundle: Path, texts: list[str], lengths: list[int], batch: int, settings: Settings) -> dict[str, Any]:
    """Tokens/s of encode + static `generate` in batches of `batch` (each row capped and held to
    its drawn length) with the Decoder's torch threads, for `inprocess_seconds`."""
    import torch

    from polytask.model.bundle import load_bundle
    from polytask.model.inference import encode_batch, generate_answers

    model, tokenizer, manifest = load_bundle(bundle)
    head, spec = model.heads[TASK], model.specs[TASK]

    def one_pass(first: int) -> int:
        picked = [(first + k) % len(lengths) for k in range(batch)]
        items = encode_batch(
            model.encoder, tokenizer, [texts[i % len(texts)] for i in picked], None,
            max_length=manifest.max_length, pooling=model.pooling, need_pooled=False, need_tokens=True,
        )
        caps = [lengths[i] for i in picked]
        generate_answers(head, spec, items, max_new_tokens=caps, min_new_tokens=caps)
        return sum(caps)

    before = torch.get_num_threads()
    watch = CpuWatch()
    torch.set_num_threads(settings.decoder_threads)
    try:
        one_pass(0)  # warm-up
        tokens, start, i = 0, time.perf_counter(), 0
        while time.perf_counter() - start < settings.inprocess_seconds or tokens == 0:
            tokens += one_pass(i)
            i += batch
        rate = tokens / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return {"batch": batch, "tokens_per_s": rate, "torch_threads": settings.decoder_threads, **watch.stop()}


def deploy(bundle: Path, mode: str, settings: Settings) -> tuple[int, Any]:
    """The app with `decode: mode`; (port, the Decoder's handle)."""
    from ray import serve

    from polytask.serve import compose

    one = {"num_replicas": 1, **FAST_TEARDOWN}
    options = {
        "Ingress": {**one, "ray_actor_options": {"num_cpus": 0.5}},
        "Encoder": {**one, "ray_actor_options": {"num_cpus": 1}},
        f"head_{TASK}": {**one, "ray_actor_options": {"num_cpus": settings.decoder_cpus}},
        f"head_{CLASSIFY}": {**one, "ray_actor_options": {"num_cpus": 0.1}},
    }
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {
        "model": str(bundle),
        "max_new_tokens": max(settings.length_max, settings.abandon_length, settings.decoding_length),
        "generation_head_options": {"decode": mode, "threads": settings.decoder_threads},
    }
    serve.run(compose(args, options), name="polytask", route_prefix="/")
    return port, serve.get_deployment_handle(f"head_{TASK}", "polytask")


def served(
    bundle: Path, texts: list[str], lengths: list[int], mode: str, settings: Settings,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """One decode mode: every concurrency level, then the classification and abandon checks."""
    from ray import serve

    cores = usable_cores()
    port, head = deploy(bundle, mode, settings)
    base = f"http://127.0.0.1:{port}"
    body = {"inputs": texts[:1], "max_new_tokens": 4, "min_new_tokens": 4}
    asyncio.run(wait_ready(f"{base}/v1/tasks/{TASK}/predict", body))
    levels = []
    try:
        for conc in settings.concurrency:
            before = head.stats.remote().result()
            watch = CpuWatch()
            level = asyncio.run(
                stream_level(base, TASK, texts, lengths, conc, settings.duration_s, settings.max_requests)
            )
            level.update(watch.stop())
            after = head.stats.remote().result()
            level.update(busy=is_busy(level, cores), decoder=_decoder_delta(before, after))
            levels.append(level)
            log(
                f"  {mode:10s} c={conc:<3d} {level['tokens_per_s']:8.1f} tokens/s  "
                f"ttft p50 {level['ttft_ms']['p50'] or 0:.0f} ms  tpot p50 {level['tpot_ms']['p50'] or 0:.1f} ms  "
                f"errors {level['errors']}  load {level['load_before']}→{level['load_after']}"
                f"{'  BUSY' if level['busy'] else ''}"
            )
        out: dict[str, Any] = {"mode": mode, "levels": levels}
        out["abandoned"] = _abandoned(base, head, texts, settings)
        log(f"  {mode:10s} short decode after {settings.abandon_clients} abandoned: "
            f"{out['abandoned']['short_ms']:.0f} ms, rows left {out['abandoned']['rows_left']}")
        if mode == "continuous":
            out["classification"] = _classification(base, texts, settings)
            c = out["classification"]
            log(f"  classification p50 alone {c['alone']['p50_ms'] or 0:.0f} ms, beside "
                f"{settings.decoding_clients} decoders {c['beside']['p50_ms'] or 0:.0f} ms")
        return out
    finally:
        serve.delete("polytask")
        serve.shutdown()


def _decoder_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The Decoder's work during one level: steps, tokens, rows per step, time breakdown."""
    steps = after["steps"] - before["steps"]
    out: dict[str, Any] = {"steps": steps, "tokens": after["tokens"] - before["tokens"]}
    if "loop" in after:
        b, a = before["loop"], after["loop"]
        split = {k: a["breakdown_s"][k] - b["breakdown_s"][k] for k in a["breakdown_s"]}
        out["breakdown_ms_per_step"] = {k: 1000 * v / steps if steps else 0.0 for k, v in split.items()}
        busy = a["rows_per_step"] * a["steps"] - b["rows_per_step"] * b["steps"]
        out["rows_per_step"] = busy / steps if steps else 0.0
    else:
        decodes = after["batches"] - before["batches"]
        out["inputs_per_decode"] = (after["inputs"] - before["inputs"]) / decodes if decodes else None
    return out


def _abandoned(base: str, head: Any, texts: list[str], settings: Settings) -> dict[str, Any]:
    watch = CpuWatch()
    result = asyncio.run(
        after_abandoned(
            base, TASK, texts, settings.abandon_clients, settings.abandon_length, settings.hang_up_s,
            settings.short_tokens,
        )
    )
    result["rows_left"] = head.stats.remote().result()["in_flight"]
    result.update(watch.stop())
    return result


def _classification(base: str, texts: list[str], settings: Settings) -> dict[str, Any]:
    path = f"/v1/tasks/{CLASSIFY}/predict"

    def measure() -> Any:
        bodies = lambda i: {"inputs": [texts[i % len(texts)]]}
        return predict_latencies(base, path, bodies, settings.classify_clients, settings.classify_seconds)

    watch = CpuWatch()
    alone = asyncio.run(measure())
    alone.update(watch.stop())
    watch = CpuWatch()
    beside = asyncio.run(
        beside_decoders(base, measure, TASK, texts, settings.decoding_clients, settings.decoding_length)
    )
    beside.update(watch.stop())
    return {"alone": alone, "beside": beside, "decoding_clients": settings.decoding_clients}


def run_bench(
    settings: Settings, out: Path, texts_file: str | None = None, tiny: bool = False,
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
    lengths = draw_lengths(
        4096, settings.length_median, settings.length_sigma, settings.length_min, settings.length_max
    )
    cores = usable_cores()
    with tempfile.TemporaryDirectory(prefix="polytask-genbench-") as tmp:
        encoder = DEFAULT_ENCODER
        if tiny:
            from polytask.demo import write_tiny_encoder

            encoder = str(write_tiny_encoder(Path(tmp) / "tiny-encoder", vocab_size=150))
        bundle = build_bundle(Path(tmp) / "bundle", encoder, settings)
        log(f"bundle: {encoder} + untrained {settings.decoder_layers}-layer decoder + random classifier")
        local = [in_process(bundle, texts, lengths, c, settings) for c in settings.concurrency]
        for m in local:
            log(f"  in-process batch={m['batch']:<3d} {m['tokens_per_s']:8.1f} tokens/s")
        ray.init(num_cpus=cores + 2, include_dashboard=False, log_to_driver=False)
        try:
            modes = {mode: served(bundle, texts, lengths, mode, settings, log) for mode in settings.modes}
        finally:
            ray.shutdown()
    result = {
        "name": out.name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - started,
        "machine": machine_info(),
        "settings": asdict(settings),
        "texts": {"source": source, "count": len(texts)},
        "lengths": {"drawn": len(lengths), "mean": sum(lengths) / len(lengths), "max": max(lengths)},
        "model": {"encoder": encoder, "decoder": "new, untrained", "task": TASK, "classifier": CLASSIFY},
        "in_process": local,
        "served": modes,
    }
    result["targets"] = targets(result)
    write_results(result, out)
    log(f"results written to {out}/")
    return result


def _level(result: dict[str, Any], mode: str, conc: int) -> dict[str, Any] | None:
    runs = result["served"].get(mode, {}).get("levels", [])
    return next((r for r in runs if r["concurrency"] == conc), None)


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured value, whether it was met and whether the machine was quiet."""
    top = 32 if 32 in result["settings"]["concurrency"] else max(result["settings"]["concurrency"])
    cont, static = _level(result, "continuous", top), _level(result, "static", top)
    local = next(m for m in result["in_process"] if m["batch"] == top)
    out = []

    def add(name: str, value: float | None, at_most: bool, goal: float, runs: list[dict[str, Any]]) -> None:
        met = value is not None and (value <= goal if at_most else value >= goal)
        usable = not any(is_busy(r, result["machine"].get("cores") or usable_cores()) for r in runs)
        out.append({"name": name, "value": value, "goal": goal, "met": met, "usable": usable})

    if cont and static:
        add(f"continuous tokens/s ≥ {TARGETS['continuous_over_static']:g} times static at c={top}",
            cont["tokens_per_s"] / static["tokens_per_s"], False, TARGETS["continuous_over_static"], [cont, static])
    if cont:
        add(f"served (continuous) tokens/s ≥ {TARGETS['served_over_in_process']:g} times in-process generate at c={top}",
            cont["tokens_per_s"] / local["tokens_per_s"], False, TARGETS["served_over_in_process"], [cont, local])
    c = result["served"].get("continuous", {}).get("classification")
    if c and c["alone"]["p50_ms"] and c["beside"]["p50_ms"]:
        add(f"classification p50 beside {c['decoding_clients']} decoding clients ≤ "
            f"{TARGETS['classify_beside_decoders']:g} times alone",
            c["beside"]["p50_ms"] / c["alone"]["p50_ms"], True, TARGETS["classify_beside_decoders"],
            [c["alone"], c["beside"]])
    a = result["served"].get("continuous", {}).get("abandoned")
    if a:
        add(f"a {a['short']}-token decode after {a['clients']} abandoned {a['length']}-token ones, ms",
            a["short_ms"], True, TARGETS["short_after_abandoned_ms"], [a])
    return out


def write_results(result: dict[str, Any], out: Path) -> None:
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(markdown(result))


def _f(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    """The results tables (results.md, and the docs' benchmarks page through docs/gen_bench.py)."""
    s = result["settings"]
    lines = [
        "# Generation serving: continuous vs static decoding, beside in-process generate",
        "",
        (f"Output lengths drawn from a log-normal (median {s['length_median']:g}, σ {s['length_sigma']:g}, "
         f"clipped to {s['length_min']}–{s['length_max']}; mean {result['lengths']['mean']:.1f}); each "
         "request asks exactly its length. Served: streaming clients on "
         f"POST /v1/tasks/{TASK}/generate/stream over loopback HTTP, the Decoder with "
         f"{s['decoder_threads']} torch thread(s); in-process: encode + static `generate` in batches of "
         "the same size, same lengths, same threads. TTFT: time to first token; TPOT: time per "
         "output token after the first."),
        "",
        ("| c | in-process tokens/s | decode | tokens/s | TTFT p50 / p95 ms | TPOT p50 / p95 ms "
        "| rows per step (static: per decode) | errors | load before → after |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    local = {m["batch"]: m for m in result["in_process"]}
    for conc in s["concurrency"]:
        for mode in s["modes"]:
            r = _level(result, mode, conc)
            if r is None:
                continue
            d = r["decoder"]
            rows = d.get("rows_per_step", d.get("inputs_per_decode"))
            lines.append(
                f"| {conc} | {_f(local[conc]['tokens_per_s'], 1)} | {mode} | {_f(r['tokens_per_s'], 1)} | "
                f"{_f(r['ttft_ms']['p50'])} / {_f(r['ttft_ms']['p95'])} | "
                f"{_f(r['tpot_ms']['p50'], 1)} / {_f(r['tpot_ms']['p95'], 1)} | {_f(rows, 1)} | "
                f"{r['errors']} | {r['load_before']} → {r['load_after']}{' (busy)' if r['busy'] else ''} |"
            )
    lines += ["", ("Per-step time of the continuous Decoder (ms per step: forward, token choice, cache "
              "bookkeeping, whole step):"), "", "| c | forward | choice | bookkeeping | step |", "|---|---|---|---|---|"]
    for conc in s["concurrency"]:
        r = _level(result, "continuous", conc)
        if r and "breakdown_ms_per_step" in r["decoder"]:
            b = r["decoder"]["breakdown_ms_per_step"]
            lines.append(f"| {conc} | {_f(b['forward'], 1)} | {_f(b['pick'], 1)} | {_f(b['bookkeeping'], 1)} | {_f(b['total'], 1)} |")
    lines += ["", "| check | static | continuous |", "|---|---|---|"]
    ab = {m: result["served"][m].get("abandoned") for m in s["modes"]}
    lines.append(
        f"| {s['short_tokens']}-token decode after {s['abandon_clients']} clients hung up on "
        f"{s['abandon_length']}-token ones (ms; rows left) | "
        + " | ".join(f"{_f(a['short_ms'])}; {a['rows_left']}" if a else "–" for a in (ab.get("static"), ab.get("continuous")))
        + " |"
    )
    c = result["served"].get("continuous", {}).get("classification")
    if c:
        lines.append(
            f"| classification p50 ms, alone → beside {c['decoding_clients']} decoding clients | – | "
            f"{_f(c['alone']['p50_ms'])} → {_f(c['beside']['p50_ms'])} |"
        )
    lines += ["", "| target | value | met |", "|---|---|---|"]
    for t in result["targets"]:
        lines.append(f"| {t['name']} | {_f(t['value'], 2)} | "
                     f"{'met' if t['met'] else 'missed'}{'' if t['usable'] else ' (machine busy)'} |")
    lines += ["", machine_markdown(result["machine"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="results directory (default bench_results/generation_serve)")
    parser.add_argument("--texts", help="one text per line, or a TSV/CSV with a 'sentence' column")
    parser.add_argument("--tiny", action="store_true", help="smoke run: tiny random encoder, short levels")
    parser.add_argument("--concurrency", type=ints, help="comma-separated, default 1,8,32,64")
    parser.add_argument("--modes", help="comma-separated decode modes, default static,continuous")
    parser.add_argument("--duration", type=float, help="seconds per served level (20)")
    args = parser.parse_args(argv)
    settings = tiny_settings() if args.tiny else Settings()
    if args.concurrency:
        settings.concurrency = args.concurrency
    if args.modes:
        settings.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.duration:
        settings.duration_s = args.duration
    default = "generation_serve_tiny" if args.tiny else "generation_serve"
    out = Path(args.out or Path("bench_results") / default)
    try:
        result = run_bench(settings, out, args.texts, args.tiny)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for target in result["targets"]:
        print(f"{'met' if target['met'] else 'MISSED':7s} {target['name']}: {_f(target['value'], 2)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
