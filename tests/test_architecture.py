"""Imports point one way. The rules below are the table in DEVELOPERS.md ("Layout and import
direction"); change both together.

Top level: pipelines -> connectors -> felrec_stream; training -> felrec_stream; only the CLI
package (felrec_stream/cli), the composition root, may import everything. Inside felrec_stream the
foundations import only each other, state never imports the read side, stream and data never
import state, model code (felrec_stream/model, the baselines' models) is pure, and only the HTTP
layer of the read side (serving/app.py) imports FastAPI.

No import cycles between project modules either (function-local imports count).
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOUNDATION_MODULES = ("config", "errors", "log", "device", "faults", "progress", "scoring")
FOUNDATIONS = frozenset(f"felrec_stream.{name}" for name in FOUNDATION_MODULES)
PURE = frozenset({"torch", "numpy", "felrec_stream.config", "felrec_stream.errors", "felrec_stream.model"})
READ_SIDE = frozenset({"felrec_stream.serving", "felrec_stream.cli"})
HTTP = frozenset({"fastapi", "uvicorn", "prometheus_client", "felrec_stream.serving.app"})  # the HTTP layer only


@dataclass(frozen=True)
class Rule:
    """Files under `scope` (a folder or a file) import only `allow` and never `deny` (module prefixes).

    `project_only`: `allow` limits imports of project packages only; otherwise it limits every
    import but the standard library's (pure model code).
    """

    scope: str
    allow: frozenset[str] | None = None
    deny: frozenset[str] = frozenset()
    project_only: bool = True
    exempt: str | None = None  # a folder inside scope the rule does not apply to


RULES = [
    Rule("felrec_stream", allow=frozenset({"felrec_stream"}), exempt="felrec_stream/cli"),
    Rule("connectors", allow=frozenset({"connectors", "felrec_stream"})),
    Rule("pipelines", allow=frozenset({"pipelines", "connectors", "felrec_stream"})),
    Rule("training", allow=frozenset({"training", "felrec_stream"})),
    *(Rule(f"felrec_stream/{name}.py", allow=FOUNDATIONS) for name in FOUNDATION_MODULES),
    Rule("felrec_stream/parallel.py", allow=FOUNDATIONS | {"felrec_stream.model"}),
    Rule("felrec_stream/model", allow=PURE, project_only=False),
    Rule("training/baselines/models.py", allow=PURE, project_only=False),
    Rule("felrec_stream/state", deny=READ_SIDE),
    Rule("felrec_stream/stream", deny=READ_SIDE | {"felrec_stream.state"}),
    Rule("felrec_stream/data", deny=READ_SIDE | {"felrec_stream.state"}),
    *(Rule(f"felrec_stream/serving/{name}.py", deny=HTTP) for name in ("query", "ranking", "snapshots", "export")),
]
PROJECT = ("felrec_stream", "connectors", "pipelines", "training")


def _matches(module: str, prefixes: frozenset[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def imported_modules(path: Path) -> set[str]:
    """Absolute names a file imports; `from a.b import c` counts as a.b.c (c may be a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0 and node.module, f"{path}: use absolute imports"
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _files(rule: Rule) -> list[Path]:
    scope = ROOT / rule.scope
    files = [scope] if scope.is_file() else sorted(scope.rglob("*.py"))
    return [f for f in files if rule.exempt is None or not f.is_relative_to(ROOT / rule.exempt)]


def _violations(rule: Rule, path: Path) -> list[str]:
    bad = []
    for module in imported_modules(path):
        top = module.split(".")[0]
        checked = top in PROJECT if rule.project_only else top not in sys.stdlib_module_names
        if rule.allow is not None and checked and not _matches(module, rule.allow):
            bad.append(module)
        if _matches(module, rule.deny):
            bad.append(module)
    return sorted(bad)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.scope)
def test_imports_point_one_way(rule):
    files = _files(rule)
    assert files, f"{rule.scope}: no such module or package (update RULES and DEVELOPERS.md)"
    offenders = [f"{p.relative_to(ROOT)} imports {bad}" for p in files if (bad := _violations(rule, p))]
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("scope", ["felrec_stream/model", "training/baselines/models.py"])
def test_model_files_do_no_io(scope):
    """Pure model code holds nn.Modules and tensor functions only: not even `open`."""
    for path in _files(Rule(scope)):
        names = {n.id for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Name)}
        assert "open" not in names, f"{path.relative_to(ROOT)} opens files"


def test_violations_are_reported(tmp_path):
    """The checker itself: prefixes end at a dot; allow-lists and deny-lists both bite."""
    path = tmp_path / "m.py"
    path.write_text("import faiss\nimport os\nfrom torch import nn\nfrom felrec_stream.modelling import x\n"
                    "from felrec_stream.state.store import Kind\n")
    assert _violations(Rule("m.py", allow=PURE, project_only=False), path) == [
        "faiss", "felrec_stream.modelling.x", "felrec_stream.state.store.Kind"]
    only_state = Rule("m.py", deny=frozenset({"felrec_stream.state"}))
    assert _violations(only_state, path) == ["felrec_stream.state.store.Kind"]


# ---- no import cycles ----------------------------------------------------------------------------

# Cycles that exist today and are removed by work under way elsewhere; nothing else may be added here.
KNOWN_CYCLES: dict[frozenset[str], str] = {}  # none left: add one only with the work that removes it


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports. Every import counts, function-local ones
    included (they cycle at run time just the same; a local import is a way to hide a cycle, not to
    remove it). `from a.b import c` is an edge to a.b.c when that is a module, else to a.b."""
    files = [path for top in PROJECT for path in sorted((ROOT / top).rglob("*.py"))]
    modules = {_module_name(path): path for path in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for imported in imported_modules(path):
            parts = imported.split(".")
            target = next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in modules),
                          None)
            if target is not None and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        cycles.append(frozenset(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return cycles


def test_no_import_cycles():
    cycles = [sorted(c) for c in import_cycles(import_graph()) if c not in KNOWN_CYCLES]
    assert not cycles, "import cycles (module-level or function-local imports):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_cycles_are_found():
    """The checker itself: a cycle through three modules is one component; a chain is none."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert import_cycles(graph) == [frozenset({"a", "b", "c"})]
    assert import_cycles({"a": {"b"}, "b": set()}) == []
