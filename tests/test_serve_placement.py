"""Placement on a simulated multi-node cluster: the Encoder on the GPU node, heads on `cpu_pool`.

Two extra raylets join the session's Ray for this test (a fake GPU node and a `cpu_pool` node)
and leave after it.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from conftest import free_port


def test_encoder_lands_on_gpu_node_and_heads_on_cpu_pool(
    untrained_bundle: Path, ray_cluster, ray_local
):
    from ray import serve

    from polytask.serve import compose

    bundle = untrained_bundle
    cluster = ray_cluster
    # FAKE GPU: Ray only counts `num_gpus` as a schedulable resource; nothing here uses CUDA.
    fake_gpu_node = cluster.add_node(num_cpus=1, num_gpus=1)
    cpu_pool_node = cluster.add_node(num_cpus=2, resources={"cpu_pool": 4})
    ray = ray_local
    try:
        serve.shutdown()  # a fresh Serve whose one proxy is on the head
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        quick = {"graceful_shutdown_wait_loop_s": 0.1}  # nothing to drain at teardown
        pinned = {"ray_actor_options": {"num_cpus": 0.1, "resources": {"cpu_pool": 0.01}}, **quick}
        args = {
            "model": str(bundle),
            "device": "cpu",
            "head_options": {**pinned, "num_replicas": 1},
        }
        options = {
            "Encoder": {
                "ray_actor_options": {"num_cpus": 0.1, "num_gpus": 1}, "num_replicas": 1, **quick
            },
            "Ingress": {"ray_actor_options": {"num_cpus": 0.1}, "num_replicas": 1, **quick},
        }
        serve.run(compose(args, options), name="polytask", route_prefix="/")

        def node_of(deployment: str) -> str:
            handle = serve.get_deployment_handle(deployment, "polytask")
            return handle.stats.remote().result()["node_id"]

        assert node_of("Encoder") == fake_gpu_node.node_id
        assert node_of("head_sentiment") == cpu_pool_node.node_id
        assert node_of("head_ner") == cpu_pool_node.node_id
        assert ray.available_resources().get("GPU", 0) == 0, "the Encoder holds the one GPU"

        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/predict",
            json={"inputs": ["alice flew to paris"]},
            timeout=120,
        )
        assert response.status_code == 200, response.text
        assert set(response.json()["results"][0]) == {"sentiment", "ner"}
    finally:
        serve.shutdown()
        cluster.remove_node(fake_gpu_node)
        cluster.remove_node(cpu_pool_node)
