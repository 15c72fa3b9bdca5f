"""Scoring throughput: packed + chunked-CE path vs the old bucketed path vs a naive HF forward.

Random-weight Llama models with the real Llama-3.2-1B / 3.2-3B / 3.1-8B shapes (vocab
128256, bf16 on GPU) score one seeded synthetic SFT set: lengths lognormal, clipped to
[16, 2048] (many short samples, a long tail), a prompt of 10-60% of each sample and the
rest response (the targets). Variants, all in the same process on the same samples:

* ``packed``   -- tasks.score.score_arrays: packs of <= batch_tokens tokens,
                  varlen flash attention, hidden states gathered at targets, chunked lm_head+CE.
* ``packed+compile`` (``--compile``) -- the same after tasks.score.compile_pointwise.
* ``packed+liger`` / ``packed+compile+liger`` (``--liger``) -- lm_head + CE by liger-kernel's
                  fused kernel (``score.linear_ce: liger``); their losses are also compared
                  with the same run's ``packed`` losses (``vs_packed_loss_max_abs_diff``).
* ``bucketed`` -- benchmarks/padded_scoring.score_arrays_padded: length-sorted padded batches, chunked CE
                  (the path before packing).
* ``naive``    -- HF ``model(input_ids, attention_mask).logits`` (full logits), fp32
                  log_softmax, batches of ``batch_tokens // 2048`` samples in random order,
                  padded to the batch's longest.

Figures: tokens/s (real tokens, no padding), peak GPU memory (weights included), and the
ratio of the *floor* ``2 * params * tokens / peak`` (peak = a large bf16 torch.matmul
measured in the same run) to the measured time. The floor counts every parameter for
every token (embeddings included, attention excluded), as the goal defines it; the
``util`` column instead counts the matmul FLOPs the scorer really needs (decoder linears
for every token, lm_head for targets only, causal attention per sample) over the same peak.

Needs torch + transformers only (no pyarrow). ``--cpu`` runs tiny shapes in fp32 on CPU.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.padded_scoring import plan_batches, score_arrays_padded  # noqa: E402
from tokenclean.tasks.packing import flash_varlen_available  # noqa: E402
from tokenclean.tasks.score import (  # noqa: E402
    LM_HEAD_CHUNK_BYTES,
    ShardSample,
    check_linear_ce,
    compile_pointwise,
    score_arrays,
)

LLAMA_COMMON = dict(vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072,
                    hidden_act="silu", attention_bias=False, mlp_bias=False)
SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, **LLAMA_COMMON),
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, **LLAMA_COMMON),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, **LLAMA_COMMON),
    # --cpu: tiny shapes that finish on a 2-core machine
    "tiny-128": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=32, vocab_size=4096, tie_word_embeddings=False,
                     max_position_embeddings=2048),
    "tiny-256": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=2, head_dim=32, vocab_size=8192, tie_word_embeddings=False,
                     max_position_embeddings=2048),
}
ALIASES = {"1b": "llama-3.2-1b", "3b": "llama-3.2-3b", "8b": "llama-3.1-8b"}


def sft_lengths(n_tokens: int, seed: int, lo: int = 16, hi: int = 2048, mu: float = 5.6, sigma: float = 1.0):
    """Lognormal lengths (median ~270, long tail) clipped to [lo, hi], until they sum to >= n_tokens."""
    rng = np.random.default_rng(seed)
    out: list[int] = []
    total = 0
    while total < n_tokens:
        n = int(np.clip(rng.lognormal(mu, sigma), lo, hi))
        out.append(n)
        total += n
    return np.array(out, dtype=np.int64)


def sft_samples(lengths: np.ndarray, vocab: int, seed: int) -> list[ShardSample]:
    rng = np.random.default_rng(seed + 1)
    samples = []
    for i, n in enumerate(lengths):
        tgt = np.zeros(n, dtype=bool)
        tgt[max(1, int(n * rng.uniform(0.1, 0.6))):] = True
        samples.append(ShardSample(i, rng.integers(0, vocab, n).astype(np.int32), tgt))
    return samples


def build_model(shape: dict, device: torch.device, dtype: torch.dtype, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**shape, attn_implementation="sdpa")
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.to(device=device, dtype=dtype).eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> float:
    """Median TFLOP/s of an n x n x n random matmul (rotating over 3 input sets)."""
    g = torch.Generator(device=device).manual_seed(0)
    mats = [(torch.randn(n, n, device=device, dtype=dtype, generator=g),
             torch.randn(n, n, device=device, dtype=dtype, generator=g)) for _ in range(3)]
    for a, b in mats:
        a @ b
    sync(device)
    times = []
    for i in range(reps):
        a, b = mats[i % 3]
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            a @ b
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e12


@torch.no_grad()
def naive_losses(model, samples, *, rows: int, device, seed: int) -> dict[str, np.ndarray]:
    """HF forward with full logits, fp32 log_softmax, random-order padded batches of ``rows`` samples."""
    order = np.random.default_rng(seed).permutation(len(samples))
    sid, pos, loss = [], [], []
    computed = 0
    for i in range(0, len(order), rows):
        batch = [samples[j] for j in order[i : i + rows]]
        width = max(len(s.input_ids) for s in batch)
        computed += width * len(batch)
        ids = np.zeros((len(batch), width), dtype=np.int64)
        attn = np.zeros((len(batch), width), dtype=np.int64)
        tgt = np.zeros((len(batch), width), dtype=bool)
        for r, s in enumerate(batch):
            ids[r, : len(s.input_ids)], attn[r, : len(s.input_ids)], tgt[r, : len(s.target)] = s.input_ids, 1, s.target
        d_ids, d_attn = torch.from_numpy(ids).to(device), torch.from_numpy(attn).to(device)
        logits = model(input_ids=d_ids, attention_mask=d_attn).logits
        logp = torch.log_softmax(logits.float(), -1)
        del logits
        r, c = np.nonzero(tgt)
        d_r, d_c = torch.from_numpy(r).to(device), torch.from_numpy(c).to(device)
        loss.append(-logp[d_r, d_c - 1, d_ids[d_r, d_c]])
        del logp
        sid.append(np.array([batch[k].sample_id for k in r], dtype=np.int64))
        pos.append(c)
    return {"sample_id": np.concatenate(sid), "pos": np.concatenate(pos),
            "loss": torch.cat(loss).float().cpu().numpy(), "computed_tokens": computed}


def needed_flops(model, samples) -> float:
    """Matmul FLOPs the scorer must do: decoder linears x all tokens, lm_head x targets, causal attention."""
    cfg = model.config
    lin = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    n_tok = sum(len(s.input_ids) for s in samples)
    n_tgt = sum(int(s.target[1:].sum()) for s in samples)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attn = sum(2 * cfg.num_attention_heads * head_dim * len(s.input_ids) * (len(s.input_ids) + 1) for s in samples)
    return 2 * lin * n_tok + 2 * cfg.hidden_size * cfg.vocab_size * n_tgt + attn * cfg.num_hidden_layers


def _sorted(cols):
    k = np.lexsort((cols["pos"], cols["sample_id"]))
    return cols["loss"][k]


def precision_check(model, samples, args, device) -> dict:
    """Mean |loss - fp32 reference| of the packed and the padded (bucketed) path in the model dtype.

    The reference is the padded path with the same weights upcast to fp32 (exact values of
    the bf16 weights). Packed and padded use different attention kernels (flash varlen vs
    sdpa with a padding mask), so they differ by rounding; this shows whether packing is
    any less accurate than padding.
    """
    kw = dict(batch_tokens=args.batch_tokens, chunk=args.chunk, chunk_bytes=args.chunk_bytes, device=device)
    low = {"packed": _sorted(score_arrays(model, samples, **kw)),
           "padded": _sorted(score_arrays_padded(model, samples, **kw))}
    dtype = next(model.parameters()).dtype
    model.float()
    try:
        ref = _sorted(score_arrays_padded(model, samples, **kw))
        ref_packed = _sorted(score_arrays(model, samples, **kw))
    finally:
        model.to(dtype)
    out = {f"{k}_{dtype}_mean_abs_err": float(np.nanmean(np.abs(v - ref))) for k, v in low.items()}
    out["packed_fp32_vs_padded_fp32_max_abs"] = float(np.nanmax(np.abs(ref_packed - ref)))
    out["mean_loss"] = float(np.nanmean(ref))
    out["n_targets"] = int(len(ref))
    print(f"  precision ({len(samples)} samples, vs fp32 padded): " +
          ", ".join(f"{k}={v:.3g}" for k, v in out.items()), flush=True)
    return out


def _runner(variant: str, model, batch, rows: int, device, args):
    """The scoring call of one variant over ``batch`` (timed samples, or the warm-up subset)."""
    if variant == "naive":
        return lambda: naive_losses(model, batch, rows=rows, device=device, seed=args.seed)
    score = score_arrays if variant.startswith("packed") else score_arrays_padded
    return lambda: score(model, batch, batch_tokens=args.batch_tokens, chunk=args.chunk,
                         chunk_bytes=args.chunk_bytes, device=device,
                         linear_ce="liger" if variant.endswith("+liger") else "chunked")


def _plan_variants(model, samples, warm, lengths, rows: int, args, device):
    """The variants in the order they run, with each one's timed call, warm-up call and computed tokens."""
    n_tok = int(lengths.sum())
    base = ("packed", "bucketed", "naive", "packed+liger")
    variants = {v: _runner(v, model, samples, rows, device, args) for v in base}
    warmups = {v: _runner(v, model, warm, rows, device, args) for v in base}
    computed = {
        "packed": n_tok,
        "bucketed": int(sum(int(lengths[b].max()) * len(b) for b in plan_batches(lengths, args.batch_tokens))),
    }
    order = [v for v in ("packed", "bucketed", "naive") if v not in args.skip]
    computed["packed+liger"] = n_tok
    if args.liger:
        check_linear_ce("liger", device.type)
        order.insert(1, "packed+liger")
    if args.compile:  # last: compile_pointwise changes the model for every later call
        order.append("packed+compile")
        variants["packed+compile"] = variants["packed"]
        warmups["packed+compile"] = lambda: (compile_pointwise(model), warmups["packed"](), warmups["packed"]())
        computed["packed+compile"] = n_tok
        if args.liger:
            order.append("packed+compile+liger")
            variants["packed+compile+liger"] = variants["packed+liger"]
            warmups["packed+compile+liger"] = lambda: (warmups["packed+liger"](), warmups["packed+liger"]())
            computed["packed+compile+liger"] = n_tok
    return order, variants, warmups, computed


def _time_variant(run, warmup, repeats: int, device):
    """One warm-up call, then ``repeats`` timed calls (on CUDA each from an emptied cache and a fresh peak)."""
    t0 = time.perf_counter()
    warmup()
    sync(device)
    warm_s = time.perf_counter() - t0
    mem_before = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0 = time.perf_counter()
        out = run()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return out, times, warm_s, mem_before, peak_mem


def _compare_losses(results: list[dict], losses: dict, check) -> None:
    """Attach the precision check, the liger-vs-packed and every-vs-naive loss differences and the speedups."""
    naive = next((r for r in results if r["variant"] == "naive"), None)
    ref = losses.get("naive")
    for r in results:
        r["precision_check"] = check
        if r["variant"].endswith("+liger") and "packed" in losses:
            d = np.abs(losses[r["variant"]] - losses["packed"])
            r["vs_packed_loss_max_abs_diff"] = float(np.nanmax(d))
            print(f"  {r['variant']:15s} vs packed losses: max |diff| {r['vs_packed_loss_max_abs_diff']:.2e}")
        r["speedup_vs_naive"] = r["tok_s"] / naive["tok_s"] if naive else None
        if ref is not None and r["variant"] != "naive":
            d = np.abs(losses[r["variant"]] - ref)
            r["vs_naive_loss_mean_abs_diff"] = float(np.nanmean(d))
            r["vs_naive_loss_max_abs_diff"] = float(np.nanmax(d))
            print(f"  {r['variant']:15s} vs naive losses: mean |diff| {r['vs_naive_loss_mean_abs_diff']:.2e}, "
                  f"max {r['vs_naive_loss_max_abs_diff']:.2e} (mean loss {float(np.nanmean(ref)):.3f})")


def _measure_model(name: str, args, device, dtype, peak_tflops: float) -> list[dict]:
    shape = SHAPES[name]
    model = build_model(shape, device, dtype, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    lengths = sft_lengths(args.tokens, args.seed, hi=args.max_len)
    samples = sft_samples(lengths, shape["vocab_size"], args.seed)
    warm = samples[:: max(1, len(samples) // min(48, max(1, len(samples) // 8)))]
    n_tok = int(lengths.sum())
    floor_s = 2 * n_params * n_tok / (peak_tflops * 1e12)
    need = needed_flops(model, samples)
    rows = max(1, args.batch_tokens // args.max_len)
    print(f"[{name}] params={n_params/1e9:.3f}B samples={len(samples)} tokens={n_tok} "
          f"targets={sum(int(s.target.sum()) for s in samples)} mean_len={lengths.mean():.0f} "
          f"floor={floor_s:.3f}s", flush=True)
    order, variants, warmups, computed = _plan_variants(model, samples, warm, lengths, rows, args, device)
    results, losses = [], {}
    check = None
    for v in order:
        if v == "packed+compile" and args.check_samples:
            check = precision_check(model, samples[: args.check_samples], args, device)
        out, times, warm_s, mem_before, peak_mem = _time_variant(variants[v], warmups[v], args.repeats, device)
        dt = statistics.median(times)
        if v == "naive":
            computed[v] = out.pop("computed_tokens")
        losses[v] = _sorted(out)
        res = {
            "model": name, "variant": v, "params": n_params, "samples": len(samples), "tokens": n_tok,
            "seconds": dt, "seconds_all": times, "warmup_s": warm_s, "tok_s": n_tok / dt,
            "floor_s": floor_s, "pct_floor": floor_s / dt, "util_needed_flops": need / dt / (peak_tflops * 1e12),
            "peak_mem_gib": peak_mem, "mem_before_gib": mem_before, "computed_tokens": computed[v],
            "padding_waste": 1 - n_tok / computed[v],
            "batch_tokens": args.batch_tokens, "chunk": args.chunk, "chunk_bytes": args.chunk_bytes,
        }
        results.append(res)
        print(f"  {v:15s} {res['tok_s']:>11.0f} tok/s  {100*res['pct_floor']:5.1f}% floor  "
              f"util {100*res['util_needed_flops']:5.1f}%  waste {100*res['padding_waste']:4.1f}%  "
              f"peak {peak_mem if peak_mem is None else round(peak_mem, 2)} GiB  times {[round(t, 3) for t in times]}"
              f"  (warm-up {warm_s:.1f}s)", flush=True)
    if check is None and args.check_samples:
        check = precision_check(model, samples[: args.check_samples], args, device)
    _compare_losses(results, losses, check)
    return results


def run_model(name: str, args, device, dtype, peak_tflops: float) -> list[dict]:
    results = _measure_model(name, args, device, dtype, peak_tflops)
    # the model and the closures holding it went with _measure_model's frame; compiled code holds it too
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="1b,3b,8b", help="comma list of 1b,3b,8b or SHAPES keys")
    ap.add_argument("--cpu", action="store_true", help="tiny shapes, fp32, CPU (overrides --models/--tokens)")
    ap.add_argument("--tokens", type=int, default=262144, help="total real tokens in the sample set")
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--chunk", type=int, default=None,
                    help="at most this many lm_head+CE rows per chunk "
                         "(docs/benchmarks.md's H100 figures: --chunk 2048 --chunk-mib 4096)")
    ap.add_argument("--chunk-mib", type=int, default=LM_HEAD_CHUNK_BYTES >> 20,
                    help="lm_head+CE chunk budget in MiB (score.lm_head_chunk_bytes)")
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip", default="", help="comma list of variants to skip (packed,bucketed,naive)")
    ap.add_argument("--compile", action="store_true", help="also time packed after compile_pointwise")
    ap.add_argument("--liger", action="store_true", help="also time packed with score.linear_ce: liger (CUDA)")
    ap.add_argument("--check-samples", type=int, default=64,
                    help="samples for the precision check against an fp32 copy (0: skip)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return ap


def _device_and_models(ap: argparse.ArgumentParser, args):
    """Device, dtype, model shapes and the measured matmul peak; ``--cpu`` also shrinks the defaults."""
    if args.cpu:
        device, dtype = torch.device("cpu"), torch.float32
        names = ["tiny-128", "tiny-256"]
        if args.tokens == ap.get_default("tokens"):
            args.tokens = 12288
        if args.batch_tokens == ap.get_default("batch_tokens"):
            args.batch_tokens = 8192
        if args.repeats == ap.get_default("repeats"):
            args.repeats = 1
        args.check_samples = 0  # fp32 already: nothing to compare against
        peak = matmul_peak(device, dtype, 1024, 10)
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: use --cpu")
        device, dtype = torch.device("cuda"), torch.bfloat16
        names = [ALIASES.get(m, m) for m in args.models.split(",") if m]
        peak = matmul_peak(device, dtype, 8192, 30)
    return device, dtype, names, peak


def _print_table(results: list[dict]) -> None:
    print("\n| model | variant | tok/s | % of floor | util (needed FLOPs) | vs naive | peak mem GiB | padding waste |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        mem = "n/a" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
        vs = "n/a" if r["speedup_vs_naive"] is None else f"{r['speedup_vs_naive']:.2f}x"
        print(f"| {r['model']} | {r['variant']} | {r['tok_s']:,.0f} | {100*r['pct_floor']:.1f}% | "
              f"{100*r['util_needed_flops']:.1f}% | {vs} | {mem} | {100*r['padding_waste']:.1f}% |")


def main(argv=None):
    ap = _parser()
    args = ap.parse_args(argv)
    args.skip = {s for s in args.skip.split(",") if s}
    args.chunk_bytes = args.chunk_mib << 20
    device, dtype, names, peak = _device_and_models(ap, args)
    import transformers

    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
        "dtype": str(dtype), "matmul_peak_tflops": peak,
        "flash_varlen": flash_varlen_available(device, dtype), "argv": sys.argv[1:],
        "args": {k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v)
                 for k, v in vars(args).items()},
    }
    print(f"device={meta['device']} torch={meta['torch']} transformers={meta['transformers']} "
          f"matmul peak={peak:.1f} TFLOP/s flash_varlen={meta['flash_varlen']}", flush=True)
    results = []
    for name in names:
        results.extend(run_model(name, args, device, dtype, peak))
        if args.out:  # after each model, so a run cut short still leaves what it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    _print_table(results)
    if args.out:
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
