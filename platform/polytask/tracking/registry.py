"""MLflow tracking and Model Registry: where runs go, bundles as model versions, aliases, and
turning a model URI back into a local bundle directory."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from polytask.config import default_home
from polytask.tracking.integrity import (
    bundle_digest,
    bundle_in,
    cache_lock,
    mark_verified,
    node_verified,
    registry_digest,
)
from polytask.tracking.lock import PromotionLockTimeout, is_lock_name, promotion_lock
from polytask.tracking.tags import (
    BASE_VERSION_TAG,
    BUNDLE_DIGEST_TAG,
    OBJECTIVE_DEF_TAG,
    OBJECTIVE_TAG,
    PROMOTION_TAG,
    SOURCE_VERSION_TAG,  # noqa: F401 - tests read it from here
    TASKS_TAG,
    VARIANT_TAG,
)
from polytask.tracking.uris import AliasNotFound, is_local_path, parse_model_uri, pin_model_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from polytask.config import ExperimentConfig

log = logging.getLogger(__name__)

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
MODEL_NAME = "model"  # the logged model's name inside its run
CANDIDATE, CHAMPION = "candidate", "champion"
CACHE_DIGEST_FILE = ".polytask-digest.json"  # in each downloaded model: its uri and store
FULL_PRECISION = "fp32"
VARIANT_OF_METHOD = {"int8": "int8", "prune": "pruned"}  # a variant is these joined by '+'
# Pinned from what is installed, so logging never spawns MLflow's slow requirement inference.
_REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "numpy", "pandas")


def tracking_uri(cfg: ExperimentConfig | None = None) -> str:
    """cfg.tracking.tracking_uri, else $MLFLOW_TRACKING_URI, else SQLite in the polytask home."""
    if cfg is not None and cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{default_home() / 'mlflow.db'}"


def client(uri: str | None = None) -> MlflowClient:
    """A client bound to one store for both tracking and registry (no global MLflow state)."""
    from mlflow import MlflowClient

    uri = uri or tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def artifact_location(uri: str) -> str | None:
    """For SQLite stores, artifacts beside the db (MLflow would use ./mlruns of the cwd)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///"))
    return (db.parent / "mlartifacts").resolve().as_uri()


def ui_command(uri: str) -> str:
    """The command that shows this store in the MLflow UI."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


def ensure_experiment(mlflow_client: MlflowClient, name: str, uri: str) -> str:
    """The experiment's id, creating it (artifacts beside a SQLite db) on first use."""
    from mlflow.exceptions import MlflowException

    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return mlflow_client.create_experiment(name, artifact_location=artifact_location(uri))
    except MlflowException:  # created concurrently (e.g. by another trial)
        found = mlflow_client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


@contextmanager
def use_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (log_model, pyfunc.load_model) at `uri` for one block, then put
    back the global and $MLFLOW_TRACKING_URI, so later callers in this process are unaffected."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    saved_global, saved_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_global)
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def _pin(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{package}=={version(package)}"
    except PackageNotFoundError:
        return package


def log_bundle(bundle_dir: str | Path, run_id: str, uri: str | None = None) -> str:
    """Log a bundle as a models-from-code pyfunc in `run_id`; returns its `models:/m-…` URI.

    The model is code (pyfunc_model.py + the polytask sources) plus the bundle as an artifact,
    so nothing is pickled and the model loads without this repository installed.
    """
    import warnings

    import mlflow

    uri = uri or tracking_uri()
    digest = bundle_digest(Path(bundle_dir))
    with use_tracking_uri(uri), mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=str(PYFUNC_FILE),
            artifacts={"bundle": str(Path(bundle_dir).resolve())},
            code_paths=[str(PYFUNC_FILE.parent)],
            pip_requirements=[_pin(p) for p in _REQUIREMENTS],
            signature=_signature(),
            tags={BUNDLE_DIGEST_TAG: digest},
        )
    return info.model_uri


def _signature() -> Any:
    """Only a params schema (`tasks`: which heads to run); inputs stay free-form."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec

    return ModelSignature(params=ParamSchema([ParamSpec("tasks", "string", [], (-1,))]))


def register_bundle(
    bundle_dir: str | Path,
    name: str,
    run_id: str,
    objective: float,
    promote: str = "if_better",
    model_uri: str | None = None,
    uri: str | None = None,
    extra_tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Log (unless `model_uri` is given) and register a bundle; alias it `candidate`, and
    `champion` as `settle_champion` decides. `promotion` in the result says why; `extra_tags`
    go on the version with the standard ones."""
    from mlflow.exceptions import MlflowException

    from polytask.model.manifest import read_manifest

    uri = uri or tracking_uri()
    specs = read_manifest(bundle_dir).tasks
    model_uri = model_uri or log_bundle(bundle_dir, run_id, uri)
    c = client(uri)
    try:
        c.create_registered_model(name, description="polytask multi-task bundle")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {
        OBJECTIVE_TAG: repr(float(objective)),
        TASKS_TAG: ",".join(sorted(s.name for s in specs)),
        OBJECTIVE_DEF_TAG: objective_definition(specs),
        **(extra_tags or {}),
    }
    mv = create_version(name, model_uri, run_id, tags, uri)
    c.set_registered_model_alias(name, CANDIDATE, mv.version)
    won, reason = settle_champion(c, name, mv.version, promote)
    aliases = [CANDIDATE, CHAMPION] if won else [CANDIDATE]
    return {
        "name": name,
        "version": int(mv.version),
        "aliases": aliases,
        "model_uri": model_uri,
        "promotion": reason,
    }


def objective_definition(specs: list[Any]) -> str:
    """How the training objective is computed from these tasks (training.loop.objective): the
    mean of each task's primary metric, negated where lower is better."""
    from polytask.tasks import KINDS, LOWER_IS_BETTER

    parts = []
    for spec in sorted(specs, key=lambda s: s.name):
        metric = spec.metric or KINDS[spec.kind].primary_metric
        parts.append(f"{spec.name}:{'-' if metric in LOWER_IS_BETTER else ''}{metric}")
    return f"mean({','.join(parts)})"


def create_version(name: str, model_uri: str, run_id: str, tags: dict[str, str], uri: str) -> Any:
    """A new version of `name` from a logged model, carrying the logged model's bundle digest (what
    replicas verify their cached copy against). MLflow resolves a `models:/m-…` source through
    its *global* tracking store, so that store is pointed at `uri` meanwhile."""
    c = client(uri)
    digest = registry_digest(c, model_uri)
    if digest is not None:
        tags = {**tags, BUNDLE_DIGEST_TAG: digest}
    # A tracking server wants the logged model's id beside a `models:/m-…` source.
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    with use_tracking_uri(uri):
        return c.create_model_version(
            name, source=model_uri, run_id=run_id, tags=tags, model_id=model_id
        )


def settle_champion(
    c: MlflowClient, name: str, version: str | int, promote: str
) -> tuple[bool, str]:
    """Whether `version` became champion, and why; the reason is also tagged on the version.

    Under `promotion_lock`, so two runs finishing together decide one after the other: the
    second compares against the first's result, never against the champion both saw before.
    'if_better' promotes only a finite objective that beats the champion's, defined the same
    way over the same tasks; any error (reading the champion, taking the lock) promotes nothing.
    """
    version = str(version)
    try:
        with promotion_lock(c, name) as lease:
            won, reason = _decide(c, name, version, promote)
            if won:
                lease.check()
                c.set_registered_model_alias(name, CHAMPION, version)
    except PromotionLockTimeout as exc:
        won = False
        reason = (
            f"not promoted: {exc}; promote by hand with "
            f"`polytask registry promote {name} {version}`"
        )
    except Exception as exc:  # noqa: BLE001 - an unreadable registry must never promote
        won = False
        reason = (
            f"not promoted: the registry failed while deciding ({type(exc).__name__}: "
            f"{str(exc)[:200]}); promote by hand with `polytask registry promote {name} {version}`"
        )
    try:
        c.set_model_version_tag(name, version, PROMOTION_TAG, reason[:5000])
    except Exception as exc:  # noqa: BLE001 - the tag is a note; the decision already stands
        log.warning("could not tag %s v%s with its promotion: %s", name, version, exc)
    return won, reason


def _decide(c: MlflowClient, name: str, version: str, promote: str) -> tuple[bool, str]:
    if promote == "always":
        return True, "promoted: promote is 'always'"
    if promote != "if_better":
        return False, f"not promoted: promote is '{promote}'"
    mine = c.get_model_version(name, version)
    objective = _objective(mine)
    if math.isnan(objective):
        return False, (
            "not promoted: this version's objective is NaN (no validation split?); "
            f"promote by hand with `polytask registry promote {name} {version}`"
        )
    rm = c.get_registered_model(name)  # raises on any error: never read as "no champion"
    current = (rm.aliases or {}).get(CHAMPION)
    if current is None:
        return True, "promoted: first champion"
    if str(current) == version:
        return True, "promoted: already champion"
    champ = c.get_model_version(name, str(current))
    ours = (mine.tags.get(TASKS_TAG), mine.tags.get(OBJECTIVE_DEF_TAG))
    theirs = (champ.tags.get(TASKS_TAG), champ.tags.get(OBJECTIVE_DEF_TAG))
    if ours != theirs:
        return False, (
            f"not promoted: champion v{current} is not comparable (tasks {theirs[0]}, "
            f"objective {theirs[1]}; this version: tasks {ours[0]}, objective {ours[1]}); "
            f"promote by hand with `polytask registry promote {name} {version}`"
        )
    best = _objective(champ)
    if math.isnan(best):
        return False, f"not promoted: champion v{current} has no objective to beat"
    if objective > best:
        return True, f"promoted: objective {objective:.6g} > champion v{current}'s {best:.6g}"
    return False, f"not promoted: objective {objective:.6g} <= champion v{current}'s {best:.6g}"


def _objective(mv: Any) -> float:
    try:
        return float(mv.tags.get(OBJECTIVE_TAG, "nan"))
    except ValueError:
        return float("nan")


def _version_by_alias(c: MlflowClient, name: str, alias: str) -> Any:
    """The version `alias` names, or None when the model or alias does not exist; any other
    error (an unreachable server) raises instead of reading as "no such alias"."""
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


def promote(name: str, version: str | int, alias: str = CHAMPION) -> dict[str, Any]:
    """Point `alias` at `version` (an alias names one version, so this moves it); under the
    promotion lock, so a run deciding `champion` at the same moment cannot undo it."""
    c = client()
    c.get_model_version(name, str(version))  # a clear MLflow error if it does not exist
    with promotion_lock(c, name) as lease:
        lease.check()
        c.set_registered_model_alias(name, alias, str(version))
    return {"name": name, "version": int(version), "alias": alias}


def list_versions(name: str | None = None) -> list[dict[str, Any]]:
    """Rows for a table: every registered model, or one model's versions (newest first)."""
    c = client()
    if name is None:
        rows = []
        for rm in c.search_registered_models():
            if is_lock_name(rm.name):
                continue
            versions = c.search_model_versions(f"name = '{_quote(rm.name)}'")
            rows.append(
                {
                    "name": rm.name,
                    "versions": len(versions),
                    "latest": max((int(v.version) for v in versions), default="-"),
                    "aliases": _format_aliases(rm.aliases),
                }
            )
        return rows
    rm = c.get_registered_model(name)
    by_version: dict[str, list[str]] = {}
    for alias, version in (rm.aliases or {}).items():
        by_version.setdefault(str(version), []).append(alias)
    rows = []
    versions = c.search_model_versions(f"name = '{_quote(name)}'")
    for v in sorted(versions, key=lambda v: int(v.version), reverse=True):
        rows.append(
            {
                "version": int(v.version),
                "aliases": ", ".join(sorted(by_version.get(str(v.version), []))),
                "variant": v.tags.get(VARIANT_TAG, FULL_PRECISION),
                "objective": v.tags.get(OBJECTIVE_TAG, ""),
                "run_id": v.run_id or "",
                "created": _format_time(v.creation_timestamp),
            }
        )
    return rows


def find_variant(name: str, version: str | int, variant: str, uri: str | None = None) -> int:
    """The newest version of `name` that is `variant` of full-precision `version` (made from it
    by `polytask compress`, possibly in several steps); `version` itself if it is that variant,
    and the full-precision root for variant "fp32".

    Raises LookupError naming the variants that do exist and the command that makes this one.
    """
    c = client(uri)
    own = c.get_model_version(name, str(version))
    base = own.tags.get(BASE_VERSION_TAG, str(own.version))
    if own.tags.get(VARIANT_TAG, FULL_PRECISION) == variant:
        return int(own.version)
    if variant == FULL_PRECISION:
        return int(base)
    family = [
        v
        for v in c.search_model_versions(f"name = '{_quote(name)}'")
        if v.tags.get(BASE_VERSION_TAG) == base
    ]
    matches = [int(v.version) for v in family if v.tags.get(VARIANT_TAG) == variant]
    if matches:
        return max(matches)
    have = sorted({v.tags.get(VARIANT_TAG, "?") for v in family})
    methods = {v: m for m, v in VARIANT_OF_METHOD.items()}
    steps = [methods.get(step, "METHOD") for step in variant.split("+")]
    how = " then ".join(f"--method {m}" for m in steps)
    raise LookupError(
        f"no '{variant}' version of models:/{name}/{base} is registered"
        + (f" (it has: {', '.join(have)})" if have else " (it has no compressed versions)")
        + f"; make one with `polytask compress models:/{name}/{base}` {how}"
    )


def _format_aliases(aliases: dict[str, Any] | None) -> str:
    return ", ".join(f"{a}→v{v}" for a, v in sorted((aliases or {}).items()))


def _format_time(ms: int | None) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else ""


def resolve_bundle(uri: str) -> Path:
    """`models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/ID/PATH` or a dir → local bundle."""
    from polytask.model.manifest import MANIFEST  # listing versions needs no torch

    if is_local_path(uri):
        path = Path(uri).expanduser()
        if not (path / MANIFEST).is_file():
            raise FileNotFoundError(
                f"model '{uri}': not a bundle directory (no {MANIFEST}); pass a bundle path "
                "or a models:/NAME@ALIAS URI"
            )
        return path.resolve()
    local = _download(uri, tracking_uri())
    return bundle_in(local) or local


def _download(uri: str, store: str) -> Path:
    """Download once per concrete model of one tracking server into the home cache, verified.

    The key is the store (`models:/x/1` on two servers are two models) plus the concrete model:
    aliases resolve to a version first (a moved alias never mixes files of two versions) and
    `runs:/ID/NAME` to the model that run logged under NAME (MLflow 3 keeps models outside run
    artifacts). The bundle is checked against the digest the registry holds (tracking.integrity),
    once per node: later replicas on the node find its marker and skip MLflow and the hash. Reads
    share the entry's file lock and a download holds it alone, every wait bounded; an entry
    appears complete or not at all (atomic rename), and one that does not verify is replaced."""
    uri = _concrete(uri, store)
    root = default_home() / "models" / hashlib.sha256(store.encode()).hexdigest()[:16]
    root.mkdir(parents=True, exist_ok=True)
    dst = root / "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in uri)
    _sweep_leftovers(root)
    if (dst / CACHE_DIGEST_FILE).is_file() and node_verified(dst) is not None:
        return dst
    expected = registry_digest(client(store), uri)
    lock = root / f"{dst.name}.lock"
    with cache_lock(lock, exclusive=False, what=f"reading {uri}"):
        if _verified(dst, uri, store, expected):
            return dst
    with cache_lock(lock, exclusive=True, what=f"downloading {uri}"):
        if _verified(dst, uri, store, expected):
            return dst
        _fetch(uri, store, root, dst, expected)
    return dst


def _fetch(uri: str, store: str, root: Path, dst: Path, expected: str | None) -> None:
    """Download `uri` beside `dst`, check it against the registry digest, rename it in."""
    import mlflow  # only to download: a replica that finds the cache warm never imports it

    from polytask.model.manifest import MANIFEST

    tmp = root / f"{dst.name}.{uuid.uuid4().hex[:8]}.partial"
    tmp.mkdir()
    try:
        with use_tracking_uri(store):  # a version's `models:/m-…` source resolves globally
            mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(tmp), tracking_uri=store, registry_uri=store
            )
        bundle = bundle_in(tmp)
        if bundle is None:
            raise FileNotFoundError(f"model '{uri}' holds no polytask bundle (no {MANIFEST})")
        got = bundle_digest(bundle)
        if expected is not None and got != expected:
            raise ValueError(
                f"model '{uri}' as downloaded from {store} hashes to {got}, but the registry "
                f"says {expected} ({BUNDLE_DIGEST_TAG}): the artifact store holds other files "
                "than were registered; re-register the model from its training run"
            )
        (tmp / CACHE_DIGEST_FILE).write_text(json.dumps({"uri": uri, "store": store}))
        if dst.exists():  # a corrupt entry: swap it out, then delete it
            stale = root / f"{dst.name}.{uuid.uuid4().hex[:8]}.stale"
            dst.rename(stale)
            tmp.rename(dst)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mark_verified(dst, got)


def _sweep_leftovers(root: Path) -> None:
    """Delete the `.partial`/`.stale` directories that killed downloads left in the cache. Each
    belongs to the entry named before its random suffix and is dead when nobody holds that
    entry's lock (a live download holds it until it renames or deletes its directory)."""
    import fcntl

    for leftover in [*root.glob("*.partial"), *root.glob("*.stale")]:
        entry = leftover.name.rsplit(".", 2)[0]
        with open(root / f"{entry}.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a download of that entry is running
            if leftover.exists():
                log.warning("deleting %s, left by a download that did not finish", leftover)
                shutil.rmtree(leftover, ignore_errors=True)


def _verified(entry: Path, uri: str, store: str, expected: str | None) -> bool:
    """The cache entry exists, was downloaded for this uri and store, and its bundle hashes to
    the registry's digest (hashed here unless this node already did, with the files unchanged).
    A model registered without a digest is trusted as first downloaded, with a warning."""
    try:
        record = json.loads((entry / CACHE_DIGEST_FILE).read_text())
    except (OSError, ValueError):
        return False
    if record.get("uri") != uri or record.get("store") != store:
        return False
    bundle = bundle_in(entry)
    if bundle is None:
        return False
    if node_verified(entry, expected) is not None:
        return True
    got = bundle_digest(bundle)
    if expected is None:
        log.warning(
            "model %s carries no %s in the registry (logged by an older polytask or another "
            "tool): its cached copy %s is trusted as downloaded; re-register it to verify it",
            uri, BUNDLE_DIGEST_TAG, entry,
        )
    elif got != expected:
        log.warning("cached model %s (%s) fails the registry digest; downloading it again", uri, entry)
        return False
    mark_verified(entry, got)
    return True


def _concrete(uri: str, store: str) -> str:
    """`models:/NAME@ALIAS` → `models:/NAME/VERSION`; `runs:/ID/NAME` → `models:/<model id>`.
    Anything else is concrete already and needs no client (a pinned replica skips MLflow)."""
    ref = parse_model_uri(uri)
    if ref.kind not in ("alias", "run"):
        return uri
    c = client(store)
    if ref.kind == "alias":
        try:
            return pin_model_uri(uri, lambda: c)
        except AliasNotFound as exc:
            raise FileNotFoundError(
                f"model '{uri}': no version of '{ref.name}' has alias '{ref.alias}'; see "
                f"`polytask registry list {ref.name}`"
            ) from exc
    if ref.kind == "run":
        experiment_id = c.get_run(ref.run_id).info.experiment_id
        found = c.search_logged_models(
            [experiment_id],
            filter_string=f"source_run_id = '{_quote(ref.run_id)}' AND name = '{_quote(ref.rest)}'",
            order_by=[{"field_name": "creation_timestamp", "ascending": False}],
            max_results=1,
        )
        if found:
            return f"models:/{found[0].model_id}"
    return uri
