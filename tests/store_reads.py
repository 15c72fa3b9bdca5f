"""Store reads that only tests make: what a run stored, in a form comparable across databases."""
from __future__ import annotations


def read_run(cfg, fn):
    """``fn(con)`` on a run's database, opened read-only and closed after."""
    from tokenclean.tasks import store

    con = store.connect(cfg.db_path, read_only=True)
    try:
        return fn(con)
    finally:
        con.close()


def losses_by_uid(con, model: str, dataset: str) -> list[tuple]:
    """(uid, pos, loss) of ``model`` over a dataset's samples, ordered: comparable across databases."""
    return con.execute(
        """SELECT s.uid, t.pos, t.loss FROM token_losses t JOIN dataset_samples d USING (sample_id)
           JOIN samples s USING (sample_id) WHERE t.model = ? AND d.dataset = ? ORDER BY s.uid, t.pos""",
        [model, dataset]).fetchall()


def load_selected(con, selection: str):
    """A selection's training samples in memory, through the reader training streams them with."""
    from tokenclean.tasks import store
    from tokenclean.tasks.select import samples_of

    return [s for batch in store.selection_reader(con.cursor(), selection) for s in samples_of(batch)]
