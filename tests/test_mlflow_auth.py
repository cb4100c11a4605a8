"""MLflow's basic-auth app, live: the server runs with the shipped auth config
(k8s/base/mlflow-auth.yaml) and server flags (k8s/base/mlflow.yaml) on 127.0.0.1, SQLite in a
tmp dir; users and the writers' role are created through the REST API as docs/reliability.md
says. The serving user reads and loads models but can neither create one nor move an alias;
the training user registers, promotes, and breaks an expired promotion lock the admin left.
"""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
ADMIN = ("admin", "admin-pw-0123456789")
TRAIN = ("polytask-train", "train-pw-0123456789")
SERVE = ("polytask-serve", "serve-pw-0123456789")
FLAGS = ("--app-name", "--enable-workspaces", "--serve-artifacts")


def _shipped_auth_ini(db: Path) -> str:
    docs = list(yaml.safe_load_all((ROOT / "k8s/base/mlflow-auth.yaml").read_text()))
    config = configparser.ConfigParser()
    config.read_string(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["basic_auth.ini"])
    config["mlflow"]["database_uri"] = f"sqlite:///{db}"
    with (db.parent / "basic_auth.ini").open("w") as f:
        config.write(f)
    return str(db.parent / "basic_auth.ini")


def _shipped_flags() -> list[str]:
    """The flags of the shipped `mlflow server` that decide who may do what."""
    docs = yaml.safe_load_all((ROOT / "k8s/base/mlflow.yaml").read_text())
    deployment = next(d for d in docs if d and d["kind"] == "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    out = []
    for i, arg in enumerate(args):
        if arg == "--app-name":
            out += [arg, args[i + 1]]
        elif arg in FLAGS:
            out.append(arg)
    assert out[:2] == ["--app-name", "basic-auth"] and "--enable-workspaces" in out
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("mlflow_auth")
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": _shipped_auth_ini(tmp / "basic_auth.db"),
        "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN[0],
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-csrf-key",
    }
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "mlflow", "server", *_shipped_flags(),
           "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
           "--artifacts-destination", str(tmp / "artifacts"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = (tmp / "server.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, (tmp / "server.log").read_text()[-3000:]
        time.sleep(1)
    else:
        proc.kill()
        pytest.fail("mlflow server did not answer /health:\n" + (tmp / "server.log").read_text()[-3000:])
    _create_users(url)
    yield url
    os.killpg(proc.pid, 9)  # the server and its uvicorn workers, all started here
    proc.wait(timeout=30)


def _create_users(url: str) -> None:
    """What docs/reliability.md has the operator run with the admin's credentials."""
    with httpx.Client(base_url=url, auth=ADMIN, timeout=30) as c:
        for user, password in (TRAIN, SERVE):
            c.post("/api/2.0/mlflow/users/create",
                   json={"username": user, "password": password}).raise_for_status()
        role = c.post("/api/3.0/mlflow/roles/create",
                      json={"name": "polytask-writers", "workspace": "default"})
        role.raise_for_status()
        role_id = role.json()["role"]["id"]
        c.post("/api/3.0/mlflow/roles/permissions/add",
               json={"role_id": role_id, "resource_type": "workspace", "resource_pattern": "*",
                     "permission": "USE"}).raise_for_status()
        c.post("/api/3.0/mlflow/roles/assign",
               json={"username": TRAIN[0], "role_id": role_id}).raise_for_status()


@pytest.fixture()
def as_user(server, monkeypatch, tmp_path):
    """Switch the MLflow client (and polytask) to one user of the live server."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    monkeypatch.setenv("POLYTASK_HOME", str(tmp_path / "home"))

    def switch(user: tuple[str, str]) -> None:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user[0])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", user[1])

    return switch


def _denied(call, *args) -> None:
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as caught:
        call(*args)
    assert "PERMISSION_DENIED" in str(caught.value.error_code) or "denied" in str(caught.value).lower()


def test_the_serving_user_reads_and_loads_but_cannot_create_or_promote(
    as_user, server, trained_bundle
):
    from polytask.model.inference import Predictor
    from polytask.tracking.registry import (
        client,
        ensure_experiment,
        register_bundle,
        resolve_bundle,
    )

    as_user(TRAIN)
    c = client(server)
    run = c.create_run(ensure_experiment(c, "auth", server)).info.run_id
    first = register_bundle(trained_bundle, "auth-model", run, objective=0.5, uri=server)
    second = register_bundle(trained_bundle, "auth-model", run, objective=0.4, uri=server)
    assert first["aliases"] == ["candidate", "champion"] and second["aliases"] == ["candidate"]

    as_user(SERVE)
    c = client(server)
    assert c.get_model_version_by_alias("auth-model", "champion").version == "1"
    bundle = resolve_bundle("models:/auth-model@champion")
    assert Predictor.from_bundle(str(bundle)).predict(["bob went to lima"])
    _denied(c.create_registered_model, "serve-made-this")
    _denied(c.set_registered_model_alias, "auth-model", "champion", "2")
    _denied(c.delete_model_version, "auth-model", "2")
    _denied(c.create_experiment, "serve-experiment")
    assert c.get_model_version_by_alias("auth-model", "champion").version == "1"

    as_user(TRAIN)
    from polytask.tracking.registry import promote

    assert promote("auth-model", 2)["version"] == 2
    assert client(server).get_model_version_by_alias("auth-model", "champion").version == "2"


def test_the_training_user_breaks_an_expired_lock_the_admin_left(as_user, server, trained_bundle):
    """The admin's by-hand promote was killed holding the lock: the training user may not delete
    the admin's registered model, yet it takes the lock once the lease ran out, and promotes."""
    from polytask.tracking import lock as locks
    from polytask.tracking.registry import client, ensure_experiment, register_bundle
    from polytask.tracking.tags import LOCK_LEASE_TAG, LOCK_OWNER_TAG

    as_user(ADMIN)
    left = locks.lock_name("auth-locked", 1)
    client(server).create_registered_model(
        left, tags={LOCK_OWNER_TAG: "admin, killed", LOCK_LEASE_TAG: repr(time.time() - 3600)}
    )
    as_user(TRAIN)
    c = client(server)
    _denied(c.delete_registered_model, left)
    run = c.create_run(ensure_experiment(c, "auth", server)).info.run_id
    got = register_bundle(trained_bundle, "auth-locked", run, objective=0.5, uri=server)
    assert "champion" in got["aliases"], got["promotion"]
    held = [m.name for m in c.search_registered_models() if locks.is_lock_name(m.name)]
    assert held == [left], "only the admin's superseded lock is left, for the admin to delete"
