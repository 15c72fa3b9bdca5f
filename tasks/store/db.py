"""The run database: connection, schema, transactions.

Rows are written once under the key of what computed them (``tasks/keys.py``) and never updated in place. Only
the driver writes (a DuckDB file has one writer process); workers write Parquet shards (``tasks/storage.py``) that
the driver loads. The store's design: docs/design.md ("The store").
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import duckdb
import pyarrow as pa

from tokenclean.config import DB_FILE  # noqa: F401  (a run directory's database, named with the run's paths)

SCHEMA_VERSION = "5"
# In-place upgrades from older versions whose rows stay valid under the same keys: new columns, NULL for the
# rows written before (what each version added: docs/design.md, "Versions that enter keys").
_REASONING_COLUMN = "ALTER TABLE samples ADD COLUMN IF NOT EXISTS reasoning_mask BOOLEAN[]"
_WEIGHT_COLUMN = "ALTER TABLE selected_tokens ADD COLUMN IF NOT EXISTS weight FLOAT"  # NULL: an unweighted selection
MIGRATIONS = {"2": ["ALTER TABLE samples ADD COLUMN text VARCHAR",
                    "ALTER TABLE samples ADD COLUMN char_start INTEGER[]",
                    "ALTER TABLE samples ADD COLUMN char_end INTEGER[]", _REASONING_COLUMN, _WEIGHT_COLUMN],
              "3": [_REASONING_COLUMN, _WEIGHT_COLUMN],
              "4": [_WEIGHT_COLUMN]}

# A stored sample, stated once: the samples table, ingest's Arrow parts and the staging SQL are derived from it.
# Its columns are the stored bytes of schema SCHEMA_VERSION: a change here needs a new version and a migration.
SAMPLE_SCHEMA = pa.schema([
    ("sample_id", pa.int64()), ("tokenization", pa.string()), ("uid", pa.string()), ("task", pa.string()),
    ("answer", pa.string()), ("content_hash", pa.string()), ("n_tokens", pa.int32()), ("n_response", pa.int32()),
    ("truncated", pa.bool_()), ("answer_start", pa.int32()), ("answer_end", pa.int32()),
    ("input_ids", pa.list_(pa.int32())), ("response_mask", pa.list_(pa.bool_())), ("truth", pa.list_(pa.uint8())),
    ("text", pa.string()),  # the rendered text: token i covers [char_start[i], char_end[i])
    ("char_start", pa.list_(pa.int32())), ("char_end", pa.list_(pa.int32())),
    ("reasoning_mask", pa.list_(pa.bool_())),  # targets that are the model's reasoning; NULL: not recorded
])

_SQL_TYPES = {pa.int64(): "BIGINT", pa.int32(): "INTEGER", pa.int16(): "SMALLINT", pa.uint8(): "UTINYINT",
              pa.bool_(): "BOOLEAN", pa.string(): "VARCHAR"}


def _sql_type(t: pa.DataType) -> str:
    return f"{_sql_type(t.value_type)}[]" if pa.types.is_list(t) else _SQL_TYPES[t]


def sql_columns(schema: pa.Schema, primary_key: str | None = None) -> str:
    """The column list of a CREATE TABLE for an Arrow schema (``primary_key``: that column is the key)."""
    return ", ".join(f"{f.name} {_sql_type(f.type)}" + (" PRIMARY KEY" if f.name == primary_key else "")
                     for f in schema)


SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR);
-- Tokenised samples, content-addressed: sample_id = keys.sample_id(tokenization, uid, content_hash).
CREATE TABLE IF NOT EXISTS samples ({samples});
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
-- weight: the token's training weight (the ``weighted`` method); NULL for every other method.
CREATE TABLE IF NOT EXISTS selected_tokens (selection VARCHAR, sample_id BIGINT, pos INTEGER, weight FLOAT);
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
""".replace("{samples}", sql_columns(SAMPLE_SCHEMA, primary_key="sample_id"))


class DatabaseBusy(RuntimeError):
    pass


class SchemaMismatch(RuntimeError):
    pass


def connect(path: str | Path, *, read_only: bool = False, wait_s: float = 0.0,
            memory_limit: str | None = None) -> duckdb.DuckDBPyConnection:
    """Open (and create) a run database, upgrading an older schema in place where ``MIGRATIONS`` can.

    ``memory_limit`` bounds DuckDB's memory in this process (``run.db_memory_limit``); without it the flow
    process would grow with the pool. A second process gets ``DatabaseBusy`` naming the holder, after waiting
    up to ``wait_s`` seconds for the lock; a database of another schema version raises ``SchemaMismatch``.
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
