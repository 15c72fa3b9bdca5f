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

Both are exact block-diagonal causal attention, sliding-window where the layer asks for
it; nothing is computed for padding because there is none. Attention features the
kernels do not compute (logit softcapping, sinks) are refused, never approximated.
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


def _segment_sdpa(q, k, v, cu_host, scale, window: int | None = None):
    """(T, Hq, D) x (T, Hk, D) -> (T, Hq, D): causal SDPA per segment. Exact; any device/dtype.

    ``window``: sliding-window attention as transformers defines it (a query at i sees keys
    j with i - window < j <= i); None is full causal attention.
    """
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    for s, e in zip(cu_host[:-1], cu_host[1:]):
        if e <= s:
            continue
        causal = dict(is_causal=True)
        if window is not None and e - s > window:
            i = torch.arange(e - s, device=q.device)
            causal = dict(attn_mask=(i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window))
        o = F.scaled_dot_product_attention(
            q[s:e].transpose(0, 1).unsqueeze(0), k[s:e].transpose(0, 1).unsqueeze(0),
            v[s:e].transpose(0, 1).unsqueeze(0), scale=scale, enable_gqa=gqa, **causal)
        out[s:e] = o[0].transpose(0, 1)
    return out


def _flash_varlen(q, k, v, cu, max_len, scale, window: int | None = None):
    # FlashAttention's window counts keys to the left of the query: transformers' window - 1 (its own flash path)
    kw = {} if window is None else {"window_size_left": int(window) - 1, "window_size_right": 0}
    return torch.ops.aten._flash_attention_forward(
        q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scale, **kw)[0]


_FLASH_OK: dict[tuple, bool] = {}


def flash_varlen_available(device: torch.device, dtype: torch.dtype, windowed: bool = False) -> bool:
    """Whether PyTorch's flash varlen kernel runs here and agrees with the per-segment fallback (probed once,
    and once more with a sliding window before a windowed model relies on it)."""
    device = torch.device(device)
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    key = (str(device), dtype, windowed)
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
            window = 16 if windowed else None
            got = _flash_varlen(q, k, v, cu, max(lens), 0.125, window).float()
            ref = _segment_sdpa(q.float(), k.float(), v.float(), cu_host, 0.125, window)
            ok = bool(torch.isfinite(got).all()) and float((got - ref).norm() / ref.norm()) < 2e-2
        except Exception:  # noqa: BLE001 - any failure means: use the fallback
            ok = False
        _FLASH_OK[key] = ok
    return _FLASH_OK[key]


def varlen_attention(q, k, v, cu, cu_host, max_len, scale, window: int | None = None):
    """Block-diagonal causal attention over packed (T, H, D) tensors (``window``: sliding-window)."""
    if window is not None and max_len <= window:
        window = None  # no segment is longer than the window: plain causal attention is the same
    if flash_varlen_available(q.device, q.dtype, window is not None) and q.shape[-1] <= 256:
        return _flash_varlen(q.contiguous(), k.contiguous(), v.contiguous(), cu, max_len, scale, window)
    return _segment_sdpa(q, k, v, cu_host, scale, window)


# What an attention layer may ask for beyond (sliding-window) causal attention; the packed kernels do not
# compute these, so a model that passes them is refused rather than scored with other attention.
_UNSUPPORTED = {"softcap": "attention logit softcapping", "s_aux": "attention sinks"}


def _transformers_varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                   sliding_window=None, **kwargs):
    """transformers attention-interface entry: query (1, Hq, T, D), key/value (1, Hk, T, D).

    Honours ``sliding_window`` (Mistral, Gemma-2/3's local layers, Phi-3, Qwen2 with
    ``use_sliding_window``) as transformers' own masks do; refuses what it cannot compute.
    """
    cu = kwargs.get("tc_cu_seqlens")
    if cu is None:
        raise RuntimeError(f"attention '{VARLEN_ATTN}' needs tc_cu_seqlens/tc_cu_host/tc_max_len kwargs")
    if query.shape[0] != 1:
        raise ValueError("packed attention expects a single packed row")
    for name, what in _UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"the model's attention uses {what} ({type(module).__name__}); packed "
                                      "scoring and training compute plain (sliding-window) causal attention only")
    out = varlen_attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                           cu, kwargs["tc_cu_host"], kwargs["tc_max_len"], scaling, sliding_window)
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
