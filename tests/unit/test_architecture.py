"""The package's layering, checked from the source: every import (function-level ones included)
points to the module's own layer or one below it, and the import graph has no cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "platform"

# Lowest first. A module may import from its own layer and the layers before it, never after.
LAYERS = [
    ("vocabulary", ["polytask", "polytask.tasks", "polytask.errors", "polytask.durable"]),
    ("config", ["polytask.config"]),
    ("model", ["polytask.model"]),
    ("tracking", ["polytask.tracking"]),
    ("training", ["polytask.training"]),
    ("compression", ["polytask.compression"]),
    ("serve", ["polytask.serve"]),
    ("apps", ["polytask.cli", "polytask.demo", "polytask.quickstart", "polytask.batch",
                "polytask.batch_files"]),
]


def _modules() -> dict[str, Path]:
    out = {}
    for file in (ROOT / "polytask").rglob("*.py"):
        parts = file.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = file
    return out


def _layer(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            inside = module == p or (p != "polytask" and module.startswith(p + "."))
            if inside and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{module} is in no layer; add it to LAYERS (and docs/architecture.md)"
    return rank


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for name, file in mods.items():
        for node in ast.walk(ast.parse(file.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    targets.append(sub if sub in mods else node.module)
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            graph[name].update(t for t in targets if t.startswith("polytask") and t != name)
    return graph


def test_every_module_is_in_a_layer_and_imports_only_downwards() -> None:
    graph = _graph()
    assert len(graph) > 20  # the walk found the package
    upward = [
        f"{src} ({LAYERS[_layer(src)][0]}) imports {dst} ({LAYERS[_layer(dst)][0]})"
        for src, dsts in graph.items()
        for dst in dsts
        if dst != "polytask" and _layer(dst) > _layer(src)
    ]
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt == "polytask":
                continue
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_serving_never_imports_training_or_compression() -> None:
    """A Serve replica must not pull in the training stack (datasets, Ray Train) or the tool."""
    graph = _graph()
    seen, todo = set(), ["polytask.serve.ingress", "polytask.serve.app"]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        todo.extend(graph.get(mod, ()))
    bad = sorted(m for m in seen if m.startswith(("polytask.training", "polytask.compression")))
    assert not bad, f"serving reaches {bad}"


def test_the_http_front_reads_a_model_without_importing_torch(untrained_bundle: Path) -> None:
    """The Ingress only needs the manifest: a new Ingress replica (autoscaling, a redeploy) must
    not pay for importing torch, transformers or MLflow on a bundle path."""
    code = (
        "import sys\n"
        "from polytask.serve.ingress import Ingress\n"
        "from polytask.serve.http import create_api\n"
        "from polytask.serve.refs import local_bundle\n"
        "from polytask.model.manifest import read_manifest\n"
        "tasks = [s.name for s in read_manifest(local_bundle(sys.argv[1])).tasks]\n"
        "print(tasks, sorted(m for m in ('torch', 'transformers', 'mlflow') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(untrained_bundle)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['sentiment', 'ner'] []"


# Standard-library names the package uses and the first Python that has them.
NEWER_STDLIB = {"asyncio.timeout": (3, 11), "tomllib": (3, 11), "typing.Self": (3, 11)}


def test_requires_python_admits_only_pythons_the_code_runs_on():
    """pyproject's requires-python must exclude every Python older than a stdlib feature the
    package uses (asyncio.timeout on 3.10 made every POST answer 500)."""
    import tomllib

    from packaging.specifiers import SpecifierSet

    pyproject = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())
    spec = SpecifierSet(pyproject["project"]["requires-python"])
    used = {}
    for module, file in _modules().items():
        for node in ast.walk(ast.parse(file.read_text())):
            name = None
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                name = f"{node.value.id}.{node.attr}"
            elif isinstance(node, ast.Import):
                name = next((a.name for a in node.names if a.name in NEWER_STDLIB), None)
            elif isinstance(node, ast.ImportFrom) and node.module:
                name = next(
                    (
                        f"{node.module}.{a.name}"
                        for a in node.names
                        if f"{node.module}.{a.name}" in NEWER_STDLIB
                    ),
                    None,
                )
            if name in NEWER_STDLIB:
                used[name] = module
    assert used, "none of NEWER_STDLIB found: the scan is broken (asyncio.timeout is in serve)"
    for name, module in used.items():
        major, minor = NEWER_STDLIB[name]
        older = f"{major}.{minor - 1}"
        assert not spec.contains(older), (
            f"{module} uses {name} (Python {major}.{minor}+) but requires-python '{spec}' "
            f"admits {older}"
        )
