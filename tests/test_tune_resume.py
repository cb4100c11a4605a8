"""An interrupted sweep resumes: relaunching the same sweep name finishes the remaining trials
without rerunning the finished ones. Both launches are real `polytask tune` processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlflow import MlflowClient

from polytask.demo import demo_experiment, write_yaml
from polytask.training.tune import PARENT_TAG, SWEEP_TAG


def _children(c: MlflowClient) -> list:
    exp = c.get_experiment_by_name("polytask")
    if exp is None:
        return []
    runs = c.search_runs([exp.experiment_id], f"tags.`{SWEEP_TAG}` = 'resume'")
    return [r for r in runs if PARENT_TAG in r.data.tags]


def test_interrupted_sweep_resumes_without_repeating(demo_data: Path, tiny_encoder: Path, tmp_path: Path) -> None:
    exp = demo_experiment(
        demo_data,
        tiny_encoder,
        epochs=2,
        num_workers=1,
        registered_model="resume-model",
        sampling={"steps_per_epoch": 4},
        tune={
            "search_space": {"optim.lr": "loguniform(1e-4, 3e-3)"},
            "num_samples": 4,
            "scheduler": "none",
            "name": "resume",
        },
    )
    path = write_yaml(exp, tmp_path / "sweep.yaml")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "POLYTASK_HOME": str(tmp_path / "home"),
           "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "polytask.cli", "tune", str(path)]
    c = MlflowClient(uri)
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.time() + 420
    while time.time() < deadline and first.poll() is None:
        if sum(r.info.status == "FINISHED" for r in _children(c)) >= 2:
            break
        time.sleep(2)
    assert first.poll() is None, "the first launch ended before it could be interrupted"
    os.killpg(first.pid, signal.SIGINT)  # what Ctrl-C does; Tune saves its state and exits
    first.wait(timeout=120)
    finished_before = {r.info.run_id: r.data.tags["trial.optim.lr"] for r in _children(c)
                       if r.info.status == "FINISHED"}
    assert 2 <= len(finished_before) < 4 or len(_children(c)) < 4

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming sweep resume" in second.stdout
    children = _children(c)
    assert len(children) == 4, [r.info.run_name for r in children]
    assert all(r.info.status == "FINISHED" for r in children)
    for run_id, lr in finished_before.items():  # finished trials were not trained again
        history = c.get_metric_history(run_id, "objective")
        assert [m.step for m in history] == [0, 1]
        assert c.get_run(run_id).data.tags["trial.optim.lr"] == lr
    assert c.get_model_version_by_alias("resume-model", "candidate") is not None
