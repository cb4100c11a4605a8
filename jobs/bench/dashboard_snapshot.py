"""Render the Grafana dashboard's panels from a real run, without Grafana or Prometheus.

Serves the packaged MiniLM demo bundle (untrained heads) with `polytask.serve.run_server` and
serve_configs/local.yaml on a local Ray that exports metrics every second, drives it with
jobs/bench/loadgen.py (two phases: both tasks at low concurrency, then one task under heavier
load) plus a trickle of bad requests, scrapes Ray's /metrics endpoint every second, and evaluates
each panel query of k8s/monitoring/grafana-dashboard.json over those scrapes in Python (the small
PromQL subset the dashboard uses; rate windows of --window-s instead of $__rate_interval).

    python jobs/bench/dashboard_snapshot.py --out bench_results/dashboard
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
DASHBOARD = ROOT / "k8s" / "monitoring" / "grafana-dashboard.json"
LEVEL_KEYS = ("concurrency", "inputs_per_request", "ok_requests", "errors", "requests_per_s",
              "latency_ms")  # fmt: skip

Labels = tuple[tuple[str, str], ...]
Scrape = dict[str, list[tuple[dict[str, str], float]]]  # sample name → (labels, value)


def parse_scrape(text: str) -> Scrape:
    from prometheus_client.parser import text_string_to_metric_families

    out: Scrape = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name].append((dict(sample.labels), float(sample.value)))
    return out


def queried_metrics(dashboard: dict[str, Any]) -> set[str]:
    """Every metric name a panel query reads (what a running app must export)."""
    names = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names |= set(re.findall(r"\b(ray_[a-z0-9_]+)", target["expr"]))
    return names


# --- the PromQL subset of the dashboard --------------------------------------------------------

_SEL = r"(?P<metric>\w+)(?:\{(?P<sel>[^}]*)\})?"
_SUM = r"sum(?: by \((?P<by>[^)]*)\))? \("
RATE_SUM = re.compile(rf"^{_SUM}rate\({_SEL}\[[^\]]+\]\)\)$")
GAUGE_SUM = re.compile(rf"^{_SUM}{_SEL}\)$")
QUANTILE = re.compile(r"^histogram_quantile\((?P<q>[0-9.]+), (?P<inner>.*)\)$")


def _matches(labels: dict[str, str], sel: str | None) -> bool:
    for key, value in re.findall(r'(\w+)="([^"]*)"', sel or ""):
        if labels.get(key) != value:
            return False
    return True


def _group(labels: dict[str, str], by: list[str]) -> Labels:
    return tuple((k, labels.get(k, "")) for k in by)


class Series:
    """The scrapes of one run: (time, parsed scrape) each; queries are evaluated at one index."""

    def __init__(self, scrapes: list[tuple[float, Scrape]], window_s: float) -> None:
        self.scrapes = scrapes
        self.window_s = window_s

    def _rate_sum(self, metric: str, sel: str | None, by: list[str], i: int) -> dict[Labels, float]:
        now_t, now = self.scrapes[i]
        j = i
        while j > 0 and now_t - self.scrapes[j - 1][0] <= self.window_s:
            j -= 1
        then_t, then = self.scrapes[j]
        if now_t <= then_t:
            return {}
        before = {tuple(sorted(lab.items())): v for lab, v in then.get(metric, [])}
        out: dict[Labels, float] = defaultdict(float)
        for labels, value in now.get(metric, []):
            if not _matches(labels, sel):
                continue
            old = before.get(tuple(sorted(labels.items())), 0.0)
            out[_group(labels, by)] += max(value - old, 0.0) / (now_t - then_t)
        return dict(out)

    def evaluate(self, expr: str, i: int) -> dict[Labels, float]:
        quantile = QUANTILE.match(expr)
        if quantile:
            inner = RATE_SUM.match(quantile["inner"])
            assert inner, expr
            by = [b.strip() for b in inner["by"].split(",")]
            return _histogram_quantile(
                float(quantile["q"]), self._rate_sum(inner["metric"], inner["sel"], by, i), by
            )
        if " / " in expr:
            top, bottom = expr.split(" / ")
            num, den = self.evaluate(top, i), self.evaluate(bottom, i)
            return {k: num[k] / den[k] for k in num if den.get(k)}
        rate = RATE_SUM.match(expr)
        if rate:
            by = [b.strip() for b in (rate["by"] or "").split(",") if b.strip()]
            return self._rate_sum(rate["metric"], rate["sel"], by, i)
        gauge = GAUGE_SUM.match(expr)
        assert gauge, f"not in the dashboard's PromQL subset: {expr}"
        by = [b.strip() for b in (gauge["by"] or "").split(",") if b.strip()]
        out: dict[Labels, float] = defaultdict(float)
        for labels, value in self.scrapes[i][1].get(gauge["metric"], []):
            if _matches(labels, gauge["sel"]):
                out[_group(labels, by)] += value
        return dict(out)


def _histogram_quantile(q: float, rates: dict[Labels, float], by: list[str]) -> dict[Labels, float]:
    """Prometheus's histogram_quantile: linear interpolation inside the bucket holding rank q."""
    groups: dict[Labels, list[tuple[float, float]]] = defaultdict(list)
    for labels, value in rates.items():
        d = dict(labels)
        groups[tuple((k, d[k]) for k in by if k != "le")].append((float(d["le"]), value))
    out = {}
    for key, buckets in groups.items():
        buckets.sort()
        total = buckets[-1][1]
        if total <= 0:
            continue
        rank, lower, below = q * total, 0.0, 0.0
        for upper, count in buckets:
            if count >= rank:
                if math.isinf(upper):
                    out[key] = lower
                else:
                    share = (rank - below) / (count - below) if count > below else 0.0
                    out[key] = lower + (upper - lower) * share
                break
            lower, below = upper, count
    return out


def legend(fmt: str, labels: Labels) -> str:
    d = dict(labels)
    return re.sub(r"\{\{(\w+)\}\}", lambda m: d.get(m[1], ""), fmt)


# --- the run -----------------------------------------------------------------------------------


def run(
    out: Path, duration_s: float, window_s: float, encoder: str, texts_path: str | None
) -> dict[str, Any]:
    import tempfile

    import httpx
    import ray
    from common import build_demo_bundle, default_texts_file, free_port, load_1min, read_texts
    from loadgen import level

    from polytask.serve import run_server

    out.mkdir(parents=True, exist_ok=True)
    bundle = build_demo_bundle(Path(tempfile.mkdtemp()) / "bundle", encoder, max_length=64)
    texts_file = texts_path or default_texts_file()
    texts = read_texts(texts_file)[:500] if texts_file else ["the movie was great"] * 50
    metrics_port, http_port = free_port(), free_port()
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 1000},
    )
    load_before = load_1min()
    url = run_server(
        str(bundle),
        config_path=ROOT / "serve_configs" / "local.yaml",
        port=http_port,
        blocking=False,
    )
    client = httpx.Client(base_url=url, timeout=60, trust_env=False)
    client.post("/v1/predict", json={"inputs": texts[:2]}).raise_for_status()
    scrapes: list[tuple[float, Scrape]] = []
    stop = threading.Event()
    began = time.time()

    def scrape() -> None:
        while not stop.is_set():
            text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
            scrapes.append((time.time() - began, parse_scrape(text)))
            stop.wait(1.0)

    def bad_requests() -> None:
        bodies = [
            ("/v1/predict", {"inputs": ["a"], "tasks": ["nope"]}),  # 404 unknown_task
            ("/v1/predict", {"inputs": ["a"] * 40}),  # 413 too_many_inputs
            ("/v1/predict", {"inputs": ["\u200b"]}),  # 422 empty_text
        ]
        while not stop.is_set():
            for path, body in bodies:
                client.post(path, json=body)
            client.post("/v1/predict", content=b"x", headers={"content-type": "text/plain"})
            stop.wait(2.0)

    threads = [threading.Thread(target=f, daemon=True) for f in (scrape, bad_requests)]
    for t in threads:
        t.start()
    phase = duration_s / 3
    base = {"host": "127.0.0.1", "port": http_port, "paths": ["/v1/predict"], "texts": texts,
            "max_requests": 10**9, "check": True}  # fmt: skip
    both = {"tasks": ["sentiment", "ner"], "concurrency": 2, "inputs_per_request": 1}
    one = {"tasks": ["sentiment"], "concurrency": 16, "inputs_per_request": 4}
    levels = [level({**base, **load, "duration_s": phase}) for load in (both, one)]
    time.sleep(phase)  # idle: rates fall back, replicas stay until their downscale delay
    stop.set()
    for t in threads:
        t.join(timeout=15)
    load_after = load_1min()
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    return {
        "scrapes": scrapes,
        "levels": levels,
        "load_1min": [load_before, load_after],
        "phases_s": [0, phase, 2 * phase, 3 * phase],
    }


def render(result: dict[str, Any], window_s: float, png: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard = json.loads(DASHBOARD.read_text())
    series = Series(result["scrapes"], window_s)
    times = [t for t, _ in result["scrapes"]]
    panels = dashboard["panels"]
    rows = math.ceil(len(panels) / 2)
    fig, axes = plt.subplots(rows, 2, figsize=(14, 3.2 * rows), squeeze=False)
    empty = []
    for ax, panel in zip(axes.flat, panels):
        lines: dict[str, list[float]] = {}
        for target in panel["targets"]:
            for i in range(len(times)):
                for labels, value in series.evaluate(target["expr"], i).items():
                    name = legend(target["legendFormat"], labels)
                    lines.setdefault(name, [math.nan] * len(times))[i] = value
        for name, values in sorted(lines.items()):
            ax.plot(times, values, label=name)
        if not lines:
            empty.append(panel["title"])
        for edge in result["phases_s"][1:-1]:
            ax.axvline(edge, color="grey", linestyle=":", linewidth=1)
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xlabel("s since start", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7, loc="upper left")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    load = result["load_1min"]
    fig.suptitle(
        "polytask serving dashboard, rendered by jobs/bench/dashboard_snapshot.py from a real "
        f"run's scrapes of Ray's /metrics (not by Grafana); rate window {window_s:g} s\n"
        "phases (dotted): 2 clients x both tasks | 16 clients x sentiment, 4 inputs | idle; "
        f"bad requests every 2 s; load average {load[0]} → {load[1]}",
        fontsize=9,
    )
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    return empty


def main() -> None:
    from common import DEFAULT_ENCODER, default_texts_file, shown_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "dashboard")
    parser.add_argument("--duration-s", type=float, default=90.0, help="three equal phases")
    parser.add_argument("--window-s", type=float, default=10.0, help="rate() window")
    parser.add_argument("--encoder", default=DEFAULT_ENCODER)
    parser.add_argument("--texts", help="one text per line or SST-2 TSV (default: SST-2 dev if found)")
    args = parser.parse_args()
    result = run(args.out, args.duration_s, args.window_s, args.encoder, args.texts)
    empty = render(result, args.window_s, args.out / "dashboard.png")
    summary = {
        "scrapes": len(result["scrapes"]),
        "texts": shown_path(texts) if (texts := args.texts or default_texts_file())
        else "'the movie was great' x 50",
        "load_1min_before_after": result["load_1min"],
        "levels": [
            {k: lv[k] for k in LEVEL_KEYS} for lv in result["levels"]
        ],
        "panels_without_data": empty,
    }
    (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
