"""Ray Train runs on a real local Ray, tracked in a real MLflow SQLite store.

Bad configs come first: they must fail before Ray is ever started in this process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
import torch
import yaml
from typer.testing import CliRunner

from conftest import new_store
from polytask.config import config_from_dict
from polytask.demo import demo_experiment, write_demo_data
from polytask.tracking.tags import RUN_NAME_TAG
from polytask.training.data import DataError
from polytask.training.train import run_training

TEXTS = ["alice flew to paris last week", "the movie was wonderful", {"text": "what a bad meal"}]
FAST = {"sampling": {"steps_per_epoch": 4}, "optim": {"eval_batch_size": 64}}


def _cfg(demo_data: Path, tiny_encoder: Path, **kw):
    sections = {**FAST, **kw.pop("sections", {})}
    data = demo_experiment(demo_data, tiny_encoder, **kw)
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return config_from_dict(data)


@pytest.fixture()
def no_ray():
    """These tests assert Ray was never started, so begin without it."""
    ray.shutdown()
    assert not ray.is_initialized()
    yield
    assert not ray.is_initialized(), "a bad config started Ray before failing"


def test_unknown_task_kind_fails_in_cli_before_ray(no_ray, demo_data, tiny_encoder, tmp_path):
    from polytask.cli import app

    data = demo_experiment(demo_data, tiny_encoder)
    data["tasks"][0]["kind"] = "sentiment_magic"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 1  # a user error (2 is for command-line usage errors)
    flat = " ".join(result.output.split())
    assert "tasks[0].kind" in flat and "'sentiment_magic' is not a task kind" in flat


def test_missing_data_file_fails_before_ray(no_ray, demo_data, tiny_encoder, mlflow_uri):
    cfg = _cfg(demo_data, tiny_encoder)
    cfg.tasks[1].data.train = str(demo_data / "ner" / "nope.conll")
    with pytest.raises(DataError, match=r"tasks\.ner\.data\.train: file '.*nope\.conll' not found"):
        run_training(cfg, run_name="missing-file")


def test_label_outside_label_set_fails_before_ray(no_ray, demo_data, tiny_encoder, mlflow_uri):
    cfg = _cfg(demo_data, tiny_encoder)
    cfg.tasks[0].labels = ["positive", "neutral"]
    with pytest.raises(DataError, match=r"label 'negative' is not in the label set"):
        run_training(cfg, run_name="bad-label")


def test_injected_faults_come_from_the_environment_not_the_config(demo_data, tiny_encoder):
    """The chaos tests' faults are no experiment setting: `POLYTASK_FAULTS` plans them."""
    from polytask.config import ConfigError
    from polytask.training import faults

    with pytest.raises(ConfigError, match="run.fail_at_epoch: is not a known field"):
        _cfg(demo_data, tiny_encoder, sections={"run": {"fail_at_epoch": 0}})
    assert faults.from_env({faults.ENV: "fail_at_epoch=1"}) == {"fail_at_epoch": 1}
    assert faults.from_env({faults.ENV: '{"hold_at_epoch": 0}'}) == {"hold_at_epoch": 0}
    assert faults.from_env({}) == {}
    for bad in ("fail_at=1", "fail_at_epoch=-1", "fail_at_epoch", "[1]"):
        with pytest.raises(ValueError, match="POLYTASK_FAULTS=.*expected fail_at_epoch or hold"):
            faults.from_env({faults.ENV: bad})


@pytest.fixture(scope="module")
def store(tmp_path_factory, _migrated_store):
    """One MLflow store + polytask home for the Ray runs of this module."""
    root = tmp_path_factory.mktemp("train_store")
    uri = new_store(_migrated_store, root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("POLYTASK_HOME", str(root / "home"))
        mp.delenv("POLYTASK_STORAGE_PATH", raising=False)
        yield SimpleNamespace(uri=uri, root=root)


@pytest.fixture(scope="module")
def first_run(ray_local, store, demo_data, tiny_encoder):
    """A 2-worker DDP run, uninterrupted: the reference the killed run below must match. It also
    scores a held-back test split (other examples than validation) at the end (`data.test`)."""
    from rich.console import Console

    cfg = _cfg(demo_data, tiny_encoder, epochs=2, num_workers=2, registered_model="train-demo")
    held_back = write_demo_data(store.root / "held_back", n_train=1, n_eval=50, seed=7)
    cfg.tasks[0].data.test = str(held_back / "sentiment" / "validation.jsonl")
    cfg.tasks[1].data.test = str(held_back / "ner" / "validation.conll")
    cfg.tracking.system_metrics = True  # MLflow's monitor, sampling every second
    console = Console(record=True, width=240)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
        result = run_training(cfg, run_name="joint", console=console)
    return SimpleNamespace(cfg=cfg, result=result, printed=console.export_text())


@pytest.fixture(scope="module")
def killed_run(ray_local, store, demo_data, tiny_encoder):
    """first_run's config, but rank 0 is SIGKILLed halfway through epoch 1 (after epoch 0's
    checkpoint): the worker writes its pid and waits; a thread here kills that process."""
    cfg = _cfg(
        demo_data,
        tiny_encoder,
        epochs=2,
        num_workers=2,
        registered_model=None,
        sections={"run": {"max_failures": 1}},
    )
    pid_file = store.root / "home" / "ray_results" / "killed" / "rank0.pid"
    killed: dict[str, float] = {}

    def kill_when_held() -> None:
        deadline = time.monotonic() + 300
        while not pid_file.is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_file.is_file():
            pid = int(pid_file.read_text())
            killed["pid"] = pid
            killed["at"] = time.monotonic()
            os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_held, daemon=True)
    killer.start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POLYTASK_FAULTS", "hold_at_epoch=1")
        result = run_training(cfg, run_name="killed")
    finished = time.monotonic()
    killer.join(timeout=5)
    assert "pid" in killed, "the worker never reached its kill point"
    return SimpleNamespace(cfg=cfg, result=result, kill_to_finish_s=finished - killed["at"])


def _client(store):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=store.uri, registry_uri=store.uri)


def _runs_named(store, name):
    c = _client(store)
    exp = c.get_experiment_by_name("polytask")
    return c.search_runs([exp.experiment_id], f"tags.`{RUN_NAME_TAG}` = '{name}'")


def _steps(store, run_id, key):
    return [m.step for m in _client(store).get_metric_history(run_id, key)]


def test_two_worker_run_is_tracked_and_registered(store, first_run):
    res = first_run.result
    assert [row["epoch"] for row in res.history] == [0, 1]
    assert set(res.metrics) == {"sentiment", "ner"}
    assert 0.0 <= res.metrics["ner"]["f1"] <= 1.0
    assert res.model_version == 1 and res.aliases == ["candidate", "champion"]
    assert (Path(res.bundle_path) / "polytask.json").is_file()
    assert (Path(res.checkpoint_path) / "state" / "train_state.json").is_file()

    [run] = _runs_named(store, "joint")
    assert run.info.run_id == res.run_id and run.info.status == "FINISHED"
    assert run.data.params["optim.epochs"] == "2"
    assert run.data.params["tasks.ner.weight"] == "1.0"
    for key in (
        "sentiment/accuracy",
        "ner/f1",
        "objective",
        "train_loss/ner",
        "loss_weight/sentiment",
    ):
        assert _steps(store, res.run_id, key) == [0, 1], key

    summary = res.summary()
    assert summary["model_version"] == 1 and "mlflow ui --backend-store-uri" in summary["mlflow_ui"]


# Tolerance of a resumed run against the uninterrupted one: same data order, seeds and state,
# so only float summation order may differ.
RESUME_REL = 1e-4


def test_sigkilled_worker_resumes_from_last_checkpoint_with_same_metrics(
    store, first_run, killed_run
):
    """Chaos: a real Ray Train worker process SIGKILLed mid-epoch; the group restarts from
    epoch 0's checkpoint and ends where the uninterrupted run ended."""
    history = killed_run.result.history
    # epoch 1 ran in a second attempt that started from epoch 0's checkpoint, not from scratch
    assert [(row["epoch"], row["start_epoch"]) for row in history] == [(0, 0), (1, 1)]
    assert len(_runs_named(store, "killed")) == 1
    assert _steps(store, killed_run.result.run_id, "ner/f1") == [0, 1]  # each epoch logged once
    assert killed_run.result.metrics.keys() == first_run.result.metrics.keys()
    for task, metrics in first_run.result.metrics.items():
        for name, value in metrics.items():
            got = killed_run.result.metrics[task][name]
            assert got == pytest.approx(value, rel=RESUME_REL, abs=1e-6), (task, name)
    for ref, got in zip(first_run.result.history, history, strict=True):
        for key in ("train_loss/sentiment", "train_loss/ner", "objective"):
            assert got[key] == pytest.approx(ref[key], rel=RESUME_REL), (got["epoch"], key)
    worst = max(
        abs(killed_run.result.metrics[t][m] - v)
        for t, metrics in first_run.result.metrics.items()
        for m, v in metrics.items()
    )
    print(
        f"\nchaos: SIGKILL of rank 0 mid-epoch 1 -> finished {killed_run.kill_to_finish_s:.1f} s "
        f"after the kill; objective {history[-1]['objective']:.6f} vs uninterrupted "
        f"{first_run.result.history[-1]['objective']:.6f}; largest metric difference {worst:.2e}; "
        f"loadavg {Path('/proc/loadavg').read_text().split()[:3]}"
    )


def test_champion_loads_through_pyfunc_and_bundle_alike(store, first_run):
    import mlflow

    from polytask.model.inference import Predictor
    from polytask.tracking.registry import resolve_bundle, use_tracking_uri

    expected = Predictor.from_bundle(first_run.result.bundle_path).predict(TEXTS)
    assert set(expected[0]) == {"sentiment", "ner"}
    uri = "models:/train-demo@champion"
    with use_tracking_uri(store.uri):
        assert mlflow.pyfunc.load_model(uri).predict(TEXTS) == expected
    resolved = resolve_bundle(uri)
    assert (resolved / "polytask.json").is_file()
    assert Predictor.from_bundle(str(resolved)).predict(TEXTS) == expected


def test_test_split_is_scored_once_logged_and_printed(store, first_run):
    """`data.test`: the registered model's metrics on the test split, as an in-process evaluation
    of that bundle computes them, are in the MLflow run (once) and in the printed summary."""
    from polytask.model.bundle import load_bundle
    from polytask.tracking.registry import resolve_bundle
    from polytask.training.data import load_task_data
    from polytask.training.features import tokenize_split
    from polytask.training.loop import evaluate

    res, cfg = first_run.result, first_run.cfg
    model, tokenizer, manifest = load_bundle(resolve_bundle(f"models:/train-demo/{res.model_version}"))
    features = tokenize_split(
        load_task_data(cfg), "test", tokenizer, manifest.max_length, spec_of=manifest.task
    )
    assert [len(f) for f in features.values()] == [50, 50]
    expected = evaluate(model, features, cfg.optim.eval_batch_size, tokenizer.pad_token_id)
    assert set(expected) == {"sentiment", "ner"} and res.test_metrics.keys() == expected.keys()
    logged = _client(store).get_run(res.run_id).data.metrics
    for task, metrics in expected.items():
        for key, value in metrics.items():
            assert logged[f"test/{task}/{key}"] == pytest.approx(value, abs=1e-9), (task, key)
            assert res.test_metrics[task][key] == pytest.approx(value, abs=1e-9), (task, key)
    assert _steps(store, res.run_id, "test/ner/f1") == [res.best_epoch]
    assert not any(k.startswith("test/") for row in res.history for k in row)  # not per epoch
    line = next(row for row in first_run.printed.splitlines() if row.startswith("test "))
    assert f"sentiment/accuracy {expected['sentiment']['accuracy']:.4f}" in line
    assert f"ner/f1 {expected['ner']['f1']:.4f}" in line
    assert res.summary()["test_metrics"]["ner"]["f1"] == pytest.approx(expected["ner"]["f1"])


def test_progress_lines_are_printed_while_training(first_run):
    """`polytask train` prints rank 0's progress on the driver's console: at least each epoch's
    last step, with per-task losses, throughput and the time left, before the final report."""
    pattern = re.compile(
        r"^epoch (\d)/2  step (\d)/4  loss( (?:sentiment|ner) \d+\.\d{4})+  "
        r"(\d+\.\d) samples/s  ETA (\d+:\d\d:\d\d)$"
    )
    lines = first_run.printed.splitlines()
    found = [(i, pattern.match(line)) for i, line in enumerate(lines)]
    progress = [(i, m) for i, m in found if m]
    assert {(m[1], m[2]) for _, m in progress} >= {("1", "4"), ("2", "4")}, first_run.printed
    assert all(float(m[4]) > 0 for _, m in progress)
    last = max(i for i, m in progress if (m[1], m[2]) == ("2", "4"))
    assert progress[-1][1][5] == "0:00:00" and last == progress[-1][0]
    assert any(line.startswith("test ") for line in lines[last:]), "report after the progress"


def test_progress_and_system_metrics_reach_mlflow_while_training(store, first_run):
    """Each progress record is logged to the run (step = training steps so far, over epochs):
    at least both epoch ends (steps 4 and 8), with a positive speed and a loss per task; MLflow's
    system-metrics monitor sampled the machine while the workers ran."""
    c, run_id = _client(store), first_run.result.run_id
    speed = c.get_metric_history(run_id, "train/samples_per_s")
    steps = sorted(m.step for m in speed)
    assert {4, 8} <= set(steps), steps
    assert all(m.value > 0 for m in speed)
    assert all(m.value > 0 for m in c.get_metric_history(run_id, "train/step_time_s"))
    for task in ("sentiment", "ner"):
        assert sorted(_steps(store, run_id, f"train/{task}/loss")) == steps
    system = [k for k in c.get_run(run_id).data.metrics if k.startswith("system/")]
    assert "system/cpu_utilization_percentage" in system, system


def test_relaunch_with_more_epochs_resumes_the_same_run(store, first_run, demo_data, tiny_encoder):
    before = first_run.result
    cfg = _cfg(demo_data, tiny_encoder, epochs=3, num_workers=2, registered_model="train-demo")
    res = run_training(cfg, run_name="joint")
    assert res.run_id == before.run_id
    assert [row["epoch"] for row in res.history] == [0, 1, 2]
    assert res.history[2]["start_epoch"] == 2  # the new attempt began at the stored checkpoint
    assert res.history[:2] == before.history
    assert len(_runs_named(store, "joint")) == 1
    assert _steps(store, res.run_id, "objective") == [0, 1, 2]
    [run] = _runs_named(store, "joint")
    assert run.data.tags["relaunch.optim.epochs"] == "3"  # params are immutable; changes are tags
    # a new version only when the best checkpoint changed; otherwise the earlier one is reused
    assert res.model_version == (1 if res.best_epoch == before.best_epoch else 2)
    assert res.model_uri and res.model_uri.startswith("models:/")


def test_fsdp_run_resumes_and_matches_ddp(store, first_run, demo_data, tiny_encoder):
    """FSDP on CPU (gloo): each rank holds a shard, yet the bundle holds the whole model, and a
    run that crashed after epoch 0 and resumed (strictly) from its gathered checkpoint trains
    like the uninterrupted DDP run of this module (same data, seeds and averaging) up to
    summation order: a lost optimizer state or model shard on resume would move epoch 1 far
    beyond that."""
    from polytask.model.bundle import load_bundle
    from polytask.model.inference import Predictor
    from polytask.model.network import load_encoder

    cfg = _cfg(
        demo_data,
        tiny_encoder,
        epochs=2,
        num_workers=2,
        registered_model=None,
        sections={
            "scaling": {"parallel_strategy": "fsdp"},
            "run": {"max_failures": 1},
        },
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POLYTASK_FAULTS", '{"fail_at_epoch": 0}')
        res = run_training(cfg, run_name="fsdp")
    assert [(r["epoch"], r["start_epoch"]) for r in res.history] == [(0, 0), (1, 1)]
    for ddp, fsdp in zip(first_run.result.history, res.history, strict=True):
        for key in ("train_loss/sentiment", "train_loss/ner", "objective"):
            assert fsdp[key] == pytest.approx(ddp[key], rel=1e-3), (fsdp["epoch"], key)

    model, _, _ = load_bundle(res.bundle_path)
    full = sum(p.numel() for p in load_encoder(str(tiny_encoder))[0].parameters())
    assert sum(p.numel() for p in model.encoder.parameters()) == full
    initial = load_encoder(str(tiny_encoder))[0].state_dict()
    changed = [k for k, v in model.encoder.state_dict().items() if not torch.equal(v, initial[k])]
    assert changed, "the bundle holds trained weights, not the initial ones"
    assert Predictor.from_bundle(res.bundle_path).predict(TEXTS)[0].keys() == {"sentiment", "ner"}


def test_generation_trains_beside_classification_and_registers(ray_local, store, demo_data, tiny_seq2seq):
    """A classification task and a generation task (tiny T5: its encoder shared, its decoder the
    head) on 2 DDP workers: MLflow holds bleu/chrf/rouge_l per epoch and a registered version.
    (Resuming a generation model's state and its pyfunc answers: tests/unit/test_generation.py.)"""
    from polytask.demo import write_generation_data

    data = write_generation_data(store.root / "generation", n_train=64, n_eval=16)
    cfg = _cfg(demo_data, tiny_seq2seq, epochs=1, num_workers=2, registered_model="gen-demo",
               sections={"sampling": {"strategy": "uniform", "steps_per_epoch": 4}})  # seed 42: draws entities
    cfg.tasks[1] = cfg.tasks[1].model_validate({
        "name": "entities",
        "kind": "generation",
        "data": {"train": str(data / "entities/train.jsonl"), "validation": str(data / "entities/validation.jsonl")},
        "head": {"label_smoothing": 0.1},
        "generation": {"max_new_tokens": 6},
    })
    res = run_training(cfg, run_name="generation")
    for key in ("entities/bleu", "entities/chrf", "entities/rouge_l", "sentiment/accuracy"):
        assert _steps(store, res.run_id, key) == [0], key
    assert res.history[0]["train_loss/entities"] > 0  # a DDP step of the generation task ran
    assert res.model_version == 1 and "champion" in res.aliases
    version = _client(store).get_model_version_by_alias("gen-demo", "champion")
    assert version.run_id == res.run_id
    head = json.loads((Path(res.bundle_path) / "heads/entities/head.json").read_text())
    assert head["decoder"]["source"] == "checkpoint" and head["spec"]["generation"]["label_smoothing"] == 0.1
