"""A worker node lost under serving load: remove it (its raylet and every process on it
killed), account for the requests, time the replicas' return and the throughput's.

    python jobs/chaos/node_loss.py [--clients 32] [--out bench_results/chaos/node_loss_serve.json]

A local multi-node cluster (ray.cluster_utils.Cluster, its own temp dir): a head that runs only
Serve's controller and HTTP proxy, two worker nodes, each deployment with two replicas spread
over them. The worker node holding an Encoder replica is removed without warning; the other
node's replicas keep answering, Serve starts replacements on the node that is left.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chaos import (  # after the path insert, as when run directly
    DEPLOYMENTS,
    ChaosError,
    Load,
    account,
    deploy,
    free_port,
    head_and_workers,
    machine,
    node_loss_args,
    register_tiny_model,
    running_replicas,
    short_tmp,
    stats,
    write_result,
)

REPLICAS = 2


def main(argv: list[str] | None = None) -> dict:
    parser = node_loss_args(__doc__, "node_loss_serve.json")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--settle", type=int, default=60, help="good requests before and after")
    args = parser.parse_args(argv)

    root = short_tmp("pt-node-")
    os.environ["POLYTASK_HOME"] = str(root / "home")
    os.environ["POLYTASK_NODE_DIR"] = str(root / "node")
    store, model = register_tiny_model(root)
    os.environ["MLFLOW_TRACKING_URI"] = store
    import ray

    cluster, workers = head_and_workers(root, args.worker_cpus)
    try:
        env = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "POLYTASK_HOME", "POLYTASK_NODE_DIR")}
        ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": env})
        url = deploy(model, free_port(), replicas=REPLICAS, encoder_cpus=0.5,
                     proxy_location="HeadOnly")
        placed = _encoder_nodes()
        by_id = {w.node_id: w for w in workers}
        victim = by_id.get(next((n for n in placed if n in by_id), ""))
        if victim is None or len(placed) < 2:
            raise ChaosError(f"the Encoder replicas are not on both worker nodes: {placed}")
        with Load(url, args.clients) as load:
            load.wait_good(args.settle, after=0)
            removed = time.monotonic()
            cluster.remove_node(victim, allow_graceful=False)
            noticed = _wait_dead(victim.node_id)
            back = _wait_replicas(REPLICAS, victim.node_id)
            first_good = load.wait_good(args.settle, after=back)
        phases = account(load.done, removed, back)
        placed_after = _encoder_nodes()
    finally:
        ray.shutdown()
        cluster.shutdown()
    before, after = phases["before"]["requests_per_s"], phases["after"]["requests_per_s"]
    result = {
        "what": "remove a worker node (SIGKILL its raylet and workers) under serving load",
        "clients": args.clients,
        "nodes": "head (Serve controller + proxy) and 2 workers",
        "worker_cpus": args.worker_cpus,
        "replicas_per_deployment": REPLICAS,
        "requests": len(load.done),
        "failed": sum(p["failed"] for p in phases.values()),
        "in_flight_at_removal": phases["in_flight"]["requests"],
        "started_before_noticed": sum(1 for d in load.done if d[0] <= noticed),
        "failed_started_after_noticed": sum(1 for d in load.done if d[0] > noticed and d[2] != 200),
        "phases": phases,
        "node_death_noticed_s": round(noticed - removed, 2),
        "replicas_back_s": round(back - removed, 2),
        "first_good_after_replicas_back_s": round(max(0.0, first_good - back), 2),
        "requests_per_s_before": before,
        "requests_per_s_after": after,
        "encoder_nodes_after": len(placed_after),
        "machine": machine(),
    }
    write_result(Path(args.out), result)
    print(f"node_loss: {result['failed']} of {result['requests']} failed "
          f"({result['in_flight_at_removal']} in flight); replicas back after "
          f"{result['replicas_back_s']} s; {before} -> {after} req/s -> {args.out}")
    return result


def _encoder_nodes(calls: int = 24) -> set[str]:
    """The nodes the Encoder's replicas run on (stats calls land on either replica)."""
    return {stats("Encoder", timeout_s=10)["node_id"] for _ in range(calls)}


def _wait_dead(node_id: str, timeout_s: float = 120) -> float:
    """Until the GCS marks the removed node dead (its health checks failed); returns when."""
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(n["NodeID"] == node_id and not n["Alive"] for n in ray.nodes()):
            return time.monotonic()
        time.sleep(0.1)
    raise ChaosError(f"node {node_id} not marked dead within {timeout_s} s")


def _wait_replicas(want: int, dead: str, timeout_s: float = 180) -> float:
    """Until every deployment has `want` RUNNING replicas again and none of the Encoder's is on
    the dead node; returns when."""
    deadline = time.monotonic() + timeout_s
    counts: dict[str, int] = {}
    while time.monotonic() < deadline:
        try:
            counts = running_replicas()
            full = all(counts.get(d, 0) >= want for d in DEPLOYMENTS)
            if full and dead not in _encoder_nodes(8):
                return time.monotonic()
        except Exception as exc:  # noqa: BLE001 - a call may still reach the dead node's replica
            print(f"node_loss: waiting for replicas ({type(exc).__name__})", file=sys.stderr)
        time.sleep(0.2)
    raise ChaosError(f"replicas not back within {timeout_s} s: {counts}")


if __name__ == "__main__":
    main()
