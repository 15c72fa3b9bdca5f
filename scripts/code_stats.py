"""Code size of the package (issue 24's before/after): code and docstring lines, largest modules, functions over
60 lines. Usage: python scripts/code_stats.py [REPO_ROOT]"""
import ast
import pathlib
import sys


def _docstring_lines(tree) -> set[int]:
    lines = set()
    for n in ast.walk(tree):
        kinds = (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
        if isinstance(n, kinds) and n.body and isinstance(n.body[0], ast.Expr):
            v = n.body[0].value
            if isinstance(v, ast.Constant) and isinstance(v.value, str):
                lines.update(range(n.body[0].lineno, n.body[0].end_lineno + 1))
    return lines


def main(root: pathlib.Path) -> None:
    files = [p for d in ("flows", "tasks", "tokenclean", "infra") for p in (root / d).rglob("*.py")]
    code = doc = 0
    long, sizes = [], []
    for p in files:
        src = p.read_text()
        tree = ast.parse(src)
        docl = _docstring_lines(tree)
        for n in ast.walk(tree):
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.end_lineno - n.lineno + 1 > 60:
                long.append((n.end_lineno - n.lineno + 1, f"{p.relative_to(root)}:{n.name}"))
        n_code = sum(1 for i, line in enumerate(src.splitlines(), 1)
                     if line.strip() and not line.strip().startswith("#") and i not in docl)
        code, doc = code + n_code, doc + len(docl)
        sizes.append((n_code, str(p.relative_to(root))))
    print(f"code lines {code}, docstring lines {doc}, files {len(files)}")
    print("largest:", ", ".join(f"{n} {s}" for n, s in sorted(sizes, reverse=True)[:8]))
    print("functions >60 lines:", len(long))
    for n, name in sorted(long, reverse=True):
        print("  ", n, name)


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "."))
