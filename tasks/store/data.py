"""Samples, datasets and pools.

Samples are content-addressed and immutable: ingesting a dataset inserts only samples
whose id is new, so a refresh that changes ten rows adds ten samples and leaves every
other sample (and everything computed from it) untouched. A dataset records which
samples an input produced and into which part (D0..DT, or -1 for held-out) each fell.
"""
from __future__ import annotations

import contextlib
import json
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from tokenclean.tasks.store.db import SAMPLE_SCHEMA, sql_columns, sql_key, sql_parts, transaction

EVAL_PART = -1

QUARANTINE_SCHEMA = pa.schema([("source", pa.string()), ("row_index", pa.int64()), ("reason", pa.string()),
                               ("raw", pa.string())])


def dataset_summary(con, dataset: str) -> dict | None:
    """The stored ingest summary of ``dataset``, or None if that dataset was never ingested completely."""
    row = con.execute("SELECT summary FROM datasets WHERE dataset = ?", [dataset]).fetchone()
    return json.loads(row[0]) if row else None


# An ingest is staged as views over its parts (each split's Parquet files), read where they lie:
# nothing is copied into the database before ``insert_staged_dataset`` writes the dataset.
STAGE, STAGE_Q, STAGE_DUPS = "ingest_stage", "ingest_stage_quarantine", "ingest_duplicates"
STAGE_KEPT, STAGE_ALL_Q = "ingest_kept", "ingest_quarantined"  # the samples minus duplicates; all quarantined rows

# A staged quarantined row: where it was (its input-wide ordinal orders the quarantine), why, and what it said.
STAGE_Q_SCHEMA = pa.schema([("ordinal", pa.int64()), ("source", pa.string()), ("row_index", pa.int64()),
                            ("reason", pa.string()), ("raw", pa.string())])
STAGE_Q_COLUMNS = tuple(STAGE_Q_SCHEMA.names)
_STAGE_Q_SQL = sql_columns(STAGE_Q_SCHEMA)
# What ingest gives per sample: the stored sample, plus where this dataset has it (dataset_samples' columns).
INGEST_SCHEMA = SAMPLE_SCHEMA.append(pa.field("part", pa.int16())).append(pa.field("source", pa.string())) \
    .append(pa.field("row_index", pa.int64()))
# A staged sample (each split's part): plus what staging needs to find duplicate ids in input order.
STAGE_SCHEMA = INGEST_SCHEMA.append(pa.field("ordinal", pa.int64())).append(pa.field("source_path", pa.string())) \
    .append(pa.field("raw", pa.string()))
# the reason of a duplicate, as SQL over the window below: duplicate id 'x' (first seen in FILE:LINE)
_DUPLICATE_REASON = ("concat('duplicate id ', chr(39), uid, chr(39), ' (first seen in ', first_path, ':', first_row, "
                     "')')")


def _sql_string(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _relation(con, name: str, source) -> str:
    """SQL for a staged source: Parquet files (local paths) read by DuckDB, or an Arrow table registered."""
    if isinstance(source, (list, tuple)):
        return f"read_parquet([{', '.join(_sql_string(p) for p in source)}])"
    con.register(f"_{name}_rows", source)
    return f"_{name}_rows"


def stage_reset(con) -> None:
    """Drop what staging an ingest made on this connection (an interrupted one's views and tables)."""
    for view in (STAGE_KEPT, STAGE_ALL_Q, STAGE, STAGE_Q):
        con.execute(f"DROP VIEW IF EXISTS {view}")
    con.execute(f"DROP TABLE IF EXISTS {STAGE_DUPS}")
    for name in (STAGE, STAGE_Q):
        with contextlib.suppress(Exception):
            con.unregister(f"_{name}_rows")


def stage_parts(con, samples, quarantine) -> None:
    """Stage an ingest: ``samples`` (``STAGE_SCHEMA``) and ``quarantine`` (``STAGE_Q_SCHEMA``), each a
    non-empty list of local Parquet files (one per split) or an Arrow table.

    Views, not copies: DuckDB reads the parts where they lie, in parallel and within its
    memory limit, when ``insert_staged_dataset`` writes the dataset. So an ingest's memory
    does not grow with the input, and its rows are written into the database once.
    """
    stage_reset(con)
    con.execute(f"CREATE TEMP VIEW {STAGE} AS SELECT * FROM {_relation(con, STAGE, samples)}")
    con.execute(f"CREATE TEMP VIEW {STAGE_Q} AS SELECT {', '.join(STAGE_Q_COLUMNS)} "
                f"FROM {_relation(con, STAGE_Q, quarantine)}")
    con.execute(f"CREATE TEMP TABLE {STAGE_DUPS} ({_STAGE_Q_SQL})")
    con.execute(f"CREATE TEMP VIEW {STAGE_KEPT} AS SELECT * FROM {STAGE} ANTI JOIN {STAGE_DUPS} USING (ordinal)")
    con.execute(f"CREATE TEMP VIEW {STAGE_ALL_Q} AS SELECT * FROM {STAGE_Q} UNION ALL SELECT * FROM {STAGE_DUPS}")


def _staged(con) -> bool:
    return con.execute("SELECT count(*) FROM duckdb_views() WHERE view_name = ?", [STAGE_KEPT]).fetchall()[0][0] > 0


def stage_duplicates(con) -> int:
    """Quarantine every staged row whose id an earlier row (in input order) already has; returns how many.

    Decided over the whole input once every split is staged, so it does not depend on how
    the input was split or chunked, or on how many workers processed it.
    """
    if not _staged(con):
        return 0
    con.execute(f"DELETE FROM {STAGE_DUPS}")
    con.execute(
        f"""INSERT INTO {STAGE_DUPS}
            SELECT ordinal, source_path, row_index, {_DUPLICATE_REASON}, raw
            FROM (SELECT ordinal, uid, source_path, row_index, raw,
                         first_value(source_path) OVER w AS first_path, first_value(row_index) OVER w AS first_row,
                         row_number() OVER w AS n
                  FROM {STAGE} WINDOW w AS (PARTITION BY uid ORDER BY ordinal))
            WHERE n > 1""")
    return con.execute(f"SELECT count(*) FROM {STAGE_DUPS}").fetchall()[0][0]


def stage_summary(con) -> dict:
    """Counts of the staged ingest: samples kept, rows quarantined, samples truncated."""
    if not _staged(con):
        return {"samples": 0, "quarantined": 0, "truncated": 0}
    n, trunc = con.execute(f"SELECT count(*), count(*) FILTER (WHERE truncated) FROM {STAGE_KEPT}").fetchall()[0]
    q = con.execute(f"SELECT count(*) FROM {STAGE_ALL_Q}").fetchall()[0][0]
    return {"samples": n, "quarantined": q, "truncated": trunc}


def staged_samples(con) -> pa.Table:
    """The staged samples in input order, ``INGEST_SCHEMA`` columns (an in-memory ingest's result)."""
    cols = ", ".join(f'"{c}"' for c in INGEST_SCHEMA.names)
    return con.sql(f"SELECT {cols} FROM {STAGE_KEPT} ORDER BY ordinal").to_arrow_table()


def staged_quarantine(con) -> list[dict]:
    return [dict(zip(("source", "row_index", "reason", "raw"), r)) for r in con.execute(
        f"SELECT source, row_index, reason, raw FROM {STAGE_ALL_Q} ORDER BY ordinal").fetchall()]


def insert_staged_dataset(con, dataset: str, inputs: dict, summary: dict) -> dict:
    """Record the staged ingest as ``dataset``, in one transaction: new samples and their response tokens,
    membership, quarantine, the dataset row; then drop the staging tables.

    Samples already stored under the same id (same tokenization, id and content) are not
    written again: their stored losses stay valid. Returns counts of new and known samples.
    Every step is SQL over the staged tables (streamed and spilled by DuckDB, never held
    in Python).
    """
    if not _staged(con):
        raise ValueError("nothing staged")
    sample_cols = ", ".join(f'"{c}"' for c in SAMPLE_SCHEMA.names)
    # rows are found by key, never by position, and the one ordered insert says ORDER BY: without
    # insertion order DuckDB streams the parts' list columns within its memory limit
    con.execute("SET preserve_insertion_order = false")
    with contextlib.ExitStack() as restore, transaction(con):
        restore.callback(con.execute, "RESET preserve_insertion_order")
        known = con.execute(f"SELECT count(*) FROM {STAGE_KEPT} n SEMI JOIN samples s USING (sample_id)"
                            ).fetchall()[0][0]
        # only the ids are held apart (8 bytes a sample); the rows stream from the parts, read once: the
        # response tokens come from the samples just written
        con.execute(f"""CREATE TEMP TABLE _fresh AS SELECT DISTINCT sample_id FROM {STAGE_KEPT} n
                        WHERE NOT EXISTS (SELECT 1 FROM samples s WHERE s.sample_id = n.sample_id)""")
        con.execute(f"INSERT INTO samples BY NAME SELECT {sample_cols} FROM {STAGE_KEPT} SEMI JOIN _fresh "
                    "USING (sample_id)")
        con.execute(
            """INSERT INTO response_tokens
               SELECT sample_id, pos, token_id, truth FROM (
                 SELECT sample_id, unnest(range(n_tokens)) AS pos, unnest(input_ids) AS token_id,
                        unnest(response_mask) AS is_target, unnest(truth) AS truth
                 FROM samples SEMI JOIN _fresh USING (sample_id))
               WHERE is_target""")
        n_new = con.execute("SELECT count(*) FROM _fresh").fetchall()[0][0]
        con.execute("DROP TABLE _fresh")
        con.execute("DELETE FROM dataset_samples WHERE dataset = ?", [dataset])
        con.execute(f"INSERT INTO dataset_samples SELECT ?, sample_id, part, source, row_index FROM {STAGE_KEPT} "
                    "ORDER BY ordinal", [dataset])
        con.execute("DELETE FROM quarantine WHERE dataset = ?", [dataset])
        con.execute(f"INSERT INTO quarantine SELECT ?, source, row_index, reason, raw FROM {STAGE_ALL_Q} "
                    "ORDER BY ordinal", [dataset])
        con.execute("INSERT OR REPLACE INTO datasets VALUES (?, ?, ?, now())",
                    [dataset, json.dumps(inputs), json.dumps(summary)])
    stage_reset(con)
    return {"new_samples": n_new, "known_samples": known}


def dataset_inputs(con, dataset: str) -> dict:
    """What ``dataset`` was ingested from: paths, content fingerprint, tokenization, split."""
    return json.loads(con.execute("SELECT inputs FROM datasets WHERE dataset = ?", [dataset]).fetchone()[0])


def dataset_diff(con, old: str, new: str, parts: list[int] | None = None) -> dict:
    """How dataset ``new`` differs from ``old``, by row id and content (for refresh reports); ``parts``: only
    those parts of each (the warm-up set D0: ``[0]``)."""
    where = f"AND d.part IN ({sql_parts(parts)})" if parts is not None else ""
    row = con.execute(
        f"""WITH o AS (SELECT s.uid, s.sample_id FROM dataset_samples d JOIN samples s USING (sample_id)
                      WHERE d.dataset = ? {where}),
                n AS (SELECT s.uid, s.sample_id FROM dataset_samples d JOIN samples s USING (sample_id)
                      WHERE d.dataset = ? {where})
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


class EvalRow(NamedTuple):
    """A held-out sample as evaluation reads it."""

    sample_id: int
    task: str | None
    input_ids: list[int]
    response_mask: list[bool]
    answer_start: int | None  # [start, end) positions of the answer in input_ids; None or < 0: no answer
    answer_end: int | None
    answer: str | None


def eval_rows(con, dataset: str, max_samples: int | None = None) -> list[EvalRow]:
    """Held-out samples of ``dataset`` in sample-id order: all, or the first ``max_samples``."""
    lim = f"LIMIT {int(max_samples)}" if max_samples else ""
    rows = con.execute(
        f"""SELECT {", ".join("s." + f for f in EvalRow._fields)}
            FROM dataset_samples d JOIN samples s USING (sample_id) WHERE d.dataset = ? AND d.part = {EVAL_PART}
            ORDER BY s.sample_id {lim}""", [dataset]).fetchall()
    return [EvalRow(*r) for r in rows]


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


# A quarantined row's input id: its JSON's "id" where the kept text parses; else (a row longer than the
# quarantine keeps) a leading "id" key's value; else the id a duplicate's reason names.
_QUARANTINE_ID = ("coalesce(CASE WHEN json_valid(raw) AND json_type(raw) = 'OBJECT' "
                  "THEN json_extract_string(raw, '$.id') END, "
                  """nullif(regexp_extract(raw, '^\\s*\\{\\s*"id"\\s*:\\s*"([^"\\\\]*)"', 1), ''), """
                  """nullif(regexp_extract(raw, '^\\s*\\{\\s*"id"\\s*:\\s*(-?[0-9]+)', 1), ''), """
                  "nullif(regexp_extract(reason, '^duplicate id ''(.*)'' \\(first seen in ', 1), ''))")


def count_quarantined(con, dataset: str) -> int:
    return con.execute("SELECT count(*) FROM quarantine WHERE dataset = ?", [dataset]).fetchone()[0]


def quarantined_rows(con, dataset: str, limit: int | None = None, uid: str | None = None) -> list[dict]:
    """Quarantined rows of ``dataset`` (source, row_index, id, reason) in file and row order: all, the first
    ``limit``, or those whose input id is ``uid``."""
    where, params = "dataset = ?", [dataset]
    if uid is not None:
        where, params = f"{where} AND {_QUARANTINE_ID} = ?", [dataset, uid]
    sql = (f"SELECT source, row_index, {_QUARANTINE_ID} AS id, reason FROM quarantine WHERE {where} "
           "ORDER BY source, row_index")
    if limit is not None:
        sql, params = f"{sql} LIMIT ?", [*params, int(limit)]
    return [dict(zip(("source", "row_index", "id", "reason"), r)) for r in con.execute(sql, params).fetchall()]


def pool_relation(dataset: str, parts: list[int]) -> str:
    """SQL relation of a pool's samples (sample_id, part, source), for composing queries inside the store."""
    return (f"(SELECT sample_id, part, source FROM dataset_samples WHERE dataset = {sql_key(dataset)} "
            f"AND part IN ({sql_parts(parts)}))")


def last_ingested_dataset(con) -> str | None:
    """The most recently ingested dataset (what a new ingest is compared against)."""
    row = con.execute("SELECT dataset FROM datasets ORDER BY created_at DESC LIMIT 1").fetchone()
    return row[0] if row else None
