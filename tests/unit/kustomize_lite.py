"""A small pure-Python stand-in for `kustomize build`, for the manifest tests.

It implements only what k8s/ uses, and raises KustomizeLiteError on anything else (so a
kustomization that starts using a new feature fails loudly here instead of rendering wrongly):

- `resources`: YAML files (inside the kustomization's directory) and directories holding a
  kustomization (anywhere; built recursively first, as kustomize does)
- `namespace`: set on every namespaced object
- `images`: name -> newName / newTag / digest, on every `containers[]`/`initContainers[]` image at
  any depth (kustomize's legacy image filter does the same, custom resources included)
- `configMapGenerator` / `secretGenerator`: `files` (`key=path` or `path`), `literals`, `envs`,
  `type`, `options.labels`/`options.annotations`, `behavior` create|merge|replace; only with
  `generatorOptions.disableNameSuffixHash: true` (or per-generator `options`), since nothing here
  rewrites references to hashed names
- `patches`: `path` or inline `patch`, optional `target` (group, version, kind, name regex,
  namespace); a patch that parses to a list is JSON 6902 (add, remove, replace, test), a mapping
  is a strategic-merge patch (maps merge, `null` deletes; lists replace — lists of objects in
  built-in kinds, where kustomize would merge by key, are refused)

`tests/unit/test_k8s.py` compares this renderer with `kubectl kustomize` whenever one is installed.
"""

from __future__ import annotations

import base64
import copy
import re
from pathlib import Path
from typing import Any

import yaml

try:  # libyaml is ~10x faster on the large CRDs; fall back to the pure-Python loader
    _Loader: Any = yaml.CSafeLoader
except AttributeError:  # pragma: no cover
    _Loader = yaml.SafeLoader

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_KEYS = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "images",
    "configMapGenerator",
    "secretGenerator",
    "generatorOptions",
    "patches",
}
CLUSTER_SCOPED = {
    "Namespace",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
    "IngressClass",
    "RuntimeClass",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
}


class KustomizeLiteError(ValueError):
    pass


def load_yaml_docs(text: str) -> list[Any]:
    return [d for d in yaml.load_all(text, Loader=_Loader) if d is not None]


def build(path: str | Path) -> list[dict[str, Any]]:
    """Render the kustomization in directory `path` into a list of objects."""
    root = Path(path).resolve()
    kfile = next((root / n for n in KUSTOMIZATION_FILES if (root / n).is_file()), None)
    if kfile is None:
        raise KustomizeLiteError(f"{root}: no kustomization.yaml")
    kust = yaml.load(kfile.read_text(), Loader=_Loader) or {}
    unknown = set(kust) - SUPPORTED_KEYS
    if unknown:
        raise KustomizeLiteError(f"{kfile}: unsupported fields {sorted(unknown)}")

    objects: list[dict[str, Any]] = []
    for entry in kust.get("resources") or []:
        target = (root / entry).resolve()
        if target.is_dir():
            objects.extend(build(target))
        else:
            for doc in load_yaml_docs(_read_inside(root, entry)):
                _add(objects, doc, str(target))

    options = kust.get("generatorOptions") or {}
    for kind, key in (("ConfigMap", "configMapGenerator"), ("Secret", "secretGenerator")):
        for gen in kust.get(key) or []:
            _generate(objects, root, kind, gen, options, kust.get("namespace"))

    for patch in kust.get("patches") or []:
        _apply_patch(objects, root, patch)
    if kust.get("namespace"):
        for obj in objects:
            if obj.get("kind") not in CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = kust["namespace"]
    for image in kust.get("images") or []:
        for obj in objects:
            _set_images(obj, image)
    return objects


# ---------------------------------------------------------------------------------------------
def _read_inside(root: Path, rel: str) -> str:
    path = (root / rel).resolve()
    if root != path and root not in path.parents:
        raise KustomizeLiteError(
            f"{rel}: outside the kustomization root {root} (kustomize refuses)"
        )
    return path.read_text()


def _ident(obj: dict[str, Any]) -> tuple[str, str, str, str]:
    meta = obj.get("metadata") or {}
    group = obj.get("apiVersion", "").rpartition("/")[0]
    return (group, obj.get("kind", ""), meta.get("namespace", ""), meta.get("name", ""))


def _add(objects: list[dict[str, Any]], doc: Any, where: str) -> None:
    if (
        not isinstance(doc, dict)
        or not doc.get("kind")
        or not (doc.get("metadata") or {}).get("name")
    ):
        raise KustomizeLiteError(f"{where}: every resource needs kind and metadata.name")
    if any(_ident(o) == _ident(doc) for o in objects):
        raise KustomizeLiteError(f"{where}: duplicate resource {_ident(doc)}")
    objects.append(doc)


def _generate(
    objects: list[dict[str, Any]],
    root: Path,
    kind: str,
    gen: dict[str, Any],
    global_options: dict[str, Any],
    namespace: str | None,
) -> None:
    allowed = {"name", "namespace", "behavior", "files", "literals", "envs", "type", "options"}
    if set(gen) - allowed:
        raise KustomizeLiteError(
            f"{kind} generator: unsupported fields {sorted(set(gen) - allowed)}"
        )
    opts = {**global_options, **(gen.get("options") or {})}
    if set(opts) - {"disableNameSuffixHash", "labels", "annotations"}:
        raise KustomizeLiteError(f"generator options: unsupported {sorted(opts)}")
    if not opts.get("disableNameSuffixHash"):
        raise KustomizeLiteError(
            f"{gen['name']}: name suffix hashes are not implemented (set disableNameSuffixHash)"
        )
    data: dict[str, str] = {}
    for spec in gen.get("files") or []:
        key, _, rel = spec.rpartition("=") if "=" in spec else (Path(spec).name, "", spec)
        data[key] = _read_inside(root, rel)
    for literal in gen.get("literals") or []:
        key, _, value = literal.partition("=")
        data[key] = value
    for rel in gen.get("envs") or []:
        for line in _read_inside(root, rel).splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                key, _, value = line.partition("=")
                data[key.strip()] = value
    if kind == "Secret":
        data = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}

    meta: dict[str, Any] = {"name": gen["name"]}
    ns = gen.get("namespace") or namespace
    if ns:
        meta["namespace"] = ns
    if opts.get("labels"):
        meta["labels"] = dict(opts["labels"])
    if opts.get("annotations"):
        meta["annotations"] = dict(opts["annotations"])
    obj: dict[str, Any] = {"apiVersion": "v1", "kind": kind, "metadata": meta, "data": data}
    if kind == "Secret":
        obj["type"] = gen.get("type", "Opaque")

    behavior = gen.get("behavior", "create")
    existing = [
        o for o in objects if o.get("kind") == kind and o["metadata"].get("name") == gen["name"]
    ]
    if behavior == "create":
        _add(objects, obj, f"{kind} generator {gen['name']}")
    elif behavior in ("merge", "replace"):
        if len(existing) != 1:
            raise KustomizeLiteError(
                f"{gen['name']}: behavior {behavior} needs one existing {kind}"
            )
        old = existing[0]
        if behavior == "replace":
            old["data"] = data
        else:
            old.setdefault("data", {}).update(data)
        for field in ("labels", "annotations"):
            if field in meta:
                old["metadata"].setdefault(field, {}).update(meta[field])
    else:
        raise KustomizeLiteError(f"{gen['name']}: unknown behavior {behavior}")


# ---------------------------------------------------------------------------------------------
def _matches(obj: dict[str, Any], target: dict[str, Any]) -> bool:
    if set(target) - {"group", "version", "kind", "name", "namespace"}:
        raise KustomizeLiteError(f"patch target: unsupported selector {sorted(target)}")
    group, _, version = obj.get("apiVersion", "").rpartition("/")
    meta = obj.get("metadata") or {}
    checks = {
        "group": group,
        "version": version,
        "kind": obj.get("kind", ""),
        "namespace": meta.get("namespace", ""),
    }
    for key, value in checks.items():
        if key in target and target[key] != value:
            return False
    return "name" not in target or re.fullmatch(target["name"], meta.get("name", "")) is not None


def _apply_patch(objects: list[dict[str, Any]], root: Path, entry: dict[str, Any]) -> None:
    if set(entry) - {"path", "patch", "target"}:
        raise KustomizeLiteError(f"patch: unsupported fields {sorted(entry)}")
    text = _read_inside(root, entry["path"]) if "path" in entry else entry["patch"]
    docs = load_yaml_docs(text)
    if len(docs) != 1:
        raise KustomizeLiteError("patch: exactly one document expected")
    patch = docs[0]
    target = entry.get("target")
    if isinstance(patch, list):
        if not target:
            raise KustomizeLiteError("JSON 6902 patch needs a target")
        hits = [o for o in objects if _matches(o, target)]
        for obj in hits:
            for op in patch:
                _json6902(obj, op)
    else:
        if target is None:
            target = {"kind": patch.get("kind"), "name": re.escape(patch["metadata"]["name"])}
        hits = [o for o in objects if _matches(o, target)]
        for obj in hits:
            group = obj.get("apiVersion", "").rpartition("/")[0]
            builtin = "." not in group or group.endswith(".k8s.io")
            body = {k: v for k, v in patch.items() if k not in ("apiVersion", "kind", "metadata")}
            merged = _smp(obj, body, builtin, "")
            meta_patch = {k: v for k, v in (patch.get("metadata") or {}).items() if k != "name"}
            merged["metadata"] = _smp(merged["metadata"], meta_patch, builtin, "metadata")
            index = next(i for i, o in enumerate(objects) if o is obj)
            objects[index] = merged
    if not hits:
        raise KustomizeLiteError(f"patch {entry.get('path', '<inline>')}: no resource matches")


def _smp(base: Any, patch: Any, builtin: bool, where: str) -> Any:
    if isinstance(patch, dict) and isinstance(base, dict):
        out = copy.deepcopy(base)
        for key, value in patch.items():
            if key.startswith("$"):
                raise KustomizeLiteError(f"{where}.{key}: patch directives are not implemented")
            if value is None:
                out.pop(key, None)
            else:
                out[key] = _smp(base.get(key), value, builtin, f"{where}.{key}")
        return out
    if isinstance(patch, list) and builtin and any(isinstance(i, dict) for i in patch):
        raise KustomizeLiteError(f"{where}: merging a list of objects is not implemented")
    return copy.deepcopy(patch)


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeLiteError(f"bad JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _json6902(obj: dict[str, Any], op: dict[str, Any]) -> None:
    parts = _pointer(op["path"])
    parent: Any = obj
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    kind = op["op"]
    if kind == "test":
        current = parent[int(last)] if isinstance(parent, list) else parent[last]
        if current != op["value"]:
            raise KustomizeLiteError(f"test failed at {op['path']}: {current!r} != {op['value']!r}")
    elif kind == "remove":
        del parent[int(last) if isinstance(parent, list) else last]
    elif kind == "replace":
        if isinstance(parent, list):
            parent[int(last)] = copy.deepcopy(op["value"])
        else:
            if last not in parent:
                raise KustomizeLiteError(f"replace: {op['path']} does not exist")
            parent[last] = copy.deepcopy(op["value"])
    elif kind == "add":
        if isinstance(parent, list):
            idx = len(parent) if last == "-" else int(last)
            parent.insert(idx, copy.deepcopy(op["value"]))
        else:
            parent[last] = copy.deepcopy(op["value"])
    else:
        raise KustomizeLiteError(f"JSON 6902 op {kind!r} is not implemented")


# ---------------------------------------------------------------------------------------------
def split_image(image: str) -> tuple[str, str | None, str | None]:
    """'repo/name:tag@sha256:..' -> (repo/name, tag, digest)."""
    name, _, digest = image.partition("@")
    tag = None
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, digest or None


def _set_images(node: Any, image: dict[str, Any]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    if isinstance(container, dict) and isinstance(container.get("image"), str):
                        container["image"] = _retag(container["image"], image)
            _set_images(value, image)
    elif isinstance(node, list):
        for item in node:
            _set_images(item, image)


def _retag(current: str, image: dict[str, Any]) -> str:
    name, tag, digest = split_image(current)
    if name != image["name"]:
        return current
    name = image.get("newName", name)
    if "digest" in image:
        return f"{name}@{image['digest']}"
    if "newTag" in image:
        return f"{name}:{image['newTag']}"
    return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
