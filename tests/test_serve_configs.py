"""serve_configs/*.yaml: valid for Ray Serve, buildable by polytask, and placed as intended."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "serve_configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


@pytest.fixture(autouse=True)
def _default_levers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped configs name the default levers, whose env the builder checks: set it for each
    test, as `polytask serve` and RayService containers do. Serve's constants are imported first,
    so this test process keeps reading its own (a driver's handles need the separate loop)."""
    import ray.serve._private.constants  # noqa: F401

    from polytask.serve.levers import DEFAULT_LEVERS, lever_env

    for key, value in lever_env(DEFAULT_LEVERS).items():
        monkeypatch.setenv(key, value)


def _apps(path: Path) -> list[Any]:
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(yaml.safe_load(path.read_text())).applications


def _deployments(app: Any) -> list[dict[str, Any]]:
    return [d.model_dump(exclude_unset=True) for d in app.deployments]


def _head_entries(app: Any) -> list[dict[str, Any]]:
    """Every place head deployment options come from: head_options and head_* overrides."""
    entries = [app.args.get("head_options") or {}]
    entries += [
        d.model_dump(exclude_unset=True) for d in app.deployments if d.name.startswith("head_")
    ]
    return entries


def test_both_configs_exist():
    assert {p.name for p in CONFIGS} >= {"local.yaml", "cluster.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_and_builds(path: Path, untrained_bundle: Path, tmp_path: Path):
    from ray._common.utils import import_attr

    from polytask.serve import build_app, compose, parse_args

    for app in _apps(path):
        assert import_attr(app.import_path) is build_app
        args = parse_args(app.args)
        assert args.model
        options = {
            d.name: d.model_dump(exclude_unset=True, exclude={"name"}) for d in app.deployments
        }
        # The config's deployment names and options fit the app the builder makes (demo tasks).
        bundle = untrained_bundle
        built = compose(parse_args({**app.args, "model": str(bundle)}), options)
        assert built is not None


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_deployment_autoscales_and_heads_stay_on_cpu(path: Path):
    for app in _apps(path):
        names = {d.name for d in app.deployments}
        assert {"Ingress", "Encoder"} <= names, f"{path.name}: Ingress/Encoder options missing"
        for d in app.deployments:
            cfg = d.autoscaling_config if isinstance(d.autoscaling_config, dict) else {}
            assert cfg.get("min_replicas", 0) >= 1 and cfg.get("max_replicas"), (
                f"{path.name}: {d.name}"
            )
        heads = (app.args.get("head_options") or {}).get("autoscaling_config") or {}
        assert heads.get("min_replicas", 0) >= 1 and heads.get("max_replicas"), (
            f"{path.name}: heads"
        )
        for entry in _head_entries(app):
            assert not (entry.get("ray_actor_options") or {}).get("num_gpus"), (
                f"{path.name}: head GPU"
            )


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_encoder_and_head_targets_count_batches_so_max_replicas_is_reachable(path: Path):
    """The Encoder and heads are called once per Ingress batch (per text view), and an Ingress
    replica runs at most `ingress_batches_in_flight` batches, so their ongoing requests never
    exceed Ingress max_replicas x that; a target whose max_replicas needs more never scales there
    (cluster.yaml's old 8 kept the Encoder at 1 replica)."""
    from polytask.serve.args import ServeArgs

    (app,) = _apps(path)
    by_name = {d["name"]: d for d in _deployments(app)}
    in_flight = app.args.get(
        "ingress_batches_in_flight", ServeArgs.model_fields["ingress_batches_in_flight"].default
    )
    batches = by_name["Ingress"]["autoscaling_config"]["max_replicas"] * in_flight
    for name, options in [("Encoder", by_name["Encoder"])] + [
        (entry.get("name", "head_options"), entry) for entry in _head_entries(app)
    ]:
        auto = options["autoscaling_config"]
        target = auto.get("target_ongoing_requests", 2)  # Serve's default
        assert target * auto["max_replicas"] <= batches, (path.name, name, target, batches)


def test_cluster_config_pins_heads_to_cpu_pool_and_encoder_to_gpu():
    (app,) = _apps(CONFIG_DIR / "cluster.yaml")
    for entry in _head_entries(app):
        resources = (entry.get("ray_actor_options") or {}).get("resources") or {}
        assert resources.get("cpu_pool", 0) > 0, entry
    encoder = next(d for d in _deployments(app) if d["name"] == "Encoder")
    assert encoder["ray_actor_options"]["num_gpus"] >= 1
    assert app.args["device"] == "cuda"


def test_local_config_is_cpu_only_small_and_loopback():
    raw = yaml.safe_load((CONFIG_DIR / "local.yaml").read_text())
    assert raw["http_options"]["host"] == "127.0.0.1"
    (app,) = _apps(CONFIG_DIR / "local.yaml")
    assert app.args["device"] == "cpu"
    for d in _deployments(app):
        assert not (d.get("ray_actor_options") or {}).get("num_gpus")
        assert 1 <= d["autoscaling_config"]["max_replicas"] <= 2
    assert 1 <= app.args["head_options"]["autoscaling_config"]["max_replicas"] <= 2


def test_bad_args_name_the_field_and_the_fix():
    from polytask.serve import ServeArgsError, parse_args

    with pytest.raises(ServeArgsError) as err:
        parse_args({"model": "m", "devce": "cpu", "overflow": "cut"})
    message = str(err.value)
    assert "devce: is not a known field" in message and "known fields:" in message
    assert "overflow: Input should be 'reject' or 'truncate'" in message
    with pytest.raises(ServeArgsError, match="remove num_gpus"):
        parse_args({"model": "m", "head_options": {"ray_actor_options": {"num_gpus": 1}}})
    with pytest.raises(ServeArgsError, match="cpu_variant: .*not a variant name; .* e.g. int8"):
        parse_args({"model": "m", "cpu_variant": "int 8"})
    assert parse_args({"model": "m", "tasks": "a, b", "max_batch_size": "8"}).tasks == ["a", "b"]


def test_builder_rejects_unknown_tasks_models_and_deployments(untrained_bundle: Path, tmp_path: Path):
    from polytask.serve import ServeArgsError, build_app, compose

    bundle = untrained_bundle

    with pytest.raises(ServeArgsError, match="tasks: nope not in model .*it has: sentiment, ner"):
        build_app({"model": str(bundle), "tasks": "sentiment,nope"})
    with pytest.raises(ServeArgsError, match="model: .*not a bundle directory"):
        build_app({"model": str(tmp_path)})
    with pytest.raises(ServeArgsError, match="head_topics is not a deployment of this app"):
        compose({"model": str(bundle)}, {"head_topics": {"num_replicas": 1}})


def test_alias_is_pinned_to_the_version_it_names_at_deploy_time(mlflow_uri: str, tmp_path: Path):
    """Every replica of one deploy loads the same version, even if the alias moves meanwhile."""
    from polytask.serve import ServeArgsError
    from polytask.serve.refs import pin_model_uri
    from polytask.tracking.registry import client

    c = client()
    c.create_registered_model("demo")
    for _ in range(2):
        c.create_model_version("demo", source=str(tmp_path))
    c.set_registered_model_alias("demo", "champion", "1")
    assert pin_model_uri("models:/demo@champion") == "models:/demo/1"
    c.set_registered_model_alias("demo", "champion", "2")
    assert pin_model_uri("models:/demo@champion") == "models:/demo/2"
    assert pin_model_uri("models:/demo/1") == "models:/demo/1"
    with pytest.raises(ServeArgsError, match="has no alias 'staging'"):
        pin_model_uri("models:/demo@staging")


def test_cpu_variant_picks_the_compressed_version_for_cpu_encoders_only(
    mlflow_uri: str, tmp_path: Path
):
    """cpu_variant follows the alias to the version compressed from it (chains included);
    a GPU encoder keeps full precision; a missing variant or a bundle dir is a clear error."""
    from polytask.serve import ServeArgsError, parse_args
    from polytask.serve.refs import served_ref
    from polytask.tracking import registry

    c = registry.client()
    c.create_registered_model("demo")

    def version(variant: str | None = None, source: int | None = None, base: int | None = None):
        tags = {}
        if variant:
            tags = {
                registry.VARIANT_TAG: variant,
                registry.SOURCE_VERSION_TAG: str(source),
                registry.BASE_VERSION_TAG: str(base),
            }
        return int(c.create_model_version("demo", source=str(tmp_path), tags=tags).version)

    v1, v2 = version(), version()
    v3 = version("int8", v1, v1)
    v4 = version("pruned", v2, v2)
    v5 = version("pruned+int8", v4, v2)
    v6 = version("int8", v1, v1)  # a newer int8 of v1 wins
    c.set_registered_model_alias("demo", "champion", str(v1))

    def ref(**args) -> str:
        return served_ref(parse_args({"model": "models:/demo@champion", **args}))

    assert ref(cpu_variant="int8") == f"models:/demo/{v6}"
    assert ref(cpu_variant="int8", device="cuda") == f"models:/demo/{v1}"
    assert ref() == f"models:/demo/{v1}"
    assert served_ref(parse_args({"model": f"models:/demo/{v3}", "cpu_variant": "int8"})) == (
        f"models:/demo/{v3}"
    )
    c.set_registered_model_alias("demo", "champion", str(v2))
    assert ref(cpu_variant="pruned+int8") == f"models:/demo/{v5}"
    assert served_ref(parse_args({"model": f"models:/demo/{v5}", "cpu_variant": "fp32"})) == (
        f"models:/demo/{v2}"
    )
    with pytest.raises(ServeArgsError) as err:
        ref(cpu_variant="int8")
    message = str(err.value)
    assert f"cpu_variant: no 'int8' version of models:/demo/{v2}" in message
    assert "(it has: pruned, pruned+int8)" in message
    assert f"polytask compress models:/demo/{v2}` --method int8" in message
    with pytest.raises(ServeArgsError, match="cpu_variant: .* is not a registered model"):
        served_ref(parse_args({"model": str(tmp_path), "cpu_variant": "int8"}))


@pytest.fixture(scope="module")
def other_tasks_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_encoder: Path) -> Path:
    """A bundle whose tasks are neither sentiment nor ner (random heads, tiny encoder)."""
    from polytask.model.bundle import save_bundle
    from polytask.model.network import build_model, load_encoder
    from polytask.tasks import TaskSpec

    encoder, tokenizer = load_encoder(str(tiny_encoder))
    specs = [
        TaskSpec("topic", "classification", ["sports", "politics", "science"]),
        TaskSpec("pos", "token_classification", ["O", "B-noun", "I-noun"]),
        TaskSpec("toxic", "multilabel", ["insult", "threat"]),
    ]
    path = tmp_path_factory.mktemp("other_tasks") / "bundle"
    save_bundle(build_model(encoder, specs, pooling="cls"), tokenizer, path, max_length=32)
    return path


def _deploy_like_serve(app_config: Any, model: Path) -> dict[str, Any]:
    """What the Serve controller does with one application of a config, without a cluster:
    import the builder and call it with the config's args, build the app into deployments, turn
    them into DeploymentInfos and apply the config's `deployments:` overrides (which raises for
    a name the app lacks). Returns {deployment name: final DeploymentConfig}."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.application_state import override_deployment_info
    from ray.serve._private.build_app import build_app
    from ray.serve._private.deploy_utils import deploy_args_to_deployment_info, get_deploy_args

    override = app_config.model_copy(update={"args": {**app_config.args, "model": str(model)}})
    app = call_user_app_builder_with_args_if_necessary(
        import_attr(override.import_path), override.args
    )
    built = build_app(app, name=override.name)
    infos = {}
    for d in built.deployments:
        args = get_deploy_args(
            name=d._name,
            replica_config=d._replica_config,
            ingress=d.name == built.ingress_deployment_name,
            deployment_config=d._deployment_config,
            version="test",
        )
        infos[d.name] = deploy_args_to_deployment_info(**args, app_name=override.name)
    final = override_deployment_info(infos, override)
    return {name: info.deployment_config for name, info in final.items()}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_deploys_a_model_with_any_tasks(path: Path, other_tasks_bundle: Path):
    """Issue 15: the shipped configs name no task, so a model whose tasks are not the demo's
    deploys through Serve's own config path, every head with args.head_options."""
    (app,) = _apps(path)
    deployed = _deploy_like_serve(app, other_tasks_bundle)
    assert set(deployed) == {"Ingress", "Encoder", "head_topic", "head_pos", "head_toxic"}
    heads = app.args["head_options"]
    for task in ("topic", "pos", "toxic"):
        config = deployed[f"head_{task}"]
        assert config.max_ongoing_requests == heads["max_ongoing_requests"], task
        auto = config.autoscaling_config
        assert auto.max_replicas == heads["autoscaling_config"]["max_replicas"], task


def test_per_task_override_by_deployment_name_and_unknown_task_is_refused(other_tasks_bundle: Path):
    """`deployments: [{name: head_<task>, ...}]` overrides head_options for that task only; a
    task the model lacks (the old shipped head_sentiment) is refused with the names there are."""
    from ray.serve.schema import ServeApplicationSchema

    (app,) = _apps(CONFIG_DIR / "local.yaml")
    raw = app.model_dump(exclude_unset=True)
    raw["deployments"] = [*raw["deployments"], {"name": "head_pos", "max_ongoing_requests": 3}]
    deployed = _deploy_like_serve(ServeApplicationSchema.model_validate(raw), other_tasks_bundle)
    assert deployed["head_pos"].max_ongoing_requests == 3
    assert deployed["head_topic"].max_ongoing_requests == app.args["head_options"][
        "max_ongoing_requests"
    ]
    raw["deployments"].append({"name": "head_sentiment", "max_ongoing_requests": 3})
    with pytest.raises(ValueError, match="'head_sentiment' does not exist.*head_topic"):
        _deploy_like_serve(ServeApplicationSchema.model_validate(raw), other_tasks_bundle)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_gives_generation_heads_their_own_options(
    path: Path, generation_bundle: Path
):
    """A model with a generation task deploys with the shipped configs unchanged: its head gets
    generation_head_options on top of head_options, the other heads only head_options; on
    cluster.yaml it asks for part of a GPU and decodes on cuda, on local.yaml it stays on CPU."""
    from ray.serve._private.build_app import build_app

    from polytask.serve import build_app as polytask_app

    (app,) = _apps(path)
    deployed = _deploy_like_serve(app, generation_bundle)
    heads, generation = app.args["head_options"], app.args["generation_head_options"]
    assert deployed["head_entities"].max_ongoing_requests == generation["max_ongoing_requests"]
    auto = deployed["head_entities"].autoscaling_config
    assert auto.max_replicas == generation["autoscaling_config"]["max_replicas"]
    assert deployed["head_sentiment"].max_ongoing_requests == heads["max_ongoing_requests"]
    built = build_app(polytask_app({**app.args, "model": str(generation_bundle)}), name="x")
    replica = {d.name: d._replica_config for d in built.deployments}["head_entities"]
    gpus = replica.ray_actor_options.get("num_gpus", 0)
    assert replica.init_args[2] == ("cuda" if gpus else "cpu")
    assert (gpus > 0) == (path.name == "cluster.yaml")
