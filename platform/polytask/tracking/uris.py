"""Model references, parsed and pinned in one place: `models:/NAME@ALIAS`, `models:/NAME/VERSION`,
`runs:/RUN_ID/NAME`, a bundle directory, or another MLflow URI.

Pinning an alias to the version it names *now* is what makes the registry's download cache,
`polytask compress --register` and every Serve replica agree on one version while the alias moves.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from mlflow import MlflowClient

_ALIAS = re.compile(r"models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)(?P<rest>/.*)?")
_VERSION = re.compile(r"models:/(?P<name>[^/@]+)/(?P<version>[0-9]+)(?P<rest>/.*)?")
_RUN = re.compile(r"runs:/(?P<run_id>[^/]+)/?(?P<rest>.*)")


@dataclass(frozen=True)
class ModelRef:
    """One parsed reference; `rest` is what follows the model (a sub-path, or a run's model name)."""

    uri: str
    kind: Literal["alias", "version", "run", "path", "other"]
    name: str | None = None
    alias: str | None = None
    version: str | None = None
    run_id: str | None = None
    rest: str = ""

    @property
    def registered(self) -> bool:
        """Names a version of a registered model (by alias or number)."""
        return self.kind in ("alias", "version")


class AliasNotFound(LookupError):
    """`models:/NAME@ALIAS` where NAME has no such alias (or does not exist) in the store."""

    def __init__(self, ref: ModelRef, detail: str):
        super().__init__(f"registered model '{ref.name}' has no alias '{ref.alias}' ({detail})")
        self.ref, self.detail = ref, detail


def is_local_path(uri: str) -> bool:
    """A bundle directory rather than a URI (no `scheme:/`)."""
    return "://" not in uri and ":/" not in uri


def parse_model_uri(uri: str) -> ModelRef:
    """Which of the reference forms `uri` is, and its parts."""
    if is_local_path(uri):
        return ModelRef(uri, "path", rest=uri)
    if m := _ALIAS.fullmatch(uri):
        return ModelRef(uri, "alias", name=m["name"], alias=m["alias"], rest=m["rest"] or "")
    if m := _VERSION.fullmatch(uri):
        return ModelRef(uri, "version", name=m["name"], version=m["version"], rest=m["rest"] or "")
    if m := _RUN.fullmatch(uri):
        return ModelRef(uri, "run", run_id=m["run_id"], rest=m["rest"])
    return ModelRef(uri, "other")


def pin_model_uri(uri: str, make_client: Callable[[], MlflowClient]) -> str:
    """`models:/NAME@ALIAS[/sub]` → `models:/NAME/VERSION[/sub]` (the version the alias names now,
    asked of `make_client()`, e.g. `registry.client`, only for an alias); a bundle path →
    absolute; anything else unchanged. Raises AliasNotFound."""
    ref = parse_model_uri(uri)
    if ref.kind == "path":
        return str(Path(uri).expanduser().resolve())
    if ref.kind != "alias":
        return uri
    from mlflow.exceptions import MlflowException

    try:
        version = make_client().get_model_version_by_alias(ref.name, ref.alias).version
    except MlflowException as exc:
        raise AliasNotFound(ref, exc.message.splitlines()[0]) from exc
    return f"models:/{ref.name}/{version}{ref.rest}"
