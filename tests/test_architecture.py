"""Imports point one way: pipelines -> connectors -> felrec_stream; training -> felrec_stream.

Only the CLI package (felrec_stream/cli) may import everything.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {
    "felrec_stream": {"felrec_stream"},
    "connectors": {"connectors", "felrec_stream"},
    "pipelines": {"pipelines", "connectors", "felrec_stream"},
    "training": {"training", "felrec_stream"},
}
PROJECT = set(ALLOWED)


def _imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots & PROJECT


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_one_way(package):
    offenders = []
    for path in (ROOT / package).rglob("*.py"):
        if package == "felrec_stream" and "cli" in path.relative_to(ROOT / package).parts[:1]:
            continue
        bad = _imported_roots(path) - ALLOWED[package]
        if bad:
            offenders.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not offenders, "\n".join(offenders)


def test_model_files_are_pure():
    """Model/loss files hold nn.Modules and tensor functions only: no IO, Kafka or FAISS."""
    forbidden = {"kafka", "faiss", "pyarrow", "structlog", "open", "requests"}
    for name in ("model.py", "losses.py"):
        path = ROOT / "felrec_stream" / name
        if not path.exists():
            pytest.skip(f"{name} not written yet")
        tree = ast.parse(path.read_text())
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not (mods | names) & forbidden, f"{name} uses {(mods | names) & forbidden}"
