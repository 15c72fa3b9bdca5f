"""Conformance of ``data.template: model`` with the ecosystem's oracle, family by family, on real tokenizers.

For each family (real ``tokenizer.json`` + chat template, fetched once into a cache by
``tests/real_tokenizers.py``) a generated set of conversation shapes is ingested by
``tasks.ingest.ingest``, and each sample is compared with:

* ids: the model's own template, ``apply_chat_template(tokenize=True)``, exactly;
* targets: TRL's training template for the family (``trl/chat_templates/<family>_training.jinja``,
  whose ``{% generation %}`` blocks are its statement of what is trained) through transformers'
  ``return_assistant_tokens_mask``, exactly, after the conventions of ``CONVENTIONS`` (README,
  "Tokenisation rule"), each applied explicitly to the oracle and counted.

The same shapes then run the ``{% generation %}`` path, with TRL's training template as the
tokenizer's own: ids and targets equal the oracle's with no convention at all, multi-turn included.
"""
from __future__ import annotations

import collections
import copy
import json
from importlib.resources import files

import pytest

import real_tokenizers

# family -> TRL's training template (the lenml llama3_1 package carries the Llama-3 template, TRL's llama3.jinja)
TRAINING = {"qwen3": "qwen3_training.jinja", "llama3_1": "llama3_training.jinja", "gemma3": "gemma3_training.jinja"}
# Where tokenclean's default differs from TRL's training template, by family: what the oracle's mask becomes.
CONVENTIONS = {
    # the newline a template writes after the end-of-turn token is never generated (generation stops at the token)
    "qwen3": ("eot-newline", "earlier-turn-think"),
    "llama3_1": (),
    "gemma3": ("eot-newline",),
}
EOT = {"qwen3": "<|im_end|>", "llama3_1": "<|eot_id|>", "gemma3": "<end_of_turn>"}
TOOL_CALL = [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]


def _shapes():
    """(id, messages as a row gives them, messages as the template reads them): every shape of the issue."""
    u = [{"role": "user", "content": "Where does Ana live?"}]
    sys_ = [{"role": "system", "content": "Answer briefly."}]
    answers = ["Ana lives in Port Velo.", "Zwei Wörter: 日本 🙂.", "x"]
    rows = []

    def add(name, msgs):
        rows.append((name, msgs))

    for k, a in enumerate(answers):
        add(f"single-{k}", u + [{"role": "assistant", "content": a}])
        add(f"system-{k}", sys_ + u + [{"role": "assistant", "content": a}])
        add(f"multi-{k}", sys_ + u + [{"role": "assistant", "content": a}, {"role": "user", "content": "And Bo?"},
                                      {"role": "assistant", "content": "Bo too."}, {"role": "user", "content": "Why?"},
                                      {"role": "assistant", "content": a[::-1]}])
        add(f"whitespace-{k}", [{"role": "user", "content": " \n Where? \n"},
                                {"role": "assistant", "content": f" \n {a} \n "}])
        add(f"newline-first-{k}", u + [{"role": "assistant", "content": f"\n  {a}"}])
        add(f"special-text-{k}", u + [{"role": "assistant", "content": f"{a} <|im_end|>"}])
        add(f"special-eot-{k}", u + [{"role": "assistant", "content": f"{a} <|eot_id|>"}])
        add(f"special-mid-{k}", u + [{"role": "assistant", "content": f"<|im_start|>{a}<|eot_id|> end"}])
        add(f"think-inline-{k}", u + [{"role": "assistant", "content": f"<think>\nStep 1. Step {k}.\n</think>\n\n{a}"}])
        add(f"think-empty-{k}", u + [{"role": "assistant", "content": f"<think>\n\n</think>\n\n{a}"}])
        for field in ("reasoning_content", "reasoning", "thinking"):
            add(f"think-field-{field}-{k}", u + [{"role": "assistant", "content": a, field: f"Step 1, step {k}."}])
        add(f"think-multi-{k}", u + [{"role": "assistant", "content": "A1.", "reasoning_content": "r1"},
                                     {"role": "user", "content": "Q2?"},
                                     {"role": "assistant", "content": f"<think>r2</think>{a}"}])
        add(f"tools-{k}", u + [{"role": "assistant", "content": "", "tool_calls": TOOL_CALL},
                               {"role": "tool", "content": '{"sky": "clear"}'},
                               {"role": "assistant", "content": a}])
        add(f"tools-content-{k}", u + [{"role": "assistant", "content": "Let me check.", "tool_calls": TOOL_CALL,
                                        "reasoning_content": "I need the weather."},
                                       {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "warm"},
                                       {"role": "assistant", "content": a}])
    return rows


def _as_template_reads(msgs):
    """The reasoning under the field name these templates read (``reasoning_content``)."""
    out = []
    for m in msgs:
        m = dict(m)
        for f in ("reasoning", "thinking"):
            if f in m:
                m["reasoning_content"] = m.pop(f)
        out.append(m)
    return out


LONG = [(f"truncated-{k}", [{"role": "user", "content": "Tell me about Port Velo."},
                            {"role": "assistant", "content": ("<think>\nLong thought.\n</think>\n\n" if k else "")
                             + "Port Velo is a harbour town. " * 30}]) for k in range(2)]
TRUNCATE_AT = 48


@pytest.fixture(scope="module", params=sorted(TRAINING))
def family(request):
    name = request.param
    try:
        real_tokenizers.fetch(name)
    except real_tokenizers.Unavailable as e:
        pytest.skip(str(e))
    tok = real_tokenizers.load(name)
    trl = (files("trl") / "chat_templates" / TRAINING[name]).read_text()
    marked = copy.copy(tok)  # the same vocabulary (shared, read-only), TRL's template as its own
    marked.chat_template = trl
    assert tok.chat_template != trl
    return name, tok, trl, marked


def _ingest(tmp_path, tok, rows, max_length):
    from tokenclean.tasks.ingest import ingest

    path = tmp_path / f"rows-{max_length}.jsonl"
    path.write_text("".join(json.dumps({"id": name, "messages": msgs}) + "\n" for name, msgs in rows))
    return ingest([str(path)], [], tok, max_length=max_length, eval_fraction=0.0, n_parts=1, seed=0,
                  template="model")


def _runs(ids, mask):
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def _oracle(tok, trl, msgs):
    """The model template's ids, and TRL's training-template ids and assistant mask."""
    ids = list(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])
    out = tok.apply_chat_template(msgs, chat_template=trl, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    return ids, list(out["input_ids"]), [bool(x) for x in out["assistant_masks"]]


def _apply_conventions(family, tok, ids_t, mask_t, our_runs, counts):
    """TRL's target runs, with each of the family's listed conventions applied (and counted)."""
    runs = _runs(ids_t, mask_t)
    conv = CONVENTIONS[family]
    if "eot-newline" in conv:  # "<|im_end|>\n": the "\n" is the template's, not generated
        eot, nl = tok.convert_tokens_to_ids(EOT[family]), tok.encode("\n", add_special_tokens=False)
        for r in runs:
            if r[-len(nl):] == nl and r[-len(nl) - 1] == eot:
                del r[-len(nl):]
                counts["eot-newline"] += 1
    if "earlier-turn-think" in conv:  # Qwen3 renders no think block in turns before the last query
        think, end_think = tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>")
        sep = tok.encode("\n\n", add_special_tokens=False)
        for k, r in enumerate(runs):
            if r[0] == think and k < len(our_runs) and our_runs[k][0] != think:
                cut = r.index(end_think) + 1
                assert r[cut:cut + len(sep)] == sep
                empty = cut == 3  # <think> "\n\n" </think>: the empty scaffold
                counts["earlier-turn-think (empty)" if empty else "earlier-turn-think (reasoning dropped)"] += 1
                runs[k] = r[cut + len(sep):]
    return runs


def _check(family, tok, trl, samples, shapes, max_length, counts, marked):
    by_id = {s["uid"]: s for s in samples.to_pylist()}
    for name, msgs in shapes:
        s = by_id[name]
        ids, ids_t, mask_t = _oracle(tok, trl, _as_template_reads(msgs))
        if marked:  # the generation path: the template's own blocks, exactly
            assert ids == ids_t
            assert s["input_ids"] == ids[:max_length], name
            assert s["response_mask"] == mask_t[:max_length], name
            counts["equal"] += 1
            continue
        assert s["input_ids"] == ids[:max_length], name  # the model's own template, verbatim
        ours = _runs(s["input_ids"], s["response_mask"])
        want = _apply_conventions(family, tok, ids_t, mask_t, ours, counts)
        if s["truncated"]:  # the kept prefix: the runs up to the cut, the last one cut short
            assert ours[:-1] == want[:len(ours) - 1] and want[len(ours) - 1][:len(ours[-1])] == ours[-1], name
        else:
            assert ours == want, name
        if ids_t == ids:  # the same text: position by position too
            flat = [t for r in want for t in r]
            assert [t for t, m in zip(s["input_ids"], s["response_mask"]) if m] == flat[:sum(s["response_mask"])]
        counts["equal"] += 1


def _expected_refusals(family, shapes):
    """Rows whose template cannot render them, with the true reason: Llama-3's template drops tool calls,
    Gemma-3's refuses a tool message."""
    reason = {"qwen3": None, "llama3_1": "the chat template drops the tool calls of assistant turn 1",
              "gemma3": "the chat template refuses the conversation: Conversation roles must alternate "
                        "user/assistant/user/assistant/..."}[family]
    return {name: reason for name, m in shapes if reason and any(x.get("tool_calls") for x in m)}


@pytest.mark.parametrize("path", ["model-template", "generation-blocks"])
def test_targets_and_ids_equal_the_oracle(tmp_path, family, path):
    name, tok, trl, marked_tok = family
    use = marked_tok if path == "generation-blocks" else tok
    shapes = _shapes()
    counts = collections.Counter()
    for rows, max_length in ((shapes, 4096), (LONG, TRUNCATE_AT)):
        res = _ingest(tmp_path, use, rows, max_length)
        refused = {q["raw"] and json.loads(q["raw"])["id"]: q["reason"] for q in res.quarantine}
        want = _expected_refusals(name, rows)
        assert refused == want
        kept = [(n, m) for n, m in rows if n not in want]
        _check(name, use, trl, res.samples, kept, max_length, counts, path == "generation-blocks")
        if max_length == TRUNCATE_AT:
            assert all(res.samples.column("truncated").to_pylist())
        counts["compared"] += len(kept)
    assert counts["equal"] == counts["compared"]
    print(f"\n{name} {path}: {dict(counts)}")


def test_reasoning_a_template_drops_is_counted(tmp_path, family):
    """Qwen3 renders no reasoning in turns before the last user query; Llama-3's renders none: counted."""
    name, tok, _, _ = family
    rows = [("a", [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1", "reasoning": "r1"},
                   {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "<think>r2</think>A2"}]),
            ("b", [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "reasoning_content": "r"}])]
    res = _ingest(tmp_path, tok, rows, 4096)
    assert res.samples.num_rows == 2
    assert res.reasoning_dropped == {"qwen3": 1, "llama3_1": 2, "gemma3": 2}[name]


def test_tulu_refuses_what_it_cannot_render(tmp_path, family):
    """Reasoning fields, tool calls and tool messages have no place in the Tulu format: refused, saying so."""
    from tokenclean.tasks.ingest import ingest

    _, tok, _, _ = family
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps({"id": n, "messages": m}) for n, m in [
        ("r", [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "reasoning_content": "r"}]),
        ("t", [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "", "tool_calls": TOOL_CALL},
               {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]),
        ("ok", [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>r</think>A"}])]) + "\n")
    res = ingest([str(path)], [], tok, max_length=512, eval_fraction=0.0, n_parts=1, seed=0)
    assert res.samples.column("uid").to_pylist() == ["ok"]
    assert sorted(q["reason"] for q in res.quarantine) == [
        "messages[1] has reasoning, which the Tulu template cannot render; use data.template: model with a "
        "template that does",
        "messages[1] has tool_calls, which the Tulu template cannot render; use data.template: model with a "
        "template that does"]


def test_empty_think_convention_is_explicit_and_keyed(family, monkeypatch):
    """Qwen3's empty think block is a target by default (the model generates it when served with thinking on);
    the other convention makes it context, and changes the tokenization key."""
    from tokenclean.tasks import template as T
    from tokenclean.tasks.ingest import tokenization_of

    name, tok, _, _ = family
    if name != "qwen3":
        pytest.skip("only Qwen3's template writes an empty think block")
    msgs = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Answer."}]
    thought = [msgs[0], dict(msgs[1], reasoning="r")]

    def targets(m):
        r = T.render_model_template(tok, m)
        return [r.text[s:e] for s, e in r.response_spans]

    key = tokenization_of(tok, 512, "model")
    assert targets(msgs) == ["<think>\n\n</think>\n\nAnswer.<|im_end|>"]
    monkeypatch.setattr(T, "EMPTY_THINK", "prompt")
    assert targets(msgs) == ["Answer.<|im_end|>"]
    assert targets(thought) == ["<think>\nr\n</think>\n\nAnswer.<|im_end|>"]  # reasoning is generated either way
    assert tokenization_of(tok, 512, "model") != key


def test_a_turn_not_closed_by_its_end_of_turn_token_is_refused_saying_so(family):
    """Text the template writes between an answer and its end-of-turn token is neither the row's nor known to be
    generated: the row is refused with that reason, not trained with a guessed end."""
    from tokenclean.tasks.template import TemplateError, render_model_template

    name, tok, _, _ = family
    if name != "llama3_1":
        pytest.skip("one family suffices")
    signed = copy.copy(tok)
    signed.chat_template = tok.chat_template.replace("| trim + '<|eot_id|>'", "| trim + ' (signed)<|eot_id|>'")
    assert signed.chat_template != tok.chat_template
    with pytest.raises(TemplateError, match="no end-of-turn token right after assistant turn 1"):
        render_model_template(signed, [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}])


def test_reasoning_dropped_count_survives_a_resumed_ingest(tmp_path, family):
    """The count is written with each part, so an ingest resumed from finished parts reports it too."""
    import duckdb

    from tokenclean.tasks.ingest import IngestSpec, stage_inputs, tokenization_of

    name, tok, _, _ = family
    if name != "qwen3":
        pytest.skip("one family suffices")
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"messages": [
        {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1", "reasoning": "r1"},
        {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]}) + "\n")
    spec = IngestSpec(tokenization_of(tok, 512, "model"), 512, 0.0, 1, 0, "model")
    reads = []
    for _ in range(2):
        con = duckdb.connect()
        reads.append(stage_inputs(con, [str(path)], [], tok, spec, parts_dir=str(tmp_path / "parts")))
        con.close()
    assert [r["splits_reused"] for r in reads] == [0, 1]
    assert [r["reasoning_dropped"] for r in reads] == [1, 1]


def test_truth_spans_follow_the_content_through_reasoning(family):
    """Ground-truth spans are offsets into the raw content; with inline reasoning the template re-renders
    around them (Qwen3 strips the newlines inside <think>, Llama-3 trims the whole)."""
    from tokenclean.tasks.template import render_model_template

    _, tok, _, _ = family
    content = "<think>\n\nLook it up.\n</think>\n\nAna lives in Port Velo."
    spans = [(content.index(w), content.index(w) + len(w), lab) for w, lab in (("Look it", 1), ("Port Velo", 2))]
    r = render_model_template(tok, [{"role": "user", "content": "Where?"}, {"role": "assistant", "content": content}],
                              truth=spans)
    assert [(r.text[a:b], lab) for a, b, lab in r.truth_spans] == [("Look it", 1), ("Port Velo", 2)]
