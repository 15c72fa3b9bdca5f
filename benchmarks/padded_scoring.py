"""Scoring in length-sorted padded batches: the path packing replaced.

Kept as the ``bucketed`` baseline of ``benchmarks/scoring.py`` and as an oracle for the packed
path in ``tests/test_score.py`` and ``tests/linear_ce_child.py``: the same losses through the
model's own attention mask instead of ``tokenclean.tasks.packing``.
"""
from __future__ import annotations

import numpy as np
import torch

from tokenclean.tasks.score import (
    LM_HEAD_CHUNK_BYTES,
    LossColumns,
    ShardSample,
    _nan_where,
    decoder_and_head,
    head_vocab,
    lm_head_rows,
    token_nll,
)


def plan_batches(lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Length-sorted batches with (max length x rows) <= batch_tokens; a longer sample gets a batch alone."""
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    cur: list[int] = []
    cur_max = 0
    for i in order:
        n = int(lengths[i])
        new_max = max(cur_max, n)
        if cur and new_max * (len(cur) + 1) > batch_tokens:
            batches.append(np.array(cur))
            cur, new_max = [], n
        cur.append(int(i))
        cur_max = new_max
    if cur:
        batches.append(np.array(cur))
    return batches


def padding_waste(lengths: np.ndarray, batches: list[np.ndarray]) -> float:
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    return 1.0 - float(lengths.sum()) / padded if padded else 0.0


@torch.no_grad()
def batch_token_losses(model, ids: torch.Tensor, attn: torch.Tensor, target: torch.Tensor, chunk: int,
                       with_correct: bool = False, linear_ce: str = "chunked"):
    """Per-target losses for one padded batch.

    ``target[b, p]`` marks token p of row b as a target; its loss comes from the hidden
    state at p-1. Returns a flat fp32 tensor ordered like ``target.nonzero()``.
    """
    decoder, head = decoder_and_head(model)
    hidden = decoder(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state  # (B, L, H)
    rows, cols = target.nonzero(as_tuple=True)
    h = hidden[rows, (cols - 1).clamp_min(0)]
    losses, correct = token_nll(h, ids[rows, cols], head, chunk, with_correct, linear_ce)
    return _nan_where(losses, cols == 0), correct


def score_arrays_padded(model, samples: list[ShardSample], *, batch_tokens: int, device: torch.device,
                        chunk: int | None = None, chunk_bytes: int = LM_HEAD_CHUNK_BYTES, progress=None,
                        with_correct: bool = False, linear_ce: str = "chunked") -> dict[str, np.ndarray]:
    """``tokenclean.tasks.score.score_arrays``'s columns, batch by batch (``plan_batches``) instead of packed."""
    device = torch.device(device)
    chunk = lm_head_rows(chunk_bytes, head_vocab(decoder_and_head(model)[1]), chunk)
    lengths = np.array([len(s.input_ids) for s in samples], dtype=np.int64)
    sids = np.array([s.sample_id for s in samples], dtype=np.int64)
    cols = LossColumns(with_correct)
    for batch in plan_batches(lengths, batch_tokens):
        width = int(lengths[batch].max())
        ids = np.zeros((len(batch), width), dtype=np.int64)
        attn = np.zeros((len(batch), width), dtype=np.int64)
        tgt = np.zeros((len(batch), width), dtype=bool)
        for r, i in enumerate(batch):
            s = samples[i]
            n = len(s.input_ids)
            ids[r, :n], attn[r, :n], tgt[r, :n] = s.input_ids, 1, s.target
        t_ids, t_attn, t_tgt = (torch.from_numpy(a).to(device) for a in (ids, attn, tgt))
        losses, correct = batch_token_losses(model, t_ids, t_attn, t_tgt, chunk, with_correct, linear_ce)
        rows, pos = np.nonzero(tgt)
        cols.add(sids[batch][rows], pos, ids[rows, pos], losses, correct)
        if progress is not None:
            progress(int(lengths[batch].sum()))
    return cols.columns()
