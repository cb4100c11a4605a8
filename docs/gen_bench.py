"""Benchmark tables from bench_results/: the one place a measured figure becomes text.

The docs hook puts each section where docs/benchmarks.md says `<!-- bench:NAME -->`;
`python docs/gen_bench.py` prints them all. Prose never repeats a figure (tests/test_docs.py).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench_results"
IGNORED = ("tmp",)  # bench_results/tmp/: scratch output of the benchmarks, never published


@dataclass
class Section:
    """One benchmark's tables, and the result files they were read from."""

    markdown: str
    sources: list[Path] = field(default_factory=list)


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _bench_module(name: str) -> Any:
    """A jobs/bench module that renders its own benchmark (it also writes its results.md)."""
    import importlib

    bench = str(ROOT / "jobs" / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return importlib.import_module(name)


def _demote(markdown: str, levels: int = 2) -> str:
    """Headings of a stand-alone report, nested under the page's own (its title line dropped)."""
    lines = markdown.splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return "\n".join("#" * levels + line if line.startswith("#") else line for line in lines)


def _table(header: list[str], rows: list[list[Any]], align: str = "") -> str:
    align = align or "---" + " | ---:" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + align + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _pct(value: float) -> str:
    return f"{value:.0%}"


def serve(root: Path) -> Section:
    path = root / "serve" / "results.json"
    return Section(_demote(_bench_module("report").markdown(_load(path))), [path])


def generation_serve(root: Path) -> Section:
    path = root / "generation_serve" / "results.json"
    return Section(_demote(_bench_module("generation_serve_bench").markdown(_load(path))), [path])


def _not_run(command: str) -> Section:
    """What a page shows where a benchmark has no results yet: the command that makes them."""
    return Section(f"*No results yet; `{command}` writes them.*")


def generation_quality(root: Path) -> Section:
    path = root / "generation_quality" / "results.json"
    if not path.is_file():
        return _not_run("python jobs/bench/generation_quality.py --data ../shared/data --threads 1")
    return Section(_demote(_bench_module("generation_quality").markdown(_load(path))), [path])


def generation_curves(root: Path) -> Section:
    path = root / "generation_quality" / "learning_curves.json"
    if not path.is_file():
        return _not_run("python jobs/bench/generation_curves.py --data ../shared/data --threads 1")
    return Section(_bench_module("generation_curves").markdown(_load(path)), [path])


def metrics_cost(root: Path) -> Section:
    """CPU ms per answered request, by process, without (before*) and with (after*) metrics."""
    paths = sorted((root / "metrics_cost").glob("*/results.json"),
                   key=lambda p: (not p.parent.name.startswith("before"), p.parent.name))
    runs = {p.parent.name: _load(p) for p in paths}
    picked = {n: next(r for r in res["runs"] if r["system"] == "polytask") for n, res in runs.items()}
    procs = sorted({p for r in picked.values() for p in r["cpu_s_by_process"]})
    shown = [p for p in procs if p.startswith("ray::ServeReplica") or p == "ray::ProxyActor"]

    def ms(run: dict[str, Any], cpu_s: float) -> str:
        return f"{cpu_s / run['ok_requests'] * 1000:.2f}"

    rows = [[p.removeprefix("ray::")] + [ms(r, r["cpu_s_by_process"].get(p, 0.0))
                                        for r in picked.values()] for p in shown]
    rows.append(["all processes"] + [ms(r, sum(r["cpu_s_by_process"].values()))
                                     for r in picked.values()])
    rows.append(["throughput, inputs/s"] + [f"{r['throughput_inputs_per_s']:.1f}"
                                           for r in picked.values()])
    settings = next(iter(runs.values()))["settings"]
    text = (
        f"CPU ms per answered request at {settings['inputs_per_request'][0]} input/request, "
        f"c={settings['concurrency'][0]}; `before*` record no metrics, `after*` record them.\n\n"
        + _table(["process", *picked], rows)
    )
    return Section(text, paths)


def batch(root: Path) -> Section:
    paths = sorted((root / "batch").glob("results*.json"))
    rows = []
    for path in paths:
        r = _load(path)
        rd, ratios = r["ray_data"], r["ratios"]
        http = r.get("http_rows_per_s")
        rows.append([
            f"`{path.name}`", f"{r['rows']:,}", f"{r['limit']['rows_per_s']:.0f}",
            f"{rd['rows_per_s']:.0f}", _pct(ratios["ray_data_vs_limit"]),
            f"{_pct(ratios['ray_data_with_ray_start_vs_limit'])} ({rd['ray_start_s']:.1f} s)",
            "-" if http is None else f"{http:.0f} ({ratios['ray_data_vs_http']:.2f}×)",
            f"{r['load_1min']['before']:.2f} / {r['load_1min']['after_ray_data']:.2f}",
        ])
    header = ["result", "rows", "limit, rows/s", "`--input`, rows/s", "vs limit",
              "counting the Ray start", "HTTP rows/s (`--input` ×)", "load before / after"]
    return Section(_table(header, rows), paths)


def ingest(root: Path) -> Section:
    path = root / "ingest" / "results.json"
    r = _load(path)
    scales = r["results"]
    rows = [[f"×{s['scale']}", f"{s['train_rows']:,}", f"{s['train_file_mb']:.1f}",
             f"{s['driver_peak_rss_mb']:.1f}", f"{s['samples_per_s']:.1f}", f"{s['scan_s']:.1f}"]
            for s in scales]
    header = ["scale", "train rows", "file MB", "driver peak RSS MB", "samples/s", "scan s"]
    t, ratio, met = r["targets"], r["ratios"], r["met"]
    verdict = (
        f"Driver RSS ×{scales[-1]['scale']} / ×{scales[0]['scale']}: **{ratio['driver_rss']:.2f}×** "
        f"(target ≤ {t['driver_rss_at_most']}×, {'met' if met['driver_rss'] else 'missed'}); "
        f"samples/s: **{ratio['samples_per_s']:.2f}×** (target ≥ {t['samples_per_s_at_least']}×, "
        f"{'met' if met['samples_per_s'] else 'missed'})."
    )
    return Section(_table(header, rows) + "\n\n" + verdict, [path])


def train_overhead(root: Path) -> Section:
    path = root / "train_overhead.json"
    r = _load(path)
    rows = [[name, f"{v['samples_per_s']:.1f}", f"{v['wall_s']:.1f}"]
            for name, v in r["results"].items()]
    ratios = "; ".join(f"{k}: **{v:.2f}×**" for k, v in r["ratios"].items())
    text = _table(["run", "steady samples/s", "wall s"], rows) + f"\n\n{ratios}. {r['notes']}"
    return Section(text, [path])


def _prepared_table(name: str) -> Callable[[Path], Section]:
    """compress and quality write their table into results.json themselves."""

    def render(root: Path) -> Section:
        path = root / name / "results.json"
        return Section(_load(path)["table"], [path])

    return render


def autoscale(root: Path) -> Section:
    path = root / "autoscale" / "timeline.json"
    r = _load(path)
    load = r["load"]

    def steps(changes: list[list[float]]) -> str:
        return " → ".join(f"{n} at {t:.1f} s" for t, n in changes)

    rows = [[f"`{name}`", steps(r["changes_with_starting"][name]), steps(changes)]
            for name, changes in r["changes"].items()]
    head = (
        f"{load['clients']} clients × {load['inputs_per_request']} inputs on `{load['task']}` "
        f"from {load['start_s']:.1f} s to {load['stop_s']:.1f} s; status codes "
        f"{load['status_codes']}; load average before / after "
        f"{r['load_average_before'][0]} / {r['load_average_after'][0]}.\n\n"
    )
    header = ["deployment", "replicas decided (running + starting)", "replicas running"]
    return Section(head + _table(header, rows, "--- | --- | ---"), [path])


def dashboard(root: Path) -> Section:
    path = root / "dashboard" / "results.json"
    r = _load(path)
    rows = [[lv["concurrency"], lv["inputs_per_request"], f"{lv['requests_per_s']:.1f}",
             f"{lv['latency_ms']['p50']:.0f}", f"{lv['latency_ms']['p99']:.0f}", lv["errors"]]
            for lv in r["levels"]]
    header = ["clients", "inputs/request", "requests/s", "p50 ms", "p99 ms", "errors"]
    return Section(f"{r['scrapes']} scrapes.\n\n" + _table(header, rows), [path])


def _failures(phases: dict[str, Any]) -> str:
    out = []
    for name, phase in phases.items():
        for status, count in phase["failed_by_status"].items():
            shown = "no HTTP answer" if status == "0" else f"HTTP {status}"
            out.append(f"{count} {name.replace('_', ' ')} ({shown})")
    return ", ".join(out) or "none"


def chaos(root: Path) -> Section:
    """jobs/chaos: the GCS killed and restarted on Redis, a worker node removed, under load."""
    gcs_path, node_path = root / "chaos" / "gcs_restart.json", root / "chaos" / "node_loss_serve.json"
    train_path = root / "chaos" / "node_loss_train.json"
    g, n, t = _load(gcs_path), _load(node_path), _load(train_path)
    rows = [
        [("GCS SIGKILLed, restarted on Redis after "
         f"{g['gap_s']:.0f} s"), g["clients"], f"{g['requests']:,}", g["failed"],
         _failures(g["phases"]),
         f"control plane back {g['control_plane_back_after_kill_s']:.1f} s after the kill",
         f"{g['phases']['before']['requests_per_s']:.1f} → {g['phases']['after']['requests_per_s']:.1f}",
         f"{g['machine']['load_average_1m']:.2f}"],
        ["worker node removed", n["clients"], f"{n['requests']:,}", n["failed"],
         _failures(n["phases"]),
         (f"node death noticed {n['node_death_noticed_s']:.1f} s, replicas back "
         f"{n['replicas_back_s']:.1f} s after the removal"),
         f"{n['requests_per_s_before']:.1f} → {n['requests_per_s_after']:.1f}",
         f"{n['machine']['load_average_1m']:.2f}"],
    ]
    header = ["fault", "clients", "requests", "failed", "failures (phase, status)", "recovery",
              "requests/s before → after", "load (1 min)"]
    checks = (
        f"After the GCS restart: replicas unchanged **{g['replicas_unchanged']}**, model "
        f"`{g['model_after']}` (before: `{g['model_before']}`), model cache untouched "
        f"**{g['cache_untouched']}**, application {g['app_status_after'].rsplit('.', 1)[-1]}. "
        f"After the node loss: {n['in_flight_at_removal']} requests were in flight and "
        f"{n['started_before_noticed']} started before Ray noticed the node was gone; "
        f"{n['failed_started_after_noticed']} failures started after that."
    )
    restart = next((s for _, s in t["epochs_and_start_epochs"] if s > 0), None)
    resumed = (f"restarted at epoch {restart} from epoch {restart - 1}'s checkpoint"
               if t["resumed_from_checkpoint"] and restart else "**not** resumed from a checkpoint")
    training = (
        f"During training (`node_loss_train.py`): the worker node running rank 0 of a "
        f"{t['workers']}-worker run ({t['workers_on_removed_node']} of its workers) removed halfway "
        f"through epoch 1; the run {resumed}, in the same MLflow run, finished "
        f"{t['removal_to_finish_s']:.0f} s after the removal and registered version "
        f"{t['registered_version']} (load {t['machine']['load_average_1m']:.2f})."
    )
    return Section(
        _table(header, rows) + "\n\n" + checks + "\n\n" + training,
        [gcs_path, node_path, train_path],
    )


def tutorial(root: Path) -> Section:
    """The tutorial's run (docs/tutorial.md): each epoch's validation figures, then the test."""
    path = root / "tutorial" / "results.json"
    r = _load(path)
    primary = r["primary_metrics"]
    header = ["epoch", *[f"{t} {m} (validation)" for t, m in primary.items()], "objective"]
    rows = [[e["epoch"], *[f"{e[t]:.3f}" for t in primary], f"{e['objective']:.3f}"
             + (" (best)" if e["epoch"] == r["best_epoch"] else "")] for e in r["epochs"]]
    test = "; ".join(f"{t} {m} **{r['test'][t][m]:.3f}**" for t, m in primary.items()
                     if t in r["test"])
    load = r["load_1min"]
    smoke = "**A smoke run (`--tiny`), not the tutorial's figures.**\n\n" if r.get("tiny") else ""
    text = (
        smoke + _table(header, rows)
        + f"\n\nTest split (best epoch's model): {test}. Registered as version "
        f"{r['registered']['version']} ({', '.join(r['registered']['aliases'])}). "
        f"Training and evaluation took {r['wall_s'] / 60:.0f} min on {r['cpu_count']} CPU cores "
        f"shared with other work (load average {load['before']:.1f} before, {load['after']:.1f} "
        "after); the figures vary a little from run to run and machine to machine."
    )
    return Section(text, [path])


SECTIONS: dict[str, Callable[[Path], Section]] = {
    "chaos": chaos,
    "serve": serve,
    "metrics_cost": metrics_cost,
    "autoscale": autoscale,
    "dashboard": dashboard,
    "batch": batch,
    "ingest": ingest,
    "train_overhead": train_overhead,
    "quality": _prepared_table("quality_reduced"),
    "generation_quality": generation_quality,
    "generation_curves": generation_curves,
    "generation_serve": generation_serve,
    "compress": _prepared_table("compress"),
    "tutorial": tutorial,
}


def sections(root: Path = RESULTS) -> dict[str, Section]:
    return {name: render(root) for name, render in SECTIONS.items()}


def result_files(root: Path = RESULTS) -> set[Path]:
    """Every result file a benchmark wrote, which some section must show."""
    return {p for p in root.rglob("*.json") if p.relative_to(root).parts[0] not in IGNORED}


FIGURE = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?) ?(×|%)|(?<![\w.])(\d+\.\d*[1-9]\d*)(?![\w.])")


def figures(markdown: str) -> set[str]:
    """The distinctive numbers of a text: ratios (2.02×), shares (38%) and decimals with three
    significant digits or more (240.2); 1.00×, 100% and short decimals (0.5) are too common."""
    found = set()
    for ratio, unit, decimal in FIGURE.findall(markdown):
        if ratio:
            if float(ratio) not in (0, 1, 100):
                found.add(ratio + unit)
        elif len(decimal.replace(".", "").lstrip("0")) >= 3:
            found.add(decimal)
    return found


def main() -> None:
    for name, section in sections().items():
        print(f"## {name}\n\n{section.markdown}\n")


if __name__ == "__main__":
    main()
