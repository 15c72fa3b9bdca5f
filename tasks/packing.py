"""Sequence packing for scoring: many samples in one row, no padding, no cross-sample attention.

A pack is the concatenation of several samples along one row of ``T`` tokens, with
``position_ids`` restarting at 0 for each sample (so RoPE sees every sample at its own
positions) and cumulative lengths ``cu_seqlens`` (int32, ``n + 1`` entries). Attention
then has to be block-diagonal causal. transformers 5.x detects packed rows from
``position_ids`` resets when ``attention_mask`` is None, but then serves them through
``flash_attention_*`` (needs the flash-attn package, absent here), a dense (T x T) mask
for sdpa/eager (quadratic in the *pack* length, and it rules out the flash kernel), or a
flex_attention BlockMask (needs torch.compile'd Triton kernels). So this module registers
its own attention function, ``tokenclean_varlen``, with transformers' ``AttentionInterface``:

* CUDA, fp16/bf16: PyTorch's built-in FlashAttention-2 varlen kernel
  (``torch.ops.aten._flash_attention_forward`` with ``cu_seqlens``), GQA native.
  It is probed once per (device, dtype) against the per-segment fallback before use.
* otherwise (CPU, fp32, or the probe failed): one causal SDPA call per sample slice.

Both are exact block-diagonal causal attention; nothing is computed for padding
because there is none.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

VARLEN_ATTN = "tokenclean_varlen"


def plan_packs(lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Packs of sample indices with sum(lengths) <= batch_tokens (a longer sample gets a pack alone).

    Next-fit over lengths sorted longest first: with samples much shorter than the
    budget every pack but the last ends within one sample of the budget.
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    packs: list[np.ndarray] = []
    cur: list[int] = []
    used = 0
    for i in order:
        n = int(lengths[i])
        if cur and used + n > batch_tokens:
            packs.append(np.array(cur, dtype=np.int64))
            cur, used = [], 0
        cur.append(int(i))
        used += n
    if cur:
        packs.append(np.array(cur, dtype=np.int64))
    return packs


def pack_arrays(input_ids: list[np.ndarray], targets: list[np.ndarray]):
    """Concatenate samples into one row.

    Returns (ids (T,), position_ids (T,), cu_seqlens (n+1,) int32, max_len, target_index (K,),
    target_row (K,) sample index within the pack, target_pos (K,) position within the sample).
    """
    lens = np.fromiter((len(x) for x in input_ids), dtype=np.int64, count=len(input_ids))
    cu = np.zeros(len(lens) + 1, dtype=np.int32)
    np.cumsum(lens, out=cu[1:])
    ids = np.concatenate(input_ids).astype(np.int64, copy=False)
    pos = np.arange(int(cu[-1]), dtype=np.int64) - np.repeat(cu[:-1].astype(np.int64), lens)
    tgt = np.concatenate(targets).astype(bool, copy=False)
    t_index = np.flatnonzero(tgt)
    t_row = np.repeat(np.arange(len(lens)), lens)[t_index]
    t_pos = pos[t_index]
    return ids, pos, cu, int(lens.max()), t_index, t_row, t_pos


# ---------------------------------------------------------------------------------------- attention


def _segment_sdpa(q, k, v, cu_host, scale):
    """(T, Hq, D) x (T, Hk, D) -> (T, Hq, D): causal SDPA per segment. Exact; any device/dtype."""
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    for s, e in zip(cu_host[:-1], cu_host[1:]):
        if e <= s:
            continue
        o = F.scaled_dot_product_attention(
            q[s:e].transpose(0, 1).unsqueeze(0), k[s:e].transpose(0, 1).unsqueeze(0),
            v[s:e].transpose(0, 1).unsqueeze(0), is_causal=True, scale=scale, enable_gqa=gqa)
        out[s:e] = o[0].transpose(0, 1)
    return out


def _flash_varlen(q, k, v, cu, max_len, scale):
    return torch.ops.aten._flash_attention_forward(
        q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scale)[0]


_FLASH_OK: dict[tuple, bool] = {}


def flash_varlen_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether PyTorch's flash varlen kernel runs here and agrees with the per-segment fallback (probed once)."""
    device = torch.device(device)
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    key = (str(device), dtype)
    if key not in _FLASH_OK:
        ok = False
        try:
            g = torch.Generator(device=device).manual_seed(0)
            lens = [5, 130, 1, 64]
            cu_host = [0]
            for n in lens:
                cu_host.append(cu_host[-1] + n)
            T = cu_host[-1]
            q = torch.randn(T, 8, 64, device=device, dtype=dtype, generator=g)
            k = torch.randn(T, 2, 64, device=device, dtype=dtype, generator=g)
            v = torch.randn(T, 2, 64, device=device, dtype=dtype, generator=g)
            cu = torch.tensor(cu_host, dtype=torch.int32, device=device)
            got = _flash_varlen(q, k, v, cu, max(lens), 0.125).float()
            ref = _segment_sdpa(q.float(), k.float(), v.float(), cu_host, 0.125)
            ok = bool(torch.isfinite(got).all()) and float((got - ref).norm() / ref.norm()) < 2e-2
        except Exception:  # noqa: BLE001 - any failure means: use the fallback
            ok = False
        _FLASH_OK[key] = ok
    return _FLASH_OK[key]


def varlen_attention(q, k, v, cu, cu_host, max_len, scale):
    """Block-diagonal causal attention over packed (T, H, D) tensors."""
    if flash_varlen_available(q.device, q.dtype) and q.shape[-1] <= 256:
        return _flash_varlen(q.contiguous(), k.contiguous(), v.contiguous(), cu, max_len, scale)
    return _segment_sdpa(q, k, v, cu_host, scale)


def _transformers_varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                   **kwargs):
    """transformers attention-interface entry: query (1, Hq, T, D), key/value (1, Hk, T, D)."""
    cu = kwargs.get("tc_cu_seqlens")
    if cu is None:
        raise RuntimeError(f"attention '{VARLEN_ATTN}' needs tc_cu_seqlens/tc_cu_host/tc_max_len kwargs")
    if query.shape[0] != 1:
        raise ValueError("packed attention expects a single packed row")
    out = varlen_attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                           cu, kwargs["tc_cu_host"], kwargs["tc_max_len"], scaling)
    return out.unsqueeze(0), None  # (1, T, Hq, D), like sdpa_attention_forward


_REGISTERED = False


def register_varlen_attention() -> str:
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface

        AttentionInterface.register(VARLEN_ATTN, _transformers_varlen_attention)
        _REGISTERED = True
    return VARLEN_ATTN


@contextmanager
def attn_implementation(config, name: str):
    """Temporarily switch a model config (shared by all its modules) to attention ``name``."""
    old = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = old
