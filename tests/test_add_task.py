"""Adding a task to a trained model: heads-only training on its frozen encoder, a new registered
version with the old heads unchanged, and a running Serve app that picks it up by adding only the
new head (Encoder replicas kept, no request failed).

Real parts throughout: the session's Ray, a Ray Train run through `polytask add-task`, MLflow on
SQLite, Serve over HTTP, the tiny encoder. Tests run in file order and share one store.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import connect_ray, free_port, new_store
from polytask.cli import app
from polytask.model.bundle import read_manifest
from polytask.model.inference import Predictor
from polytask.tracking.registry import (
    client,
    ensure_experiment,
    register_bundle,
    resolve_bundle,
    tracking_uri,
)
from polytask.tracking.tags import ADDED_TASKS_TAG, ADDED_TO_VERSION_TAG, TASKS_TAG

ROOT = Path(__file__).resolve().parents[1]
LOCAL_CONFIG = ROOT / "serve_configs" / "local.yaml"
NAME = "addtask-demo"
TEXTS = [
    "the movie was great",
    "alice flew to paris last week with bob smith from acme",
    "honestly the hotel in oslo felt dreadful to me",
]


def _cli(*argv: str) -> Any:
    return CliRunner().invoke(app, list(argv), env={"COLUMNS": "200"})


def _mood_experiment(demo_data: Path, path: Path, task: str = "mood") -> Path:
    """One new classification task (the demo sentiment files, under a new name): no encoder
    section, `polytask add-task` supplies it."""
    experiment = {
        "tasks": [
            {
                "name": task,
                "kind": "classification",
                "data": {
                    "train": str(demo_data / "sentiment/train.jsonl"),
                    "validation": str(demo_data / "sentiment/validation.jsonl"),
                    "max_samples": 96,
                },
            }
        ],
        "optim": {"lr": 5e-3, "epochs": 1, "batch_size": 16},
        "scaling": {"num_workers": 1},
    }
    path.write_text(yaml.safe_dump(experiment))
    return path


@pytest.fixture(scope="module")
def store(ray_cluster, tmp_path_factory, _migrated_store):
    """One MLflow store for the module, seen by this process and by every Ray worker/replica."""
    import ray

    root = tmp_path_factory.mktemp("addtask_store")
    env = {"MLFLOW_TRACKING_URI": new_store(_migrated_store, root), "POLYTASK_HOME": str(root / "home")}
    was_connected = ray.is_initialized()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        connect_ray(ray_cluster, env)
        yield root
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    if was_connected:
        connect_ray(ray_cluster)


@pytest.fixture(scope="module")
def added(store, trained_bundle, demo_data):
    """Version 1: the trained two-task bundle (champion). Version 2: `polytask add-task` of one
    task on it (a real one-epoch Ray Train run). Returns (CLI output, v1 bundle, v2 bundle)."""
    c = client()
    run = c.create_run(ensure_experiment(c, "base", tracking_uri())).info.run_id
    register_bundle(trained_bundle, NAME, run, objective=0.5)
    experiment = _mood_experiment(demo_data, store / "mood.yaml")
    result = _cli("add-task", f"models:/{NAME}@champion", str(experiment), "--run-name", "mood")
    assert result.exit_code == 0, result.output
    return result.output, resolve_bundle(f"models:/{NAME}/1"), resolve_bundle(f"models:/{NAME}/2")


def test_add_task_registers_a_candidate_version_tagged_with_its_base(added):
    output, _, _ = added
    c = client()
    v2 = c.get_model_version(NAME, "2")
    assert v2.tags[ADDED_TO_VERSION_TAG] == "1"
    assert v2.tags[ADDED_TASKS_TAG] == "mood"
    assert v2.tags[TASKS_TAG] == "mood,ner,sentiment"
    assert str(c.get_model_version_by_alias(NAME, "champion").version) == "1"  # task sets differ
    assert str(c.get_model_version_by_alias(NAME, "candidate").version) == "2"
    assert f"polytask registry promote {NAME} 2" in output
    assert f"polytask serve models:/{NAME}/2 --update" in output


def test_old_heads_and_encoder_are_carried_over_bit_identical(added):
    _, v1, v2 = added
    old, new = read_manifest(v1), read_manifest(v2)
    assert new.fingerprint == old.fingerprint
    assert [s.name for s in new.tasks] == ["sentiment", "ner", "mood"]
    for task in ("sentiment", "ner"):
        a = load_file(v1 / "heads" / task / "head.safetensors")
        b = load_file(v2 / "heads" / task / "head.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), task
    before = Predictor.from_bundle(str(v1)).predict(TEXTS, ["sentiment", "ner"])
    after = Predictor.from_bundle(str(v2)).predict(TEXTS, ["sentiment", "ner"])
    assert json.dumps(after) == json.dumps(before)  # every float too, not within a tolerance
    mood = Predictor.from_bundle(str(v2)).predict(TEXTS, ["mood"])
    assert {r["mood"]["label"] for r in mood} <= {"negative", "positive"}


def test_add_task_refuses_a_task_the_model_already_has(added, demo_data, tmp_path):
    experiment = _mood_experiment(demo_data, tmp_path / "clash.yaml", task="sentiment")
    result = _cli("add-task", f"models:/{NAME}/2", str(experiment))
    assert result.exit_code == 1
    assert "tasks.sentiment: models:/addtask-demo/2 already has a task 'sentiment'" in result.stderr
    assert "rename the new task" in result.stderr


def test_freeze_trains_heads_only_with_the_encoder_in_eval_mode(experiment):
    """`encoder.freeze` on a plain encoder: weights (fingerprint) unchanged, the encoder ran in
    eval mode (no dropout) during training, and the heads did learn."""
    from polytask.model.network import encoder_fingerprint
    from polytask.training.data import load_task_data
    from polytask.training.features import load_tokenizer
    from polytask.training.loop import build_features, fit, setup

    cfg = experiment(epochs=1, lr=5e-3, num_workers=1)
    cfg = cfg.model_copy(update={"encoder": cfg.encoder.model_copy(update={"freeze": True})})
    task_data = load_task_data(cfg)
    train_f, eval_f = build_features(cfg, task_data, load_tokenizer(cfg))
    tr = setup(cfg, [td.spec for td in task_data.values()], train_f, eval_f)
    fingerprint = encoder_fingerprint(tr.core.encoder)
    heads = {k: v.clone() for k, v in tr.core.heads.state_dict().items()}
    modes: list[bool] = []
    tr.core.encoder.register_forward_pre_hook(lambda module, _: modes.append(module.training))
    fit(tr, evaluate_each_epoch=False)
    assert modes and not any(modes)
    assert encoder_fingerprint(tr.core.encoder) == fingerprint
    changed = [k for k, v in tr.core.heads.state_dict().items() if not torch.equal(v, heads[k])]
    assert changed


def _answers(client: httpx.Client, tasks: list[str]) -> list[dict[str, Any]]:
    response = client.post("/v1/predict", json={"inputs": TEXTS, "tasks": tasks})
    assert response.status_code == 200, response.text
    return response.json()


def test_serve_update_adds_only_the_new_head_under_load(added, store):
    """v1 served; `polytask serve models:/NAME/2 --update`'s function redeploys it while two
    clients keep asking for the old tasks: none fails, the Encoder replicas (actor ids) stay and
    never reload, old answers are bit-identical, and the new task answers over HTTP."""
    from ray import serve

    from polytask.serve import run_server
    from polytask.serve.update import replica_actors, update_app

    _, _, v2 = added
    url = run_server(f"models:/{NAME}/1", config_path=LOCAL_CONFIG, port=free_port(), blocking=False)
    seen: list[tuple[int, str]] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            while not stop.is_set():
                r = c.post("/v1/predict", json={"inputs": TEXTS, "tasks": ["sentiment", "ner"]})
                seen.append((r.status_code, r.json().get("model", {}).get("ref", r.text)))

    with httpx.Client(base_url=url, timeout=120) as c:
        before = _answers(c, ["sentiment", "ner"])
        encoders = replica_actors()["Encoder"]
        threads = [threading.Thread(target=traffic) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            report = update_app(f"models:/{NAME}/2", config_path=LOCAL_CONFIG)
            done = len(seen)
            while len(seen) < done + 6 and all(t.is_alive() for t in threads):
                threads[0].join(0.2)
        finally:
            stop.set()
            for t in threads:
                t.join()
        after = _answers(c, ["sentiment", "ner"])
        mood = _answers(c, ["mood"])

    failed = [x for x in seen if x[0] != 200]
    print(f"update: {report.seconds:.1f} s, {len(seen)} requests during it, {len(failed)} failed")
    assert seen and not failed, failed[:5]
    refs = [ref for _, ref in seen]
    assert refs[0] == f"models:/{NAME}/1" and refs[-1] == f"models:/{NAME}/2", refs[:: max(1, len(refs) // 10)]
    assert report.added == ["head_mood"] and not report.removed
    assert {"Encoder", "head_sentiment", "head_ner"} <= set(report.kept), report
    assert set(encoders) <= set(replica_actors()["Encoder"])
    stats = serve.get_deployment_handle("Encoder", "polytask").stats.remote().result()
    assert stats["loads"] == 1 and stats["model"] == f"models:/{NAME}/2"
    assert after["results"] == before["results"]
    assert after["model"]["fingerprint"] == before["model"]["fingerprint"]
    want = Predictor.from_bundle(str(v2)).predict(TEXTS, ["mood"])
    got = mood["results"]
    assert [r["mood"]["label"] for r in got] == [r["mood"]["label"] for r in want]
    for g, w in zip(got, want):
        assert g["mood"]["score"] == pytest.approx(w["mood"]["score"], abs=1e-5)
