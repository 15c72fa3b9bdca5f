"""The driver's memory while scoring: peak RSS of the flow process at 1x and 10x the demo's pool.

    python benchmarks/driver_memory.py --sizes 4000,40000 --out driver_memory.json

For each size, one process generates N synthetic rows (``tokenclean.synth``, the demo's
world) and ingests them with the embedded demo model's tokenizer; then a fresh driver
process runs the scoring stage as the pipeline does, a Prefect flow on the local Ray
task runner: prepare (the dataset is found by key, nothing re-ingested), the base
model's losses over the whole pool (workers write shard files to the run's storage, the
driver loads them into DuckDB by path), then the integrity check. A thread samples the
driver's RSS every 20 ms, per phase (the shard loop, then the integrity check). Only the
driver process is measured: the Ray workers, raylet and Prefect server are other processes.

The figures of merit, at 10x against 1x in the same invocation: the driver's peak RSS
while scoring, and its growth during scoring. Ingest runs in its own process because its
memory still grows with the pool (issue 13).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


PHASE = "TC_BENCH_PHASE"  # the phase the sampler attributes RSS to (an environment variable: the flow
# below is shipped to Ray workers by Prefect's context, so it must not hold the sampler or its thread)


class RssSampler:
    """Peak RSS of this process per named phase, sampled on a thread."""

    def __init__(self, every_s: float = 0.02):
        import psutil

        self.proc, self.every = psutil.Process(), every_s
        self.peaks: dict[str, int] = {}
        self.at_start: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            info = self.proc.memory_info()
            phase = os.environ.get(PHASE, "start")
            # rss counts the pages of Ray's object store (a shared mmap) this process touched;
            # rss - shared is this process's own memory
            for name, value in ((phase, info.rss), (f"{phase}/private", info.rss - info.shared)):
                if name not in self.at_start:
                    self.at_start[name] = value
                self.peaks[name] = max(self.peaks.get(name, 0), value)
            time.sleep(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def enter(phase: str) -> None:
    os.environ[PHASE] = phase
    time.sleep(0.05)  # let the sampler see the boundary


def scoring_stage(config: dict) -> dict:
    """The scoring stage as the pipeline runs it: prepare (ingest), the base model's losses over the
    whole pool (``score_model``: Ray tasks, shard files, DuckDB loads), the integrity check."""
    from tokenclean.config import RunConfig
    from tokenclean.flows.artifacts import base, scorer
    from tokenclean.flows.prepare import prepare
    from tokenclean.flows.scoring import score_model
    from tokenclean.tasks import store

    cfg = RunConfig.model_validate(config)
    enter("ingest")
    ctx = prepare(cfg, progress=False)
    try:
        parts = list(range(cfg.iterations + 1))
        key = scorer(ctx, base(ctx))  # the base model's losses key, as ensure_losses derives it
        enter("scoring")
        stats = score_model(ctx, "base", key, None, parts, progress=False)
        enter("integrity")
        check = store.check_integrity(ctx.con, key, ctx.dataset, parts)
        assert check["ok"], check
        enter("done")
        return {k: stats[k] for k in ("samples_scored", "tokens", "shards_scored", "seconds", "tokens_per_s")}
    finally:
        ctx.con.close()


def child(n: int, workdir: Path) -> dict:
    """One driver: ingest N rows, score the base model over all of them, report the RSS per phase."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with RssSampler() as sampler:
        enter("imports")
        from prefect import flow

        from tokenclean.config import RunConfig
        from tokenclean.flows.runtime import prefect_api, ray_session, task_runner
        from tokenclean.synth import SynthSpec, generate

        demo = RunConfig().embedded
        paths = generate(SynthSpec(n_people=demo.n_people, n_train=n, n_eval=50, seed=99), workdir / "data")
        cfg = RunConfig.model_validate({
            "name": f"n{n}", "workdir": str(workdir), "model": {"base": "embedded"}, "iterations": 2,
            "data": {"paths": [str(paths["train"])], "eval_paths": [str(paths["eval"])], "max_length": 256},
            "score": {"batch_tokens": 8192, "shard_samples": 512}, "ray": {"num_cpus": 2}})
        stage = flow(name="scoring-stage")(scoring_stage)
        with prefect_api(), ray_session(cfg.ray):
            stats = stage.with_options(task_runner=task_runner(cfg.ray))(cfg.model_dump(mode="json"))
    mb = 1 / 2**20
    return {"rows": n, **stats,
            "rss_mb": {"after_imports": sampler.at_start["ingest"] * mb,
                       "peak_prepare": sampler.peaks["ingest"] * mb,
                       "scoring_start": sampler.at_start["scoring"] * mb,
                       "peak_scoring": sampler.peaks["scoring"] * mb,
                       "private_scoring_start": sampler.at_start["scoring/private"] * mb,
                       "private_peak_scoring": sampler.peaks["scoring/private"] * mb},
            "integrity_peak_private_mb": sampler.peaks["integrity/private"] * mb,
            "scoring_growth_mb": (sampler.peaks["scoring"] - sampler.at_start["scoring"]) * mb,
            "private_growth_mb": (sampler.peaks["scoring/private"] - sampler.at_start["scoring/private"]) * mb}


def prepare_only(n: int, workdir: Path) -> None:
    """Generate and ingest the pool (in its own process, so the scoring driver starts without ingest's memory)."""
    from tokenclean.config import RunConfig
    from tokenclean.flows.prepare import prepare
    from tokenclean.synth import SynthSpec, generate

    demo = RunConfig().embedded
    paths = generate(SynthSpec(n_people=demo.n_people, n_train=n, n_eval=50, seed=99), workdir / "data")
    cfg = RunConfig.model_validate({
        "name": f"n{n}", "workdir": str(workdir), "model": {"base": "embedded"}, "iterations": 2,
        "data": {"paths": [str(paths["train"])], "eval_paths": [str(paths["eval"])], "max_length": 256}})
    prepare(cfg, progress=False).con.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="4000,40000", help="pool sizes in rows (the demo has 4000)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        if args.prepare_only:
            prepare_only(args.child, args.workdir)
        else:
            print(json.dumps(child(args.child, args.workdir)))
        return
    results = []
    for n in [int(x) for x in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory(prefix="tc-drvmem-") as tmp:
            base = [sys.executable, __file__, "--child", str(n), "--workdir", tmp]
            # ingest first, in its own process; the measured driver finds the dataset by key and only scores
            for cmd in (base + ["--prepare-only"], base):
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    sys.exit(f"size {n} failed:\n{out.stderr[-4000:]}")
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'rows':>8} {'tokens':>10} {'tok/s':>8} {'RSS, scoring start':>19} {'peak while scoring':>19} "
          f"{'growth':>8} {'private peak':>13} {'private growth':>15}")
    for r in results:
        m = r["rss_mb"]
        print(f"{r['rows']:>8,} {r['tokens']:>10,} {r['tokens_per_s']:>8,.0f} {m['scoring_start']:>16,.0f} MB "
              f"{m['peak_scoring']:>16,.0f} MB {r['scoring_growth_mb']:>5,.0f} MB "
              f"{m['private_peak_scoring']:>10,.0f} MB {r['private_growth_mb']:>12,.0f} MB")
    for r in results:
        print(f"{r['rows']:>8,} rows: private peak during the integrity check {r['integrity_peak_private_mb']:,.0f} MB")
    if len(results) >= 2:
        a, b = results[0], results[-1]
        print(f"peak while scoring, {b['rows']:,} vs {a['rows']:,} rows: "
              f"{b['rss_mb']['peak_scoring'] / a['rss_mb']['peak_scoring']:.3f}x "
              f"(pool {b['tokens'] / a['tokens']:.1f}x)")
    if args.out:
        args.out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                                        "results": results}, indent=2))


if __name__ == "__main__":
    main()
