"""The stored sample's shape is the schema version's: the table derived from ``SAMPLE_SCHEMA`` cannot drift
while the version stays (a changed stored byte changes what every key found)."""
from tokenclean.tasks import store
from tokenclean.tasks.store import db

# schema version 4's samples table, as every database of that version holds it
SAMPLES_V4 = [("sample_id", "BIGINT"), ("tokenization", "VARCHAR"), ("uid", "VARCHAR"), ("task", "VARCHAR"),
              ("answer", "VARCHAR"), ("content_hash", "VARCHAR"), ("n_tokens", "INTEGER"), ("n_response", "INTEGER"),
              ("truncated", "BOOLEAN"), ("answer_start", "INTEGER"), ("answer_end", "INTEGER"),
              ("input_ids", "INTEGER[]"), ("response_mask", "BOOLEAN[]"), ("truth", "UTINYINT[]"), ("text", "VARCHAR"),
              ("char_start", "INTEGER[]"), ("char_end", "INTEGER[]"), ("reasoning_mask", "BOOLEAN[]")]


def test_the_samples_table_is_the_schema_versions_and_ingest_stages_into_it(tmp_path):
    con = store.connect(tmp_path / "run.duckdb")
    columns = con.execute("SELECT column_name, data_type FROM duckdb_columns() WHERE table_name = 'samples' "
                          "ORDER BY column_index").fetchall()
    key = con.execute("SELECT constraint_column_names FROM duckdb_constraints() WHERE table_name = 'samples' "
                      "AND constraint_type = 'PRIMARY KEY'").fetchall()
    con.close()
    assert db.SCHEMA_VERSION == "4", "a new schema version states its samples table here"
    assert columns == SAMPLES_V4 and key == [(["sample_id"],)]
    assert store.STAGE_SCHEMA.names[:len(SAMPLES_V4)] == [name for name, _ in SAMPLES_V4]
