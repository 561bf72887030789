"""The house shows the DAG (issue 28): the import graph of kdflow's own code has no circle, no import
that points up a layer, and no private name taken from another module.

    python tests/test_import_graph.py        # prints the graph's counts and every offence

The graph is read from the source (ast), imports inside functions included: a lazy import is still
a dependency, it only moves the circle to run time. Layers, bottom to top:

    backends/, kd/   the core (kd never imports prefect, tasks or flows)
    tasks/           one thin Prefect task per step; imports kd/ and backends/, never flows/
    flows/           the DAGs; import tasks/ and kd/

A module importing its package's parent (`kd.train.loop` runs `kd/train/__init__.py` first) is not an
edge here: only what a module names. A name is private when it starts with one underscore (dunders
such as `__version__` are not).
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("backends", "kd", "tasks", "flows")
LAYER = {"backends": 0, "kd": 0, "tasks": 1, "flows": 2}


@dataclass
class ImportGraph:
    modules: dict[str, Path]
    edges: dict[str, set[str]] = field(default_factory=dict)  # module -> the modules it imports
    upward: list[str] = field(default_factory=list)  # "tasks/train.py:12 tasks.train -> flows.multinode"
    private: list[str] = field(default_factory=list)  # "flows/multinode.py:30 flows.train._child_exception"
    cycles: list[list[str]] = field(default_factory=list)  # strongly connected components of > 1 module
    unparsable: list[str] = field(default_factory=list)  # a syntax error hides a module's imports: an offence too

    @property
    def n_edges(self) -> int:
        return sum(len(v) for v in self.edges.values())

    def summary(self) -> str:
        return (f"{len(self.modules)} modules, {self.n_edges} imports: {len(self.cycles)} cycles, "
                f"{len(self.upward)} upward imports, {len(self.private)} private cross-module names")

    def offences(self) -> list[str]:
        return ([f"cycle: {' <-> '.join(c)}" for c in self.cycles] + [f"upward: {u}" for u in self.upward]
                + [f"private: {p}" for p in self.private] + [f"unparsable: {u}" for u in self.unparsable])


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([target] if target else []))


def _own(name: str, modules) -> str | None:
    """The deepest module of ours that `name` (a dotted import path) names, or None (a third-party import)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in modules:
            return ".".join(parts[:i])
    return None


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _sccs(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted; only those of more than one module."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(edges.get(nxt, ())))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        comp.append(m)
                        if m == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return sorted(out)


def import_graph(root: Path = REPO, packages=PACKAGES, layer=None) -> ImportGraph:
    """Read every module of `packages` under `root` and check the graph (see the module docstring)."""
    layer = LAYER if layer is None else layer
    modules = {_module_name(root, p): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}
    graph = ImportGraph(modules, {m: set() for m in modules})
    for mod, path in modules.items():
        rel = path.relative_to(root)
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except SyntaxError as err:
            graph.unparsable.append(f"{rel}:{err.lineno} {err.msg}")
            continue
        is_package = path.name == "__init__.py"
        aliases: dict[str, str] = {}  # local name -> our module it is bound to (for `alias._private`)
        found: list[tuple[int, str]] = []  # (line, imported module)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    target = _own(a.name, modules)
                    if target is None:
                        continue
                    found.append((node.lineno, target))
                    if a.asname:
                        aliases[a.asname] = target
                    if _private(a.name.split(".")[-1]) and target.rsplit(".", 1)[0] != mod:
                        graph.private.append(f"{rel}:{node.lineno} import {a.name}")
            elif isinstance(node, ast.ImportFrom):
                base = (_resolve_relative(mod, is_package, node.level, node.module) if node.level
                        else node.module or "")
                owner = _own(base, modules)
                if owner is None or owner != base:  # third party (or a name inside a module: not ours)
                    continue
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    if sub in modules:  # `from kd.evidence import manifest`: the submodule itself
                        found.append((node.lineno, sub))
                        aliases[a.asname or a.name] = sub
                    else:
                        found.append((node.lineno, base))
                        if _private(a.name) and base != mod:
                            graph.private.append(f"{rel}:{node.lineno} from {base} import {a.name}")
        for node in ast.walk(tree):  # `import flows.train as t; t._child_exception`
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and _private(node.attr) and aliases[node.value.id] != mod):
                graph.private.append(f"{rel}:{node.lineno} {aliases[node.value.id]}.{node.attr}")
        for line, target in sorted(found):
            if target == mod:
                continue
            graph.edges[mod].add(target)
            top, top_target = mod.split(".")[0], target.split(".")[0]
            if layer.get(top_target, 0) > layer.get(top, 0):
                graph.upward.append(f"{rel}:{line} {mod} -> {target}")
    graph.cycles = _sccs(graph.edges)
    graph.upward = sorted(set(graph.upward))
    graph.private = sorted(set(graph.private))
    return graph


def test_the_import_graph_has_no_cycle_no_upward_import_no_private_name():
    graph = import_graph()
    print(graph.summary())
    assert len(graph.modules) > 80 and graph.n_edges > 300  # it really read the code
    assert graph.offences() == [], graph.summary() + "\n" + "\n".join(graph.offences())


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checker_catches_a_cycle_even_through_an_import_inside_a_function(tmp_path):
    _write(tmp_path, {"kd/__init__.py": "", "kd/a.py": "from kd.b import g\n\ndef f():\n    return g()\n",
                      "kd/b.py": "def g():\n    from kd import a\n    return a\n", "kd/c.py": "import kd.a\n"})
    graph = import_graph(tmp_path, packages=("kd",))
    assert graph.cycles == [["kd.a", "kd.b"]], graph.offences()
    assert graph.upward == [] and graph.private == []
    assert graph.edges["kd.c"] == {"kd.a"}


def test_the_checker_catches_an_upward_import_and_a_private_name(tmp_path):
    _write(tmp_path, {"kd/__init__.py": "", "kd/core.py": "def _helper(): ...\n",
                      "tasks/__init__.py": "", "tasks/t.py": "from kd.core import _helper\n",
                      "flows/__init__.py": "", "flows/f.py": "import kd.core as core\nx = core._helper\n",
                      "flows/g.py": "from . import f\n"})
    _write(tmp_path, {"tasks/up.py": "def run():\n    from flows.f import x\n    return x\n"})
    graph = import_graph(tmp_path, packages=("kd", "tasks", "flows"))
    assert graph.upward == ["tasks/up.py:2 tasks.up -> flows.f"]
    assert graph.private == ["flows/f.py:2 kd.core._helper", "tasks/t.py:1 from kd.core import _helper"]
    assert graph.cycles == [] and graph.edges["flows.g"] == {"flows.f"}


if __name__ == "__main__":
    g = import_graph()
    print(g.summary())
    print("\n".join(g.offences()))
    sys.exit(1 if g.offences() else 0)
