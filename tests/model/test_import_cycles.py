"""No two modules of ``compass_model`` import each other (at module level or inside a function):
``model.py`` reads and writes its files through ``checkpoint_files.py``, and ``checkpoint.py``
builds models on top of both."""

from __future__ import annotations

import ast

from helpers import REPO_ROOT

PACKAGE = REPO_ROOT / "compass_model"


def _module_name(path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict:
    """``{module: modules of compass_model it imports}``, every import statement counted."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: set() for m in files}
    for mod, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            graph[mod].update(n for n in names if n in files and n != mod)
    return graph


def test_no_two_modules_import_each_other():
    graph = import_graph()
    assert graph["compass_model.checkpoint"] and graph["compass_model.model"]      # the graph is read
    pairs = sorted((a, b) for a in graph for b in graph[a]
                   if a < b and a in graph[b] and "compass_model" not in (a, b))  # the package re-exports
    assert pairs == []


def test_model_and_checkpoint_import_one_way():
    graph = import_graph()
    assert "compass_model.model" in graph["compass_model.checkpoint"]
    assert "compass_model.checkpoint" not in graph["compass_model.model"]
    assert "compass_model.model" not in graph["compass_model.checkpoint_files"]
