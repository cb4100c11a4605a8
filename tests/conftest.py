"""Shared tiny fixtures: a random 2-layer BERT, the generated demo data, a trained bundle.

Everything is built locally; nothing is downloaded.
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from polytask.config import ExperimentConfig, config_from_dict
from polytask.demo import demo_experiment, write_demo_data, write_tiny_encoder

# The bench scripts' shared module is importable as `common` in every test (the scripts import
# each other by name, as when run directly); its `free_port` is the suite's too.
BENCH = Path(__file__).resolve().parents[1] / "jobs" / "bench"
sys.path.insert(0, str(BENCH))

from common import free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Ray Train's controller polls its workers every 2 s by default, which adds seconds to the start
# and end of every run (measured: a tiny 2-worker run took 24.7 s, 16.2 s at 0.2 s); a local test
# cluster is never preempted, so the preemption watcher (one more actor per run) is off. Set
# before the session's Ray starts, so its controllers and `polytask` subprocesses inherit them.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# A raylet starts Python workers ahead of its first driver; in a test cluster most are never
# used (measured: 8 idle workers, 12 s of CPU over the suite), and every test's actors and tasks
# start their own anyway.
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
# Python collects garbage every 700 allocations, and every Ray worker, replica and subprocess of
# the suite starts by importing torch, transformers and Ray's libraries (millions of objects):
# at 10,000 those imports take 11% less CPU (measured: 6.0 -> 5.3 s), and the whole suite 10%
# (843 -> 761 s of CPU). A `sitecustomize` on PYTHONPATH sets it in each process this one
# starts; this process sets it here. Only how often garbage is collected changes.
GC_THRESHOLD = (10_000, 10, 10)
_SITE = Path(tempfile.gettempdir()) / "polytask-tests-site"
_SITE.mkdir(exist_ok=True)
_partial = _SITE / f"sitecustomize.py.{os.getpid()}"
_partial.write_text(f"import gc\n\ngc.set_threshold{GC_THRESHOLD}\n")
_partial.replace(_SITE / "sitecustomize.py")  # atomic: xdist workers write it at once
_paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
if str(_SITE) not in _paths:
    os.environ["PYTHONPATH"] = os.pathsep.join([str(_SITE), *_paths])
gc.set_threshold(*GC_THRESHOLD)


# The suite runs in two xdist workers, one module at a time each (`-n 2 --dist loadfile` in
# pyproject.toml); a worker that runs dry takes the next module in this order. Longest first (their
# measured share of the suite) keeps both workers busy to the end; the rest follow in collection
# order: tests/ alphabetically, then tests/unit/ (the short modules that never start Ray) last.
LONGEST_FIRST = (
    "test_ray_jobs", "test_train", "test_bench", "test_cluster_chaos", "test_add_task",
    "test_quickstart", "test_tune", "test_mlflow_auth", "test_serve", "test_durable",
    "test_serve_generation", "test_ingest", "test_serve_autoscale", "test_serve_chaos",
    "test_batch", "test_compress", "test_serve_placement", "test_docs_site",
)
UNIT = Path(__file__).resolve().parent / "unit"
RAY_FIXTURES = frozenset({"ray_cluster", "ray_local", "ray_with_store"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    wrong = [
        item.nodeid
        for item in items
        if item.path.is_relative_to(UNIT) and RAY_FIXTURES & set(getattr(item, "fixturenames", ()))
    ]
    if wrong:
        raise pytest.UsageError(
            f"tests/unit/ never starts Ray, but {', '.join(wrong)} ask(s) for a Ray fixture "
            f"({', '.join(sorted(RAY_FIXTURES))}): move it to tests/"
        )
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: test order kept


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    """Torch in this process (in-process training and predictions) uses one thread: the other
    xdist worker keeps the second core busy, and two threads fighting for it cost CPU (measured:
    in-process training took 19% less CPU at one thread). Subprocesses and Ray workers keep
    their own settings."""
    import torch

    torch.set_num_threads(1)


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

    cfg = config_from_dict(demo_experiment(demo_data, tiny_encoder, epochs=3, lr=2e-3, num_workers=1))
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


@pytest.fixture(scope="session")
def tiny_seq2seq(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2+2-layer T5 (hidden 32) with the tiny WordPiece tokenizer: an encoder-decoder
    checkpoint, so its decoder can be the generation head (`head.decoder: checkpoint`)."""
    from polytask.demo import write_tiny_seq2seq

    return write_tiny_seq2seq(tmp_path_factory.mktemp("seq2seq") / "tiny-t5", vocab_size=150)


@pytest.fixture(scope="session")
def generation_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_encoder: Path) -> Path:
    """Random heads on the tiny BERT: `sentiment` (classification) and `entities` (generation,
    a new 1-layer decoder, max_new_tokens 6): a real bundle, no training needed."""
    from polytask.model.bundle import save_bundle
    from polytask.model.generation import build_generation_head, resolve_decoder
    from polytask.model.network import build_model, load_encoder
    from polytask.tasks import GenerationSpec, TaskSpec

    encoder, tokenizer = load_encoder(str(tiny_encoder))
    gen = TaskSpec("entities", "generation", [], generation=GenerationSpec(decoder_layers=1, max_new_tokens=6))
    gen = resolve_decoder(gen, encoder)
    specs = [TaskSpec("sentiment", "classification", ["negative", "positive"]), gen]
    heads = {"entities": build_generation_head(gen, tokenizer, encoder)}
    path = tmp_path_factory.mktemp("generation") / "bundle"
    save_bundle(build_model(encoder, specs, pooling="cls", heads=heads), tokenizer, path, max_length=32)
    return path


@pytest.fixture(scope="session")
def _migrated_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty SQLite store that MLflow created and migrated to its current schema, once: each
    new store copies it instead of replaying every migration (about 1 s per store)."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_registered_models()
    return db


def new_store(template: Path, folder: Path) -> str:
    """A fresh MLflow SQLite store at `folder/mlflow.db` (a copy of the migrated template)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


@pytest.fixture()
def mlflow_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _migrated_store: Path) -> str:
    """A real MLflow store: SQLite in this test's tmp dir, artifacts beside it."""
    uri = new_store(_migrated_store, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("POLYTASK_HOME", str(tmp_path / "home"))
    return uri


@pytest.fixture(scope="session")
def ray_cluster():
    """The session's one local Ray (a head node with explicit CPUs), started once; tests connect
    to it as drivers, which is quick. The dashboard is on because Ray Train's PlacementGroupCleaner
    watches controllers through the state API it serves: without it, trials that ASHA stops
    would leak their workers' CPUs."""
    import ray
    from ray._common.utils import reset_ray_address
    from ray.cluster_utils import Cluster

    from polytask.serve.levers import DEFAULT_LEVERS, lever_env

    # The suite runs under polytask's default Serve levers, as `polytask serve` does: Serve reads
    # them at import in each of its processes, which inherit this environment.
    os.environ.update(lever_env(DEFAULT_LEVERS))
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 4,
            "include_dashboard": True,
            "dashboard_port": free_port(),  # each xdist worker runs its own cluster
            # Every driver here connects with log_to_driver=False, so nothing reads what the log
            # monitor forwards; it re-scans every worker's log files 10 times a second (measured:
            # 14 s of CPU over the suite, growing with the number of workers started).
            "include_log_monitor": False,
        },
    )
    # Cluster also records itself as this machine's default Ray (/tmp/ray/ray_current_cluster),
    # so any plain `ray.init()` (a `polytask` subprocess, another user) would join it: forget that.
    reset_ray_address()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def connect_ray(cluster: Any, env: dict[str, str] | None = None):
    """(Re)connect this process to the session's Ray as a new job; `env` reaches every worker
    and Serve replica the job starts (they do not see later changes to os.environ)."""
    import ray

    ray.shutdown()
    ray.init(
        address=cluster.address,
        log_to_driver=False,
        runtime_env={"env_vars": env} if env else None,
    )
    return ray


@pytest.fixture(scope="module")
def ray_local(ray_cluster):
    """The session's Ray, connected for this module (reusing the current connection)."""
    import ray

    if not ray.is_initialized():
        connect_ray(ray_cluster)
    yield ray


@pytest.fixture()
def ray_with_store(ray_cluster, mlflow_uri: str):
    """The session's Ray, connected as a job whose workers and replicas read this test's MLflow
    store and polytask home; afterwards connected (or not) as before."""
    import ray

    was_connected = ray.is_initialized()
    env = {"MLFLOW_TRACKING_URI": mlflow_uri, "POLYTASK_HOME": os.environ["POLYTASK_HOME"]}
    yield connect_ray(ray_cluster, env)
    ray.shutdown()
    if was_connected:
        connect_ray(ray_cluster)


@pytest.fixture()
def no_ray(request: pytest.FixtureRequest):
    """For tests asserting Ray was never started: begin disconnected (a session cluster stays
    up), and reconnect afterwards if this process was connected before."""
    import ray

    cluster = request.getfixturevalue("ray_cluster") if ray.is_initialized() else None
    ray.shutdown()
    yield
    assert not ray.is_initialized(), "a bad input started Ray before failing"
    if cluster is not None:
        connect_ray(cluster)
