"""Deployment versions that let a redeploy keep the replicas whose work did not change.

`serve.run` gives a deployment without a version a random one, so every redeploy restarts every
replica (ray/serve/_private/client.py). A replica is restarted only when its code version, actor
options or placement change (`DeploymentVersion.requires_actor_restart`); a changed `user_config`
alone calls `reconfigure` on the running replica. So the Encoder's version names what its
replicas compute — the polytask code, the encoder's weights (fingerprint, variant, pooling,
max_length) and its constructor settings — and not the model version: adding a task to a model
keeps the fingerprint, hence the version, hence the Encoder replicas. A head's version names the
head's own files the same way. The Ingress keeps Serve's random version: its task list changes.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import polytask


@lru_cache(maxsize=1)
def code_version() -> str:
    """sha256 of every polytask source file: new code (a new image) restarts every replica."""
    root = Path(polytask.__file__).resolve().parent
    digest = hashlib.sha256(polytask.__version__.encode())
    for file in sorted(root.rglob("*.py")):
        digest.update(str(file.relative_to(root)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def _version(kind: str, parts: dict[str, Any]) -> str:
    blob = json.dumps({"code": code_version(), **parts}, sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def encoder_version(
    manifest: Any,
    device: str,
    max_batch_size: int,
    batch_wait_s: float,
    pass_overhead_tokens: float | None = None,
    heads: tuple[str, ...] = (),
) -> str:
    """Same encoder weights and settings ⇒ same version, whichever model version carries them;
    `heads` (placed with_encoder) are constructor settings too."""
    return _version(
        "encoder",
        {
            "fingerprint": manifest.fingerprint,
            "variant": manifest.variant,
            "recipe": manifest.recipe,
            "pooling": manifest.pooling,
            "max_length": manifest.max_length,
            "device": device,
            "max_batch_size": max_batch_size,
            "batch_wait_s": batch_wait_s,
            "pass_overhead_tokens": pass_overhead_tokens,
            **({"heads": list(heads)} if heads else {}),
        },
    )


def head_version(bundle: str | Path, task: str) -> str:
    """Same head files (spec, weights, the fingerprint it was trained against) ⇒ same version."""
    head_dir = Path(bundle) / "heads" / task
    digest = hashlib.sha256()
    for name in ("head.json", "head.safetensors"):
        digest.update((head_dir / name).read_bytes())
    return _version("head", {"task": task, "files": digest.hexdigest()})
