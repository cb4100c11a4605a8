"""Ray Tune sweeps: real local Ray, real MLflow (SQLite in tmp), tiny encoder."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from polytask.training.searchspace import SearchSpaceError
from polytask.training.tune import PARENT_TAG, SWEEP_TAG, run_sweep

SPACE = {"tasks.sentiment.weight": "loguniform(0.2, 5)", "optim.lr": "loguniform(1e-4, 3e-3)"}


@pytest.fixture(scope="module")
def ray_with_dashboard():
    """Ray Train's PlacementGroupCleaner watches controllers through the state API, which the
    dashboard serves: without it, trials that ASHA stops would leak their workers' CPUs."""
    import ray

    ray.init(num_cpus=6, include_dashboard=True, log_to_driver=False)
    yield ray
    ray.shutdown()


def _sweep_cfg(experiment, name: str, samples: int = 4):
    return experiment(
        epochs=2,
        num_workers=1,
        registered_model="sweep-model",
        sampling={"steps_per_epoch": 6},
        tune={"search_space": SPACE, "num_samples": samples, "grace_period": 1, "name": name},
    )


def test_invalid_space_is_rejected_before_ray_starts(experiment, mlflow_uri: str) -> None:
    import ray

    assert not ray.is_initialized()
    cfg = experiment(tune={"search_space": {"optim.lr": "loguniform(0, 1e-3)"}})
    with pytest.raises(SearchSpaceError, match="tune.search_space.optim.lr: loguniform needs a positive"):
        run_sweep(cfg)
    assert not ray.is_initialized()


def test_four_trial_asha_sweep_registers_the_best(experiment, mlflow_uri: str, ray_with_dashboard) -> None:
    result = run_sweep(_sweep_cfg(experiment, "s4"))
    assert len(result.trials) == 4
    c = MlflowClient(mlflow_uri)
    exp = c.get_experiment_by_name("polytask")
    runs = c.search_runs([exp.experiment_id], f"tags.`{SWEEP_TAG}` = 's4'")
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) == result.parent_run_id]
    assert len(parents) == 1 and len(children) == 4
    for child in children:  # every trial logged its weight and per-task metrics per epoch
        assert "tasks.sentiment.weight" in child.data.params
        history = c.get_metric_history(child.info.run_id, "ner/f1")
        assert [m.step for m in history] == list(range(len(history))) and history
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
