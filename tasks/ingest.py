"""Read SFT rows from JSONL / Parquet / HF datasets, validate, render, tokenise.

A bad row never stops a run: it is written to the quarantine table with the reason,
and the run summary counts it. Accepted forms per row:

* ``{"messages": [{"role": "user"|"system"|"assistant", "content": str}, ...]}``
* ``{"prompt": str, "response": str}``

Optional fields: ``id`` (unique; else the content hash), ``task`` (for per-task
metrics), ``answer`` (a substring of the last response, scored by the task metric),
``informative_spans`` / ``corrupted_spans`` (``[[start, end], ...]`` character spans of
the last response: ground-truth token labels, as the synthetic demo data carries).
"""
from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from tokenclean.tasks.template import (
    ROLES,
    TRUTH_CORRUPTED,
    TRUTH_INFORMATIVE,
    TemplateError,
    renderer,
    template_id,
    tokenize_batch,
    tokenizer_fingerprint,
)

from tokenclean.tasks.keys import sample_id as content_sample_id
from tokenclean.tasks.keys import tokenization_key
from tokenclean.tasks.store.data import EVAL_PART  # noqa: F401  (re-exported: the held-out part)


RAW_CHARS = 2000  # how much of a row the quarantine keeps


class RowError(ValueError):
    """A row that cannot be used; the message is the quarantine reason."""


@dataclass
class RawRow:
    source: str
    index: int
    value: Any  # the parsed object (Parquet / datasets rows); None for a JSON line not parsed yet
    raw: str
    error: str | None = None
    json_line: bool = False  # ``raw`` is a JSON line, parsed where the chunk is processed (``process_chunk``)

    def parsed(self) -> Any:
        if self.error:
            raise RowError(self.error)
        if self.json_line:
            try:
                return json.loads(self.raw)
            except json.JSONDecodeError as e:
                self.raw = self.raw[:RAW_CHARS]
                raise RowError(f"not JSON: {e.msg} at column {e.colno}") from e
        return self.value


def _read_jsonl(path: Path) -> Iterator[RawRow]:
    with path.open("rb") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield RawRow(str(path), i, None, line[:RAW_CHARS].decode("utf-8", "replace"), f"not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            yield RawRow(str(path), i, None, text, json_line=True)


def _read_table_rows(source: str, rows: Iterator[dict]) -> Iterator[RawRow]:
    for i, row in enumerate(rows):
        yield RawRow(source, i, row, json.dumps(row, default=str)[:RAW_CHARS])


def read_rows(entry: str) -> Iterator[RawRow]:
    """One input entry: a .jsonl/.json/.parquet path, a directory of those, or ``hf:NAME[:SPLIT]``."""
    if entry.startswith("hf:"):
        import datasets

        spec = entry[3:]
        name, _, split = spec.partition(":")
        if Path(name).is_dir():  # a dataset saved with save_to_disk
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split or "train"]
        else:
            ds = datasets.load_dataset(name, split=split or "train")
        yield from _read_table_rows(entry, iter(ds))
        return
    path = Path(entry)
    if not path.exists():
        raise FileNotFoundError(f"input not found: {entry}")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".json", ".parquet"))
        if not files:
            raise ValueError(f"{entry}: directory holds no .jsonl/.json/.parquet files")
        for p in files:
            yield from read_rows(str(p))
        return
    if path.suffix in (".jsonl", ".json"):
        yield from _read_jsonl(path)
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from _read_table_rows(str(path), iter(pq.read_table(path).to_pylist()))
    else:
        raise ValueError(f"{entry}: unsupported format (want .jsonl, .json, .parquet or hf:NAME)")


def _require_str(obj: dict, key: str) -> str:
    v = obj.get(key)
    if v is None:
        raise RowError(f"missing field '{key}'")
    if not isinstance(v, str):
        raise RowError(f"field '{key}' must be a string, got {type(v).__name__}")
    return v


def _spans(obj: dict, key: str, limit: int) -> list[tuple[int, int]]:
    v = obj.get(key)
    if v is None:
        return []
    try:
        spans = [(int(s), int(e)) for s, e in v]
    except (TypeError, ValueError):
        raise RowError(f"field '{key}' must be a list of [start, end] pairs")
    for s, e in spans:
        if not 0 <= s < e <= limit:
            raise RowError(f"field '{key}': span [{s}, {e}] outside the response (length {limit})")
    return spans


_quote = json.encoder.encode_basestring_ascii  # the standard encoder's own string quoting (C)


def content_text(messages: list[dict], task: str | None, answer: str | None, truth: list[tuple[int, int, int]]) -> str:
    """The canonical JSON of a sample's content: exactly ``json.dumps({"messages": messages, "task": task,
    "answer": answer, "truth": sorted(truth)}, sort_keys=True)``, whose hash names the sample.

    Written out because the generic encoder (sorting every dict's keys, a call per
    value) was half of a row's validation time; the text, and so every sample id, is
    unchanged (``tests/test_ingest.py`` compares the two).
    """
    msgs = ", ".join(f'{{"content": {_quote(m["content"])}, "role": {_quote(m["role"])}}}' for m in messages)
    spans = ", ".join(f"[{s}, {e}, {lab}]" for s, e, lab in sorted(truth))
    return (f'{{"answer": {"null" if answer is None else _quote(answer)}, "messages": [{msgs}], '
            f'"task": {"null" if task is None else _quote(task)}, "truth": [{spans}]}}')


@dataclass
class Normalized:
    messages: list[dict]
    uid: str
    task: str | None
    answer: str | None
    truth: list[tuple[int, int, int]]
    content_hash: str


def normalize(obj: Any) -> Normalized:
    if not isinstance(obj, dict):
        raise RowError(f"row must be a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise RowError("field 'messages' must be a non-empty list")
        messages = []
        for j, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise RowError(f"messages[{j}] must be an object")
            role = m.get("role")
            if role not in ROLES:
                raise RowError(f"messages[{j}].role must be one of {ROLES}, got {role!r}")
            content = m.get("content")
            if not isinstance(content, str):
                raise RowError(f"messages[{j}].content must be a string, got {type(content).__name__}")
            messages.append({"role": role, "content": content})
        assistants = [m for m in messages if m["role"] == "assistant"]
        if not assistants:
            raise RowError("no assistant message: nothing to train on")
        if messages[-1]["role"] != "assistant":
            raise RowError("last message must be the assistant's response")
    elif "prompt" in obj or "response" in obj:
        prompt, response = _require_str(obj, "prompt"), _require_str(obj, "response")
        if not prompt.strip():
            raise RowError("empty or whitespace-only prompt")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    else:
        raise RowError("row has neither 'messages' nor 'prompt'/'response'")
    last = messages[-1]["content"]
    if not last.strip():
        raise RowError("empty or whitespace-only response")
    truth = [(s, e, TRUTH_INFORMATIVE) for s, e in _spans(obj, "informative_spans", len(last))]
    truth += [(s, e, TRUTH_CORRUPTED) for s, e in _spans(obj, "corrupted_spans", len(last))]
    answer = obj.get("answer")
    if answer is not None:
        if not isinstance(answer, str) or not answer.strip():
            raise RowError("field 'answer' must be a non-empty string")
        if answer not in last:
            raise RowError("field 'answer' does not occur in the response")
    task = obj.get("task")
    if task is not None and not isinstance(task, str):
        raise RowError("field 'task' must be a string")
    # Everything that shapes the stored sample (its tokens, labels, answer span, task) is
    # hashed: an edit to any of them makes a new sample, never a stale one.
    content_hash = hashlib.sha256(content_text(messages, task, answer, truth).encode()).hexdigest()[:16]
    uid = obj.get("id")
    if uid is None:
        uid = content_hash
    elif isinstance(uid, bool) or not isinstance(uid, (str, int)):
        raise RowError(f"field 'id' must be a string or integer, got {type(uid).__name__}")
    return Normalized(messages, str(uid), task, answer, truth, content_hash)


def assign_part(uid: str, seed: int, eval_fraction: float, n_parts: int, is_eval_source: bool) -> int:
    """Deterministic split from the id alone, so re-ingesting never reshuffles D0..DT."""
    if is_eval_source:
        return EVAL_PART
    u = int.from_bytes(hashlib.blake2b(f"{seed}:{uid}".encode(), digest_size=8).digest(), "big") / 2**64
    if u < eval_fraction:
        return EVAL_PART
    u = (u - eval_fraction) / (1 - eval_fraction)
    return min(int(u * n_parts), n_parts - 1)


SAMPLE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("tokenization", pa.string()),
        ("uid", pa.string()),
        ("task", pa.string()),
        ("answer", pa.string()),
        ("content_hash", pa.string()),
        ("n_tokens", pa.int32()),
        ("n_response", pa.int32()),
        ("truncated", pa.bool_()),
        ("answer_start", pa.int32()),
        ("answer_end", pa.int32()),
        ("input_ids", pa.list_(pa.int32())),
        ("response_mask", pa.list_(pa.bool_())),
        ("truth", pa.list_(pa.uint8())),
        ("text", pa.string()),
        ("char_start", pa.list_(pa.int32())),
        ("char_end", pa.list_(pa.int32())),
    ]
)
# What ingest returns per sample: the stored sample, plus where this dataset has it.
INGEST_SCHEMA = SAMPLE_SCHEMA.append(pa.field("part", pa.int16())).append(pa.field("source", pa.string())) \
    .append(pa.field("row_index", pa.int64()))


@functools.lru_cache(maxsize=1024)
def source_name(source: str) -> str:
    """What a row's source is called in the run: a file's name, ``hf:NAME[:split]`` (a local dataset by its folder
    name). Locations are left out, so moving an input changes nothing stored (see ``keys.inputs_fingerprint``)."""
    if source.startswith("hf:"):
        name, sep, split = source[3:].partition(":")
        return "hf:" + (Path(name).name if Path(name).is_dir() else name) + sep + split
    return Path(source).name


def tokenization_of(tokenizer, max_length: int, template: str = "tulu") -> str:
    """Key of how ingest turns text into tokens: tokenizer, template (a model template by its text) and max length."""
    return tokenization_key(tokenizer_fingerprint(tokenizer), template_id(tokenizer, template), max_length)


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


@dataclass
class IngestChunk:
    """One chunk of input rows, processed: its samples (``INGEST_SCHEMA`` plus ``ordinal``, ``source_path``
    and ``raw``, which staging uses to find duplicate ids) and its quarantined rows (with their ``ordinal``)."""

    samples: pa.Table
    quarantine: list[dict]
    n_read: int


def _list_column(offsets: np.ndarray, values: np.ndarray, value_type, valid: np.ndarray | None = None) -> pa.Array:
    """An Arrow list column straight from flat values and row offsets (``valid``: rows that are not null)."""
    mask = None if valid is None or valid.all() else pa.array(~valid)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32), pa.int32()), pa.array(values, value_type),
                                    mask=mask)


def process_chunk(rows: list[RawRow], start: int, is_eval: bool, tokenizer, spec: IngestSpec) -> IngestChunk:
    """Validate, render and tokenise one chunk of rows: a pure function of the rows (and their place
    ``start`` in the input), so any worker gives the same result, and 1 or N workers the same dataset.

    Per row there is only what needs the row's own Python objects (JSON, validation,
    rendering, ids); tokenisation is one batch call and every per-token step runs over the
    chunk's flat arrays (``template.TokenizedBatch``). Duplicate ids are not decided here
    (a chunk cannot see the others): staging does it over the whole input.
    """
    with _no_cyclic_gc():
        return _process_chunk(rows, start, is_eval, tokenizer, spec)


@contextlib.contextmanager
def _no_cyclic_gc():
    """Python's cyclic garbage collector off for the duration.

    A chunk allocates a few objects per row, all freed by reference counting when the
    chunk is done, and none in cycles. With the collector on, those allocations trigger
    collections that walk every object of the process (torch, transformers and Prefect
    imports: about half a million): measured, the collector took a third of a chunk's
    time, and the same share of transformers' own tokenizer call.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _process_chunk(rows: list[RawRow], start: int, is_eval: bool, tokenizer, spec: IngestSpec) -> IngestChunk:
    good, quarantine = [], []
    render_one = renderer(spec.template, tokenizer)
    for j, row in enumerate(rows):
        try:
            norm = normalize(row.parsed())
            try:
                rendered = render_one(norm.messages, norm.truth)
            except TemplateError as e:
                raise RowError(str(e)) from e
            good.append((j, row, norm, rendered))
        except RowError as e:
            quarantine.append({"ordinal": start + j, "source": row.source, "row_index": row.index, "reason": str(e),
                               "raw": row.raw})
    toks = tokenize_batch(tokenizer, [g[3] for g in good], spec.max_length)
    n = len(good)
    n_resp = toks.n_response
    # the answer's token span: tokens anchored in its last occurrence in the final response, all of them targets
    lo, hi = np.zeros(n, np.int64), np.zeros(n, np.int64)
    for i, (_, _, norm, rendered) in enumerate(good):
        if norm.answer is not None:
            s, e = rendered.response_spans[-1]
            c0 = rendered.text.rfind(norm.answer, s, e)
            lo[i], hi[i] = c0, c0 + len(norm.answer)
    a_first, a_end, a_ok = toks.first_last_in(lo, hi)
    a_start, a_end = np.where(a_ok, a_first, -1), np.where(a_ok, a_end, -1)
    scalars: dict[str, list] = {c: [] for c in ("sample_id", "uid", "source", "row_index", "part", "task", "answer",
                                               "content_hash", "text", "ordinal", "source_path", "raw")}
    for (j, row, norm, rendered), nr in zip(good, n_resp.tolist()):
        if nr == 0:
            quarantine.append({"ordinal": start + j, "source": row.source, "row_index": row.index,
                               "reason": f"no response token within max_length={spec.max_length} (prompt too long)",
                               "raw": row.raw})
        scalars["sample_id"].append(content_sample_id(spec.tokenization, norm.uid, norm.content_hash))
        scalars["uid"].append(norm.uid)
        scalars["source"].append(source_name(row.source))
        scalars["row_index"].append(row.index)
        scalars["part"].append(assign_part(norm.uid, spec.seed, spec.eval_fraction, spec.n_parts, is_eval))
        scalars["task"].append(norm.task)
        scalars["answer"].append(norm.answer)
        scalars["content_hash"].append(norm.content_hash)
        scalars["text"].append(rendered.text)
        scalars["ordinal"].append(start + j)
        scalars["source_path"].append(row.source)
        scalars["raw"].append(row.raw[:RAW_CHARS])  # what the quarantine keeps, should the id turn out a duplicate
    lengths = toks.lengths
    columns = {
        "tokenization": pa.array([spec.tokenization] * n, pa.string()),
        "n_tokens": pa.array(lengths, pa.int32()), "n_response": pa.array(n_resp, pa.int32()),
        "truncated": pa.array(toks.truncated, pa.bool_()),
        "answer_start": pa.array(a_start, pa.int32()), "answer_end": pa.array(a_end, pa.int32()),
        "input_ids": _list_column(toks.offsets, toks.input_ids, pa.int32()),
        "response_mask": _list_column(toks.offsets, toks.response_mask, pa.bool_()),
        "truth": _list_column(toks.offsets, toks.truth, pa.uint8(), toks.has_truth),
        "char_start": _list_column(toks.offsets, toks.char_starts, pa.int32()),
        "char_end": _list_column(toks.offsets, toks.char_ends, pa.int32()),
    }
    schema = INGEST_SCHEMA.append(pa.field("ordinal", pa.int64())).append(pa.field("source_path", pa.string())) \
        .append(pa.field("raw", pa.string()))
    table = pa.Table.from_arrays([columns[f.name] if f.name in columns else pa.array(scalars[f.name], f.type)
                                  for f in schema], schema=schema)
    if (n_resp == 0).any():
        table = table.filter(pa.array(n_resp > 0))
    quarantine.sort(key=lambda q: q["ordinal"])
    return IngestChunk(table, quarantine, len(rows))


def _row_chunks(entries: list[str], eval_entries: list[str], chunk_rows: int):
    """(rows, start ordinal, is_eval) per chunk, in input order; a chunk holds rows of one source entry."""
    start = 0
    for entry, is_eval in [(e, False) for e in entries] + [(e, True) for e in eval_entries]:
        rows: list[RawRow] = []
        for row in read_rows(entry):
            rows.append(row)
            if len(rows) == chunk_rows:
                yield rows, start, is_eval
                start, rows = start + len(rows), []
        if rows:
            yield rows, start, is_eval
            start += len(rows)


def ingest_chunks(entries: list[str], eval_entries: list[str], tokenizer, spec: IngestSpec, *,
                  chunk_rows: int = CHUNK_ROWS, workers: int = 1, progress: bool = False):
    """Processed chunks of the inputs, in input order, with at most about ``2 * workers`` chunks in memory.

    ``workers`` > 1 processes chunks as Ray tasks (the cluster the flow runs on, started
    here as a local one if none is), ``workers`` at a time plus as many queued; the
    results are taken back in input order, so the output does not depend on ``workers``.
    With 1 the chunks are processed here, each with one batch call of the tokenizer.
    """
    from tqdm.auto import tqdm

    if spec.template == "tulu" and tokenizer.eos_token is None:
        raise ValueError("tokenizer has no eos_token; the Tulu template ends every response with EOS")
    bar = tqdm(desc="ingest", disable=not progress, unit="row", unit_scale=True)
    chunks = _row_chunks(entries, eval_entries, chunk_rows)
    try:
        if workers <= 1:
            for rows, start, is_eval in chunks:
                out = process_chunk(rows, start, is_eval, tokenizer, spec)
                bar.update(out.n_read)
                yield out
            return
        import ray

        if not ray.is_initialized():
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        remote = ray.remote(num_cpus=1)(process_chunk)
        tok_ref = ray.put(tokenizer)
        pending: list = []
        for rows, start, is_eval in chunks:
            pending.append(remote.remote(rows, start, is_eval, tok_ref, spec))
            if len(pending) >= 2 * workers:
                out = ray.get(pending.pop(0))
                bar.update(out.n_read)
                yield out
        for ref in pending:
            out = ray.get(ref)
            bar.update(out.n_read)
            yield out
    finally:
        bar.close()


@dataclass
class IngestResult:
    samples: pa.Table
    quarantine: list[dict]
    n_read: int


def stage_inputs(con, entries: list[str], eval_entries: list[str], tokenizer, spec: IngestSpec, *,
                 chunk_rows: int = CHUNK_ROWS, workers: int = 1, progress: bool = False) -> int:
    """Stream the inputs into ``con``'s staging tables chunk by chunk, then quarantine duplicate ids.

    Returns the number of rows read. Memory holds about ``2 * workers`` chunks, whatever the input's size.
    A chunk is staged by a second thread while the next one is processed: DuckDB's insert
    runs without the GIL, so the two overlap (one chunk in flight, in input order).
    """
    from concurrent.futures import ThreadPoolExecutor

    from tokenclean.tasks import store

    store.stage_reset(con)
    n_read = 0
    with ThreadPoolExecutor(1, thread_name_prefix="ingest-stage") as stager:
        staged = None
        for chunk in ingest_chunks(entries, eval_entries, tokenizer, spec, chunk_rows=chunk_rows, workers=workers,
                                   progress=progress):
            if staged is not None:
                staged.result()
            staged = stager.submit(store.stage_chunk, con, chunk.samples, chunk.quarantine)
            n_read += chunk.n_read
        if staged is not None:
            staged.result()
    store.stage_duplicates(con)
    return n_read


def ingest(entries: list[str], eval_entries: list[str], tokenizer, *, max_length: int, eval_fraction: float,
           n_parts: int, seed: int, tokenization: str | None = None, progress: bool = False,
           template: str = "tulu", chunk_rows: int = CHUNK_ROWS, workers: int = 1) -> IngestResult:
    """Read, validate, render (``template``: tulu or model) and tokenise every row, in memory.

    The same code as the pipeline's streamed ingest (``stage_inputs``), staged in an
    in-memory DuckDB: for tests and small inputs that want the table itself.
    """
    import duckdb

    from tokenclean.tasks import store

    spec = IngestSpec(tokenization or tokenization_of(tokenizer, max_length, template), max_length, eval_fraction,
                      n_parts, seed, template)
    con = duckdb.connect()
    try:
        n_read = stage_inputs(con, entries, eval_entries, tokenizer, spec, chunk_rows=chunk_rows, workers=workers,
                              progress=progress)
        samples = store.staged_samples(con) if store.stage_summary(con)["samples"] else INGEST_SCHEMA.empty_table()
        return IngestResult(samples.cast(INGEST_SCHEMA), store.staged_quarantine(con), n_read)
    finally:
        con.close()
