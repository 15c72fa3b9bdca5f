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

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from tokenclean.tasks.template import (
    ROLES,
    TRUTH_CORRUPTED,
    TRUTH_INFORMATIVE,
    TemplateError,
    render,
    template_id,
    tokenize_rendered,
    tokenizer_fingerprint,
)

from tokenclean.tasks.keys import sample_id as content_sample_id
from tokenclean.tasks.keys import tokenization_key
from tokenclean.tasks.store.data import EVAL_PART  # noqa: F401  (re-exported: the held-out part)


class RowError(ValueError):
    """A row that cannot be used; the message is the quarantine reason."""


@dataclass
class RawRow:
    source: str
    index: int
    value: Any  # parsed object, or None when parsing failed
    raw: str
    error: str | None = None


def _read_jsonl(path: Path) -> Iterator[RawRow]:
    with path.open("rb") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield RawRow(str(path), i, None, line[:2000].decode("utf-8", "replace"), f"not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            try:
                yield RawRow(str(path), i, json.loads(text), text)
            except json.JSONDecodeError as e:
                yield RawRow(str(path), i, None, text[:2000], f"not JSON: {e.msg} at column {e.colno}")


def _read_table_rows(source: str, rows: Iterator[dict]) -> Iterator[RawRow]:
    for i, row in enumerate(rows):
        yield RawRow(source, i, row, json.dumps(row, default=str)[:2000])


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
    content_hash = hashlib.sha256(json.dumps({"messages": messages, "task": task, "answer": answer,
                                              "truth": sorted(truth)}, sort_keys=True).encode()).hexdigest()[:16]
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


@dataclass
class IngestResult:
    samples: pa.Table
    quarantine: list[dict]
    n_read: int


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


def ingest(entries: list[str], eval_entries: list[str], tokenizer, *, max_length: int, eval_fraction: float,
           n_parts: int, seed: int, tokenization: str | None = None, progress: bool = False,
           template: str = "tulu") -> IngestResult:
    """Read, validate, render (``template``: tulu or model) and tokenise every row; sample ids are keyed by
    ``tokenization``."""
    from tqdm.auto import tqdm

    tokenization = tokenization or tokenization_of(tokenizer, max_length, template)
    cols: dict[str, list] = {f.name: [] for f in INGEST_SCHEMA}
    quarantine: list[dict] = []
    seen: dict[str, str] = {}
    n_read = 0
    if template == "tulu" and tokenizer.eos_token is None:
        raise ValueError("tokenizer has no eos_token; the Tulu template ends every response with EOS")
    sources = [(e, False) for e in entries] + [(e, True) for e in eval_entries]
    for entry, is_eval in sources:
        for row in tqdm(read_rows(entry), desc=f"ingest {Path(entry).name}", disable=not progress, unit="row"):
            n_read += 1
            try:
                if row.error:
                    raise RowError(row.error)
                norm = normalize(row.value)
                if norm.uid in seen:
                    raise RowError(f"duplicate id {norm.uid!r} (first seen in {seen[norm.uid]})")
                try:
                    rendered = render(template, tokenizer, norm.messages, norm.truth)
                except TemplateError as e:
                    raise RowError(str(e)) from e
                tok = tokenize_rendered(tokenizer, rendered, max_length)
                n_resp = int(tok.response_mask.sum())
                if n_resp == 0:
                    raise RowError(f"no response token within max_length={max_length} (prompt too long)")
            except RowError as e:
                quarantine.append({"source": row.source, "row_index": row.index, "reason": str(e), "raw": row.raw})
                continue
            seen[norm.uid] = f"{row.source}:{row.index}"
            a_start = a_end = -1
            if norm.answer is not None:
                # Token span of the answer's last occurrence in the final response.
                lo, hi = rendered.response_spans[-1]
                c0 = rendered.text.rfind(norm.answer, lo, hi)
                idx = tok.tokens_in(c0, c0 + len(norm.answer))
                if len(idx) and tok.response_mask[idx].all():
                    a_start, a_end = int(idx[0]), int(idx[-1]) + 1
            cols["sample_id"].append(content_sample_id(tokenization, norm.uid, norm.content_hash))
            cols["tokenization"].append(tokenization)
            cols["uid"].append(norm.uid)
            cols["source"].append(source_name(row.source))
            cols["row_index"].append(row.index)
            cols["part"].append(assign_part(norm.uid, seed, eval_fraction, n_parts, is_eval))
            cols["task"].append(norm.task)
            cols["answer"].append(norm.answer)
            cols["content_hash"].append(norm.content_hash)
            cols["n_tokens"].append(len(tok.input_ids))
            cols["n_response"].append(n_resp)
            cols["truncated"].append(tok.truncated)
            cols["answer_start"].append(a_start)
            cols["answer_end"].append(a_end)
            cols["input_ids"].append(tok.input_ids.tolist())
            cols["response_mask"].append(tok.response_mask.tolist())
            cols["truth"].append(tok.truth.tolist() if tok.truth is not None else None)
            cols["text"].append(rendered.text)
            cols["char_start"].append(tok.char_starts.tolist())
            cols["char_end"].append(tok.char_ends.tolist())
    return IngestResult(pa.table(cols, schema=INGEST_SCHEMA), quarantine, n_read)
