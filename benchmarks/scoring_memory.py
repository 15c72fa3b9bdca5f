"""Peak memory (RSS) of one scoring worker at a 152k vocabulary: lm_head chunks by rows vs by bytes.

A random-weight ``Qwen3ForCausalLM`` with the real Qwen3 vocabulary (151,936) and a tiny
decoder (hidden 64, 2 layers: about 10M parameters, nearly all of them the tied embedding)
is saved to a directory and loaded the way a scoring worker loads it
(``tasks.score.process_model``); the worker then scores one shard of seeded synthetic SFT
samples (``benchmarks/scoring.py``'s lognormal lengths) with ``ScoringModel.losses``.
Each setting runs in a fresh process, so the peak (``ru_maxrss``) is that worker's alone:

* ``rows-2048``: ``chunk=2048`` rows and no byte budget: what ``score.lm_head_chunk: 2048``
  (the old default) did;
* ``bytes-default``: ``score.lm_head_chunk_bytes`` at its default (``LM_HEAD_CHUNK_BYTES``);
* ``bytes-NM`` (``--budgets N,...``): a budget of N MiB.

Also printed: the RSS once the model is loaded, the rows per chunk, tokens/s, and the largest
loss difference between the two settings (the same losses, chunked differently).

    .venv/bin/python benchmarks/scoring_memory.py [--tokens 65536] [--dtype float32] [--budgets 64,1024]
                                                  [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB = 151_936
SETTINGS = {"rows-2048": {"chunk": 2048, "chunk_bytes": 1 << 62}, "bytes-default": {}}


def child(model_dir: str, setting: str, tokens: int, dtype: str, out_losses: str) -> dict:
    import numpy as np
    import psutil

    from benchmarks.scoring import sft_lengths, sft_samples
    from tokenclean.tasks.score import LM_HEAD_CHUNK_BYTES, decoder_and_head, head_vocab, lm_head_rows, process_model

    sm = process_model(model_dir, device="cpu", dtype=dtype)
    loaded = psutil.Process().memory_info().rss
    samples = sft_samples(sft_lengths(tokens, 0), VOCAB, 0)
    kw = SETTINGS[setting] if setting in SETTINGS else {
        "chunk_bytes": int(setting.removeprefix("bytes-").removesuffix("M")) << 20}
    rows = kw.get("chunk") or lm_head_rows(kw.get("chunk_bytes", LM_HEAD_CHUNK_BYTES),
                                           head_vocab(decoder_and_head(sm.model)[1]))
    t0 = time.perf_counter()
    table = sm.losses(samples, adapter=None, batch_tokens=16384, **kw)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cols = [table.column(c).to_numpy() for c in ("sample_id", "pos", "loss")]
    order = np.lexsort((cols[1], cols[0]))
    np.save(out_losses, cols[2][order])
    n_tok = int(sum(len(s.input_ids) for s in samples))
    return {"setting": setting, "dtype": dtype, "rows_per_chunk": int(rows), "tokens": n_tok,
            "targets": int(table.num_rows), "rss_loaded_mib": loaded / 2**20, "peak_rss_mib": peak / 2**20,
            "seconds": seconds, "tok_s": n_tok / seconds}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=65536, help="tokens in the scored shard")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--budgets", default="", help="comma list of further budgets to run, in MiB")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--child", nargs=3, metavar=("MODEL_DIR", "SETTING", "LOSSES"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.tokens, args.dtype, args.child[2])))
        return

    import numpy as np
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                             head_dim=32, tie_word_embeddings=True))
        n_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp)
        del model
        settings = [*SETTINGS, *(f"bytes-{int(b)}M" for b in args.budgets.split(",") if b)]
        for setting in settings:
            losses = f"{tmp}/{setting}.npy"
            out = subprocess.run([sys.executable, __file__, "--tokens", str(args.tokens), "--dtype", args.dtype,
                                  "--child", tmp, setting, losses], capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{setting}: {out.stderr}")
            res = json.loads(out.stdout.strip().splitlines()[-1]) | {"params": n_params}
            results.append(res)
            print(f"{setting:14s} rows/chunk {res['rows_per_chunk']:5d}  loaded {res['rss_loaded_mib']:7.0f} MiB  "
                  f"peak {res['peak_rss_mib']:7.0f} MiB  {res['tok_s']:8.0f} tok/s", flush=True)
        base = np.load(f"{tmp}/{settings[0]}.npy")
        diff = max(float(np.nanmax(np.abs(np.load(f"{tmp}/{s}.npy") - base))) for s in settings[1:])
    print(f"params {n_params / 1e6:.1f}M; max |loss difference| from rows-2048: {diff:.2e}")
    if args.out:
        args.out.write_text(json.dumps({"results": results, "max_abs_loss_diff": diff, "torch": torch.__version__},
                                       indent=2))


if __name__ == "__main__":
    main()
