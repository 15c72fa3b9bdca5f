"""Resolve model and data, open the run database, ingest once.

Re-running a run resumes it: if the database already holds samples tokenised with
the same fingerprint, ingest is skipped. A different tokenizer, template or max length
is refused (positions would not line up with stored scores); changed input content
is refused too, rather than silently mixing two datasets in one ranking.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from tasks import store
from tasks.ingest import EVAL_PART, ingest
from tasks.template import TEMPLATE_NAME, tokenizer_fingerprint
from tokenclean.config import RunConfig, dump_config


@dataclass
class RunContext:
    cfg: RunConfig
    con: object  # duckdb connection, owned by the flow process
    base_path: str
    run_dir: Path

    @property
    def train_parts(self) -> list[int]:
        return list(range(self.cfg.iterations + 1))

    def adapter_dir(self, name: str) -> str:
        return str(self.run_dir / "adapters" / name)


def resolve_inputs(cfg: RunConfig) -> tuple[str, list[str], list[str]]:
    """(base model path, data paths, eval paths); builds the embedded default when asked for."""
    paths, eval_paths = list(cfg.data.paths), list(cfg.data.eval_paths)
    if cfg.model.base == "embedded":
        from tokenclean.embedded import EmbeddedSpec, build
        from tokenclean.synth import SynthSpec

        e = cfg.embedded
        spec = EmbeddedSpec(synth=SynthSpec(n_people=e.n_people, n_train=e.n_train, n_eval=e.n_eval,
                                            corrupt_fraction=e.corrupt_fraction, seed=e.seed),
                            pretrain_steps=e.pretrain_steps)
        built = build(spec)
        if not paths:
            paths, eval_paths = [str(built.train)], eval_paths or [str(built.eval)]
        return str(built.model), paths, eval_paths
    if not paths:
        raise ValueError("data.paths is empty: give JSONL/Parquet files or hf:NAME (only the embedded model has default data)")
    return cfg.model.base, paths, eval_paths


def content_fingerprint(entries: list[str]) -> str:
    h = hashlib.sha256()
    for entry in entries:
        h.update(entry.encode())
        p = Path(entry)
        files = sorted(p.iterdir()) if p.is_dir() else [p] if p.exists() else []
        for f in files:
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def prepare(cfg: RunConfig, *, progress: bool = True, refresh: bool = False) -> RunContext:
    """Open the run; ingest on first use. ``refresh`` re-reads changed inputs incrementally."""
    from transformers import AutoTokenizer

    base_path, paths, eval_paths = resolve_inputs(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or base_path)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    con = store.connect(cfg.db_path)
    try:
        _ingest_once(cfg, con, tokenizer, paths, eval_paths, progress=progress, refresh=refresh)
        store.set_meta(con, "base_model", base_path)
        dump_config(cfg, run_dir / "config.yaml")
        n_eval = con.execute("SELECT count(*) FROM samples WHERE part = ?", [EVAL_PART]).fetchone()[0]
        if n_eval == 0:
            raise ValueError("no held-out samples: set data.eval_paths or data.eval_fraction > 0")
    except BaseException:
        con.close()  # release the file lock for whoever runs next
        raise
    return RunContext(cfg, con, base_path, run_dir)


def _ingest_once(cfg: RunConfig, con, tokenizer, paths: list[str], eval_paths: list[str], *, progress: bool,
                 refresh: bool) -> None:
    fingerprint = {
        "tokenizer": tokenizer_fingerprint(tokenizer), "template": TEMPLATE_NAME, "max_length": cfg.data.max_length,
        "parts": cfg.iterations + 1, "eval_fraction": cfg.data.eval_fraction, "split_seed": cfg.data.seed,
        "content": content_fingerprint(paths + ["--eval--"] + eval_paths),
    }
    tokenisation = {k: v for k, v in fingerprint.items() if k != "content"}
    stored = store.get_meta(con, "fingerprint")
    if stored is not None:
        store.check_fingerprint(con, tokenisation)  # raises on a tokenizer/template/length change
    if stored is None or json.loads(stored).get("content") != fingerprint["content"]:
        if stored is not None and not refresh:
            raise store.FingerprintMismatch(
                "the input data changed since this run ingested it; run `tokenclean refresh` to score only "
                "new and changed samples, or use a new run name")
        t0 = time.perf_counter()
        res = ingest(paths, eval_paths, tokenizer, max_length=cfg.data.max_length,
                     eval_fraction=0.0 if eval_paths else cfg.data.eval_fraction, n_parts=cfg.iterations + 1,
                     seed=cfg.data.seed, progress=progress)
        if res.samples.num_rows == 0:
            raise ValueError(f"no usable rows in {paths}: all {res.n_read} rows were quarantined "
                             f"(first reason: {res.quarantine[0]['reason'] if res.quarantine else 'empty input'})")
        summary = {"rows_read": res.n_read, "samples": res.samples.num_rows, "quarantined": len(res.quarantine),
                   "truncated": int(sum(res.samples.column("truncated").to_pylist()))}
        if stored is None:
            store.insert_samples(con, res.samples, res.quarantine)
        else:
            summary["refresh"] = store.apply_refresh(con, res.samples, res.quarantine)
        store.set_meta(con, "ingest_summary", summary)
        store.set_meta(con, "fingerprint", fingerprint)
        store.log_stage(con, "refresh" if stored else "ingest", "all", time.perf_counter() - t0, summary)


def ingest_summary(con) -> dict:
    raw = store.get_meta(con, "ingest_summary")
    return json.loads(raw) if raw else {}
