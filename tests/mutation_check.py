"""Mutation check of the core math: do the fast tests fail when the code they guard is wrong?

Each mutant changes one thing in one function of ``TARGETS`` (an operator, a comparison, a constant, the
order of two arguments, a statement dropped, an SQL operator or sort order, a TrainingArguments keyword
left at transformers' default), and the target's fast tests run against it. A mutant is *killed* when a
test fails, *survived* when they all pass. Survivors are listed in docs/mutation.md, each with the test
that now kills it or the reason it is equivalent.

Run from the repository root (a few minutes per target, sequential)::

    .venv/bin/python tests/mutation_check.py [--target evaluate|select|selection|train|trainargs] [--list]

Hand-rolled on ``ast`` rather than mutmut: mutmut mutates a copy under ``mutants/`` that it expects the
tests to import by path, but here ``tokenclean.tasks`` is mapped onto ``tasks/`` by the editable install's
finder, so the tests would import the unmutated files. This script mutates a scratch copy of the tree laid
out as the installed package (``<scratch>/pkg/tokenclean/tasks`` ...) and puts it first on PYTHONPATH; the
working tree is never written to.
"""
from __future__ import annotations

import argparse
import ast
import copy
import importlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Target:
    name: str
    path: str  # relative to the repository root
    functions: tuple[str, ...]  # every def of these names, nested ones included (methods, local helpers)
    tests: tuple[str, ...]
    keywords_of: str | None = None  # instead of functions: drop each of ``keywords`` from calls to this name
    keywords: tuple[str, ...] = ()


# fastest first: pytest stops at the first failure (-x)
TRAIN_TESTS = ("tests/test_train_evaluate.py::test_training_on_nothing_is_a_clear_error",
               "tests/test_training_cluster.py::test_exported_batches_label_only_kept_response_tokens",
               "tests/test_train_evaluate.py::test_loss_is_the_kept_token_mean_of_a_step",
               "tests/test_training_defaults.py")
TARGETS = [
    Target("evaluate", "tasks/evaluate.py",
           ("last_turn_start", "normalize_answer", "answer_found", "evaluate_model"),
           ("tests/test_train_evaluate.py::test_generation_starts_at_the_last_assistant_turn",
            "tests/test_train_evaluate.py::test_answer_is_found_as_whole_words",
            "tests/test_train_evaluate.py::test_answer_metrics_and_loss_against_a_hand_computed_oracle")),
    Target("select", "tasks/select.py", ("samples_of", "training_rows", "write_training_set"), ("tests/test_store_select.py",)),
    Target("selection", "tasks/store/selection.py", ("write_selection", "_local_sql", "selection_quality"),
           ("tests/test_store_select.py",)),
    Target("train", "tasks/train.py", ("labels_of", "training_table", "lr_at_step", "create_scheduler"),
           TRAIN_TESTS),
    # what is learned: each TrainConfig field that must reach the Trainer
    Target("trainargs", "tasks/train.py", (), TRAIN_TESTS, keywords_of="TrainingArguments",
           keywords=("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
                     "lr_scheduler_type", "warmup_steps", "num_train_epochs", "max_grad_norm", "weight_decay",
                     "seed", "data_seed", "average_tokens_across_devices")),
]

BINOPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
          ast.Mod: ast.FloorDiv}
CMPOPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
          ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
# textual mutations inside SQL strings: comparison, arithmetic, sort order
SQL_SWAPS = [(" <= ", " < "), (" < ", " <= "), (" >= ", " > "), (" > ", " >= "), (" DESC", " ASC"),
             (" + ", " - "), (" - ", " + "), (" // ", " / "), (" % ", " // "), (" = ", " != ")]


def _is_sql(s: str) -> bool:
    return any(w in s for w in ("SELECT", "WHERE", "OVER", "FILTER", "JOIN"))


def _sql_pieces(tree: ast.AST) -> set[int]:
    """Ids of the string constants that are SQL text: whole strings, or pieces of an f-string that is SQL."""
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and _is_sql(n.value):
            out.add(id(n))
        elif isinstance(n, ast.JoinedStr) and _is_sql("".join(
                v.value for v in n.values if isinstance(v, ast.Constant) and isinstance(v.value, str))):
            out |= {id(v) for v in n.values if isinstance(v, ast.Constant)}
    return out


def _stringy(node) -> bool:
    return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str))


def mutations(node: ast.AST, sql: set[int]) -> list[tuple[str, object]]:
    """(description, change) pairs for one node; ``change`` is applied by ``apply``."""
    out: list[tuple[str, object]] = []
    if isinstance(node, ast.BinOp) and type(node.op) in BINOPS and not (_stringy(node.left) or _stringy(node.right)):
        new = BINOPS[type(node.op)]
        out.append((f"{type(node.op).__name__} -> {new.__name__}", ("op", new)))
    elif isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in CMPOPS:
                out.append((f"{type(op).__name__} -> {CMPOPS[type(op)].__name__}", ("cmp", i, CMPOPS[type(op)])))
    elif isinstance(node, ast.BoolOp):
        new = ast.Or if isinstance(node.op, ast.And) else ast.And
        out.append((f"{type(node.op).__name__} -> {new.__name__}", ("op", new)))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        out.append((f"drop {type(node.op).__name__}", ("unwrap",)))
    elif isinstance(node, ast.Constant) and type(node.value) in (int, float, bool):
        if isinstance(node.value, bool):
            out.append((f"{node.value} -> {not node.value}", ("const", not node.value)))
        else:
            new = node.value + 1 if isinstance(node.value, int) else (node.value * 2 or 1.0)
            out.append((f"{node.value!r} -> {new!r}", ("const", new)))
    elif isinstance(node, ast.Constant) and id(node) in sql:
        for old, new in SQL_SWAPS:
            start = 0
            while (i := node.value.find(old, start)) >= 0:
                snippet = node.value[max(0, i - 25):i + len(old) + 15].replace("\n", " ").strip()
                out.append((f"SQL {old.strip()!r} -> {new.strip()!r} in '...{snippet}...'", ("sql", i, old, new)))
                start = i + len(old)
    elif isinstance(node, ast.Call):
        pos = [a for a in node.args if not isinstance(a, ast.Starred)]
        if len(pos) >= 2 and len(pos) == len(node.args):
            out.append(("swap first two arguments", ("swap",)))
    if isinstance(node, (ast.Assign, ast.AugAssign, ast.Expr)) and not (
            isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):
        out.append(("drop statement", ("pass",)))
    return out


def apply(node: ast.AST, change) -> ast.AST:
    kind = change[0]
    if kind == "op":
        node.op = change[1]()
    elif kind == "cmp":
        node.ops[change[1]] = change[2]()
    elif kind == "unwrap":
        return node.operand
    elif kind == "const":
        node.value = change[1]
    elif kind == "sql":
        _, i, old, new = change
        node.value = node.value[:i] + new + node.value[i + len(old):]
    elif kind == "swap":
        node.args[0], node.args[1] = node.args[1], node.args[0]
    elif kind == "pass":
        return ast.Pass()
    elif kind == "kwdrop":
        node.keywords = [k for k in node.keywords if k.arg != change[1]]
    return node


def _sites(tree: ast.Module, target: Target) -> list[tuple[int, str, int, str, object]]:
    """(walk index, function, line, description, change) of every mutant of ``target`` in ``tree``."""
    nodes = list(ast.walk(tree))
    index = {id(n): i for i, n in enumerate(nodes)}
    out = []
    if target.keywords_of:
        for n in nodes:
            if isinstance(n, ast.Call) and getattr(n.func, "id", None) == target.keywords_of:
                out += [(index[id(n)], target.keywords_of, k.lineno, f"drop keyword {k.arg}=", ("kwdrop", k.arg))
                        for k in n.keywords if k.arg in target.keywords]
        return out
    seen, sql = set(), _sql_pieces(tree)
    for fn in nodes:
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.name in target.functions:
            body = fn.body[1:] if fn.body and isinstance(fn.body[0], ast.Expr) and isinstance(
                getattr(fn.body[0], "value", None), ast.Constant) else fn.body  # not the docstring
            for stmt in body:
                for n in ast.walk(stmt):
                    if id(n) in seen:
                        continue
                    seen.add(id(n))
                    line = getattr(n, "lineno", fn.lineno)
                    out += [(index[id(n)], fn.name, line, d, c) for d, c in mutations(n, sql)]
    return out


def mutant_source(tree: ast.Module, walk_index: int, change) -> str:
    tree = copy.deepcopy(tree)
    nodes = list(ast.walk(tree))
    node = nodes[walk_index]
    new = apply(node, change)
    if new is not node:  # replace it in its parent
        for parent in nodes:
            for field, value in ast.iter_fields(parent):
                if value is node:
                    setattr(parent, field, new)
                elif isinstance(value, list) and any(v is node for v in value):
                    value[[i for i, v in enumerate(value) if v is node][0]] = new
    return ast.unparse(ast.fix_missing_locations(tree))


def scratch_tree() -> Path:
    """A copy of the tree, with the package laid out as installed: ``pkg/tokenclean/{flows,tasks,infra}``."""
    root = Path(tempfile.mkdtemp(prefix="tokenclean-mutants-"))
    ignore = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.pyc", "runs", ".pytest_cache", "*.egg-info")
    for name in ("tokenclean", "flows", "tasks", "infra", "tests", "pyproject.toml"):
        src = REPO / name
        (shutil.copytree(src, root / name, ignore=ignore) if src.is_dir() else shutil.copy(src, root / name))
    pkg = root / "pkg" / "tokenclean"
    pkg.mkdir(parents=True)
    for entry in (root / "tokenclean").iterdir():
        (pkg / entry.name).symlink_to(entry)
    for sub in ("flows", "tasks", "infra"):
        (pkg / sub).symlink_to(root / sub)
    return root


def warm_parent(root: Path) -> None:
    """Import the heavy third-party stack once; each mutant's pytest runs in a fork of this process, so it
    skips ~10 s of imports. Nothing of tokenclean is imported here: the fork must import the mutated files."""
    os.environ.update(PYTHONPATH=f"{root / 'pkg'}{os.pathsep}{root}",
                      # these tests run no flow: an address never dialled keeps conftest from starting a server
                      PREFECT_API_URL="http://127.0.0.1:9/api")
    os.environ.setdefault("TOKENCLEAN_CACHE", str(Path.home() / ".cache" / "tokenclean"))
    sys.path[:0] = [str(root / "pkg"), str(root)]
    os.chdir(root)
    for name in ("duckdb", "numpy", "pyarrow", "pytest", "torch", "transformers", "peft", "datasets",
                 "transformers.models.llama.modeling_llama", "transformers.trainer"):
        importlib.import_module(name)
    assert "tokenclean" not in sys.modules


def run_tests(tests: tuple[str, ...], timeout: float) -> tuple[str, float]:
    """Run ``tests`` in a fork (see ``warm_parent``): killed (a test failed or errored), survived, or timeout."""
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: a fresh pytest session, output discarded unless asked for
        if not os.environ.get("MUTATION_VERBOSE"):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
        import pytest

        os._exit(int(pytest.main(["-x", "-q", "-p", "no:cacheprovider", *tests])))
    while time.perf_counter() - t0 < timeout:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(status)
            return ("survived" if rc == 0 else "killed"), time.perf_counter() - t0
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "timeout", time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", action="append", choices=[t.name for t in TARGETS])
    ap.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    ap.add_argument("--match", action="append", help="run only mutants whose 'path:line function: mutation' "
                                                     "contains this text (repeatable)")
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "tokenclean-mutation-results.json"))
    args = ap.parse_args()
    out = Path(args.out).resolve()
    targets = [t for t in TARGETS if not args.target or t.name in args.target]
    results = []
    root = None if args.list else scratch_tree()
    if root:
        warm_parent(root)
    for target in targets:
        original = (REPO / target.path).read_text()
        tree = ast.parse(original)
        sites = [s for s in _sites(tree, target)
                 if not args.match or any(m in f"{target.path}:{s[2]} {s[1]}: {s[3]}" for m in args.match)]
        print(f"== {target.name}: {len(sites)} mutants of {target.path}", flush=True)
        if args.list:
            for _, fn, line, desc, _ in sites:
                print(f"  {target.path}:{line} {fn}: {desc}")
            continue
        dest = root / target.path
        dest.write_text(ast.unparse(tree))  # the baseline runs the unparsed source the mutants are made from
        status, base = run_tests(target.tests, 1800)
        if status != "survived":
            print(f"  baseline fails ({status}): fix the tests first", flush=True)
            return 1
        print(f"  baseline passes in {base:.0f} s", flush=True)
        for walk_index, fn, line, desc, change in sites:
            dest.write_text(mutant_source(tree, walk_index, change))
            status, secs = run_tests(target.tests, max(120.0, 4 * base))
            results.append({"target": target.name, "file": target.path, "line": line, "function": fn,
                            "mutation": desc, "status": status, "seconds": round(secs, 1)})
            print(f"  {status:8s} {target.path}:{line} {fn}: {desc} ({secs:.0f} s)", flush=True)
        dest.write_text(original)
    if results:
        out.write_text(json.dumps(results, indent=1))
        print(f"== results: {out}")

        counts = {s: sum(r["status"] == s for r in results) for s in ("killed", "timeout", "survived")}
        print(f"== {len(results)} mutants: {counts}")
    if root:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
