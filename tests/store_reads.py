"""Store reads that only tests make: what a run stored, in a form comparable across databases."""
from __future__ import annotations


def losses_by_uid(con, model: str, dataset: str) -> list[tuple]:
    """(uid, pos, loss) of ``model`` over a dataset's samples, ordered: comparable across databases."""
    return con.execute(
        """SELECT s.uid, t.pos, t.loss FROM token_losses t JOIN dataset_samples d USING (sample_id)
           JOIN samples s USING (sample_id) WHERE t.model = ? AND d.dataset = ? ORDER BY s.uid, t.pos""",
        [model, dataset]).fetchall()
