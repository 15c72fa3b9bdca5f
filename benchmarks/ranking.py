"""Exact global top-k over N token scores: DuckDB ORDER BY/LIMIT vs threshold passes vs numpy.

    python benchmarks/ranking.py --n 1e8 --k 0.6 --out ranking.json

Builds a table scores(sample_id BIGINT, pos INTEGER, score FLOAT) of N rows in a temporary
DuckDB file (400 tokens per sample, scores standard normal via Box-Muller from DuckDB's
random() after setseed), then runs every method in its own subprocess (so its peak RSS,
from os.wait4, is its own), after one warm-up process that reads the file into the page
cache:

* ``order_by``   CREATE TEMP TABLE kept AS SELECT ... ORDER BY score DESC, sample_id, pos LIMIT n_keep
                 (what tasks/select.py's "global" method does today).
* ``bracket``    tokenclean.tasks.store.ranking.global_threshold (sampled bracket, one exact pass)
                 + the global_topk_sql filter into kept.
* ``histogram``  the same with benchmarks/ranking_strategies.py's strategy="histogram" (bucket passes).
* ``quantile``   the same with strategy="quantile" (quantile_disc, then a proving count pass).
* ``hybrid``     the same with strategy="numpy" (score column fetched, in-place np.partition).
* ``numpy``      score column loaded to numpy (load timed on its own), np.partition for t, counts by
                 comparison, and the ties' (sample_id, pos) fetched by ``WHERE score = t`` and
                 lexsorted for the last kept tie: the same threshold information as global_threshold.
* ``numpy_ids``  sample_id, pos and score loaded to numpy; partition + tie handling + the kept
                 index array in numpy (the kept set without DuckDB).

``--relation join`` ranks the candidate-shaped relation (scores JOIN samples, part filter,
isfinite) instead of the bare table, as tasks/select.py does.

All methods must agree on t, the number of rows above t, the ties kept, and a fingerprint
of the kept (sample_id, pos) set (count and two modular hash sums).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOKENS_PER_SAMPLE = 400
METHODS = ("order_by", "bracket", "histogram", "quantile", "hybrid", "numpy", "numpy_ids")
RELATIONS = {
    "table": "SELECT sample_id, pos, score FROM scores",
    # the shape of tasks/select.py's candidates: a join with samples, a part filter, finite scores only
    "join": "SELECT ts.sample_id, ts.pos, ts.score FROM scores ts JOIN samples s USING (sample_id) "
            "WHERE s.part IN (0, 1) AND isfinite(ts.score)",
}
# kept-set fingerprint: sum of two modular hashes of (sample_id, pos); int64-safe in numpy and DuckDB
H1 = (2654435761, 40503, 2147483629)
H2 = (97, 1000003, 1000000007)
FP_SQL = (f"SELECT count(*), sum((sample_id * {H1[0]} + pos * {H1[1]}) % {H1[2]})::BIGINT, "
          f"sum((sample_id * {H2[0]} + pos * {H2[1]}) % {H2[2]})::BIGINT FROM kept")


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _connect(db: str, threads: int | None, memory_limit: str | None):
    import duckdb

    con = duckdb.connect(db)
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    if memory_limit:
        con.execute(f"SET memory_limit = '{memory_limit}'")
    return con


def _settings(con) -> dict:
    import duckdb

    mem, thr, tmp = con.execute("SELECT current_setting('memory_limit'), current_setting('threads'), "
                                "current_setting('temp_directory')").fetchone()
    return {"duckdb": duckdb.__version__, "memory_limit": mem, "threads": thr, "temp_directory": tmp}


def generate(db: str, n: int, seed: float, threads, memory_limit, decimals: int | None = None) -> dict:
    con = _connect(db, threads, memory_limit)
    t0 = time.perf_counter()
    con.execute("SELECT setseed(?)", [seed])
    score = "(sqrt(-2 * ln(1 - random())) * cos(2 * pi() * random()))"
    if decimals is not None:  # big blocks of exact ties
        score = f"round({score}, {int(decimals)})"
    con.execute(f"""CREATE TABLE scores AS
                    SELECT i // {TOKENS_PER_SAMPLE} AS sample_id, (i % {TOKENS_PER_SAMPLE})::INTEGER AS pos,
                           {score}::FLOAT AS score
                    FROM range({int(n)}) t(i)""")
    con.execute(f"CREATE TABLE samples AS SELECT i AS sample_id, (i % 2)::SMALLINT AS part "
                f"FROM range({-(-int(n) // TOKENS_PER_SAMPLE)}) t(i)")
    con.execute("CHECKPOINT")
    out = {"seconds": time.perf_counter() - t0, "settings": _settings(con)}
    out["n_distinct_scores"] = con.execute("SELECT approx_count_distinct(score) FROM scores").fetchone()[0]
    con.close()
    out["db_bytes"] = os.path.getsize(db)
    return out


def _numpy_threshold(score, n_keep: int, ids_of_ties) -> dict:
    """t = n_keep-th largest by np.partition; counts by comparison; last kept tie by lexsort of the ties' ids."""
    import numpy as np

    n = len(score)
    t = np.partition(score, n - n_keep)[n - n_keep]
    above = int(np.count_nonzero(score > t))
    ties = int(np.count_nonzero(score == t))
    need = n_keep - above
    last_tie = None
    if need < ties:
        sid, pos = ids_of_ties(t)
        i = np.lexsort((pos, sid))[need - 1]
        last_tie = (int(sid[i]), int(pos[i]))
    return {"n": n, "n_keep": n_keep, "threshold": float(t), "n_above": above, "n_ties": ties, "need": need,
            "last_tie": last_tie}


def _numpy_fingerprint(sid, pos, kept, chunk: int = 1 << 22) -> list[int]:
    import numpy as np

    f1 = f2 = 0
    for a in range(0, len(kept), chunk):
        idx = kept[a:a + chunk]
        s, p = sid[idx].astype(np.int64), pos[idx].astype(np.int64)
        f1 += int(((s * H1[0] + p * H1[1]) % H1[2]).sum())
        f2 += int(((s * H2[0] + p * H2[1]) % H2[2]).sum())
    return [len(kept), f1, f2]


def _order_by(con, rel: str, n_keep: int, res: dict, t0: float) -> None:
    con.execute(f"CREATE TEMP TABLE kept AS SELECT sample_id, pos, score FROM ({rel}) "
                f"ORDER BY score DESC, sample_id, pos LIMIT {n_keep}")
    res["select_s"] = time.perf_counter() - t0
    t, need = con.execute("SELECT min(score), count(*) FILTER (WHERE score = (SELECT min(score) FROM kept)) "
                          "FROM kept").fetchone()
    res["info"] = {"threshold": t, "need": need, "n_above": n_keep - need}


def _threshold_passes(con, method: str, rel: str, n_keep: int, n_total: int, res: dict, t0: float) -> None:
    """global_threshold with ``method``'s strategy, then the kept table by the threshold filter."""
    from benchmarks.ranking_strategies import global_threshold
    from tokenclean.tasks.store.ranking import global_topk_sql

    info = global_threshold(con, rel, n_keep, strategy="numpy" if method == "hybrid" else method,
                            n_total=n_total)
    res["threshold_s"] = time.perf_counter() - t0
    res["rss_after_threshold_mib"] = _maxrss_mib()
    t1 = time.perf_counter()
    con.execute(f"CREATE TEMP TABLE kept AS {global_topk_sql(rel, n_keep, info, 'sample_id, pos, score')}")
    res["select_s"] = time.perf_counter() - t1
    res["info"] = info


def _numpy_scores(con, rel: str, n_keep: int, res: dict, t0: float) -> None:
    """The score column in numpy; the ties' ids fetched from DuckDB."""
    score = con.execute(f"SELECT score FROM ({rel})").fetchnumpy()["score"]
    res["load_s"] = time.perf_counter() - t0
    res["rss_after_load_mib"] = _maxrss_mib()
    t1 = time.perf_counter()

    def ids_of_ties(t):
        d = con.execute(f"SELECT sample_id, pos FROM ({rel}) WHERE score = ?::FLOAT", [float(t)]).fetchnumpy()
        return d["sample_id"], d["pos"]

    info = _numpy_threshold(score, n_keep, ids_of_ties)
    res["threshold_s"] = time.perf_counter() - t1
    res["rss_after_threshold_mib"] = _maxrss_mib()
    res["info"] = info


def _numpy_ids(con, rel: str, n_keep: int, res: dict, t0: float) -> None:
    """All three columns in numpy: threshold, ties and the kept index array without DuckDB."""
    import numpy as np

    d = con.execute(f"SELECT sample_id, pos, score FROM ({rel})").fetchnumpy()
    sid, pos, score = d["sample_id"], d["pos"], d["score"]
    del d
    res["load_s"] = time.perf_counter() - t0
    res["rss_after_load_mib"] = _maxrss_mib()
    t1 = time.perf_counter()
    info = _numpy_threshold(score, n_keep, lambda t: (sid[score == t], pos[score == t]))
    res["threshold_s"] = time.perf_counter() - t1
    res["rss_after_threshold_mib"] = _maxrss_mib()
    t2 = time.perf_counter()
    t = np.float32(info["threshold"])
    mask = score > t
    if info["need"]:
        tie = np.flatnonzero(score == t)
        mask[tie[np.lexsort((pos[tie], sid[tie]))[:info["need"]]]] = True
    kept = np.flatnonzero(mask)
    res["select_s"] = time.perf_counter() - t2
    res["info"] = info
    res["total_s"] = time.perf_counter() - t0
    res["fingerprint"] = _numpy_fingerprint(sid, pos, kept)


def worker(method: str, db: str, n_keep: int, threads, memory_limit, relation: str = "table") -> dict:
    """One method in this (fresh) process; prints a JSON line. Peak RSS is measured by the parent."""
    # loaded before the start RSS is read, so every method's start figure counts numpy and the strategies alike
    from benchmarks import ranking_strategies  # noqa: F401

    con = _connect(db, threads, memory_limit)
    res = {"method": method, "settings": _settings(con), "rss_start_mib": _maxrss_mib()}
    rel = RELATIONS[relation]
    n_total = con.execute("SELECT count(*) FROM scores").fetchone()[0]  # what select_tokens has already counted
    t0 = time.perf_counter()
    if method == "order_by":
        _order_by(con, rel, n_keep, res, t0)
    elif method in ("bracket", "histogram", "quantile", "hybrid"):
        _threshold_passes(con, method, rel, n_keep, n_total, res, t0)
    elif method == "numpy":
        _numpy_scores(con, rel, n_keep, res, t0)
    elif method == "numpy_ids":
        _numpy_ids(con, rel, n_keep, res, t0)
    else:
        raise ValueError(method)
    res.setdefault("total_s", time.perf_counter() - t0)
    if "fingerprint" not in res and method != "numpy":
        res["fingerprint"] = [int(x) for x in con.execute(FP_SQL).fetchone()]
    con.close()
    return res


def run_child(args: list[str], timeout: float) -> tuple[dict | None, float, float, str]:
    """Run this script as a child; return (its JSON result, wall seconds, peak RSS MiB, stderr tail)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen([sys.executable, __file__, *args], stdout=out, stderr=err, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                p.kill()
                pid, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        lines = [ln for ln in out.read().splitlines() if ln.startswith("{")]
        res = json.loads(lines[-1]) if lines and os.waitstatus_to_exitcode(status) == 0 else None
        return res, wall, ru.ru_maxrss / 1024, err.read()[-2000:]


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _fmt(x, spec=".2f"):
    return "" if x is None else format(x, spec)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=float, default=1e8, help="number of token scores (default 1e8)")
    ap.add_argument("--k", type=float, default=0.6, help="fraction kept: n_keep = round(k * n)")
    ap.add_argument("--relation", choices=sorted(RELATIONS), default="table",
                    help="rank the bare table, or the candidate-shaped join of tasks/select.py")
    ap.add_argument("--decimals", type=int, default=None, help="round scores (large tie blocks)")
    ap.add_argument("--seed", type=float, default=0.42, help="DuckDB setseed value in [-1, 1]")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--repeats", type=int, default=1, help="runs per method (fresh process each); median time")
    ap.add_argument("--threads", type=int, default=None, help="DuckDB threads (default: DuckDB's, = cores)")
    ap.add_argument("--memory-limit", default=None, help="DuckDB memory_limit (default: DuckDB's, 80%% of RAM)")
    ap.add_argument("--tmpdir", default=None, help="where the temporary DuckDB file goes")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per method run")
    ap.add_argument("--keep-db", action="store_true")
    ap.add_argument("--out", default=None, help="write results as JSON here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--db", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n-keep", type=int, default=None, help=argparse.SUPPRESS)
    return ap


def _as_child(a, n: int) -> bool:
    """Run the child role the parent asked for (generate, warm-up, one method); False when this is the parent."""
    if a.generate:
        print(json.dumps(generate(a.db, n, a.seed, a.threads, a.memory_limit, a.decimals)))
        return True
    if a.worker == "warmup":
        con = _connect(a.db, a.threads, a.memory_limit)
        t0 = time.perf_counter()
        con.execute("SELECT sum(sample_id), sum(pos), sum(score) FROM scores").fetchone()
        print(json.dumps({"total_s": time.perf_counter() - t0}))
        return True
    if a.worker:
        print(json.dumps(worker(a.worker, a.db, a.n_keep, a.threads, a.memory_limit, a.relation)))
        return True
    return False


def _generate_and_warm(a, n: int, db: str, duck: list[str], report: dict) -> None:
    gen, wall, rss, err = run_child(["--generate", "--db", db, "--n", str(n), "--seed", str(a.seed), *duck,
                                     *(["--decimals", str(a.decimals)] if a.decimals is not None else [])],
                                    a.timeout)
    if gen is None:
        raise SystemExit(f"generation failed:\n{err}")
    report["generate"] = {**gen, "wall_s": wall, "peak_rss_mib": rss}
    s = gen["settings"]
    print(f"generated in {gen['seconds']:.1f} s, file {gen['db_bytes'] / 2**20:.0f} MiB, "
          f"~{gen['n_distinct_scores']:,} distinct scores; DuckDB {s['duckdb']} memory_limit={s['memory_limit']} "
          f"threads={s['threads']}", flush=True)
    warm, wall, rss, err = run_child(["--worker", "warmup", "--db", db, *duck], a.timeout)
    report["warmup"] = {"wall_s": wall, "peak_rss_mib": rss, **(warm or {})}


def _run_methods(a, methods: list[str], n_keep: int, db: str, duck: list[str], report: dict) -> None:
    for rep in range(a.repeats):
        for m in methods:
            la = _loadavg()
            res, wall, rss, err = run_child(["--worker", m, "--db", db, "--n-keep", str(n_keep),
                                             "--relation", a.relation, *duck], a.timeout)
            run = {"method": m, "repeat": rep, "wall_s": wall, "peak_rss_mib": rss, "loadavg_before": la,
                   "ok": res is not None, **(res or {"error": err})}
            report["runs"].append(run)
            tail = "" if res else f" FAILED: {err.strip().splitlines()[-1:] if err.strip() else 'timeout'}"
            print(f"  {m:<10} total {_fmt(run.get('total_s'))} s  peak RSS {rss:,.0f} MiB{tail}", flush=True)


def _agreement(report: dict, n_keep: int) -> None:
    """All runs agree on the threshold, rows above it, ties kept, last tie and kept-set fingerprint."""
    ok_runs = [r for r in report["runs"] if r["ok"]]
    keys = {}
    for r in ok_runs:
        i = r["info"]
        keys.setdefault("threshold", set()).add(i["threshold"])
        keys.setdefault("n_above", set()).add(i["n_above"])
        keys.setdefault("need", set()).add(i["need"])
        if "last_tie" in i:
            keys.setdefault("last_tie", set()).add(tuple(i["last_tie"]) if i["last_tie"] else None)
        if "fingerprint" in r:
            keys.setdefault("fingerprint", set()).add(tuple(r["fingerprint"]))
    report["agree"] = all(len(v) == 1 for v in keys.values()) and len(ok_runs) == len(report["runs"])
    report["answer"] = {k: (next(iter(v)) if len(v) == 1 else sorted(map(str, v))) for k, v in keys.items()}
    fp = report["answer"].get("fingerprint")
    report["agree"] = report["agree"] and (not isinstance(fp, tuple) or fp[0] == n_keep)


def _table_rows(report: dict, methods: list[str]) -> list[dict]:
    """One row per method: medians over its repeats."""
    rows = []
    for m in methods:
        rs = [r for r in report["runs"] if r["method"] == m and r["ok"]]
        if not rs:
            rows.append({"method": m, "failed": True})
            continue

        def med(f, rs=rs):
            return statistics.median(r[f] for r in rs) if f in rs[0] else None

        rows.append({"method": m, "load_s": med("load_s"), "threshold_s": med("threshold_s"),
                     "select_s": med("select_s"), "total_s": med("total_s"), "process_wall_s": med("wall_s"),
                     "total_min_s": min(r["total_s"] for r in rs), "total_max_s": max(r["total_s"] for r in rs),
                     "loadavg_1min_before": [r["loadavg_before"][0] for r in rs],
                     "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
                     "rss_start_mib": max(r["rss_start_mib"] for r in rs),
                     "rss_threshold_mib": max(r.get("rss_after_threshold_mib") or 0 for r in rs) or None,
                     "passes": rs[0].get("info", {}).get("passes")})
    return rows


def _print_table(a, report: dict) -> None:
    print(f"\nthreshold t = {report['answer'].get('threshold')!r}, above = {report['answer'].get('n_above')}, "
          f"ties kept = {report['answer'].get('need')}, last tie = {report['answer'].get('last_tie')}; "
          f"all methods agree: {report['agree']}")
    print(f"\nrelation: {a.relation}")
    print(f"median of {a.repeats} run(s); total min-max over the runs; 1-min load average before each run")
    print("| method | load s | threshold s | select s | total s | total min-max s | RSS to t MiB | peak RSS MiB "
          "| scans | load avg before |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in report["table"]:
        if r.get("failed"):
            print(f"| {r['method']} | failed | | | | | | | | |")
            continue
        print(f"| {r['method']} | {_fmt(r['load_s'])} | {_fmt(r['threshold_s'])} | {_fmt(r['select_s'])} | "
              f"{_fmt(r['total_s'])} | {r['total_min_s']:.2f}-{r['total_max_s']:.2f} | "
              f"{_fmt(r['rss_threshold_mib'], ',.0f')} | {r['peak_rss_mib']:,.0f} | {r['passes'] or ''} | "
              f"{', '.join(f'{x:.1f}' for x in r['loadavg_1min_before'])} |")
    print(f"load avg start {report['loadavg_start']}, end {report['loadavg_end']}")


def main() -> None:
    ap = _parser()
    a = ap.parse_args()
    n = int(a.n)
    duck = [*(["--threads", str(a.threads)] if a.threads else []),
            *(["--memory-limit", a.memory_limit] if a.memory_limit else [])]
    if _as_child(a, n):
        return

    methods = [m for m in a.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; choose from {METHODS}")
    n_keep = round(a.k * n)
    tmp = Path(tempfile.mkdtemp(prefix="ranking-bench-", dir=a.tmpdir))
    db = str(tmp / "scores.duckdb")
    report = {"n": n, "k": a.k, "decimals": a.decimals, "relation": a.relation,
              "relation_sql": RELATIONS[a.relation], "n_keep": n_keep, "seed": a.seed, "cpus": os.cpu_count(),
              "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
              "python": platform.python_version(), "loadavg_start": _loadavg(), "runs": []}
    try:
        print(f"N = {n:,}  k = {a.k}  n_keep = {n_keep:,}  machine: {report['cpus']} cores, "
              f"{report['ram_gib']} GiB  load avg {report['loadavg_start']}", flush=True)
        _generate_and_warm(a, n, db, duck, report)
        _run_methods(a, methods, n_keep, db, duck, report)
    finally:
        if not a.keep_db:
            shutil.rmtree(tmp, ignore_errors=True)
    report["loadavg_end"] = _loadavg()
    _agreement(report, n_keep)
    report["table"] = _table_rows(report, methods)
    _print_table(a, report)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=1, default=list))
    if not report["agree"]:
        raise SystemExit("methods disagree (or some failed); see the JSON")


if __name__ == "__main__":
    main()
