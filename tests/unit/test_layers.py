"""Layers point one way (docs/DESIGN.md): api/, builders/ and reconcile/ are pure and import neither
kopf, kubernetes, boto3 nor the ML stack, so they are tested as plain functions and the operator
image stays free of torch.

Two checks: the source (every import statement, with file and line, so a violation is easy to
find) and the running interpreter (importing the layers loads none of those modules, whatever
path an import takes)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "operator" / "kubedistill"
PURE_LAYERS = ("api", "builders", "reconcile")
FORBIDDEN = frozenset(
    {
        "kopf",
        "kubernetes",
        "boto3",
        "botocore",
        "aiobotocore",
        "torch",
        "trl",
        "vllm",
        "transformers",
        "peft",
        "datasets",
        "accelerate",
    }
)
# What each pure layer may import from the package itself.
ALLOWED_INTERNAL = {
    "api": {"api"},
    "builders": {"api", "builders"},
    "reconcile": {"api", "builders", "reconcile"},
}


def _modules(layer: str) -> list[Path]:
    return sorted((PACKAGE / layer).rglob("*.py"))


def _imports(path: Path) -> list[tuple[int, str]]:
    return _imports_in(path.read_text(), path)


def _imports_in(source: str, path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source`` (the text of ``path``), except
    those only for type checkers."""
    tree = ast.parse(source, filename=str(path))
    type_checking = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for node in ast.walk(block)
    }
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                found.append((node.lineno, f"{base}.{node.module}" if node.module else base))
            else:
                found.append((node.lineno, node.module or ""))
    return found


@pytest.mark.parametrize("layer", PURE_LAYERS)
def test_pure_layer_sources_import_no_io_or_ml_library(layer: str) -> None:
    violations = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: imports {name}"
        for path in _modules(layer)
        for line, name in _imports(path)
        if name.split(".")[0] in FORBIDDEN
    ]
    assert not violations, "\n".join(violations)


@pytest.mark.parametrize("layer", PURE_LAYERS)
def test_pure_layer_sources_import_only_lower_layers(layer: str) -> None:
    violations = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: imports {name}"
        for path in _modules(layer)
        for line, name in _imports(path)
        if name.startswith("kubedistill.")
        and name.split(".")[1] not in ALLOWED_INTERNAL[layer]
        and name != "kubedistill"
    ]
    assert not violations, "\n".join(violations)


def test_importing_pure_layers_loads_no_forbidden_module() -> None:
    modules = [
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        for layer in PURE_LAYERS
        for p in _modules(layer)
    ]
    script = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(json.dumps(sorted(n for n in sys.modules if n.split('.')[0] in {sorted(FORBIDDEN)!r})))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_the_checker_sees_violations() -> None:
    """The AST walk finds plain, from-, relative, function-level imports and skips TYPE_CHECKING ones."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "import kopf\n"
        "from kubernetes import client\n"
        "from ..kube import apply\n"
        "def f():\n    import torch\n"
        "if TYPE_CHECKING:\n    import boto3\n"
    )
    names = [name for _, name in _imports_in(source, PACKAGE / "builders" / "x.py")]
    assert names == ["typing", "kopf", "kubernetes", "kubedistill.kube", "torch"]


# --------------------------------------------------------------------------- shared facts, defined once

# (what, where it is defined, a pattern of a second definition or copy elsewhere)
SHARED_FACTS = (
    ("the API group", "api/v1alpha1.py", r"""=\s*["']kubedistill\.io["']"""),
    ("the run's stage names", "api/worker_config.py", r"""Literal\[\s*["']generate["'],\s*["']train["']"""),
    (
        "the worker's exit codes",
        "api/worker_config.py",
        r"^\s*EXIT_(OK|FAILED|INTERNAL|PREEMPTED)\s*(:\s*\w+\s*)?=\s*\d",
    ),
    ("the termination-log path", "api/worker_config.py", r"""=\s*["']/dev/termination-log["']"""),
    ("'exports an adapter'", "api/v1alpha1.py", r"""method\s*==\s*["']lora["']\s+and\s+\S*export\s*==\s*["']adapter"""),
    ("the quality gate", "api/v1alpha1.py", r">=?\s*\S*min_teacher_agreement"),
)


def _second_definitions(pattern: str, home: str) -> list[str]:
    import re

    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = str(path.relative_to(PACKAGE))
        if relative == home:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(pattern, line):
                found.append(f"{relative}:{number}: {line.strip()}")
    return found


@pytest.mark.parametrize(("what", "home", "pattern"), SHARED_FACTS, ids=[f[0] for f in SHARED_FACTS])
def test_each_shared_fact_is_defined_once(what: str, home: str, pattern: str) -> None:
    """The operator, the workers and local mode import these from api/; a copy elsewhere drifts."""
    import re

    assert any(re.search(pattern, line) for line in (PACKAGE / home).read_text().splitlines()), (
        f"{what}: no longer found in {home}: update SHARED_FACTS"
    )
    assert _second_definitions(pattern, home) == [], f"{what} is defined again outside {home}"


def test_the_api_modules_import_each_other_without_a_circle() -> None:
    """api/ is the bottom: its modules form a tree (type-checking imports included), so each can be
    read, and loaded, on its own terms."""
    graph: dict[str, set[str]] = {}
    for path in _modules("api"):
        module = f"kubedistill.api.{path.stem}"
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[module] = {
            node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kubedistill.api.")
        }

    def circle_from(start: str, at: str, seen: tuple[str, ...]) -> tuple[str, ...] | None:
        for imported in sorted(graph.get(at, ())):
            if imported == start:
                return (*seen, imported)
            if imported not in seen:
                found = circle_from(start, imported, (*seen, imported))
                if found:
                    return found
        return None

    circles = [circle for module in graph if (circle := circle_from(module, module, (module,)))]
    assert circles == [], " -> ".join(circles[0])
