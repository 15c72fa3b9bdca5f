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


def insert_dataset(con, dataset: str, samples: pa.Table, quarantine: list[dict], inputs: dict, summary: dict) -> dict:
    """Record one ingest, in one transaction: new samples and their tokens, membership, quarantine.

    ``samples`` has the sample columns plus ``part``, ``source`` and ``row_index``. Samples
    already stored under the same id (same tokenization, id and content) are not written
    again: their stored losses stay valid. Returns counts of new and known samples.
    """
    membership = samples.select(["sample_id", "part", "source", "row_index"])
    sample_cols = samples.drop_columns(["part", "source", "row_index"])
    with transaction(con):
        con.register("_new_samples", sample_cols)
        known = con.execute("SELECT count(*) FROM _new_samples n SEMI JOIN samples s USING (sample_id)").fetchone()[0]
        con.execute("""CREATE TEMP TABLE _fresh AS SELECT * FROM _new_samples n
                       WHERE NOT EXISTS (SELECT 1 FROM samples s WHERE s.sample_id = n.sample_id)""")
        con.unregister("_new_samples")
        con.execute("INSERT INTO samples BY NAME SELECT * FROM _fresh")
        con.execute(
            """INSERT INTO response_tokens
               SELECT sample_id, pos, token_id, truth FROM (
                 SELECT sample_id, unnest(range(n_tokens)) AS pos, unnest(input_ids) AS token_id,
                        unnest(response_mask) AS is_target, unnest(truth) AS truth FROM _fresh)
               WHERE is_target""")
        n_new = con.execute("SELECT count(*) FROM _fresh").fetchone()[0]
        con.execute("DROP TABLE _fresh")
        con.execute("DELETE FROM dataset_samples WHERE dataset = ?", [dataset])
        con.register("_members", membership)
        con.execute("INSERT INTO dataset_samples SELECT ?, sample_id, part, source, row_index FROM _members", [dataset])
        con.unregister("_members")
        con.execute("DELETE FROM quarantine WHERE dataset = ?", [dataset])
        if quarantine:
            con.register("_q", pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA))
            con.execute("INSERT INTO quarantine SELECT ?, source, row_index, reason, raw FROM _q", [dataset])
            con.unregister("_q")
        con.execute("INSERT OR REPLACE INTO datasets VALUES (?, ?, ?, now())",
                    [dataset, json.dumps(inputs), json.dumps(summary)])
    return {"new_samples": n_new, "known_samples": known}


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


def sample_lengths(con, sample_ids: list[int]) -> dict[int, int]:
    return dict(con.execute("SELECT sample_id, n_tokens FROM samples WHERE sample_id IN (SELECT unnest(?))",
                            [sample_ids]).fetchall())


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
