"""Serving benchmark: polytask vs two single-task HF pipelines vs the in-process limit.

    python jobs/bench/serve_bench.py                      # MiniLM-L6, SST-2 dev texts, ~11 min
    python jobs/bench/serve_bench.py --tiny --out /tmp/b  # smoke test, tiny random encoder
    python jobs/bench/serve_bench.py --model models:/polytask-demo@champion --texts my.txt

Writes results.json, results.md, throughput.png and latency.png under --out
(default bench_results/serve/). Loopback HTTP only; needs no network.
"""

from __future__ import annotations

import argparse
import sys

from polytask.bench import BenchError, ServeBenchSettings, run_serve_bench, tiny_settings


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--texts",
        help="one text per line, or a TSV/CSV with a 'sentence' column "
        "(default: ../shared/data/sst2/dev.tsv)",
    )
    parser.add_argument("--out", help="results directory (default bench_results/serve)")
    parser.add_argument(
        "--model",
        help="bundle dir or models:/ URI (default: packaged MiniLM-L6 "
        "with untrained sentiment + NER heads)",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny random encoder, few requests")
    parser.add_argument("--concurrency", type=_ints, help="comma-separated, default 1,4,16,64")
    parser.add_argument("--inputs-per-request", type=_ints, help="comma-separated, default 1,16")
    parser.add_argument("--duration", type=float, help="seconds per level (default 10)")
    parser.add_argument(
        "--rounds", type=int, help="rounds of (polytask, baseline); best per level (default 2)"
    )
    parser.add_argument("--requests", type=int, help="max requests per level (default 5000)")
    parser.add_argument(
        "--encoder-replicas", type=int, help="polytask Encoder replicas (default 2)"
    )
    parser.add_argument(
        "--encoder-threads",
        type=int,
        help="torch threads per polytask Encoder replica (default 1)",
    )
    parser.add_argument(
        "--baseline-threads",
        type=int,
        help="torch threads of each baseline pipeline replica (default 1)",
    )
    args = parser.parse_args(argv)
    settings = tiny_settings() if args.tiny else ServeBenchSettings()
    if args.rounds:
        settings.rounds = args.rounds
    if args.encoder_replicas:
        settings.encoder_replicas = args.encoder_replicas
    if args.encoder_threads:
        settings.encoder_threads = args.encoder_threads
    if args.baseline_threads:
        settings.baseline_threads = args.baseline_threads
    try:
        result = run_serve_bench(
            texts_file=args.texts,
            out_dir=args.out,
            model=args.model,
            tiny=args.tiny,
            concurrency=args.concurrency,
            inputs_per_request=args.inputs_per_request,
            duration_s=args.duration,
            requests=args.requests,
            settings=settings,
        )
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    targets = result["targets"]
    print(
        "polytask/baseline at peak:",
        {
            k: round(v, 2) if v else v
            for k, v in targets["speedup_vs_baseline"]["peak_by_inputs_per_request"].items()
        },
        "| polytask/limit:",
        round(targets["fraction_of_limit"]["value"] or 0, 2),
        "| errors:",
        targets["errors"]["value"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
