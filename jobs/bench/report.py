"""Reporting for the serving benchmark: ratios, the issue's targets, results.json, results.md and
the plots. Targets are checked on one run's numbers; a level run on a busy machine makes the
verdicts that use it 'unusable' rather than met or missed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common import machine_markdown

OVERLOAD = "polytask[overload]"
# Where each process of a run sits on a request's path (CPU-ms per request, by hop).
HOPS = (
    ("proxy", ("ProxyActor", "haproxy", "HAProxy")),
    ("Ingress", ("Ingress",)),
    ("Encoder", ("Encoder",)),
    ("heads", ("head_",)),
    ("client", ("loadgen.py",)),
)
SYSTEM_STYLE = {
    "polytask": ("tab:blue", "o"),
    "noop": ("tab:green", "^"),
    "baseline": ("tab:orange", "s"),
}


def best_of_rounds(all_runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (system, inputs/request, concurrency) the fastest round; errors summed over rounds."""
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for run in all_runs:
        groups.setdefault(
            (run["system"], run["inputs_per_request"], run["concurrency"]), []
        ).append(run)
    best = []
    for group in groups.values():
        top = max(group, key=lambda r: r["throughput_inputs_per_s"])
        best.append(
            {
                **top,
                "errors": sum(r["errors"] for r in group),
                "error_examples": sorted({e for r in group for e in r["error_examples"]})[:3],
                "throughput_by_round": [r["throughput_inputs_per_s"] for r in group],
            }
        )
    return best


def _index(runs: list[dict[str, Any]]) -> dict[tuple[str, int, int], dict[str, Any]]:
    return {(r["system"], r["inputs_per_request"], r["concurrency"]): r for r in runs}


def compute(result: dict[str, Any]) -> dict[str, Any]:
    """{'ratios': per level, 'targets': the issue's targets at the highest concurrency}."""
    s = result["settings"]
    runs = _index(result["runs"])
    limit = result["limit"]["inputs_per_s"]
    ratios: dict[str, dict[str, float | None]] = {}
    for ipr in s["inputs_per_request"]:
        for c in s["concurrency"]:
            p = runs.get(("polytask", ipr, c))
            row: dict[str, float | None] = {"over_limit": None, "over_baseline": None}
            if p:
                tput = p["throughput_inputs_per_s"]
                row["over_limit"] = tput / limit if limit else None
                for other in ("baseline", "noop"):
                    o = runs.get((other, ipr, c))
                    ok = o and o["throughput_inputs_per_s"] > 0
                    row[f"over_{other}"] = tput / o["throughput_inputs_per_s"] if ok else None
            ratios[f"{ipr}@{c}"] = row
    top = max(s["concurrency"])
    low = min(s["concurrency"])
    one, many = min(s["inputs_per_request"]), max(s["inputs_per_request"])
    targets = []

    def target(
        name: str, levels: list[tuple[str, int, int]], value: float | None, met: bool, shown: str
    ) -> None:
        found = [runs.get(k) for k in levels]
        missing = any(r is None for r in found)
        busy = any(r is not None and r.get("busy") for r in found) or bool(
            result["limit"].get("busy") and "limit" in name
        )
        targets.append(
            {
                "name": name,
                "value": value,
                "met": bool(met) and not missing,
                "usable": not busy and not missing,
                "shown": shown + (" (busy machine: unusable)" if busy else ""),
            }
        )

    r1 = ratios.get(f"{one}@{top}", {})
    p1 = runs.get(("polytask", one, top))
    n1 = runs.get(("noop", one, top))
    v = r1.get("over_limit")
    target(
        f"{one} input/request, c={top}: polytask ≥ 60% of the in-process limit",
        [("polytask", one, top)],
        v,
        v is not None and v >= 0.60,
        _pct(v),
    )
    v = r1.get("over_baseline")
    target(
        f"{one} input/request, c={top}: polytask ≥ 3× the two-pipeline baseline",
        [("polytask", one, top), ("baseline", one, top)],
        v,
        v is not None and v >= 3.0,
        f"{_num(v, 2)}×",
    )
    v = r1.get("over_noop")
    target(
        f"{one} input/request, c={top}: polytask above the no-op per-request floor",
        [("polytask", one, top), ("noop", one, top)],
        v,
        v is not None and v > 1.0,
        f"{_num(p1 and p1['throughput_inputs_per_s'], 1)} vs "
        f"{_num(n1 and n1['throughput_inputs_per_s'], 1)} inputs/s ({_num(v, 2)}×)",
    )
    v = ratios.get(f"{many}@{top}", {}).get("over_limit")
    target(
        f"{many} inputs/request, c={top}: polytask ≥ 85% of the in-process limit",
        [("polytask", many, top)],
        v,
        v is not None and v >= 0.85,
        _pct(v),
    )
    for ipr in s["inputs_per_request"]:
        p, b = runs.get(("polytask", ipr, low)), runs.get(("baseline", ipr, low))
        pp = p and p["latency_ms"]["p50"]
        bp = b and b["latency_ms"]["p50"]
        target(
            f"{ipr} input(s)/request, c={low}: polytask p50 no worse than the baseline's",
            [("polytask", ipr, low), ("baseline", ipr, low)],
            pp / bp if pp and bp else None,
            bool(pp and bp and pp <= bp),
            f"{_num(pp)} ms vs {_num(bp)} ms",
        )
    for r in sorted(result["runs"], key=lambda r: r["concurrency"]):
        if r["system"] != OVERLOAD:
            continue
        deadline_ms = 1000 * s.get("request_timeout_s", 30.0)
        p99 = r["latency_ms"]["p99"]
        met = r["shed"] > 0 and r["shed_with_retry_after"] == r["shed"] and bool(
            p99 and p99 < deadline_ms
        )
        target(
            f"overload, c={r['concurrency']}: sheds with 503 + Retry-After, admitted p99 under "
            "the request deadline",
            [(OVERLOAD, r["inputs_per_request"], r["concurrency"])],
            p99,
            met,
            f"{r['shed']} shed ({r['shed_with_retry_after']} with Retry-After), admitted p99 "
            f"{_num(p99)} ms of {deadline_ms:.0f}",
        )
    errors = sum(r["errors"] for r in result["runs"])
    targets.append(
        {
            "name": "0 errors at every level",
            "value": errors,
            "met": errors == 0,
            "usable": True,
            "shown": str(errors),
        }
    )
    return {"ratios": ratios, "targets": targets}


def write_results(result: dict[str, Any], out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "results.md").write_text(markdown(result))
    plot(result, out)
    return out


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _verdict(t: dict[str, Any]) -> str:
    if not t["usable"]:
        return "unusable (busy)"
    return "yes" if t["met"] else "**no**"


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lim = result["limit"]
    ceiling = result["loadgen_ceiling"]
    lines = [
        f"# Serving benchmark `{result['name']}` ({result['created']})",
        "",
        machine_markdown(result["machine"]),
        "",
        (
            f"Texts: {result['texts']['count']} from `{result['texts']['source']}`. Model: "
            f"{json.dumps(result['model'])}. Each level runs {s['duration_s']} s (at most "
            f"{s['max_requests']} requests) after {s['warmup_requests']} warm-up requests, driven by "
            f"`loadgen.py` in its own process (keep-alive HTTP/1.1); its ceiling against a trivial "
            f"server is **{ceiling['requests_per_s']:.0f} requests/s** at c={ceiling['concurrency']}. "
            f"polytask: {s['encoder_replicas']} Encoder replica(s) × {s['encoder_threads']} torch "
            "thread(s), 1 Ingress, 1 replica per head, every other setting polytask's default; "
            f"baseline: 1 replica per pipeline × {s['baseline_threads']} thread(s); no-op: the same "
            "replica counts."
        ),
        "",
        (
            "A level is **busy** (not comparable) when processes outside this benchmark's "
            "process tree used more than a quarter of the cores while it ran (`others`). The load "
            "average is recorded before and after each level but counts the benchmark's own work "
            "(and lags a minute), so on its own it cannot tell a busy machine from a busy benchmark."
        ),
        "",
        "## Targets",
        "",
        "| target | value | met |",
        "| --- | --- | --- |",
        *(f"| {t['name']} | {t['shown']} | {_verdict(t)} |" for t in result["targets"]),
        "",
        "## Ratios (polytask over …, same level)",
        "",
        "| inputs/request | concurrency | in-process limit | baseline | no-op floor |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, row in result["ratios"].items():
        ipr, c = key.split("@")
        lines.append(
            f"| {ipr} | {c} | {_pct(row['over_limit'])} | {_num(row['over_baseline'], 2)}× | "
            f"{_num(row.get('over_noop'), 2)}× |"
        )
    lines += [
        "",
        "## Throughput and latency (two tasks per input: sentiment + NER)",
        "",
        (
            "| system | inputs/request | concurrency | inputs/s | requests/s | p50 ms | p99 ms | errors "
            "| load before → after | others (cores) | requests per Ingress batch | busy |"
        ),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    order = {name: i for i, name in enumerate(s["systems"])}
    for r in sorted(
        (r for r in result["runs"] if r["system"] in order),
        key=lambda r: (order[r["system"]], r["inputs_per_request"], r["concurrency"]),
    ):
        lat = r["latency_ms"]
        lines.append(
            f"| {r['system']} | {r['inputs_per_request']} | {r['concurrency']} | "
            f"{r['throughput_inputs_per_s']:.1f} | {r['requests_per_s']:.1f} | {_num(lat['p50'])} | "
            f"{_num(lat['p99'])} | {r['errors']} | {r.get('load_before')} → {r.get('load_after')} "
            f"| {r.get('other_cores', '-')} | {_num(r.get('requests_per_ingress_batch'), 1)} | "
            f"{'yes' if r.get('busy') else ''} |"
        )
    lines += cpu_markdown(result)
    lines += levers_markdown(result)
    lines += overload_markdown(result)
    pad = lim["padding"]
    lines += [
        "",
        f"## In-process limit: {lim['inputs_per_s']:.1f} inputs/s",
        "",
        (
            f"{lim['what']}. Best: {lim['config']}. Measured before and after the serving sweeps "
            f"({', '.join(f'{v:.1f}' for v in lim['measurements'])} inputs/s); the higher is used. "
            f"Load {lim.get('load_before')} → {lim.get('load_after')}, others "
            f"{lim.get('other_cores', '-')} cores{' (busy)' if lim.get('busy') else ''}."
        ),
        "",
        "| configuration | inputs/s |",
        "| --- | ---: |",
        *(f"| {cfg} | {v:.1f} |" for cfg, v in lim["by_config"].items()),
        "",
        (
            f"Encoder only, batch {lim['batch_size']}: length-sorted "
            f"{pad['sorted_dynamic']['inputs_per_s']:.1f} inputs/s; arrival order with dynamic "
            f"padding {pad['arrival_dynamic']['inputs_per_s']:.1f} "
            f"({pad['arrival_dynamic']['padded_tokens_per_input']:.1f} tokens/input); padded to "
            f"max_length={pad['max_length']} {pad['arrival_max_length']['inputs_per_s']:.1f} "
            f"({pad['arrival_max_length']['padded_tokens_per_input']:.1f} tokens/input): dynamic "
            f"padding is **{pad['dynamic_over_max_length']:.2f}×**."
            + (
                f" Arrival order in the Encoder's planned passes (cut where padding costs more "
                f"than a pass): {pad['arrival_planned']['inputs_per_s']:.1f} inputs/s, "
                f"**{pad['planned_over_dynamic']:.2f}×** one padded pass per batch."
                if "arrival_planned" in pad
                else ""
            )
        ),
        "",
        "## Systems",
        "",
        *(f"- **{name}**: {info['what']}." for name, info in result["systems"].items()),
    ]
    errs = [e for r in result["runs"] for e in r["error_examples"]]
    if errs:
        lines += ["", "## Error examples", ""] + [f"- `{e}`" for e in sorted(set(errs))[:10]]
    return "\n".join(lines) + "\n"


def cpu_markdown(result: dict[str, Any]) -> list[str]:
    """Where the CPU goes: CPU milliseconds per answered request, by process, at 1 input/request
    and the highest concurrency (the per-request cost that batching cannot remove)."""
    s = result["settings"]
    one, top = min(s["inputs_per_request"]), max(s["concurrency"])
    runs = _index(result["runs"])
    chosen = [(n, runs.get((n, one, top))) for n in s["systems"]]
    chosen = [(n, r) for n, r in chosen if r and r.get("cpu_s_by_process") and r["ok_requests"]]
    if not chosen:
        return []
    names: dict[str, float] = {}
    for _, r in chosen:
        for name, cpu in r["cpu_s_by_process"].items():
            names[name] = max(names.get(name, 0.0), cpu / r["ok_requests"] * 1000)
    shown = [n for n, ms in sorted(names.items(), key=lambda kv: -kv[1]) if ms >= 0.05][:12]
    lines = [
        "",
        f"## Where the CPU goes ({one} input/request, c={top})",
        "",
        (
            "CPU milliseconds per answered request, by process of this benchmark's tree (the driver "
            "line includes the load generator, which reports its own CPU as `client`); 'all' over "
            "the level's wall time is the cores the system kept busy."
        ),
        "",
        "| process | " + " | ".join(n for n, _ in chosen) + " |",
        "| --- |" + " ---: |" * len(chosen),
    ]
    for name in shown:
        cells = [
            _num(r["cpu_s_by_process"].get(name, 0.0) / r["ok_requests"] * 1000, 2)
            for _, r in chosen
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(
        "| client (load generator) | "
        + " | ".join(_num(r.get("client_cpu_s", 0) / r["ok_requests"] * 1000, 2) for _, r in chosen)
        + " |"
    )
    lines.append(
        "| all, ms per request | "
        + " | ".join(
            _num(sum(r["cpu_s_by_process"].values()) / r["ok_requests"] * 1000, 2)
            for _, r in chosen
        )
        + " |"
    )
    lines.append(
        "| all, cores busy | " + " | ".join(_num(r.get("own_cores"), 2) for _, r in chosen) + " |"
    )
    return lines


def hop_ms(run: dict[str, Any]) -> dict[str, float]:
    """CPU-ms per answered request by hop (HOPS); `other` is Ray's own (controller, raylet, GCS)
    and the driver."""
    out = dict.fromkeys([h for h, _ in HOPS] + ["other"], 0.0)
    ok = run.get("ok_requests") or 0
    for name, cpu in (run.get("cpu_s_by_process") or {}).items():
        hop = next((h for h, keys in HOPS if any(k in name for k in keys)), "other")
        out[hop] += cpu / ok * 1000 if ok else 0.0
    client = run.get("client_cpu_s", 0.0) / ok * 1000 if ok else 0.0
    out["client"] = max(out["client"], client)
    return out


def _lever_rows(result: dict[str, Any]) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(lever set, placement, system label, run) of every lever-comparison run; the main sweep's
    polytask and no-op runs stand for the first lever set, separate placement."""
    s = result["settings"]
    main = (s.get("lever_sets") or ["default"])[0]
    levels = {tuple(x) for x in s.get("lever_levels", [])}
    rows = []
    for r in result["runs"]:
        if (r["inputs_per_request"], r["concurrency"]) not in levels or r["system"] == OVERLOAD:
            continue
        if r["system"] in ("polytask", "noop"):
            rows.append((main, r.get("placement", "-"), r["system"], r))
        elif r["system"].startswith(("polytask[", "noop[")):
            rows.append((r.get("levers", "?"), r.get("placement", "-"), r["system"], r))
    return rows


def levers_markdown(result: dict[str, Any]) -> list[str]:
    """One table: every lever set × placement beside the no-op floor under the same levers, with
    the limit and baseline ratios and the CPU each hop spends per request."""
    rows = _lever_rows(result)
    if not rows:
        return []
    limit = result["limit"]["inputs_per_s"]
    base = _index(result["runs"])
    order = {name: i for i, name in enumerate(result["settings"].get("lever_sets", []))}
    lines = [
        "",
        "## Serve levers and head placement",
        "",
        (
            "Each lever set on its own Ray (docs/serving.md, Throughput levers); polytask with its "
            "heads in their own deployments (separate) or inside the Encoder (with_encoder), and "
            "the no-op app under the same levers. CPU-ms per answered request by hop (client: the "
            "load generator; other: Ray's controller, raylet, GCS and the driver)."
        ),
        "",
        ("| levers | system | placement | inputs/request | c | inputs/s | % of limit | × baseline "
        "| p50 ms | p99 ms | errors | proxy | Ingress | Encoder | heads | client | other | busy |"),
        ("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | ---: | ---: | --- |"),
    ]
    for lever_set, placement, system, r in sorted(
        rows,
        key=lambda x: (
            order.get(x[0], 99), x[2].startswith("noop"), x[1], x[3]["inputs_per_request"],
            x[3]["concurrency"],
        ),
    ):
        tput = r["throughput_inputs_per_s"]
        b = base.get(("baseline", r["inputs_per_request"], r["concurrency"]))
        over_b = tput / b["throughput_inputs_per_s"] if b and b["throughput_inputs_per_s"] else None
        hops = hop_ms(r)
        lines.append(
            f"| {lever_set} | {system.split('[')[0]} | {placement} | {r['inputs_per_request']} | "
            f"{r['concurrency']} | {tput:.1f} | {_pct(tput / limit if limit else None)} | "
            f"{_num(over_b, 2)}× | {_num(r['latency_ms']['p50'])} | {_num(r['latency_ms']['p99'])} "
            f"| {r['errors']} | "
            + " | ".join(_num(hops[h], 1) for h in ("proxy", "Ingress", "Encoder", "heads", "client", "other"))
            + f" | {'yes' if r.get('busy') else ''} |"
        )
    return lines


def overload_markdown(result: dict[str, Any]) -> list[str]:
    runs = sorted(
        (r for r in result["runs"] if r["system"] == OVERLOAD), key=lambda r: r["concurrency"]
    )
    if not runs:
        return []
    s = result["settings"]
    lines = [
        "",
        (f"## Overload: Ingress max_ongoing_requests={s.get('overload_max_ongoing')}, "
        f"max_queued_requests={s.get('overload_max_queued')}"),
        "",
        ("Closed-loop clients far past what the app admits: the rest are shed at once with 503 + "
        "Retry-After; latency is the admitted requests'."),
        "",
        ("| concurrency | inputs/s | answered | shed | with Retry-After | p50 ms | p99 ms | errors "
        "| busy |"),
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in runs:
        lines.append(
            f"| {r['concurrency']} | {r['throughput_inputs_per_s']:.1f} | {r['ok_requests']} | "
            f"{r['shed']} | {r['shed_with_retry_after']} | {_num(r['latency_ms']['p50'])} | "
            f"{_num(r['latency_ms']['p99'])} | {r['errors']} | {'yes' if r.get('busy') else ''} |"
        )
    return lines


def plot(result: dict[str, Any], out: Path) -> None:
    """throughput.png (inputs/s vs concurrency, limit dotted) and latency.png (p50/p99)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["settings"]
    runs = result["runs"]
    iprs = s["inputs_per_request"]
    fig, axes = plt.subplots(1, len(iprs), figsize=(6 * len(iprs), 4.5), squeeze=False)
    for ax, ipr in zip(axes[0], iprs):
        for system in s["systems"]:
            color, marker = SYSTEM_STYLE.get(system, ("black", "x"))
            pts = sorted(
                (r["concurrency"], r["throughput_inputs_per_s"])
                for r in runs
                if r["system"] == system and r["inputs_per_request"] == ipr
            )
            if pts:
                ax.plot(*zip(*pts), marker=marker, color=color, label=system)
        ax.axhline(result["limit"]["inputs_per_s"], color="gray", ls=":", label="in-process limit")
        ax.set_xscale("log", base=2)
        ax.set_xticks(s["concurrency"], [str(c) for c in s["concurrency"]])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("inputs/s (both tasks answered)")
        ax.set_title(f"{ipr} input(s)/request")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(iprs), figsize=(6 * len(iprs), 4.5), squeeze=False)
    for ax, ipr in zip(axes[0], iprs):
        for system in s["systems"]:
            color, _ = SYSTEM_STYLE.get(system, ("black", "x"))
            sel = sorted(
                (r for r in runs if r["system"] == system and r["inputs_per_request"] == ipr),
                key=lambda r: r["concurrency"],
            )
            for pct, ls in (("p50", "-"), ("p99", ":")):
                pts = [
                    (r["concurrency"], r["latency_ms"][pct]) for r in sel if r["latency_ms"][pct]
                ]
                if pts:
                    ax.plot(*zip(*pts), ls, color=color, marker="o", label=f"{system} {pct}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(s["concurrency"], [str(c) for c in s["concurrency"]])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("request latency (ms)")
        ax.set_title(f"{ipr} input(s)/request")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=120)
    plt.close(fig)
