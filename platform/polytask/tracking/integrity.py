"""Model cache integrity: the digest a replica checks comes from the registry, each cache entry is
hashed once per node, and every wait for a cache lock is bounded.

The cache entry lives on storage every RayJob may write (the shared volume), so nothing inside
it is trusted: the expected sha256 is the one `log_bundle` put on the logged model and
`create_version` copied onto the model version. After a node hashes an entry it leaves a marker
in a node-local folder (POLYTASK_NODE_DIR, default a private folder under /tmp), outside the
entry, holding the registry digest and the entry's file stats; later replicas on that node trust
the entry only while every file's size, inode and change time still match (a swapped or rewritten
file changes its ctime, which no user can set back).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import stat
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from polytask.tracking.tags import BUNDLE_DIGEST_TAG

NODE_DIR_ENV = "POLYTASK_NODE_DIR"
LOCK_WAIT_ENV = "POLYTASK_CACHE_LOCK_WAIT_S"
# A waiter gives up after this long: a download of a few GB over a slow link fits in it, a lock
# held by a hung process or a hung NFS lock server does not block replica starts for good.
LOCK_WAIT_S = 600.0


class CacheLockTimeout(TimeoutError):
    """A replica waited longer than the bound for a model cache lock; the message names it."""


def bundle_digest(folder: Path) -> str:
    """sha256 over every file's relative path and bytes, in path order (a bundle's identity)."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def registry_digest(client: object, uri: str) -> str | None:
    """The bundle digest the registry holds for a concrete model URI (`models:/NAME/VERSION` or
    `models:/m-ID`); None for a model logged without one (by another tool, or an older polytask)."""
    from polytask.tracking.uris import parse_model_uri

    ref = parse_model_uri(uri)
    if ref.kind == "version":
        return client.get_model_version(ref.name, ref.version).tags.get(BUNDLE_DIGEST_TAG)  # type: ignore[attr-defined]
    if uri.startswith("models:/m-"):
        model_id = uri.removeprefix("models:/").split("/", 1)[0]
        return (client.get_logged_model(model_id).tags or {}).get(BUNDLE_DIGEST_TAG)  # type: ignore[attr-defined]
    return None


def node_dir() -> Path:
    """This node's marker folder: POLYTASK_NODE_DIR, else a private (0700) folder under /tmp."""
    given = os.environ.get(NODE_DIR_ENV)
    folder = Path(given) if given else Path(tempfile.gettempdir()) / f"polytask-node-{os.getuid()}"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = folder.stat()
    if not given and (info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o022):
        raise PermissionError(
            f"{folder} (where this node records verified models) is not owned by this user or is "
            f"writable by others; remove it, or set {NODE_DIR_ENV} to a private folder"
        )
    return folder


def _marker(entry: Path) -> Path:
    key = hashlib.sha256(str(entry.resolve()).encode()).hexdigest()[:32]
    return node_dir() / f"{key}.verified.json"


def _stats(entry: Path) -> list[list[object]]:
    """Each file's path, size, inode and change time: what a swap or rewrite cannot keep."""
    out: list[list[object]] = []
    for path in sorted(entry.rglob("*")):
        info = path.lstat()
        if stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode):
            rel = path.relative_to(entry).as_posix()
            out.append([rel, info.st_size, info.st_ino, info.st_ctime_ns])
    return out


def node_verified(entry: Path, digest: str | None = None) -> str | None:
    """The registry digest this node verified `entry` against, if its files are unchanged since
    (and, given `digest`, only if it is that one); None when the entry must be hashed again."""
    try:
        record = json.loads(_marker(entry).read_text())
    except (OSError, ValueError):
        return None
    if record.get("entry") != str(entry.resolve()) or (digest and record.get("digest") != digest):
        return None
    try:
        same = record.get("stats") == json.loads(json.dumps(_stats(entry)))
    except OSError:
        return None
    return record.get("digest") if same else None


def mark_verified(entry: Path, digest: str) -> None:
    """Record on this node that `entry` hashed to `digest` (the registry's), with its file stats."""
    marker = _marker(entry)
    record = {"entry": str(entry.resolve()), "digest": digest, "stats": _stats(entry)}
    partial = marker.with_name(f".{marker.name}.partial-{uuid.uuid4().hex}")
    partial.write_text(json.dumps(record))
    os.replace(partial, marker)


def lock_wait_s() -> float:
    raw = os.environ.get(LOCK_WAIT_ENV)
    try:
        return float(raw) if raw else LOCK_WAIT_S
    except ValueError:
        raise ValueError(f"{LOCK_WAIT_ENV}={raw!r}: expected a number of seconds") from None


@contextmanager
def cache_lock(path: Path, exclusive: bool, what: str) -> Iterator[None]:
    """flock `path` (shared to read an entry, exclusive to write one), polling without blocking
    so the wait is bounded by POLYTASK_CACHE_LOCK_WAIT_S; the lock goes when the file closes,
    also when the process dies."""
    wait = lock_wait_s()
    deadline = time.monotonic() + wait
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    with open(path, "a") as handle:
        while True:
            try:
                fcntl.flock(handle, mode | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() > deadline:
                raise CacheLockTimeout(
                    f"waited {wait:.0f} s for the model cache lock {path} ({what}); another "
                    "process holds it: a download still running, or one hung (a stuck NFS lock). "
                    f"Find it with `fuser {path}`; if none is running, delete {path}; or raise "
                    f"{LOCK_WAIT_ENV}"
                )
            time.sleep(0.05)
        yield


def bundle_in(local: Path) -> Path | None:
    """The bundle inside a downloaded MLflow model (its `bundle` artifact), or the dir itself;
    never a directory outside `local` (an absolute or `..` path in MLmodel, or a link out)."""
    import yaml

    from polytask.model.manifest import MANIFEST

    candidates = ["artifacts/bundle", "bundle", "."]
    mlmodel = local / "MLmodel"
    if mlmodel.is_file():
        flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {})
        artifacts = flavor.get("python_function", {}).get("artifacts", {}) or {}
        rel = (artifacts.get("bundle") or {}).get("path")
        if rel:
            candidates.insert(0, str(rel))
    for rel in candidates:
        resolved = (local / rel).resolve()
        if not resolved.is_relative_to(local.resolve()):
            raise ValueError(
                f"model at {local}: bundle path '{rel}' leads outside "
                "the model's directory; refusing to load it (a bundle path must be relative, "
                "with no '..' and no link out of the model)"
            )
        if (resolved / MANIFEST).is_file():
            return resolved
    return None
