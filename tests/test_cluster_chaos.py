"""Cluster-level faults on real local clusters, each in its own Ray temp dir and process:
the GCS SIGKILLed and restarted on a real Redis, a worker node removed under serving load and
another during training.

The scripts in jobs/chaos are the benchmarks (full scale: bench_results/chaos/); here they run
small, and the assertions are what must hold at any scale.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, out: Path, *args: str, timeout: int = 480) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "chaos" / script), "--out", str(out), *args],
        check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return json.loads(out.read_text())


def test_gcs_sigkilled_and_restarted_on_redis_keeps_the_app_its_replicas_and_cache(tmp_path):
    """With the GCS's tables in Redis, a killed GCS costs no replica, no model download and at
    most the requests in flight at the kill; Serve's control plane answers after the restart."""
    got = _run("gcs_restart.py", tmp_path / "gcs.json", "--clients", "4", "--gap-s", "3",
               "--settle", "10")
    phases = got["phases"]
    assert phases["before"]["failed"] == 0 and phases["after"]["failed"] == 0, phases
    assert got["failed"] <= phases["in_flight"]["requests"], phases
    assert phases["gap"]["requests"] > 0, "clients kept sending while the GCS was down"
    assert got["replicas_unchanged"] and got["cache_untouched"], got
    assert got["model_before"] == got["model_after"] == "models:/chaos/1"
    assert got["app_status_after"].endswith("RUNNING")


def test_a_worker_node_lost_under_load_costs_only_requests_sent_to_it(tmp_path):
    """Removing a worker node fails only requests sent before Ray noticed the node was gone
    (in flight on it, or routed to its replicas meanwhile), never one after the replicas are
    back; the replicas return on the node that is left and it keeps serving."""
    got = _run("node_loss.py", tmp_path / "node.json", "--clients", "8", "--settle", "20")
    phases = got["phases"]
    assert phases["before"]["failed"] == 0 and phases["after"]["failed"] == 0, phases
    assert got["failed"] <= got["started_before_noticed"], got
    assert got["replicas_back_s"] >= got["node_death_noticed_s"] > 0
    assert got["encoder_nodes_after"] == 1 and got["requests_per_s_after"] > 0


def test_a_worker_node_lost_during_training_resumes_from_its_checkpoint(tmp_path):
    """The node running rank 0 removed halfway through epoch 1: the worker group restarts on the
    node that is left from epoch 0's checkpoint, in the same MLflow run, and registers."""
    got = _run("node_loss_train.py", tmp_path / "train.json", "--epochs", "2", "--workers", "1")
    assert got["workers_on_removed_node"] >= 1
    assert got["epochs_and_start_epochs"] == [[0, 0], [1, 1]], got
    assert got["registered_version"] == 1 and got["mlflow_run_id"]
