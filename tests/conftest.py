"""Shared tiny fixtures: a random 2-layer BERT, the generated demo data, a trained bundle.

Everything is built locally; nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from polytask.config import ExperimentConfig, config_from_dict
from polytask.demo import demo_experiment, write_demo_data, write_tiny_encoder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BertConfig(2 layers, hidden 32) + a 150-piece WordPiece vocab: most words split."""
    return write_tiny_encoder(tmp_path_factory.mktemp("encoder") / "tiny-bert", vocab_size=150)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_data(tmp_path_factory.mktemp("data"), n_train=240, n_eval=60)


@pytest.fixture()
def experiment(demo_data: Path, tiny_encoder: Path):
    """Build an ExperimentConfig for the demo tasks; keyword sections override the defaults."""

    def make(**overrides: Any) -> ExperimentConfig:
        return config_from_dict(demo_experiment(demo_data, tiny_encoder, **overrides))

    return make


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory: pytest.TempPathFactory, demo_data: Path, tiny_encoder: Path) -> Path:
    """A bundle from a short plain-PyTorch run (no Ray): good enough to give non-trivial answers."""
    from polytask.model.bundle import save_bundle
    from polytask.training.data import load_task_data
    from polytask.training.loop import build_features, fit, setup

    cfg = config_from_dict(demo_experiment(demo_data, tiny_encoder, epochs=3, num_workers=1))
    task_data = load_task_data(cfg)
    from polytask.model.network import load_encoder

    _, tokenizer = load_encoder(str(tiny_encoder))
    train_f, eval_f = build_features(cfg, task_data, tokenizer)
    tr = setup(cfg, [td.spec for td in task_data.values()], train_f, eval_f)
    fit(tr, evaluate_each_epoch=False)
    path = tmp_path_factory.mktemp("bundle") / "bundle"
    save_bundle(tr.core, tokenizer, path, cfg.encoder.max_length, source=str(tiny_encoder))
    return path


@pytest.fixture(scope="session")
def untrained_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_encoder: Path) -> Path:
    """The demo tasks (sentiment, ner) with random heads: a real bundle, no training needed."""
    from polytask.model.bundle import save_bundle
    from polytask.model.network import build_model, load_encoder
    from polytask.tasks import TaskSpec

    encoder, tokenizer = load_encoder(str(tiny_encoder))
    specs = [
        TaskSpec("sentiment", "classification", ["negative", "positive"]),
        TaskSpec("ner", "token_classification", ["O", "B-person", "I-person"]),
    ]
    path = tmp_path_factory.mktemp("untrained") / "bundle"
    save_bundle(build_model(encoder, specs, pooling="cls"), tokenizer, path, max_length=32)
    return path


@pytest.fixture()
def mlflow_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A real MLflow store: SQLite in this test's tmp dir, artifacts beside it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("POLYTASK_HOME", str(tmp_path / "home"))
    return uri


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray with explicit CPUs, shut down after the module."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
