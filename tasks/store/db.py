"""The run database: connection, schema, transactions.

Every table holding a computed result carries the key of what computed it
(``tokenclean.tasks.keys``). Rows are written once under their key and never updated in
place; a changed input yields a new key, and a step is skipped only when its key is
already stored complete. Workers never write to DuckDB (a DuckDB file has one writer
process): they write Parquet shards atomically under the model's key (``tasks/storage.py``), and the driver
loads a shard with delete-then-insert inside one transaction.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import duckdb

DB_FILE = "tokenclean.duckdb"  # a run directory's database: the run's one source of truth

SCHEMA_VERSION = "4"
# In-place upgrades from older versions whose rows stay valid under the same keys.
# 2 -> 3: samples carry their rendered text and each token's character span (for export);
# samples ingested before keep NULL there, and export says so.
# 3 -> 4: samples carry which targets are the model's reasoning (the report's reasoning vs answer share);
# samples ingested before keep NULL there, and the report counts them apart.
_REASONING_COLUMN = "ALTER TABLE samples ADD COLUMN IF NOT EXISTS reasoning_mask BOOLEAN[]"
MIGRATIONS = {"2": ["ALTER TABLE samples ADD COLUMN text VARCHAR",
                    "ALTER TABLE samples ADD COLUMN char_start INTEGER[]",
                    "ALTER TABLE samples ADD COLUMN char_end INTEGER[]", _REASONING_COLUMN],
              "3": [_REASONING_COLUMN]}

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR);
-- Tokenised samples, content-addressed: sample_id = keys.sample_id(tokenization, uid, content_hash).
CREATE TABLE IF NOT EXISTS samples (
    sample_id BIGINT PRIMARY KEY, tokenization VARCHAR, uid VARCHAR, task VARCHAR, answer VARCHAR,
    content_hash VARCHAR, n_tokens INTEGER, n_response INTEGER, truncated BOOLEAN,
    answer_start INTEGER, answer_end INTEGER,
    input_ids INTEGER[], response_mask BOOLEAN[], truth UTINYINT[],
    text VARCHAR, char_start INTEGER[], char_end INTEGER[],  -- rendered text; token i covers [char_start, char_end)
    reasoning_mask BOOLEAN[]  -- targets of the model's reasoning (data.template: model); NULL: not recorded
);
-- One row per response (target) token of a sample, with ground-truth labels when known.
CREATE TABLE IF NOT EXISTS response_tokens (sample_id BIGINT, pos INTEGER, token_id INTEGER, truth UTINYINT);
-- A dataset: what one ingest of given inputs (bytes, tokenization, split) produced.
CREATE TABLE IF NOT EXISTS datasets (dataset VARCHAR PRIMARY KEY, inputs VARCHAR, summary VARCHAR,
    created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS dataset_samples (dataset VARCHAR, sample_id BIGINT, part SMALLINT, source VARCHAR,
    row_index BIGINT);
CREATE TABLE IF NOT EXISTS quarantine (dataset VARCHAR, source VARCHAR, row_index BIGINT, reason VARCHAR,
    raw VARCHAR);
-- Models that score: a base model, or base + one saved adapter; 'model' is its key.
CREATE TABLE IF NOT EXISTS models (model VARCHAR PRIMARY KEY, kind VARCHAR, inputs VARCHAR, created_at TIMESTAMP);
-- Per-token losses of a model; a sample has all its losses under a model or none.
CREATE TABLE IF NOT EXISTS token_losses (
    model VARCHAR, shard INTEGER, sample_id BIGINT, pos INTEGER, token_id INTEGER, loss FLOAT
);
CREATE TABLE IF NOT EXISTS shards_done (model VARCHAR, shard INTEGER, n_tokens BIGINT, finished_at TIMESTAMP,
    PRIMARY KEY (model, shard));
-- score = loss_base - loss_ref under 'scores' = keys.scores_key(base model, reference model).
CREATE TABLE IF NOT EXISTS token_scores (
    scores VARCHAR, sample_id BIGINT, pos INTEGER, base_loss FLOAT, ref_loss FLOAT, score FLOAT
);
CREATE TABLE IF NOT EXISTS selections (
    selection VARCHAR PRIMARY KEY, method VARCHAR, k DOUBLE, seed INTEGER, scores VARCHAR, pool VARCHAR,
    dataset VARCHAR, parts VARCHAR, threshold DOUBLE, n_candidates BIGINT, n_kept BIGINT, n_nonfinite BIGINT,
    precision DOUBLE, recall DOUBLE, created_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS selected_tokens (selection VARCHAR, sample_id BIGINT, pos INTEGER);
-- Adapters by training key; 'model' is the key of base + the weights actually saved.
CREATE TABLE IF NOT EXISTS adapters (adapter VARCHAR PRIMARY KEY, model VARCHAR, path VARCHAR, inputs VARCHAR,
    stats VARCHAR, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS evals (eval VARCHAR PRIMARY KEY, model VARCHAR, inputs VARCHAR, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS metrics (eval VARCHAR, metric VARCHAR, task VARCHAR, value DOUBLE);
-- What each flow run used and produced, by name: the pointers a user reads through.
CREATE TABLE IF NOT EXISTS flow_runs (flow_run VARCHAR PRIMARY KEY, flow VARCHAR, config VARCHAR, dataset VARCHAR,
    started_at TIMESTAMP, finished_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS run_outputs (flow_run VARCHAR, variant VARCHAR, iteration INTEGER, kind VARCHAR,
    key VARCHAR, computed BOOLEAN);
CREATE TABLE IF NOT EXISTS stage_log (flow_run VARCHAR, stage VARCHAR, name VARCHAR, key VARCHAR, seconds DOUBLE,
    detail VARCHAR, finished_at TIMESTAMP);
"""


class DatabaseBusy(RuntimeError):
    pass


class SchemaMismatch(RuntimeError):
    pass


def connect(path: str | Path, *, read_only: bool = False, wait_s: float = 0.0,
            memory_limit: str | None = None) -> duckdb.DuckDBPyConnection:
    """Open (and create) a run database.

    ``memory_limit`` bounds DuckDB's memory in this process (``run.db_memory_limit``):
    beyond it DuckDB evicts cached pages and spills joins and sorts to disk. Without it
    DuckDB may cache up to 80% of the machine's RAM, so the flow process would grow with
    the pool (measured: 751 MB at 50k ingested rows, 981 MB at 200k).

    A second process gets ``DatabaseBusy`` with the holder named, optionally after
    waiting ``wait_s`` seconds for the lock; DuckDB's own lock keeps the file intact.
    A database written by an older, unkeyed version is refused: its rows carry no keys.
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
    try:
        if memory_limit:
            con.execute(f"SET memory_limit = '{_size(memory_limit)}'")
        _check_schema(con, path, read_only)
    except BaseException:
        con.close()
        raise
    return con


@contextlib.contextmanager
def memory_limit(con, limit: str | None, after: str | None = None):
    """DuckDB's memory limit set to ``limit`` inside, then to ``after`` (None: DuckDB's default).

    ``after`` is given rather than read back: DuckDB reports the setting rounded ("1.8 GiB").
    """
    if not limit:
        yield
        return
    con.execute(f"SET memory_limit = '{_size(limit)}'")
    try:
        yield
    finally:
        con.execute(f"SET memory_limit = '{_size(after)}'" if after else "RESET memory_limit")


def _size(value: str) -> str:
    """A DuckDB size setting such as ``2GB`` or ``512MiB`` (checked: it is inlined into SQL)."""
    import re

    if not re.fullmatch(r"\s*\d+(\.\d+)?\s*[KMGT]i?B\s*", str(value), flags=re.IGNORECASE):
        raise ValueError(f"not a memory size: {value!r} (e.g. 2GB, 512MiB)")
    return str(value).strip()


def _check_schema(con, path: Path, read_only: bool) -> None:
    tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    version = None
    if "meta" in tables:
        row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        version = row[0] if row else None
    if tables and version in MIGRATIONS and not read_only:
        with transaction(con):
            for stmt in MIGRATIONS[version]:
                con.execute(stmt)
            con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [SCHEMA_VERSION])
        version = SCHEMA_VERSION
    if tables and version != SCHEMA_VERSION:
        raise SchemaMismatch(f"{path} was written by another tokenclean version (schema {version!r}, this one "
                             f"writes {SCHEMA_VERSION!r}); its results are not keyed the same way. Start a new run.")
    if not read_only and not tables:
        with transaction(con):  # a crash here leaves no half-made schema behind
            con.execute(SCHEMA)
            con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [SCHEMA_VERSION])


def run_id(con) -> str:
    """This run database's random id, made on first use: names the run's files in a shared storage root."""
    row = con.execute("SELECT value FROM meta WHERE key = 'run_id'").fetchone()
    if row:
        return row[0]
    import uuid

    value = uuid.uuid4().hex[:16]
    con.execute("INSERT INTO meta VALUES ('run_id', ?)", [value])
    return value


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


def sql_parts(parts: list[int]) -> str:
    """SQL list literal of part numbers (ints only, so safe to inline)."""
    return ",".join(str(int(p)) for p in parts) or "NULL"


def sql_key(key: str) -> str:
    """A key as an SQL literal; keys are hex (checked), so inlining cannot inject."""
    from tokenclean.tasks.keys import is_key

    if not is_key(key):
        raise ValueError(f"not a key: {key!r}")
    return f"'{key}'"
