"""Where state goes, without Ray: a command whose state would land in a Ray job's temporary copy
of its working directory is refused before any work, naming the settings that move it; a refused
join of a token-authenticated cluster ends in one `error:` line saying what to set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from polytask.cli import app, ray_join_error
from polytask.demo import demo_experiment, write_yaml
from polytask.tracking.places import (
    JOB_CONFIG_ENV,
    ScratchStateError,
    check_paths,
    output_place,
    ray_job_id,
    refuse_scratch,
    scratch_root,
    shown_path,
    with_store_env,
)
from polytask.training.train import TrainResult

SETTINGS = ("POLYTASK_HOME", "tracking.tracking_uri", "MLFLOW_TRACKING_URI", "run.storage_path")


@pytest.fixture()
def job_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The cwd of a Ray job's driver: Ray's unpacked copy of `--working-dir`, with no state
    settings in the environment (what a plain `ray job submit --working-dir .` gives)."""
    copy = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    copy.mkdir(parents=True)
    for var in ("POLYTASK_HOME", "MLFLOW_TRACKING_URI", "POLYTASK_STORAGE_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(copy)
    return copy


def test_scratch_root_finds_the_job_copy(job_copy: Path, tmp_path: Path) -> None:
    assert scratch_root(job_copy / ".polytask" / "mlflow.db") == job_copy
    assert scratch_root(".polytask") == job_copy  # relative: against the cwd
    assert scratch_root(tmp_path / "mine" / ".polytask") is None
    assert shown_path(str(job_copy / "bundle")) is None
    assert shown_path(str(tmp_path / "bundle")) == str(tmp_path / "bundle")


def test_default_state_in_a_job_copy_is_refused_naming_every_setting(job_copy: Path) -> None:
    with pytest.raises(ScratchStateError) as info:
        check_paths(f"sqlite:///{Path('.polytask/mlflow.db').resolve()}", str(job_copy / "ray"))
    message = str(info.value)
    assert str(job_copy) in message and "tracking store" in message and "checkpoints" in message
    for setting in SETTINGS:
        assert setting in message


def test_durable_or_remote_state_passes(job_copy: Path, tmp_path: Path) -> None:
    places = check_paths("http://mlflow:5000", "s3://bucket/runs")
    assert [p.where for p in places] == ["http://mlflow:5000", "s3://bucket/runs"]
    check_paths(f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}", str(tmp_path / "home" / "ray"))
    with pytest.raises(ScratchStateError, match="--output"):
        refuse_scratch([output_place("output", str(job_copy / "scored.jsonl"), "--output")])


def test_train_in_a_job_copy_fails_before_any_work(job_copy: Path, demo_data: Path, tiny_encoder: Path) -> None:
    path = write_yaml(demo_experiment(demo_data, tiny_encoder), job_copy / "jobs" / "train.yaml")
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 1, result.output
    assert "error:" in result.output and "Ray's temporary copy" in result.output
    for setting in SETTINGS:
        assert setting in result.output
    assert not (job_copy / ".polytask").exists()  # nothing was written, not even the store


def test_predict_output_in_a_job_copy_is_refused(job_copy: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"  # a bundle path needs no store; the output is what is refused
    (job_copy / "in.jsonl").write_text('{"text": "x"}\n')
    result = CliRunner().invoke(
        app, ["predict", str(bundle), "--input", "in.jsonl", "--output", "scored.jsonl"]
    )
    assert result.exit_code == 1
    assert "--output" in result.output and "Ray's temporary copy" in result.output


def test_ray_job_id_reads_what_the_job_supervisor_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    config = {"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"},
              "metadata": {"job_submission_id": "raysubmit_abc"}}
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps(config))
    assert ray_job_id() == "raysubmit_abc"
    monkeypatch.delenv(JOB_CONFIG_ENV)
    assert ray_job_id() is None


def test_summary_never_shows_a_path_in_the_job_copy(job_copy: Path, tmp_path: Path) -> None:
    result = TrainResult(
        run_id="r", run_name="demo", bundle_path=str(job_copy / ".polytask" / "runs" / "b"),
        checkpoint_path="s3://bucket/demo/checkpoint_0", metrics={}, objective=0.5,
        model_version=1, aliases=["champion"], tracking_uri="http://mlflow:5000",
        storage_path="s3://bucket/demo",
    )
    summary = result.summary()
    assert summary["bundle_path"] is None
    assert summary["checkpoint_path"] == "s3://bucket/demo/checkpoint_0"


def test_a_refused_join_says_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.exceptions import AuthenticationError

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    message = ray_join_error(AuthenticationError("Authentication required: Missing token"))
    assert message is not None
    assert "RAY_ADDRESS=10.0.0.5:6379" in message and "RAY_AUTH_MODE=token" in message
    assert "ray get-auth-token" in message and "RAY_AUTH_TOKEN" in message
    timed_out = ray_join_error(ConnectionError("Failed to connect to Ray cluster at 10.0.0.5:6379"))
    assert timed_out is not None and "RAY_AUTH_MODE=token" in timed_out
    assert ray_join_error(ConnectionError("connection refused")) is None


def test_serving_passes_its_store_to_the_replicas(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLYTASK_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    env = with_store_env({"env_vars": {"HF_HUB_OFFLINE": "1", "POLYTASK_HOME": "/kept"}})["env_vars"]
    assert env["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    assert env["POLYTASK_HOME"] == "/kept" and env["HF_HUB_OFFLINE"] == "1"
    assert with_store_env(None)["env_vars"]["POLYTASK_HOME"] == str(tmp_path / "home")
