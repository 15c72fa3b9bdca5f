"""The scoring stage end to end against its own scorer: how much of the scorer's speed the pipeline keeps.

    python benchmarks/pipeline.py --rows 60000 --repeats 2 --out pipeline.json

One process generates N synthetic rows (``tokenclean.synth``, the demo's world; about 33
tokens a row, so 60,000 rows are about 2M tokens) and ingests them with the embedded demo
model's tokenizer. Then, per repeat, two fresh processes measure the same samples with
the same model:

* ``scorer``: ``ScoringModel.losses`` alone, in one process, over every pool sample in one
  call (after a small untimed warm-up call; the model load and reading the samples from
  DuckDB are not counted). This is the speed the pipeline is measured against.
* ``pipeline``: the scoring stage as ``tokenclean run`` runs it, from a copy of the
  ingested database with no losses yet: a Prefect flow on the Ray task runner (local
  cluster, ``ray.num_cpus`` = cores), ``score_model`` (shard planning, Ray tasks that load
  the model once per worker, score and write Parquet shard files, the driver loading each
  into DuckDB) and the integrity check. Timed from the flow call to its return; the Ray
  cluster and the Prefect API server are started before (``tokenclean run`` starts them
  once for both flows) and their start-up is reported on its own.

The figure of merit is the ratio of the two tokens/s in the same repeat. The pipeline's
breakdown (driver: planning, reading samples, submitting, waiting, DuckDB loads, progress;
workers: model load, losses, file writes) comes from ``score_model``'s ``timing`` stats.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _config(workdir: Path, name: str, paths: dict, shard_samples: int | None, batch_tokens: int) -> dict:
    score = {"batch_tokens": batch_tokens}
    if shard_samples:
        score["shard_samples"] = shard_samples
    return {"name": name, "workdir": str(workdir), "model": {"base": "embedded"}, "iterations": 2,
            "data": {"paths": [str(paths["train"])], "eval_paths": [str(paths["eval"])], "max_length": 256},
            "score": score, "ray": {"num_cpus": os.cpu_count() or 1}}


def _data(rows: int, workdir: Path) -> dict:
    from tokenclean.config import RunConfig
    from tokenclean.synth import SynthSpec, generate

    demo = RunConfig().embedded
    return generate(SynthSpec(n_people=demo.n_people, n_train=rows, n_eval=50, seed=99), workdir / "data")


def prepare_child(rows: int, workdir: Path, args) -> dict:
    """Generate and ingest the pool; the database under ``workdir/prepared`` is the template of every repeat."""
    from tokenclean.config import RunConfig
    from tokenclean.flows.prepare import prepare

    t0 = time.perf_counter()
    paths = _data(rows, workdir)
    cfg = RunConfig.model_validate(_config(workdir, "prepared", paths, args.shard_samples, args.batch_tokens))
    ctx = prepare(cfg, progress=False)
    ctx.con.close()
    return {"seconds": time.perf_counter() - t0, "ingest": {k: v for k, v in ctx.ingest.items() if k != "changes"}}


def _pool_samples(con, dataset: str, parts: list[int]):
    from tests.ingest_helpers import sample_arrays
    from tokenclean.tasks import store
    from tokenclean.tasks.score import ShardSample

    ids, _ = store.unscored_lengths(con, "-none-", dataset, parts)  # no model has this key: every pool sample
    return [ShardSample(sid, a, m) for sid, a, m in sample_arrays(con, ids)]


def scorer_child(workdir: Path, args) -> dict:
    """``ScoringModel.losses`` alone over the whole pool, in this process."""
    import torch

    from tokenclean.config import RunConfig
    from tokenclean.flows.prepare import resolve_inputs
    from tokenclean.tasks import store
    from tokenclean.tasks.score import ScoringModel

    paths = {"train": workdir / "data/train.jsonl", "eval": workdir / "data/eval.jsonl"}
    cfg = RunConfig.model_validate(_config(workdir, "prepared", paths, args.shard_samples, args.batch_tokens))
    base_path = resolve_inputs(cfg)[0]
    con = store.connect(cfg.db_path, read_only=True)
    (dataset,) = con.execute("SELECT dataset FROM datasets").fetchone()
    t0 = time.perf_counter()
    samples = _pool_samples(con, dataset, list(range(cfg.iterations + 1)))
    fetch_s = time.perf_counter() - t0
    con.close()
    sm = ScoringModel(base_path, device=cfg.model.device, dtype=cfg.model.dtype)
    kw = dict(adapter=None, batch_tokens=cfg.score.batch_tokens, chunk=cfg.score.lm_head_chunk,
              chunk_bytes=cfg.score.lm_head_chunk_bytes)
    sm.losses(samples[:64], **kw)  # warm-up: first-call allocations and kernel selection
    t0 = time.perf_counter()
    table = sm.losses(samples, **kw)
    seconds = time.perf_counter() - t0
    tokens = int(sum(len(s.input_ids) for s in samples))
    return {"samples": len(samples), "tokens": tokens, "rows": table.num_rows, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "fetch_s": fetch_s, "torch_threads": torch.get_num_threads()}


def scoring_stage(config: dict) -> dict:
    """The scoring stage as the pipeline runs it: prepare (the dataset is found by key), the base
    model's losses over the pool (``score_model``), the integrity check."""
    from tokenclean.config import RunConfig
    from tokenclean.flows.artifacts import base, scorer
    from tokenclean.flows.prepare import prepare
    from tokenclean.flows.scoring import score_model
    from tokenclean.tasks import store

    t0, entered = time.perf_counter(), time.time()
    cfg = RunConfig.model_validate(config)
    ctx = prepare(cfg, progress=False)
    try:
        parts = list(range(cfg.iterations + 1))
        key = scorer(ctx, base(ctx))  # the base model's losses key, as ensure_losses derives it
        t1 = time.perf_counter()
        stats = score_model(ctx, "base", key, None, parts, progress=False)
        t2 = time.perf_counter()
        check = store.check_integrity(ctx.con, key, ctx.dataset, parts)
        t3 = time.perf_counter()
        assert check["ok"], check
        assert stats["samples_skipped"] == 0, stats
        return {"prepare_s": t1 - t0, "score_model_s": t2 - t1, "integrity_s": t3 - t2, "span": (entered, time.time()),
                **{k: stats[k] for k in ("samples_scored", "tokens", "shards_scored", "workers", "timing")}}
    finally:
        ctx.con.close()


def pipeline_child(workdir: Path, repeat: int, args) -> dict:
    """The stage in a Prefect flow on the local Ray cluster, from a copy of the ingested database."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from prefect import flow

    from tokenclean.config import RunConfig
    from tokenclean.flows.runtime import prefect_api, ray_session, task_runner

    paths = {"train": workdir / "data/train.jsonl", "eval": workdir / "data/eval.jsonl"}
    name = f"pipeline-{repeat}"
    cfg = RunConfig.model_validate(_config(workdir, name, paths, args.shard_samples, args.batch_tokens))
    template = RunConfig.model_validate(_config(workdir, "prepared", paths, None, args.batch_tokens))
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    cfg.run_dir.mkdir(parents=True)
    shutil.copy(template.db_path, cfg.db_path)
    stage = flow(name="scoring-stage")(scoring_stage)
    t0 = time.perf_counter()
    with prefect_api():
        t1 = time.perf_counter()
        with ray_session(cfg.ray):
            t2 = time.perf_counter()
            if args.settle:
                time.sleep(args.settle)  # let warm_workers finish, as reference training would in a real run
            t3, called = time.perf_counter(), time.time()
            stats = stage.with_options(task_runner=task_runner(cfg.ray))(cfg.model_dump(mode="json"))
            seconds, returned = time.perf_counter() - t3, time.time()
    stats["flow_overhead_s"] = {"start": stats["span"][0] - called, "end": returned - stats["span"][1]}
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    return {**stats, "seconds": seconds, "tokens_per_s": stats["tokens"] / seconds,
            "startup_s": {"prefect_server": t1 - t0, "ray_init": t2 - t1}, "settle_s": t3 - t2}


def _child(kind: str, workdir: Path, args, repeat: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--workdir", str(workdir), "--repeat", str(repeat),
           "--batch-tokens", str(args.batch_tokens), "--settle", str(args.settle)]
    if args.shard_samples:
        cmd += ["--shard-samples", str(args.shard_samples)]
    if kind == "prepare":
        cmd += ["--rows", str(args.rows)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{kind} failed:\n{out.stderr[-6000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _breakdown(p: dict) -> list[tuple[str, float]]:
    d, w = p["timing"]["driver"], p["timing"]["workers"]
    return [("Prefect flow run start", p["flow_overhead_s"]["start"]),
            ("prepare (dataset found by key)", p["prepare_s"]),
            ("score_model: planning", d["plan"]),
            ("score_model: read samples from DuckDB", d["fetch"]),
            ("score_model: submit tasks", d["submit"]),
            ("score_model: wait for results", d["wait"]),
            ("score_model: load shards into DuckDB", d["load"]),
            ("score_model: progress (bar, artifact)", d["progress"]),
            ("integrity check", p["integrity_s"]),
            ("Prefect flow run end", p["flow_overhead_s"]["end"]),
            ("(workers, summed) model load", w.get("model", 0.0)),
            ("(workers, summed) losses", w.get("losses", 0.0)),
            ("(workers, summed) write shard files", w.get("write", 0.0))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=60000, help="generated rows (about 33 tokens each)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--shard-samples", type=int, default=None, help="score.shard_samples (default: the config's)")
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--settle", type=float, default=0.0,
                    help="seconds between Ray start and the stage (workers finish importing, as during training)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the generated data and database here")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        fn = {"prepare": lambda: prepare_child(args.rows, args.workdir, args),
              "scorer": lambda: scorer_child(args.workdir, args),
              "pipeline": lambda: pipeline_child(args.workdir, args.repeat, args)}[args.child]
        print(json.dumps(fn()))
        return
    tmp = None
    workdir = args.workdir
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="tc-pipeline-")
        workdir = Path(tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if not (workdir / "prepared").exists():
            prep = _child("prepare", workdir, args)
            print(f"prepared {prep['ingest'].get('samples')} samples in {prep['seconds']:.1f} s", flush=True)
        else:
            prep = None
        runs = []
        for r in range(args.repeats):
            s = _child("scorer", workdir, args, r)
            p = _child("pipeline", workdir, args, r)
            assert s["tokens"] == p["tokens"], (s["tokens"], p["tokens"])
            runs.append({"scorer": s, "pipeline": p, "ratio": p["tokens_per_s"] / s["tokens_per_s"]})
            print(f"repeat {r}: scorer {s['tokens_per_s']:,.0f} tok/s ({s['seconds']:.1f} s), pipeline "
                  f"{p['tokens_per_s']:,.0f} tok/s ({p['seconds']:.1f} s): ratio {runs[-1]['ratio']:.3f}", flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    last = runs[-1]["pipeline"]
    print(f"\n{last['tokens']:,} tokens, {last['samples_scored']:,} samples, {last['shards_scored']} shards, "
          f"model loads per worker {last['workers']}")
    print(f"{'pipeline stage, last repeat':<46} {'seconds':>8}")
    for label, v in _breakdown(last):
        print(f"{label:<46} {v:>8.2f}")
    print(f"{'stage total':<46} {last['seconds']:>8.2f}")
    print(f"startup before the stage: Prefect server {last['startup_s']['prefect_server']:.1f} s, "
          f"Ray {last['startup_s']['ray_init']:.1f} s")
    ratios = [r["ratio"] for r in runs]
    print(f"\npipeline / scorer tokens/s: median {statistics.median(ratios):.3f} "
          f"({', '.join(f'{x:.3f}' for x in ratios)})")
    if args.out:
        arguments = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                                        "args": arguments, "prepare": prep, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
