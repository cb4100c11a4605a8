"""Autoscaling timeline: load one task of a served model over real HTTP, then go idle, and record
the replicas of every deployment from Serve's status API every 0.5 s.

    python jobs/bench/autoscale_timeline.py --out bench_results/autoscale   # ~1 min

The app is what `polytask serve MODEL --config CONFIG` deploys, CONFIG being
serve_configs/local.yaml with the autoscaling changes in SCENARIO (`autoscale_config`), on the
test's tiny model; `tests/test_serve_autoscale.py` runs the same scenario, shorter, and asserts
it. Writes timeline.json and timeline.png under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

import httpx
import yaml
from common import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCAL_CONFIG = REPO_ROOT / "serve_configs" / "local.yaml"
APP = "polytask"
# What the scenario changes in every autoscaling_config of local.yaml; minimums and maximums
# (1..2 replicas; Ingress 1..1) stay local.yaml's. Short delays so a run takes seconds. Targets: with
# the tiny test encoder every stage is quick, so under 8 clients the Encoder had ~0.9 batches in
# flight on average (0.6-1.6 over 1 s windows) and a loaded head ~0.6 (0-1.4), an idle head 0;
# local.yaml's target of 1 batch per replica is right for a real encoder (MiniLM: ~60 % of a
# request's CPU is the Encoder's) but sits at the tiny model's mean, so it flaps. 0.25 (a batch
# in flight a quarter of the time) is below every loaded window and above an idle one.
# Heads get 0.1: a loaded head's 2 s average fell to 0.27 once, too near 0.25; an idle head
# reads exactly 0.
HEAD_TARGET = 0.1
SCENARIO = {
    "target_ongoing_requests": 0.25,
    "upscale_delay_s": 0.5,
    "downscale_delay_s": 2.0,
    "metrics_interval_s": 0.25,  # how often handles push their queued + ongoing counts
    "look_back_period_s": 2.0,  # the window Serve averages those counts over
}
TEXTS = [
    "the movie was great",
    "alice flew to paris with bob",
    "a dull, lifeless and far too long film",
    "the service at the new place on main street was friendly",
]


def autoscale_config(out_dir: str | Path, changes: dict[str, float] | None = None) -> Path:
    """serve_configs/local.yaml with `changes` (default SCENARIO) merged into every
    autoscaling_config: heads' through args.head_options, the Encoder's and Ingress' through
    their `deployments:` entries, as a user would; returns the written file."""
    config = yaml.safe_load(LOCAL_CONFIG.read_text())
    app = next(a for a in config["applications"] if a["import_path"] == "polytask.serve:build_app")
    changes = changes or SCENARIO
    for options in app["deployments"]:
        options["autoscaling_config"].update(changes)
    app["args"]["head_options"]["autoscaling_config"].update(
        {**changes, "target_ongoing_requests": HEAD_TARGET}
    )
    path = Path(out_dir) / "autoscale.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def replica_states(app: str = APP) -> dict[str, dict[str, Any]]:
    """{deployment: {"running": n, "states": {state: n}, "status": ...}} from `serve.status()`."""
    from ray import serve

    deployments = serve.status().applications[app].deployments
    return {
        name: {
            "running": d.replica_states.get("RUNNING", 0),
            "states": {_name(s): n for s, n in d.replica_states.items()},
            "status": _name(d.status),
        }
        for name, d in deployments.items()
    }


def _name(value: Any) -> str:
    """An enum member or its plain string (the status API returns either)."""
    return str(getattr(value, "value", value))


def running(app: str = APP) -> dict[str, int]:
    """RUNNING replicas per deployment (replicas that are starting or stopping do not count)."""
    return {name: s["running"] for name, s in replica_states(app).items()}


@dataclass
class Load:
    """`clients` threads, each POSTing `inputs` texts to one task in a loop until stopped."""

    url: str
    task: str
    clients: int = 8
    inputs: int = 4
    statuses: dict[int, int] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Self:
        self.threads = [threading.Thread(target=self._client) for _ in range(self.clients)]
        self.started = time.monotonic()
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop_sent = time.monotonic()  # no client sends a new request after this
        self.stop.set()
        for t in self.threads:
            t.join()
        self.stopped = time.monotonic()

    def _client(self) -> None:
        body = {"inputs": (TEXTS * self.inputs)[: self.inputs]}
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self.stop.is_set():
                try:
                    code = client.post(f"/v1/tasks/{self.task}/predict", json=body).status_code
                except httpx.HTTPError:
                    code = 0
                self.statuses[code] = self.statuses.get(code, 0) + 1


def deploy(model: str, config: Path, port: int) -> str:
    """Deploy as `polytask serve MODEL --config CONFIG --port PORT` does; returns the base URL."""
    from polytask.serve.server import run_server

    return run_server(model, config, port=port, blocking=False, console=_Quiet())


class _Quiet:
    def print(self, *_: Any, **__: Any) -> None:
        """run_server's banner (URL, curl line) is noise in a test or a timeline."""


def record_timeline(
    url: str, task: str, load_s: float, idle_s: float, every_s: float = 0.5, clients: int = 8
) -> dict[str, Any]:
    """Sample replica states every `every_s` for `idle_s` before, `load_s` during and `idle_s`
    after a load on `task`; times are seconds since the first sample."""
    samples: list[dict[str, Any]] = []
    t0 = time.monotonic()

    def sample_until(end: float) -> None:
        while time.monotonic() < end:
            now = time.monotonic()
            samples.append({"t": round(now - t0, 2), "deployments": replica_states()})
            time.sleep(max(0.0, every_s - (time.monotonic() - now)))

    sample_until(t0 + min(idle_s, 3.0))
    with Load(url, task, clients=clients) as load:
        sample_until(time.monotonic() + load_s)
    sample_until(time.monotonic() + idle_s)
    return {
        "load": {
            "task": task,
            "clients": clients,
            "inputs_per_request": load.inputs,
            "start_s": round(load.started - t0, 2),
            "stop_s": round(load.stopped - t0, 2),
            "status_codes": {str(k): v for k, v in sorted(load.statuses.items())},
        },
        "samples": samples,
    }


def changes(timeline: dict[str, Any], starting: bool = False) -> dict[str, list[tuple[float, int]]]:
    """{deployment: [(time, replicas)]} at the start and at every change: RUNNING replicas, or with
    `starting` also STARTING ones (what the autoscaler has decided, before the replicas are up)."""
    out: dict[str, list[tuple[float, int]]] = {}
    for sample in timeline["samples"]:
        for name, state in sample["deployments"].items():
            count = state["running"] + (state["states"].get("STARTING", 0) if starting else 0)
            steps = out.setdefault(name, [])
            if not steps or steps[-1][1] != count:
                steps.append((sample["t"], count))
    return out


def plot(timeline: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, decided = changes(timeline), changes(timeline, starting=True)
    end = timeline["samples"][-1]["t"]
    names = sorted(steps, key=lambda n: (n != "Ingress", n != "Encoder", n))
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 1.3 * len(names) + 1), sharex=True)
    load = timeline["load"]
    for ax, name in zip(axes, names):
        for series, style, label in (
            (decided, "--", "RUNNING + STARTING"),
            (steps, "-", "RUNNING"),
        ):
            xs = [t for t, _ in series[name]] + [end]
            ys = [n for _, n in series[name]] + [series[name][-1][1]]
            ax.step(xs, ys, style, where="post", lw=2, label=label)
        ax.axvspan(load["start_s"], load["stop_s"], color="0.5", alpha=0.15)
        ax.set_ylabel(name, rotation=0, ha="right", va="center")
        top = max(3, max(n for _, n in decided[name]) + 1)
        ax.set_ylim(0, top)
        ax.set_yticks(range(top))
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper right", fontsize=7)
    delays = timeline["config"]["changes"]
    axes[0].set_title(
        f"Replicas per deployment from serve.status(); shaded: {load['clients']} clients on "
        f"/v1/tasks/{load['task']}/predict\nupscale_delay_s {delays['upscale_delay_s']}, "
        f"downscale_delay_s {delays['downscale_delay_s']}, target_ongoing_requests "
        f"{delays['target_ongoing_requests']}",
        fontsize=9,
    )
    axes[-1].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tiny_bundle(path: Path) -> Path:
    """The test's model (tests/conftest.py `untrained_bundle`): the tiny random BERT with random
    sentiment and NER heads."""
    from polytask.demo import write_tiny_encoder
    from polytask.model.bundle import save_bundle
    from polytask.model.network import build_model, load_encoder
    from polytask.tasks import TaskSpec

    encoder, tokenizer = load_encoder(str(write_tiny_encoder(path / "encoder", vocab_size=150)))
    specs = [
        TaskSpec("sentiment", "classification", ["negative", "positive"]),
        TaskSpec("ner", "token_classification", ["O", "B-person", "I-person"]),
    ]
    bundle = path / "bundle"
    save_bundle(build_model(encoder, specs, pooling="cls"), tokenizer, bundle, max_length=32)
    return bundle


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_results/autoscale")
    parser.add_argument("--model", help="model URI or bundle; default: the test's tiny model")
    parser.add_argument("--task", help="the task to load; default: the model's first")
    parser.add_argument("--load-s", type=float, default=20.0)
    parser.add_argument("--idle-s", type=float, default=15.0)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args(argv)
    for key, value in (
        ("TOKENIZERS_PARALLELISM", "false"),
        ("HF_HUB_OFFLINE", "1"),
        ("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0"),
    ):
        os.environ.setdefault(key, value)
    import ray
    from common import machine_info
    from ray import serve

    from polytask.model.bundle import read_manifest
    from polytask.tracking.registry import resolve_bundle

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="polytask-autoscale-") as tmp:
        if args.model:
            model, bundle = args.model, resolve_bundle(args.model)
        else:
            bundle = tiny_bundle(Path(tmp))
            model = str(bundle)
        task = args.task or read_manifest(bundle).tasks[0].name
        config = autoscale_config(tmp)
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)  # as tests/conftest.py
        try:
            url = deploy(model, config, free_port())
            timeline = record_timeline(url, task, args.load_s, args.idle_s, clients=args.clients)
        finally:
            serve.shutdown()
            ray.shutdown()
        timeline["config"] = {
            "base": "serve_configs/local.yaml",
            "changes": SCENARIO,
            "serve_config": yaml.safe_load(config.read_text()),
        }
    timeline.update(
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        model=args.model or "tiny random BERT (tests/conftest.py), random sentiment + ner heads",
        changes=changes(timeline),
        changes_with_starting=changes(timeline, starting=True),
        load_average_before=load_before,
        load_average_after=[round(x, 2) for x in os.getloadavg()],
        machine=machine_info(),
    )
    (out / "timeline.json").write_text(json.dumps(timeline, indent=2))
    plot(timeline, out / "timeline.png")
    print(json.dumps({"changes": timeline["changes"], "load": timeline["load"]}, indent=2))
    print(f"wrote {out / 'timeline.json'} and {out / 'timeline.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
