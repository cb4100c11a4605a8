"""Offline checks of the Kubernetes manifests in k8s/ (no cluster, no Ray start).

Every kustomization is rendered with tests/unit/kustomize_lite.py (and compared with `kubectl kustomize`
when one is installed); then:
- Ray custom resources validate against the vendored KubeRay v1.7 CRD schemas (k8s/crds/), with
  every object that declares `properties` closed, so a misspelled field fails;
- built-in kinds validate with kubernetes-validate in strict mode against Kubernetes 1.30;
- serveConfigV2 is serve_configs/cluster.yaml and validates as a ray.serve ServeDeploySchema;
- security: non-root everywhere, no privilege escalation, capabilities dropped, requests and
  limits on every container (the autoscaler sidecar and RayJob submitters included), ClusterIP
  only, the dashboard never exposed, Ray token authentication on, network policies that admit
  exactly the documented traffic.
"""

from __future__ import annotations

import base64
import copy
import functools
import importlib.util
import itertools
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kustomize_lite

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
VENDORED_CRDS = K8S / "crds"
K8S_DOC = REPO / "docs" / "kubernetes.md"  # the Kubernetes guide (k8s/README.md points there)
SHARED_CRDS = REPO.parent / "shared" / "kuberay-crds"
CRD_FILES = ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml", "ray.io_rayservices.yaml")
K8S_VERSION = "1.30"  # kubernetes-validate ships this schema set; the oldest we support
NAMESPACE = "polytask"
RAY_KINDS = {"RayCluster", "RayJob", "RayService"}

PLATFORM = ("overlays/gpu", "overlays/cpu-only")
JOBS = ("overlays/gpu/jobs", "overlays/cpu-only/jobs")
OVERLAYS = PLATFORM + JOBS
MONITORING = "monitoring"  # needs the Prometheus Operator's CRDs; applied on its own
ALL_BUILDS = ("base", "base/jobs") + OVERLAYS


@functools.cache
def rendered(path: str) -> tuple[dict[str, Any], ...]:
    return tuple(kustomize_lite.build(K8S / path))


def objs(path: str, kind: str | None = None) -> list[dict[str, Any]]:
    return [o for o in rendered(path) if kind is None or o["kind"] == kind]


def one(path: str, kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objs(path, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"{path}: expected one {kind}/{name}, found {len(found)}"
    return found[0]


def cluster_specs(obj: dict[str, Any]) -> dict[str, Any]:
    """The RayCluster spec inside a RayCluster/RayJob/RayService."""
    spec = obj["spec"]
    return {
        "RayCluster": spec,
        "RayJob": spec.get("rayClusterSpec"),
        "RayService": spec.get("rayClusterConfig"),
    }[obj["kind"]]


def groups(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {g["groupName"]: g for g in cluster_specs(obj).get("workerGroupSpecs") or []}


def pod_specs(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, pod template metadata, pod spec) for every pod an object will create."""
    kind, spec = obj["kind"], obj.get("spec") or {}
    name = f"{kind}/{obj['metadata']['name']}"
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
        yield name, spec["template"].get("metadata") or {}, spec["template"]["spec"]
    elif kind == "CronJob":
        tmpl = spec["jobTemplate"]["spec"]["template"]
        yield name, tmpl.get("metadata") or {}, tmpl["spec"]
    elif kind == "Pod":
        yield name, obj["metadata"], spec
    elif kind in RAY_KINDS:
        cluster = cluster_specs(obj)
        head = cluster["headGroupSpec"]["template"]
        yield f"{name} head", head.get("metadata") or {}, head["spec"]
        for group in cluster.get("workerGroupSpecs") or []:
            tmpl = group["template"]
            yield f"{name} {group['groupName']}", tmpl.get("metadata") or {}, tmpl["spec"]
        if kind == "RayJob":
            sub = spec.get("submitterPodTemplate")
            assert sub, f"{name}: no submitterPodTemplate (the submitter would run unhardened)"
            yield f"{name} submitter", sub.get("metadata") or {}, sub["spec"]


def containers(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, container, pod securityContext) for every container, the autoscaler included."""
    for where, _, pod in pod_specs(obj):
        for c in (pod.get("initContainers") or []) + (pod.get("containers") or []):
            yield f"{where} {c['name']}", c, pod.get("securityContext") or {}
    if obj["kind"] in RAY_KINDS and cluster_specs(obj).get("enableInTreeAutoscaling"):
        auto = cluster_specs(obj).get("autoscalerOptions") or {}
        head_pod = cluster_specs(obj)["headGroupSpec"]["template"]["spec"]
        yield (
            f"{obj['kind']}/{obj['metadata']['name']} autoscaler",
            auto,
            head_pod.get("securityContext") or {},
        )


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env") or []}


def load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=kustomize_lite._Loader)


# ------------------------------------------------------------------ parsing and rendering
def test_every_yaml_file_in_k8s_parses():
    files = [p for p in K8S.rglob("*.y*ml") if VENDORED_CRDS not in p.parents]
    assert len(files) >= 20
    for path in files:
        docs = kustomize_lite.load_yaml_docs(path.read_text())
        assert docs, f"{path}: empty"
        for doc in docs:
            assert isinstance(doc, (dict, list)), f"{path}: a document is neither a map nor a list"


@pytest.mark.parametrize("path", ALL_BUILDS + (MONITORING,))
def test_kustomization_renders(path):
    out = rendered(path)
    assert out
    for obj in out:
        assert obj["apiVersion"] and obj["kind"] and obj["metadata"]["name"]
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["metadata"]["name"]


def _kustomize_cli() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.skipif(_kustomize_cli() is None, reason="neither kustomize nor kubectl installed")
@pytest.mark.parametrize("path", ALL_BUILDS + (MONITORING,))
def test_renderer_agrees_with_real_kustomize(path):
    def ident(o):
        return (o["apiVersion"], o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"])

    proc = subprocess.run(
        [*_kustomize_cli(), str(K8S / path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0 and "unknown command" in proc.stderr:
        pytest.skip(f"{_kustomize_cli()} cannot build: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr
    real = {ident(o): o for o in yaml.safe_load_all(proc.stdout) if o}
    lite = {ident(o): o for o in rendered(path)}
    assert lite.keys() == real.keys()
    for key, obj in real.items():
        assert lite[key] == obj, f"{path}: {key} differs from kustomize's output"


def test_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(kustomize_lite.KustomizeLiteError, match="unsupported"):
        kustomize_lite.build(tmp_path)


# ------------------------------------------------------------------ schema validation
@functools.cache
def crd_validators() -> dict[str, Any]:
    jsonschema = pytest.importorskip("jsonschema")

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    validators = {}
    for name in CRD_FILES:
        crd = load_yaml(VENDORED_CRDS / name)
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        assert version["served"] and version["storage"]
        schema = version["schema"]["openAPIV3Schema"]
        close(schema)
        validators[crd["spec"]["names"]["kind"]] = jsonschema.Draft4Validator(schema)
    return validators


def crd_errors(obj: dict[str, Any]) -> list[str]:
    assert obj["apiVersion"] == "ray.io/v1"
    return [
        "/".join(map(str, e.absolute_path)) + ": " + e.message[:200]
        for e in crd_validators()[obj["kind"]].iter_errors(obj)
    ]


def test_vendored_crds_are_present_and_attributed():
    for name in CRD_FILES:
        assert (VENDORED_CRDS / name).is_file(), f"k8s/crds/{name} missing"
    readme = (VENDORED_CRDS / "README.md").read_text()
    assert "Apache" in readme and "KubeRay" in readme


@pytest.mark.skipif(not SHARED_CRDS.is_dir(), reason="no ../shared/kuberay-crds next to the repo")
def test_vendored_crds_equal_shared_copy():
    for name in CRD_FILES:
        assert (VENDORED_CRDS / name).read_bytes() == (SHARED_CRDS / name).read_bytes(), (
            f"k8s/crds/{name} differs from {SHARED_CRDS / name}; copy it over"
        )


@pytest.mark.parametrize("path", ALL_BUILDS)
def test_ray_resources_validate_against_kuberay_crds(path):
    ray = [o for o in rendered(path) if o["kind"] in RAY_KINDS]
    assert ray
    for obj in ray:
        assert crd_errors(obj) == [], f"{obj['kind']}/{obj['metadata']['name']}"


def _raycluster_from_rayservice() -> dict[str, Any]:
    rs = one("overlays/gpu", "RayService", "polytask")
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": "polytask-check", "namespace": NAMESPACE},
        "spec": copy.deepcopy(rs["spec"]["rayClusterConfig"]),
    }


def test_raycluster_shape_validates_as_a_raycluster():
    assert crd_errors(_raycluster_from_rayservice()) == []


@pytest.mark.parametrize(
    "mutate, where",
    [
        (lambda s: s.update(enableInTreeAutoscalling=True), "enableInTreeAutoscalling"),
        (lambda s: s["headGroupSpec"].update(serviceTyp="ClusterIP"), "serviceTyp"),
        (lambda s: s["workerGroupSpecs"][0].update(minReplica=1), "minReplica"),
        (lambda s: s["autoscalerOptions"].update(idleTimeoutSecond=60), "idleTimeoutSecond"),
        (
            lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0].update(
                securityContxt={}
            ),
            "securityContxt",
        ),
        (lambda s: s["autoscalerOptions"].update(version="v3"), "v3"),
        (lambda s: s["authOptions"].update(mode="tokens"), "tokens"),
    ],
    ids=["top", "head", "worker", "autoscaler", "container", "enum", "auth-enum"],
)
def test_misspelled_raycluster_field_is_rejected(mutate, where):
    obj = _raycluster_from_rayservice()
    mutate(obj["spec"])
    errors = crd_errors(obj)
    assert errors and any(where in e for e in errors), errors


@pytest.mark.parametrize("path", OVERLAYS + ("base", "base/jobs"))
def test_builtin_kinds_validate_strict(path):
    kv = pytest.importorskip("kubernetes_validate")
    builtin = [o for o in rendered(path) if o["kind"] not in RAY_KINDS]
    for obj in builtin:
        try:
            kv.validate(obj, K8S_VERSION, strict=True)
        except kv.ValidationError as exc:  # pragma: no cover - the message is the point
            pytest.fail(f"{path}: {obj['kind']}/{obj['metadata']['name']}: {exc}")


def test_strict_builtin_validation_catches_a_typo():
    kv = pytest.importorskip("kubernetes_validate")
    deploy = copy.deepcopy(one("overlays/gpu", "Deployment", "mlflow"))
    deploy["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(deploy, K8S_VERSION, strict=True)


# ------------------------------------------------------------------ Ray cluster shape
def _custom_resources(group: dict[str, Any]) -> dict[str, float]:
    raw = (group.get("rayStartParams") or {}).get("resources")
    if not raw:
        return {}
    assert raw.startswith('"') and raw.endswith('"'), f"KubeRay wants '\"{{...}}\"', got {raw!r}"
    return json.loads(raw[1:-1].replace('\\"', '"'))


def _container_gpus(group: dict[str, Any]) -> int:
    res = group["template"]["spec"]["containers"][0].get("resources") or {}
    return int((res.get("limits") or {}).get("nvidia.com/gpu", 0))


@pytest.mark.parametrize("path", OVERLAYS)
def test_ray_cluster_shape(path):
    gpu_overlay = path.startswith("overlays/gpu")
    for obj in objs(path):
        if obj["kind"] not in RAY_KINDS:
            continue
        cluster = cluster_specs(obj)
        name = f"{path} {obj['kind']}/{obj['metadata']['name']}"
        assert cluster["rayVersion"] == _dockerfile_ray_version(), name
        assert cluster["headGroupSpec"]["rayStartParams"] == {"num-cpus": "0"}, name
        assert cluster["enableInTreeAutoscaling"] is True, name
        auto = cluster["autoscalerOptions"]
        assert auto["version"] == "v2" and auto["idleTimeoutSeconds"] > 0, name

        wg = groups(obj)
        assert _custom_resources(wg["cpu"]) == {"cpu_pool": 1000}, name
        assert _container_gpus(wg["cpu"]) == 0
        for group in wg.values():
            assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        if gpu_overlay and obj["metadata"]["name"] != "polytask-predict":  # predict: CPU scorers
            assert set(wg) == {"cpu", "gpu"}, name
            gpu = wg["gpu"]
            assert _container_gpus(gpu) >= 1, name
            assert "cpu_pool" not in _custom_resources(gpu), name
            tolerations = gpu["template"]["spec"].get("tolerations") or []
            assert {
                "key": "nvidia.com/gpu",
                "operator": "Exists",
                "effect": "NoSchedule",
            } in tolerations, name
        else:
            assert set(wg) == {"cpu"}, f"{name}: cpu-only keeps a GPU group"
            assert "nvidia.com/gpu" not in json.dumps(obj), name


# ------------------------------------------------------------------ Serve
CLUSTER_SERVE = REPO / "serve_configs" / "cluster.yaml"


def _render_module():
    spec = importlib.util.spec_from_file_location(
        "render_serve_config", K8S / "render_serve_config.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _serve_config(path: str) -> dict[str, Any]:
    return yaml.safe_load(one(path, "RayService", "polytask")["spec"]["serveConfigV2"])


def _pinned_cluster() -> dict[str, Any]:
    """serve_configs/cluster.yaml with its model alias pinned to the version the RayService serves."""
    module = _render_module()
    version = module.pinned_version(module.embedded(module.BASE_RAYSERVICE.read_text()))
    assert version is not None, "the RayService serves an alias"
    return yaml.safe_load(module.pin(CLUSTER_SERVE.read_text(), version))


@pytest.mark.parametrize("path", ("base", "overlays/gpu"))
def test_serve_config_v2_is_cluster_yaml(path):
    assert _serve_config(path) == _pinned_cluster()


@pytest.mark.parametrize("path", PLATFORM)
def test_rayservice_serves_a_pinned_version_not_an_alias(path):
    """KubeRay redeploys serveConfigV2 after every cluster restart: an alias there would resolve
    again and could serve another version without a deploy."""
    from polytask.tracking.uris import parse_model_uri

    (app,) = _serve_config(path)["applications"]
    ref = parse_model_uri(app["args"]["model"])
    assert ref.kind == "version", app["args"]["model"]
    source = yaml.safe_load(CLUSTER_SERVE.read_text())["applications"][0]["args"]["model"]
    assert parse_model_uri(source).name == ref.name


def test_render_serve_config_pins_and_keeps_the_version(tmp_path, monkeypatch):
    module = _render_module()
    for attr in ("BASE_RAYSERVICE", "CPU_PATCH"):
        copy_ = tmp_path / getattr(module, attr).name
        copy_.write_text(getattr(module, attr).read_text())
        monkeypatch.setattr(module, attr, copy_)
    assert module.main(["--version", "7"]) == 0
    assert module.main([]) == 0 and module.main(["--check"]) == 0  # keeps 7
    for text in (module.embedded(module.BASE_RAYSERVICE.read_text()), module.CPU_PATCH.read_text()):
        assert "models:/polytask-demo/7" in text and "@champion\n" not in text
    # a RayService that carries the alias is refused, not rendered
    alias = module.embed(module.BASE_RAYSERVICE.read_text(), CLUSTER_SERVE.read_text())
    module.BASE_RAYSERVICE.write_text(alias)
    with pytest.raises(SystemExit, match="pin a version"):
        module.main(["--check"])


def test_cpu_only_serve_config_is_cluster_yaml_on_cpu():
    cluster = _pinned_cluster()
    cpu = _serve_config("overlays/cpu-only")
    assert cpu == _render_module().cpu_only(cluster)
    assert "num_gpus: 1" not in yaml.safe_dump(cpu) and cpu != cluster
    for app in cpu["applications"]:
        assert app["args"].get("device", "cpu") == "cpu"


def test_render_serve_config_check_passes(capsys):
    assert _render_module().main(["--check"]) == 0, capsys.readouterr().out


def test_render_serve_config_detects_drift(tmp_path, monkeypatch):
    module = _render_module()
    copy_ = tmp_path / "rayservice.yaml"
    copy_.write_text(
        module.BASE_RAYSERVICE.read_text().replace("max_replicas: 8", "max_replicas: 9", 1)
    )
    monkeypatch.setattr(module, "BASE_RAYSERVICE", copy_)
    cpu_copy = tmp_path / "rayservice-serve-config.yaml"
    cpu_copy.write_text(module.CPU_PATCH.read_text())
    monkeypatch.setattr(module, "CPU_PATCH", cpu_copy)
    assert module.main(["--check"]) == 1
    assert module.main([]) == 0 and module.main(["--check"]) == 0
    assert yaml.safe_load(module.embedded(copy_.read_text())) == _pinned_cluster()


@pytest.mark.parametrize("path", ("overlays/gpu", "overlays/cpu-only"))
def test_serve_config_validates_with_ray_serve_schema(path):
    schema = pytest.importorskip("ray.serve.schema")
    schema.ServeDeploySchema.model_validate(_serve_config(path))


@pytest.mark.parametrize("path", PLATFORM)
def test_serve_replicas_fit_the_worker_groups(path):
    """Every resource a deployment asks for is offered by some worker group (else: Pending)."""
    rs = one(path, "RayService", "polytask")
    offered_custom = set().union(*(_custom_resources(g) for g in groups(rs).values()))
    has_gpu = any(_container_gpus(g) for g in groups(rs).values())
    for app in _serve_config(path)["applications"]:
        actor_opts = [d.get("ray_actor_options") or {} for d in app.get("deployments") or []]
        actor_opts.append((app["args"].get("head_options") or {}).get("ray_actor_options") or {})
        for opts in actor_opts:
            assert set(opts.get("resources") or {}) <= offered_custom
            if opts.get("num_gpus"):
                assert has_gpu, f"{path}: a deployment wants a GPU but no group has one"


@pytest.mark.parametrize("path", PLATFORM)
def test_rayservice_upgrade_and_service(path):
    rs = one(path, "RayService", "polytask")
    assert rs["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    serve_svc = rs["spec"]["serveService"]["spec"]
    assert serve_svc["type"] == "ClusterIP"
    assert [(p["name"], p["port"]) for p in serve_svc["ports"]] == [("serve", 8000)]
    for where, _, pod in pod_specs(rs):
        env = env_of(pod["containers"][0])
        assert env.get("MLFLOW_TRACKING_URI") == "http://mlflow:5000", where


@pytest.mark.parametrize("path", PLATFORM)
def test_pdb_covers_serve_worker_pods(path):
    pdb = one(path, "PodDisruptionBudget", "polytask-serve-workers")
    selector = pdb["spec"]["selector"]
    rs = one(path, "RayService", "polytask")
    for where, meta, _ in pod_specs(rs):
        labels = {
            **(meta.get("labels") or {}),
            "ray.io/node-type": "head" if "head" in where else "worker",
        }
        assert _selected(selector, labels) == ("head" not in where), where
    assert "maxUnavailable" in pdb["spec"] or "minAvailable" in pdb["spec"]


# ------------------------------------------------------------------ RayJobs
JOB_ENTRYPOINTS = {
    "polytask-train": ("polytask train /config/experiment.yaml --run-name ", "experiment.yaml"),
    "polytask-tune": ("polytask tune /config/sweep.yaml", "sweep.yaml"),
    "polytask-predict": ("polytask predict models:/polytask-demo@champion --input ", None),
}
# What each job's driver must find in its (head container) env, or it would write runs,
# models or checkpoints into the pod, which the RayJob deletes.
JOB_NEEDS = {
    "polytask-train": ("MLFLOW_TRACKING_URI", "POLYTASK_STORAGE_PATH"),
    "polytask-tune": ("MLFLOW_TRACKING_URI", "POLYTASK_STORAGE_PATH"),
    "polytask-predict": ("MLFLOW_TRACKING_URI",),
}


def entrypoint_script(job: dict[str, Any]) -> str:
    """The shell script of a RayJob entrypoint `sh -c '...'`: one single-quoted word, so the
    submitter pod's shell (KubeRay splices the entrypoint into `ray job submit ... -- ENTRYPOINT`)
    passes it on untouched and the driver's shell on the head expands it."""
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["sh", "-c"] and len(argv) == 3, job["spec"]["entrypoint"]
    return argv[2]


def polytask_argv(job: dict[str, Any]) -> list[str]:
    """The `polytask ...` command the entrypoint script ends by exec'ing."""
    script = entrypoint_script(job)
    head, _, command = script.rpartition("exec ")
    assert head and ";" not in command and "$" not in command, script
    return shlex.split(command)


@pytest.mark.parametrize("path", JOBS)
def test_rayjobs(path):
    platform = path.rsplit("/jobs", 1)[0]
    jobs = {o["metadata"]["name"]: o for o in objs(path, "RayJob")}
    assert set(jobs) == set(JOB_ENTRYPOINTS)
    pvc = one(platform, "PersistentVolumeClaim", "polytask-shared")
    if platform == "overlays/gpu":
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    mlflow_svc = one(platform, "Service", "mlflow")
    assert [p["port"] for p in mlflow_svc["spec"]["ports"]] == [5000]

    for name, job in jobs.items():
        spec = job["spec"]
        prefix, key = JOB_ENTRYPOINTS[name]
        assert shlex.join(polytask_argv(job)).startswith(prefix), name
        assert spec["submissionMode"] == "K8sJobMode"
        assert spec["shutdownAfterJobFinishes"] is True
        assert spec["ttlSecondsAfterFinished"] > 0
        selector = job["metadata"]["labels"]["polytask.io/job"]
        for where, _, pod in pod_specs(job):
            if where.endswith("submitter"):
                continue
            volumes = {v["name"]: v for v in pod.get("volumes") or []}
            mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
            if key is not None:
                cm_name = volumes[mounts["/config"]]["configMap"]["name"]
                cm = one(path, "ConfigMap", cm_name)
                assert key in cm["data"], f"{where}: ConfigMap {cm_name} has no {key}"
                assert cm["metadata"]["labels"]["polytask.io/job"] == selector  # `-l` picks both
            shared = volumes[mounts["/mnt/shared"]]["persistentVolumeClaim"]["claimName"]
            assert shared == "polytask-shared"
            env = env_of(pod["containers"][0])
            assert env["POLYTASK_STORAGE_PATH"] == "/mnt/shared/ray-results", where
            assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000", where


def test_rayjob_entrypoints_parse_with_the_polytask_cli():
    cli = pytest.importorskip("polytask.cli")
    typer = pytest.importorskip("typer")
    command = typer.main.get_command(cli.app)
    for job in objs("base/jobs", "RayJob"):
        argv = polytask_argv(job)
        assert argv[0] == "polytask"
        sub = command.get_command(None, argv[1])
        params = sub.make_context(argv[1], argv[2:]).params
        if argv[1] == "predict":  # batch inference reads and writes the shared PVC
            assert params["input_path"].startswith("/mnt/shared/")
            assert params["output"].startswith("/mnt/shared/")
        else:
            assert str(params["experiment"]).startswith("/config/")


@pytest.mark.parametrize("path", JOBS)
def test_rayjobs_fail_loudly_without_their_store(path, tmp_path):
    """Each entrypoint script, run by a real `sh` in its head container's env, reaches polytask;
    with a store variable unset or empty it stops first, naming the variable."""
    stub = tmp_path / "polytask"
    stub.write_text("#!/bin/sh\necho polytask ran\n")
    stub.chmod(0o755)
    for job in objs(path, "RayJob"):
        name = job["metadata"]["name"]
        head = cluster_specs(job)["headGroupSpec"]["template"]["spec"]["containers"][0]
        env = {k: v for k, v in env_of(head).items() if v is not None}
        env["PATH"] = f"{tmp_path}:/usr/bin:/bin"
        script = entrypoint_script(job)

        def run(environ: dict[str, str], script: str = script) -> subprocess.CompletedProcess:
            return subprocess.run(
                ["sh", "-c", script], env=environ, capture_output=True, text=True, check=False
            )

        ok = run(env)
        assert ok.returncode == 0 and "polytask ran" in ok.stdout, (name, ok.stderr)
        for var in JOB_NEEDS[name]:
            assert env.get(var), f"{name}: the head container does not set {var}"
            for environ in ({k: v for k, v in env.items() if k != var}, {**env, var: ""}):
                failed = run(environ)
                assert failed.returncode != 0, (name, var)
                assert "polytask ran" not in failed.stdout
                assert var in failed.stderr and "lost with the pod" in failed.stderr, failed.stderr


@pytest.mark.parametrize("path", JOBS)
def test_experiment_configmaps_are_valid_polytask_experiments(path, tmp_path):
    config = pytest.importorskip("polytask.config")
    for cm in objs(path, "ConfigMap"):
        for key, text in cm["data"].items():
            file = tmp_path / key
            file.write_text(text)
            cfg = config.load_config(file)
            assert cfg.run.storage_path is None  # the pod's POLYTASK_STORAGE_PATH decides
            assert cfg.scaling.use_gpu is path.startswith("overlays/gpu")
            if key == "experiment.yaml":
                models = {
                    a["args"]["model"].rsplit("/", 1)[0]  # models:/NAME/VERSION (pinned)
                    for a in _serve_config(path.rsplit("/jobs", 1)[0])["applications"]
                }
                assert f"models:/{cfg.tracking.registered_model}" in models
            else:
                assert cfg.tune is not None and cfg.tune.search_space


# ------------------------------------------------------------------ MLflow + PostgreSQL
def _mlflow_server_options() -> set[str]:
    """`mlflow server` option names, read from the installed mlflow's source (importing any
    part of mlflow takes seconds)."""
    spec = importlib.util.find_spec("mlflow")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("mlflow not installed")
    root = Path(next(iter(spec.submodule_search_locations)))
    cli = root / "cli" / "__init__.py"
    text = (cli if cli.is_file() else root / "cli.py").read_text()
    shared = dict(
        re.findall(
            r'^([A-Z_]+) = click\.option\(\s*"(--[a-z0-9-]+)',
            (root / "utils" / "cli_args.py").read_text(),
            re.MULTILINE,
        )
    )
    start = text.index("def server(")
    block = text[text.rindex("@cli.command", 0, start) : start]
    options = set(re.findall(r'@click\.option\(\s*"(--[a-z0-9-]+)', block))
    options |= {
        shared[name] for name in re.findall(r"@cli_args\.([A-Z_]+)", block) if name in shared
    }
    assert "--backend-store-uri" in options and "--host" in options, "mlflow's CLI source moved"
    return options


@pytest.mark.parametrize("path", PLATFORM)
def test_mlflow_server(path):
    deploy = one(path, "Deployment", "mlflow")
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["mlflow", "server"]
    args = c["args"]
    known = _mlflow_server_options()
    assert {a for a in args if a.startswith("--")} <= known, "unknown mlflow server flag"
    pairs = dict(itertools.pairwise(args))
    assert pairs["--host"] == "0.0.0.0" and pairs["--port"] == "5000"
    assert pairs["--artifacts-destination"] == "/mlflow/artifacts" and "--serve-artifacts" in args
    hosts = pairs["--allowed-hosts"].split(",")
    assert {"mlflow:5000", f"mlflow.{NAMESPACE}.svc.cluster.local:5000", "localhost:5000"} <= set(
        hosts
    )
    assert "*" not in hosts
    env = {e["name"]: e for e in c["env"]}
    assert "--backend-store-uri" in known  # MLFLOW_BACKEND_STORE_URI is its envvar
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql://$(POSTGRES_USER):")
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "polytask-postgres"
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in deploy["spec"]["template"]["spec"]["volumes"]}
    claim = volumes[mounts["/mlflow"]]["persistentVolumeClaim"]["claimName"]
    one(path, "PersistentVolumeClaim", claim)

    sts = one(path, "StatefulSet", "postgres")
    pg_env = {e["name"]: e for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert pg_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "polytask-postgres"
    assert sts["spec"]["volumeClaimTemplates"]
    secret = one(path, "Secret", "polytask-postgres")
    assert {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"} <= set(secret["data"])


# ------------------------------------------------------------------ security
@pytest.mark.parametrize("path", OVERLAYS)
def test_every_container_is_hardened(path):
    seen = 0
    for obj in rendered(path):
        for where, _, pod in pod_specs(obj):
            assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), where
            assert not any("hostPath" in v for v in pod.get("volumes") or []), where
        for where, c, pod_sc in containers(obj):
            seen += 1
            sc = c.get("securityContext") or {}
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
            uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
            assert isinstance(uid, int) and uid > 0, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert "ALL" in (sc.get("capabilities") or {}).get("drop", []), where
            assert not sc.get("privileged"), where
            res = c.get("resources") or {}
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(part) or {}), f"{where}: {part}"
            assert _quantity(res["requests"]["cpu"]) <= _quantity(res["limits"]["cpu"]), where
            assert _quantity(res["requests"]["memory"]) <= _quantity(res["limits"]["memory"])
    assert seen


def _quantity(value: Any) -> float:
    units = {
        "m": 1e-3,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
    }
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match, value
    return float(match.group(1)) * units.get(match.group(2), 1)


@pytest.mark.parametrize("path", OVERLAYS)
def test_nothing_is_exposed_outside_the_cluster(path):
    for obj in rendered(path):
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        assert obj["kind"] not in ("Ingress", "Route", "Gateway", "HTTPRoute"), name
        if obj["kind"] == "Service":
            assert obj["spec"].get("type", "ClusterIP") == "ClusterIP", name
        if obj["kind"] in RAY_KINDS:
            cluster = cluster_specs(obj)
            head = cluster["headGroupSpec"]
            # explicit, so a KubeRay default change cannot expose the dashboard (8265)
            assert head["serviceType"] == "ClusterIP", name
            assert not head.get("enableIngress"), name
            head_svc = (head.get("headService") or {}).get("spec") or {}
            assert head_svc.get("type", "ClusterIP") == "ClusterIP", name
            serve_svc = (obj["spec"].get("serveService") or {}).get("spec") or {}
            assert serve_svc.get("type", "ClusterIP") == "ClusterIP", name
            for _, _, pod in pod_specs(obj):
                for c in pod.get("containers") or []:
                    assert not any("hostPort" in p for p in c.get("ports") or []), name


@pytest.mark.parametrize("path", OVERLAYS)
def test_ray_token_authentication_is_on(path):
    ray = [o for o in rendered(path) if o["kind"] in RAY_KINDS]
    assert ray
    for obj in ray:
        assert cluster_specs(obj)["authOptions"]["mode"] == "token", obj["metadata"]["name"]


# ------------------------------------------------------------------ network policies
def _selected(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label selector semantics (matchLabels + matchExpressions)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def _allowed(
    policies, src: dict[str, str], src_ns: dict[str, str], dst: dict[str, str], port: int
) -> bool:
    """Would `src` (pod labels, namespace labels) reach `dst` (a pod in our namespace) on `port`?"""
    same_ns = src_ns.get("kubernetes.io/metadata.name") == NAMESPACE
    applying = [
        p
        for p in policies
        if _selected(p["spec"]["podSelector"], dst) and "Ingress" in p["spec"]["policyTypes"]
    ]
    if not applying:
        return True
    for policy in applying:
        for rule in policy["spec"].get("ingress") or []:
            ports = [p["port"] for p in rule.get("ports") or []]
            if ports and port not in ports:
                continue
            for peer in rule.get("from") or [{}]:
                ns_sel, pod_sel = peer.get("namespaceSelector"), peer.get("podSelector")
                ns_ok = _selected(ns_sel, src_ns) if ns_sel is not None else same_ns
                pod_ok = _selected(pod_sel, src) if pod_sel is not None else True
                if not peer or (ns_ok and pod_ok):
                    return True
    return False


OUR_NS = {"kubernetes.io/metadata.name": NAMESPACE}
OTHER_NS = {"kubernetes.io/metadata.name": "default"}
INGRESS_NS = {"kubernetes.io/metadata.name": "ingress-nginx", "polytask.io/serve-client": "true"}
OPERATOR_NS = {"kubernetes.io/metadata.name": "kuberay-system"}
RAY_HEAD = {
    "ray.io/node-type": "head",
    "polytask.io/component": "serve",
    "polytask.io/ray-cluster": "polytask",
    "app.kubernetes.io/part-of": "polytask",
}
RAY_WORKER = {**RAY_HEAD, "ray.io/node-type": "worker"}
TRAIN_HEAD = {
    "ray.io/node-type": "head",
    "polytask.io/component": "train",
    "polytask.io/ray-cluster": "polytask-train",
}
TRAIN_WORKER = {**TRAIN_HEAD, "ray.io/node-type": "worker"}
TUNE_WORKER = {
    "ray.io/node-type": "worker",
    "polytask.io/component": "tune",
    "polytask.io/ray-cluster": "polytask-tune",
}
MLFLOW = {"app.kubernetes.io/name": "mlflow", "app.kubernetes.io/part-of": "polytask"}
POSTGRES = {"app.kubernetes.io/name": "postgres", "app.kubernetes.io/part-of": "polytask"}
SUBMITTER = {"polytask.io/ray-submitter": "true", "app.kubernetes.io/part-of": "polytask"}
OPERATOR = {"app.kubernetes.io/name": "kuberay-operator"}
RANDOM = {"app": "something-else"}
CLIENT = {"polytask.io/serve-client": "true"}
MONITORING_NS = {"kubernetes.io/metadata.name": "monitoring"}
PROMETHEUS = {"app.kubernetes.io/name": "prometheus"}
REDIS = {"app.kubernetes.io/name": "redis", "app.kubernetes.io/part-of": "polytask"}
REDIS_CLEANUP = {**RAY_HEAD, "ray.io/node-type": "redis-cleanup"}  # KubeRay: the head's labels
# a pod in another namespace that copies a Ray cluster's labels
IMPOSTOR = {**RAY_WORKER, **CLIENT}


@pytest.mark.parametrize(
    "src, src_ns, dst, port, expected",
    [
        (CLIENT, OUR_NS, RAY_WORKER, 8000, True),
        (CLIENT, OTHER_NS, RAY_WORKER, 8000, False),  # labelling yourself a client elsewhere
        (RANDOM, INGRESS_NS, RAY_WORKER, 8000, False),  # ... or labelling your namespace
        (IMPOSTOR, OTHER_NS, RAY_WORKER, 8000, False),
        (IMPOSTOR, OTHER_NS, RAY_HEAD, 6379, False),
        (RANDOM, OUR_NS, RAY_WORKER, 8000, False),
        (RANDOM, OTHER_NS, RAY_WORKER, 8000, False),
        (MLFLOW, OUR_NS, RAY_WORKER, 8000, False),
        (TRAIN_WORKER, OUR_NS, RAY_WORKER, 8000, False),
        (CLIENT, OUR_NS, RAY_HEAD, 8265, False),
        (RANDOM, INGRESS_NS, RAY_HEAD, 8265, False),
        (RANDOM, OUR_NS, RAY_HEAD, 8265, False),
        (SUBMITTER, OUR_NS, RAY_HEAD, 8265, True),
        (SUBMITTER, OUR_NS, TRAIN_HEAD, 8265, True),
        (SUBMITTER, OUR_NS, RAY_HEAD, 6379, False),
        (SUBMITTER, OTHER_NS, TRAIN_HEAD, 8265, False),
        (OPERATOR, OPERATOR_NS, RAY_HEAD, 8265, True),
        (OPERATOR, OPERATOR_NS, TRAIN_HEAD, 52365, True),
        (OPERATOR, OTHER_NS, RAY_HEAD, 8265, False),  # a pod calling itself the operator
        (OPERATOR, OPERATOR_NS, RAY_HEAD, 6379, False),
        # Ray ports: only between pods of the same Ray cluster
        (RAY_WORKER, OUR_NS, RAY_HEAD, 6379, True),
        (RAY_HEAD, OUR_NS, RAY_WORKER, 10002, True),
        (TRAIN_WORKER, OUR_NS, TRAIN_HEAD, 6379, True),
        (TRAIN_WORKER, OUR_NS, RAY_HEAD, 6379, False),
        (RAY_WORKER, OUR_NS, TRAIN_HEAD, 6379, False),
        (TUNE_WORKER, OUR_NS, TRAIN_HEAD, 6379, False),
        (TUNE_WORKER, OUR_NS, TRAIN_WORKER, 10002, False),
        (RAY_WORKER, OUR_NS, MLFLOW, 5000, True),
        (TRAIN_WORKER, OUR_NS, MLFLOW, 5000, True),
        (CLIENT, OUR_NS, MLFLOW, 5000, False),
        (RANDOM, OUR_NS, MLFLOW, 5000, False),
        (RAY_WORKER, OTHER_NS, MLFLOW, 5000, False),
        (MLFLOW, OUR_NS, POSTGRES, 5432, True),
        (RAY_WORKER, OUR_NS, POSTGRES, 5432, False),
        (RANDOM, OUR_NS, POSTGRES, 5432, False),
        (MLFLOW, OTHER_NS, POSTGRES, 5432, False),
        # Prometheus (namespace monitoring) scrapes the Serve cluster's metrics port, nothing else
        (PROMETHEUS, MONITORING_NS, RAY_HEAD, 8080, True),
        (PROMETHEUS, MONITORING_NS, RAY_WORKER, 8080, True),
        (PROMETHEUS, MONITORING_NS, RAY_HEAD, 8000, False),
        (PROMETHEUS, MONITORING_NS, RAY_HEAD, 8265, False),
        (PROMETHEUS, MONITORING_NS, RAY_HEAD, 6379, False),
        (PROMETHEUS, MONITORING_NS, MLFLOW, 5000, False),
        (PROMETHEUS, MONITORING_NS, TRAIN_HEAD, 8080, False),
        (PROMETHEUS, OTHER_NS, RAY_HEAD, 8080, False),  # a pod calling itself Prometheus
        (RANDOM, MONITORING_NS, RAY_HEAD, 8080, False),
        (RANDOM, OUR_NS, RAY_HEAD, 8080, False),
        # Redis (GCS fault tolerance): the RayService's heads and KubeRay's redis-cleanup Job
        # pods only; RayJob heads have no GCS fault tolerance and no Redis access
        (RAY_HEAD, OUR_NS, REDIS, 6379, True),
        (TRAIN_HEAD, OUR_NS, REDIS, 6379, False),
        (REDIS_CLEANUP, OUR_NS, REDIS, 6379, True),
        (RAY_WORKER, OUR_NS, REDIS, 6379, False),
        (TRAIN_WORKER, OUR_NS, REDIS, 6379, False),
        (MLFLOW, OUR_NS, REDIS, 6379, False),
        (CLIENT, OUR_NS, REDIS, 6379, False),
        (RAY_HEAD, OTHER_NS, REDIS, 6379, False),  # a pod copying a head's labels elsewhere
        (PROMETHEUS, MONITORING_NS, REDIS, 6379, False),
    ],
)
def test_network_policies(src, src_ns, dst, port, expected):
    for path in PLATFORM:
        policies = objs(path, "NetworkPolicy")
        assert _allowed(policies, src, src_ns, dst, port) is expected, (path, src, dst, port)


@pytest.mark.parametrize("path", PLATFORM)
def test_no_policy_admits_other_namespaces_by_their_own_labels(path):
    """Every namespaceSelector names a namespace by kubernetes.io/metadata.name (set by the API
    server, so nobody can label their namespace into it); none is empty (= every namespace)."""
    for policy in objs(path, "NetworkPolicy"):
        for rule in policy["spec"].get("ingress") or []:
            for peer in rule.get("from") or []:
                if "namespaceSelector" not in peer:
                    continue
                sel = peer["namespaceSelector"]
                assert set(sel.get("matchLabels") or {}) == {"kubernetes.io/metadata.name"}, (
                    policy["metadata"]["name"],
                    sel,
                )
                assert not sel.get("matchExpressions"), policy["metadata"]["name"]


@pytest.mark.parametrize("path", OVERLAYS)
def test_every_ray_pod_is_labelled_with_its_own_cluster(path):
    """The per-cluster policies rely on polytask.io/ray-cluster = the RayService/RayJob name on
    every Ray pod (head and every group), and a policy exists for each such cluster."""
    platform = path.rsplit("/jobs", 1)[0]
    policies = {p["metadata"]["name"]: p for p in objs(platform, "NetworkPolicy")}
    for obj in rendered(path):
        if obj["kind"] not in RAY_KINDS:
            continue
        name = obj["metadata"]["name"]
        for where, meta, _ in pod_specs(obj):
            if where.endswith("submitter"):
                assert "polytask.io/ray-cluster" not in (meta.get("labels") or {}), where
                continue
            assert (meta.get("labels") or {}).get("polytask.io/ray-cluster") == name, where
        policy = policies[f"ray-cluster-{name}"]["spec"]
        assert policy["podSelector"] == {"matchLabels": {"polytask.io/ray-cluster": name}}
        assert policy["ingress"] == [
            {"from": [{"podSelector": {"matchLabels": {"polytask.io/ray-cluster": name}}}]}
        ]


@pytest.mark.parametrize("path", PLATFORM)
def test_network_policy_labels_match_the_pods(path):
    """The labels the policies rely on are on the pod templates."""
    rs = one(path, "RayService", "polytask")
    for _, meta, _ in pod_specs(rs):
        assert meta["labels"]["polytask.io/component"] == "serve"
    for job in objs(path + "/jobs", "RayJob"):
        sub = job["spec"]["submitterPodTemplate"]["metadata"]["labels"]
        assert sub["polytask.io/ray-submitter"] == "true"
    assert (
        one(path, "Deployment", "mlflow")["spec"]["template"]["metadata"]["labels"][
            "app.kubernetes.io/name"
        ]
        == "mlflow"
    )
    assert (
        one(path, "StatefulSet", "postgres")["spec"]["template"]["metadata"]["labels"][
            "app.kubernetes.io/name"
        ]
        == "postgres"
    )


# ------------------------------------------------------------------ monitoring
@pytest.mark.parametrize("path", PLATFORM)
def test_podmonitor_scrapes_every_serve_pod_on_its_metrics_port(path):
    """The PodMonitor selects the RayService's head and worker pods, in our namespace, by a
    container port named `metrics` that every one of them declares as 8080 (KubeRay's
    --metrics-export-port), which the NetworkPolicy opens to Prometheus and nothing else."""
    (monitor,) = objs(MONITORING, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = spec["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    rs = one(path, "RayService", "polytask")
    pods = list(pod_specs(rs))
    assert len(pods) >= 2  # head + worker groups
    for where, meta, pod in pods:
        assert _selected(spec["selector"], meta["labels"]), where
        ports = {p["name"]: p["containerPort"] for c in pod["containers"] for p in c.get("ports", [])}
        assert ports.get(endpoint["port"]) == 8080, where
    policies = objs(path, "NetworkPolicy")
    for _, meta, _ in pods:
        assert _allowed(policies, PROMETHEUS, MONITORING_NS, meta["labels"], 8080)
    for job in objs(path + "/jobs", "RayJob"):  # training clusters are not scraped
        for where, meta, _ in pod_specs(job):
            assert not _selected(spec["selector"], meta.get("labels") or {}), where


# ------------------------------------------------------------------ image
DOCKERFILE = K8S / "image" / "Dockerfile"


def _dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r'^ARG (\w+)="?([^"\n]*)"?$', DOCKERFILE.read_text(), re.MULTILINE))


def _dockerfile_ray_version() -> str:
    return _dockerfile_args()["RAY_VERSION"]


def test_dockerfile():
    text = DOCKERFILE.read_text()
    args = _dockerfile_args()
    assert args["RAY_VERSION"] == "2.60.0" and args["RAY_VARIANT"] == ""
    assert args["TORCH_VERSION"] == "2.13.0"
    (base,) = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert base == "rayproject/ray:${RAY_VERSION}-py311${RAY_VARIANT}"
    assert "--build-arg RAY_VARIANT=-gpu" in text  # documented GPU build
    assert "torch==${TORCH_VERSION}" in text
    copied = " ".join(re.findall(r"^COPY (.+)$", text, re.MULTILINE))
    for src in ("pyproject.toml", "platform/", "jobs/", "serve_configs/"):
        assert src in copied
    assert re.search(r"^RUN pip install \. ", text, re.MULTILINE)
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] in ("1000", "ray")
    # the manifests' runAsUser matches the image's user
    for path in OVERLAYS:
        for where, c, pod_sc in containers_of_image(path, "polytask"):
            uid = (c.get("securityContext") or {}).get("runAsUser", pod_sc.get("runAsUser"))
            assert uid == 1000, where


def containers_of_image(path: str, image: str):
    for obj in rendered(path):
        for where, c, pod_sc in containers(obj):
            if "image" in c and image in kustomize_lite.split_image(c["image"])[0]:
                yield where, c, pod_sc


def test_images_are_overridable_in_one_place():
    for path in ("overlays/gpu", "overlays/gpu/jobs"):
        images = {c["image"] for _, c, _ in containers_of_image(path, "polytask")}
        assert images == {"ghcr.io/OWNER/polytask:0.1.0-gpu"}, images
    for path in ("base", "base/jobs", "overlays/cpu-only", "overlays/cpu-only/jobs"):
        images = {c["image"] for _, c, _ in containers_of_image(path, "polytask")}
        assert images == {"polytask:0.1.0"}, images


@pytest.mark.parametrize("path", ALL_BUILDS)
def test_every_image_is_pinned_by_version(path):
    """No `latest`, no floating major tag (postgres:17), no untagged image: a full version
    (x.y or x.y.z, optionally -suffix) or a digest, on every container the autoscaler included."""
    pinned = re.compile(r"^v?\d+\.\d+(\.\d+)?(-[A-Za-z0-9.]+)?$")
    seen = 0
    for obj in rendered(path):
        for where, c, _ in containers(obj):
            if "image" not in c:
                continue
            seen += 1
            image = c["image"]
            if "@sha256:" in image:
                continue
            tag = kustomize_lite.split_image(image)[1]
            assert tag and pinned.match(tag), f"{where}: image {image} is not pinned by version"
    assert seen
    (base,) = re.findall(r"^FROM (\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    assert "${RAY_VERSION}" in base and pinned.match(_dockerfile_ray_version())


# ------------------------------------------------------------------ Serve API key
API_KEY_SECRET, API_KEY_ENV = "polytask-serve-api-key", "POLYTASK_API_KEY"


@pytest.mark.parametrize("path", PLATFORM)
def test_serve_api_requires_a_key_from_a_generated_secret(path):
    """cluster.yaml names the env var; every RayService pod fills it from the Secret (so a pod
    without the Secret never starts, and the Ingress refuses an empty key); the Secret itself is
    never shipped: docs/kubernetes.md generates it at deploy time."""
    for app in _serve_config(path)["applications"]:
        assert app["args"]["api_key_env"] == API_KEY_ENV
    rs = one(path, "RayService", "polytask")
    for where, _, pod in pod_specs(rs):
        env = {e["name"]: e for e in pod["containers"][0].get("env") or []}
        ref = env[API_KEY_ENV]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": API_KEY_SECRET, "key": "api-key"}, where
        assert "value" not in env[API_KEY_ENV] and not ref.get("optional"), where
    assert not [o for o in rendered(path) if o["metadata"]["name"] == API_KEY_SECRET]
    readme = K8S_DOC.read_text()
    assert f"kubectl -n {NAMESPACE} create secret generic {API_KEY_SECRET}" in readme
    assert "--from-literal=api-key=$(openssl rand -hex 32)" in readme
    assert "Authorization: Bearer" in readme
    assert "polytask.io/api-key-rotated" in readme  # rotation: new key, Secret, new cluster


def test_shipped_postgres_password_is_an_obvious_placeholder():
    """A real password must never land in the repo; deployments replace it (docs/kubernetes.md)."""
    secret = one("base", "Secret", "polytask-postgres")
    password = base64.b64decode(secret["data"]["POSTGRES_PASSWORD"]).decode()
    assert password.startswith("change-me"), (
        "do not commit real credentials to k8s/base/postgres.env"
    )


def test_kubernetes_page_covers_the_workflow():
    text = K8S_DOC.read_text()
    for needle in (
        "helm install kuberay-operator",
        "kubectl apply -k k8s/overlays/gpu",
        "get rayjobs",
        "port-forward",
        "8265",
        "5000",
        "8000",
        "kubectl delete -k",
        "k8s/image/Dockerfile",
        "POLYTASK_STORAGE_PATH",
        "s3://",
    ):
        assert needle in text, needle


@pytest.mark.parametrize("path", PLATFORM)
def test_every_ray_container_sets_the_serve_levers_the_config_names(path):
    """Serve reads its levers when each of its processes starts, so the env every Ray container
    starts with must hold what `args.levers` names (the builder refuses to deploy otherwise)."""
    from polytask.serve.levers import lever_env

    (app,) = _serve_config(path)["applications"]
    want = lever_env(app["args"]["levers"])
    assert want, "cluster.yaml names its levers"
    for where, _, pod in pod_specs(one(path, "RayService", "polytask")):
        env = {e["name"]: e.get("value") for e in pod["containers"][0].get("env") or []}
        assert {k: env.get(k) for k in want} == want, where


# ------------------------------------------------------------------ fault tolerance
def _secret_ref(env: dict[str, Any], name: str) -> tuple[str, str] | None:
    ref = ((env.get(name) or {}).get("valueFrom") or {}).get("secretKeyRef")
    return (ref["name"], ref["key"]) if ref else None


@pytest.mark.parametrize("path", OVERLAYS)
def test_only_the_rayservice_has_gcs_fault_tolerance_on_redis(path):
    """A head loss must not take the serving workers (proxies, replicas) with it: the
    RayService's GCS keeps its state in the namespace's Redis, whose password comes from a
    Secret. RayJobs get neither (KubeRay: GCS fault tolerance is meant for RayService)."""
    platform = path.rsplit("/jobs", 1)[0]
    redis_svc = one(platform, "Service", "redis")
    (port,) = [p["port"] for p in redis_svc["spec"]["ports"]]
    ray = [o for o in rendered(path) if o["kind"] in RAY_KINDS]
    assert ray
    for obj in ray:
        spec = cluster_specs(obj)
        if obj["kind"] != "RayService":
            assert "gcsFaultToleranceOptions" not in spec, obj["metadata"]["name"]
            assert "polytask-redis" not in json.dumps(obj), obj["metadata"]["name"]
            continue
        ft = spec["gcsFaultToleranceOptions"]
        assert ft["redisAddress"] == f"redis:{port}", obj["metadata"]["name"]
        assert ft["redisPassword"]["valueFrom"]["secretKeyRef"] == {
            "name": "polytask-redis",
            "key": "password",
        }
        assert "value" not in ft["redisPassword"]


READ_ONLY_ROOT = ("StatefulSet/redis", "StatefulSet/postgres", "Deployment/mlflow", "RayService/")


@pytest.mark.parametrize("path", PLATFORM)
def test_platform_containers_run_on_a_read_only_root_with_scratch_volumes(path):
    """Redis, PostgreSQL, MLflow and the RayService's Ray containers write only to volumes; /tmp
    is an emptyDir with a size limit. (The autoscaler sidecar KubeRay adds, and the RayJobs,
    keep a writable root.)"""
    seen = 0
    for obj in rendered(path):
        for where, pod_spec, pod in pod_specs(obj):
            if not where.startswith(READ_ONLY_ROOT):
                continue
            volumes = {v["name"]: v for v in pod.get("volumes") or []}
            for c in pod["containers"]:
                seen += 1
                assert (c.get("securityContext") or {}).get("readOnlyRootFilesystem") is True, where
                mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts") or []}
                assert "sizeLimit" in volumes[mounts["/tmp"]]["emptyDir"], where
    assert seen >= 5


@pytest.mark.parametrize("path", PLATFORM)
def test_redis_is_persistent_guarded_and_keeps_its_password_off_the_command_line(path):
    sts = one(path, "StatefulSet", "redis")
    pod = sts["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    assert ":" in c["image"] and not c["image"].endswith(":latest")
    env = {e["name"]: e for e in c["env"]}
    assert _secret_ref(env, "REDIS_PASSWORD") == ("polytask-redis", "password")
    script = " ".join(c["command"] + c["args"])
    assert "requirepass $REDIS_PASSWORD" in script and "--requirepass" not in script
    assert "redis-server -" in script  # the config (password) arrives on stdin
    assert "--appendonly yes" in script
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    claims = {v["metadata"]["name"] for v in sts["spec"]["volumeClaimTemplates"]}
    assert mounts["/data"] in claims
    pdb = one(path, "PodDisruptionBudget", "polytask-redis")
    assert _selected(pdb["spec"]["selector"], pod["metadata"]["labels"])
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]  # drains go on
    serve_pdb = one(path, "PodDisruptionBudget", "polytask-serve-workers")
    assert not _selected(serve_pdb["spec"]["selector"], pod["metadata"]["labels"])


@pytest.mark.parametrize("path", PLATFORM)
def test_serve_model_cache_is_on_a_volume(path):
    """Every RayService pod keeps POLYTASK_HOME (the model cache) on the shared PVC, so a pod
    restarted after a head loss finds the pinned version cached and needs no MLflow."""
    rs = one(path, "RayService", "polytask")
    for where, _, pod in pod_specs(rs):
        (c,) = pod["containers"]
        home = env_of(c)["POLYTASK_HOME"]
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts") or []}
        mount = next((m for m in mounts if home.startswith(m.rstrip("/") + "/")), None)
        assert mount, f"{where}: POLYTASK_HOME {home} is on no volume"
        volumes = {v["name"]: v for v in pod.get("volumes") or []}
        claim = volumes[mounts[mount]]["persistentVolumeClaim"]["claimName"]
        one(path, "PersistentVolumeClaim", claim)


# ------------------------------------------------------------------ MLflow authentication
MLFLOW_SECRETS = {
    "polytask-train": "polytask-mlflow-train",
    "polytask-tune": "polytask-mlflow-train",
    "polytask-predict": "polytask-mlflow-serve",
    "polytask": "polytask-mlflow-serve",
}


@pytest.mark.parametrize("path", PLATFORM)
def test_mlflow_runs_its_basic_auth_app(path):
    import configparser

    deploy = one(path, "Deployment", "mlflow")
    pod = deploy["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert dict(itertools.pairwise(c["args"]))["--app-name"] == "basic-auth"
    env = {e["name"]: e for e in c["env"]}
    assert _secret_ref(env, "MLFLOW_AUTH_ADMIN_PASSWORD") == ("polytask-mlflow-admin", "password")
    assert _secret_ref(env, "MLFLOW_AUTH_ADMIN_USERNAME") == ("polytask-mlflow-admin", "username")
    assert _secret_ref(env, "MLFLOW_FLASK_SERVER_SECRET_KEY")[0] == "polytask-mlflow-admin"
    ini = Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    cm = one(path, "ConfigMap", volumes[mounts[str(ini.parent)]]["configMap"]["name"])
    parser = configparser.ConfigParser()
    parser.read_string(cm["data"][ini.name])
    auth = parser["mlflow"]
    assert auth["default_permission"] == "READ"  # nobody may edit what it did not create
    assert "admin_password" not in auth  # from the Secret only
    db = auth["database_uri"].removeprefix("sqlite:///")
    on_pvc = [m for m in mounts if "persistentVolumeClaim" in volumes[mounts[m]]]
    assert any(db.startswith(m + "/") for m in on_pvc), db
    assert auth["authorization_function"].endswith(":authenticate_request_basic_auth")


@pytest.mark.parametrize("path", OVERLAYS)
def test_ray_pods_get_mlflow_credentials_for_their_role(path):
    """Training writes (its own user), serving and batch prediction only read; nothing Ray runs
    holds the admin credentials."""
    for obj in rendered(path):
        if obj["kind"] not in RAY_KINDS:
            continue
        secret = MLFLOW_SECRETS[obj["metadata"]["name"]]
        for where, _, pod in pod_specs(obj):
            if where.endswith("submitter"):
                continue
            env = {e["name"]: e for e in pod["containers"][0].get("env") or []}
            assert _secret_ref(env, "MLFLOW_TRACKING_USERNAME") == (secret, "username"), where
            assert _secret_ref(env, "MLFLOW_TRACKING_PASSWORD") == (secret, "password"), where
            refs = json.dumps(pod)
            assert "polytask-mlflow-admin" not in refs, where
