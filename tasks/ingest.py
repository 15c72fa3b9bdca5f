"""The ingest step a worker runs: one split of the inputs -> a tokenised Parquet part.

Each row is validated (``tasks/validate.py``: a bad row is quarantined with its reason, never
fatal), rendered by the chat template, and a chunk's rows are tokenised with one batch call.
Which part (D0..DT, held-out) a sample falls into is drawn from its id alone. The fan-out over
splits and the staging of the parts in the run database are the flow's (``flows/ingest.py``).
"""
from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from tokenclean.tasks.inputs import RAW_CHARS, RawRow, RowError, Split, read_split
from tokenclean.tasks.keys import sample_id as content_sample_id
from tokenclean.tasks.keys import tokenization_key
from tokenclean.tasks.store.data import EVAL_PART, STAGE_Q_SCHEMA, STAGE_SCHEMA
from tokenclean.tasks.template import (
    Rendered,
    TokenizedBatch,
    renderer,
    template_id,
    tokenize_batch,
    tokenizer_fingerprint,
)
from tokenclean.tasks.validate import Normalized, normalize, render_checked
from tokenclean.tasks.versions import INGEST_RULES


def assign_part(uid: str, seed: int, eval_fraction: float, n_parts: int, is_eval_source: bool,
                warmup: bool | None = None) -> int:
    """Deterministic split from the id alone, so re-ingesting never reshuffles D0..DT.

    ``warmup``: None when D0 is drawn from the inputs like every other part; with a separate
    warm-up input (``data.warmup_paths``), True for its rows (all in D0) and False for the
    pool's rows (drawn over D1..DT only, so rows added to the pool never reach D0).
    """
    if is_eval_source:
        return EVAL_PART
    if warmup:
        return 0
    u = int.from_bytes(hashlib.blake2b(f"{seed}:{uid}".encode(), digest_size=8).digest(), "big") / 2**64
    if u < eval_fraction:
        return EVAL_PART
    u = (u - eval_fraction) / (1 - eval_fraction)
    if warmup is False:
        return 1 + min(int(u * (n_parts - 1)), n_parts - 2)
    return min(int(u * n_parts), n_parts - 1)


@functools.lru_cache(maxsize=1024)
def source_name(source: str) -> str:
    """What a row's source is called in the run: a file's name, ``hf:NAME[:split]`` (a local dataset by its folder
    name). Locations are left out, so moving an input changes nothing stored (see ``keys.inputs_fingerprint``)."""
    if source.startswith("hf:"):
        name, sep, split = source[3:].partition(":")
        return "hf:" + (Path(name).name if Path(name).is_dir() else name) + sep + split
    return Path(source).name


def tokenization_of(tokenizer, max_length: int, template: str = "tulu", empty_think: str = "target") -> str:
    """Key of how ingest turns text into samples: tokenizer, template (a model template by its text and its
    conventions: ``empty_think``), max length and the ingest rules (``INGEST_RULES``)."""
    return tokenization_key(tokenizer_fingerprint(tokenizer),
                            f"{template_id(tokenizer, template, empty_think)};ingest-r{INGEST_RULES}", max_length)


CHUNK_ROWS = 2048


@dataclass(frozen=True)
class IngestSpec:
    """Everything that turns a row into a sample, besides the tokenizer: what a chunk's worker needs."""

    tokenization: str
    max_length: int
    eval_fraction: float
    n_parts: int
    seed: int
    template: str = "tulu"
    warmup: bool = False  # a separate warm-up input is given (data.warmup_paths): it is D0, the rest D1..DT
    empty_think: str = "target"  # data.empty_think: a model template's empty think block, target or prompt


@dataclass
class IngestChunk:
    """One chunk of input rows, processed: its samples (``STAGE_SCHEMA``) and its quarantined rows."""

    samples: pa.Table
    quarantine: list[dict]
    reasoning_dropped: int = 0  # assistant turns of its samples whose reasoning the template does not render


class _Accepted(NamedTuple):
    """A row that validated and rendered; ``answer_at``: where its answer starts in the text (-1: none)."""

    row: RawRow
    norm: Normalized
    rendered: Rendered
    answer_at: int


def _list_column(offsets: np.ndarray, values: np.ndarray, value_type, valid: np.ndarray | None = None) -> pa.Array:
    """An Arrow list column straight from flat values and row offsets (``valid``: rows that are not null)."""
    mask = None if valid is None or valid.all() else pa.array(~valid)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32), pa.int32()), pa.array(values, value_type),
                                    mask=mask)


def process_chunk(rows: list[RawRow], is_eval: bool, tokenizer, spec: IngestSpec,
                  is_warmup: bool = False) -> IngestChunk:
    """Validate, render and tokenise one chunk of rows: a pure function of the rows (each with its place
    in the input, ``ordinal``), so any worker gives the same result, and 1 or N workers the same dataset.

    Per row there is only what needs the row's own Python objects (JSON, validation,
    rendering, ids); tokenisation is one batch call and every per-token step runs over the
    chunk's flat arrays (``template.TokenizedBatch``). Duplicate ids are not decided here
    (a chunk cannot see the others): staging does it over the whole input.
    """
    with _no_cyclic_gc():
        return _process_chunk(rows, is_eval, tokenizer, spec, is_warmup)


@contextlib.contextmanager
def _no_cyclic_gc():
    """Python's cyclic garbage collector off for the duration: a chunk's objects are freed by reference counting
    and hold no cycles, while collections triggered by their allocation walk every object of the process (torch,
    transformers, Prefect); measured, a third of a chunk's time (docs/benchmarks.md)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _process_chunk(rows: list[RawRow], is_eval: bool, tokenizer, spec: IngestSpec,
                   is_warmup: bool = False) -> IngestChunk:
    good, quarantine = _validate(rows, tokenizer, spec)
    toks = tokenize_batch(tokenizer, [g.rendered for g in good], spec.max_length)
    n_resp = toks.n_response
    scalars = _row_columns(good, n_resp, spec, is_eval, is_warmup, quarantine)
    columns = _token_columns(toks, good, spec)
    table = pa.Table.from_arrays([columns[f.name] if f.name in columns else pa.array(scalars[f.name], f.type)
                                  for f in STAGE_SCHEMA], schema=STAGE_SCHEMA)
    if (n_resp == 0).any():
        table = table.filter(pa.array(n_resp > 0))
    quarantine.sort(key=lambda q: q["ordinal"])
    dropped = sum(g.rendered.reasoning_dropped for g, nr in zip(good, n_resp.tolist()) if nr > 0)
    return IngestChunk(table, quarantine, dropped)


def _quarantined(row: RawRow, reason: str) -> dict:
    return {"ordinal": row.ordinal, "source": row.source, "row_index": row.index, "reason": reason, "raw": row.raw}


def _validate(rows: list[RawRow], tokenizer, spec: IngestSpec) -> tuple[list[_Accepted], list[dict]]:
    """The rows that validate and render, and the others as quarantined rows with their reason."""
    render_one = renderer(spec.template, tokenizer, spec.empty_think)
    good, quarantine = [], []
    for row in rows:
        try:
            norm = normalize(row.parsed())
            good.append(_Accepted(row, norm, *render_checked(render_one, norm)))
        except RowError as e:
            quarantine.append(_quarantined(row, str(e)))
    return good, quarantine


_SCALARS = ("sample_id", "uid", "source", "row_index", "part", "task", "answer", "content_hash", "text", "ordinal",
            "source_path", "raw")


def _row_columns(good: list[_Accepted], n_resp: np.ndarray, spec: IngestSpec, is_eval: bool, is_warmup: bool,
                 quarantine: list[dict]) -> dict[str, list]:
    """The columns with a value per row. A sample left with no response token within max_length is
    quarantined here (appended to ``quarantine``); the caller filters it out of the samples."""
    scalars: dict[str, list] = {c: [] for c in _SCALARS}
    warmup = is_warmup if spec.warmup else None
    for (row, norm, rendered, _), nr in zip(good, n_resp.tolist()):
        if nr == 0:
            quarantine.append(_quarantined(
                row, f"no response token within max_length={spec.max_length} (prompt too long)"))
        scalars["sample_id"].append(content_sample_id(spec.tokenization, norm.uid, norm.content_hash))
        scalars["uid"].append(norm.uid)
        scalars["source"].append(source_name(row.source))
        scalars["row_index"].append(row.index)
        scalars["part"].append(assign_part(norm.uid, spec.seed, spec.eval_fraction, spec.n_parts, is_eval, warmup))
        scalars["task"].append(norm.task)
        scalars["answer"].append(norm.answer)
        scalars["content_hash"].append(norm.content_hash)
        scalars["text"].append(rendered.text)
        scalars["ordinal"].append(row.ordinal)
        scalars["source_path"].append(row.source)
        scalars["raw"].append(row.raw[:RAW_CHARS])  # what the quarantine keeps, should the id turn out a duplicate
    return scalars


def _token_columns(toks: TokenizedBatch, good: list[_Accepted], spec: IngestSpec) -> dict[str, pa.Array]:
    """The columns computed over the chunk's flat token arrays."""
    a_start, a_end = _answer_tokens(toks, good)
    return {
        "tokenization": pa.array([spec.tokenization] * len(good), pa.string()),
        "n_tokens": pa.array(toks.lengths, pa.int32()), "n_response": pa.array(toks.n_response, pa.int32()),
        "truncated": pa.array(toks.truncated, pa.bool_()),
        "answer_start": pa.array(a_start, pa.int32()), "answer_end": pa.array(a_end, pa.int32()),
        "input_ids": _list_column(toks.offsets, toks.input_ids, pa.int32()),
        "response_mask": _list_column(toks.offsets, toks.response_mask, pa.bool_()),
        "truth": _list_column(toks.offsets, toks.truth, pa.uint8(), toks.has_truth),
        "char_start": _list_column(toks.offsets, toks.char_starts, pa.int32()),
        "char_end": _list_column(toks.offsets, toks.char_ends, pa.int32()),
        "reasoning_mask": _list_column(toks.offsets, toks.reasoning, pa.bool_()),
    }


def _answer_tokens(toks: TokenizedBatch, good: list[_Accepted]) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's answer as token positions [start, end): the tokens anchored in its last occurrence in the
    final response, all of them targets; -1 for no answer, or one that truncation cut short (its kept tokens
    are not the answer)."""
    lo, hi = np.zeros(len(good), np.int64), np.zeros(len(good), np.int64)
    for i, g in enumerate(good):
        if g.norm.answer is not None:
            lo[i], hi[i] = g.answer_at, g.answer_at + len(g.norm.answer)
    a_first, a_end, a_ok = toks.first_last_in(lo, hi)
    a_ok &= hi <= toks.kept_char_end()
    return np.where(a_ok, a_first, -1), np.where(a_ok, a_end, -1)


def part_paths(parts_dir: str, split: int) -> tuple[str, str]:
    """(samples, quarantine) Parquet files of split number ``split``'s part."""
    from tokenclean.tasks.storage import join

    return join(parts_dir, f"part-{split:08d}.parquet"), join(parts_dir, f"part-{split:08d}.quarantine.parquet")


def _batched(rows: Iterator[RawRow], n: int) -> Iterator[list[RawRow]]:
    batch: list[RawRow] = []
    for row in rows:
        batch.append(row)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def process_split(split: Split, tokenizer, spec: IngestSpec, parts_dir: str, chunk_rows: int = CHUNK_ROWS) -> dict:
    """Ingest one split where it runs (this process or a Ray worker): read its rows, process them
    ``chunk_rows`` at a time, and write its part to ``parts_dir`` (a local path, a shared mount or an
    fsspec URL): the quarantined rows, then the samples, each file atomically, so a samples file
    means a complete part. Memory holds one chunk, whatever the split's size. Returns paths and counts.
    """
    from tokenclean.tasks import storage
    from tokenclean.tasks.placement import where

    t0 = time.perf_counter()
    samples_path, quarantine_path = part_paths(parts_dir, split.number)
    quarantine: list[dict] = []
    n_samples = dropped = 0
    with storage.parquet_writer(samples_path, STAGE_SCHEMA) as writer:
        for rows in _batched(read_split(split), chunk_rows):
            out = process_chunk(rows, split.is_eval, tokenizer, spec, split.is_warmup)
            writer.write_table(out.samples)
            n_samples += out.samples.num_rows
            quarantine += out.quarantine
            dropped += out.reasoning_dropped
        # the count travels in the quarantine file's footer, so a resumed ingest reads it back (finished_part)
        storage.write_parquet(pa.Table.from_pylist(quarantine, STAGE_Q_SCHEMA)
                              .replace_schema_metadata({"reasoning_dropped": str(dropped)}), quarantine_path)
    return {"split": split.number, "samples": samples_path, "quarantine": quarantine_path, "n_samples": n_samples,
            "n_quarantined": len(quarantine), "reasoning_dropped": dropped, "seconds": time.perf_counter() - t0,
            "node": where()["node"]}


def finished_part(parts_dir: str, split: Split) -> dict | None:
    """``process_split``'s result for a part an earlier, interrupted ingest completed (its samples file exists),
    else None."""
    from tokenclean.tasks import storage

    samples_path, quarantine_path = part_paths(parts_dir, split.number)
    if not storage.exists(samples_path):
        return None
    return {"split": split.number, "samples": samples_path, "quarantine": quarantine_path,
            "n_samples": storage.parquet_rows(samples_path), "n_quarantined": storage.parquet_rows(quarantine_path),
            "reasoning_dropped": _footer_count(quarantine_path, "reasoning_dropped"),
            "seconds": 0.0, "node": None, "reused": True}


def _footer_count(path: str, key: str) -> int:
    """An integer ``process_split`` wrote into a part file's footer metadata."""
    import pyarrow.parquet as pq

    from tokenclean.tasks import storage

    fs, p = storage.filesystem(path)
    with fs.open(p, "rb") as f:
        meta = pq.ParquetFile(f).schema_arrow.metadata or {}
    return int(meta.get(key.encode(), b"0"))
