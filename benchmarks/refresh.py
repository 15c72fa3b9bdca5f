"""A scheduled refresh that adds data, against a fresh run of the same inputs.

    python benchmarks/refresh.py --added 0.03 --out refresh.json

On the demo's data (the embedded model and its generated SFT set, ``tokenclean/configs/demo.yaml``'s
training settings, the fixed-model refresh flow ``tokenclean refresh`` runs), for each layout of the
warm-up set:

* ``drawn``: D0 drawn from ``data.paths`` by id (no ``data.warmup_paths``), ``refresh.reference: keep``;
* ``file``: D0 given as its own file (``data.warmup_paths``: the rows the drawn split puts in D0).

it times three refreshes, each in a fresh process: ``first`` (the run's first refresh, empty run
directory), ``incremental`` (the same directory after ``--added`` of the rows were appended: new ids, new
content) and ``fresh`` (the appended inputs in an empty directory). Reported: wall time of each, the
samples each model scored and reused, whether the reference was retrained, and incremental / fresh.
Wall time includes the process's Ray and Prefect start-up, as a scheduled refresh pays it.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _config(workdir: Path, data: dict, warmup: Path | None) -> dict:
    import yaml

    cfg = yaml.safe_load((ROOT / "tokenclean" / "configs" / "demo.yaml").read_text())
    cfg.update(name="refresh", workdir=str(workdir), mode="fixed")
    cfg["data"] = dict(cfg["data"], paths=[str(data["pool"])], eval_paths=[str(data["eval"])])
    if warmup is not None:
        cfg["data"]["warmup_paths"] = [str(warmup)]
    return cfg


def child(config: str) -> dict:
    """One refresh in this process: its result and wall time."""
    from tokenclean.config import RunConfig
    from tokenclean.flows.cleaning import refresh

    cfg = RunConfig.model_validate(json.loads(config))
    t0 = time.perf_counter()
    out = refresh(cfg)
    return {"seconds": time.perf_counter() - t0, "samples": out["samples"], "reference": out["reference"],
            "inputs": out["refresh"], "n_kept": out["selection"]["n_kept"]}


def _refresh(cfg: dict) -> dict:
    res = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(res.stderr[-4000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open()]


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--added", type=float, default=0.03, help="share of rows appended")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child)))
        return

    from tokenclean.config import RunConfig
    from tokenclean.embedded import EmbeddedSpec, build
    from tokenclean.tasks.ingest import assign_part

    e = RunConfig().embedded
    built = build(EmbeddedSpec.of(e))
    rows = _rows(Path(built.train))
    for i, r in enumerate(rows):  # the ids the drawn split hashes (rows without one are keyed by content)
        r.setdefault("id", f"row-{i}")
    n_add = max(1, round(args.added * len(rows)))
    added = [dict(r, id=f"added-{i}", response=r["response"] + " Indeed.") for i, r in enumerate(rows[:n_add])]
    T = RunConfig().iterations
    results = {}
    with tempfile.TemporaryDirectory(prefix="tokenclean-bench-refresh-") as tmp:
        root = Path(tmp)
        for layout in ("drawn", "file"):
            if layout == "drawn":
                base_rows, warmup = rows, None
            else:
                warmup = _write(root / layout / "warmup.jsonl",
                                [r for r in rows if assign_part(r["id"], 0, 0.0, T + 1, False) == 0])
                base_rows = [r for r in rows if assign_part(r["id"], 0, 0.0, T + 1, False) != 0]
            data = {"pool": _write(root / layout / "pool.jsonl", base_rows), "eval": Path(built.eval)}
            first = _refresh(_config(root / layout / "run", data, warmup))
            _write(data["pool"], base_rows + added)
            incremental = _refresh(_config(root / layout / "run", data, warmup))
            fresh = _refresh(_config(root / layout / "fresh", data, warmup))
            results[layout] = {"first": first, "incremental": incremental, "fresh": fresh,
                               "ratio": incremental["seconds"] / fresh["seconds"]}
    out = {"rows": len(rows), "added": n_add, "iterations": T, "machine": platform.processor() or platform.machine(),
           "results": results}
    print(f"{len(rows):,} rows, {n_add} appended ({args.added:.0%}); T = {T}")
    print(f"{'layout':<7} {'refresh':<12} {'seconds':>8} {'base scored/reused':>20} {'ref scored/reused':>19} "
          f"{'theta_1':>10}")
    for layout, r in results.items():
        for name in ("first", "incremental", "fresh"):
            x = r[name]
            b, f = x["samples"]["base"], x["samples"]["reference"]
            print(f"{layout:<7} {name:<12} {x['seconds']:>8.1f} {b['scored']:>10}/{b['reused']:<9} "
                  f"{f['scored']:>9}/{f['reused']:<9} {'retrained' if x['reference']['retrained'] else 'reused':>10}")
        print(f"{layout:<7} incremental / fresh = {r['ratio']:.2f}")
    if args.out:
        args.out.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
