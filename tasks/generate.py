"""Greedy generation from token-id prompts: the one decoding the answer metrics use.

Its own module, below both ``score`` (whose ``ScoringModel.generate`` shares the loaded weights)
and ``evaluate`` (which reads the answers), so neither imports the other.
"""
from __future__ import annotations

import numpy as np

# Greedy decoding, whatever the model's generation_config.json asks for: transformers fills every generation
# setting a call leaves unset from that file (a repetition penalty, a contrastive-search alpha, suppressed
# tokens), which would make "greedy" depend on the checkpoint.
GREEDY = dict(do_sample=False, num_beams=1, num_beam_groups=1, penalty_alpha=None, repetition_penalty=1.0,
              encoder_repetition_penalty=1.0, no_repeat_ngram_size=0, bad_words_ids=None, suppress_tokens=None,
              begin_suppress_tokens=None, forced_bos_token_id=None, forced_eos_token_id=None, sequence_bias=None,
              min_length=0, min_new_tokens=None, exponential_decay_length_penalty=None, guidance_scale=None,
              dola_layers=None, watermarking_config=None)


def generate_responses(model, tokenizer, prompts: list[np.ndarray], *, max_new_tokens: int, stop_ids: list[int],
                       device, batch_size: int = 64) -> list[str]:
    """Greedy continuations of ``prompts`` (token ids), decoded without special tokens.

    transformers' ``generate`` with a KV cache, left-padded batches of similar length
    (the padding is masked; positions follow the mask).
    """
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids[0] if stop_ids else 0)
    order = np.argsort([len(p) for p in prompts], kind="stable")
    out: list[str] = [""] * len(prompts)
    for i in range(0, len(order), batch_size):
        batch = [prompts[j] for j in order[i:i + batch_size]]
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, p in enumerate(batch):
            ids[r, width - len(p):] = torch.from_numpy(np.asarray(p, dtype=np.int64))
            mask[r, width - len(p):] = 1
        with torch.no_grad():
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **GREEDY,
                                 max_new_tokens=max_new_tokens, eos_token_id=stop_ids or None, pad_token_id=pad)
        for r, j in enumerate(order[i:i + batch_size]):
            new = gen[r, width:].tolist()
            cut = next((n for n, t in enumerate(new) if t in stop_ids), len(new))
            out[j] = tokenizer.decode(new[:cut], skip_special_tokens=True)
    return out
