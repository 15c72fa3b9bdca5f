"""One conversation at a time through ``tokenclean.tasks.template``, which ingest uses in batches."""
from __future__ import annotations

from tokenclean.tasks.template import Rendered, Tokenized, renderer, tokenize_batch


def render_model_template(tokenizer, messages: list[dict], truth: list[tuple[int, int, int]] | None = None,
                          empty_think: str = "target") -> Rendered:
    """Render with the tokenizer's chat template; response spans = what the model generates in each assistant
    turn (reasoning, content, tool calls) and its end-of-turn token. ``truth`` as in ``render_tulu``."""
    return renderer("model", tokenizer, empty_think)(messages, truth)


def tokenize_rendered(tokenizer, rendered: Rendered, max_length: int) -> Tokenized:
    return tokenize_batch(tokenizer, [rendered], max_length).row(0)
