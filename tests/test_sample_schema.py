"""The stored sample's shape is the schema version's: the table derived from ``SAMPLE_SCHEMA`` cannot drift
while the version stays (a changed stored byte changes what every key found)."""
from tokenclean.tasks import store
from tokenclean.tasks.store import db

# schema version 5's samples table (unchanged since 4), as every database of that version holds it
SAMPLES_V5 = [("sample_id", "BIGINT"), ("tokenization", "VARCHAR"), ("uid", "VARCHAR"), ("task", "VARCHAR"),
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
    assert db.SCHEMA_VERSION == "5", "a new schema version states its samples table here"
    assert columns == SAMPLES_V5 and key == [(["sample_id"],)]
    assert store.STAGE_SCHEMA.names[:len(SAMPLES_V5)] == [name for name, _ in SAMPLES_V5]


# schema 5 added the selected tokens' training weight
SELECTED_TOKENS_V5 = [("selection", "VARCHAR"), ("sample_id", "BIGINT"), ("pos", "INTEGER"), ("weight", "FLOAT")]


def _selected_tokens_columns(con) -> list[tuple[str, str]]:
    return con.execute("SELECT column_name, data_type FROM duckdb_columns() WHERE table_name = 'selected_tokens' "
                       "ORDER BY column_index").fetchall()


def test_a_schema_4_database_is_upgraded_in_place_and_its_selections_stay_unweighted(tmp_path):
    import duckdb

    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    schema_4 = db.SCHEMA.replace(", pos INTEGER, weight FLOAT)", ", pos INTEGER)")
    assert schema_4 != db.SCHEMA
    con.execute(schema_4)
    con.execute("INSERT INTO meta VALUES ('schema_version', '4')")
    con.execute("INSERT INTO selected_tokens VALUES ('s', 7, 3)")
    con.close()
    con = store.connect(path)
    assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "5"
    assert _selected_tokens_columns(con) == SELECTED_TOKENS_V5
    assert con.execute("SELECT * FROM selected_tokens").fetchall() == [("s", 7, 3, None)]
    assert not store.is_weighted(con, "s")
    con.close()
    fresh = store.connect(tmp_path / "new.duckdb")
    assert _selected_tokens_columns(fresh) == SELECTED_TOKENS_V5
    fresh.close()
