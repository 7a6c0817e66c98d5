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
    """Every module of every room, and of the packages inside a room that are no room themselves
    (pipeline/sources/ is in the room "pipeline")."""
    for room in ALLOWED:
        yield from _package_modules(room, os.path.join(ROOT, *room.split(".")))


def _package_modules(package: str, folder: str):
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(".py"):
            yield (package + "." + name[:-3] if name != "__init__.py" else package), path
        elif os.path.isfile(os.path.join(path, "__init__.py")) and f"{package}.{name}" not in ALLOWED:
            yield from _package_modules(f"{package}.{name}", path)


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
            # `from . import name` needs only name (a submodule, or the package when name lives in it:
            # resolve() falls back to the package); `from .mod import name` needs mod
            found += ([] if node.level and not node.module else [target]) \
                + [f"{target}.{a.name}" for a in node.names if node.level]
    return [f for f in found if f.split(".")[0] in OURS]


def test_the_walk_sees_every_room_and_resolves_relative_imports():
    mods = dict(modules())
    assert {room_of(m) for m in mods} == set(ALLOWED)
    assert "storage.spec" in imports_of("storage.api", mods["storage.api"])
    assert "pipeline.sources" in imports_of("pipeline.stage1.precompute", mods["pipeline.stage1.precompute"])
    # a package inside a room is walked too, in its room
    assert "pipeline.sources.reader" in mods and room_of("pipeline.sources.reader") == "pipeline"
    assert "pipeline.sources.registry" in imports_of("pipeline.sources.reader", mods["pipeline.sources.reader"])


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


# ---- no import circles ------------------------------------------------------------------------------
# A circle (a imports b, b imports a, at any depth, lazily or not) works only as long as every lazy import
# stays lazy and every name is defined before the other side asks for it; moving one import breaks it, far
# from the edit. The rooms above forbid circles between folders; this forbids them inside a folder too.
def our_modules() -> dict[str, str]:
    """Every module of ours, cli and demo included: dotted name -> path."""
    found = dict(modules())
    for script in ("cli", "demo"):
        found[script] = os.path.join(ROOT, script + ".py")
    return found


def resolve(name: str, known) -> str | None:
    """The module an imported dotted name lives in (``pipeline.sources.SourceError`` -> ``pipeline.sources``)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of ours it imports (lazy imports too; a module importing itself is left out)."""
    mods = our_modules()
    graph = {}
    for mod, path in mods.items():
        targets = {resolve(name, mods) for name in imports_of(mod, path)}
        graph[mod] = {t for t in targets if t and t != mod}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One import circle per strongly connected group of modules (Tarjan), each as a path a -> ... -> a."""
    index, low, on_stack, stack, groups = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_circle_through(min(group), group, graph) for group in groups]


def _circle_through(start: str, group: set[str], graph) -> list[str]:
    """The shortest path start -> ... -> start inside one strongly connected group (breadth first)."""
    came_from, frontier = {}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), start]
                if w not in came_from:
                    came_from[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{sorted(group)} is no strongly connected group")


def test_no_import_circles():
    found = circles(import_graph())
    assert not found, "import circles: " + "; ".join(" -> ".join(c) for c in found) + (
        ". Move what both sides need into a leaf module both import (as pipeline/source_errors.py and "
        "pipeline/augment_ops.py do)")


def test_the_circle_check_can_fail():
    # two circles, one inside a folder and one across, and a diamond that is no circle
    graph = {"pipeline.a": {"pipeline.b"}, "pipeline.b": {"pipeline.a", "storage.x"},
             "student.s": {"pipeline.c"}, "pipeline.c": {"storage.y"}, "storage.y": {"student.s"},
             "cli": {"pipeline.a", "student.s"}, "storage.x": set()}
    assert sorted(circles(graph)) == [["pipeline.a", "pipeline.b", "pipeline.a"],
                                      ["pipeline.c", "storage.y", "student.s", "pipeline.c"]]
    assert circles({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) == []


def test_the_graph_sees_lazy_imports():
    # the manifest imports storage.base inside a function only; the graph must still hold that edge
    graph = import_graph()
    assert "storage.base" in graph["pipeline.sources.manifest"]
    assert "demo" in graph["cli"]


_CONFLICT = ("<<<<<<< ", ">>>>>>> ")  # what git writes around a conflict (its "=======" is also a heading rule)


def _conflicted_lines(text: str) -> list[int]:
    return [i + 1 for i, line in enumerate(text.splitlines()) if line.startswith(_CONFLICT)]


def test_no_file_holds_a_merge_conflict():
    """A merge once left its conflict markers in docs/BENCHMARKS.md for a session: every text file of the
    tree is looked at."""
    found = []
    for top, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "node_modules", "data", "runs",
                                                                          "demo-out", "build")]
        for name in files:
            if name.endswith((".py", ".md", ".toml", ".txt", ".cfg", ".yaml", ".yml", ".json")) or name == "Makefile":
                path = os.path.join(top, name)
                with open(path, encoding="utf-8", errors="replace") as f:
                    found += [f"{os.path.relpath(path, ROOT)}:{n}" for n in _conflicted_lines(f.read())]
    assert not found, found
    assert _conflicted_lines("a\n<<<<<<< HEAD\nb\n=======\nc\n>>>>>>> other\n") == [2, 6]  # (the check can fail)
