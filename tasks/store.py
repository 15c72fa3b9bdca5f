"""DuckDB: the one place a run's samples, token losses, selections and metrics live.

Workers never write to DuckDB (a DuckDB file has one writer process). They write
Parquet shards atomically; the driver loads a shard with delete-then-insert inside one
transaction, so a retried or resumed shard replaces its rows and never duplicates them.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS samples (
    sample_id BIGINT PRIMARY KEY, uid VARCHAR, source VARCHAR, part SMALLINT, task VARCHAR,
    answer VARCHAR, content_hash VARCHAR, n_tokens INTEGER, n_response INTEGER, truncated BOOLEAN,
    answer_start INTEGER, answer_end INTEGER,
    input_ids INTEGER[], response_mask BOOLEAN[], truth UTINYINT[]
);
-- One row per response (target) token: the candidate pool of every selection, with
-- ground-truth labels when the input carries them (NULL otherwise).
CREATE TABLE IF NOT EXISTS response_tokens (sample_id BIGINT, pos INTEGER, token_id INTEGER, truth UTINYINT);
CREATE TABLE IF NOT EXISTS quarantine (source VARCHAR, row_index BIGINT, reason VARCHAR, raw VARCHAR);
-- Raw per-token losses, one row per (model, response token). 'model' is 'base' or
-- 'ref-<t>' (base + adapter of iteration t); base losses are computed once.
CREATE TABLE IF NOT EXISTS token_losses (
    model VARCHAR, shard INTEGER, sample_id BIGINT, pos INTEGER, token_id INTEGER, loss FLOAT
);
CREATE TABLE IF NOT EXISTS shards_done (model VARCHAR, shard INTEGER, n_tokens BIGINT, finished_at TIMESTAMP,
    PRIMARY KEY (model, shard));
-- score = loss_base - loss_ref = log p_ref - log p_base, per iteration's reference.
CREATE TABLE IF NOT EXISTS token_scores (
    iteration INTEGER, sample_id BIGINT, pos INTEGER, token_id INTEGER,
    base_loss FLOAT, ref_loss FLOAT, score FLOAT
);
CREATE TABLE IF NOT EXISTS selected_tokens (selection VARCHAR, sample_id BIGINT, pos INTEGER);
CREATE TABLE IF NOT EXISTS selections (
    selection VARCHAR PRIMARY KEY, method VARCHAR, k DOUBLE, iteration INTEGER, threshold DOUBLE,
    n_candidates BIGINT, n_kept BIGINT, precision DOUBLE, recall DOUBLE, created_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS metrics (
    variant VARCHAR, iteration INTEGER, metric VARCHAR, task VARCHAR, value DOUBLE, created_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS stage_log (stage VARCHAR, key VARCHAR, seconds DOUBLE, detail VARCHAR, finished_at TIMESTAMP);
"""


class DatabaseBusy(RuntimeError):
    pass


class FingerprintMismatch(RuntimeError):
    pass


def connect(path: str | Path, *, read_only: bool = False, wait_s: float = 0.0) -> duckdb.DuckDBPyConnection:
    """Open (and create) a run database.

    A second process gets ``DatabaseBusy`` with the holder named, optionally after
    waiting ``wait_s`` seconds for the lock; DuckDB's own lock keeps the file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only)
            break
        except duckdb.IOException as e:
            if "lock" not in str(e).lower():
                raise
            if time.monotonic() >= deadline:
                raise DatabaseBusy(
                    f"database busy: {path} is open in another tokenclean process ({e}). "
                    "Wait for it to finish, or use another run name."
                ) from e
            time.sleep(0.5)
    if not read_only:
        con.execute(SCHEMA)
    return con


@contextlib.contextmanager
def transaction(con):
    """All or nothing: a crash or error inside leaves the database as it was."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def get_meta(con, key: str) -> str | None:
    row = con.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
    return row[0] if row else None


def set_meta(con, key: str, value) -> None:
    con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [key, value if isinstance(value, str) else json.dumps(value)])


def check_fingerprint(con, fingerprint: dict) -> bool:
    """True if the stored samples were tokenised exactly like this; False if none stored yet.

    Raises on a mismatch: scores and selections are indexed by token position, so a
    different tokenizer, template or max length would silently misalign every label.
    """
    stored = get_meta(con, "fingerprint")
    if stored is None:
        return False
    stored = json.loads(stored)
    diffs = {k: (stored.get(k), v) for k, v in fingerprint.items() if stored.get(k) != v}
    if diffs:
        lines = ", ".join(f"{k}: stored {a!r} != now {b!r}" for k, (a, b) in diffs.items())
        raise FingerprintMismatch(
            f"this run's database was tokenised differently ({lines}). Token positions would not line up "
            "with stored scores; start a new run (another run name or workdir) instead."
        )
    return True


def insert_samples(con, samples: pa.Table, quarantine: list[dict]) -> None:
    """Samples, their response-token pool and quarantined rows, in one transaction."""
    with transaction(con):
        _insert_samples(con, samples, quarantine)


def _insert_samples(con, samples: pa.Table | str, quarantine: list[dict]) -> None:
    """``samples``: an Arrow table, or the SQL of a relation with the samples schema."""
    if isinstance(samples, pa.Table):
        con.register("_new_samples", samples)
        con.execute("INSERT INTO samples SELECT * FROM _new_samples")
        con.unregister("_new_samples")
    else:
        con.execute(f"INSERT INTO samples {samples}")
    con.execute(
        """INSERT INTO response_tokens
           SELECT sample_id, pos, token_id, truth FROM (
             SELECT sample_id, unnest(range(n_tokens)) AS pos, unnest(input_ids) AS token_id,
                    unnest(response_mask) AS is_target, unnest(truth) AS truth
             FROM samples WHERE sample_id NOT IN (SELECT DISTINCT sample_id FROM response_tokens))
           WHERE is_target"""
    )
    if quarantine:
        q = pa.Table.from_pylist(quarantine, schema=pa.schema(
            [("source", pa.string()), ("row_index", pa.int64()), ("reason", pa.string()), ("raw", pa.string())]))
        con.register("_new_q", q)
        con.execute("INSERT INTO quarantine SELECT * FROM _new_q")
        con.unregister("_new_q")


def apply_refresh(con, fresh: pa.Table, quarantine: list[dict]) -> dict:
    """Bring stored samples in line with a re-read input, keeping what did not change.

    A sample is unchanged iff its id and content hash are both stored: it keeps its
    sample_id and therefore its stored losses. Changed and removed samples are deleted
    with everything derived from them; changed and new ones are inserted with fresh ids,
    so the next scoring pass sees exactly them as unscored.
    """
    with transaction(con):
        con.register("_fresh", fresh)
        counts = con.execute(
            """SELECT count(*) FILTER (WHERE s.uid IS NOT NULL AND s.content_hash = f.content_hash),
                      count(*) FILTER (WHERE s.uid IS NOT NULL AND s.content_hash <> f.content_hash),
                      count(*) FILTER (WHERE s.uid IS NULL)
               FROM _fresh f LEFT JOIN samples s USING (uid)""").fetchone()
        removed = con.execute("SELECT count(*) FROM samples WHERE uid NOT IN (SELECT uid FROM _fresh)").fetchone()[0]
        con.execute("""CREATE TEMP TABLE _stale AS SELECT sample_id FROM samples s WHERE NOT EXISTS
                       (SELECT 1 FROM _fresh f WHERE f.uid = s.uid AND f.content_hash = s.content_hash)""")
        for table in ("response_tokens", "token_losses", "token_scores", "selected_tokens", "samples"):
            con.execute(f"DELETE FROM {table} WHERE sample_id IN (SELECT sample_id FROM _stale)")
        start = int(con.execute("SELECT coalesce(max(sample_id) + 1, 0) FROM samples").fetchone()[0])
        con.execute("DROP TABLE _stale")
        con.execute("DELETE FROM quarantine")
        _insert_samples(con, f"""SELECT * REPLACE ({start} + row_number() OVER (ORDER BY sample_id) - 1 AS sample_id)
                                 FROM _fresh f WHERE NOT EXISTS (SELECT 1 FROM samples s WHERE s.uid = f.uid)""",
                        quarantine)
        con.unregister("_fresh")
    return {"unchanged": counts[0], "changed": counts[1], "added": counts[2], "removed": removed}


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def load_loss_shard(con, model: str, shard: int, path: Path) -> int:
    """Idempotent: a shard loaded twice leaves exactly one copy of its rows."""
    with transaction(con):
        con.execute("DELETE FROM token_losses WHERE model = ? AND shard = ?", [model, shard])
        con.execute(
            "INSERT INTO token_losses SELECT ?, ?, sample_id, pos, token_id, loss FROM read_parquet(?)",
            [model, shard, str(path)],
        )
        n = con.execute("SELECT count(*) FROM token_losses WHERE model = ? AND shard = ?", [model, shard]).fetchone()[0]
        con.execute("INSERT OR REPLACE INTO shards_done VALUES (?, ?, ?, now())", [model, shard, n])
    return n


def log_stage(con, stage: str, key: str, seconds: float, detail: dict | None = None) -> None:
    con.execute("INSERT INTO stage_log VALUES (?, ?, ?, ?, now())", [stage, key, seconds, json.dumps(detail or {})])


def record_metric(con, variant: str, iteration: int, metric: str, value: float, task: str | None = None) -> None:
    con.execute(
        "DELETE FROM metrics WHERE variant = ? AND iteration = ? AND metric = ? AND task IS NOT DISTINCT FROM ?",
        [variant, iteration, metric, task],
    )
    con.execute("INSERT INTO metrics VALUES (?, ?, ?, ?, ?, now())", [variant, iteration, metric, task, value])
