"""The package's dependencies point one way, and stay that way.

An AST scan of every module of src/vflowopt (imports at the top and inside functions alike; only
`if TYPE_CHECKING:` blocks are skipped, as they never run) gives the import graph. It must be acyclic,
every edge must point down the layer order below (docs/architecture.md draws it), and importing each
module alone, in topological order, in a fresh interpreter must work.
"""

from __future__ import annotations

import ast
import functools
import graphlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "vflowopt"

# Low to high: a module may import modules of its own layer or of lower layers, never higher ones.
LAYERS: list[tuple[str, ...]] = [
    ("vflowopt.errors", "vflowopt.files", "vflowopt.checkpoint", "vflowopt.version", "vflowopt.tiny",
     "vflowopt.tiny_families", "vflowopt.video_inputs", "vflowopt.progress"),
    ("vflowopt.registry", "vflowopt.config", "vflowopt.budget", "vflowopt.spaces"),
    ("vflowopt.ops",),
    ("vflowopt.signals",),
    ("vflowopt.models",),
    ("vflowopt.methods",),
    ("vflowopt.runtime",),
    ("vflowopt.api",),
    ("vflowopt.search", "vflowopt.bench", "vflowopt.vqa", "vflowopt.visualize"),
    ("vflowopt.cli", "vflowopt.__main__"),
    ("vflowopt.integrations", "vflowopt.serving"),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    return skip


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """{module: package modules it imports}, edges to a module's own parent package included."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skip = _type_checking_nodes(tree)
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                targets = [target] + [f"{target}.{a.name}" for a in node.names]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def layer_of(module: str) -> int:
    if module == "vflowopt":  # the package re-exports the public API: it sits where its highest import does
        return max(layer_of(t) for t in import_graph()["vflowopt"])
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__} and to docs/architecture.md")


def test_import_graph_is_acyclic():
    graph = import_graph()
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")
    assert set(order) == set(graph)


def test_dependencies_point_down_the_layers():
    upward = [
        f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
        for a, targets in import_graph().items() for b in sorted(targets)
        if layer_of(b) > layer_of(a)
    ]
    assert not upward, "\n".join(upward)


def test_the_registry_and_the_method_contract_import_no_method():
    graph = import_graph()
    for module in ("vflowopt.registry", "vflowopt.config", "vflowopt.methods.base", "vflowopt.models.base"):
        methods = sorted(t for t in graph[module] if t.startswith("vflowopt.methods.") and t != "vflowopt.methods.base")
        assert not methods, f"{module} imports methods {methods}"
    assert not any(t.startswith("vflowopt.models") for t in graph["vflowopt.signals.vision_keys"])


def test_every_module_imports_alone_in_topological_order():
    graph = import_graph()
    order = [m for m in graphlib.TopologicalSorter(graph).static_order() if m != "vflowopt.__main__"]
    script = (
        "import importlib, json, sys\n"
        "failed = []\n"
        f"for name in {json.dumps(order)}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        failed.append(f'{name}: {type(exc).__name__}: {exc}')\n"
        "print(json.dumps(failed))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []

