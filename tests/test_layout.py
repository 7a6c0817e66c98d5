"""The folders are the dependency graph (docs/DESIGN.md, "Layout, and why"): this test reads every module's
imports (with ast, nothing is imported) and refuses an import that runs the wrong way."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# room -> the rooms its modules may import. A room is a package path; "pipeline" means its top level only.
ALLOWED = {
    "storage": {"storage"},
    "pipeline": {"storage", "pipeline"},
    "pipeline.stage1": {"storage", "pipeline", "pipeline.stage1"},
    "pipeline.tools": {"storage", "pipeline", "pipeline.stage1", "pipeline.tools"},
    "student": {"storage", "pipeline", "student"},
}
OURS = ("storage", "pipeline", "student", "cli", "demo")


def room_of(module: str) -> str | None:
    """The room of a dotted module name of ours, or None for cli/demo (which may import anything)."""
    parts = module.split(".")
    if parts[0] in ("cli", "demo"):
        return None
    if parts[0] == "pipeline" and len(parts) > 2 or parts[:2] in (["pipeline", "stage1"], ["pipeline", "tools"]):
        return ".".join(parts[:2]) if parts[1] in ("stage1", "tools") else "pipeline"
    return parts[0]


def modules():
    for room in ALLOWED:
        folder = os.path.join(ROOT, *room.split("."))
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py"):
                mod = room + "." + name[:-3] if name != "__init__.py" else room
                yield mod, os.path.join(folder, name)


def imports_of(module: str, path: str) -> list[str]:
    """Dotted names of ours that a module imports, relative imports resolved, at any depth (lazy ones too)."""
    tree = ast.parse(open(path).read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found += [target] + [f"{target}.{a.name}" for a in node.names if node.level]
    return [f for f in found if f.split(".")[0] in OURS]


def test_the_walk_sees_every_room_and_resolves_relative_imports():
    mods = dict(modules())
    assert {room_of(m) for m in mods} == set(ALLOWED)
    assert "storage.spec" in imports_of("storage.api", mods["storage.api"])
    assert "pipeline.sources" in imports_of("pipeline.stage1.precompute", mods["pipeline.stage1.precompute"])


@pytest.mark.parametrize("module,path", list(modules()))
def test_imports_run_one_way(module, path):
    room = room_of(module)
    wrong = sorted({t for t in imports_of(module, path) if room_of(t) not in ALLOWED[room]})
    assert not wrong, f"{module} ({room}) imports {wrong}; {room} may import only {sorted(ALLOWED[room])}"


def test_the_rule_can_fail():
    # student importing stage one, and storage importing pipeline, are what the rule exists to refuse
    assert room_of("pipeline.stage1.teacher") not in ALLOWED["student"]
    assert room_of("pipeline.sources") not in ALLOWED["storage"]
    assert room_of("pipeline.tools.lookup") not in ALLOWED["pipeline.stage1"]
