"""Teacher-forced per-token losses: the math of scoring, with no orchestration in it.

Memory discipline: the decoder's hidden states are gathered at target positions only,
then pushed through lm_head + cross-entropy in chunks of ``lm_head_chunk`` rows, so
the (tokens x vocab) fp32 logits tensor never exists (at 128k vocab and 16k tokens it
would be 8 GiB). Batches are length-sorted under a token budget to keep padding low.

One process holds the base weights once; a reference model is the same weights with
a LoRA adapter switched on (``ScoringModel``), so base and reference share memory.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

LOSS_SCHEMA = pa.schema(
    [("sample_id", pa.int64()), ("pos", pa.int32()), ("token_id", pa.int32()), ("loss", pa.float32())]
)
EVAL_SCHEMA = LOSS_SCHEMA.append(pa.field("correct", pa.bool_()))


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def chunked_token_nll(hidden: torch.Tensor, targets: torch.Tensor, lm_head: torch.nn.Module, chunk: int,
                      with_correct: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """NLL of ``targets`` (N,) given ``hidden`` (N, H): lm_head + CE in fp32, ``chunk`` rows at a time.

    ``with_correct`` also returns whether the target is the argmax (greedy decoding's
    choice), which is what the teacher-forced exact-match metric needs.
    """
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    correct = torch.empty(hidden.shape[0], dtype=torch.bool, device=hidden.device) if with_correct else None
    for i in range(0, hidden.shape[0], chunk):
        logits = lm_head(hidden[i : i + chunk]).float()
        out[i : i + chunk] = F.cross_entropy(logits, targets[i : i + chunk], reduction="none")
        if with_correct:
            correct[i : i + chunk] = logits.argmax(-1) == targets[i : i + chunk]
    return out, correct


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


def _decoder_and_head(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(cfg, attr, None) not in (None, 1.0):
            raise NotImplementedError(f"model config sets {attr}; the chunked scorer assumes logits = lm_head(h)")
    return base.get_decoder(), base.get_output_embeddings()


@torch.no_grad()
def batch_token_losses(model, ids: torch.Tensor, attn: torch.Tensor, target: torch.Tensor, chunk: int,
                       with_correct: bool = False):
    """Per-target losses for one padded batch.

    ``target[b, p]`` marks token p of row b as a target; its loss comes from the hidden
    state at p-1. Returns a flat fp32 tensor ordered like ``target.nonzero()``.
    """
    decoder, head = _decoder_and_head(model)
    hidden = decoder(input_ids=ids, attention_mask=attn).last_hidden_state  # (B, L, H)
    rows, cols = target.nonzero(as_tuple=True)
    h = hidden[rows, cols - 1]
    return chunked_token_nll(h, ids[rows, cols], head, chunk, with_correct)


@dataclass
class ShardSample:
    sample_id: int
    input_ids: np.ndarray
    target: np.ndarray  # bool mask over input_ids


def score_samples(model, samples: list[ShardSample], *, batch_tokens: int, chunk: int, device: torch.device,
                  progress=None, with_correct: bool = False) -> pa.Table:
    """Losses of every target token of ``samples`` as an Arrow table (sample_id, pos, token_id, loss[, correct])."""
    lengths = np.array([len(s.input_ids) for s in samples], dtype=np.int64)
    out_sid, out_pos, out_tok, out_loss, out_ok = [], [], [], [], []
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
        losses, correct = batch_token_losses(model, t_ids, t_attn, t_tgt, chunk, with_correct)
        losses = losses.cpu().numpy()
        rows, cols = np.nonzero(tgt)
        out_sid.append(np.array([samples[batch[r]].sample_id for r in rows], dtype=np.int64))
        out_pos.append(cols.astype(np.int32))
        out_tok.append(ids[rows, cols].astype(np.int32))
        out_loss.append(losses.astype(np.float32))
        if with_correct:
            out_ok.append(correct.cpu().numpy())
        if progress is not None:
            progress(int(attn.sum()))
    schema = EVAL_SCHEMA if with_correct else LOSS_SCHEMA
    if not out_sid:
        return schema.empty_table()
    cols = [out_sid, out_pos, out_tok, out_loss] + ([out_ok] if with_correct else [])
    return pa.table([np.concatenate(c) for c in cols], schema=schema)


class ScoringModel:
    """Base weights loaded once per process; adapters are attached by name and toggled.

    ``losses(samples, adapter=None)`` scores with the base model, ``adapter=path``
    with base + that LoRA adapter. Loading a second adapter reuses the base weights.
    """

    def __init__(self, base_path: str, *, device: str = "auto", dtype: str = "auto"):
        from transformers import AutoModelForCausalLM

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.base_path = base_path
        self.model = AutoModelForCausalLM.from_pretrained(base_path, dtype=self.dtype).to(self.device).eval()
        self._adapters: dict[str, str] = {}  # adapter path -> peft adapter name

    def _activate(self, adapter: str | None):
        if adapter is None:
            return None
        from peft import PeftModel

        key = str(Path(adapter).resolve())
        if key not in self._adapters:
            name = f"a{len(self._adapters)}"
            if not self._adapters:
                self.model = PeftModel.from_pretrained(self.model, key, adapter_name=name).eval()
            else:
                self.model.load_adapter(key, adapter_name=name)
            self._adapters[key] = name
        self.model.set_adapter(self._adapters[key])
        return self._adapters[key]

    def losses(self, samples: list[ShardSample], *, adapter: str | None, batch_tokens: int, chunk: int,
               progress=None, with_correct: bool = False) -> pa.Table:
        name = self._activate(adapter)
        kw = dict(batch_tokens=batch_tokens, chunk=chunk, device=self.device, progress=progress,
                  with_correct=with_correct)
        if name is None and self._adapters:
            with self.model.disable_adapter():
                return score_samples(self.model, samples, **kw)
        return score_samples(self.model, samples, **kw)


_PROCESS_MODELS: dict[tuple, ScoringModel] = {}


def process_model(base_path: str, device: str = "auto", dtype: str = "auto") -> ScoringModel:
    """One ScoringModel per worker process: Ray reuses workers, so weights load once."""
    key = (str(base_path), device, dtype)
    if key not in _PROCESS_MODELS:
        _PROCESS_MODELS.clear()  # a new base replaces the old one instead of doubling memory
        _PROCESS_MODELS[key] = ScoringModel(base_path, device=device, dtype=dtype)
    return _PROCESS_MODELS[key]


def score_shard(base_path: str, adapter: str | None, samples: list[ShardSample], out_path: str, *,
                batch_tokens: int, chunk: int, device: str = "auto", dtype: str = "auto") -> dict:
    """Score one shard and write its Parquet atomically; the unit a worker runs and retries."""
    from tasks.store import write_parquet_atomic

    t0 = time.perf_counter()
    sm = process_model(base_path, device, dtype)
    table = sm.losses(samples, adapter=adapter, batch_tokens=batch_tokens, chunk=chunk)
    losses = table.column("loss").to_numpy()
    n_bad = int((~np.isfinite(losses)).sum())
    write_parquet_atomic(table, Path(out_path))
    return {
        "n_tokens": int(sum(len(s.input_ids) for s in samples)),
        "n_targets": table.num_rows,
        "n_nonfinite": n_bad,
        "seconds": time.perf_counter() - t0,
    }
