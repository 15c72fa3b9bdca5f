"""Ingest in memory, for tests (and benchmarks): the pipeline's own ingest code, with its result handed back
as a table instead of recorded in a run database."""
from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa

from tokenclean.flows.ingest import stage_inputs
from tokenclean.tasks import store
from tokenclean.tasks.ingest import CHUNK_ROWS, IngestSpec, tokenization_of


@dataclass
class IngestResult:
    samples: pa.Table
    quarantine: list[dict]
    n_read: int
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # files not read -> why
    reasoning_dropped: int = 0  # assistant turns of the samples whose reasoning the template does not render


def ingest(entries: list[str], eval_entries: list[str], tokenizer, *, max_length: int, eval_fraction: float,
           n_parts: int, seed: int, tokenization: str | None = None, progress: bool = False,
           template: str = "tulu", chunk_rows: int = CHUNK_ROWS, workers: int = 1,
           split_bytes: int | None = None, warmup_entries: list[str] = (),
           empty_think: str = "target") -> IngestResult:
    """Read, validate, render (``template``: tulu or model) and tokenise every row, in memory: the pipeline's
    streamed ingest (``stage_inputs``), staged in an in-memory DuckDB with its parts in a temporary directory."""
    spec = IngestSpec(tokenization or tokenization_of(tokenizer, max_length, template, empty_think), max_length,
                      eval_fraction, n_parts, seed, template, warmup=bool(warmup_entries), empty_think=empty_think)
    con = duckdb.connect()
    try:
        with tempfile.TemporaryDirectory(prefix="tokenclean-ingest-") as parts:
            read = stage_inputs(con, entries, eval_entries, tokenizer, spec, parts_dir=parts, chunk_rows=chunk_rows,
                                split_bytes=split_bytes, workers=workers, progress=progress,
                                warmup_entries=warmup_entries)
            samples = (store.staged_samples(con) if store.stage_summary(con)["samples"]
                       else store.INGEST_SCHEMA.empty_table())
            quarantine = store.staged_quarantine(con)
            store.stage_reset(con)
        return IngestResult(samples.cast(store.INGEST_SCHEMA), quarantine, read["rows_read"], read["skipped"],
                            read["reasoning_dropped"])
    finally:
        con.close()


def insert_dataset(con, dataset: str, samples: pa.Table, quarantine: list[dict], inputs: dict, summary: dict) -> dict:
    """Record an ingest given in memory (``samples`` in ``store.INGEST_SCHEMA``, quarantine rows as dicts):
    staged as one chunk, then ``store.insert_staged_dataset``."""
    n = samples.num_rows
    table = samples.append_column("ordinal", pa.array(range(n), pa.int64())) \
        .append_column("source_path", samples.column("source")).append_column("raw", pa.nulls(n, pa.string()))
    q = pa.Table.from_pylist([{"ordinal": n + i, **{k: r.get(k) for k in store.STAGE_Q_COLUMNS[1:]}}
                              for i, r in enumerate(quarantine)], schema=store.STAGE_Q_SCHEMA)
    store.stage_parts(con, table, q)
    return store.insert_staged_dataset(con, dataset, inputs, summary)


def sample_arrays(con, sample_ids: list[int]) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(sample_id, input_ids, response_mask) of the given samples, ordered by id: read row by row, apart from
    the flat reader the pipeline uses (``store.sample_batch``), so either can check the other."""
    rows = con.execute("SELECT sample_id, input_ids, response_mask FROM samples WHERE sample_id IN (SELECT unnest(?)) "
                       "ORDER BY sample_id", [sample_ids]).fetchall()
    return [(r[0], np.asarray(r[1], dtype=np.int32), np.asarray(r[2], dtype=bool)) for r in rows]
