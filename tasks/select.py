"""A stored selection as training rows: input ids with labels at the kept positions.

The selection methods are SQL in ``tokenclean.tasks.store.selection``; both training and export read a selection
through ``store.selection_reader`` and turn its kept positions into labels with ``train.labels_of``.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from tokenclean.tasks import storage, store
from tokenclean.tasks.train import (
    NOTHING_TO_TRAIN,
    TRAINING_SCHEMA,
    WEIGHTED_TRAINING_SCHEMA,
    TrainSample,
    training_batch,
)


def samples_of(batch: pa.RecordBatch) -> list[TrainSample]:
    """The training samples of a batch of ``store.selection_reader`` rows (input_ids, kept positions, and the
    kept positions' weights where the selection has them: 0 at every other position)."""
    out = []
    if not batch.num_rows:  # an empty batch may carry no columns at all
        return out
    cols = [batch.column(c).to_pylist() for c in ("input_ids", "kept", "weight")]
    for ids, kept, weight in zip(*cols):
        ids, kept = np.asarray(ids, dtype=np.int32), np.asarray(kept, dtype=np.int64)
        mask = np.zeros(len(ids), dtype=bool)
        mask[kept] = True
        weights = None
        if weight is not None:
            weights = np.zeros(len(ids), dtype=np.float32)
            weights[kept] = np.asarray(weight, dtype=np.float32)
        out.append(TrainSample(ids, mask, weights))
    return out


def training_rows(batch: pa.RecordBatch, weighted: bool | None = None) -> pa.RecordBatch:
    return training_batch(samples_of(batch), weighted)


def write_training_set(con, selection: str, path: str) -> int:
    """Stream ``selection``'s training rows into the Parquet file ``path`` (whole or not at all); returns the rows.

    Samples that lost every token are absent. Ordered by sample id, which is content-addressed, so the same
    selection yields the same training order in any database. A weighted selection's rows carry their weights;
    any other's are the two columns of ``TRAINING_SCHEMA``.
    """
    rows = 0
    weighted = store.is_weighted(con, selection)
    with storage.parquet_writer(path, WEIGHTED_TRAINING_SCHEMA if weighted else TRAINING_SCHEMA) as writer:
        for batch in store.selection_reader(con.cursor(), selection):
            writer.write_batch(training_rows(batch, weighted))
            rows += batch.num_rows
        if not rows:
            raise ValueError(NOTHING_TO_TRAIN)
    return rows
