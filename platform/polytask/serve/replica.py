"""Which replica answered: tests and operators use it to see restarts and placement."""

from __future__ import annotations

import ray


def replica_identity() -> dict[str, str]:
    """Actor and node of the calling replica (or driver)."""
    ctx = ray.get_runtime_context()
    return {"actor_id": ctx.get_actor_id() or "", "node_id": ctx.get_node_id()}
