"""Fan a model's scoring out over Ray, shard by shard, resumably.

Work is planned from what is missing: samples of the pool with no losses yet under the
model's key are chunked into shards (``shard_token_budget``: about four per task slot, at
most ``score.shard_tokens`` tokens and ``score.shard_samples`` samples). A restarted run and an
incremental refresh therefore send exactly the unscored samples. Workers write each
shard's losses themselves, atomically, to ``<storage>/shards/<scorer key>/shard-N.parquet``
(``tasks/storage.py``: the run directory by default, or a shared path / fsspec URL) and
return only the path and counts; the driver loads the file into DuckDB by path in one
transaction (delete-then-insert), so a retried shard replaces, never duplicates, a
sample has either all its losses or none, and no per-token result passes through the
driver's memory. A shard file lives under the key of the model that wrote it, so a file
written by another model version can never be loaded.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field

import numpy as np

from tokenclean.flows.runtime import artifact_key, run_logger, scoring_slots
from tokenclean.tasks import storage, store
from tokenclean.tasks.jobs import ScoreJob, ScorerSpec
from tokenclean.tasks.score import SampleBatch
from tokenclean.tasks.steps import SHARD_META, score_shard_task

MIN_SHARD_TOKENS = 16384
SHARDS_PER_SLOT = 4


def shard_token_budget(total_tokens: int, slots: int, max_tokens: int, per_slot: int = SHARDS_PER_SLOT) -> int:
    """Tokens per shard: about ``per_slot`` shards for each task slot, within [MIN_SHARD_TOKENS, max_tokens].

    A shard is one Prefect task, and a Prefect task costs about 0.3 s of worker time and
    0.1 s of driver time here (2 cores; ``docs/benchmarks.md``), whatever its size; a
    fixed 512 samples of ~36 tokens made that a third of the stage. Sizing from the pool
    keeps that cost a few percent on a small pool and on a large one (up to ``max_tokens``,
    the unit of retry), while ~4 shards per slot keep the last wave short.
    """
    even = -(-int(total_tokens) // max(1, int(slots) * int(per_slot)))
    return max(1, min(int(max_tokens), max(MIN_SHARD_TOKENS, even)))


def chunk_shards(ids: np.ndarray, lengths: np.ndarray, start: int, max_tokens: int,
                 max_samples: int | None = None) -> list[tuple[int, np.ndarray]]:
    """Consecutive runs of ``ids`` of at most ``max_tokens`` tokens and ``max_samples`` samples, numbered from
    ``start``.

    A sample longer than ``max_tokens`` is a shard of its own. Pure: the same inputs give
    the same shards (``tests/faults.py`` predicts them).
    """
    cum = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    out, i, n = [], 0, len(ids)
    while i < n:
        j = int(np.searchsorted(cum, cum[i] + max_tokens, side="right")) - 1
        j = max(j, i + 1)
        if max_samples:
            j = min(j, i + int(max_samples))
        out.append((start + len(out), ids[i:j]))
        i = j
    return out


def plan_shards(con, model_key: str, dataset: str, parts: list[int], max_tokens: int,
                max_samples: int | None = None, slots: int = 1) -> tuple[list[tuple[int, np.ndarray]], int]:
    """Shards of the unscored samples, numbered after the shards already loaded, and their total tokens.

    Planning from what is missing (not from a fixed list) is what makes a resumed run
    and an incremental refresh the same operation: only samples without losses are sent.
    """
    ids, lengths = store.unscored_lengths(con, model_key, dataset, parts)
    total = int(lengths.sum())
    budget = shard_token_budget(total, slots, max_tokens)
    return chunk_shards(ids, lengths, store.next_shard(con, model_key), budget, max_samples), total


def recover_orphan_shards(con, model_key: str, shard_dir: str, scorer: dict | None = None,
                          unreadable: list[dict] | None = None) -> tuple[int, int]:
    """Load shards written but never loaded (the driver died in between, or stopped at a worker's mismatch).

    A shard is loaded only if none of its samples has losses yet (otherwise it is stale:
    its samples were re-scored under another shard id) and, given ``scorer`` (the key's
    settings), only if the numerics and kernel its file says it was computed with are the
    key's; any other is deleted, and its samples are scored again. So is a file that cannot
    be read whole (torn by a power loss, damaged on disk: a failed page checksum), with a
    warning naming it; each such file is appended to ``unreadable`` as ``{"path", "reason"}``.
    """
    done = store.loaded_shards(con, model_key)
    n_shards = n_samples = 0
    for path in storage.shard_files(shard_dir):
        shard = storage.shard_number(path)
        if shard in done:
            continue
        try:  # the whole file: every page's checksum is verified before anything is loaded
            table = storage.read_table(path)
            made = json.loads((table.schema.metadata or {}).get(SHARD_META, b"{}"))
            ids = sorted(set(table.column("sample_id").to_pylist()))
        except (OSError, ValueError, KeyError) as e:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
            reason = f"{type(e).__name__}: {e}"
            run_logger().warning("shard file %s is unreadable (%s); removed, its samples are scored again",
                                 path, reason)
            storage.remove(path)
            if unreadable is not None:
                unreadable.append({"path": path, "reason": reason})
            continue
        if store.count_scored(con, model_key, ids) or _disagreement(made, scorer):
            storage.remove(path)
            continue
        store.load_loss_shard(con, model_key, shard, table)  # the rows just verified, not a second read
        n_shards, n_samples = n_shards + 1, n_samples + len(ids)
    return n_shards, n_samples


def _disagreement(made: dict, scorer: dict | None) -> list[str]:
    """Where what a worker says computed a shard (``made_by``: numerics, kernel) departs from the losses' key."""
    if scorer is None:
        return []
    want = {"numerics": scorer["numerics"], "linear_ce": scorer.get("linear_ce", "chunked")}
    return [f"{k} {made[k]} but the losses' key says {v}" for k, v in want.items() if k in made and made[k] != v]


def _load(con, model_key: str, shard: int, path: str) -> int:
    """Load one shard file into DuckDB: by path when local, else read through fsspec (one shard, bounded)."""
    local = storage.local_path(path)
    return store.load_loss_shard(con, model_key, shard, local if local is not None else storage.read_table(path))


def load_shard_samples(con, sample_ids) -> SampleBatch:
    return SampleBatch(*store.sample_batch(con, sample_ids))


def _placement(ctx):
    """Ray resource options for scoring tasks (GPUs per task), when running on Ray."""
    if not ctx.cfg.ray.enabled or not ctx.cfg.ray.num_gpus_per_task:
        return contextlib.nullcontext()
    from prefect_ray.context import remote_options

    from tokenclean.flows.runtime import placement_options

    return remote_options(**placement_options(None, ctx.cfg.ray.num_gpus_per_task, keep_worker=True))


def score_job(ctx, model_key: str, adapter: str | None, base: tuple[str, str] | None = None,
              adapter_model: str | None = None) -> ScoreJob:
    """What every scoring worker of ``model_key`` is handed: the model, its numerics (``ctx.scorer``), batch sizes.

    ``base``: (directory, key) of a whole model loaded in the base's place (a given reference), None for the
    run's base; workers cache the loaded model under that key, so the two are never served for each other.
    ``adapter_model``: the model key the run recorded for ``adapter``, which a worker's copy must give.
    """
    cfg = ctx.cfg
    path, key = base or (ctx.base_path, ctx.base_model)
    spec = ScorerSpec(path, key, device=cfg.model.device, dtype=cfg.model.dtype,
                      backend=cfg.score.backend, compile=ctx.scorer["compile"],
                      linear_ce=ctx.scorer.get("linear_ce", "chunked"), base_weights=ctx.model_weights(key))
    return ScoreJob(spec, model_key, adapter, batch_tokens=cfg.score.batch_tokens, chunk=cfg.score.lm_head_chunk,
                    chunk_bytes=cfg.score.lm_head_chunk_bytes, adapter_model=adapter_model)


def score_model(ctx, name: str, model_key: str, adapter: str | None, parts: list[int], *, progress: bool = True,
                max_in_flight: int | None = None, base: tuple[str, str] | None = None,
                adapter_model: str | None = None) -> dict:
    """Ensure ``token_losses`` holds model ``model_key``'s loss for every response token of the pool.

    ``name`` is what the user reads (``base``, ``reference``, ``self-evolving@1``);
    everything stored is under ``model_key``. ``base``, ``adapter_model``: as ``score_job``'s.
    """
    run = _plan(ctx, name, score_job(ctx, model_key, adapter, base, adapter_model), parts)
    max_in_flight = max_in_flight or 2 * run.stats["slots"]  # one queued behind each running shard
    run.start()
    shown = _Progress(ctx.cfg.name, name, run.total, len(run.queue), progress)
    with _placement(ctx):
        while run.queue or run.pending:
            while run.queue and len(run.pending) < max_in_flight:
                run.submit_next()
            run.collect(run.next_result())
            shown.update(run)
    shown.bar.close()
    return run.finish()


def _plan(ctx, name: str, job: ScoreJob, parts: list[int]) -> _ScoringRun:
    """Recover shard files left by an earlier run, then plan shards of what is still unscored."""
    con, cfg, model_key = ctx.con, ctx.cfg, job.model_key
    t_plan = time.perf_counter()
    shard_dir = ctx.shard_dir(model_key)
    n_total, _ = store.count_pool(con, ctx.dataset, parts)
    unreadable: list[dict] = []
    rec_shards, rec_samples = recover_orphan_shards(con, model_key, shard_dir, ctx.scorer, unreadable)
    slots = scoring_slots(cfg.ray)
    todo, total = plan_shards(con, model_key, ctx.dataset, parts, cfg.score.shard_tokens, cfg.score.shard_samples,
                              slots)
    n_todo = sum(len(ids) for _, ids in todo)
    stats = {"model": name, "key": model_key, "slots": slots, "samples_total": n_total,
             "samples_skipped": n_total - n_todo - rec_samples, "shards_recovered": rec_shards,
             "samples_recovered": rec_samples, "shards_unreadable": unreadable, "shards_scored": 0,
             "samples_scored": 0, "tokens": 0, "nonfinite": 0, "workers": {}, "placement": []}
    return _ScoringRun(ctx, name, job, shard_dir, list(todo), total, stats, t_plan)


@dataclass
class _ScoringRun:
    """One ``score_model`` call in flight: shards still to send, shards running, what came back, where time went."""

    ctx: object
    name: str
    job: ScoreJob
    shard_dir: str
    queue: list  # (shard, sample ids) not submitted yet
    total: int  # tokens to score
    stats: dict
    t_plan: float
    t0: float = 0.0
    pending: dict = field(default_factory=dict)  # future -> shard
    # the driver's seconds: planning, reading samples, submitting, waiting for results, loading shard files
    # into DuckDB, progress reporting; and the workers' summed seconds
    driver: dict = field(default_factory=lambda: dict.fromkeys(("plan", "fetch", "submit", "wait", "load",
                                                                "progress"), 0.0))
    worker: dict = field(default_factory=lambda: dict.fromkeys(("model", "losses", "write"), 0.0))
    spans: dict = field(default_factory=dict)  # shard -> [submitted, worker started, worker ended, received] (epoch)

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.driver["plan"] = self.t0 - self.t_plan

    def submit_next(self) -> None:
        """Read the next shard's samples from DuckDB and send them, with the job, to a scoring worker."""
        shard, ids = self.queue.pop(0)
        tick = time.perf_counter()
        samples = load_shard_samples(self.ctx.con, ids)
        tock = time.perf_counter()
        self.driver["fetch"] += tock - tick
        task = score_shard_task.with_options(task_run_name=f"score/{self.name}/{shard}")
        self.pending[task.submit(self.job, shard, samples, storage.shard_path(self.shard_dir, shard))] = shard
        self.spans[shard] = [time.time()]
        self.driver["submit"] += time.perf_counter() - tock

    def next_result(self) -> dict:
        from prefect.futures import as_completed

        tick = time.perf_counter()
        fut = next(iter(as_completed(list(self.pending))))
        self.pending.pop(fut)
        res = fut.result()
        self.driver["wait"] += time.perf_counter() - tick
        return res

    def collect(self, res: dict) -> None:
        """Check a finished shard against the losses' key, load its file into DuckDB, and count it."""
        tock, stats = time.perf_counter(), self.stats
        self.spans[res["shard"]] += [*res.get("span", (None, None)), time.time()]
        for k, v in res.get("timing", {}).items():
            self.worker[k] = self.worker.get(k, 0.0) + v
        wrong = _disagreement(res.get("made_by") or {}, self.ctx.scorer)
        if wrong:  # the file is not what the key says: removed, never left for a later run to recover
            storage.remove(res["path"])
            raise RuntimeError(
                f"scoring {self.name}: a worker computed with {'; '.join(wrong)}; set model.device / model.dtype "
                "(and ray.num_gpus_per_task) explicitly so workers and key agree")
        storage.require_visible(res["path"], f"scoring {self.name}: shard {res['shard']}", res["node"])
        _load(self.ctx.con, self.job.model_key, res["shard"], res["path"])
        self.driver["load"] += time.perf_counter() - tock
        stats["nonfinite"] += res["nonfinite"]
        stats["shards_scored"] += 1
        stats["samples_scored"] += res["n_samples"]
        stats["workers"].setdefault(str(res["pid"]), set()).add(res["model_id"])
        stats["tokens"] += res["n_tokens"]
        if {"node": res["node"]} not in stats["placement"]:
            stats["placement"].append({"node": res["node"]})

    def finish(self) -> dict:
        """The stage's statistics, logged as a stage when it scored, recovered or dropped anything."""
        stats = self.stats
        stats["workers"] = {pid: len(models) for pid, models in stats["workers"].items()}  # model loads per worker
        stats["seconds"] = time.perf_counter() - self.t0
        stats["timing"] = {"driver": self.driver, "workers": self.worker, "spans": self.spans}
        stats["tokens_per_s"] = stats["tokens"] / stats["seconds"] if stats["tokens"] else 0.0
        if stats["shards_scored"] or stats["shards_recovered"] or stats["shards_unreadable"]:
            store.log_stage(self.ctx.con, self.ctx.flow_run, "score", self.name, self.job.model_key,
                            stats["seconds"], stats)
        return stats


class _Progress:
    """What the user watches: a tqdm bar in the terminal, a Prefect progress artifact in the UI."""

    def __init__(self, run_name: str, name: str, total_tokens: int, n_shards: int, show: bool):
        from tqdm.auto import tqdm

        self.total, self.n_shards = total_tokens, n_shards
        self.bar = tqdm(total=total_tokens, desc=f"score {name}", unit="tok", unit_scale=True,
                        disable=not show or not n_shards)
        self.artifact = _progress_artifact(run_name, name, n_shards) if n_shards else None
        self.shown = 0

    def update(self, run: _ScoringRun) -> None:
        tick, stats = time.perf_counter(), run.stats
        self.bar.update(stats["tokens"] - self.shown)
        self.shown = stats["tokens"]
        rate = f"{stats['tokens'] / (tick - run.t0):,.0f}"
        self.bar.set_postfix(tok_s=rate, shards=f"{stats['shards_scored']}/{self.n_shards}")
        if self.artifact is not None:
            from prefect.artifacts import update_progress_artifact

            # the totals too: the UI keeps only the latest description
            update_progress_artifact(self.artifact, 100.0 * stats["tokens"] / max(1, self.total),
                                     description=f"{stats['tokens']:,} of {self.total:,} tokens, shards "
                                                 f"{stats['shards_scored']}/{self.n_shards}, "
                                                 f"{tick - run.t0:.0f} s, {rate} tok/s")
        run.driver["progress"] += time.perf_counter() - tick


def _progress_artifact(run_name: str, name: str, n_shards: int):
    """A Prefect progress artifact, so the UI shows scoring progress live (None outside a run)."""
    from prefect.artifacts import create_progress_artifact
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return None
    return create_progress_artifact(0.0, key=artifact_key(run_name, f"score-{name}"),
                                    description=f"scoring {name}: {n_shards} shards")
