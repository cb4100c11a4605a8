"""`polytask serve MODEL --update`: redeploy a running app with another version of its model.

Deployments whose work did not change keep their replicas (see `serve/versions.py`): a version
made by `polytask add-task` has the same encoder, so the Encoder replicas are only reconfigured
(new model reference, no weight reload), old heads likewise, and only the new `head_<task>`
deployments start; the Ingress, whose task list changed, is replaced replica by replica.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from ray import serve

from polytask.serve.app import APP_NAME, app_from_config, compose, logging_options
from polytask.serve.args import ServeArgsError, parse_args
from polytask.tracking.places import with_store_env


@dataclass
class UpdateReport:
    """What a redeploy did, per deployment: replicas kept (same actors), started, or removed."""

    model: str
    seconds: float
    kept: list[str]  # deployments whose running replicas all survived the update
    replaced: list[str]  # deployments whose replicas were restarted
    added: list[str]
    removed: list[str]


def replica_actors(app: str = APP_NAME) -> dict[str, list[str]]:
    """{deployment: actor ids of its RUNNING replicas} of a running app (empty if none)."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    deployments = details.get("applications", {}).get(app, {}).get("deployments", {})
    return {
        name: sorted(
            r.get("actor_id") or r["replica_id"]
            for r in d.get("replicas", [])
            if r.get("state") == "RUNNING"
        )
        for name, d in deployments.items()
    }


def update_app(
    model: str,
    config_path: str | Path | None = None,
    cpu_variant: str | None = None,
    log_format: str | None = None,
    access_log: bool | None = None,
) -> UpdateReport:
    """Redeploy the running polytask app (the config's name, else `polytask`) with MODEL and the
    config's args and deployment options; returns once the app is RUNNING again."""
    import ray

    config = app_from_config(config_path, cpu_variant)
    name = config.name
    if not ray.is_initialized():
        # The same job runtime_env as `polytask serve`: Serve copies it into every deployment's
        # actor options, and a different one would restart every replica.
        runtime_env = with_store_env(config.runtime_env)
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), runtime_env=runtime_env)
    if name not in serve.status().applications:
        raise ServeArgsError(
            f"--update: no Serve application '{name}' is running on this Ray cluster; start it "
            f"with `polytask serve MODEL` (drop --update), or set RAY_ADDRESS to its cluster"
        )
    logging = logging_options(config.logging_config, log_format, access_log)
    app = compose(parse_args({**config.args, "model": model}), config.deployments, logging)
    before = replica_actors(name)
    began = time.perf_counter()
    serve.run(app, name=name, route_prefix=config.route_prefix)
    seconds = time.perf_counter() - began
    after = replica_actors(name)
    common = [d for d in before if d in after]
    return UpdateReport(
        model=model,
        seconds=seconds,
        kept=[d for d in common if before[d] and set(before[d]) <= set(after[d])],
        replaced=[d for d in common if not (before[d] and set(before[d]) <= set(after[d]))],
        added=sorted(set(after) - set(before)),
        removed=sorted(set(before) - set(after)),
    )
