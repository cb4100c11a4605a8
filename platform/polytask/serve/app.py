"""Application builder (`polytask.serve:build_app`, `compose`) and Serve config reading; running
a server is `serve.server`.

The builder pins the model reference (an alias becomes one version), reads the bundle manifest
for the task list, and binds Encoder → Head per task → Ingress. Replicas get the pinned reference,
not a local path, and resolve it on their own node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.serve import Application

from polytask.model.manifest import Manifest
from polytask.serve.args import ServeArgs, ServeArgsError, parse_args
from polytask.serve.levers import LeverError, require_levers
from polytask.serve.refs import local_bundle, served_ref
from polytask.serve.versions import encoder_version, head_version

APP_NAME = "polytask"
# Replacement replicas of cheap CPU deployments start before the old ones stop (no gap in a
# rolling update); the Encoder keeps Serve's default because a surge there needs a spare GPU.
CPU_SURGE = {"max_surge_percent": 100}
# The CPUs Ray reserves for an Ingress or head replica (the Encoder takes 1): a reservation, not a
# limit, kept small so the Encoder, the Ingress, a head per task and a surge replica fit the 2 CPUs
# a 2-core machine's Ray offers (at 0.5 and 0.25 a model with two tasks took all of them).
LIGHT_CPUS = 0.1
# Measured defaults (docs/serving.md, "Throughput levers"): no per-request access log line on the hot path
# (errors are still logged), and room for the requests an Ingress gathers into one batch.
# A Serve config's application-level `logging_config` (or `polytask serve --log-format json
# --access-log`) replaces these keys; see `logging_options`.
DEFAULT_LOGGING = {"enable_access_log": False}
MAX_ONGOING = {"Ingress": 256, "Encoder": 64, "head": 64, "generation": 128}
# With `max_queued_requests` set on the Ingress, what the proxy answers a request it sheds: 503
# with a Retry-After, so a client backs off instead of timing out (docs/serving.md, Overload).
SHED = {"status_code": 503, "retry_after_s": 1}
# Serve's defaults (probe every 10 s, 30 s to answer) leave a broken replica in service for up to
# 40 s; `check_health` is cheap (no model call), so probe more often and give it less time.
HEALTH_CHECK = {"health_check_period_s": 2.0, "health_check_timeout_s": 10.0}


def build_app(args: dict[str, Any]) -> Application:
    """`serve run polytask.serve:build_app model=...` and `import_path` of serve configs. The
    deployments get no logging_config in code, so the config's application-level
    `logging_config` (Serve applies it to deployments that set none) decides. Runs on the
    cluster, so a lever the args name but the cluster's env lacks is refused here."""
    parsed = parse_args(args)
    try:
        require_levers(parsed.levers or (), "the Ray cluster (the process building the app)")
    except LeverError as exc:
        raise ServeArgsError(str(exc)) from None
    return compose(parsed, logging_config=None)


def logging_options(
    config: dict[str, Any] | None = None,
    log_format: str | None = None,
    access_log: bool | None = None,
) -> dict[str, Any]:
    """Serve's LoggingConfig: polytask's defaults, then a config file's application-level
    `logging_config`, then the command-line switches."""
    out = {**DEFAULT_LOGGING, **(config or {})}
    if log_format is not None:
        out["encoding"] = log_format.upper()
    if access_log is not None:
        out["enable_access_log"] = access_log
    return out


def compose(
    args: ServeArgs | dict[str, Any],
    deployment_options: dict[str, dict[str, Any]] | None = None,
    logging_config: dict[str, Any] | None = DEFAULT_LOGGING,
) -> Application:
    """The bound application; `deployment_options` ({deployment name: Serve options}) are applied
    last, the way a config's `deployments:` list overrides options set in code.
    `logging_config` goes on every deployment (None: left to the application's)."""
    served = _served(parse_args(args), logging_config)
    tasks = _served_tasks(served)
    separate, colocated = _placements(served, tasks)
    overrides = _overrides(deployment_options, separate, colocated)
    encoder = _encoder(served, overrides["Encoder"], colocated)
    heads: dict[str, Application | None] = dict.fromkeys(tasks)
    heads.update({task: _head(served, task, overrides[f"head_{task}"]) for task in separate})
    return _ingress(served, encoder, heads, overrides["Ingress"])


@dataclass
class _Served:
    """What every builder reads: the args as validated, the pinned model reference, its local
    bundle and manifest (read once, here), and the options every deployment shares."""

    args: ServeArgs
    ref: str
    bundle: Path
    manifest: Manifest
    common: dict[str, Any]


def _served(args: ServeArgs, logging_config: dict[str, Any] | None) -> _Served:
    from polytask.model.manifest import BundleError, read_manifest

    ref = served_ref(args)
    try:
        bundle = local_bundle(ref)
        manifest = read_manifest(bundle)
    except (FileNotFoundError, BundleError) as exc:
        raise ServeArgsError(f"model: {exc}") from exc
    # request_timeout_s: every replica's check_health counts a call running twice as long as stuck
    user_config = {"model": ref, "request_timeout_s": args.request_timeout_s}
    common: dict[str, Any] = {"user_config": user_config}
    if logging_config is not None:
        common["logging_config"] = dict(logging_config)
    return _Served(args, ref, bundle, manifest, common)


def _served_tasks(served: _Served) -> list[str]:
    """`args.tasks` (each must be in the model), else every task of the model."""
    known = [s.name for s in served.manifest.tasks]
    tasks = list(dict.fromkeys(served.args.tasks)) if served.args.tasks else known
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ServeArgsError(
            f"tasks: {', '.join(unknown)} not in model {served.ref}; it has: {', '.join(known)}"
        )
    return tasks


def _placements(served: _Served, tasks: list[str]) -> tuple[list[str], tuple[str, ...]]:
    """(tasks with their own head deployment, tasks whose head runs in the Encoder); a
    generation head always has its own (a Decoder)."""
    unknown = sorted(set(served.args.head_placement) - set(tasks))
    if unknown:
        raise ServeArgsError(
            f"head_placement: {', '.join(unknown)} not served; served tasks: {', '.join(tasks)}"
        )
    decoders = {s.name for s in served.manifest.tasks if s.is_generation}
    named = sorted(t for t in decoders if served.args.head_placement.get(t) == "with_encoder")
    if named:
        raise ServeArgsError(
            f"head_placement: {', '.join(named)} is a generation task; its head decodes token by "
            "token in its own Decoder deployment, so it can only be placed separate"
        )
    separate = [t for t in tasks if t in decoders or served.args.placement(t) == "separate"]
    return separate, tuple(t for t in tasks if t not in separate)


def _overrides(
    deployment_options: dict[str, dict[str, Any]] | None,
    tasks: list[str],
    colocated: tuple[str, ...] = (),
) -> dict[str, dict[str, Any]]:
    """Options per deployment name (`Ingress`, `Encoder`, `head_<task>`); an unknown name is
    refused, since Serve would silently ignore it."""
    given = deployment_options or {}
    names = ["Ingress", "Encoder", *(f"head_{t}" for t in tasks)]
    inside = sorted(set(given) & {f"head_{t}" for t in colocated})
    if inside:
        raise ServeArgsError(
            f"deployments: {', '.join(inside)} runs inside the Encoder (placement with_encoder), "
            "so it has no deployment options; remove the entry, or place the task separate"
        )
    extra = sorted(set(given) - set(names))
    if extra:
        raise ServeArgsError(
            f"deployments: {', '.join(extra)} is not a deployment of this app; names are: "
            f"{', '.join(names)}"
        )
    return {name: dict(given.get(name, {})) for name in names}


def _encoder(
    served: _Served, override: dict[str, Any], colocated: tuple[str, ...] = ()
) -> Application:
    """The Encoder, versioned by its weights and settings, not the model version: redeploying a
    model that only gained heads reconfigures the running replicas instead of restarting them.
    `colocated` heads run inside it (their weights follow the model in `reconfigure`)."""
    from polytask.serve.encoder import Encoder

    args = served.args
    defaults = {
        **served.common,
        "ray_actor_options": {"num_cpus": 1, "num_gpus": 1 if args.device == "cuda" else 0},
        "max_ongoing_requests": MAX_ONGOING["Encoder"],
        **HEALTH_CHECK,
    }
    settings = (
        args.device, args.max_batch_size, args.batch_wait_timeout_s, args.pass_overhead_tokens
    )
    version = encoder_version(served.manifest, *settings, heads=colocated)
    return (
        Encoder.options(**_merge(defaults, override))
        .options(version=version, _internal=True)
        .bind(served.ref, *settings, heads=colocated)
    )


def _head(served: _Served, task: str, override: dict[str, Any]) -> Application:
    """`head_<task>`: code defaults, then `args.head_options` (every head), then, for a generation
    task, `args.generation_head_options`, then its override. A generation head is a `Decoder`:
    it holds streams open and gathers calls into decodes, so it takes more requests at once, and
    decodes on cuda when its options give it a GPU."""
    spec = next(s for s in served.manifest.tasks if s.name == task)
    generation = spec.is_generation
    if generation:
        _check_positions(served, task)
    defaults = {
        **served.common,
        "name": f"head_{task}",
        "ray_actor_options": {"num_cpus": LIGHT_CPUS},
        "max_ongoing_requests": MAX_ONGOING["generation" if generation else "head"],
        **HEALTH_CHECK,
        **CPU_SURGE,
    }
    options = _merge(defaults, served.args.head_options.as_options())
    if generation:
        from polytask.serve.decoder import Decoder as deployment

        options = _merge(options, served.args.generation_head_options.as_options())
    else:
        from polytask.serve.head import Head as deployment
    options = _merge(options, override)
    gpus = (options.get("ray_actor_options") or {}).get("num_gpus") or 0
    decoding = served.args.generation_head_options.decoding()
    init = (served.args.decode_wait_s, decoding) if generation else ()
    return (
        deployment.options(**options)
        .options(version=head_version(served.bundle, task), _internal=True)
        .bind(served.ref, task, "cuda" if gpus > 0 else "cpu", *init)
    )


def _check_positions(served: _Served, task: str) -> None:
    """The serve arg `max_new_tokens` must fit the task's decoder position table."""
    from polytask.model.positions import bundle_position_limit

    most = served.args.max_new_tokens
    limit = bundle_position_limit(served.bundle, task) if most else None
    if most and limit is not None and most > limit:
        raise ServeArgsError(
            f"max_new_tokens: {most} is over the {limit} new tokens task '{task}'s decoder has "
            f"positions for; set it to at most {limit}"
        )


def _ingress(
    served: _Served,
    encoder: Application,
    heads: dict[str, Application | None],
    override: dict[str, Any],
) -> Application:
    """The Ingress gets the args as validated and the manifest as read: no copies to keep in step."""
    from polytask.serve.ingress import Ingress

    defaults = {
        **served.common,
        "ray_actor_options": {"num_cpus": LIGHT_CPUS},
        "max_ongoing_requests": MAX_ONGOING["Ingress"],
        "backpressure_config": SHED,
        **HEALTH_CHECK,
        **CPU_SURGE,
    }
    return Ingress.options(**_merge(defaults, override)).bind(
        encoder, heads, served.args, served.ref, served.manifest
    )


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Options override: a given key replaces the default, as in a Serve config."""
    out = dict(base)
    out.update(override)
    if out.get("num_replicas") is not None and "autoscaling_config" in override:
        out.pop("num_replicas")
    if out.get("autoscaling_config") is not None and "num_replicas" in override:
        out.pop("autoscaling_config")
    return out


def load_serve_config(path: str | Path) -> Any:
    """A Serve config file (`serve deploy` format) validated by Ray's own schema."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(Path(path).read_text())
    try:
        return ServeDeploySchema.model_validate(raw)
    except Exception as exc:
        raise ServeArgsError(f"{path}: not a valid Serve config: {exc}") from exc


def _polytask_app(config: Any, path: str | Path) -> Any:
    apps = [
        a
        for a in config.applications
        if a.import_path.replace(":", ".") == "polytask.serve.build_app"
    ]
    if len(apps) != 1:
        raise ServeArgsError(
            f"{path}: expected exactly one application with import_path polytask.serve:build_app, "
            f"found {len(apps)}"
        )
    return apps[0]


@dataclass
class ConfiguredApp:
    """What a Serve config file says about the polytask application (the defaults without one):
    `polytask serve` and `serve --update` read configs the same way."""

    args: dict[str, Any] = field(default_factory=dict)
    deployments: dict[str, dict[str, Any]] = field(default_factory=dict)  # name → Serve options
    name: str = APP_NAME
    route_prefix: str = "/"
    runtime_env: dict[str, Any] | None = None
    logging_config: dict[str, Any] = field(default_factory=dict)


def app_from_config(
    config_path: str | Path | None, cpu_variant: str | None = None
) -> ConfiguredApp:
    """The application a Serve config file describes; a given `cpu_variant` replaces its own."""
    out = ConfiguredApp()
    if config_path is not None:
        app_cfg = _polytask_app(load_serve_config(config_path), config_path)
        out = ConfiguredApp(
            args=dict(app_cfg.args),
            deployments={
                d.name: d.model_dump(exclude_unset=True, exclude={"name"})
                for d in app_cfg.deployments
            },
            name=app_cfg.name,
            route_prefix=app_cfg.route_prefix or "/",
            runtime_env=app_cfg.runtime_env or None,
        )
        if app_cfg.logging_config is not None:
            out.logging_config = app_cfg.logging_config.model_dump(exclude_unset=True)
    if cpu_variant is not None:
        out.args["cpu_variant"] = cpu_variant
    return out
