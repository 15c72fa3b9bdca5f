"""Chat templates (Tulu, or the model's own) and the prompt/response token mask.

Two templates (``data.template``):

* ``tulu`` (default, as in the paper): open-instruct's ``<|user|>\n...`` format, rendered
  here, so the response spans are known by construction.
* ``model``: the tokenizer's own Jinja chat template (``apply_chat_template``), for a
  Llama-3, Qwen2.5, Mistral... model used as its users prompt it. The rendered text is
  the model's; the response spans are found in it (``render_model_template``): from the
  template's ``{% generation %}`` markers where it has them, else by rendering once more
  with each assistant content replaced by a unique placeholder and aligning the two
  texts. No template is assumed to be prefix-stable (Mistral's moves the system prompt
  into the last user turn; Qwen3's drops earlier reasoning), because both renderings are
  of the whole conversation. A template that rewrites assistant content beyond trimming
  is refused per row (quarantined with the reason), never silently mis-masked.

The mask is derived from character offsets of one tokenisation of the whole rendered
text. Tokenising prompt and response separately and concatenating gives different ids
at the boundary whenever BPE would merge across it, which silently misaligns labels.

Rule (documented in README): a token belongs to a span iff its *anchor* lies inside it;
the anchor is the token's first non-whitespace character (its first character if it is
all whitespace). Byte-level BPE glues the preceding space onto a word (" Paris"), so
the raw start offset would assign a word to whatever precedes it. A token is a
response (target) token iff its anchor lies in an assistant turn's content or EOS. Tokens past
``max_length`` are dropped (prefix kept); a sample left with no response token is
rejected by ingest.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import numpy as np

TEMPLATE_NAME = "tulu-v2"
TEMPLATES = ("tulu", "model")
MODEL_TEMPLATE_RULE = "anchor-v1"  # how response spans are found in a model template's text (part of its key)
ROLES = ("system", "user", "assistant")
# Ground-truth token labels, used only when the input carries them (synthetic demo data).
TRUTH_OTHER, TRUTH_INFORMATIVE, TRUTH_CORRUPTED = 0, 1, 2


@dataclass
class Rendered:
    text: str
    response_spans: list[tuple[int, int]]  # [start, end) in text, EOS included
    truth_spans: list[tuple[int, int, int]] = field(default_factory=list)  # (start, end, label)


# The same text as ``render_tulu``, as a Jinja chat template: written into exported tokenizers so that
# ``apply_chat_template`` at serving time reproduces what a Tulu-trained model saw.
TULU_JINJA = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' }}"
              "{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token + '\n' }}"
              "{% else %}{{ message['content'] + '\n' }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


def render_tulu(messages: list[dict], eos: str, truth: list[tuple[int, int, int]] | None = None) -> Rendered:
    """Render with the Tulu template used by open-instruct.

    ``truth`` spans are relative to the *last* assistant message's content.
    """
    parts: list[str] = []
    pos = 0
    spans: list[tuple[int, int]] = []
    last_start = None
    for m in messages:
        role, content = m["role"], m["content"]
        header = f"<|{role}|>\n"
        parts.append(header)
        pos += len(header)
        if role == "assistant":
            body = content + eos
            spans.append((pos, pos + len(body)))
            last_start = pos
            parts.append(body + "\n")
            pos += len(body) + 1
        else:
            parts.append(content + "\n")
            pos += len(content) + 1
    truth_abs = []
    if truth and last_start is not None:
        truth_abs = [(last_start + s, last_start + e, lab) for s, e, lab in truth]
    return Rendered("".join(parts), spans, truth_abs)


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


def template_id(tokenizer, template: str) -> str:
    """What the tokenization key records of a template: its name, or the model template's text hash."""
    if template == "tulu":
        return TEMPLATE_NAME
    if template == "model":
        text = chat_template_of(tokenizer)
        return f"model:{hashlib.sha256(text.encode()).hexdigest()[:16]}:{MODEL_TEMPLATE_RULE}"
    raise ValueError(f"unknown template {template!r}; choose from {TEMPLATES}")


_MARK = re.compile("\ue000(\\d+)\ue001")  # private-use code points: never in real text's assistant turns


def _special_strings(tokenizer) -> list[str]:
    """Special tokens as they appear in text, longest first (so ``<|eot_id|>`` wins over a prefix of it)."""
    specials = set(tokenizer.all_special_tokens)
    for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(tok, "special", False):
            specials.add(str(tok))
    return sorted((t for t in specials if t), key=len, reverse=True)


def _extend_over_terminator(text: str, end: int, specials: list[str], eos: str | None) -> int:
    """End of a response span, extended over the end-of-turn token right after the content.

    ``<|eot_id|>``, ``<|im_end|>``, ``</s>``: emitting it is how the model learns to stop,
    so it is a target, as EOS is in the Tulu template. It must follow the content
    directly (any special token) or after whitespace (EOS only, as Llama-2's
    ``content + ' ' + eos``): a special token after a newline is the next turn's header.
    A span that already ends with a special token (a ``{% generation %}`` block) is kept.
    """
    if any(text.endswith(sp, 0, end) for sp in specials):
        return end
    for sp in specials:
        if text.startswith(sp, end):
            return end + len(sp)
    j = end
    while j < len(text) and text[j].isspace():
        j += 1
    if eos and j > end and text.startswith(eos, j):
        return j + len(eos)
    return end


def _aligned_spans(text: str, skeleton: str, contents: list[str]) -> list[tuple[int, int, int]]:
    """(start, end, leading characters trimmed) of each of ``contents`` in ``text``.

    ``skeleton`` is the same conversation rendered with content i replaced by mark i. The
    literal pieces between marks must match ``text`` exactly; each content may be rendered
    as is or trimmed (``| trim`` is common). Anything else is a TemplateError.
    """
    pieces = _MARK.split(skeleton)  # literal, index, literal, index, ..., literal
    literals, order = pieces[0::2], [int(i) for i in pieces[1::2]]
    if sorted(order) != list(range(len(contents))):
        raise TemplateError("the chat template drops or repeats assistant turns; cannot locate the responses")
    spans: list[tuple[int, int, int]] = [(0, 0, 0)] * len(contents)
    cur = 0
    for n, idx in enumerate(order):
        if not text.startswith(literals[n], cur):
            raise TemplateError("the chat template renders the prompt differently around assistant content")
        cur += len(literals[n])
        nxt = literals[n + 1]
        c = contents[idx]
        for cand in dict.fromkeys((c, c.strip(), c.lstrip(), c.rstrip())):
            end = cur + len(cand)
            if text.startswith(cand, cur) and (text.startswith(nxt, end) if n + 1 < len(order) else text[end:] == nxt):
                lead = len(c) - len(c.lstrip()) if cand in (c.strip(), c.lstrip()) and cand != c else 0
                spans[idx] = (cur, end, lead)
                cur = end
                break
        else:
            raise TemplateError("the chat template rewrites assistant content (beyond trimming); cannot locate it")
    if not text.startswith(literals[-1], cur) or cur + len(literals[-1]) != len(text):
        raise TemplateError("the chat template renders the prompt differently around assistant content")
    return spans


def render_model_template(tokenizer, messages: list[dict], truth: list[tuple[int, int, int]] | None = None) -> Rendered:
    """Render with the tokenizer's chat template; response spans = assistant contents + their terminator.

    ``truth`` spans are relative to the last assistant message's content, as in ``render_tulu``.
    """
    template = chat_template_of(tokenizer)
    kwargs = dict(tokenizer.special_tokens_map)
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    specials = _special_strings(tokenizer)
    if re.search(r"\{%-?\s*generation\s*-?%\}", template):
        from transformers.utils.chat_template_utils import render_jinja_template

        texts, indices = render_jinja_template(conversations=[messages], chat_template=template,
                                               return_assistant_tokens_mask=True, **kwargs)
        text, blocks = texts[0], [tuple(b) for b in indices[0]]
        if len(blocks) != len(assistants):
            raise TemplateError(f"the template marks {len(blocks)} generation blocks for {len(assistants)} "
                                "assistant turns")
        spans = [(s, _extend_over_terminator(text, e, specials, tokenizer.eos_token)) for s, e in blocks]
        last = messages[assistants[-1]]["content"]
        s0, e0 = blocks[-1]
        content_start = text.find(last, s0, e0)
        if content_start < 0:  # rendered trimmed: offset 0 of the raw content lies before the first kept char
            found = text.find(last.strip(), s0, e0)
            if found < 0:
                raise TemplateError("the chat template rewrites assistant content (beyond trimming); cannot "
                                    "place the ground-truth spans")
            content_start = found - (len(last) - len(last.lstrip()))
    else:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        skeleton_msgs = [dict(m) for m in messages]
        for n, i in enumerate(assistants):
            skeleton_msgs[i]["content"] = f"\ue000{n}\ue001"
        skeleton = tokenizer.apply_chat_template(skeleton_msgs, tokenize=False)
        located = _aligned_spans(text, skeleton, [messages[i]["content"] for i in assistants])
        spans = [(s, _extend_over_terminator(text, e, specials, tokenizer.eos_token)) for s, e, _ in located]
        s_last, _, lead = located[-1]
        content_start = s_last - lead  # where offset 0 of the raw content would be
    truth_abs = []
    if truth:
        lo, hi = spans[-1]
        truth_abs = [(max(content_start + s, lo), min(content_start + e, hi), lab) for s, e, lab in truth
                     if min(content_start + e, hi) > max(content_start + s, lo)]
    return Rendered(text, spans, truth_abs)


def render(template: str, tokenizer, messages: list[dict], truth=None) -> Rendered:
    """Render one conversation with ``template`` (``tulu`` or ``model``)."""
    if template == "tulu":
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has no eos_token; the Tulu template ends every response with EOS")
        return render_tulu(messages, tokenizer.eos_token, truth)
    if template == "model":
        return render_model_template(tokenizer, messages, truth)
    raise ValueError(f"unknown template {template!r}; choose from {TEMPLATES}")


@dataclass
class Tokenized:
    input_ids: np.ndarray  # int32
    response_mask: np.ndarray  # bool, True where the token is a target
    truth: np.ndarray | None  # uint8 per token, None when the input has no labels
    truncated: bool
    char_starts: np.ndarray  # anchor character of each token in the rendered text (-1: BOS)
    char_ends: np.ndarray  # end (exclusive) of each token's characters (-1: BOS)

    def tokens_in(self, start: int, end: int) -> np.ndarray:
        """Indices of the tokens whose anchor lies in [start, end)."""
        return np.nonzero((self.char_starts >= start) & (self.char_starts < end))[0]


def _in_spans(starts: np.ndarray, spans) -> np.ndarray:
    mask = np.zeros(len(starts), dtype=bool)
    for s, e in spans:
        mask |= (starts >= s) & (starts < e)
    return mask


_ASCII_SPACE = np.array([chr(c).isspace() for c in range(128)], dtype=bool)


def _anchors(text: str, offsets: np.ndarray) -> np.ndarray:
    """Each token's anchor: the first non-whitespace character of its span (its start if it is all whitespace).

    Vectorised over the text (``str.isspace`` semantics, Unicode included): for every
    character, the index of the next non-whitespace one, looked up at each token start.
    """
    starts, ends = offsets[:, 0], offsets[:, 1]
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
    nxt = np.concatenate([np.minimum.accumulate(nxt[::-1])[::-1], [n]])  # nxt[n] = n: an empty tail
    real = starts >= 0
    first = nxt[np.clip(starts, 0, n)]
    return np.where(real & (first < ends), first, starts)


def tokenize_rendered(tokenizer, rendered: Rendered, max_length: int) -> Tokenized:
    return tokenize_batch(tokenizer, [rendered], max_length)[0]


def tokenize_batch(tokenizer, rendered: list[Rendered], max_length: int) -> list[Tokenized]:
    """Tokenise many rendered conversations with one batch call of the tokenizer (Rust, all cores for a fast one).

    Per conversation the result is exactly ``tokenize_rendered``'s: a leading BOS, token
    anchors, the response mask and truth labels from the character spans, truncation.
    """
    if not rendered:
        return []
    enc = tokenizer([r.text for r in rendered], add_special_tokens=False, return_offsets_mapping=True)
    bos = getattr(tokenizer, "bos_token_id", None)
    out = []
    for r, ids, offs in zip(rendered, enc["input_ids"], enc["offset_mapping"]):
        out.append(_tokenized(r, np.asarray(ids, dtype=np.int32), np.asarray(offs, dtype=np.int64).reshape(-1, 2),
                              bos, max_length))
    return out


def _tokenized(rendered: Rendered, ids: np.ndarray, offsets: np.ndarray, bos, max_length: int) -> Tokenized:
    if bos is not None and not (len(ids) and ids[0] == bos):
        # A leading BOS gives the first real token a context, as in pretraining (templates that
        # render ``{{ bos_token }}`` themselves already have it).
        ids = np.concatenate([[bos], ids]).astype(np.int32)
        offsets = np.concatenate([[[-1, -1]], offsets])
    starts = _anchors(rendered.text, offsets)
    mask = _in_spans(starts, rendered.response_spans)
    truth = None
    if rendered.truth_spans:
        truth = np.zeros(len(ids), dtype=np.uint8)
        for s, e, lab in rendered.truth_spans:
            truth[(starts >= s) & (starts < e)] = lab
        truth[~mask] = TRUTH_OTHER
    truncated = len(ids) > max_length
    ends = offsets[:, 1].copy()
    if truncated:
        ids, mask, starts, ends = ids[:max_length], mask[:max_length], starts[:max_length], ends[:max_length]
        truth = truth[:max_length] if truth is not None else None
    # Position 0 has no context and can never be a target.
    if len(mask):
        mask[0] = False
    return Tokenized(ids, mask, truth, truncated, starts.astype(np.int32), ends.astype(np.int32))


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the vocabulary, merges and special tokens: anything that changes ids."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # slow tokenizer: vocab is the best we have
        h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr((tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)).encode())
    return h.hexdigest()[:16]
