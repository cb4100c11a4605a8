"""The quickstart end to end in its fast mode: train on Ray Train → register → serve → HTTP."""

from __future__ import annotations

import socket
from pathlib import Path

from mlflow import MlflowClient

from polytask.quickstart import EXAMPLES, MODEL_NAME, run_quickstart


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_quickstart_fast_mode_answers_over_http(
    tmp_path: Path, mlflow_uri: str, ray_with_store
) -> None:
    ray = ray_with_store

    answers = run_quickstart(tmp_path / "qs", fast=True, port=_free_port())
    assert len(answers) == len(EXAMPLES)
    for answer in answers:
        assert answer["sentiment"]["label"] in ("positive", "negative")
        assert 0.0 <= answer["sentiment"]["score"] <= 1.0
        assert isinstance(answer["ner"]["entities"], list)
    version = MlflowClient(mlflow_uri).get_model_version_by_alias(MODEL_NAME, "champion")
    assert str(version.version) == "1"
    assert (tmp_path / "qs" / "experiment.yaml").is_file()
    assert not ray.is_initialized(), "quickstart shuts Ray down when it is done"
