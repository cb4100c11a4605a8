"""Running a polytask server (`polytask serve`, `run_server`): the Serve levers' env, Ray,
Serve's HTTP proxy, the app `serve.app` builds, the banner, and Ctrl-C/SIGTERM to stop.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import ray
from ray import serve

from polytask.serve.app import app_from_config, compose, logging_options
from polytask.serve.args import ServeArgsError, parse_args
from polytask.serve.levers import DEFAULT_LEVERS, LeverError, apply_levers
from polytask.tracking.places import with_store_env


def start_ray(metrics_port: int | None, say: Any, **init: Any) -> None:
    """`ray.init` for the serving commands: a Ray started here exports Prometheus metrics on
    `metrics_port`; a cluster joined (RAY_ADDRESS, or one already running on this machine) keeps
    its own port, which is said."""
    if not ray.is_initialized():
        if metrics_port is not None:
            init["_metrics_export_port"] = metrics_port
        ray.init(**init)
    if metrics_port is None:
        return
    node = ray.get_runtime_context().get_node_id()
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["NodeID"] == node)
    if port == metrics_port:
        say(f"Prometheus metrics: http://127.0.0.1:{port}/metrics")
    else:
        say(
            f"joined a running Ray cluster: --metrics-port {metrics_port} does not apply; this "
            f"node's metrics port is the cluster's ({port}): http://127.0.0.1:{port}/metrics"
        )


def run_server(
    model: str,
    config_path: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    console: Any = None,
    blocking: bool = True,
    cpu_variant: str | None = None,
    metrics_port: int | None = None,
    log_format: str | None = None,
    access_log: bool | None = None,
    levers: list[str] | None = None,
) -> str:
    """Start Serve on host:port and deploy MODEL with the config's args and deployment options;
    a given `cpu_variant` replaces the config's, `log_format`/`access_log` its logging_config,
    `levers` its `args.levers`.

    Returns the base URL; with `blocking`, serves until Ctrl-C and then shuts Serve down.
    """
    def say(line: str) -> None:
        if console is None:
            print(line, flush=True)
        else:
            console.print(line, soft_wrap=True, markup=False, highlight=False)

    config = app_from_config(config_path, cpu_variant)
    logging = logging_options(config.logging_config, log_format, access_log)
    if levers is not None:
        config.args["levers"] = [x.strip() for x in levers]
    parsed = parse_args({**config.args, "model": model})
    if not ray.is_initialized():
        _set_levers(parsed.levers, say)
    app = compose(parsed, config.deployments, logging)
    # Replicas resolve MODEL in this command's store, also on a cluster started elsewhere.
    start_ray(metrics_port, say, runtime_env=with_store_env(config.runtime_env))
    serve.start(http_options={"host": host, "port": port}, logging_config=logging)
    prefix = config.route_prefix
    served = serve.run(app, name=config.name, route_prefix=prefix).model_info.remote().result()
    url = f"http://{host}:{port}{prefix.rstrip('/')}"
    auth = f' -H "Authorization: Bearer ${parsed.api_key_env}"' if parsed.api_key_env else ""
    target = parsed.model if served["ref"] == parsed.model else f"{parsed.model} → {served['ref']}"
    say(f"polytask is serving {target} ({served['variant']}) at {url}  (API docs: {url}/docs)")
    say(
        f"  curl -s {url}/v1/predict -H 'Content-Type: application/json'{auth} "
        """-d '{"inputs": ["the movie was great"]}'"""
    )
    if host not in ("127.0.0.1", "localhost", "::1") and not parsed.api_key_env:
        say(
            f"warning: listening on {host} without api_key_env: anyone who can reach it can call it"
        )
    if blocking:
        say("Ctrl-C to stop.")
        _stop_on_sigterm()
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            say("shutting down")
        finally:
            serve.shutdown()
    return url


def _set_levers(levers: list[str] | None, say: Any) -> None:
    """The levers' env in this process before it starts or joins Ray (a Ray started here passes
    it to every Serve process; a joined cluster keeps its own, and an Ingress replica refuses to
    start without the levers `levers` names); unset `levers` means polytask's defaults."""
    try:
        env = apply_levers(DEFAULT_LEVERS if levers is None else levers)
    except LeverError as exc:
        raise ServeArgsError(str(exc)) from None
    if env:
        say("Serve levers: " + " ".join(f"{k}={v}" for k, v in env.items()))


def _stop_on_sigterm() -> None:
    """`docker stop`/`kill` shut Serve down like Ctrl-C does (main thread only)."""
    import signal
    import threading

    def interrupt(*_: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)
