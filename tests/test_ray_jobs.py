"""Ray jobs as the docs submit them, against a real cluster started here as a user would: `ray
start --head` with its job server, token authentication on (what Ray 2.60 clusters use), in its
own temp dir. The commands are the docs' own (each is checked to appear in the docs verbatim);
the checks are made from the submitting side: runs, registered model, checkpoints and predictions
land in the user's own `.polytask/`, never in Ray's temporary copy of the working directory.

One cluster serves the whole module; every process it started is killed at the end (by process
group and descendants: `ray stop` would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from mlflow import MlflowClient

from conftest import free_port
from polytask.demo import demo_experiment, write_demo_data, write_yaml
from polytask.tracking.tags import PARENT_TAG, SWEEP_TAG

ROOT = Path(__file__).resolve().parents[1]
TRAINING_DOCS = (ROOT / "docs" / "training.md").read_text()
BATCH_DOCS = (ROOT / "docs" / "batch.md").read_text()
SERVING_DOCS = (ROOT / "docs" / "serving.md").read_text()

# The docs' commands, verbatim (test_commands_are_the_docs_own checks); 8265 becomes this
# cluster's dashboard port.
CONNECT = "export RAY_ADDRESS=http://127.0.0.1:8265 RAY_AUTH_MODE=token"
JOB_ENV = """JOB_ENV="{\\"env_vars\\": {\\"POLYTASK_HOME\\": \\"$PWD/.polytask\\"}}\""""
TRAIN = 'ray job submit --working-dir . --runtime-env-json "$JOB_ENV" -- polytask train jobs/train_demo.yaml'
TUNE = 'ray job submit --working-dir . --runtime-env-json "$JOB_ENV" -- polytask tune jobs/sweep.yaml'
PREDICT = (
    'ray job submit --working-dir . --runtime-env-json "$JOB_ENV" -- polytask predict '
    'models:/polytask-demo@champion --input reviews.jsonl --output "$PWD/scored.jsonl"'
)
SERVE = "RAY_ADDRESS=127.0.0.1:6379 RAY_AUTH_MODE=token polytask serve models:/polytask-demo@champion"
MODEL = "polytask-demo"
JOB_TIMEOUT_S = 480  # one job, on a loaded 2-core machine; a quiet one takes a fraction


@dataclass
class Cluster:
    root: Path  # the cluster's temp dir and token live here
    project: Path  # the user's checkout: jobs/, data/, .polytask/ (the submitting side)
    gcs: str
    dashboard: int
    env: dict[str, str]  # what the user's shell has: the token, no RAY_ADDRESS yet

    @property
    def store(self) -> str:
        return f"sqlite:///{self.project / '.polytask' / 'mlflow.db'}"

    def submit(self, *lines: str, timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
        """Run docs lines in bash from the project dir, as the user would (port substituted)."""
        script = "\n".join(["set -e", CONNECT, JOB_ENV, *lines]).replace("8265", str(self.dashboard))
        return subprocess.run(
            ["bash", "-c", script], cwd=self.project, env=self.env, capture_output=True,
            text=True, timeout=timeout, check=False,
        )


def _user_env(token: Path) -> dict[str, str]:
    """The submitting user's environment: this venv's commands, the cluster's token file; no
    state settings (POLYTASK_HOME, MLFLOW_TRACKING_URI) and no Ray address or temp dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
    for key in ("POLYTASK_HOME", "POLYTASK_STORAGE_PATH", "POLYTASK_FAULTS", "RAY_TMPDIR"):
        env.pop(key, None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_TOKEN_PATH"] = str(token)  # the token: ~/.ray/auth_token elsewhere
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _write_project(project: Path, encoder: Path) -> None:
    """jobs/train_demo.yaml and jobs/sweep.yaml over data/demo, as the repo lays them out, with
    the tiny encoder and few steps."""
    data = write_demo_data(project / "data" / "demo", n_train=120, n_eval=30)
    exp = demo_experiment(data, encoder, epochs=2, num_workers=1, sampling={"steps_per_epoch": 4})
    exp["run"] = {"name": "demo", "progress_every_s": 0}
    for task in exp["tasks"]:  # relative to the file, as in the repo's jobs/
        task["data"] = {k: os.path.relpath(v, project / "jobs") for k, v in task["data"].items()}
    write_yaml(exp, project / "jobs" / "train_demo.yaml")
    sweep = {**exp, "optim": {**exp["optim"], "epochs": 1}, "run": {"name": "demo-sweep"}}
    sweep["tune"] = {
        "name": "demo-sweep", "num_samples": 2, "max_concurrent_trials": 1,
        "search_space": {"optim.lr": "loguniform(1e-4, 3e-3)"},
    }
    write_yaml(sweep, project / "jobs" / "sweep.yaml")
    rows = ["the concert was wonderful", "a dull and boring film", "alice flew to paris"]
    (project / "reviews.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))


def _kill_group(pgid: int) -> None:
    """SIGTERM, then SIGKILL, every process of the cluster: its process group (what `ray start`
    spawned) and their descendants (job drivers run in sessions of their own)."""
    import psutil

    procs: set[psutil.Process] = set()
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                procs.add(proc)
                procs.update(proc.children(recursive=True))
        except (psutil.Error, ProcessLookupError):
            continue
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(procs), timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass


@pytest.fixture(scope="module")
def cluster(tiny_encoder: Path) -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="ptjobs-", dir="/tmp"))  # short: Ray's socket paths
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = _user_env(token)
    project = root / "project"
    _write_project(project, tiny_encoder)
    gcs_port, dashboard = free_port(), free_port()
    head_env = {**env, "RAY_AUTH_MODE": "token", "RAY_TMPDIR": str(root / "ray")}
    start = subprocess.Popen(
        [
            "ray", "start", "--head", f"--temp-dir={root / 'ray'}", f"--port={gcs_port}",
            "--node-ip-address=127.0.0.1", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
            "--num-cpus=2", "--disable-usage-stats",
        ],
        cwd=project, env=head_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group: the teardown kills exactly this cluster
    )
    try:
        out, _ = start.communicate(timeout=120)
        assert start.returncode == 0, out
        yield Cluster(root, project, f"127.0.0.1:{gcs_port}", dashboard, env)
    finally:
        _kill_group(start.pid)
        shutil.rmtree(root, ignore_errors=True)


def _job_output(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def _summary(output: str) -> dict:
    """The last JSON object the job printed (the command's summary)."""
    start = output.rfind("\n{")
    assert start >= 0, output[-3000:]
    end = output.index("\n}", start) + 2
    return json.loads(output[start:end])


def test_commands_are_the_docs_own() -> None:
    for line in (CONNECT, JOB_ENV, TRAIN, TUNE):
        assert line in TRAINING_DOCS, f"docs/training.md lost: {line}"
    assert PREDICT in BATCH_DOCS
    assert SERVE in SERVING_DOCS


def test_the_cluster_is_private_and_needs_its_token(cluster: Cluster) -> None:
    """A plain `ray.init()` elsewhere on this machine does not find this cluster (its address is
    recorded only in its own temp dir); a submission without the token is refused."""
    from ray._private.services import canonicalize_bootstrap_address

    assert canonicalize_bootstrap_address(None) != cluster.gcs
    env = {**cluster.env}
    env.pop("RAY_AUTH_TOKEN_PATH")
    env["HOME"] = str(cluster.root)  # no ~/.ray/auth_token either
    refused = subprocess.run(
        ["ray", "job", "list", f"--address=http://127.0.0.1:{cluster.dashboard}"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert refused.returncode != 0
    assert "Authentication" in _job_output(refused)


@pytest.mark.parametrize("auth", ["no RAY_AUTH_MODE", "no token"])
def test_a_polytask_command_refused_by_the_cluster_says_what_to_set(cluster: Cluster, auth: str) -> None:
    """Joining with RAY_ADDRESS but without RAY_AUTH_MODE=token (Ray then sends no token and
    retries for ~20 s), or without the token: one `error:` line naming what to set."""
    env = {**cluster.env, "RAY_ADDRESS": cluster.gcs}
    if auth == "no token":
        env.pop("RAY_AUTH_TOKEN_PATH")
        env.update(RAY_AUTH_MODE="token", HOME=str(cluster.root))
    result = subprocess.run(
        ["polytask", "serve", "models:/polytask-demo@champion", "--update"], cwd=cluster.project,
        env=env, capture_output=True, text=True, timeout=180, check=False,
    )
    assert result.returncode == 1, _job_output(result)[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "RAY_AUTH_MODE=token" in last, result.stderr[-3000:]
    assert "ray get-auth-token" in last and "Traceback" not in result.stderr


def test_state_in_the_jobs_temporary_copy_is_refused(cluster: Cluster) -> None:
    result = cluster.submit(
        "ray job submit --working-dir . -- polytask train jobs/train_demo.yaml", timeout=120
    )
    out = _job_output(result)
    assert result.returncode != 0, out[-3000:]
    assert "Ray's temporary copy of the job's working directory" in out, out[-3000:]
    for setting in ("POLYTASK_HOME", "tracking.tracking_uri", "MLFLOW_TRACKING_URI", "run.storage_path"):
        assert setting in out
    assert not (cluster.project / ".polytask" / "mlflow.db").exists()


def test_stopped_train_job_resumes_and_lands_in_the_users_store(cluster: Cluster) -> None:
    """The docs' train submission, stopped with `ray job stop` while epoch 1 trains (rank 0 is
    parked halfway through it by the fault hook, after epoch 0's checkpoint), then submitted
    again: the run resumes at epoch 1 in the same MLflow run, and its runs, checkpoints and
    registered model are in the user's own `.polytask/`."""
    held = JOB_ENV.replace('.polytask\\"}', '.polytask\\", \\"POLYTASK_FAULTS\\": \\"hold_at_epoch=1\\"}')
    assert held != JOB_ENV
    first = TRAIN.replace("ray job submit", "ray job submit --submission-id first --no-wait")
    started = cluster.submit(held, first)
    assert started.returncode == 0, _job_output(started)[-3000:]
    home = cluster.project / ".polytask"
    pid_file = home / "ray_results" / "demo" / "rank0.pid"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not pid_file.exists():
        assert time.monotonic() < deadline, "the job never reached epoch 1"
        time.sleep(1)
    stopped = cluster.submit("ray job stop first", timeout=120)
    assert stopped.returncode == 0, _job_output(stopped)[-3000:]

    result = cluster.submit(TRAIN)
    out = _job_output(result)
    assert result.returncode == 0, out[-4000:]
    assert f"tracking store: {cluster.store}" in out  # said at the start
    summary = _summary(out)
    assert summary["tracking_uri"] == cluster.store
    assert Path(summary["checkpoint_path"]).is_relative_to(home / "ray_results" / "demo")
    assert Path(summary["bundle_path"]).is_dir()
    assert "runtime_resources" not in json.dumps(summary)
    c = MlflowClient(cluster.store)
    history = sorted((m.step, m.value) for m in c.get_metric_history(summary["run_id"], "start_epoch"))
    assert history == [(0, 0.0), (1, 1.0)]  # epoch 1 began from epoch 0's checkpoint, once
    exp = c.get_experiment_by_name("polytask")
    assert len(c.search_runs([exp.experiment_id], "attributes.run_name = 'demo'")) == 1
    run = c.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(home)
    assert c.get_model_version_by_alias(MODEL, "champion").run_id == summary["run_id"]


def test_tune_job_registers_two_trials_in_the_users_store(cluster: Cluster) -> None:
    result = cluster.submit(TUNE)
    out = _job_output(result)
    assert result.returncode == 0, out[-4000:]
    c = MlflowClient(cluster.store)
    exp = c.get_experiment_by_name("polytask")
    runs = c.search_runs([exp.experiment_id], f"tags.`{SWEEP_TAG}` = 'demo-sweep'")
    assert len([r for r in runs if PARENT_TAG in r.data.tags]) == 2
    tags = {v.version: v.tags for v in c.search_model_versions(f"name = '{MODEL}'")}
    assert len(tags) >= 2  # the train job's version and the sweep's best trial


def test_predict_job_writes_where_the_user_said(cluster: Cluster) -> None:
    result = cluster.submit(PREDICT)
    out = _job_output(result)
    assert result.returncode == 0, out[-4000:]
    rows = [json.loads(line) for line in (cluster.project / "scored.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["the concert was wonderful", "a dull and boring film", "alice flew to paris"]
    assert all({"sentiment", "ner"} <= set(r) for r in rows)


SERVE_WAIT_S = 300  # four replicas (Ingress, Encoder, two heads) start, each importing torch


def _answer(base: str, proc: subprocess.Popen) -> dict:
    """The first answer of the app at `base`, asked until every replica is up (a request sent
    while the Encoder replica still loads waits for it)."""
    deadline = time.monotonic() + SERVE_WAIT_S
    while True:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            response = httpx.post(
                f"{base}/v1/predict",
                json={"inputs": ["alice flew to paris"], "tasks": ["sentiment"]},
                timeout=10,
            )
            if response.status_code == 200:
                return response.json()
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{base} never answered"
        time.sleep(2)


def _serving(command: str, cluster: Cluster) -> subprocess.Popen:
    """A serving command run from the project dir, as the user would, in a session of its own."""
    return subprocess.Popen(
        ["bash", "-c", command], cwd=cluster.project, env=cluster.env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


@pytest.fixture()
def serve_cleanup(cluster: Cluster) -> Iterator[list[subprocess.Popen]]:
    """Kills the test's serving command, then shuts Serve down on the cluster, so the next test
    starts Serve afresh with its own HTTP port. SIGKILL, not Ctrl-C: the command's own shutdown
    (test_quickstart covers it) took up to 70 s on a loaded 2-core machine; `serve shutdown`
    then does the same work in 2 s."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    subprocess.run(
        ["serve", "shutdown", "-y", f"--address=http://127.0.0.1:{cluster.dashboard}"],
        env={**cluster.env, "RAY_AUTH_MODE": "token"}, capture_output=True, timeout=120,
        check=False,
    )


def test_polytask_serve_deploys_onto_the_cluster(cluster: Cluster, serve_cleanup: list) -> None:
    """The user's shell has no POLYTASK_HOME: the model resolves in the project's `.polytask/`
    from the command's cwd, and the replicas get that store from `polytask serve`."""
    port = free_port()
    proc = _serving(SERVE.replace("127.0.0.1:6379", cluster.gcs) + f" --port {port}", cluster)
    serve_cleanup.append(proc)
    answer = _answer(f"http://127.0.0.1:{port}", proc)
    assert answer["model"]["ref"].startswith(f"models:/{MODEL}/")
    assert answer["results"][0]["sentiment"]["label"] in ("negative", "positive")


def test_serve_run_local_config_on_the_cluster(cluster: Cluster, serve_cleanup: list) -> None:
    """`serve run serve_configs/local.yaml` (only its port changed, to a free one) on the cluster,
    as the file's comments say; its replicas resolve `args.model` in the store of the cluster's
    own environment, `.polytask/` of the directory `ray start` ran in."""
    said = (ROOT / "serve_configs" / "local.yaml").read_text()
    comment = re.search(r"^#\s+(RAY_ADDRESS=.*serve run serve_configs/local\.yaml)", said, re.MULTILINE)
    assert comment, "serve_configs/local.yaml no longer says how to `serve run` it on a cluster"
    port = free_port()
    config = yaml.safe_load(said)
    config["http_options"]["port"] = port
    path = cluster.project / "serve_configs" / "local.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    proc = _serving(comment.group(1).replace("127.0.0.1:6379", cluster.gcs), cluster)
    serve_cleanup.append(proc)
    answer = _answer(f"http://127.0.0.1:{port}", proc)
    assert answer["results"][0]["sentiment"]["label"] in ("negative", "positive")
