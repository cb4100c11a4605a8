"""Where a command's state goes (tracking store, artifact root, checkpoints, output files), said
when the command starts, and refused when it would land in a Ray job's temporary copy of its
working directory: Ray unpacks `ray job submit --working-dir` under its session directory
(`.../runtime_resources/working_dir_files/_ray_pkg_<hash>`) and deletes it, so runs written there
would vanish with the job while the user's own store never sees them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Ray's runtime-env resources (a job's unpacked working_dir, py_modules) live under this directory
# of the session dir, each package in a directory named with this prefix.
RUNTIME_RESOURCES = "runtime_resources"
PACKAGE_PREFIX = "_ray_pkg_"
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # what Ray's job supervisor gives a job's driver
JOB_DOCS = "docs/training.md, Submitting to a Ray cluster"
HOME_FIX = "POLYTASK_HOME (an absolute path, passed in the job's runtime_env env_vars)"


class ScratchStateError(ValueError):
    """State a command would write inside Ray's temporary copy of a job's working directory."""


@dataclass(frozen=True)
class Place:
    """One kind of state and where it goes: `where` as shown, `path` when it is a local path, and
    the settings that move it."""

    what: str
    where: str
    path: Path | None
    settings: str


def ray_job_id() -> str | None:
    """The submission id when this process is a Ray job's driver (`ray job submit`), else None."""
    raw = os.environ.get(JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        metadata = json.loads(raw).get("metadata") or {}
    except (ValueError, AttributeError):
        return None
    return metadata.get("job_submission_id")


def scratch_root(path: str | Path) -> Path | None:
    """The Ray runtime-env directory (a `_ray_pkg_*` copy, or `runtime_resources`) holding
    `path`, or None when `path` is not inside one."""
    resolved = Path(path).expanduser().resolve()
    for parent in (resolved, *resolved.parents):
        if parent.name.startswith(PACKAGE_PREFIX) or parent.name == RUNTIME_RESOURCES:
            return parent
    return None


def local_store_path(uri: str) -> Path | None:
    """The local file or directory an MLflow URI stores in (sqlite, file, a plain path), else
    None (a tracking server, a database server)."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///"))
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    if "://" not in uri and ":/" not in uri:
        return Path(uri)
    return None


def tracking_places(uri: str, artifact_root: str | None) -> list[Place]:
    """The tracking store and the artifact root it gives new experiments."""
    settings = f"tracking.tracking_uri or MLFLOW_TRACKING_URI, or {HOME_FIX}"
    places = [Place("tracking store", uri, local_store_path(uri), settings)]
    if artifact_root is not None:
        path = local_store_path(artifact_root)
        places.append(Place("artifact root", artifact_root, path, settings))
    return places


def storage_place(storage: str) -> Place:
    """Ray Train's checkpoint storage (a directory, or a remote `s3://...` URI)."""
    path = None if "://" in storage else Path(storage)
    return Place(
        "checkpoints", storage, path, f"run.storage_path or POLYTASK_STORAGE_PATH, or {HOME_FIX}"
    )


def output_place(what: str, path: str, option: str) -> Place:
    """A file the command writes (e.g. `predict --output`)."""
    local = None if "://" in path else Path(path)
    return Place(what, path, local, f"{option} (an absolute path outside the job's working_dir)")


def refuse_scratch(places: Iterable[Place]) -> None:
    """Raise ScratchStateError naming every place inside a Ray runtime-env copy and its settings."""
    bad = [(p, root) for p in places if p.path is not None and (root := scratch_root(p.path))]
    if not bad:
        return
    root, job = bad[0][1], ray_job_id()
    lines = "; ".join(f"{p.what} {p.where}: set {p.settings}" for p, _ in bad)
    raise ScratchStateError(
        f"{f'Ray job {job}' if job else 'this command'} would write its state inside Ray's "
        f"temporary copy of the job's working directory "
        f"({root}), which Ray deletes after the job: {lines}. Example: ray job submit "
        f"--working-dir . --runtime-env-json "
        f"'{{\"env_vars\": {{\"POLYTASK_HOME\": \"/abs/path/.polytask\"}}}}' -- polytask ... "
        f"({JOB_DOCS})"
    )


def check_paths(uri: str, storage: str | None = None) -> list[Place]:
    """The tracking store and checkpoint storage, refused when inside a Ray runtime-env copy;
    nothing is opened, so this runs before any work."""
    places = tracking_places(uri, None) + ([storage_place(storage)] if storage else [])
    refuse_scratch(places)
    return places


def artifact_place(uri: str, experiment: str) -> Place:
    """Where the experiment's artifacts (models, plots) go: its own artifact root when it exists,
    else the one polytask gives new experiments, else the tracking server's; refused when inside
    a Ray runtime-env copy."""
    from polytask.tracking.registry import artifact_location, client

    found = client(uri).get_experiment_by_name(experiment)
    root = found.artifact_location if found is not None else artifact_location(uri)
    if root is None:
        return Place("artifact root", "the tracking server's", None, "")
    place = tracking_places(uri, root)[-1]
    refuse_scratch([place])
    return place


def with_store_env(runtime_env: dict[str, Any] | None) -> dict[str, Any]:
    """`runtime_env` with this process's model store (MLFLOW_TRACKING_URI) and polytask home in
    its env_vars, so processes it starts on a cluster started elsewhere (Serve replicas) resolve
    models where this command did rather than in their own working directory; env_vars the
    runtime_env already sets win."""
    from polytask.config import default_home
    from polytask.tracking.registry import tracking_uri

    env = {"MLFLOW_TRACKING_URI": tracking_uri(), "POLYTASK_HOME": str(default_home())}
    out = dict(runtime_env or {})
    out["env_vars"] = {**env, **(out.get("env_vars") or {})}
    return out


def describe(places: Iterable[Place]) -> str:
    """One line per place, aligned, for the command's start."""
    rows = list(places)
    width = max((len(p.what) for p in rows), default=0)
    return "\n".join(f"  {p.what + ':':<{width + 1}} {p.where}" for p in rows)


def shown_path(path: str | None) -> str | None:
    """`path` as a summary shows it: None when it lies in a Ray runtime-env copy (it is gone after
    the job, so it is never presented as the user's)."""
    if path is None or "://" in path or scratch_root(path) is None:
        return path
    return None
