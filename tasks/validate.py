"""Validate one SFT row: the reasons a row is quarantined, and the content hash that names a sample.

A bad row never stops a run: ``normalize`` raises ``RowError`` with the reason, and ingest writes
the row to the quarantine table with it. Accepted forms per row:

* ``{"messages": [{"role": "user"|"system"|"assistant"|"tool", "content": str}, ...]}``; an assistant
  message may carry its reasoning (``reasoning_content``, ``reasoning`` or ``thinking``) and ``tool_calls``
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
from typing import Any

from tokenclean.tasks.inputs import RowError
from tokenclean.tasks.template import (
    REASONING_FIELDS,
    ROLES,
    TRUTH_CORRUPTED,
    TRUTH_INFORMATIVE,
    Rendered,
    TemplateError,
)

try:  # transformers renders chat templates with jinja2; a template's raise_exception raises its TemplateError
    from jinja2.exceptions import TemplateError as _JinjaTemplateError

    _JINJA_ERRORS: tuple = (_JinjaTemplateError,)
except ImportError:  # pragma: no cover - jinja2 comes with transformers
    _JINJA_ERRORS = ()


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


def render_checked(render_one, norm: Normalized) -> tuple[Rendered, int]:
    """``norm`` rendered by the chat template (``render_one``: ``template.renderer``), and where the answer's last
    occurrence in the final response starts in the rendered text (-1: no answer). A template's refusal, or an
    answer the rendering does not keep, is the row's ``RowError``."""
    try:
        rendered = render_one(norm.messages, norm.truth)
    except TemplateError as e:
        raise RowError(str(e)) from e
    except _JINJA_ERRORS as e:  # the template's own raise_exception ("roles must alternate", ...)
        raise RowError(f"the chat template refuses the conversation: {e}") from e
    if norm.answer is None:
        return rendered, -1
    s, e = rendered.response_spans[-1]
    at = rendered.text.rfind(norm.answer, s, e)
    if at < 0:
        raise RowError("field 'answer' does not occur in the response as the template renders it "
                       "(the Tulu template strips surrounding whitespace)")
    return rendered, at
