"""Model references for serving: pin an alias to one version, turn a reference into a local bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from polytask.serve.args import ServeArgs, ServeArgsError
from polytask.tracking.uris import parse_model_uri


def served_ref(args: ServeArgs) -> str:
    """The one model reference every replica loads: `model` pinned to a version, swapped for its
    `cpu_variant` when the encoder runs on CPU (a GPU encoder keeps full precision)."""
    ref = pin_model_uri(args.model)
    if args.cpu_variant is None or args.device != "cpu":
        return ref
    match = parse_model_uri(ref)
    if match.kind != "version" or match.rest:
        raise ServeArgsError(
            f"cpu_variant: '{args.cpu_variant}' is looked up in the Model Registry, but model "
            f"'{args.model}' is not a registered model; pass models:/NAME@ALIAS, or point model "
            "at the compressed bundle and drop cpu_variant"
        )
    from polytask.tracking.registry import find_variant

    try:
        version = find_variant(match.name, match.version, args.cpu_variant)
    except LookupError as exc:
        raise ServeArgsError(f"cpu_variant: {exc}, or remove cpu_variant") from exc
    return f"models:/{match.name}/{version}"


def pin_model_uri(uri: str) -> str:
    """`models:/NAME@ALIAS` → `models:/NAME/VERSION`; bundle paths → absolute; others unchanged.

    Pinning once in the builder makes every replica (and every later autoscaled one) load the
    same version even if the alias moves; a moved alias takes effect on the next deploy.
    """
    from polytask.tracking import uris
    from polytask.tracking.registry import client

    try:
        return uris.pin_model_uri(uri, client)
    except uris.AliasNotFound as exc:
        raise ServeArgsError(
            f"model '{uri}': registered model '{exc.ref.name}' has no alias '{exc.ref.alias}' in "
            f"this MLflow store ({exc.detail}); set it with `polytask registry promote` "
            "or pass models:/NAME/VERSION"
        ) from exc


def local_bundle(ref: str) -> Path:
    """The bundle directory for a reference, downloaded on this node when it is a registry URI."""
    from polytask.tracking.registry import resolve_bundle

    return resolve_bundle(ref)


def model_from_config(config: dict[str, Any] | None) -> str | None:
    """The model reference a deployment's `user_config` (`{model: URI}`) names, or None."""
    model = (config or {}).get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise ValueError("user_config.model must be a model URI or bundle path string")
    return model
