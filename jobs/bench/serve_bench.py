"""Serving benchmark: polytask against the two-HF-pipeline baseline, the no-op Serve app of the
same topology (the floor Serve allows a per-request pipeline) and the in-process limit, in one run;
then every Serve lever set and head placement beside the no-op floor under the same levers, and
overload levels that must be shed (503 + Retry-After) rather than queued.

    python jobs/bench/serve_bench.py --out bench_results/serve   # MiniLM-L6, SST-2 dev, ~13 min
    python jobs/bench/serve_bench.py --tiny --out /tmp/b          # smoke test, tiny random encoder
    python jobs/bench/serve_bench.py --model models:/polytask-demo@champion --texts my.txt
    python jobs/bench/serve_bench.py --lever-sets default,haproxy --placements with_encoder

Each lever set runs on its own local Ray (Serve reads the levers when its processes start); the
main sweep (every level, the three systems) runs under the first set, polytask's defaults.

Every level (inputs/request × concurrency) is driven by `loadgen.py` in its own process over
keep-alive connections on 127.0.0.1; the load average before and after each level and the CPU
other processes used meanwhile are recorded, and a level run on a busy machine is marked
unusable. Writes results.json, results.md, throughput.png and latency.png under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    build_demo_bundle,
    free_port,
    ints,
    is_busy,
    load_texts,
    machine_info,
    pick_tasks,
    usable_cores,
    wait_ready,
)

SYSTEMS = ("polytask", "noop", "baseline")
# Lever sets compared by default: polytask's defaults, none, each front-end/transport lever alone
# and everything Ray offers together. A set is `default`, `none` or levers joined with `+`.
LEVER_SETS = ("default", "none", "haproxy", "direct_ingress", "grpc", "throughput_optimized+haproxy")
PLACEMENTS = ("separate", "with_encoder")
ACCESS_LOG = {"enable_access_log": True}  # Serve's default, for measuring what turning it off saves


@dataclass
class Settings:
    """Everything that shapes the numbers; written into the results so a run can be repeated."""

    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    inputs_per_request: list[int] = field(default_factory=lambda: [1, 16])
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    duration_s: float = 10.0
    rounds: int = 1
    max_requests: int = 100_000
    warmup_requests: int = 8
    max_batch_size: int = 32
    baseline_batch_wait_s: float = 0.005
    max_ongoing_requests: int = 256
    encoder_replicas: int = 2
    encoder_threads: int = 1
    baseline_threads: int = 1
    limit_seconds: float = 4.0
    limit_texts: int | None = None
    loadgen_ceiling_s: float = 2.0
    access_log: bool = False
    polytask_args: dict[str, Any] = field(default_factory=dict)
    polytask_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    lever_sets: list[str] = field(default_factory=lambda: list(LEVER_SETS))
    placements: list[str] = field(default_factory=lambda: list(PLACEMENTS))
    # (inputs/request, concurrency) levels of the lever × placement comparison
    lever_levels: list[tuple[int, int]] = field(default_factory=lambda: [(1, 1), (1, 64), (16, 64)])
    lever_duration_s: float = 4.0
    overload_concurrency: list[int] = field(default_factory=lambda: [256, 1024])
    overload_max_ongoing: int = 64
    overload_max_queued: int = 64
    overload_duration_s: float = 6.0


def tiny_settings() -> Settings:
    """Smoke-test sizes: a second or two per level, a handful of requests."""
    return Settings(
        concurrency=[1, 4],
        duration_s=1.5,
        max_requests=12,
        warmup_requests=1,
        max_batch_size=16,
        encoder_replicas=1,
        limit_seconds=0.2,
        limit_texts=96,
        loadgen_ceiling_s=0.5,
        lever_sets=["default"],
        lever_levels=[(1, 4)],
        lever_duration_s=1.0,
        overload_concurrency=[],  # tests/test_serve_levers.py sheds on real Serve; --overload 48
    )


# --- the systems -------------------------------------------------------------------------------


def polytask_options(
    settings: Settings, placement: str = "separate", levers: list[str] | None = None
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(build_app args, deployment options): polytask's defaults, with the Encoder given the
    baseline's model CPU budget (replicas × threads) and one replica of everything else."""
    args = {
        "device": "cpu",
        "max_batch_size": settings.max_batch_size,
        "max_inputs_per_request": max(64, max(settings.inputs_per_request)),
        "head_options": {"num_replicas": 1, "placement": placement, **FAST_TEARDOWN},
        **({"levers": levers} if levers else {}),
    }
    options = {
        "Encoder": {
            "num_replicas": settings.encoder_replicas,
            "ray_actor_options": {"num_cpus": settings.encoder_threads, "num_gpus": 0},
            **FAST_TEARDOWN,
        },
        "Ingress": {"num_replicas": 1, **FAST_TEARDOWN},
    }
    args.update(settings.polytask_args)
    for name, extra in settings.polytask_options.items():
        options[name] = {**options.get(name, {}), **extra}
    return args, options


def sweep(
    port: int,
    system: str,
    paths: list[str],
    tasks: list[str] | None,
    texts: list[str],
    settings: Settings,
    log: Callable[[str], None],
    after_level: Callable[[], dict[str, Any]] | None = None,
    levels: list[tuple[int, int]] | None = None,
    duration_s: float | None = None,
) -> list[dict[str, Any]]:
    """Every (inputs per request, concurrency) level (default: all of settings') against one
    running system."""
    cores = usable_cores()
    runs = []
    if levels is None:
        levels = [(i, c) for i in settings.inputs_per_request for c in settings.concurrency]
    for ipr, conc in levels:
        before = after_level() if after_level else {}
        watch = CpuWatch()
        result = loadgen.level(
            {
                "host": "127.0.0.1",
                "port": port,
                "paths": paths,
                "tasks": tasks,
                "texts": texts,
                "concurrency": conc,
                "inputs_per_request": ipr,
                "duration_s": duration_s or settings.duration_s,
                "max_requests": settings.max_requests,
                "warmup_requests": min(settings.warmup_requests, conc),
            }
        )
        result.update(system=system, **watch.stop())
        result["busy"] = is_busy(result, cores)
        if after_level:
            after = after_level()
            batches = after.get("batches", 0) - before.get("batches", 0)
            if batches > 0:
                result["requests_per_ingress_batch"] = (
                    after["jobs"] - before["jobs"]
                ) / batches
        runs.append(result)
        lat = result["latency_ms"]
        log(
            f"  {system:8s} inputs/request={ipr:<3d} c={conc:<3d} "
            f"{result['throughput_inputs_per_s']:8.1f} inputs/s  p50={_fmt(lat['p50'])} "
            f"p99={_fmt(lat['p99'])} ms  errors={result['errors']}  shed={result['shed']}  load "
            f"{result['load_before']}→{result['load_after']}, others "
            f"{result.get('other_cores', '-')} cores{'  BUSY' if result['busy'] else ''}"
            + (
                f"  requests/batch {result['requests_per_ingress_batch']:.1f}"
                if "requests_per_ingress_batch" in result
                else ""
            )
        )
    return runs


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _target_port(app: str, port: int) -> int:
    """Where the load goes: the Ingress replica's own port under direct ingress (no proxy on the
    path), else the HTTP port (Serve's proxy, or HAProxy)."""
    import ray
    from ray.serve._private.common import RequestProtocol
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller
    for group in ray.get(controller.get_target_groups.remote(app)):
        if group.protocol == RequestProtocol.HTTP and group.targets:
            return group.targets[0].port
    return port


def bench_polytask(
    port,
    bundle,
    tasks,
    texts,
    settings,
    log,
    *,
    label: str = "polytask",
    placement: str = "separate",
    levers: list[str] | None = None,
    levels: list[tuple[int, int]] | None = None,
    duration_s: float | None = None,
    extra_options: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    from ray import serve

    from polytask.serve import compose

    args, options = polytask_options(settings, placement, levers)
    names = ("Ingress", "Encoder", *(f"head_{t}" for t in tasks if placement == "separate"))
    if settings.access_log:
        for name in names:
            options[name] = {**options.get(name, {}), "logging_config": ACCESS_LOG}
    for name, extra in (extra_options or {}).items():
        options[name] = {**options.get(name, {}), **extra}
    try:
        serve.run(
            compose({"model": str(bundle), **args}, options), name="polytask", route_prefix="/"
        )
        target = _target_port("polytask", port)
        url = f"http://127.0.0.1:{target}"
        asyncio.run(wait_ready(f"{url}/v1/predict", {"inputs": texts[:2], "tasks": tasks}))
        ingress = serve.get_deployment_handle("Ingress", "polytask")

        def ingress_stats() -> dict[str, Any]:
            return ingress.stats.remote().result()

        runs = sweep(
            target, label, ["/v1/predict"], tasks, texts, settings, log, ingress_stats, levels,
            duration_s,
        )
        return [{**r, "placement": placement} for r in runs]
    finally:
        serve.delete("polytask")


def bench_noop(
    port,
    tasks,
    texts,
    settings,
    log,
    *,
    label: str = "noop",
    levels: list[tuple[int, int]] | None = None,
    duration_s: float | None = None,
) -> list[dict[str, Any]]:
    from noop_app import noop_app
    from ray import serve

    from polytask.serve.app import DEFAULT_LOGGING

    common = {"logging_config": DEFAULT_LOGGING, "max_ongoing_requests": 256, **FAST_TEARDOWN}
    cpus = {"Encoder": settings.encoder_threads, "Ingress": 0.5, "head": 0.25}  # as polytask's
    options = {
        name: {
            **common,
            "num_replicas": settings.encoder_replicas if name == "Encoder" else 1,
            "ray_actor_options": {"num_cpus": n},
        }
        for name, n in cpus.items()
    }
    try:
        serve.run(noop_app(tasks, options), name="noop", route_prefix="/")
        target = _target_port("noop", port)
        url = f"http://127.0.0.1:{target}/v1/predict"
        asyncio.run(wait_ready(url, {"inputs": texts[:2], "tasks": tasks}))
        return sweep(
            target, label, ["/v1/predict"], tasks, texts, settings, log, None, levels, duration_s
        )
    finally:
        serve.delete("noop")


def bench_baseline(port, exported, texts, settings, log) -> list[dict[str, Any]]:
    from baseline import baseline_targets
    from ray import serve

    targets = baseline_targets(exported, settings)
    try:
        serve.run_many(targets)
        routes = [t.route_prefix for t in targets]
        for route in routes:
            asyncio.run(wait_ready(f"http://127.0.0.1:{port}{route}", {"inputs": texts[:2]}))
        return sweep(port, "baseline", routes, None, texts, settings, log)
    finally:
        for target in targets:
            serve.delete(target.name)


# --- orchestration ------------------------------------------------------------------------------


def lever_names(lever_set: str) -> list[str]:
    """`default` → polytask's default levers, `none` → [], else the `+`-joined names."""
    from polytask.serve.levers import DEFAULT_LEVERS, LEVERS

    if lever_set == "default":
        return list(DEFAULT_LEVERS)
    if lever_set == "none":
        return []
    names = [n.strip() for n in lever_set.split("+") if n.strip()]
    unknown = sorted(set(names) - set(LEVERS))
    if unknown:
        raise BenchError(
            f"--lever-sets: unknown lever {unknown}; levers: {', '.join(LEVERS)} (or default, none)"
        )
    return names


@contextmanager
def serve_under(levers: list[str], settings: Settings) -> Iterator[int]:
    """A local Ray started with exactly these levers' env (and no other lever's) and Serve on a
    free port; both go when the block ends."""
    import ray
    from ray import serve

    from polytask.serve.app import DEFAULT_LOGGING
    from polytask.serve.levers import LEVERS, apply_levers

    keys = {k for lever in LEVERS.values() for k in lever.env}
    saved = {k: os.environ.pop(k) for k in keys if k in os.environ}
    try:
        apply_levers(levers)
        ray.init(
            num_cpus=max(
                4,
                settings.encoder_replicas * settings.encoder_threads + 2,
                2 * settings.baseline_threads,
            ),
            include_dashboard=False,
            log_to_driver=False,
        )
        port = free_port()
        serve.start(
            http_options={"host": "127.0.0.1", "port": port},
            logging_config=ACCESS_LOG if settings.access_log else DEFAULT_LOGGING,
        )
        yield port
    finally:
        ray.shutdown()  # Serve and every replica go with the Ray started here
        for k in keys:
            os.environ.pop(k, None)
        os.environ.update(saved)


def _lever_set_runs(
    main: bool,
    lever_set: str,
    levers: list[str],
    port: int,
    bundle: Path,
    exported: dict[str, Any],
    tasks: list[str],
    texts: list[str],
    settings: Settings,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Under the main (first) lever set: every system at every level and the overload levels;
    then, under every set, each placement and the no-op floor at the lever levels."""
    runs = []
    short = {"levels": settings.lever_levels, "duration_s": settings.lever_duration_s}
    if main:
        for system in settings.systems:
            if system == "polytask":
                runs += bench_polytask(port, bundle, tasks, texts, settings, log, levers=levers)
            elif system == "noop":
                runs += bench_noop(port, tasks, texts, settings, log)
            else:
                runs += bench_baseline(port, exported, texts, settings, log)
        if "polytask" in settings.systems and settings.overload_concurrency:
            shed = {
                "max_ongoing_requests": settings.overload_max_ongoing,
                "max_queued_requests": settings.overload_max_queued,
            }
            runs += bench_polytask(
                port, bundle, tasks, texts, settings, log, label="polytask[overload]",
                levers=levers, extra_options={"Ingress": shed},
                levels=[(1, c) for c in settings.overload_concurrency],
                duration_s=settings.overload_duration_s,
            )
    for placement in settings.placements:
        if main and placement == "separate" and "polytask" in settings.systems:
            continue  # the main sweep measured it
        runs += bench_polytask(
            port, bundle, tasks, texts, settings, log, label=f"polytask[{lever_set}, {placement}]",
            placement=placement, levers=levers, **short,
        )
    if not (main and "noop" in settings.systems):
        runs += bench_noop(port, tasks, texts, settings, log, label=f"noop[{lever_set}]", **short)
    return runs


def run_serve_bench(
    settings: Settings,
    out: Path,
    texts_file: str | None = None,
    model: str | None = None,
    tiny: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Limit, loadgen ceiling, then every lever set on its own local Ray (every system under the
    first); writes and returns results."""
    import ray
    from baseline import export_hf_models
    from limit import ParallelLimit, measure_limit
    from report import best_of_rounds, compute, write_results

    from polytask.model.bundle import read_manifest
    from polytask.tracking.registry import resolve_bundle

    unknown = sorted(set(settings.systems) - set(SYSTEMS))
    if unknown:
        raise BenchError(f"--systems: unknown {unknown}; choose from {', '.join(SYSTEMS)}")
    unknown = sorted(set(settings.placements) - set(PLACEMENTS))
    if unknown or not settings.lever_sets:
        raise BenchError(
            f"--placements: unknown {unknown}; choose from {', '.join(PLACEMENTS)}"
            if unknown else "--lever-sets: give at least one"
        )
    for lever_set in settings.lever_sets:
        lever_names(lever_set)
    texts, texts_source = load_texts(texts_file, tiny)
    for key, value in (
        ("TOKENIZERS_PARALLELISM", "false"),
        ("HF_HUB_OFFLINE", "1"),
        ("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0"),
    ):
        os.environ.setdefault(key, value)
    started = time.perf_counter()
    outer_log = log

    def log(message: str) -> None:
        outer_log(f"[{time.perf_counter() - started:4.0f}s] {message}")

    cores = usable_cores()
    with tempfile.TemporaryDirectory(prefix="polytask-bench-") as tmp:
        tmp_path = Path(tmp)
        if model is None:
            encoder = DEFAULT_ENCODER
            if tiny:
                from polytask.demo import write_tiny_encoder

                encoder = str(write_tiny_encoder(tmp_path / "tiny-encoder", vocab_size=150))
            log(f"building a demo bundle from {encoder}")
            bundle = build_demo_bundle(tmp_path / "bundle", encoder)
            model_desc = {"encoder": encoder, "heads": "untrained (random), seed 0"}
        else:
            bundle = resolve_bundle(model)
            model_desc = {"model": model, "bundle": str(bundle)}
        max_length = read_manifest(bundle).max_length
        tasks = list(pick_tasks(bundle))
        exported = export_hf_models(bundle, tmp_path / "hf")
        limit_texts = texts[: settings.limit_texts] if settings.limit_texts else texts
        parallel = ParallelLimit(str(bundle), cores) if cores > 1 else None

        def limit_once() -> dict[str, Any]:
            log(f"in-process limit on {len(limit_texts)} texts (1 and {cores} processes)")
            watch = CpuWatch()
            found = measure_limit(
                bundle, limit_texts, tasks, settings.max_batch_size, settings.limit_seconds, parallel
            )
            found.update(watch.stop())
            found["busy"] = is_busy(found, cores)
            log(f"  limit {found['inputs_per_s']:.1f} inputs/s ({found['config']})")
            return found

        limits = [limit_once()]
        log("load generator ceiling against a trivial server")
        ceiling = loadgen.ceiling(
            max(settings.concurrency), settings.loadgen_ceiling_s, free_port()
        )
        log(f"  {ceiling['requests_per_s']:.0f} requests/s at c={ceiling['concurrency']}")
        if ray.is_initialized():
            raise BenchError("run the benchmark on its own Ray: each lever set starts one")
        all_runs: list[dict[str, Any]] = []
        for round_ in range(settings.rounds):
            for i, lever_set in enumerate(settings.lever_sets):
                levers = lever_names(lever_set)
                log(f"round {round_ + 1} of {settings.rounds}, levers {lever_set}")
                with serve_under(levers, settings) as port:
                    runs = _lever_set_runs(
                        i == 0, lever_set, levers, port, bundle, exported, tasks, texts, settings, log
                    )
                all_runs += [{**r, "round": round_, "levers": lever_set} for r in runs]
        limits.append(limit_once())
        if parallel is not None:
            parallel.close()
    limit = max(limits, key=lambda m: m["inputs_per_s"])
    limit["measurements"] = [m["inputs_per_s"] for m in limits]
    args, options = polytask_options(settings, "separate", lever_names(settings.lever_sets[0]))
    result: dict[str, Any] = {
        "name": out.name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - started,
        "machine": machine_info(),
        "settings": asdict(settings),
        "texts": {"source": texts_source, "count": len(texts)},
        "model": {**model_desc, "tasks": tasks, "max_length": max_length},
        "systems": {
            "polytask": {
                "what": "POST /v1/predict asking for both tasks: HTTP proxy → Ingress (batches "
                "concurrent requests) → Encoder (one call per Ingress batch, length-sorted "
                "passes) → one call per Head deployment per batch",
                "build_app_args": args,
                "deployment_options": options,
            },
            "noop": {
                "what": "the same topology with no model work and no batching: one Ingress → "
                "Encoder → two Heads call chain per request (the floor of a per-request design)",
            },
            "polytask[LEVERS, PLACEMENT] / noop[LEVERS]": {
                "what": "the same apps on a Ray started with those Serve levers (default: "
                "polytask's; none; or the named ones), heads in their own deployments (separate) "
                "or inside the Encoder (with_encoder), at the lever levels; under direct ingress "
                "the load goes to the Ingress replica's own port",
            },
            "polytask[overload]": {
                "what": f"polytask with the Ingress's max_ongoing_requests="
                f"{settings.overload_max_ongoing} and max_queued_requests="
                f"{settings.overload_max_queued}: clients past what it admits get 503 + "
                "Retry-After at once (shed), the admitted ones' latency is reported",
            },
            "baseline": {
                "what": "two single-task transformers pipelines (text-classification; "
                "token-classification, aggregation_strategy='first'), each its own Serve "
                "deployment on its own route, 1 replica, Serve batching; the client sends both "
                "requests per input batch concurrently and counts the batch done when both answered",
                "models": {
                    t: {k: v for k, v in i.items() if k != "path"} for t, i in exported.items()
                },
            },
        },
        "loadgen_ceiling": ceiling,
        "limit": limit,
        "all_runs": all_runs,
        "runs": best_of_rounds(all_runs),
    }
    result.update(compute(result))
    write_results(result, out)
    log(f"results written to {out}/")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", help="one text per line, or a TSV/CSV with a 'sentence' column")
    parser.add_argument("--out", help="results directory (default bench_results/serve)")
    parser.add_argument("--model", help="bundle dir or models:/ URI (default: MiniLM-L6 demo)")
    parser.add_argument("--tiny", action="store_true", help="tiny random encoder, few requests")
    parser.add_argument("--concurrency", type=ints, help="comma-separated, default 1,4,16,64")
    parser.add_argument("--inputs-per-request", type=ints, help="comma-separated, default 1,16")
    parser.add_argument("--systems", help=f"comma-separated subset of {','.join(SYSTEMS)}")
    parser.add_argument("--duration", type=float, help="seconds per level (default 10)")
    parser.add_argument("--rounds", type=int, help="sweeps of every system; best per level")
    parser.add_argument("--encoder-replicas", type=int, help="polytask Encoder replicas (2)")
    parser.add_argument(
        "--access-log", action="store_true", help="Serve's per-request access log on (polytask)"
    )
    parser.add_argument("--limit-seconds", type=float, help="seconds per limit measurement (4)")
    parser.add_argument(
        "--lever-sets",
        help=f"comma-separated lever sets, the first runs the main sweep (default "
        f"{','.join(LEVER_SETS)}); a set is default, none or levers joined with +",
    )
    parser.add_argument("--placements", help="comma-separated subset of separate,with_encoder")
    parser.add_argument(
        "--lever-levels", help="comma-separated INPUTS@CONCURRENCY levels of the lever comparison"
    )
    parser.add_argument(
        "--overload", type=ints, help="comma-separated overload concurrencies (256,1024); 0: none"
    )
    parser.add_argument(
        "--polytask-args",
        type=json.loads,
        help="JSON merged into the app args, e.g. '{\"ingress_batches_in_flight\": 1}'",
    )
    parser.add_argument(
        "--polytask-options",
        type=json.loads,
        help="JSON {deployment: options} merged into polytask's deployment options",
    )
    args = parser.parse_args(argv)
    settings = tiny_settings() if args.tiny else Settings()
    for name in (
        "concurrency",
        "inputs_per_request",
        "rounds",
        "encoder_replicas",
        "limit_seconds",
        "access_log",
        "polytask_args",
        "polytask_options",
    ):
        if getattr(args, name):
            setattr(settings, name, getattr(args, name))
    if args.duration:
        settings.duration_s = args.duration
    if args.systems:
        settings.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if args.lever_sets:
        settings.lever_sets = [s.strip() for s in args.lever_sets.split(",") if s.strip()]
    if args.placements:
        settings.placements = [s.strip() for s in args.placements.split(",") if s.strip()]
    if args.lever_levels:
        settings.lever_levels = [
            (int(i), int(c)) for i, c in (x.split("@") for x in args.lever_levels.split(","))
        ]
    if args.overload is not None:
        settings.overload_concurrency = [c for c in args.overload if c > 0]
    out = Path(args.out or Path("bench_results") / ("serve_tiny" if args.tiny else "serve"))
    try:
        result = run_serve_bench(settings, out, args.texts, args.model, args.tiny)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for target in result["targets"]:
        print(f"{'met' if target['met'] else 'MISSED':7s} {target['name']}: {target['shown']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
