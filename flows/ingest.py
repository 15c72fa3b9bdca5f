"""Ingest's fan-out: the inputs planned into splits, each split's part made where it runs, the parts staged.

Each split is processed (``tasks.ingest.process_split``: here, or as Ray tasks that read the input
files themselves) into a part of Parquet files under the parts directory (a local path, or an fsspec
URL whose parts are copied to a local directory as they complete). The parts are the staging:
``store.stage_parts`` puts views over them and ``store.insert_staged_dataset`` reads them once, in
SQL. Rows carry their input-wide ordinal, so the order in which parts complete changes nothing, and
the driver holds no rows. Under the parts directory, parts are keyed by the spec and the split
layout, so an interrupted ingest resumes from the parts it finished.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenclean.tasks import ingest, storage, store
from tokenclean.tasks.ingest import CHUNK_ROWS, IngestSpec
from tokenclean.tasks.inputs import Split, entry_files, plan_inputs
from tokenclean.tasks.keys import digest
from tokenclean.tasks.versions import PARTS_VERSION


@dataclass(frozen=True)
class IngestJob:
    """One dataset to ingest, as the flow resolved it from the config: its key, the inputs, what turns a row
    into a sample (``spec``, the workers' part) and where and how the splits are processed."""

    dataset: str  # the dataset key: inputs, tokenization, split
    spec: IngestSpec
    paths: tuple[str, ...]
    eval_paths: tuple[str, ...]
    warmup_paths: tuple[str, ...]
    inputs: str  # the inputs' content fingerprint
    split: dict  # the split as keyed: parts, eval_fraction, seed (and warmup)
    tokenizer: str  # where the tokenizer was loaded from
    tokenizer_fingerprint: str  # ... and what it was (template.tokenizer_fingerprint): later loads are checked
    parts_dir: str  # each split's part, in the workers' storage, named by the dataset key
    local_dir: str  # ... copied here to be staged when that storage is remote
    workers: int = 1  # data.ingest_workers: Ray tasks at once when > 1
    db_memory_limit: str | None = None  # run.db_memory_limit, restored after ingest
    chunk_rows: int = CHUNK_ROWS
    progress: bool = False


# Input bytes per split: about SPLITS_PER_WORKER splits for each worker, within SPLIT_BYTES. A split is the
# unit of work (one Ray task), of retry and of resume; its size bounds nothing in memory (it is processed
# CHUNK_ROWS rows at a time), so it can be large enough that a task's fixed cost does not matter.
SPLIT_BYTES = (1 << 20, 64 << 20)
SPLITS_PER_WORKER = 4


def split_bytes_for(entries: list[str], eval_entries: list[str], workers: int) -> int:
    """About ``SPLITS_PER_WORKER`` splits per worker over the input files' total size, within ``SPLIT_BYTES``."""
    total = sum(Path(f).stat().st_size for e in [*entries, *eval_entries] for f in entry_files(e)
                if not f.startswith("hf:"))
    lo, hi = SPLIT_BYTES
    return max(lo, min(hi, -(-total // max(1, workers * SPLITS_PER_WORKER))))


def stage_inputs(con, entries: list[str], eval_entries: list[str], tokenizer, spec: IngestSpec, *, parts_dir: str,
                 local_dir: str | None = None, chunk_rows: int = CHUNK_ROWS, split_bytes: int | None = None,
                 workers: int = 1, progress: bool = False, warmup_entries: list[str] = ()) -> dict:
    """Ingest the inputs into parts under ``parts_dir`` and stage them on ``con``, then quarantine duplicate ids.

    ``parts_dir`` must be named by the inputs' content (``prepare`` uses the dataset key). Returns
    the rows read, the splits processed and reused, the nodes that processed them (``placement``)
    and the files not read, each with why (``skipped``).
    """
    from tqdm.auto import tqdm

    if spec.template == "tulu" and tokenizer.eos_token is None:
        raise ValueError("tokenizer has no eos_token; the Tulu template ends every response with EOS")
    if bool(warmup_entries) != spec.warmup:
        raise ValueError("spec.warmup must say whether warm-up inputs are given")
    split_bytes = split_bytes or split_bytes_for([*entries, *warmup_entries], eval_entries, workers)
    plan = plan_inputs(entries, eval_entries, split_bytes, list(warmup_entries))
    splits = plan.splits
    layout = digest("ingest-parts", PARTS_VERSION, asdict(spec), [s.describe() for s in splits])
    parts_dir, local_dir = storage.join(parts_dir, layout), local_dir and storage.join(local_dir, layout)
    n_read = reused = dropped = 0
    samples, quarantine, nodes = {}, {}, set()
    with tqdm(total=len(splits), desc="ingest", disable=not progress, unit="split") as bar:
        for result in _run_splits(splits, tokenizer, spec, parts_dir, chunk_rows, workers):
            samples[result["split"]] = _local_part(result, "samples", local_dir)
            quarantine[result["split"]] = _local_part(result, "quarantine", local_dir)
            n_read += result["n_samples"] + result["n_quarantined"]
            reused += bool(result.get("reused"))
            dropped += result["reasoning_dropped"]
            if result["node"] is not None:
                nodes.add(result["node"])
            bar.update(1)
            bar.set_postfix(rows=f"{n_read:,}")
    if splits:
        store.stage_parts(con, [samples[s.number] for s in splits], [quarantine[s.number] for s in splits])
    else:
        store.stage_parts(con, store.STAGE_SCHEMA.empty_table(), store.STAGE_Q_SCHEMA.empty_table())
    store.stage_duplicates(con)
    return {"rows_read": n_read, "splits": len(splits), "splits_reused": reused, "reasoning_dropped": dropped,
            "placement": [{"node": node} for node in sorted(nodes)], "skipped": plan.skipped}


def _run_splits(splits: list[Split], tokenizer, spec: IngestSpec, parts_dir: str, chunk_rows: int,
                workers: int) -> Iterator[dict]:
    """Each split's result as it completes: parts already written first, then the rest, processed here
    (``workers`` = 1) or as Ray tasks, ``workers`` at a time (the flow's cluster; a local one if none)."""
    todo = []
    for split in splits:
        done = ingest.finished_part(parts_dir, split)
        if done is not None:
            yield done
        else:
            todo.append(split)
    if workers <= 1:
        for split in todo:
            yield ingest.process_split(split, tokenizer, spec, parts_dir, chunk_rows)
        return
    from tokenclean.tasks.cluster import connected

    with connected(None, workers, log_to_driver=False):  # the flow's cluster; a local one if none
        yield from _run_on_ray(todo, tokenizer, spec, parts_dir, chunk_rows, workers)


def _run_on_ray(todo: list[Split], tokenizer, spec: IngestSpec, parts_dir: str, chunk_rows: int,
                max_in_flight: int) -> Iterator[dict]:
    """The splits as plain Ray tasks, ``max_in_flight`` at a time, each result as it completes (as scoring
    keeps its shards in flight). Not Prefect tasks (``runtime.submit_placed``): ``data.ingest_workers`` holds
    with Ray off and outside a flow, and a split's task is spread over the nodes, as Ray Data places its reads:
    it reads as much as it computes, and each node brings its own disks and network."""
    import ray

    remote = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(ingest.process_split)
    tokenizer_ref = ray.put(tokenizer)
    queue, pending = list(todo), []
    while queue or pending:
        while queue and len(pending) < max_in_flight:
            pending.append(remote.remote(queue.pop(0), tokenizer_ref, spec, parts_dir, chunk_rows))
        ready, pending = ray.wait(pending, num_returns=1)
        yield ray.get(ready[0])


def _local_part(result: dict, key: str, local_dir: str | None) -> str:
    """A part file as a local path DuckDB can read: where it lies, or copied from object storage to ``local_dir``."""
    path = result[key]
    storage.require_visible(path, f"ingest: split {result['split']} ({key})", result["node"])
    local = storage.local_path(path)
    if local is not None:
        return local
    if local_dir is None:
        raise ValueError(f"ingest parts in {path} need a local directory to be read from (local_dir)")
    return storage.fetch(path, storage.join(local_dir, path.rsplit("/", 1)[1]))
