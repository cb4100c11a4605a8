"""Model references for serving: pin an alias to one version, turn a reference into a local bundle."""

from __future__ import annotations

import re
from pathlib import Path

from polytask.serve.schemas import ServeArgsError

_ALIAS = re.compile(r"models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)")


def pin_model_uri(uri: str) -> str:
    """`models:/NAME@ALIAS` → `models:/NAME/VERSION`; bundle paths → absolute; others unchanged.

    Pinning once in the builder makes every replica (and every later autoscaled one) load the
    same version even if the alias moves; a moved alias takes effect on the next deploy.
    """
    match = _ALIAS.fullmatch(uri)
    if match:
        from mlflow.exceptions import MlflowException

        from polytask.registry import client

        name, alias = match["name"], match["alias"]
        try:
            version = client().get_model_version_by_alias(name, alias).version
        except MlflowException as exc:
            raise ServeArgsError(
                f"model '{uri}': registered model '{name}' has no alias '{alias}' in this MLflow "
                f"store ({exc.message.splitlines()[0]}); set it with `polytask registry promote` "
                "or pass models:/NAME/VERSION"
            ) from exc
        return f"models:/{name}/{version}"
    if "://" not in uri and ":/" not in uri:
        return str(Path(uri).expanduser().resolve())
    return uri


def local_bundle(ref: str) -> Path:
    """The bundle directory for a reference, downloaded on this node when it is a registry URI."""
    from polytask.registry import resolve_bundle

    return resolve_bundle(ref)
