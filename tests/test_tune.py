"""Ray Tune sweeps: real local Ray, real MLflow (SQLite in tmp), tiny encoder.

One ASHA sweep covers running, interrupting and resuming: a real `polytask tune` process is
stopped with SIGINT (what Ctrl-C does; Tune saves its state) after its first trial, and
launching the same sweep name again finishes the rest without retraining the finished trial.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from rich.console import Console

from conftest import connect_ray
from polytask.config import load_config
from polytask.demo import demo_experiment, write_yaml
from polytask.training.searchspace import SearchSpaceError
from polytask.training.tune import PARENT_TAG, SWEEP_TAG, run_sweep

SPACE = {"tasks.sentiment.weight": "loguniform(0.2, 5)", "optim.lr": "loguniform(1e-4, 3e-3)"}
TRIALS = 2  # one finished before the interrupt, one left for the relaunch


def test_invalid_space_is_rejected_before_ray_starts(experiment, mlflow_uri: str, no_ray) -> None:
    cfg = experiment(tune={"search_space": {"optim.lr": "loguniform(0, 1e-3)"}})
    match = "tune.search_space.optim.lr: loguniform needs a positive"
    with pytest.raises(SearchSpaceError, match=match):
        run_sweep(cfg)


def _runs(c: MlflowClient, sweep: str) -> list:
    exp = c.get_experiment_by_name("polytask")
    if exp is None:
        return []
    return c.search_runs([exp.experiment_id], f"tags.`{SWEEP_TAG}` = '{sweep}'")


def _children(c: MlflowClient, sweep: str) -> list:
    return [r for r in _runs(c, sweep) if PARENT_TAG in r.data.tags]


def _steps(c: MlflowClient, run_id: str, key: str) -> list[int]:
    return [m.step for m in c.get_metric_history(run_id, key)]


def test_interrupted_asha_sweep_resumes_and_registers_the_best(
    demo_data: Path, tiny_encoder: Path, tmp_path: Path, mlflow_uri: str, ray_cluster
) -> None:
    import ray

    exp = demo_experiment(
        demo_data,
        tiny_encoder,
        epochs=2,
        num_workers=1,
        registered_model="sweep-model",
        sampling={"steps_per_epoch": 4},
        tune={"search_space": SPACE, "num_samples": TRIALS, "grace_period": 1, "name": "s"},
    )
    path = write_yaml(exp, tmp_path / "sweep.yaml")
    c = MlflowClient(mlflow_uri)

    # 1. A real `polytask tune` process, interrupted after its first trial. It joins the session's
    # Ray as its own job (as `RAY_ADDRESS=... polytask tune` joins a cluster), so the interrupt
    # also ends that job's trials.
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "polytask.cli", "tune", str(path)]
    log = tmp_path / "first.log"
    with log.open("w") as sink:
        first = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    deadline = time.time() + 420
    while time.time() < deadline and first.poll() is None:
        if any(r.info.status == "FINISHED" for r in _children(c, "s")):
            break
        time.sleep(1)
    assert first.poll() is None, "the first launch ended early:\n" + log.read_text()[-3000:]
    os.killpg(first.pid, signal.SIGINT)
    first.wait(timeout=120)
    finished_before = {
        r.info.run_id: (r.data.tags["trial.optim.lr"], _steps(c, r.info.run_id, "objective"))
        for r in _children(c, "s")
        if r.info.status == "FINISHED"
    }
    assert 1 <= len(finished_before) < TRIALS
    printed = log.read_text()
    assert "Trial status:" in printed and "objective" in printed, "Tune's trial table is shown"

    # 2. The same sweep launched again (in-process, for its SweepResult) resumes it, on the same
    # Ray (its dashboard serves the state API that Ray Train's PlacementGroupCleaner watches, or
    # trials ASHA stops would leak their CPUs).
    out = io.StringIO()
    was_connected = ray.is_initialized()
    connect_ray(ray_cluster)
    try:
        result = run_sweep(load_config(path), console=Console(file=out, width=200))
    finally:
        ray.shutdown()
        if was_connected:
            connect_ray(ray_cluster)
    assert "resuming sweep s" in out.getvalue()

    assert len(result.trials) == TRIALS
    runs = _runs(c, "s")
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) == result.parent_run_id]
    assert len(parents) == 1 and len(children) == TRIALS, [r.info.run_name for r in runs]
    assert all(r.info.status == "FINISHED" for r in children)
    for child in children:  # every trial logged its weight and per-task metrics per epoch
        assert "tasks.sentiment.weight" in child.data.params
        history = _steps(c, child.info.run_id, "ner/f1")
        assert history == list(range(len(history))) and history
    for run_id, (lr, steps) in finished_before.items():  # finished trials were not trained again
        assert steps == [0, 1] and _steps(c, run_id, "objective") == steps
        assert c.get_run(run_id).data.tags["trial.optim.lr"] == lr

    objectives = [t["objective"] for t in result.trials]
    assert objectives == sorted(objectives, reverse=True)
    best = result.best
    assert best is not None and best["objective"] == max(objectives)
    version = c.get_model_version_by_alias("sweep-model", "candidate")
    assert int(version.version) == result.model_version
    registered_run = c.get_run(version.run_id)
    assert registered_run.data.tags.get(PARENT_TAG) == result.parent_run_id
    assert registered_run.info.run_name == best["run_name"]
    artifacts = [a.path for a in c.list_artifacts(result.parent_run_id)]
    assert "sweep_summary.png" in artifacts
    assert Path(result.plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.pareto and set(result.pareto) <= {t["trial"] for t in result.trials}
