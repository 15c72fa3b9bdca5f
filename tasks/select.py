"""A stored selection as training rows: input ids with labels at the kept positions.

The selection methods are SQL in ``tokenclean.tasks.store.selection``; both training and export read a selection
through ``store.selection_reader`` and turn its kept positions into labels with ``train.labels_of``.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from tokenclean.tasks import storage, store
from tokenclean.tasks.train import NOTHING_TO_TRAIN, TRAINING_SCHEMA, TrainSample, training_batch


def samples_of(batch: pa.RecordBatch) -> list[TrainSample]:
    """The training samples of a batch of ``store.selection_reader`` rows (input_ids, kept positions)."""
    out = []
    if not batch.num_rows:  # an empty batch may carry no columns at all
        return out
    for ids, kept in zip(batch.column("input_ids").to_pylist(), batch.column("kept").to_pylist()):
        ids = np.asarray(ids, dtype=np.int32)
        mask = np.zeros(len(ids), dtype=bool)
        mask[np.asarray(kept, dtype=np.int64)] = True
        out.append(TrainSample(ids, mask))
    return out


def training_rows(batch: pa.RecordBatch) -> pa.RecordBatch:
    return training_batch(samples_of(batch))


def write_training_set(con, selection: str, path: str) -> int:
    """Stream ``selection``'s training rows into the Parquet file ``path`` (whole or not at all); returns the rows.

    Samples that lost every token are absent. Ordered by sample id, which is content-addressed, so the same
    selection yields the same training order in any database.
    """
    rows = 0
    with storage.parquet_writer(path, TRAINING_SCHEMA) as writer:
        for batch in store.selection_reader(con.cursor(), selection):
            writer.write_batch(training_rows(batch))
            rows += batch.num_rows
        if not rows:
            raise ValueError(NOTHING_TO_TRAIN)
    return rows
