"""polytask.json, the bundle's manifest: tasks, encoder fingerprint, pooling, max_length.

Apart from bundle.py (which needs torch to load weights) so that whatever only reads a model's
description — the HTTP Ingress, the serve builder, the CLI — starts without importing torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polytask.tasks import TaskSpec

FORMAT_VERSION = 1
MANIFEST = "polytask.json"


class BundleError(ValueError):
    """A bundle that is missing, malformed, or mixes parts trained against different encoders."""


@dataclass
class Manifest:
    """polytask.json, typed."""

    tasks: list[TaskSpec]
    fingerprint: str
    pooling: str
    max_length: int
    source: str = ""
    variant: str = "fp32"
    extra: dict[str, Any] = field(default_factory=dict)
    recipe: list[dict[str, Any]] = field(default_factory=list)  # compression steps (variants.py)

    def task(self, name: str) -> TaskSpec:
        for spec in self.tasks:
            if spec.name == name:
                return spec
        known = ", ".join(s.name for s in self.tasks)
        raise KeyError(f"unknown task '{name}'; this model has: {known}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "tasks": [s.to_dict() for s in self.tasks],
            "encoder": {
                "fingerprint": self.fingerprint,
                "pooling": self.pooling,
                "max_length": self.max_length,
                "source": self.source,
                "variant": self.variant,
                "recipe": self.recipe,
            },
            "extra": self.extra,
        }


def read_manifest(path: str | Path) -> Manifest:
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise BundleError(f"{path}: no {MANIFEST}; is this a polytask bundle directory?")
    data = json.loads(file.read_text())
    if data.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{file}: format_version {data.get('format_version')} is not {FORMAT_VERSION}; "
            "re-export the bundle with this polytask version"
        )
    enc = data["encoder"]
    return Manifest(
        tasks=[TaskSpec.from_dict(t) for t in data["tasks"]],
        fingerprint=enc["fingerprint"],
        pooling=enc["pooling"],
        max_length=int(enc["max_length"]),
        source=enc.get("source", ""),
        variant=enc.get("variant", "fp32"),
        extra=data.get("extra", {}),
        recipe=enc.get("recipe", []),
    )
