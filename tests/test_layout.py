"""The package layout: no import cycle at import time, and the documented entry points of the old flat layout work."""

from __future__ import annotations

import ast
import importlib
import os
import pkgutil
import subprocess
import sys

import diffusers_bksdm

PACKAGE_DIR = os.path.dirname(diffusers_bksdm.__file__)


def _module_graph() -> dict[str, set[str]]:
    """module -> package modules it imports at import time (imports inside functions and TYPE_CHECKING excluded)."""
    modules = {"diffusers_bksdm": os.path.join(PACKAGE_DIR, "__init__.py")}
    for info in pkgutil.walk_packages([PACKAGE_DIR], "diffusers_bksdm."):
        spec = importlib.util.find_spec(info.name)
        modules[info.name] = spec.origin
    graph = {}
    for name, path in modules.items():
        is_package = path.endswith("__init__.py")
        base = name.split(".") if is_package else name.split(".")[:-1]
        edges = set()
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in tree.body:  # top level only: what runs when the module is imported
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                parent = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                parent = node.module or ""
            for alias in node.names:
                target = f"{parent}.{alias.name}" if f"{parent}.{alias.name}" in modules else parent
                if target in modules and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_sees_the_subpackages_and_their_imports():
    graph = _module_graph()
    assert {"diffusers_bksdm.training.train", "diffusers_bksdm.evaluation.bench", "diffusers_bksdm.ecosystem.lora",
            "diffusers_bksdm.miniature.tiny", "diffusers_bksdm.configs"} <= set(graph)
    assert "diffusers_bksdm.training.checkpoints" in graph["diffusers_bksdm.training.train"]
    assert "diffusers_bksdm.weights" in graph["diffusers_bksdm.ecosystem.controlnet"]
    # the checker finds a cycle when there is one
    assert _cycle({**graph, "diffusers_bksdm.plan": graph["diffusers_bksdm.plan"] | {"diffusers_bksdm.student"}})


def test_no_import_cycle():
    assert _cycle(_module_graph()) is None


def test_every_module_imports():
    for info in pkgutil.walk_packages([PACKAGE_DIR], "diffusers_bksdm."):
        if not info.name.endswith("__main__"):  # `python -m diffusers_bksdm` runs the command line
            importlib.import_module(info.name)


def test_documented_entry_points_of_the_flat_layout():
    from diffusers_bksdm import tiny, train
    from diffusers_bksdm.miniature import tiny as miniature_tiny
    from diffusers_bksdm.training import train as training_train

    assert train.train is training_train.train and train.main is training_train.main
    assert set(tiny.__all__) == set(miniature_tiny.__all__)
    assert all(getattr(tiny, name) is getattr(miniature_tiny, name) for name in tiny.__all__)
    for name in diffusers_bksdm.__all__:
        assert getattr(diffusers_bksdm, name) is not None, name


def test_python_dash_m_train_runs_the_trainer():
    result = subprocess.run([sys.executable, "-m", "diffusers_bksdm.train", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--pretrained_model_name_or_path" in result.stdout and "--max_train_steps" in result.stdout
