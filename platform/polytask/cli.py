"""`polytask` command line. Heavy modules (torch, ray, mlflow) are imported inside commands, so
`polytask validate` and `--help` stay fast.

Every user mistake ends the same way: one `error: ...` line on stderr and exit status 1 (usage
mistakes such as an unknown option: click's own message and status 2). The mapping from
exceptions to that line lives in one place, `user_error`.
"""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Annotated

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

import polytask
from polytask.config import ConfigError, load_config
from polytask.tracking.places import Place, describe
from polytask.tracking.registry import CHAMPION, FULL_PRECISION, VARIANT_OF_METHOD

if TYPE_CHECKING:
    from polytask.batch import BatchSpec

TRACEBACK_ENV = "POLYTASK_TRACEBACK"  # set to 1 to see the traceback behind an error line

Method = Enum("Method", {m: m for m in VARIANT_OF_METHOD}, type=str)
Method.__doc__ = "`polytask compress --method`: what to do to the encoder."
_PRUNED, _INT8 = VARIANT_OF_METHOD["prune"], VARIANT_OF_METHOD["int8"]
CpuVariant = Enum(
    "CpuVariant", {v: v for v in (FULL_PRECISION, _INT8, _PRUNED, f"{_PRUNED}+{_INT8}")}, type=str
)
CpuVariant.__doc__ = "`polytask serve --cpu-variant`: the variants `polytask compress` registers."
LogFormat = Enum("LogFormat", {"text": "text", "json": "json"}, type=str)
LogFormat.__doc__ = "`polytask serve --log-format`: Serve's logging_config encoding."


def _raised_in_polytask(tb: TracebackType | None) -> bool:
    """Whether the innermost frame of `tb` is polytask's own code (not a dependency's)."""
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(
        Path(polytask.__file__).resolve().parent
    )


def user_error(exc: BaseException) -> str | None:
    """The one-line message for an error the user caused, or None for a bug (keep its traceback).

    User errors: missing or unreadable files (OSError, wherever raised — also Hugging Face's for
    a wrong encoder name), MLflow's (unknown model, version or alias; an unreachable store), and
    the ValueError / LookupError family polytask raises with a fix in the message (ConfigError,
    DataError, SearchSpaceError, BundleError, ServeArgsError, unknown task, ...). The same
    ValueError or KeyError raised inside a dependency is a bug, so it keeps its traceback.
    """
    joining = ray_join_error(exc)
    if joining is not None:
        return joining
    mlflow_exceptions = sys.modules.get("mlflow.exceptions")  # never imported ⇒ cannot be raised
    if mlflow_exceptions is not None and isinstance(exc, mlflow_exceptions.MlflowException):
        message = exc.message
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            message += "; `polytask registry list` shows what is registered"
        return " ".join(message.split())
    if isinstance(exc, ConfigError):
        return str(exc)  # one line per problem, by design
    if isinstance(exc, OSError) or (
        isinstance(exc, (ValueError, LookupError)) and _raised_in_polytask(exc.__traceback__)
    ):
        text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        return " ".join(str(text).split()) or type(exc).__name__
    return None


RAY_AUTH_FIX = (
    "Ray 2.60 clusters use token authentication: export RAY_AUTH_MODE=token and give this "
    "machine the cluster's token (RAY_AUTH_TOKEN, a file named by RAY_AUTH_TOKEN_PATH, or "
    "~/.ray/auth_token; `ray get-auth-token` on the head node prints it)"
)


def ray_join_error(exc: BaseException) -> str | None:
    """The message for a refused or failed join of an existing Ray cluster (RAY_ADDRESS), which
    Ray reports as AuthenticationError, or after ~20 s of retries as a bare ConnectionError."""
    ray_exceptions = sys.modules.get("ray.exceptions")
    address = os.environ.get("RAY_ADDRESS", "")
    mode = os.environ.get("RAY_AUTH_MODE", "unset")
    if ray_exceptions is not None and isinstance(exc, ray_exceptions.AuthenticationError):
        detail = " ".join(str(exc.message).split())
        where = f" at RAY_ADDRESS={address}" if address else ""
        return f"the Ray cluster{where} refused this process ({detail}; RAY_AUTH_MODE is {mode}); {RAY_AUTH_FIX}"
    if isinstance(exc, ConnectionError) and str(exc).startswith("Failed to connect to Ray cluster"):
        return (
            f"{exc} (RAY_ADDRESS={address or 'unset'}, RAY_AUTH_MODE={mode}): check that the "
            f"cluster is up and the address is its GCS (host:6379 of `ray start --head`); if it "
            f"is, the cluster refused this process's token: {RAY_AUTH_FIX}"
        )
    return None


class _PoliteGroup(TyperGroup):
    """Turns user errors from any command (sub-groups included) into `error: ...` + exit 1."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            message = user_error(exc)
            if message is None or os.environ.get(TRACEBACK_ENV):
                raise
            _fail(message)


app = typer.Typer(
    cls=_PoliteGroup,
    help="Multi-task transformer models on Ray: train, tune, register, serve.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
registry_app = typer.Typer(help="MLflow Model Registry: versions and aliases.", no_args_is_help=True)
app.add_typer(registry_app, name="registry")
console = Console()
errors = Console(stderr=True, soft_wrap=True, highlight=False)

Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key, e.g. --set optim.lr=3e-5 (repeatable)."),
]


def _fail(message: str) -> None:
    errors.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(1)


def _show_version(value: bool) -> None:
    if value:
        console.print(f"polytask {polytask.__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Multi-task transformer models on Ray: train, tune, register, serve."""


@app.command()
def validate(
    experiment: Annotated[Path, typer.Argument(help="Experiment YAML file.")],
    overrides: Overrides = None,
    data: Annotated[bool, typer.Option(help="Also read the data files and check labels.")] = False,
) -> None:
    """Check an experiment file (and optionally its data) without starting Ray."""
    cfg = load_config(experiment, overrides)
    if data:
        from polytask.training.data import load_task_data

        for name, td in load_task_data(cfg, streaming=True).items():
            console.print(f"  {name}: {td.train_rows} train rows, labels {td.spec.labels}")
    if cfg.tune is not None:
        from polytask.training.searchspace import parse_search_space

        parse_search_space(cfg)
    console.print(f"[green]ok[/] {experiment}: {len(cfg.tasks)} task(s): {', '.join(cfg.task_names)}")


@app.command()
def train(
    experiment: Annotated[Path, typer.Argument(help="Experiment YAML file.")],
    overrides: Overrides = None,
    run_name: Annotated[str | None, typer.Option(help="Run name; reuse it to resume.")] = None,
) -> None:
    """Joint multi-task training on Ray Train; logs to MLflow and registers the bundle."""
    cfg = load_config(experiment, overrides)
    from polytask.training.train import run_training

    result = run_training(cfg, run_name=run_name, console=console)
    console.print_json(json.dumps(result.summary()))


@app.command("add-task")
def add_task(
    model: Annotated[
        str, typer.Argument(help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/... or a bundle dir.")
    ],
    experiment: Annotated[Path, typer.Argument(help="Experiment YAML with the new tasks only.")],
    overrides: Overrides = None,
    run_name: Annotated[str | None, typer.Option(help="Run name; reuse it to resume.")] = None,
) -> None:
    """Train new task heads on MODEL's frozen encoder; register MODEL's heads + the new ones as a
    new version (the encoder fingerprint is unchanged, so a running app only adds the heads)."""
    from polytask.training.base import add_task_config
    from polytask.training.train import run_training

    cfg = add_task_config(model, experiment, overrides)
    result = run_training(cfg, run_name=run_name, console=console)
    console.print_json(json.dumps(result.summary()))
    name, version = cfg.tracking.registered_model, result.model_version
    if name is None or version is None:
        return
    new = f"models:/{name}/{version}"
    if CHAMPION not in result.aliases:
        console.print(
            f"{new} stays '{result.aliases[0] if result.aliases else 'candidate'}' "
            f"({result.promotion}).\n  make it the champion: polytask registry promote {name} "
            f"{version}",
            highlight=False,
            soft_wrap=True,
        )
    console.print(
        f"  update a running app (keeps its Encoder replicas): polytask serve {new} --update",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def tune(
    experiment: Annotated[Path, typer.Argument(help="Experiment YAML with a `tune` section.")],
    overrides: Overrides = None,
) -> None:
    """Ray Tune sweep over task weights and hyperparameters; registers the best trial."""
    cfg = load_config(experiment, overrides)
    if cfg.tune is None:
        _fail(f"{experiment}: no `tune` section; add tune.search_space (see jobs/sweep.yaml)")
    from polytask.training.tune import run_sweep

    run_sweep(cfg, console=console)


@registry_app.command("list")
def registry_list(
    name: Annotated[str | None, typer.Argument(help="Registered model name.")] = None,
) -> None:
    """Registered models, or one model's versions with their aliases and objective."""
    from polytask.tracking.registry import list_versions

    rows = list_versions(name)
    table = Table(*rows[0].keys()) if rows else Table("nothing registered")
    for row in rows:
        table.add_row(*[str(v) for v in row.values()])
    console.print(table)


@registry_app.command("promote")
def registry_promote(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="Version number to move the alias to.")],
    alias: Annotated[str, typer.Option(help="Alias to set.")] = CHAMPION,
) -> None:
    """Point an alias (default `champion`) at a version."""
    from polytask.tracking.registry import promote, tracking_uri

    promote(name, version, alias)
    console.print(f"models:/{name}@{alias} → version {version} (in {tracking_uri()})", highlight=False)


@registry_app.command("show")
def registry_show(
    uri: Annotated[str, typer.Argument(help="models:/NAME@ALIAS, models:/NAME/VERSION or a path.")],
) -> None:
    """Where a model URI resolves to, and its tasks."""
    from polytask.model.manifest import read_manifest
    from polytask.tracking.registry import resolve_bundle

    path = resolve_bundle(uri)
    manifest = read_manifest(path)
    console.print_json(json.dumps({"uri": uri, "bundle": str(path), **manifest.to_dict()}))


@app.command()
def serve(
    model: Annotated[str, typer.Argument(help="models:/NAME@ALIAS, runs:/ID/model or bundle dir.")],
    config: Annotated[
        Path | None, typer.Option(help="Serve config YAML (e.g. serve_configs/local.yaml).")
    ] = None,
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    cpu_variant: Annotated[
        CpuVariant | None,
        typer.Option(help="On a CPU encoder, serve this compressed variant of MODEL."),
    ] = None,
    update: Annotated[
        bool,
        typer.Option(
            help="Redeploy the app already running on this Ray cluster with MODEL and return; "
            "deployments whose weights did not change (e.g. the Encoder after add-task) keep "
            "their replicas."
        ),
    ] = False,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            help="Prometheus metrics port of the Ray this command starts (a joined cluster keeps "
            "its own); the URL to scrape is printed."
        ),
    ] = None,
    log_format: Annotated[
        LogFormat | None,
        typer.Option(help="Serve log encoding (default: the config's logging_config, else text)."),
    ] = None,
    access_log: Annotated[
        bool | None,
        typer.Option(
            "--access-log/--no-access-log",
            help="One log line per request (off by default: it costs CPU on the hot path).",
        ),
    ] = None,
    levers: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated Ray Serve levers set before Ray starts, e.g. same_loop,haproxy, "
            "or 'none' (default: the config's args.levers, else polytask's defaults; "
            "docs/serving.md, Throughput levers)."
        ),
    ] = None,
) -> None:
    """Serve a model with Ray Serve: encoder and head deployments behind one HTTP API."""
    from polytask.serve import run_server

    variant = cpu_variant.value if cpu_variant else None
    fmt = log_format.value if log_format else None
    if update:
        from polytask.serve.update import update_app

        report = update_app(
            model, config_path=config, cpu_variant=variant, log_format=fmt, access_log=access_log
        )
        console.print(
            f"updated to {report.model} in {report.seconds:.1f} s; kept replicas: "
            f"{', '.join(report.kept) or '-'}; restarted: {', '.join(report.replaced) or '-'}; "
            f"added: {', '.join(report.added) or '-'}; removed: {', '.join(report.removed) or '-'}",
            highlight=False,
            soft_wrap=True,
        )
        return
    run_server(
        model,
        config_path=config,
        host=host,
        port=port,
        console=console,
        cpu_variant=variant,
        metrics_port=metrics_port,
        log_format=fmt,
        access_log=access_log,
        levers=None if levers is None else [x for x in levers.split(",") if x.strip() not in ("", "none")],
    )


@app.command()
def predict(
    model: Annotated[str, typer.Argument(help="models:/NAME@ALIAS, runs:/ID/model or bundle dir.")],
    texts: Annotated[list[str] | None, typer.Argument(help="Input texts (or use --input).")] = None,
    text_pair: Annotated[
        list[str] | None,
        typer.Option(help="Second text of a pair, one per TEXT in order (pair tasks); repeatable."),
    ] = None,
    task: Annotated[list[str] | None, typer.Option(help="Tasks to run (default: all); repeatable.")] = None,
    tasks: Annotated[str | None, typer.Option(help="Comma-separated tasks, e.g. sentiment,ner.")] = None,
    input_path: Annotated[
        str | None, typer.Option("--input", help="JSONL/CSV/TSV/Parquet file, folder or URI to score on Ray Data.")
    ] = None,
    output: Annotated[str | None, typer.Option(help="With --input: output .jsonl or .parquet file.")] = None,
    text_field: Annotated[str, typer.Option(help="With --input: the column holding the text.")] = "text",
    text_pair_field: Annotated[
        str | None, typer.Option(help="With --input: the column holding the second text of a pair.")
    ] = None,
    input_format: Annotated[str | None, typer.Option(help="jsonl, csv, tsv or parquet (default: from the suffix).")] = None,
    workers: Annotated[int, typer.Option(help="With --input: scoring actors (one CPU each).")] = 2,
    batch_size: Annotated[int, typer.Option(help="With --input: rows per Ray Data batch.")] = 256,
    errors_file: Annotated[
        str | None, typer.Option("--errors", help="With --input: bad-row file (default OUTPUT.errors.jsonl).")
    ] = None,
) -> None:
    """Predict in-process on TEXTs and print JSON, or score a whole file with --input on Ray Data."""
    chosen = [t.strip() for t in (tasks or "").split(",") if t.strip()] + list(task or [])
    if input_path is not None:
        _predict_file(model, input_path, output, chosen or None, text_field, text_pair_field,
                      input_format, workers, batch_size, errors_file)
        return
    if not texts:
        _fail("give TEXT arguments, or --input FILE --output FILE to score a file")
    if text_pair and len(text_pair) != len(texts):
        _fail(
            f"{len(texts)} TEXT(s) but {len(text_pair)} --text-pair: give one --text-pair per TEXT, "
            "in the same order"
        )
    from polytask.model.inference import Predictor
    from polytask.tracking.registry import resolve_bundle

    inputs: list[str | dict[str, str]] = (
        [{"text": a, "text_pair": b} for a, b in zip(texts, text_pair)] if text_pair else list(texts)
    )
    predictor = Predictor.from_bundle(str(resolve_bundle(model)))
    console.print_json(json.dumps(predictor.predict(inputs, chosen or None)))


def _predict_file(
    model: str, input_path: str, output: str | None, tasks: list[str] | None, text_field: str,
    text_pair_field: str | None, input_format: str | None, workers: int, batch_size: int,
    errors_file: str | None,
) -> None:
    """`polytask predict --input`: Ray Data batch inference with a progress line and a summary."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from polytask.batch import BatchSpec, run_batch

    if output is None:
        _fail("--input needs --output (a .jsonl or .parquet file)")
    spec = BatchSpec(
        model=model, input=input_path, output=output, tasks=tasks, text_field=text_field,
        text_pair_field=text_pair_field, input_format=input_format, workers=workers,
        batch_size=batch_size, errors=errors_file,
    )
    errors.print(f"[bold]state[/] of this batch job\n{escape(describe(_batch_places(spec)))}")
    columns = [TextColumn("scoring"), BarColumn(), TextColumn("{task.completed:,} rows"),
               TextColumn("{task.fields[rate]:.1f} rows/s"), TimeRemainingColumn()]
    with Progress(*columns, console=errors, transient=False) as bar:  # stdout: the summary
        job = bar.add_task("score", total=None, rate=0.0)

        def progress(done: int, total: int | None, rate: float) -> None:
            bar.update(job, completed=done, total=total, rate=rate)

        summary = run_batch(spec, progress)
    console.print_json(json.dumps(summary.to_dict()))


def _batch_places(spec: BatchSpec) -> list[Place]:
    """Where `predict --input` reads its model from and writes its files, refused inside a Ray
    job's temporary working_dir copy (the files would be deleted with it)."""
    from polytask.tracking.places import check_paths, output_place, refuse_scratch
    from polytask.tracking.registry import tracking_uri
    from polytask.tracking.uris import parse_model_uri

    def shown(path: str) -> str:
        return path if "://" in path else str(Path(path).expanduser().resolve())

    places = [] if parse_model_uri(spec.model).kind == "path" else check_paths(tracking_uri())
    places += [
        output_place("output", shown(spec.output), "--output"),
        output_place("bad rows", shown(spec.errors_path), "--errors or --output"),
    ]
    refuse_scratch(places)
    return places


@app.command()
def compress(
    model: Annotated[str, typer.Argument(help="models:/NAME@ALIAS, models:/NAME/VERSION or bundle dir.")],
    method: Annotated[Method, typer.Option(help="int8 (dynamic quantization) or prune (structured).")],
    sparsity: Annotated[
        float, typer.Option(min=0.0, max=0.95, help="prune: fraction of encoder-layer weights to remove.")
    ] = 0.3,
    eval_experiment: Annotated[
        Path | None, typer.Option("--eval", help="Experiment YAML whose validation splits score both.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output bundle dir.")] = None,
    register: Annotated[bool, typer.Option(help="Register as a new version of the source model.")] = True,
    finetune_steps: Annotated[int, typer.Option(help="prune: recovery fine-tune steps (needs --eval).")] = 0,
    decoder_int8: Annotated[
        bool, typer.Option(help="int8: quantize generation decoders' linear layers too (CPU only).")
    ] = False,
) -> None:
    """Compress a model's encoder for CPU serving; the result is a new bundle / model version."""
    from polytask.compression.compress import run_compress

    summary = run_compress(
        model, method.value, sparsity, eval_experiment, out, register, console,
        finetune_steps=finetune_steps, decoder_int8=decoder_int8,
    )
    console.print_json(json.dumps(summary, default=str))


@app.command()
def quickstart(
    workdir: Annotated[Path, typer.Option(help="Where demo data and state go.")] = Path(
        ".polytask/quickstart"
    ),
    fast: Annotated[bool, typer.Option(help="Tiny random encoder, few steps (for tests).")] = False,
    keep_serving: Annotated[bool, typer.Option(help="Keep the endpoint up until Ctrl-C.")] = False,
    port: Annotated[int, typer.Option(help="HTTP port for the demo endpoint.")] = 8000,
    metrics_port: Annotated[
        int | None,
        typer.Option(help="Prometheus metrics port of the local Ray; the URL is printed."),
    ] = None,
) -> None:
    """Train → register → serve → ask, end to end on this machine, offline."""
    from polytask.quickstart import run_quickstart

    run_quickstart(
        workdir,
        fast=fast,
        keep_serving=keep_serving,
        port=port,
        console=console,
        metrics_port=metrics_port,
    )


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
