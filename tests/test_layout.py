"""The shape of the tree holds by construction: layering and lint (scripts/lint.sh), SQL only in the store, short
functions, and a README layout table that names every module."""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ("flows", "tasks", "tokenclean", "infra")
PRODUCTION = (*PACKAGE, "benchmarks", "scripts")
MAX_FUNCTION_LINES = 60


def _modules(*folders: str) -> list[Path]:
    return sorted(p for d in folders for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)


def _in_store(path: Path) -> bool:
    return path.relative_to(ROOT).parts[:2] == ("tasks", "store")


def test_lint_and_import_contracts_pass():
    """ruff, and import-linter's contracts: cli -> flows -> tasks -> store -> vocabulary, no cycle anywhere."""
    res = subprocess.run(["bash", str(ROOT / "scripts/lint.sh")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "Contracts: 3 kept, 0 broken" in res.stdout


def test_no_sql_outside_the_store():
    """All SQL of the package lives in tasks/store: nothing else imports duckdb or calls a connection's execute/sql.
    (benchmarks/ranking measures SQL strategies against each other, so it is outside this rule.)"""
    found = []
    for path in _modules(*PACKAGE):
        if _in_store(path):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                found += [f"{path.relative_to(ROOT)}:{node.lineno} imports duckdb"
                          for n in names if n.split(".")[0] == "duckdb"]
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr in ("execute", "executemany", "sql")):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} calls .{node.func.attr}()")
    assert not found, found


def test_no_function_over_60_lines_outside_tests():
    long = []
    for path in _modules(*PRODUCTION):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.name} ({n} lines)")
    assert not long, long


def _layout_rows() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]


def test_readme_layout_table_matches_the_tree():
    """Every path the layout table names exists, and every module of flows/, tasks/ and tokenclean/ is named
    (by its own path or a folder row)."""
    named = [p for row in _layout_rows() for p in re.findall(r"`([^`]+)`", row)]
    assert named, "the README has no layout table"
    missing = [p for p in named if not (ROOT / p).exists()]
    assert not missing, f"the layout table names paths the tree lacks: {missing}"
    folders = [p for p in named if p.endswith("/")]
    unnamed = [rel for rel in (str(m.relative_to(ROOT)) for m in _modules("flows", "tasks", "tokenclean"))
               if not rel.endswith("__init__.py") and rel not in named and not rel.startswith(tuple(folders))]
    assert not unnamed, f"modules the layout table does not name: {unnamed}"


def test_the_demo_config_bound_is_the_synthetic_world_size():
    from tokenclean.config import MAX_PEOPLE
    from tokenclean.synth import FIRST, LAST

    assert len(FIRST) * len(LAST) == MAX_PEOPLE
