"""Read SFT rows from JSONL / Parquet / HF datasets, validate, render, tokenise.

A bad row never stops a run: it is written to the quarantine table with the reason,
and the run summary counts it. Accepted forms per row:

* ``{"messages": [{"role": "user"|"system"|"assistant"|"tool", "content": str}, ...]}``; an assistant
  message may carry its reasoning (``reasoning_content``, ``reasoning`` or ``thinking``) and ``tool_calls``
* ``{"prompt": str, "response": str}``

Optional fields: ``id`` (unique; else the content hash), ``task`` (for per-task
metrics), ``answer`` (a substring of the last response, scored by the task metric),
``informative_spans`` / ``corrupted_spans`` (``[[start, end], ...]`` character spans of
the last response: ground-truth token labels, as the synthetic demo data carries).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from tokenclean.tasks.inputs import RAW_CHARS, RawRow, RowError, Split, entry_files, plan_inputs, read_split
from tokenclean.tasks.template import (
    REASONING_FIELDS,
    ROLES,
    TRUTH_CORRUPTED,
    TRUTH_INFORMATIVE,
    TemplateError,
    renderer,
    template_id,
    tokenize_batch,
    tokenizer_fingerprint,
)

try:  # transformers renders chat templates with jinja2; a template's raise_exception raises its TemplateError
    from jinja2.exceptions import TemplateError as _JinjaTemplateError

    _JINJA_ERRORS: tuple = (_JinjaTemplateError,)
except ImportError:  # pragma: no cover - jinja2 comes with transformers
    _JINJA_ERRORS = ()

from tokenclean.tasks.keys import sample_id as content_sample_id
from tokenclean.tasks.keys import tokenization_key
from tokenclean.tasks.store.data import EVAL_PART, STAGE_Q_SCHEMA  # noqa: F401  (EVAL_PART re-exported)


def _check_text(v: str, what: str) -> str:
    """A string that Arrow and the tokenizer can take: no lone surrogates (JSON's ``"\ud800"``), which no
    UTF-8 encoder accepts and which would otherwise fail the whole chunk's tokenizer call."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RowError(f"{what} is not valid Unicode ({e.reason} at character {e.start})") from None
    return v


def _require_str(obj: dict, key: str) -> str:
    v = obj.get(key)
    if v is None:
        raise RowError(f"missing field '{key}'")
    if not isinstance(v, str):
        raise RowError(f"field '{key}' must be a string, got {type(v).__name__}")
    return _check_text(v, f"field '{key}'")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _spans(obj: dict, key: str, limit: int) -> list[tuple[int, int]]:
    """``[[start, end], ...]`` character offsets into the response: integers, never coerced (3.9 is not 3)."""
    v = obj.get(key)
    if v is None:
        return []
    if not isinstance(v, (list, tuple)) or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and _is_int(p[0]) and _is_int(p[1]) for p in v):
        raise RowError(f"field '{key}' must be a list of [start, end] integer pairs")
    spans = [(int(s), int(e)) for s, e in v]
    for s, e in spans:
        if not 0 <= s < e <= limit:
            raise RowError(f"field '{key}': span [{s}, {e}] outside the response (length {limit})")
    return spans


_quote = json.encoder.encode_basestring_ascii  # the standard encoder's own string quoting (C)


def _tool_calls(v, where: str) -> list[dict]:
    """An assistant's ``tool_calls`` as OpenAI / transformers write them: ``[{"type": "function", "function":
    {"name": str, "arguments": dict | str}}, ...]`` (or ``{"name", "arguments"}`` directly), kept as given."""
    if not isinstance(v, list):
        raise RowError(f"{where} must be a list, got {type(v).__name__}")
    for k, call in enumerate(v):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RowError(f"{where}[{k}] must be an object with a function name (\"function\": {{\"name\": ...}})")
        _check_text(fn["name"], f"{where}[{k}].name")
        args = fn.get("arguments")
        if args is not None and not isinstance(args, (dict, str)):
            raise RowError(f"{where}[{k}].arguments must be an object or a JSON string")
    return v


def _message(m, j: int) -> dict:
    """One message, validated: role and content; an assistant's reasoning (under any of
    ``template.REASONING_FIELDS``, kept as ``reasoning``) and ``tool_calls``; a tool message's
    ``name`` / ``tool_call_id``. An assistant message with tool calls may have null content."""
    if not isinstance(m, dict):
        raise RowError(f"messages[{j}] must be an object")
    role = m.get("role")
    if role not in ROLES:
        raise RowError(f"messages[{j}].role must be one of {ROLES}, got {role!r}")
    content = m.get("content")
    null = content is None and role == "assistant" and bool(m.get("tool_calls"))
    if not null and not isinstance(content, str):
        raise RowError(f"messages[{j}].content must be a string, got {type(content).__name__}")
    out = {"role": role, "content": "" if null else _check_text(content, f"messages[{j}].content")}
    if null:  # passed to the template as null: some templates test for it (DeepSeek-V3's tool calls)
        out["null_content"] = True
    if role == "assistant":
        given = [f for f in REASONING_FIELDS if m.get(f) is not None]
        if len(given) > 1:
            raise RowError(f"messages[{j}] has reasoning in both {given[0]!r} and {given[1]!r}")
        if given:
            r = m[given[0]]
            if not isinstance(r, str):
                raise RowError(f"messages[{j}].{given[0]} must be a string, got {type(r).__name__}")
            out["reasoning"] = _check_text(r, f"messages[{j}].{given[0]}")
        if m.get("tool_calls"):
            out["tool_calls"] = _tool_calls(m["tool_calls"], f"messages[{j}].tool_calls")
    elif role == "tool":
        for k in ("name", "tool_call_id"):
            if m.get(k) is not None:
                if not isinstance(m[k], str):
                    raise RowError(f"messages[{j}].{k} must be a string")
                out[k] = _check_text(m[k], f"messages[{j}].{k}")
    return out


def content_text(messages: list[dict], task: str | None, answer: str | None, truth: list[tuple[int, int, int]]) -> str:
    """The canonical JSON of a sample's content: exactly ``json.dumps({"messages": messages, "task": task,
    "answer": answer, "truth": sorted(truth)}, sort_keys=True)``, whose hash names the sample.

    Written out because the generic encoder (sorting every dict's keys, a call per
    value) was half of a row's validation time; the text, and so every sample id, is
    unchanged (``tests/test_ingest.py`` compares the two).
    """
    msgs = ", ".join(f'{{"content": {_quote(m["content"])}, "role": {_quote(m["role"])}}}' if len(m) == 2
                     else json.dumps(m, sort_keys=True) for m in messages)  # reasoning, tool calls: rare
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
    if obj.get("messages") is not None:  # a null column (Parquet / datasets rows of the other form) is absent
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise RowError("field 'messages' must be a non-empty list")
        messages = [_message(m, j) for j, m in enumerate(msgs)]
        assistants = [m for m in messages if m["role"] == "assistant"]
        if not assistants:
            raise RowError("no assistant message: nothing to train on")
        if messages[-1]["role"] != "assistant":
            raise RowError("last message must be the assistant's response")
    elif obj.get("prompt") is not None or obj.get("response") is not None:
        prompt, response = _require_str(obj, "prompt"), _require_str(obj, "response")
        if not prompt.strip():
            raise RowError("empty or whitespace-only prompt")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    else:
        raise RowError("row has neither 'messages' nor 'prompt'/'response'")
    last = messages[-1]["content"]
    if not (last.strip() or (messages[-1].get("reasoning") or "").strip() or messages[-1].get("tool_calls")):
        raise RowError("empty or whitespace-only response")
    informative, corrupted = _spans(obj, "informative_spans", len(last)), _spans(obj, "corrupted_spans", len(last))
    for s, e in informative:
        for cs, ce in corrupted:
            if s < ce and cs < e:
                raise RowError(f"informative span [{s}, {e}] overlaps corrupted span [{cs}, {ce}]")
    truth = [(s, e, TRUTH_INFORMATIVE) for s, e in informative] + [(s, e, TRUTH_CORRUPTED) for s, e in corrupted]
    answer = obj.get("answer")
    if answer is not None:
        if not isinstance(answer, str) or not answer.strip():
            raise RowError("field 'answer' must be a non-empty string")
        if answer not in last:
            raise RowError("field 'answer' does not occur in the response")
        _check_text(answer, "field 'answer'")
    task = obj.get("task")
    if task is not None:
        if not isinstance(task, str):
            raise RowError("field 'task' must be a string")
        _check_text(task, "field 'task'")
    # Everything that shapes the stored sample (its tokens, labels, answer span, task) is
    # hashed: an edit to any of them makes a new sample, never a stale one.
    content_hash = hashlib.sha256(content_text(messages, task, answer, truth).encode()).hexdigest()[:16]
    uid = obj.get("id")
    if uid is None:
        uid = content_hash
    elif isinstance(uid, bool) or not isinstance(uid, (str, int)):
        raise RowError(f"field 'id' must be a string or integer, got {type(uid).__name__}")
    elif isinstance(uid, str):
        _check_text(uid, "field 'id'")
    return Normalized(messages, str(uid), task, answer, truth, content_hash)


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
        ("reasoning_mask", pa.list_(pa.bool_())),  # targets of the model's reasoning (data.template: model)
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


# What ingest derives from a row besides its tokens (which rows it refuses, the answer span): a change to
# these rules makes new sample ids, since stored samples are immutable and found by id.
# 2: strict spans, invalid Unicode / template refusals / answers the template strips quarantined, answers cut by
# truncation get no span. 3: tool messages, tool calls and reasoning fields accepted (the Tulu template refuses
# them with the reason), assistant null content with tool calls.
INGEST_RULES = 3


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


# A staged sample: ``INGEST_SCHEMA`` plus what staging needs to find duplicate ids in input order.
STAGE_SCHEMA = INGEST_SCHEMA.append(pa.field("ordinal", pa.int64())).append(pa.field("source_path", pa.string())) \
    .append(pa.field("raw", pa.string()))


@dataclass
class IngestChunk:
    """One chunk of input rows, processed: its samples (``STAGE_SCHEMA``) and its quarantined rows."""

    samples: pa.Table
    quarantine: list[dict]
    reasoning_dropped: int = 0  # assistant turns of its samples whose reasoning the template does not render


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


def _process_chunk(rows: list[RawRow], is_eval: bool, tokenizer, spec: IngestSpec,
                   is_warmup: bool = False) -> IngestChunk:
    good, quarantine = [], []
    render_one = renderer(spec.template, tokenizer, spec.empty_think)
    for row in rows:
        try:
            norm = normalize(row.parsed())
            try:
                rendered = render_one(norm.messages, norm.truth)
            except TemplateError as e:
                raise RowError(str(e)) from e
            except _JINJA_ERRORS as e:  # the template's own raise_exception ("roles must alternate", ...)
                raise RowError(f"the chat template refuses the conversation: {e}") from e
            # the answer's last occurrence in the final response, as rendered (-1: no answer)
            c0 = -1
            if norm.answer is not None:
                s, e = rendered.response_spans[-1]
                c0 = rendered.text.rfind(norm.answer, s, e)
                if c0 < 0:
                    raise RowError("field 'answer' does not occur in the response as the template renders it "
                                   "(the Tulu template strips surrounding whitespace)")
            good.append((row, norm, rendered, c0))
        except RowError as e:
            quarantine.append({"ordinal": row.ordinal, "source": row.source, "row_index": row.index,
                               "reason": str(e), "raw": row.raw})
    toks = tokenize_batch(tokenizer, [g[2] for g in good], spec.max_length)
    n = len(good)
    n_resp = toks.n_response
    # the answer's token span: tokens anchored in its last occurrence in the final response, all of them targets
    lo, hi = np.zeros(n, np.int64), np.zeros(n, np.int64)
    for i, (_, norm, _, c0) in enumerate(good):
        if norm.answer is not None:
            lo[i], hi[i] = c0, c0 + len(norm.answer)
    a_first, a_end, a_ok = toks.first_last_in(lo, hi)
    # an answer truncation cut short has no span: its kept tokens are not the answer
    a_ok &= hi <= toks.kept_char_end()
    a_start, a_end = np.where(a_ok, a_first, -1), np.where(a_ok, a_end, -1)
    scalars: dict[str, list] = {c: [] for c in ("sample_id", "uid", "source", "row_index", "part", "task", "answer",
                                               "content_hash", "text", "ordinal", "source_path", "raw")}
    for (row, norm, rendered, _), nr in zip(good, n_resp.tolist()):
        if nr == 0:
            quarantine.append({"ordinal": row.ordinal, "source": row.source, "row_index": row.index,
                               "reason": f"no response token within max_length={spec.max_length} (prompt too long)",
                               "raw": row.raw})
        scalars["sample_id"].append(content_sample_id(spec.tokenization, norm.uid, norm.content_hash))
        scalars["uid"].append(norm.uid)
        scalars["source"].append(source_name(row.source))
        scalars["row_index"].append(row.index)
        scalars["part"].append(assign_part(norm.uid, spec.seed, spec.eval_fraction, spec.n_parts, is_eval,
                                                   is_warmup if spec.warmup else None))
        scalars["task"].append(norm.task)
        scalars["answer"].append(norm.answer)
        scalars["content_hash"].append(norm.content_hash)
        scalars["text"].append(rendered.text)
        scalars["ordinal"].append(row.ordinal)
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
        "reasoning_mask": _list_column(toks.offsets, toks.reasoning, pa.bool_()),
    }
    table = pa.Table.from_arrays([columns[f.name] if f.name in columns else pa.array(scalars[f.name], f.type)
                                  for f in STAGE_SCHEMA], schema=STAGE_SCHEMA)
    if (n_resp == 0).any():
        table = table.filter(pa.array(n_resp > 0))
    quarantine.sort(key=lambda q: q["ordinal"])
    dropped = sum(g[2].reasoning_dropped for g, nr in zip(good, n_resp.tolist()) if nr > 0)
    return IngestChunk(table, quarantine, dropped)


# Input bytes per split: about SPLITS_PER_WORKER splits for each worker, within SPLIT_BYTES. A split is the
# unit of work (one Ray task), of retry and of resume; its size bounds nothing in memory (it is processed
# CHUNK_ROWS rows at a time), so it can be large enough that a task's fixed cost does not matter.
SPLIT_BYTES = (1 << 20, 64 << 20)
SPLITS_PER_WORKER = 4
# What the parts of a split layout are computed with, besides the spec: bump when process_split's output changes.
PARTS_VERSION = 5  # 2: INGEST_RULES 2; 3: inputs.READ_RULES 2; 4: INGEST_RULES 3; 5: reasoning_mask


def split_bytes_for(entries: list[str], eval_entries: list[str], workers: int) -> int:
    """About ``SPLITS_PER_WORKER`` splits per worker over the input files' total size, within ``SPLIT_BYTES``."""
    total = sum(Path(f).stat().st_size for e in [*entries, *eval_entries] for f in entry_files(e)
                if not f.startswith("hf:"))
    lo, hi = SPLIT_BYTES
    return max(lo, min(hi, -(-total // max(1, workers * SPLITS_PER_WORKER))))


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
        # the count travels in the quarantine file's footer, so a resumed ingest reads it back (_finished_part)
        storage.write_parquet(pa.Table.from_pylist(quarantine, STAGE_Q_SCHEMA)
                              .replace_schema_metadata({"reasoning_dropped": str(dropped)}), quarantine_path)
    return {"split": split.number, "samples": samples_path, "quarantine": quarantine_path, "n_samples": n_samples,
            "n_quarantined": len(quarantine), "reasoning_dropped": dropped, "seconds": time.perf_counter() - t0,
            "node": where()["node"]}


def _finished_part(parts_dir: str, split: Split) -> dict | None:
    """The result of a part an earlier, interrupted ingest completed (its samples file exists), else None."""
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


def _run_splits(splits: list[Split], tokenizer, spec: IngestSpec, parts_dir: str, chunk_rows: int,
                workers: int) -> Iterator[dict]:
    """Each split's result as it completes: parts already written first, then the rest, processed here
    (``workers`` = 1) or as Ray tasks, ``workers`` at a time (the flow's cluster; a local one if none)."""
    todo = []
    for split in splits:
        done = _finished_part(parts_dir, split)
        if done is not None:
            yield done
        else:
            todo.append(split)
    if workers <= 1:
        for split in todo:
            yield process_split(split, tokenizer, spec, parts_dir, chunk_rows)
        return
    from tokenclean.tasks.cluster import connected

    with connected(None, workers, log_to_driver=False):  # the flow's cluster; a local one if none
        yield from _run_on_ray(todo, tokenizer, spec, parts_dir, chunk_rows, workers)


def _run_on_ray(todo: list[Split], tokenizer, spec: IngestSpec, parts_dir: str, chunk_rows: int,
                workers: int) -> Iterator[dict]:
    import ray

    # spread, as Ray Data places its read tasks: a split reads as much as it computes, and each node
    # brings its own disks and network
    remote = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(process_split)
    tokenizer_ref = ray.put(tokenizer)
    pending: list = []
    while todo or pending:
        while todo and len(pending) < workers:
            pending.append(remote.remote(todo.pop(0), tokenizer_ref, spec, parts_dir, chunk_rows))
        ready, pending = ray.wait(pending, num_returns=1)
        yield ray.get(ready[0])


def _local_part(result: dict, key: str, local_dir: str | None) -> str:
    """A part file as a local path DuckDB can read: where it lies, or copied from object storage to ``local_dir``."""
    from tokenclean.tasks import storage

    path = result[key]
    storage.require_visible(path, f"ingest: split {result['split']} ({key})", result["node"])
    local = storage.local_path(path)
    if local is not None:
        return local
    if local_dir is None:
        raise ValueError(f"ingest parts in {path} need a local directory to be read from (local_dir)")
    return storage.fetch(path, storage.join(local_dir, path.rsplit("/", 1)[1]))


def stage_inputs(con, entries: list[str], eval_entries: list[str], tokenizer, spec: IngestSpec, *, parts_dir: str,
                 local_dir: str | None = None, chunk_rows: int = CHUNK_ROWS, split_bytes: int | None = None,
                 workers: int = 1, progress: bool = False, warmup_entries: list[str] = ()) -> dict:
    """Ingest the inputs into parts under ``parts_dir`` and stage them on ``con``, then quarantine duplicate ids.

    The inputs are planned into splits (``tasks/inputs.py``); each split is processed
    (``process_split``: here, or on Ray workers that read the input files themselves) into a
    part of Parquet files under ``parts_dir`` (a local path, or an fsspec URL whose parts
    are copied to ``local_dir`` as they complete). The parts are the staging:
    ``store.stage_parts`` puts views over them and ``store.insert_staged_dataset`` reads them
    once, in SQL. Rows carry their input-wide ordinal, so the order in which parts complete
    changes nothing. The driver holds no rows: its memory does not grow with the input, and
    neither does a worker's (one chunk at a time).

    ``parts_dir`` must be named by the inputs' content (``prepare`` uses the dataset key):
    under it, parts are keyed by the spec and the split layout, so an interrupted ingest
    resumes from the parts it finished. Returns the rows read, the splits processed and reused,
    the nodes that processed them (``placement``) and the files not read, each with why (``skipped``).
    """
    from dataclasses import asdict

    from tqdm.auto import tqdm

    from tokenclean.tasks import store
    from tokenclean.tasks.keys import digest
    from tokenclean.tasks.storage import join

    if spec.template == "tulu" and tokenizer.eos_token is None:
        raise ValueError("tokenizer has no eos_token; the Tulu template ends every response with EOS")
    if bool(warmup_entries) != spec.warmup:
        raise ValueError("spec.warmup must say whether warm-up inputs are given")
    plan = plan_inputs(entries, eval_entries, split_bytes or split_bytes_for([*entries, *warmup_entries], eval_entries, workers), list(warmup_entries))
    splits = plan.splits
    layout = digest("ingest-parts", PARTS_VERSION, asdict(spec), [s.describe() for s in splits])
    parts_dir, local_dir = join(parts_dir, layout), local_dir and join(local_dir, layout)
    n_read = reused = dropped = 0
    samples, quarantine, nodes = {}, {}, set()
    with tqdm(total=len(splits), desc="ingest", disable=not progress, unit="split") as bar:
        for result in _run_splits(splits, tokenizer, spec, parts_dir, chunk_rows, workers):
            samples[result["split"]] = _local_part(result, "samples", local_dir)
            quarantine[result["split"]] = _local_part(result, "quarantine", local_dir)
            n_read += result["n_samples"] + result["n_quarantined"]
            reused += bool(result.get("reused"))
            dropped += result["reasoning_dropped"]
            if result["node"] is not None:
                nodes.add(result["node"])
            bar.update(1)
            bar.set_postfix(rows=f"{n_read:,}")
    if splits:
        store.stage_parts(con, [samples[s.number] for s in splits], [quarantine[s.number] for s in splits])
    else:
        store.stage_parts(con, STAGE_SCHEMA.empty_table(), STAGE_Q_SCHEMA.empty_table())
    store.stage_duplicates(con)
    return {"rows_read": n_read, "splits": len(splits), "splits_reused": reused, "reasoning_dropped": dropped,
            "placement": [{"node": node} for node in sorted(nodes)], "skipped": plan.skipped}


@dataclass
class IngestResult:
    samples: pa.Table
    quarantine: list[dict]
    n_read: int
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # files not read -> why
    reasoning_dropped: int = 0  # assistant turns of the samples whose reasoning the template does not render


def ingest(entries: list[str], eval_entries: list[str], tokenizer, *, max_length: int, eval_fraction: float,
           n_parts: int, seed: int, tokenization: str | None = None, progress: bool = False,
           template: str = "tulu", chunk_rows: int = CHUNK_ROWS, workers: int = 1,
           split_bytes: int | None = None, warmup_entries: list[str] = (),
           empty_think: str = "target") -> IngestResult:
    """Read, validate, render (``template``: tulu or model) and tokenise every row, in memory.

    The same code as the pipeline's streamed ingest (``stage_inputs``), staged in an
    in-memory DuckDB with its parts in a temporary directory: for tests and small inputs
    that want the table itself.
    """
    import tempfile

    import duckdb

    from tokenclean.tasks import store

    spec = IngestSpec(tokenization or tokenization_of(tokenizer, max_length, template, empty_think), max_length,
                      eval_fraction, n_parts, seed, template, warmup=bool(warmup_entries), empty_think=empty_think)
    con = duckdb.connect()
    try:
        with tempfile.TemporaryDirectory(prefix="tokenclean-ingest-") as parts:
            read = stage_inputs(con, entries, eval_entries, tokenizer, spec, parts_dir=parts, chunk_rows=chunk_rows,
                                split_bytes=split_bytes, workers=workers, progress=progress,
                                warmup_entries=warmup_entries)
            samples = store.staged_samples(con) if store.stage_summary(con)["samples"] else INGEST_SCHEMA.empty_table()
            quarantine = store.staged_quarantine(con)
            store.stage_reset(con)
        return IngestResult(samples.cast(INGEST_SCHEMA), quarantine, read["rows_read"], read["skipped"],
                            read["reasoning_dropped"])
    finally:
        con.close()
