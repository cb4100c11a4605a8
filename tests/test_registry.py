"""Model Registry on a real MLflow SQLite store: versions, aliases, promotion, URI resolution."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from polytask.model.inference import Predictor
from polytask.tracking.registry import (
    artifact_location,
    client,
    ensure_experiment,
    list_versions,
    promote,
    register_bundle,
    resolve_bundle,
    tracking_uri,
    use_tracking_uri,
)

TEXTS = ["bob moved to lima", "the hotel was awful"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (a new MLflow db costs seconds); names differ per test."""
    root = tmp_path_factory.mktemp("registry_store")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("POLYTASK_HOME", str(root / "home"))
        yield root


@pytest.fixture()
def run_id(store):
    c = client()
    return c.create_run(ensure_experiment(c, "polytask", tracking_uri())).info.run_id


def test_tracking_uri_defaults_to_sqlite_in_home(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("POLYTASK_HOME", str(tmp_path))
    assert tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert artifact_location(tracking_uri()) == (tmp_path / "mlartifacts").as_uri()
    assert artifact_location("http://127.0.0.1:5000") is None


def test_experiment_artifacts_live_beside_the_db(store):
    c = client()
    exp = c.get_experiment(ensure_experiment(c, "artifacts-here", tracking_uri()))
    assert exp.artifact_location == (store / "mlartifacts").as_uri()
    assert ensure_experiment(c, "artifacts-here", tracking_uri()) == exp.experiment_id


def test_worse_version_is_candidate_not_champion_until_promoted(trained_bundle, run_id):
    first = register_bundle(trained_bundle, "reg-demo", run_id, objective=0.6)
    assert (first["version"], first["aliases"]) == (1, ["candidate", "champion"])
    second = register_bundle(trained_bundle, "reg-demo", run_id, objective=0.4)
    assert (second["version"], second["aliases"]) == (2, ["candidate"])

    rows = {r["version"]: r for r in list_versions("reg-demo")}
    assert rows[1]["aliases"] == "champion" and rows[1]["objective"] == "0.6"
    assert rows[1]["variant"] == "fp32"
    assert rows[2]["aliases"] == "candidate" and rows[2]["run_id"] == run_id
    assert list_versions(None) == [
        {"name": "reg-demo", "versions": 2, "latest": 2, "aliases": "candidate→v2, champion→v1"}
    ]

    assert resolve_bundle("models:/reg-demo@champion") == resolve_bundle("models:/reg-demo/1")
    promote("reg-demo", 2, "champion")
    rows = {r["version"]: r for r in list_versions("reg-demo")}
    assert rows[1]["aliases"] == "" and rows[2]["aliases"] == "candidate, champion"
    assert resolve_bundle("models:/reg-demo@champion") == resolve_bundle("models:/reg-demo/2")
    assert resolve_bundle("models:/reg-demo/2") != resolve_bundle("models:/reg-demo/1")


def test_better_and_forced_versions_take_champion(trained_bundle, run_id):
    register_bundle(trained_bundle, "reg-rank", run_id, objective=0.5)
    better = register_bundle(trained_bundle, "reg-rank", run_id, objective=0.7)
    assert better["aliases"] == ["candidate", "champion"]
    forced = register_bundle(trained_bundle, "reg-rank", run_id, objective=0.1, promote="always")
    assert forced["aliases"] == ["candidate", "champion"]
    held = register_bundle(trained_bundle, "reg-rank", run_id, objective=0.9, promote="never")
    assert held["aliases"] == ["candidate"]
    c = client()
    assert int(c.get_model_version_by_alias("reg-rank", "champion").version) == forced["version"]
    assert c.get_model_version("reg-rank", str(better["version"])).tags["objective"] == "0.7"


def test_models_uri_resolves_to_the_aliased_bundle_and_pyfunc_agrees(trained_bundle, run_id):
    import mlflow

    register_bundle(trained_bundle, "reg-load", run_id, objective=0.5)
    path = resolve_bundle("models:/reg-load@champion")
    assert (path / "polytask.json").is_file() and (path / "encoder").is_dir()
    assert path == resolve_bundle("models:/reg-load/1")  # alias and version share one download
    by_run = resolve_bundle(f"runs:/{run_id}/model")  # MLflow 3: the run's logged model
    assert (by_run / "polytask.json").is_file()
    expected = Predictor.from_bundle(str(trained_bundle)).predict(TEXTS)
    assert Predictor.from_bundle(str(path)).predict(TEXTS) == expected

    with use_tracking_uri(tracking_uri()):
        model = mlflow.pyfunc.load_model("models:/reg-load@champion")
    assert model.predict(TEXTS) == expected
    assert model.predict(pd.DataFrame({"text": TEXTS})) == expected
    assert model.predict([{"text": t} for t in TEXTS]) == expected
    only = model.predict(TEXTS, params={"tasks": ["sentiment"]})
    assert [set(r) for r in only] == [{"sentiment"}, {"sentiment"}]
    with pytest.raises(ValueError, match="needs a 'text' column"):
        model.predict(pd.DataFrame({"sentence": TEXTS}))


def test_resolve_bundle_errors_name_the_fix(tmp_path, trained_bundle, run_id):
    assert resolve_bundle(str(trained_bundle)) == trained_bundle.resolve()
    with pytest.raises(FileNotFoundError, match="not a bundle directory"):
        resolve_bundle(str(tmp_path))
    register_bundle(trained_bundle, "reg-alias", run_id, objective=0.5, promote="never")
    with pytest.raises(FileNotFoundError, match="no version of 'reg-alias' has alias 'champion'"):
        resolve_bundle("models:/reg-alias@champion")


def test_default_home_store_works_without_env_and_leaves_cwd_clean(
    trained_bundle, monkeypatch, tmp_path
):
    """No $MLFLOW_TRACKING_URI (the CLI case): logging, registering and resolving all use the
    home SQLite store — nothing falls through to MLflow's own default in the cwd."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("POLYTASK_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    c = client()
    rid = c.create_run(ensure_experiment(c, "polytask", tracking_uri())).info.run_id
    out = register_bundle(trained_bundle, "home-demo", rid, objective=0.5)
    assert out["aliases"] == ["candidate", "champion"]
    assert (resolve_bundle("models:/home-demo@champion") / "polytask.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]
    assert "MLFLOW_TRACKING_URI" not in os.environ  # restored after the fluent calls


def test_model_references_parse_into_their_parts():
    from polytask.tracking.uris import parse_model_uri

    alias = parse_model_uri("models:/reg@champion")
    assert (alias.kind, alias.name, alias.alias, alias.rest, alias.registered) == (
        "alias", "reg", "champion", "", True
    )
    version = parse_model_uri("models:/reg/12/sub/dir")
    assert (version.kind, version.name, version.version, version.rest) == (
        "version", "reg", "12", "/sub/dir"
    )
    run = parse_model_uri("runs:/abc123/model")
    assert (run.kind, run.run_id, run.rest, run.registered) == ("run", "abc123", "model", False)
    assert parse_model_uri("bundles/b1").kind == "path"
    assert parse_model_uri("models:/m-0123abcd").kind == "other"
    assert parse_model_uri("models:/reg/latest").kind == "other"


def test_one_pinning_for_registry_compress_and_serve(trained_bundle, run_id):
    """An alias pins to the version it names now, the same way in all three callers."""
    from polytask.compression.compress import registered_version
    from polytask.serve.refs import pin_model_uri as serve_pin
    from polytask.serve.schemas import ServeArgsError
    from polytask.tracking.uris import AliasNotFound, pin_model_uri

    register_bundle(trained_bundle, "reg-pin", run_id, objective=0.5)
    register_bundle(trained_bundle, "reg-pin", run_id, objective=0.9)
    assert pin_model_uri("models:/reg-pin@champion", client) == "models:/reg-pin/2"
    assert pin_model_uri("models:/reg-pin@champion/x", client) == "models:/reg-pin/2/x"
    assert pin_model_uri("models:/reg-pin/1", client) == "models:/reg-pin/1"
    assert pin_model_uri(str(trained_bundle), client) == str(trained_bundle.resolve())
    assert serve_pin("models:/reg-pin@candidate") == "models:/reg-pin/2"
    assert registered_version("models:/reg-pin@champion") == ("reg-pin", "2")
    assert registered_version("models:/reg-pin/1") == ("reg-pin", "1")
    with pytest.raises(AliasNotFound, match="'reg-pin' has no alias 'gold'"):
        pin_model_uri("models:/reg-pin@gold", client)
    with pytest.raises(ServeArgsError, match="has no alias 'gold'.*polytask registry promote"):
        serve_pin("models:/reg-pin@gold")
    with pytest.raises(ValueError, match="has no alias 'gold'.*polytask registry list reg-pin"):
        registered_version("models:/reg-pin@gold")
    with pytest.raises(ValueError, match="--register needs a models:/NAME/VERSION"):
        registered_version(str(trained_bundle))
