"""Samples, datasets and pools.

Samples are content-addressed and immutable: ingesting a dataset inserts only samples
whose id is new, so a refresh that changes ten rows adds ten samples and leaves every
other sample (and everything computed from it) untouched. A dataset records which
samples an input produced and into which part (D0..DT, or -1 for held-out) each fell.
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from tokenclean.tasks.store.db import sql_key, sql_parts, transaction

EVAL_PART = -1

QUARANTINE_SCHEMA = pa.schema([("source", pa.string()), ("row_index", pa.int64()), ("reason", pa.string()),
                               ("raw", pa.string())])


def dataset_summary(con, dataset: str) -> dict | None:
    """The stored ingest summary of ``dataset``, or None if that dataset was never ingested completely."""
    row = con.execute("SELECT summary FROM datasets WHERE dataset = ?", [dataset]).fetchone()
    return json.loads(row[0]) if row else None


STAGE, STAGE_Q = "ingest_stage", "ingest_stage_quarantine"


def stage_reset(con) -> None:
    """Start staging an ingest: drop what an interrupted one left (its dataset was never recorded)."""
    con.execute(f"DROP TABLE IF EXISTS {STAGE}")
    con.execute(f"DROP TABLE IF EXISTS {STAGE_Q}")
    con.execute(f"CREATE TABLE {STAGE_Q} (ordinal BIGINT, source VARCHAR, row_index BIGINT, reason VARCHAR, raw VARCHAR)")


# A staged quarantined row: where it was (its input-wide ordinal orders the quarantine), why, and what it said.
STAGE_Q_SCHEMA = pa.schema([("ordinal", pa.int64()), ("source", pa.string()), ("row_index", pa.int64()),
                            ("reason", pa.string()), ("raw", pa.string())])
STAGE_Q_COLUMNS = tuple(STAGE_Q_SCHEMA.names)


def stage_samples(con, samples: pa.Table) -> None:
    """Append processed samples (``ingest.STAGE_SCHEMA``) to the staging table.

    Staging tables are ordinary tables of the run database, appended a chunk at a time
    (one Parquet row group of a split's part) outside a transaction: DuckDB writes them to
    the file as they grow, so the memory of an ingest does not grow with the input or
    with a split. Nothing reads them but ``insert_staged_dataset``.
    """
    con.register("_chunk", samples)
    try:
        con.execute(f"CREATE TABLE IF NOT EXISTS {STAGE} AS SELECT * FROM _chunk LIMIT 0")
        con.execute(f"INSERT INTO {STAGE} SELECT * FROM _chunk")
    finally:
        con.unregister("_chunk")


def stage_quarantine(con, rows: pa.Table) -> None:
    """Append quarantined rows (``STAGE_Q_SCHEMA``) to the staging quarantine."""
    con.register("_q", rows)
    try:
        con.execute(f"INSERT INTO {STAGE_Q} SELECT {', '.join(STAGE_Q_COLUMNS)} FROM _q")
    finally:
        con.unregister("_q")


def _stage_exists(con) -> bool:
    return con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = ?", [STAGE]).fetchone()[0] > 0


def stage_duplicates(con) -> int:
    """Quarantine every staged row whose id an earlier row (in input order) already has; returns how many.

    Decided over the whole input after every chunk is staged, so it does not depend on
    how rows were chunked or on how many workers processed them.
    """
    if not _stage_exists(con):
        return 0
    dups = con.execute(
        f"""SELECT ordinal, uid, source_path, row_index, raw, first_path, first_row FROM (
              SELECT ordinal, uid, source_path, row_index, raw,
                     first_value(source_path) OVER w AS first_path, first_value(row_index) OVER w AS first_row,
                     row_number() OVER w AS n
              FROM {STAGE} WINDOW w AS (PARTITION BY uid ORDER BY ordinal))
            WHERE n > 1 ORDER BY ordinal""").fetchall()
    if dups:
        stage_chunk_q = [{"ordinal": o, "source": path, "row_index": ri, "raw": raw,
                          "reason": f"duplicate id {uid!r} (first seen in {fp}:{fr})"}
                         for o, uid, path, ri, raw, fp, fr in dups]
        con.register("_q", pa.Table.from_pylist(stage_chunk_q))
        try:
            con.execute(f"INSERT INTO {STAGE_Q} SELECT ordinal, source, row_index, reason, raw FROM _q")
            con.execute(f"DELETE FROM {STAGE} WHERE ordinal IN (SELECT ordinal FROM _q)")
        finally:
            con.unregister("_q")
    return len(dups)


def stage_summary(con) -> dict:
    """Counts of the staged ingest: samples kept, rows quarantined, samples truncated."""
    n, trunc = (con.execute(f"SELECT count(*), count(*) FILTER (WHERE truncated) FROM {STAGE}").fetchone()
                if _stage_exists(con) else (0, 0))
    q = con.execute(f"SELECT count(*) FROM {STAGE_Q}").fetchone()[0]
    return {"samples": n, "quarantined": q, "truncated": trunc}


def staged_samples(con) -> pa.Table:
    """The staged samples in input order, ``INGEST_SCHEMA`` columns (for ``ingest.ingest``)."""
    cols = ", ".join(f'"{c}"' for c in _INGEST_COLUMNS)
    cur = con.cursor()
    try:
        return cur.sql(f"SELECT {cols} FROM {STAGE} ORDER BY ordinal").to_arrow_table()
    finally:
        cur.close()


def staged_quarantine(con) -> list[dict]:
    return [dict(zip(("source", "row_index", "reason", "raw"), r)) for r in con.execute(
        f"SELECT source, row_index, reason, raw FROM {STAGE_Q} ORDER BY ordinal").fetchall()]


_INGEST_COLUMNS = ("sample_id", "tokenization", "uid", "task", "answer", "content_hash", "n_tokens", "n_response",
                   "truncated", "answer_start", "answer_end", "input_ids", "response_mask", "truth", "text",
                   "char_start", "char_end", "part", "source", "row_index")
_SAMPLE_COLUMNS = _INGEST_COLUMNS[:-3]


def insert_staged_dataset(con, dataset: str, inputs: dict, summary: dict) -> dict:
    """Record the staged ingest as ``dataset``, in one transaction: new samples and their response tokens,
    membership, quarantine, the dataset row; then drop the staging tables.

    Samples already stored under the same id (same tokenization, id and content) are not
    written again: their stored losses stay valid. Returns counts of new and known samples.
    Every step is SQL over the staged tables (streamed and spilled by DuckDB, never held
    in Python).
    """
    if not _stage_exists(con):
        raise ValueError("nothing staged")
    sample_cols = ", ".join(f'"{c}"' for c in _SAMPLE_COLUMNS)
    with transaction(con):
        known = con.execute(f"SELECT count(*) FROM {STAGE} n SEMI JOIN samples s USING (sample_id)").fetchone()[0]
        # only the ids are held apart (8 bytes a sample); the rows stream from the staging table
        con.execute(f"""CREATE TEMP TABLE _fresh AS SELECT DISTINCT sample_id FROM {STAGE} n
                        WHERE NOT EXISTS (SELECT 1 FROM samples s WHERE s.sample_id = n.sample_id)""")
        con.execute(f"INSERT INTO samples BY NAME SELECT {sample_cols} FROM {STAGE} SEMI JOIN _fresh USING (sample_id)")
        con.execute(
            f"""INSERT INTO response_tokens
               SELECT sample_id, pos, token_id, truth FROM (
                 SELECT sample_id, unnest(range(n_tokens)) AS pos, unnest(input_ids) AS token_id,
                        unnest(response_mask) AS is_target, unnest(truth) AS truth
                 FROM {STAGE} SEMI JOIN _fresh USING (sample_id))
               WHERE is_target""")
        n_new = con.execute("SELECT count(*) FROM _fresh").fetchone()[0]
        con.execute("DROP TABLE _fresh")
        con.execute("DELETE FROM dataset_samples WHERE dataset = ?", [dataset])
        con.execute(f"INSERT INTO dataset_samples SELECT ?, sample_id, part, source, row_index FROM {STAGE} "
                    "ORDER BY ordinal", [dataset])
        con.execute("DELETE FROM quarantine WHERE dataset = ?", [dataset])
        con.execute(f"INSERT INTO quarantine SELECT ?, source, row_index, reason, raw FROM {STAGE_Q} ORDER BY ordinal",
                    [dataset])
        con.execute("INSERT OR REPLACE INTO datasets VALUES (?, ?, ?, now())",
                    [dataset, json.dumps(inputs), json.dumps(summary)])
        con.execute(f"DROP TABLE {STAGE}")
        con.execute(f"DROP TABLE {STAGE_Q}")
    return {"new_samples": n_new, "known_samples": known}


def insert_dataset(con, dataset: str, samples: pa.Table, quarantine: list[dict], inputs: dict, summary: dict) -> dict:
    """Record an ingest given in memory (``samples`` in ``INGEST_SCHEMA``, quarantine rows as dicts):
    staged as one chunk, then ``insert_staged_dataset``."""
    n = samples.num_rows
    table = samples.append_column("ordinal", pa.array(range(n), pa.int64())) \
        .append_column("source_path", samples.column("source")).append_column("raw", pa.nulls(n, pa.string()))
    q = pa.Table.from_pylist([{"ordinal": n + i, **{k: r.get(k) for k in STAGE_Q_COLUMNS[1:]}}
                              for i, r in enumerate(quarantine)], schema=STAGE_Q_SCHEMA)
    stage_reset(con)
    stage_samples(con, table)
    stage_quarantine(con, q)
    return insert_staged_dataset(con, dataset, inputs, summary)


def dataset_diff(con, old: str, new: str) -> dict:
    """How dataset ``new`` differs from ``old``, by row id and content (for refresh reports)."""
    row = con.execute(
        """WITH o AS (SELECT s.uid, s.sample_id FROM dataset_samples d JOIN samples s USING (sample_id)
                      WHERE d.dataset = ?),
                n AS (SELECT s.uid, s.sample_id FROM dataset_samples d JOIN samples s USING (sample_id)
                      WHERE d.dataset = ?)
           SELECT count(*) FILTER (WHERE o.uid IS NOT NULL AND n.uid IS NOT NULL AND o.sample_id = n.sample_id),
                  count(*) FILTER (WHERE o.uid IS NOT NULL AND n.uid IS NOT NULL AND o.sample_id <> n.sample_id),
                  count(*) FILTER (WHERE o.uid IS NULL),
                  count(*) FILTER (WHERE n.uid IS NULL)
           FROM o FULL OUTER JOIN n USING (uid)""", [old, new]).fetchone()
    return dict(zip(("unchanged", "changed", "added", "removed"), row))


def pool_digest(con, dataset: str, parts: list[int], limit: int | None = None) -> str:
    """Key of a pool: the sorted ids of its samples (content-addressed, so content is covered).

    Two datasets whose D0 holds the same samples give D0 the same digest, whatever else
    changed: that is what lets a refresh of D2 keep the reference trained on D0.
    ``limit`` keys the first ``limit`` samples (the evaluation subset).
    """
    from tokenclean.tasks.keys import digest

    lim = f"LIMIT {int(limit)}" if limit else ""
    row = con.execute(
        f"""SELECT count(*), md5(coalesce(string_agg(sample_id::VARCHAR, ',' ORDER BY sample_id), '')) FROM
            (SELECT sample_id FROM dataset_samples WHERE dataset = ? AND part IN ({sql_parts(parts)})
             ORDER BY sample_id {lim})""", [dataset]).fetchone()
    return digest("pool", row[0], row[1])


def count_pool(con, dataset: str, parts: list[int]) -> tuple[int, int]:
    """(samples, response tokens) of a pool."""
    return con.execute(
        f"SELECT count(*), coalesce(sum(s.n_response), 0) FROM dataset_samples d JOIN samples s USING (sample_id) "
        f"WHERE d.dataset = ? AND d.part IN ({sql_parts(parts)})", [dataset]).fetchone()


def samples_by_part(con, dataset: str) -> dict[int, int]:
    return dict(con.execute("SELECT part, count(*) FROM dataset_samples WHERE dataset = ? GROUP BY part ORDER BY part",
                            [dataset]).fetchall())


def sample_batch(con, sample_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(sample_id, offsets, input_ids, response_mask) of the given samples, ordered by id, as flat arrays.

    Read through Arrow: the list columns' values and offsets are taken as they are, with
    no Python object per sample or per token.
    """
    ids = sample_ids.tolist() if isinstance(sample_ids, np.ndarray) else list(sample_ids)
    # a cursor: Arrow output comes from a relation (con.sql), which DuckDB refuses on a connection
    # with an unfinished result (any earlier execute().fetchone()); samples are committed data
    cur = con.cursor()
    try:
        t = cur.sql("SELECT sample_id, input_ids, response_mask FROM samples WHERE sample_id IN (SELECT unnest($ids)) "
                    "ORDER BY sample_id", params={"ids": ids}).to_arrow_table().combine_chunks()
    finally:
        cur.close()

    def flat(name):
        col = t.column(name)
        if col.num_chunks == 0:
            return np.zeros(1, np.int64), np.zeros(0)
        arr = col.chunk(0)
        off = arr.offsets.to_numpy().astype(np.int64)
        return off - off[0], arr.values.to_numpy(zero_copy_only=False)[off[0]:off[-1]]

    offsets, tokens = flat("input_ids")
    mask_offsets, mask = flat("response_mask")
    if not np.array_equal(offsets, mask_offsets):
        raise ValueError("samples table: input_ids and response_mask lengths differ")
    return (t.column("sample_id").to_numpy().astype(np.int64), offsets, tokens.astype(np.int32, copy=False),
            mask.astype(bool, copy=False))


def sample_arrays(con, sample_ids: list[int]) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(sample_id, input_ids, response_mask) of the given samples, ordered by id."""
    rows = con.execute("SELECT sample_id, input_ids, response_mask FROM samples WHERE sample_id IN (SELECT unnest(?)) "
                       "ORDER BY sample_id", [sample_ids]).fetchall()
    return [(r[0], np.asarray(r[1], dtype=np.int32), np.asarray(r[2], dtype=bool)) for r in rows]


def eval_rows(con, dataset: str, max_samples: int | None = None) -> list[tuple]:
    """Held-out samples: (sample_id, task, input_ids, response_mask, answer_start, answer_end, answer)."""
    lim = f"LIMIT {int(max_samples)}" if max_samples else ""
    return con.execute(
        f"""SELECT s.sample_id, s.task, s.input_ids, s.response_mask, s.answer_start, s.answer_end, s.answer
            FROM dataset_samples d JOIN samples s USING (sample_id) WHERE d.dataset = ? AND d.part = {EVAL_PART}
            ORDER BY s.sample_id {lim}""", [dataset]).fetchall()


def sample_row(con, sample_id: int):
    return con.execute("SELECT input_ids, response_mask, uid FROM samples WHERE sample_id = ?", [sample_id]).fetchone()


def sample_id_of_uid(con, dataset: str, uid: str) -> int | None:
    row = con.execute("SELECT s.sample_id FROM dataset_samples d JOIN samples s USING (sample_id) "
                      "WHERE d.dataset = ? AND s.uid = ?", [dataset, uid]).fetchone()
    return row[0] if row else None


def quarantine_reasons(con, dataset: str) -> dict[str, int]:
    return dict(con.execute(
        "SELECT regexp_replace(reason, '''.*''|\\d+', '…', 'g') AS r, count(*) FROM quarantine WHERE dataset = ? "
        "GROUP BY r ORDER BY 2 DESC", [dataset]).fetchall())


def pool_relation(dataset: str, parts: list[int]) -> str:
    """SQL relation of a pool's samples (sample_id, part, source), for composing queries inside the store."""
    return (f"(SELECT sample_id, part, source FROM dataset_samples WHERE dataset = {sql_key(dataset)} "
            f"AND part IN ({sql_parts(parts)}))")


def last_ingested_dataset(con) -> str | None:
    """The most recently ingested dataset (what a new ingest is compared against)."""
    row = con.execute("SELECT dataset FROM datasets ORDER BY created_at DESC LIMIT 1").fetchone()
    return row[0] if row else None
