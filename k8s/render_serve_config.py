#!/usr/bin/env python3
"""Keep the RayService's serveConfigV2 equal to serve_configs/cluster.yaml.

    python k8s/render_serve_config.py             # rewrite the generated serveConfigV2 blocks
    python k8s/render_serve_config.py --version 3 # ... serving version 3 of the model
    python k8s/render_serve_config.py --resolve   # ... serving the version the alias names now
    python k8s/render_serve_config.py --check     # exit 1 (and say which) if any is out of date

serve_configs/cluster.yaml is the source of truth. Two places are generated from it:

- k8s/base/rayservice.yaml: `serveConfigV2` is the file's text, verbatim (comments included)
  except the app's `model`, which is pinned to one version (below); the rest of the manifest is
  left as it is.
- k8s/overlays/cpu-only/rayservice-serve-config.yaml: a strategic-merge patch whose
  serveConfigV2 is `cpu_only()` of the same document — the Encoder asks for no GPU and the
  app runs on `device: cpu`, since the cpu-only overlay has no GPU worker group.

The RayService never carries an alias (`models:/NAME@champion`): KubeRay redeploys the app
from serveConfigV2 whenever it restarts the Ray cluster, and an alias would then resolve again,
so the served version could change without anyone deploying. It carries `models:/NAME/VERSION`:
the version given with --version, the one the alias names in MLflow now with --resolve
(MLFLOW_TRACKING_URI and, with authentication, MLFLOW_TRACKING_USERNAME/PASSWORD), else the
version the RayService pins already.

Needs only PyYAML (and mlflow for --resolve).
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "serve_configs" / "cluster.yaml"
BASE_RAYSERVICE = REPO / "k8s" / "base" / "rayservice.yaml"
CPU_PATCH = REPO / "k8s" / "overlays" / "cpu-only" / "rayservice-serve-config.yaml"

_KEY = re.compile(r"^(?P<indent>[ ]*)serveConfigV2:[ ]*\|[-+]?[ ]*$")
_MODEL = re.compile(
    r"^(?P<lead>[ ]*model:[ ]*)models:/(?P<name>[^/@\s]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))"
    r"(?P<rest>.*)$",
    re.MULTILINE,
)
PIN_NOTE = "# pinned by k8s/render_serve_config.py"


def _model_line(text: str) -> re.Match[str]:
    hits = list(_MODEL.finditer(text))
    if len(hits) != 1:
        raise SystemExit(f"expected one `model: models:/NAME@ALIAS` line, found {len(hits)}")
    return hits[0]


def pinned_version(serve_config: str) -> int | None:
    """The version a serve config's model names, or None when it names an alias."""
    version = _model_line(serve_config)["version"]
    return int(version) if version else None


def pin(source_text: str, version: int) -> str:
    """cluster.yaml's text with its model alias replaced by `version` of the same model."""
    m = _model_line(source_text)
    line = f"{m['lead']}models:/{m['name']}/{version}  {PIN_NOTE} (source: models:/{m['name']}"
    line += f"@{m['alias']})" if m["alias"] else f"/{m['version']})"
    return source_text[: m.start()] + line + source_text[m.end() :]


def resolve(source_text: str) -> int:
    """The version the source's alias names in MLflow now."""
    from mlflow import MlflowClient

    m = _model_line(source_text)
    if not m["alias"]:
        return int(m["version"])
    return int(MlflowClient().get_model_version_by_alias(m["name"], m["alias"]).version)


def cpu_only(doc: dict[str, Any]) -> dict[str, Any]:
    """The cluster serve config for a cluster without GPUs: device cpu, no num_gpus anywhere."""
    out = copy.deepcopy(doc)
    for app in out.get("applications") or []:
        args = app.get("args")
        if isinstance(args, dict) and "device" in args:
            args["device"] = "cpu"
        options = [d.get("ray_actor_options") for d in app.get("deployments") or []]
        for key in ("head_options", "generation_head_options"):
            if isinstance(args, dict) and isinstance(args.get(key), dict):
                options.append(args[key].get("ray_actor_options"))
        for opts in options:
            if isinstance(opts, dict) and opts.get("num_gpus"):
                opts["num_gpus"] = 0
    return out


def _block(text: str, indent: str) -> list[str]:
    """`text` as the lines of a YAML literal block scalar at `indent`."""
    body = text if text.endswith("\n") else text + "\n"
    return [(indent + line) if line.strip() else "" for line in body.splitlines()]


def embed(manifest: str, text: str) -> str:
    """`manifest` with the content of its single `serveConfigV2: |` block replaced by `text`."""
    lines = manifest.splitlines()
    hits = [i for i, line in enumerate(lines) if _KEY.match(line)]
    if len(hits) != 1:
        raise SystemExit(f"expected one `serveConfigV2: |` line, found {len(hits)}")
    start = hits[0]
    key_indent = len(_KEY.match(lines[start]).group("indent"))
    end = start + 1
    while end < len(lines):
        line = lines[end]
        if line.strip() and len(line) - len(line.lstrip(" ")) <= key_indent:
            break
        end += 1
    while end > start + 1 and not lines[end - 1].strip():  # keep blank lines after the block
        end -= 1
    lines[start] = " " * key_indent + "serveConfigV2: |"
    new = lines[: start + 1] + _block(text, " " * (key_indent + 2)) + lines[end:]
    return "\n".join(new) + "\n"


def embedded(manifest: str) -> str:
    """The serveConfigV2 string of a RayService manifest (first document that has one)."""
    for doc in yaml.safe_load_all(manifest):
        if isinstance(doc, dict) and "serveConfigV2" in (doc.get("spec") or {}):
            return doc["spec"]["serveConfigV2"]
    raise SystemExit("no spec.serveConfigV2 found")


def cpu_patch_text(source_text: str) -> str:
    doc = cpu_only(yaml.safe_load(source_text))
    config = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
    head = (
        "# GENERATED by k8s/render_serve_config.py from serve_configs/cluster.yaml — do not edit.\n"
        "# The cpu-only overlay has no GPU worker group, so the Encoder asks for no GPU and the\n"
        "# app runs on device cpu; everything else is serve_configs/cluster.yaml (model pinned).\n"
        "apiVersion: ray.io/v1\n"
        "kind: RayService\n"
        "metadata:\n"
        "  name: polytask\n"
        "spec:\n"
        "  serveConfigV2: |\n"
    )
    return head + "\n".join(_block(config, "    ")) + "\n"


def expected(version: int | None = None) -> dict[Path, str]:
    """Each generated file and the text it should have, serving `version` (default: the
    version the RayService pins now)."""
    manifest = BASE_RAYSERVICE.read_text()
    if version is None:
        version = pinned_version(embedded(manifest))
    if version is None:
        raise SystemExit(
            f"{BASE_RAYSERVICE.name} serves an alias; pin a version: --version N or --resolve"
        )
    source = pin(SOURCE.read_text(), version)
    return {
        BASE_RAYSERVICE: embed(manifest, source),
        CPU_PATCH: cpu_patch_text(source),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report; exit 1 if stale")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--version", type=int, help="serve this version of the model")
    which.add_argument("--resolve", action="store_true", help="serve the version the alias names")
    args = parser.parse_args(argv)
    version = resolve(SOURCE.read_text()) if args.resolve else args.version
    stale = []
    for path, text in expected(version).items():
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    rel = [str(p.relative_to(REPO)) if REPO in p.parents else str(p) for p in stale]
    if args.check:
        if stale:
            print("out of date with serve_configs/cluster.yaml: " + ", ".join(rel))
            print("run: python k8s/render_serve_config.py")
            return 1
        print("serveConfigV2 up to date")
        return 0
    print("rewrote " + ", ".join(rel) if rel else "nothing to do")
    return 0


if __name__ == "__main__":
    sys.exit(main())
