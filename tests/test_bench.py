"""Benchmarks as smoke tests: they run end to end on tiny inputs and write the promised files.

Nothing here asserts speed (a shared 2-core CI box makes timings meaningless); the assertions
are about what the result files contain, error accounting, and the experiment files.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from polytask.config import load_config

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "jobs" / "bench"  # on sys.path (conftest): the scripts import each other by name

from common import BenchError, free_port, read_texts
from loadgen import Shed, ceiling, run_load
from report import compute

PNG = b"\x89PNG\r\n\x1a\n"


def _run_script(*args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    """A bench script as a user runs it: from a shell without the Serve lever env this session's
    Ray sets (a bench starts its own Ray per lever set; its driver keeps Serve's defaults)."""
    from polytask.serve.levers import LEVERS

    levers = {key for lever in LEVERS.values() for key in lever.env}
    env = {k: v for k, v in os.environ.items() if k not in levers}
    env |= {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, *args],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


# --- experiment files --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["quality_joint", "quality_sst2", "quality_wnut17"])
def test_quality_yamls_validate_and_say_how_to_run(name):
    path = BENCH / f"{name}.yaml"
    first = path.read_text().splitlines()[0]
    assert first.startswith("# python jobs/bench/quality.py") and "polytask train" in first
    cfg = load_config(path)
    for task in cfg.tasks:
        train = Path(os.path.normpath(cfg.resolve_path(task.data.train)))  # keeps symlinks
        assert train.parts[-4:-2] == ("shared", "data"), train
        assert train.parent.parent.parent.parent == ROOT.parent


def test_single_task_yamls_match_the_joint_one():
    """Same encoder, optimizer and per-task data: the only difference is the other task."""
    joint = load_config(BENCH / "quality_joint.yaml")
    for name in ("quality_sst2", "quality_wnut17"):
        single = load_config(BENCH / f"{name}.yaml")
        assert single.encoder == joint.encoder
        assert single.optim == joint.optim
        assert single.sampling.strategy == joint.sampling.strategy
        (task,) = single.tasks
        assert task == joint.task(task.name)


# --- pieces of the serving benchmark -------------------------------------------------------------


def test_read_texts_takes_the_sentence_column_or_lines(tmp_path):
    tsv = tmp_path / "dev.tsv"
    tsv.write_text('sentence\tlabel\nit \'s "great" . \t1\n\t0\nbleak \t0\n')
    assert read_texts(tsv) == ['it \'s "great" .', "bleak"]
    txt = tmp_path / "texts.txt"
    txt.write_text("one\n\n  two  \n")
    assert read_texts(txt) == ["one", "two"]
    with pytest.raises(BenchError, match="--texts"):
        read_texts(tmp_path / "missing.txt")


def test_load_generator_counts_errors_and_respects_bounds():
    calls: list[list[str]] = []

    async def send(batch: list[str]) -> None:
        calls.append(batch)
        await asyncio.sleep(0.001)
        if batch[0] == "bad":
            raise RuntimeError("HTTP 500: boom")
        if batch[0] == "shed":
            raise Shed("HTTP 503 retry-after=0.05")  # the worker waits that long

    texts = ["a", "b", "bad", "shed", "c"]
    result = asyncio.run(
        run_load(
            send,
            texts,
            concurrency=3,
            inputs_per_request=1,
            duration_s=30,
            max_requests=20,
            warmup_requests=2,
        )
    )
    assert result["requests"] == 20 and len(calls) == 22  # 2 warm-up requests are not counted
    assert result["shed"] == result["shed_with_retry_after"] >= 3  # a shed 503 is no error
    assert result["errors"] + result["shed"] == result["requests"] - result["ok_requests"]
    assert result["errors"] >= 3
    assert result["inputs"] == result["ok_requests"]
    assert result["error_examples"] == ["RuntimeError: HTTP 500: boom"]
    assert 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["p99"]

    timed = asyncio.run(
        run_load(
            send, ["x"] * 5, concurrency=2, inputs_per_request=4, duration_s=0.2, max_requests=10**9
        )
    )
    assert timed["errors"] == 0 and timed["inputs"] == 4 * timed["requests"]
    assert 0.2 <= timed["duration_s"] < 2


def test_load_generator_ceiling_is_measured_against_a_trivial_server():
    result = ceiling(concurrency=4, duration_s=0.3, port=free_port())
    assert result["errors"] == 0 and result["requests"] > 10
    assert result["requests_per_s"] > 100, "a trivial server must not be the bottleneck"


def _run(system, ipr, c, tput, p50=10.0, errors=0, busy=False):
    return {
        "system": system,
        "inputs_per_request": ipr,
        "concurrency": c,
        "throughput_inputs_per_s": tput,
        "latency_ms": {"p50": p50, "p99": 2 * p50},
        "errors": errors,
        "busy": busy,
    }


def test_ratios_and_targets_read_one_run():
    settings = {"concurrency": [1, 64], "inputs_per_request": [1, 16]}
    runs = []
    for ipr in (1, 16):
        for c in (1, 64):
            runs.append(_run("polytask", ipr, c, 40.0 * ipr ** 0.5 * c ** 0.3, p50=50))
            runs.append(_run("baseline", ipr, c, 10.0 * ipr ** 0.5, p50=60))
            runs.append(_run("noop", ipr, c, 50.0 * ipr))
    runs[-3]["throughput_inputs_per_s"] = 160.0  # polytask, 16 inputs/request, c=64: 80%
    for c, shed, p99 in ((256, 40, 900.0), (1024, 0, 35_000.0)):
        runs.append(
            {**_run("polytask[overload]", 1, c, 50.0, p50=p99 / 2), "shed": shed,
             "shed_with_retry_after": shed}
        )
    result = {"settings": settings, "runs": runs, "limit": {"inputs_per_s": 200.0}}
    out = compute(result)
    assert out["ratios"]["1@64"]["over_limit"] == pytest.approx(40 * 64**0.3 / 200)
    assert out["ratios"]["16@1"]["over_baseline"] == pytest.approx(4.0)
    targets = {t["name"]: t for t in out["targets"]}
    assert len(targets) == 9 and all(t["usable"] for t in targets.values())
    shed = "sheds with 503 + Retry-After, admitted p99 under the request deadline"
    assert targets[f"overload, c=256: {shed}"]["met"]
    assert not targets[f"overload, c=1024: {shed}"]["met"]  # nothing shed, p99 past 30 s
    assert targets["1 input/request, c=64: polytask ≥ 60% of the in-process limit"]["met"]
    assert targets["1 input/request, c=64: polytask ≥ 3× the two-pipeline baseline"]["met"]
    assert targets["1 input/request, c=64: polytask above the no-op per-request floor"]["met"]
    assert not targets["16 inputs/request, c=64: polytask ≥ 85% of the in-process limit"]["met"]
    assert targets["1 input(s)/request, c=1: polytask p50 no worse than the baseline's"]["met"]
    assert targets["0 errors at every level"]["met"]

    runs[0].update(errors=2, busy=True)  # polytask, 1 input/request, c=1
    targets = {t["name"]: t for t in compute(result)["targets"]}
    assert targets["0 errors at every level"] == {
        "name": "0 errors at every level", "value": 2, "met": False, "usable": True, "shown": "2"
    }
    p50 = targets["1 input(s)/request, c=1: polytask p50 no worse than the baseline's"]
    assert not p50["usable"] and "busy" in p50["shown"]


# --- end to end ------------------------------------------------------------------------------------


def test_shown_path_keeps_only_the_checkout_and_shared_relative(tmp_path, monkeypatch):
    """A checkout cloned straight into the temp dir (/tmp/polytask): the temp files of a test run
    beside it are not the repo's and keep their absolute path."""
    import common

    checkout = tmp_path / "polytask"
    monkeypatch.setattr(common, "REPO_ROOT", checkout)
    texts = tmp_path / "pytest-of-me" / "texts.tsv"
    assert common.shown_path(texts) == str(texts)
    assert common.shown_path(tmp_path / "polytask-old" / "a.tsv") == str(tmp_path / "polytask-old" / "a.tsv")
    assert common.shown_path(checkout / "bench_results" / "a.tsv") == "bench_results/a.tsv"
    dev = tmp_path / "shared" / "data" / "sst2" / "dev.tsv"
    assert common.shown_path(dev) == "../shared/data/sst2/dev.tsv"


def test_serve_bench_tiny_end_to_end(tmp_path):
    from polytask.demo import demo_corpus

    texts = tmp_path / "texts.tsv"
    texts.write_text("sentence\tlabel\n" + "".join(f"{t} \t0\n" for t in demo_corpus()[::5]))
    out = tmp_path / "serve"
    proc = _run_script(
        "jobs/bench/serve_bench.py", "--tiny", "--texts", str(texts), "--out", str(out)
    )
    assert "0 errors at every level" in proc.stdout

    result = json.loads((out / "results.json").read_text())
    assert result["texts"] == {"source": str(texts), "count": len(demo_corpus()[::5])}
    assert result["settings"]["concurrency"] == [1, 4]
    levels = {(r["system"], r["inputs_per_request"], r["concurrency"]) for r in result["runs"]}
    systems = ("polytask", "noop", "baseline")
    assert levels == {(s, i, c) for s in systems for i in (1, 16) for c in (1, 4)} | {
        ("polytask[default, with_encoder]", 1, 4),  # the lever comparison, heads in the Encoder
    }
    for r in result["runs"]:
        assert r["errors"] == 0, r["error_examples"]
        assert 0 < r["requests"] <= result["settings"]["max_requests"]
        assert r["inputs"] == r["requests"] * r["inputs_per_request"] and r["shed"] == 0
        assert r["throughput_inputs_per_s"] > 0
        lat = r["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
        assert r["load_before"] is not None and r["load_after"] is not None
        assert isinstance(r["busy"], bool) and r["other_cores"] >= 0
    polytask = [r for r in result["runs"] if r["system"] == "polytask"]
    assert all(r["requests_per_ingress_batch"] >= 1 for r in polytask)
    assert result["loadgen_ceiling"]["errors"] == 0
    assert result["loadgen_ceiling"]["requests_per_s"] > 0
    assert result["limit"]["inputs_per_s"] > 0 and len(result["limit"]["measurements"]) == 2
    pad = result["limit"]["padding"]
    assert pad["arrival_max_length"]["padded_tokens_per_input"] == pad["max_length"]
    assert (
        pad["arrival_dynamic"]["padded_tokens_per_input"]
        < pad["arrival_max_length"]["padded_tokens_per_input"]
    )
    assert pad["arrival_planned"]["inputs_per_s"] > 0 and pad["planned_over_dynamic"] > 0
    for key in ("1@1", "1@4", "16@1", "16@4"):
        assert result["ratios"][key]["over_limit"] > 0
        assert result["ratios"][key]["over_baseline"] > 0
        assert result["ratios"][key]["over_noop"] > 0
    names = [t["name"] for t in result["targets"]]
    assert len(names) == 7 and "0 errors at every level" in names
    assert result["targets"][-1] == {
        "name": "0 errors at every level", "value": 0, "met": True, "usable": True, "shown": "0"
    }
    assert {"cpu_model", "usable_cores", "torch", "ray"} <= set(result["machine"])
    assert result["systems"]["baseline"]["models"]["ner"]["head"] == "copied from bundle"

    table = (out / "results.md").read_text()
    assert "| polytask | 16 | 4 |" in table and "| noop | 1 | 1 |" in table
    assert "| baseline | 1 | 1 |" in table and "## Targets" in table
    assert "in the Encoder's planned passes" in table
    assert "| default | polytask | with_encoder | 1 | 4 |" in table
    for png in ("throughput.png", "latency.png"):
        assert (out / png).read_bytes()[:8] == PNG


def test_quality_tiny_end_to_end(tmp_path):
    out = tmp_path / "quality"
    proc = _run_script("jobs/bench/quality.py", "--tiny", "--steps", "6", "--out", str(out))
    assert "joint − single" in proc.stdout

    result = json.loads((out / "results.json").read_text())
    runs = result["runs"]
    assert set(runs) == {"joint", "sentiment_only", "ner_only"}
    joint_steps = runs["joint"][0]["steps"]
    assert sum(joint_steps.values()) == 12
    assert runs["sentiment_only"][0]["steps"] == {"sentiment": joint_steps["sentiment"]}
    assert runs["ner_only"][0]["steps"] == {"ner": joint_steps["ner"]}
    s = result["summary"]
    for name, keys in (
        ("joint", ("sst2_dev_accuracy", "wnut17_test_f1")),
        ("sentiment_only", ("sst2_dev_accuracy",)),
        ("ner_only", ("wnut17_test_f1",)),
    ):
        for key in keys:
            assert 0.0 <= s[name][key] <= 100.0
    assert s["sentiment_only"]["wnut17_test_f1"] is None
    assert result["delta_points"]["sst2_dev_accuracy"] == pytest.approx(
        s["joint"]["sst2_dev_accuracy"] - s["sentiment_only"]["sst2_dev_accuracy"]
    )
    assert isinstance(result["target"]["met"], bool)
    assert "| joint |" in (out / "results.md").read_text()


def test_generation_quality_tiny_end_to_end(tmp_path, capsys):
    """In-process (the script's main), which saves a Python start-up and its imports."""
    import generation_quality as gq

    out = tmp_path / "generation_quality"
    argv = ["--tiny", "--steps", "3", "--rewrite-steps", "3", "--seeds", "1,2", "--eval-rows", "8"]
    assert gq.main([*argv, "--out", str(out)]) == 0

    result = json.loads((out / "results.json").read_text())
    s = result["summary"]
    assert set(s) == {f"{t}/{a}" for t, answers in gq.ANSWERS.items() for a in answers}
    for key in ("entities/model", "entities/ner_head", "rewrite/model"):
        assert s[key]["bleu"]["n"] == 2 and s[key]["bleu"]["sd"] >= 0.0, key
    for key in ("entities/model", "entities/model_int8_decoder", "entities/ner_head", "entities/constant"):
        assert {"entity_f1", "entity_exact", "bleu", "exact"} <= set(s[key]), key
    assert "entity_f1" not in s["rewrite/model"]
    for task, t in result["target"].items():  # met only when the model beats every baseline
        model = s[f"{task}/model"][gq.PRIMARY[task]]["mean"]
        beats = all(model > s[f"{task}/{b}"][gq.PRIMARY[task]]["mean"] for b in ("constant", "copy_input"))
        assert t["met"] == (beats and (task != "rewrite" or model > gq.REWRITE_BLEU))
    assert "| entities | constant |" in (out / "results.md").read_text()
    assert "| rewrite | copy input |" in capsys.readouterr().out

    merged = gq.merge([str(out), str(out)], tmp_path / "merged")
    assert merged["summary"]["rewrite/model"]["bleu"]["n"] == 4


def test_generation_quality_scores_entity_sets_and_rewrites():
    import generation_quality as gq

    scores = gq.set_scores(["alice ; paris", "none", "bob"], ["paris ; alice", "none", "bob ; acme"])
    # 3 of 3 predicted entities right, 3 of 4 gold found; rows 1 and 2 exact
    assert scores["entity_f1"] == pytest.approx(100 * 2 * 1.0 * 0.75 / 1.75)
    assert scores["entity_exact"] == pytest.approx(200 / 3)
    assert gq.rewrite("the film , an ode to a city .") == "film ode to city"


def test_generation_curves_tiny_end_to_end(tmp_path):
    import generation_curves as gc

    out = tmp_path / "curves.json"
    settings = "warm lr=1e-4,random lr=1e-4"
    assert gc.main(["--tiny", "--steps", "4", "--every", "2", "--settings", settings, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["curves"]) == {"warm lr=1e-4", "random lr=1e-4"}
    for c in result["curves"].values():
        assert [p["step"] for p in c["points"]] == [2, 4]
        assert all(0.0 <= p["bleu"] <= 100.0 and p["train_s"] > 0 for p in c["points"])
    assert "| warm lr=1e-4 |" in gc.markdown(result)


def test_compress_bench_tiny_end_to_end(tmp_path):
    out = tmp_path / "compress"
    proc = _run_script("jobs/bench/compress_bench.py", "--tiny", "--out", str(out))
    assert "| int8[onednn] |" in proc.stdout or "| int8[x86] |" in proc.stdout

    result = json.loads((out / "results.json").read_text())
    rows = result["results"]
    assert rows.keys() >= {"fp32", "pruned"} and any(k.startswith("int8[") for k in rows)
    for row in rows.values():
        assert set(row["seq_per_s_by_threads"]) == {"1", "2"}  # JSON keys
        assert row["seq_per_s"] == row["seq_per_s_by_threads"]["1"] > 0
    assert rows["pruned"]["layer_params"] < rows["fp32"]["layer_params"]
    t = result["targets"]
    assert t["variant"].startswith("int8[") and isinstance(t["speedup_met"], bool)
    assert t["speedup"] == pytest.approx(
        rows[t["variant"]]["seq_per_s"] / rows["fp32"]["seq_per_s"]
    )
    assert "seq/s, 1 thread (× fp32)" in (out / "results.md").read_text()


def test_dashboard_snapshot_evaluates_the_dashboards_promql_like_prometheus():
    """The snapshot's PromQL subset on two hand-made scrapes 10 s apart: rate of a counter summed
    by a label, a ratio of rates, a gauge sum, and histogram_quantile's interpolation (Prometheus:
    rank q*total, linear inside the bucket that holds it, the last finite bound for +Inf)."""
    from dashboard_snapshot import DASHBOARD, Series, parse_scrape, queried_metrics

    def scrape(requests: float, buckets: list[float], replicas: int) -> dict:
        lines = [
            f'ray_polytask_requests_total{{task="ner",code="200",replica="a"}} {requests}',
            f'ray_polytask_requests_total{{task="ner",code="200",replica="b"}} {requests}',
            f'ray_polytask_requests_total{{task="ner",code="404",replica="a"}} {requests}',
            f'ray_serve_deployment_replica_healthy{{deployment="Encoder",application="polytask"}} {replicas}',
        ]
        for le, count in zip(["0.1", "0.2", "+Inf"], buckets):
            lines.append(f'ray_polytask_request_latency_s_bucket{{task="ner",le="{le}"}} {count}')
        return parse_scrape("\n".join(lines) + "\n")

    series = Series([(0.0, scrape(0, [0, 0, 0], 1)), (10.0, scrape(50, [10, 30, 40], 2))], 10)
    ok = series.evaluate('sum by (task) (rate(ray_polytask_requests_total{code="200"}[1m]))', 1)
    assert ok == {(("task", "ner"),): 10.0}  # two replicas x 50 requests over 10 s
    p50 = series.evaluate(
        "histogram_quantile(0.5, sum by (task, le) (rate(ray_polytask_request_latency_s_bucket[1m])))", 1
    )
    assert p50 == {(("task", "ner"),): pytest.approx(0.15)}  # rank 20: halfway into (0.1, 0.2]
    p99 = series.evaluate(
        "histogram_quantile(0.99, sum by (task, le) (rate(ray_polytask_request_latency_s_bucket[1m])))", 1
    )
    assert p99 == {(("task", "ner"),): pytest.approx(0.2)}  # in +Inf: the last finite bound
    share = series.evaluate(
        'sum (rate(ray_polytask_requests_total{code="404"}[1m])) / sum (rate(ray_polytask_requests_total[1m]))', 1
    )
    assert share == {(): pytest.approx(1 / 3)}
    gauge = 'sum by (deployment) (ray_serve_deployment_replica_healthy{application="polytask"})'
    assert series.evaluate(gauge, 1) == {(("deployment", "Encoder"),): 2.0}
    dashboard = json.loads(DASHBOARD.read_text())
    assert {"ray_polytask_requests_total", "ray_serve_deployment_replica_healthy"} <= queried_metrics(dashboard)
    for panel in dashboard["panels"]:  # every panel query is in the subset the snapshot evaluates
        for target in panel["targets"]:
            series.evaluate(target["expr"].replace("$__rate_interval", "10s"), 1)
