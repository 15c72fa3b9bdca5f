"""Tulu chat template and the prompt/response token mask.

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
from dataclasses import dataclass, field

import numpy as np

TEMPLATE_NAME = "tulu-v2"
ROLES = ("system", "user", "assistant")
# Ground-truth token labels, used only when the input carries them (synthetic demo data).
TRUTH_OTHER, TRUTH_INFORMATIVE, TRUTH_CORRUPTED = 0, 1, 2


@dataclass
class Rendered:
    text: str
    response_spans: list[tuple[int, int]]  # [start, end) in text, EOS included
    truth_spans: list[tuple[int, int, int]] = field(default_factory=list)  # (start, end, label)


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


@dataclass
class Tokenized:
    input_ids: np.ndarray  # int32
    response_mask: np.ndarray  # bool, True where the token is a target
    truth: np.ndarray | None  # uint8 per token, None when the input has no labels
    truncated: bool
    char_starts: np.ndarray  # anchor character of each token in the rendered text (-1: BOS)

    def tokens_in(self, start: int, end: int) -> np.ndarray:
        """Indices of the tokens whose anchor lies in [start, end)."""
        return np.nonzero((self.char_starts >= start) & (self.char_starts < end))[0]


def _in_spans(starts: np.ndarray, spans) -> np.ndarray:
    mask = np.zeros(len(starts), dtype=bool)
    for s, e in spans:
        mask |= (starts >= s) & (starts < e)
    return mask


def _anchors(text: str, offsets: np.ndarray) -> np.ndarray:
    out = offsets[:, 0].copy()
    for i, (s, e) in enumerate(offsets):
        if s < 0:
            continue
        piece = text[s:e]
        stripped = piece.lstrip()
        if stripped:
            out[i] = s + len(piece) - len(stripped)
    return out


def tokenize_rendered(tokenizer, rendered: Rendered, max_length: int) -> Tokenized:
    enc = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        # A leading BOS gives the first real token a context, as in pretraining.
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
    if truncated:
        ids, mask, starts = ids[:max_length], mask[:max_length], starts[:max_length]
        truth = truth[:max_length] if truth is not None else None
    # Position 0 has no context and can never be a target.
    mask[0] = False
    return Tokenized(ids, mask, truth, truncated, starts)


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
