"""Chat templates (Tulu, or the model's own) and the prompt/response token mask.

Two templates (``data.template``):

* ``tulu`` (default, as in the paper): open-instruct's ``<|user|>\n...`` format, rendered
  here, so the response spans are known by construction.
* ``model``: the tokenizer's own Jinja chat template (``apply_chat_template``), for a
  Llama-3, Qwen3, Mistral... model used as its users prompt it, reasoning and tool calls
  included. The rule: targets are exactly what the model generates in an assistant turn,
  from the end of the generation prompt to its end-of-turn token (reasoning, content, tool
  calls). Where the template has ``{% generation %}`` markers they are followed exactly;
  else the turns are found by rendering once more with each generated piece replaced by a
  unique mark and aligning the two texts. No template is assumed to be prefix-stable
  (Mistral's moves the system prompt into the last user turn; Qwen3's drops earlier
  reasoning), because both renderings are of the whole conversation. Reasoning a template
  drops is counted (``Rendered.reasoning_dropped``); a template that rewrites or drops
  what the model generates is refused per row with the reason, never silently mis-masked.
  The ids are the template's text tokenised as ``apply_chat_template`` does: no BOS is added to
  what the template writes (gpt-oss's renders none, and its model is served without one).
  Conventions where families differ: ``empty_think`` (``data.empty_think``), and README
  "Tokenisation rule".

The mask is derived from character offsets of one tokenisation of the whole rendered
text. Tokenising prompt and response separately and concatenating gives different ids
at the boundary whenever BPE would merge across it, which silently misaligns labels.

Rule (documented in README): a token belongs to a span iff its *anchor* lies inside it;
the anchor is the token's first non-whitespace character (its first character if it is
all whitespace). Byte-level BPE glues the preceding space onto a word (" Paris"), so
the raw start offset would assign a word to whatever precedes it. A token is a
response (target) token iff its anchor lies in a target span (Tulu: an assistant turn's content,
its EOS and the newline after it, as open-instruct trains them). Tokens past
``max_length`` are dropped (prefix kept); a sample left with no response token is
rejected by ingest.
"""
from __future__ import annotations

import collections
import contextlib
import datetime
import hashlib
import re
from dataclasses import dataclass, field
from itertools import chain

import numpy as np

from tokenclean.tasks.versions import MODEL_TEMPLATE_RULE, TEMPLATE_NAME

TEMPLATES = ("tulu", "model")
ROLES = ("system", "user", "assistant", "tool")
# Ground-truth token labels, used only when the input carries them (synthetic demo data).
TRUTH_OTHER, TRUTH_INFORMATIVE, TRUTH_CORRUPTED = 0, 1, 2


@dataclass
class Rendered:
    text: str
    response_spans: list[tuple[int, int]]  # [start, end) in text: what each assistant turn generates, its EOS
    truth_spans: list[tuple[int, int, int]] = field(default_factory=list)  # (start, end, label)
    reasoning_dropped: int = 0  # assistant turns whose reasoning the template does not render (counted, not lost)
    add_bos: bool = True  # tokenisation prepends a BOS where the text does not start with one (Tulu; not a template)
    reasoning_spans: list[tuple[int, int]] = field(default_factory=list)  # the model's reasoning as rendered


# The same text as ``render_tulu``, as a Jinja chat template: written into exported tokenizers so that
# ``apply_chat_template`` at serving time reproduces what a Tulu-trained model saw (the generation prompt
# follows the last message's newline; open-instruct's final strip only trims a training text's end).
TULU_JINJA = ("{% if bos_token %}{{ bos_token }}{% endif %}"  # ingest puts BOS first wherever the tokenizer has one
              "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' }}"
              "{% if message['role'] == 'assistant' %}{{ message['content'] | trim + eos_token + '\n' }}"
              "{% else %}{{ message['content'] | trim + '\n' }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


def render_tulu(messages: list[dict], eos: str, truth: list[tuple[int, int, int]] | None = None) -> Rendered:
    """Render as open-instruct's ``encode_with_messages_format`` (the paper's official code) does.

    Text: ``<|role|>\n`` + the content stripped + ``\n`` per message, the assistant's
    content followed by EOS before its newline; the whole text stripped (no final
    newline). Targets: what open-instruct does not mask, i.e. each assistant turn's
    content, its EOS and the newline after it (only the other messages and the
    ``<|assistant|>\n`` header are masked there; the last turn's newline is stripped).

    ``truth`` spans are relative to the *last* assistant message's raw content; they
    follow its stripping.
    """
    parts: list[str] = []
    pos = 0
    spans: list[tuple[int, int]] = []
    last = None  # (start of the last assistant content in the text, its leading whitespace, its stripped length)
    for m in messages:
        role, raw = m["role"], m["content"]
        content = raw.strip()
        header = f"<|{role}|>\n"
        parts.append(header)
        pos += len(header)
        body = content + eos + "\n" if role == "assistant" else content + "\n"
        if role == "assistant":
            spans.append((pos, pos + len(body)))
            last = (pos, len(raw) - len(raw.lstrip()), len(content))
        parts.append(body)
        pos += len(body)
    text = "".join(parts).strip()
    spans = [(a, min(b, len(text))) for a, b in spans]
    truth_abs = []
    if truth and last is not None:
        start, lead, n = last
        for s, e, lab in truth:
            lo, hi = min(max(s - lead, 0), n), min(max(e - lead, 0), n)
            if hi > lo:
                truth_abs.append((start + lo, start + hi, lab))
    return Rendered(text, spans, truth_abs)


class TemplateError(ValueError):
    """A conversation whose response spans cannot be located in the template's text."""


def chat_template_of(tokenizer) -> str:
    """The tokenizer's default chat template text; a clear error when it has none."""
    try:
        template = tokenizer.get_chat_template()
    except ValueError as e:
        raise ValueError(f"data.template: model, but the tokenizer has no chat template ({e}). Use data.template: "
                         "tulu, or a tokenizer whose tokenizer_config.json / chat_template.jinja carries one") from e
    return template


def template_id(tokenizer, template: str, empty_think: str = "target") -> str:
    """What the tokenization key records of a template: its name, or the model template's text hash."""
    if template == "tulu":
        return TEMPLATE_NAME
    if template == "model":
        text = chat_template_of(tokenizer)
        return f"model:{hashlib.sha256(text.encode()).hexdigest()[:16]}:{MODEL_TEMPLATE_RULE}:think-{empty_think}"
    raise ValueError(f"unknown template {template!r}; choose from {TEMPLATES}")


_MARK = re.compile("\ue000(\\d+)\ue001")  # private-use code points: never in real text's assistant turns
# The reasoning fields reasoning datasets use; a row's reasoning is passed to the template under the name the
# template reads (Qwen3 / DeepSeek: reasoning_content, gpt-oss: thinking).
REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")
_THINK_TAGS = re.compile("(<think>|</think>)")
# Conventions where families differ (README, "Tokenisation rule"); part of a model template's key.
# ``data.empty_think``: the empty think block a template renders for a turn without reasoning (Qwen3's
# "<think>\n\n</think>\n\n") is a target (default: a model served with thinking on, the template's default,
# generates it itself) or prompt (served with enable_thinking=False, the server writes it).
EMPTY_THINK = ("target", "prompt")


def _special_strings(tokenizer) -> list[str]:
    """Special tokens as they appear in text, longest first (so ``<|eot_id|>`` wins over a prefix of it)."""
    specials = set(tokenizer.all_special_tokens)
    for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(tok, "special", False):
            specials.add(str(tok))
    return sorted((t for t in specials if t), key=len, reverse=True)


@dataclass
class _Field:
    """A piece of an assistant turn the model generates, replaced by a mark in the skeleton rendering."""

    turn: int  # index among the assistant turns
    kind: str  # content | reasoning | tool
    raw: str  # as given
    raw_start: int = -1  # offset in the raw content (content segments), else -1
    before: str = ""  # the raw content before it (content segments): think tags and whitespace


def _trims(c: str):
    """``c`` and its whitespace-trimmed variants, least trimmed first (``| trim``, Qwen3's ``lstrip('\\n')``...):
    (candidate, characters trimmed at the start)."""
    lead = len(c) - len(c.lstrip())
    trail = len(c) - len(c.rstrip())
    if lead + trail > 64:  # bounded: a long whitespace run is tried untrimmed or fully trimmed only
        cands = [(0, 0), (lead, 0), (0, trail), (lead, trail)]
    else:
        cands = sorted(((a, b) for a in range(lead + 1) for b in range(trail + 1) if a + b <= len(c)),
                       key=lambda ab: ab[0] + ab[1])
    for a, b in dict.fromkeys(cands):
        yield c[a:len(c) - b], a


def _aligned(text: str, skeleton: str, fields: list[_Field]) -> dict[int, tuple[int, int, int]]:
    """Where each field rendered: field index -> (start, end, characters trimmed at its start), from the
    skeleton (the conversation rendered with field i replaced by mark i). The literal pieces between marks
    must match ``text`` exactly; a field may be rendered as is or whitespace-trimmed; anything else is a
    TemplateError. A field the template does not render is absent from the result."""
    pieces = _MARK.split(skeleton)  # literal, index, literal, index, ..., literal
    literals, order = pieces[0::2], [int(i) for i in pieces[1::2]]
    # a tool call name may render again as context (gpt-oss's tool response header): the first is the call;
    # content or reasoning rendered twice leaves unknown which one the model generated
    if any(n > 1 and fields[i].kind != "tool" for i, n in collections.Counter(order).items()):
        raise TemplateError("the chat template repeats an assistant message; cannot locate the responses")
    found: dict[int, tuple[int, int, int]] = {}
    cur = 0
    for n, idx in enumerate(order):
        if not text.startswith(literals[n], cur):
            raise TemplateError("the chat template renders the text around assistant turns differently from "
                                "turn to turn; cannot locate the responses")
        cur += len(literals[n])
        nxt = literals[n + 1]
        last = n + 1 == len(order)
        for cand, lead in _trims(fields[idx].raw):
            end = cur + len(cand)
            if text.startswith(cand, cur) and (text[end:] == nxt if last else text.startswith(nxt, end)):
                found.setdefault(idx, (cur, end, lead))
                cur = end
                break
        else:
            what = {"content": "content", "reasoning": "reasoning", "tool": "tool call name"}[fields[idx].kind]
            raise TemplateError(f"the chat template rewrites the {what} of assistant turn {fields[idx].turn + 1} "
                                "(beyond trimming whitespace); cannot locate it")
    if not text.startswith(literals[-1], cur) or cur + len(literals[-1]) != len(text):
        raise TemplateError("the chat template renders the text around assistant turns differently from turn to "
                            "turn; cannot locate the responses")
    return found


# A chat template that prints today's date (Llama-3.1/3.2: "Today Date: 26 Jul 2024") would make a sample's
# tokens depend on the day it was ingested, under one key: templates render with this fixed date instead,
# given as ``date_string`` (the variable those templates read first) and as the clock of ``strftime_now``.
FIXED_DATE = datetime.datetime(2024, 7, 26)


class _FixedClock(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls.fromtimestamp(FIXED_DATE.timestamp(), tz)


@contextlib.contextmanager
def _fixed_clock(template: str):
    """transformers' ``strftime_now`` reads ``datetime.now()`` of its module at call time: point that at
    ``FIXED_DATE`` while rendering. Templates calling it are refused where that cannot be done."""
    if "strftime_now" not in template:
        yield
        return
    from transformers.utils import chat_template_utils as ctu

    if getattr(ctu, "datetime", None) is not datetime.datetime:
        raise TemplateError("the chat template prints the current date (strftime_now), which this transformers "
                            "version does not let ingest fix; a sample would change with the day it is ingested")
    ctu.datetime = _FixedClock
    try:
        yield
    finally:
        ctu.datetime = datetime.datetime


def _template_messages(messages: list[dict], reasoning_field: str | None) -> list[dict]:
    """Messages as the template reads them: reasoning under the field name the template uses."""
    out = []
    for m in messages:
        d = {k: v for k, v in m.items() if k not in ("reasoning", "null_content")}
        if m.get("reasoning") is not None and reasoning_field is not None:
            d[reasoning_field] = m["reasoning"]
        if m.get("null_content"):
            d["content"] = None
        out.append(d)
    return out


@contextlib.contextmanager
def _template_failures():
    """A template that fails on a conversation (``'</think>' in None``...) refuses that row, with the cause;
    its own ``raise_exception`` (a jinja2 TemplateError) passes through for ingest to report."""
    try:
        yield
    except TemplateError:
        raise
    except Exception as e:  # noqa: BLE001
        from jinja2.exceptions import TemplateError as JinjaError

        if isinstance(e, JinjaError):
            raise
        raise TemplateError(f"the chat template fails on this conversation ({type(e).__name__}: {e})") from e


def _inline_reasoning(content: str) -> list[str]:
    """The pieces of a content between ``<think>`` and ``</think>``."""
    out, inside = [], False
    for piece in _THINK_TAGS.split(content):
        if piece in ("<think>", "</think>"):
            inside = piece == "<think>"
        elif inside:
            out.append(piece)
    return out


def _fields_of(messages: list[dict], with_reasoning: bool) -> tuple[list[_Field], list[dict]]:
    """The generated pieces of every assistant turn, and the messages with each replaced by its mark.

    Content is split at ``<think>``/``</think>`` (kept, since templates such as Qwen3's parse them): the text
    between the tags is reasoning, the rest content. Whitespace-only pieces are left as they are (templates
    test them for emptiness), and so are tool call arguments (rendered as JSON, identical in both renderings).
    """
    fields: list[_Field] = []
    skeleton = []

    def mark(f: _Field) -> str:
        fields.append(f)
        return f"\ue000{len(fields) - 1}\ue001"

    turn = -1
    for m in messages:
        d = dict(m)
        if m["role"] == "assistant":
            turn += 1
            parts, pos, inside = [], 0, False
            for piece in _THINK_TAGS.split(m.get("content") or ""):
                if piece in ("<think>", "</think>"):
                    inside = piece == "<think>"
                    parts.append(piece)
                elif piece.strip():
                    parts.append(mark(_Field(turn, "reasoning" if inside else "content", piece, pos,
                                             m["content"][:pos])))
                else:
                    parts.append(piece)
                pos += len(piece)
            if m.get("content") is not None:
                d["content"] = "".join(parts)
            if with_reasoning and (m.get("reasoning") or "").strip():
                d["reasoning"] = mark(_Field(turn, "reasoning", m["reasoning"]))
            if m.get("tool_calls"):
                calls = []
                for call in m["tool_calls"]:
                    call = dict(call)
                    if isinstance(call.get("function"), dict):
                        call["function"] = dict(call["function"], name=mark(_Field(turn, "tool",
                                                                                    call["function"]["name"])))
                    else:
                        call["name"] = mark(_Field(turn, "tool", call["name"]))
                    calls.append(call)
                d["tool_calls"] = calls
        skeleton.append(d)
    return fields, skeleton


class _ModelRenderer:
    """``(messages, truth) -> Rendered`` with one tokenizer's chat template. What the template does around an
    assistant turn (its generation prompt, its end-of-turn tokens) is probed once here, not per row."""

    def __init__(self, tokenizer, empty_think: str = "target"):
        if empty_think not in EMPTY_THINK:
            raise ValueError(f"empty_think must be one of {EMPTY_THINK}, not {empty_think!r}")
        self.tokenizer, self.empty_think = tokenizer, empty_think
        self.template = chat_template_of(tokenizer)
        self.fixed = {"date_string": FIXED_DATE.strftime("%d %b %Y")}
        self.kwargs = dict(tokenizer.special_tokens_map) | self.fixed
        self.specials = _special_strings(tokenizer)
        self.marked = re.search(r"\{%-?\s*generation\s*-?%\}", self.template) is not None
        self.reasoning_field = next((f for f in REASONING_FIELDS if f in self.template), None)
        self.header, self.scaffold = self._probe_generation_prompt()
        eos = tokenizer.eos_token
        self.eot: set[str] = {eos} if eos else set()  # the end-of-turn tokens; EOS, should the probes find none
        self.closes = self._probe_turn_ends()  # the template writes an end-of-turn token after an assistant turn
        self.in_turn = self._probe_tool_call_turn()

    def _apply(self, messages: list[dict], **kw) -> str:
        return self.tokenizer.apply_chat_template(_template_messages(messages, self.reasoning_field), tokenize=False,
                                                  **self.fixed, **kw)

    def _probe(self, messages: list[dict], **kw) -> str | None:
        try:
            with _fixed_clock(self.template):
                return self._apply(messages, **kw)
        except Exception:  # noqa: BLE001 - a template refusing a probe conversation: that property is unknown
            return None

    def _probe_generation_prompt(self) -> tuple[str, str]:
        """The generation prompt (what a server appends before the model generates: the header of an assistant
        turn), and what thinking off adds after it (Qwen3's empty think block)."""
        with_prompt, without = self._probe(_PROBE_USER, add_generation_prompt=True), self._probe(_PROBE_USER)
        header = with_prompt[len(without):] if with_prompt and without and with_prompt.startswith(without) else ""
        no_think = self._probe(_PROBE_USER, add_generation_prompt=True, enable_thinking=False)
        scaffold = (no_think[len(with_prompt):] if no_think and with_prompt and no_think.startswith(with_prompt)
                    else "")
        return header, scaffold

    def _probe_turn_ends(self) -> bool:
        """Adds to ``eot`` the first special token after an assistant content, in the last turn and in an earlier
        one (gpt-oss ends the last with <|return|>, earlier ones with <|end|>); whether any was found."""
        closes = False
        user, mark0 = _PROBE_USER, _mark(0)
        for conv in (user + [{"role": "assistant", "content": mark0}],
                     user + [{"role": "assistant", "content": mark0}] + user + [{"role": "assistant", "content": "a"}]):
            tail = self._probe(conv)
            if tail and mark0 in tail:
                rest = tail.split(mark0, 1)[1]
                first = min(((rest.find(s), s) for s in self.specials if s in rest), default=None)
                if first is not None:
                    self.eot.add(first[1])
                    closes = True
        return closes

    def _probe_tool_call_turn(self) -> set[str]:
        """The special tokens a tool call turn renders before its end (DeepSeek's <｜tool▁call▁end｜>...); its end,
        where that is a token of its own (gpt-oss's <|call|>), is added to ``eot``: the last special token of a
        conversation that ends with the call."""
        mark0 = _mark(0)
        calls = self._probe(_PROBE_USER + [{"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": mark0, "arguments": {"a": 1}}}]}])
        if not (calls and mark0 in calls):
            return set()
        rest = calls.split(mark0, 1)[1]
        stop = min((rest.find(s) for s in self.eot if s in rest), default=None)
        if stop is None:
            last = max(((rest.rfind(s), s) for s in self.specials if s in rest), default=None)
            if last is not None:
                stop = last[0]
                self.eot.add(last[1])
        return {s for s in self.specials if s in rest[:stop]}

    def _end_of_turn(self, text: str, end: int, limit: int, turn: int, tools: bool) -> int:
        """Past the end-of-turn token that closes the turn whose last generated piece ends at ``end``: the first
        one before ``limit`` (the next piece), after nothing but whitespace, or the turn's tool call syntax."""
        found = [(p, sp) for sp in self.eot if (p := text.find(sp, end, limit)) >= 0]
        if found:
            p, sp = min(found)
            between = text[end:p]
            if not between.strip() or (tools and not any(x in between for x in self.specials if x not in self.in_turn)):
                return p + len(sp)
        if self.closes:  # the template has an end-of-turn token, and this turn does not end with it
            raise TemplateError(f"the chat template renders no end-of-turn token right after assistant turn "
                                f"{turn + 1}; cannot tell where it ends")
        return end

    def __call__(self, messages: list[dict], truth: list[tuple[int, int, int]] | None = None) -> Rendered:
        with _fixed_clock(self.template), _template_failures():
            return self._render_marked(messages, truth) if self.marked else self._render(messages, truth)

    def _render_marked(self, messages: list[dict], truth) -> Rendered:
        """The template's ``{% generation %}`` blocks are the targets, exactly (transformers' assistant mask)."""
        from transformers.utils.chat_template_utils import render_jinja_template

        assistants = [m for m in messages if m["role"] == "assistant"]
        texts, indices = render_jinja_template(conversations=[_template_messages(messages, self.reasoning_field)],
                                               chat_template=self.template, return_assistant_tokens_mask=True,
                                               **self.kwargs)
        text, blocks = texts[0], [tuple(b) for b in indices[0]]
        if len(blocks) != len(assistants):
            raise TemplateError(f"the template marks {len(blocks)} generation blocks for {len(assistants)} "
                                "assistant turns")
        for k, (m, (s, e)) in enumerate(zip(assistants, blocks)):
            names = [c.get("function", c)["name"] for c in m.get("tool_calls") or []]
            if any(text.find(name, s, e) < 0 for name in names):
                raise TemplateError(f"the chat template drops the tool calls of assistant turn {k + 1}")
        dropped = sum(1 for m, (s, e) in zip(assistants, blocks)
                      if (m.get("reasoning") or "").strip() and text.find(m["reasoning"].strip(), s, e) < 0)
        reasoning = []
        for m, (s, e) in zip(assistants, blocks):
            for piece in [m.get("reasoning") or ""] + _inline_reasoning(m.get("content") or ""):
                if piece.strip() and (at := text.find(piece.strip(), s, e)) >= 0:
                    reasoning.append((at, at + len(piece.strip())))
        truth_abs = _block_truth(text, blocks[-1], assistants[-1]["content"] or "", truth) if truth else []
        return Rendered(text, blocks, truth_abs, dropped, add_bos=False, reasoning_spans=reasoning)

    def _render(self, messages: list[dict], truth) -> Rendered:
        """Targets found by aligning the text with a rendering where each generated piece is a mark."""
        n_turns = sum(m["role"] == "assistant" for m in messages)
        fields, skeleton_msgs = _fields_of(messages, self.reasoning_field is not None)
        text = self._apply(messages)
        located = _aligned(text, self._apply(skeleton_msgs), fields)
        dropped = len(self._dropped_turns(messages, fields, located))
        spans = self._turn_spans(text, fields, located, n_turns)
        truth_abs = _field_truth(fields, located, n_turns - 1, truth) if truth else []
        reasoning = sorted((s, e) for i, (s, e, _) in located.items() if fields[i].kind == "reasoning")
        return Rendered(text, spans, truth_abs, dropped, add_bos=False, reasoning_spans=reasoning)

    def _dropped_turns(self, messages: list[dict], fields: list[_Field], located: dict) -> set[int]:
        """Assistant turns whose reasoning the template does not render; content or tool calls dropped refuse."""
        dropped_turns: set[int] = set()
        for i, f in enumerate(fields):
            if i not in located:
                if f.kind != "reasoning":
                    what = "content" if f.kind == "content" else "tool calls"
                    raise TemplateError(f"the chat template drops the {what} of assistant turn {f.turn + 1}")
                dropped_turns.add(f.turn)
        if self.reasoning_field is None:  # the template reads no reasoning field: a given one is dropped
            dropped_turns |= {k for k, m in enumerate(m for m in messages if m["role"] == "assistant")
                              if (m.get("reasoning") or "").strip()}
        return dropped_turns

    def _turn_spans(self, text: str, fields: list[_Field], located: dict, n_turns: int) -> list[tuple[int, int]]:
        """Each turn: from the end of its header (the generation prompt) to past its end-of-turn token."""
        per_turn: dict[int, list[tuple[int, int]]] = {}
        for i, (s, e, _) in located.items():
            per_turn.setdefault(fields[i].turn, []).append((s, e))
        if set(per_turn) != set(range(n_turns)):
            missing = min(set(range(n_turns)) - set(per_turn)) + 1
            raise TemplateError(f"the chat template renders nothing of assistant turn {missing} that the model "
                                "generates (its content and tool calls are empty or dropped)")
        bounds = sorted((s, e) for s, e, _ in located.values())
        spans = []
        for turn in range(n_turns):
            first, last = min(per_turn[turn])[0], max(e for _, e in per_turn[turn])
            before = max((e for _, e in bounds if e <= first), default=0)
            after = min((s for s, _ in bounds if s >= last), default=len(text))
            start = self._turn_start(text, fields, located, before, first)
            tools = any(fields[i].kind == "tool" and fields[i].turn == turn for i in located)
            spans.append((start, self._end_of_turn(text, last, after, turn, tools)))
        return spans

    def _turn_start(self, text: str, fields: list[_Field], located: dict, before: int, first: int) -> int:
        """Where a turn's generated text starts: after its header (or at its content's inline think tags), and past
        the empty think block where that is the prompt's. ``first``: its first piece; ``before``: the previous end."""
        start = first
        h = text.rfind(self.header, before, first) if self.header else -1
        if h >= 0:
            start = h + len(self.header)  # what follows the header and precedes the field is generated (<think>\n)
        else:  # no generation prompt (Llama-2's): the turn starts where its content does, inline think tags
            # included (leading whitespace not: the template's own may precede it)
            pre = next((fields[i].before for i, (s, _, _) in located.items() if s == first), "").lstrip()
            if pre and text.endswith(pre, before, first):
                start -= len(pre)
        if self.scaffold and self.empty_think == "prompt" and text.startswith(self.scaffold, start):
            start += len(self.scaffold)
        return start


_PROBE_USER = [{"role": "user", "content": "u"}]


def _mark(i: int) -> str:
    """The placeholder of generated piece ``i`` in a skeleton rendering (``_MARK``)."""
    return f"\ue000{i}\ue001"


def _block_truth(text: str, block: tuple[int, int], last: str, truth: list[tuple[int, int, int]]) -> list[tuple]:
    """Ground-truth spans of the last assistant content ``last`` placed in its generation block of ``text``."""
    s0, e0 = block
    content_start = text.find(last, s0, e0)
    if content_start < 0:  # rendered trimmed: offset 0 of the raw content lies before the first kept char
        found = text.find(last.strip(), s0, e0)
        if found < 0:
            raise TemplateError("the chat template rewrites the last assistant content (beyond trimming "
                                "whitespace); cannot place the ground-truth spans")
        content_start = found - (len(last) - len(last.lstrip()))
    return [(max(content_start + s, s0), min(content_start + e, e0), lab) for s, e, lab in truth
            if min(content_start + e, e0) > max(content_start + s, s0)]


def _field_truth(fields: list[_Field], located: dict, last_turn: int, truth: list[tuple[int, int, int]]) -> list:
    """Ground-truth spans of the last turn's raw content, carried onto where its content segments rendered."""
    out = []
    segs = [(f.raw_start, len(f.raw), located[i]) for i, f in enumerate(fields)
            if f.turn == last_turn and f.raw_start >= 0 and i in located]
    for s, e, lab in truth:
        for r0, _, (ts, te, lead) in segs:
            a, b = max(s, r0 + lead), min(e, r0 + lead + (te - ts))
            if b > a:
                out.append((ts + a - r0 - lead, ts + b - r0 - lead, lab))
    return out


def renderer(template: str, tokenizer, empty_think: str = "target"):
    """A function ``(messages, truth) -> Rendered`` for ``template`` (``tulu`` or ``model``; ``empty_think``:
    the convention of ``EMPTY_THINK`` for a model template).

    What depends only on the tokenizer (EOS, the chat template, its special strings) is
    looked up once here, not per row: transformers resolves special-token attributes
    dynamically, at a cost comparable to rendering a whole Tulu conversation.
    """
    if template == "tulu":
        eos = tokenizer.eos_token
        if eos is None:
            raise ValueError("tokenizer has no eos_token; the Tulu template ends every response with EOS")
        def tulu(messages: list[dict], truth=None) -> Rendered:
            for j, m in enumerate(messages):
                extra = "reasoning" if m.get("reasoning") is not None else "tool_calls" if m.get("tool_calls") else None
                if m["role"] == "tool" or extra:
                    raise TemplateError(f"messages[{j}] has {extra or 'role tool'}, which the Tulu template cannot "
                                        "render; use data.template: model with a template that does")
            return render_tulu(messages, eos, truth)

        return tulu
    if template == "model":
        return _ModelRenderer(tokenizer, empty_think)
    raise ValueError(f"unknown template {template!r}; choose from {TEMPLATES}")


@dataclass
class Tokenized:
    """One conversation's tokens (a row of ``TokenizedBatch``)."""

    input_ids: np.ndarray  # int32
    response_mask: np.ndarray  # bool, True where the token is a target
    truth: np.ndarray | None  # uint8 per token, None when the input has no labels
    truncated: bool
    char_starts: np.ndarray  # anchor character of each token in the rendered text (-1: BOS)
    char_ends: np.ndarray  # end (exclusive) of each token's characters (-1: BOS)
    reasoning: np.ndarray | None = None  # bool per token: a target of the model's reasoning


@dataclass
class TokenizedBatch:
    """Many rendered conversations tokenised, as flat arrays: row i is ``[offsets[i], offsets[i + 1])``.

    Flat because ingest's cost was per-row Python around the tokenizer, not the tokenizer:
    every per-token step (anchors, masks, truth labels, BOS, truncation) runs once per
    chunk over these arrays, and Arrow list columns are made from them with no Python
    object per token.
    """

    offsets: np.ndarray  # int64, rows + 1
    input_ids: np.ndarray  # int32
    response_mask: np.ndarray  # bool
    truth: np.ndarray  # uint8 (0 throughout a row without labels)
    has_truth: np.ndarray  # bool per row: the input carried ground-truth spans
    truncated: np.ndarray  # bool per row
    char_starts: np.ndarray  # int32 anchors (-1: BOS)
    char_ends: np.ndarray  # int32 (-1: BOS)
    reasoning: np.ndarray | None = None  # bool: targets anchored in ``Rendered.reasoning_spans``

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def n_response(self) -> np.ndarray:
        """Target tokens per row."""
        cs = np.concatenate([[0], np.cumsum(self.response_mask, dtype=np.int64)])
        return cs[self.offsets[1:]] - cs[self.offsets[:-1]]

    def row(self, i: int) -> Tokenized:
        a, b = self.offsets[i], self.offsets[i + 1]
        return Tokenized(self.input_ids[a:b], self.response_mask[a:b],
                         self.truth[a:b] if self.has_truth[i] else None, bool(self.truncated[i]),
                         self.char_starts[a:b], self.char_ends[a:b],
                         None if self.reasoning is None else self.reasoning[a:b])

    def kept_char_end(self) -> np.ndarray:
        """Per row, the end of the text its kept tokens cover (-1 if none): what truncation left of it."""
        n = len(self.offsets) - 1
        out = np.full(n, -1, dtype=np.int64)
        nonempty = self.offsets[1:] > self.offsets[:-1]
        if nonempty.any():
            out[nonempty] = np.maximum.reduceat(self.char_ends.astype(np.int64), self.offsets[:-1][nonempty])
        return out

    def first_last_in(self, char_lo: np.ndarray, char_hi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row: (first token, one past the last token, all of them targets) among the tokens whose
        anchor lies in ``[char_lo[i], char_hi[i])``; -1, -1, False where no token does."""
        n = len(self)
        row = np.repeat(np.arange(n), self.lengths)
        inside = (self.char_starts >= char_lo[row]) & (self.char_starts < char_hi[row])
        idx = np.flatnonzero(inside)
        first, last = np.full(n, -1, np.int64), np.full(n, -2, np.int64)
        rows = row[idx]
        first[rows[::-1]] = idx[::-1]  # the last write wins: the smallest index of each row
        last[rows] = idx
        has = first >= 0
        bad = np.bincount(row[idx[~self.response_mask[idx]]], minlength=n)
        local = np.where(has, first - self.offsets[:-1], -1)
        return local, np.where(has, last - self.offsets[:-1] + 1, -1), has & (bad == 0)


_ASCII_SPACE = np.array([chr(c).isspace() for c in range(128)], dtype=bool)


def _next_non_space(text: str) -> np.ndarray:
    """For every character of ``text`` and one past its end: the index of the first non-whitespace
    character at or after it (``str.isspace`` semantics, Unicode included), ``len(text)`` if none."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    n = len(codes)
    space = np.zeros(n, dtype=bool)
    low = codes < 128
    space[low] = _ASCII_SPACE[codes[low]]
    if not low.all():
        wide = np.unique(codes[~low])
        wide = wide[[chr(int(c)).isspace() for c in wide]]
        if len(wide):
            space |= np.isin(codes, wide)
    nxt = np.where(space, n, np.arange(n))
    return np.concatenate([np.minimum.accumulate(nxt[::-1])[::-1], [n]])


def _encode(tokenizer, texts: list[str]) -> tuple[list, list]:
    """Token ids and character offsets of each text, from one batch call of the fast tokenizer.

    The Rust tokenizer is called directly: transformers' wrapper builds a dict of Python
    lists per text, which cost as much as the tokenisation itself (docs/benchmarks.md,
    ingest). Like the wrapper, it runs without truncation or padding, which a
    tokenizer.json may configure.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], enc["offset_mapping"]
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    return [e.ids for e in encodings], [e.offsets for e in encodings]


def tokenize_batch(tokenizer, rendered: list[Rendered], max_length: int) -> TokenizedBatch:
    """Tokenise many rendered conversations with one batch call of the tokenizer.

    Per conversation, the rule of this module: one tokenisation of the whole text with
    character offsets; for Tulu, a leading BOS unless the text's first token is one (it
    gives the first real token a context, as in pretraining), while a model template's
    text is tokenised as it is, as ``apply_chat_template`` does; each token's anchor; the response mask and
    truth labels read at the anchors; the first ``max_length`` tokens; position 0 never a
    target. Computed over all the texts at once, laid side by side.
    """
    ids, offs, lengths = _flat_encoding(tokenizer, rendered)
    layout = _Layout(rendered)
    anchors = layout.anchors(rendered, offs, lengths)
    bos = getattr(tokenizer, "bos_token_id", None)
    dest, full_len, full_off = _bos_placement(bos, rendered, ids, lengths)
    size = int(full_off[-1])
    out_ids = _scatter(size, dest, ids, bos if bos is not None else 0, np.int32)
    out_anchor = _scatter(size, dest, anchors, -1, np.int64)
    out_end = _scatter(size, dest, offs[:, 1], -1, np.int64)
    at = np.where(out_anchor >= 0, out_anchor + np.repeat(layout.base[:-1], full_len), layout.size_chars - 1)
    mask = layout.covered([(i, s, e) for i, r in enumerate(rendered) for s, e in r.response_spans])[at]
    has_truth, char_truth = layout.truth_labels(rendered)
    truth = np.where(mask, char_truth[at], 0).astype(np.uint8)
    # each row's first max_length tokens; position 0 has no context and is never a target
    pos = np.arange(size) - np.repeat(full_off[:-1], full_len)
    mask[pos == 0] = False
    reasoning_spans = [(i, s, e) for i, r in enumerate(rendered) for s, e in r.reasoning_spans]
    reasoning = layout.covered(reasoning_spans)[at] if reasoning_spans else np.zeros(size, dtype=bool)
    keep = pos < max_length
    kept_len = np.minimum(full_len, max_length)
    return TokenizedBatch(np.concatenate([[0], np.cumsum(kept_len)]), out_ids[keep], mask[keep], truth[keep],
                          has_truth, full_len > max_length, out_anchor[keep].astype(np.int32),
                          out_end[keep].astype(np.int32), reasoning[keep])


def _flat_encoding(tokenizer, rendered: list[Rendered]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every text's token ids and (start, end) character offsets, rows laid end to end, and each row's length."""
    n = len(rendered)
    ids_lists, offs_lists = _encode(tokenizer, [r.text for r in rendered]) if n else ([], [])
    lengths = np.fromiter(map(len, ids_lists), dtype=np.int64, count=n)
    total = int(lengths.sum())
    ids = np.fromiter(chain.from_iterable(ids_lists), dtype=np.int64, count=total)
    offs = np.fromiter(chain.from_iterable(chain.from_iterable(offs_lists)), dtype=np.int64,
                       count=2 * total).reshape(total, 2)
    return ids, offs, lengths


class _Layout:
    """The texts side by side, each followed by a non-space sentinel, so no text's whitespace run reaches the next:
    per-character labels of every row in one array, read at each token's anchor."""

    def __init__(self, rendered: list[Rendered]):
        self.text_len = np.fromiter((len(r.text) for r in rendered), dtype=np.int64, count=len(rendered))
        self.base = np.concatenate([[0], np.cumsum(self.text_len + 1)])  # where each text starts, and the end
        self.size_chars = int(self.base[-1]) + 1  # the slot after the last text is never labelled (BOS reads it)

    def anchors(self, rendered: list[Rendered], offs: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Each token's anchor in its text: its first non-space character, if it has one, else its start."""
        nxt = _next_non_space("\0".join(r.text for r in rendered) + "\0")
        tok_base = np.repeat(self.base[:-1], lengths)
        first = nxt[offs[:, 0] + tok_base] - tok_base
        return np.where(first < offs[:, 1], first, offs[:, 0])

    def _clipped(self, rows: np.ndarray, chars: np.ndarray) -> np.ndarray:
        """Layout positions of character offsets, clipped to their row's text."""
        return self.base[rows] + np.clip(chars, 0, self.text_len[rows])

    def covered(self, spans: list[tuple[int, int, int]]) -> np.ndarray:
        """Per character of the layout: inside one of ``spans`` (row, start, end)."""
        rs = np.array(spans, dtype=np.int64).reshape(-1, 3)
        cover = np.zeros(self.size_chars + 1, dtype=np.int64)
        np.add.at(cover, self._clipped(rs[:, 0], rs[:, 1]), 1)
        np.add.at(cover, self._clipped(rs[:, 0], rs[:, 2]), -1)
        return np.cumsum(cover[:-1]) > 0

    def truth_labels(self, rendered: list[Rendered]) -> tuple[np.ndarray, np.ndarray]:
        """Per row, whether it carries ground-truth spans; per character of the layout, its label (0: none)."""
        has_truth = np.fromiter((bool(r.truth_spans) for r in rendered), dtype=bool, count=len(rendered))
        char_truth = np.zeros(self.size_chars, dtype=np.uint8)
        truth_spans = [(i, s, e, lab) for i, r in enumerate(rendered) for s, e, lab in r.truth_spans]
        if truth_spans:
            ts = np.array(truth_spans, dtype=np.int64)
            t_lo = self._clipped(ts[:, 0], ts[:, 1]).tolist()
            t_hi = self._clipped(ts[:, 0], ts[:, 2]).tolist()
            for a, b, lab in zip(t_lo, t_hi, ts[:, 3].tolist()):  # in order: a later span overrides an earlier one
                char_truth[a:b] = lab
        return has_truth, char_truth


def _bos_placement(bos: int | None, rendered: list[Rendered], ids: np.ndarray,
                   lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A leading BOS where a row asks for one (Tulu; a model template's text is taken as it is) and lacks it:
    where each token lands, each row's length with it and the rows' offsets."""
    n = len(rendered)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    add = np.zeros(n, dtype=np.int64)
    if bos is not None:
        add[:] = np.fromiter((r.add_bos for r in rendered), dtype=bool, count=n)
        check = (lengths > 0) & (add == 1)
        add[check] = ids[starts[:-1][check]] != bos
    full_len = lengths + add
    full_off = np.concatenate([[0], np.cumsum(full_len)])
    dest = np.arange(len(ids)) + np.repeat(full_off[:-1] + add - starts[:-1], lengths)
    return dest, full_len, full_off


def _scatter(size: int, dest: np.ndarray, values: np.ndarray, fill: int, dtype) -> np.ndarray:
    out = np.full(size, fill, dtype=dtype)
    out[dest] = values
    return out


def load_tokenizer(path: str, fingerprint: str | None = None):
    """The tokenizer at ``path`` (a directory, hub id, or model in object storage), checked to be the one the run's
    samples were tokenized with when its ``fingerprint`` is given: ids decoded, or a model exported, with a
    tokenizer changed since would be silently wrong."""
    from transformers import AutoTokenizer

    from tokenclean.tasks.storage import open_tokenizer, shown

    tokenizer = AutoTokenizer.from_pretrained(open_tokenizer(path))
    if fingerprint is not None and (now := tokenizer_fingerprint(tokenizer)) != fingerprint:
        raise ValueError(f"the tokenizer at {shown(path)} is not the one this run's samples were tokenized with "
                         f"(fingerprint {now}, the run's {fingerprint}); restore it, or re-run the pipeline")
    return tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the vocabulary, merges and special tokens: anything that changes ids or which tokens are special."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # slow tokenizer: vocab is the best we have
        h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr((tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)).encode())
    # which tokens are special (tokenizer_config.json can mark more than tokenizer.json does): it decides
    # what a template's end-of-turn target is, and where generation stops
    h.update(repr(sorted(_special_strings(tokenizer))).encode())
    return h.hexdigest()[:16]
