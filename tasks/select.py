"""Token selection: which response tokens a fine-tune learns from.

The methods (global top-k, RHO local top-k, random, full) are SQL over the run database
and live in ``tokenclean.tasks.store.selection``; this module turns a stored selection
into training samples.
"""
from __future__ import annotations

import numpy as np

from tokenclean.tasks import store
from tokenclean.tasks.store.selection import METHODS  # noqa: F401  (re-exported)


def load_selected(con, selection: str):
    """Training samples of a selection: input ids with a label mask at the kept positions.

    Samples that lost every token are absent. Ordered by sample id, which is content-
    addressed, so the same selection yields the same training order in any database.
    """
    from tokenclean.tasks.train import TrainSample

    out = []
    for _, ids, pos in store.selected_rows(con, selection):
        ids = np.asarray(ids, dtype=np.int32)
        mask = np.zeros(len(ids), dtype=bool)
        mask[np.asarray(pos, dtype=np.int64)] = True
        out.append(TrainSample(ids, mask))
    return out
