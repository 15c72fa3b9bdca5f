"""Scores the same samples with ``linear_ce`` chunked and liger, in a process of its own.

Usage: python tests/linear_ce_child.py DEVICE DTYPE OUT.npz

Run as a child because Triton reads ``TRITON_INTERPRET`` when its kernels are defined:
on a CPU the parent sets it in this process's environment so liger's Triton kernels run
on Triton's interpreter; on CUDA they run as compiled. The model is a random tiny
Llama with sharpened logits and an lm_head bias-free, untied head (what Llama has),
saved and loaded through ``ScoringModel`` like a user's model. Both paths score the
samples packed and padded, with ``with_correct`` (the exact-match flags) as well.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository's benchmarks/
from benchmarks.padded_scoring import score_arrays_padded  # noqa: E402
from tokenclean.tasks.score import ScoringModel, ShardSample, score_arrays  # noqa: E402

VOCAB = 1000


@torch.no_grad()
def samples(model, n=24, seed=0):
    """Random prompts; every other response is the model's own greedy continuation (argmax targets)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(2, 90))
        start = int(rng.integers(1, length))
        ids = rng.integers(0, VOCAB, length).astype(np.int32)
        if i % 2:
            prompt = torch.from_numpy(ids[:start].astype(np.int64))[None]
            ids = model.generate(prompt, max_new_tokens=length - start, min_new_tokens=length - start,
                                 do_sample=False, pad_token_id=0)[0].numpy().astype(np.int32)
        tgt = np.zeros(length, dtype=bool)
        tgt[start:] = True
        out.append(ShardSample(100 + i, ids, tgt))
    out.append(ShardSample(99, rng.integers(0, VOCAB, 30).astype(np.int32), np.zeros(30, dtype=bool)))  # prompt only
    return out


def main(device: str, dtype: str, out: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # far-from-uniform logits, so a misaligned or mis-scaled loss shows
    result = {}
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        data = samples(model)
        with torch.no_grad():  # the largest logit's size sets what bf16 rounding can move a loss by
            result["max_abs_logit"] = np.array(max(float(model(torch.from_numpy(x.input_ids.astype(np.int64))[None])
                                                         .logits.abs().max()) for x in data))
        for linear_ce in ("chunked", "liger"):
            sm = ScoringModel(d, device=device, dtype=dtype, linear_ce=linear_ce)
            for packed in (True, False):
                score = score_arrays if packed else score_arrays_padded
                cols = score(sm.model, data, batch_tokens=300, chunk=37, device=sm.device, with_correct=True,
                             linear_ce=linear_ce)
                order = np.lexsort((cols["pos"], cols["sample_id"]))
                for k, v in cols.items():
                    result[f"{linear_ce}.{'packed' if packed else 'padded'}.{k}"] = v[order]
    np.savez(out, **result)


if __name__ == "__main__":
    main(*sys.argv[1:4])
