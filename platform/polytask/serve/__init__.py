"""Ray Serve: the shared encoder and each task head as separately scaled deployments behind HTTP.

serve run polytask.serve:build_app model=models:/polytask-demo@champion
serve deploy serve_configs/cluster.yaml
polytask serve MODEL --config serve_configs/local.yaml
"""

from polytask.serve.app import build_app, compose, load_serve_config
from polytask.serve.args import ServeArgs, ServeArgsError, parse_args
from polytask.serve.server import run_server

__all__ = [
    "ServeArgs",
    "ServeArgsError",
    "build_app",
    "compose",
    "load_serve_config",
    "parse_args",
    "run_server",
]
