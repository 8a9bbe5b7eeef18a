"""The library's import graph, read from the code with ``ast``: no cycle, no upward import, light stage faces.

Layers (docs/ARCHITECTURE.md): the core modules at the top of ``whale_dist/`` < synth < train < embed < index <
identify < orchestration (nightly, demo). A module may import its own layer or a lower one, never a higher one; two
stages of one layer do not exist. Imports inside functions count: a cycle hidden in a function is still a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "whale_dist"
STAGES = ("synth", "train", "embed", "index", "identify")
ORCHESTRATION = ("nightly", "review", "demo", "stats")
HEAVY = ("torch", "ray", "faiss", "timm", "torchvision", "pandas", "pyarrow")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(name: str, known: dict[str, Path]) -> str:
    """The module an import of ``name`` executes: the longest known prefix (``a.b.Name`` -> ``a.b``)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name


def lazy_exports(tree: ast.Module) -> list[str]:
    """Submodules named in a stage face's ``EXPORTS`` dict (imported on first use, still an edge)."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "EXPORTS" for t in node.targets):
            return sorted({v.value for v in node.value.values})
    return []


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {resolve(alias.name, known) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                found.add(resolve(f"{node.module}.{alias.name}", known))
    found |= {f"{name}.{sub}" for sub in lazy_exports(tree)}
    return {m for m in found if m.startswith("whale_dist") and m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def layer(name: str) -> int:
    parts = name.split(".")
    top = parts[1] if len(parts) > 1 else ""
    if top in STAGES:
        return 1 + STAGES.index(top)
    if top in ORCHESTRATION:
        return 1 + len(STAGES)
    return 0


def find_cycle(edges: dict[str, set[str]]) -> list[str]:
    """One cycle as a path of module names, or [] (iterative depth-first search with colours)."""
    state: dict[str, int] = {}
    for root in sorted(edges):
        stack, path = [(root, iter(sorted(edges[root])))], [root]
        state[root] = state.get(root, 0) or 1
        if state[root] == 2:
            continue
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(sorted(edges.get(child, ())))))
                path.append(child)
    return []


def test_the_graph_is_read_from_the_code():
    edges = graph()
    assert "whale_dist.embed.store" in edges["whale_dist.embed.job"]
    assert "whale_dist.embed.embedder" in edges["whale_dist.embed"]  # the lazy face counts
    assert len(edges) > 40


@pytest.mark.parametrize("edges,cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b", "d"}, "b": set(), "d": {"d2"}, "d2": {"d"}}, ["d", "d2", "d"]),
])
def test_cycle_finder(edges, cycle):
    assert find_cycle(edges) == cycle


def test_no_import_cycle():
    assert find_cycle(graph()) == []


def test_no_upward_import():
    upward = [f"{a} -> {b}" for a, targets in graph().items() for b in targets if layer(b) > layer(a)]
    assert upward == []


def test_no_stage_imports_a_sibling_stage_of_its_layer_or_the_cli():
    bad = [f"{a} -> {b}" for a, targets in graph().items() for b in targets
           if b == "whale_dist.cli" or (layer(a) == layer(b) > 0 and a.split(".")[1] != b.split(".")[1])]
    assert bad == []


def test_stage_faces_import_nothing_heavy():
    code = ("import sys; import " + ", ".join(f"whale_dist.{s}" for s in STAGES) + ", whale_dist.config; "
            f"print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("stage", STAGES)
def test_every_public_name_resolves(stage):
    import importlib

    face = importlib.import_module(f"whale_dist.{stage}")
    assert face.__all__ and all(callable(getattr(face, name)) for name in face.__all__)


def test_job_drivers_read_the_model_card_without_torch(tmp_path):
    """The embed, nightly, identify and index drivers check the model's version from ``model.json``; the network
    runs in Ray workers. Importing them and reading a card must not import torch (~1.5 s of every driver's start)."""
    from dataclasses import asdict

    from whale_dist import storage
    from whale_dist.model_card import ModelCard, card_url

    url = str(tmp_path / "model.pt")
    storage.write_json(card_url(url), asdict(ModelCard("test_convnext", 8, 32, version="m1")))
    code = ("import sys; import whale_dist.embed.job, whale_dist.nightly, whale_dist.identify.job, "
            "whale_dist.index.build; from whale_dist.model_card import load_card; "
            f"assert load_card({url!r}).version == 'm1'; "
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
